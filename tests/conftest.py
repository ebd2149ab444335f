"""Shared test fixtures: a billing setup on each backend.

Every test that takes ``billing`` runs twice: on a fresh SQLite file and on
a fresh database in a private MariaDB server started once per session from
Debian's mariadb-server.  Under CI (CI=true) a missing MariaDB is a failure,
never a skip.
"""
import io
import itertools
import os
import subprocess
import sys
import threading
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "lib"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from astbill.admin import cli as admin  # noqa: E402
from astbill.config import load  # noqa: E402
from astbill.store import open_store  # noqa: E402

ASTBILL = str(ROOT / "astbill.py")
ADMIN = str(ROOT / "astbill-admin")
# MariaDB through each driver: mysqlclient (when installed) and PyMySQL.
BACKENDS = ["sqlite", "mariadb", "mariadb-pymysql"]
_db_names = itertools.count(1)


@pytest.fixture(scope="session")
def mariadb(tmp_path_factory):
    from mariadb_server import MariaDBServer, find_mariadbd
    if find_mariadbd() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("MariaDB is not installed; under CI every MariaDB test must run")
        pytest.skip("mariadb-server is not installed")
    server = MariaDBServer(tmp_path_factory.mktemp("mariadb"))
    server.start()
    yield server
    server.stop()


def running_cluster(tmp_path_factory, name):
    """A three-node Galera cluster on loopback for a module's tests (a
    generator for a fixture): skipped where galera-4 cannot be had, a
    failure under CI."""
    from galera_cluster import FAST_EVICTION, GaleraCluster, missing_parts
    missing = missing_parts()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"not installed: {', '.join(missing)}; under CI every Galera test must run")
        pytest.skip(f"not installed: {', '.join(missing)}")
    cluster = GaleraCluster(tmp_path_factory.mktemp(name), provider_options=FAST_EVICTION)
    print(f"three nodes Synced after {cluster.start():.2f}s")
    yield cluster
    cluster.stop()
    assert cluster.live == []


class Billing:
    """One configured AstBill installation: config file, database, admin."""

    def __init__(self, path, database, **settings):
        self.path = path
        self.config = path / "astbill.yaml"
        self.spool = path / "spool"
        self.fallback_spool = path / "spool-fallback"
        self.settings = dict({"database": database, "dial": "PJSIP/{number}@trunk",
                              "spool_dir": str(self.spool),
                              "spool_fallback_dir": str(self.fallback_spool)}, **settings)
        self.write_config()

    def write_config(self, **changes):
        import yaml
        self.settings.update(changes)
        self.config.write_text(yaml.safe_dump(self.settings))
        os.chmod(self.config, 0o600)

    @property
    def env(self):
        return dict(os.environ, ASTBILL_CONFIG=str(self.config))

    def admin(self, *argv):
        """Run astbill-admin in-process: (exit status, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            try:
                status = admin.main(["-c", str(self.config), *argv])
            except SystemExit as exc:
                status = exc.code
        return status, out.getvalue(), err.getvalue()

    def admin_ok(self, *argv):
        status, out, err = self.admin(*argv)
        assert status == 0, f"astbill-admin {' '.join(argv)} failed: {err}"
        return out

    def admin_process(self, *argv, env=None, **kw):
        return subprocess.run([sys.executable, ADMIN, *argv], env=env or self.env, text=True,
                              capture_output=True, timeout=60, **kw)

    def store(self):
        return open_store(load(str(self.config)))

    def query(self, sql, params=()):
        """Rows of a read-only SQL query, money columns as stored."""
        store = self.store()
        try:
            return [tuple(row) for row in store.read(lambda tx: tx.all(sql, params))]
        finally:
            store.close()

    def balance(self, account):
        store = self.store()
        try:
            return store.read(lambda tx: tx.accounts(account))[0][2]
        finally:
            store.close()

    def reservations(self):
        return self.query("SELECT uniqueid FROM astcreditres ORDER BY uniqueid")

    def cdr(self, uniqueid):
        store = self.store()
        try:
            rows = [r for r in store.read(lambda tx: tx.cdrs()) if r["uniqueid"] == uniqueid]
        finally:
            store.close()
        return rows[0] if rows else None

    def backdate(self, seconds, uniqueid=None):
        """Make reservations look ``seconds`` older on the database's clock."""
        from astbill.ledger import timestamp
        from astbill.recovery import epoch
        store = self.store()
        try:
            for res in store.read(lambda tx: tx.reservations()):
                if uniqueid in (None, res["uniqueid"]):
                    older = timestamp(epoch(res["created"]) - seconds)
                    store.atomic(lambda tx: tx.run(
                        "UPDATE astcreditres SET created = ? WHERE uniqueid = ?",
                        (older, res["uniqueid"])))
        finally:
            store.close()

    def sweep(self):
        """What ``astbill-admin sweep`` does, in-process: the sweep's list."""
        from astbill import recovery
        store = self.store()
        try:
            return recovery.recover(load(str(self.config)), store)[1]
        finally:
            store.close()

    def setup_rates(self, csv_text, tariff="default"):
        path = self.path / f"{tariff}.csv"
        path.write_text(csv_text)
        self.admin_ok("rate", "import", str(path), "--tariff", tariff)


def fresh_database(request, tmp_path, backend):
    """The URL of a new, empty database: a SQLite file, or a database in the
    session's MariaDB server."""
    if backend == "sqlite":
        return f"sqlite://{tmp_path / 'astbill.db'}"
    server = request.getfixturevalue("mariadb")
    return server.create_database(f"astbill_t{os.getpid()}_{next(_db_names)}")


@pytest.fixture(params=BACKENDS)
def billing(request, tmp_path):
    settings = {}
    database = fresh_database(request, tmp_path, request.param)
    if request.param != "sqlite":
        settings["mysql_driver"] = "pymysql" if request.param == "mariadb-pymysql" else "auto"
    b = Billing(tmp_path, database, **settings)
    b.backend = request.param.split("-")[0]
    b.admin_ok("init-db")
    return b


RATES = """prefix,destination,rate,connect_fee,min_secs,increment
49,Germany fixed,0.0600,0,60,60
4930,Berlin,0.0300,0.0100,30,6
4915,Germany mobile,0.1200,0,1,1
1,USA,0.0100,0,60,60
"""


@pytest.fixture
def tariff(billing):
    """``billing`` with the sample rates and account 1001 holding 10.0000."""
    billing.setup_rates(RATES)
    billing.admin_ok("account", "add", "1001", "--balance", "10")
    return billing


def place_call(billing, scenario=None, number="4912345678", account="1001", timeout=30, **env):
    """Run the real astbill.py through one call against the Asterisk 20 peer."""
    from agipeer import agi_env, run_call
    block = agi_env(agi_extension=number, agi_accountcode=account, **env)
    result = run_call([sys.executable, ASTBILL], scenario, block, billing.env, timeout)
    result.uniqueid = block["agi_uniqueid"]
    return result


def start_held_call(billing, gate, number="4912345678", account="1001", **scenario):
    """Start a call that stays in its Dial until ``gate`` is set."""
    from agipeer import Scenario, agi_env, start_call
    block = agi_env(agi_extension=number, agi_accountcode=account)
    handle = start_call([sys.executable, ASTBILL], Scenario(dial_gate=gate, **scenario),
                        block, billing.env, 60)
    handle.uniqueid = block["agi_uniqueid"]
    return handle


class OverdraftWatch:
    """Reads every account, over and over, until ``stop()``: which returns
    each (account, balance, reserved) seen with more reserved than its
    balance -- at no moment may that happen."""

    def __init__(self, billing):
        self.billing, self.overdrawn, self._stop = billing, [], threading.Event()
        self._thread = threading.Thread(target=self._watch)
        self._thread.start()

    def _watch(self):
        store = self.billing.store()
        while not self._stop.is_set():
            for account, _, balance, reserved, *_ in store.read(lambda tx: tx.accounts()):
                if reserved > balance:
                    self.overdrawn.append((account, balance, reserved))
        store.close()

    def stop(self):
        self._stop.set()
        self._thread.join()
        return self.overdrawn


class AccountLock:
    """Another session holding account rows locked, as a busy call would."""

    def __init__(self, billing, account="1001"):
        settings = load(str(billing.config))
        if billing.backend == "sqlite":
            import sqlite3
            from astbill.store.sqlite import sqlite_path
            self.conn = sqlite3.connect(sqlite_path(settings["database"]), isolation_level=None)
            self.conn.execute("BEGIN IMMEDIATE")
        else:
            import pymysql
            from astbill.store.mysql import connect_args
            self.conn = pymysql.connect(**connect_args(settings["database"]))
            cur = self.conn.cursor()
            cur.execute("START TRANSACTION")
            cur.execute("SELECT balance FROM astaccount WHERE account = %s FOR UPDATE", (account,))

    def release(self):
        self.conn.rollback()
        self.conn.close()


def invariants(billing, initial):
    """The books after any run: {account: initial balance}."""
    assert billing.query("SELECT COUNT(*) FROM astcdr WHERE state = 'active'") == [(0,)]
    assert billing.reservations() == []
    store = billing.store()
    try:
        cdrs = store.read(lambda tx: tx.cdrs())
        accounts = {a: b for a, _, b, *_ in store.read(lambda tx: tx.accounts())}
    finally:
        store.close()
    for account, start in initial.items():
        spent = sum(c["cost"] for c in cdrs if c["account"] == account)
        assert accounts[account] == start - spent, account
        assert accounts[account] >= 0, account
    status, out, err = billing.admin("audit")
    assert status == 0, out + err
    return cdrs
