"""Recovery and the books: the replay, the sweep and the audit.

The spool (``store.spool``: its files and their trust; the ledger writes
them) holds calls the database could not take.  A spool that someone other
than AstBill's user could write is refused -- never read, never written --
and the audit names it.

The replay settles spooled calls through the normal, idempotent
settlement and only then removes their files.  A record that cannot be
read or settled is set aside (``*.bad``, with why) for the operator, and
the replay goes on with the next.  The sweep settles the reservations of
calls that must be over -- from Asterisk's own CDR when it knows the call,
else by policy -- but never one whose real settlement waits in the spool,
and it compares times on the database's clock alone.
"""
import os
import time

from . import ledger
from .ledger import (CallRecord, UnknownCall, answer_window, epoch, overdue_claim, read_record,
                     timestamp)
from .money import fmt
from .store import Busy, StoreError
from .store.spool import BAD, ensure_dir, holds, records, remove, scan, spool_dirs, trusted

LOCK = ".replay.lock"
REPLAY_WAIT_SECS = 10


class Replay:
    """What a replay did: counts, and the calls it could not settle."""

    def __init__(self):
        self.settled = 0
        self.set_aside = 0
        self.held = set()  # uniqueids still in the spool: never swept by policy


# -- replaying --------------------------------------------------------------------

def pending(settings):
    """Is anything waiting in either spool?"""
    return any(not path.endswith(BAD) for paths in records(settings).values() for path in paths)


def replay(settings, store, wait_secs=0):
    """Settle every spooled call that can be: a Replay.

    One replayer at a time (a lock file in the spool); another waits up to
    ``wait_secs`` for it, then gives up, holding every spooled call back
    from the sweep.  A record that is not a valid call, names a call the
    database never authorized, or fails in any other way of its own is set
    aside (*.bad) for the operator; its call is held back from the sweep
    too.  Then the replay moves on to the next call: only a database that
    no longer answers ends it.
    """
    report = Replay()
    found = records(settings)
    report.held.update(found)
    if not found:
        return report
    lock = open_lock(settings, wait_secs)
    if lock is None:
        return report
    with lock:
        for uniqueid, paths in sorted(found.items()):
            try:
                if replay_one(settings, store, paths, report):
                    report.held.discard(uniqueid)
            except Busy:
                continue
            except StoreError:
                if not answers(store):
                    break  # an outage: the rest waits for the next replay
    return report


def answers(store):
    """Does the database still answer?  (After a failure: one that was the
    record's own, such as a row the database refused, is no outage.)"""
    try:
        store.read(lambda tx: tx.now())
    except StoreError:
        return False
    return True


def replay_one(settings, store, paths, report):
    """Settle one call from its records; True when it is off the books."""
    calls = []
    for path in paths:
        if path.endswith(BAD):
            return False
        try:
            call = read_record(path)
            if not (call.ended or call.late):
                raise ValueError("an unfinished record of a call not let through")
        except (OSError, ValueError) as exc:
            return set_aside(path, exc, report)
        calls.append((call, path))
    ended = [(c, p) for c, p in calls if c.ended]
    if not ended:
        call, path = calls[0]
        if not overdue_claim(call, settings):
            return False  # let through and perhaps still up
        if settings["sweep_policy"] == "charge":
            call.end("ANSWER", call.max_secs * 1000)
        else:
            call.end("UNKNOWN", 0)
        ended, policy = [(call, path)], settings["sweep_policy"]
    else:
        policy = None
    for call, path in ended:
        try:
            if call.late:
                ledger.bill_late(store, call, settings, policy)
            else:
                ledger.settle_call(store, call, settings)
        except StoreError:
            raise
        except UnknownCall as exc:
            if call.answered or call.late:
                return set_aside(path, exc, report)
            # Never answered, and the database has no such call: its
            # authorization never committed (a refusal that spooled its
            # release in case it had).  Nothing to bill, nothing to release.
        except Exception as exc:  # any failure of this record's own: the next goes on
            return set_aside(path, f"{type(exc).__name__}: {exc}", report)
    for _, path in calls:
        remove(path)
    report.settled += 1
    return True


def replay_after_call(settings):
    """A call was just settled, so the database is there: settle what
    earlier calls spooled.  Whatever fails waits for the next try."""
    if not pending(settings):
        return
    from .store import open_store
    store = open_store(settings)
    try:
        replay(settings, store)
    except StoreError:
        pass
    finally:
        store.close()


def open_lock(settings, wait_secs):
    """The replay lock (in the first spool that can hold it), held; None
    if another replayer kept it, or no spool can hold it."""
    import fcntl
    for directory in spool_dirs(settings):
        try:
            fd = os.open(os.path.join(ensure_dir(directory), LOCK),
                         os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            break
        except OSError:
            continue
    else:
        return None
    lock = open(fd, "r+b")
    deadline = time.monotonic() + wait_secs
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return lock
        except BlockingIOError:
            if time.monotonic() >= deadline:
                lock.close()
                return None
            time.sleep(0.1)


def set_aside(path, why, report=None):
    """Keep a record that cannot be settled for the operator, with why (and
    count it in ``report``); False: the call is not off the books."""
    if report is not None:
        report.set_aside += 1
    try:
        os.replace(path, path + BAD)
    except OSError:
        return False
    try:
        # Owner only, as the record beside it: why quotes what the record holds.
        remove(path + BAD + ".why")
        fd = os.open(path + BAD + ".why", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                     0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"{' '.join(str(why).split())}\n")
    except OSError:
        pass
    return False


# -- the sweep ---------------------------------------------------------------------

def overdue(reservation, settings, now):
    """True once the call behind ``reservation`` cannot still be up -- rung
    on every trunk it may try, then talked its granted time: both times are
    the database's."""
    limit = (reservation["max_secs"] + answer_window(settings, settings["lcr_max_trunks"])
             + settings["sweep_grace_secs"])
    return now - epoch(reservation["created"]) > limit


def recover(settings, store):
    """What ``astbill-admin sweep`` does: replay the spool, then sweep.
    (Replay, [what the sweep did to each overdue reservation])."""
    report = replay(settings, store, REPLAY_WAIT_SECS)
    return report, sweep(settings, store, report.held)


def sweep(settings, store, held=()):
    """Resolve every overdue reservation, each on its own: a list of what
    was done to each.

    Safe beside live calls and another sweep: only overdue calls are
    touched, and settlement is idempotent.  A call ``held`` (its
    settlement waits in the spool) is never settled by policy.
    """
    now = epoch(store.read(lambda tx: tx.now()))
    done = []
    for res in store.read(lambda tx: tx.reservations()):
        if not overdue(res, settings, now):
            continue
        entry = {"uniqueid": res["uniqueid"], "account": res["account"]}
        # Looked for again now: a settlement may have been spooled since the replay.
        if res["uniqueid"] in held or holds(settings, res["uniqueid"]):
            done.append(dict(entry, action="held", reason="its settlement waits in the spool"))
            continue
        try:
            result = sweep_one(settings, store, res, now)
        except (UnknownCall, Busy) as exc:
            result = {"action": "skipped", "reason": str(exc)}
        except StoreError as exc:
            if not answers(store):
                raise  # an outage: the rest waits for the next sweep
            result = {"action": "skipped", "reason": str(exc)}  # this call's own
        if result:
            done.append(dict(entry, **result))
    return done


def sweep_one(settings, store, res, now):
    known = None
    if settings["asterisk_cdr_table"]:
        known = store.read(lambda tx: tx.asterisk_billsec(
            settings["asterisk_cdr_table"], res["uniqueid"]))
    call = CallRecord(uniqueid=res["uniqueid"])
    if known is not None:
        # Its talk time, but not when it was answered: the ledger prices it
        # at the dearest moment its reservation covered (ended = 0: unknown).
        billsec, disposition = known
        answered = disposition == "ANSWERED" and billsec > 0
        call.dialstatus, call.talk_ms, call.duration = (
            "ANSWER" if answered else "NOANSWER", billsec * 1000, billsec)
        policy, action = None, "settled"
    else:
        policy = settings["sweep_policy"]
        call.dialstatus, action = "UNKNOWN", policy + "d"
        call.ended = now
    result = ledger.settle_call(store, call, settings, policy)
    if result.how == "repeated":
        return None  # settled meanwhile, by its call or another sweep
    return {"action": action, "cost": result.cost, "billsec": result.billsec}


# -- the audit ---------------------------------------------------------------------

def audit(settings, store):
    """Every way the books disagree with themselves, one line each."""
    places = settings["decimals"]
    problems = []
    for account, balance, ledger_sum in store.read(lambda tx: tx.ledger_mismatches()):
        problems.append(f"account {account}: balance {fmt(balance, places)}"
                        f" but its ledger sums to {fmt(ledger_sum, places)}")
    for account, reserved, held in store.read(lambda tx: tx.reserved_mismatches()):
        problems.append(f"account {account}: reserved {fmt(reserved, places)}"
                        f" but its calls in progress hold {fmt(held, places)}")
    for account, balance, limit in store.read(lambda tx: tx.overdrawn()):
        below = f"minus its credit limit {fmt(limit, places)}" if limit else "zero"
        problems.append(f"account {account}: balance {fmt(balance, places)} is below {below}")
    for uniqueid, cost, charged in store.read(lambda tx: tx.unledgered_charges()):
        what = "no charge" if charged is None else f"a charge of {fmt(charged, places)}"
        problems.append(f"call {uniqueid}: cost {fmt(cost, places)} but the ledger has {what}")
    for uniqueid, state in store.read(lambda tx: tx.orphans()):
        problems.append(f"call {uniqueid}: {state}")
    now = epoch(store.read(lambda tx: tx.now()))
    for res in store.read(lambda tx: tx.reservations()):
        if overdue(res, settings, now):
            problems.append(f"call {res['uniqueid']}: reservation since {res['created']} is stale"
                            " (run astbill-admin sweep)")
    problems.extend(spool_problems(settings))
    return problems


def spool_problems(settings):
    """Spools refused, and spooled calls, the operator should know of: the
    books are not whole while a settlement waits or was set aside."""
    problems = []
    for directory in spool_dirs(settings):
        try:
            trusted(directory)
        except OSError as exc:
            problems.append(f"{exc} (refused: AstBill neither reads nor writes it)")
    found, strays = scan(settings)
    problems.extend(f"spool entry {path} is not a regular file of AstBill's user: skipped,"
                    " remove it" for path in strays)
    fallback = settings["spool_fallback_dir"]
    for uniqueid, paths in sorted(found.items()):
        for path in paths:
            if path.endswith(BAD):
                problems.append(f"call {uniqueid}: spooled record set aside as unusable: {path}"
                                f"{why(path)}")
            elif fallback and os.path.dirname(path) == fallback.rstrip("/"):
                problems.append(f"call {uniqueid}: settlement in the fallback spool {path}"
                                " (the spool could not be written; run astbill-admin sweep)")
            elif waiting(path, settings):
                problems.append(f"call {uniqueid}: settlement waits in the spool since"
                                f" {timestamp(os.lstat(path).st_mtime)} (run astbill-admin sweep)")
    return problems


def waiting(path, settings):
    """Does this record wait for the database?  Every settlement does; the
    claim of a call let through an outage only once that call must be over."""
    try:
        call = read_record(path)
    except (OSError, ValueError):
        return True  # the replay will set it aside
    return bool(call.ended) or overdue_claim(call, settings)


def why(path):
    try:
        fd = os.open(path + ".why", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, encoding="utf-8", errors="replace") as f:
            return f" ({f.read(1000).strip()})"
    except OSError:
        return ""
