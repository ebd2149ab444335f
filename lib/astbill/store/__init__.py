"""Open the configured database, importing only that backend's driver.

A long-running process (the FastAGI server) may keep one storage session
per thread between calls (``keep_sessions``): ``open_store`` then hands the
thread its kept session when it is for the same database and still works
(checked each time: a ping unless it answered a moment ago, or the SQLite
file's identity), else a new one;
``close`` leaves it open.  No transaction is ever open between two uses.
"""
from .base import Busy, Conflict, NotFound, StoreError

_kept = None  # a threading.local once sessions are kept
_unpinged_secs = 0.0


def keep_sessions(unpinged_secs=0.0):
    """Keep a storage session per thread between calls, from now on.  One
    that answered within ``unpinged_secs`` is handed out without a ping:
    only for work run through ledger.attempt, which runs it again on a new
    connection when its first statement finds the kept one dead."""
    global _kept, _unpinged_secs
    import threading
    _kept, _unpinged_secs = threading.local(), unpinged_secs


def forget_sessions():
    """Close this thread's kept session, if any."""
    store = getattr(_kept, "store", None) if _kept is not None else None
    if store is not None:
        _kept.store = None
        store.drop()


def open_store(settings):
    if _kept is not None:
        return _kept_store(settings)
    return _new_store(settings)


def is_sqlite(settings):
    """Whether the database is an SQLite file (else MySQL or MariaDB)."""
    database = settings["database"]
    return isinstance(database, str) and database.startswith("sqlite://")


def _new_store(settings):
    if is_sqlite(settings):
        from .sqlite import SQLiteStore
        return SQLiteStore(settings)
    from .mysql import MySQLStore
    return MySQLStore(settings)


def _session_key(settings):
    """What a session's connection depends on."""
    return (repr(settings["database"]), settings.get("config_dir", ""),
            settings.get("mysql_driver"), settings.get("database_password_env"),
            settings.get("lock_wait_secs"), settings.get("connect_timeout_secs"),
            settings.get("create_database"))


def _kept_store(settings):
    key = _session_key(settings)
    store = getattr(_kept, "store", None)
    if store is not None and store.in_use:
        return _new_store(settings)  # opened inside another session's work: its own
    if store is not None and (store.session_key != key or not store.usable()):
        forget_sessions()   # another database, or one that went away: reconnect
        store = None
    if store is None:
        store = _new_store(settings)
        store.kept, store.session_key, store.unpinged_secs = True, key, _unpinged_secs
        _kept.store = store
    store.settings, store.in_use = settings, True
    return store


__all__ = ["open_store", "keep_sessions", "forget_sessions", "StoreError", "Busy", "Conflict",
           "NotFound"]
