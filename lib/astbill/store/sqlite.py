"""SQLite: the embedded default for a single Asterisk box.

Writers serialize on the database (BEGIN IMMEDIATE), which is the account
lock; WAL mode lets readers carry on meanwhile.  Money is stored as integer
millionths so that sums stay exact.
"""
import os
import sqlite3

from ..money import from_millionths, to_millionths
from .base import Store


def sqlite_path(url, config_dir=""):
    path = url[len("sqlite://"):]
    return path if os.path.isabs(path) else os.path.join(config_dir, path)


class SQLiteStore(Store):
    begin_sql = "BEGIN IMMEDIATE"
    now_sql = "strftime('%Y-%m-%d %H:%M:%S', 'now')"
    table_sql = "SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?"
    dialect = {"money": "INTEGER", "time": "TEXT", "id": "INTEGER NOT NULL", "table": "",
               "prelude": ("PRAGMA journal_mode=WAL",)}
    driver_errors = (sqlite3.Error,)

    def __init__(self, settings):
        super().__init__(settings)
        self.path = sqlite_path(settings["database"], settings.get("config_dir", ""))

    def where(self):
        return f"database {self.path}"

    def _connect(self):
        if not os.path.exists(self.path):
            if not self.settings.get("create_database"):
                raise sqlite3.OperationalError("no such file (run astbill-admin init-db)")
            # Callers' numbers and balances: readable by the owner and group only.
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o660))
        return sqlite3.connect(self.path, timeout=self.settings["lock_wait_secs"],
                               isolation_level=None)

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
