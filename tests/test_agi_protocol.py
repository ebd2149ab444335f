"""The AGI channel against the bytes a real Asterisk 20 sent, and the pyst2
pitfalls that made us speak the protocol directly."""
import io
import re
import signal
import sys
from decimal import Decimal

import pytest

from agipeer import Scenario, agi_env, run_call
from astbill.agi import AGIError, Channel, Hangup, parse_reply, quote
from conftest import ASTBILL
from recorded import dialogue, reply_to, sent_by_asterisk

DIAL = b'EXEC Dial "Local/1600@callee,30"\n'


def channel_from(recorded_bytes):
    ch = Channel(io.BytesIO(b"".join(recorded_bytes)), io.BytesIO())
    ch.read_env()
    return ch


def env_block(name):
    lines = sent_by_asterisk(name)
    return lines[:lines.index(b"\n") + 1]


def test_the_recorded_environment_is_read_whole():
    ch = channel_from(env_block("sip-limit_L_warning"))
    assert len(ch.env) == 20
    assert ch.env["agi_accountcode"] == ""  # empty value keeps its space
    assert ch.env["agi_callerid"] == "4930111222"
    assert ch.env["agi_uniqueid"] == "1795629364.94"


@pytest.mark.parametrize("name, expected", [
    ("local-answer_callee_hangup", -1), ("local-answer_callee_hangup_g", 0),
    ("local-busy", 0), ("local-caller_cancel", -1), ("local-caller_hangup", -1)])
def test_dial_result_minus_one_is_a_result_not_an_error(name, expected):
    command = next(d for direction, d in dialogue(name)
                   if direction == "AGI<" and d.startswith(b"EXEC Dial"))
    ch = channel_from(env_block(name) + [reply_to(name, command)])
    assert ch.exec("Dial", "x") == expected


def test_replies_as_recorded():
    name = "local-caller_hangup"
    assert parse_reply(reply_to(name, b"GET VARIABLE DIALSTATUS\n").decode().strip()).data == "ANSWER"
    assert parse_reply("200 result=0").data is None                     # never set
    assert parse_reply("200 result=1 ()").data == ""                    # set, empty
    assert parse_reply("200 result=1 (ANSWER|4|4|4)").data == "ANSWER|4|4|4"
    dead = parse_reply(reply_to(name, b"CHANNEL STATUS\n").decode().strip())
    assert dead.code == 511


def test_unset_and_empty_are_told_apart():
    ch = channel_from(env_block("local-busy") + [b"200 result=0\n", b"200 result=1 ()\n"])
    assert ch.get("NO_SUCH_VARIABLE") is None
    assert ch.get("ANSWEREDTIME") == ""


def test_a_closed_pipe_is_a_hangup_and_junk_is_an_error():
    ch = channel_from(env_block("local-busy"))
    with pytest.raises(Hangup):
        ch.get("DIALSTATUS")
    with pytest.raises(AGIError):
        channel_from(env_block("local-busy") + [b"hello\n"]).get("X")
    with pytest.raises(AGIError):
        Channel(io.BytesIO(b"agi_request: x\n" + b"a" * 10000 + b"\n"), io.BytesIO()).read_env()
    # Not UTF-8 (a caller's Latin-1 name): read, never a reason to fail.
    assert Channel(io.BytesIO(b"agi_request: \xff\xfe\n\n"), io.BytesIO()).read_env() == {
        "agi_request": "\ufffd\ufffd"}
    with pytest.raises(Hangup):
        Channel(io.BytesIO(b"agi_request: x\n"), io.BytesIO()).read_env()


def test_arguments_are_quoted_as_res_agi_unquotes_them():
    assert quote('say "hi" \\ now') == '"say \\"hi\\" \\\\ now"'


# -- pyst2 0.5.1 as it is: why it is not on the per-call path -----------------

pyst2 = pytest.importorskip("asterisk.agi")


def pyst2_agi(name, replies):
    text = b"".join(env_block(name) + replies).decode()
    return pyst2.AGI(stdin=io.StringIO(text), stdout=io.StringIO(), stderr=io.StringIO())


def test_pyst2_raises_on_every_answered_call():
    agi = pyst2_agi("local-answer_callee_hangup", [b"200 result=-1\n"])
    with pytest.raises(pyst2.AGIAppError):
        agi.appexec("Dial", "Local/13@callee,30")


def test_pyst2_refuses_every_command_after_sighup():
    agi = pyst2_agi("local-caller_hangup", [b"200 result=1 (ANSWER)\n"])
    agi._handle_sighup(signal.SIGHUP, None)
    with pytest.raises(pyst2.AGISIGHUPHangup):
        agi.get_variable("DIALSTATUS")  # Asterisk would have answered ANSWER


def test_pyst2_cannot_tell_unset_from_empty_and_fails_on_511():
    agi = pyst2_agi("local-busy", [b"200 result=0\n", b"200 result=1 ()\n",
                                   b"511 Command Not Permitted on a dead channel or intercept routine\n"])
    assert agi.get_variable("NO_SUCH_VARIABLE") == agi.get_variable("ANSWEREDTIME") == ""
    with pytest.raises(pyst2.AGIUnknownError):
        agi.channel_status()


def test_pyst2_writes_debug_lines_to_asterisks_console():
    err = io.StringIO()
    text = b"".join(env_block("local-busy")).decode()
    pyst2.AGI(stdin=io.StringIO(text), stdout=io.StringIO(), stderr=err)
    assert "ENV LINE" in err.getvalue()


def test_a_fastagi_hangup_line_is_noted_and_the_reply_still_read():
    ch = channel_from(env_block("local-caller_hangup") + [b"HANGUP\n", b"200 result=1 (ANSWER)\n"])
    assert ch.get("DIALSTATUS") == "ANSWER"
    assert ch.hungup


# -- the environment block: one caller-set value cannot add or change a key --------

def read_block(lines):
    from astbill.agi import Channel
    channel = Channel(io.BytesIO("".join(f"{line}\n" for line in lines).encode() + b"\n"),
                      io.BytesIO())
    return channel.read_env()


@pytest.mark.parametrize("injected, why", [
    # agi_calleridname: "x\nagi_arg_1: -c\nagi_arg_2: /tmp/evil.yaml" -- another config, and database
    (["agi_arg_1: -c", "agi_arg_2: /tmp/evil.yaml"], "'agi_callingpres' out of order"),
    (["agi_accountcode: victim"], "'agi_callingpres' out of order"),
    (["agi_extension: 4990000"], "'agi_callingpres' out of order"),
    (["agi_uniqueid: 1.1"], "repeats 'agi_uniqueid'"),
    (["agi_callingpres: 0"], "repeats 'agi_callingpres'"),
    (["agi_network: yes"], "'agi_network' out of order"),
])
def test_a_newline_in_the_caller_id_name_cannot_smuggle_a_key_in(injected, why):
    from astbill.agi import BadEnvironment
    lines = [f"{key}: {value}" for key, value in agi_env(agi_accountcode="1001").items()]
    at = next(i for i, line in enumerate(lines) if line.startswith("agi_calleridname:")) + 1
    with pytest.raises(BadEnvironment, match=f"^AGI environment (has )?{re.escape(why)}"):
        read_block(lines[:at] + injected + lines[at:])


def test_arguments_come_last_and_in_order_and_fastagi_keys_first():
    from astbill.agi import BadEnvironment
    lines = [f"{key}: {value}" for key, value in agi_env().items()]
    network = ["agi_network: yes", "agi_network_script: astbill/prepaid"]
    env = read_block(network + lines + ["agi_arg_1: -c", "agi_arg_2: /etc/astbill/a.yaml"])
    assert (env["agi_network_script"], env["agi_arg_2"]) == ("astbill/prepaid", "/etc/astbill/a.yaml")
    with pytest.raises(BadEnvironment, match="'agi_arg_3' out of order"):
        read_block(lines + ["agi_arg_1: x", "agi_arg_3: y"])
    with pytest.raises(BadEnvironment, match="'agi_threadid' out of order"):
        read_block(lines[:-1] + ["agi_arg_1: x", lines[-1]])


def test_a_smuggled_key_refuses_the_call_and_the_real_process_says_why(tariff):
    block = agi_env(agi_extension="4912345678", agi_accountcode="1001",
                    agi_calleridname="x\nagi_arg_1: -c\nagi_arg_2: /nonexistent.yaml")
    result = run_call([sys.executable, ASTBILL], Scenario(answered_ms=61_000), block, tariff.env, 30)
    assert result.variables_set["ASTBILL_STATUS"] == "ERROR", result.dialogue_text()
    assert not result.dial_args
    assert result.verbose == ["astbill: ERROR AGI environment has 'agi_callingpres' out of order"]
    assert tariff.balance("1001") == Decimal("10") and tariff.reservations() == []
