"""Open the configured database, importing only that backend's driver."""
from .base import Conflict, LockTimeout, NotFound, StoreError


def open_store(settings):
    url = settings["database"]
    if url.startswith("sqlite://"):
        from .sqlite import SQLiteStore
        return SQLiteStore(settings)
    from .mysql import MySQLStore
    return MySQLStore(settings)


__all__ = ["open_store", "StoreError", "LockTimeout", "Conflict", "NotFound"]
