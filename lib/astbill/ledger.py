"""The credit ledger: what a call may spend, and what it spent.

Two doors for the call flow: ``authorize`` before the Dial and ``settle``
after it.  Each opens its own storage session (none stays open while the
call is up), retries where retrying is right -- here and nowhere else --
and turns every failure into a named outcome.  When the database will not
take a settlement, the ledger keeps it in the spool itself (the files are
``store.spool``'s; the replay is ``recovery``'s).

Authorization locks the account row, so concurrent calls on one account
reserve one after the other and never spend more than the balance.
Settlement is keyed on the call's uniqueid: whoever deletes the
reservation settles the call, so doing it twice (a retry, the spool, the
sweep) changes nothing the second time.
"""
import os
import time

from .money import D
from .rating import Clock, Plan, Rate, prefixes_of
from .rating.routes import Route, order_routes, usable_routes
from .store import Busy, Conflict, StoreError, open_store
from .store.spool import (BAD, CLAIM_LOCK, LEGACY, ensure_dir, holds, read_json, records,
                          spool_dirs, write)

OK, NOFUNDS, NORATE, NOROUTE, MAXCALLS, NOACCOUNT, INVALID, ERROR = (
    "OK", "NOFUNDS", "NORATE", "NOROUTE", "MAXCALLS", "NOACCOUNT", "INVALID", "ERROR")

# The Q.850 cause the dialplan hangs a refused call up with (ASTBILL_CAUSE),
# chosen for the SIP answer chan_pjsip and chan_sip give it (their
# hangup_cause2sip): 403, 404, 503, 486, 484, 500 -- INSTALL has the table.
CAUSES = {NOFUNDS: 21, NOACCOUNT: 21, NORATE: 1, NOROUTE: 34, MAXCALLS: 17, INVALID: 28,
          ERROR: 38}

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
# A call may be answered this long after its authorization, beyond the ring
# timeout: the Dial is sent, the trunk takes its time to set up.
ANSWER_SLACK_SECS = 10
# The balance and minutes said before the Dial (``announce``) take at most
# about this long, which delays the answer as much.
ANNOUNCE_SECS = 20


def timestamp(epoch=None):
    """UTC 'YYYY-MM-DD HH:MM:SS', the form every stored time takes."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch))


def epoch(stamp):
    """Seconds since the epoch of a stored 'YYYY-MM-DD HH:MM:SS' (UTC)."""
    import calendar
    return calendar.timegm(time.strptime(str(stamp), "%Y-%m-%d %H:%M:%S"))


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
        # what was granted: the whole Dial string (of the trunk dialled
        # last, if any, and the id of that trunk's deck that priced it), the
        # limit, and whether the call was let through a database outage
        # (billed afterwards)
        "dial": str, "trunk": str, "trunk_deck": int, "max_secs": int, "late": bool,
        # how it ended (ended = 0 while it has not)
        "dialstatus": str, "talk_ms": int, "duration": int, "dstchannel": str, "ended": int,
    }
    __slots__ = tuple(FIELDS)
    LONGEST = {"dial": 4096}
    # Fields a record written by an earlier version lacks: their defaults
    # (0, "") mean "unknown", and settling falls back to what the CDR says.
    ADDED = frozenset({"trunk_deck"})

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
        if not isinstance(data, dict) or not (
                set(cls.FIELDS) - cls.ADDED <= set(data) <= set(cls.FIELDS)):
            raise ValueError("not a call record: wrong fields")
        data = {name: data.get(name, kind()) for name, kind in cls.FIELDS.items()}
        for name, kind in cls.FIELDS.items():
            value = data[name]
            if type(value) is not kind:  # exact: no bool for int, no float
                raise ValueError(f"{name} must be {kind.__name__}")
            if kind is int and not 0 <= value < 2 ** 40:
                raise ValueError(f"{name} out of range")
            if kind is str and (len(value) > cls.LONGEST.get(name, 255) or "\0" in value):
                raise ValueError(f"{name} too long")
        if not valid_uniqueid(data["uniqueid"]) or (data["late"] and not data["account"]):
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
    __slots__ = ("how", "status", "max_secs", "reason", "routes", "available")

    def __init__(self, how, status, max_secs=0, reason="", routes=None, available=None):
        self.how = how
        self.status = status
        self.max_secs = max_secs
        self.reason = reason
        self.routes = routes or []  # trunks in dial order; none: the dial template
        # What the account could spend before this call (None: not known).
        self.available = available


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
    if holds(settings, call.uniqueid):  # its settlement waits for the database
        return Grant("refused", ERROR, reason=f"call {call.uniqueid} was let through already")
    try:
        return attempt(settings, lambda store: reserve(store, call, settings), AUTHORIZE_TRIES)
    except Busy as exc:
        return Grant("busy", ERROR, reason=f"account {call.account} is busy: {exc}")
    except Conflict:
        return Grant("refused", ERROR, reason=f"call {call.uniqueid} was authorized already")
    except StoreError as exc:
        if exc.in_doubt:
            return Grant("outage", ERROR, reason=f"{exc}; {release_in_doubt(settings, call)}")
        if settings["on_db_error"] != "allow":
            return Grant("outage", ERROR, reason=str(exc))
        return let_through(settings, call, exc)


def release_in_doubt(settings, call):
    """The reservation's commit lost its reply, so it may hold: the call is
    refused and its reservation released now (or its release spooled),
    never left for a sweep that might charge it in full.  What was done.

    The server may still be working through that transaction (its writes
    go with the COMMIT, and may wait for a lock): it holds the account's
    row until it ends, so the release takes that lock first and then sees
    it committed or not."""
    call.end("CANCEL", 0)

    def release(store):
        store.atomic(lambda tx: tx.lock_account(call.account))
        return settle_call(store, call, settings)
    try:
        attempt(settings, release, 1)
    except UnknownCall:
        return "it had not committed"
    except StoreError as exc:
        return spool(settings, call, exc).reason
    return "it had committed and is released"


def settle(settings, call):
    """Charge the ended ``call`` its real cost: a Settlement.

    Tried a few times through a short outage or a busy account; then the
    spool takes it, and the next call or the sweep replays it.  So does a
    call the database does not know (yet: a cluster node a moment behind);
    a replay that still finds none sets it aside for the audit.
    """
    def work(store):
        if call.late:
            return bill_late(store, call, settings)
        return settle_call(store, call, settings)
    try:
        return attempt(settings, work, SETTLE_TRIES, settling=True)
    except (StoreError, UnknownCall) as exc:
        return spool(settings, call, exc)


def attempt(settings, work, tries, settling=False):
    """``work(store)`` in a fresh storage session, tried up to ``tries`` times.

    Run again at once (jittered): a deadlock or certification failure, and
    a kept connection found dead by its first statement (on a new one);
    when ``settling``, also an outage or a lock wait (after a pause).
    """
    for number in range(1, tries + 1):
        store = open_store(settings)
        try:
            return work(store)
        except (Conflict, UnknownCall):
            raise
        except StoreError as exc:
            retry = isinstance(exc, Busy) and exc.retryable or exc.unchecked
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
    call.late = True
    call.max_secs = settings["db_error_allow_secs"]
    call.dial = dial_string(settings, None, call.number)
    try:
        claim(settings, call)
    except FileExistsError:
        return Grant("refused", ERROR, reason=f"call {call.uniqueid} was let through already")
    except TooManyCalls:
        return Grant("refused", MAXCALLS, reason=f"{outage}; account {call.account} has"
                     f" {settings['db_error_max_calls']} calls let through already (db_error_max_calls)")
    except OSError as exc:
        return Grant("outage", ERROR, reason=f"{outage}; nor can the spool hold the call: {exc}")
    return Grant("let through", OK, call.max_secs, f"{outage}; allowing {call.max_secs}s,"
                                                    " billed later")


# -- the transactions ------------------------------------------------------------

def reserve(store, call, settings):
    """Rate the call and choose its trunks, then lock the account, grant
    what its money covers, and record the reservation and the first half of
    the CDR -- or refuse."""
    priced = price(store, call, settings)
    if isinstance(priced, Grant):
        return priced
    sell, routes, deck = priced

    def work(tx):
        answer, max_cost = decide(call, sell, routes, tx.lock_account(call.account), settings)
        if answer.status == OK:
            tx.add_reservation(call.uniqueid, call.account, max_cost, call.max_secs)
            tx.open_cdr(dict(call.cdr(), **rate_columns(sell.rate_at(call.started)),
                             deck=deck, trunk_deck=call.trunk_deck or None,
                             route_decks=route_decks(answer.routes), state="active"))
        return answer

    answer = store.atomic(work)
    note_lock_wait(call, store.lock_waited)
    return answer


def decide(call, sell, routes, account, settings):
    """(Grant, the most it may cost) for a priced call, given its account's
    (balance, reserved, credit limit, call cap, calls in progress) or None.
    Sets the call's max_secs when it may go ahead."""
    if account is None:
        return Grant("refused", NOACCOUNT, reason=f"account {call.account}"), None
    balance, reserved, credit_limit, max_calls, calls = account
    if max_calls and calls >= max_calls:
        return Grant("refused", MAXCALLS, reason=f"account {call.account} has {calls} calls"
                                                 f" in progress, its cap"), None
    available = balance + credit_limit - reserved
    max_secs, max_cost = grant(sell, call, available, settings, dials(routes, settings))
    if max_secs <= 0:
        return Grant("refused", NOFUNDS, reason=f"account {call.account} to {call.number}"), None
    if routes:
        routes = usable_routes(routes, max_secs, settings["lcr_max_trunks"])
        if not routes:
            return Grant("refused", NOROUTE, reason=f"no trunk carries {call.number} without"
                                                    f" a loss"), None
        call.trunk, call.dial = routes[0].trunk, routes[0].dial_string(call.number)
        call.trunk_deck = routes[0].deck
    call.max_secs = max_secs
    return Grant("authorized", OK, max_secs, routes=routes, available=available), max_cost


def price(store, call, settings):
    """(sell Plan, routes, sell deck id) of the call -- its tariff's rates
    for the number, the trunks that can carry it, as ``order_routes`` gives
    them, or None (no trunk is defined), and the deck the rates come from --
    or a refusing Grant.  Sets the call's Dial string when no trunk is
    defined; ``decide`` chooses among the trunks once the grant is known.
    This is done before the account is locked."""
    at, prefixes = timestamp(call.started), prefixes_of(call.number)
    found = store.read(lambda tx: tx.call_prices(call.account, prefixes, at))
    if found is None:
        return Grant("refused", NOACCOUNT, reason=f"account {call.account}")
    tariff, rows, deck, trunks = found
    if not rows:
        return Grant("refused", NORATE, reason=f"account {call.account} to {call.number}")
    sell = plan(rows, tariff, settings)
    routes = usable_trunks(trunks, call.started, settings)
    if routes == []:
        return Grant("refused", NOROUTE, reason=f"no trunk carries {call.number}")
    if routes is None:
        call.dial = dial_string(settings, tariff, call.number)
    else:
        # Judged up to the longest grant, for an answer while any trunk
        # that may be tried rings: the grant's own window (``dials``).
        routes = order_routes(routes, sell, settings["lcr_allow_loss"], settings["lcr_max_trunks"],
                              call.started, answer_window(settings, dials(routes, settings)),
                              settings["max_call_secs"], settings["decimals"],
                              shortest_talk(settings))
    return sell, routes, deck


def grant(sell, call, available, settings, dials=1):
    """(max_secs, max_cost) for ``available`` money: see Plan.grant."""
    return sell.grant(call.started, answer_window(settings, dials), available,
                      settings["max_call_secs"], settings["decimals"])


def dials(routes, settings):
    """How many Dials a call may make: one per trunk that may be tried, at
    most lcr_max_trunks (the same before and after ``order_routes``, which
    leaves out only trunks after that many)."""
    return min(len(routes), settings["lcr_max_trunks"]) if routes else 1


def answer_window(settings, dials):
    """How long after its authorization a call may be answered: each Dial
    (one per trunk tried) may ring for ring_timeout, after an announcement.
    The same for every call, announced or not (ASTBILL_ANNOUNCE may turn
    it on for one), so that the sweep prices a call by its own window."""
    return settings["ring_timeout"] * max(dials, 1) + ANSWER_SLACK_SECS + ANNOUNCE_SECS


def quote(settings, store, account, number):
    """What a call to ``number`` on ``account`` would get now, reserving
    nothing: (Grant, sell Rate in force or None)."""
    call = CallRecord(uniqueid="quote", account=account, number=number, started=int(time.time()))
    priced = price(store, call, settings)
    if isinstance(priced, Grant):
        return priced, None
    sell, routes, _ = priced
    rows = store.read(lambda tx: tx.accounts(account))
    answer, _ = decide(call, sell, routes, rows[0][2:] if rows else None, settings)
    return answer, sell.rate_at(call.started)


def plan(rows, owner, settings):
    """The Plan of one prefix's price rows (store.Tx._longest)."""
    return Plan([(days, start, end, Rate(owner, prefix, destination, per_min, fee, least, inc))
                 for prefix, destination, days, start, end, per_min, fee, least, inc in rows],
                clock(settings["timezone"]))


def clock(timezone, _clocks={}):
    """One Clock per timezone and process: a timezone is read once."""
    if timezone not in _clocks:
        _clocks[timezone] = Clock(timezone)
    return _clocks[timezone]


def usable_trunks(trunks, now, settings):
    """The enabled ``trunks`` (as Tx.trunk_prices gives them) with a rate
    for the number, each with its buy Plan; None when no trunk is defined
    at all (the dial templates apply), [] when none can carry the number."""
    if not trunks:
        return None
    usable = []
    for name, (dial, enabled, rows, deck) in trunks.items():
        if enabled and rows:
            buy = plan(rows, name, settings)
            usable.append(Route(name, dial, buy, buy.rate_at(now), deck))
    return usable


def settle_call(store, call, settings, policy=None):
    """Charge the call's real cost, complete its CDR, drop its reservation.

    The sweep settles calls nobody is left to report on with a ``policy``:
    "release" charges nothing, "charge" the reserved amount.  A call the
    sweep settled so while it was in fact still up is corrected to its real
    cost when its own settlement comes.
    """
    state, kind = RESOLUTION[policy]

    def work(tx):
        terms = tx.call_terms(call.uniqueid)
        if terms is None:
            raise UnknownCall(f"no call {call.uniqueid!r}")
        if terms["state"] in ("released", "charged") and policy is None and call.ended:
            return correct(tx, call, terms, settings)
        if terms["state"] != "active" or not tx.take_reservation(call.uniqueid):
            # Settled already -- perhaps a moment ago, by a settlement we
            # waited for: read what it charged as committed, not as first seen.
            cost, billsec = tx.final_charge(call.uniqueid)
            return Settlement("repeated", cost, billsec)
        if policy == "charge":
            billsec, cost = terms["max_secs"], terms["max_cost"]
        elif policy == "release":
            billsec, cost = 0, D(0)
        else:
            billsec, cost = real_charge(tx, call, terms, settings)
            # Never more than was reserved: only an answer outside the
            # ring window could make a dearer period's price exceed it.
            cost = min(cost, terms["max_cost"])
        buy = buy_cost(tx, call, terms, billsec, settings) if policy is None else None
        complete(tx, call, terms["account"], billsec, cost, state, kind,
                 release=terms["max_cost"], buy_cost=buy)
        return Settlement("settled", cost, billsec)

    return store.atomic(work)


def real_charge(tx, call, terms, settings):
    """(billsec, cost) of the call by the deck it was authorized with,
    whatever was imported since (a CDR from before version 5 names none:
    the tariff's deck in force at its start).  A call whose end nobody saw
    (the sweep, from Asterisk's CDR) is priced at the dearest answer its
    reservation covered.  With its deck gone, the CDR's own rate prices it."""
    if terms["deck"] is not None:
        rows = terms["prices"]
    else:
        rows = tx.tariff_prices(terms["tariff"], terms["prefix"], terms["start"])
    sell = plan(rows, terms["tariff"], settings) if rows else Plan(
        [(127, 0, 1440, Rate(terms["tariff"], terms["prefix"], "", terms["rate"],
                             terms["connect_fee"], terms["min_secs"], terms["increment"]))],
        clock("UTC"))
    if call.ended:
        return charge_for(sell, call, terms["max_secs"], settings)
    call.started = epoch(terms["start"])
    billsec = min(talk_secs(call, settings), terms["max_secs"]) if call.answered else 0
    call.ended = call.started + billsec
    if not call.answered:
        return billsec, D(0)
    return billsec, sell.worst_cost(call.started, answer_window(settings, settings["lcr_max_trunks"]),
                                    billsec, settings["decimals"])


def correct(tx, call, terms, settings):
    """The sweep released or charged this call by policy, but it was up:
    charge (or refund) the difference to its real cost, with its own ledger
    row, so the audit's sums hold and a balance driven below its limit shows."""
    billsec, cost = real_charge(tx, call, terms, settings)
    # The CDR first: its update waits for a correction another replayer
    # makes meanwhile, and then finds the call settled: one correction only.
    if not complete(tx, call, terms["account"], billsec, cost, "settled", None, correcting=True,
                    buy_cost=buy_cost(tx, call, terms, billsec, settings)):
        cost, billsec = tx.final_charge(call.uniqueid)
        return Settlement("repeated", cost, billsec)
    if cost != terms["cost"]:
        tx.change_balance(terms["account"], terms["cost"] - cost, "correction", call.uniqueid,
                          timestamp(call.ended))
    return Settlement("settled", cost, billsec, reason=f"corrected after the sweep had"
                                                      f" {terms['state']} it")


RESOLUTION = {None: ("settled", "call"), "release": ("released", "reaper"),
              "charge": ("charged", "reaper")}


def buy_cost(tx, call, terms, billsec, settings):
    """What the trunk that carried the call charges for it: by the deck of
    that trunk's that priced it at authorization (the call record's, or the
    CDR's for the trunk it names), else by its deck in force at the call's
    start; its rates and increments."""
    if not call.trunk or not call.answered:
        return None
    deck = call.trunk_deck or (terms["trunk_deck"] if call.trunk == terms["trunk"] else None)
    prefixes = prefixes_of(terms["number"])
    rows = tx.deck_prices(deck, prefixes) if deck else []
    if not rows:
        found = tx.trunk_prices(prefixes, terms["start"], call.trunk)
        rows = found.get(call.trunk, (None, None, [], None))[2]
    if not rows:
        return None
    return plan(rows, call.trunk, settings).cost(answered_at(call, billsec), billsec, True,
                                                 settings["decimals"])


def bill_late(store, call, settings, policy=None):
    """Bill a call let through a database outage, without a reservation,
    once the database is back.

    With no account or no rate the call cannot be charged: its CDR is
    marked 'unbilled' for the audit to report, never silently free.  The
    sweep bills one whose end nobody recorded with a ``policy``.
    """
    known = store.read(lambda tx: tx.call_terms(call.uniqueid))
    if known is not None and (known["account"], known["number"], known["start"]) != (
            call.account, call.number, timestamp(call.started)):
        # Not this call: one run again on the same channel.  The record is
        # set aside for the operator, and the audit names it.
        raise UnknownCall(f"call {call.uniqueid}: the database has another call by that uniqueid")
    if known is not None and known["state"] == "active":
        # Authorized after all: its commit reached the database, the reply
        # did not.  Settle it as any reserved call.
        return settle_call(store, call, settings)
    found = store.read(lambda tx: tx.account_prices(
        call.account, prefixes_of(call.number), timestamp(call.started)))
    rated = found is not None and found[1]
    sell = plan(found[1], found[0], settings) if rated else Plan(
        [(127, 0, 1440, Rate("", "", "", D(0), D(0), 0, 1))], clock("UTC"))

    def work(tx):
        terms = tx.call_terms(call.uniqueid)
        if terms is not None:
            if terms["state"] in ("released", "charged") and policy is None and call.ended:
                # Its claim looked overdue (a box clock stepped forward) and
                # was settled by policy while the call was up.
                return correct(tx, call, terms, settings)
            return Settlement("repeated", terms["cost"], terms["billsec"])
        tx.open_cdr(dict(call.cdr(), **rate_columns(sell.rate_at(call.started)),
                         deck=found[2] if rated else None, state="active"))
        billsec, cost = charge_for(sell, call, call.max_secs, settings)
        state, kind = RESOLUTION[policy] if policy else ("late", "call")
        complete(tx, call, call.account, billsec, cost, state if rated else "unbilled", kind)
        return Settlement("settled", cost, billsec)

    return store.atomic(work)


def route_decks(routes):
    """The decks of the trunks a call may be sent to, as the CDR keeps them:
    ' 12 15 ' (so that ' 12 ' finds one), or None without trunks."""
    decks = [str(r.deck) for r in routes or () if r.deck]
    return f" {' '.join(decks)} " if decks else None


def dial_string(settings, tariff, number):
    """The whole Dial string for ``number``: the tariff's template, else the default."""
    template = settings["tariffs"].get(tariff, {}).get("dial") or settings["dial"]
    return template.format(number=number)


def rate_columns(rate):
    return {"tariff": rate.tariff, "prefix": rate.prefix, "rate": rate.per_min,
            "connect_fee": rate.connect_fee, "min_secs": rate.min_secs,
            "increment": rate.increment}


def talk_secs(call, settings):
    """The billed seconds of talk: Asterisk's milliseconds rounded up (a
    999 ms call is one second, not a free one) unless billsec_rounding is
    down, which bills whole seconds as Asterisk's own billsec does."""
    if settings["billsec_rounding"] == "down":
        return call.talk_ms // 1000
    return -(-call.talk_ms // 1000)


def shortest_talk(settings):
    """The least talk time an answered call can be billed: a second, or
    none at all when Asterisk's milliseconds are rounded down."""
    return 0 if settings["billsec_rounding"] == "down" else 1


def answered_at(call, billsec):
    """When the callee answered: the call's end less its talk time."""
    return call.ended - billsec


def charge_for(sell, call, max_secs, settings):
    """(billsec, cost) of a call: its talk time, never beyond what was
    granted, priced by the periods in force from its answer on."""
    billsec = min(talk_secs(call, settings), max_secs) if call.answered else 0
    return billsec, sell.cost(answered_at(call, billsec), billsec, call.answered,
                              settings["decimals"])


def complete(tx, call, account, billsec, cost, state, kind, release=None, buy_cost=None,
             correcting=False):
    """Charge the account (with its ledger row), release the call's
    reservation from it, and complete the CDR; when ``correcting``, whether
    the CDR was still settled by policy (an active one is known to be so).

    The billed talk time is Asterisk's own count; the box's wall clock,
    which gives start and end, can step back during a call (or, under a
    simulated Asterisk, not move at all).  So the CDR never ends sooner
    than start + billsec: answer is never before start, and duration
    never below billsec.  (A swept call's record has no start: 0.)"""
    now = timestamp(call.ended)
    if (cost or release) and not correcting:
        tx.change_balance(account, -cost, kind, call.uniqueid, now, release)
    ended = max(call.ended, call.started + billsec)
    fields = {"answer": timestamp(ended - billsec) if billsec else None,
              "end": timestamp(ended), "duration": max(call.duration, billsec),
              "billsec": billsec, "disposition": DISPOSITION.get(call.dialstatus, "FAILED"),
              "dstchannel": call.dstchannel[:80], "cost": cost, "state": state,
              "buy_cost": buy_cost}
    if call.dial:  # what was dialled last (the sweep knows nothing of it)
        fields.update(trunk=call.trunk, lastdata=call.dial[:255])
        if call.trunk_deck:
            fields.update(trunk_deck=call.trunk_deck)
    return tx.close_cdr(call.uniqueid, fields, again=correcting)


def note_lock_wait(call, seconds):
    """With ASTBILL_TIMINGS=FILE, note how long the account lock took
    (one line per call), to measure contention under load."""
    path = os.environ.get("ASTBILL_TIMINGS")
    if path:
        with open(path, "a", encoding="ascii") as f:
            f.write(f"{call.uniqueid} {seconds * 1000:.3f}\n")


# -- the spool: where the ledger keeps what the database could not take ---------

class TooManyCalls(Exception):
    """The account has db_error_max_calls calls let through and still up."""


def claim(settings, call):
    """Hold a call let through an outage before it is dialled.  A uniqueid
    held already (by either spool) raises FileExistsError; an account with
    db_error_max_calls let-through calls up on this box, TooManyCalls.
    Counted and claimed under one lock, so calls at once cannot both pass."""
    import fcntl
    directory = ensure_dir(settings["spool_dir"])
    fd = os.open(os.path.join(directory, CLAIM_LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if holds(settings, call.uniqueid):
            raise FileExistsError(call.uniqueid)
        if let_through_up(settings, call.account) >= settings["db_error_max_calls"]:
            raise TooManyCalls(call.account)
        write(directory, call)
    finally:
        os.close(fd)


def let_through_up(settings, account):
    """How many of ``account``'s calls let through an outage may still be
    up on this box: their claims, not yet ended nor overdue."""
    up = 0
    for paths in records(settings).values():
        calls = []
        for path in paths:
            if path.endswith(BAD):
                continue
            try:
                calls.append(read_record(path))
            except (OSError, ValueError):
                continue
        if any(c.ended for c in calls):
            continue  # its end is spooled beside its claim
        up += any(c.late and c.account == account and not overdue_claim(c, settings)
                  for c in calls)
    return up


def overdue_claim(call, settings):
    """A let-through call that must be over, by this box's clock (the one
    that wrote the claim)."""
    limit = (call.max_secs + settings["ring_timeout"] + ANNOUNCE_SECS
             + settings["sweep_grace_secs"])
    return time.time() - call.started > limit


def spool(settings, call, failure):
    """Keep an ended call the database did not take: a Settlement saying
    where it went.  Tried in the spool, then in the fallback spool."""
    import json
    problems = []
    for directory in spool_dirs(settings):
        try:
            # Always a new file, never written over another -- not even over
            # the call's own claim, which a replay may be settling by policy
            # this moment (and would then remove, with the call's real end).
            path = write(ensure_dir(directory), call)
        except OSError as exc:
            problems.append(f"{directory}: {exc.strerror or exc}")
            continue
        return Settlement("spooled", reason=f"settlement spooled to {path}: {failure}")
    return Settlement("unrecorded", reason=f"settlement NOT recorded, spool failed"
                                           f" ({'; '.join(problems)}): {failure}:"
                                           f" {json.dumps(call.as_dict(), sort_keys=True)}")


def read_record(path):
    """The CallRecord in the spool file ``path``; ValueError if it is not one."""
    data = read_json(path)
    return CallRecord.from_dict(from_first_release(data) if path.endswith(LEGACY) else data)


def from_first_release(data):
    """A first-release spool record in CallRecord's fields (then checked as
    any), or ValueError: every part is checked before it is used."""
    if not isinstance(data, dict) or not {"uniqueid", "dialstatus", "talk_ms", "duration",
                                           "dstchannel", "end", "late"} <= set(data):
        raise ValueError("not a first-release spool record")
    record = {name: kind() for name, kind in CallRecord.FIELDS.items()}
    record.update(uniqueid=data["uniqueid"], dialstatus=data["dialstatus"],
                  talk_ms=data["talk_ms"], duration=data["duration"],
                  dstchannel=data["dstchannel"], ended=data["end"])
    late = data["late"]
    if late is None or late is False:
        return record
    # Let through an outage: all that billing it takes.
    if not isinstance(late, dict) or not {"account", "number", "started", "max_secs"} <= set(late):
        raise ValueError("not a first-release spool record: late must hold the call")
    cdr = late.get("cdr", {})
    started = late["started"]   # the first release wrote time.time(), a float
    if (not isinstance(cdr, dict) or type(started) not in (int, float)
            or not 0 <= started < 2 ** 40):
        raise ValueError("not a first-release spool record: bad late call")
    record.update(late=True, account=late["account"], number=late["number"],
                  started=int(started), max_secs=late["max_secs"],
                  dial=cdr.get("lastdata", ""),
                  **{k: cdr.get(k, "") for k in ("clid", "src", "dcontext", "channel",
                                                 "accountcode", "linkedid")})
    return record
