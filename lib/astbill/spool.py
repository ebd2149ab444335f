"""The settlement spool: settlements the database could not take yet.

One file per call, written whole and fsync'd before it is renamed into
place, so a record is either complete or absent.  Replaying settles each
record through the normal, idempotent settlement and only then removes the
file: a crash in between means the next replay finds the call already
settled and just removes the file, so each call is charged exactly once.
"""
import os

SUFFIX = ".settle"


def write(spool_dir, uniqueid, outcome, late_call=None):
    """Spool one call's settlement; ``late_call`` (Call.record()) for a call
    let through an outage, which has no reservation to settle."""
    import json
    record = {"uniqueid": uniqueid, "dialstatus": outcome.dialstatus,
              "talk_ms": outcome.talk_ms, "duration": outcome.duration,
              "dstchannel": outcome.dstchannel, "end": int(outcome.end), "late": late_call}
    final = os.path.join(spool_dir, uniqueid + SUFFIX)
    tmp = final + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    dir_fd = os.open(spool_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return final


def pending(spool_dir):
    """Paths of the spooled settlements, in uniqueid order."""
    try:
        names = sorted(n for n in os.listdir(spool_dir) if n.endswith(SUFFIX))
    except OSError:
        return []
    return [os.path.join(spool_dir, n) for n in names]


def read(path):
    """(uniqueid, Outcome, late call record or None) of one spooled call."""
    import json
    from .credit import Outcome
    with open(path, encoding="utf-8") as f:
        r = json.load(f)
    return r["uniqueid"], Outcome(r["dialstatus"], r["talk_ms"], r["duration"],
                                  r["dstchannel"], r["end"]), r.get("late")


def replay(store, spool_dir, places):
    """Settle every spooled call; returns (settled, set aside) counts.

    One replayer at a time (a lock file in the spool); any other returns at
    once.  A record that cannot be read, or names no known call, is renamed
    to *.bad for the operator and not tried again.  A database error stops
    the replay: the rest wait for the next one.
    """
    import fcntl
    from types import SimpleNamespace
    from .credit import UnknownCall, bill_late, settle
    from .store import StoreError
    done = set_aside = 0
    try:
        lock = open(os.path.join(spool_dir, ".replay.lock"), "a")
    except OSError:
        return done, set_aside
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return done, set_aside
        for path in pending(spool_dir):
            try:
                uniqueid, outcome, late = read(path)
                if late:
                    bill_late(store, SimpleNamespace(**late), outcome, places)
                else:
                    settle(store, uniqueid, outcome, places)
            except StoreError:
                break
            except (OSError, ValueError, KeyError, TypeError, UnknownCall):
                _set_aside(path)
                set_aside += 1
                continue
            _remove(path)
            done += 1
    return done, set_aside


def _remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _set_aside(path):
    try:
        os.replace(path, path + ".bad")
    except OSError:
        pass
