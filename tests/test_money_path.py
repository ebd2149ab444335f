"""The money path's failure holes, each closed: the spool, the sweep, the
replay and the clocks.  Real astbill.py processes on SQLite and MariaDB."""
import json
import os
import stat
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest

from agipeer import Scenario
from astbill import ledger, recovery
from astbill.config import ConfigError, check, load
from astbill.store import Busy, StoreError
from conftest import ASTBILL, AccountLock, invariants, place_call, start_held_call
from test_bad_input import CALL_REPLIES, env_bytes, run_in_process
from test_failures import take_database_down, unreachable

D10 = {"1001": Decimal("10")}
SKEWED_CLOCK = str(Path(__file__).resolve().parent / "skewed_clock")


def spooled_call(billing, request, **scenario):
    """A 61 s call whose database goes down while it is up: its uniqueid."""
    gate = threading.Event()
    call = start_held_call(billing, gate, answered_ms=61_000, **scenario)
    assert call.dial_reached.wait(30)
    restore = take_database_down(billing, request)
    gate.set()
    result = call.wait()
    restore()
    assert "ASTBILL_COST" not in result.variables_set, result.dialogue_text()
    return call.uniqueid, result


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


# -- 1. a pending spooled settlement is never settled by policy -------------------------

def test_a_call_whose_settlement_waits_in_the_spool_is_never_released(tariff, request, monkeypatch):
    uniqueid, _ = spooled_call(tariff, request)
    assert mode(tariff.spool) == 0o700
    assert mode(tariff.spool / f"{uniqueid}.call") == 0o600
    tariff.backdate(7200)
    monkeypatch.setattr(recovery, "REPLAY_WAIT_SECS", 0.2)
    lock_path = tariff.spool / recovery.LOCK
    with recovery.open_lock(load(str(tariff.config)), 0):   # another replayer at work
        assert tariff.sweep() == [{"uniqueid": uniqueid, "account": "1001", "action": "held",
                                   "reason": "its settlement waits in the spool"}]
    assert mode(lock_path) == 0o600
    assert tariff.balance("1001") == Decimal("10") and tariff.reservations() == [(uniqueid,)]
    assert tariff.sweep() == []                    # the replay settled it: nothing overdue
    assert tariff.cdr(uniqueid)["cost"] == Decimal("0.12")
    invariants(tariff, D10)


# -- 2. a spool that cannot be written ------------------------------------------------

def test_a_missing_spool_directory_is_made(tariff, request):
    assert not tariff.spool.exists()
    uniqueid, result = spooled_call(tariff, request)
    assert mode(tariff.spool) == 0o700
    assert [p.name for p in tariff.spool.glob("*.call")] == [f"{uniqueid}.call"]
    assert tariff.admin_process("sweep").returncode == 0
    assert tariff.balance("1001") == Decimal("9.88")
    invariants(tariff, D10)


def test_an_unwritable_spool_falls_back_and_the_audit_says_so(tariff, request):
    blocker = tariff.path / "not-a-directory"
    blocker.write_text("")
    tariff.write_config(spool_dir=str(blocker / "spool"))
    uniqueid, result = spooled_call(tariff, request)
    fallback = tariff.fallback_spool / f"{uniqueid}.call"
    assert result.verbose[-1].startswith(f"astbill: {uniqueid} settlement spooled to {fallback}: ")
    assert mode(tariff.fallback_spool) == 0o700
    status, out, _ = tariff.admin("audit")
    assert status == 1
    assert (f"call {uniqueid}: settlement in the fallback spool {fallback} (the spool could"
            " not be written; run astbill-admin sweep)") in out
    tariff.backdate(7200)
    done = tariff.sweep()          # replays from the fallback; never released free
    assert done == [] and not fallback.exists()
    assert tariff.cdr(uniqueid)["state"] == "settled"
    assert tariff.balance("1001") == Decimal("9.88")


def test_with_no_spool_at_all_asterisks_log_gets_the_whole_record(tariff, request):
    blocker = tariff.path / "not-a-directory"
    blocker.write_text("")
    tariff.write_config(spool_dir=str(blocker / "spool"), spool_fallback_dir=str(blocker / "fb"))
    uniqueid, result = spooled_call(tariff, request)
    line = result.verbose[-1]
    assert line.startswith(f"astbill: {uniqueid} settlement NOT recorded, spool failed (")
    record = json.loads(line[line.index('{"'):])
    assert (record["uniqueid"], record["dialstatus"], record["talk_ms"]) == (uniqueid, "ANSWER", 61_000)
    assert tariff.reservations() == [(uniqueid,)]   # the audit reports it stale in time


# -- 3. on_db_error: allow never loses a spooled call ----------------------------------

def test_a_repeated_uniqueid_during_an_outage_is_refused_and_nothing_is_overwritten(tariff):
    good = tariff.settings["database"]
    tariff.write_config(database=unreachable(tariff), on_db_error="allow", db_error_allow_secs=120)
    first = place_call(tariff, Scenario(answered_ms=61_000))
    assert first.variables_set["ASTBILL_STATUS"] == "OK"
    again = place_call(tariff, Scenario(answered_ms=5_000), agi_uniqueid=first.uniqueid)
    assert again.variables_set["ASTBILL_STATUS"] == "ERROR" and again.dial_args is None
    assert again.verbose == [f"astbill: ERROR call {first.uniqueid} was let through already"]
    claim = json.loads((tariff.spool / f"{first.uniqueid}.call").read_text())
    end = json.loads((tariff.spool / f"{first.uniqueid}~1.call").read_text())
    assert (claim["ended"], end["talk_ms"]) == (0, 61_000)   # its end beside its claim
    tariff.write_config(database=good)
    assert tariff.admin_process("sweep").returncode == 0
    assert tariff.cdr(first.uniqueid)["cost"] == Decimal("0.12")
    assert tariff.balance("1001") == Decimal("9.88")


def test_a_let_through_call_killed_in_its_dial_is_billed_by_policy(tariff):
    good = tariff.settings["database"]
    tariff.write_config(database=unreachable(tariff), on_db_error="allow", db_error_allow_secs=120,
                        sweep_policy="charge")
    killed = place_call(tariff, Scenario(kill_after_dial_sent=True))
    assert (tariff.spool / f"{killed.uniqueid}.call").exists()
    tariff.write_config(database=good)
    assert tariff.sweep() == [] and tariff.cdr(killed.uniqueid) is None  # may still be up
    record = json.loads((tariff.spool / f"{killed.uniqueid}.call").read_text())
    record["started"] -= 7200
    (tariff.spool / f"{killed.uniqueid}.call").write_text(json.dumps(record))
    tariff.sweep()
    cdr = tariff.cdr(killed.uniqueid)
    assert (cdr["state"], cdr["billsec"], cdr["cost"]) == ("charged", 120, Decimal("0.12"))
    invariants(tariff, D10)


# -- 4. deadlocks that keep coming are a busy account, not an outage --------------------

class DeadlockingStore:
    """A database on which every transaction loses a deadlock."""
    tries = 0

    def __init__(self, settings):
        pass

    def read(self, work):
        return work(self)

    def call_prices(self, account, prefixes, at):
        return ("default", [("49", "Germany", 127, 0, 1440, Decimal("0.06"), Decimal(0), 60, 60)],
                1, {})

    def atomic(self, work):
        DeadlockingStore.tries += 1
        raise Busy("deadlock or certification conflict: 1213", retryable=True)

    def close(self):
        pass


class _Lost(Exception):
    """What a driver raises when the server does not answer."""


class _Unanswering:
    """A connection whose every statement fails as a server's read timeout."""

    def cursor(self):
        return self

    def execute(self, *_):
        raise _Lost(2013, "Lost connection to server during query")

    def rollback(self):
        raise _Lost(2006, "server has gone away")

    def close(self):
        pass


def test_a_kept_connection_failing_unpinged_is_run_again_once_not_at_every_try(monkeypatch):
    """A kept session handed out without a ping that fails at its first
    statement is run again at once on a new connection; when the new one
    fails too, that is the outage, answered as one (not AUTHORIZE_TRIES
    times at once)."""
    from astbill.store.base import Store

    class Kept(Store):
        driver_errors = (_Lost,)
        connects = 0

        def _connect(self):
            Kept.connects += 1
            return _Unanswering()

        def _classify(self, exc):
            return None

    store = Kept({})
    store.kept, store._conn, store.answered = True, _Unanswering(), time.monotonic()
    store.unpinged_secs = 1.0     # as astbill-fastagi keeps its sessions
    monkeypatch.setattr(ledger, "open_store", lambda settings: store if store.usable() else None)
    tries = []

    def work(s):
        tries.append(s.unchecked)
        return s.read(lambda tx: tx.one("SELECT 1"))
    with pytest.raises(StoreError) as failed:
        ledger.attempt({}, work, ledger.AUTHORIZE_TRIES)
    assert tries == [True, False] and Kept.connects == 1
    assert not failed.value.unchecked


def a_batch_refused(tariff, account, uniqueid, error):
    """A transaction that takes 2 from ``account``'s balance, then reserves
    3 on 1001 for ``uniqueid`` (writes that go with the COMMIT on MySQL),
    is refused with ``error``."""
    store = tariff.store()
    try:
        def work(tx):
            tx.change_balance(account, Decimal("-2"), "adjust", None, "2026-12-04 00:00:00")
            tx.add_reservation(uniqueid, "1001", Decimal("3"), 60)
        with pytest.raises(error):
            store.atomic(work)
    finally:
        store.close()


def test_a_batch_that_fails_midway_commits_nothing(tariff):
    """A statement whose result is not read goes with the next one or the
    COMMIT (on MySQL); it fails as it would alone: a duplicate reservation
    is a Conflict, the COMMIT after it in the batch never runs, and the
    transaction's writes before it are rolled back."""
    from astbill.store import Conflict
    store = tariff.store()
    try:
        store.atomic(lambda tx: tx.add_reservation("dup.1", "1001", Decimal("1"), 60))
    finally:
        store.close()
    ledger_rows = tariff.query("SELECT COUNT(*) FROM astledger")
    reserved = tariff.query("SELECT reserved FROM astaccount WHERE account = '1001'")
    a_batch_refused(tariff, "1001", "dup.1", Conflict)
    assert tariff.balance("1001") == Decimal("10")
    assert tariff.query("SELECT reserved FROM astaccount WHERE account = '1001'") == reserved
    assert tariff.query("SELECT COUNT(*) FROM astledger") == ledger_rows


def test_a_batch_that_waits_out_a_lock_commits_nothing(tariff):
    """The writes that go with the COMMIT wait for a locked row as alone:
    past lock_wait_secs that is Busy, and the ledger row and balance change
    before the locked update are rolled back."""
    tariff.admin_ok("account", "add", "other", "--balance", "5")
    tariff.write_config(lock_wait_secs=1)
    ledger_rows = tariff.query("SELECT COUNT(*) FROM astledger")
    lock = AccountLock(tariff)
    try:
        a_batch_refused(tariff, "other", "locked.1", Busy)
    finally:
        lock.release()
    assert tariff.balance("other") == Decimal("5")
    assert tariff.query("SELECT COUNT(*) FROM astledger") == ledger_rows
    assert tariff.reservations() == []


def test_a_write_the_server_refuses_with_the_commit_is_no_commit_in_doubt(tariff):
    """A write that goes with the COMMIT and that the server refuses (here
    a ledger row without its kind) stopped the batch before the COMMIT:
    the transaction is known not to have committed, so it is not in doubt
    (in doubt is for a connection lost on the way)."""
    ledger_rows = tariff.query("SELECT COUNT(*) FROM astledger")
    store = tariff.store()
    try:
        def work(tx):
            tx.lock_account("1001")
            tx.later("INSERT INTO astledger (account, amount, kind, uniqueid, created, actor)"
                     " VALUES (?, ?, ?, ?, ?, ?)",
                     ("1001", store.money_in(Decimal("-1")), None, None, "2026-12-04 00:00:00",
                      None))
        with pytest.raises(StoreError) as failed:
            store.atomic(work)
    finally:
        store.close()
    assert not failed.value.in_doubt
    assert tariff.query("SELECT COUNT(*) FROM astledger") == ledger_rows


def test_a_write_in_a_read_is_refused_on_every_backend(tariff):
    store = tariff.store()
    try:
        with pytest.raises(TypeError, match="a write in a read-only transaction"):
            store.read(lambda tx: tx.later("UPDATE astaccount SET max_calls = 7"))
    finally:
        store.close()
    assert tariff.query("SELECT max_calls FROM astaccount WHERE account = '1001'") == [(0,)]


def test_deadlock_retries_that_run_out_are_busy_even_when_outages_are_allowed(tariff, monkeypatch):
    settings = dict(load(str(tariff.config)), on_db_error="allow")
    monkeypatch.setattr(ledger, "open_store", DeadlockingStore)
    DeadlockingStore.tries = 0
    call = ledger.CallRecord(uniqueid="9.1", account="1001", number="4912345678")
    grant = ledger.authorize(settings, call)
    assert (grant.how, grant.status, DeadlockingStore.tries) == ("busy", "ERROR", ledger.AUTHORIZE_TRIES)
    assert grant.reason.startswith("account 1001 is busy: deadlock")
    assert not call.late and not tariff.spool.exists()


# -- 5. a garbled reply before the Dial releases at once ---------------------------------

def test_a_garbled_reply_before_the_dial_releases_the_reservation(tariff):
    tariff.write_config(sweep_policy="charge")
    stdin = env_bytes() + CALL_REPLIES[0] + b"garbage\n" + b"200 result=1\n" * 4
    status, lines = run_in_process(tariff, stdin)
    assert status == 0 and not any(line.startswith(b"EXEC Dial") for line in lines)
    assert tariff.reservations() == []
    (uniqueid,), = tariff.query("SELECT uniqueid FROM astcdr")
    assert (tariff.cdr(uniqueid)["state"], tariff.cdr(uniqueid)["cost"]) == ("settled", 0)
    assert tariff.balance("1001") == 10


# -- 6. Dial gets the whole string ----------------------------------------------------------

def test_a_long_dial_string_is_dialled_whole_and_shown_cut(tariff):
    trunks = "&".join(f"PJSIP/{{number}}@trunk-{i:02d}" for i in range(12))
    tariff.write_config(dial=trunks)
    result = place_call(tariff, Scenario(answered_ms=61_000))
    whole = trunks.format(number="4912345678")
    assert len(whole) > 255 and result.dial_args == f"{whole},60,L(3600000)"
    assert tariff.cdr(result.uniqueid)["lastdata"] == whole[:255]


# -- 7. one bad reservation does not stop the sweep ---------------------------------------

def test_a_bad_reservation_is_skipped_and_named_and_the_rest_are_swept(tariff):
    bad, good = (place_call(tariff, Scenario(kill_after_dial_sent=True)).uniqueid for _ in range(2))
    store = tariff.store()
    store.atomic(lambda tx: tx.run("DELETE FROM astcdr WHERE uniqueid = ?", (bad,)))
    store.close()
    tariff.backdate(7200)
    done = {d.pop("uniqueid"): d for d in tariff.sweep()}
    assert tariff.cdr(good)["lastdata"] == "PJSIP/4912345678@trunk"   # kept by the sweep
    assert done == {bad: {"account": "1001", "action": "skipped", "reason": f"no call {bad!r}"},
                    good: {"account": "1001", "action": "released", "cost": Decimal(0),
                           "billsec": 0}}
    status, out, _ = tariff.admin("audit")
    assert status == 1 and f"call {bad}: reservation without an active CDR" in out


# -- 8. the replay goes on past a failure, and never sweeps what failed -------------------

def two_spooled_calls(billing, request):
    """Calls of 1001 and 2002, 61 s each, ended while the database was down:
    their uniqueids, in that order."""
    billing.admin_ok("account", "add", "2002", "--balance", "10")
    gate = threading.Event()
    calls = [start_held_call(billing, gate, account=a, answered_ms=61_000) for a in ("1001", "2002")]
    assert all(c.dial_reached.wait(30) for c in calls)
    restore = take_database_down(billing, request)
    gate.set()
    assert all("ASTBILL_COST" not in c.wait().variables_set for c in calls)
    restore()
    return [c.uniqueid for c in calls]


def test_the_replay_settles_what_it_can_and_the_sweep_holds_what_failed(tariff, request):
    tariff.write_config(lock_wait_secs=1)
    first, second = two_spooled_calls(tariff, request)
    tariff.backdate(7200)
    lock = AccountLock(tariff, "1001")       # the first call's account stays busy
    try:
        done = tariff.sweep()
    finally:
        lock.release()
    if tariff.backend == "sqlite":           # one lock for the whole database
        assert sorted((d["uniqueid"], d["action"]) for d in done) == [
            (first, "held"), (second, "held")]
    else:
        assert done == [{"uniqueid": first, "account": "1001", "action": "held",
                         "reason": "its settlement waits in the spool"}]
        assert tariff.balance("2002") == Decimal("9.88")
    assert tariff.balance("1001") == Decimal("10")
    assert tariff.sweep() == []
    invariants(tariff, {"1001": Decimal("10"), "2002": Decimal("10")})
    assert tariff.balance("1001") == Decimal("9.88")


# -- 9. the sweep uses the database's clock --------------------------------------------

def test_a_box_whose_clock_is_behind_does_not_get_its_calls_swept(tariff):
    # The call's box runs two hours behind, the sweeping box two hours ahead:
    # only the database's clock may decide what is overdue.
    from agipeer import agi_env, run_call
    behind = dict(tariff.env, PYTHONPATH=SKEWED_CLOCK, ASTBILL_TEST_CLOCK_SKEW="-7200")
    block = agi_env(agi_extension="4912345678", agi_accountcode="1001")
    result = run_call([sys.executable, str(ASTBILL)], Scenario(kill_after_dial_sent=True),
                      block, behind, 30)
    assert result.returncode == -9 and tariff.reservations() == [(block["agi_uniqueid"],)]
    ahead = tariff.admin_process("sweep", "--json", env=dict(
        tariff.env, PYTHONPATH=SKEWED_CLOCK, ASTBILL_TEST_CLOCK_SKEW="7200"))
    assert json.loads(ahead.stdout)["swept"] == [], ahead.stderr   # the call may still be up
    assert tariff.reservations() == [(block["agi_uniqueid"],)]
    tariff.backdate(7200)
    assert [d["action"] for d in tariff.sweep()] == ["released"]


# -- 10. the sweep's grace covers settlement's own retries --------------------------------

def test_the_sweep_grace_must_outlast_the_settlement_retries():
    base = {"database": "mysql://a@h1/db", "dial": "SIP/{number}"}
    bound = ledger.settle_time_bound(check(dict(base)))
    assert 25 < bound < 60
    with pytest.raises(ConfigError, match=r"sweep_grace_secs must be at least 29, the longest"):
        check(dict(base, sweep_grace_secs=20))
    nodes = dict(base, database=["mysql://a@h1/db", "mysql://a@h2/db", "mysql://a@h3/db"])
    assert ledger.settle_time_bound(check(dict(nodes))) == bound + 2 * ledger.SETTLE_TRIES


# -- 12. the config cache knows a replaced or rewritten file ----------------------------

def test_the_config_cache_sees_a_file_replaced_within_one_mtime_tick(tmp_path):
    path = tmp_path / "astbill.yaml"
    path.write_text("database: sqlite://a.db\ndial: SIP/{number}\n")
    stamp = os.stat(path).st_mtime_ns
    assert load(str(path))["database"] == "sqlite://a.db"
    new = tmp_path / "new.yaml"
    new.write_text("database: sqlite://b.db\ndial: SIP/{number}\n")  # same size
    os.utime(new, ns=(stamp, stamp))
    os.replace(new, path)                                 # another inode, same size and mtime
    assert load(str(path))["database"] == "sqlite://b.db"
    with open(path, "r+") as f:                          # same inode, same size, mtime put back
        f.write("database: sqlite://c.db")
    os.utime(path, ns=(stamp, stamp))
    assert load(str(path))["database"] == "sqlite://c.db"


# -- found by review: a uniqueid run again, a call swept while up, a swept call's price ----------

def test_a_uniqueid_whose_let_through_call_waits_in_the_spool_is_refused_when_the_database_is_back(tariff):
    good = tariff.settings["database"]
    tariff.write_config(database=unreachable(tariff), on_db_error="allow", db_error_allow_secs=120)
    first = place_call(tariff, Scenario(answered_ms=61_000))
    tariff.write_config(database=good)
    again = place_call(tariff, Scenario(answered_ms=5_000), agi_uniqueid=first.uniqueid)
    assert (again.variables_set["ASTBILL_STATUS"], again.dial_args) == ("ERROR", None)
    tariff.sweep()
    assert tariff.cdr(first.uniqueid)["cost"] == Decimal("0.12")
    third = place_call(tariff, Scenario(answered_ms=5_000), agi_uniqueid=first.uniqueid)
    assert third.verbose == [f"astbill: ERROR call {first.uniqueid} was authorized already"]
    invariants(tariff, D10)


def test_a_let_through_call_whose_uniqueid_another_box_used_is_set_aside_and_named(tariff):
    good = tariff.settings["database"]
    tariff.write_config(database=unreachable(tariff), on_db_error="allow", db_error_allow_secs=120)
    first = place_call(tariff, Scenario(answered_ms=61_000))
    tariff.write_config(database=good)
    other_box = tariff.path / "other"
    other_box.mkdir()
    from conftest import Billing
    other = Billing(other_box, good, **{k: v for k, v in tariff.settings.items()
                                        if k not in ("database", "spool_dir", "spool_fallback_dir")})
    other.backend = tariff.backend
    place_call(other, Scenario(answered_ms=5_000), agi_uniqueid=first.uniqueid)
    tariff.sweep()
    assert (tariff.spool / f"{first.uniqueid}~1.call.bad").exists()
    status, out, _ = tariff.admin("audit")
    assert status == 1 and (f"call {first.uniqueid}: spooled record set aside as unusable"
                            in out) and "another call by that uniqueid" in out
    assert tariff.balance("1001") == Decimal("9.94")   # the other box's call; this one is named


@pytest.mark.parametrize("policy, corrected", [("release", "-0.12"), ("charge", "3.48")])
def test_a_call_the_sweep_settled_while_it_was_up_is_corrected_to_its_real_cost(
        tariff, policy, corrected):
    tariff.write_config(sweep_policy=policy)
    gate = threading.Event()
    call = start_held_call(tariff, gate, answered_ms=61_000)
    assert call.dial_reached.wait(30)
    tariff.backdate(7200)
    assert [d["action"] for d in tariff.sweep()] == [policy + "d"]
    gate.set()
    result = call.wait()
    assert result.variables_set["ASTBILL_COST"] == "0.1200", result.dialogue_text()
    cdr = tariff.cdr(call.uniqueid)
    assert (cdr["state"], cdr["billsec"], cdr["cost"]) == ("settled", 61, Decimal("0.12"))
    assert tariff.query("SELECT amount FROM astledger WHERE kind = 'correction'") == [
        (tariff.store().money_in(Decimal(corrected)),)]
    invariants(tariff, D10)


def test_a_call_swept_from_asterisks_cdr_is_priced_when_it_was_up(tariff):
    from test_routing import PEAK, call_at
    path = tariff.path / "peak.csv"
    path.write_text(PEAK)
    tariff.admin_ok("rate", "import", str(path), "--tariff", "peak")
    tariff.admin_ok("account", "add", "p1", "--balance", "10", "--tariff", "peak")
    tariff.write_config(asterisk_cdr_table="cdr")
    store = tariff.store()
    store.atomic(lambda tx: tx.run(
        "CREATE TABLE cdr (uniqueid VARCHAR(150) NOT NULL, lastapp VARCHAR(80) NOT NULL,"
        " billsec INT NOT NULL, disposition VARCHAR(45) NOT NULL, PRIMARY KEY (uniqueid, lastapp))"))
    # Monday 10:00, peak (0.10/min): the AGI dies in its Dial, Asterisk's CDR says 10 minutes.
    result = call_at(tariff, "2026-11-30 10:00:00", Scenario(kill_after_dial_sent=True), account="p1")
    store.atomic(lambda tx: tx.run("INSERT INTO cdr VALUES (?, 'Dial', 600, 'ANSWERED')",
                                   (result.uniqueid,)))
    store.close()
    tariff.backdate(7200)
    assert [(d["action"], d["cost"]) for d in tariff.sweep()] == [("settled", Decimal("1.00"))]
    cdr = tariff.cdr(result.uniqueid)
    start = ledger.epoch(cdr["start"])
    assert cdr["start"].startswith("2026-11-30 10:00:0")
    assert (cdr["answer"], cdr["end"]) == (cdr["start"], ledger.timestamp(start + 600))


# -- second review: only AstBill's own spool is trusted, one bad record stops nothing ----

def forged(uniqueid, **fields):
    """A spool record as an attacker would write it: a whole, valid CallRecord."""
    call = ledger.CallRecord(uniqueid=uniqueid, started=1, ended=2, **fields)
    return json.dumps(call.as_dict())


@pytest.mark.parametrize("how", ["another user's", "group-writable", "world-writable"])
def test_a_fallback_spool_anyone_else_could_write_is_never_read(tariff, how):
    # The fallback spool was made by someone else before AstBill needed it:
    # a forged NOANSWER would settle a live call at 0, a forged late call
    # would charge another account for a call never made.
    tariff.admin_ok("account", "add", "2002", "--balance", "10")
    gate = threading.Event()
    live = start_held_call(tariff, gate, answered_ms=61_000)
    assert live.dial_reached.wait(30)
    fallback = tariff.fallback_spool
    fallback.mkdir(mode=0o700)
    (fallback / f"{live.uniqueid}.call").write_text(forged(live.uniqueid, dialstatus="NOANSWER"))
    (fallback / "1700000000.9.call").write_text(forged(
        "1700000000.9", account="2002", number="4912345678", max_secs=1800, late=True,
        dialstatus="ANSWER", talk_ms=1_800_000, dial="PJSIP/4912345678@trunk"))
    os.symlink(tariff.config, fallback / "1700000000.8.call.bad.why")
    if how == "another user's":
        if os.geteuid() != 0:
            pytest.skip("needs root to give a directory to another user")
        for path in [fallback, *fallback.iterdir()]:
            os.lchown(path, 65534, 65534)
    else:
        fallback.chmod(0o770 if how == "group-writable" else 0o777)
    config = tariff.config.read_bytes()
    swept = tariff.admin_process("sweep", "--json")
    assert swept.returncode == 0, swept.stderr
    assert tariff.reservations() == [(live.uniqueid,)]   # the live call is untouched
    assert tariff.balance("2002") == Decimal("10")
    status, out, _ = tariff.admin("audit")
    why = {"another user's": "belongs to uid 65534", "group-writable": "is writable by others",
           "world-writable": "is writable by others"}[how]
    assert status == 1 and f"spool {fallback} {why}" in out, out
    assert "(refused: AstBill neither reads nor writes it)" in out
    gate.set()
    assert live.wait().variables_set["ASTBILL_COST"] == "0.1200"
    assert tariff.config.read_bytes() == config and len(list(fallback.iterdir())) == 3
    assert tariff.balance("1001") == Decimal("9.88")


def test_a_spool_that_is_a_symbolic_link_is_refused(tariff, request):
    real = tariff.path / "elsewhere"
    real.mkdir(mode=0o700)
    os.symlink(real, tariff.spool)
    uniqueid, result = spooled_call(tariff, request)
    # Never written through the link: the record went to the fallback.
    assert list(real.iterdir()) == [] and (tariff.fallback_spool / f"{uniqueid}.call").exists()
    status, out, _ = tariff.admin("audit")
    assert status == 1 and f"spool {tariff.spool} is a symbolic link" in out
    tariff.sweep()
    assert tariff.balance("1001") == Decimal("9.88")


def test_bad_records_are_set_aside_and_the_real_call_beside_them_is_billed(tariff, request):
    uniqueid, _ = spooled_call(tariff, request)
    spool = tariff.spool
    # A first-release record that says it was let through but not who pays;
    # JSON nested past any parser's depth; a FIFO and a directory named as
    # records (a blocking open of the FIFO would hang every sweep).
    (spool / "1700000000.1.settle").write_text(json.dumps(
        {"uniqueid": "1700000000.1", "dialstatus": "ANSWER", "talk_ms": 60000, "duration": 60,
         "dstchannel": "", "end": 1700000060, "late": True}))
    (spool / "1700000000.2.call").write_text("[" * 30_000 + "]" * 30_000)
    os.mkfifo(spool / "1700000000.3.call", 0o600)
    (spool / "1700000000.4.call").mkdir()
    (spool / "1700000000.5.call").write_bytes(b"\xff\xfe not UTF-8")
    swept = tariff.admin_process("sweep", "--json")
    assert swept.returncode == 0 and "Traceback" not in swept.stderr, swept.stderr
    assert json.loads(swept.stdout)["replayed"] == 1
    assert tariff.cdr(uniqueid)["cost"] == Decimal("0.12")
    assert tariff.balance("1001") == Decimal("9.88") and tariff.reservations() == []
    assert sorted(p.name for p in spool.glob("*.bad")) == [
        "1700000000.1.settle.bad", "1700000000.2.call.bad", "1700000000.5.call.bad"]
    status, out, _ = tariff.admin("audit")
    assert status == 1
    for name, why in (("1700000000.1.settle", "not a first-release spool record: late must"),
                      ("1700000000.2.call", "not JSON: RecursionError"),
                      ("1700000000.5.call", "not JSON: JSONDecodeError")):
        assert f"spooled record set aside as unusable: {spool / name}.bad ({why}" in out, out
    for name in ("1700000000.3.call", "1700000000.4.call"):
        assert f"spool entry {spool / name} is not a regular file of AstBill's user" in out
    nxt = place_call(tariff, Scenario(answered_ms=61_000))   # the next call replays too
    assert nxt.returncode == 0 and "Traceback" not in nxt.stderr, nxt.stderr
    assert nxt.variables_set["ASTBILL_COST"] == "0.1200"


def test_the_audit_fails_while_a_settlement_waits_in_the_spool(tariff, request):
    uniqueid, _ = spooled_call(tariff, request)
    status, out, _ = tariff.admin("audit")
    assert status == 1 and f"call {uniqueid}: settlement waits in the spool since" in out, out
    tariff.sweep()
    invariants(tariff, D10)


@pytest.mark.parametrize("policy, corrected", [("release", "-0.12"), ("charge", "0.00")])
def test_a_let_through_call_settled_by_policy_while_it_was_up_is_corrected(
        tariff, request, policy, corrected):
    tariff.write_config(on_db_error="allow", db_error_allow_secs=120, sweep_policy=policy)
    restore = take_database_down(tariff, request)
    gate = threading.Event()
    call = start_held_call(tariff, gate, answered_ms=61_000)
    assert call.dial_reached.wait(30)
    restore()
    # A box whose clock stepped two hours forward finds the claim overdue.
    ahead = tariff.admin_process("sweep", "--json", env=dict(
        tariff.env, PYTHONPATH=SKEWED_CLOCK, ASTBILL_TEST_CLOCK_SKEW="7200"))
    assert json.loads(ahead.stdout)["replayed"] == 1, ahead.stderr
    assert tariff.cdr(call.uniqueid)["state"] == policy + "d"
    gate.set()
    result = call.wait()
    assert result.variables_set["ASTBILL_COST"] == "0.1200", result.dialogue_text()
    cdr = tariff.cdr(call.uniqueid)
    assert (cdr["state"], cdr["billsec"], cdr["cost"]) == ("settled", 61, Decimal("0.12"))
    assert tariff.query("SELECT amount FROM astledger WHERE kind = 'correction'") == (
        [(tariff.store().money_in(Decimal(corrected)),)] if corrected != "0.00" else [])
    invariants(tariff, D10)


def test_a_record_the_database_refuses_waits_and_the_replay_goes_on(tariff, request, monkeypatch):
    first, second = sorted(two_spooled_calls(tariff, request))  # as the replay takes them
    settle_call = ledger.settle_call

    def refusing(store, call, settings, policy=None):
        if call.uniqueid == first:   # a row this database refuses, as a full disk would
            raise StoreError("1114: The table 'astledger' is full")
        return settle_call(store, call, settings, policy)

    monkeypatch.setattr(ledger, "settle_call", refusing)
    tariff.backdate(7200)
    assert [(d["uniqueid"], d["action"]) for d in tariff.sweep()] == [(first, "held")]
    assert sorted(p.name for p in tariff.spool.iterdir() if p.name.endswith(".call")) == [
        f"{first}.call"]                      # waits, not set aside; the second is billed
    assert (tariff.cdr(second)["state"], tariff.cdr(first)["state"]) == ("settled", "active")
    monkeypatch.setattr(ledger, "settle_call", settle_call)
    assert tariff.sweep() == []
    invariants(tariff, {"1001": Decimal("10"), "2002": Decimal("10")})


def test_calls_let_through_an_outage_are_capped_per_account_on_each_box(tariff):
    good = tariff.settings["database"]
    tariff.write_config(database=unreachable(tariff), on_db_error="allow", db_error_allow_secs=120)
    gate = threading.Event()
    first = start_held_call(tariff, gate, answered_ms=61_000)
    assert first.dial_reached.wait(30)
    second = place_call(tariff, Scenario(answered_ms=61_000))
    assert (second.variables_set["ASTBILL_STATUS"], second.dial_args) == ("MAXCALLS", None)
    assert second.verbose[-1].endswith("account 1001 has 1 calls let through already"
                                       " (db_error_max_calls)"), second.verbose
    other = place_call(tariff, Scenario(answered_ms=61_000), account="2002")
    assert other.variables_set["ASTBILL_STATUS"] == "OK"     # another account's own allowance
    tariff.write_config(db_error_max_calls=2)
    third = place_call(tariff, Scenario(answered_ms=61_000))
    assert third.variables_set["ASTBILL_STATUS"] == "OK", third.dialogue_text()
    gate.set()
    assert first.wait().returncode == 0
    tariff.write_config(db_error_max_calls=1)
    after = place_call(tariff, Scenario(answered_ms=61_000))   # the ended calls count no more
    assert after.variables_set["ASTBILL_STATUS"] == "OK", after.dialogue_text()
    tariff.write_config(database=good)
    tariff.admin_ok("account", "add", "2002", "--balance", "10")
    tariff.sweep()
    assert tariff.balance("1001") == Decimal("9.64")          # three calls of 61 s
    assert tariff.balance("2002") == Decimal("9.88")


def test_a_let_through_calls_end_spooled_while_the_replay_settles_its_claim_is_not_lost(
        tariff, monkeypatch):
    # The replay bills an overdue-looking claim by policy; that very moment
    # the live call ends and its settlement, failing, is spooled.  The end
    # must not land on the claim's file, which the replay then removes.
    good = tariff.settings["database"]
    tariff.write_config(database=unreachable(tariff), on_db_error="allow", db_error_allow_secs=120)
    killed = place_call(tariff, Scenario(kill_after_dial_sent=True))
    tariff.write_config(database=good)
    settings = load(str(tariff.config))
    claim = ledger.CallRecord.from_dict(json.loads(
        (tariff.spool / f"{killed.uniqueid}.call").read_text()))
    bill_late = ledger.bill_late

    def ending_meanwhile(store, call, settings_, policy=None):
        if policy is not None:
            claim.end("ANSWER", 61_000)
            ledger.spool(settings, claim, StoreError("the database is busy"))
        return bill_late(store, call, settings_, policy)

    monkeypatch.setattr(ledger, "bill_late", ending_meanwhile)
    monkeypatch.setattr(recovery, "overdue_claim", lambda call, settings: True)
    tariff.sweep()
    assert tariff.cdr(killed.uniqueid)["state"] == "released"
    assert [p.name for p in tariff.spool.glob("*.call")] == [f"{killed.uniqueid}~1.call"]
    monkeypatch.undo()
    tariff.sweep()                                   # the real end corrects the release
    cdr = tariff.cdr(killed.uniqueid)
    assert (cdr["state"], cdr["billsec"], cdr["cost"]) == ("settled", 61, Decimal("0.12"))
    invariants(tariff, D10)


def test_two_replayers_correct_a_call_once(tariff, monkeypatch):
    if tariff.backend == "sqlite":
        pytest.skip("SQLite runs one writing transaction at a time")
    killed = place_call(tariff, Scenario(kill_after_dial_sent=True))
    tariff.backdate(7200)
    assert [d["action"] for d in tariff.sweep()] == ["released"]
    settings = load(str(tariff.config))
    # Both replayers have read the call as released before either corrects it.
    both_read = threading.Barrier(2, timeout=10)
    real_charge = ledger.real_charge

    def after_both_read(*args):
        both_read.wait()
        return real_charge(*args)

    monkeypatch.setattr(ledger, "real_charge", after_both_read)
    results = []

    def replayer():
        call = ledger.CallRecord(uniqueid=killed.uniqueid, started=int(time.time()) - 61)
        call.end("ANSWER", 61_000)
        store = tariff.store()
        try:
            results.append(ledger.settle_call(store, call, settings).how)
        finally:
            store.close()

    threads = [threading.Thread(target=replayer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == ["repeated", "settled"]
    assert tariff.query("SELECT COUNT(*) FROM astledger WHERE kind = 'correction'") == [(1,)]
    assert tariff.balance("1001") == Decimal("9.88")
    invariants(tariff, D10)


def test_a_reservation_the_database_refuses_to_settle_is_skipped_and_the_rest_are_swept(
        tariff, monkeypatch):
    bad, good = (place_call(tariff, Scenario(kill_after_dial_sent=True)).uniqueid for _ in range(2))
    settle_call = ledger.settle_call

    def refusing(store, call, settings, policy=None):
        if call.uniqueid == bad:
            raise StoreError("1114: The table 'astledger' is full")
        return settle_call(store, call, settings, policy)

    monkeypatch.setattr(ledger, "settle_call", refusing)
    tariff.backdate(7200)
    done = {d["uniqueid"]: d["action"] for d in tariff.sweep()}
    assert done == {bad: "skipped", good: "released"}
    assert tariff.reservations() == [(bad,)]
