"""SQLite: the embedded default for a single Asterisk box.

Writers serialize on the database (BEGIN IMMEDIATE), which is the account
lock; WAL mode lets readers carry on meanwhile.  Money is stored as integer
millionths so that sums stay exact.
"""
import _thread
import os
import sqlite3
import time

from ..money import from_millionths, to_millionths
from .base import Busy, Store, StoreError

# The writers of one process (astbill-fastagi's threads) take turns on a
# lock of their own before they ask SQLite: SQLite's busy handler polls with
# ever longer sleeps, so among a hundred threads one that has waited long
# kept losing to newcomers until its lock wait ran out.
_turns = {}     # database path -> the lock its writers in this process queue on

# What every file problem below comes down to.
FIX = "chown it to the user Asterisk runs as"


def sqlite_path(url, config_dir=""):
    path = url[len("sqlite://"):]
    return path if os.path.isabs(path) else os.path.join(config_dir, path)


class SQLiteStore(Store):
    begin_sql = "BEGIN IMMEDIATE"
    now_sql = "strftime('%Y-%m-%d %H:%M:%S', 'now')"
    table_sql = "SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?"
    columns_sql = "SELECT name FROM pragma_table_info(?)"
    dialect = {"backend": "sqlite", "money": "INTEGER", "time": "TEXT", "id": "INTEGER NOT NULL",
               "table": "",
               "prelude": ("PRAGMA journal_mode=WAL",), "transactional_ddl": True}
    driver_errors = (sqlite3.Error,)

    def __init__(self, settings):
        super().__init__(settings)
        self.path = sqlite_path(settings["database"], settings.get("config_dir", ""))

    def where(self):
        return f"database {self.path}"

    def atomic(self, work):
        """A transaction, once this process's other writers are done; the
        lock wait (lock_wait_secs) covers the queue and SQLite's lock."""
        turn = _turns.setdefault(self.path, _thread.allocate_lock())
        since, wait = time.monotonic(), self.settings["lock_wait_secs"]
        if not turn.acquire(timeout=wait):
            raise Busy("lock wait timed out: database is locked")
        try:
            self._busy_timeout(wait - (time.monotonic() - since))
            return super().atomic(work, since)
        finally:
            turn.release()

    def _busy_timeout(self, secs):
        """How long SQLite may wait for another process's lock: what is left
        of the lock wait.  What is set already is kept while it is at most
        10 ms more and at most a tenth less, so that the waits in the queue,
        which vary from call to call, seldom cost a statement in the lock."""
        ms = max(1, int(secs * 1000))
        conn = self.connection()
        if ms - ms // 10 <= self._busy_ms <= ms + 10:
            return
        try:
            conn.execute(f"PRAGMA busy_timeout = {ms}")
        except sqlite3.Error as exc:
            raise self._error(exc, self._classify(exc)) from None
        self._busy_ms = ms

    def _connect(self):
        try:
            os.stat(self.path)
        except FileNotFoundError:
            if not self.settings.get("create_database"):
                raise sqlite3.OperationalError("no such file (run astbill-admin init-db)") from None
            try:
                # Callers' numbers and balances: readable by the owner and
                # group only.  SQLite gives its -wal and -shm files the same mode.
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o660))
            except FileExistsError:
                pass  # another init-db made it meanwhile
            except OSError as exc:
                raise sqlite3.OperationalError(f"cannot create it: {exc.strerror}") from None
        except OSError as exc:
            raise sqlite3.OperationalError(f"cannot open it: {exc.strerror}") from None
        conn = sqlite3.connect(self.path, timeout=self.settings["lock_wait_secs"],
                               isolation_level=None)
        self._busy_ms = self.settings["lock_wait_secs"] * 1000
        st = os.stat(self.path)
        self.file_id = (st.st_dev, st.st_ino)
        return conn

    def usable(self):
        """A kept connection follows its file: one moved, replaced or
        removed since (a restore, an outage) is not used again."""
        if self._conn is None:
            return True
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.file_id and not self._conn.in_transaction

    def _error(self, exc, kind):
        """SQLite's "unable to open database file" and "attempt to write a
        readonly database" name no file: say which one, for whom, and what to do."""
        problem = self.file_problem() if kind is None else None
        if problem is None:
            return super()._error(exc, kind)
        self.drop()
        return StoreError(problem)

    def file_problem(self):
        """What keeps this user from the database and its files, or None."""
        import pwd
        uid = os.getuid()
        try:
            who = f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
        except KeyError:
            who = f"uid {uid}"
        path, folder = self.path, os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            return (f"database {path}: its directory {folder} does not exist:"
                    f" make it (mkdir -p) and {FIX}")
        if not os.access(folder, os.X_OK):
            return f"database {path}: its directory {folder} is closed to {who}: {FIX}"
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return f"database {path} is on a read-only filesystem: remount it read-write"
        if not os.path.exists(path):
            if self.settings.get("create_database") and not os.access(folder, os.W_OK):
                return (f"database {path} cannot be made: its directory {folder} is read-only"
                        f" for {who}: {FIX}")
            return None  # "no such file (run astbill-admin init-db)" says it
        if not os.access(path, os.R_OK):
            return f"database {path} is not readable for {who}: {FIX}"
        if not os.access(path, os.W_OK):
            return f"database {path} is read-only for {who}: {FIX}"
        if not os.access(folder, os.W_OK):
            return (f"database {path}: its directory {folder} is read-only for {who}, and"
                    f" SQLite makes its -wal and -shm files there: {FIX}")
        for companion in (path + "-wal", path + "-shm"):
            if os.path.exists(companion) and not os.access(companion, os.R_OK | os.W_OK):
                return f"database {path}: {companion} is read-only for {who}: {FIX}"
        return None

    def _classify(self, exc):
        text = str(exc)
        if "locked" in text or "busy" in text:
            return "timeout"
        if isinstance(exc, sqlite3.IntegrityError):
            return "integrity"
        return None

    def money_in(self, amount):
        return to_millionths(amount)

    def money_out(self, value):
        return from_millionths(value)
