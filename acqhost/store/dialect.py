"""The small table of what the store's two SQL dialects write differently, and the advisory
lock keys of PostgreSQL.

The store's statements (``acqhost.store.sql``, ``acqhost.store.outbox``) are written once, with
``?`` placeholders, in the SQL that SQLite and PostgreSQL both speak; a :class:`Dialect` says
how a parameter is written, the collation that sorts by bytes, and locking: PostgreSQL locks a
terminal's row (``FOR UPDATE``), the audit chain and a terminal's outbox (advisory locks), and
lets claimers of the outbox pass each other's rows (``SKIP LOCKED``), where SQLite's
``BEGIN IMMEDIATE`` already holds the database's one write lock.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = (
    "AUDIT_LOCK",
    "MIGRATION_LOCK",
    "OUTBOX_LOCK",
    "POSTGRES",
    "SQLITE",
    "Cursor",
    "Dialect",
    "Execute",
)

# pg_advisory_xact_lock keys (advisory locks are per database, so databases on one server do
# not wait for each other): "acqhost" in ASCII serialises migrations; the next one, appends to
# the audit log's hash chain.
MIGRATION_LOCK = 0x61_63_71_68_6F_73_74
AUDIT_LOCK = MIGRATION_LOCK + 1
# The first key of the two-key form ("outb" in ASCII; the two forms' key spaces never
# overlap), the second being a hash of the terminal id: queuing a terminal's advices.
OUTBOX_LOCK = 0x6F_75_74_62


class Cursor(Protocol):
    """What SQLTx reads of a statement's result, in either driver."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


Execute = Callable[[str, tuple[Any, ...]], Cursor]


@dataclass(frozen=True, slots=True)
class Dialect:
    """What one backend's SQL writes differently from the store's statements."""

    placeholder: str  # a parameter: "?" (sqlite3) or "%s" (psycopg)
    byte_order: str  # the collation that sorts text byte by byte (tids are listed so)
    # Run first in a write transaction naming a terminal, so that the writers of one terminal
    # go one at a time; None where BEGIN IMMEDIATE already holds the one write lock.
    lock_terminal: str | None
    # Run before a writer reads the newest audit entry, so that appends form one chain; None
    # where the write lock already gives them one order.
    lock_audit: str | None
    # Ends a settlement's read of the open batch it is about to close, so that the sales and
    # reversals of that batch wait for it; "" where the write lock already orders them.
    for_update: str
    # Ends a reversal's sub-select of its sale's batch, so that it waits for a settlement
    # closing that batch, and then finds it closed; "" likewise.
    key_share: str
    # Whether a transaction notes what it changed of what hosts cache, for the backend to
    # announce at commit: hosts sharing a PostgreSQL database listen for it; hosts sharing a
    # SQLite file have only their caches' short lives.
    announces: bool
    # Run before an advice of a terminal is queued, so that a terminal's advices are numbered
    # in the order their transactions commit (a later one is never seen first); None where the
    # write lock already orders every writer. Not the terminal's row: the transactions that
    # queue advices lock rows of several terminals in orders of their own.
    lock_outbox: str | None = None
    # Ends the choice of advices to claim: rows another claimer has locked are passed over
    # rather than waited for ("" where one writer at a time claims anyway).
    skip_locked: str = ""

    def statement(self, sql: str) -> str:
        """``sql``, written with ``?``, in this dialect's placeholders."""
        return sql if self.placeholder == "?" else _translate(sql, self.placeholder)

    def bind(self, execute: Execute) -> Execute:
        """``execute`` (the driver's) taking statements written with ``?``."""
        if self.placeholder == "?":
            return execute
        statement = self.statement
        return lambda sql, params: execute(statement(sql), params)


SQLITE = Dialect(
    placeholder="?", byte_order="BINARY", lock_terminal=None, lock_audit=None, for_update="",
    key_share="", announces=False,
)  # fmt: skip
POSTGRES = Dialect(
    placeholder="%s",
    byte_order='"C"',
    lock_terminal="SELECT 1 FROM terminals WHERE tid = ? FOR UPDATE",
    lock_audit=f"SELECT pg_advisory_xact_lock({AUDIT_LOCK})",
    for_update=" FOR UPDATE",
    key_share=" FOR KEY SHARE",
    announces=True,
    lock_outbox=f"SELECT pg_advisory_xact_lock({OUTBOX_LOCK}, hashtext(?))",
    skip_locked=" FOR UPDATE SKIP LOCKED",
)


@functools.cache
def _translate(sql: str, placeholder: str) -> str:
    # Once per statement text: a statement holds no "?" but its placeholders.
    return sql.replace("?", placeholder)
