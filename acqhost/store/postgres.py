"""The store on PostgreSQL (psycopg 3), for several host processes on several machines.

The same semantics as ``SQLiteStore``, method for method (both are ``acqhost.store.sqlstore``
over ``acqhost.store.sql``). Each instance owns one connection with autocommit off at READ
COMMITTED, and each method is exactly one explicit transaction, committed (or rolled back)
before it returns, so a connection never idles inside one. READ COMMITTED is what the duplicate
rule needs: ``INSERT ... ON CONFLICT DO NOTHING`` waits for a concurrent writer of the same key
and then skips, and the next statement sees that writer's row. ``synchronous_commit`` is never
left ``off``: an approved sale is durable before its 0210 leaves.

Several host processes share one database, each caching terminals, session keys and accounts
for a moment. Every transaction that changes one of those (but not the sales of the hot path)
also sends ``pg_notify('acqhost_cache', '<kind>:<tid>')``, kind ``terminal``, ``session`` or
``account``: PostgreSQL delivers it at commit (never for a rollback) to every process listening
through :meth:`PostgresStore.cache_listener` (``acqhost.store.pg_listen``), which then drops the
entry at once instead of letting it expire.

The connection string may hold a password: it is kept only to reconnect and never shown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg

from acqhost.errors import StoreOpenError, StoreUnavailable
from acqhost.store.base import SaleRecord, SaleResult, StoreTx
from acqhost.store.migrations import postgres as migrations
from acqhost.store.pg_listen import CHANNEL, CacheListener
from acqhost.store.sql import (
    INSERT_SALES_FROM_ARRAYS,
    POSTGRES,
    STORED_SALES_FROM_ARRAYS,
    SaleKey,
    SQLTx,
)
from acqhost.store.sqlstore import SQLStore

__all__ = ("PostgresStore", "PostgresTx")

# One notification per terminal named, in one round trip (PostgreSQL folds repeats of one
# payload within a transaction into one).
_NOTIFY = "SELECT pg_notify(%s::text, %s::text || ':' || tid) FROM unnest(%s::text[]) AS t (tid)"

_DEADLOCK_ATTEMPTS = 3

_Cursor = psycopg.Cursor[tuple[Any, ...]]


def _unavailable(error: psycopg.OperationalError) -> StoreUnavailable:
    # psycopg's message names the server and the user, never the password
    return StoreUnavailable("PostgreSQL unavailable: " + " ".join(str(error).split()))


@contextmanager
def _outage(conn: psycopg.Connection[tuple[Any, ...]]) -> Iterator[None]:
    """A connection that died inside the block (the server stopped, restarted, or cut it: the
    transaction is lost whole) raises StoreUnavailable; other operational errors (a deadlock,
    a serialisation failure: the connection lives) pass as they are."""
    try:
        yield
    except psycopg.OperationalError as error:
        if conn.broken:
            raise _unavailable(error) from error
        raise


class PostgresTx(SQLTx):
    """``SQLTx`` on a PostgreSQL transaction: the sales of a call go in one statement, their
    columns as arrays, whatever their number (a round trip costs more than the rows)."""

    __slots__ = ()

    dialect = POSTGRES

    def _insert_sales(self, sales: Sequence[SaleRecord]) -> list[int | None]:
        # Repeats within the call are settled here: only a key's first sale is sent, so the
        # statement never meets its own rows and every returned row names one key.
        first: dict[SaleKey, SaleRecord] = {}
        for sale in sales:
            first.setdefault((sale.tid, sale.stan, sale.local_date), sale)
        unique = list(first.values())
        columns = (
            [s.tid for s in unique],
            [s.mid for s in unique],
            [s.stan for s in unique],
            [s.local_date for s in unique],
            [s.local_time for s in unique],
            [s.transmission for s in unique],
            [s.amount for s in unique],
            [s.currency for s in unique],
            [s.pan_masked for s in unique],
            [s.auth_code for s in unique],
            [s.test for s in unique],
            [s.account_version for s in unique],
            [s.batch_no for s in unique],
            [s.received_at for s in unique],
        )
        rows = self._execute(INSERT_SALES_FROM_ARRAYS, columns).fetchall()
        inserted = {(tid, stan, date): rrn for rrn, tid, stan, date in rows}
        rrns: list[int | None] = []
        for sale in sales:
            key = (sale.tid, sale.stan, sale.local_date)
            rrns.append(inserted.get(key) if first[key] is sale else None)
        return rrns

    def _stored_rrns(self, keys: list[SaleKey]) -> dict[SaleKey, int]:
        # A key stored before, or by a writer that committed while the insert waited on it:
        # under READ COMMITTED this statement's snapshot sees it.
        columns = ([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys])
        rows = self._execute(STORED_SALES_FROM_ARRAYS, columns).fetchall()
        return {(tid, stan, date): rrn for rrn, tid, stan, date in rows}


class PostgresStore(SQLStore):
    """``Store`` on one PostgreSQL database (created, or upgraded to the latest schema, on open).

    ``conninfo`` is a libpq connection string or URL (``postgresql://user@host/db``). Use one
    instance per thread at a time; every process or worker thread that writes opens its own.
    """

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo
        try:
            conn = self._connect()
        except psycopg.OperationalError as exc:  # the server unreachable, a bad database name
            # psycopg's message names the server and the user, never the password
            reason = " ".join(str(exc).split())
            raise StoreOpenError(f"cannot open PostgreSQL store: {reason}") from None
        try:
            migrations.migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        # Never the connection string: it may carry a password.
        self._where = f"{conn.info.dbname!r} on {conn.info.host!r}"
        self._reader = PostgresTx(self._alone, write=False)

    def __repr__(self) -> str:
        return f"<PostgresStore {self._where}>"

    def cache_listener(self, callback: Callable[[str, str], None]) -> CacheListener:
        """A listener (not yet started) for this database's cache notifications: it calls
        ``callback(kind, tid)`` from a thread of its own (see ``acqhost.store.pg_listen``)."""
        return CacheListener(self._conninfo, callback)

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        conn = psycopg.connect(self._conninfo, autocommit=False)
        try:
            conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
            with conn.transaction():
                row = conn.execute("SHOW synchronous_commit").fetchone()
                if row is not None and row[0] == "off":
                    conn.execute("SET synchronous_commit = on")
        except BaseException:
            conn.close()
            raise
        return conn

    def _connection(self) -> psycopg.Connection[tuple[Any, ...]]:
        if self._conn.broken:
            # The server went away under an earlier call (which raised): start afresh.
            try:
                self._conn = self._connect()
            except psycopg.OperationalError as error:  # still down, or starting up
                raise _unavailable(error) from error
        return self._conn

    # -- host ------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._conn.close()

    def schema_version(self) -> int:
        """The database's schema version (the ``schema_version`` table)."""
        with self._transaction() as cur:
            return migrations.schema_version(cur)

    @contextmanager
    def _transaction(self) -> Iterator[_Cursor]:
        """One transaction (rolled back on any error); a constraint violation becomes
        ValueError (the caller's input), as with SQLite."""
        conn = self._connection()
        with _outage(conn):
            try:
                with conn.transaction(), conn.cursor() as cur:
                    yield cur
            except psycopg.errors.IntegrityError as error:
                raise ValueError(f"rejected by the store: {error}") from error

    def _alone(self, sql: str, params: tuple[Any, ...]) -> _Cursor:
        """Run one statement in a transaction of its own (the store's reads); the cursor
        keeps its rows after the commit."""
        conn = self._connection()
        cur = conn.cursor()
        with _outage(conn), conn.transaction():
            cur.execute(sql, params)
        return cur

    @contextmanager
    def _write(self) -> Iterator[SQLTx]:
        """One write transaction. What it changed of what hosts cache is announced when it
        commits; a block that raises announces nothing."""
        with self._transaction() as cur:
            tx = PostgresTx(cur.execute, write=True)
            yield tx
            kinds: dict[str, list[str]] = {}
            for kind, tid in sorted(tx.changed):
                kinds.setdefault(kind, []).append(tid)
            for kind, tids in kinds.items():
                cur.execute(_NOTIFY, (CHANNEL, kind, tids))

    @contextmanager
    def _snapshot(self) -> Iterator[SQLTx]:
        """A read-only transaction seeing one snapshot for every read (audit verify compares
        two tables), as SQLite's read transactions do."""
        with self._transaction() as cur:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            yield PostgresTx(cur.execute, write=False)

    # -- ledger ----------------------------------------------------------------------------
    def record_sales(
        self,
        sales: Sequence[SaleRecord],
        then: Callable[[StoreTx, list[SaleResult]], None] | None = None,
    ) -> list[SaleResult]:
        """``Store.record_sales``: all the sales in one statement (``PostgresTx``), a second
        only when some key was already stored. A transaction that PostgreSQL aborts as a
        deadlock with another writer of the same keys is run again, ``then`` with it (up to 3
        times)."""
        attempt = 1
        while True:
            try:
                return super().record_sales(sales, then)
            except psycopg.errors.DeadlockDetected:
                # Two writers inserting the same keys in opposite orders wait for each other
                # until PostgreSQL aborts one of them, whole: running it again is safe, and
                # finds the other's sales as duplicates.
                if attempt == _DEADLOCK_ATTEMPTS:
                    raise
                attempt += 1
