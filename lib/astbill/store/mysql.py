"""MySQL / MariaDB (and Galera): several Asterisk servers, one database.

The driver is mysqlclient's C module (imports in a few ms) when installed,
else PyMySQL (pure Python; its import alone costs more than a bare
interpreter's start) -- or whichever ``mysql_driver`` names.  Lock waits
are bounded per session by innodb_lock_wait_timeout.
"""
import os

from .base import Store, StoreError

# The oldest releases AstBill drives, and why.  mysqlclient: its C module is
# MySQLdb._mysql since 1.4.0 and takes the charset before connecting since
# 1.4.4 (Debian 12 ships 1.4.6, Debian 13 2.2).  PyMySQL: 1.0 takes every
# keyword _connect_one passes (Debian 12 ships 1.0.2, Debian 13 1.1).
OLDEST = {"mysqlclient": (1, 4, 4), "pymysql": (1, 0)}
# mysqlclient 2.1 renamed _mysql.connect's passwd and db keywords.
MYSQLCLIENT_RENAMED = (2, 1)
_INSTALL = {"mysqlclient": "python3-mysqldb", "pymysql": "python3-pymysql"}


def load_driver(name):
    """The driver module: mysqlclient's C module itself, or PyMySQL.

    ``auto`` takes mysqlclient when it is installed and recent enough, else
    PyMySQL.  A driver that is missing or too old is a StoreError saying so
    in one line.
    """
    candidates = ("mysqlclient", "pymysql") if name == "auto" else (name,)
    problems = []
    for driver in candidates:
        try:
            module = _import_mysqlclient() if driver == "mysqlclient" else _import_pymysql()
        except ImportError as exc:
            if isinstance(exc, ModuleNotFoundError) and exc.name in ("MySQLdb", "pymysql"):
                problems.append(f"{driver} is not installed")
            else:  # installed, but e.g. the C library it was built against is gone
                problems.append(f"{driver} cannot be loaded ({' '.join(str(exc).split())})")
            continue
        found = driver_version(module)
        if found >= OLDEST[driver]:
            return module
        problems.append(f"{driver} {'.'.join(map(str, found))} is too old (AstBill needs"
                        f" {'.'.join(map(str, OLDEST[driver]))} or later)")
    wanted = " or ".join(_INSTALL[driver] for driver in candidates)
    raise StoreError(f"no usable MySQL driver: {'; '.join(problems)}: install {wanted}")


def driver_version(module):
    """(major, minor, ...) of a driver module load_driver returned."""
    # pymysql.version_info is the mysqlclient release it imitates.
    version = module.VERSION if module.__name__ == "pymysql" else module.version_info
    return tuple(version[:3])


def _import_mysqlclient():
    try:
        from MySQLdb import _mysql
    except ImportError:
        # Before 1.4 the C module was elsewhere: MySQLdb's version says why.
        import MySQLdb
        return MySQLdb
    return _mysql


def _import_pymysql():
    """PyMySQL, imported without the ssl module.

    AstBill's database URL has no TLS options and mysqlclient uses none
    unasked, so PyMySQL is told the same (ssl_disabled).  PyMySQL treats ssl
    as optional; importing it anyway costs some 10 ms per call.
    """
    import sys
    if "ssl" in sys.modules:
        import pymysql
        return pymysql
    sys.modules["ssl"] = None  # `import ssl` raises ImportError meanwhile
    try:
        import pymysql
    finally:
        del sys.modules["ssl"]
    return pymysql


class CConnection:
    """mysqlclient's C connection (``MySQLdb._mysql``), used directly.

    The DB-API layers above it (MySQLdb.connections, cursors, converters)
    cost more to import and set up than a whole authorization, and add two
    statements per connection.  AstBill needs only execute, fetch and
    rowcount with str, int, Decimal and None parameters; this is that, and
    it is its own cursor.
    """

    def __init__(self, module, **kwargs):
        from decimal import Decimal
        self._decimal = Decimal
        as_text = {t: str for t in (0, 246, 7, 12, 15, 252, 253, 254)}  # decimals, times, text
        as_int = {t: int for t in (1, 2, 3, 8, 9, 13)}
        conv = {**as_text, **as_int}
        conv[0] = conv[246] = Decimal
        kwargs.pop("autocommit", None)  # the server default; transactions are explicit
        if driver_version(module) < MYSQLCLIENT_RENAMED:
            kwargs["passwd"], kwargs["db"] = kwargs.pop("password"), kwargs.pop("database")
        self._conn = module.connect(conv=conv, **kwargs)
        self._rows = ()
        self.rowcount = -1

    def cursor(self):
        return self

    def mogrify(self, sql, params):
        return sql % tuple(map(self._literal, params))

    def execute(self, sql, params=None):
        if params:
            sql = self.mogrify(sql, params)
        self._conn.query(sql.encode("utf-8"))
        self._take_result()

    def nextset(self):
        """The next statement's result of a batch, if there is one (its
        failure is raised here); as PyMySQL's cursor does."""
        if self._conn.next_result() != 0:
            return None
        self._take_result()
        return True

    def _take_result(self):
        conn = self._conn
        # Only a statement with columns has rows to fetch; asking the others
        # for theirs would let go of the GIL and wait to take it back, for
        # nothing (a thread switch in a busy server).
        self._rows = conn.store_result().fetch_row(0) if conn.field_count() else ()
        self.rowcount = conn.affected_rows()

    def executemany(self, sql, rows, batch=500):
        """One multi-row INSERT per ``batch`` rows, as MySQLdb does."""
        head, _, values = sql.partition(" VALUES ")
        rows = list(rows)
        for start in range(0, len(rows), batch):
            self.execute(head + " VALUES " + ", ".join(
                values % tuple(map(self._literal, row)) for row in rows[start:start + batch]))

    def fetchone(self):
        return self._rows[0] if self._rows else None

    def fetchall(self):
        return list(self._rows)

    def commit(self):
        self._conn.commit()

    def ping(self):
        self._conn.ping()

    def rollback(self):
        self._conn.rollback()

    def close(self):
        self._conn.close()

    def _literal(self, value):
        if value is None:
            return "NULL"
        if isinstance(value, str):
            return self._conn.string_literal(value.encode("utf-8")).decode("utf-8")
        if isinstance(value, self._decimal):
            return f"{value:f}"
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        raise TypeError(f"no SQL literal for {type(value).__name__}")


# 1213: deadlock, and what Galera reports on a certification failure;
# 1205: lock wait timeout; 1062: duplicate key.
_DEADLOCK = {1213}
_TIMEOUT = {1205}
_INTEGRITY = {1062}
# The same in every MySQL client library: CLIENT_FOUND_ROWS, and
# CLIENT_MULTI_STATEMENTS, for a batch of statements in one round trip
# (Tx.later; every value in them is the driver's escaped literal).
FOUND_ROWS = 2
MULTI_STATEMENTS = 1 << 16


def database_urls(database):
    """The configured URL, or the list of a cluster's nodes, as a list."""
    return [database] if isinstance(database, str) else list(database)


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
    batches = True
    placeholder = "%s"
    lock_clause = " FOR UPDATE"
    begin_sql = "START TRANSACTION"
    now_sql = "UTC_TIMESTAMP()"
    table_sql = ("SELECT table_name FROM information_schema.tables"
                 " WHERE table_schema = DATABASE() AND table_name = ?")
    columns_sql = ("SELECT column_name FROM information_schema.columns"
                   " WHERE table_schema = DATABASE() AND table_name = ?")
    dialect = {"backend": "mysql", "money": "DECIMAL(19,6)", "time": "DATETIME",
               "id": "BIGINT NOT NULL AUTO_INCREMENT",
               "table": "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"}

    def __init__(self, settings):
        super().__init__(settings)
        self.driver = load_driver(settings.get("mysql_driver", "auto"))
        self.driver_errors = (self.driver.Error,)
        self.urls = database_urls(settings["database"])
        self.node = None  # host:port of the server in use

    def where(self):
        return f"database at {self.node}" if self.node else "the database"

    # Binary and NO PAD ('acc1 ' is not 'acc1'): MariaDB 10.2's name, then
    # MySQL 8's; a server with neither gets the binary one that pads.
    EXACT = ("utf8mb4_nopad_bin", "utf8mb4_0900_bin", "utf8mb4_bin")

    def schema_words(self):
        """The dialect, and {exact}: the server's exact collation."""
        if "exact" not in self.__dict__:
            known = {r[0] for r in self.read(lambda tx: tx.all(
                "SELECT collation_name FROM information_schema.collations WHERE collation_name"
                f" IN ({', '.join('?' * len(self.EXACT))})", self.EXACT))}
            self.exact = next((c for c in self.EXACT if c in known), "utf8mb4_bin")
        return dict(self.dialect, exact=self.exact)

    def _connect(self):
        """The first server of the list that answers (a Galera cluster's
        nodes): a node that is down costs at most connect_timeout_secs."""
        failure = None
        for url in self.urls:
            args = connect_args(url, self.settings.get("database_password_env", ""))
            self.node = f"{args['host']}:{args['port']}"
            try:
                return self._connect_one(args)
            except self.driver_errors as exc:
                failure = exc
        raise failure

    def _connect_one(self, args):
        timeout = self.settings["lock_wait_secs"]
        if self.driver.__name__ == "MySQLdb._mysql":
            def connect(**kwargs):
                return CConnection(self.driver, **kwargs)
        else:
            def connect(**kwargs):
                # No TLS, as with mysqlclient: PyMySQL 1.2 would otherwise
                # load the system's CA store on every connect (45 ms).
                return self.driver.connect(ssl_disabled=True, **kwargs)
        return connect(
            **args, charset="utf8mb4", autocommit=True,
            connect_timeout=self.settings.get("connect_timeout_secs", 1),
            # A server that stops answering must not hold the call: past any
            # lock wait, a silent read is an outage.  (The admin tool's
            # reports over whole tables may take longer: it says how long.)
            read_timeout=self.settings.get("read_timeout_secs", timeout + 5),
            write_timeout=self.settings.get("read_timeout_secs", timeout + 5),
            # rowcount = rows matched, not rows changed: adding 0 is no "missing row".
            client_flag=FOUND_ROWS | MULTI_STATEMENTS,
            init_command=f"SET SESSION innodb_lock_wait_timeout = {timeout}, autocommit = 1")

    def _ping(self, conn):
        # Raises when the server is gone; never reconnects behind our back
        # (PyMySQL 1.0 would by default).
        conn.ping() if isinstance(conn, CConnection) else conn.ping(False)

    def _code(self, exc):
        return exc.args[0] if exc.args and isinstance(exc.args[0], int) else None

    def _refused_by_server(self, exc):
        # The server's own error numbers; 2000-2999 are the client
        # library's (2013: the connection was lost), and 0 is PyMySQL's
        # for a connection it found closed.
        code = self._code(exc)
        return code is not None and (1000 <= code < 2000 or code >= 3000)

    def _classify(self, exc):
        code = self._code(exc)
        if code in _DEADLOCK:
            return "deadlock"
        if code in _TIMEOUT:
            return "timeout"
        if code in _INTEGRITY:
            return "integrity"
        return None
