"""A scripted AGI peer that plays Asterisk 20 to an AGI script, for tests.

Built from the recorded Asterisk 20 transcripts (``tests/recorded``: its
README.md and ``*.txt``, the exact bytes a real Asterisk 20 sent to an AGI
script and what the script wrote back).  Comments name the transcript each
behaviour comes from.  Standard library only.

Typical use::

    result = run_call([sys.executable, "astbill.py"],
                      Scenario(answered_ms=65_000, variables={"CALLERACCOUNT": "1001"}),
                      agi_env(agi_extension="4930123456"))
    assert result.returncode == 0, result.dialogue_text()
    assert result.dial_args == "PJSIP/4930123456@trunk,60,L(120000)"

How a call plays out:

* The script is started with pipes on stdin/stdout, gets the env block, and
  every command line it writes is answered as res_agi answers it.  Commands
  this peer does not model get ``510 Invalid or unknown command``.
* ``EXEC Dial`` returns at once (or when ``Scenario.dial_gate`` is set) with
  the outcome the Scenario describes.  No real time passes: the times
  Asterisk would report come from a model timeline (see ``_Channel``).
* A caller hangup during the Dial (``caller_hangup``, or ``CANCEL``) sends
  SIGHUP together with the Dial result; the channel is then dead: variables
  and EXEC still work, live-channel commands get ``511``.
* Each call has its own subprocess and two threads (dialogue, stderr); calls
  share nothing but the uniqueid counter, so many can run at once.

Not recorded, so modelled from res_agi/app_dial and documented where done:
``L(0)``/``S(0)`` refusal, HANGUP, EXEC Playback and SayNumber, EXEC of
other applications than Dial/Set,
the 520 reply to a malformed command, HANGUPCAUSE for unrecorded cases.
"""

from __future__ import annotations

import itertools
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

# The env block as a SIP caller's call showed it (sip-caller_hangup.txt), in
# the order Asterisk 20 writes it (README: "The environment block").
_ENV_DEFAULTS = {
    "agi_request": "astbill.py",  # the name as written in AGI(), not a path
    "agi_channel": "SIP/127.0.0.1-0000000c",
    "agi_language": "en",
    "agi_type": "SIP",
    "agi_uniqueid": None,  # fresh for every agi_env() call
    "agi_version": "GIT-20-516d2c60ac",
    "agi_callerid": "4930111222",
    "agi_calleridname": "Harness Caller",
    "agi_callingpres": "0",
    "agi_callingani2": "0",
    "agi_callington": "0",
    "agi_callingtns": "0",
    "agi_dnid": "1600",
    "agi_rdnis": "unknown",
    "agi_context": "billing",
    "agi_extension": "1600",
    "agi_priority": "8",
    "agi_enhanced": "0.0",
    "agi_accountcode": "",
    "agi_threadid": "140621235160768",
}
ENV_KEYS = tuple(_ENV_DEFAULTS)

DIAL_STATUSES = ("ANSWER", "BUSY", "NOANSWER", "CONGESTION", "CHANUNAVAIL", "CANCEL")

REPLY_UNKNOWN = "510 Invalid or unknown command"
REPLY_DEAD = "511 Command Not Permitted on a dead channel or intercept routine"
# res_agi prints the command's usage after a "520-" line; a single line here.
REPLY_USAGE = "520 Invalid command syntax.  Proper usage not available."

# Model timeline, in ms.  The caller's channel is this old when the script
# starts its work (answered then if pre-answered): DIALEDTIME_MS exceeds
# ANSWEREDTIME_MS by 91-125 ms in every recording without ringing.
CHANNEL_AGE_MS = 100
# L()/S() cut the bridge 0-4 ms late: ANSWEREDTIME_MS 5004 for L(5000) in
# local-limit_L.txt, sip-limit_L.txt, local-limit_S.txt.
LIMIT_OVERSHOOT_MS = 4

# What Dial empties at its start; unanswered calls read them as "()"
# (local-busy.txt, local-caller_cancel.txt).
_DIAL_VARIABLES = (
    "DIALSTATUS", "DIALEDPEERNAME", "DIALEDPEERNUMBER", "ANSWEREDTIME",
    "ANSWEREDTIME_MS", "DIALEDTIME", "DIALEDTIME_MS", "RINGTIME", "RINGTIME_MS",
    "PROGRESSTIME", "PROGRESSTIME_MS",
)

_uniqueid_lock = threading.Lock()
_uniqueid_counter = itertools.count(1)


def _next_uniqueid() -> str:
    with _uniqueid_lock:
        n = next(_uniqueid_counter)
    return f"{time.time():.0f}.{n}"


def agi_env(**overrides) -> dict:
    """The 20-key env block as Asterisk 20 sends it, in its order.

    ``overrides`` replace values (converted with str()); a key whose override
    is None is left out; other keys (``agi_arg_1`` ...) follow agi_threadid
    in the order given.  ``agi_uniqueid`` is unique per call of this function.
    """
    env = dict(_ENV_DEFAULTS, agi_uniqueid=_next_uniqueid())
    env.update(overrides)
    return {key: str(value) for key, value in env.items() if value is not None}


@dataclass
class Scenario:
    """What happens to the call; every field has the plain answered-call default."""

    dialstatus: str = "ANSWER"  # one of DIAL_STATUSES
    answered_ms: int = 0  # callee talk time when answered, before any L()/S() limit
    caller_hangup: bool = False  # caller hung up during the Dial (implied by CANCEL)
    agisighup: bool = True  # False models AGISIGHUP=no: no SIGHUP, all else the same
    exit_on_hangup: bool = False  # AGIEXITONHANGUP=yes: pipes close after the hangup
    pre_answered_ms: int = 0  # the caller's channel was up this long before the Dial
    dial_gate: threading.Event | None = None  # EXEC Dial waits for this event
    dial_sleep: float = 0.0  # real seconds EXEC Dial takes
    variables: dict = field(default_factory=dict)  # channel variables set beforehand
    kill_after_dial_sent: bool = False  # SIGKILL the script when it sends EXEC Dial
    # Extensions to the requested API (defaults change nothing):
    ring_ms: int = 0  # callee rang this long before answering, or until CANCEL
    cdr_skew_us: int = 0  # CDR(billsec,f) minus the talk time; see _Channel.cdr_billsec_us
    # The model timeline also advances with real time between commands, as
    # Asterisk's clock does while the script works (e.g. authorizes).
    real_clock: bool = False
    set_variable_delay: float = 0.0  # real seconds each SET VARIABLE takes to answer
    # Statuses of the first Dials, before ``dialstatus`` (trunk failover:
    # e.g. ("CHANUNAVAIL", "CONGESTION") then an ANSWER).
    earlier_dials: tuple = ()
    # Announcements (EXEC Playback, SayNumber): model ms each takes; sound
    # files that are not installed ("*": none is); the caller hangs up
    # during the Nth of them (1 is the first).
    sound_ms: int = 0
    missing_sounds: tuple = ()
    hangup_at_sound: int = 0
    unloaded_apps: tuple = ()  # EXEC of these answers -2, as res_agi does for an unknown app

    def __post_init__(self):
        if self.dialstatus not in DIAL_STATUSES:
            raise ValueError(f"dialstatus {self.dialstatus!r} is not one of {DIAL_STATUSES}")
        if self.caller_hangup and self.dialstatus not in ("ANSWER", "CANCEL"):
            raise ValueError("a caller hangup during an unanswered Dial is dialstatus='CANCEL'")

    @property
    def caller_hangs_up(self) -> bool:
        return self.caller_hangup or self.dialstatus == "CANCEL"


@dataclass
class CallResult:
    returncode: int  # negative: killed by that signal (-1 is SIGHUP)
    dialogue: list  # [(direction, line)]: "AST" Asterisk->script, "AGI" script->Asterisk
    variables_set: dict  # SET VARIABLE name -> value, last wins
    dial_args: str | None  # data of the last EXEC Dial, unquoted
    verbose: list  # messages of VERBOSE commands
    stderr: str
    commands: list  # every command line the script sent

    def replies_to(self, command: str) -> list:
        """The lines Asterisk answered ``command`` (an exact line) with, in order."""
        replies = []
        for (direction, line), (next_direction, next_line) in zip(self.dialogue, self.dialogue[1:]):
            if direction == "AGI" and line == command and next_direction == "AST":
                replies.append(next_line)
        return replies

    def dialogue_text(self) -> str:
        """The whole call, readable, for assertion messages."""
        arrows = {"AST": "AST> ", "AGI": "AGI< "}
        lines = [arrows[direction] + repr(line)[1:-1] for direction, line in self.dialogue]
        lines.append(f"returncode: {self.returncode}")
        if self.stderr:
            lines.append("stderr:\n" + self.stderr.rstrip("\n"))
        return "\n".join(lines)


class AgiPeerTimeout(AssertionError):
    """The script did not finish in time; it has been killed."""


def run_call(cmd: list, scenario: Scenario | None = None, env_block: dict | None = None,
             proc_env: dict | None = None, timeout: float = 30.0) -> CallResult:
    """Run the AGI script ``cmd`` through one call and return what happened."""
    return start_call(cmd, scenario, env_block, proc_env, timeout).wait()


def start_call(cmd: list, scenario: Scenario | None = None, env_block: dict | None = None,
               proc_env: dict | None = None, timeout: float = 30.0) -> CallHandle:
    """Start a call without waiting for it; ``.wait()`` gives the CallResult.

    ``timeout`` counts from now.  ``proc_env`` is the script's process
    environment (None: inherit this one).  The handle's ``dial_reached``
    event is set when the script sends EXEC Dial, so a test can hold many
    calls in their Dial (``Scenario.dial_gate``) and look at them meanwhile.
    """
    return CallHandle(cmd, scenario or Scenario(), env_block or agi_env(), proc_env, timeout)


# --- res_agi's parsing -------------------------------------------------------

def parse_args(line: str) -> list:
    """Split a command line as res_agi's parse_args() does.

    Blanks separate arguments, double quotes group (``""`` is an empty
    argument), a backslash makes the next character literal.
    """
    args, current = [], None
    quoted = escaped = False
    for ch in line:
        if ch == '"' and not escaped:
            quoted = not quoted
            if quoted and current is None:
                current = []
                args.append(current)
        elif ch in " \t" and not quoted and not escaped:
            current = None
        elif ch == "\\" and not escaped:
            escaped = True
        else:
            if current is None:
                current = []
                args.append(current)
            current.append(ch)
            escaped = False
    return ["".join(arg) for arg in args]


def _split_app_args(data: str) -> list:
    """Split application data on commas outside parentheses, like AST_STANDARD_APP_ARGS."""
    fields, depth, start = [], 0, 0
    for i, ch in enumerate(data):
        if ch == "(":
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
        elif ch == "," and not depth:
            fields.append(data[start:i])
            start = i + 1
    fields.append(data[start:])
    return fields


def _parse_options(text: str) -> dict | None:
    """``gL(5000:2000)`` -> {"g": None, "L": "5000:2000"}; None if a ")" is missing."""
    options, i = {}, 0
    while i < len(text):
        letter, i = text[i], i + 1
        options[letter] = None
        if text.startswith("(", i):
            depth, j = 1, i + 1
            while j < len(text) and depth:
                depth += {"(": 1, ")": -1}.get(text[j], 0)
                j += 1
            if depth:
                return None
            options[letter] = text[i + 1:j - 1]
            i = j
    return options


def _atol(text: str) -> int:
    match = re.match(r"\s*[-+]?\d+", text)
    return int(match.group()) if match else 0


def _bridge_limit_ms(options: dict) -> int | None:
    """The talk-time limit L(x[:y[:z]]) and S(n) set, in ms; None for no limit.

    An empty ``L()`` means no limit (README "EXEC Dial"); 0 or less means
    Dial refuses the option.
    """
    limits = []
    if options.get("L"):
        limits.append(_atol(options["L"].split(":")[0]))
    if options.get("S"):
        limits.append(_atol(options["S"]) * 1000)
    return min(limits) if limits else None


# --- the caller's channel --------------------------------------------------

def _filter(allowed: str, text: str) -> str:
    """FILTER(allowed,text) as func_strings.c has it: ``text`` with only
    the characters ``allowed`` names, singly or as ranges (a-z)."""
    keep, i = set(), 0
    while i < len(allowed):
        if i + 2 < len(allowed) and allowed[i + 1] == "-":
            keep.update(chr(c) for c in range(ord(allowed[i]), ord(allowed[i + 2]) + 1))
            i += 3
        else:
            keep.add(allowed[i])
            i += 1
    return "".join(c for c in text if c in keep)


def _cdr_time(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


class _Channel:
    """The caller's channel: its variables, state and model timeline.

    Times are ms since the channel was created; the script starts at
    ``CHANNEL_AGE_MS`` (plus ``pre_answered_ms`` for a channel answered then,
    e.g. by an IVR).  As in Asterisk 20, ANSWEREDTIME is how long the channel
    has been up and DIALEDTIME how old it is, both when Dial returns
    (local-preanswered_callee_hangup.txt: 6 s for 3.5 s of talk).
    """

    def __init__(self, scenario: Scenario, env_block: dict):
        self.scenario = scenario
        self.env = env_block
        self.name = env_block.get("agi_channel", "")
        self.uniqueid = env_block.get("agi_uniqueid", "")
        self.started_at = time.time()
        self.now_ms = CHANNEL_AGE_MS
        self.up_since_ms = None
        if scenario.pre_answered_ms:
            self.up_since_ms = CHANNEL_AGE_MS
            self.now_ms += scenario.pre_answered_ms
        self.ended_ms = None  # when a Dial last closed the CDR (its end)
        self.dead = False
        self.hangupcause = "0"
        self.dial_status = None
        self.variables = {}
        if not scenario.agisighup:
            self.variables["AGISIGHUP"] = "no"
        if scenario.exit_on_hangup:
            self.variables["AGIEXITONHANGUP"] = "yes"
        for name, value in scenario.variables.items():
            self.set(name, str(value))

    @property
    def up(self) -> bool:
        return self.up_since_ms is not None

    @staticmethod
    def _key(name: str) -> str:
        """Function names are case-insensitive (cdr(billsec) is CDR(billsec))."""
        func, paren, rest = name.partition("(")
        return func.upper() + paren + rest if paren and name.endswith(")") else name

    def set(self, name: str, value: str) -> None:
        self.variables[self._key(name)] = value

    def get(self, name: str) -> str | None:
        """The value GET VARIABLE reports; None when unset (``200 result=0``)."""
        key = self._key(name)
        if key.startswith("FILTER(") and key.endswith(")"):
            return _filter(*key[7:-1].partition(",")[::2])
        builtins = self._builtins()
        return builtins[key] if key in builtins else self.variables.get(key)

    def expand(self, text: str) -> str:
        """``${NAME}`` substitution as GET FULL VARIABLE does it; unset reads empty."""
        out, i = [], 0
        while i < len(text):
            if not text.startswith("${", i):
                out.append(text[i])
                i += 1
                continue
            depth, j = 1, i + 2
            while j < len(text) and depth:
                if text.startswith("${", j):
                    depth += 1
                    j += 1
                elif text[j] == "}":
                    depth -= 1
                j += 1
            if depth:  # unterminated: Asterisk keeps the text
                out.append(text[i:])
                break
            out.append(self.get(self.expand(text[i + 2:j - 1])) or "")
            i = j
        return "".join(out)

    def cdr_billsec_us(self) -> int:
        """The CDR's billable time in µs.

        The CDR's answer and end stamps are not the bridge's own, so
        CDR(billsec,f) differs from ANSWEREDTIME_MS by ``cdr_skew_us``: from
        -260 µs (extra-sip-limit_L_warning-billsec-off-by-one.txt: 4.999740 s,
        so CDR(billsec) 4 while ANSWEREDTIME is 5) to +806 µs in the recordings.
        """
        if not self.up:
            return 0
        up_us = ((self.ended_ms or self.now_ms) - self.up_since_ms) * 1000
        return max(0, up_us + self.scenario.cdr_skew_us) if up_us else 0

    def _builtins(self) -> dict:
        billsec_us = self.cdr_billsec_us()
        callerid = {key: self.env.get(key, "unknown") for key in ("agi_callerid", "agi_calleridname")}
        return {
            "UNIQUEID": self.uniqueid,
            "CHANNEL": self.name,
            "CONTEXT": self.env.get("agi_context", ""),
            "EXTEN": self.env.get("agi_extension", ""),
            "HANGUPCAUSE": self.hangupcause,
            "CALLERID(num)": "" if callerid["agi_callerid"] == "unknown" else callerid["agi_callerid"],
            "CALLERID(name)": "" if callerid["agi_calleridname"] == "unknown" else callerid["agi_calleridname"],
            "CHANNEL(name)": self.name,
            "CHANNEL(uniqueid)": self.uniqueid,
            "CHANNEL(linkedid)": self.uniqueid,
            "CHANNEL(accountcode)": self.env.get("agi_accountcode", ""),
            "CHANNEL(state)": "Up" if self.up else "Ring",
            "CDR(billsec)": str(billsec_us // 1_000_000),
            "CDR(billsec,f)": f"{billsec_us // 1_000_000}.{billsec_us % 1_000_000:06d}",
            "CDR(duration)": str((self.ended_ms or self.now_ms) // 1000),
            "CDR(disposition)": self._cdr_disposition(),
            "CDR(start)": _cdr_time(self.started_at),
            "CDR(answer)": _cdr_time(self.started_at + self.up_since_ms / 1000) if self.up else "",
            "CDR(end)": _cdr_time(self.started_at + self.ended_ms / 1000) if self.ended_ms else "",
        }

    def _cdr_disposition(self) -> str:
        # Recorded: ANSWERED, BUSY, CONGESTION, else NO ANSWER (CANCEL,
        # NOANSWER, CHANUNAVAIL); a channel that is up reads ANSWERED.
        if self.up:
            return "ANSWERED"
        return self.dial_status if self.dial_status in ("BUSY", "CONGESTION") else "NO ANSWER"

    def answer(self) -> None:
        if not self.up:
            self.up_since_ms = self.now_ms

    def dial(self, data: str) -> tuple:
        """Dial(data) as the Scenario has it end: (EXEC result, caller hung up)."""
        if self.dead:  # app_dial: "Caller hung up before dial"
            self.variables["DIALSTATUS"] = "CANCEL"
            return -1, False
        target, timeout, option_text = (_split_app_args(data) + ["", ""])[:3]
        options = _parse_options(option_text)
        limit_ms = _bridge_limit_ms(options) if options is not None else None
        if options is None or (limit_ms is not None and limit_ms <= 0):
            # Not recorded beyond README's "L(0) makes Dial refuse to dial":
            # app_dial gives up before dialling and returns -1; no Dial
            # variable is touched, so a first Dial leaves DIALSTATUS unset.
            return -1, False

        sc = self.scenario
        for name in _DIAL_VARIABLES:
            self.variables[name] = ""
        self.dials = getattr(self, "dials", 0) + 1
        if self.dials <= len(sc.earlier_dials):
            return self._failed_dial(sc.earlier_dials[self.dials - 1], target)
        self.dial_status = sc.dialstatus
        self.variables["DIALSTATUS"] = sc.dialstatus
        tech, _, resource = target.split("&")[0].partition("/")
        answered = sc.dialstatus == "ANSWER"
        caller_gone = sc.caller_hangs_up
        if sc.ring_ms or sc.dialstatus in ("NOANSWER", "CANCEL"):
            # The callee indicated ringing: RINGTIME reads 0
            # (local-ring_answer_callee_hangup.txt, local-noanswer.txt).
            self.variables["RINGTIME"] = self.variables["RINGTIME_MS"] = "0"

        if answered:
            talk_ms = sc.answered_ms
            if limit_ms is not None and limit_ms + LIMIT_OVERSHOOT_MS < talk_ms:
                # The limit ended the bridge before the caller could hang up.
                talk_ms, caller_gone = limit_ms + LIMIT_OVERSHOOT_MS, False
            self.now_ms += sc.ring_ms
            self.answer()
            self.now_ms += talk_ms
            self._set_duration("ANSWEREDTIME", self.now_ms - self.up_since_ms)
            self._set_duration("DIALEDTIME", self.now_ms)
            self.variables["DIALEDPEERNAME"] = self._peer_name(tech, resource)
            self.variables["DIALEDPEERNUMBER"] = resource
            self.hangupcause = "16"  # every answered recording
            result = -1 if caller_gone or "g" not in options else 0
        else:
            if sc.dialstatus == "NOANSWER" and _atol(timeout) > 0:
                self.now_ms += _atol(timeout) * 1000  # local-noanswer.txt: CDR(duration) 6 for ",6"
            else:
                self.now_ms += sc.ring_ms
            self.hangupcause = self._unanswered_cause(tech)
            result = -1 if sc.dialstatus == "CANCEL" else 0
        if sc.dialstatus != "CHANUNAVAIL":
            # No callee channel was ever made for CHANUNAVAIL, and the CDR
            # stays open: CDR(end) reads empty (local-chanunavail_local.txt).
            self.ended_ms = self.now_ms
        return result, caller_gone

    def _failed_dial(self, status: str, target: str) -> tuple:
        """A Dial that reached no callee: unavailable or congested at once."""
        self.dial_status = self.variables["DIALSTATUS"] = status
        self.hangupcause = self._unanswered_cause(target.split("/")[0])
        return 0, False

    def _set_duration(self, name: str, ms: int) -> None:
        self.variables[name] = str(ms // 1000)
        self.variables[name + "_MS"] = str(ms)

    @staticmethod
    def _peer_name(tech: str, resource: str) -> str:
        # Local/13@callee -> Local/13@callee-00000001;1 (local-answer_callee_hangup.txt),
        # SIP/trunk/13 -> SIP/trunk-00000000 (local-sip_trunk_answer.txt); the
        # number is Asterisk's channel counter, always 00000001 here.
        if tech.lower() == "local":
            return f"{tech}/{resource.split('/')[0]}-00000001;1"
        peer = resource.split("/")[0].rpartition("@")[2]
        return f"{tech}/{peer}-00000001"

    def _unanswered_cause(self, tech: str) -> str:
        # Local channels report 0 for every unanswered outcome; a SIP peer
        # 17 for busy (local-sip_trunk_busy.txt) and 20 when unavailable
        # (local-chanunavail_sip.txt).  Other cases are not recorded: 0.
        if tech.lower() == "local":
            return "0"
        return {"BUSY": "17", "CHANUNAVAIL": "20"}.get(self.dial_status, "0")


# --- the call --------------------------------------------------------------

def _close(pipe) -> None:
    try:
        pipe.close()
    except OSError:  # unflushed bytes for a script that is gone
        pass


class CallHandle:
    """One call in progress: the script's process and the peer talking to it."""

    # Command words -> (handler, allowed once the caller hung up).  The
    # dead-channel rules are res_agi's, as recorded in sip-caller_hangup.txt.
    _COMMANDS = {
        ("ANSWER",): ("_cmd_answer", False),
        ("CHANNEL", "STATUS"): ("_cmd_channel_status", False),
        ("EXEC",): ("_cmd_exec", True),
        ("GET", "FULL", "VARIABLE"): ("_cmd_get_full_variable", True),
        ("GET", "VARIABLE"): ("_cmd_get_variable", True),
        ("HANGUP",): ("_cmd_hangup", False),
        ("NOOP",): ("_cmd_noop", True),
        ("SET", "VARIABLE"): ("_cmd_set_variable", True),
        ("VERBOSE",): ("_cmd_verbose", True),
    }

    def __init__(self, cmd: list, scenario: Scenario, env_block: dict,
                 proc_env: dict | None, timeout: float):
        self._begin(list(cmd), scenario, env_block, timeout)
        # close_fds (the default) keeps other calls' pipes out of this child,
        # so closing ours really gives it EOF/EPIPE.
        self._proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, env=proc_env)
        self.pid = self._proc.pid
        self._peer = threading.Thread(target=self._serve, name=f"agipeer-{self.pid}", daemon=True)
        self._stderr_reader = threading.Thread(target=self._read_stderr,
                                               name=f"agipeer-stderr-{self.pid}", daemon=True)
        self._peer.start()
        self._stderr_reader.start()

    def _begin(self, cmd, scenario, env_block, timeout):
        """The state of a call about to start, whatever carries it."""
        self.cmd = cmd
        self.scenario = scenario
        self.env_block = dict(env_block)
        self.timeout = timeout
        self.dial_reached = threading.Event()  # set when the script sends EXEC Dial
        self._deadline = time.monotonic() + timeout
        self._abort = threading.Event()
        self._channel = _Channel(scenario, self.env_block)
        self._hangup_pending = False
        self._pipes_closed = False
        self._dialogue, self._commands, self._verbose = [], [], []
        self._variables_set = {}
        self._dial_args = None
        self._stderr_chunks = []
        self._result = None

    # -- waiting --------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """The script has exited."""
        return self._proc.poll() is not None

    def _remaining(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    def wait(self) -> CallResult:
        """Wait for the script to exit; AgiPeerTimeout (script killed) past the timeout."""
        if self._result is None:
            self._peer.join(self._remaining())
            returncode = None
            if not self._peer.is_alive():
                try:
                    returncode = self._proc.wait(self._remaining())
                except subprocess.TimeoutExpired:
                    pass
            if returncode is None:
                self._kill_on_timeout()
            self._stderr_reader.join(max(self._remaining(), 1.0))
            self._close_pipes()
            self._result = self._snapshot(returncode)
        return self._result

    def _kill_on_timeout(self):
        self._abort.set()  # releases a Dial waiting on its gate
        self._proc.kill()
        returncode = self._proc.wait()
        self._peer.join(1.0)
        self._stderr_reader.join(1.0)
        self._close_pipes()
        result = self._snapshot(returncode)
        raise AgiPeerTimeout(f"AGI script {self.cmd} still running after {self.timeout} s; "
                             f"killed it.  The call so far:\n{result.dialogue_text()}")

    def _snapshot(self, returncode: int) -> CallResult:
        return CallResult(
            returncode=returncode,
            dialogue=list(self._dialogue),
            variables_set=dict(self._variables_set),
            dial_args=self._dial_args,
            verbose=list(self._verbose),
            stderr=b"".join(self._stderr_chunks).decode("utf-8", "replace"),
            commands=list(self._commands),
        )

    def _close_pipes(self):
        # A pipe whose thread is still blocked on it (a grandchild of the
        # script holds the other end) is left open: closing it would block too.
        if not self._peer.is_alive():
            _close(self._proc.stdin)
            _close(self._proc.stdout)
        if not self._stderr_reader.is_alive():
            _close(self._proc.stderr)

    def _read_stderr(self):
        for chunk in iter(lambda: self._proc.stderr.read1(65536), b""):
            self._stderr_chunks.append(chunk)

    # -- the dialogue ---------------------------------------------------------

    def _send_env(self):
        # An empty value keeps its space: "agi_accountcode: " (every recording).
        env_lines = [f"{key}: {value}" for key, value in self.env_block.items()] + [""]
        for line in env_lines:
            self._dialogue.append(("AST", line))
        self._write("".join(line + "\n" for line in env_lines))
        self._clock = time.monotonic()

    def _serve(self):
        self._send_env()
        while not self._pipes_closed:
            raw = self._proc.stdout.readline()
            if not raw:
                break
            line = raw.decode("utf-8", "surrogateescape")
            line = line[:-1] if line.endswith("\n") else line  # res_agi strips only "\n"
            self._dialogue.append(("AGI", line))
            self._commands.append(line)
            self._handle(line)

    def _write(self, text: str):
        try:
            self._proc.stdin.write(text.encode("utf-8", "surrogateescape"))
            self._proc.stdin.flush()
        except (BrokenPipeError, ValueError):  # script gone, or pipe closed on hangup
            pass

    def _reply(self, line: str):
        self._dialogue.append(("AST", line))
        self._write(line + "\n")

    def _handle(self, line: str):
        if self.scenario.real_clock:
            now = time.monotonic()
            self._channel.now_ms += int((now - self._clock) * 1000)
            self._clock = now
        argv = parse_args(line)
        words = tuple(word.upper() for word in argv)
        for size in (3, 2, 1):
            if words[:size] in self._COMMANDS:
                handler, dead_ok = self._COMMANDS[words[:size]]
                break
        else:
            self._reply(REPLY_UNKNOWN)
            return
        if self._channel.dead and not dead_ok:
            self._reply(REPLY_DEAD)
            return
        reply = getattr(self, handler)(argv)
        if reply is None:  # the script was killed, or the call aborted
            return
        if self._hangup_pending:
            self._hang_up_with(reply)
        else:
            self._reply(reply)

    def _hang_up_with(self, reply: str):
        """The caller is gone: SIGHUP and the reply "in the same millisecond".

        The signal goes first: every recording shows the script receiving it
        before the reply (sip-caller_hangup.txt, local-caller_cancel.txt), and
        so Python's default action kills the script before it can read the
        reply (local-caller_hangup_python_default_sighup.txt).  No HANGUP line
        is ever written to a local AGI.
        """
        self._hangup_pending = False
        self._channel.dead = True
        if self.scenario.agisighup:
            self._proc.send_signal(signal.SIGHUP)
        self._reply(reply)
        if self.scenario.exit_on_hangup:
            # AGIEXITONHANGUP=yes: EOF on the next read, EPIPE on the next
            # write (local-caller_hangup_agiexitonhangup.txt).
            self._pipes_closed = True
            _close(self._proc.stdin)
            _close(self._proc.stdout)

    # -- commands: each takes argv (command words included), returns the reply -

    def _cmd_answer(self, argv):
        self._channel.answer()
        return "200 result=0"

    def _cmd_channel_status(self, argv):
        if len(argv) > 3:
            return REPLY_USAGE
        if len(argv) == 3 and argv[2] != self._channel.name:
            return "200 result=-1"  # no such channel
        return "200 result=6" if self._channel.up else "200 result=4"  # AST_STATE_UP / _RING

    def _cmd_exec(self, argv):
        if len(argv) < 2:
            return REPLY_USAGE
        app, data = argv[1], argv[2] if len(argv) > 2 else ""
        if app.lower() in self.scenario.unloaded_apps:
            return "200 result=-2"
        if app.lower() == "dial":
            return self._exec_dial(data)
        if app.lower() in ("playback", "saynumber"):
            return self._exec_sound(app.lower(), data)
        if app.lower() == "set":
            name, _, value = data.partition("=")
            self._channel.set(name, value)
        # Every other application "succeeds" as NoOp and Wait did in the
        # recordings (sip-caller_hangup.txt, local-preanswered_callee_hangup.txt).
        return "200 result=0"

    def _exec_sound(self, app, data):
        """Playback or SayNumber, as app_playback.c and pbx_builtins.c have
        them (not recorded).  Playback answers a channel that is not up
        unless told ``noanswer``; a file it cannot open makes PLAYBACKSTATUS
        FAILED and it goes on, returning 0; a hangup while it plays ends it
        with -1 (PLAYBACKSTATUS SUCCESS).  SayNumber skips a missing file
        silently and returns 0, hangup or not.  Each takes ``sound_ms`` of
        the model timeline."""
        sc, channel = self.scenario, self._channel
        self._sounds = getattr(self, "_sounds", 0) + 1
        name, *options = data.split(",")
        if app == "playback" and not channel.up and "noanswer" not in options:
            channel.answer()
        missing = "*" in sc.missing_sounds or name in sc.missing_sounds
        gone = channel.dead or self._sounds == sc.hangup_at_sound
        if not channel.dead:
            channel.now_ms += sc.sound_ms
        if self._sounds == sc.hangup_at_sound:
            self._hangup_pending = True
        if app == "playback":
            channel.set("PLAYBACKSTATUS", "FAILED" if missing else "SUCCESS")
            return "200 result=-1" if gone and not missing else "200 result=0"
        return "200 result=0"

    def _exec_dial(self, data):
        self._dial_args = data
        self.dial_reached.set()
        if self.scenario.kill_after_dial_sent:
            self._proc.send_signal(signal.SIGKILL)
            return None
        gate = self.scenario.dial_gate
        if gate is not None:
            while not gate.wait(0.05):
                if self._abort.is_set():
                    return None
        if self.scenario.dial_sleep and self._abort.wait(self.scenario.dial_sleep):
            return None
        result, caller_gone = self._channel.dial(data)
        self._hangup_pending = caller_gone
        return f"200 result={result}"

    def _cmd_get_full_variable(self, argv):
        if len(argv) not in (4, 5):
            return REPLY_USAGE
        if len(argv) == 5 and argv[4] != self._channel.name:
            return "200 result=0"  # no such channel
        return f"200 result=1 ({self._channel.expand(argv[3])})"

    def _cmd_get_variable(self, argv):
        if len(argv) != 3:
            return REPLY_USAGE
        value = self._channel.get(argv[2])
        return "200 result=0" if value is None else f"200 result=1 ({value})"

    def _cmd_hangup(self, argv):
        # Not recorded: res_agi hangs the channel up and answers 1; the
        # dead channel then behaves as after a caller hangup.
        if len(argv) > 2:
            return REPLY_USAGE
        if len(argv) == 2 and argv[1] != self._channel.name:
            return "200 result=-1"  # no such channel
        self._hangup_pending = True
        return "200 result=1"

    def _cmd_noop(self, argv):
        return "200 result=0"

    def _cmd_set_variable(self, argv):
        if len(argv) != 4:
            return REPLY_USAGE
        self._channel.set(argv[2], argv[3])
        self._variables_set[argv[2]] = argv[3]
        if self.scenario.set_variable_delay:
            time.sleep(self.scenario.set_variable_delay)
        return "200 result=1"

    def _cmd_verbose(self, argv):
        if len(argv) < 2:
            return REPLY_USAGE
        self._verbose.append(argv[1])
        return "200 result=1"


# --- FastAGI: the same peer over a TCP connection ---------------------------------

def fastagi_env(script: str | None = "astbill", host: str = "127.0.0.1", port: int = 4573,
                **overrides) -> dict:
    """The env block Asterisk 20 sends a FastAGI server: ``agi_network`` and
    ``agi_network_script`` first (none for a URL without a path), then the
    usual keys with agi_request the whole URL (fastagi/README.md)."""
    block = {"agi_network": "yes"}
    if script is not None:
        block["agi_network_script"] = script
    url = f"agi://{host}:{port}" + (f"/{script}" if script is not None else "")
    block.update(agi_env(agi_request=url, **overrides))
    return block


def start_fastagi_call(address: tuple, scenario: Scenario | None = None,
                       env_block: dict | None = None, timeout: float = 30.0) -> SocketCallHandle:
    """Play a call to the FastAGI server at ``address`` (host, port)."""
    return SocketCallHandle(address, scenario or Scenario(), env_block or fastagi_env(), timeout)


def run_fastagi_call(address, scenario=None, env_block=None, timeout=30.0) -> CallResult:
    return start_fastagi_call(address, scenario, env_block, timeout).wait()


class SocketCallHandle(CallHandle):
    """One call over FastAGI: the env block is sent on connecting, each
    command answered as res_agi answers it; a caller hangup during the Dial
    writes ``HANGUP`` right after the Dial's result (unless AGISIGHUP=no);
    the server's close ends the call, and Asterisk then writes ``HANGUP``
    once more and closes (fastagi/README.md).  ``returncode`` is 0 once the
    server has closed the connection."""

    def __init__(self, address, scenario: Scenario, env_block: dict, timeout: float):
        if scenario.kill_after_dial_sent:
            raise ValueError("over FastAGI, kill the server itself")
        self._begin([f"agi://{address[0]}:{address[1]}"], scenario, env_block, timeout)
        self.server_closed = False
        import socket
        self._sock = socket.create_connection(address, timeout=10)
        self._sock.settimeout(None)
        self._rfile = self._sock.makefile("rb")
        self.pid = None
        self._peer = threading.Thread(target=self._serve_socket, daemon=True)
        self._peer.start()

    @property
    def finished(self) -> bool:
        return not self._peer.is_alive()

    def wait(self) -> CallResult:
        if self._result is None:
            self._peer.join(self._remaining())
            if self._peer.is_alive():
                self._abort.set()
                self._close_socket()
                self._peer.join(2.0)
                result = self._snapshot(None)
                raise AgiPeerTimeout(f"FastAGI call still open after {self.timeout} s; closed"
                                     f" it.  The call so far:\n{result.dialogue_text()}")
            self._result = self._snapshot(0 if self.server_closed else None)
        return self._result

    def _close_socket(self):
        import socket
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def _serve_socket(self):
        self._send_env()
        while not self._pipes_closed:
            try:
                raw = self._rfile.readline()
            except OSError:
                raw = b""
            if not raw:
                self.server_closed = not self._pipes_closed
                if self.scenario.agisighup and not self._pipes_closed:
                    self._write("HANGUP\n")  # the AGI ended: written in every recording
                break
            line = raw.decode("utf-8", "surrogateescape")
            line = line[:-1] if line.endswith("\n") else line
            self._dialogue.append(("AGI", line))
            self._commands.append(line)
            self._handle(line)
        self._close_socket()

    def _write(self, text: str):
        try:
            self._sock.sendall(text.encode("utf-8", "surrogateescape"))
        except OSError:
            pass

    def _hang_up_with(self, reply: str):
        """The Dial's result, then ``HANGUP`` unprompted, in the same
        millisecond (fastagi/README.md: caller_hangup, caller_cancel)."""
        self._hangup_pending = False
        self._channel.dead = True
        self._reply(reply)
        if self.scenario.agisighup:
            self._dialogue.append(("AST", "HANGUP"))
            self._write("HANGUP\n")
        if self.scenario.exit_on_hangup:
            self._write("HANGUP\n")
            self._pipes_closed = True
            self._close_socket()
