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
            found.append(text.format(now=store.now_sql, **store.dialect))
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


def apply(store, number, name):
    """Run one step.  Where DDL is transactional (SQLite) the step is all or
    nothing; elsewhere (MySQL commits each DDL statement) every statement's
    success is recorded, so a step that failed half-way -- a missing
    privilege, say -- resumes at the statement that failed."""
    todo = statements(store, name)
    if store.dialect.get("transactional_ddl"):
        def whole(tx):
            for statement in todo:
                tx.run(statement)
            progress(tx, number, len(todo), applied=True)
        store.atomic(whole)
        return
    row = store.read(lambda tx: tx.one("SELECT done FROM astschema WHERE version = ?", (number,)))
    for at in range(row[0] if row else 0, len(todo)):
        try:
            store.execute_script([todo[at]])
        except StoreError as exc:
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
