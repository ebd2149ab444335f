"""Versioned upgrades: a database made by the first release's schema (kept in
fixtures/release-1) upgrades with ``astbill-admin init-db`` without losing
a row, and then bills calls as a new one does."""
import json
import time
from decimal import Decimal
from pathlib import Path

import pytest

from agipeer import Scenario
from astbill.config import load
from astbill.ledger import epoch, timestamp
from astbill.store import open_store, schema
from conftest import RATES, Billing, fresh_database, invariants, place_call
from test_admin import record_cdrs

RELEASE_1 = Path(__file__).resolve().parent / "fixtures" / "release-1"
TABLES = ("astaccount", "astrate", "astcreditres", "astcdr", "astledger")
COLUMNS_ADDED = {"astaccount": 3, "astcdr": 5, "astledger": 1}   # since the first release


@pytest.fixture(params=["sqlite", "mariadb"])
def release_1(request, tmp_path):
    """A database made and used by the first release: accounts, rates, a
    settled call, and a call in progress."""
    billing = Billing(tmp_path, fresh_database(request, tmp_path, request.param))
    billing.backend = request.param
    store = open_store(dict(load(str(billing.config)), create_database=True))
    text = (RELEASE_1 / ("sqlite.sql" if request.param == "sqlite" else "mysql.sql")).read_text()
    text = "\n".join(line.split("--", 1)[0] for line in text.splitlines())
    store.execute_script([s.strip() for s in text.split(";") if s.strip()])
    m = store.money_in
    rows = [
        ("INSERT INTO astaccount VALUES ('1001', 'default', ?, ?, '2026-01-02 03:04:05')",
         (m(Decimal("9.88")), m(Decimal("3.6")))),
        ("INSERT INTO astrate VALUES ('default', '49', 'Germany', ?, ?, 60, 60)",
         (m(Decimal("0.06")), m(Decimal(0)))),
        ("INSERT INTO astcreditres VALUES ('1.2', '1001', ?, 3600, '2026-01-02 03:05:00')",
         (m(Decimal("3.6")),)),
        ("INSERT INTO astledger (account, amount, kind, uniqueid, created) VALUES"
         " ('1001', ?, 'open', NULL, '2026-01-02 03:04:05'), ('1001', ?, 'call', '1.1',"
         " '2026-01-02 03:05:00')", (m(Decimal(10)), m(Decimal("-0.12")))),
    ]
    for uniqueid, state, cost, billsec in (("1.1", "settled", Decimal("0.12"), 61),
                                           ("1.2", "active", None, 0)):
        rows.append((
            "INSERT INTO astcdr (uniqueid, start, dst, lastapp, lastdata, billsec, account,"
            " tariff, prefix, rate, connect_fee, min_secs, increment, max_secs, cost, state)"
            " VALUES (?, '2026-01-02 03:04:30', '4912345678', 'Dial', 'PJSIP/4912345678@trunk',"
            " ?, '1001', 'default', '49', ?, ?, 60, 60, 3600, ?, ?)",
            (uniqueid, billsec, m(Decimal("0.06")), m(Decimal(0)),
             None if cost is None else m(cost), state)))
    for sql, params in rows:
        store.atomic(lambda tx: tx.run(sql, params))
    store.close()
    return billing


def dump(billing, upgraded=False):
    """Every row, in the first release's columns (rates from wherever they live)."""
    tables = {}
    for table in TABLES:
        sql = f"SELECT * FROM {table}"
        if table == "astrate" and upgraded:  # now the first deck of each tariff
            sql = ("SELECT d.name, p.prefix, p.destination, p.rate, p.connect_fee, p.min_secs,"
                   " p.increment FROM astprice p JOIN astdeck d ON d.id = p.deck")
        rows = billing.query(sql)
        if upgraded and table in COLUMNS_ADDED:  # the first release's columns come first
            rows = [row[:-COLUMNS_ADDED[table]] for row in rows]
        tables[table] = sorted(rows, key=repr)
    return tables


def test_a_first_release_database_upgrades_without_losing_a_row(release_1):
    before = dump(release_1)
    assert sum(len(rows) for rows in before.values()) == 7
    status, out, err = release_1.admin("init-db")
    assert (status, out, err) == (0, f"schema upgraded from version 1 to {schema.latest()}\n", "")
    assert dump(release_1, upgraded=True) == before
    assert release_1.query("SELECT version FROM astschema ORDER BY version") == [
        (v,) for v in range(1, schema.latest() + 1)]
    assert release_1.admin("init-db") == (0, f"schema ready (version {schema.latest()})\n", "")
    # The upgraded books balance, and calls go on where they left off.
    release_1.backdate(7200)
    assert [d["action"] for d in release_1.sweep()] == ["released"]
    result = place_call(release_1, Scenario(answered_ms=61_000))
    assert result.variables_set["ASTBILL_COST"] == "0.1200", result.dialogue_text()
    invariants(release_1, {"1001": Decimal("10")})


def test_a_new_database_gets_every_step(billing):
    assert billing.query("SELECT version FROM astschema ORDER BY version") == [
        (v,) for v in range(1, schema.latest() + 1)]
    billing.setup_rates(RATES)
    billing.admin_ok("account", "add", "1001", "--balance", "10")
    assert place_call(billing, Scenario(answered_ms=1_000)).variables_set["ASTBILL_COST"] == "0.0600"


def test_settlements_spooled_by_the_first_release_are_replayed_after_the_upgrade(release_1):
    release_1.spool.mkdir()
    ended = int(time.time())
    (release_1.spool / "1.2.settle").write_text(json.dumps({
        "uniqueid": "1.2", "dialstatus": "ANSWER", "talk_ms": 61_000, "duration": 70,
        "dstchannel": "SIP/trunk-1", "end": ended, "late": None}))
    (release_1.spool / "1.5.settle").write_text(json.dumps({   # let through an outage
        "uniqueid": "1.5", "dialstatus": "ANSWER", "talk_ms": 30_000, "duration": 35,
        "dstchannel": "", "end": ended, "late": {
            "uniqueid": "1.5", "account": "1001", "number": "4912345678", "started": ended - 35.5,
            "max_secs": 60, "cdr": {"uniqueid": "1.5", "clid": '"A" <4930111222>',
                                    "src": "4930111222", "dst": "4912345678", "dcontext": "out",
                                    "channel": "SIP/a-1", "lastapp": "Dial",
                                    "accountcode": "1001", "linkedid": "1.5",
                                    "lastdata": "PJSIP/4912345678@trunk"}}}))
    release_1.admin_ok("init-db")
    assert release_1.admin_ok("sweep").splitlines()[0] == (
        "replayed 2 spooled settlements, set aside 0; swept 0 reservations")
    assert [(c["uniqueid"], c["state"], c["cost"]) for c in map(release_1.cdr, ("1.2", "1.5"))] == [
        ("1.2", "settled", Decimal("0.12")), ("1.5", "late", Decimal("0.06"))]
    assert list(release_1.spool.glob("*.settle")) == []
    invariants(release_1, {"1001": Decimal("10")})


def test_a_step_that_fails_half_way_leaves_nothing_half_done(release_1):
    """SQLite runs a step in one transaction; MariaDB resumes at the
    statement that failed.  Either way, once the cause is gone, init-db
    finishes the upgrade."""
    before = dump(release_1)
    store = release_1.store()
    store.execute_script(["CREATE TABLE astprice (x INT)"])   # in the way of step 3
    store.close()
    status, _, err = release_1.admin("init-db")
    assert status == 1 and "astprice" in err
    assert release_1.query("SELECT MAX(version) FROM astschema WHERE applied IS NOT NULL") == [(2,)]
    if release_1.backend == "sqlite":    # nothing of step 3 is left behind
        store = release_1.store()
        assert not store.read(lambda tx: tx.has_table("asttrunk"))
        store.close()
    store = release_1.store()
    store.execute_script(["DROP TABLE astprice"])
    store.close()
    assert release_1.admin("init-db") == (
        0, f"schema upgraded from version 2 to {schema.latest()}\n", "")
    assert dump(release_1, upgraded=True) == before


@pytest.mark.parametrize("release_1", ["mariadb"], indirect=True)   # SQLite has no privileges
def test_an_upgrade_stopped_by_a_missing_privilege_resumes_where_it_stopped(release_1, request):
    server = request.getfixturevalue("mariadb")
    database = release_1.settings["database"].rsplit("/", 1)[1]
    user = f"r1_{database}"[:32]
    # What the first release's INSTALL granted: no DROP, no ALTER.
    server.execute(f"CREATE USER {user}@'%' IDENTIFIED BY 'pw';"
                   f" GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, INDEX ON `{database}`.* TO {user}@'%'")
    before = dump(release_1)
    release_1.write_config(database=f"mysql://{user}:pw@127.0.0.1:{server.port}/{database}")
    status, out, err = release_1.admin("init-db")
    assert (status, out) == (1, "")
    assert err.startswith("astbill-admin: schema step 003-carrier-routing.sql, statement 7 of 11:")
    assert err.rstrip().endswith("once that is fixed, init-db resumes there")
    server.execute(f"GRANT ALL ON `{database}`.* TO {user}@'%'")
    assert release_1.admin("init-db") == (
        0, f"schema upgraded from version 2 to {schema.latest()}\n", "")
    assert dump(release_1, upgraded=True) == before


def database_at_version(request, tmp_path, version):
    """(Billing, open store) of a new database upgraded as far as ``version``."""
    billing = Billing(tmp_path, fresh_database(request, tmp_path, request.param))
    billing.backend = request.param
    store = open_store(dict(load(str(billing.config)), create_database=True))
    store.execute_script(store.dialect.get("prelude", ()))
    assert schema.current_version(store) == 0
    for number, name in schema.steps():
        if number <= version:
            schema.apply(store, number, name)
    return billing, store


@pytest.fixture(params=["sqlite", "mariadb"])
def release_4(request, tmp_path):
    """A database of the schema's version 4 with a call up: authorized on
    the tariff's deck at 0.60 a minute, sent to trunk carrier-a (0.03)."""
    billing, store = database_at_version(request, tmp_path, 4)
    m = store.money_in
    started = timestamp(time.time() - 200)
    rows = [
        ("INSERT INTO astaccount (account, tariff, balance, reserved, created) VALUES"
         " ('1001', 'default', ?, ?, '2026-01-02 03:04:05')", (m(Decimal(10)), m(Decimal(6)))),
        ("INSERT INTO astledger (account, amount, kind, uniqueid, created) VALUES"
         " ('1001', ?, 'open', NULL, '2026-01-02 03:04:05')", (m(Decimal(10)),)),
        ("INSERT INTO asttrunk (name, dial, created) VALUES ('carrier-a',"
         " 'SIP/carrier-a/{number}', '2026-01-02 03:04:05')", ()),
        ("INSERT INTO astdeck (kind, name, starts, created) VALUES ('tariff', 'default',"
         " '1970-01-01 00:00:00', '2026-01-02 03:04:05'), ('trunk', 'carrier-a',"
         " '1970-01-01 00:00:00', '2026-01-02 03:04:05')", ()),
        ("INSERT INTO astprice SELECT id, '49', 127, 0, 1440, 'Germany', ?, 0, 60, 60"
         " FROM astdeck WHERE kind = 'tariff'", (m(Decimal("0.6")),)),
        ("INSERT INTO astprice SELECT id, '49', 127, 0, 1440, 'Germany', ?, 0, 60, 60"
         " FROM astdeck WHERE kind = 'trunk'", (m(Decimal("0.03")),)),
        ("INSERT INTO astcreditres VALUES ('4.1', '1001', ?, 600, ?)",
         (m(Decimal(6)), timestamp())),
        ("INSERT INTO astcdr (uniqueid, start, dst, lastapp, lastdata, account, tariff, prefix,"
         " rate, connect_fee, min_secs, increment, max_secs, state, trunk) VALUES ('4.1', ?,"
         " '4912345678', 'Dial', 'SIP/carrier-a/4912345678', '1001', 'default', '49', ?, ?, 60,"
         " 60, 600, 'active', 'carrier-a')", (started, m(Decimal("0.6")), m(Decimal(0)))),
    ]
    for sql, params in rows:
        store.atomic(lambda tx: tx.run(sql, params))
    store.close()
    billing.started = started
    return billing


def test_a_version_4_call_in_progress_settles_at_its_prices_after_the_upgrade(release_4):
    """Upgraded while the call is up, both its decks imported again with
    their start at a tenth of the price: the call's settlement, spooled in
    the previous version's record (no trunk_deck), charges the prices it
    was authorized with; a new call pays the new ones."""
    assert release_4.admin("init-db") == (
        0, f"schema upgraded from version 4 to {schema.latest()}\n", "")
    for kind, name, rates in (("tariff", "default", "49,Germany,0.0600,0,60,60\n"),
                              ("trunk", "carrier-a", "49,Germany,0.0030,0,60,60\n")):
        path = release_4.path / f"{name}.csv"
        path.write_text("prefix,destination,rate,connect_fee,min_secs,increment\n" + rates)
        release_4.admin_ok("rate", "import", str(path), f"--{kind}", name,
                           "--from", "1970-01-01 00:00")
    assert release_4.query("SELECT COUNT(*) FROM astdeck") == [(4,)]   # the call's stay
    release_4.spool.mkdir()
    started = epoch(release_4.started)
    (release_4.spool / "4.1.call").write_text(json.dumps({
        "uniqueid": "4.1", "account": "1001", "number": "4912345678", "started": started,
        "clid": "", "src": "", "dcontext": "", "channel": "", "accountcode": "1001",
        "linkedid": "4.1", "dial": "SIP/carrier-a/4912345678", "trunk": "carrier-a",
        "max_secs": 600, "late": False, "dialstatus": "ANSWER", "talk_ms": 125_000,
        "duration": 130, "dstchannel": "SIP/carrier-a-1", "ended": started + 130}))
    assert release_4.admin_ok("sweep").splitlines()[0] == (
        "replayed 1 spooled settlements, set aside 0; swept 0 reservations")
    cdr = release_4.cdr("4.1")
    assert (cdr["state"], cdr["rate"], cdr["cost"], cdr["buy_cost"]) == (
        "settled", Decimal("0.6"), Decimal("1.8"), Decimal("0.09"))      # 3 minutes each
    result = place_call(release_4, Scenario(answered_ms=125_000))
    assert result.variables_set["ASTBILL_COST"] == "0.1800", result.dialogue_text()
    assert release_4.cdr(result.uniqueid)["buy_cost"] == Decimal("0.009")
    invariants(release_4, {"1001": Decimal("10")})


STEP_5 = "005-deck-per-call.sql"


@pytest.mark.parametrize("release_4", ["mariadb"], indirect=True)   # SQLite: all or nothing
@pytest.mark.parametrize("by_hand, recorded", [(2, None), (6, 2), (7, None)],
                         ids=["first-statements", "more-than-recorded", "all-unrecorded"])
def test_a_step_applied_in_part_without_its_record_is_finished_by_init_db(
        release_4, by_hand, recorded):
    """MySQL commits each DDL statement: statements of a step may be applied
    and not recorded (run by hand, or the process died before it wrote the
    record).  Resuming, init-db takes "already there" for applied: a column,
    an index, a dropped index."""
    store = release_4.store()
    todo = schema.statements(store, STEP_5)
    store.execute_script(todo[:by_hand])
    if recorded is not None:
        store.atomic(lambda tx: schema.progress(tx, 5, recorded))
    store.close()
    assert release_4.admin("init-db") == (
        0, f"schema upgraded from version 4 to {schema.latest()}\n", "")
    assert release_4.query("SELECT version, done, applied IS NOT NULL FROM astschema"
                           " WHERE version = 5") == [(5, len(todo), 1)]
    assert release_4.query("SELECT deck IS NOT NULL, trunk_deck IS NOT NULL FROM astcdr") == [
        (1, 1)]
    assert release_4.admin("init-db") == (0, f"schema ready (version {schema.latest()})\n", "")


@pytest.mark.parametrize("release_4", ["mariadb"], indirect=True)
def test_already_there_after_a_statement_that_ran_is_an_error(release_4):
    """Once a statement of the step has run, none after it can have been
    applied before: a column already there is not AstBill's doing."""
    store = release_4.store()
    store.execute_script([schema.statements(store, STEP_5)[1]])   # trunk_deck, out of order
    store.close()
    status, out, err = release_4.admin("init-db")
    assert (status, out) == (1, "")
    assert err.startswith(f"astbill-admin: schema step {STEP_5}, statement 2 of ")
    assert "Duplicate column name 'trunk_deck'" in err


@pytest.mark.parametrize("release_1", ["mariadb"], indirect=True)
def test_steps_begun_by_hand_with_a_table_are_finished_by_init_db(release_1):
    before = dump(release_1)
    store = release_1.store()
    step_3 = schema.statements(store, "003-carrier-routing.sql")
    store.execute_script(schema.statements(store, "002-sweep-by-age.sql") + step_3[:2])
    store.close()
    assert release_1.admin("init-db") == (
        0, f"schema upgraded from version 1 to {schema.latest()}\n", "")
    assert dump(release_1, upgraded=True) == before


@pytest.mark.parametrize("release_1", ["mariadb"], indirect=True)
def test_a_table_in_the_way_of_a_steps_first_statement_is_an_error(release_1):
    """A table of the name a step creates counts as the step's only if it has
    the step's columns."""
    store = release_1.store()
    store.execute_script(["CREATE INDEX astcreditres_created ON astcreditres (created)",
                          "CREATE TABLE asttrunk (x INT)"])      # step 2 by hand; 3 in the way
    store.close()
    status, _, err = release_1.admin("init-db")
    assert status == 1
    assert err.startswith("astbill-admin: schema step 003-carrier-routing.sql, statement 1 of")
    assert release_1.query("SELECT MAX(version) FROM astschema WHERE applied IS NOT NULL") == [(2,)]


@pytest.mark.parametrize("release_1", ["mariadb"], indirect=True)
def test_an_upgraded_mysql_database_matches_account_names_exactly(release_1):
    release_1.admin_ok("init-db")
    database = release_1.settings["database"].rsplit("/", 1)[1]
    assert release_1.query(
        "SELECT table_name, collation_name FROM information_schema.columns WHERE"
        " table_schema = ? AND column_name = 'account' ORDER BY table_name", (database,)) == [
        (table, "utf8mb4_nopad_bin") for table in ("astaccount", "astcdr", "astcreditres",
                                                   "astidempotency", "astledger")]
    assert release_1.query("SELECT COUNT(*) FROM astaccount WHERE account = '1001 '") == [(0,)]
    assert release_1.query("SELECT COUNT(*) FROM astaccount WHERE account = '1001'") == [(1,)]


@pytest.fixture(params=["sqlite", "mariadb"])
def release_6(request, tmp_path):
    """A database of schema version 6, used: an account topped up, a
    settled call, a trunk, a deck."""
    billing, store = database_at_version(request, tmp_path, 6)
    store.close()
    billing.setup_rates(RATES)
    billing.admin_ok("trunk", "add", "carrier-a", "--dial", "SIP/carrier-a/{number}")
    store = open_store(load(str(billing.config)))
    m = store.money_in
    for sql, params in (
            ("INSERT INTO astaccount (account, tariff, balance, reserved, created) VALUES"
             " ('1001', 'default', ?, 0, '2026-01-02 03:04:05')", (m(Decimal("14.88")),)),
            ("INSERT INTO astledger (account, amount, kind, uniqueid, created) VALUES"
             " ('1001', ?, 'open', NULL, '2026-01-02 03:04:05'), ('1001', ?, 'topup', NULL,"
             " '2026-01-02 03:04:06'), ('1001', ?, 'call', '6.1', '2026-01-02 03:05:00')",
             (m(Decimal(10)), m(Decimal(5)), m(Decimal("-0.12"))))):
        store.atomic(lambda tx: tx.run(sql, params))
    store.close()
    record_cdrs(billing, [("6.1", "2026-01-02 03:04:00", "1001", "4930111222")])
    return billing


def test_a_previous_release_database_upgrades_to_users_and_tokens_without_losing_a_row(release_6):
    tables = ("astaccount", "astledger", "asttrunk", "astdeck", "astprice", "astcdr")
    before = {t: sorted(release_6.query(f"SELECT * FROM {t}"), key=repr) for t in tables}
    assert sum(map(len, before.values())) == 11
    assert release_6.admin("init-db") == (
        0, f"schema upgraded from version 6 to {schema.latest()}\n", "")
    after = {t: sorted(release_6.query(f"SELECT * FROM {t}"), key=repr) for t in tables}
    assert [row[-1] for row in after["astledger"]] == [None, None, None]   # actor: unknown
    assert [row[-1] for row in after["astaccount"]] == [None]   # no portal password (step 8)
    after["astledger"] = [row[:-1] for row in after["astledger"]]
    after["astaccount"] = [row[:-1] for row in after["astaccount"]]
    assert after == before
    assert release_6.admin("init-db") == (0, f"schema ready (version {schema.latest()})\n", "")
    release_6.admin_ok("token", "add", "shop-1", "--role", "shop")
    release_6.admin_ok("topup", "1001", "1")
    assert release_6.balance("1001") == Decimal("15.88")
    assert release_6.admin("audit")[0] == 0


@pytest.fixture(params=["sqlite", "mariadb"])
def release_7(request, tmp_path):
    """A database of schema version 7, used: accounts, a top-up by a token,
    a staff user, a token, an idempotency key."""
    billing, store = database_at_version(request, tmp_path, 7)
    store.close()
    billing.setup_rates(RATES)
    billing.admin_ok("account", "add", "1001", "--balance", "10")
    billing.admin_ok("account", "add", "1002", "--balance", "0")
    billing.admin_ok("token", "add", "shop-1", "--role", "shop")
    billing.admin_ok("topup", "1001", "2.5")
    store = billing.store()
    store.atomic(lambda tx: (tx.add_holder("astuser", "alice", "admin", "scrypt$x", "2026-01-02"
                                           " 03:04:05"),
                             tx.remember("token:shop-1", "k-1", "1001", "f" * 64, "{}",
                                         "2026-01-02 03:04:05")))
    store.close()
    return billing


def test_a_version_7_database_upgrades_to_portal_logins_and_sessions_without_losing_a_row(
        release_7):
    tables = ("astaccount", "astledger", "astuser", "asttoken", "astidempotency", "astdeck",
              "astprice")
    before = {t: sorted(release_7.query(f"SELECT * FROM {t}"), key=repr) for t in tables}
    assert sum(map(len, before.values())) == 12
    assert release_7.admin("init-db") == (0, "schema upgraded from version 7 to 8\n", "")
    after = {t: sorted(release_7.query(f"SELECT * FROM {t}"), key=repr) for t in tables}
    assert [row[-1] for row in after["astaccount"]] == [None, None]   # no portal password yet
    after["astaccount"] = [row[:-1] for row in after["astaccount"]]
    assert after == before
    assert release_7.query("SELECT COUNT(*) FROM astsession") == [(0,)]
    assert release_7.admin("init-db") == (0, "schema ready (version 8)\n", "")
    result = release_7.admin_process("account", "password", "1001", "--password-stdin",
                                     input="a portal password\n")
    assert (result.returncode, result.stdout) == (0, "account 1001: portal password set\n")
    hashed = release_7.query("SELECT password_hash FROM astaccount WHERE account = '1001'")
    assert hashed[0][0].startswith("scrypt$") and "a portal password" not in hashed[0][0]
    assert release_7.admin("audit")[0] == 0
