"""The credit ledger: reserve before the call, settle after it.

Authorization and settlement are each one transaction.  Authorization locks
the account row, so concurrent calls on one account reserve one after the
other and never spend more than the balance.  Settlement is keyed on the
call's uniqueid: whoever deletes the reservation settles the call, so doing
it twice (a retry, the spool, the sweeper) changes nothing the second time.
"""
import time

from .money import D
from .rating import Rate, prefixes_of

OK, NOFUNDS, NORATE, NOACCOUNT, INVALID, ERROR = (
    "OK", "NOFUNDS", "NORATE", "NOACCOUNT", "INVALID", "ERROR")

# What Asterisk's CDR calls each DIALSTATUS.
DISPOSITION = {"ANSWER": "ANSWERED", "BUSY": "BUSY", "NOANSWER": "NO ANSWER",
               "CANCEL": "NO ANSWER", "CONGESTION": "CONGESTION",
               "CHANUNAVAIL": "FAILED"}


def timestamp(epoch=None):
    """UTC 'YYYY-MM-DD HH:MM:SS', the form every stored time takes."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch))


class Decision:
    __slots__ = ("status", "max_secs", "late")

    def __init__(self, status, max_secs=0, late=False):
        self.status = status
        self.max_secs = max_secs
        self.late = late  # let through a database outage: billed afterwards


class Outcome:
    """How a call ended, as far as billing cares."""
    __slots__ = ("dialstatus", "talk_ms", "duration", "dstchannel", "end")

    def __init__(self, dialstatus, talk_ms, duration, dstchannel="", end=None):
        self.dialstatus = dialstatus
        self.talk_ms = talk_ms
        self.duration = duration
        self.dstchannel = dstchannel
        self.end = end if end is not None else time.time()

    @property
    def answered(self):
        return self.dialstatus == "ANSWER"


class Settlement:
    __slots__ = ("cost", "billsec", "repeated")

    def __init__(self, cost, billsec, repeated=False):
        self.cost = cost
        self.billsec = billsec
        self.repeated = repeated


class UnknownCall(Exception):
    """No call with that uniqueid was ever authorized."""


def find_rate(store, call):
    """The rate for the call's number in its account's tariff, or a refusal
    status (NOACCOUNT, NORATE): a missing rate is never a free call."""
    found = store.read(lambda tx: tx.account_rate(call.account, prefixes_of(call.number)))
    if found is None:
        return NOACCOUNT
    tariff, row = found
    if row is None:
        return NORATE
    return Rate(tariff, *row)


def reserve(store, call, rate, settings):
    """Lock the account, grant what its free balance covers, and record the
    reservation and the first half of the CDR -- or refuse with NOFUNDS."""
    places = settings["decimals"]

    def work(tx):
        locked = tx.lock_account(call.account)
        if locked is None:
            return Decision(NOACCOUNT)
        balance, reserved = locked
        available = balance - reserved
        max_secs = rate.max_secs(available, settings["max_call_secs"], places)
        if max_secs <= 0:
            return Decision(NOFUNDS)
        max_cost = rate.cost(max_secs, True, places)
        now = timestamp()
        tx.add_reservation(call.uniqueid, call.account, max_cost, max_secs, now)
        tx.open_cdr(dict(call.cdr, start=now, account=call.account, tariff=rate.tariff,
                         prefix=rate.prefix, rate=rate.per_min,
                         connect_fee=rate.connect_fee, min_secs=rate.min_secs,
                         increment=rate.increment, max_secs=max_secs, state="active"))
        return Decision(OK, max_secs)

    return store.atomic(work)


RESOLUTION = {None: ("settled", "call"), "release": ("released", "reaper"),
              "charge": ("charged", "reaper")}


def settle(store, uniqueid, outcome, places, policy=None):
    """Charge the call's real cost, complete its CDR, drop its reservation.

    The sweeper settles calls nobody is left to report on with a
    ``policy``: "release" charges nothing, "charge" the reserved amount.
    """
    state, kind = RESOLUTION[policy]

    def work(tx):
        terms = tx.call_terms(uniqueid)
        if terms is None:
            raise UnknownCall(f"no call {uniqueid!r}")
        if terms["state"] != "active" or not tx.take_reservation(uniqueid):
            # Settled already -- perhaps a moment ago, by a settlement we
            # waited for: read what it charged as committed, not as first seen.
            cost, billsec = tx.final_charge(uniqueid)
            return Settlement(cost, billsec, repeated=True)
        rate = Rate(terms["tariff"], terms["prefix"], "", terms["rate"],
                    terms["connect_fee"], terms["min_secs"], terms["increment"])
        if policy == "charge":
            billsec, cost = terms["max_secs"], terms["max_cost"]
        elif policy == "release":
            billsec, cost = 0, rate.cost(0, False, places)
        else:
            billsec, cost = charge_for(rate, outcome, terms["max_secs"], places)
        complete(tx, uniqueid, terms["account"], outcome, billsec, cost, state, kind,
                 release=terms["max_cost"])
        return Settlement(cost, billsec)

    return store.atomic(work)


def bill_late(store, call, outcome, places):
    """Bill a call that an operator let through a database outage
    (on_db_error: allow) without a reservation, once the database is back.

    With no account or no rate the call cannot be charged: its CDR is
    marked 'unbilled' for the audit to report, never silently free.
    """
    known = store.read(lambda tx: tx.call_terms(call.uniqueid))
    if known is not None and known["state"] == "active":
        # Authorized after all: its commit reached the database, the reply
        # did not.  Settle it as any reserved call.
        return settle(store, call.uniqueid, outcome, places)
    rate = find_rate(store, call)
    rated = isinstance(rate, Rate)

    def work(tx):
        terms = tx.call_terms(call.uniqueid)
        if terms is not None:
            return Settlement(terms["cost"], terms["billsec"], repeated=True)
        billed = rate if rated else Rate("", "", "", D(0), D(0), 0, 1)
        tx.open_cdr(dict(call.cdr, start=timestamp(call.started), account=call.account,
                         tariff=billed.tariff, prefix=billed.prefix, rate=billed.per_min,
                         connect_fee=billed.connect_fee, min_secs=billed.min_secs,
                         increment=billed.increment, max_secs=call.max_secs, state="active"))
        billsec, cost = charge_for(billed, outcome, call.max_secs, places)
        complete(tx, call.uniqueid, call.account, outcome, billsec, cost,
                 "late" if rated else "unbilled", "call")
        return Settlement(cost, billsec)

    return store.atomic(work)


def charge_for(rate, outcome, max_secs, places):
    """(billsec, cost) of a call: its talk time, never beyond what was granted."""
    billsec = min(outcome.talk_ms // 1000, max_secs) if outcome.answered else 0
    return billsec, rate.cost(billsec, outcome.answered, places)


def complete(tx, uniqueid, account, outcome, billsec, cost, state, kind, release=None):
    """Charge the account (with its ledger row), release the call's
    reservation from it, and complete the CDR."""
    now = timestamp(outcome.end)
    if cost or release:
        tx.change_balance(account, -cost, kind, uniqueid, now, release)
    tx.close_cdr(uniqueid, {
        "answer": timestamp(outcome.end - billsec) if billsec else None,
        "end": now, "duration": outcome.duration, "billsec": billsec,
        "disposition": DISPOSITION.get(outcome.dialstatus, "FAILED"),
        "dstchannel": outcome.dstchannel[:80], "cost": cost, "state": state})
