"""A private, throwaway MariaDB Galera cluster on loopback (standard library only).

Uses Debian's ``mariadb-server`` binaries, the ``galera-4`` provider and ``rsync``
for state transfers.  Node 0 bootstraps a new cluster; the others join one at a
time, each after the previous one is Synced.  Every node listens on 127.0.0.1
only.  Typical use::

    cluster = GaleraCluster(tmp_path / "galera")
    cluster.start()
    urls = cluster.create_database("astbill_test")  # one URL per node
    ...
    cluster.kill(1)                 # SIGKILL, as a crash would
    cluster.wait_evicted(30)        # the others drop it and go on
    cluster.stop()

Run as root, the nodes run as the ``mysql`` user (the rsync state transfer
cannot write the joiner's datadir otherwise); run as anyone else, as that user.
Their files live in a new directory that user can reach: inside ``basedir`` when
every parent directory is traversable (and socket paths stay short), else under
the system's temporary directory (pytest's are private), removed by ``stop()``
after the nodes' error logs are copied into ``basedir`` as ``node<i>.err``.

SQL goes through PyMySQL when it is importable, else through the ``mariadb``
client; either way rows come back as tuples of strings (None for NULL).
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import pathlib
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import uuid
from typing import Optional, Tuple

try:  # optional: quicker than one client process per statement
    import pymysql
except ImportError:  # pragma: no cover - depends on the environment
    pymysql = None

from mariadb_server import _which, find_mariadbd

ROOT_PASSWORD = "astbill-test-pw"
# Accounts for the tests: the socket (localhost) and TCP on loopback.
ROOT_HOSTS = ("localhost", "127.0.0.1", "::1", "%")
# Debian's galera-4 package.
GALERA_PROVIDERS = ("/usr/lib/galera/libgalera_smm.so",)
# Provider options that evict a SIGKILLed node in about 1.5 s instead of about
# 6 s (measured on loopback).  Galera's constraints: keepalive_period <=
# suspect_timeout/3, inactive_check_period <= suspect_timeout/2 (fixed at start),
# 2*keepalive_period <= install_timeout <= inactive_timeout.  install_timeout is
# set because at its default (inactive_timeout/2) the survivors were seen to
# split into two non-Primary halves for good, and joiners to fail to join;
# a short join_retrans_period makes view changes (and joins) quicker.
FAST_EVICTION = ("evs.keepalive_period=PT0.2S;evs.inactive_check_period=PT0.3S;"
                 "evs.suspect_timeout=PT1S;evs.inactive_timeout=PT3S;"
                 "evs.install_timeout=PT3S;evs.join_retrans_period=PT0.2S")
# OS user the nodes run as when started by root.
NODE_USER = "mysql"
# Unix socket paths are limited to ~107 bytes.
_MAX_SOCKET_PATH = 100

Row = Tuple[Optional[str], ...]


def missing_parts() -> list[str]:
    """What a cluster needs that this machine lacks (Debian package names)."""
    missing = []
    if find_galera() is None:
        missing.append("galera-4")
    if find_mariadbd() is None:
        missing.append("mariadb-server")
    if shutil.which("rsync") is None:
        missing.append("rsync")
    if pymysql is None:
        missing.append("PyMySQL")
    return missing


def find_galera() -> str | None:
    """Path to the Galera provider library, or None if it is not installed."""
    for path in GALERA_PROVIDERS:
        if os.path.isfile(path):
            return path
    return None


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports that were free on 127.0.0.1 a moment ago."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:``port`` (TIME_WAIT does not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _quote(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _sql_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _tail(path: pathlib.Path, lines: int = 40, start: int = 0) -> str:
    """The last ``lines`` lines of a log, from byte ``start`` on."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        return f"({path} not readable)"
    return "\n".join(text.splitlines()[-lines:])


def _traversable(path: pathlib.Path, uid: int, gid: int) -> bool:
    """Whether user ``uid`` (primary group ``gid``) can reach ``path``."""
    for p in (path, *path.parents):
        try:
            st = p.stat()
        except OSError:
            return False
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid == gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


_ESCAPES = {"n": "\n", "t": "\t", "0": "\0", "\\": "\\", "b": "\b"}


def _unescape(field: str) -> str | None:
    """One field of the client's --batch output (NULL prints as NULL)."""
    if field == "NULL":
        return None
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(0)), field)


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode(errors="replace")
    return str(value)


class SQLError(RuntimeError):
    """A statement failed; ``errno`` is the server's error number when known."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


@dataclasses.dataclass
class _Node:
    index: int
    dir: pathlib.Path
    port: int
    gcomm_port: int
    ist_port: int
    sst_port: int
    proc: subprocess.Popen | None = None
    log_start: int = 0  # error-log offset where the current run began

    @property
    def datadir(self) -> pathlib.Path:
        return self.dir / "data"

    @property
    def tmpdir(self) -> pathlib.Path:
        return self.dir / "tmp"

    @property
    def config(self) -> pathlib.Path:
        return self.dir / "my.cnf"

    @property
    def socket(self) -> str:
        return str(self.dir / "mariadbd.sock")

    @property
    def pid_file(self) -> pathlib.Path:
        return self.dir / "mariadbd.pid"

    @property
    def error_log(self) -> pathlib.Path:
        return self.dir / "error.log"


class GaleraCluster:
    """``nodes`` MariaDB servers in one Galera cluster, all on 127.0.0.1."""

    def __init__(self, basedir: pathlib.Path, nodes: int = 3, provider_options: str = ""):
        if nodes < 1:
            raise ValueError("a cluster needs at least one node")
        if any(c in provider_options for c in "\"\n"):
            raise ValueError("provider_options must be one line without double quotes")
        self.basedir = pathlib.Path(basedir).resolve()
        self.size = nodes
        self.provider_options = provider_options.strip().strip(";")
        self.password = ROOT_PASSWORD
        self.cluster_name = f"astbill-test-{uuid.uuid4().hex[:12]}"
        self._mariadbd = find_mariadbd()
        self._client = _which("mariadb", "mysql")
        self._install_db = _which("mariadb-install-db", "mysql_install_db")
        self._provider = find_galera()
        self._user: str | None = NODE_USER if os.geteuid() == 0 else None
        self._rundir: pathlib.Path | None = None
        self._own_rundir = False  # created under the temp dir: removed by stop()
        self._nodes: list[_Node] = []
        atexit.register(self._cleanup)

    # -- public API ----------------------------------------------------------

    @property
    def live(self) -> list[int]:
        """Indexes of the nodes whose server process is running."""
        return [n.index for n in self._nodes if n.proc is not None and n.proc.poll() is None]

    def port(self, i: int) -> int:
        """Client (TCP) port of node ``i``."""
        return self._node(i).port

    def url(self, i: int, database: str) -> str:
        return f"mysql://root:{self.password}@127.0.0.1:{self.port(i)}/{database}"

    def start(self, timeout: float = 120.0) -> float:
        """Bootstrap node 0, then join the others one at a time.

        ``timeout`` bounds each node's start (state transfer included); a node
        that exits raises RuntimeError, one not Synced in time TimeoutError,
        both with the tail of its error log.  A node whose ports were taken
        meanwhile is retried on others.  One start per instance.  Returns the
        seconds taken, from nothing to all nodes Synced.
        """
        missing = [name for name, found in (
            ("mariadbd", self._mariadbd), ("mariadb client", self._client),
            ("mariadb-install-db", self._install_db), ("galera-4 provider", self._provider),
            ("rsync", _which("rsync"))) if not found]
        if missing:
            raise RuntimeError("Galera test cluster needs: " + ", ".join(missing))
        if self._nodes:
            raise RuntimeError("cluster already started")
        t0 = time.monotonic()
        self._prepare()
        try:
            self._install(self._nodes[0], timeout)
            for node in self._nodes:
                self._start_node(node, bootstrap=node.index == 0, timeout=timeout)
        except BaseException:
            self._cleanup()
            raise
        return time.monotonic() - t0

    def create_database(self, name: str, timeout: float = 30.0) -> list[str]:
        """Create ``name`` once (replicated); one URL per node, in node order.

        Waits until every live node has the database.
        """
        first = self._first_live()
        self.sql(first, f"CREATE DATABASE IF NOT EXISTS {_quote(name)}")
        deadline = time.monotonic() + timeout
        for i in self.live:
            while not self.sql(i, f"SHOW DATABASES LIKE {_sql_string(_like_literal(name))}"):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"database {name} not on node {i} after {timeout}s")
                time.sleep(0.05)
        return [self.url(n.index, name) for n in self._nodes]

    def kill(self, i: int) -> None:
        """SIGKILL node ``i`` (a crash) and wait until the process is gone."""
        node = self._node(i)
        self._signal(node, signal.SIGKILL)
        self._reap(node, 30.0)

    def wait_evicted(self, timeout: float = 60.0) -> float:
        """Wait until the live nodes form a Primary cluster of just themselves.

        Every live node must report ``wsrep_cluster_size`` equal to the number
        of live nodes, ``wsrep_cluster_status`` Primary and
        ``wsrep_local_state_comment`` Synced.  Returns the seconds waited.
        """
        t0 = time.monotonic()
        names = ("wsrep_cluster_size", "wsrep_cluster_status", "wsrep_local_state_comment")
        while True:
            live = self.live
            seen: dict[int, dict[str, str] | str] = {}
            for i in live:
                try:
                    seen[i] = self._status(i, names, timeout=5.0)
                except SQLError as exc:
                    seen[i] = str(exc)
            if live and all(isinstance(v, dict) and v.get(names[0]) == str(len(live))
                            and v.get(names[1]) == "Primary" and v.get(names[2]) == "Synced"
                            for v in seen.values()):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"live nodes {live} not a {len(live)}-node Primary cluster "
                                   f"after {timeout}s: {seen}")
            time.sleep(0.1)

    def status(self, i: int, var: str) -> str:
        """One SHOW GLOBAL STATUS value of node ``i`` (KeyError if unknown)."""
        values = self._status(i, (var,))
        if var.lower() not in values:
            raise KeyError(var)
        return values[var.lower()]

    def sql(self, i: int, statement: str, timeout: float = 60.0) -> list[Row]:
        """Run one SQL statement as root on node ``i``; rows as tuples of str/None.

        Raises SQLError (with ``errno``) when the statement fails.
        """
        node = self._node(i)
        if pymysql is not None:
            return self._sql_pymysql(node, statement, timeout)
        return self._sql_client(node, statement, timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every node; already-dead nodes are fine.

        SIGTERM to the pid in each node's pid file, last node first, each after
        the previous one is gone (nodes leaving all at once wait for one another
        until evs.suspect_timeout); SIGKILL to a node still running after
        ``timeout``.  Returns once every process is gone.
        """
        try:
            for node in reversed(self._nodes):
                self._signal(node, signal.SIGTERM)
                self._reap(node, timeout)
        finally:
            self._cleanup()

    # -- lifecycle -----------------------------------------------------------

    def _node(self, i: int) -> _Node:
        if not self._nodes:
            raise RuntimeError("cluster not started")
        return self._nodes[i]

    def _first_live(self) -> int:
        live = self.live
        if not live:
            raise RuntimeError("no node of the cluster is running")
        return live[0]

    def _owner(self) -> tuple[int, int] | None:
        """uid and gid the nodes run as, or None when it is the current user."""
        if self._user is None:
            return None
        try:
            pw = pwd.getpwnam(self._user)
        except KeyError:
            raise RuntimeError(f"user {self._user!r} does not exist (installed with "
                               "mariadb-server); nodes started by root run as that user") from None
        return pw.pw_uid, pw.pw_gid

    def _chown(self, path: pathlib.Path) -> None:
        owner = self._owner()
        if owner is not None:
            os.chown(path, *owner)

    def _prepare(self) -> None:
        """Directories, ports and option files of every node."""
        self.basedir.mkdir(parents=True, exist_ok=True)
        owner = self._owner()
        longest = self.basedir / "cluster-XXXXXXXX" / f"node{self.size - 1}" / "mariadbd.sock"
        reachable = owner is None or _traversable(self.basedir, *owner)
        if reachable and len(os.fsencode(longest)) <= _MAX_SOCKET_PATH:
            rundir = pathlib.Path(tempfile.mkdtemp(prefix="cluster-", dir=self.basedir))
        else:
            rundir = pathlib.Path(tempfile.mkdtemp(prefix="galera-"))
            self._own_rundir = True
            if owner is not None and not _traversable(rundir.parent, *owner):
                shutil.rmtree(rundir)
                self._own_rundir = False
                raise RuntimeError(f"{rundir.parent} is not traversable by user {self._user}; "
                                   "give the cluster a basedir that is")
        self._rundir = rundir
        self._chown(rundir)
        ports = _free_ports(4 * self.size)
        for i in range(self.size):
            node = _Node(i, rundir / f"node{i}", *ports[4 * i:4 * i + 4])
            for d in (node.dir, node.datadir, node.tmpdir):
                d.mkdir()
                self._chown(d)
            self._nodes.append(node)
        for node in self._nodes:
            self._write_config(node)

    def _write_config(self, node: _Node) -> None:
        peers = ",".join(f"127.0.0.1:{n.gcomm_port}" for n in self._nodes)
        provider_options = ";".join(filter(None, [
            f"gmcast.listen_addr=tcp://127.0.0.1:{node.gcomm_port}",
            f"ist.recv_addr=127.0.0.1:{node.ist_port}",
            "gcache.size=16M",
            self.provider_options,
        ]))
        lines = [
            "[mysqld]",
            f"datadir={node.datadir}",
            f"socket={node.socket}",
            f"pid-file={node.pid_file}",
            f"log-error={node.error_log}",
            f"tmpdir={node.tmpdir}",
            f"port={node.port}",
            "bind-address=127.0.0.1",
            "skip-name-resolve",
            "character-set-server=utf8mb4",
            "collation-server=utf8mb4_general_ci",
            "max-connections=200",
            # Lean: three servers (and the tests) share a small machine.
            "performance_schema=OFF",
            "innodb_buffer_pool_size=32M",
            "innodb_log_file_size=16M",
            "innodb_flush_log_at_trx_commit=2",
            "innodb_doublewrite=0",
            "innodb_buffer_pool_load_at_startup=0",
            "innodb_buffer_pool_dump_at_shutdown=0",
            # What Galera requires.
            "binlog_format=ROW",
            "default_storage_engine=InnoDB",
            "innodb_autoinc_lock_mode=2",
            "wsrep_on=ON",
            f"wsrep_provider={self._provider}",
            f"wsrep_cluster_name={self.cluster_name}",
            f"wsrep_cluster_address=gcomm://{peers}",
            f"wsrep_node_name=node{node.index}",
            f"wsrep_node_address=127.0.0.1:{node.gcomm_port}",
            f'wsrep_provider_options="{provider_options}"',
            f"wsrep_sst_receive_address=127.0.0.1:{node.sst_port}",
            "wsrep_sst_method=rsync",
            "wsrep_slave_threads=1",
        ]
        if node.index == 0:
            lines.append(f"init-file={self._rundir / 'init.sql'}")
        node.config.write_text("\n".join(lines) + "\n")
        self._chown(node.config)

    def _install(self, node: _Node, timeout: float) -> None:
        """System tables and the root accounts on node 0 (the others get them by SST)."""
        user = [f"--user={self._user}"] if self._user else []
        cmd = [self._install_db, "--no-defaults", f"--datadir={node.datadir}",
               "--auth-root-authentication-method=normal", "--skip-test-db",
               "--skip-name-resolve", *user,
               "--innodb-buffer-pool-size=32M", "--innodb-log-file-size=16M"]
        log = node.dir / "install.log"
        with open(log, "wb") as out:
            # A session of its own: on timeout, its bootstrap server goes too.
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=self._env(node),
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise RuntimeError(f"mariadb-install-db took more than {timeout}s:\n"
                                   f"{_tail(log)}") from None
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # anything it left behind
                except (ProcessLookupError, PermissionError):
                    pass
        if rc != 0:
            raise RuntimeError(f"mariadb-install-db failed (rc={rc}):\n{_tail(log)}")
        pw = _sql_string(self.password)
        lines = [f"DROP USER IF EXISTS 'root'@'{socket.gethostname()}';"]
        for host in ROOT_HOSTS:
            user_ = f"'root'@'{host}'"
            lines += [f"CREATE USER IF NOT EXISTS {user_};",
                      f"ALTER USER {user_} IDENTIFIED BY {pw};",
                      f"GRANT ALL PRIVILEGES ON *.* TO {user_} WITH GRANT OPTION;"]
        init = self._rundir / "init.sql"
        init.write_text("\n".join(lines) + "\n")
        self._chown(init)

    def _env(self, node: _Node) -> dict[str, str]:
        # The state-transfer scripts make temporary files: somewhere the node may write.
        return dict(os.environ, TMPDIR=str(node.tmpdir))

    def _start_node(self, node: _Node, bootstrap: bool, timeout: float) -> None:
        for attempt in range(3):
            self._launch(node, bootstrap)
            try:
                self._wait_synced(node, timeout)
                return
            except (RuntimeError, TimeoutError) as exc:
                log = _tail(node.error_log, 200, node.log_start)
                self._signal(node, signal.SIGKILL)
                self._reap(node, 30.0)
                taken = "Address already in use" in log or not all(
                    _port_free(p) for p in (node.port, node.gcomm_port, node.ist_port,
                                            node.sst_port))
                if not taken or attempt == 2:
                    raise
                # Another process took one of our ports meanwhile: take others.
                node.port, node.gcomm_port, node.ist_port, node.sst_port = _free_ports(4)
                self._write_config(node)
                if bootstrap:
                    for other in self._nodes[1:]:
                        self._write_config(other)
                print(f"galera node {node.index}: a port was taken ({str(exc).splitlines()[0]}); "
                      "retrying on other ports")

    def _launch(self, node: _Node, bootstrap: bool) -> None:
        cmd = [self._mariadbd, f"--defaults-file={node.config}"]
        if self._user:
            cmd.append(f"--user={self._user}")
        if bootstrap:
            cmd.append("--wsrep-new-cluster")
        # Early errors (e.g. bad options) go to stderr before log-error is opened.
        node.error_log.touch()
        self._chown(node.error_log)
        node.log_start = node.error_log.stat().st_size
        node.pid_file.unlink(missing_ok=True)
        with open(node.error_log, "ab") as log:
            # A session of its own: helpers (state transfer) can be ended with it.
            node.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=self._env(node), start_new_session=True)

    def _wait_synced(self, node: _Node, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = None
        while True:
            if node.proc is None or node.proc.poll() is not None:
                rc = node.proc.returncode if node.proc else None
                raise RuntimeError(f"galera node {node.index} exited with rc={rc}:\n"
                                   f"{_tail(node.error_log, 40, node.log_start)}")
            try:
                state = self._status(node.index, ("wsrep_local_state_comment",),
                                     timeout=5.0).get("wsrep_local_state_comment")
            except SQLError:
                state = None  # not accepting connections yet (e.g. during the transfer)
            if state == "Synced":
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"galera node {node.index} not Synced after {timeout}s (state: {state}):\n"
                    f"{_tail(node.error_log, 40, node.log_start)}")
            time.sleep(0.1)
        # The socket is ours alone; check the root login over TCP as well.
        try:
            self._sql_tcp_check(node)
        except SQLError as exc:
            raise RuntimeError(f"galera node {node.index} up but TCP login on port "
                               f"{node.port} failed: {exc}") from None

    def _pids(self, node: _Node) -> set[int]:
        """Running server pids of ``node``: its child process and its pid file's pid."""
        pids = set()
        if node.proc is not None and node.proc.poll() is None:
            pids.add(node.proc.pid)
        try:
            pid = int(node.pid_file.read_text().strip())
        except (OSError, ValueError):
            pid = None
        if pid and pid not in pids:
            # A stale pid file may name an unrelated process: check it is this node.
            try:
                cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                cmdline = b""
            if os.fsencode(str(node.config)) in cmdline:
                pids.add(pid)
        return pids

    def _signal(self, node: _Node, sig: int) -> None:
        for pid in self._pids(node):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _reap(self, node: _Node, timeout: float) -> None:
        """Wait until the node's server is gone (SIGKILL after ``timeout``)."""
        if node.proc is not None:
            try:
                node.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait()
            # Helpers left in the node's session (e.g. an rsync daemon).
            try:
                os.killpg(node.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            node.proc = None
        # A server we did not start ourselves (should not happen): poll.
        deadline = time.monotonic() + max(timeout, 5.0)
        while pids := self._pids(node):
            if time.monotonic() > deadline + 10.0:
                raise RuntimeError(f"galera node {node.index}: pids {sorted(pids)} still alive")
            if time.monotonic() > deadline:
                self._signal(node, signal.SIGKILL)
            time.sleep(0.05)

    def _cleanup(self) -> None:
        """Safety net (also at exit): no node left running, temporary files gone."""
        for node in self._nodes:
            if node.proc is not None:
                self._signal(node, signal.SIGKILL)
                self._reap(node, 10.0)
        if self._own_rundir and self._rundir is not None:
            for node in self._nodes:
                if node.error_log.exists():
                    try:
                        shutil.copyfile(node.error_log, self.basedir / f"node{node.index}.err")
                    except OSError:
                        pass
            shutil.rmtree(self._rundir, ignore_errors=True)
            self._own_rundir = False

    # -- SQL -----------------------------------------------------------------

    def _status(self, i: int, names: tuple[str, ...], timeout: float = 10.0) -> dict[str, str]:
        wanted = ", ".join(_sql_string(n) for n in names)
        rows = self.sql(i, f"SHOW GLOBAL STATUS WHERE Variable_name IN ({wanted})", timeout)
        return {str(name).lower(): value for name, value in rows}

    def _sql_pymysql(self, node: _Node, statement: str, timeout: float) -> list[Row]:
        try:
            conn = pymysql.connect(unix_socket=node.socket, user="root", password=self.password,
                                   connect_timeout=min(timeout, 5.0), read_timeout=timeout,
                                   write_timeout=timeout, autocommit=True)
        except pymysql.err.MySQLError as exc:
            raise SQLError(f"node {node.index}: {exc}", exc.args[0] if exc.args else None) from None
        try:
            with conn.cursor() as cur:
                cur.execute(statement)
                return [tuple(_text(v) for v in row) for row in cur.fetchall()]
        except pymysql.err.MySQLError as exc:
            raise SQLError(f"node {node.index}: {exc}\nSQL: {statement}",
                           exc.args[0] if exc.args else None) from None
        finally:
            conn.close()

    def _sql_client(self, node: _Node, statement: str, timeout: float) -> list[Row]:
        result = self._run_client(["--socket", node.socket], statement, timeout)
        if result.returncode != 0:
            m = re.search(r"ERROR (\d+)", result.stderr)
            raise SQLError(f"node {node.index}: {result.stderr.strip()}\nSQL: {statement}",
                           int(m.group(1)) if m else None)
        return [tuple(_unescape(f) for f in line.split("\t"))
                for line in result.stdout.splitlines()]

    def _sql_tcp_check(self, node: _Node) -> None:
        if pymysql is not None:
            try:
                pymysql.connect(host="127.0.0.1", port=node.port, user="root",
                                password=self.password, connect_timeout=5).close()
            except pymysql.err.MySQLError as exc:
                raise SQLError(str(exc), exc.args[0] if exc.args else None) from None
            return
        result = self._run_client(["--protocol=TCP", "--host=127.0.0.1", f"--port={node.port}"],
                                  "SELECT 1", 10.0)
        if result.returncode != 0:
            raise SQLError(result.stderr.strip())

    def _run_client(self, conn_args: list[str], sql: str,
                    timeout: float) -> subprocess.CompletedProcess:
        cmd = [self._client, "--no-defaults", *conn_args, "--user=root",
               f"--password={self.password}", "--connect-timeout=5", "--batch",
               "--skip-column-names", "--execute", sql]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SQLError(f"no answer within {timeout}s\nSQL: {sql}") from None


def _like_literal(name: str) -> str:
    return re.sub(r"([\\%_])", r"\\\1", name)
