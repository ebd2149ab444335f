"""One outbound call, top to bottom: identify, authorize, dial, settle.

This module tells a call's story and knows nothing of SQL or files: the
credit ledger decides what the call may spend and records what it spent,
whatever the database does, and the channel (``agi``) is the only way to
Asterisk.
"""
import time

from . import ledger
from .agi import AGIError, Hangup, answered_ms, dial_data
from .ledger import INVALID, NOACCOUNT, OK, CallRecord, valid_uniqueid
from .money import fmt
from .rating import normalize_destination


class Refused(Exception):
    """The call may not be made; ``status`` goes to ASTBILL_STATUS."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status


def handle(channel, settings, target=None):
    """Bill one call on ``channel`` to ``target`` (default: the extension):
    ASTBILL_STATUS and one line in Asterisk's log say how it went.  Returns
    the ledger's Settlement once the call has ended; a closed pipe (Hangup)
    or nonsense (AGIError) before the Dial escapes, for main to report."""
    try:
        call, up_before = identify(channel, settings, target)
    except Refused as refusal:
        return refuse(channel, refusal.status, str(refusal))
    grant = ledger.authorize(settings, call)
    if grant.status != OK:
        return refuse(channel, grant.status, grant.reason)
    if grant.how == "let through":
        log(channel, f"{call.uniqueid} {grant.reason}")
    try:
        connect(channel, call, settings, grant.routes, up_before)
    except (Hangup, AGIError) as exc:
        # Dial may have run, but Asterisk can no longer say how it went: the
        # call stays for the sweep, which knows the longest it could last.
        return log(channel, f"{call.uniqueid} left for the sweep: {exc}")
    settlement = ledger.settle(settings, call)
    if settlement.cost is None:
        log(channel, f"{call.uniqueid} {settlement.reason}")
    else:
        channel.set("ASTBILL_COST", fmt(settlement.cost, settings["decimals"]))
        channel.set("ASTBILL_BILLSEC", settlement.billsec)
        if call.trunk:
            channel.set("ASTBILL_TRUNK", call.trunk)
    return settlement


def identify(channel, settings, target=None):
    """The call, from the AGI environment and one read of the channel; and,
    for a caller answered before the Dial, (ms it has been up, when read)."""
    env = channel.env
    uniqueid = env.get("agi_uniqueid", "")
    if not valid_uniqueid(uniqueid):
        raise Refused(INVALID, f"bad uniqueid {uniqueid[:40]!r}")
    source = settings["account_source"]
    variable = source[9:] if source.startswith("variable:") else None
    up_ms, linkedid, account_var = channel.before_dial(variable)
    up_before = None if up_ms is None else (up_ms, time.monotonic())
    if up_ms == 0:
        log(channel, f"{uniqueid} answered before the Dial, but CDR(billsec,f) is"
                     " unavailable: the time before the Dial will be billed")
    callerid, name = channel.caller_id()
    account = account_var if variable else (
        callerid if source == "callerid" else env.get("agi_accountcode", ""))
    if not account:
        raise Refused(NOACCOUNT, "no account on the channel")
    if len(account) > 80 or not account.isprintable():
        raise Refused(INVALID, f"bad account {account[:40]!r}")
    dialled = target or env.get("agi_extension", "")
    number = normalize_destination(dialled, settings["international_prefix"],
                                   settings["national_prefix"], settings["country_code"])
    if number is None:
        raise Refused(INVALID, f"bad destination {dialled[:40]!r}")

    call = CallRecord(
        uniqueid=uniqueid, account=account, number=number, started=int(time.time()),
        clid=f'"{name}" <{callerid}>'[:80], src=callerid[:80],
        dcontext=env.get("agi_context", "")[:80], channel=env.get("agi_channel", "")[:80],
        accountcode=env.get("agi_accountcode", "")[:80], linkedid=(linkedid or uniqueid)[:150])
    return call, up_before


def connect(channel, call, settings, routes, up_before):
    """Dial with the granted limit enforced by Asterisk, trunk after trunk
    while one is unavailable or congested; record on ``call`` how it ended
    (CANCEL if it never reached a Dial)."""
    try:
        channel.set("ASTBILL_STATUS", OK)
        channel.set("ASTBILL_MAXSECS", call.max_secs)
    except (Hangup, AGIError):
        return call.end("CANCEL", 0)  # never dialled: released at once
    for route in routes or [None]:
        if route is not None:
            call.trunk, call.dial = route.trunk, route.dial_string(call.number)
            call.trunk_deck = route.deck or 0
        if channel.hungup or not dial(channel, call, settings, up_before):
            return call.end("CANCEL", 0)
        if call.dialstatus not in ("CHANUNAVAIL", "CONGESTION"):
            return


def dial(channel, call, settings, up_before):
    """One Dial; False if it could not even be sent."""
    # The caller's channel keeps counting up until the Dial starts.
    before_ms = up_before[0] + int((time.monotonic() - up_before[1]) * 1000) if up_before else 0
    try:
        data = dial_data(call.dial, settings["ring_timeout"], settings["dial_options"],
                         call.max_secs * 1000, settings["warning_secs"] * 1000)
    except ValueError as exc:  # a template made before it was checked so: never dialled
        log(channel, f"{call.uniqueid} not dialled: {exc}")
        return False
    try:
        channel.exec("Dial", data)
    except Hangup as exc:
        if exc.sent:
            raise
        return False
    # Dial's result is -1 after every answered call without the g option,
    # and after a caller hangup; DIALSTATUS says what happened.
    fields = channel.get_full("${DIALSTATUS}|${ANSWEREDTIME_MS}|${ANSWEREDTIME}|"
                              "${CDR(billsec,f)}|${DIALEDPEERNAME}").split("|", 4)
    dialstatus, up_ms, up_s, billsec_f, peer = fields + [""] * (5 - len(fields))
    if dialstatus == "" and (up_ms or up_s):
        # Dial sets these only for an answered call: never let a missing
        # status make a talked call free.
        dialstatus = "ANSWER"
    # ANSWEREDTIME counts from the caller's answer: a caller answered before
    # the Dial (IVR, PIN prompt) must not pay for that time.
    call.end(dialstatus, answered_ms(up_ms, up_s, billsec_f) - before_ms, peer)
    return True


def refuse(channel, status, reason):
    channel.set("ASTBILL_STATUS", status)
    channel.set("ASTBILL_MAXSECS", 0)
    log(channel, f"{status} {reason}")


def log(channel, message):
    channel.verbose(f"astbill: {message}")
