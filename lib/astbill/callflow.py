"""One outbound call, top to bottom: identify, authorize, dial, settle.

This module tells a call's story and knows nothing of SQL or files: the
credit ledger decides what the call may spend and records what it spent,
whatever the database does, and the channel (``agi``) is the only way to
Asterisk.
"""
import time

from . import ledger
from .agi import PIECE_SECS, AGIError, Hangup, announce_mode, announcement, dial_data
from .ledger import ANNOUNCE_SECS, CAUSES, INVALID, NOACCOUNT, OK, CallRecord, valid_uniqueid
from .money import fmt
from .rating import normalize_destination


class Refused(Exception):
    """The call may not be made: (its ASTBILL_STATUS, why)."""


def handle(channel, settings, target=None):
    """Bill one call on ``channel`` to ``target`` (default: the extension):
    ASTBILL_STATUS and one line in Asterisk's log say how it went.  Returns
    the ledger's Settlement once the call has ended; a closed pipe (Hangup)
    or nonsense (AGIError) before the Dial escapes, for main to report."""
    try:
        call, up_before, announce = identify(channel, settings, target)
    except Refused as refusal:
        return refuse(channel, settings, *refusal.args)
    grant = ledger.authorize(settings, call)
    if grant.status != OK:
        return refuse(channel, settings, grant.status, grant.reason)
    if grant.how == "let through":
        log(channel, f"{call.uniqueid} {grant.reason}")
    try:
        connect(channel, call, settings, grant, up_before, announce)
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
    """The call, from the AGI environment and one read of the channel; for
    a caller answered before the Dial, (ms it has been up, when read); and
    what to announce (ASTBILL_ANNOUNCE may choose for this call)."""
    env = channel.env
    uniqueid = env.get("agi_uniqueid", "")
    if not valid_uniqueid(uniqueid):
        raise Refused(INVALID, f"bad uniqueid {uniqueid[:40]!r}")
    source = settings["account_source"]
    variable = source[9:] if source.startswith("variable:") else None
    up_ms, linkedid, announce, account_var = channel.before_dial(variable)
    up_before = None if up_ms is None else (up_ms, time.monotonic())
    if up_ms == 0:
        log(channel, f"{uniqueid} answered before the Dial, but CDR(billsec,f) is"
                     " unavailable: the time before the Dial will be billed")
    announce, problem = announce_mode(announce, settings["announce"])
    if problem:
        log(channel, f"{uniqueid} {problem}")
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
    return call, up_before, announce


def connect(channel, call, settings, grant, up_before, announce):
    """Say what the caller has, then dial with the granted limit enforced by
    Asterisk, trunk after trunk while one is unavailable or congested;
    record on ``call`` how it ended (CANCEL if it never reached a Dial)."""
    try:
        channel.set("ASTBILL_STATUS", OK)
        channel.set("ASTBILL_MAXSECS", call.max_secs)
        if settings["warning_secs"]:
            channel.set("LIMIT_WARNING_FILE", settings["warning_sound"])
        if announce != "none":
            # No time the caller is up before the Dial is talk time.
            up_before, problems = channel.announce(announcement(
                announce, grant.available, call.max_secs, settings["currency_unit"],
                settings["currency_cents"]), ANNOUNCE_SECS - PIECE_SECS, up_before)
            for problem in problems:
                log(channel, f"{call.uniqueid} {problem}")
    except (Hangup, AGIError):
        return call.end("CANCEL", 0)  # never dialled: released at once
    for route in grant.routes or [None]:
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
    outcome = channel.dial(data)
    if outcome is None:
        return False
    # ANSWEREDTIME counts from the caller's answer: a caller answered before
    # the Dial (IVR, PIN prompt) must not pay for that time, nor for what
    # it was told while it was up.
    dialstatus, up_ms, peer = outcome
    call.end(dialstatus, up_ms - before_ms, peer)
    return True


def refuse(channel, settings, status, reason):
    """For the dialplan: the status, the Q.850 cause, the prompt to play first."""
    channel.set("ASTBILL_STATUS", status)
    channel.set("ASTBILL_MAXSECS", 0)
    channel.set("ASTBILL_CAUSE", CAUSES[status])
    channel.set("ASTBILL_PROMPT", settings["refusal_prompts"].get(status, ""))
    log(channel, f"{status} {reason}")


def log(channel, message):
    channel.verbose(f"astbill: {message}")
