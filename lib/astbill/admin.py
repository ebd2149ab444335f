"""astbill-admin: the operator's command line.

Each command opens the configured database, calls one library function
and prints the result: a table, JSON with --json, CSV with --csv where
offered.  A refused command is one line on stderr and exit status 1, and
changes nothing; a mistyped command line is one line and exit status 2.
Listings are printed as they are read (CDRs a page
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
import textwrap

from . import __version__, config, ledger, recovery
from .ledger import AUTHORIZE_TRIES, attempt, timestamp
from .money import D, MoneyError, fmt
from .rating import normalize_destination
from .rating.decks import (HEADER, PERIOD_HEADER, RatesError, checked_prefix, quote_cell,
                           read_rates)
from .rating.periods import format_days, format_hours
from .store import Conflict, NotFound, StoreError, open_store
from .store.base import Tx


ALWAYS = "1970-01-01 00:00:00"
ADMIN_READ_TIMEOUT_SECS = 600
PROG = "astbill-admin"


class AdminError(Exception):
    """A refused admin command; the message is the one line shown."""


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        settings = config.load(args.config)
        if has_password(settings["database"]):
            warn_if_readable(config.config_path(args.config))
        # An operator's report over a million CDRs may read for a while.
        store = open_store(dict(settings, create_database=args.command == "init-db",
                                read_timeout_secs=ADMIN_READ_TIMEOUT_SECS))
        try:
            args.run(store, settings, args)
        finally:
            store.close()
    except (AdminError, config.ConfigError, StoreError, MoneyError) as exc:
        sys.stderr.write(f"{PROG}: {' '.join(str(exc).split())}\n")
        return 1
    except RatesError as exc:
        sys.stderr.write("".join(f"{PROG}: {e}\n" for e in exc.errors))
        return 1
    except BrokenPipeError:
        # The reader went away (cdr | head): not worth a traceback at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


# -- the command line ------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line like every other error."""

    def error(self, message):
        self.exit(2, f"{PROG}: {message} (see {self.prog} --help)\n")


def parser():
    p = Parser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
               description="AstBill's operator command line: accounts, top-ups, rates, trunks,"
                           "\ncalls in progress, CDRs, sweep and audit.",
               epilog=examples_text([
                   "init-db", "rate import rates.csv --tariff default",
                   "account add 1001 --balance 20.00", "topup 1001 10",
                   "account show 1001 -c /etc/astbill/astbill.yaml",
                   "cdr --since 2026-01-01 --until 2026-02-01 --csv > january.csv"]) + (
                   "\n\n'astbill-admin COMMAND --help' describes each command.  A refused command"
                   "\nis one line on stderr and exit status 1, and changes nothing; a mistyped"
                   "\ncommand line is one line and exit status 2."))
    config_option(p, None)
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of:")
    commands = Commands()
    commands.add(sub, "init-db", init_db, "create the schema, or upgrade it to this version's"
                 " (safe to run again)", ["init-db", "-c /etc/astbill/astbill.yaml init-db"],
                 formats=())
    account_commands(commands, sub)
    c = commands.add(sub, "topup", topup, "add credit to an account",
                     ["topup 1001 10", "topup 1001 2.50 --json"])
    c.add_argument("account", help="the account to credit")
    c.add_argument("amount", help="how much, a plain decimal above 0 such as 10 or 2.50")
    rate_commands(commands, sub)
    trunk_commands(commands, sub)
    report_commands(commands, sub)
    return p


class Commands:
    """Makes the commands' parsers alike: each takes -c, and its --help ends
    with examples."""

    def __init__(self):
        self.common = argparse.ArgumentParser(add_help=False)
        # After the command, -c sets the config; not given there, SUPPRESS
        # leaves the one given before the command alone.
        config_option(self.common, argparse.SUPPRESS)

    def page(self, under, name, help, examples, about=""):
        """A parser: ``help`` in the list of commands, and in its own --help
        with ``about`` after it."""
        text = "\n\n".join(textwrap.fill(t, 76) for t in (help[0].upper() + help[1:] + ".", about)
                           if t)
        return under.add_parser(name, help=help, description=text,
                                epilog=examples_text(examples), parents=[self.common],
                                formatter_class=argparse.RawDescriptionHelpFormatter)

    def add(self, under, name, run, help, examples, formats=("json",), about=""):
        """A command that ``run``s, printing a table or one of ``formats``."""
        c = self.page(under, name, help, examples, about)
        c.set_defaults(run=run)
        choice = c.add_mutually_exclusive_group() if len(formats) > 1 else c
        if "json" in formats:
            choice.add_argument("--json", action="store_true", help="print JSON")
        if "csv" in formats:
            choice.add_argument("--csv", action="store_true",
                                help="print CSV (cells a spreadsheet would take for a formula"
                                     " start with a ')")
        return c

    def group(self, under, name, help, examples):
        """A command whose actions follow it (account add, rate list ...)."""
        return self.page(under, name, help, examples).add_subparsers(
            dest="action", required=True, metavar="ACTION", help="one of:")


def account_commands(commands, sub):
    acc = commands.group(sub, "account", "add, change, show or list accounts",
                         ["account add 1001 --balance 20", "account set 1001 --tariff gold",
                          "account show 1001", "account list --json"])
    c = commands.add(acc, "add", account_add, "add an account with an opening balance",
                     ["account add 1001 --balance 20.00",
                      "account add 1002 --balance 0 --tariff gold --credit-limit 50 --json",
                      "account add pbx --balance 100 --max-calls 10"],
                     about="Its tariff must have rates first (rate import): on a tariff without"
                           " any, every call would be refused.")
    c.add_argument("account", help="its name: the accountcode (or caller ID, or channel"
                                   " variable) calls are billed to")
    c.add_argument("--balance", required=True, metavar="AMOUNT",
                   help="the opening balance, a plain decimal such as 20 or 20.00")
    c.add_argument("--tariff", default="default",
                   help="its tariff, one with rates already (default: default)")
    limits(c, "0")
    c = commands.add(acc, "set", account_set, "change an account's tariff or limits",
                     ["account set 1001 --tariff gold",
                      "account set 1001 --credit-limit 0 --max-calls 4"])
    c.add_argument("account", help="the account to change")
    c.add_argument("--tariff", help="the new tariff, one with rates already; calls in"
                                    " progress keep the rate they started with")
    limits(c, None)
    c = commands.add(acc, "show", account_show, "show an account's balance, reserved and"
                     " available credit", ["account show 1001", "account show 1001 --json"])
    c.add_argument("account", help="the account to show")
    commands.add(acc, "list", account_list, "list every account",
                 ["account list", "account list --json"])


def limits(c, default):
    """--credit-limit and --max-calls: their values when ``default`` is "0"
    (account add), left as they are when it is None (account set)."""
    unset = "0, prepaid" if default else "unchanged"
    c.add_argument("--credit-limit", default=default, metavar="AMOUNT",
                   help=f"postpaid: the balance may go this far below zero (default: {unset})")
    unset = "0, no cap" if default else "unchanged"
    c.add_argument("--max-calls", default=default, metavar="N",
                   help=f"calls in progress at most, 0 for no cap (default: {unset})")


def rate_commands(commands, sub):
    rate = commands.group(sub, "rate", "import or list a tariff's or a trunk's rates",
                          ["rate import rates.csv --tariff default",
                           "rate list --tariff default --csv"])
    c = commands.add(rate, "import", rate_import, "import a deck of rates from CSV, replacing"
                     " the deck that starts at the same time for new calls (calls in"
                     " progress settle by the deck they were authorized with); one bad row"
                     " and nothing is imported",
                     ["rate import rates.csv --tariff default",
                      "rate import 2027.csv --tariff default --from '2027-01-01 00:00'",
                      "rate import carrier-a.csv --trunk carrier-a --json"],
                     about="The header is " + ",".join(HEADER) + " (rate per"
                           " minute), optionally followed by ,days,hours: days all, mon-fri,"
                           " sat,sun ...; hours 08:00-18:00.  A prefix's rows must cover the"
                           " week once.  UTF-8; a spreadsheet's byte-order mark is fine.")
    c.add_argument("file", help="the CSV file")
    deck_owner(c)
    c.add_argument("--from", dest="starts", metavar="'YYYY-MM-DD HH:MM'",
                   help="when the deck takes effect, in UTC (default: now; a tariff's or"
                        " trunk's first deck: always)")
    c = commands.add(rate, "list", rate_list, "list the rates in force, now or at a moment;"
                     " the CSV imports back as it is",
                     ["rate list --tariff default", "rate list --tariff default --prefix 49 --json",
                      "rate list --trunk carrier-a --at '2027-01-01 00:00' --csv > deck.csv"],
                     formats=("json", "csv"),
                     about="The CSV is the file rate import takes.  A destination a spreadsheet"
                           " would take for a formula (=, +, -, @ ...) is written with a ' before"
                           " it, which rate import drops again.")
    deck_owner(c)
    c.add_argument("--prefix", help="only the prefixes that start with these digits")
    c.add_argument("--at", metavar="'YYYY-MM-DD HH:MM'", help="the deck in force then (UTC)")


def deck_owner(c):
    owner = c.add_mutually_exclusive_group(required=True)
    owner.add_argument("--tariff", help="a tariff: what callers pay")
    owner.add_argument("--trunk", help="a trunk: what its carrier charges")


def trunk_commands(commands, sub):
    trunk = commands.group(sub, "trunk", "add, list, disable, enable or remove the carriers"
                           " of least-cost routing",
                           ["trunk add carrier-a --dial 'SIP/carrier-a/{number}'",
                            "trunk list", "trunk disable carrier-a"])
    c = commands.add(trunk, "add", trunk_add, "add a trunk, dialled as TEMPLATE",
                     ["trunk add carrier-a --dial 'SIP/carrier-a/{number}'",
                      "trunk add carrier-b --dial 'PJSIP/{number}@carrier-b' --json"],
                     about="Calls go over it once it has rates: rate import FILE --trunk NAME.")
    c.add_argument("name", help="its name, 1 to 40 characters")
    c.add_argument("--dial", required=True, metavar="TEMPLATE",
                   help="Dial string with {number}, e.g. SIP/carrier-a/{number}")
    commands.add(trunk, "list", trunk_list, "list every trunk", ["trunk list", "trunk list --json"])
    for name, run, text in (("disable", trunk_disable, "stop routing calls over a trunk"),
                            ("enable", trunk_enable, "route calls over a trunk again"),
                            ("remove", trunk_remove, "remove a trunk and its rates")):
        commands.add(trunk, name, run, text, [f"trunk {name} carrier-a"], formats=()).add_argument(
            "name", help="the trunk")


def report_commands(commands, sub):
    c = commands.add(sub, "route", route, "show what a call to NUMBER would get now: status,"
                     " time, rate, trunks in dial order",
                     ["route 004930123456 --account 1001", "route +4915123456 --account 1001 --json"],
                     about="Nothing is reserved or charged.")
    c.add_argument("number", help="the number as dialled")
    c.add_argument("--account", required=True, help="the account that would pay")
    commands.add(sub, "calls", calls, "list calls in progress (open reservations)",
                 ["calls", "calls --json"])
    c = commands.add(
        sub, "cdr", cdr, "list call detail records, oldest first, as they are read",
        ["cdr --account 1001 --limit 20",
         "cdr --since 2026-01-01 --until 2026-02-01 --csv > january.csv",
         "cdr --since '2026-01-31 12:00' --json"], formats=("json", "csv"),
        about="Read a page at a time and printed as read, in the same memory"
              " however many there are.  The table shows the main columns, sized to"
              f" fit its first {TABLE_WINDOW} rows (a column only widens after that); JSON and"
              " CSV have every column, and margin: cost less the trunk's buy_cost.  In"
              " CSV, a cell from a call (caller ID, number, channel ...) that a"
              " spreadsheet would take for a formula is written with a ' before it;"
              " amounts and seconds are left as AstBill wrote them, even a negative margin.")
    c.add_argument("--account", help="only this account's calls")
    c.add_argument("--since", metavar="TIME",
                   help="only calls started at or after TIME: YYYY-MM-DD or"
                        " 'YYYY-MM-DD HH:MM[:SS]', UTC")
    c.add_argument("--until", metavar="TIME",
                   help="only calls started before TIME (same forms)")
    c.add_argument("--limit", type=how_many, metavar="N", help="at most N calls")
    commands.add(sub, "sweep", sweep, "replay spooled settlements, then settle or release the"
                 " reservations of calls that must be over (cron runs it every minute)",
                 ["sweep", "sweep --json"])
    commands.add(sub, "audit", audit, "check balances and reservations against the ledger,"
                 " and the spool; exit status 1 on any problem", ["audit", "audit --json"])


def config_option(parser, default):
    parser.add_argument("-c", "--config", metavar="FILE", default=default,
                        help="the config file (default: $ASTBILL_CONFIG, else"
                             " conf/astbill.yaml beside astbill-admin); before or after"
                             " the command")


def examples_text(examples):
    return "examples:\n" + "\n".join(f"  {PROG} {e}" for e in examples)


def how_many(text):
    """A --limit value: digits only (int() would take ' 1', '+1' and '1_0')."""
    if not (text.isascii() and text.isdigit() and len(text) <= 12 and int(text) > 0):
        raise argparse.ArgumentTypeError(f"must be a whole number above 0: {text!r}")
    return int(text)


# -- commands ------------------------------------------------------------------

def init_db(store, settings, args):
    from .store.schema import migrate
    before, after = migrate(store)
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
        raise AdminError(f"opening balance must not be negative: {args.balance!r}")
    credit_limit, max_calls = checked_limits(args)

    def work(tx):
        known_tariff(tx, tariff)
        tx.add_account(account, tariff, balance, timestamp(), credit_limit, max_calls)
    try:
        write(settings, work)
    except Conflict:
        raise AdminError(f"account {account!r} exists") from None
    account_show(store, settings, args)


def account_set(store, settings, args):
    account = account_named(args.account)
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
        tx.set_account(account, changes)
    try:
        write(settings, work)
    except NotFound:
        raise AdminError(f"no account {account!r}") from None
    account_show(store, settings, args)


def checked_limits(args):
    credit_limit = D(args.credit_limit or "0")
    if credit_limit < 0:
        raise AdminError(f"credit limit must not be negative: {args.credit_limit!r}")
    text = args.max_calls or "0"
    if not (text.isascii() and text.isdigit()) or int(text) > 10000:
        raise AdminError(f"max calls must be a whole number from 0 to 10000: {text!r}")
    return credit_limit, int(text)


def account_show(store, settings, args):
    account = account_named(args.account)
    rows = store.read(lambda tx: tx.accounts(account))
    if not rows:
        raise AdminError(f"no account {account!r}")
    show_accounts(rows, settings, args.json, single=True)


def account_list(store, settings, args):
    show_accounts(store.read(lambda tx: tx.accounts()), settings, args.json)


def topup(store, settings, args):
    account = account_named(args.account)
    amount = D(args.amount)
    if amount <= 0:
        raise AdminError(f"top-up amount must be above 0: {args.amount!r}")
    try:
        write(settings, lambda tx: tx.change_balance(account, amount, "topup", None, timestamp()))
    except NotFound:
        raise AdminError(f"no account {account!r}") from None
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
    answer, rate = ledger.quote(settings, store, account_named(args.account), number)
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
    account = None if args.account is None else account_named(args.account)
    places = settings["decimals"]
    records = (shown_cdr(r, places) for r in store.each_cdr(account, since, until, args.limit))
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
        raise AdminError(f"{what} must be 1 to {longest} printable characters, no space at"
                         f" either end: {value!r}")
    return value


def account_named(name):
    """An account name to look up: one ``account add`` would refuse is no
    account -- said here, since MySQL before the schema's version 6
    matched '1001 ' to '1001'."""
    try:
        return checked_name(name, "account", 80)
    except AdminError:
        raise AdminError(f"no account {name!r}") from None


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
        writer.writerow([r[c] if c in OWN_NUMBERS else quote_cell(r[c]) for c in columns])


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
        sys.stderr.write(f"{PROG}: warning: {path} is world-readable;"
                         " it holds the database password (chmod 600)\n")

