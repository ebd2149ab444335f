"""astbill-admin: the operator's command line.

Each command opens the configured database, calls one library function
and prints the result (a table, or JSON with --json).  Library errors
become one line on stderr and exit status 1; nothing is half-done.
"""
import argparse
import csv
import json
import os
import stat
import sys

from . import config, recovery
from .ledger import AUTHORIZE_TRIES, attempt, timestamp
from .money import D, MoneyError, fmt
from .rating import RatesError, read_rates
from .store import Conflict, NotFound, StoreError, open_store


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
    account = sub.add_parser("account", help="add, show or list accounts")
    acc = account.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = command("add", account_add, "add an account with an opening balance", under=acc)
    c.add_argument("account")
    c.add_argument("--balance", required=True)
    c.add_argument("--tariff", default="default")
    c = command("show", account_show, "balance, reserved and available", under=acc)
    c.add_argument("account")
    command("list", account_list, "every account", under=acc)
    c = command("topup", topup, "add credit to an account")
    c.add_argument("account")
    c.add_argument("amount")
    c = command("rate", rate_import, "import a tariff's rates from CSV (replaces the tariff)")
    c.add_argument("action", choices=["import"])
    c.add_argument("file")
    c.add_argument("--tariff", required=True)
    command("calls", calls, "calls in progress (open reservations)")
    c = command("cdr", cdr, "call detail records")
    c.add_argument("--account")
    c.add_argument("--csv", action="store_true", help="print CSV")
    command("sweep", sweep, "settle or release reservations of calls that must be over")
    command("audit", audit, "check balances against the ledger; exit 1 on any mismatch")
    return p


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
    try:
        write(settings, lambda tx: tx.add_account(account, tariff, balance, timestamp()))
    except Conflict:
        raise AdminError(f"account {account} exists") from None
    account_show(store, settings, args)


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
    tariff = checked_name(args.tariff, "tariff", 40)
    rates = read_rates(args.file, tariff)
    write(settings, lambda tx: tx.replace_tariff(tariff, rates))
    result = {"tariff": tariff, "imported": len(rates)}
    print(json.dumps(result) if args.json else f"imported {len(rates)} rates into tariff {tariff}")


def calls(store, settings, args):
    places = settings["decimals"]
    rows = [{"uniqueid": r[0], "account": r[1], "dst": r[2], "max_secs": r[3],
             "max_cost": fmt(r[4], places), "since": r[5], "channel": r[6]}
            for r in store.read(lambda tx: tx.calls_in_progress())]
    output(rows, args.json, ["uniqueid", "account", "dst", "max_secs", "max_cost", "since", "channel"])


def cdr(store, settings, args):
    places = settings["decimals"]
    rows = store.read(lambda tx: tx.cdrs(args.account))
    for row in rows:
        for key in ("rate", "connect_fee", "cost"):
            if row[key] is not None:
                row[key] = fmt(row[key], places)
    if args.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]) if rows else ["uniqueid"])
        writer.writeheader()
        writer.writerows(rows)
        return
    output(rows, args.json, ["uniqueid", "start", "account", "dst", "billsec", "disposition",
                             "cost", "state"])


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


def show_accounts(rows, settings, as_json, single=False):
    places = settings["decimals"]
    records = [{"account": a, "tariff": t, "balance": fmt(b, places),
                "reserved": fmt(r, places), "available": fmt(b - r, places), "calls": n}
               for a, t, b, r, n in rows]
    if single and as_json:
        print(json.dumps(records[0]))
        return
    output(records, as_json, ["account", "tariff", "balance", "reserved", "available", "calls"])


def output(rows, as_json, columns):
    if as_json:
        print(json.dumps(rows))
        return
    table = [columns] + [["" if r[c] is None else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())


def has_password(url):
    userinfo = url.split("://", 1)[-1].rpartition("@")[0]
    return ":" in userinfo


def warn_if_readable(path):
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & stat.S_IROTH:
        sys.stderr.write(f"astbill-admin: warning: {path} is world-readable; "
                         "it holds the database password (chmod 600)\n")

