"""MySQL / MariaDB (and Galera): several Asterisk servers, one database.

The driver is mysqlclient (C; imports in a few ms) when installed, else
PyMySQL (pure Python; its import alone costs several times a bare
interpreter's start) -- or whichever ``mysql_driver`` names.  Lock waits
are bounded per session by innodb_lock_wait_timeout.
"""
import os
from urllib.parse import parse_qs, unquote, urlsplit

from .base import Store


def load_driver(name):
    if name in ("auto", "mysqlclient"):
        try:
            import MySQLdb
            return MySQLdb
        except ImportError:
            if name == "mysqlclient":
                raise
    import pymysql
    return pymysql

SCHEMA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))), "sql", "mysql.sql")

# 1213: deadlock, and what Galera reports on a certification failure;
# 1205: lock wait timeout; 1062: duplicate key.
_RETRY = {1213}
_TIMEOUT = {1205}
_INTEGRITY = {1062}


def connect_args(url, password_env=""):
    parts = urlsplit(url)
    if parts.scheme != "mysql" or not parts.path.strip("/"):
        raise ValueError("database must look like mysql://user:password@host:port/dbname")
    args = {"host": parts.hostname or "localhost", "port": parts.port or 3306,
            "user": unquote(parts.username or ""), "password": unquote(parts.password or ""),
            "database": unquote(parts.path.strip("/"))}
    if password_env:
        args["password"] = os.environ.get(password_env, "")
    socket = parse_qs(parts.query).get("unix_socket")
    if socket:
        args["unix_socket"] = socket[0]
    return args


class MySQLStore(Store):
    placeholder = "%s"
    lock_clause = " FOR UPDATE"
    begin_sql = "START TRANSACTION"
    schema_file = SCHEMA

    def __init__(self, settings):
        super().__init__(settings)
        self.driver = load_driver(settings.get("mysql_driver", "auto"))
        self.driver_errors = (self.driver.Error,)

    def _connect(self):
        timeout = self.settings["lock_wait_secs"]
        return self.driver.connect(
            **connect_args(self.settings["database"], self.settings.get("database_password_env", "")),
            charset="utf8mb4", autocommit=True, connect_timeout=timeout,
            init_command=f"SET SESSION innodb_lock_wait_timeout = {timeout}")

    def _classify(self, exc):
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
        if code in _RETRY:
            return "retry"
        if code in _TIMEOUT:
            return "timeout"
        if code in _INTEGRITY:
            return "integrity"
        return None
