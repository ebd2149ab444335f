"""Storage: every statement AstBill runs, written once for both backends.

A backend subclass says only how it differs: how to connect, its
placeholder, its row-lock clause, how it stores money and which driver
errors mean "retry", "lock wait timed out" or "unavailable".  Everything
else -- and every piece of SQL -- lives here.
"""
import random
import time

from ..money import D

MAX_ATTEMPTS = 5


class StoreError(Exception):
    """The database failed or cannot be reached; the message is one line."""


class LockTimeout(StoreError):
    """Waited longer than lock_wait_secs for an account's row lock."""


class Store:
    placeholder = "?"
    lock_clause = ""
    begin_sql = "BEGIN"

    def __init__(self, settings):
        self.settings = settings
        self._conn = None
        self._sql_cache = {}

    # -- what a backend provides -------------------------------------------
    def _connect(self):
        raise NotImplementedError

    def _classify(self, exc):
        """'retry', 'timeout', 'integrity', or None (any other failure)."""
        raise NotImplementedError

    driver_errors = ()

    def money_in(self, amount):
        return amount

    def money_out(self, value):
        return D(value)

    def init_schema(self):
        raise NotImplementedError

    # -- connection and transactions ---------------------------------------
    def sql(self, text):
        """SQL written with '?' placeholders, in this driver's dialect."""
        adapted = self._sql_cache.get(text)
        if adapted is None:
            adapted = text.replace("?", self.placeholder)
            adapted = adapted.replace(" {lock}", self.lock_clause)
            self._sql_cache[text] = adapted
        return adapted

    def connection(self):
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def close(self):
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except self.driver_errors:
                pass

    def atomic(self, work):
        """Run ``work(tx)`` in one transaction and commit it.

        A deadlock or a cluster certification failure rolls back and runs
        the whole of ``work`` again, so ``work`` must only touch the
        database.  A lock wait timeout is not retried: it becomes
        LockTimeout, and the caller fails closed.
        """
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                conn = self.connection()
                cur = conn.cursor()
                cur.execute(self.begin_sql)
                result = work(Tx(self, cur))
                conn.commit()
                return result
            except self.driver_errors as exc:
                kind = self._classify(exc)
                self._rollback()
                if kind == "retry" and attempt < MAX_ATTEMPTS:
                    time.sleep(random.uniform(0.005, 0.02) * attempt)
                    continue
                raise self._error(exc, kind) from None
            except BaseException:
                self._rollback()
                raise

    def read(self, work):
        """Run read-only ``work(tx)`` outside a locking transaction."""
        try:
            conn = self.connection()
            result = work(Tx(self, conn.cursor()))
            conn.commit()
            return result
        except self.driver_errors as exc:
            kind = self._classify(exc)
            self._rollback()
            raise self._error(exc, kind) from None

    def _rollback(self):
        if self._conn is None:
            return
        try:
            self._conn.rollback()
        except self.driver_errors:
            self.close()

    def _error(self, exc, kind):
        text = " ".join(str(exc).split()) or type(exc).__name__
        if kind == "timeout":
            return LockTimeout(f"lock wait timed out: {text}")
        if kind is None:
            # The connection may be broken; never reuse it.
            self.close()
        return StoreError(f"database error: {text}")


class Tx:
    """One transaction's statements, with money converted for the backend."""

    def __init__(self, store, cur):
        self.store = store
        self.cur = cur

    def run(self, sql, params=()):
        self.cur.execute(self.store.sql(sql), params)
        return self.cur

    def one(self, sql, params=()):
        return self.run(sql, params).fetchone()

    def all(self, sql, params=()):
        return self.run(sql, params).fetchall()

    # -- the per-call path ---------------------------------------------------
    def account_rate(self, account, prefixes):
        """(tariff, rate row or None) for the longest matching prefix, or None
        when the account does not exist."""
        marks = ",".join("?" * len(prefixes))
        row = self.one(
            "SELECT a.tariff, r.prefix, r.destination, r.rate, r.connect_fee,"
            " r.min_secs, r.increment FROM astaccount a LEFT JOIN astrate r"
            f" ON r.tariff = a.tariff AND r.prefix IN ({marks})"
            " WHERE a.account = ? ORDER BY LENGTH(r.prefix) DESC LIMIT 1",
            (*prefixes, account))
        if row is None:
            return None
        if row[1] is None:
            return row[0], None
        m = self.store.money_out
        return row[0], (row[1], row[2], m(row[3]), m(row[4]), row[5], row[6])

    def lock_balance(self, account):
        row = self.one("SELECT balance FROM astaccount WHERE account = ? {lock}", (account,))
        return None if row is None else self.store.money_out(row[0])

    def reserved(self, account):
        row = self.one("SELECT COALESCE(SUM(max_cost), 0) FROM astcreditres"
                       " WHERE account = ?", (account,))
        return self.store.money_out(row[0])

    def add_reservation(self, uniqueid, account, max_cost, max_secs, now):
        self.run("INSERT INTO astcreditres (uniqueid, account, max_cost, max_secs, created)"
                 " VALUES (?, ?, ?, ?, ?)",
                 (uniqueid, account, self.store.money_in(max_cost), max_secs, now))

    def open_cdr(self, cdr):
        cdr = dict(cdr, rate=self.store.money_in(cdr["rate"]),
                   connect_fee=self.store.money_in(cdr["connect_fee"]))
        columns = ", ".join(cdr)
        marks = ", ".join("?" * len(cdr))
        self.run(f"INSERT INTO astcdr ({columns}) VALUES ({marks})", tuple(cdr.values()))

    def call_terms(self, uniqueid):
        """What settling a call needs, from its own rows; None if unknown."""
        row = self.one(
            "SELECT c.account, c.tariff, c.prefix, c.rate, c.connect_fee, c.min_secs,"
            " c.increment, c.max_secs, c.state, c.start, c.cost, c.billsec,"
            " r.max_cost, r.created"
            " FROM astcdr c LEFT JOIN astcreditres r ON r.uniqueid = c.uniqueid"
            " WHERE c.uniqueid = ?", (uniqueid,))
        if row is None:
            return None
        m = self.store.money_out
        return {"account": row[0], "tariff": row[1], "prefix": row[2], "rate": m(row[3]),
                "connect_fee": m(row[4]), "min_secs": row[5], "increment": row[6],
                "max_secs": row[7], "state": row[8], "start": str(row[9]),
                "cost": None if row[10] is None else m(row[10]), "billsec": row[11],
                "max_cost": None if row[12] is None else m(row[12]),
                "reserved_at": None if row[13] is None else str(row[13])}

    def take_reservation(self, uniqueid):
        """Delete the call's reservation; False if another settlement did."""
        return self.run("DELETE FROM astcreditres WHERE uniqueid = ?", (uniqueid,)).rowcount == 1

    def change_balance(self, account, amount, kind, uniqueid, now):
        """Add ``amount`` (negative for a charge) and its ledger row."""
        m = self.store.money_in(amount)
        changed = self.run("UPDATE astaccount SET balance = balance + ? WHERE account = ?",
                           (m, account)).rowcount
        if changed != 1:
            raise StoreError(f"no account {account!r}")
        self.run("INSERT INTO astledger (account, amount, kind, uniqueid, created)"
                 " VALUES (?, ?, ?, ?, ?)", (account, m, kind, uniqueid, now))

    def close_cdr(self, uniqueid, fields):
        fields = dict(fields, cost=self.store.money_in(fields["cost"]))
        sets = ", ".join(f"{name} = ?" for name in fields)
        self.run(f"UPDATE astcdr SET {sets} WHERE uniqueid = ? AND state = 'active'",
                 (*fields.values(), uniqueid))
