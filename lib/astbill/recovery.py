"""Recovery and the books: the spool, the sweep and the audit.

The spool holds calls the database could not take: one file per call
(``UNIQUEID.call``, a CallRecord in JSON), written whole and fsync'd before
it is linked into place, so a record is complete or absent, and never
written over another call's.  A call let through a database outage is
claimed there before it is dialled, and its record completed when it ends.
When the spool directory cannot be written, the fallback spool (by default
in memory, /dev/shm, another filesystem) takes the record; when neither
can, Asterisk's log gets the whole record.

The replay settles spooled calls through the normal, idempotent
settlement and only then removes their files.  The sweep settles the
reservations of calls that must be over -- from Asterisk's own CDR when it
knows the call, else by policy -- but never one whose real settlement waits
in the spool, and it compares times on the database's clock alone.
"""
import os
import time

from . import ledger
from .ledger import CallRecord, Settlement, UnknownCall, answer_window, epoch, timestamp
from .money import fmt
from .store import Busy, StoreError

SUFFIX = ".call"
LEGACY = ".settle"   # the first release's spool files, replayed the same way
REPEAT = "~"   # UNIQUEID~N.call: a second record of one call (never in a uniqueid)
BAD = ".bad"
LOCK = ".replay.lock"
REPLAY_WAIT_SECS = 10


class Replay:
    """What a replay did: counts, and the calls it could not settle."""

    def __init__(self):
        self.settled = 0
        self.set_aside = 0
        self.held = set()  # uniqueids still in the spool: never swept by policy


# -- writing -------------------------------------------------------------------

def spool_dirs(settings):
    return [d for d in (settings["spool_dir"], settings["spool_fallback_dir"]) if d]


def ensure_dir(path):
    """The spool directory, made (0700) if missing."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def claim(settings, call):
    """Hold a call let through an outage before it is dialled; a uniqueid
    held already (by either spool) raises FileExistsError."""
    if holds(settings, call.uniqueid):
        raise FileExistsError(call.uniqueid)
    write(ensure_dir(settings["spool_dir"]), call, exclusive=True)


def spool(settings, call, failure):
    """Keep an ended call the database did not take: a Settlement saying
    where it went.  Tried in the spool, then in the fallback spool."""
    import json
    problems = []
    for directory in spool_dirs(settings):
        try:
            # A late call's own claim is completed in place; anything else
            # is a new file, never written over another.
            path = write(ensure_dir(directory), call, exclusive=not (
                call.late and spooled(directory, call.uniqueid)))
        except OSError as exc:
            problems.append(f"{directory}: {exc.strerror or exc}")
            continue
        return Settlement("spooled", reason=f"settlement spooled to {path}: {failure}")
    return Settlement("unrecorded", reason=f"settlement NOT recorded, spool failed"
                                           f" ({'; '.join(problems)}): {failure}:"
                                           f" {json.dumps(call.as_dict(), sort_keys=True)}")


def write(directory, call, exclusive):
    """Write ``call``'s record durably; the path it took."""
    import json
    final = os.path.join(directory, call.uniqueid + SUFFIX)
    tmp = f"{final}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps(call.as_dict()).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        if not exclusive:
            os.replace(tmp, final)
        else:
            for n in range(100):
                # A settlement never replaces another: a second one for the
                # same uniqueid gets a name of its own, and the replay
                # settles it as the repeat it is.
                name = final if n == 0 else os.path.join(
                    directory, f"{call.uniqueid}{REPEAT}{n}{SUFFIX}")
                try:
                    os.link(tmp, name)
                    final = name
                    break
                except FileExistsError:
                    if n == 0 and not call.ended:  # a claim: the uniqueid is taken
                        raise
            else:
                raise FileExistsError(final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return final


def spooled(directory, uniqueid):
    return os.path.exists(os.path.join(directory, uniqueid + SUFFIX))


def holds(settings, uniqueid):
    """Does either spool hold a record of this call (of this release or the
    first, set aside or not)?"""
    return any(os.path.exists(os.path.join(directory, uniqueid + ending))
               for directory in spool_dirs(settings)
               for ending in (SUFFIX, SUFFIX + BAD, LEGACY, LEGACY + BAD))


# -- reading and replaying --------------------------------------------------------

def records(settings):
    """{uniqueid: [paths]} of every spooled record, in both spools."""
    found = {}
    for directory in spool_dirs(settings):
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            for ending in (SUFFIX, SUFFIX + BAD, LEGACY, LEGACY + BAD):
                if name.endswith(ending):
                    uniqueid = name[:-len(ending)].split(REPEAT)[0]
                    found.setdefault(uniqueid, []).append(os.path.join(directory, name))
    return found


def read(path):
    """The CallRecord in ``path``; ValueError if it is not one."""
    import json
    with open(path, "rb") as f:
        text = f.read(65536)
    try:
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    return CallRecord.from_dict(from_first_release(data) if path.endswith(LEGACY) else data)


def from_first_release(data):
    """A first-release spool record in CallRecord's fields (then checked as any)."""
    if not isinstance(data, dict) or not {"uniqueid", "dialstatus", "talk_ms", "duration",
                                           "dstchannel", "end", "late"} <= set(data):
        raise ValueError("not a first-release spool record")
    record = {name: kind() for name, kind in CallRecord.FIELDS.items()}
    record.update(uniqueid=data["uniqueid"], dialstatus=data["dialstatus"],
                  talk_ms=data["talk_ms"], duration=data["duration"],
                  dstchannel=data["dstchannel"], ended=data["end"])
    late = data["late"]
    if late:  # let through an outage: all that billing it takes
        cdr = late.get("cdr") or {}
        record.update(late=True, account=late.get("account"), number=late.get("number"),
                      started=int(late.get("started", 0)), max_secs=late.get("max_secs"),
                      dial=cdr.get("lastdata", ""),
                      **{k: cdr.get(k, "") for k in ("clid", "src", "dcontext", "channel",
                                                     "accountcode", "linkedid")})
    return record


def pending(settings):
    """Is anything waiting in either spool?"""
    return any(not path.endswith(BAD) for paths in records(settings).values() for path in paths)


def replay(settings, store, wait_secs=0):
    """Settle every spooled call that can be: a Replay.

    One replayer at a time (a lock file in the spool); another waits up to
    ``wait_secs`` for it, then gives up, holding every spooled call back
    from the sweep.  A record that is not a valid call, or names a call
    the database never authorized, is set aside (*.bad) for the operator;
    its call is held back from the sweep too.  A failure settles nothing of
    that call and moves on to the next; an outage ends the replay.
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
                break
    return report


def replay_one(settings, store, paths, report):
    """Settle one call from its records; True when it is off the books."""
    calls = []
    for path in paths:
        if path.endswith(BAD):
            return False
        try:
            calls.append((read(path), path))
        except (OSError, ValueError) as exc:
            set_aside(path, exc)
            report.set_aside += 1
            return False
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
        except UnknownCall as exc:
            set_aside(path, exc)
            report.set_aside += 1
            return False
    for _, path in calls:
        remove(path)
    report.settled += 1
    return True


def overdue_claim(call, settings):
    """A let-through call that must be over, by this box's clock (the one
    that wrote the claim)."""
    limit = call.max_secs + settings["ring_timeout"] + settings["sweep_grace_secs"]
    return time.time() - call.started > limit


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
            fd = os.open(os.path.join(ensure_dir(directory), LOCK), os.O_RDWR | os.O_CREAT, 0o600)
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


def remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def set_aside(path, why):
    """Keep a record that cannot be settled for the operator, with why."""
    try:
        os.replace(path, path + BAD)
    except OSError:
        return
    try:
        # Owner only, as the record beside it: why quotes what the record holds.
        fd = os.open(path + BAD + ".why", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"{' '.join(str(why).split())}\n")
    except OSError:
        pass


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
    """Spooled calls the operator should know of."""
    problems = []
    fallback = settings["spool_fallback_dir"]
    for uniqueid, paths in sorted(records(settings).items()):
        for path in paths:
            if path.endswith(BAD):
                problems.append(f"call {uniqueid}: spooled record set aside as unusable: {path}"
                                f"{why(path)}")
            elif fallback and os.path.dirname(path) == fallback.rstrip("/"):
                problems.append(f"call {uniqueid}: settlement in the fallback spool {path}"
                                " (the spool could not be written; run astbill-admin sweep)")
            elif time.time() - os.path.getmtime(path) > settings["sweep_grace_secs"]:
                problems.append(f"call {uniqueid}: settlement spooled since"
                                f" {timestamp(os.path.getmtime(path))} (run astbill-admin sweep)")
    return problems


def why(path):
    try:
        with open(path + ".why", encoding="utf-8") as f:
            return f" ({f.read().strip()})"
    except OSError:
        return ""
