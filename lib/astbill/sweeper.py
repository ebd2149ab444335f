"""Crash recovery and the books: the sweep and the audit.

A reservation outlives its call only when the AGI process never settled
it: killed, the box rebooted, Asterisk gone.  A call cannot last longer
than its ring timeout plus its granted seconds, so a reservation older than
that plus a grace period belongs to a call that is over; the sweep settles
it from Asterisk's own CDR when that knows the call, else by policy.
"""
import calendar
import time

from .credit import Outcome, settle
from .money import fmt


def epoch(stamp):
    return calendar.timegm(time.strptime(str(stamp), "%Y-%m-%d %H:%M:%S"))


def overdue(reservation, settings, now):
    """True once the call behind ``reservation`` cannot still be up."""
    limit = reservation["max_secs"] + settings["ring_timeout"] + settings["sweep_grace_secs"]
    return now - epoch(reservation["created"]) > limit


def sweep(store, settings, now=None):
    """Resolve every overdue reservation; a list of what was done to each.

    Safe beside live calls and beside another sweep: only overdue calls
    are touched, and settlement is idempotent per uniqueid.
    """
    now = time.time() if now is None else now
    done = []
    for res in store.read(lambda tx: tx.reservations()):
        if not overdue(res, settings, now):
            continue
        known = None
        if settings["asterisk_cdr_table"]:
            known = store.read(lambda tx: tx.asterisk_billsec(
                settings["asterisk_cdr_table"], res["uniqueid"]))
        if known is not None:
            billsec, disposition = known
            status = "ANSWER" if disposition == "ANSWERED" and billsec > 0 else "NOANSWER"
            outcome, policy, action = Outcome(status, billsec * 1000, billsec, end=now), None, "settled"
        else:
            policy = settings["sweep_policy"]
            outcome, action = Outcome("UNKNOWN", 0, 0, end=now), policy + "d"
        result = settle(store, res["uniqueid"], outcome, settings["decimals"], policy)
        if not result.repeated:
            done.append({"uniqueid": res["uniqueid"], "account": res["account"],
                         "action": action, "cost": result.cost, "billsec": result.billsec})
    return done


def audit(store, settings, now=None):
    """Every way the books disagree with themselves, one line each."""
    now = time.time() if now is None else now
    places = settings["decimals"]
    problems = []
    for account, balance, ledger in store.read(lambda tx: tx.ledger_mismatches()):
        problems.append(f"account {account}: balance {fmt(balance, places)}"
                        f" but its ledger sums to {fmt(ledger, places)}")
    for account, reserved, held in store.read(lambda tx: tx.reserved_mismatches()):
        problems.append(f"account {account}: reserved {fmt(reserved, places)}"
                        f" but its calls in progress hold {fmt(held, places)}")
    for account, balance in store.read(lambda tx: tx.negative_balances()):
        problems.append(f"account {account}: balance {fmt(balance, places)} is below zero")
    for uniqueid, cost, charged in store.read(lambda tx: tx.unledgered_charges()):
        ledger = "no charge" if charged is None else f"a charge of {fmt(charged, places)}"
        problems.append(f"call {uniqueid}: cost {fmt(cost, places)} but the ledger has {ledger}")
    for uniqueid, state in store.read(lambda tx: tx.orphans()):
        problems.append(f"call {uniqueid}: {state}")
    for res in store.read(lambda tx: tx.reservations()):
        if overdue(res, settings, now):
            problems.append(f"call {res['uniqueid']}: reservation since {res['created']} is stale"
                            " (run astbill-admin sweep)")
    return problems
