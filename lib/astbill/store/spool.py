"""The spool's files: calls the database could not take, one file each.

A record (``UNIQUEID.call``, a call record in JSON) is written whole and
fsync'd before it is linked into place, so it is complete or absent, and
never written over another: a second record of one call gets a name of its
own.  What the spool holds decides what calls cost, so a spool is trusted
only when no one else can write to it: a real directory (no symbolic link)
owned by AstBill's own user and writable by nobody else.  Any other is
refused -- never read, never written.  Inside a trusted spool, only
regular files owned by that user are read, opened without following links
or blocking on a FIFO.  What a record means is the ledger's to say.
"""
import _thread
import os
import stat
import time

SUFFIX = ".call"
LEGACY = ".settle"   # the first release's spool files, replayed the same way
REPEAT = "~"   # UNIQUEID~N.call: a second record of one call (never in a uniqueid)
BAD = ".bad"
CLAIM_LOCK = ".claim.lock"
ENDINGS = (SUFFIX, SUFFIX + BAD, LEGACY, LEGACY + BAD)
# A record is a few hundred bytes; anything much larger is not one.
MAX_RECORD = 65536


class UnsafeSpool(OSError):
    """A spool directory that someone other than AstBill's user could write."""


def spool_dirs(settings):
    return [d for d in (settings["spool_dir"], settings["spool_fallback_dir"]) if d]


def trusted(directory):
    """``directory`` if it exists and may be used as a spool, None if it
    does not exist; UnsafeSpool, naming the fix, if anyone but this user
    could change what it holds."""
    return directory if _trusted_stat(directory) is not None else None


def _trusted_stat(directory):
    """The lstat of ``directory`` if it may be used as a spool (see trusted)."""
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
    return st


def readable_dirs(settings):
    """{spool: the names in it} of the spools that exist and are trusted:
    the only ones ever read."""
    found = {}
    looked = time.time_ns()     # before the directories are looked at: see _names
    for directory in spool_dirs(settings):
        try:
            st = _trusted_stat(directory)
            if st is not None:
                found[directory] = _names(directory, st, looked)
        except OSError:
            continue
    return found


# A long-running process (astbill-fastagi) asks what the spool holds on
# every call, and the spool is nearly always empty: its listing is kept
# while the directory's stamp is unchanged.  A change within the same
# timestamp tick as the last one would leave the stamp as it was, so a
# listing is kept only if the last change is older than any tick when the
# clock was read, before the lstat and the listing: a change made after
# them is then stamped later than the last one was.  That takes the
# filesystem's clock to be this process's; one that is not (a file server
# whose clock is behind, a clock stepped back) is bounded by KEPT_SECS: a
# listing is read again when it is that old, whatever the stamp says.
_listings = {}      # directory -> (its stamp, the names in it, when listed: monotonic)
SETTLED_SECS = 5.0  # longer than any local filesystem's timestamp tick (FAT's: 2 s)
KEPT_SECS = 10.0


def _names(directory, st, looked):
    """The names in ``directory``, whose lstat ``st`` was taken after the
    clock read ``looked`` (ns since the epoch)."""
    stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_nlink)
    kept, now = _listings.get(directory), time.monotonic()
    if kept is not None and kept[0] == stamp and now - kept[2] < KEPT_SECS:
        return kept[1]
    names = frozenset(os.listdir(directory))
    if looked - max(st.st_mtime_ns, st.st_ctime_ns) > SETTLED_SECS * 1e9:
        _listings[directory] = (stamp, names, now)
    return names


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
    return any(uniqueid + ending in names and is_record(os.path.join(directory, uniqueid + ending))
               for directory, names in readable_dirs(settings).items() for ending in ENDINGS)


def records(settings):
    """{uniqueid: [paths]} of every spooled record in the trusted spools."""
    return scan(settings)[0]


def scan(settings):
    """({uniqueid: [paths]} of the records in the trusted spools, [paths of
    entries named like records that are not: FIFOs, links, directories,
    other users' files]) -- those are never opened."""
    found, strays = {}, []
    for directory, names in readable_dirs(settings).items():
        for name in sorted(names):
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


def read_json(path):
    """The JSON in the spool record ``path``; ValueError if there is none."""
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
    return data


def remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
