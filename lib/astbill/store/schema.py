"""The schema's versioned upgrades, yoyo-style: sql/NNN-name.sql, in order.

Each step is written once, with {money}, {time}, {id} and {table} for what
differs between backends, and runs once: ``astschema`` records every step
applied.  A database made by the first release (its tables, no
``astschema``) counts as version 1.

A statement only one backend needs (or one whose syntax differs, such as
DROP INDEX) follows a line ``--@ mysql`` or ``--@ sqlite``: the other
backend skips it.
"""
import os

from .base import StoreError

SQL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))), "sql")


def steps():
    """[(version, file name)] of every upgrade step, in order."""
    found = []
    for name in sorted(os.listdir(SQL_DIR)):
        number = name.split("-", 1)[0]
        if name.endswith(".sql") and number.isdigit():
            found.append((int(number), name))
    return found


ONLY = "--@ "   # a line naming the one backend the next statement is for


def statements(store, name):
    """The step's statements in the store's dialect, without those meant
    for another backend only."""
    with open(os.path.join(SQL_DIR, name), encoding="utf-8") as f:
        lines = [f"@{line[len(ONLY):].strip()} " if line.startswith(ONLY)
                 else line.split("--", 1)[0] for line in f]
    found = []
    for text in "\n".join(lines).split(";"):
        text = text.strip()
        if text.startswith("@"):
            backend, _, text = text[1:].partition(" ")
            if backend not in ("mysql", "sqlite"):
                raise StoreError(f"schema step {name}: unknown backend {backend!r} after {ONLY}")
            if backend != store.dialect["backend"]:
                continue
            text = text.strip()
        if text:
            found.append(text.format(now=store.now_sql, **store.schema_words()))
    return found


def current_version(store):
    if not store.read(lambda tx: tx.has_table("astschema")):
        store.execute_script([
            "CREATE TABLE astschema (version INT NOT NULL, applied {time} NULL,"
            " done INT NOT NULL DEFAULT 0, PRIMARY KEY (version)) {table}".format(**store.dialect)])
        if store.read(lambda tx: tx.has_table("astaccount")):
            store.atomic(lambda tx: progress(tx, 1, 0, applied=True))  # the first release's
    return store.read(lambda tx: tx.one(
        "SELECT COALESCE(MAX(version), 0) FROM astschema WHERE applied IS NOT NULL"))[0]


def progress(tx, version, done, applied=False):
    """Record how far a step got: ``done`` statements, all of them if ``applied``."""
    if tx.one("SELECT 1 FROM astschema WHERE version = ?", (version,)) is None:
        tx.run("INSERT INTO astschema (version, done) VALUES (?, 0)", (version,))
    tx.run("UPDATE astschema SET done = ?, applied = " + ("{now}" if applied else "NULL")
           + " WHERE version = ?", (done, version))


# MySQL's answers to a statement that has been applied already: the table
# exists (1050: if it has the statement's columns), the column (1060) or
# the index (1061) does; the index or column to drop is gone (1091), the
# table to drop too (1051); the step's own seed rows are there (1062, for
# its INSERTs only).
TABLE_EXISTS, SEEDED = 1050, 1062
ALREADY_APPLIED = {1051, 1060, 1061, 1091}


def already_applied(store, exc, statement):
    """Does ``exc``, the failure of ``statement``, say it was applied before?"""
    if exc.code in ALREADY_APPLIED:
        return True
    if exc.code == SEEDED:
        return statement.lstrip().upper().startswith("INSERT")
    if exc.code == TABLE_EXISTS:
        table, columns = created(statement)
        return table is not None and columns <= set(
            store.read(lambda tx: tx.columns(table)))
    return False


def fails_again(statement):
    """Would ``statement`` fail, run a second time?  CREATE, DROP, INSERT
    and ALTER TABLE ... ADD or DROP would; UPDATE or MODIFY would not."""
    words = statement.upper().split()
    return bool(words) and (words[0] in ("CREATE", "DROP", "INSERT") or (
        words[0] == "ALTER" and ("ADD" in words or "DROP" in words)))


def created(statement):
    """(table, {its columns}) of a CREATE TABLE statement, else (None, set())."""
    words = statement.split(None, 3)
    if len(words) < 4 or [w.upper() for w in words[:2]] != ["CREATE", "TABLE"]:
        return None, set()
    body = statement[statement.index("(") + 1:statement.rindex(")")]
    parts, depth, part = [], 0, ""
    for char in body:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(part)
            part = ""
        else:
            part += char
    parts.append(part)
    keys = ("PRIMARY", "KEY", "UNIQUE", "INDEX", "CONSTRAINT", "FOREIGN", "CHECK")
    columns = {p.split()[0].lower() for p in parts
               if p.split() and p.split()[0].upper() not in keys}
    return words[2].lower(), columns


def apply(store, number, name):
    """Run one step.  Where DDL is transactional (SQLite) the step is all or
    nothing; elsewhere (MySQL commits each DDL statement) every statement's
    success is recorded, so a step that failed half-way -- a missing
    privilege, say -- resumes at the statement that failed.

    The statements from there on may have been applied without being
    recorded: the one that ran just before the process died (or its
    connection did) with its record unwritten, or the first ones of a step
    run by hand.  So, resuming, a statement that MySQL says is applied
    already counts as applied -- but only until one statement of the step
    runs that would have failed had it been applied before: after that,
    nothing of the rest can have been, and such an error is a real one.
    (Statements that run as well twice -- an UPDATE, an ALTER TABLE ...
    MODIFY -- prove nothing either way.)  A table that exists counts only if
    it has the columns the statement gives it: one in the way is an error."""
    todo = statements(store, name)
    if store.dialect.get("transactional_ddl"):
        def whole(tx):
            for statement in todo:
                tx.run(statement)
            progress(tx, number, len(todo), applied=True)
        store.atomic(whole)
        return
    row = store.read(lambda tx: tx.one("SELECT done FROM astschema WHERE version = ?", (number,)))
    start = min(row[0] if row else 0, len(todo))
    if start == len(todo):  # every statement done, the step not marked so
        store.atomic(lambda tx: progress(tx, number, start, applied=True))
    resuming = True
    for at in range(start, len(todo)):
        try:
            store.execute_script([todo[at]])
            resuming = resuming and not fails_again(todo[at])
        except StoreError as exc:
            if not (resuming and already_applied(store, exc, todo[at])):
                raise StoreError(f"schema step {name}, statement {at + 1} of {len(todo)}: {exc};"
                                 " once that is fixed, init-db resumes there") from None
        store.atomic(lambda tx: progress(tx, number, at + 1, applied=at + 1 == len(todo)))


def migrate(store):
    """Apply every step the database lacks; (version before, version after)."""
    store.execute_script(store.dialect.get("prelude", ()))
    before = version = current_version(store)
    for number, name in steps():
        if number > version:
            apply(store, number, name)
            version = number
    return before, version


def latest():
    return steps()[-1][0]
