"""Storage: every statement AstBill runs, written once for both backends.

A backend subclass says only how it differs: how to connect, its SQL
dialect (placeholder, row-lock clause, the clock, column types), how it
stores money and which driver errors mean "deadlock", "lock wait timed
out", "duplicate" or "unavailable".  Everything else -- every piece of SQL
and the schema's versioned upgrades -- lives here and in ``schema``.

A transaction runs once: retrying is the credit ledger's decision, made in
one place, so each failure surfaces here as one named exception.
"""
import time

from ..money import D


class StoreError(Exception):
    """The database failed or cannot be reached; the message is one line.
    ``code``: the server's error number, where it gives one (MySQL).
    ``in_doubt``: the connection failed while committing, so the
    transaction may have committed all the same.  ``unchecked``: it failed
    on a kept connection handed out without a ping, before anything on it
    was committed or read to the end, and not in doubt (see Store.usable):
    nothing of it took effect, so running it again on a new connection is
    safe."""
    code = None
    in_doubt = False
    unchecked = False


class Busy(StoreError):
    """The account is busy: a lock wait timed out, or the transaction lost
    a deadlock or a cluster certification (``retryable``: run it again)."""

    def __init__(self, message, retryable=False):
        super().__init__(message)
        self.retryable = retryable


class Conflict(StoreError):
    """The row exists already (a duplicate key)."""


class NotFound(StoreError):
    """The account to change does not exist."""


class Store:
    placeholder = "?"
    lock_clause = ""
    begin_sql = "BEGIN"
    # The database's own clock, UTC, as 'YYYY-MM-DD HH:MM:SS': the one clock
    # every box of a fleet shares.
    now_sql = ""
    # Column types and table options of the schema, written once in sql/.
    dialect = {}
    # Whether statements nobody reads the result of (Tx.later) wait to go
    # to the server with the next one, in one round trip: worth it over a
    # network, not to a file in this process.
    batches = False

    def __init__(self, settings):
        self.settings = settings
        self._conn = None
        self._sql_cache = {}
        self.began = 0.0         # when the current transaction started
        self.lock_waited = 0.0   # seconds it took to get the last account lock

    # -- what a backend provides -------------------------------------------
    def _connect(self):
        raise NotImplementedError

    def _classify(self, exc):
        """'deadlock', 'timeout', 'integrity', or None (any other failure)."""
        raise NotImplementedError

    def _code(self, exc):
        """The server's error number of a driver error, or None."""
        return None

    def _refused_by_server(self, exc):
        """Whether a driver error is the server's answer (so what it was
        asked to do stopped there), not a connection that failed."""
        return False

    driver_errors = ()

    def money_in(self, amount):
        return amount

    def money_out(self, value):
        return D(value)

    def where(self):
        """The database, named for messages."""
        return "the database"

    # -- connection and transactions ---------------------------------------
    def sql(self, text):
        """SQL written with '?' placeholders, in this driver's dialect."""
        adapted = self._sql_cache.get(text)
        if adapted is None:
            adapted = text.replace("?", self.placeholder).replace(" {lock}", self.lock_clause)
            adapted = adapted.replace("{now}", self.now_sql)
            self._sql_cache[text] = adapted
        return adapted

    def connection(self):
        if self._conn is None:
            try:
                self._conn = self._connect()
            except self.driver_errors as exc:
                raise self._error(exc, self._classify(exc)) from None
        return self._conn

    # Set by open_store for a session kept between calls (FastAGI): close()
    # then leaves the connection open for the thread's next call.
    kept = False
    in_use = False

    def close(self):
        """End this storage session: its connection is closed, or, for a
        kept session, left open (no transaction is ever open between calls)."""
        self.in_use = False
        if not self.kept:
            self.drop()

    def drop(self):
        """Close the connection whatever the session is."""
        conn, self._conn, self.unchecked = self._conn, None, False
        if conn is not None:
            try:
                conn.close()
            except self.driver_errors:
                pass

    # A kept connection that answered this recently (keep_sessions) is
    # handed out without a ping: on a busy server that saves a round trip
    # per transaction, and one that died meanwhile fails at its first
    # statement, which ``unchecked`` lets the ledger run again at once on a
    # new connection.
    unpinged_secs = 0.0
    answered = None             # when the connection last answered (monotonic), if it has
    unchecked = False           # handed out unpinged, and not used since

    def usable(self):
        """Whether a kept connection still works (checked before it is
        reused); a session without one is usable: it connects when asked."""
        self.unchecked = False
        if self._conn is None:
            return True
        if self.answered is not None and time.monotonic() - self.answered < self.unpinged_secs:
            self.unchecked = True
            return True
        try:
            self._ping(self._conn)
        except self.driver_errors:
            return False
        self._answered()
        return True

    def _answered(self):
        self.answered, self.unchecked = time.monotonic(), False

    def _ping(self, conn):
        conn.cursor().execute("SELECT 1")

    def atomic(self, work, waiting_since=None):
        """Run ``work(tx)`` in one transaction and commit it, once.

        Any failure rolls back and raises: Busy (retryable after a deadlock
        or a certification failure), Conflict, or StoreError.
        ``waiting_since``: when the caller began to wait for its turn (the
        account lock's wait counts from then).
        """
        committing = False
        try:
            conn = self.connection()
            tx = Tx(self, conn.cursor())
            self.began = waiting_since or time.monotonic()
            tx.later(self.begin_sql)
            result = work(tx)
            committing = True
            tx.commit(conn)
            self._answered()
            return result
        except self.driver_errors as exc:
            kind = self._classify(exc)
            unchecked = self.unchecked
            self._rollback()
            error = self._error(exc, kind)
            # A lost reply to COMMIT: the server may have committed.  (A
            # deadlock or certification failure at commit is a rollback, and
            # so is any error the server answered: a batch stops there.)
            error.in_doubt = (committing and type(error) is StoreError
                              and not self._refused_by_server(exc))
            error.unchecked = unchecked and type(error) is StoreError and not error.in_doubt
            raise error from None
        except BaseException:
            self._rollback()
            raise

    def read(self, work):
        """Run read-only ``work(tx)`` outside a locking transaction."""
        try:
            # Both backends run in autocommit mode outside atomic(): no commit.
            result = work(Tx(self, self.connection().cursor(), reading=True))
            self._answered()
            return result
        except self.driver_errors as exc:
            kind = self._classify(exc)
            unchecked = self.unchecked
            self._rollback()
            error = self._error(exc, kind)
            error.unchecked = unchecked and type(error) is StoreError
            raise error from None

    CDR_PAGE = 500

    def each_cdr(self, account=None, since=None, until=None, limit=None, after=None):
        """Every CDR ``Tx.cdrs`` would return, read a page at a time: memory
        stays the same however many there are, and no statement stays open
        between pages, so a slow reader (a pager) holds nothing on the server."""
        left = limit
        while left is None or left > 0:
            size = self.CDR_PAGE if left is None else min(self.CDR_PAGE, left)
            page = self.read(lambda tx: tx.cdrs(account, since, until, after, size))
            yield from page
            if len(page) < size:
                return
            after = page[-1]["start"], page[-1]["uniqueid"]
            left = None if left is None else left - size

    def _rollback(self):
        if self._conn is None:
            return
        try:
            self._conn.rollback()
        except self.driver_errors:
            self.drop()

    def _error(self, exc, kind):
        error = self._named_error(exc, kind)
        error.code = self._code(exc)
        return error

    def _named_error(self, exc, kind):
        text = " ".join(str(exc).split()) or type(exc).__name__
        if kind == "timeout":
            return Busy(f"lock wait timed out: {text}")
        if kind == "deadlock":
            return Busy(f"deadlock or certification conflict: {text}", retryable=True)
        if kind == "integrity":
            return Conflict(f"already there: {text}")
        # The connection may be broken; never reuse it.
        self.drop()
        return StoreError(f"{self.where()}: {text}")

    # -- the schema ----------------------------------------------------------
    def schema_words(self):
        """What the schema's steps fill in: the dialect's words."""
        return self.dialect

    def execute_script(self, statements):
        """Run DDL statements, each on its own (MySQL commits DDL at once)."""
        try:
            cur = self.connection().cursor()
            for statement in statements:
                cur.execute(statement)
        except self.driver_errors as exc:
            raise self._error(exc, self._classify(exc)) from None


class Tx:
    """One transaction's statements, with money converted for the backend."""

    def __init__(self, store, cur, reading=False):
        self.store = store
        self.cur = cur
        self.reading = reading  # Store.read's: autocommit, nothing to send writes with
        self._waiting = []      # statements for the next round trip (Store.batches)

    def run(self, sql, params=()):
        if self._waiting:
            self.later(sql, params)
            self._send_waiting()
        elif params:
            self.cur.execute(self.store.sql(sql), params)
        else:  # no parameters: no %-formatting by the MySQL drivers either
            self.cur.execute(self.store.sql(sql))
        return self.cur

    def later(self, sql, params=()):
        """Run a statement whose result is not read: where the store
        batches, it goes with the next statement or the commit, and a
        failure of it is raised there (and rolls the transaction back, as it
        would have here: a batch stops at its first failure)."""
        if self.reading:
            raise TypeError("a write in a read-only transaction")
        if not self.store.batches:
            self.run(sql, params)
            return
        sql = self.store.sql(sql)
        self._waiting.append(self.cur.mogrify(sql, params) if params else sql)

    def commit(self, conn):
        if self._waiting:
            self._waiting.append("COMMIT")
            self._send_waiting()
        else:
            conn.commit()

    def _send_waiting(self):
        """The waiting statements in one round trip; the cursor then holds
        the last one's result."""
        batch, self._waiting = ";".join(self._waiting), []
        self.cur.execute(batch)
        while self.cur.nextset():
            pass

    def one(self, sql, params=()):
        return self.run(sql, params).fetchone()

    def all(self, sql, params=()):
        return self.run(sql, params).fetchall()

    # -- the per-call path ---------------------------------------------------
    # The deck in force at a moment: the latest of its owner's starting then
    # (of decks imported with the same start, the newest).
    # Its id is looked up on its own, so that the prices are then found by
    # (deck, prefix) as constants: MariaDB walks the whole deck when the deck
    # comes from a join or a subquery (measured: 50 ms at 100,000 prefixes).
    DECK_AT = ("(SELECT x.id FROM astdeck x WHERE x.kind = '{kind}' AND x.name = {owner}"
               " AND x.starts <= ? ORDER BY x.starts DESC, x.id DESC LIMIT 1)")
    PRICE = ("p.prefix, p.destination, p.days, p.start_min, p.end_min, p.rate, p.connect_fee,"
             " p.min_secs, p.increment")

    def account_prices(self, account, prefixes, at):
        """(tariff, [price rows of the longest matching prefix], deck id) in
        the tariff's deck in force ``at``; None when the account does not exist."""
        row = self.one(f"SELECT a.tariff, {self.DECK_AT.format(kind='tariff', owner='a.tariff')}"
                       " FROM astaccount a WHERE a.account = ?", (at, account))
        if row is None:
            return None
        return row[0], self._prices([row[1]], prefixes).get(row[1], []), row[1]

    def call_prices(self, account, prefixes, at):
        """What pricing a call reads, in one statement (one snapshot): (tariff,
        [price rows of the longest matching prefix], deck id, {trunk: (dial,
        enabled, [its price rows], deck id)}) by the decks in force ``at``,
        as account_prices and trunk_prices give them; None when the account
        does not exist."""
        owners = self.all(
            f"SELECT 'tariff', a.tariff, NULL, NULL,"
            f" {self.DECK_AT.format(kind='tariff', owner='a.tariff')}"
            " FROM astaccount a WHERE a.account = ?"
            f" UNION ALL SELECT 'trunk', t.name, t.dial, t.enabled,"
            f" {self.DECK_AT.format(kind='trunk', owner='t.name')} FROM asttrunk t",
            (at, account, at))
        sold = [row for row in owners if row[0] == "tariff"]
        if not sold:
            return None
        (_, tariff, _, _, deck), trunks = sold[0], [row for row in owners if row[0] == "trunk"]
        prices = self._prices([deck] + [t[4] for t in trunks], prefixes)
        return tariff, prices.get(deck, []), deck, {
            name: (dial, enabled == 1, prices.get(trunk_deck, []), trunk_deck)
            for _, name, dial, enabled, trunk_deck in trunks}

    def trunk_prices(self, prefixes, at, trunk=None):
        """{trunk: (dial, enabled, [price rows of its longest matching
        prefix], deck id)} for every trunk (or the one named), each rated by
        its deck in force ``at``."""
        where = " WHERE t.name = ?" if trunk is not None else ""
        trunks = self.all(f"SELECT t.name, t.dial, t.enabled,"
                          f" {self.DECK_AT.format(kind='trunk', owner='t.name')}"
                          f" FROM asttrunk t{where}", (at,) + ((trunk,) if trunk is not None else ()))
        prices = self._prices([t[3] for t in trunks], prefixes)
        return {name: (dial, enabled == 1, prices.get(deck, []), deck)
                for name, dial, enabled, deck in trunks}

    def tariff_prices(self, tariff, prefix, at):
        """The price rows of exactly ``prefix`` in ``tariff``'s deck in force ``at``."""
        deck = self.one(f"SELECT {self.DECK_AT.format(kind='tariff', owner='?')}", (tariff, at))[0]
        return self._prices([deck], [prefix]).get(deck, [])

    def deck_prices(self, deck, prefixes):
        """The price rows of the longest of ``prefixes`` in deck ``deck``
        (by id: the deck a call was authorized with, even if replaced since)."""
        return self._prices([deck], prefixes).get(deck, [])

    def _prices(self, decks, prefixes):
        """{deck: [price rows of its longest prefix among ``prefixes``]}."""
        decks = [d for d in decks if d is not None]
        if not decks:
            return {}
        rows = self.all(
            f"SELECT p.deck, {self.PRICE} FROM astprice p WHERE p.deck IN"
            f" ({','.join('?' * len(decks))}) AND p.prefix IN ({','.join('?' * len(prefixes))})",
            (*decks, *prefixes))
        found = {}
        for deck, *price in rows:
            found.setdefault(deck, []).append(price)
        return {deck: self._longest(prices) for deck, prices in found.items()}

    def _longest(self, rows):
        """The rows of the longest prefix among ``rows``, money as Decimal."""
        if not rows:
            return []
        longest = max(len(r[0]) for r in rows)
        m = self.store.money_out
        return [(r[0], r[1], r[2], r[3], r[4], m(r[5]), m(r[6]), r[7], r[8])
                for r in rows if len(r[0]) == longest]

    def lock_account(self, account):
        """(balance, reserved, credit limit, call cap, calls in progress) of
        the account, locked until the end of the transaction; None if there
        is no such account.  Without a cap (0) the calls are not counted: 0."""
        row = self.one("SELECT balance, reserved, credit_limit, max_calls FROM astaccount"
                       " WHERE account = ? {lock}", (account,))
        # SQLite takes its lock at BEGIN IMMEDIATE, MySQL here: count both.
        self.store.lock_waited = time.monotonic() - self.store.began
        if row is None:
            return None
        # Counted only against a cap: one statement less while the row is locked.
        calls = self.one("SELECT COUNT(*) FROM astcreditres WHERE account = ?",
                         (account,))[0] if row[3] else 0
        m = self.store.money_out
        return m(row[0]), m(row[1]), m(row[2]), row[3], calls

    def add_reservation(self, uniqueid, account, max_cost, max_secs):
        """The reservation row, and its amount added to the account's
        ``reserved``: a write to the account row, which is what makes a
        Galera cluster certify concurrent authorizations against each other
        (row locks taken by SELECT ... FOR UPDATE stay on one node).  Its
        time is the database's, the clock the sweep compares it with."""
        m = self.store.money_in(max_cost)
        # The account's row is locked by this transaction: it is there.
        self.later("INSERT INTO astcreditres (uniqueid, account, max_cost, max_secs, created)"
                   " VALUES (?, ?, ?, ?, {now})", (uniqueid, account, m, max_secs))
        self.later("UPDATE astaccount SET reserved = reserved + ? WHERE account = ?",
                   (m, account))

    def open_cdr(self, cdr):
        cdr = dict(cdr, rate=self.store.money_in(cdr["rate"]),
                   connect_fee=self.store.money_in(cdr["connect_fee"]))
        columns = ", ".join(cdr)
        marks = ", ".join("?" * len(cdr))
        self.later(f"INSERT INTO astcdr ({columns}) VALUES ({marks})", tuple(cdr.values()))

    def call_terms(self, uniqueid):
        """What settling a call needs, from its own rows; None if unknown.
        ``prices``: the price rows of its prefix in the deck it was
        authorized with (as deck_prices gives them; none when that deck is
        gone), read in the same statement."""
        rows = self.all(
            "SELECT c.account, c.tariff, c.prefix, c.rate, c.connect_fee, c.min_secs,"
            " c.increment, c.max_secs, c.state, c.cost, c.billsec, r.max_cost, c.start, c.dst,"
            f" c.deck, c.trunk, c.trunk_deck, {self.PRICE}"
            " FROM astcdr c LEFT JOIN astcreditres r ON r.uniqueid = c.uniqueid"
            " LEFT JOIN astprice p ON p.deck = c.deck AND p.prefix = c.prefix"
            " WHERE c.uniqueid = ?", (uniqueid,))
        if not rows:
            return None
        row, m = rows[0], self.store.money_out
        return {"account": row[0], "tariff": row[1], "prefix": row[2], "rate": m(row[3]),
                "connect_fee": m(row[4]), "min_secs": row[5], "increment": row[6],
                "max_secs": row[7], "state": row[8],
                "cost": None if row[9] is None else m(row[9]), "billsec": row[10],
                "max_cost": None if row[11] is None else m(row[11]), "start": str(row[12]),
                "number": row[13], "deck": row[14], "trunk": row[15], "trunk_deck": row[16],
                "prices": self._longest([r[17:] for r in rows if r[17] is not None])}

    def final_charge(self, uniqueid):
        """(cost, billsec) of a settled call, read with a lock so that it is
        the latest committed value (REPEATABLE READ would show the snapshot)."""
        row = self.one("SELECT cost, billsec FROM astcdr WHERE uniqueid = ? {lock}", (uniqueid,))
        return self.store.money_out(row[0] if row[0] is not None else 0), row[1]

    def take_reservation(self, uniqueid):
        """Delete the call's reservation; False if another settlement did."""
        return self.run("DELETE FROM astcreditres WHERE uniqueid = ?", (uniqueid,)).rowcount == 1

    def change_balance(self, account, amount, kind, uniqueid, now, release=None, actor=None):
        """Add ``amount`` (negative for a charge) with its ledger row, which
        names the ``actor`` who made the change (a user or a token; none for
        a call), and drop ``release`` (a settled call's reservation) from
        ``reserved``."""
        m = self.store.money_in(amount)
        # The ledger row first: the account's row, locked by the update until
        # the commit, which every call of the account waits for, is then held
        # for one statement less.
        if amount:
            self.later("INSERT INTO astledger (account, amount, kind, uniqueid, created, actor)"
                       " VALUES (?, ?, ?, ?, ?, ?)", (account, m, kind, uniqueid, now, actor))
        changed = self.run("UPDATE astaccount SET balance = balance + ?, reserved = reserved - ?"
                           " WHERE account = ?",
                           (m, self.store.money_in(release or D(0)), account)).rowcount
        if changed != 1:
            raise NotFound(f"no account {account}")

    def close_cdr(self, uniqueid, fields, again=False):
        """Complete an active CDR, which the caller knows is so (its
        reservation was taken in this transaction): the update goes with the
        commit.  ``again``: rewrite one the sweep settled by policy, and say
        whether it was still so."""
        m = self.store.money_in
        fields = dict(fields, cost=m(fields["cost"]),
                      buy_cost=None if fields.get("buy_cost") is None else m(fields["buy_cost"]))
        sets = ", ".join(f"{name} = ?" for name in fields)
        if not again:
            self.later(f"UPDATE astcdr SET {sets} WHERE uniqueid = ? AND state = 'active'",
                       (*fields.values(), uniqueid))
            return None
        return self.run(f"UPDATE astcdr SET {sets} WHERE uniqueid = ?"
                        " AND state IN ('released', 'charged')",
                        (*fields.values(), uniqueid)).rowcount == 1

    # -- administration ------------------------------------------------------
    def add_account(self, account, tariff, balance, now, credit_limit=D(0), max_calls=0,
                    actor=None):
        self.run("INSERT INTO astaccount (account, tariff, balance, credit_limit, max_calls,"
                 " created) VALUES (?, ?, ?, ?, ?, ?)",
                 (account, tariff, self.store.money_in(D(0)), self.store.money_in(credit_limit),
                  max_calls, now))
        self.change_balance(account, balance, "open", None, now, actor=actor)

    def set_account(self, account, changes):
        """Change ``changes`` ({tariff, credit_limit, max_calls}) of an account."""
        if "credit_limit" in changes:
            changes = dict(changes, credit_limit=self.store.money_in(changes["credit_limit"]))
        sets = ", ".join(f"{name} = ?" for name in changes)
        if self.run(f"UPDATE astaccount SET {sets} WHERE account = ?",
                    (*changes.values(), account)).rowcount != 1:
            raise NotFound(f"no account {account!r}")

    def accounts(self, account=None, search=None, after=None, limit=None):
        """[(account, tariff, balance, reserved, credit limit, call cap, live
        calls)] by name: one, or those whose name contains ``search``, after
        the name ``after``, ``limit`` at most."""
        where, params = [], []
        if account is not None:
            where.append("a.account = ?")
            params.append(account)
        if search is not None:
            where.append("INSTR(a.account, ?) > 0")   # no LIKE: % and _ are plain here
            params.append(search)
        if after is not None:
            where.append("a.account > ?")
            params.append(after)
        sql = ("SELECT a.account, a.tariff, a.balance, a.reserved, a.credit_limit, a.max_calls,"
               " COUNT(r.uniqueid) FROM astaccount a"
               " LEFT JOIN astcreditres r ON r.account = a.account"
               + (" WHERE " + " AND ".join(where) if where else "")
               + " GROUP BY a.account, a.tariff, a.balance, a.reserved, a.credit_limit,"
               " a.max_calls ORDER BY a.account")
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        rows = self.all(sql, tuple(params))
        m = self.store.money_out
        return [(r[0], r[1], m(r[2]), m(r[3]), m(r[4]), r[5], r[6]) for r in rows]

    def idempotency(self, actor, key):
        """(fingerprint, result) of the request ``actor`` made with ``key``, or None."""
        return self.one("SELECT fingerprint, result FROM astidempotency"
                        " WHERE actor = ? AND idem_key = ?", (actor, key))

    def remember(self, actor, key, account, fingerprint, result, now):
        """Keep ``actor``'s request with ``key`` and its result: Conflict if it is taken."""
        self.run("INSERT INTO astidempotency (actor, idem_key, account, fingerprint, result,"
                 " created) VALUES (?, ?, ?, ?, ?, ?)",
                 (actor, key, account, fingerprint, result, now))

    # Staff users (``astuser``) and API tokens (``asttoken``): {table}, one
    # of the two, and what is kept of the secret (a password's or a token's
    # hash, never the secret itself).
    SECRET = {"astuser": "password_hash", "asttoken": "token_hash"}

    def add_holder(self, table, name, role, secret_hash, now):
        self.run(f"INSERT INTO {table} (name, role, {self.SECRET[table]}, created)"
                 " VALUES (?, ?, ?, ?)", (name, role, secret_hash, now))

    def holders(self, table):
        """[(name, role, created)] by name."""
        return [(r[0], r[1], str(r[2])) for r in self.all(
            f"SELECT name, role, created FROM {table} ORDER BY name")]

    def remove_holder(self, table, name):
        if self.run(f"DELETE FROM {table} WHERE name = ?", (name,)).rowcount != 1:
            raise NotFound(f"no {table} {name!r}")
        if table == "astuser":   # a user added again must not find old sessions alive
            self.end_sessions("user", name)

    def user_secret(self, name):
        """(role, password hash) of a staff user, or None."""
        return self.one("SELECT role, password_hash FROM astuser WHERE name = ?", (name,))

    def token_holder(self, token_hash):
        """(name, role) of the token with that hash, or None."""
        return self.one("SELECT name, role FROM asttoken WHERE token_hash = ?", (token_hash,))

    def account_secret(self, account):
        """(account, password hash or None) of an account, or None."""
        return self.one("SELECT account, password_hash FROM astaccount WHERE account = ?",
                        (account,))

    def set_account_secret(self, account, secret_hash):
        """A new portal password: the sessions opened with the old one end."""
        if self.run("UPDATE astaccount SET password_hash = ? WHERE account = ?",
                    (secret_hash, account)).rowcount != 1:
            raise NotFound(f"no account {account!r}")
        self.end_sessions("account", account)

    # Browser sessions (``astsession``): a staff user's (kind "user") or a
    # customer's (kind "account"), found by the hash of their cookie.
    def add_session(self, session_hash, kind, name, csrf, expires, now):
        self.run("DELETE FROM astsession WHERE expires <= ?", (now,))   # keeps the table small
        self.run("INSERT INTO astsession (session_hash, kind, name, csrf, expires)"
                 " VALUES (?, ?, ?, ?, ?)", (session_hash, kind, name, csrf, expires))

    def session(self, session_hash, now):
        """(kind, name, csrf, role) of a session not expired at ``now``, or
        None; role: the user's now (None for a customer's), so that a user
        removed is logged out at once."""
        return self.one(
            "SELECT s.kind, s.name, s.csrf, u.role FROM astsession s"
            " LEFT JOIN astuser u ON s.kind = 'user' AND u.name = s.name"
            " WHERE s.session_hash = ? AND s.expires > ?", (session_hash, now))

    def end_sessions(self, kind, name):
        self.run("DELETE FROM astsession WHERE kind = ? AND name = ?", (kind, name))

    def remove_session(self, session_hash):
        self.run("DELETE FROM astsession WHERE session_hash = ?", (session_hash,))

    def ledger_rows(self, account, kinds, limit):
        """[(created, kind, amount, actor)] of the account's ledger rows of
        ``kinds``, newest first, ``limit`` at most."""
        rows = self.all(f"SELECT created, kind, amount, actor FROM astledger WHERE account = ?"
                        f" AND kind IN ({','.join('?' * len(kinds))}) ORDER BY id DESC LIMIT ?",
                        (account, *kinds, limit))
        return [(str(r[0]), r[1], self.store.money_out(r[2]), r[3]) for r in rows]

    def decks(self):
        """[(kind, name, starts, created)] of every deck, each owner's newest first."""
        return [(k, n, str(s), str(c)) for k, n, s, c in self.all(
            "SELECT kind, name, starts, created FROM astdeck ORDER BY kind, name, starts DESC,"
            " id DESC")]

    def has_deck(self, kind, name):
        return self.one("SELECT 1 FROM astdeck WHERE kind = ? AND name = ? LIMIT 1",
                        (kind, name)) is not None

    # CDRs of calls whose settlement may still price them by their deck: up,
    # or swept by policy (their own settlement corrects them when it comes).
    UNSETTLED = "('active', 'released', 'charged')"

    def import_deck(self, kind, name, starts, rows, now):
        """Make ``rows`` (PricedRow) the deck of tariff or trunk ``name``
        from ``starts`` on, in place of a deck with that very start.

        The deck replaced stays for the calls it priced until they are
        settled: each is settled by its own deck, by id.  Replaced decks
        that no such call refers to any more are removed."""
        self.run("INSERT INTO astdeck (kind, name, starts, created) VALUES (?, ?, ?, ?)",
                 (kind, name, starts, now))
        deck = self.one("SELECT MAX(id) FROM astdeck WHERE kind = ? AND name = ? AND starts = ?",
                        (kind, name, starts))[0]
        for (old,) in self.all("SELECT id FROM astdeck WHERE kind = ? AND name = ?"
                               " AND starts = ? AND id < ?", (kind, name, starts, deck)):
            if kind == "tariff":
                used = self.one("SELECT 1 FROM astcdr WHERE deck = ?"
                                f" AND state IN {self.UNSETTLED} LIMIT 1", (old,))
            else:  # the trunk it was sent to, or one it may fail over to
                used = self.one("SELECT 1 FROM astcdr WHERE (trunk_deck = ? OR route_decks LIKE ?)"
                                f" AND state IN {self.UNSETTLED} LIMIT 1", (old, f"% {old} %"))
            if used is None:
                self.run("DELETE FROM astprice WHERE deck = ?", (old,))
                self.run("DELETE FROM astdeck WHERE id = ?", (old,))
        m = self.store.money_in
        self.cur.executemany(self.store.sql(
            "INSERT INTO astprice (deck, prefix, days, start_min, end_min, destination, rate,"
            " connect_fee, min_secs, increment) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"),
            [(deck, r.rate.prefix, r.days, r.start, r.end, r.rate.destination,
              m(r.rate.per_min), m(r.rate.connect_fee), r.rate.min_secs, r.rate.increment)
             for r in rows])

    def deck_rows(self, kind, name, at, prefix=None):
        """(starts, [price rows]) of the deck in force ``at``, every prefix
        or those starting with ``prefix``; None when there is none."""
        deck = self.one("SELECT id, starts FROM astdeck WHERE kind = ? AND name = ?"
                        " AND starts <= ? ORDER BY starts DESC, id DESC LIMIT 1", (kind, name, at))
        if deck is None:
            return None
        where, params = "", (deck[0],)
        if prefix:
            where, params = " AND p.prefix LIKE ?", (deck[0], prefix + "%")
        m = self.store.money_out
        rows = self.all(f"SELECT {self.PRICE} FROM astprice p WHERE p.deck = ?{where}"
                        " ORDER BY p.prefix, p.days DESC, p.start_min", params)
        return str(deck[1]), [(*r[:5], m(r[5]), m(r[6]), *r[7:]) for r in rows]

    def add_trunk(self, name, dial, now):
        self.run("INSERT INTO asttrunk (name, dial, enabled, created) VALUES (?, ?, 1, ?)",
                 (name, dial, now))

    def trunks(self):
        """[(name, dial, enabled, start of its latest deck)]."""
        return self.all(
            "SELECT t.name, t.dial, t.enabled, MAX(d.starts) FROM asttrunk t"
            " LEFT JOIN astdeck d ON d.kind = 'trunk' AND d.name = t.name"
            " GROUP BY t.name, t.dial, t.enabled ORDER BY t.name")

    def set_trunk(self, name, enabled=None, remove=False):
        if remove:
            self.run("DELETE FROM astprice WHERE deck IN (SELECT id FROM astdeck"
                     " WHERE kind = 'trunk' AND name = ?)", (name,))
            self.run("DELETE FROM astdeck WHERE kind = 'trunk' AND name = ?", (name,))
            changed = self.run("DELETE FROM asttrunk WHERE name = ?", (name,)).rowcount
        else:
            changed = self.run("UPDATE asttrunk SET enabled = ? WHERE name = ?",
                               (int(enabled), name)).rowcount
        if changed != 1:
            raise NotFound(f"no trunk {name!r}")

    def calls_in_progress(self, account=None):
        """Every call in progress, or ``account``'s."""
        rows = self.all(
            "SELECT r.uniqueid, r.account, c.dst, r.max_secs, r.max_cost, r.created, c.channel"
            " FROM astcreditres r LEFT JOIN astcdr c ON c.uniqueid = r.uniqueid"
            + (" WHERE r.account = ?" if account is not None else "")
            + " ORDER BY r.created, r.uniqueid", () if account is None else (account,))
        m = self.store.money_out
        return [(r[0], r[1], r[2], r[3], m(r[4]), str(r[5]), r[6]) for r in rows]

    CDR_COLUMNS = ("uniqueid", "start", "answer", "end", "clid", "src", "dst", "dcontext",
                   "channel", "dstchannel", "lastapp", "lastdata", "duration", "billsec",
                   "disposition", "accountcode", "account", "tariff", "prefix", "rate",
                   "connect_fee", "max_secs", "cost", "state", "trunk", "buy_cost")
    CDR_MONEY = ("rate", "connect_fee", "cost", "buy_cost")

    def cdrs(self, account=None, since=None, until=None, after=None, limit=None, newest=False):
        """CDRs as dicts, by start then uniqueid (``newest``: the latest
        first): the account's, those started from ``since`` and before
        ``until`` ('YYYY-MM-DD HH:MM:SS' UTC), those after ``after`` (a
        (start, uniqueid) already seen, oldest first only), ``limit`` at most."""
        where, params = [], []
        for clause, value in (("account = ?", account), ("start >= ?", since),
                              ("start < ?", until)):
            if value is not None:
                where.append(clause)
                params.append(value)
        if after is not None:
            # Written so that the (start, uniqueid) index finds the next page.
            where.append("start >= ? AND (start > ? OR uniqueid > ?)")
            params += [after[0], after[0], after[1]]
        sql = f"SELECT {', '.join(self.CDR_COLUMNS)} FROM astcdr"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY start DESC, uniqueid DESC" if newest else " ORDER BY start, uniqueid"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [self._cdr_record(row) for row in self.all(sql, tuple(params))]

    # The figures of CDRs started in a range, by period: the start's first
    # ``width`` characters ('YYYY-MM-DD HH' an hour, 'YYYY-MM-DD' a day; both
    # backends give a start so as text).  Read from the astcdr_figures index
    # alone (schema step 8): the range of the periods shown, no row fetched.
    def cdr_periods(self, since, until, width):
        """[(period, calls, answered, billsec, revenue, buy cost, margin)]."""
        return self._cdr_figures(f"SUBSTR(start, 1, {int(width)})", since, until)

    def cdr_trunks(self, since, until):
        """[(trunk or None, calls, answered, billsec, revenue, buy cost, margin)]."""
        return self._cdr_figures("trunk", since, until)

    def _cdr_figures(self, key, since, until):
        m = self.store.money_out
        rows = self.all(
            f"SELECT {key}, COUNT(*), SUM(CASE WHEN disposition = 'ANSWERED' THEN 1 ELSE 0 END),"
            " COALESCE(SUM(billsec), 0), COALESCE(SUM(cost), 0), COALESCE(SUM(buy_cost), 0),"
            f" COALESCE(SUM(cost - buy_cost), 0) FROM astcdr WHERE start >= ? AND start < ?"
            f" GROUP BY {key} ORDER BY {key}", (since, until))
        return [(None if r[0] is None else str(r[0]), r[1], int(r[2]), int(r[3]), m(r[4]),
                 m(r[5]), m(r[6])) for r in rows]

    def _cdr_record(self, row):
        record = dict(zip(self.CDR_COLUMNS, row))
        for key in self.CDR_MONEY:
            if record[key] is not None:
                record[key] = self.store.money_out(record[key])
        for key in ("start", "answer", "end"):
            if record[key] is not None:
                record[key] = str(record[key])
        return record

    # -- the sweep and the audit ---------------------------------------------
    def has_table(self, name):
        return self.one(self.store.table_sql, (name,)) is not None

    def columns(self, table):
        """The names of the table's columns, in lower case."""
        return [str(r[0]).lower() for r in self.all(self.store.columns_sql, (table,))]

    def now(self):
        """The database's clock, 'YYYY-MM-DD HH:MM:SS' UTC."""
        return str(self.one("SELECT {now}")[0])

    def reservations(self):
        rows = self.all("SELECT uniqueid, account, max_secs, created FROM astcreditres"
                        " ORDER BY created, uniqueid")
        return [{"uniqueid": r[0], "account": r[1], "max_secs": r[2], "created": str(r[3])}
                for r in rows]

    def asterisk_billsec(self, table, uniqueid):
        """(billsec, disposition) of the call's Dial in Asterisk's own CDR table."""
        return self.one(f"SELECT billsec, disposition FROM {table} WHERE uniqueid = ?"
                        " AND lastapp = 'Dial' ORDER BY billsec DESC LIMIT 1", (uniqueid,))

    def ledger_mismatches(self):
        """Accounts whose balance is not the sum of their ledger."""
        return self._sum_mismatches("balance", "astledger", "amount")

    def reserved_mismatches(self):
        """Accounts whose ``reserved`` is not the sum of their reservations."""
        return self._sum_mismatches("reserved", "astcreditres", "max_cost")

    def _sum_mismatches(self, column, table, amount):
        """[(account, its ``column``, the sum of ``table.amount``)] where they differ."""
        total = f"COALESCE(SUM(t.{amount}), 0)"
        rows = self.all(
            f"SELECT a.account, a.{column}, {total} FROM astaccount a"
            f" LEFT JOIN {table} t ON t.account = a.account GROUP BY a.account, a.{column}"
            f" HAVING a.{column} <> {total}")
        m = self.store.money_out
        return [(r[0], m(r[1]), m(r[2])) for r in rows]

    def overdrawn(self):
        """Accounts whose balance is below what their credit limit allows."""
        m = self.store.money_out
        return [(r[0], m(r[1]), m(r[2])) for r in self.all(
            "SELECT account, balance, credit_limit FROM astaccount WHERE balance < -credit_limit")]

    def unledgered_charges(self):
        """Settled calls whose ledger rows (a charge, and any correction) do
        not add up to their cost."""
        m = self.store.money_out
        kinds = "l.kind IN ('call', 'reaper', 'correction')"
        rows = self.all(
            # Calls that cost something: their rows must add up to it ...
            "SELECT c.uniqueid, c.cost, SUM(l.amount) FROM astcdr c LEFT JOIN astledger l"
            f" ON l.uniqueid = c.uniqueid AND {kinds}"
            " WHERE c.state IN ('settled', 'charged', 'late') AND c.cost > 0"
            " GROUP BY c.uniqueid, c.cost HAVING COALESCE(SUM(l.amount), 0) <> -c.cost"
            # ... and calls that cost nothing must have no rows that do.
            " UNION ALL SELECT l.uniqueid, c.cost, SUM(l.amount) FROM astledger l"
            f" JOIN astcdr c ON c.uniqueid = l.uniqueid WHERE {kinds} AND c.cost = 0"
            " GROUP BY l.uniqueid, c.cost HAVING SUM(l.amount) <> 0")
        return [(r[0], m(r[1]), None if r[2] is None else -m(r[2])) for r in rows]

    def orphans(self):
        """Reservations without an active CDR, active CDRs without one, and
        calls let through an outage that could not be charged."""
        return self.all(
            "SELECT uniqueid, 'let through a database outage but not billable (no account"
            " or rate)' FROM astcdr WHERE state = 'unbilled' UNION ALL "
            "SELECT r.uniqueid, 'reservation without an active CDR' FROM astcreditres r"
            " LEFT JOIN astcdr c ON c.uniqueid = r.uniqueid AND c.state = 'active'"
            " WHERE c.uniqueid IS NULL"
            " UNION ALL SELECT c.uniqueid, 'active CDR without a reservation' FROM astcdr c"
            " LEFT JOIN astcreditres r ON r.uniqueid = c.uniqueid"
            " WHERE c.state = 'active' AND r.uniqueid IS NULL")
