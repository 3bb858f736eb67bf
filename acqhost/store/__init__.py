"""Durable storage: the ``Store`` protocol, its SQLite and PostgreSQL backends, ``open_store``.

``PostgresStore`` is imported on first use (``open_store`` of a PostgreSQL URL, or the name
itself): psycopg takes longer to import than the rest of acqhost, and a host on SQLite never
needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from acqhost.store.base import (
    ACCOUNT_STATES,
    ADVICE_STATES,
    IN_FORCE_STATES,
    OPEN_REBIND_STATES,
    TERMINAL_STATUSES,
    AccountVersion,
    AuditEntry,
    BankLease,
    BankStatus,
    NewAccount,
    NewAdvice,
    Operator,
    RebindRequest,
    SaleRecord,
    SaleResult,
    SchemaVersionError,
    Session,
    Store,
    StoredAdvice,
    StoredSale,
    StoreTx,
    Terminal,
    format_rrn,
    in_force,
    next_change,
)
from acqhost.store.sqlite import SQLiteStore

if TYPE_CHECKING:
    from acqhost.store.postgres import PostgresStore

__all__ = (
    "ACCOUNT_STATES",
    "ADVICE_STATES",
    "IN_FORCE_STATES",
    "OPEN_REBIND_STATES",
    "TERMINAL_STATUSES",
    "AccountVersion",
    "AuditEntry",
    "BankLease",
    "BankStatus",
    "NewAccount",
    "NewAdvice",
    "Operator",
    "PostgresStore",
    "RebindRequest",
    "SQLiteStore",
    "SaleRecord",
    "SaleResult",
    "SchemaVersionError",
    "Session",
    "Store",
    "StoreTx",
    "StoredAdvice",
    "StoredSale",
    "Terminal",
    "format_rrn",
    "in_force",
    "next_change",
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

    - a file path, or ``"sqlite:///path"`` (``sqlite:///rel.db``, ``sqlite:////abs.db``): a
      ``SQLiteStore`` on that file, created or upgraded as needed.
    - ``"postgresql://..."`` or ``"postgres://..."`` (a libpq URL): a ``PostgresStore`` on that
      database, whose schema is created or upgraded as needed.

    ValueError for an empty name, any other URL scheme, and ``":memory:"``: a host opens the
    store more than once (a reader and the ledger's writer), and each opening of an in-memory
    SQLite database is a database of its own. A test or benchmark wanting no disk opens a
    ``SQLiteStore`` on a file in a temporary (or RAM-backed) directory.
    """
    if db.startswith(_POSTGRES_PREFIXES):
        from acqhost.store.postgres import PostgresStore

        return PostgresStore(db)
    if db.startswith(_SQLITE_PREFIX):
        path = db[len(_SQLITE_PREFIX) :]
        if not path:
            raise ValueError(f"no file in {db!r}")
        return _sqlite(path)
    if "://" in db:
        raise ValueError(f"unknown store URL scheme: {db.split('://', 1)[0]!r}")
    if not db:
        raise ValueError("empty store name")
    return _sqlite(db)


def _sqlite(path: str) -> SQLiteStore:
    if path == ":memory:":
        raise ValueError(
            "no in-memory store: ':memory:' would give each connection a database of its own; "
            "name a SQLite file (a temporary one for tests and benchmarks)"
        )
    return SQLiteStore(path)
