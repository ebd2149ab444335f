"""The AGI entry point: set up the channel, load the config, bill the call.

Whatever happens, the script exits 0 with ASTBILL_STATUS set where the
channel still listens, one readable line in Asterisk's log, and no Python
traceback on Asterisk's console.
"""
import os
import sys

# The C module itself: ``signal`` wraps it in enums, whose import costs more
# than the rest of a call's start-up.
import _signal as signal

from . import callflow
from .agi import AGIError, BadEnvironment, Channel, Hangup
from .config import ConfigError, load
from .ledger import CAUSES, ERROR


def main(argv, stdin=None, stdout=None):
    channel = Channel(stdin or sys.stdin.buffer, stdout or sys.stdout.buffer)
    # A caller hangup sends SIGHUP, whose default action would kill us
    # before the call is settled.
    signal.signal(signal.SIGHUP, channel.note_hangup)
    settings, settlement, _ = bill(channel, lambda env: parse_args(agi_args(env) or argv))
    if settlement is not None and settlement.cost is not None:
        # The database took our call: retry what earlier calls spooled.
        from .recovery import replay_after_call
        replay_after_call(settings)
    return 0


def _stderr(message):
    sys.stderr.write(message + "\n")


def bill(channel, arguments, log=_stderr):
    """Read the call's environment and bill it: (settings, Settlement or
    None, the problem that ended it early or None).  ``arguments(env)``
    gives (config file or None, number or None)."""
    settings = None
    try:
        channel.read_env()
        config, target = arguments(channel.env)
        settings = load(config)
        return settings, callflow.handle(channel, settings, target), None
    except (ConfigError, BadEnvironment) as exc:
        problem = f"{ERROR} {exc}"
        report(channel, problem, log, settings)
    except (Hangup, AGIError) as exc:
        problem = str(exc)
        log(f"astbill: {exc}")
    except Exception as exc:  # a bug must not leave the dialplan without a status
        problem = f"{ERROR} internal error: {type(exc).__name__}: {exc}"
        report(channel, problem, log, settings)
    return settings, None, problem


def agi_args(env):
    """The arguments of AGI(astbill.py,...), as Asterisk sends them."""
    args = []
    while f"agi_arg_{len(args) + 1}" in env:
        args.append(env[f"agi_arg_{len(args) + 1}"])
    return args


def parse_args(args):
    """(config file or None, number to dial or None) from the AGI arguments:
    ``AGI(astbill.py[,-c,FILE][,NUMBER])``."""
    config = None
    if len(args) >= 2 and args[0] in ("-c", "--config"):
        config, args = args[1], args[2:]
    return config, (args[0] if args and args[0] else None)


def report(channel, message, log=_stderr, settings=None):
    """ERROR for the dialplan, with its hangup cause and prompt as a
    refusal has them; the message in Asterisk's log (or ours)."""
    try:
        channel.set("ASTBILL_STATUS", ERROR)
        channel.set("ASTBILL_CAUSE", CAUSES[ERROR])
        channel.set("ASTBILL_PROMPT", settings["refusal_prompts"].get(ERROR, "") if settings else "")
        channel.verbose(f"astbill: {' '.join(message.split())}")
    except (Hangup, AGIError):
        log(f"astbill: {message}")


# -- FastAGI: the same call flow over TCP, one thread per call ---------------------

ENV_BUDGET = 65536      # bytes an AGI environment block may take
WORKER_IDLE_SECS = 300  # an idle worker thread (and its storage session) ends then
USAGE = "usage: astbill-fastagi [-c FILE] [--listen HOST:PORT]"


class _NetReader:
    """A call's socket as the Channel reads it: a timeout or a reset is the
    end of the connection (EOF); the environment block must come whole
    within ``deadline`` and ENV_BUDGET bytes."""

    def __init__(self, sock, idle_secs):
        self._sock, self._file = sock, sock.makefile("rb")
        self.idle_secs = idle_secs
        self.deadline = _monotonic() + idle_secs
        self.budget = ENV_BUDGET

    def readline(self, limit):
        if self.deadline is not None:
            left = self.deadline - _monotonic()
            if left <= 0:
                raise AGIError(f"no complete AGI environment within {self.idle_secs}s")
            self._sock.settimeout(left)
        try:
            line = self._file.readline(limit)
        except OSError:
            if self.deadline is not None:
                raise AGIError(f"no complete AGI environment within {self.idle_secs}s") from None
            return b""
        if self.budget is not None:
            self.budget -= len(line)
            if self.budget < 0:
                raise AGIError(f"AGI environment longer than {ENV_BUDGET} bytes")
        return line

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


def _monotonic():
    import time
    return time.monotonic()


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


def serve(argv):
    """astbill-fastagi: the FastAGI server.  Exit status 0 after SIGTERM
    once the calls in progress are settled, 1 when a second SIGTERM (or the
    drain's deadline) leaves calls to the sweep, 2 on a bad start."""
    import ipaddress
    import queue
    import selectors
    import socket
    import threading
    import time

    from .config import config_path, forget
    from .ledger import answer_window, settle_time_bound
    from .money import fmt
    from .store import forget_sessions, keep_sessions

    config, listen = None, "127.0.0.1:4573"
    args = list(argv)
    while args:
        opt = args.pop(0)
        if opt in ("-c", "--config") and args:
            config = args.pop(0)
        elif opt == "--listen" and args:
            listen = args.pop(0)
        else:
            _stderr(USAGE)
            return 2
    config = os.path.abspath(config_path(config))
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        _stderr(USAGE)
        return 2
    try:
        settings = load(config)
    except ConfigError as exc:
        _stderr(f"astbill-fastagi: {exc}")
        return 2
    try:
        lsock = socket.create_server((host, int(port)), backlog=128,
                                     family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as exc:
        _stderr(f"astbill-fastagi: cannot listen on {listen}: {exc.strerror or exc}")
        return 2
    keep_sessions()
    lock = threading.Lock()
    state = {"calls": 0, "busy": 0, "served": 0, "refused": 0, "errors": 0,
             "stopping": False, "reload": False, "settings": settings, "nets": None}
    idle_workers = []
    drained = queue.SimpleQueue()  # refused sockets, for the drainer to read out and close

    def stats(*_):
        _stderr(f"astbill-fastagi: calls in progress {state['calls']}, served {state['served']},"
                f" refused {state['refused']}, errors {state['errors']}")

    def on_term(*_):
        if state["stopping"]:
            _stderr(f"astbill-fastagi: second SIGTERM: exiting now, {state['calls']} calls"
                    " in progress left to the sweep")
            os._exit(1)
        state["stopping"] = True

    def on_hup(*_):
        state["reload"] = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(signal.SIGUSR1, stats)

    def current():
        """The server's settings, as its config file now says (the last
        good ones if it is broken)."""
        try:
            now = load(config)
        except ConfigError as exc:
            if state.get("config_ok", True):
                _stderr(f"astbill-fastagi: {exc}; going on with the last good config")
            state["config_ok"] = False
            return state["settings"]
        state["config_ok"] = True
        if now is not state["settings"] or state["nets"] is None:
            state["settings"] = now
            state["nets"] = [ipaddress.ip_network(n) for n in now["fastagi_allow"]]
        return now

    def call_timeout(s):
        return s["max_call_secs"] + answer_window(s, s["lcr_max_trunks"]) + 60

    def one_call(conn):
        s = current()
        notes = []
        channel = _NetChannel(_NetReader(conn, s["fastagi_idle_secs"]), _NetWriter(conn),
                              notes, call_timeout(s))
        try:
            call_settings, settlement, problem = bill(channel, profile_arguments(config),
                                                      notes.append)
        finally:
            with lock:
                state["calls"] -= 1
            try:
                conn.shutdown(socket.SHUT_WR)  # how Asterisk learns the AGI is done
            except OSError:
                pass
            conn.close()
        if not notes and settlement is not None:
            cost = "-" if settlement.cost is None else fmt(
                settlement.cost, call_settings["decimals"])
            notes.append(f"astbill: {channel.env.get('agi_uniqueid', '')} {settlement.how}:"
                         f" {settlement.billsec}s, cost {cost}")
        _stderr("; ".join(notes) or f"astbill: {problem}")
        with lock:
            state["errors" if problem else "served"] += 1
        if settlement is not None and settlement.cost is not None:
            from .recovery import replay_after_call
            replay_after_call(call_settings)

    def worker(conn):
        box = queue.SimpleQueue()
        while True:
            try:
                one_call(conn)
            except Exception as exc:  # never lose the thread's count
                _stderr(f"astbill-fastagi: internal error: {type(exc).__name__}: {exc}")
            with lock:
                state["busy"] -= 1
                idle_workers.append(box)
            try:
                conn = box.get(timeout=WORKER_IDLE_SECS)
            except queue.Empty:
                with lock:
                    if box in idle_workers:
                        idle_workers.remove(box)
                        forget_sessions()
                        return
                conn = box.get()

    def drainer():
        """Read out and close refused connections (so that Asterisk gets
        its reply before the close), each within 2 s."""
        sel, born = selectors.DefaultSelector(), {}
        while True:
            while True:
                try:
                    sock = drained.get(timeout=0.1 if born else None)
                except queue.Empty:
                    break
                sock.setblocking(False)
                sel.register(sock, selectors.EVENT_READ)
                born[sock] = time.monotonic()
                if drained.empty():
                    break
            for key, _ in sel.select(0.1) if born else ():
                try:
                    more = key.fileobj.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    more = b""
                if not more:
                    born[key.fileobj] = 0
            for sock, when in list(born.items()):
                if time.monotonic() - when > 2:
                    sel.unregister(sock)
                    sock.close()
                    del born[sock]

    threading.Thread(target=drainer, name="drainer", daemon=True).start()

    def refuse_busy(conn, limit):
        _stderr(f"astbill: {ERROR} {limit} calls in progress already (fastagi_max_calls)")
        try:
            conn.setblocking(False)
            conn.send(b'SET VARIABLE ASTBILL_STATUS "ERROR"\n')
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            conn.close()
            return
        drained.put(conn)

    def dispatch(conn, peer):
        s = current()
        address = ipaddress.ip_address(peer[0].split("%")[0])
        if address.version == 6 and address.ipv4_mapped:
            address = address.ipv4_mapped
        if not any(address in net for net in state["nets"] if net.version == address.version):
            conn.close()
            _stderr(f"astbill-fastagi: connection from {address} closed: not in fastagi_allow")
            with lock:
                state["refused"] += 1
            return
        with lock:
            over = state["calls"] >= s["fastagi_max_calls"]
            if over:
                state["refused"] += 1
            else:
                state["calls"] += 1
                state["busy"] += 1
                box = idle_workers.pop() if idle_workers else None
        if over:
            return refuse_busy(conn, s["fastagi_max_calls"])
        if box is not None:
            box.put(conn)
        else:
            threading.Thread(target=worker, args=(conn,), daemon=True).start()

    _stderr(f"astbill-fastagi: listening on {listen.rpartition(':')[0]}:{lsock.getsockname()[1]}"
            f" (config {config})")
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ)
    while not state["stopping"]:
        if state["reload"]:
            state["reload"] = False
            forget()
            try:
                load(config)
                _stderr("astbill-fastagi: config reloaded")
            except ConfigError as exc:
                _stderr(f"astbill-fastagi: {exc}; going on with the last good config")
        if not sel.select(0.5):
            continue
        try:
            conn, peer = lsock.accept()
        except OSError:
            continue
        conn.setblocking(True)
        dispatch(conn, peer)
    lsock.close()
    s = current()
    deadline = time.monotonic() + call_timeout(s) + settle_time_bound(s)
    _stderr(f"astbill-fastagi: SIGTERM: not accepting; waiting for {state['calls']} calls in"
            " progress")
    while state["busy"] and time.monotonic() < deadline:
        time.sleep(0.1)
    if state["busy"]:
        _stderr(f"astbill-fastagi: {state['calls']} calls still in progress: left to the sweep")
        return 1
    stats()
    return 0
