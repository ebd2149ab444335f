"""astbill-admin: the operator's command line.

Each command opens the configured database, calls one library function
(``actions``, or ``auth`` for users and tokens) and prints the result: a
table, JSON with --json, CSV with --csv where offered.  A refused command
is one line on stderr and exit status 1, and changes nothing; a mistyped
command line is one line and exit status 2.  Listings are printed as they
are read (CDRs a page at a time, in constant memory), so a database
failing midway ends one with that line.
"""
import argparse
import itertools
import json
import os
import stat
import sys
import textwrap

from .. import __version__, config
from ..rating.decks import HEADER, PERIOD_HEADER
from ..store import StoreError, open_store
from . import actions, auth
from .actions import ActionError

ADMIN_READ_TIMEOUT_SECS = 600
PROG = "astbill-admin"


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
    except ActionError as exc:
        lines = exc.lines or [" ".join(str(exc).split())]
        sys.stderr.write("".join(f"{PROG}: {line}\n" for line in lines))
        return 1
    except (config.ConfigError, StoreError) as exc:
        sys.stderr.write(f"{PROG}: {' '.join(str(exc).split())}\n")
        return 1
    except BrokenPipeError:
        # The reader went away (cdr | head): not worth a traceback at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


def actor():
    """Who a change made here is recorded as: the user it runs as, and the
    operator's own login when they run it as another (runuser -u asterisk)."""
    import pwd
    user = pwd.getpwuid(os.geteuid()).pw_name
    try:
        login = os.getlogin()   # the terminal's: what runuser and sudo leave alone
    except OSError:             # no terminal (cron, a service)
        login = user
    return f"astbill-admin:{user}" if login == user else f"astbill-admin:{login} as {user}"


# -- the command line ------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line like every other error."""

    def error(self, message):
        self.exit(2, f"{PROG}: {message} (see {self.prog} --help)\n")


def parser():
    p = Parser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
               description="AstBill's operator command line: accounts, top-ups, rates, trunks,"
                           "\ncalls in progress, CDRs, sweep and audit, API tokens and staff users.",
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
    auth_commands(commands, sub)
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
    acc = commands.group(sub, "account", "add, change, show or list accounts; set a portal"
                         " password", ["account add 1001 --balance 20",
                                       "account set 1001 --tariff gold", "account show 1001",
                                       "account list --json", "account password 1001"])
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
    c = commands.add(acc, "password", account_password, "set the password the account's"
                     " customer logs in to the portal with",
                     ["account password 1001", "account password 1001 --password-stdin"],
                     formats=(), about="A password is 10 to 1024 characters; only a salted"
                                       " scrypt hash of it is stored.  Set again, it replaces"
                                       " the old one.")
    c.add_argument("account", help="the account")
    password_option(c)


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


def auth_commands(commands, sub):
    token = commands.group(sub, "token", "add, list or remove the tokens programs call the"
                           " HTTP API with (astbill-web)",
                           ["token add shop-1 --role shop", "token list", "token remove shop-1"])
    c = commands.add(token, "add", token_add, "make a token and print it, this once only",
                     ["token add shop-1 --role shop", "token add ops --role admin --json"],
                     about="Only its SHA-256 is kept: a token lost is removed and made again."
                           "  A program sends it as 'Authorization: Bearer TOKEN'.")
    c.add_argument("name", help="its name, 1 to 80 characters: who holds it")
    c.add_argument("--role", required=True, choices=auth.TOKEN_ROLES,
                   help="admin: everything; support: reads; shop: top-ups and balances only")
    commands.add(token, "list", token_list, "list the tokens (names and roles, never the"
                 " tokens)", ["token list", "token list --json"])
    commands.add(token, "remove", token_remove, "remove a token: it is refused from now on",
                 ["token remove shop-1"], formats=()).add_argument("name", help="the token")
    user = commands.group(sub, "user", "add, list or remove staff users (operator console)",
                          ["user add alice --role support", "user list", "user remove alice"])
    c = commands.add(user, "add", user_add, "add a staff user; the password is asked twice,"
                     " or read from stdin", ["user add alice --role support",
                                             "user add bob --role admin --password-stdin"],
                     formats=(), about="A password is 10 to 1024 characters; only a salted"
                                       " scrypt hash of it is kept.")
    c.add_argument("name", help="their login name, 1 to 80 characters")
    c.add_argument("--role", required=True, choices=auth.USER_ROLES,
                   help="admin: everything; support: reads")
    password_option(c)
    commands.add(user, "list", user_list, "list the staff users", ["user list", "user list --json"])
    commands.add(user, "remove", user_remove, "remove a staff user", ["user remove alice"],
                 formats=()).add_argument("name", help="the user")


def password_option(c):
    c.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of stdin, not a prompt")


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
    before, after = actions.init_db(store)
    if before == after:
        print(f"schema ready (version {after})")
    elif before == 0:
        print(f"schema created (version {after})")
    else:
        print(f"schema upgraded from version {before} to {after}")


def account_add(store, settings, args):
    show_accounts([actions.add_account(settings, store, args.account, args.balance, args.tariff,
                                       args.credit_limit, args.max_calls, actor=actor())],
                  args.json, single=True)


def account_set(store, settings, args):
    show_accounts([actions.change_account(settings, store, args.account, args.tariff,
                                          args.credit_limit, args.max_calls)],
                  args.json, single=True)


def account_show(store, settings, args):
    show_accounts([actions.show_account(settings, store, args.account)], args.json, single=True)


def account_list(store, settings, args):
    show_accounts(actions.list_accounts(settings, store), args.json)


def account_password(store, settings, args):
    auth.set_account_password(settings, store, args.account, read_password(args.password_stdin))
    print(f"account {args.account}: portal password set")


def topup(store, settings, args):
    show_accounts([actions.topup(settings, store, args.account, args.amount, actor=actor())],
                  args.json, single=True)


def rate_import(store, settings, args):
    kind, name = owner(args)
    result = actions.import_rates(settings, store, kind, name, path=args.file, starts=args.starts)
    print(json.dumps(result) if args.json else
          f"imported {result['imported']} rates into {kind} {name}"
          + (f", in force from {result['from']}" if args.starts else ""))


def rate_list(store, settings, args):
    kind, name = owner(args)
    show(actions.list_rates(settings, store, kind, name, args.prefix, args.at), style(args),
         HEADER + PERIOD_HEADER)


def owner(args):
    """('tariff' or 'trunk', name) of --tariff/--trunk."""
    return ("trunk", args.trunk) if args.trunk is not None else ("tariff", args.tariff)


def trunk_add(store, settings, args):
    show(actions.add_trunk(settings, store, args.name, args.dial), style(args),
         actions.TRUNK_COLUMNS)


def trunk_list(store, settings, args):
    show(actions.list_trunks(settings, store), style(args), actions.TRUNK_COLUMNS)


def trunk_disable(store, settings, args):
    actions.enable_trunk(settings, store, args.name, enabled=False)


def trunk_enable(store, settings, args):
    actions.enable_trunk(settings, store, args.name)


def trunk_remove(store, settings, args):
    actions.remove_trunk(settings, store, args.name)


def route(store, settings, args):
    result = actions.route(settings, store, args.number, args.account)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['number']}: {result['status']}, {result['max_secs']} s")
    rate = result["rate"]
    if rate is not None:
        print(f"rate: prefix {rate['prefix']}, {rate['rate']}/min, connect fee"
              f" {rate['connect_fee']}, {rate['min_secs']}/{rate['increment']}")
    for r in result["trunks"]:
        print(f"trunk {r['name']}: {r['dial']}, {r['rate']}/min, connect fee {r['connect_fee']}")


def calls(store, settings, args):
    show(actions.calls_in_progress(settings, store), style(args), actions.CALL_COLUMNS)


def cdr(store, settings, args):
    show(actions.cdrs(settings, store, args.account, args.since, args.until, args.limit),
         style(args), actions.CDR_COLUMNS, actions.CDR_TABLE_COLUMNS)


def sweep(store, settings, args):
    report = actions.sweep(settings, store)
    if args.json:
        print(json.dumps(report))
        return
    swept = report["swept"]
    print(f"replayed {report['replayed']} spooled settlements, set aside {report['set_aside']};"
          f" swept {len(swept)} reservations")
    for r in swept:
        what = f"cost {r['cost']} billsec {r['billsec']}" if "cost" in r else r["reason"]
        print(f"{r['uniqueid']} {r['account']} {r['action']} {what}")


def audit(store, settings, args):
    problems = actions.audit(settings, store)
    if args.json:
        print(json.dumps({"ok": not problems, "problems": problems}))
    else:
        for p in problems:
            print(p)
        print("audit: ok" if not problems else f"audit: {len(problems)} problems")
    if problems:
        raise SystemExit(1)


def token_add(store, settings, args):
    token = auth.add_token(settings, store, args.name, args.role)
    if args.json:
        print(json.dumps({"name": args.name, "role": args.role, "token": token}))
    else:
        print(f"token {args.name} ({args.role}), shown only this once:\n{token}")


def token_list(store, settings, args):
    show(auth.list_tokens(settings, store), style(args), HOLDER_COLUMNS)


def token_remove(store, settings, args):
    auth.remove_token(settings, store, args.name)


def user_add(store, settings, args):
    auth.add_user(settings, store, args.name, args.role, read_password(args.password_stdin))
    print(f"user {args.name} ({args.role}) added")


def read_password(from_stdin):
    """A new password: the first line of stdin, or asked twice."""
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    import getpass
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise ActionError("the two passwords differ")
    return first


def user_list(store, settings, args):
    show(auth.list_users(settings, store), style(args), HOLDER_COLUMNS)


def user_remove(store, settings, args):
    auth.remove_user(settings, store, args.name)


HOLDER_COLUMNS = ["name", "role", "created"]


# -- printing --------------------------------------------------------------------

def show_accounts(records, as_json, single=False):
    if single and as_json:
        print(json.dumps(records[0]))
        return
    show(records, "json" if as_json else "table", actions.ACCOUNT_COLUMNS)


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


def print_csv(records, columns):
    for text in actions.csv_lines(records, columns):
        sys.stdout.write(text)


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

