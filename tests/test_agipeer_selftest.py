"""Self-test of tests/agipeer.py against a tiny AGI script written per test.

The expected reply lines are the ones the recorded Asterisk 20 transcripts
show; test_replays_recorded_transcript replays those recordings (tests/recorded)
command by command.
"""

import ast
import os
import re
import signal
import sys
import threading
import time

import pytest

from agipeer import AgiPeerTimeout, ENV_KEYS, Scenario, agi_env, parse_args, run_call, start_call

from recorded import TRANSCRIPTS

# Reads the env block (echoed to stderr as a bytes repr), then sends each
# argument as one command and reads its reply; "{prev}" in a command is the
# data of the previous reply.  Exits 2 on EOF or EPIPE.  TINY_SIGHUP=ignore
# ignores SIGHUP; otherwise SIGHUP has Python's default action: death.
TINY_AGI = r'''
import os, re, signal, sys

signal.signal(signal.SIGHUP,
              signal.SIG_IGN if os.environ.get("TINY_SIGHUP") == "ignore" else signal.SIG_DFL)
rfile = sys.stdin.buffer
env = b""
while not env.endswith(b"\n\n"):
    line = rfile.readline()
    if not line:
        sys.exit(2)
    env += line
sys.stderr.write(repr(env) + "\n")
prev = ""
for command in sys.argv[1:]:
    try:
        os.write(1, command.replace("{prev}", prev).encode() + b"\n")
    except BrokenPipeError:
        sys.exit(2)
    reply = rfile.readline()
    if not reply:
        sys.exit(2)
    data = re.search(rb"\((.*)\)", reply)
    prev = data.group(1).decode() if data else ""
'''

DIAL = 'EXEC Dial "PJSIP/4930@trunk,60,L(120000)"'
BILLING = ["GET VARIABLE CALLERACCOUNT", DIAL, "GET VARIABLE DIALSTATUS",
           "GET VARIABLE ANSWEREDTIME_MS", 'SET VARIABLE BILLED_MS "{prev}"', "CHANNEL STATUS"]


@pytest.fixture
def tiny(tmp_path):
    script = tmp_path / "tiny_agi.py"
    script.write_text(f"#!{sys.executable}\n{TINY_AGI}")
    script.chmod(0o755)

    def call(commands, scenario=None, sighup="default", env_block=None, **kwargs):
        proc_env = dict(os.environ, TINY_SIGHUP=sighup)
        return run_call([str(script), *commands], scenario, env_block, proc_env, **kwargs)

    call.cmd = [str(script)]
    return call


def exchanges(result):
    """[(command, reply or None)] after the env block."""
    pairs = []
    for direction, line in result.dialogue[len(ENV_KEYS) + 1:]:
        if direction == "AGI":
            pairs.append((line, None))
        else:
            assert pairs and pairs[-1][1] is None, result.dialogue_text()
            pairs[-1] = (pairs[-1][0], line)
    return pairs


def replies(result):
    return [reply for _, reply in exchanges(result)]


def test_env_block_bytes_and_order(tiny):
    env = agi_env(agi_arg_1="foo", agi_rdnis=None, agi_priority=1)
    assert list(env) == [k for k in ENV_KEYS if k != "agi_rdnis"] + ["agi_arg_1"]
    assert env["agi_uniqueid"] != agi_env()["agi_uniqueid"]
    result = tiny([], env_block=env)
    assert result.returncode == 0, result.dialogue_text()
    sent = ast.literal_eval(result.stderr.splitlines()[0])
    assert sent.startswith(b"agi_request: astbill.py\nagi_channel: SIP/127.0.0.1-0000000c\n")
    assert b"\nagi_priority: 1\n" in sent
    assert b"\nagi_accountcode: \nagi_threadid: " in sent  # the empty value keeps its space
    assert sent.endswith(b"\nagi_arg_1: foo\n\n")
    assert result.dialogue[-1] == ("AST", "")


def test_env_keys_in_recorded_order():
    recording = TRANSCRIPTS / "sip-caller_hangup.txt"
    keys = re.findall(r"AST>  b'(agi_\w+):", recording.read_text())
    assert tuple(keys) == ENV_KEYS


def test_answered_call(tiny):
    scenario = Scenario(answered_ms=65_000, variables={"CALLERACCOUNT": "1001"})
    result = tiny(BILLING, scenario)
    assert result.returncode == 0, result.dialogue_text()
    assert replies(result) == ["200 result=1 (1001)", "200 result=-1", "200 result=1 (ANSWER)",
                               "200 result=1 (65000)", "200 result=1", "200 result=6"]
    assert result.dial_args == "PJSIP/4930@trunk,60,L(120000)"
    assert result.replies_to(DIAL) == ["200 result=-1"]
    assert result.variables_set == {"BILLED_MS": "65000"}
    assert result.commands == [c.replace("{prev}", "65000") for c in BILLING]


@pytest.mark.parametrize("dial, exec_reply, answered_ms", [
    ('EXEC Dial "Local/1600@callee,30,L(5000)"', "200 result=-1", "5004"),  # local-limit_L.txt
    ('EXEC Dial "Local/1600@callee,30,L(5000:2000)"', "200 result=-1", "5004"),
    ('EXEC Dial "Local/1600@callee,30,S(5)"', "200 result=-1", "5004"),  # local-limit_S.txt
    ('EXEC Dial "Local/1600@callee,30,S(9)L(5000)"', "200 result=-1", "5004"),
    ('EXEC Dial "Local/1600@callee,30,L()"', "200 result=-1", "7000"),  # empty L(): no limit
    ('EXEC Dial "Local/1600@callee,30,L(9000)"', "200 result=-1", "7000"),
    ('EXEC Dial "Local/13@callee,30,g"', "200 result=0", "7000"),  # local-answer_callee_hangup_g.txt
])
def test_answered_talk_time_and_limits(tiny, dial, exec_reply, answered_ms):
    result = tiny([dial, "GET VARIABLE DIALSTATUS", "GET VARIABLE ANSWEREDTIME_MS"],
                  Scenario(answered_ms=7000))
    assert replies(result) == [exec_reply, "200 result=1 (ANSWER)", f"200 result=1 ({answered_ms})"]


@pytest.mark.parametrize("status", ["BUSY", "NOANSWER", "CONGESTION", "CHANUNAVAIL"])
def test_unanswered_call(tiny, status):  # local-busy.txt, local-noanswer.txt ...
    result = tiny(BILLING + ["GET VARIABLE ANSWEREDTIME"], Scenario(dialstatus=status))
    assert result.returncode == 0, result.dialogue_text()
    assert replies(result) == ["200 result=0", "200 result=0", f"200 result=1 ({status})",
                               "200 result=1 ()", "200 result=1", "200 result=4", "200 result=1 ()"]
    assert result.variables_set == {"BILLED_MS": ""}


def test_caller_hangup_kills_a_script_with_default_sighup(tiny):
    # local-caller_hangup_python_default_sighup.txt: dead before reading DIALSTATUS.
    result = tiny(BILLING, Scenario(answered_ms=4006, caller_hangup=True,
                                    variables={"CALLERACCOUNT": "1001"}))
    assert result.returncode == -signal.SIGHUP, result.dialogue_text()
    assert result.commands == BILLING[:2]
    assert result.dialogue[-1] == ("AST", "200 result=-1")


def test_caller_hangup_with_sighup_ignored(tiny):
    # sip-caller_hangup.txt: values still readable, live-channel commands get 511.
    result = tiny(BILLING, Scenario(answered_ms=4006, caller_hangup=True), sighup="ignore")
    assert result.returncode == 0, result.dialogue_text()
    assert replies(result) == [
        "200 result=0", "200 result=-1", "200 result=1 (ANSWER)", "200 result=1 (4006)",
        "200 result=1", "511 Command Not Permitted on a dead channel or intercept routine"]


def test_agisighup_no_sends_no_signal(tiny):
    # local-caller_hangup_agisighup_no_python_default.txt
    result = tiny(["GET VARIABLE AGISIGHUP"] + BILLING,
                  Scenario(answered_ms=4000, caller_hangup=True, agisighup=False))
    assert result.returncode == 0, result.dialogue_text()
    assert replies(result)[0] == "200 result=1 (no)"
    assert replies(result)[-1].startswith("511 ")


def test_cancel(tiny):  # local-caller_cancel.txt
    commands = BILLING + ['GET FULL VARIABLE "${DIALSTATUS}|${ANSWEREDTIME}|${DIALEDTIME}|${CDR(billsec)}"',
                          "NOOP", 'EXEC NoOp "after"', "ANSWER", "HANGUP"]
    result = tiny(commands, Scenario(dialstatus="CANCEL"), sighup="ignore")
    dead = "511 Command Not Permitted on a dead channel or intercept routine"
    assert replies(result) == ["200 result=0", "200 result=-1", "200 result=1 (CANCEL)",
                               "200 result=1 ()", "200 result=1", dead,
                               "200 result=1 (CANCEL|||0)", "200 result=0", "200 result=0", dead, dead]


def test_exit_on_hangup_closes_the_pipes(tiny):
    # local-caller_hangup_agiexitonhangup.txt: EOF on read, EPIPE on write.
    result = tiny(BILLING, Scenario(answered_ms=4000, caller_hangup=True, exit_on_hangup=True),
                  sighup="ignore")
    assert result.returncode == 2, result.dialogue_text()
    assert result.commands == BILLING[:2]
    assert result.dialogue[-1] == ("AST", "200 result=-1")


def test_pre_answered_channel(tiny):
    # local-preanswered_callee_hangup.txt: 6 s of ANSWEREDTIME for 3.5 s of talk.
    commands = ["GET VARIABLE CHANNEL(state)", "GET VARIABLE CDR(billsec)", "CHANNEL STATUS",
                'EXEC Dial "Local/13@callee,30"', "GET VARIABLE ANSWEREDTIME",
                "GET VARIABLE ANSWEREDTIME_MS", "GET VARIABLE CDR(billsec)", "GET VARIABLE DIALEDTIME"]
    result = tiny(commands, Scenario(answered_ms=3506, pre_answered_ms=2500))
    assert replies(result) == ["200 result=1 (Up)", "200 result=1 (2)", "200 result=6", "200 result=-1",
                               "200 result=1 (6)", "200 result=1 (6006)", "200 result=1 (6)",
                               "200 result=1 (6)"]


def test_billsec_can_be_one_below_answeredtime(tiny):
    # extra-sip-limit_L_warning-billsec-off-by-one.txt
    commands = ['EXEC Dial "Local/1600@callee,30,L(5000:2000)"', "GET VARIABLE ANSWEREDTIME",
                "GET VARIABLE CDR(billsec)", "GET VARIABLE CDR(billsec,f)"]
    result = tiny(commands, Scenario(answered_ms=5000, cdr_skew_us=-260))
    assert replies(result) == ["200 result=-1", "200 result=1 (5)", "200 result=1 (4)",
                               "200 result=1 (4.999740)"]


def test_l0_makes_dial_refuse(tiny):
    commands = ['EXEC Dial "Local/1600@callee,30,L(0)"', "GET VARIABLE DIALSTATUS",
                "GET VARIABLE ANSWEREDTIME", "CHANNEL STATUS"]
    result = tiny(commands, Scenario(answered_ms=5000), sighup="default")
    assert result.returncode == 0, result.dialogue_text()
    assert replies(result) == ["200 result=-1", "200 result=0", "200 result=0", "200 result=4"]


def test_variables_and_other_commands(tiny):
    env = agi_env()
    commands = ['SET VARIABLE EMPTY ""', "GET VARIABLE EMPTY", "GET VARIABLE NEVER_SET",
                r'SET VARIABLE Q "say \"hi\" \\ there"', "GET VARIABLE Q",
                'GET FULL VARIABLE "${EMPTY}|${NEVER_SET}|${CHANNEL(linkedid)}|${cdr(billsec,f)}"',
                'VERBOSE "hello there" 1', "NOOP", "FROB NICATE", "GET VARIABLE",
                "ANSWER", "CHANNEL STATUS", "GET VARIABLE CALLERID(num)"]
    result = tiny(commands, env_block=env)
    assert replies(result) == [
        "200 result=1", "200 result=1 ()", "200 result=0", "200 result=1", '200 result=1 (say "hi" \\ there)',
        f"200 result=1 (||{env['agi_uniqueid']}|0.000000)", "200 result=1", "200 result=0",
        "510 Invalid or unknown command", "520 Invalid command syntax.  Proper usage not available.",
        "200 result=0", "200 result=6", "200 result=1 (4930111222)"]
    assert result.variables_set == {"EMPTY": "", "Q": 'say "hi" \\ there'}
    assert result.verbose == ["hello there"]


def test_hangup_command_kills_the_channel(tiny):
    result = tiny(["HANGUP", "GET VARIABLE CHANNEL(state)", "CHANNEL STATUS"], sighup="ignore")
    assert replies(result) == ["200 result=1", "200 result=1 (Ring)",
                               "511 Command Not Permitted on a dead channel or intercept routine"]


def test_kill_after_dial_sent(tiny):
    result = tiny(BILLING, Scenario(kill_after_dial_sent=True))
    assert result.returncode == -signal.SIGKILL
    assert result.commands == BILLING[:2]
    assert result.dialogue[-1] == ("AGI", DIAL)


def test_dial_sleep_takes_real_time(tiny):
    started = time.monotonic()
    result = tiny([DIAL], Scenario(dial_sleep=0.3))
    assert time.monotonic() - started >= 0.3
    assert replies(result) == ["200 result=-1"]


def test_timeout_kills_the_script_and_shows_the_dialogue(tiny):
    started = time.monotonic()
    with pytest.raises(AgiPeerTimeout, match=re.escape(DIAL)):
        tiny(BILLING, Scenario(dial_gate=threading.Event()), timeout=1.0)
    assert time.monotonic() - started < 10


def test_hundred_concurrent_calls_held_in_dial(tiny):
    gate = threading.Event()
    calls = [start_call(tiny.cmd + BILLING,
                        Scenario(answered_ms=1000 * i, dial_gate=gate, variables={"CALLERACCOUNT": str(i)}),
                        timeout=120)
             for i in range(100)]
    for call in calls:  # all 100 are in the Dial at once: none returns before the gate
        assert call.dial_reached.wait(60)
    gate.set()
    results = [call.wait() for call in calls]
    for i, result in enumerate(results):
        assert result.returncode == 0, result.dialogue_text()
        assert replies(result)[0] == f"200 result=1 ({i})"
        assert result.variables_set == {"BILLED_MS": str(1000 * i)}
    uniqueids = {line for r in results for d, line in r.dialogue if line.startswith("agi_uniqueid: ")}
    assert len(uniqueids) == 100


def test_parse_args_follows_res_agi():
    assert parse_args('EXEC Dial "Local/13@callee,30"') == ["EXEC", "Dial", "Local/13@callee,30"]
    assert parse_args('SET VARIABLE X ""') == ["SET", "VARIABLE", "X", ""]
    assert parse_args(r'SET  VARIABLE X "a \"b\" c\\d"') == ["SET", "VARIABLE", "X", 'a "b" c\\d']
    assert parse_args(r"VERBOSE a\ b 1") == ["VERBOSE", "a b", "1"]


# --- replaying the recordings -----------------------------------------------

# Scenario per recording (the callee's behaviour and the dialplan's settings).
# Talk time, CDR skew and the harness's own variables are taken from the
# recording itself.  Not replayed: *-preanswered_callee_hangup, whose script
# answers and waits 2 s in real time (test_pre_answered_channel covers it).
REPLAYED = {
    "answer_callee_hangup": {},
    "answer_callee_hangup_g": {},
    "busy": {"dialstatus": "BUSY"},
    "caller_cancel": {"dialstatus": "CANCEL", "ring_ms": 2900},
    "caller_hangup": {"caller_hangup": True},
    "caller_hangup_agiexitonhangup": {"caller_hangup": True, "exit_on_hangup": True},
    "caller_hangup_agisighup_no": {"caller_hangup": True, "agisighup": False},
    "caller_hangup_agisighup_no_python_default": {"caller_hangup": True, "agisighup": False},
    "caller_hangup_python_default_sighup": {"caller_hangup": True},
    "chanunavail_local": {"dialstatus": "CHANUNAVAIL"},
    "chanunavail_sip": {"dialstatus": "CHANUNAVAIL"},
    "congestion": {"dialstatus": "CONGESTION"},
    "limit_L": {},
    "limit_L_warning": {},
    "limit_L_warning-billsec-off-by-one": {},
    "limit_S": {},
    "noanswer": {"dialstatus": "NOANSWER"},
    "ring_answer_callee_hangup": {"ring_ms": 2000},
    "sip_trunk_answer": {},
    "sip_trunk_busy": {"dialstatus": "BUSY"},
}
RECORDINGS = sorted(
    path.name for path in TRANSCRIPTS.glob("*.txt")
    if re.sub(r"^(extra-)?(local|sip)-", "", path.stem) in REPLAYED)


def test_every_replayed_scenario_has_its_recordings():
    # An empty or partial tests/recorded would otherwise replay nothing, silently.
    replayed = {re.sub(r"^(extra-)?(local|sip)-", "", name[:-4]) for name in RECORDINGS}
    assert replayed == set(REPLAYED)


def recorded_exchanges(path):
    """[(command, reply or None)] from a transcript's byte log, env block left out."""
    log = path.read_text().split("== Asterisk log")[0]
    pairs = []
    for direction, text in re.findall(r"^ +[\d.]+ (AST>|AGI<) +(b'.*'|b\".*\")$", log, re.M):
        line = ast.literal_eval(text).decode().removesuffix("\n")
        if direction == "AGI<":
            pairs.append((line, None))
        elif pairs:
            pairs[-1] = (pairs[-1][0], line)
    return pairs


def comparable(command, reply):
    """Mask what depends on the wall clock or Asterisk's channel counter."""
    if reply and command in ("GET VARIABLE CDR(start)", "GET VARIABLE CDR(answer)",
                             "GET VARIABLE CDR(end)", "GET VARIABLE DIALEDTIME_MS"):
        reply = re.sub(r"\d(?=[^(]*\)$)", "9", reply)
    if reply and command == "GET VARIABLE DIALEDPEERNAME":
        reply = re.sub(r"-[0-9a-f]{8}(;1)?\)", r"-N\1)", reply)
    return command, reply


@pytest.mark.parametrize("name", RECORDINGS)
def test_replays_recorded_transcript(tiny, name):
    recorded = recorded_exchanges(TRANSCRIPTS / name)
    data = {}  # variable -> the last value the recording read
    for command, reply in recorded:
        variable = re.fullmatch(r"GET VARIABLE (\S+)", command)
        value = re.fullmatch(r"200 result=1 \((.*)\)", reply or "")
        if variable and value:
            data[variable.group(1)] = value.group(1)
    kwargs = dict(REPLAYED[re.sub(r"^(extra-)?(local|sip)-", "", name[:-4])])
    if data.get("DIALSTATUS") == "ANSWER":
        kwargs["answered_ms"] = int(data["ANSWEREDTIME_MS"])
        kwargs["cdr_skew_us"] = round(float(data["CDR(billsec,f)"]) * 1e6) - kwargs["answered_ms"] * 1000
    kwargs["variables"] = {k: v for k, v in data.items() if k.startswith("HARNESS_")}
    sighup = "ignore" if data["HARNESS_RECORDER_SIGHUP"] == "handle" else "default"

    result = tiny([command for command, _ in recorded], Scenario(**kwargs), sighup=sighup)

    expected = [comparable(*pair) for pair in recorded if pair[1] is not None]
    ours = [comparable(*pair) for pair in exchanges(result)]
    assert ours[:len(expected)] == expected, result.dialogue_text()
    assert result.commands == [c for c, _ in recorded][:len(result.commands)]
    if name.endswith("python_default_sighup.txt"):
        assert result.returncode == -signal.SIGHUP
    elif "agiexitonhangup" in name:
        assert result.returncode == 2
    else:
        assert (result.returncode, len(ours)) == (0, len(expected))
