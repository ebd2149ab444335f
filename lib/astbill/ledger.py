"""The credit ledger: what a call may spend, and what it spent.

Two doors for the call flow: ``authorize`` before the Dial and ``settle``
after it.  Each opens its own storage session (none stays open while the
call is up), retries where retrying is right -- here and nowhere else --
and turns every failure into a named outcome.  When the database will not
take a settlement, the ledger hands it to the spool itself (``recovery``).

Authorization locks the account row, so concurrent calls on one account
reserve one after the other and never spend more than the balance.
Settlement is keyed on the call's uniqueid: whoever deletes the
reservation settles the call, so doing it twice (a retry, the spool, the
sweep) changes nothing the second time.
"""
import os
import time

from .config import dial_string
from .money import D
from .rating import Rate, prefixes_of
from .store import Busy, Conflict, StoreError, open_store

OK, NOFUNDS, NORATE, NOACCOUNT, INVALID, ERROR = (
    "OK", "NOFUNDS", "NORATE", "NOACCOUNT", "INVALID", "ERROR")

# What Asterisk's CDR calls each DIALSTATUS.
DISPOSITION = {"ANSWER": "ANSWERED", "BUSY": "BUSY", "NOANSWER": "NO ANSWER",
               "CANCEL": "NO ANSWER", "CONGESTION": "CONGESTION",
               "CHANUNAVAIL": "FAILED"}

# Retries: a deadlock or a cluster certification failure is run again
# whole, quickly; a settlement also waits out a short outage or a busy
# account before it is spooled.  An authorization never waits: the caller
# is listening to silence.
AUTHORIZE_TRIES = 5
SETTLE_TRIES = 3
SETTLE_PAUSE_SECS = 0.5   # times the try number, between settlement tries


def timestamp(epoch=None):
    """UTC 'YYYY-MM-DD HH:MM:SS', the form every stored time takes."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch))


def valid_uniqueid(text):
    return (0 < len(text) <= 150 and text.isascii()
            and text.replace(".", "").replace("-", "").replace("_", "").isalnum())


class CallRecord:
    """One call as billing knows it: the call flow fills it in, the spool
    keeps it on disk, the replay and the sweep settle from it.

    ``FIELDS`` is the whole record; a record read back from disk is checked
    against it (``from_dict``) like any other input.
    """
    FIELDS = {
        # who and what, from the channel
        "uniqueid": str, "account": str, "number": str, "started": int,
        "clid": str, "src": str, "dcontext": str, "channel": str,
        "accountcode": str, "linkedid": str,
        # what was granted: the whole Dial string, the limit, and whether
        # the call was let through a database outage (billed afterwards)
        "dial": str, "max_secs": int, "late": bool,
        # how it ended (ended = 0 while it has not)
        "dialstatus": str, "talk_ms": int, "duration": int, "dstchannel": str, "ended": int,
    }
    __slots__ = tuple(FIELDS)
    LONGEST = {"dial": 4096}

    def __init__(self, **values):
        for name, kind in self.FIELDS.items():
            setattr(self, name, values.pop(name, kind()))
        if values:
            raise TypeError(f"unknown call record fields: {', '.join(sorted(values))}")

    def end(self, dialstatus, talk_ms, dstchannel=""):
        """Record how the call ended, now."""
        self.ended = int(time.time())
        self.dialstatus = dialstatus
        self.talk_ms = max(talk_ms, 0)
        self.duration = max(self.ended - self.started, 0)
        self.dstchannel = dstchannel

    @property
    def answered(self):
        return self.dialstatus == "ANSWER"

    def as_dict(self):
        return {name: getattr(self, name) for name in self.FIELDS}

    @classmethod
    def from_dict(cls, data):
        """A record from untrusted data (a spool file), or ValueError."""
        if not isinstance(data, dict) or set(data) != set(cls.FIELDS):
            raise ValueError("not a call record: wrong fields")
        for name, kind in cls.FIELDS.items():
            value = data[name]
            if type(value) is not kind:  # exact: no bool for int, no float
                raise ValueError(f"{name} must be {kind.__name__}")
            if kind is int and not 0 <= value < 2 ** 40:
                raise ValueError(f"{name} out of range")
            if kind is str and (len(value) > cls.LONGEST.get(name, 255) or "\0" in value):
                raise ValueError(f"{name} too long")
        if not valid_uniqueid(data["uniqueid"]) or not data["account"]:
            raise ValueError("bad uniqueid or account")
        return cls(**data)

    def cdr(self):
        """The CDR columns known when the call is authorized."""
        return {"uniqueid": self.uniqueid, "start": timestamp(self.started), "clid": self.clid,
                "src": self.src, "dst": self.number, "dcontext": self.dcontext,
                "channel": self.channel, "lastapp": "Dial", "lastdata": self.dial[:255],
                "accountcode": self.accountcode, "linkedid": self.linkedid,
                "account": self.account, "max_secs": self.max_secs}


class Grant:
    """The answer to an authorization: ``how`` it went (authorized, let
    through, refused, busy, outage), ``status`` for ASTBILL_STATUS, the
    seconds granted, and a one-line reason for Asterisk's log."""
    __slots__ = ("how", "status", "max_secs", "reason")

    def __init__(self, how, status, max_secs=0, reason=""):
        self.how = how
        self.status = status
        self.max_secs = max_secs
        self.reason = reason


class Settlement:
    """What became of an ended call: ``how`` is settled, repeated (settled
    before), spooled (for replay) or unrecorded (only Asterisk's log has it)."""
    __slots__ = ("how", "cost", "billsec", "reason")

    def __init__(self, how, cost=None, billsec=0, reason=""):
        self.how = how
        self.cost = cost
        self.billsec = billsec
        self.reason = reason


class UnknownCall(Exception):
    """No call with that uniqueid was ever authorized."""


# -- the two doors ---------------------------------------------------------------

def authorize(settings, call):
    """Reserve what ``call`` may spend and set its ``max_secs``: a Grant.

    A busy account (lock wait, or deadlocks that kept coming) is refused
    even with on_db_error: allow -- it is not an outage.
    """
    try:
        return attempt(settings, lambda store: reserve(store, call, settings), AUTHORIZE_TRIES)
    except Busy as exc:
        return Grant("busy", ERROR, reason=f"account {call.account} is busy: {exc}")
    except Conflict:
        return Grant("refused", ERROR, reason=f"call {call.uniqueid} was authorized already")
    except StoreError as exc:
        if settings["on_db_error"] != "allow":
            return Grant("outage", ERROR, reason=str(exc))
        return let_through(settings, call, exc)


def settle(settings, call):
    """Charge the ended ``call`` its real cost: a Settlement.

    Tried a few times through a short outage or a busy account; then the
    spool takes it, and the next call or the sweep replays it.
    """
    def work(store):
        if call.late:
            return bill_late(store, call, settings["decimals"])
        return settle_call(store, call, settings["decimals"])
    try:
        return attempt(settings, work, SETTLE_TRIES, settling=True)
    except StoreError as exc:
        from . import recovery
        return recovery.spool(settings, call, exc)


def attempt(settings, work, tries, settling=False):
    """``work(store)`` in a fresh storage session, tried up to ``tries`` times.

    Run again: a deadlock or certification failure (at once, jittered);
    when ``settling``, also an outage or a lock wait (after a pause).
    """
    for number in range(1, tries + 1):
        store = open_store(settings)
        try:
            return work(store)
        except (Conflict, UnknownCall):
            raise
        except StoreError as exc:
            retry = isinstance(exc, Busy) and exc.retryable
            if number == tries or not (retry or settling):
                raise
            pause = SETTLE_PAUSE_SECS * number if settling and not retry else 0.0
        finally:
            store.close()
        import random  # rare: only after a failure
        time.sleep(pause + random.uniform(0.005, 0.02) * number)


def settle_time_bound(settings):
    """The longest ``settle`` can keep trying before it spools: the sweep's
    grace must be longer, or it could release a call being settled."""
    from .store.mysql import database_urls
    nodes = 1 if str(settings["database"]).startswith("sqlite://") else len(
        database_urls(settings["database"]))
    one_try = nodes * settings["connect_timeout_secs"] + settings["lock_wait_secs"] + 5
    pauses = sum(SETTLE_PAUSE_SECS * n + 0.02 * n for n in range(1, SETTLE_TRIES))
    return SETTLE_TRIES * one_try + pauses


def let_through(settings, call, outage):
    """on_db_error: allow -- a short call now, billed when the database is
    back.  The spool must hold the call first, so that it will be billed;
    it also refuses a uniqueid it holds already."""
    from . import recovery
    call.late = True
    call.max_secs = settings["db_error_allow_secs"]
    call.dial = dial_string(settings, None, call.number)
    try:
        recovery.claim(settings, call)
    except FileExistsError:
        return Grant("refused", ERROR, reason=f"call {call.uniqueid} was let through already")
    except OSError as exc:
        return Grant("outage", ERROR, reason=f"{outage}; nor can the spool hold the call: {exc}")
    return Grant("let through", OK, call.max_secs, f"{outage}; allowing {call.max_secs}s,"
                                                    " billed later")


# -- the transactions ------------------------------------------------------------

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


def reserve(store, call, settings):
    """Lock the account, grant what its free balance covers, and record the
    reservation and the first half of the CDR -- or refuse."""
    rate = find_rate(store, call)
    if not isinstance(rate, Rate):
        return Grant("refused", rate, reason=f"account {call.account} to {call.number}")
    places = settings["decimals"]
    call.dial = dial_string(settings, rate.tariff, call.number)

    def work(tx):
        locked = tx.lock_account(call.account)
        if locked is None:
            return Grant("refused", NOACCOUNT, reason=f"account {call.account}")
        balance, reserved = locked
        max_secs = rate.max_secs(balance - reserved, settings["max_call_secs"], places)
        if max_secs <= 0:
            return Grant("refused", NOFUNDS, reason=f"account {call.account} to {call.number}")
        call.max_secs = max_secs
        tx.add_reservation(call.uniqueid, call.account, rate.cost(max_secs, True, places), max_secs)
        tx.open_cdr(dict(call.cdr(), **rate_columns(rate), state="active"))
        return Grant("authorized", OK, max_secs)

    grant = store.atomic(work)
    note_lock_wait(call, store.lock_waited)
    return grant


def settle_call(store, call, places, policy=None):
    """Charge the call's real cost, complete its CDR, drop its reservation.

    The sweep settles calls nobody is left to report on with a ``policy``:
    "release" charges nothing, "charge" the reserved amount.
    """
    state, kind = RESOLUTION[policy]

    def work(tx):
        terms = tx.call_terms(call.uniqueid)
        if terms is None:
            raise UnknownCall(f"no call {call.uniqueid!r}")
        if terms["state"] != "active" or not tx.take_reservation(call.uniqueid):
            # Settled already -- perhaps a moment ago, by a settlement we
            # waited for: read what it charged as committed, not as first seen.
            cost, billsec = tx.final_charge(call.uniqueid)
            return Settlement("repeated", cost, billsec)
        rate = Rate(terms["tariff"], terms["prefix"], "", terms["rate"],
                    terms["connect_fee"], terms["min_secs"], terms["increment"])
        if policy == "charge":
            billsec, cost = terms["max_secs"], terms["max_cost"]
        elif policy == "release":
            billsec, cost = 0, D(0)
        else:
            billsec, cost = charge_for(rate, call, terms["max_secs"], places)
        complete(tx, call, terms["account"], billsec, cost, state, kind, release=terms["max_cost"])
        return Settlement("settled", cost, billsec)

    return store.atomic(work)


RESOLUTION = {None: ("settled", "call"), "release": ("released", "reaper"),
              "charge": ("charged", "reaper")}


def bill_late(store, call, places, policy=None):
    """Bill a call let through a database outage, without a reservation,
    once the database is back.

    With no account or no rate the call cannot be charged: its CDR is
    marked 'unbilled' for the audit to report, never silently free.  The
    sweep bills one whose end nobody recorded with a ``policy``.
    """
    known = store.read(lambda tx: tx.call_terms(call.uniqueid))
    if known is not None and known["state"] == "active":
        # Authorized after all: its commit reached the database, the reply
        # did not.  Settle it as any reserved call.
        return settle_call(store, call, places)
    rate = find_rate(store, call)
    billed = rate if isinstance(rate, Rate) else Rate("", "", "", D(0), D(0), 0, 1)

    def work(tx):
        terms = tx.call_terms(call.uniqueid)
        if terms is not None:
            return Settlement("repeated", terms["cost"], terms["billsec"])
        tx.open_cdr(dict(call.cdr(), **rate_columns(billed), state="active"))
        billsec, cost = charge_for(billed, call, call.max_secs, places)
        state, kind = RESOLUTION[policy] if policy else ("late", "call")
        complete(tx, call, call.account, billsec, cost,
                 state if billed is rate else "unbilled", kind)
        return Settlement("settled", cost, billsec)

    return store.atomic(work)


def rate_columns(rate):
    return {"tariff": rate.tariff, "prefix": rate.prefix, "rate": rate.per_min,
            "connect_fee": rate.connect_fee, "min_secs": rate.min_secs,
            "increment": rate.increment}


def charge_for(rate, call, max_secs, places):
    """(billsec, cost) of a call: its talk time, never beyond what was granted."""
    billsec = min(call.talk_ms // 1000, max_secs) if call.answered else 0
    return billsec, rate.cost(billsec, call.answered, places)


def complete(tx, call, account, billsec, cost, state, kind, release=None):
    """Charge the account (with its ledger row), release the call's
    reservation from it, and complete the CDR."""
    now = timestamp(call.ended)
    if cost or release:
        tx.change_balance(account, -cost, kind, call.uniqueid, now, release)
    tx.close_cdr(call.uniqueid, {
        "answer": timestamp(call.ended - billsec) if billsec else None,
        "end": now, "duration": call.duration, "billsec": billsec,
        "disposition": DISPOSITION.get(call.dialstatus, "FAILED"),
        "dstchannel": call.dstchannel[:80], "cost": cost, "state": state})


def note_lock_wait(call, seconds):
    """With ASTBILL_TIMINGS=FILE, note how long the account lock took
    (one line per call), to measure contention under load."""
    path = os.environ.get("ASTBILL_TIMINGS")
    if path:
        with open(path, "a", encoding="ascii") as f:
            f.write(f"{call.uniqueid} {seconds * 1000:.3f}\n")
