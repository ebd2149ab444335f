"""astbill-admin: exact output and exit codes, on every backend."""
import argparse
import csv
import io
import json
import shlex
import subprocess
import sys

import astbill
from agipeer import Scenario
from astbill.admin import cli as admin
from astbill.ledger import timestamp
from astbill.money import D
from astbill.recovery import epoch
from astbill.store import schema
from astbill.store.base import Store
from conftest import ADMIN, RATES, Billing, place_call

GOLD = """prefix,destination,rate,connect_fee,min_secs,increment
49,Germany gold,0.0300,0,60,60
"""


def test_init_db_is_safe_twice(billing):
    assert billing.admin("init-db") == (0, f"schema ready (version {schema.latest()})\n", "")


def test_account_add_show_list_and_topup(billing):
    billing.setup_rates(RATES)
    billing.setup_rates(GOLD, "gold")
    assert billing.admin("account", "add", "1001", "--balance", "10", "--json") == (
        0, '{"account": "1001", "tariff": "default", "balance": "10.0000", "reserved": "0.0000",'
           ' "credit_limit": "0.0000", "available": "10.0000", "max_calls": 0, "calls": 0}\n', "")
    assert billing.admin("topup", "1001", "2.5")[1] == (
        "account  tariff   balance  reserved  available  calls\n"
        "1001     default  12.5000  0.0000    12.5000    0\n")
    billing.admin_ok("account", "add", "2002", "--balance", "0.123456", "--tariff", "gold")
    billing.admin_ok("account", "add", "3003", "--balance", "0")
    listed = json.loads(billing.admin_ok("account", "list", "--json"))
    assert [(a["account"], a["balance"], a["tariff"]) for a in listed] == [
        ("1001", "12.5000", "default"), ("2002", "0.123456", "gold"), ("3003", "0.0000", "default")]


def test_bad_input_is_one_line_and_changes_nothing(tariff):
    billing = tariff
    cases = [
        (("account", "add", "1001", "--balance", "5"), "account '1001' exists"),
        (("account", "add", "x", "--balance", "1.5e"), "not a plain decimal number: '1.5e'"),
        (("account", "add", "x", "--balance", "-1"),
         "opening balance must not be negative: '-1'"),
        (("account", "add", " 1001", "--balance", "1"), "account must be 1 to 80 printable"
         " characters, no space at either end: ' 1001'"),
        (("account", "add", "x", "--balance", "1", "--tariff", "a\tb"), "tariff must be 1 to 40"
         " printable characters, no space at either end: 'a\\tb'"),
        (("topup", "1001", "0.0000001"), "more than 6 decimals: 0.0000001"),
        (("topup", "1001", "-5"), "top-up amount must be above 0: '-5'"),
        (("topup", "nobody", "5"), "no account 'nobody'"),
        (("topup", " 1001", "5"), "no account ' 1001'"),
        (("account", "show", "1001 "), "no account '1001 '"),
        (("topup", "1001", "NaN"), "not a plain decimal number: 'NaN'"),
        (("account", "add", "x", "--balance", "1", "--credit-limit", "-1"),
         "credit limit must not be negative: '-1'"),
        (("account", "set", "1001 ", "--max-calls", "2"), "no account '1001 '"),
        (("route", "4930123", "--account", " 1001", "--json"), "no account ' 1001'"),
    ]
    for argv, error in cases:
        assert billing.admin(*argv) == (1, "", f"astbill-admin: {error}\n"), argv
    assert billing.admin_ok("account", "list") .splitlines()[1].split()[2] == "10.0000"
    assert billing.query("SELECT COUNT(*) FROM astledger")[0][0] == 1


def test_an_amount_is_a_plain_decimal_or_refused(tariff):
    billing = tariff
    for bad in ("1e3", "1E3", "Infinity", "inf", "0x10", "1_000", "1 000", " 1 x", "1.",
                ".5", "+-1", "١٠", "1,5"):
        assert billing.admin("topup", "1001", bad) == (
            1, "", f"astbill-admin: not a plain decimal number: {bad.strip()!r}\n"), bad
    for good, balance in ((" 2.50 ", "12.5000"), ("+1", "13.5000"), ("007", "20.5000")):
        assert billing.admin_ok("topup", "1001", good, "--json").count(f'"balance": "{balance}"') == 1
    assert billing.query("SELECT COUNT(*) FROM astledger")[0][0] == 4


def test_rate_import_is_all_or_nothing(billing):
    good = billing.path / "good.csv"
    good.write_text("prefix,destination,rate,connect_fee,min_secs,increment\n"
                    "49,Germany,0.06,0,60,60\n4930,Berlin,0.03,0.01,30,6\n")
    assert billing.admin("rate", "import", str(good), "--tariff", "default") == (
        0, "imported 2 rates into tariff default\n", "")
    bad = billing.path / "bad.csv"
    bad.write_text("prefix,destination,rate,connect_fee,min_secs,increment\n"
                   "44,UK,0.05,0,60,60\n"
                   "44,UK again,0.05,0,60,60\n"
                   "33,France,-0.01,0,60,60\n"
                   "3a,Bad,0.01,0,60,60\n"
                   "34,Spain,0.01,0,60,0\n"
                   "39,Italy,0.000000001,0,60,60\n"
                   "1,USA,0.01,0\n")
    status, out, err = billing.admin("rate", "import", str(bad), "--tariff", "default")
    assert (status, out) == (1, "")
    assert err.splitlines() == [
        f"astbill-admin: {bad}:3: prefix 44 repeats line 2",
        f"astbill-admin: {bad}:4: rate must not be negative: -0.01",
        f"astbill-admin: {bad}:5: prefix must be 1 to 32 digits: '3a'",
        f"astbill-admin: {bad}:6: increment must be a whole number from 1 to 86400: '0'",
        f"astbill-admin: {bad}:7: rate: more than 6 decimals: 0.000000001",
        f"astbill-admin: {bad}:8: expected 6 fields, found 4"]
    header = billing.path / "header.csv"
    header.write_text("prefix,rate\n49,0.1\n")
    assert billing.admin("rate", "import", str(header), "--tariff", "default")[2] == (
        f"astbill-admin: {header}:1: header must be"
        " prefix,destination,rate,connect_fee,min_secs,increment"
        " (optionally followed by ,days,hours)\n")
    assert billing.query("SELECT prefix FROM astprice ORDER BY prefix") == [("49",), ("4930",)]


def test_a_rates_file_may_start_with_a_byte_order_mark(billing):
    saved = billing.path / "excel.csv"
    saved.write_bytes(b"\xef\xbb\xbfprefix,destination,rate,connect_fee,min_secs,increment\r\n"
                      b"49,Germany,0.06,0,60,60\r\n")
    assert billing.admin("rate", "import", str(saved), "--tariff", "default") == (
        0, "imported 1 rates into tariff default\n", "")
    assert billing.query("SELECT prefix, destination FROM astprice") == [("49", "Germany")]


def test_the_real_command_runs_as_a_process(billing):
    result = billing.admin_process("account", "list", "--json")
    assert (result.returncode, result.stdout, result.stderr) == (0, "[]\n", "")
    billing.setup_rates(RATES)
    result = billing.admin_process("account", "add", "x", "--balance", "abc")
    assert (result.returncode, result.stderr) == (
        1, "astbill-admin: not a plain decimal number: 'abc'\n")


def test_config_errors_are_one_line(billing):
    yaml_errors = [
        ("dial: x\ndatabase: [1, 2\n", "line 3: not valid YAML: expected ',' or ']', but got"
         " '<stream end>' (while parsing a flow sequence from line 2)"),
        ("dial: x\n database: y\n", "line 2: not valid YAML: mapping values are not allowed here"),
        ("dial: x\n\ndatabase: 'y\n", "line 4: not valid YAML: found unexpected end of stream"
         " (while scanning a quoted scalar from line 3)"),
        ("dial: x\ndatabase: \x07\n", "line 2: not valid YAML: unacceptable character #x0007:"
         " special characters are not allowed"),
        ("dial: x\ndatabase: *y\n", "line 2: not valid YAML: found undefined alias 'y'"),
    ]
    for text, error in yaml_errors:
        billing.config.write_text(text)
        assert billing.admin("account", "list") == (
            1, "", f"astbill-admin: config {billing.config} {error}\n"), text
    billing.config.write_bytes(b"dial: x\ndatabase: \xff\n")
    assert billing.admin("account", "list")[2] == (
        f"astbill-admin: config {billing.config}: not UTF-8 text\n")
    billing.config.write_text("database: postgres://x\ndial: 'SIP/{number}'\n")
    assert billing.admin("account", "list")[2] == (
        f"astbill-admin: {billing.config}: database must be a sqlite:// or mysql:// URL,"
        " or a list of mysql:// URLs (a cluster's nodes)\n")
    billing.config.write_text("database: sqlite:///x.db\ndial: 'SIP/{number}'\nmax_call_secs: '60'\n")
    assert billing.admin("account", "list")[2] == (
        f"astbill-admin: {billing.config}: max_call_secs must be int, not str\n")
    billing.config.write_text("database: sqlite:///x.db\ndial: 'SIP/{number}'\ncolour: red\n")
    assert billing.admin("account", "list")[2] == (
        f"astbill-admin: {billing.config}: unknown setting 'colour'\n")


def test_world_readable_config_with_a_password_warns(billing, tmp_path):
    config = tmp_path / "pw.yaml"
    config.write_text("database: mysql://astbill:secret@127.0.0.1:1/astbill\ndial: 'SIP/{number}'\n"
                      "lock_wait_secs: 1\n")
    config.chmod(0o644)
    status, out, err = billing.admin("-c", str(config), "calls")
    assert f"astbill-admin: warning: {config} is world-readable" in err
    assert "secret" not in err


def test_the_mysql_driver_is_mysqlclient_when_installed_else_pymysql():
    from astbill.store.mysql import load_driver
    assert load_driver("pymysql").__name__ == "pymysql"
    try:
        from MySQLdb import _mysql
    except ImportError:
        assert load_driver("auto").__name__ == "pymysql"
    else:
        assert load_driver("auto") is _mysql is load_driver("mysqlclient")


def test_a_cdr_never_ends_before_its_talk_time(tariff):
    # The peer reports 125.4 s of talk at once, as the demo's does: the
    # wall clock barely moves, the CDR must still add up.
    result = place_call(tariff, Scenario(answered_ms=125_400))
    cdr = tariff.cdr(result.uniqueid)
    start, answer, end = (epoch(cdr[key]) for key in ("start", "answer", "end"))
    assert (cdr["billsec"], cdr["duration"]) == (126, 126)
    assert (answer - start, end - answer, end - start) == (0, 126, 126)


# -- the command line itself ------------------------------------------------------

def test_version_and_the_config_option_before_or_after_the_command(tariff):
    assert tariff.admin("--version") == (0, f"astbill-admin {astbill.__version__}\n", "")
    shown = "account  tariff   balance  reserved  available  calls\n" \
            "1001     default  10.0000  0.0000    10.0000    0\n"
    assert admin.main(["account", "show", "1001", "-c", str(tariff.config)]) == 0
    env = {k: v for k, v in tariff.env.items() if k != "ASTBILL_CONFIG"}
    for argv in (["-c", str(tariff.config), "account", "show", "1001"],
                 ["account", "show", "1001", "-c", str(tariff.config)],
                 ["account", "show", "--config", str(tariff.config), "1001"]):
        result = tariff.admin_process(*argv, env=env)
        assert (result.returncode, result.stdout, result.stderr) == (0, shown, ""), argv


def test_a_mistyped_command_line_is_one_line(billing):
    cases = [
        (("cdr", "--limit", "0"), "argument --limit: must be a whole number above 0: '0'", "cdr"),
        (("cdr", "--limit", "1_0"), "argument --limit: must be a whole number above 0: '1_0'",
         "cdr"),
        (("rate", "list", "--tariff", "a", "--trunk", "b"),
         "argument --trunk: not allowed with argument --tariff", "rate list"),
        (("cdr", "--json", "--csv"), "argument --csv: not allowed with argument --json", "cdr"),
        (("rate", "list"), "one of the arguments --tariff --trunk is required", "rate list"),
        (("account", "add", "1001"), "the following arguments are required: --balance",
         "account add"),
        (("account", "drop", "1001"), "argument ACTION: invalid choice: 'drop' (choose from"
         " 'add', 'set', 'show', 'list', 'password')", "account"),
    ]
    for argv, error, prog in cases:
        assert billing.admin(*argv) == (
            2, "", f"astbill-admin: {error} (see astbill-admin {prog} --help)\n"), argv


def each_command(parser=None, path=()):
    """(words, parser) of the top level and every command under it."""
    parser = parser or admin.parser()
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from each_command(sub, path + (name,))


def test_every_command_and_option_is_described_with_working_examples(billing):
    commands = list(each_command())
    assert len(commands) == 31
    for words, parser in commands:
        status, out, err = billing.admin(*words, "--help")
        assert (status, err) == (0, ""), words
        examples = out.split("\nexamples:\n", 1)[1].split("\n\n")[0].splitlines()
        assert examples, words
        for example in examples:
            argv = shlex.split(example.split(" > ")[0])
            parsed = admin.parser().parse_args(argv[1:])  # exits (a failure) if it cannot
            named = [parsed.command] + ([parsed.action] if "action" in parsed else [])
            assert argv[0] == "astbill-admin" and named[:len(words)] == list(words), example
        for action in parser._actions:
            assert action.help, (words, action.dest)
            assert (action.help == argparse.SUPPRESS) or action.help in " ".join(out.split())


def test_a_commands_help_reads_like_this(billing, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert billing.admin("account", "set", "--help") == (0, """\
usage: astbill-admin account set [-h] [-c FILE] [--json] [--tariff TARIFF] [--credit-limit AMOUNT]
                                 [--max-calls N]
                                 account

Change an account's tariff or limits.

positional arguments:
  account               the account to change

options:
  -h, --help            show this help message and exit
  -c FILE, --config FILE
                        the config file (default: $ASTBILL_CONFIG, else conf/astbill.yaml beside
                        astbill-admin); before or after the command
  --json                print JSON
  --tariff TARIFF       the new tariff, one with rates already; calls in progress keep the rate
                        they started with
  --credit-limit AMOUNT
                        postpaid: the balance may go this far below zero (default: unchanged)
  --max-calls N         calls in progress at most, 0 for no cap (default: unchanged)

examples:
  astbill-admin account set 1001 --tariff gold
  astbill-admin account set 1001 --credit-limit 0 --max-calls 4
""", "")


# -- accounts and tariffs ---------------------------------------------------------

def test_an_account_needs_a_tariff_with_rates_and_can_move_to_another(tariff):
    books = (tariff.query("SELECT account, tariff, balance FROM astaccount"),
             tariff.query("SELECT COUNT(*) FROM astledger"))
    unknown = "astbill-admin: unknown tariff 'gold': it has no rates (astbill-admin rate import)\n"
    assert tariff.admin("account", "add", "2002", "--balance", "5", "--tariff", "gold") == (
        1, "", unknown)
    assert tariff.admin("account", "set", "1001", "--tariff", "gold") == (1, "", unknown)
    assert tariff.admin("account", "set", "1001") == (
        1, "", "astbill-admin: nothing to change: give --tariff, --credit-limit or --max-calls\n")
    assert (tariff.query("SELECT account, tariff, balance FROM astaccount"),
            tariff.query("SELECT COUNT(*) FROM astledger")) == books
    tariff.setup_rates(GOLD, "gold")
    assert tariff.admin("account", "set", "nobody", "--tariff", "gold") == (
        1, "", "astbill-admin: no account 'nobody'\n")
    assert tariff.admin("account", "set", "1001", "--tariff", "gold", "--json") == (
        0, '{"account": "1001", "tariff": "gold", "balance": "10.0000", "reserved": "0.0000",'
           ' "credit_limit": "0.0000", "available": "10.0000", "max_calls": 0, "calls": 0}\n',
        "")
    # The next call is rated on the new tariff: 61 s at 0.03 a minute, 60/60.
    result = place_call(tariff, Scenario(answered_ms=61_000))
    assert result.variables_set["ASTBILL_COST"] == "0.0600", result.dialogue_text()
    assert tariff.query("SELECT COUNT(*) FROM astledger")[0][0] == 2


# -- rates ------------------------------------------------------------------------

def test_rate_list_as_a_table_json_and_csv(tariff):
    assert tariff.admin("rate", "list", "--tariff", "default") == (0, """\
prefix  destination     rate    connect_fee  min_secs  increment  days  hours
1       USA             0.0100  0.0000       60        60         all   00:00-24:00
49      Germany fixed   0.0600  0.0000       60        60         all   00:00-24:00
4915    Germany mobile  0.1200  0.0000       1         1          all   00:00-24:00
4930    Berlin          0.0300  0.0100       30        6          all   00:00-24:00
""", "")
    assert tariff.admin("rate", "list", "--tariff", "default", "--prefix", "49", "--csv") == (0, (
        "prefix,destination,rate,connect_fee,min_secs,increment,days,hours\r\n"
        "49,Germany fixed,0.0600,0.0000,60,60,all,00:00-24:00\r\n"
        "4915,Germany mobile,0.1200,0.0000,1,1,all,00:00-24:00\r\n"
        "4930,Berlin,0.0300,0.0100,30,6,all,00:00-24:00\r\n"), "")
    assert tariff.admin("rate", "list", "--tariff", "default", "--prefix", "493", "--json") == (
        0, '[{"prefix": "4930", "destination": "Berlin", "rate": "0.0300", "connect_fee":'
           ' "0.0100", "min_secs": 30, "increment": 6, "days": "all", "hours": "00:00-24:00"}]\n',
        "")
    assert tariff.admin("rate", "list", "--tariff", "default", "--prefix", "7") == (
        0, "prefix  destination  rate  connect_fee  min_secs  increment  days  hours\n", "")
    assert tariff.admin("rate", "list", "--tariff", "gold", "--at", "2026-01-01 00:00") == (
        1, "", "astbill-admin: tariff 'gold' has no rates in force at 2026-01-01 00:00:00\n")
    assert tariff.admin("rate", "list", "--tariff", "default", "--prefix", "4_") == (
        1, "", "astbill-admin: prefix must be 1 to 32 digits: '4_'\n")


def test_the_csv_rate_list_prints_imports_back_to_the_same_rates(billing):
    billing.setup_rates(
        "prefix,destination,rate,connect_fee,min_secs,increment,days,hours\n"
        "44,=1+1,0.05,0,60,60,all,00:00-24:00\n"
        "441,+44 mobile,0.123456,0.5,0,1,mon-fri,00:00-24:00\n"
        "441,+44 mobile weekend,0.1,0.5,0,1,sat-sun,00:00-24:00\n"
        "442,-2 zone,0,0,60,60,all,00:00-24:00\n"
        "443,@SUM(A1),0.1,0,60,60,all,00:00-24:00\n"
        "444,'quoted,0.1,0,60,60,all,00:00-24:00\n"
        '445,"Comma, and ""quotes""",0.1,0,60,60,all,00:00-24:00\n'
        "446,Zürich über alles,0.1,0,60,60,all,00:00-24:00\n", "source")
    listed = billing.admin_ok("rate", "list", "--tariff", "source", "--csv")
    assert listed == (
        "prefix,destination,rate,connect_fee,min_secs,increment,days,hours\r\n"
        "44,'=1+1,0.0500,0.0000,60,60,all,00:00-24:00\r\n"
        "441,'+44 mobile weekend,0.1000,0.5000,0,1,sat-sun,00:00-24:00\r\n"
        "441,'+44 mobile,0.123456,0.5000,0,1,mon-fri,00:00-24:00\r\n"
        "442,'-2 zone,0.0000,0.0000,60,60,all,00:00-24:00\r\n"
        "443,'@SUM(A1),0.1000,0.0000,60,60,all,00:00-24:00\r\n"
        "444,''quoted,0.1000,0.0000,60,60,all,00:00-24:00\r\n"
        '445,"Comma, and ""quotes""",0.1000,0.0000,60,60,all,00:00-24:00\r\n'
        "446,Zürich über alles,0.1000,0.0000,60,60,all,00:00-24:00\r\n")
    copy = billing.path / "copy.csv"
    copy.write_text(listed, newline="")
    assert billing.admin("rate", "import", str(copy), "--tariff", "copy") == (
        0, "imported 7 rates into tariff copy\n", "")
    rates = "SELECT p.prefix, p.days, p.start_min, p.end_min, p.destination, p.rate," \
            " p.connect_fee, p.min_secs, p.increment FROM astprice p JOIN astdeck d" \
            " ON d.id = p.deck WHERE d.name = ? ORDER BY p.prefix, p.days"
    assert billing.query(rates, ("copy",)) == billing.query(rates, ("source",))
    assert [r["destination"] for r in json.loads(billing.admin_ok(
        "rate", "list", "--tariff", "copy", "--json"))] == [
        "=1+1", "+44 mobile weekend", "+44 mobile", "-2 zone", "@SUM(A1)", "'quoted",
        'Comma, and "quotes"', "Zürich über alles"]
    assert billing.admin_ok("rate", "list", "--tariff", "copy", "--csv") == listed


# -- CDRs -------------------------------------------------------------------------

def record_cdrs(billing, cdrs):
    """Settled CDRs, written by the store's own statements: (uniqueid, start,
    account, src) each, 61 s at Germany's 0.06 a minute, over a trunk that
    charged 0.13 for it."""
    def work(tx):
        for uniqueid, start, account, src in cdrs:
            tx.open_cdr({
                "uniqueid": uniqueid, "start": start, "clid": f'"Alice" <{src}>', "src": src,
                "dst": "4912345678", "dcontext": "billing", "channel": "PJSIP/alice-0001",
                "lastapp": "Dial", "lastdata": "PJSIP/4912345678@trunk", "accountcode": account,
                "linkedid": uniqueid, "account": account, "max_secs": 3600, "tariff": "default",
                "prefix": "49", "rate": D("0.06"), "connect_fee": D(0), "min_secs": 60,
                "increment": 60, "state": "active"})
            tx.close_cdr(uniqueid, {
                "answer": timestamp(epoch(start) + 4), "end": timestamp(epoch(start) + 65),
                "duration": 65, "billsec": 61, "disposition": "ANSWERED",
                "dstchannel": "PJSIP/trunk-0002", "cost": D("0.12"), "state": "settled",
                "trunk": "carrier-a", "buy_cost": D("0.13")})
    store = billing.store()
    try:
        store.atomic(work)
    finally:
        store.close()


CDR_HEADER = ("uniqueid,start,answer,end,clid,src,dst,dcontext,channel,dstchannel,lastapp,"
              "lastdata,duration,billsec,disposition,accountcode,account,tariff,prefix,rate,"
              "connect_fee,max_secs,cost,state,trunk,buy_cost,margin\r\n")


def test_cdrs_are_listed_by_start_a_page_at_a_time_with_filters(billing, monkeypatch):
    record_cdrs(billing, [("1.5", "2026-03-01 08:00:00", "2002", "4930111222"),
                          ("1.3", "2026-02-01 00:00:00", "1001", "4930111222"),
                          ("1.1", "2026-01-31 23:59:59", "1001", "4930111222"),
                          ("1.4", "2026-02-01 12:30:00", "1001", "4930111222"),
                          ("1.2", "2026-02-01 00:00:00", "2002", "4930111222")])
    monkeypatch.setattr(Store, "CDR_PAGE", 2)  # pages end within a second, and between ties
    assert billing.admin("cdr") == (0, """\
uniqueid  start                account  dst         billsec  disposition  cost    state
1.1       2026-01-31 23:59:59  1001     4912345678  61       ANSWERED     0.1200  settled
1.2       2026-02-01 00:00:00  2002     4912345678  61       ANSWERED     0.1200  settled
1.3       2026-02-01 00:00:00  1001     4912345678  61       ANSWERED     0.1200  settled
1.4       2026-02-01 12:30:00  1001     4912345678  61       ANSWERED     0.1200  settled
1.5       2026-03-01 08:00:00  2002     4912345678  61       ANSWERED     0.1200  settled
""", "")

    def listed(*options):
        return [c["uniqueid"] for c in json.loads(billing.admin_ok("cdr", "--json", *options))]
    assert listed("--since", "2026-02-01", "--until", "2026-02-01 12:30") == ["1.2", "1.3"]
    assert listed("--since", "2026-02-01 00:00:01") == ["1.4", "1.5"]
    assert listed("--until", "2026-02-01 00:00:00") == ["1.1"]
    assert listed("--limit", "3") == ["1.1", "1.2", "1.3"]
    assert listed("--limit", "2", "--account", "1001") == ["1.1", "1.3"]
    assert listed("--account", "1001", "--since", "2026-02-01") == ["1.3", "1.4"]
    assert listed("--since", "2026-04-01") == []
    assert billing.admin("cdr", "--csv", "--limit", "1") == (0, CDR_HEADER + (
        "1.1,2026-01-31 23:59:59,2026-02-01 00:00:03,2026-02-01 00:01:04,\"\"\"Alice\"\" "
        "<4930111222>\",4930111222,4912345678,billing,PJSIP/alice-0001,PJSIP/trunk-0002,Dial,"
        "PJSIP/4912345678@trunk,65,61,ANSWERED,1001,1001,default,49,0.0600,0.0000,3600,0.1200,"
        "settled,carrier-a,0.1300,-0.0100\r\n"), "")
    assert billing.admin("cdr", "--csv", "--since", "2027-01-01") == (0, CDR_HEADER, "")
    assert billing.admin("cdr", "--since", "2026-02-01", "--until", "2026-02-01") == (
        1, "", "astbill-admin: --since '2026-02-01 00:00:00' is not before"
               " --until '2026-02-01 00:00:00'\n")
    assert billing.admin("cdr", "--account", " 1001") == (
        1, "", "astbill-admin: no account ' 1001'\n")
    assert billing.admin("cdr", "--since", "2026-02-30") == (
        1, "", "astbill-admin: --since must look like 'YYYY-MM-DD HH:MM' (UTC): '2026-02-30'\n")


def test_a_cdr_table_fits_its_first_rows_and_widens_after(billing, monkeypatch):
    record_cdrs(billing, [("1.1", "2026-01-01 10:00:00", "1001", "1"),
                          ("1.2", "2026-01-01 10:00:01", "1001", "1"),
                          ("1.10", "2026-01-01 10:00:02", "a-longer-name", "1"),
                          ("1.11", "2026-01-01 10:00:03", "1001", "1")])
    monkeypatch.setattr(admin, "TABLE_WINDOW", 2)
    assert billing.admin("cdr") == (0, """\
uniqueid  start                account  dst         billsec  disposition  cost    state
1.1       2026-01-01 10:00:00  1001     4912345678  61       ANSWERED     0.1200  settled
1.2       2026-01-01 10:00:01  1001     4912345678  61       ANSWERED     0.1200  settled
1.10      2026-01-01 10:00:02  a-longer-name  4912345678  61       ANSWERED     0.1200  settled
1.11      2026-01-01 10:00:03  1001           4912345678  61       ANSWERED     0.1200  settled
""", "")


def test_csv_cells_from_calls_never_start_a_formula(tariff):
    tariff.admin_ok("account", "add", "@home", "--balance", "5")
    result = place_call(tariff, Scenario(answered_ms=61_000), account="@home",
                        agi_callerid="=1+1", agi_calleridname="-2+3", agi_context="  =ctx",
                        agi_channel="\tSIP/x-1")
    assert result.variables_set["ASTBILL_COST"] == "0.1200", result.dialogue_text()
    (row,) = csv.DictReader(io.StringIO(tariff.admin_ok("cdr", "--csv")))
    assert {key: row[key] for key in ("src", "clid", "dcontext", "channel", "accountcode",
                                      "account", "cost", "billsec", "rate")} == {
        "src": "'=1+1", "clid": '"-2+3" <=1+1>', "dcontext": "'  =ctx", "channel": "'\tSIP/x-1",
        "accountcode": "'@home", "account": "'@home", "cost": "0.1200", "billsec": "61",
        "rate": "0.0600"}
    (record,) = json.loads(tariff.admin_ok("cdr", "--json"))  # JSON is not for spreadsheets
    assert (record["src"], record["account"]) == ("=1+1", "@home")


def test_numbers_astbill_writes_are_never_quoted_even_negative(capsys):
    # A trunk dearer than the sell rate: a negative margin, AstBill's own number.
    admin.print_csv([{"account": "-1001", "trunk": "=carrier", "margin": "-0.0100",
                      "billsec": 61}], ["account", "trunk", "margin", "billsec"])
    assert capsys.readouterr().out == (
        "account,trunk,margin,billsec\r\n'-1001,'=carrier,-0.0100,61\r\n")


PEAK_RSS = """\
import resource, subprocess, sys
with open(sys.argv[1], "w") as out:
    subprocess.run(sys.argv[2:], stdout=out, check=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def test_cdr_csv_streams_in_the_same_memory_for_ten_times_the_rows(tmp_path):
    billing = Billing(tmp_path, f"sqlite://{tmp_path / 'astbill.db'}")
    billing.admin_ok("init-db")

    def peak_kib():
        """Peak RSS of `astbill-admin cdr --csv`, run from a fresh process that
        has no other child, with the lines it printed."""
        out = tmp_path / "cdrs.csv"
        measured = subprocess.run([sys.executable, "-c", PEAK_RSS, str(out), sys.executable,
                                   ADMIN, "cdr", "--csv"], env=billing.env, text=True,
                                  capture_output=True, timeout=300, check=True)
        with open(out, newline="") as f:
            return int(measured.stdout), sum(1 for _ in f)

    def add(first, count):
        record_cdrs(billing, ((f"1.{n}", timestamp(1767225600 + n * 7), "1001", "4930111222")
                              for n in range(first, first + count)))
    add(0, 5_000)
    small, lines = peak_kib()
    assert lines == 5_001
    add(5_000, 45_000)
    large, lines = peak_kib()
    assert lines == 50_001
    print(f"peak RSS of cdr --csv: {small} KiB for 5,000 CDRs, {large} KiB for 50,000")
    assert large - small < 3 * 1024, (small, large)


def test_account_names_match_exactly_on_every_backend(billing):
    """MySQL's default collation would take 'ACC1' and 'acc1 ' for 'acc1'."""
    billing.setup_rates(RATES)
    billing.admin_ok("account", "add", "acc1", "--balance", "10")
    for name in ("ACC1", "acc1 ", "Acc1"):
        result = place_call(billing, Scenario(answered_ms=61_000), account=name)
        assert result.variables_set["ASTBILL_STATUS"] == "NOACCOUNT", (name, result.dialogue_text())
        assert result.dial_args is None
    assert billing.admin("account", "show", "ACC1") == (
        1, "", "astbill-admin: no account 'ACC1'\n")
    assert billing.admin("topup", "ACC1", "5")[0] == 1
    assert place_call(billing, Scenario(answered_ms=61_000), account="acc1").variables_set[
        "ASTBILL_COST"] == "0.1200"
    # A name that differs only in case is an account of its own.
    billing.admin_ok("account", "add", "ACC1", "--balance", "1")
    assert [(a["account"], a["balance"]) for a in json.loads(billing.admin_ok(
        "account", "list", "--json"))] == [("ACC1", "1.0000"), ("acc1", "9.8800")]
    assert billing.query("SELECT COUNT(*) FROM astcdr WHERE account = 'ACC1'") == [(0,)]


# -- API tokens and staff users ---------------------------------------------------

def test_a_token_is_shown_once_stored_as_its_hash_listed_and_removed(billing):
    import hashlib
    status, out, err = billing.admin("token", "add", "shop-1", "--role", "shop")
    first, token, rest = out.split("\n")
    assert (status, first, len(token), rest, err) == (
        0, "token shop-1 (shop), shown only this once:", 43, "", "")
    ((stored, created),) = billing.query("SELECT token_hash, created FROM asttoken")
    assert stored == hashlib.sha256(token.encode()).hexdigest()
    assert billing.admin("token", "list") == (
        0, f"name    role  created\nshop-1  shop  {created}\n", "")
    assert billing.admin("token", "add", "shop-1", "--role", "admin") == (
        1, "", "astbill-admin: token 'shop-1' exists\n")
    assert billing.admin("token", "add", "x", "--role", "boss") == (
        2, "", "astbill-admin: argument --role: invalid choice: 'boss' (choose from 'admin',"
               " 'support', 'shop') (see astbill-admin token add --help)\n")
    added = json.loads(billing.admin_ok("token", "add", "ops", "--role", "admin", "--json"))
    assert added["token"] != token and (added["name"], added["role"]) == ("ops", "admin")
    assert billing.admin("token", "remove", "shop-1") == (0, "", "")
    assert billing.admin("token", "remove", "shop-1") == (
        1, "", "astbill-admin: no token 'shop-1'\n")
    assert [t["name"] for t in json.loads(billing.admin_ok("token", "list", "--json"))] == ["ops"]


def test_a_staff_user_has_a_salted_scrypt_password(billing, monkeypatch):
    from astbill.admin import auth
    password = "correct horse battery"
    monkeypatch.setattr(sys, "stdin", io.StringIO(password + "\n"))
    assert billing.admin("user", "add", "alice", "--role", "support", "--password-stdin") == (
        0, "user alice (support) added\n", "")
    result = billing.admin_process("user", "add", "bob", "--role", "admin", "--password-stdin",
                                   input=password + "\n")
    assert (result.returncode, result.stdout, result.stderr) == (0, "user bob (admin) added\n", "")
    monkeypatch.setattr(sys, "stdin", io.StringIO("short\n"))
    assert billing.admin("user", "add", "carol", "--role", "admin", "--password-stdin") == (
        1, "", "astbill-admin: a password must be 10 to 1024 characters\n")
    answers = iter(["first password", "second password"])
    monkeypatch.setattr("getpass.getpass", lambda prompt: next(answers))
    assert billing.admin("user", "add", "carol", "--role", "admin") == (
        1, "", "astbill-admin: the two passwords differ\n")
    assert billing.admin("user", "add", "dave", "--role", "shop")[0] == 2   # staff only
    rows = billing.query("SELECT name, role, password_hash, created FROM astuser ORDER BY name")
    assert billing.admin("user", "list") == (0, "name   role     created\n" + "".join(
        f"{n:<5}  {r:<7}  {c}\n" for n, r, _, c in rows), "")
    hashes = [h for _, _, h, _ in rows]
    assert all(h.startswith("scrypt$16384$8$1$") and password not in h for h in hashes)
    assert hashes[0] != hashes[1]   # salted: the same password, two hashes
    store = billing.store()
    try:
        assert auth.login(store, "alice", password) == "support"
        assert auth.login(store, "bob", password) == "admin"
        assert auth.login(store, "alice", password + " ") is None
        assert auth.login(store, "nobody", password) is None
    finally:
        store.close()
    assert billing.admin("user", "remove", "alice") == (0, "", "")
    assert billing.admin("user", "remove", "alice") == (1, "", "astbill-admin: no user 'alice'\n")


def test_a_top_up_records_who_made_it(tariff):
    import os
    import pwd
    tariff.admin_ok("topup", "1001", "5")
    assert tariff.query("SELECT kind, actor FROM astledger ORDER BY id") == [
        ("open", f"astbill-admin:{pwd.getpwuid(os.geteuid()).pw_name}"),
        ("topup", f"astbill-admin:{pwd.getpwuid(os.geteuid()).pw_name}")]
