"""Durable storage: the ``Store`` protocol, its SQLite, PostgreSQL and in-memory backends,
``open_store``.

``PostgresStore`` is imported on first use (``open_store`` of a PostgreSQL URL, or the name
itself): psycopg takes longer to import than the rest of acqhost, and a host on SQLite never
needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from acqhost.store.base import (
    IN_FORCE_STATES,
    TERMINAL_STATUSES,
    AccountVersion,
    NewAccount,
    Operator,
    SaleRecord,
    SaleResult,
    SchemaVersionError,
    Session,
    Store,
    StoredSale,
    Terminal,
    format_rrn,
)
from acqhost.store.memory import MemoryStore
from acqhost.store.sqlite import SQLiteStore

if TYPE_CHECKING:
    from acqhost.store.postgres import PostgresStore

__all__ = (
    "IN_FORCE_STATES",
    "TERMINAL_STATUSES",
    "AccountVersion",
    "MemoryStore",
    "NewAccount",
    "Operator",
    "PostgresStore",
    "SQLiteStore",
    "SaleRecord",
    "SaleResult",
    "SchemaVersionError",
    "Session",
    "Store",
    "StoredSale",
    "Terminal",
    "format_rrn",
    "open_store",
)

_SQLITE_PREFIX = "sqlite:///"
_POSTGRES_PREFIXES = ("postgresql://", "postgres://")


def __getattr__(name: str) -> Any:
    if name == "PostgresStore":
        from acqhost.store.postgres import PostgresStore

        return PostgresStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_store(db: str) -> Store:
    """Open the store named by ``db``.

    - ``":memory:"``: a fresh ``MemoryStore`` (nothing durable).
    - a file path, or ``"sqlite:///path"`` (``sqlite:///rel.db``, ``sqlite:////abs.db``): a
      ``SQLiteStore`` on that file, created or upgraded as needed.
    - ``"postgresql://..."`` or ``"postgres://..."`` (a libpq URL): a ``PostgresStore`` on that
      database, whose schema is created or upgraded as needed.

    ValueError for an empty name or any other URL scheme.
    """
    if db == ":memory:":
        return MemoryStore()
    if db.startswith(_POSTGRES_PREFIXES):
        from acqhost.store.postgres import PostgresStore

        return PostgresStore(db)
    if db.startswith(_SQLITE_PREFIX):
        path = db[len(_SQLITE_PREFIX) :]
        if not path:
            raise ValueError(f"no file in {db!r}")
        return SQLiteStore(path)
    if "://" in db:
        raise ValueError(f"unknown store URL scheme: {db.split('://', 1)[0]!r}")
    if not db:
        raise ValueError("empty store name")
    return SQLiteStore(db)
