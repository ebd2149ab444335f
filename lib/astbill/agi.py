"""The AGI channel: Asterisk's side of the pipe, as Asterisk 20 really speaks it.

Written against recorded Asterisk 20 dialogues rather than folklore:

* ``200 result=-1`` from EXEC Dial is what every answered call without the
  ``g`` option returns, callee hangup included; it is a result, not an error.
* A caller hangup sends SIGHUP, which would kill Python.  The script
  records it (see ``note_hangup``) and carries on: GET/SET VARIABLE still
  work afterwards, so the call can be settled with its real talk time.
* ``511`` answers commands that need a live channel once the caller is gone.
* With ``AGIEXITONHANGUP=yes`` the pipe closes: EOF on read, EPIPE on write.
  Both raise ``Hangup``; nothing more can be asked of Asterisk then.

pyst2 gets the first three wrong (it raises on ``result=-1``, turns every
command after SIGHUP into an exception and writes debug lines to Asterisk's
console), so the protocol is spoken here directly; it is small.
"""

from time import monotonic as _monotonic

MAX_LINE = 8192
# The environment block's keys in the order res_agi writes them (FastAGI's
# two first), then agi_arg_1, agi_arg_2 ...  A caller chooses their own
# caller ID name; a newline in it must not add or change a key.
ENV_ORDER = ("agi_network", "agi_network_script", "agi_request", "agi_channel",
             "agi_language", "agi_type", "agi_uniqueid", "agi_version", "agi_callerid",
             "agi_calleridname", "agi_callingpres", "agi_callingani2", "agi_callington",
             "agi_callingtns", "agi_dnid", "agi_rdnis", "agi_context", "agi_extension",
             "agi_priority", "agi_enhanced", "agi_accountcode", "agi_threadid")
_ENV_RANK = {key: rank for rank, key in enumerate(ENV_ORDER)}


class Hangup(Exception):
    """The AGI pipe is closed: Asterisk has gone away from this call.

    ``sent`` tells whether the last command reached Asterisk before the
    pipe closed (it may then have run) or could not be written at all.
    """

    def __init__(self, message, sent=True):
        super().__init__(message)
        self.sent = sent


class AGIError(Exception):
    """Asterisk sent something that is not AGI; the message is one line."""


class BadEnvironment(AGIError):
    """The environment block was read whole, but is not one Asterisk wrote
    alone (a key twice or out of its place): the call is refused."""


class Reply:
    __slots__ = ("code", "result", "data")

    def __init__(self, code, result, data):
        self.code = code
        self.result = result
        self.data = data


def quote(text):
    """One AGI argument in double quotes, escaped as res_agi unescapes it."""
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_reply(line):
    """``200 result=1 (value)`` -> Reply(200, '1', 'value'); data None if absent."""
    code, _, rest = line.partition(" ")
    if len(code) != 3 or not code.isdigit():
        raise AGIError(f"not an AGI reply: {line[:80]!r}")
    if code != "200":
        return Reply(int(code), None, rest)
    if not rest.startswith("result="):
        raise AGIError(f"not an AGI reply: {line[:80]!r}")
    result, _, tail = rest[7:].partition(" ")
    data = None
    if tail.startswith("(") and ")" in tail:
        data = tail[1:tail.rindex(")")]
    return Reply(200, result, data)


class Channel:
    """The call's channel as seen through AGI on stdin/stdout."""

    def __init__(self, rfile, wfile):
        self._r = rfile
        self._w = wfile
        self.hungup = False
        self.env = {}

    def note_hangup(self, *_signal):
        """SIGHUP handler: the caller hung up; keep going and settle."""
        self.hungup = True

    def _readline(self):
        raw = self._r.readline(MAX_LINE + 1)
        if not raw:
            raise Hangup("AGI pipe closed")
        if len(raw) > MAX_LINE or not raw.endswith(b"\n"):
            raise AGIError("AGI line too long or cut short")
        # Asterisk passes a caller ID name through as the caller's bytes
        # (Latin-1 from ISDN or an old PBX): never a reason to refuse a call.
        return raw.decode("utf-8", "replace").rstrip("\r\n")

    def read_env(self):
        """Read the ``agi_*`` block Asterisk sends first, up to its blank
        line; BadEnvironment, once it is read, if a key is repeated or out
        of Asterisk's order (an argument anywhere but at the end)."""
        env, problem, rank, args = self.env, None, -1, 0
        while True:
            line = self._readline()
            if not line:
                if problem:
                    raise BadEnvironment(problem)
                return env
            key, sep, value = line.partition(": ")
            if not sep and line.endswith(":"):
                key, sep, value = line[:-1], ":", ""
            if not sep or not key.startswith("agi_"):
                raise AGIError(f"not an AGI environment line: {line[:80]!r}")
            if problem:
                continue
            if key in env:
                problem = f"AGI environment repeats {key[:40]!r}"
            elif key.startswith("agi_arg_"):
                args += 1
                if key != f"agi_arg_{args}":
                    problem = f"AGI environment has {key[:40]!r} out of order"
            elif args or _ENV_RANK.get(key, rank) < rank:
                problem = f"AGI environment has {key[:40]!r} out of order"
            else:
                rank = _ENV_RANK.get(key, rank)
            env[key] = value

    def command(self, text):
        try:
            self._w.write(text.encode("utf-8") + b"\n")
            self._w.flush()
        except (BrokenPipeError, ConnectionResetError):
            raise Hangup("AGI pipe closed", sent=False) from None
        line = self._readline()
        # FastAGI announces a hangup with a line of its own; local AGI gets
        # SIGHUP instead.  Either way the reply follows.
        while line == "HANGUP":
            self.hungup = True
            line = self._readline()
        while line.startswith("520-"):  # multi-line usage text, ends with "520 "
            line = self._readline()
        return parse_reply(line)

    def before_dial(self, variable=None):
        """What a call needs from its channel before the Dial, in one round
        trip: (ms the caller has been answered, or None if it is not;
        CHANNEL(linkedid); ASTBILL_ANNOUNCE; ${variable})."""
        # FILTER: a | in ASTBILL_ANNOUNCE must not move ${variable} (the account).
        wanted = ("${CHANNEL(state)}|${CDR(billsec,f)}|${CHANNEL(linkedid)}"
                  "|${FILTER(a-zA-Z,${ASTBILL_ANNOUNCE})}")
        state, up_secs, linkedid, announce, value = (self.get_full(
            wanted + ("|${%s}" % variable if variable else "")).split("|", 4) + [""] * 4)[:5]
        return (seconds_to_ms(up_secs) if state == "Up" else None), linkedid, announce, value

    def dial(self, data):
        """EXEC Dial(data) and how it went: (DIALSTATUS, ms the caller's
        channel has been up, DIALEDPEERNAME); None if it could not be sent."""
        try:
            self.exec("Dial", data)
        except Hangup as exc:
            if exc.sent:
                raise
            return None
        # Dial's result is -1 after every answered call without the g option,
        # and after a caller hangup; its variables say what happened.
        fields = self.get_full("${DIALSTATUS}|${ANSWEREDTIME_MS}|${ANSWEREDTIME}|"
                               "${CDR(billsec,f)}|${DIALEDPEERNAME}").split("|", 4)
        dialstatus, up_ms, up_s, billsec_f, peer = fields + [""] * (5 - len(fields))
        if dialstatus == "" and (up_ms or up_s):
            # Dial sets these only for an answered call: never let a missing
            # status make a talked call free.
            dialstatus = "ANSWER"
        return dialstatus, answered_ms(up_ms, up_s, billsec_f), peer

    def up_ms(self):
        """How long the caller's channel has been answered, in ms; 0 when
        Asterisk's CDR cannot say."""
        return seconds_to_ms(self.get_full("${CDR(billsec,f)}"))

    def announce(self, announcement, seconds, up_before):
        """Play an ``announcement`` (its pieces, and the problems that left
        parts out) to the caller, starting no piece after ``seconds``.
        ``up_before`` is (ms the caller has been up, when read), or None
        for a caller not answered: it hears the announcement as early media
        and stays unanswered, for an answered caller's ANSWEREDTIME would
        count the callee's ringing too (and a busy callee would be a 200
        and a BYE).  Returns ``up_before`` as it stands after the
        announcement, and the problems, each one line."""
        pieces, problems = announcement
        if not pieces:
            return up_before, problems
        if up_before is None:
            self.exec("Progress", "")
        stopped = self._say(pieces, seconds)
        if stopped:
            problems = problems + [stopped]
        if up_before is not None:
            # Asterisk's own count of the caller's time up; at the least,
            # what our clock says has passed since it was last known.
            now = _monotonic()
            up_before = max(self.up_ms(), up_before[0] + int((now - up_before[1]) * 1000)), now
        return up_before, problems

    def _say(self, pieces, seconds):
        """None, or why the announcement stopped short."""
        deadline = _monotonic() + seconds
        for n, (app, argument) in enumerate(pieces):
            if self.hungup or _monotonic() > deadline:
                break
            result = self.exec(app, argument + ",noanswer" if app == "Playback" else argument)
            if result == -2:   # res_agi: no such application
                return f"{app} is not loaded in Asterisk: nothing more announced"
            if result < 0:     # Playback returns -1 only when the caller is gone
                self.hungup = True
                break
            # A missing sound file is Asterisk's warning, and the call goes
            # on; one missing at the start (no sound files at all) ends it.
            if n == 0 and app == "Playback" and self.get("PLAYBACKSTATUS") == "FAILED":
                return (f"no sound file {argument!r} in language"
                        f" {self.env.get('agi_language', '')!r}: nothing announced")
        if self.hungup:
            return "the caller hung up during the announcement"
        if _monotonic() > deadline:
            return f"announcement cut short after {seconds}s"
        return None

    def caller_id(self):
        """(number, name) of the caller; Asterisk writes 'unknown' for absent ones."""
        return tuple("" if self.env.get(key, "") == "unknown" else self.env.get(key, "")
                     for key in ("agi_callerid", "agi_calleridname"))

    def get(self, name):
        """A channel variable's value; None when it was never set."""
        reply = self.command(f"GET VARIABLE {name}")
        if reply.code != 200:
            raise AGIError(f"GET VARIABLE {name} answered {reply.code}")
        return reply.data if reply.result == "1" else None

    def get_full(self, expression):
        """Asterisk's expansion of ``expression`` (``${A}|${B}`` ...)."""
        reply = self.command(f"GET FULL VARIABLE {quote(expression)}")
        if reply.code != 200:
            raise AGIError(f"GET FULL VARIABLE answered {reply.code}")
        return reply.data or ""

    def set(self, name, value):
        return self.command(f"SET VARIABLE {name} {quote(value)}").code == 200

    def verbose(self, message, level=1):
        return self.command(f"VERBOSE {quote(message)} {level}").code == 200

    def exec(self, app, args):
        """Run a dialplan application; its result as an int (Dial: -1 or 0)."""
        reply = self.command(f"EXEC {app} {quote(args)}")
        if reply.code != 200 or not reply.result.lstrip("-").isdigit():
            raise AGIError(f"EXEC {app} answered {reply.code} {reply.result}")
        return int(reply.result)


# -- Asterisk's time fields --------------------------------------------------------

def seconds_to_ms(text):
    """'3.503239' (CDR billsec,f) -> 3503; '' -> 0."""
    whole, _, frac = text.partition(".")
    if not whole.isdigit() or (frac and not frac.isdigit()):
        return 0
    return int(whole) * 1000 + int((frac + "000")[:3])


def answered_ms(answered_ms_text, answered_s_text, billsec_f):
    """How long the caller's channel has been up when Dial returns, in ms,
    from the best source Asterisk gave: ANSWEREDTIME_MS, else ANSWEREDTIME,
    else CDR(billsec,f)."""
    if answered_ms_text.isdigit():
        return int(answered_ms_text)
    if answered_s_text.isdigit():
        return int(answered_s_text) * 1000
    return seconds_to_ms(billsec_f)


# -- Dial's arguments ----------------------------------------------------------------

def dial_field_problem(text):
    """Why ``text`` cannot stand whole in one of Dial's fields, or None.

    Asterisk splits an application's arguments at commas outside
    parentheses and double quotes, and a backslash escapes the character
    after it (``|`` too splits, where res_agi's compatibility mode is on).
    Any of these, or an unbalanced parenthesis, in a Dial template or
    option string would move AstBill's timeout and L() into another field,
    where Asterisk enforces nothing: the call would run unlimited.
    """
    depth = 0
    for char in text:
        if char in ',|"\\':
            return f"must not contain {char!r}: Dial would read its fields apart there"
        if not char.isprintable():
            return "must not contain control characters"
        depth += (char == "(") - (char == ")")
        if depth < 0:
            break
    if depth != 0:
        return "must balance its parentheses: Dial would read its fields apart there"
    return None


def dial_data(resource, timeout, options, limit_ms, warning_ms=0):
    """Dial's argument string: what to dial, the ring timeout, the options
    with AstBill's L() last (so that no earlier L() of the operator's wins);
    ValueError naming the problem if a field would not stay in its place."""
    for name, text in (("Dial string", resource), ("dial_options", options)):
        problem = dial_field_problem(text)
        if problem:
            raise ValueError(f"{name} {text[:80]!r} {problem}")
    limit = f"L({limit_ms}" + (f":{warning_ms}" if 0 < warning_ms < limit_ms else "") + ")"
    return f"{resource},{timeout},{options}{limit}"


# -- What the caller hears -------------------------------------------------------

ANNOUNCE_MODES = ("none", "balance", "minutes", "both")
# The longest one piece of an announcement takes (SayNumber of nine digits):
# none starts later than this before the announcement's time is up.
PIECE_SECS = 5
# SayNumber takes a C int; no balance worth saying comes near it.
SAYABLE = 999_999_999


def sound_problem(name):
    """Why ``name`` is not a sound file name Asterisk can be handed, or None."""
    if not name or len(name) > 200 or not all(
            c.isascii() and (c.isalnum() or c in "_-./") for c in name):
        return "must be a sound file name (letters, digits, _ - . / only)"
    return None


def announce_mode(value, default):
    """The announcement ASTBILL_ANNOUNCE (``value``) asks for, else
    ``default``: (mode, None or why ``value`` was not taken)."""
    if value.lower() in ANNOUNCE_MODES or not value:
        return value.lower() or default, None
    return default, (f"ASTBILL_ANNOUNCE {value[:20]!r} is not one of"
                     f" {', '.join(ANNOUNCE_MODES)}: announcing {default}")


def announcement(mode, available, max_secs, unit, cents):
    """What to say for ``mode`` (balance, minutes or both): the pieces
    ((application, argument) ...) for ``Channel.announce``, and the one-line
    problems that left a part out.  ``available`` is the money the account
    may spend (None: unknown), said in whole ``unit`` and in hundredths
    (``cents``; "" for a currency without them), rounded down: the caller is
    never told of money that is not there."""
    pieces, problems = [], []
    if mode in ("balance", "both"):
        if available is None:
            problems.append("balance unknown: not announced")
        elif not 0 <= available <= SAYABLE:
            problems.append(f"balance {available:.2f} cannot be said: not announced")
        else:
            whole = int(available)
            hundredths = int((available - whole) * 100) if cents else 0
            pieces.append(("Playback", "vm-youhave"))
            if whole or not hundredths:
                pieces += [("SayNumber", str(whole))] + ([("Playback", unit)] if unit else [])
            if whole and hundredths:
                pieces.append(("Playback", "vm-and"))
            if hundredths:
                pieces += [("SayNumber", str(hundredths)), ("Playback", cents)]
    if mode in ("minutes", "both"):
        if max_secs <= 0:
            problems.append("no time granted: minutes not announced")
        else:
            count, word = (max_secs // 60, "minute") if max_secs >= 60 else (max_secs, "second")
            pieces += [("Playback", "vm-youhave"), ("SayNumber", str(count)),
                       ("Playback", word if count == 1 else word + "s")]
    return pieces, problems
