"""One outbound call, top to bottom: identify, authorize, dial, settle.

This module knows the story of a call and nothing of SQL: the credit
ledger (``credit``) and the database (``store``) are behind narrow calls,
and the channel (``agi``) is the only way to Asterisk.
"""
import os
import time

from . import credit, spool
from .agi import AGIError, Hangup
from .credit import ERROR, INVALID, NOACCOUNT, OK
from .money import fmt
from .rating import normalize_destination
from .store import Conflict, LockTimeout, StoreError, open_store

SETTLE_ATTEMPTS = 3


class Refused(Exception):
    """The call may not be made; ``status`` goes to ASTBILL_STATUS."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status


class Call:
    """What the channel told us about the call, checked."""
    __slots__ = ("uniqueid", "account", "number", "cdr", "started", "pre_up_ms",
                 "pre_read_at", "max_secs")

    def record(self):
        """What billing the call later needs (credit.bill_late), as plain data."""
        return {"uniqueid": self.uniqueid, "account": self.account, "number": self.number,
                "cdr": self.cdr, "started": self.started, "max_secs": self.max_secs}


def handle(channel, settings, target=None):
    """Bill one call on ``channel`` to ``target`` (default: the extension).

    The dialplan learns the outcome from ASTBILL_STATUS, and Asterisk's log
    gets one line.  Returns the Settlement when the call was settled now.
    Nothing the database does escapes; a closed AGI pipe (Hangup) or
    nonsense from Asterisk (AGIError) does, for main to report.
    """
    try:
        call = identify(channel, settings, target)
        decision = authorize(call, settings)
    except Refused as refusal:
        return refuse(channel, refusal.status, str(refusal))
    except LockTimeout as exc:
        # A busy account is not an outage: never let it bypass its balance.
        return refuse(channel, ERROR, str(exc))
    except Conflict:
        return refuse(channel, ERROR, f"call {call.uniqueid} was authorized already")
    except StoreError as exc:
        if settings["on_db_error"] != "allow":
            return refuse(channel, ERROR, str(exc))
        decision = let_through(channel, call, settings, exc)
    if decision.status != OK:
        return refuse(channel, decision.status, f"account {call.account} to {call.number}")
    call.max_secs = decision.max_secs

    try:
        outcome = dial(channel, call, decision, settings)
    except (Hangup, AGIError) as exc:
        # Dial may have run, but Asterisk can no longer say how it went; the
        # reservation stays for the sweeper, which knows the longest it could
        # have lasted.
        log(channel, f"{call.uniqueid} left for the sweeper: {exc}")
        return
    try:
        settlement = settle(call, outcome, decision.late, settings)
    except OSError as exc:
        return log(channel, f"{call.uniqueid} neither settled nor spooled, left for the sweeper"
                            f" (DIALSTATUS {outcome.dialstatus}, talk {outcome.talk_ms} ms): {exc}")
    if settlement is None:
        return log(channel, f"{call.uniqueid} database unavailable, settlement spooled")
    channel.set("ASTBILL_COST", fmt(settlement.cost, settings["decimals"]))
    channel.set("ASTBILL_BILLSEC", settlement.billsec)
    return settlement


def identify(channel, settings, target=None):
    """The call's account, number and CDR fields, from the AGI environment."""
    env = channel.env
    call = Call()
    call.started = time.time()
    call.uniqueid = env.get("agi_uniqueid", "")
    if not (0 < len(call.uniqueid) <= 150 and call.uniqueid.isascii()
            and call.uniqueid.replace(".", "").replace("-", "").replace("_", "").isalnum()):
        raise Refused(INVALID, f"bad uniqueid {call.uniqueid[:40]!r}")
    source = settings["account_source"]
    variable = source[9:] if source.startswith("variable:") else None
    # One round trip for all we need from the channel before dialling.
    wanted = "${CHANNEL(state)}|${CDR(billsec,f)}|${CHANNEL(linkedid)}"
    state, up_secs, linkedid, account_var = (
        channel.get_full(wanted + ("|${%s}" % variable if variable else "")).split("|", 3) + [""] * 3)[:4]
    call.pre_read_at = time.monotonic()
    call.pre_up_ms = seconds_to_ms(up_secs) if state == "Up" else 0
    if state == "Up" and not call.pre_up_ms:
        log(channel, f"{call.uniqueid} answered before the Dial, but CDR(billsec,f) is"
                     " unavailable: the time before the Dial will be billed")

    callerid = known(env.get("agi_callerid", ""))
    call.account = account_var if variable else (
        callerid if source == "callerid" else env.get("agi_accountcode", ""))
    if not call.account:
        raise Refused(NOACCOUNT, "no account on the channel")
    if len(call.account) > 80 or not call.account.isprintable():
        raise Refused(INVALID, f"bad account {call.account[:40]!r}")

    dialled = target or env.get("agi_extension", "")
    call.number = normalize_destination(dialled, settings["international_prefix"],
                                        settings["national_prefix"], settings["country_code"])
    if call.number is None:
        raise Refused(INVALID, f"bad destination {dialled[:40]!r}")

    name = known(env.get("agi_calleridname", ""))
    call.cdr = {"uniqueid": call.uniqueid, "clid": f'"{name}" <{callerid}>'[:80],
                "src": callerid[:80], "dst": call.number, "dcontext": env.get("agi_context", "")[:80],
                "channel": env.get("agi_channel", "")[:80], "lastapp": "Dial",
                "accountcode": env.get("agi_accountcode", "")[:80],
                "linkedid": (linkedid or call.uniqueid)[:150]}
    return call


def known(value):
    """Asterisk writes 'unknown' for an absent caller ID."""
    return "" if value == "unknown" else value


def authorize(call, settings):
    store = open_store(settings)
    try:
        rate = credit.find_rate(store, call)
        if not isinstance(rate, credit.Rate):
            return credit.Decision(rate)
        call.cdr["lastdata"] = dial_string(call, settings, rate.tariff)[:255]
        decision = credit.reserve(store, call, rate, settings)
        record_lock_wait(call, store.lock_waited)
        return decision
    finally:
        # No connection stays open while the call is up.
        store.close()


def dial(channel, call, decision, settings):
    """Dial with the granted limit enforced by Asterisk; how the call ended."""
    not_dialled = credit.Outcome("CANCEL", 0, int(time.time() - call.started))
    dial_sent = False
    try:
        channel.set("ASTBILL_STATUS", OK)
        channel.set("ASTBILL_MAXSECS", decision.max_secs)
        if channel.hungup:
            return not_dialled
        dial_started = time.monotonic()
        dial_sent = True
        channel.exec("Dial", dial_args(call, decision, settings))
    except Hangup as exc:
        if dial_sent and exc.sent:
            raise
        return not_dialled  # the caller left before Dial was asked for
    # Dial's result is -1 after every answered call without the g option,
    # and after a caller hangup; DIALSTATUS says what happened.
    fields = channel.get_full("${DIALSTATUS}|${ANSWEREDTIME_MS}|${ANSWEREDTIME}|"
                              "${CDR(billsec,f)}|${DIALEDPEERNAME}").split("|", 4)
    fields += [""] * (5 - len(fields))
    dialstatus, answered_ms, answered_s, billsec_f, peer = fields
    up_ms = first_time_ms(answered_ms, answered_s, billsec_f)
    if dialstatus == "" and (answered_ms or answered_s):
        # Dial sets these only for an answered call: never let a missing
        # status make a talked call free.
        dialstatus = "ANSWER"
    # ANSWEREDTIME counts from the caller's answer: a caller answered before
    # the Dial (IVR, PIN prompt) must not pay for that time.
    pre_up = 0
    if call.pre_up_ms:
        pre_up = call.pre_up_ms + int((dial_started - call.pre_read_at) * 1000)
    talk_ms = max(up_ms - pre_up, 0)
    return credit.Outcome(dialstatus, talk_ms, int(time.time() - call.started), peer)


def let_through(channel, call, settings, exc):
    """on_db_error: allow -- a short call now, billed when the database is back."""
    seconds = settings["db_error_allow_secs"]
    log(channel, f"{call.uniqueid} database unavailable, allowing {seconds}s billed later: {exc}")
    call.cdr["lastdata"] = dial_string(call, settings, None)[:255]
    return credit.Decision(OK, seconds, late=True)


def settle(call, outcome, late, settings):
    """Settle now; if the database will not take it, spool it for replay."""
    places = settings["decimals"]
    store = open_store(settings)
    try:
        for attempt in range(SETTLE_ATTEMPTS):
            try:
                if late:
                    return credit.bill_late(store, call, outcome, places)
                return credit.settle(store, call.uniqueid, outcome, places)
            except StoreError:
                if attempt + 1 == SETTLE_ATTEMPTS:
                    break
                store.close()
                time.sleep(0.5 * (attempt + 1))
    finally:
        store.close()
    spool.write(settings["spool_dir"], call.uniqueid, outcome, call.record() if late else None)
    return None


def dial_string(call, settings, tariff):
    template = settings["tariffs"].get(tariff, {}).get("dial") or settings["dial"]
    return template.format(number=call.number)


def dial_args(call, decision, settings):
    limit = f"L({decision.max_secs * 1000}"
    warning = settings["warning_secs"]
    if 0 < warning < decision.max_secs:
        limit += f":{warning * 1000}"
    return f"{call.cdr['lastdata']},{settings['ring_timeout']},{settings['dial_options']}{limit})"


def record_lock_wait(call, seconds):
    """With ASTBILL_TIMINGS=FILE, note how long the account lock took
    (one line per call), to measure contention under load."""
    path = os.environ.get("ASTBILL_TIMINGS")
    if path:
        with open(path, "a", encoding="ascii") as f:
            f.write(f"{call.uniqueid} {seconds * 1000:.3f}\n")


def refuse(channel, status, reason):
    channel.set("ASTBILL_STATUS", status)
    channel.set("ASTBILL_MAXSECS", 0)
    log(channel, f"{status} {reason}")


def log(channel, message):
    channel.verbose(f"astbill: {message}")


def seconds_to_ms(text):
    """'3.503239' (CDR billsec,f) -> 3503; '' -> 0."""
    whole, _, frac = text.partition(".")
    if not whole.isdigit() or (frac and not frac.isdigit()):
        return 0
    return int(whole) * 1000 + int((frac + "000")[:3])


def first_time_ms(answered_ms, answered_s, billsec_f):
    """The caller's answered time in ms, from the best source Asterisk gave."""
    if answered_ms.isdigit():
        return int(answered_ms)
    if answered_s.isdigit():
        return int(answered_s) * 1000
    return seconds_to_ms(billsec_f)
