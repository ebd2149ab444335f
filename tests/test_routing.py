"""Carrier-grade routing and rating, through the real astbill.py and
astbill-admin on SQLite and MariaDB: least-cost trunks with failover, rate
periods, dated decks, postpaid credit limits and call caps."""
import calendar
import json
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest

from agipeer import Scenario, agi_env, parse_args, run_call
from conftest import ASTBILL, invariants, place_call, start_held_call

SKEWED_CLOCK = str(Path(__file__).resolve().parent / "skewed_clock")
HEADER = "prefix,destination,rate,connect_fee,min_secs,increment\n"
# What each carrier charges for Germany: C is cheapest per minute, A and B
# cost the same per minute and A has no connect fee, D costs more than
# callers pay (0.06).
BUY = {"carrier-a": "49,Germany,0.0300,0,60,60\n4915,Germany mobile,0.0500,0,1,1\n",
       "carrier-b": "49,Germany,0.0300,0.0010,1,1\n",
       "carrier-c": "49,Germany,0.0250,0.0100,6,6\n",
       "carrier-d": "49,Germany,0.0700,0,1,1\n"}


def add_trunk(billing, name, rates):
    billing.admin_ok("trunk", "add", name, "--dial", f"SIP/{name}/{{number}}")
    path = billing.path / f"{name}.csv"
    path.write_text(HEADER + rates)
    billing.admin_ok("rate", "import", str(path), "--trunk", name)


@pytest.fixture
def trunks(tariff):
    for name, rates in BUY.items():
        add_trunk(tariff, name, rates)
    return tariff


def dialled(result):
    """The Dial targets, in the order the call tried them."""
    return [parse_args(line)[2].split(",")[0] for line in result.commands
            if line.startswith("EXEC Dial ")]


def at_clock(billing, when):
    """The process environment of a box whose clock reads ``when`` (UTC)."""
    skew = calendar.timegm(time.strptime(when, "%Y-%m-%d %H:%M:%S")) - time.time()
    return dict(billing.env, PYTHONPATH=SKEWED_CLOCK, ASTBILL_TEST_CLOCK_SKEW=str(skew))


def call_at(billing, when, scenario, number="4912345678", account="1001"):
    """A call through the real astbill.py on a box whose clock reads ``when``."""
    block = agi_env(agi_extension=number, agi_accountcode=account)
    result = run_call([sys.executable, ASTBILL], scenario, block, at_clock(billing, when), 30)
    result.uniqueid = block["agi_uniqueid"]
    return result


# -- trunks ----------------------------------------------------------------------------

def test_trunks_are_added_listed_disabled_and_removed(tariff):
    assert tariff.admin("trunk", "add", "carrier-a", "--dial", "SIP/carrier-a/{number}") == (
        0, "name       dial                    enabled  rates_since\n"
           "carrier-a  SIP/carrier-a/{number}  True\n", "")
    assert tariff.admin("trunk", "add", "carrier-a", "--dial", "SIP/x/{number}") == (
        1, "", "astbill-admin: trunk 'carrier-a' exists\n")
    assert tariff.admin("trunk", "add", "carrier-b", "--dial", "SIP/carrier-b") == (
        1, "", "astbill-admin: --dial must contain {number}\n")
    tariff.admin_ok("trunk", "disable", "carrier-a")
    assert json.loads(tariff.admin_ok("trunk", "list", "--json")) == [
        {"name": "carrier-a", "dial": "SIP/carrier-a/{number}", "enabled": False,
         "rates_since": None}]
    tariff.admin_ok("trunk", "enable", "carrier-a")
    assert json.loads(tariff.admin_ok("trunk", "list", "--json"))[0]["enabled"] is True
    assert tariff.admin("rate", "import", str(tariff.path / "none.csv"), "--trunk", "nope")[0] == 1
    tariff.admin_ok("trunk", "remove", "carrier-a")
    assert tariff.admin("trunk", "remove", "carrier-a") == (
        1, "", "astbill-admin: no trunk 'carrier-a'\n")
    assert json.loads(tariff.admin_ok("trunk", "list", "--json")) == []


@pytest.mark.parametrize("template, why", [
    ("SIP/x/{number},30", "must not contain ','"),
    ("SIP/x/{number}|30", "must not contain '|'"),
    ('SIP/x/"{number}', "must not contain '\"'"),
    ("SIP/x/{number}\\", "must not contain '\\\\'"),
    ("SIP/x/({number}", "must balance its parentheses"),
])
def test_a_dial_template_that_would_move_astbills_limit_out_of_its_field_is_refused(
        tariff, template, why):
    # Dial reads "SIP/x/N,30,60,L(...)": the 30 would be the timeout and L()
    # would land in the URL field, where Asterisk enforces nothing.
    status, out, err = tariff.admin("trunk", "add", "carrier-x", "--dial", template)
    assert (status, out) == (1, "")
    assert err.startswith(f"astbill-admin: --dial {why}") and err.count("\n") == 1, err
    assert json.loads(tariff.admin_ok("trunk", "list", "--json")) == []


@pytest.mark.parametrize("key, value", [("dial", "SIP/trunk/{number},45"),
                                        ("dial_options", "g,45"), ("dial_options", "L(1")])
def test_a_config_whose_dial_would_move_the_limit_is_refused(tariff, key, value):
    from astbill.config import ConfigError, check
    with pytest.raises(ConfigError, match=f"^config: {key} must"):
        check(dict(tariff.settings, **{key: value}))


def test_a_bad_template_written_behind_astbills_back_is_never_dialled(trunks):
    store = trunks.store()
    store.atomic(lambda tx: tx.run("UPDATE asttrunk SET dial = 'SIP/c/{number},30'"
                                   " WHERE name = 'carrier-c'"))
    store.close()
    result = place_call(trunks, Scenario(answered_ms=61_000))
    assert dialled(result) == [], result.dialogue_text()
    assert "not dialled: Dial string" in result.dialogue_text()
    assert result.variables_set["ASTBILL_COST"] == "0.0000"
    assert trunks.cdr(result.uniqueid)["disposition"] == "NO ANSWER"
    invariants(trunks, {"1001": Decimal("10")})


def test_route_says_what_a_call_would_get(trunks):
    out = json.loads(trunks.admin_ok("route", "+4912345678", "--account", "1001", "--json"))
    assert out == {
        "number": "4912345678", "status": "OK", "max_secs": 3600,
        "rate": {"prefix": "49", "rate": "0.0600", "connect_fee": "0.0000", "min_secs": 60,
                 "increment": 60},
        "trunks": [{"name": f"carrier-{x}", "dial": f"SIP/carrier-{x}/4912345678", "rate": r,
                    "connect_fee": f}
                   for x, r, f in (("c", "0.0250", "0.0100"), ("a", "0.0300", "0.0000"),
                                   ("b", "0.0300", "0.0010"))]}
    trunks.write_config(lcr_allow_loss=True, lcr_max_trunks=4)
    out = json.loads(trunks.admin_ok("route", "4912345678", "--account", "1001", "--json"))
    assert [t["name"] for t in out["trunks"]] == ["carrier-c", "carrier-a", "carrier-b", "carrier-d"]
    trunks.write_config(lcr_max_trunks=2)
    out = json.loads(trunks.admin_ok("route", "4915123456", "--account", "1001", "--json"))
    # carrier-a rates this number by its own longest prefix, 4915 at 0.05
    assert [t["name"] for t in out["trunks"]] == ["carrier-c", "carrier-b"]
    assert json.loads(trunks.admin_ok("route", "1555", "--account", "1001", "--json"))[
        "status"] == "NOROUTE"


def test_failover_dials_the_next_trunk_and_bills_the_one_that_carried(trunks):
    result = place_call(trunks, Scenario(earlier_dials=("CHANUNAVAIL", "CONGESTION"),
                                         answered_ms=61_000))
    assert dialled(result) == ["SIP/carrier-c/4912345678", "SIP/carrier-a/4912345678",
                               "SIP/carrier-b/4912345678"]
    assert all(line.endswith(',60,L(3600000)"') for line in result.commands
               if line.startswith("EXEC Dial"))          # the same limit each time
    assert result.variables_set["ASTBILL_TRUNK"] == "carrier-b"
    assert result.variables_set["ASTBILL_COST"] == "0.1200"
    cdr = json.loads(trunks.admin_ok("cdr", "--json"))[0]
    assert (cdr["trunk"], cdr["cost"], cdr["buy_cost"], cdr["margin"]) == (
        "carrier-b", "0.1200", "0.0315", "0.0885")          # 0.001 + 0.03 x 61/60
    assert cdr["lastdata"] == "SIP/carrier-b/4912345678"
    invariants(trunks, {"1001": Decimal("10")})


@pytest.mark.parametrize("earlier, status, tried", [
    ((), "BUSY", 1), ((), "NOANSWER", 1), (("CONGESTION",), "BUSY", 2),
    (("CHANUNAVAIL", "CHANUNAVAIL"), "CONGESTION", 3),
], ids=["busy", "noanswer", "congestion-busy", "all-fail"])
def test_only_unavailable_or_congested_trunks_fail_over_and_none_twice(trunks, earlier, status, tried):
    result = place_call(trunks, Scenario(earlier_dials=earlier, dialstatus=status))
    targets = dialled(result)
    assert len(targets) == tried and len(set(targets)) == tried
    assert result.variables_set["ASTBILL_COST"] == "0.0000"
    assert trunks.balance("1001") == Decimal("10")


def test_no_trunk_can_carry_the_number_is_noroute(trunks):
    trunks.admin_ok("trunk", "disable", "carrier-a")
    # Only carrier-a has 4915; carrier-c and -b still carry the number by 49.
    # carrier-c, cheapest per minute, charges 0.0125 for a second (its 0.01
    # connect fee and a 6 s block) that callers pay 0.0020 for (0.12 a
    # minute on 1/1): at a loss, so carrier-b carries the call.
    result = place_call(trunks, Scenario(answered_ms=1000), number="4915123456")
    assert dialled(result) == ["SIP/carrier-b/4915123456"]
    result = place_call(trunks, Scenario(answered_ms=1000), number="1555123")
    assert (result.variables_set["ASTBILL_STATUS"], result.dial_args) == ("NOROUTE", None)
    assert result.verbose == ["astbill: NOROUTE no trunk carries 1555123"]


def test_a_trunk_cheaper_per_minute_but_dearer_on_short_calls_is_not_dialled(tariff):
    # Sold at 0.10 a minute on 1/1.  fee-a buys at 0.09 a minute with 0.05
    # to connect on 60/60: a 10 s call costs 0.0167 and 0.1400 to buy.
    # fair-b is dearer a minute, 0.095 on 1/1, and never dearer than a sale.
    tariff.setup_rates(HEADER + "44,UK,0.1000,0,1,1\n", tariff="retail")
    tariff.admin_ok("account", "add", "2001", "--balance", "10", "--tariff", "retail")
    add_trunk(tariff, "fee-a", "44,UK,0.0900,0.0500,60,60\n")

    def route():
        out = json.loads(tariff.admin_ok("route", "441234567", "--account", "2001", "--json"))
        return out["status"], [t["name"] for t in out["trunks"]]

    def call():
        result = place_call(tariff, Scenario(answered_ms=10_000), number="441234567",
                            account="2001")
        return (result.variables_set["ASTBILL_STATUS"], dialled(result),
                result.variables_set.get("ASTBILL_COST"), tariff.cdr(result.uniqueid)["buy_cost"])

    assert route() == ("NOROUTE", [])
    result = place_call(tariff, Scenario(answered_ms=10_000), number="441234567", account="2001")
    assert (result.variables_set["ASTBILL_STATUS"], result.dial_args) == ("NOROUTE", None)
    assert result.verbose == ["astbill: NOROUTE no trunk carries 441234567 without a loss"]

    add_trunk(tariff, "fair-b", "44,UK,0.0950,0,1,1\n")
    assert route() == ("OK", ["fair-b"])
    assert call() == ("OK", ["SIP/fair-b/441234567"], "0.0167", Decimal("0.0159"))

    tariff.write_config(lcr_allow_loss=True)
    assert route() == ("OK", ["fee-a", "fair-b"])
    assert call() == ("OK", ["SIP/fee-a/441234567"], "0.0167", Decimal("0.14"))
    invariants(tariff, {"2001": Decimal("10")})


# -- rate periods -------------------------------------------------------------------------

PEAK = ("prefix,destination,rate,connect_fee,min_secs,increment,days,hours\n"
        "49,Germany peak,0.1000,0,60,60,mon-fri,08:00-18:00\n"
        "49,Germany night,0.0200,0,60,60,mon-fri,00:00-08:00\n"
        "49,Germany evening,0.0200,0,60,60,mon-fri,18:00-24:00\n"
        '49,Germany weekend,0.0200,0,60,60,"sat,sun",\n')


def test_periods_that_overlap_or_leave_a_gap_are_refused_by_name(tariff):
    path = tariff.path / "bad.csv"
    path.write_text(PEAK.replace("00:00-08:00", "00:00-07:00").replace("18:00-24:00", "17:00-24:00"))
    status, out, err = tariff.admin("rate", "import", str(path), "--tariff", "peak")
    assert (status, out) == (1, "")
    assert err.splitlines() == [
        f"astbill-admin: {path}: prefix 49: mon 07:00-08:00 is not covered",
        f"astbill-admin: {path}: prefix 49: mon 17:00-18:00 is covered twice (line 2 and line 4)",
        f"astbill-admin: {path}: prefix 49: tue 07:00-08:00 is not covered"]
    path.write_text(PEAK.replace("49,Germany night,0.0200,0,60,60,mon-fri,00:00-08:00\n", ""))
    assert tariff.admin("rate", "import", str(path), "--tariff", "peak")[2].splitlines()[0] == (
        f"astbill-admin: {path}: prefix 49: mon 00:00-08:00 is not covered")
    path.write_text(PEAK.replace("18:00-24:00", "18:00-08:00"))
    assert "must not be empty or wrap midnight" in tariff.admin(
        "rate", "import", str(path), "--tariff", "peak")[2]
    assert tariff.query("SELECT COUNT(*) FROM astdeck WHERE name = 'peak'") == [(0,)]


@pytest.fixture
def peak(tariff):
    path = tariff.path / "peak.csv"
    path.write_text(PEAK)
    tariff.admin_ok("rate", "import", str(path), "--tariff", "peak")
    tariff.admin_ok("account", "add", "p1", "--balance", "0.50", "--tariff", "peak")
    return tariff


def test_a_call_across_a_period_boundary_is_charged_per_block(peak):
    # Answered at 17:59:0x on a Monday, 90 s: the minimum at peak, the
    # second minute, starting after 18:00, at the evening rate.
    result = call_at(peak, "2026-11-30 18:00:30", Scenario(answered_ms=90_000), account="p1")
    assert result.variables_set["ASTBILL_COST"] == "0.1200", result.dialogue_text()
    assert peak.balance("p1") == Decimal("0.38")


def test_the_grant_covers_any_answer_within_the_ring_window(peak):
    # At 17:59:30 a call may still be answered at peak: its first minute
    # costs 0.10, every later one 0.02, so 0.50 buys 21 minutes -- not the 25
    # the evening rate alone would.
    env = at_clock(peak, "2026-11-30 17:59:30")
    out = json.loads(peak.admin_process("route", "4912345678", "--account", "p1", "--json",
                                        env=env).stdout)
    assert (out["status"], out["max_secs"], out["rate"]["rate"]) == ("OK", 1260, "0.1000")
    later = json.loads(peak.admin_process("route", "4912345678", "--account", "p1", "--json",
                                          env=at_clock(peak, "2026-11-30 18:05:00")).stdout)
    assert later["max_secs"] == 1500
    result = call_at(peak, "2026-11-30 17:59:30", Scenario(answered_ms=1000), account="p1")
    assert result.variables_set["ASTBILL_MAXSECS"] == "1260"
    assert peak.balance("p1") == Decimal("0.40")   # answered at once, at peak: 0.10


def test_periods_are_read_in_the_configured_timezone(peak):
    peak.write_config(timezone="Europe/Berlin")     # UTC+1 in winter
    result = call_at(peak, "2026-11-30 17:00:30", Scenario(answered_ms=90_000), account="p1")
    assert result.variables_set["ASTBILL_COST"] == "0.1200", result.dialogue_text()
    assert peak.admin("account", "show", "p1")[0] == 0
    peak.write_config(timezone="Mars/Olympus")
    status, _, err = peak.admin("account", "show", "p1")
    assert status == 1 and "timezone must be an IANA name" in err


# -- dated decks -----------------------------------------------------------------------------

def test_a_dated_deck_takes_effect_at_its_start(tariff):
    path = tariff.path / "2030.csv"
    path.write_text(HEADER + "49,Germany,0.5000,0,60,60\n")
    assert tariff.admin("rate", "import", str(path), "--tariff", "default",
                        "--from", "2030-01-01 00:00") == (
        0, "imported 1 rates into tariff default, in force from 2030-01-01 00:00:00\n", "")
    assert [r["rate"] for r in json.loads(tariff.admin_ok(
        "rate", "list", "--tariff", "default", "--prefix", "49", "--json"))] == [
        "0.0600", "0.1200", "0.0300"]
    assert json.loads(tariff.admin_ok("rate", "list", "--tariff", "default", "--at",
                                      "2030-01-02 00:00", "--json")) == [
        {"prefix": "49", "destination": "Germany", "rate": "0.5000", "connect_fee": "0.0000",
         "min_secs": 60, "increment": 60, "days": "all", "hours": "00:00-24:00"}]
    assert place_call(tariff, Scenario(answered_ms=61_000)).variables_set["ASTBILL_COST"] == "0.1200"
    later = call_at(tariff, "2030-06-01 12:00:00", Scenario(answered_ms=61_000))
    assert later.variables_set["ASTBILL_COST"] == "1.0000", later.dialogue_text()
    assert tariff.admin("rate", "import", str(path), "--tariff", "default", "--from", "soon") == (
        1, "", "astbill-admin: --from must look like 'YYYY-MM-DD HH:MM' (UTC): 'soon'\n")


def deck(billing, kind, name, rates, starts="2026-01-01 00:00"):
    path = billing.path / f"{kind}-{name}.csv"
    path.write_text(HEADER + rates)
    billing.admin_ok("rate", "import", str(path), f"--{kind}", name, "--from", starts)


def decks_from(billing, starts):
    return billing.query("SELECT kind, COUNT(*) FROM astdeck WHERE starts = ?"
                         " GROUP BY kind ORDER BY kind", (starts,))


def test_a_deck_imported_again_with_its_start_leaves_calls_in_progress_their_prices(trunks):
    """The deck in force is replaced (same --from) at a tenth of the price,
    sell and buy, while a call is up: it settles at the prices it was
    authorized with, as its CDR says; the next call pays the new ones."""
    deck(trunks, "tariff", "default", "49,Germany fixed,0.6000,0,60,60\n")
    deck(trunks, "trunk", "carrier-c", "49,Germany,0.0250,0.0100,6,6\n")
    gate = threading.Event()
    call = start_held_call(trunks, gate, answered_ms=600_000)
    assert call.dial_reached.wait(30)
    deck(trunks, "tariff", "default", "49,Germany fixed,0.0600,0,60,60\n")
    deck(trunks, "trunk", "carrier-c", "49,Germany,0.0025,0.0010,6,6\n")
    assert decks_from(trunks, "2026-01-01 00:00:00") == [("tariff", 2), ("trunk", 2)]
    gate.set()
    result = call.wait()
    assert result.variables_set["ASTBILL_COST"] == "6.0000", result.dialogue_text()
    assert result.variables_set["ASTBILL_TRUNK"] == "carrier-c"
    cdr = trunks.cdr(call.uniqueid)
    assert (cdr["rate"], cdr["cost"], cdr["buy_cost"], cdr["billsec"]) == (
        Decimal("0.6"), Decimal("6"), Decimal("0.26"), 600)    # 0.01 + 0.025 x 10
    after = place_call(trunks, Scenario(answered_ms=600_000))
    assert after.variables_set["ASTBILL_COST"] == "0.6000", after.dialogue_text()
    cdr = trunks.cdr(after.uniqueid)
    assert (cdr["rate"], cdr["buy_cost"]) == (Decimal("0.06"), Decimal("0.026"))
    # A replaced deck stays while a call in progress refers to it, and goes
    # at the next import once none does.
    deck(trunks, "tariff", "default", "49,Germany fixed,0.0600,0,60,60\n")
    deck(trunks, "trunk", "carrier-c", "49,Germany,0.0025,0.0010,6,6\n")
    assert decks_from(trunks, "2026-01-01 00:00:00") == [("tariff", 1), ("trunk", 1)]
    invariants(trunks, {"1001": Decimal("10")})


def test_a_call_that_fails_over_pays_its_trunk_the_deck_it_was_authorized_with(trunks):
    """The trunk it fails over to has its deck replaced while the call is up
    (before that trunk is even dialled): the buy cost is still the old
    deck's, which stays while the call may need it."""
    gate = threading.Event()
    call = start_held_call(trunks, gate, earlier_dials=("CHANUNAVAIL",), answered_ms=600_000)
    assert call.dial_reached.wait(30)
    deck(trunks, "trunk", "carrier-a", "49,Germany,0.0030,0,60,60\n", starts="1970-01-01 00:00")
    assert decks_from(trunks, "1970-01-01 00:00:00") == [("tariff", 1), ("trunk", 5)]
    gate.set()
    result = call.wait()
    assert result.variables_set["ASTBILL_TRUNK"] == "carrier-a", result.dialogue_text()
    cdr = trunks.cdr(call.uniqueid)
    assert (cdr["trunk"], cdr["cost"], cdr["buy_cost"]) == ("carrier-a", Decimal("0.6"),
                                                           Decimal("0.3"))   # 0.03 x 10
    after = place_call(trunks, Scenario(answered_ms=600_000))    # carrier-a, cheapest now
    assert (trunks.cdr(after.uniqueid)["trunk"], trunks.cdr(after.uniqueid)["buy_cost"]) == (
        "carrier-a", Decimal("0.03"))
    invariants(trunks, {"1001": Decimal("10")})


def test_a_call_swept_after_its_deck_was_replaced_is_priced_by_its_own_deck(tariff):
    deck(tariff, "tariff", "default", "49,Germany fixed,0.6000,0,60,60\n")
    tariff.write_config(asterisk_cdr_table="cdr")
    store = tariff.store()
    store.atomic(lambda tx: tx.run(
        "CREATE TABLE cdr (uniqueid VARCHAR(150) NOT NULL, lastapp VARCHAR(80) NOT NULL,"
        " billsec INT NOT NULL, disposition VARCHAR(45) NOT NULL, PRIMARY KEY (uniqueid, lastapp))"))
    result = place_call(tariff, Scenario(kill_after_dial_sent=True))   # the AGI dies in its Dial
    deck(tariff, "tariff", "default", "49,Germany fixed,0.0600,0,60,60\n")
    store.atomic(lambda tx: tx.run("INSERT INTO cdr VALUES (?, 'Dial', 125, 'ANSWERED')",
                                   (result.uniqueid,)))
    store.close()
    tariff.backdate(7200)
    assert [(d["uniqueid"], d["action"], d["cost"]) for d in tariff.sweep()] == [
        (result.uniqueid, "settled", Decimal("1.8"))]    # 3 minutes at 0.60
    invariants(tariff, {"1001": Decimal("10")})


def test_rate_list_csv_imports_back_the_same_rates(peak):
    listed = peak.admin_ok("rate", "list", "--tariff", "peak", "--csv")
    again = peak.path / "again.csv"
    again.write_text(listed)
    peak.admin_ok("rate", "import", str(again), "--tariff", "copy")
    assert peak.admin_ok("rate", "list", "--tariff", "copy", "--csv") == listed
    assert listed.splitlines() == [
        "prefix,destination,rate,connect_fee,min_secs,increment,days,hours",
        "49,Germany weekend,0.0200,0.0000,60,60,sat-sun,00:00-24:00",
        "49,Germany night,0.0200,0.0000,60,60,mon-fri,00:00-08:00",
        "49,Germany peak,0.1000,0.0000,60,60,mon-fri,08:00-18:00",
        "49,Germany evening,0.0200,0.0000,60,60,mon-fri,18:00-24:00"]


# -- postpaid limits and call caps -------------------------------------------------------------

def test_a_postpaid_account_goes_below_zero_down_to_its_credit_limit(tariff):
    tariff.admin_ok("account", "add", "post", "--balance", "0", "--credit-limit", "1")
    result = place_call(tariff, Scenario(answered_ms=61_000), account="post")
    assert result.variables_set["ASTBILL_COST"] == "0.1200"
    shown = json.loads(tariff.admin_ok("account", "show", "post", "--json"))
    assert (shown["balance"], shown["credit_limit"], shown["available"]) == (
        "-0.1200", "1.0000", "0.8800")
    long_call = place_call(tariff, Scenario(answered_ms=10_000_000), account="post")
    assert long_call.dial_args.endswith("L(840000)")     # 0.88 buys 14 minutes
    assert tariff.balance("post") == Decimal("-0.96")
    assert place_call(tariff, Scenario(answered_ms=1), account="post").variables_set[
        "ASTBILL_STATUS"] == "NOFUNDS"
    assert tariff.admin("audit")[0] == 0
    tariff.admin_ok("account", "set", "post", "--credit-limit", "0")
    status, out, _ = tariff.admin("audit")
    assert status == 1 and "account post: balance -0.9600 is below zero" in out


def test_the_call_cap_holds_under_concurrent_calls(tariff):
    tariff.admin_ok("account", "add", "capped", "--balance", "10", "--max-calls", "2")
    gate = threading.Event()
    seen, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(len(tariff.query(
                "SELECT uniqueid FROM astcreditres WHERE account = 'capped'")))

    watcher = threading.Thread(target=watch)
    watcher.start()
    calls = [start_held_call(tariff, gate, account="capped", answered_ms=5_000) for _ in range(6)]
    time.sleep(4)
    gate.set()
    results = [c.wait() for c in calls]
    stop.set()
    watcher.join()
    statuses = sorted(r.variables_set["ASTBILL_STATUS"] for r in results)
    assert statuses == ["MAXCALLS"] * 4 + ["OK"] * 2
    assert max(seen) <= 2
    shown = json.loads(tariff.admin_ok("account", "show", "capped", "--json"))
    assert (shown["max_calls"], shown["calls"]) == (2, 0)
    invariants(tariff, {"capped": Decimal("10"), "1001": Decimal("10")})
