"""MySQL / MariaDB (and Galera): several Asterisk servers, one database.

The driver is mysqlclient (C; imports in a few ms) when installed, else
PyMySQL (pure Python; its import alone costs several times a bare
interpreter's start) -- or whichever ``mysql_driver`` names.  Lock waits
are bounded per session by innodb_lock_wait_timeout.
"""
import os

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
    """Driver keywords for ``mysql://user:password@host:port/db?unix_socket=PATH``.

    Parsed by hand: urllib.parse costs more to import than a call's SQL.
    """
    if not url.startswith("mysql://"):
        raise ValueError("database must look like mysql://user:password@host:port/dbname")
    rest, _, query = url[len("mysql://"):].partition("?")
    netloc, _, database = rest.partition("/")
    userinfo, _, hostport = netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    host, port = hostport, "3306"
    if hostport.startswith("["):
        host, _, tail = hostport[1:].partition("]")
        port = tail[1:] or port
    elif ":" in hostport:
        host, _, port = hostport.rpartition(":")
    if not database.strip("/") or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("database must look like mysql://user:password@host:port/dbname")
    args = {"host": host or "localhost", "port": int(port), "user": _unquote(user),
            "password": _unquote(password), "database": _unquote(database.strip("/"))}
    if password_env:
        args["password"] = os.environ.get(password_env, "")
    for option in filter(None, query.split("&")):
        name, _, value = option.partition("=")
        if name != "unix_socket" or not value:
            raise ValueError(f"unknown database URL option {name!r} (only unix_socket=PATH)")
        args["unix_socket"] = _unquote(value)
    return args


def _unquote(text):
    if "%" not in text:
        return text
    from urllib.parse import unquote
    return unquote(text)


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
            # A server that stops answering must not hold the call: past any
            # lock wait, a silent read is an outage.
            read_timeout=timeout + 5, write_timeout=timeout + 5,
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
