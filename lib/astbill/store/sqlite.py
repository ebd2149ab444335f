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
    schema_name = "sqlite.sql"
    schema_prelude = ("PRAGMA journal_mode=WAL",)
    driver_errors = (sqlite3.Error,)

    def __init__(self, settings):
        super().__init__(settings)
        self.path = sqlite_path(settings["database"], settings.get("config_dir", ""))

    def _connect(self):
        if not os.path.exists(self.path) and not self.settings.get("create_database"):
            raise sqlite3.OperationalError(f"no database file {self.path} (run astbill-admin init-db)")
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
