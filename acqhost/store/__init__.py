"""Durable storage: the ``Store`` protocol, its SQLite and in-memory backends, ``open_store``."""

from __future__ import annotations

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

__all__ = (
    "IN_FORCE_STATES",
    "TERMINAL_STATUSES",
    "AccountVersion",
    "MemoryStore",
    "NewAccount",
    "Operator",
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


def open_store(db: str) -> Store:
    """Open the store named by ``db``.

    - ``":memory:"``: a fresh ``MemoryStore`` (nothing durable).
    - a file path, or ``"sqlite:///path"`` (``sqlite:///rel.db``, ``sqlite:////abs.db``): a
      ``SQLiteStore`` on that file, created or upgraded as needed.
    - ``"postgresql://..."``: not yet available (NotImplementedError).

    ValueError for an empty name or any other URL scheme.
    """
    if db == ":memory:":
        return MemoryStore()
    if db.startswith(("postgresql://", "postgres://")):
        raise NotImplementedError(
            "PostgreSQL backend arrives with acqhost.store.postgres; use a SQLite file for now"
        )
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
