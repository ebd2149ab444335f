"""Open the configured database, importing only that backend's driver."""
from .base import Busy, Conflict, NotFound, StoreError


def open_store(settings):
    database = settings["database"]
    if isinstance(database, str) and database.startswith("sqlite://"):
        from .sqlite import SQLiteStore
        return SQLiteStore(settings)
    from .mysql import MySQLStore
    return MySQLStore(settings)


__all__ = ["open_store", "StoreError", "Busy", "Conflict", "NotFound"]
