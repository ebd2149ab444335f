"""astbill-fastagi --processes N: N server processes on one listening socket.

A Python process runs one thread at a time, and a busy server's threads
spend about as much CPU handing that lock to each other as on the calls
(on MariaDB, 2.7 ms per call with 100 clients, 1.4 ms with one; less
with the process kept to one CPU, ``cpus_for``).  N
processes forked once the socket is bound take its connections in turn,
whichever is free first.  Their counts live in memory they share, so
fastagi_max_calls bounds all of them together.  The parent serves no call:
it passes signals on, keeps the counts of those that ended, and forks a
new process for one that died.
"""
import fcntl
import mmap
import os
import signal
import sys
import threading
import time

from . import _stderr as log

FIELDS = ("calls", "served", "refused", "errors")
# A forked process drains on SIGTERM, as often as it comes: systemd may send
# it one besides the one the parent passes on.  ABANDON is the parent's
# second SIGTERM, passed on: exit at once.
ABANDON = signal.SIGUSR2
SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, ABANDON)
RESPAWN_PAUSE_SECS = 1  # a process that died this young is not forked again at once


class CallCounts:
    """Each server process's calls in progress, served, refused and errors,
    in memory shared by all the processes.  A process changes only its own
    counts, under a lock of its threads; taking a call, which reads every
    process's, also takes a record lock (processes) that the kernel lets go
    of if its holder dies.  A count read while its process lowers it is at
    worst one call too many: a refusal, never a call over the bound.
    ``index``: the process whose counts this one changes."""

    def __init__(self, processes):
        self.shared = processes > 1
        self._fd = os.memfd_create("astbill-fastagi-counts")
        os.ftruncate(self._fd, 8 * len(FIELDS) * processes)
        self._table = memoryview(mmap.mmap(self._fd, 8 * len(FIELDS) * processes)).cast("q")
        self._lock = threading.Lock()
        self.index = 0

    def _locked(self):
        return _Locked(self._lock, self._fd if self.shared else None)

    def take_call(self, limit):
        """Count a new call, unless ``limit`` calls are in progress in all
        processes together (then count a refusal)."""
        calls = self._table[0::len(FIELDS)]
        with self._locked():
            if sum(calls) >= limit:
                self._add("refused", 1)
                return False
            self._add("calls", 1)
            return True

    def add(self, field, n=1):
        with self._lock:
            self._add(field, n)

    def _add(self, field, n):
        self._table[self._mine(field)] += n

    def mine(self, field):
        return self._table[self._mine(field)]

    def _mine(self, field):
        """Where this process's ``field`` is in the table."""
        return self.index * len(FIELDS) + FIELDS.index(field)

    def log(self, *_):
        """The SIGUSR1 line: the counts of every process on the socket.
        Read without the locks: a signal handler runs in the thread it
        interrupts, which may hold them (each count is one aligned word)."""
        total = {f: sum(self._table[i::len(FIELDS)]) for i, f in enumerate(FIELDS)}
        log(f"astbill-fastagi: calls in progress {total['calls']}, served {total['served']},"
            f" refused {total['refused']}, errors {total['errors']}")

    def forget_calls(self, index):
        """A process that died has no calls in progress any more."""
        with self._locked():
            self._table[index * len(FIELDS)] = 0


class _Locked:
    def __init__(self, lock, fd):
        self._lock, self._fd = lock, fd

    def __enter__(self):
        self._lock.acquire()
        if self._fd is not None:
            fcntl.lockf(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *_):
        if self._fd is not None:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        self._lock.release()


def cpus_for(processes):
    """The CPU each of ``processes`` server processes keeps to: those this
    one may run on (systemd's CPUAffinity=, taskset), from the highest
    down (the first CPUs take most of the interrupts), in turn; None where
    the system cannot say.  A process's threads take turns for its one
    interpreter lock, and a turn handed to a thread on another CPU costs
    that CPU a wake-up: kept to one CPU, a process spent an eighth to
    nearly half less CPU per call with 100 calls at once (README, "Measured")."""
    try:
        allowed = sorted(os.sched_getaffinity(0), reverse=True)
    except (AttributeError, OSError):
        return None
    return [allowed[index % len(allowed)] for index in range(processes)]


def keep_to(cpu):
    """Keep this process to ``cpu``: None, or why it could not (it then
    runs anywhere).  Called before the process starts a thread: its
    threads are then all kept there."""
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as exc:
        return f"cannot keep to CPU {cpu}: {exc.strerror or exc}; left to the scheduler"
    return None


def describe(status):
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return f"exited {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


def supervise(serve_one, processes, counts, lsock, announce):
    """Fork ``processes`` processes, each running ``serve_one(index)`` on
    the listening socket ``lsock`` to its exit status, until SIGTERM has
    stopped them all: 0 when every one drained, else 1.  SIGTERM (the
    second as ABANDON) and SIGHUP are passed on; SIGUSR1 is answered here.
    ``announce`` is logged once the handlers are in place.  The parent must
    hold no thread: a fork copies only the one that forks."""
    children = {}           # pid -> (index, when it was forked)
    terms = []

    def pass_on(signum, _):
        if signum == signal.SIGTERM:
            terms.append(signum)
            lsock.close()   # the processes close theirs: no connection is taken any more
            signum = signal.SIGTERM if len(terms) == 1 else ABANDON
        for pid in list(children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
    signal.signal(signal.SIGTERM, pass_on)
    signal.signal(signal.SIGHUP, pass_on)
    signal.signal(signal.SIGUSR1, counts.log)
    log(announce)
    for index in range(processes):
        _fork(children, index, serve_one, terms)
    status = 0
    while children:
        pid, how = os.wait()
        index, born = children.pop(pid)
        counts.forget_calls(index)
        if terms:
            status = status or int(how != 0)
            continue
        log(f"astbill-fastagi: process {index + 1} of {processes} {describe(how)}; its calls"
            " in progress are left to the sweep; starting it again")
        if time.monotonic() - born < RESPAWN_PAUSE_SECS:
            time.sleep(RESPAWN_PAUSE_SECS)
        _fork(children, index, serve_one, terms)
    counts.log()
    return status


def _fork(children, index, serve_one, terms):
    """A process for ``index``, unless SIGTERM came (``terms``), tried again
    after a pause while the system cannot fork one."""
    while not terms:
        try:
            return _fork_one(children, index, serve_one)
        except OSError as exc:
            log(f"astbill-fastagi: cannot start process {index + 1}: {exc.strerror or exc}")
            time.sleep(RESPAWN_PAUSE_SECS)


def _fork_one(children, index, serve_one):
    """A process for ``index``, started with the signals it handles blocked:
    it unblocks them once its own handlers are in place, so none is lost."""
    blocked = set(SIGNALS)
    signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                for signum in blocked:
                    signal.signal(signum, signal.SIG_DFL)
                status = serve_one(index)
            except BaseException as exc:
                log(f"astbill-fastagi: process {index + 1}: {type(exc).__name__}: {exc}")
            finally:
                try:
                    sys.stderr.flush()
                finally:
                    os._exit(status)
        children[pid] = (index, time.monotonic())
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
