"""Promises kept when things go wrong: busy accounts, killed processes,
database outages.  Real astbill.py processes, SQLite and MariaDB."""
import json
import os
import signal
import threading
import time
from decimal import Decimal

import pytest

from agipeer import Scenario
from astbill.config import load
from conftest import AccountLock, OverdraftWatch, invariants, place_call, start_held_call

D10 = {"1001": Decimal("10")}


def sweep_later(billing, hours=2):
    """Sweep as if ``hours`` had passed: every reservation is then overdue."""
    billing.backdate(hours * 3600)
    return billing.sweep()


def test_a_busy_account_is_refused_within_the_lock_wait(tariff):
    # Even with on_db_error: allow -- a busy account is not an outage.
    tariff.write_config(lock_wait_secs=1, on_db_error="allow")
    lock = AccountLock(tariff)
    try:
        started = time.monotonic()
        result = place_call(tariff, Scenario(answered_ms=1000))
        waited = time.monotonic() - started
    finally:
        lock.release()
    assert result.variables_set["ASTBILL_STATUS"] == "ERROR", result.dialogue_text()
    assert "lock wait timed out" in result.verbose[0]
    assert result.dial_args is None and waited < 10
    assert tariff.query("SELECT COUNT(*) FROM astcdr") == [(0,)]


def test_no_lock_is_held_while_the_call_is_up(tariff):
    tariff.write_config(lock_wait_secs=1)
    gate = threading.Event()
    call = start_held_call(tariff, gate, answered_ms=5000)
    assert call.dial_reached.wait(30)
    lock = AccountLock(tariff)   # would time out if the call held the row
    lock.release()
    gate.set()
    assert call.wait().variables_set["ASTBILL_COST"] == "0.0600"


@pytest.mark.parametrize("policy, state, balance", [
    ("release", "released", "10"), ("charge", "charged", "6.4")])
def test_a_killed_call_is_swept_by_policy(tariff, policy, state, balance):
    tariff.write_config(sweep_policy=policy)
    result = place_call(tariff, Scenario(kill_after_dial_sent=True))
    assert result.returncode == -signal.SIGKILL
    assert tariff.reservations() == [(result.uniqueid,)]
    assert tariff.sweep() == []                # may still be up
    done = sweep_later(tariff)
    assert [(d["uniqueid"], d["action"]) for d in done] == [(result.uniqueid, policy + "d")]
    assert sweep_later(tariff) == []           # a second sweep finds nothing to do
    assert tariff.cdr(result.uniqueid)["state"] == state
    assert tariff.balance("1001") == Decimal(balance)
    assert tariff.reservations() == []
    assert tariff.admin("audit")[0] == 0


def test_the_sweep_settles_from_asterisks_own_cdr(tariff):
    tariff.write_config(asterisk_cdr_table="cdr")
    store = tariff.store()
    store.atomic(lambda tx: tx.run(
        "CREATE TABLE cdr (uniqueid VARCHAR(150) NOT NULL, lastapp VARCHAR(80) NOT NULL,"
        " billsec INT NOT NULL, disposition VARCHAR(45) NOT NULL, PRIMARY KEY (uniqueid, lastapp))"))
    result = place_call(tariff, Scenario(kill_after_dial_sent=True))
    store.atomic(lambda tx: tx.run("INSERT INTO cdr VALUES (?, 'Dial', 61, 'ANSWERED')", (result.uniqueid,)))
    store.close()
    done = sweep_later(tariff)
    assert [(d["action"], d["billsec"], d["cost"]) for d in done] == [("settled", 61, Decimal("0.12"))]
    invariants(tariff, D10)


def test_the_sweep_command_and_a_stale_reservation_in_the_audit(tariff):
    result = place_call(tariff, Scenario(kill_after_dial_sent=True))
    store = tariff.store()
    store.atomic(lambda tx: tx.run("UPDATE astcreditres SET created = '2001-01-01 00:00:00'"))
    store.close()
    status, out, _ = tariff.admin("audit")
    assert status == 1
    assert f"call {result.uniqueid}: reservation since 2001-01-01 00:00:00 is stale" in out
    proc = tariff.admin_process("sweep", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["swept"] == [{
        "uniqueid": result.uniqueid, "account": "1001", "action": "released",
        "cost": "0.0000", "billsec": 0}]
    invariants(tariff, D10)


def test_the_sweep_waits_out_the_grace_to_the_second(tariff):
    tariff.write_config(sweep_grace_secs=100)
    result = place_call(tariff, Scenario(kill_after_dial_sent=True))
    # max_secs, ringing on each trunk it may try (3) and 10 s to set up, 20 s
    # for an announcement before the Dial, the grace
    deadline = 3600 + 3 * 60 + 10 + 20 + 100
    tariff.backdate(deadline - 5)
    assert tariff.sweep() == []
    tariff.backdate(10)
    assert [d["uniqueid"] for d in tariff.sweep()] == [result.uniqueid]


def test_a_call_killed_mid_settlement_leaves_all_or_nothing(tariff):
    gate = threading.Event()
    call = start_held_call(tariff, gate, answered_ms=61_000)
    assert call.dial_reached.wait(30)
    lock = AccountLock(tariff)
    gate.set()
    time.sleep(1.0)              # the settlement is now waiting on the account
    os.kill(call.pid, signal.SIGKILL)
    assert call.wait().returncode == -signal.SIGKILL
    lock.release()
    assert tariff.reservations() == [(call.uniqueid,)]
    assert tariff.balance("1001") == Decimal("10")
    assert tariff.query("SELECT COUNT(*) FROM astledger WHERE kind <> 'open'") == [(0,)]
    sweep_later(tariff)
    invariants(tariff, D10)


def test_fifty_concurrent_calls_never_overspend(tariff):
    """50 real processes at once on one account and on a mix of accounts."""
    tariff.write_config(max_call_secs=120)
    initial = {"1001": Decimal("10"), "pool": Decimal("1.00")}
    for account in ("a1", "a2", "a3"):
        tariff.admin_ok("account", "add", account, "--balance", "0.30")
        initial[account] = Decimal("0.30")
    tariff.admin_ok("account", "add", "pool", "--balance", "1.00")
    accounts = ["pool"] * 30 + ["a1", "a2", "a3"] * 6 + ["1001"] * 2
    gate = threading.Event()
    calls = [start_held_call(tariff, gate, account=a, answered_ms=30_000 + 3_000 * i)
             for i, a in enumerate(accounts)]
    watch = OverdraftWatch(tariff)
    time.sleep(5)                # let every call reach its Dial or be refused
    gate.set()
    results = [c.wait() for c in calls]
    assert watch.stop() == []
    statuses = [r.variables_set.get("ASTBILL_STATUS") for r in results]
    assert set(statuses) <= {"OK", "NOFUNDS"}, [r.dialogue_text() for r in results if
                                                r.variables_set.get("ASTBILL_STATUS") not in ("OK", "NOFUNDS")][:1]
    assert statuses.count("OK") >= 10 and statuses.count("NOFUNDS") >= 10
    cdrs = invariants(tariff, initial)
    ok_ids = sorted(c.uniqueid for c, s in zip(calls, statuses) if s == "OK")
    assert sorted(c["uniqueid"] for c in cdrs) == ok_ids          # one CDR per call
    assert all(c["state"] == "settled" for c in cdrs)


def call_ended_during_an_outage(billing, request):
    """A 61 s call whose database goes down while it is up: (uniqueid, result)."""
    gate = threading.Event()
    call = start_held_call(billing, gate, answered_ms=61_000)
    assert call.dial_reached.wait(30)
    restore = take_database_down(billing, request)
    gate.set()
    result = call.wait()
    restore()
    return call.uniqueid, result


def test_settlement_during_an_outage_is_spooled_and_replayed_once(tariff, request):
    uniqueid, result = call_ended_during_an_outage(tariff, request)
    assert result.returncode == 0 and "ASTBILL_COST" not in result.variables_set
    assert result.verbose[-1].startswith(
        f"astbill: {uniqueid} settlement spooled to {tariff.spool / uniqueid}.call: ")
    assert [p.name for p in tariff.spool.glob("*.call")] == [f"{uniqueid}.call"]
    assert tariff.reservations() == [(uniqueid,)]   # still owed, still reserved
    proc = tariff.admin_process("sweep", "--json")
    assert json.loads(proc.stdout)["replayed"] == 1, proc.stderr
    assert json.loads(tariff.admin_process("sweep", "--json").stdout)["replayed"] == 0
    assert tariff.balance("1001") == Decimal("9.88")
    invariants(tariff, D10)


def test_the_next_call_replays_the_spool(tariff, request):
    call_ended_during_an_outage(tariff, request)
    place_call(tariff, Scenario(answered_ms=1_000))
    assert list(tariff.spool.glob("*.call")) == []
    assert tariff.balance("1001") == Decimal("9.82")
    invariants(tariff, D10)


def test_an_outage_at_authorization_refuses_quickly(tariff):
    good = tariff.settings["database"]
    tariff.write_config(database=unreachable(tariff), lock_wait_secs=2)
    started = time.monotonic()
    result = place_call(tariff, Scenario(answered_ms=1000))
    assert time.monotonic() - started < 10
    assert result.variables_set["ASTBILL_STATUS"] == "ERROR"
    assert result.dial_args is None
    assert "secret" not in " ".join(result.verbose)
    tariff.write_config(database=good)
    assert tariff.query("SELECT COUNT(*) FROM astcdr") == [(0,)]


@pytest.mark.parametrize("on_db_error", ["refuse", "allow"])
def test_a_lost_commit_reply_at_authorization_releases_the_call_it_refuses(
        tariff, request, on_db_error):
    result = released_after_a_lost_commit(tariff, request, on_db_error=on_db_error)
    cdr = tariff.cdr(result.uniqueid)
    assert (cdr["state"], cdr["cost"], cdr["disposition"]) == ("settled", Decimal(0), "NO ANSWER")
    assert sweep_later(tariff) == []       # nothing left that a charging sweep could take
    invariants(tariff, D10)


def test_an_authorization_cut_off_while_the_server_still_works_on_it_is_released(
        tariff, request):
    """The writes of an authorization go with its COMMIT, and may wait for
    a lock; a connection lost meanwhile leaves the server working on it.
    The release of the call it refuses waits for that transaction to end
    (it holds the account's row), sees it committed, and releases it."""
    if tariff.backend == "sqlite":
        pytest.skip("SQLite's commit has no reply to lose")
    import pymysql
    from astbill.store.mysql import connect_args
    # A locking read of a uniqueid that is not there (as a settlement's
    # takes) locks the gap the reservation's INSERT goes into, for 2 s.
    blocker = pymysql.connect(**connect_args(tariff.settings["database"]), autocommit=False)
    request.addfinalizer(blocker.close)
    blocker.cursor().execute("SELECT * FROM astcreditres WHERE uniqueid = 'zzz' FOR UPDATE")
    threading.Timer(2.0, blocker.rollback).start()
    released_after_a_lost_commit(tariff, request, early=True, lock_wait_secs=5)
    assert sweep_later(tariff) == []       # nothing left that a charging sweep could take
    invariants(tariff, D10)


def released_after_a_lost_commit(tariff, request, early=False, **settings):
    """A call whose authorization's COMMIT lost its reply (a CommitCutter,
    ``early`` or not), with ``settings`` and a charging sweep: refused, and
    released as committed.  The result."""
    if tariff.backend == "sqlite":
        pytest.skip("SQLite's commit has no reply to lose")
    from commit_cutter import CommitCutter
    server = request.getfixturevalue("mariadb")
    cutter = CommitCutter(server.port, early=early)
    request.addfinalizer(cutter.close)
    good = tariff.settings["database"]
    tariff.write_config(database=cutter.url(good), sweep_policy="charge", **settings)
    cutter.armed.set()
    result = place_call(tariff, Scenario(answered_ms=61_000))
    assert cutter.cut.is_set()
    assert (result.variables_set["ASTBILL_STATUS"], result.dial_args) == ("ERROR", None)
    assert result.verbose[-1].endswith("; it had committed and is released"), result.verbose
    tariff.write_config(database=good)
    return result


def test_a_repeated_uniqueid_is_refused_even_when_outages_are_allowed(tariff):
    tariff.write_config(on_db_error="allow")
    first = place_call(tariff, Scenario(answered_ms=61_000))
    again = place_call(tariff, Scenario(answered_ms=61_000), agi_uniqueid=first.uniqueid)
    assert again.variables_set["ASTBILL_STATUS"] == "ERROR"
    assert again.verbose == [f"astbill: ERROR call {first.uniqueid} was authorized already"]
    assert again.dial_args is None
    assert tariff.balance("1001") == Decimal("9.88")


def test_on_db_error_allow_lets_a_short_call_through_and_bills_it_later(tariff):
    good = tariff.settings["database"]
    tariff.write_config(database=unreachable(tariff), lock_wait_secs=2, on_db_error="allow",
                        db_error_allow_secs=120)
    result = place_call(tariff, Scenario(answered_ms=61_000))
    assert result.variables_set["ASTBILL_STATUS"] == "OK"
    assert result.dial_args == "PJSIP/4912345678@trunk,60,L(120000)"
    tariff.write_config(database=good)
    proc = tariff.admin_process("sweep", "--json")
    assert json.loads(proc.stdout)["replayed"] == 1, proc.stderr
    cdr = tariff.cdr(result.uniqueid)
    assert (cdr["state"], cdr["billsec"], cdr["cost"]) == ("late", 61, Decimal("0.12"))
    assert tariff.balance("1001") == Decimal("9.88")
    assert tariff.admin("audit")[0] == 0


def unreachable(billing):
    if billing.backend == "sqlite":
        return f"sqlite://{billing.path / 'gone' / 'astbill.db'}"
    return "mysql://astbill:secret@127.0.0.1:9/astbill"


def take_database_down(billing, request):
    """Make the database unreachable; returns the function that brings it back."""
    if billing.backend == "sqlite":
        path = load(str(billing.config))["database"][len("sqlite://"):]
        os.rename(path, path + ".away")
        return lambda: os.rename(path + ".away", path)
    server = request.getfixturevalue("mariadb")
    server.kill()
    request.addfinalizer(lambda: server.running or server.restart())
    return server.restart


def test_a_call_killed_while_in_its_dial_is_swept(tariff):
    gate = threading.Event()
    call = start_held_call(tariff, gate, answered_ms=61_000)
    assert call.dial_reached.wait(30)
    os.kill(call.pid, signal.SIGKILL)
    gate.set()
    assert call.wait().returncode == -signal.SIGKILL
    assert tariff.cdr(call.uniqueid)["state"] == "active"
    assert [d["uniqueid"] for d in sweep_later(tariff)] == [call.uniqueid]
    invariants(tariff, D10)


def test_two_sweeps_at_once_resolve_each_call_once(tariff):
    tariff.write_config(sweep_policy="charge")
    tariff.admin_ok("topup", "1001", "10")
    killed = [place_call(tariff, Scenario(kill_after_dial_sent=True)).uniqueid for _ in range(4)]
    results = [None, None]

    def sweep(i):
        results[i] = sweep_later(tariff)

    threads = [threading.Thread(target=sweep, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    swept = sorted(d["uniqueid"] for r in results for d in r)
    assert swept == sorted(killed)                       # each call by exactly one sweep
    assert tariff.balance("1001") == Decimal("20") - 4 * Decimal("3.6")
    invariants(tariff, {"1001": Decimal("20")})


def test_the_audit_names_every_mismatch(tariff):
    call = place_call(tariff, Scenario(answered_ms=61_000))
    store = tariff.store()
    one = store.money_in(Decimal("1"))
    store.atomic(lambda tx: tx.run("UPDATE astaccount SET balance = balance + ?, reserved = ?"
                                   " WHERE account = '1001'", (one, one)))
    store.atomic(lambda tx: tx.run("DELETE FROM astledger WHERE kind = 'call'"))
    store.close()
    status, out, _ = tariff.admin("audit")
    assert status == 1
    assert out.splitlines() == [
        "account 1001: balance 10.8800 but its ledger sums to 10.0000",
        "account 1001: reserved 1.0000 but its calls in progress hold 0.0000",
        f"call {call.uniqueid}: cost 0.1200 but the ledger has no charge",
        "audit: 3 problems"]
