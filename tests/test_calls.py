"""Whole calls: the real astbill.py process against an AGI peer that answers
as Asterisk 20 does, on SQLite and on MariaDB."""
import os
import sys
import threading
from decimal import Decimal

import pytest

from agipeer import Scenario, agi_env, run_call
from astbill import ledger
from astbill.config import load
from astbill.store import open_store
from conftest import ASTBILL, place_call, start_held_call

UNANSWERED = [("BUSY", "BUSY"), ("NOANSWER", "NO ANSWER"), ("CONGESTION", "CONGESTION"),
              ("CHANUNAVAIL", "FAILED"), ("CANCEL", "NO ANSWER")]


def assert_billed(tariff, result, billsec, cost, balance, disposition="ANSWERED"):
    text = result.dialogue_text()
    assert result.returncode == 0, text
    assert result.variables_set["ASTBILL_STATUS"] == "OK", text
    assert result.variables_set.get("ASTBILL_BILLSEC") == str(billsec), text
    assert result.variables_set.get("ASTBILL_COST") == cost, text
    assert tariff.balance("1001") == Decimal(balance)
    assert tariff.reservations() == []
    cdr = tariff.cdr(result.uniqueid)
    assert (cdr["billsec"], cdr["cost"], cdr["state"], cdr["disposition"]) == (
        billsec, Decimal(cost), "settled", disposition)


@pytest.mark.parametrize("number, talk_ms, billsec, cost, balance", [
    ("4912345678", 61_500, 62, "0.1200", "9.88"),     # 60/60 at 0.06: two minutes
    ("4930123456", 31_200, 32, "0.0280", "9.972"),    # 30/6 at 0.03 + 0.01: 36 s
    ("4915123456", 59_999, 60, "0.1200", "9.88"),     # 1/1 at 0.12: 59.999 s is 60 s
    ("4912345678", 900, 1, "0.0600", "9.94"),         # answered: even 0.9 s bills the minimum
    ("4915123456", 999, 1, "0.0020", "9.998"),       # 1/1: 999 ms is a second, never free
])
def test_answered_calls_are_billed_by_their_increments(tariff, number, talk_ms, billsec, cost, balance):
    result = place_call(tariff, Scenario(answered_ms=talk_ms), number=number)
    assert_billed(tariff, result, billsec, cost, balance)


@pytest.mark.parametrize("number, talk_ms, billsec, cost, balance", [
    ("4915123456", 60_999, 60, "0.1200", "9.88"),     # 1/1 at 0.12: whole seconds, as Asterisk's
    ("4912345678", 60_999, 60, "0.0600", "9.94"),     # 60/60: one block
])
def test_billsec_rounding_down_bills_whole_seconds_as_asterisk_does(
        tariff, number, talk_ms, billsec, cost, balance):
    tariff.write_config(billsec_rounding="down")
    result = place_call(tariff, Scenario(answered_ms=talk_ms), number=number)
    assert_billed(tariff, result, billsec, cost, balance)


def test_the_dial_carries_the_granted_limit(tariff):
    result = place_call(tariff, Scenario(answered_ms=1000), number="+4912345678")
    assert result.dial_args == "PJSIP/4912345678@trunk,60,L(3600000)"
    assert result.variables_set["ASTBILL_MAXSECS"] == "3600"
    cdr = tariff.cdr(result.uniqueid)
    assert (cdr["dst"], cdr["prefix"], cdr["tariff"], cdr["max_secs"]) == ("4912345678", "49", "default", 3600)
    assert (cdr["lastapp"], cdr["lastdata"], cdr["src"]) == ("Dial", "PJSIP/4912345678@trunk", "4930111222")


def test_the_cap_holds_and_the_limit_cuts_the_call(tariff):
    tariff.admin_ok("topup", "1001", "1000")
    result = place_call(tariff, Scenario(answered_ms=4_000_000))
    assert result.dial_args.endswith(",L(3600000)")
    assert_billed(tariff, result, 3600, "3.6000", "1006.4")


@pytest.mark.parametrize("dialstatus, disposition", UNANSWERED)
def test_unanswered_calls_release_the_reservation_at_cost_zero(tariff, dialstatus, disposition):
    result = place_call(tariff, Scenario(dialstatus=dialstatus))
    assert_billed(tariff, result, 0, "0.0000", "10", disposition)
    assert tariff.query("SELECT COUNT(*) FROM astledger WHERE kind = 'call'") == [(0,)]


@pytest.mark.parametrize("scenario", [
    Scenario(answered_ms=4004, caller_hangup=True),                   # SIGHUP during Dial
    Scenario(answered_ms=4004, caller_hangup=True, agisighup=False),  # AGISIGHUP=no
], ids=["sighup", "agisighup-no"])
def test_a_caller_hangup_still_settles_with_the_real_talk_time(tariff, scenario):
    result = place_call(tariff, scenario, number="4915123456")
    assert_billed(tariff, result, 5, "0.0100", "9.99")


def test_a_pre_answered_caller_does_not_pay_for_the_time_before_the_dial(tariff):
    result = place_call(tariff, Scenario(answered_ms=3500, pre_answered_ms=2500), number="4915123456")
    assert_billed(tariff, result, 4, "0.0080", "9.992")


def test_the_talk_time_comes_from_dials_milliseconds(tariff):
    # The caller was up 5.299 s before the Dial and talked 61.7 s: Dial says
    # ANSWEREDTIME_MS 66999 but ANSWEREDTIME 66, which would bill only 60 s.
    result = place_call(tariff, Scenario(answered_ms=61_700, pre_answered_ms=5_299),
                        number="4915123456")
    assert_billed(tariff, result, 62, "0.1240", "9.876")


def test_a_pre_answered_caller_does_not_pay_for_the_authorization_either(tariff):
    # 1.5 s pass between reading the caller's channel and the Dial, while the
    # caller's answered time keeps counting: 59.6 s of talk is one minute.
    scenario = Scenario(answered_ms=59_600, pre_answered_ms=5_000, real_clock=True,
                        set_variable_delay=0.75)
    result = place_call(tariff, scenario)
    assert_billed(tariff, result, 60, "0.0600", "9.94")


def test_costs_are_charged_and_reported_to_the_configured_places(tariff):
    tariff.write_config(decimals=2)
    # 31.2 s to Berlin: 36 s at 0.03 + 0.01 is 0.028, rounded up to 0.03.
    result = place_call(tariff, Scenario(answered_ms=31_200), number="4930123456")
    assert_billed(tariff, result, 32, "0.03", "9.97")
    assert '"cost": "0.03"' in tariff.admin_ok("cdr", "--json")
    assert '"balance": "9.97"' in tariff.admin_ok("account", "show", "1001", "--json")


def test_the_limit_warning_is_given_in_milliseconds(tariff):
    tariff.write_config(warning_secs=30)
    result = place_call(tariff, Scenario(answered_ms=1000))
    assert result.dial_args == "PJSIP/4912345678@trunk,60,L(3600000:30000)"


@pytest.mark.parametrize("setup, env, status", [
    ("poor", {}, "NOFUNDS"),
    (None, {"number": "7123456"}, "NORATE"),
    (None, {"account": "9999"}, "NOACCOUNT"),
    (None, {"account": ""}, "NOACCOUNT"),
    (None, {"number": "12ab"}, "INVALID"),
    (None, {"number": "*#"}, "INVALID"),
    (None, {"account": "x" * 81}, "INVALID"),
])
def test_refused_calls_write_nothing_and_never_dial(tariff, setup, env, status):
    if setup == "poor":
        tariff.admin_ok("account", "add", "poor", "--balance", "0.0599")
        env = {"account": "poor"}
    before = tariff.query("SELECT COUNT(*) FROM astcdr")
    result = place_call(tariff, Scenario(answered_ms=1000), **env)
    assert result.returncode == 0, result.dialogue_text()
    assert result.variables_set["ASTBILL_STATUS"] == status
    assert result.variables_set["ASTBILL_MAXSECS"] == "0"
    assert result.dial_args is None
    assert len(result.verbose) == 1 and result.verbose[0].startswith(f"astbill: {status} ")
    assert tariff.query("SELECT COUNT(*) FROM astcdr") == before
    assert tariff.reservations() == []
    assert result.stderr == ""


def test_calls_in_progress_share_the_balance(tariff):
    tariff.admin_ok("account", "add", "2002", "--balance", "5")
    gate = threading.Event()
    first = start_held_call(tariff, gate, account="2002", answered_ms=10_000)
    assert first.dial_reached.wait(30)
    second = start_held_call(tariff, gate, account="2002", answered_ms=10_000)
    assert second.dial_reached.wait(30)
    third = place_call(tariff, Scenario(answered_ms=1000), account="2002")
    assert third.variables_set["ASTBILL_STATUS"] == "NOFUNDS"
    # astcreditres alone tells which calls are up and what each may cost.
    assert tariff.query("SELECT COUNT(*) FROM astcreditres WHERE account = '2002'") == [(2,)]
    calls = tariff.admin_ok("calls").splitlines()
    assert len(calls) == 3 and "3.6000" in calls[1] and "1.3800" in calls[2]
    gate.set()
    one, two = first.wait(), second.wait()
    assert one.variables_set["ASTBILL_MAXSECS"] == "3600"
    assert two.variables_set["ASTBILL_MAXSECS"] == "1380"   # 5 - 3.60 buys 23 minutes
    assert two.dial_args.endswith("L(1380000)")
    assert tariff.reservations() == []
    assert tariff.balance("2002") == Decimal("4.88")


def test_settling_twice_changes_nothing(tariff):
    result = place_call(tariff, Scenario(answered_ms=61_000))
    store = open_store(load(str(tariff.config)))
    try:
        call = ledger.CallRecord(uniqueid=result.uniqueid, dialstatus="ANSWER", talk_ms=600_000)
        again = ledger.settle_call(store, call, load(str(tariff.config)))
    finally:
        store.close()
    assert (again.how, again.cost, again.billsec) == ("repeated", Decimal("0.12"), 61)
    assert tariff.balance("1001") == Decimal("9.88")
    assert tariff.query("SELECT COUNT(*) FROM astledger WHERE kind = 'call'") == [(1,)]


def test_exit_on_hangup_leaves_the_reservation_for_the_sweeper(tariff):
    result = place_call(tariff, Scenario(answered_ms=4004, caller_hangup=True, exit_on_hangup=True))
    assert result.returncode == 0, result.dialogue_text()
    assert tariff.reservations() == [(result.uniqueid,)]
    assert tariff.cdr(result.uniqueid)["state"] == "active"


def test_a_broken_config_refuses_the_call_cleanly(tariff):
    tariff.config.write_text("database: [oops\n")
    result = place_call(tariff, Scenario(answered_ms=1000))
    assert (result.returncode, result.stderr, result.dial_args) == (0, "", None)
    assert result.variables_set["ASTBILL_STATUS"] == "ERROR"
    assert len(result.verbose) == 1 and "not valid YAML" in result.verbose[0]


def test_agi_arguments_name_the_config_and_the_number(tariff):
    block = agi_env(agi_extension="9", agi_accountcode="1001", agi_arg_1="-c",
                    agi_arg_2=str(tariff.config), agi_arg_3="+4915123456")
    env = {k: v for k, v in os.environ.items() if k != "ASTBILL_CONFIG"}
    result = run_call([sys.executable, ASTBILL, "-c", str(tariff.config), "+4915123456"],
                      Scenario(answered_ms=10_500), block, env)
    assert result.dial_args.startswith("PJSIP/4915123456@trunk,"), result.dialogue_text()
    assert result.variables_set["ASTBILL_COST"] == "0.0220"  # 10.5 s is 11 s


def test_caller_id_names_no_account_unless_the_config_trusts_it(tariff):
    import yaml  # written by hand: write_config would refuse it before astbill.py does
    tariff.config.write_text(yaml.safe_dump(dict(tariff.settings, account_source="callerid")))
    result = place_call(tariff, Scenario(answered_ms=61_000), account="", agi_callerid="1001")
    assert result.variables_set["ASTBILL_STATUS"] == "ERROR", result.dialogue_text()
    assert not result.dial_args
    assert "account_source callerid lets callers choose who pays" in result.dialogue_text()
    tariff.write_config()  # the fixture's own config again, to read the database
    assert tariff.balance("1001") == Decimal("10.00")
    assert tariff.admin_ok("calls").splitlines()[1:] == []  # the header, no call


@pytest.mark.parametrize("source, scenario_vars, env, account", [
    ("callerid", {}, {"account": "", "agi_callerid": "1001"}, "1001"),
    ("variable:PREPAID_ACCOUNT", {"PREPAID_ACCOUNT": "1001"}, {"account": "9999"}, "1001"),
])
def test_the_paying_account_can_come_from_caller_id_or_a_variable(tariff, source, scenario_vars, env, account):
    tariff.write_config(account_source=source, trust_callerid=source == "callerid")
    result = place_call(tariff, Scenario(answered_ms=61_000, variables=scenario_vars), **env)
    assert result.variables_set["ASTBILL_STATUS"] == "OK", result.dialogue_text()
    assert tariff.cdr(result.uniqueid)["account"] == account
    assert tariff.balance(account) == Decimal("9.88")
