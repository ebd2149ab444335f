"""AstBill's files: who may read them, and what a user who may not is told.

The SQLite database and its -wal and -shm files, the spool and its records
hold callers' numbers and balances: their owner (and, for the database,
its group) alone may read them, whatever the umask.  A user who cannot
read or write one is told which file, as whom, and what to do.  Those
runs are made as another user than the files' owner, since root passes
every permission check (tests/debian.py, other_user).
"""
import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import debian
from agipeer import Scenario, agi_env, run_call
from astbill import ledger, recovery
from astbill.ledger import CallRecord
from conftest import RATES, Billing

FIX = "chown it to the user Asterisk runs as"


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_zero():
    """Files made meanwhile, by this process or those it starts, get exactly
    the modes AstBill asks for: no umask hides a mode too open."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_the_database_and_its_wal_and_shm_are_for_owner_and_group(tmp_path, umask_zero):
    billing = Billing(tmp_path, f"sqlite://{tmp_path / 'astbill.db'}")
    init = billing.admin_process("init-db")
    assert init.returncode == 0, init.stderr
    database = tmp_path / "astbill.db"
    assert mode(database) == 0o660
    # SQLite makes -wal and -shm with the database's own mode, whatever the
    # umask: here while AstBill's connection is open, as in every transaction.
    for database_mode in (0o660, 0o600):
        database.chmod(database_mode)
        store = billing.store()
        try:
            assert store.read(lambda tx: tx.accounts()) == []
            assert {mode(f"{database}{end}") for end in ("-wal", "-shm")} == {database_mode}
        finally:
            store.close()
    assert not (tmp_path / "astbill.db-wal").exists()  # gone with the last connection


def test_the_spool_and_its_records_are_for_the_owner_alone(tmp_path, umask_zero):
    spool = tmp_path / "spool"
    settings = {"spool_dir": str(spool), "spool_fallback_dir": ""}
    call = CallRecord(uniqueid="1700000000.1", account="1001", dialstatus="ANSWER",
                      talk_ms=61_000, ended=1700000061)
    outcome = ledger.spool(settings, call, "the database is down")
    record = spool / "1700000000.1.call"
    assert outcome.how == "spooled" and record.exists()
    lock = recovery.open_lock(settings, 0)
    lock.close()
    recovery.set_aside(str(record), "not JSON")
    assert mode(spool) == 0o700
    assert {p.name: mode(p) for p in spool.iterdir()} == {
        ".replay.lock": 0o600, "1700000000.1.call.bad": 0o600, "1700000000.1.call.bad.why": 0o600}


class Box:
    """AstBill installed in a directory every user may enter, with a SQLite
    database that belongs to the test's user, not to the one AstBill runs as."""

    def __init__(self, root, python):
        self.root, self.python = root, python
        self.data = root / "data"
        self.database = self.data / "astbill.db"
        self.config = root / "astbill.yaml"
        self.modes = {}

    def configure(self, database):
        self.config.write_text(f"database: sqlite://{database}\ndial: PJSIP/{{number}}@trunk\n"
                               f"spool_dir: {self.root / 'spool'}\nspool_fallback_dir: ''\n")
        self.config.chmod(0o644)  # no password in it; the other user must read it

    def admin(self, *argv, other_user=True):
        cmd = [self.python, "-I", str(self.root / "astbill-admin"), "-c", str(self.config), *argv]
        return subprocess.run(debian.other_user(cmd) if other_user else cmd, text=True,
                              capture_output=True, timeout=60, env=debian.env())

    def chmod(self, path, new_mode):
        self.modes.setdefault(path, mode(path))
        path.chmod(new_mode)

    def restore(self):
        for path, old in self.modes.items():
            path.chmod(old)


@pytest.fixture
def box():
    python = debian.require_python()
    root = Path(tempfile.mkdtemp(prefix="astbill-files-"))
    root.chmod(0o755)  # tmp_path's own parents are closed to other users
    box = Box(root, python)
    try:
        debian.install_program(root)
        box.data.mkdir(mode=0o755)
        box.configure(box.database)
        (root / "rates.csv").write_text(RATES)
        for argv in (["init-db"], ["rate", "import", str(root / "rates.csv"), "--tariff", "default"],
                     ["account", "add", "1001", "--balance", "10"]):
            done = box.admin(*argv, other_user=False)
            assert done.returncode == 0, done.stderr
        yield box
    finally:
        box.restore()
        shutil.rmtree(root)


# (what is wrong, as modes of the database and its directory; the message).
# The modes deny the other user, and the owner too (for a test run by one).
PROBLEMS = {
    "read-only": ((0o444, 0o755), "database {db} is read-only for {who}: " + FIX),
    "unreadable": ((0o000, 0o755), "database {db} is not readable for {who}: " + FIX),
    "directory read-only": ((0o666, 0o555), "database {db}: its directory {data} is read-only"
                            " for {who}, and SQLite makes its -wal and -shm files there: " + FIX),
    "directory closed": ((0o666, 0o600), "database {db}: its directory {data} is closed to"
                         " {who}: " + FIX),
}


@pytest.mark.parametrize("problem", PROBLEMS)
def test_a_database_this_user_cannot_use_is_named_with_the_fix(box, problem):
    (db_mode, data_mode), message = PROBLEMS[problem]
    box.chmod(box.database, db_mode)
    box.chmod(box.data, data_mode)
    result = box.admin("topup", "1001", "5")
    line = message.format(db=box.database, data=box.data, who=debian.other_user_name())
    assert (result.returncode, result.stdout, result.stderr) == (1, "", f"astbill-admin: {line}\n")


def test_a_call_on_a_read_only_database_is_refused_with_the_same_line(box):
    box.chmod(box.database, 0o444)
    block = agi_env(agi_extension="4912345678", agi_accountcode="1001")
    result = run_call(debian.other_user([box.python, "-I", str(box.root / "astbill.py")]),
                      Scenario(answered_ms=1000), block, debian.env(ASTBILL_CONFIG=str(box.config)))
    assert result.returncode == 0, result.dialogue_text()
    assert (result.variables_set["ASTBILL_STATUS"], result.dial_args) == ("ERROR", None)
    assert result.verbose == [f"astbill: ERROR database {box.database} is read-only for"
                              f" {debian.other_user_name()}: {FIX}"]


@pytest.mark.parametrize("where", ["missing", "read-only"])
def test_init_db_says_why_it_cannot_make_the_database(box, where):
    if where == "missing":
        database = box.root / "nowhere" / "astbill.db"
        line = (f"database {database}: its directory {database.parent} does not exist:"
                f" make it (mkdir -p) and {FIX}")
    else:
        database = box.root / "new" / "astbill.db"
        database.parent.mkdir(mode=0o555)
        line = (f"database {database} cannot be made: its directory {database.parent} is"
                f" read-only for {debian.other_user_name()}: {FIX}")
    box.configure(database)
    result = box.admin("init-db")
    assert (result.returncode, result.stderr) == (1, f"astbill-admin: {line}\n")
    assert not database.exists()


class _CoarseStat:
    """An lstat as a filesystem whose timestamps tick every ``tick`` ns (FAT: 2 s) gives it."""

    def __init__(self, st, tick):
        self._st, self._tick = st, tick

    def __getattr__(self, name):
        value = getattr(self._st, name)
        if name in ("st_mtime_ns", "st_ctime_ns"):
            return value - value % self._tick
        return value


def test_a_record_spooled_in_the_same_timestamp_tick_as_the_last_change_is_seen(
        tmp_path, monkeypatch):
    """A long-running server keeps a spool's listing while the directory's
    stamp is unchanged; on a filesystem with 2 s timestamps a record
    spooled in the tick of the last change leaves the stamp as it was, so
    a listing taken soon after that change must not be kept."""
    from astbill.store import spool
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir(mode=0o700)
    settings = {"spool_dir": str(spool_dir), "spool_fallback_dir": None}
    tick, real_lstat = 2_000_000_000, os.lstat
    monkeypatch.setattr(spool.os, "lstat", lambda path, *a, **kw: _CoarseStat(
        real_lstat(path, *a, **kw), tick))
    for _ in range(5):
        while time.time_ns() % tick > 100_000_000:     # just after a tick starts
            time.sleep(0.01)
        (spool_dir / "1700000000.9.call").write_text("{}")     # the last change
        stamp = spool.os.lstat(spool_dir).st_mtime_ns
        time.sleep(1.2)
        assert not spool.holds(settings, "1700000000.1")
        (spool_dir / "1700000000.1.call").write_text("{}")     # another process spools
        if spool.os.lstat(spool_dir).st_mtime_ns == stamp:    # in the same tick, as meant
            break
        for record in spool_dir.iterdir():     # a busy machine missed the tick: again
            record.unlink()
    else:
        pytest.fail("never two changes in one 2 s tick")
    assert spool.holds(settings, "1700000000.1")
    assert "1700000000.1" in spool.records(settings)


def test_a_kept_spool_listing_is_read_again_after_a_while_whatever_the_stamp_says(
        tmp_path, monkeypatch):
    """A filesystem whose clock is behind this process's (a file server's)
    makes a change seem settled when it is not: a record spooled in the
    same tick then leaves the stamp unchanged.  It is seen within
    KEPT_SECS all the same."""
    from astbill.store import spool
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir(mode=0o700)
    settings = {"spool_dir": str(spool_dir), "spool_fallback_dir": None}
    real_lstat = os.lstat
    frozen = real_lstat(spool_dir)
    # Every change is stamped as the directory was made, 10 s ago by its clock.
    monkeypatch.setattr(spool.os, "lstat", lambda path, *a, **kw: frozen if str(path) == str(
        spool_dir) else real_lstat(path, *a, **kw))
    monkeypatch.setattr(spool.time, "time_ns", lambda real=time.time_ns: real() + 10 * 10**9)
    clock = [time.monotonic()]
    monkeypatch.setattr(spool.time, "monotonic", lambda: clock[0])
    assert not spool.holds(settings, "1700000000.1")
    (spool_dir / "1700000000.1.call").write_text("{}")
    assert not spool.holds(settings, "1700000000.1")    # the kept listing, stamp unchanged
    clock[0] += spool.KEPT_SECS
    assert spool.holds(settings, "1700000000.1")


def test_a_kept_spool_listing_is_read_again_when_the_directory_changes(tmp_path, monkeypatch):
    from astbill.store import spool
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir(mode=0o700)
    settings = {"spool_dir": str(spool_dir), "spool_fallback_dir": None}
    monkeypatch.setattr(spool, "SETTLED_SECS", -1.0)   # every listing is kept
    listed = []
    real_listdir = os.listdir
    monkeypatch.setattr(spool.os, "listdir", lambda path: listed.append(path) or real_listdir(path))
    assert not spool.holds(settings, "1700000000.1")
    assert not spool.holds(settings, "1700000000.1") and len(listed) == 1   # kept
    (spool_dir / "1700000000.1.call").write_text("{}")
    assert spool.holds(settings, "1700000000.1") and len(listed) == 2
    os.unlink(spool_dir / "1700000000.1.call")
    assert not spool.holds(settings, "1700000000.1") and spool.records(settings) == {}
