"""Everything that comes from outside, malformed on purpose: each gets a clear
one-line refusal and changes no row.  Property-based where it pays."""
import io
import itertools
import json
import os
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from astbill.config import ConfigError, check
from astbill.ledger import CallRecord
from astbill.main import main
from astbill.rating import MAX_DIGITS
from astbill.rating.decks import RatesError, parse_rates

ENV_ORDER = ["agi_request", "agi_channel", "agi_language", "agi_type", "agi_uniqueid",
             "agi_version", "agi_callerid", "agi_calleridname", "agi_callingpres",
             "agi_callingani2", "agi_callington", "agi_callingtns", "agi_dnid", "agi_rdnis",
             "agi_context", "agi_extension", "agi_priority", "agi_enhanced",
             "agi_accountcode", "agi_threadid"]
# Asterisk's replies to a whole answered call, in the order astbill.py asks.
CALL_REPLIES = [b"200 result=1 (Ring|0.000000|x)\n", b"200 result=1\n", b"200 result=1\n",
                b"200 result=-1\n", b"200 result=1 (ANSWER|61000|61|61.000000|SIP/t-1)\n",
                b"200 result=1\n", b"200 result=1\n"]
KNOWN_COMMANDS = (b"GET FULL VARIABLE ", b"SET VARIABLE ", b"VERBOSE ", b"EXEC Dial ")
_ids = itertools.count(1)
quiet = settings(max_examples=60, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


def run_in_process(billing, stdin):
    """astbill.py's main on this stdin: (exit status, lines written to Asterisk)."""
    out = io.BytesIO()
    os.environ["ASTBILL_CONFIG"] = str(billing.config)
    try:
        status = main([], io.BytesIO(stdin), out)
    finally:
        del os.environ["ASTBILL_CONFIG"]
    return status, out.getvalue().splitlines()


def env_bytes(**values):
    env = {"agi_request": "astbill.py", "agi_channel": "SIP/x-1", "agi_uniqueid": f"1.{next(_ids)}",
           "agi_callerid": "4930111222", "agi_extension": "4912345678", "agi_accountcode": "1001"}
    env.update(values)
    return "".join(f"{key}: {env.get(key, '')}\n" for key in ENV_ORDER).encode() + b"\n"


def books(billing):
    return (billing.query("SELECT account, balance FROM astaccount ORDER BY account"),
            billing.query("SELECT COUNT(*) FROM astcdr"), billing.query("SELECT COUNT(*) FROM astledger"))


text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"), max_size=120)
hostile = st.one_of(text, st.sampled_from([
    "", "*#", "1" * 100, "+", "00", "'; DROP TABLE astaccount; --", '1001" OR "1"="1',
    "1001\x00", "١٢٣", "49 30 123", "4930123456#", "\\", "${DIALSTATUS}", "1001|x"]))


@quiet
@given(extension=hostile, account=hostile, callerid=hostile, name=hostile)
def test_hostile_channel_values_are_refused_or_billed_exactly(tariff, extension, account, callerid, name):
    before = books(tariff)
    stdin = env_bytes(agi_extension=extension, agi_accountcode=account, agi_callerid=callerid,
                      agi_calleridname=name) + b"".join(CALL_REPLIES)
    status, lines = run_in_process(tariff, stdin)
    assert status == 0
    assert all(line.startswith(KNOWN_COMMANDS) for line in lines), lines
    assert sum(line.startswith(b"VERBOSE") for line in lines) <= 1
    if any(line.startswith(b"EXEC Dial") for line in lines):
        assert account == "1001" and books(tariff)[1][0][0] == before[1][0][0] + 1
    else:
        assert books(tariff) == before


@quiet
@given(st.binary(max_size=400))
def test_junk_on_stdin_changes_nothing(tariff, junk):
    before = books(tariff)
    status, lines = run_in_process(tariff, junk)
    assert status == 0
    assert books(tariff) == before


@pytest.mark.parametrize("stdin", [
    b"",                                              # early EOF
    b"agi_request: astbill.py\n",                     # EOF inside the env block
    b"agi_request: astbill.py\nnot an env line\n\n",  # junk line
    b"agi_request: " + b"x" * 100_000 + b"\n\n",      # huge line
    b"agi_request: \xff\xfe\xfd\n\n",                 # not UTF-8
], ids=["eof", "eof-in-env", "junk", "huge", "binary"])
def test_malformed_agi_environments(tariff, stdin):
    before = books(tariff)
    assert run_in_process(tariff, stdin)[0] == 0
    assert books(tariff) == before


def test_junk_replies_from_asterisk_leave_the_call_for_the_sweeper(tariff):
    stdin = env_bytes() + b"".join(CALL_REPLIES[:4]) + b"garbage\n"
    status, lines = run_in_process(tariff, stdin)
    assert status == 0 and lines[-1].startswith(b"VERBOSE \"astbill: ")
    assert len(tariff.reservations()) == 1  # neither free nor double-charged: the sweep decides


config_values = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), text,
                          st.lists(st.integers(), max_size=2), st.dictionaries(text, text, max_size=2))
config_keys = st.sampled_from(["database", "dial", "max_call_secs", "ring_timeout", "decimals",
                               "account_source", "on_db_error", "tariffs", "warning_secs",
                               "sweep_policy", "asterisk_cdr_table", "dial_options", "bogus"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(config_keys, config_values, max_size=6))
def test_any_config_is_accepted_whole_or_refused_in_one_line(raw):
    try:
        settings_ = check(dict({"database": "sqlite:///x.db", "dial": "SIP/{number}"}, **raw))
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc)
    else:
        assert 0 <= settings_["decimals"] <= 6 and settings_["max_call_secs"] >= 1
        assert settings_["database"].startswith(("sqlite://", "mysql://"))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.one_of(text, st.sampled_from(["49", "0.01", "-1", "60", "0", "1e3", "nan"])),
                         min_size=0, max_size=8), max_size=6))
def test_any_rates_csv_is_imported_whole_or_refused_by_line(rows):
    import csv
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["prefix", "destination", "rate", "connect_fee", "min_secs", "increment"])
    writer.writerows(rows)
    try:
        rates = parse_rates(io.StringIO(buf.getvalue()), "t")
    except RatesError as exc:
        assert exc.errors and all("\n" not in e for e in exc.errors)
    else:
        for r in (row.rate for row in rates):
            assert r.prefix.isdigit() and len(r.prefix) <= MAX_DIGITS
            assert r.per_min >= 0 and r.connect_fee >= 0 and r.increment >= 1


def test_a_pipe_closed_before_the_dial_releases_the_reservation(tariff):
    # Asterisk answers the first SET VARIABLE, then the caller is gone.
    stdin = env_bytes() + b"".join(CALL_REPLIES[:2])
    status, lines = run_in_process(tariff, stdin)
    assert status == 0 and not any(line.startswith(b"EXEC Dial") for line in lines)
    assert tariff.reservations() == []
    (uniqueid,), = tariff.query("SELECT uniqueid FROM astcdr")
    cdr = tariff.cdr(uniqueid)
    assert (cdr["state"], cdr["cost"], cdr["disposition"]) == ("settled", 0, "NO ANSWER")
    assert tariff.balance("1001") == 10


def test_a_spool_record_that_cannot_be_replayed_is_set_aside(tariff):
    record = {name: kind() for name, kind in CallRecord.FIELDS.items()}
    record.update(uniqueid="1.2", account="1001", dialstatus="ANSWER", talk_ms=5000, ended=1)
    tariff.spool.mkdir(exist_ok=True)
    (tariff.spool / "1.1.call").write_text("{not json")
    (tariff.spool / "1.2.call").write_text(json.dumps(record))   # no such call
    proc = tariff.admin_process("sweep", "--json")
    assert json.loads(proc.stdout)["set_aside"] == 2, proc.stderr
    assert sorted(p.name for p in tariff.spool.glob("*.bad")) == ["1.1.call.bad", "1.2.call.bad"]
    assert json.loads(tariff.admin_process("sweep", "--json").stdout)["set_aside"] == 0
    status, out, _ = tariff.admin("audit")
    assert status == 1
    assert f"call 1.2: spooled record set aside as unusable: {tariff.spool}/1.2.call.bad" \
           " (no call '1.2')" in out


@pytest.mark.parametrize("change", [
    {"talk_ms": 5000.0}, {"talk_ms": True}, {"talk_ms": -1}, {"talk_ms": "5000"},
    {"account": "", "late": True}, {"uniqueid": "1.3; DROP TABLE astcdr"}, {"cost": "1.00"}, {"late": 1},
    {"dial": "x" * 5000},
], ids=lambda c: next(iter(c)) + "=" + repr(next(iter(c.values())))[:12])
def test_a_spool_record_is_checked_like_any_input(change):
    record = {name: kind() for name, kind in CallRecord.FIELDS.items()}
    record.update(uniqueid="1.3", account="1001", dialstatus="ANSWER", talk_ms=5000, ended=1)
    assert CallRecord.from_dict(dict(record)).talk_ms == 5000
    record.update(change)
    with pytest.raises(ValueError):
        CallRecord.from_dict(record)


@pytest.mark.parametrize("after_dial, cost", [
    (b"200 result=1 (|61000|61|61.000000|SIP/t-1)\n", "0.1200"),  # Dial's answered time: billed
    (b"200 result=1 (||||)\n", "0.0000"),                         # nothing at all: not answered
    (b"200 result=1 (||| 7.500000|)\n", "0.0000"),                # only the channel's CDR time
], ids=["answered-time", "nothing", "cdr-only"])
def test_a_missing_dialstatus_is_answered_only_by_dials_own_time(tariff, after_dial, cost):
    replies = CALL_REPLIES[:4] + [after_dial] + CALL_REPLIES[5:]
    status, lines = run_in_process(tariff, env_bytes() + b"".join(replies))
    assert status == 0
    assert lines[-2] == f'SET VARIABLE ASTBILL_COST "{cost}"'.encode()


def test_a_caller_id_name_that_is_not_utf8_is_billed_as_any_call(tariff):
    # Asterisk passes the caller's bytes through: Latin-1 from ISDN or an old PBX.
    stdin = env_bytes(agi_calleridname="NAME").replace(b"NAME", b"M\xfcller")
    status, lines = run_in_process(tariff, stdin + b"".join(CALL_REPLIES))
    assert status == 0 and any(line.startswith(b"EXEC Dial ") for line in lines), lines
    assert tariff.balance("1001") == Decimal("9.88")
    (clid,), = tariff.query("SELECT clid FROM astcdr")
    assert clid == '"M\ufffdller" <4930111222>'
