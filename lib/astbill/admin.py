"""astbill-admin: the operator's command line.

Each command opens the configured database, calls one library function
and prints the result: a table, JSON with --json, CSV with --csv where
offered.  Library errors become one line on stderr and exit status 1;
nothing is half-done.  Listings are printed as they are read (CDRs a page
at a time, in constant memory), so a database failing midway ends one with
that line.
"""
import argparse
import csv
import itertools
import json
import os
import stat
import sys

from . import config, recovery
from . import ledger
from .csvcells import quote
from .ledger import AUTHORIZE_TRIES, attempt, timestamp
from .money import D, MoneyError, fmt
from .rating import normalize_destination
from .rating.decks import HEADER, PERIOD_HEADER, RatesError, checked_prefix, read_rates
from .rating.periods import format_days, format_hours
from .store import Conflict, NotFound, StoreError, open_store
from .store.base import Tx


ALWAYS = "1970-01-01 00:00:00"


class AdminError(Exception):
    """A refused admin command; the message is the one line shown."""


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        settings = config.load(args.config)
        if has_password(settings["database"]):
            warn_if_readable(config.config_path(args.config))
        store = open_store(dict(settings, create_database=args.command == "init-db"))
        try:
            args.run(store, settings, args)
        finally:
            store.close()
    except (AdminError, config.ConfigError, StoreError, MoneyError) as exc:
        sys.stderr.write(f"astbill-admin: {' '.join(str(exc).split())}\n")
        return 1
    except RatesError as exc:
        sys.stderr.write("".join(f"astbill-admin: {e}\n" for e in exc.errors))
        return 1
    except BrokenPipeError:
        # The reader went away (cdr | head): not worth a traceback at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


def parser():
    p = argparse.ArgumentParser(prog="astbill-admin", description=__doc__.splitlines()[0])
    p.add_argument("-c", "--config", help="config file (default: $ASTBILL_CONFIG or conf/astbill.yaml)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, run, help, json_out=True, under=sub):
        c = under.add_parser(name, help=help)
        c.set_defaults(run=run)
        if json_out:
            c.add_argument("--json", action="store_true", help="print JSON")
        return c

    command("init-db", init_db, "create the schema, or upgrade it to this version's (safe to run"
            " twice)", json_out=False)
    account = sub.add_parser("account", help="add, change, show or list accounts")
    acc = account.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = command("add", account_add, "add an account with an opening balance", under=acc)
    c.add_argument("account")
    c.add_argument("--balance", required=True)
    c.add_argument("--tariff", default="default")
    limits(c)
    c = command("set", account_set, "change an account's tariff or limits", under=acc)
    c.add_argument("account")
    c.add_argument("--tariff")
    limits(c, default=None)
    c = command("show", account_show, "balance, reserved and available", under=acc)
    c.add_argument("account")
    command("list", account_list, "every account", under=acc)
    c = command("topup", topup, "add credit to an account")
    c.add_argument("account")
    c.add_argument("amount")
    rate = sub.add_parser("rate", help="import or list a tariff's or a trunk's rates")
    rates = rate.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = command("import", rate_import, "import a deck of rates from CSV (replaces the deck"
                " starting at the same time)", under=rates)
    c.add_argument("file")
    deck_owner(c)
    c.add_argument("--from", dest="starts", metavar="'YYYY-MM-DD HH:MM'",
                   help="when the deck takes effect, in UTC (default: now)")
    c = command("list", rate_list, "the rates in force, now or at a moment", under=rates)
    deck_owner(c)
    c.add_argument("--prefix", default="")
    c.add_argument("--at", metavar="'YYYY-MM-DD HH:MM'", help="the deck in force then (UTC)")
    c.add_argument("--csv", action="store_true", help="print CSV, as rate import reads it")
    trunk = sub.add_parser("trunk", help="carriers for least-cost routing")
    trunks = trunk.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = command("add", trunk_add, "add a trunk, dialled as TEMPLATE", under=trunks)
    c.add_argument("name")
    c.add_argument("--dial", required=True, metavar="TEMPLATE",
                   help="Dial string with {number}, e.g. SIP/carrier-a/{number}")
    command("list", trunk_list, "every trunk", under=trunks)
    for name, run, text in (("disable", trunk_disable, "stop routing calls over a trunk"),
                            ("enable", trunk_enable, "route calls over a trunk again"),
                            ("remove", trunk_remove, "remove a trunk and its rates")):
        command(name, run, text, json_out=False, under=trunks).add_argument("name")
    c = command("route", route, "what a call to NUMBER would get now: status, time, rate,"
                " trunks in dial order")
    c.add_argument("number")
    c.add_argument("--account", required=True)
    command("calls", calls, "calls in progress (open reservations)")
    c = command("cdr", cdr, "call detail records, oldest first, as they are read")
    c.add_argument("--account")
    c.add_argument("--csv", action="store_true", help="print CSV")
    c.add_argument("--since", metavar="TIME",
                   help="only calls started at or after TIME: YYYY-MM-DD or"
                        " 'YYYY-MM-DD HH:MM[:SS]', UTC")
    c.add_argument("--until", metavar="TIME",
                   help="only calls started before TIME (same forms)")
    c.add_argument("--limit", type=how_many, metavar="N", help="at most N calls")
    command("sweep", sweep, "settle or release reservations of calls that must be over")
    command("audit", audit, "check balances against the ledger; exit 1 on any mismatch")
    return p


def limits(c, default="0"):
    c.add_argument("--credit-limit", default=default, metavar="AMOUNT",
                   help="postpaid: the balance may go this far below zero")
    c.add_argument("--max-calls", default=default, metavar="N",
                   help="calls in progress at most (0: no cap)")


def deck_owner(c):
    owner = c.add_mutually_exclusive_group(required=True)
    owner.add_argument("--tariff", help="a tariff: what callers pay")
    owner.add_argument("--trunk", help="a trunk: what its carrier charges")


def how_many(text):
    if not (text.isascii() and text.isdigit() and len(text) <= 12 and int(text) > 0):
        raise argparse.ArgumentTypeError(f"must be a whole number above 0: {text!r}")
    return int(text)


# -- commands ------------------------------------------------------------------

def init_db(store, settings, args):
    before, after = store.migrate()
    if before == after:
        print(f"schema ready (version {after})")
    elif before == 0:
        print(f"schema created (version {after})")
    else:
        print(f"schema upgraded from version {before} to {after}")


def account_add(store, settings, args):
    account, tariff = checked_name(args.account, "account", 80), checked_name(args.tariff, "tariff", 40)
    balance = D(args.balance)
    if balance < 0:
        raise AdminError("opening balance must not be negative")
    credit_limit, max_calls = checked_limits(args)

    def work(tx):
        known_tariff(tx, tariff)
        tx.add_account(account, tariff, balance, timestamp(), credit_limit, max_calls)
    try:
        write(settings, work)
    except Conflict:
        raise AdminError(f"account {account} exists") from None
    account_show(store, settings, args)


def account_set(store, settings, args):
    changes = {}
    if args.tariff is not None:
        changes["tariff"] = checked_name(args.tariff, "tariff", 40)
    if args.credit_limit is not None:
        changes["credit_limit"] = checked_limits(args)[0]
    if args.max_calls is not None:
        changes["max_calls"] = checked_limits(args)[1]
    if not changes:
        raise AdminError("nothing to change: give --tariff, --credit-limit or --max-calls")

    def work(tx):
        if "tariff" in changes:
            known_tariff(tx, changes["tariff"])
        tx.set_account(args.account, changes)
    try:
        write(settings, work)
    except NotFound:
        raise AdminError(f"no account {args.account!r}") from None
    account_show(store, settings, args)


def checked_limits(args):
    credit_limit = D(args.credit_limit or "0")
    if credit_limit < 0:
        raise AdminError("credit limit must not be negative")
    text = args.max_calls or "0"
    if not (text.isascii() and text.isdigit()) or int(text) > 10000:
        raise AdminError(f"max calls must be a whole number from 0 to 10000: {text!r}")
    return credit_limit, int(text)


def account_show(store, settings, args):
    rows = store.read(lambda tx: tx.accounts(args.account))
    if not rows:
        raise AdminError(f"no account {args.account}")
    show_accounts(rows, settings, args.json, single=True)


def account_list(store, settings, args):
    show_accounts(store.read(lambda tx: tx.accounts()), settings, args.json)


def topup(store, settings, args):
    amount = D(args.amount)
    if amount <= 0:
        raise AdminError("top-up amount must be positive")
    try:
        write(settings, lambda tx: tx.change_balance(args.account, amount, "topup", None, timestamp()))
    except NotFound:
        raise AdminError(f"no account {args.account}") from None
    account_show(store, settings, args)


def rate_import(store, settings, args):
    kind, name = owner(args)
    rows = read_rates(args.file, name)
    if kind == "trunk" and not any(t[0] == name for t in store.read(lambda tx: tx.trunks())):
        raise AdminError(f"no trunk {name!r} (astbill-admin trunk add {name} --dial ...)")
    if args.starts:
        starts = moment(args.starts, "--from")
    elif store.read(lambda tx: tx.has_deck(kind, name)):
        starts = timestamp()
    else:
        starts = ALWAYS  # a first deck prices every call, however old
    write(settings, lambda tx: tx.import_deck(kind, name, starts, rows, timestamp()))
    prefixes = len({r.rate.prefix for r in rows})
    result = {kind: name, "imported": prefixes, "rows": len(rows), "from": starts}
    print(json.dumps(result) if args.json else f"imported {prefixes} rates into {kind} {name}"
          + (f", in force from {starts}" if args.starts else ""))


def rate_list(store, settings, args):
    kind, name = owner(args)
    try:
        prefix = checked_prefix(args.prefix) if args.prefix else ""
    except ValueError as exc:
        raise AdminError(str(exc)) from None
    at = moment(args.at, "--at") if args.at else timestamp()
    found = store.read(lambda tx: tx.deck_rows(kind, name, at, prefix))
    if found is None:
        raise AdminError(f"{kind} {name!r} has no rates in force at {at}")
    places = settings["decimals"]
    rows = [{"prefix": p, "destination": d, "rate": fmt(r, places), "connect_fee": fmt(f, places),
             "min_secs": m, "increment": i, "days": format_days(days),
             "hours": format_hours(start, end)}
            for p, d, days, start, end, r, f, m, i in found[1]]
    show(rows, style(args), HEADER + PERIOD_HEADER)


def owner(args):
    """('tariff' or 'trunk', name) of --tariff/--trunk."""
    if args.trunk is not None:
        return "trunk", checked_name(args.trunk, "trunk", 40)
    return "tariff", checked_name(args.tariff, "tariff", 40)


def moment(text, option):
    """'YYYY-MM-DD HH:MM[:SS]' (UTC) as stored, or a one-line refusal."""
    import time
    for form in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d"):
        try:
            return time.strftime("%Y-%m-%d %H:%M:%S", time.strptime(text.strip(), form))
        except ValueError:
            continue
    raise AdminError(f"{option} must look like 'YYYY-MM-DD HH:MM' (UTC): {text!r}")


def trunk_add(store, settings, args):
    name = checked_name(args.name, "trunk", 40)
    try:
        config.check_dial(args.dial, "--dial")
    except config.ConfigError as exc:
        raise AdminError(str(exc)) from None
    try:
        write(settings, lambda tx: tx.add_trunk(name, args.dial, timestamp()))
    except Conflict:
        raise AdminError(f"trunk {name!r} exists") from None
    trunk_list(store, settings, args)


def trunk_list(store, settings, args):
    rows = [{"name": n, "dial": d, "enabled": bool(e), "rates_since": None if s is None else str(s)}
            for n, d, e, s in store.read(lambda tx: tx.trunks())]
    show(rows, style(args), ["name", "dial", "enabled", "rates_since"])


def trunk_disable(store, settings, args):
    change_trunk(settings, args.name, enabled=False)


def trunk_enable(store, settings, args):
    change_trunk(settings, args.name, enabled=True)


def trunk_remove(store, settings, args):
    change_trunk(settings, args.name, remove=True)


def change_trunk(settings, name, **change):
    try:
        write(settings, lambda tx: tx.set_trunk(name, **change))
    except NotFound:
        raise AdminError(f"no trunk {name!r}") from None


def route(store, settings, args):
    number = normalize_destination(args.number, settings["international_prefix"],
                                   settings["national_prefix"], settings["country_code"])
    if number is None:
        raise AdminError(f"not a number to dial: {args.number!r}")
    answer, rate = ledger.quote(settings, store, args.account, number)
    places = settings["decimals"]
    result = {"number": number, "status": answer.status, "max_secs": answer.max_secs,
              "rate": None if rate is None else {
                  "prefix": rate.prefix, "rate": fmt(rate.per_min, places),
                  "connect_fee": fmt(rate.connect_fee, places), "min_secs": rate.min_secs,
                  "increment": rate.increment},
              "trunks": [{"name": r.trunk, "dial": r.dial_string(number),
                          "rate": fmt(r.rate.per_min, places),
                          "connect_fee": fmt(r.rate.connect_fee, places)} for r in answer.routes]}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{number}: {answer.status}, {answer.max_secs} s")
    if rate is not None:
        print(f"rate: prefix {rate.prefix}, {result['rate']['rate']}/min, connect fee"
              f" {result['rate']['connect_fee']}, {rate.min_secs}/{rate.increment}")
    for r in result["trunks"]:
        print(f"trunk {r['name']}: {r['dial']}, {r['rate']}/min, connect fee {r['connect_fee']}")


def calls(store, settings, args):
    places = settings["decimals"]
    rows = [{"uniqueid": r[0], "account": r[1], "dst": r[2], "max_secs": r[3],
             "max_cost": fmt(r[4], places), "since": r[5], "channel": r[6]}
            for r in store.read(lambda tx: tx.calls_in_progress())]
    show(rows, style(args), ["uniqueid", "account", "dst", "max_secs", "max_cost", "since",
                             "channel"])


def cdr(store, settings, args):
    since = moment(args.since, "--since") if args.since else None
    until = moment(args.until, "--until") if args.until else None
    if since and until and since >= until:
        raise AdminError(f"--since {since!r} is not before --until {until!r}")
    places = settings["decimals"]
    records = (shown_cdr(r, places)
               for r in store.each_cdr(args.account, since, until, args.limit))
    show(records, style(args), [*Tx.CDR_COLUMNS, "margin"],
         ["uniqueid", "start", "account", "dst", "billsec", "disposition", "cost", "state"])


def sweep(store, settings, args):
    replayed, results = recovery.recover(settings, store)
    places = settings["decimals"]
    swept = [dict(r, cost=fmt(r["cost"], places)) if "cost" in r else r for r in results]
    report = {"replayed": replayed.settled, "set_aside": replayed.set_aside, "swept": swept}
    if args.json:
        print(json.dumps(report))
        return
    print(f"replayed {replayed.settled} spooled settlements, set aside {replayed.set_aside};"
          f" swept {len(swept)} reservations")
    for r in swept:
        what = f"cost {r['cost']} billsec {r['billsec']}" if "cost" in r else r["reason"]
        print(f"{r['uniqueid']} {r['account']} {r['action']} {what}")


def audit(store, settings, args):
    problems = recovery.audit(settings, store)
    if args.json:
        print(json.dumps({"ok": not problems, "problems": problems}))
    else:
        for p in problems:
            print(p)
        print("audit: ok" if not problems else f"audit: {len(problems)} problems")
    if problems:
        raise SystemExit(1)


# -- helpers -------------------------------------------------------------------

def write(settings, work):
    """One transaction, run again after a deadlock or a cluster
    certification conflict with the calls going on meanwhile."""
    return attempt(settings, lambda store: store.atomic(work), AUTHORIZE_TRIES)


def checked_name(value, what, longest):
    if not value or len(value) > longest or not value.isprintable() or value != value.strip():
        raise AdminError(f"{what} must be 1 to {longest} printable characters")
    return value


def known_tariff(tx, tariff):
    """A tariff is known by its rates: on one without, every call is refused."""
    if not tx.has_deck("tariff", tariff):
        raise AdminError(f"unknown tariff {tariff!r}: it has no rates (astbill-admin rate import)")


def show_accounts(rows, settings, as_json, single=False):
    places = settings["decimals"]
    records = [{"account": a, "tariff": t, "balance": fmt(b, places),
                "reserved": fmt(r, places), "credit_limit": fmt(c, places),
                "available": fmt(b + c - r, places), "max_calls": m, "calls": n}
               for a, t, b, r, c, m, n in rows]
    if single and as_json:
        print(json.dumps(records[0]))
        return
    show(records, "json" if as_json else "table",
         ["account", "tariff", "balance", "reserved", "available", "calls"])


def shown_cdr(record, places):
    """A CDR with its margin (what the caller paid less what the trunk
    charged), and its amounts as text at the configured places."""
    cost, bought = record["cost"], record["buy_cost"]
    record = dict(record, margin=None if cost is None or bought is None else cost - bought)
    return dict(record, **{key: fmt(record[key], places) for key in (*Tx.CDR_MONEY, "margin")
                           if record[key] is not None})


def style(args):
    """How a command's records are to be printed: json, csv or table."""
    if getattr(args, "json", False):
        return "json"
    return "csv" if getattr(args, "csv", False) else "table"


def show(records, how, columns, table_columns=None):
    """Print ``records`` (dicts, from any iterable, one by one as they come)
    ``how``: JSON, CSV of ``columns``, or a table of ``table_columns``."""
    if how == "json":
        print_json(records)
    elif how == "csv":
        print_csv(records, columns)
    else:
        print_table(records, table_columns or columns)


def print_json(records):
    """A JSON array, written a record at a time: the text json.dumps(list) gives."""
    out = sys.stdout
    out.write("[")
    for n, record in enumerate(records):
        out.write((", " if n else "") + json.dumps(record))
    out.write("]\n")


# Columns whose cells are numbers AstBill itself wrote (amounts, seconds):
# never quoted for a spreadsheet, unlike every cell that comes from data.
OWN_NUMBERS = frozenset({"rate", "connect_fee", "cost", "buy_cost", "margin", "max_cost",
                         "duration", "billsec", "max_secs", "min_secs", "increment"})


def print_csv(records, columns):
    writer = csv.writer(sys.stdout)
    writer.writerow(columns)
    for r in records:
        writer.writerow([r[c] if c in OWN_NUMBERS else quote(r[c]) for c in columns])


# Rows a table's column widths are measured on before it starts printing.
TABLE_WINDOW = 500


def print_table(records, columns):
    """An aligned table, printed as it comes, in bounded memory: the column
    widths fit the first TABLE_WINDOW rows, and after that only grow -- a
    later, wider cell widens its column from its own row on; nothing is cut."""
    lines = (["" if r[c] is None else str(r[c]) for c in columns] for r in records)
    first = [list(columns), *itertools.islice(lines, TABLE_WINDOW)]
    widths = [max(len(line[i]) for line in first) for i in range(len(columns))]
    for line in itertools.chain(first, lines):
        widths = [max(w, len(cell)) for w, cell in zip(widths, line)]
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())


def has_password(database):
    """Does the database URL (or any of a cluster's) carry a password?"""
    urls = [database] if isinstance(database, str) else database
    return any(":" in url.split("://", 1)[-1].rpartition("@")[0] for url in urls)


def warn_if_readable(path):
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & stat.S_IROTH:
        sys.stderr.write(f"astbill-admin: warning: {path} is world-readable; "
                         "it holds the database password (chmod 600)\n")

