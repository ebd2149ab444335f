"""The schema's versioned upgrades, yoyo-style: sql/NNN-name.sql, in order.

Each step is written once, with {money}, {time}, {id} and {table} for what
differs between backends, and runs once: ``astschema`` records every step
applied.  A database made by the first release (its tables, no
``astschema``) counts as version 1.
"""
import os

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


def statements(store, name):
    """The step's statements in the store's dialect."""
    with open(os.path.join(SQL_DIR, name), encoding="utf-8") as f:
        text = "\n".join(line.split("--", 1)[0] for line in f)
    return [s.strip().format(now=store.now_sql, **store.dialect)
            for s in text.split(";") if s.strip()]


def current_version(store):
    if not store.read(lambda tx: tx.has_table("astschema")):
        store.execute_script([
            "CREATE TABLE astschema (version INT NOT NULL, applied {time} NOT NULL,"
            " PRIMARY KEY (version)) {table}".format(**store.dialect)])
        if store.read(lambda tx: tx.has_table("astaccount")):
            record(store, 1)  # made by the first release, before versions
    return store.read(lambda tx: tx.one("SELECT COALESCE(MAX(version), 0) FROM astschema"))[0]


def record(store, version):
    store.atomic(lambda tx: tx.run("INSERT INTO astschema (version, applied) VALUES (?, {now})",
                                   (version,)))


def migrate(store):
    """Apply every step the database lacks; (version before, version after)."""
    store.execute_script(store.dialect.get("prelude", ()))
    before = version = current_version(store)
    for number, name in steps():
        if number > version:
            store.execute_script(statements(store, name))
            record(store, number)
            version = number
    return before, version


def latest():
    return steps()[-1][0]
