"""Recovery and the books: the spool, the sweep and the audit.

The spool holds calls the database could not take: one file per call
(``UNIQUEID.call``, a CallRecord in JSON), written whole and fsync'd before
it is linked into place, so a record is complete or absent, and never
written over another call's.  A call let through a database outage is
claimed there before it is dialled; its end, when the database cannot
take it, is a record beside the claim.
When the spool directory cannot be written, the fallback spool (by default
/run/astbill: memory, another filesystem, made at boot for AstBill's user)
takes the record; when neither can, Asterisk's log gets the whole record.

What the spool holds decides what calls cost, so a spool is trusted only
when no one else can write to it: a real directory (no symbolic link)
owned by AstBill's own user and writable by nobody else.  Any other is
refused -- never read, never written -- and the audit names it.  Inside a
trusted spool, only regular files owned by that user are read, opened
without following links or blocking on a FIFO.

The replay settles spooled calls through the normal, idempotent
settlement and only then removes their files.  A record that cannot be
read or settled is set aside (``*.bad``, with why) for the operator, and
the replay goes on with the next.  The sweep settles the reservations of
calls that must be over -- from Asterisk's own CDR when it knows the call,
else by policy -- but never one whose real settlement waits in the spool,
and it compares times on the database's clock alone.
"""
import _thread
import os
import stat
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
CLAIM_LOCK = ".claim.lock"
REPLAY_WAIT_SECS = 10
ENDINGS = (SUFFIX, SUFFIX + BAD, LEGACY, LEGACY + BAD)
# A record is a few hundred bytes; anything much larger is not one.
MAX_RECORD = 65536


class Replay:
    """What a replay did: counts, and the calls it could not settle."""

    def __init__(self):
        self.settled = 0
        self.set_aside = 0
        self.held = set()  # uniqueids still in the spool: never swept by policy


# -- writing -------------------------------------------------------------------

class UnsafeSpool(OSError):
    """A spool directory that someone other than AstBill's user could write."""


def spool_dirs(settings):
    return [d for d in (settings["spool_dir"], settings["spool_fallback_dir"]) if d]


def trusted(directory):
    """``directory`` if it exists and may be used as a spool, None if it
    does not exist; UnsafeSpool, naming the fix, if anyone but this user
    could change what it holds."""
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return None
    uid = os.geteuid()
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeSpool(f"spool {directory} is a symbolic link: set the real directory"
                          " in the config")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeSpool(f"spool {directory} is not a directory")
    if st.st_uid != uid:
        raise UnsafeSpool(f"spool {directory} belongs to uid {st.st_uid}, not to AstBill's"
                          f" uid {uid}: remove it, or chown it to uid {uid} and chmod 700 it")
    if st.st_mode & 0o022:
        raise UnsafeSpool(f"spool {directory} is writable by others (mode"
                          f" {stat.S_IMODE(st.st_mode):o}): chmod 700 it")
    return directory


def readable_dirs(settings):
    """The spools that exist and are trusted: the only ones ever read."""
    found = []
    for directory in spool_dirs(settings):
        try:
            if trusted(directory):
                found.append(directory)
        except OSError:
            continue
    return found


def ensure_dir(path):
    """The spool directory, made (0700) if missing, and trusted."""
    if trusted(path) is None:
        try:
            os.makedirs(path, mode=0o700)
        except FileExistsError:
            pass  # made meanwhile, by another call or by someone else: checked next
        if trusted(path) is None:
            raise FileNotFoundError(f"spool {path} vanished")
    return path


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
                calls.append(read(path))
            except (OSError, ValueError):
                continue
        if any(c.ended for c in calls):
            continue  # its end is spooled beside its claim
        up += any(c.late and c.account == account and not overdue_claim(c, settings)
                  for c in calls)
    return up


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


def write(directory, call):
    """Write ``call``'s record durably, never over another record; the path
    it took."""
    import json
    final = os.path.join(directory, call.uniqueid + SUFFIX)
    # One name per process and thread (astbill-fastagi settles calls in threads).
    tmp = f"{final}.{os.getpid()}.{_thread.get_ident()}.tmp"
    remove(tmp)  # left by a process of this pid that died writing
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, json.dumps(call.as_dict()).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        for n in range(100):
            # A second record of one uniqueid (a call's end beside its
            # claim, or a repeat) gets a name of its own; the replay reads
            # them together.
            name = final if n == 0 else os.path.join(
                directory, f"{call.uniqueid}{REPEAT}{n}{SUFFIX}")
            try:
                os.link(tmp, name, follow_symlinks=False)
                final = name
                break
            except FileExistsError:
                if n == 0 and not call.ended:  # a claim: the uniqueid is taken
                    raise
        else:
            raise FileExistsError(final)
    finally:
        remove(tmp)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return final


def is_record(path):
    """A regular file of this user's, looked at without following a link."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()


def holds(settings, uniqueid):
    """Does a trusted spool hold a record of this call (of this release or
    the first, set aside or not)?"""
    return any(is_record(os.path.join(directory, uniqueid + ending))
               for directory in readable_dirs(settings) for ending in ENDINGS)


# -- reading and replaying --------------------------------------------------------

def records(settings):
    """{uniqueid: [paths]} of every spooled record in the trusted spools."""
    return scan(settings)[0]


def scan(settings):
    """({uniqueid: [paths]} of the records in the trusted spools, [paths of
    entries named like records that are not: FIFOs, links, directories,
    other users' files]) -- those are never opened."""
    found, strays = {}, []
    for directory in readable_dirs(settings):
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            ending = next((e for e in ENDINGS if name.endswith(e)), None)
            if ending is None:
                continue
            path = os.path.join(directory, name)
            if not is_record(path):
                strays.append(path)
                continue
            uniqueid = name[:-len(ending)].split(REPEAT)[0]
            found.setdefault(uniqueid, []).append(path)
    return found, strays


def read(path):
    """The CallRecord in ``path``; ValueError if it is not one."""
    import json
    # No link followed, no wait on a FIFO swapped in since the scan.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise ValueError("not a regular file of AstBill's user")
        text = os.read(fd, MAX_RECORD + 1)
    finally:
        os.close(fd)
    if len(text) > MAX_RECORD:
        raise ValueError(f"larger than {MAX_RECORD} bytes")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8; nesting too deep
        raise ValueError(f"not JSON: {type(exc).__name__}") from None
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
            call = read(path)
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


def remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


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
        call = read(path)
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
