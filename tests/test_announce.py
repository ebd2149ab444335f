"""What the caller hears: the balance and minutes before the Dial, the L()
warning's sound, and a hangup cause (and prompt) for every refusal -- the
real astbill.py against the Asterisk 20 peer, on SQLite and MariaDB."""
import json
import os
import re
import threading
from decimal import Decimal
from pathlib import Path

import pytest

from agipeer import Scenario
from astbill.agi import announcement
from astbill.config import ConfigError, check
from conftest import ROOT, place_call, start_held_call
from test_failures import unreachable

BALANCE = ['EXEC Playback "vm-youhave,noanswer"', "GET VARIABLE PLAYBACKSTATUS",
           'EXEC SayNumber "12"', 'EXEC Playback "digits/dollars,noanswer"',
           'EXEC Playback "vm-and,noanswer"', 'EXEC SayNumber "34"', 'EXEC Playback "cents,noanswer"']
MINUTES = ['EXEC Playback "vm-youhave,noanswer"', "GET VARIABLE PLAYBACKSTATUS",
           'EXEC SayNumber "60"', 'EXEC Playback "minutes,noanswer"']
# A ringing caller hears it as early media; an answered one's time up is read after.
RINGING, ANSWERED = ['EXEC Progress ""'], ['GET FULL VARIABLE "${CDR(billsec,f)}"']


def around(pieces, pre_answered=False):
    return pieces + ANSWERED if pre_answered else RINGING + pieces


def commands_before_dial(result):
    """What astbill.py asked of Asterisk between its status and the Dial
    (its log lines are ``result.verbose``)."""
    commands = result.commands
    start = next(i for i, c in enumerate(commands) if c.startswith("SET VARIABLE ASTBILL_MAXSECS")) + 1
    dial = next(i for i, c in enumerate(commands) if c.startswith("EXEC Dial"))
    return [c for c in commands[start:dial] if not c.startswith("VERBOSE")]


@pytest.fixture
def rich(tariff):
    """Account 1001 holding 12.34: 60 minutes to Germany at 0.06 (the cap)."""
    tariff.admin_ok("topup", "1001", "2.34")
    return tariff


def billed(tariff, result):
    cdr = tariff.cdr(result.uniqueid)
    return (result.variables_set.get("ASTBILL_BILLSEC"), result.variables_set.get("ASTBILL_COST"),
            cdr["billsec"], cdr["cost"], cdr["state"], tariff.reservations())


@pytest.mark.parametrize("mode, said", [
    ("balance", BALANCE), ("minutes", MINUTES),
    ("both", BALANCE + [c for c in MINUTES if c != "GET VARIABLE PLAYBACKSTATUS"])])
@pytest.mark.parametrize("pre_answered_ms", [0, 2500])
def test_the_announcement_is_said_before_the_dial_and_never_billed(rich, mode, said,
                                                                   pre_answered_ms):
    # 61.5 s of talk at 0.06/min on 60/60 is two minutes, whatever the
    # caller heard before: each prompt here takes 1.5 s of Asterisk's time.
    rich.write_config(announce=mode)
    result = place_call(rich, Scenario(answered_ms=61_500, pre_answered_ms=pre_answered_ms,
                                       sound_ms=1500))
    assert result.returncode == 0, result.dialogue_text()
    assert commands_before_dial(result) == around(said, pre_answered_ms), result.dialogue_text()
    assert "ANSWER" not in result.commands
    assert result.verbose == [], result.dialogue_text()
    assert result.dial_args == "PJSIP/4912345678@trunk,60,L(3600000)"
    assert billed(rich, result) == ("62", "0.1200", 62, Decimal("0.12"), "settled", [])
    assert rich.balance("1001") == Decimal("12.22")


def test_a_ringing_caller_stays_unanswered_so_the_callees_ringing_is_not_billed(rich):
    # Answered to hear its balance, the caller's ANSWEREDTIME would count
    # the callee's 30 s of ringing as talk.
    rich.write_config(announce="both")
    result = place_call(rich, Scenario(answered_ms=61_500, ring_ms=30_000, sound_ms=1500))
    assert billed(rich, result) == ("62", "0.1200", 62, Decimal("0.12"), "settled", [])
    busy = place_call(rich, Scenario(dialstatus="BUSY", ring_ms=5_000, sound_ms=1500))
    assert commands_before_dial(busy)[0] == 'EXEC Progress ""'
    assert "ANSWER" not in busy.commands
    assert billed(rich, busy) == ("0", "0.0000", 0, Decimal("0"), "settled", [])
    assert rich.cdr(busy.uniqueid)["disposition"] == "BUSY"


def test_without_an_announcement_the_dialogue_is_as_before(rich):
    result = place_call(rich, Scenario(answered_ms=61_500))
    assert commands_before_dial(result) == []
    assert billed(rich, result) == ("62", "0.1200", 62, Decimal("0.12"), "settled", [])


def test_the_channel_variable_chooses_the_announcement_for_one_call(rich):
    result = place_call(rich, Scenario(answered_ms=1000, variables={"ASTBILL_ANNOUNCE": "Minutes"}))
    assert commands_before_dial(result) == around(MINUTES)
    rich.write_config(announce="minutes")
    result = place_call(rich, Scenario(answered_ms=1000, variables={"ASTBILL_ANNOUNCE": "none"}))
    assert commands_before_dial(result) == []


def test_a_channel_variable_that_is_no_mode_is_logged_and_the_config_holds(rich):
    rich.write_config(announce="minutes")
    result = place_call(rich, Scenario(answered_ms=1000, variables={"ASTBILL_ANNOUNCE": "loud"}))
    assert commands_before_dial(result) == around(MINUTES)
    assert result.verbose == [f"astbill: {result.uniqueid} ASTBILL_ANNOUNCE 'loud' is not one"
                              " of none, balance, minutes, both: announcing minutes"]
    assert rich.reservations() == []


def test_a_bar_in_the_channel_variable_cannot_move_the_account(rich):
    # The account comes from a channel variable, read in the same round trip.
    rich.write_config(account_source="variable:ACCT", announce="minutes")
    result = place_call(rich, Scenario(answered_ms=61_500, variables={
        "ASTBILL_ANNOUNCE": "none|2002", "ACCT": "1001"}), account="")
    assert result.variables_set["ASTBILL_STATUS"] == "OK", result.dialogue_text()
    assert (commands_before_dial(result), result.verbose) == ([], [])  # "none", filtered
    assert billed(rich, result) == ("62", "0.1200", 62, Decimal("0.12"), "settled", [])
    assert rich.balance("1001") == Decimal("12.22")


def test_with_no_sound_files_the_call_goes_on_and_the_log_says_why(rich):
    rich.write_config(announce="both")
    result = place_call(rich, Scenario(answered_ms=61_500, missing_sounds=("*",), sound_ms=700),
                        agi_language="xx")
    assert commands_before_dial(result) == RINGING + ['EXEC Playback "vm-youhave,noanswer"',
                                                      "GET VARIABLE PLAYBACKSTATUS"]
    assert result.verbose == [f"astbill: {result.uniqueid} no sound file 'vm-youhave' in"
                              " language 'xx': nothing announced"]
    assert billed(rich, result) == ("62", "0.1200", 62, Decimal("0.12"), "settled", [])


def test_a_missing_currency_word_is_skipped_by_asterisk_and_the_call_goes_on(rich):
    # Debian's core sounds have no "cents": Playback warns and goes on.
    rich.write_config(announce="balance")
    result = place_call(rich, Scenario(answered_ms=61_500, missing_sounds=("cents",),
                                       sound_ms=900))
    assert commands_before_dial(result) == around(BALANCE)
    assert result.verbose == []
    assert billed(rich, result) == ("62", "0.1200", 62, Decimal("0.12"), "settled", [])


@pytest.mark.parametrize("agisighup", [True, False], ids=["sighup", "agisighup-no"])
def test_a_caller_who_hangs_up_during_the_announcement_is_not_dialled_and_pays_nothing(
        rich, agisighup):
    # With AGISIGHUP=no, only Playback's -1 says the caller is gone.
    rich.write_config(announce="both")
    result = place_call(rich, Scenario(answered_ms=61_500, hangup_at_sound=3, sound_ms=800,
                                       agisighup=agisighup))
    assert result.returncode == 0, result.dialogue_text()
    assert result.dial_args is None
    assert f"astbill: {result.uniqueid} the caller hung up during the announcement" in result.verbose
    assert rich.balance("1001") == Decimal("12.34")
    assert rich.reservations() == []
    assert rich.cdr(result.uniqueid)["cost"] == 0


def test_an_announcement_application_that_is_not_loaded_is_logged_and_the_call_goes_on(rich):
    rich.write_config(announce="minutes")
    result = place_call(rich, Scenario(answered_ms=61_500, unloaded_apps=("saynumber",)))
    assert commands_before_dial(result) == RINGING + MINUTES[:3]
    assert result.verbose == [f"astbill: {result.uniqueid} SayNumber is not loaded in Asterisk:"
                              " nothing more announced"]
    assert billed(rich, result) == ("62", "0.1200", 62, Decimal("0.12"), "settled", [])


def test_a_balance_too_large_to_say_is_logged_and_the_minutes_are_still_said(rich):
    tariff = rich
    tariff.admin_ok("topup", "1001", "2000000000")
    tariff.write_config(announce="both")
    result = place_call(tariff, Scenario(answered_ms=61_500, sound_ms=500))
    assert commands_before_dial(result) == around(MINUTES)
    assert result.verbose == [f"astbill: {result.uniqueid} balance 2000000012.34 cannot be"
                              " said: not announced"]
    assert billed(tariff, result) == ("62", "0.1200", 62, Decimal("0.12"), "settled", [])


def test_a_call_let_through_an_outage_hears_its_minutes_but_no_balance(tariff):
    # The balance cannot be read while the database is down; the call is
    # billed afterwards for its talk time alone.
    good = tariff.settings["database"]
    tariff.write_config(database=unreachable(tariff), on_db_error="allow",
                        db_error_allow_secs=120, announce="both")
    result = place_call(tariff, Scenario(answered_ms=61_000, sound_ms=2000))
    assert commands_before_dial(result) == RINGING + [
        'EXEC Playback "vm-youhave,noanswer"', "GET VARIABLE PLAYBACKSTATUS", 'EXEC SayNumber "2"',
        'EXEC Playback "minutes,noanswer"']
    assert f"astbill: {result.uniqueid} balance unknown: not announced" in result.verbose
    tariff.write_config(database=good)
    assert json.loads(tariff.admin_process("sweep", "--json").stdout)["replayed"] == 1
    cdr = tariff.cdr(result.uniqueid)
    assert (cdr["state"], cdr["billsec"], cdr["cost"]) == ("late", 61, Decimal("0.12"))
    assert tariff.balance("1001") == Decimal("9.88")


def test_a_postpaid_account_below_zero_hears_what_it_may_still_spend(tariff):
    tariff.admin_ok("account", "add", "post", "--balance", "0", "--credit-limit", "8")
    place_call(tariff, Scenario(answered_ms=2_750_000), number="4915123456", account="post")
    assert tariff.balance("post") == Decimal("-5.5")
    tariff.write_config(announce="balance")
    result = place_call(tariff, Scenario(answered_ms=1000), account="post")
    assert commands_before_dial(result) == RINGING + [
        'EXEC Playback "vm-youhave,noanswer"', "GET VARIABLE PLAYBACKSTATUS",
        'EXEC SayNumber "2"', 'EXEC Playback "digits/dollars,noanswer"',
        'EXEC Playback "vm-and,noanswer"', 'EXEC SayNumber "50"', 'EXEC Playback "cents,noanswer"']


@pytest.mark.parametrize("available, max_secs, pieces, problems", [
    (Decimal("0.004"), 60, [("Playback", "vm-youhave"), ("SayNumber", "0"),
                            ("Playback", "digits/dollars")], []),
    (Decimal("0.999999"), 60, [("Playback", "vm-youhave"), ("SayNumber", "99"),
                               ("Playback", "cents")], []),
    (Decimal("7.01"), 59, [("Playback", "vm-youhave"), ("SayNumber", "7"),
                           ("Playback", "digits/dollars"), ("Playback", "vm-and"),
                           ("SayNumber", "1"), ("Playback", "cents")], []),
    (Decimal("-0.01"), 60, [], ["balance -0.01 cannot be said: not announced"]),
    (Decimal("1000000000"), 60, [], ["balance 1000000000.00 cannot be said: not announced"]),
    (None, 60, [], ["balance unknown: not announced"]),
])
def test_the_balance_is_rounded_down_and_what_cannot_be_said_is_not(available, max_secs,
                                                                    pieces, problems):
    assert announcement("balance", available, max_secs, "digits/dollars", "cents") == (
        pieces, problems)


@pytest.mark.parametrize("max_secs, pieces, problems", [
    (0, [], ["no time granted: minutes not announced"]),
    (1, [("Playback", "vm-youhave"), ("SayNumber", "1"), ("Playback", "second")], []),
    (59, [("Playback", "vm-youhave"), ("SayNumber", "59"), ("Playback", "seconds")], []),
    (119, [("Playback", "vm-youhave"), ("SayNumber", "1"), ("Playback", "minute")], []),
    (3600, [("Playback", "vm-youhave"), ("SayNumber", "60"), ("Playback", "minutes")], []),
])
def test_the_minutes_are_whole_minutes_or_the_seconds_of_a_short_grant(max_secs, pieces,
                                                                        problems):
    assert announcement("minutes", Decimal(1), max_secs, "digits/dollars", "cents") == (
        pieces, problems)


def test_a_currency_without_hundredths_is_said_in_whole_units(tariff):
    assert announcement("balance", Decimal("12.99"), 60, "", "") == (
        [("Playback", "vm-youhave"), ("SayNumber", "12")], [])


def test_the_limit_warning_plays_asterisks_time_left_or_the_configured_sound(tariff):
    tariff.write_config(warning_secs=30)
    result = place_call(tariff, Scenario(answered_ms=1000))
    assert result.variables_set["LIMIT_WARNING_FILE"] == "timeleft"
    assert result.dial_args == "PJSIP/4912345678@trunk,60,L(3600000:30000)"
    assert result.commands.index('SET VARIABLE LIMIT_WARNING_FILE "timeleft"') < next(
        i for i, c in enumerate(result.commands) if c.startswith("EXEC Dial"))
    tariff.write_config(warning_sound="custom/credit-low")
    result = place_call(tariff, Scenario(answered_ms=1000))
    assert result.variables_set["LIMIT_WARNING_FILE"] == "custom/credit-low"
    tariff.write_config(warning_secs=0)
    assert "LIMIT_WARNING_FILE" not in place_call(tariff, Scenario(answered_ms=1000)).variables_set


@pytest.mark.parametrize("setting, value, message", [
    ("warning_sound", "beep&tt-monkeys", "warning_sound must be a sound file name"),
    ("warning_sound", "", "warning_sound must be a sound file name"),
    ("currency_unit", "digits/dollars,x", "currency_unit must be a sound file name"),
    ("currency_cents", "cents here", "currency_cents must be a sound file name"),
    ("announce", "loud", "announce must be one of none, balance, minutes, both"),
    ("refusal_prompts", {"BROKE": "x"}, "refusal_prompts may name NOFUNDS, NOACCOUNT, NORATE,"
                                        " NOROUTE, MAXCALLS, INVALID, ERROR, not 'BROKE'"),
    ("refusal_prompts", {"NOFUNDS": 3}, "refusal_prompts.NOFUNDS must be a string"),
    ("refusal_prompts", {"NOFUNDS": "a|b"}, "refusal_prompts.NOFUNDS must be a sound file name"),
])
def test_bad_sound_settings_are_refused_in_one_line(setting, value, message):
    with pytest.raises(ConfigError) as exc:
        check({"database": "sqlite:///x.db", "dial": "PJSIP/{number}@t", setting: value}, "c.yaml")
    assert str(exc.value).startswith(f"c.yaml: {message}")
    assert "\n" not in str(exc.value)


PROMPTS = {"NOFUNDS": "custom/no-credit", "NORATE": "ss-noservice", "NOROUTE": "all-circuits-busy-now",
           "MAXCALLS": "all-circuits-busy-now", "INVALID": "cannot-complete-as-dialed",
           "ERROR": "pbx-invalid"}


@pytest.mark.parametrize("setup, env, status, cause", [
    ("poor", {"account": "poor"}, "NOFUNDS", "21"),
    (None, {"account": "9999"}, "NOACCOUNT", "21"),
    (None, {"number": "7123456"}, "NORATE", "1"),
    (None, {"number": "12ab"}, "INVALID", "28"),
    ("capped", {"account": "capped"}, "MAXCALLS", "17"),
    ("noroute", {}, "NOROUTE", "34"),
    ("again", {"agi_uniqueid": "1796000000.77"}, "ERROR", "38"),
])
def test_every_refusal_has_a_hangup_cause_and_its_prompt(tariff, setup, env, status, cause):
    tariff.write_config(refusal_prompts=PROMPTS)
    held = None
    if setup == "poor":
        tariff.admin_ok("account", "add", "poor", "--balance", "0.0599")
    elif setup == "capped":
        tariff.admin_ok("account", "add", "capped", "--balance", "5", "--max-calls", "1")
        gate = threading.Event()
        held = start_held_call(tariff, gate, account="capped")
        assert held.dial_reached.wait(20)
    elif setup == "again":
        assert place_call(tariff, Scenario(answered_ms=1000), **env).returncode == 0
    elif setup == "noroute":
        tariff.admin_ok("trunk", "add", "far", "--dial", "PJSIP/{number}@far")
        path = tariff.path / "far.csv"
        path.write_text("prefix,destination,rate,connect_fee,min_secs,increment\n"
                        "1,USA,0.0050,0,60,60\n")
        tariff.admin_ok("rate", "import", str(path), "--trunk", "far")
    cdrs, reserved = tariff.query("SELECT COUNT(*) FROM astcdr"), tariff.reservations()
    result = place_call(tariff, Scenario(answered_ms=1000), **env)
    assert result.returncode == 0, result.dialogue_text()
    assert result.variables_set["ASTBILL_STATUS"] == status, result.dialogue_text()
    assert result.variables_set["ASTBILL_CAUSE"] == cause
    assert result.variables_set["ASTBILL_PROMPT"] == PROMPTS.get(status, "")
    assert result.dial_args is None
    assert (tariff.query("SELECT COUNT(*) FROM astcdr"), tariff.reservations()) == (cdrs, reserved)
    if held is not None:
        gate.set()
        assert held.wait().returncode == 0
        assert tariff.reservations() == []


def test_a_refusal_without_a_prompt_sets_an_empty_one(tariff):
    result = place_call(tariff, Scenario(answered_ms=1000), number="7123456")
    assert (result.variables_set["ASTBILL_STATUS"], result.variables_set["ASTBILL_CAUSE"],
            result.variables_set["ASTBILL_PROMPT"]) == ("NORATE", "1", "")


def test_an_environment_that_cannot_be_trusted_is_an_error_with_its_cause(tariff):
    # A forged line in the environment block (a newline in a value): no
    # config named by it is read, so no prompt either.
    tariff.write_config(refusal_prompts=PROMPTS)
    result = place_call(tariff, Scenario(answered_ms=1000), agi_priority="1\nagi_context: forged")
    assert (result.variables_set["ASTBILL_STATUS"], result.variables_set["ASTBILL_CAUSE"],
            result.variables_set["ASTBILL_PROMPT"]) == ("ERROR", "38", "")
    assert result.dial_args is None
    assert tariff.query("SELECT COUNT(*) FROM astcdr") == [(0,)]


def test_the_prompts_astbill_names_are_in_debians_core_sounds():
    # What INSTALL installs (asterisk-core-sounds-en): every prompt an
    # announcement or the sample config names is there, but "cents", which
    # INSTALL says is in Asterisk's extra sounds only.
    sounds = Path("/usr/share/asterisk/sounds/en")
    if not sounds.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail("asterisk-core-sounds-en is not installed (scripts/setup-env installs it)")
        pytest.skip("asterisk-core-sounds-en is not installed")
    import yaml
    sample = yaml.safe_load((ROOT / "conf" / "astbill.yaml").read_text())
    named = {arg for _, arg in announcement("both", Decimal("12.34"), 3600, sample["currency_unit"],
                                            sample["currency_cents"])[0]
             if not arg.isdigit()}
    named |= {arg for mode, max_secs in (("minutes", 60), ("minutes", 1), ("minutes", 59))
              for _, arg in announcement(mode, None, max_secs, "", "")[0] if not arg.isdigit()}
    named |= {prompt for prompt in sample["refusal_prompts"].values() if prompt}
    missing = sorted(name for name in named if not any(sounds.glob(name + ".*")))
    assert missing == ["cents"]
    assert sample["warning_sound"] == "timeleft"  # Asterisk's own: vm-youhave, queue-minutes
    assert all(any(sounds.glob(name + ".*")) for name in ("queue-minutes", "queue-seconds"))


def test_over_fastagi_the_announcement_is_the_same_and_a_hangup_line_ends_it(rich):
    from test_fastagi import Server
    rich.write_config(announce="both")
    server = Server(rich)
    try:
        result = server.call(Scenario(answered_ms=61_500, sound_ms=1500))
        assert commands_before_dial(result) == RINGING + BALANCE + [
            c for c in MINUTES if c != "GET VARIABLE PLAYBACKSTATUS"]
        assert billed(rich, result) == ("62", "0.1200", 62, Decimal("0.12"), "settled", [])
        # Asterisk writes HANGUP after the reply to the Playback the caller left in.
        gone = server.call(Scenario(answered_ms=61_500, hangup_at_sound=2, sound_ms=800))
        assert ("AST", "HANGUP") in gone.dialogue
        assert gone.dial_args is None
        assert (rich.balance("1001"), rich.reservations()) == (Decimal("12.22"), [])
        assert server.wait_for(rf"astbill: {re.escape(gone.uniqueid)} the caller hung up"
                               " during the announcement")
    finally:
        server.stop()
