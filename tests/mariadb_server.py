"""A private, throwaway MariaDB server for the test suite (standard library only).

Uses the binaries of Debian's ``mariadb-server`` package (``mariadbd``,
``mariadb-install-db`` and the ``mariadb`` client), found on PATH (``mariadbd`` also
in the ``sbin`` directory next to the client).  Typical use::

    server = MariaDBServer(tmp_path / "mariadb")
    server.start()
    url = server.url("astbill_test")  # mysql://root:...@127.0.0.1:PORT/astbill_test
    ...
    server.stop()
"""

from __future__ import annotations

import atexit
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time

ROOT_PASSWORD = "astbill-test-pw"
TEST_DATABASE = "astbill_test"
# Accounts used by the tests: the socket (localhost) and TCP on loopback.
ROOT_HOSTS = ("localhost", "127.0.0.1", "::1", "%")

def _which(*names: str) -> str | None:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


def find_mariadbd() -> str | None:
    """Path to the MariaDB server binary, or None if it is not installed."""
    found = _which("mariadbd", "mysqld")
    if found:
        return found
    # Non-root PATHs often lack sbin: look next to the client, e.g. bin/../sbin.
    client = _which("mariadb", "mysql", "mariadb-install-db")
    if client:
        sbin = pathlib.Path(client).resolve().parent.parent / "sbin"
        return _which(*(str(sbin / n) for n in ("mariadbd", "mysqld")))
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quote(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


class MariaDBServer:
    def __init__(self, basedir: pathlib.Path, port: int | None = None):
        self.basedir = pathlib.Path(basedir).resolve()
        self.datadir = self.basedir / "data"
        self.error_log = self.basedir / "error.log"
        self.pid_file = self.basedir / "mariadbd.pid"
        self.init_file = self.basedir / "init.sql"
        self.port = port or _free_port()
        self.password = ROOT_PASSWORD
        self._socket_dir: str | None = None
        sock = self.basedir / "mariadbd.sock"
        if len(os.fsencode(sock)) > 100:  # Unix socket paths are limited to ~107 bytes
            self._socket_dir = tempfile.mkdtemp(prefix="mdb-")
            sock = pathlib.Path(self._socket_dir) / "mariadbd.sock"
        self.socket = str(sock)
        self._proc: subprocess.Popen | None = None
        self._mariadbd = find_mariadbd()
        self._client = _which("mariadb", "mysql")
        self._install_db = _which("mariadb-install-db", "mysql_install_db")
        atexit.register(self._cleanup)

    # -- lifecycle ---------------------------------------------------------

    def _user_args(self) -> list[str]:
        # mariadbd refuses to run as root unless told to explicitly.
        return ["--user=root"] if os.geteuid() == 0 else []

    def _install(self) -> None:
        if not self._install_db:
            raise RuntimeError("mariadb-install-db not found")
        self.datadir.mkdir(parents=True, exist_ok=True)
        cmd = [
            self._install_db, "--no-defaults", f"--datadir={self.datadir}",
            "--auth-root-authentication-method=normal", "--skip-test-db",
            "--skip-name-resolve", *self._user_args(),
            "--innodb-buffer-pool-size=64M", "--innodb-log-file-size=48M",
        ]
        log = self.basedir / "install.log"
        with open(log, "wb") as out:
            rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT)
        if rc != 0:
            raise RuntimeError(f"mariadb-install-db failed (rc={rc}):\n{self._tail(log)}")

    def _write_init_file(self) -> None:
        # Executed by mariadbd at every start, before it accepts connections.
        pw = self.password.replace("\\", "\\\\").replace("'", "\\'")
        # install-db also creates root@<hostname>, which --skip-name-resolve ignores noisily.
        lines = [f"DROP USER IF EXISTS 'root'@'{socket.gethostname()}';"]
        for host in ROOT_HOSTS:
            user = f"'root'@'{host}'"
            lines += [
                f"CREATE USER IF NOT EXISTS {user};",
                f"ALTER USER {user} IDENTIFIED BY '{pw}';",
                f"GRANT ALL PRIVILEGES ON *.* TO {user} WITH GRANT OPTION;",
            ]
        lines.append(f"CREATE DATABASE IF NOT EXISTS {_quote(TEST_DATABASE)};")
        self.init_file.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 60.0) -> None:
        if self.running:
            return
        if not self._mariadbd or not self._client:
            raise RuntimeError("MariaDB server/client binaries not found")
        self.basedir.mkdir(parents=True, exist_ok=True)
        if not (self.datadir / "mysql").is_dir():
            self._install()
        self._write_init_file()
        self.tmpdir = self.basedir / "tmp"
        self.tmpdir.mkdir(exist_ok=True)
        cmd = [
            self._mariadbd, "--no-defaults", f"--datadir={self.datadir}",
            f"--socket={self.socket}", f"--port={self.port}",
            "--bind-address=127.0.0.1", "--skip-name-resolve", *self._user_args(),
            f"--log-error={self.error_log}", f"--pid-file={self.pid_file}",
            f"--init-file={self.init_file}",
            # Its temporary tables in its own directory: whatever else
            # tidies the machine's /tmp meanwhile cannot pull them away.
            f"--tmpdir={self.tmpdir}",
            "--skip-log-bin", "--max-connections=500",
            "--character-set-server=utf8mb4", "--collation-server=utf8mb4_general_ci",
            "--innodb-buffer-pool-size=64M", "--innodb-log-file-size=48M",
            "--innodb-flush-log-at-trx-commit=2",
            "--innodb-buffer-pool-load-at-startup=0",
            "--innodb-buffer-pool-dump-at-shutdown=0",
        ]
        # Early errors (e.g. bad options) go to stderr before --log-error is opened.
        with open(self.error_log, "ab") as log:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                rc = self._proc.returncode
                self._proc = None
                raise RuntimeError(f"mariadbd exited with rc={rc}:\n{self._tail(self.error_log)}")
            if self._client_ok(["--socket", self.socket]):
                break
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(
                    f"mariadbd not ready after {timeout}s:\n{self._tail(self.error_log)}")
            time.sleep(0.1)
        # The socket is ours alone (a TCP probe could reach another server on a
        # reused port); once it answers, check the root account over TCP too.
        tcp = ["--protocol=TCP", "--host=127.0.0.1", f"--port={self.port}"]
        if not self._client_ok(tcp):
            self.kill()
            raise RuntimeError(f"mariadbd up but TCP login on port {self.port} failed")

    def stop(self, timeout: float = 30.0) -> None:
        """Clean shutdown: SIGTERM, then SIGKILL if it does not exit in time."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def kill(self) -> None:
        """Hard crash (SIGKILL), e.g. for outage tests."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._proc = None

    def restart(self, timeout: float = 60.0) -> None:
        """Start again on the same datadir and port (stopping first if running)."""
        self.stop()
        self.start(timeout)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _cleanup(self) -> None:
        self.kill()
        if self._socket_dir:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    # -- SQL helpers ---------------------------------------------------------

    def url(self, database: str) -> str:
        return f"mysql://root:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        self.execute(f"CREATE DATABASE IF NOT EXISTS {_quote(name)}")
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self.execute(f"DROP DATABASE IF EXISTS {_quote(name)}")

    def execute(self, sql: str) -> str:
        """Run SQL as root over the Unix socket with the ``mariadb`` client."""
        result = self._run_client(["--socket", self.socket], sql)
        if result.returncode != 0:
            raise RuntimeError(f"mariadb client failed: {result.stderr.strip()}\nSQL: {sql}")
        return result.stdout

    def _client_ok(self, conn_args: list[str]) -> bool:
        return self._run_client([*conn_args, "--connect-timeout=2"], "SELECT 1").returncode == 0

    def _run_client(self, conn_args: list[str], sql: str) -> subprocess.CompletedProcess:
        cmd = [self._client, "--no-defaults", *conn_args, "--user=root",
               f"--password={self.password}", "--batch", "--skip-column-names",
               "--execute", sql]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    @staticmethod
    def _tail(path: pathlib.Path, lines: int = 30) -> str:
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return f"({path} not readable)"
