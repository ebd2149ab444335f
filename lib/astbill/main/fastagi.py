"""astbill-fastagi: the call flow of astbill.py as a FastAGI server.

One thread per call in progress, kept with its storage session for the
next call while it is idle; at most fastagi_max_calls at once, one more
answered ASTBILL_STATUS=ERROR at once.  SIGTERM stops accepting and lets
the calls in progress settle; SIGHUP reads the config again; SIGUSR1 logs
the counts.  With --processes N, N such processes share the listening
socket (``prefork``).  Each process keeps to one CPU unless --no-pin.
"""
import ipaddress
import os
import queue
import selectors
import signal
import socket
import sys
import threading
import time

from . import _stderr as log
from . import agi_args, bill, parse_args
from ..agi import AGIError, Channel
from ..config import ConfigError, config_path, forget, load
from ..ledger import CAUSES, ERROR, answer_window, settle_time_bound
from ..money import fmt
from ..store import forget_sessions, is_sqlite, keep_sessions
from .prefork import ABANDON, SIGNALS, CallCounts, cpus_for, keep_to, supervise

ENV_BUDGET = 65536      # bytes an AGI environment block may take
WORKER_IDLE_SECS = 300  # an idle worker thread (and its storage session) ends then
REFUSED_READ_SECS = 2   # how long a refused connection is read out before it is closed
ADMITTED_PEERS = 1024   # peers whose admission is remembered (Asterisk boxes are few)
UNPINGED_SECS = 1.0     # a kept storage session that answered this recently is not pinged
MAX_PROCESSES = 64
USAGE = ("usage: astbill-fastagi [-c FILE] [--listen HOST:PORT] [--processes N] [--no-pin]"
         f" (N from 1 to {MAX_PROCESSES})")


def call_timeout(settings):
    """How long a call's socket may stay silent: its longest ring and talk
    time, and a minute more for Asterisk to get round to answering."""
    return settings["max_call_secs"] + answer_window(settings, settings["lcr_max_trunks"]) + 60


def drain_bound(settings):
    """How long SIGTERM waits for the calls in progress: a call already in
    its Dial may still ring, talk up to max_call_secs and then settle (a
    settlement that cannot be made by then is spooled)."""
    return (answer_window(settings, settings["lcr_max_trunks"]) + settings["max_call_secs"]
            + settle_time_bound(settings))


class _NetReader:
    """A call's socket as the Channel reads it, a line at a time from a
    buffer of its own (one recv per reply, not a file object's layers): a
    timeout or a reset is the end of the connection (EOF); the environment
    block must come whole within ``deadline`` and ENV_BUDGET bytes."""

    def __init__(self, sock, idle_secs):
        self._sock, self._buf = sock, bytearray()
        self.idle_secs = idle_secs
        self.deadline = time.monotonic() + idle_secs
        self.budget = ENV_BUDGET

    def readline(self, limit):
        buf = self._buf
        while True:
            end = buf.find(b"\n", 0, limit)
            if end >= 0 or len(buf) >= limit:
                size = end + 1 if end >= 0 else limit
                break
            chunk = self._recv()
            if not chunk:
                size = len(buf)
                break
            buf += chunk
        line = bytes(buf[:size])
        del buf[:size]
        if self.budget is not None:
            self.budget -= len(line)
            if self.budget < 0:
                raise AGIError(f"AGI environment longer than {ENV_BUDGET} bytes")
        return line

    def _recv(self):
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise AGIError(f"no complete AGI environment within {self.idle_secs}s")
            self._sock.settimeout(left)
        try:
            return self._sock.recv(65536)
        except OSError:
            if self.deadline is not None:
                raise AGIError(f"no complete AGI environment within {self.idle_secs}s") from None
            return b""

    def call_phase(self, timeout):
        self.deadline = self.budget = None
        self._sock.settimeout(timeout)


class _NetWriter:
    def __init__(self, sock):
        self._sock = sock

    def write(self, data):
        try:
            self._sock.sendall(data)
        except OSError:
            raise BrokenPipeError from None

    def flush(self):
        pass


class _NetChannel(Channel):
    """The Channel over a FastAGI connection; keeps the VERBOSE lines for
    the server's own log."""

    def __init__(self, reader, writer, notes, call_timeout):
        super().__init__(reader, writer)
        self.notes, self._call_timeout = notes, call_timeout

    def read_env(self):
        env = super().read_env()
        self._r.call_phase(self._call_timeout)
        return env

    def verbose(self, message, level=1):
        self.notes.append(message)
        return super().verbose(message, level)


def profile_arguments(server_config):
    """The arguments of a FastAGI call: those of AGI(astbill.py,...), and
    agi://HOST:PORT/astbill/NAME for the profile NAME.yaml beside the
    server's config file."""
    def arguments(env):
        config, target = parse_args(agi_args(env))
        script = env.get("agi_network_script")
        if script not in (None, "astbill") and not script.startswith("astbill/"):
            raise ConfigError(f"unknown FastAGI script {script[:40]!r}:"
                              " use agi://HOST:PORT/astbill[/PROFILE]")
        if script and script.startswith("astbill/"):
            name = script[len("astbill/"):]
            if not (name and name.isascii() and name.replace("_", "").replace("-", "").isalnum()):
                raise ConfigError(f"FastAGI profile {name[:40]!r} is not a plain word")
            profile = os.path.join(os.path.dirname(os.path.abspath(server_config)), name + ".yaml")
            config = config or profile
        return config or server_config, target
    return arguments


class _ServerConfig:
    """The server's settings as its config file now says (the config memo
    makes that a stat), the last good ones while the file is broken, and
    fastagi_allow parsed once per change."""

    def __init__(self, path, settings, name):
        self.path, self.settings, self.good, self.name = path, settings, True, name
        self.nets = self._nets(settings)
        self._admitted = {}     # peer host -> admission(host); None -> the nets it is for

    def current(self):
        try:
            now = load(self.path)
        except ConfigError as exc:
            self._broken(exc)
            return self.settings
        self.good = True
        if now is not self.settings:
            self.settings, self.nets = now, self._nets(now)
        return now

    def reload(self):
        """SIGHUP: read the file again even where its stamp has not changed."""
        forget()
        try:
            load(self.path)
        except ConfigError as exc:
            self.good = True    # say so even if the last look said it already
            self._broken(exc)
            return
        log(f"{self.name}: config reloaded")

    def _broken(self, exc):
        if self.good:   # once per breakage, not once per call
            log(f"{self.name}: {exc}; going on with the last good config")
        self.good = False

    @staticmethod
    def _nets(settings):
        return [ipaddress.ip_network(n) for n in settings["fastagi_allow"]]

    def admission(self, host):
        """(the peer's address, whether fastagi_allow lets it in), worked
        out once per peer while fastagi_allow stays as it is."""
        nets, known = self.nets, self._admitted
        if known.get(None) is not nets or len(known) > ADMITTED_PEERS:
            known.clear()
            known[None] = nets
        if host not in known:
            address = ipaddress.ip_address(host.split("%")[0])
            if address.version == 6 and address.ipv4_mapped:
                address = address.ipv4_mapped
            known[host] = address, any(address in net for net in nets
                                       if net.version == address.version)
        return known[host]


class _RefusedCloser(threading.Thread):
    """Reads out and closes the connections refused over fastagi_max_calls:
    closed unread, a socket could be reset before Asterisk has read its
    ASTBILL_STATUS.  Each is closed at its EOF or after REFUSED_READ_SECS."""

    def __init__(self):
        super().__init__(name="refused-closer", daemon=True)
        self._new = queue.SimpleQueue()
        self._sel, self._since = selectors.DefaultSelector(), {}

    def put(self, sock):
        self._new.put(sock)

    def run(self):
        while True:
            self._take_new()
            for key, _ in self._sel.select(0.1):
                self._read(key.fileobj)
            self._close_overdue()

    def _take_new(self):
        """Register the sockets refused since; wait for one if none is open."""
        while True:
            try:
                sock = self._new.get(timeout=0.1 if self._since else None)
            except queue.Empty:
                return
            sock.setblocking(False)
            self._sel.register(sock, selectors.EVENT_READ)
            self._since[sock] = time.monotonic()
            if self._new.empty():
                return

    def _read(self, sock):
        try:
            if sock.recv(65536):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._since[sock] = 0   # EOF or reset: close it now

    def _close_overdue(self):
        now = time.monotonic()
        for sock, since in list(self._since.items()):
            if now - since > REFUSED_READ_SECS:
                self._sel.unregister(sock)
                sock.close()
                del self._since[sock]


class FastAGIServer:
    """The listening socket, the worker threads and their counts.

    ``counts`` holds the calls being served (the bound), served, refused
    and errors, of this process and of the others on the same socket;
    ``busy`` counts this process's workers not yet idle, which also covers
    a call's replay of the spool after its connection is closed (the drain
    waits for that too).  ``parent``: the pid of the process that forked
    this one, whose end stops this one as SIGTERM does.
    """

    def __init__(self, config, settings, lsock, counts, name="astbill-fastagi", parent=None):
        self.name = name
        self.config = _ServerConfig(config, settings, name)
        self.lsock = lsock
        self.counts, self.parent = counts, parent
        self.lock = threading.Lock()
        self.busy = 0
        self.stopping = self.reload_asked = False
        self.idle_workers = []      # the mailboxes of idle workers, each a SimpleQueue
        self.closer = _RefusedCloser()

    # -- running -----------------------------------------------------------

    def run(self, announce=None):
        """Serve until SIGTERM, then drain: the exit status.  ``announce``
        is logged once the signal handlers are in place."""
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGHUP, self._on_hup)
        signal.signal(signal.SIGUSR1, self.counts.log)
        if self.parent is not None:
            signal.signal(ABANDON, lambda *_: self._abandon("second SIGTERM: exiting now"))
        # A forked process starts with them blocked, so that none is lost
        # before these handlers are in place.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        if announce:
            log(announce)
        # A call's storage work runs through ledger.attempt (the replay after
        # it, if its first statement fails so, waits for the next call).
        keep_sessions(UNPINGED_SECS)
        self.closer.start()
        self._accept_loop()
        self.lsock.close()
        return self._drain()

    def _on_term(self, *_):
        # A forked process leaves the second SIGTERM to its parent (ABANDON).
        if self.stopping and self.parent is None:
            self._abandon("second SIGTERM: exiting now")
        self.stopping = True

    def _on_hup(self, *_):
        self.reload_asked = True    # done in the accept loop, not inside a signal handler

    def _abandon(self, why):
        """Exit at once, as a killed process does: each call in progress
        keeps its reservation, and the sweep settles it by policy."""
        log(f"{self.name}: {why}, {self.counts.mine('calls')} calls in progress left to the"
            " sweep")
        sys.stderr.flush()
        os._exit(1)

    def _drain(self):
        deadline = time.monotonic() + drain_bound(self.config.current())
        log(f"{self.name}: SIGTERM: not accepting; waiting for {self.counts.mine('calls')} calls"
            " in progress")
        while self.busy and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.busy:
            self._abandon("drain deadline passed")
        if self.parent is None:     # else the parent, once all are done
            self.counts.log()
        return 0

    # -- accepting ---------------------------------------------------------

    def _accept_loop(self):
        sel = selectors.DefaultSelector()
        sel.register(self.lsock, selectors.EVENT_READ)
        while not self.stopping:
            if self.reload_asked:
                self.reload_asked = False
                self.config.reload()
            if self.parent is not None and os.getppid() != self.parent:
                log(f"{self.name}: the parent process is gone")
                break
            # Woken twice a second at most to see SIGTERM and SIGHUP.
            if not sel.select(0.5):
                continue
            try:    # the socket is shared: another process may have taken it
                conn, peer = self.lsock.accept()
            except OSError:
                continue
            conn.setblocking(True)
            self._admit(conn, peer)

    def _admit(self, conn, peer):
        settings = self.config.current()
        address, allowed = self.config.admission(peer[0])
        if not allowed:
            conn.close()
            log(f"{self.name}: connection from {address} closed: not in fastagi_allow")
            self.counts.add("refused")
            return
        limit = settings["fastagi_max_calls"]
        if self.counts.take_call(limit):
            with self.lock:
                self.busy += 1
            self._hand_over(conn)
        else:
            self._refuse_busy(conn, limit)

    def _hand_over(self, conn):
        """To an idle worker (and its storage session), else to a new one."""
        with self.lock:
            mailbox = self.idle_workers.pop() if self.idle_workers else None
        if mailbox is None:
            threading.Thread(target=self._worker, args=(conn,), daemon=True).start()
        else:
            mailbox.put(conn)

    def _refuse_busy(self, conn, limit):
        """ASTBILL_STATUS=ERROR at once, never a queue: Asterisk must not wait."""
        log(f"astbill: {ERROR} {limit} calls in progress already (fastagi_max_calls)")
        try:
            conn.setblocking(False)
            # Asterisk runs each line in turn; no reply needs reading.
            conn.send(b'SET VARIABLE ASTBILL_STATUS "ERROR"\n'
                      b'SET VARIABLE ASTBILL_CAUSE "%d"\n' % CAUSES[ERROR])
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            conn.close()
            return
        self.closer.put(conn)

    # -- one worker, one call at a time --------------------------------------

    def _worker(self, conn):
        mailbox = queue.SimpleQueue()
        while conn is not None:
            try:
                self._serve_call(conn)
            except Exception as exc:  # never lose the thread's count
                log(f"{self.name}: internal error: {type(exc).__name__}: {exc}")
            with self.lock:
                self.busy -= 1
                self.idle_workers.append(mailbox)
            conn = self._next_call(mailbox)

    def _next_call(self, mailbox):
        """The next connection for this idle worker, or None after
        WORKER_IDLE_SECS without one (its storage session is closed)."""
        try:
            return mailbox.get(timeout=WORKER_IDLE_SECS)
        except queue.Empty:
            pass
        with self.lock:
            retired = mailbox in self.idle_workers
            if retired:
                self.idle_workers.remove(mailbox)
        if retired:
            forget_sessions()
            return None
        return mailbox.get()    # handed a call just as the wait ended

    def _serve_call(self, conn):
        settings = self.config.current()
        notes = []
        channel = _NetChannel(_NetReader(conn, settings["fastagi_idle_secs"]), _NetWriter(conn),
                              notes, call_timeout(settings))
        try:
            call_settings, settlement, problem = bill(
                channel, profile_arguments(self.config.path), notes.append)
        finally:
            self._hang_up(conn)
        # Counted before the line is written: counts read after it include the call.
        self.counts.add("errors" if problem else "served")
        log("; ".join(notes or [self._outcome(channel, call_settings, settlement, problem)]))
        if settlement is not None and settlement.cost is not None:
            # The database took our call: retry what earlier calls spooled.
            from ..recovery import replay_after_call
            replay_after_call(call_settings)

    def _hang_up(self, conn):
        self.counts.add("calls", -1)
        try:
            conn.shutdown(socket.SHUT_WR)  # how Asterisk learns the AGI is done
        except OSError:
            pass
        conn.close()

    @staticmethod
    def _outcome(channel, settings, settlement, problem):
        """The call's log line when it wrote no VERBOSE line of its own."""
        if settlement is None:
            return f"astbill: {problem}"
        cost = "-" if settlement.cost is None else fmt(settlement.cost, settings["decimals"])
        return (f"astbill: {channel.env.get('agi_uniqueid', '')} {settlement.how}:"
                f" {settlement.billsec}s, cost {cost}")


def parse_command_line(argv):
    """(config file, host, port, processes, whether to pin them to CPUs)
    from astbill-fastagi's arguments, or None."""
    config, listen, processes, pin = None, "127.0.0.1:4573", "1", True
    args = list(argv)
    while args:
        opt = args.pop(0)
        if opt in ("-c", "--config") and args:
            config = args.pop(0)
        elif opt == "--listen" and args:
            listen = args.pop(0)
        elif opt == "--processes" and args:
            processes = args.pop(0)
        elif opt == "--no-pin":
            pin = False
        else:
            return None
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not processes.isdigit():
        return None
    if not 1 <= int(processes) <= MAX_PROCESSES:
        return None
    return os.path.abspath(config_path(config)), host, int(port), int(processes), pin


def shown(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def serve(argv):
    """astbill-fastagi: exit status 0 after SIGTERM once the calls in
    progress are settled, 1 when a second SIGTERM (or the drain's deadline)
    leaves calls to the sweep, 2 on a bad start."""
    parsed = parse_command_line(argv)
    if parsed is None:
        log(USAGE)
        return 2
    config, host, port, processes, pin = parsed
    try:
        settings = load(config)
    except ConfigError as exc:
        log(f"astbill-fastagi: {exc}")
        return 2
    if processes > 1 and is_sqlite(settings):
        log(f"astbill-fastagi: --processes {processes} needs MySQL or MariaDB: on SQLite one"
            " process's threads take turns for the file's lock")
        return 2
    try:
        lsock = socket.create_server((host, port), backlog=128,
                                     family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as exc:
        log(f"astbill-fastagi: cannot listen on {shown(host, port)}: {exc.strerror or exc}")
        return 2
    lsock.setblocking(False)    # a process woken for a connection another took goes on
    host, port = lsock.getsockname()[:2]
    cpus = cpus_for(processes) if pin else None
    counts = CallCounts(processes)
    if processes == 1:
        problem = keep_to(cpus[0]) if cpus else None
        return FastAGIServer(config, settings, lsock, counts).run(
            listening(host, port, config, processes, cpus, problem))
    parent = os.getpid()

    def serve_one(index):
        counts.index = index
        name = f"astbill-fastagi process {index + 1} of {processes}"
        problem = keep_to(cpus[index]) if cpus else None
        if problem:
            log(f"{name}: {problem}")
        return FastAGIServer(config, settings, lsock, counts, parent=parent, name=name).run()
    return supervise(serve_one, processes, counts, lsock,
                     listening(host, port, config, processes, cpus))


def listening(host, port, config, processes, cpus, problem=None):
    """The line that says the server is up: where, with which config, how
    many processes, kept to which CPUs (with --processes, as planned: a
    process that cannot keep to its CPU says so)."""
    line = f"astbill-fastagi: listening on {shown(host, port)} (config {config}"
    if processes > 1:
        line += f", {processes} processes"
    if problem:
        return f"{line}; {problem})"
    if cpus:
        line += f", pinned to CPU{'s' if processes > 1 else ''} {','.join(map(str, cpus))}"
    return line + ")"
