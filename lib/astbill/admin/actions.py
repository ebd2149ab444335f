"""Every administrative action, once, for every face.

One function per action: typed arguments (text as an operator or a
client gave it, where the action itself must check it), the result as
data (dicts of text and numbers, amounts as text at the configured
places), and one error type for a refusal, ``ActionError``, whose message
is the one line shown.  A refused action changes nothing.  A database
failure is a ``StoreError``, not a refusal.

Each write is one short transaction, run again after a deadlock or a
cluster certification conflict; no lock is held between two of them.
"""
import calendar
import csv
import hashlib
import io
import json
import time
from decimal import Decimal

from .. import config, ledger, recovery
from ..ledger import AUTHORIZE_TRIES, attempt, timestamp
from ..money import D, MoneyError, fmt
from ..rating import normalize_destination
from ..rating.decks import RatesError, checked_prefix, parse_rates, quote_cell, read_rates
from ..rating.periods import format_days, format_hours
from ..store import Conflict, NotFound
from ..store.base import Tx

ALWAYS = "1970-01-01 00:00:00"
ACCOUNT_COLUMNS = ["account", "tariff", "balance", "reserved", "available", "calls"]
TRUNK_COLUMNS = ["name", "dial", "enabled", "rates_since"]
CALL_COLUMNS = ["uniqueid", "account", "dst", "max_secs", "max_cost", "since", "channel"]
CDR_COLUMNS = [*Tx.CDR_COLUMNS, "margin"]
CDR_TABLE_COLUMNS = ["uniqueid", "start", "account", "dst", "billsec", "disposition", "cost",
                     "state"]


class ActionError(Exception):
    """A refused action; the message is the one line shown.  ``lines``:
    one line per problem where a file has them (a rates file's rows).
    ``kind``: "invalid" (the request itself), "missing" (what it names is
    not there), "exists" (what it would make is there) or "reused" (an
    idempotency key given for another request); the web adds "large" (a
    body too long to take)."""

    def __init__(self, message, lines=None, kind="invalid"):
        super().__init__(message)
        self.lines = lines
        self.kind = kind


# -- the schema ------------------------------------------------------------------

def init_db(store):
    """Create the schema or upgrade it: (version before, version after)."""
    from ..store.schema import migrate
    return migrate(store)


# -- accounts --------------------------------------------------------------------

def add_account(settings, store, account, balance, tariff="default", credit_limit="0",
                max_calls="0", actor=None):
    """A new account with its opening balance (a ledger row of ``actor``'s)."""
    account, tariff = checked_name(account, "account", 80), checked_name(tariff, "tariff", 40)
    opening = amount(balance)
    if opening < 0:
        raise ActionError(f"opening balance must not be negative: {balance!r}")
    credit, cap = checked_credit_limit(credit_limit), checked_max_calls(max_calls)

    def work(tx):
        known_tariff(tx, tariff)
        tx.add_account(account, tariff, opening, timestamp(), credit, cap, actor=actor)
        return account_record(tx.accounts(account)[0], settings)
    try:
        return write(settings, work)
    except Conflict:
        raise ActionError(f"account {account!r} exists", kind="exists") from None


def change_account(settings, store, account, tariff=None, credit_limit=None, max_calls=None):
    """Change an account's tariff or limits (those not None)."""
    account = account_named(account)
    changes = {}
    if tariff is not None:
        changes["tariff"] = checked_name(tariff, "tariff", 40)
    if credit_limit is not None:
        changes["credit_limit"] = checked_credit_limit(credit_limit)
    if max_calls is not None:
        changes["max_calls"] = checked_max_calls(max_calls)
    if not changes:
        raise ActionError("nothing to change: give --tariff, --credit-limit or --max-calls")

    def work(tx):
        if "tariff" in changes:
            known_tariff(tx, changes["tariff"])
        tx.set_account(account, changes)
        return account_record(tx.accounts(account)[0], settings)
    try:
        return write(settings, work)
    except NotFound:
        raise ActionError(f"no account {account!r}", kind="missing") from None


def show_account(settings, store, account):
    """An account: balance, reserved, available, credit limit, call cap, calls."""
    account = account_named(account)
    rows = store.read(lambda tx: tx.accounts(account))
    if not rows:
        raise ActionError(f"no account {account!r}", kind="missing")
    return account_record(rows[0], settings)


def list_accounts(settings, store, search=None, after=None, limit=None):
    """Accounts by name: those whose name contains ``search``, after the
    name ``after``, ``limit`` at most."""
    if limit is not None:
        limit = whole(limit, "limit", 1, 10000)
    rows = store.read(lambda tx: tx.accounts(search=search or None, after=after, limit=limit))
    return [account_record(row, settings) for row in rows]


def topup(settings, store, account, value, actor=None, key=None):
    """Add credit (above 0) to an account; see ``credit``."""
    return credit(settings, account, value, "topup", actor, key)


def adjust(settings, store, account, value, actor=None, key=None):
    """Correct a balance by a signed amount, never to below what the
    account's credit limit and its calls in progress allow; see ``credit``."""
    return credit(settings, account, value, "adjust", actor, key)


def credit(settings, account, value, kind, actor, key):
    """Change a balance by ``value`` with its ledger row, recording
    ``actor``; the account after it.  With an idempotency ``key`` the
    change is made once: the same key again (for the same account and
    amount) gets the first answer and changes nothing; a key used for
    another request is refused.  All of it in one transaction, under the
    account's lock."""
    account = account_named(account)
    change = amount(value)
    if key is not None and not actor:
        raise ActionError("an idempotency key needs the actor it belongs to")
    if kind == "topup" and change <= 0:
        raise ActionError(f"top-up amount must be above 0: {value!r}")
    if kind == "adjust" and change == 0:
        raise ActionError(f"adjustment must not be 0: {value!r}")
    if key is not None:
        key = checked_name(key, "idempotency key", 80)
    fingerprint = hashlib.sha256(f"{kind}\n{account}\n{change.normalize():f}".encode()).hexdigest()

    def work(tx):
        locked = tx.lock_account(account)
        if locked is None:
            raise ActionError(f"no account {account!r}", kind="missing")
        if key is not None:
            seen = tx.idempotency(actor, key)
            if seen is not None:
                if seen[0] != fingerprint:
                    raise ActionError(f"idempotency key {key!r} was used for another request",
                                      kind="reused")
                return json.loads(seen[1])
        balance, reserved, limit = locked[:3]
        if kind == "adjust" and balance + change + limit - reserved < 0:
            raise ActionError(f"adjustment {change:f} would take account {account!r} below"
                              " its available credit")
        try:
            D(balance + change)   # a balance, too, is an amount that can be stored
        except MoneyError:
            raise ActionError(f"{change:f} would take account {account!r} beyond the largest"
                              " balance") from None
        now = timestamp()
        tx.change_balance(account, change, kind, None, now, actor=actor)
        record = account_record(tx.accounts(account)[0], settings)
        if key is not None:
            tx.remember(actor, key, account, fingerprint, json.dumps(record), now)
        return record
    try:
        return write(settings, work)
    except Conflict:
        # The key was taken meanwhile, by the same token's request on
        # another account: its row is there now, and decides.
        return write(settings, work)


def account_record(row, settings):
    account, tariff, balance, reserved, limit, cap, calls = row
    places = settings["decimals"]
    return {"account": account, "tariff": tariff, "balance": fmt(balance, places),
            "reserved": fmt(reserved, places), "credit_limit": fmt(limit, places),
            "available": fmt(balance + limit - reserved, places), "max_calls": cap,
            "calls": calls}


# -- rates and trunks ------------------------------------------------------------

def import_rates(settings, store, kind, name, path=None, text=None, starts=None,
                 option="--from"):
    """Import a deck from a CSV file at ``path`` or CSV ``text``, all or
    nothing (every bad line named), in force from ``starts`` (UTC; default
    now, a first deck always)."""
    name = owner_name(kind, name)
    try:
        rows = read_rates(path, name) if path is not None else parse_rates(
            text.splitlines(keepends=True), name)
    except RatesError as exc:
        raise ActionError(f"rates refused: {len(exc.errors)} problems", exc.errors) from None
    if kind == "trunk" and not any(t[0] == name for t in store.read(lambda tx: tx.trunks())):
        raise ActionError(f"no trunk {name!r} (astbill-admin trunk add {name} --dial ...)",
                          kind="missing")
    if starts:
        starts = moment(starts, option)
    elif store.read(lambda tx: tx.has_deck(kind, name)):
        starts = timestamp()
    else:
        starts = ALWAYS  # a first deck prices every call, however old
    write(settings, lambda tx: tx.import_deck(kind, name, starts, rows, timestamp()))
    return {kind: name, "imported": len({r.rate.prefix for r in rows}), "rows": len(rows),
            "from": starts}


def list_rates(settings, store, kind, name, prefix=None, at=None, option="--at"):
    """The rates of the deck in force at ``at`` (default now), those whose
    prefix starts with ``prefix``."""
    name = owner_name(kind, name)
    try:
        prefix = checked_prefix(prefix) if prefix else ""
    except ValueError as exc:
        raise ActionError(str(exc)) from None
    at = moment(at, option) if at else timestamp()
    found = store.read(lambda tx: tx.deck_rows(kind, name, at, prefix))
    if found is None:
        raise ActionError(f"{kind} {name!r} has no rates in force at {at}", kind="missing")
    places = settings["decimals"]
    return [{"prefix": p, "destination": d, "rate": fmt(r, places), "connect_fee": fmt(f, places),
             "min_secs": m, "increment": i, "days": format_days(days),
             "hours": format_hours(start, end)}
            for p, d, days, start, end, r, f, m, i in found[1]]


def owner_name(kind, name):
    if kind not in ("tariff", "trunk"):
        raise ActionError(f"rates belong to a tariff or a trunk, not {kind!r}")
    return checked_name(name, kind, 40)


def add_trunk(settings, store, name, dial):
    name = checked_name(name, "trunk", 40)
    try:
        config.check_dial(dial, "--dial")
    except config.ConfigError as exc:
        raise ActionError(str(exc)) from None
    try:
        write(settings, lambda tx: tx.add_trunk(name, dial, timestamp()))
    except Conflict:
        raise ActionError(f"trunk {name!r} exists", kind="exists") from None
    return list_trunks(settings, store)


def list_trunks(settings, store):
    return [{"name": n, "dial": d, "enabled": bool(e), "rates_since": None if s is None else str(s)}
            for n, d, e, s in store.read(lambda tx: tx.trunks())]


def enable_trunk(settings, store, name, enabled=True):
    """Route calls over a trunk again (or, ``enabled`` False, no longer)."""
    change_trunk(settings, name, enabled=enabled)


def remove_trunk(settings, store, name):
    change_trunk(settings, name, remove=True)


def change_trunk(settings, name, **change):
    try:
        write(settings, lambda tx: tx.set_trunk(name, **change))
    except NotFound:
        raise ActionError(f"no trunk {name!r}", kind="missing") from None


# -- reports ---------------------------------------------------------------------

def route(settings, store, number, account):
    """What a call to ``number`` on ``account`` would get now; nothing is
    reserved."""
    dialled = normalize_destination(number, settings["international_prefix"],
                                    settings["national_prefix"], settings["country_code"])
    if dialled is None:
        raise ActionError(f"not a number to dial: {number!r}")
    answer, rate = ledger.quote(settings, store, account_named(account), dialled)
    places = settings["decimals"]
    return {"number": dialled, "status": answer.status, "max_secs": answer.max_secs,
            "rate": None if rate is None else {
                "prefix": rate.prefix, "rate": fmt(rate.per_min, places),
                "connect_fee": fmt(rate.connect_fee, places), "min_secs": rate.min_secs,
                "increment": rate.increment},
            "trunks": [{"name": r.trunk, "dial": r.dial_string(dialled),
                        "rate": fmt(r.rate.per_min, places),
                        "connect_fee": fmt(r.rate.connect_fee, places)} for r in answer.routes]}


def calls_in_progress(settings, store, account=None):
    """The calls in progress, every account's or ``account``'s."""
    places = settings["decimals"]
    return [{"uniqueid": r[0], "account": r[1], "dst": r[2], "max_secs": r[3],
             "max_cost": fmt(r[4], places), "since": r[5], "channel": r[6]}
            for r in store.read(lambda tx: tx.calls_in_progress(account))]


def cdrs(settings, store, account=None, since=None, until=None, limit=None, after=None,
         options=("--since", "--until")):
    """CDRs by start, oldest first, as an iterator read a page at a time:
    the account's, started from ``since`` and before ``until``, after the
    CDR ``after`` names (a ``cursor``), ``limit`` at most.  The arguments
    are checked before anything is read."""
    since = moment(since, options[0]) if since else None
    until = moment(until, options[1]) if until else None
    if since and until and since >= until:
        raise ActionError(f"{options[0]} {since!r} is not before {options[1]} {until!r}")
    account = None if account is None else account_named(account)
    if after is not None:
        start, _, uniqueid = after.partition("|")
        if not uniqueid:
            raise ActionError(f"not a CDR cursor: {after!r}")
        after = (moment(start, "cursor"), uniqueid)
    places = settings["decimals"]
    return (shown_cdr(r, places) for r in store.each_cdr(account, since, until, limit, after))


def cursor(record):
    """What ``cdrs(after=...)`` takes to go on after ``record``."""
    return f"{record['start']}|{record['uniqueid']}"


def shown_cdr(record, places):
    """A CDR with its margin (what the caller paid less what the trunk
    charged), and its amounts as text at the configured places."""
    cost, bought = record["cost"], record["buy_cost"]
    record = dict(record, margin=None if cost is None or bought is None else cost - bought)
    return dict(record, **{key: fmt(record[key], places) for key in (*Tx.CDR_MONEY, "margin")
                           if record[key] is not None})


def recent_cdrs(settings, store, account=None, limit=20):
    """The latest ``limit`` CDRs (the account's), newest first."""
    places = settings["decimals"]
    return [shown_cdr(r, places) for r in store.read(
        lambda tx: tx.cdrs(account_named(account) if account else None, limit=limit,
                           newest=True))]


HISTORY_KINDS = ("open", "topup", "adjust")


def credit_history(settings, store, account, limit=20):
    """The account's opening balance, top-ups and adjustments, newest first,
    each with who made it."""
    places = settings["decimals"]
    return [{"created": c, "kind": k, "amount": fmt(a, places), "actor": actor}
            for c, k, a, actor in store.read(
                lambda tx: tx.ledger_rows(account_named(account), HISTORY_KINDS, limit))]


def list_decks(settings, store):
    """Every deck of rates: kind, owner, in force from, imported."""
    return [{"kind": k, "name": n, "starts": s, "created": c}
            for k, n, s, c in store.read(lambda tx: tx.decks())]


DAYS_SHOWN = 30
# How long the figures of a day before today may be reused: its CDRs
# change after midnight only by calls settled late and by the sweep.
PAST_SECONDS = 300


def statistics(settings, store, day=None, kept=None):
    """The console's figures for ``day`` (UTC 'YYYY-MM-DD', default today):
    its totals, its calls by hour, per trunk (with ASR and ACD), and revenue
    and margin by day for the DAYS_SHOWN days up to it.  Only those days'
    CDRs are read, through the start index; ``kept``, a dict the caller
    keeps between calls, spares reading the days before ``day`` again for
    PAST_SECONDS."""
    first = time.strptime(moment(day, "day")[:10] if day else timestamp()[:10], "%Y-%m-%d")
    start = calendar.timegm(first)
    days = [timestamp(start - n * 86400)[:10] for n in range(DAYS_SHOWN - 1, -1, -1)]
    today, until = f"{days[-1]} 00:00:00", timestamp(start + 86400)
    places = settings["decimals"]
    hourly = {r[0][11:]: r for r in store.read(lambda tx: tx.cdr_periods(today, until, 13))}
    daily = past_days(store, days[:-1], {} if kept is None else kept)
    # Today's figures are its hours' sums.
    daily[days[-1]] = (days[-1], *map(sum, zip(*(r[1:] for r in hourly.values())))) if hourly \
        else None
    trunks = store.read(lambda tx: tx.cdr_trunks(today, until))
    return {"day": days[-1], "today": figures(daily[days[-1]], days[-1], places),
            "hours": [figures(hourly.get(f"{h:02d}"), f"{h:02d}", places) for h in range(24)],
            "days": [figures(daily[d], d, places) for d in days],
            "trunks": [figures(r, r[0], places) for r in trunks]}


def past_days(store, days, kept):
    """{day: its figures' row, or None} of ``days`` (consecutive, before
    today): those in ``kept`` for less than PAST_SECONDS from there, the
    rest read in one statement and kept."""
    now = time.monotonic()
    for day in [d for d in kept if d not in days or now - kept[d][0] >= PAST_SECONDS]:
        kept.pop(day, None)
    missing = [d for d in days if d not in kept]
    if missing:
        end = timestamp(calendar.timegm(time.strptime(missing[-1], "%Y-%m-%d")) + 86400)
        rows = {r[0]: r for r in store.read(
            lambda tx: tx.cdr_periods(f"{missing[0]} 00:00:00", end, 10))}
        kept.update((d, (now, rows.get(d))) for d in missing)
    return {d: kept[d][1] for d in days}


def figures(row, label, places):
    """A period's or a trunk's figures: calls, answered, minutes, revenue,
    buy cost, margin, ASR (answered in 100 calls) and ACD (seconds per
    answered call)."""
    _, calls, answered, billsec, revenue, bought, margin = row or (label, 0, 0, 0, 0, 0, 0)
    return {"label": label, "calls": calls, "answered": answered,
            "minutes": f"{Decimal(billsec) / 60:.1f}", "revenue": fmt(D(revenue), places),
            "buy_cost": fmt(D(bought), places), "margin": fmt(D(margin), places),
            "asr": f"{Decimal(answered * 100) / calls:.1f}" if calls else None,
            "acd": billsec // answered if answered else None}


def sweep(settings, store):
    """Replay the spool, then settle or release overdue reservations."""
    replayed, results = recovery.recover(settings, store)
    places = settings["decimals"]
    swept = [dict(r, cost=fmt(r["cost"], places)) if "cost" in r else r for r in results]
    return {"replayed": replayed.settled, "set_aside": replayed.set_aside, "swept": swept}


def audit(settings, store):
    """Every problem the books have, one line each; [] when they balance."""
    return recovery.audit(settings, store)


# Columns whose cells are numbers AstBill itself wrote (amounts, seconds):
# never quoted for a spreadsheet, unlike every cell that comes from data.
OWN_NUMBERS = frozenset({"rate", "connect_fee", "cost", "buy_cost", "margin", "max_cost",
                         "duration", "billsec", "max_secs", "min_secs", "increment"})


def csv_cells(record, columns):
    """A record's CSV row: no cell from data starts a spreadsheet formula."""
    return [record[c] if c in OWN_NUMBERS else quote_cell(record[c]) for c in columns]


def csv_lines(records, columns):
    """CSV text of ``records`` as they are read, in pieces of about CHUNK
    characters: memory stays the same however many there are."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    for record in records:
        writer.writerow(csv_cells(record, columns))
        if out.tell() > CHUNK:
            yield out.getvalue()
            out.seek(0)
            out.truncate()
    yield out.getvalue()


CHUNK = 16384


# -- checks ----------------------------------------------------------------------

def write(settings, work):
    """One transaction, run again after a deadlock or a cluster
    certification conflict with the calls going on meanwhile."""
    return attempt(settings, lambda store: store.atomic(work), AUTHORIZE_TRIES)


def amount(value):
    """An exact amount (text, int or Decimal), or a one-line refusal."""
    try:
        return D(value)
    except MoneyError as exc:
        raise ActionError(str(exc)) from None


def checked_credit_limit(value):
    limit = amount(value)
    if limit < 0:
        raise ActionError(f"credit limit must not be negative: {value!r}")
    return limit


def checked_max_calls(value):
    return whole(value, "max calls", 0, 10000)


def whole(value, what, least, most):
    """A whole number from ``least`` to ``most``, as digits or an int."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not (isinstance(text, str) and text.isascii() and text.isdigit()
            and least <= int(text) <= most):
        raise ActionError(f"{what} must be a whole number from {least} to {most}: {text!r}")
    return int(text)


def checked_name(value, what, longest):
    if (not isinstance(value, str) or not value or len(value) > longest
            or not value.isprintable() or value != value.strip()):
        raise ActionError(f"{what} must be 1 to {longest} printable characters, no space at"
                          f" either end: {value!r}")
    return value


def account_named(name):
    """An account name to look up: one ``add_account`` would refuse is no
    account -- said here, since MySQL before the schema's version 6
    matched '1001 ' to '1001'."""
    try:
        return checked_name(name, "account", 80)
    except ActionError:
        raise ActionError(f"no account {name!r}", kind="missing") from None


def known_tariff(tx, tariff):
    """A tariff is known by its rates: on one without, every call is refused."""
    if not tx.has_deck("tariff", tariff):
        raise ActionError(f"unknown tariff {tariff!r}: it has no rates (astbill-admin rate import)")


def moment(text, option):
    """'YYYY-MM-DD HH:MM[:SS]' (UTC) as stored, or a one-line refusal."""
    for form in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d"):
        try:
            return time.strftime("%Y-%m-%d %H:%M:%S", time.strptime(str(text).strip(), form))
        except ValueError:
            continue
    raise ActionError(f"{option} must look like 'YYYY-MM-DD HH:MM' (UTC): {text!r}")
