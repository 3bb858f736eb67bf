"""The store on PostgreSQL (psycopg 3), for several host processes on several machines.

The same semantics as ``SQLiteStore``, method for method. Each instance owns one connection
with autocommit off at READ COMMITTED, and each method is exactly one explicit transaction,
committed (or rolled back) before it returns, so a connection never idles inside one. READ
COMMITTED is what the duplicate rule needs: ``INSERT ... ON CONFLICT DO NOTHING`` waits for a
concurrent writer of the same key and then skips, and the next statement sees that writer's
row. ``synchronous_commit`` is never left ``off``: an approved sale is durable before its 0210
leaves.

Several host processes share one database, each caching terminals, session keys and accounts
for a moment. Every transaction that changes one of those (but not the sales of the hot path)
also sends ``pg_notify('acqhost_cache', '<kind>:<tid>')``, kind ``terminal``, ``session`` or
``account``: PostgreSQL delivers it at commit (never for a rollback) to every process listening
through :meth:`PostgresStore.cache_listener` (``acqhost.store.pg_listen``), which then drops the
entry at once instead of letting it expire.

The connection string may hold a password: it is kept only to reconnect and never shown.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg

from acqhost.store.base import (
    TERMINAL_STATUSES,
    AccountVersion,
    NewAccount,
    Operator,
    SaleRecord,
    SaleResult,
    Session,
    StoredSale,
    StoreTx,
    Terminal,
    format_rrn,
    in_force,
)
from acqhost.store.migrations import postgres as migrations
from acqhost.store.pg_listen import CHANNEL, CacheListener
from acqhost.store.sql import (
    ACCOUNT_COLUMNS,
    AUDIT_LOCK,
    SALE_SELECT,
    TERMINAL_COLUMNS,
    SQLTx,
    account_v1_params,
    check_new_terminal,
    operator_params,
    stored_sale,
    terminal_params,
)

__all__ = ("PostgresStore",)

# Every sale of a call in one statement (one round trip): one array per column, unnested in
# order, so the identity hands out RRNs in the order of the call.
_INSERT_SALES = (
    "INSERT INTO sales (tid, mid, stan, local_date, local_time, transmission, amount, currency, "
    "pan_masked, auth_code, test, account_version, batch_no, received_at) "
    "SELECT tid, mid, stan, local_date, local_time, transmission, amount, currency, "
    "pan_masked, auth_code, test, account_version, batch_no, received_at "
    "FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], "
    "%s::bigint[], %s::text[], %s::text[], %s::text[], %s::boolean[], %s::integer[], "
    "%s::integer[], %s::double precision[]) WITH ORDINALITY AS input (tid, mid, stan, "
    "local_date, local_time, transmission, amount, currency, pan_masked, auth_code, test, "
    "account_version, batch_no, received_at, ord) "
    "ORDER BY ord "
    "ON CONFLICT (tid, stan, local_date) DO NOTHING "
    "RETURNING rrn, tid, stan, local_date"
)
_EXISTING_SALES = (
    "SELECT s.rrn, s.tid, s.stan, s.local_date FROM sales AS s "
    "JOIN unnest(%s::text[], %s::text[], %s::text[]) AS k (tid, stan, local_date) "
    "ON s.tid = k.tid AND s.stan = k.stan AND s.local_date = k.local_date"
)

# One notification per terminal named, in one round trip (PostgreSQL folds repeats of one
# payload within a transaction into one).
_NOTIFY = "SELECT pg_notify(%s::text, %s::text || ':' || tid) FROM unnest(%s::text[]) AS t (tid)"

_Key = tuple[str, str, str]  # (tid, stan, local_date): the duplicate key
_DEADLOCK_ATTEMPTS = 3


class PostgresStore:
    """``Store`` on one PostgreSQL database (created, or upgraded to the latest schema, on open).

    ``conninfo`` is a libpq connection string or URL (``postgresql://user@host/db``). Use one
    instance per thread at a time; every process or worker thread that writes opens its own.
    """

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo
        conn = self._connect()
        try:
            migrations.migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        # Never the connection string: it may carry a password.
        self._where = f"{conn.info.dbname!r} on {conn.info.host!r}"

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

    # -- host ------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._conn.close()

    def schema_version(self) -> int:
        """The database's schema version (the ``schema_version`` table)."""
        with self._transaction() as cur:
            return migrations.schema_version(cur)

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Cursor[tuple[Any, ...]]]:
        """One transaction (rolled back on any error); a constraint violation becomes
        ValueError (the caller's input), as with SQLite."""
        if self._conn.broken:
            # The server went away under an earlier call (which raised): start afresh.
            self._conn = self._connect()
        try:
            with self._conn.transaction(), self._conn.cursor() as cur:
                yield cur
        except psycopg.errors.IntegrityError as error:
            raise ValueError(f"rejected by the store: {error}") from error

    @contextmanager
    def transaction(self, tid: str | None = None, *, write: bool = True) -> Iterator[StoreTx]:
        """One transaction for the rebind flow. A write transaction naming ``tid`` first locks
        the terminal's row, so writers of one terminal (in any process) go one at a time;
        appends to the audit log take an advisory lock, so its chain has one order. The
        terminals whose settlement-account versions it adds or moves are announced
        (``account:<tid>``) when it commits. A read transaction reads one snapshot."""
        with self._transaction() as cur:
            if not write:
                # One snapshot for every read (audit verify compares two tables), as SQLite's
                # read transactions have.
                cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            elif tid is not None:
                cur.execute("SELECT 1 FROM terminals WHERE tid = %s FOR UPDATE", (tid,))
            tx = _tx_on(cur, write)
            yield tx
            # Not reached when the block raised: nothing is announced for a rollback.
            if tx.changed:
                _notify(cur, "account", tx.changed)

    # -- terminals -------------------------------------------------------------------------
    def add_terminal(
        self,
        terminal: Terminal,
        account: NewAccount,
        operator: Operator | None,
        then: Callable[[StoreTx], None] | None = None,
    ) -> None:
        """Register a terminal with settlement account version 1 (ACTIVE, effective from
        ``terminal.created_at``), batch 1 open and the optional operator, in one transaction
        with ``then`` (see Store.add_terminal). ValueError if the tid exists (or a value
        breaks a constraint)."""
        check_new_terminal(terminal, operator)
        now = terminal.created_at
        with self._transaction() as cur:
            # ON CONFLICT rather than a look first: two processes adding the same tid at once
            # get one terminal and one "already exists".
            cur.execute(
                f"INSERT INTO terminals ({TERMINAL_COLUMNS}) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (tid) DO NOTHING",
                terminal_params(terminal),
            )
            if cur.rowcount != 1:
                raise ValueError(f"terminal {terminal.tid!r} already exists")
            cur.execute(
                f"INSERT INTO settlement_accounts ({ACCOUNT_COLUMNS}) "
                "VALUES (%s, 1, %s, %s, %s, %s, %s, %s, 'ACTIVE', %s, %s, %s, %s)",
                account_v1_params(terminal.tid, account, now),
            )
            cur.execute(
                "INSERT INTO batches (tid, batch_no, status, opened_at) VALUES (%s, 1, 'open', %s)",
                (terminal.tid, now),
            )
            if operator is not None:
                cur.execute(
                    "INSERT INTO operators (tid, operator_id, password_hash, failures) "
                    "VALUES (%s, %s, %s, %s)",
                    operator_params(operator),
                )
            if then is not None:
                then(_tx_on(cur, write=True))
            # A host that was asked about this tid has "no such terminal" cached.
            _notify(cur, "terminal", (terminal.tid,))

    def get_terminal(self, tid: str) -> Terminal | None:
        """The terminal, or None."""
        with self._transaction() as cur:
            row = cur.execute(
                f"SELECT {TERMINAL_COLUMNS} FROM terminals WHERE tid = %s", (tid,)
            ).fetchone()
        return None if row is None else Terminal(*row)

    def list_terminals(self) -> list[Terminal]:
        """Every terminal, by tid (in byte order, as SQLite sorts)."""
        with self._transaction() as cur:
            rows = cur.execute(
                f'SELECT {TERMINAL_COLUMNS} FROM terminals ORDER BY tid COLLATE "C"'
            ).fetchall()
        return [Terminal(*row) for row in rows]

    def set_terminal_status(self, tid: str, status: str) -> bool:
        """Set "active" or "disabled"; False if there is no such terminal."""
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"terminal status must be active or disabled: {status!r}")
        with self._transaction() as cur:
            cur.execute("UPDATE terminals SET status = %s WHERE tid = %s", (status, tid))
            if cur.rowcount != 1:
                return False
            _notify(cur, "terminal", (tid,))
            return True

    # -- sessions --------------------------------------------------------------------------
    def save_session(self, session: Session) -> None:
        """Insert or replace the terminal's session (a new sign-on replaces the old keys)."""
        with self._transaction() as cur:
            cur.execute(
                "INSERT INTO sessions (tid, sealed_rx, sealed_tx, signed_on_at) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (tid) DO UPDATE SET "
                "sealed_rx = excluded.sealed_rx, sealed_tx = excluded.sealed_tx, "
                "signed_on_at = excluded.signed_on_at",
                (session.tid, session.sealed_rx, session.sealed_tx, session.signed_on_at),
            )
            _notify(cur, "session", (session.tid,))

    def get_session(self, tid: str) -> Session | None:
        """The terminal's session, or None when it is not signed on."""
        with self._transaction() as cur:
            row = cur.execute(
                "SELECT tid, sealed_rx, sealed_tx, signed_on_at FROM sessions WHERE tid = %s",
                (tid,),
            ).fetchone()
        return None if row is None else Session(*row)

    def drop_session(self, tid: str) -> None:
        """Forget the terminal's session keys (sign-off); no error if there are none."""
        with self._transaction() as cur:
            cur.execute("DELETE FROM sessions WHERE tid = %s", (tid,))
            if cur.rowcount:
                _notify(cur, "session", (tid,))

    # -- settlement accounts ---------------------------------------------------------------
    def current_account(self, tid: str, now: float) -> AccountVersion | None:
        """The version in force at ``now`` (``acqhost.store.base.in_force`` of its versions)."""
        return in_force(self.account_history(tid), now)

    def account_history(self, tid: str) -> list[AccountVersion]:
        """Every version of the terminal's settlement account, oldest first."""
        with self._transaction() as cur:
            rows = cur.execute(
                f"SELECT {ACCOUNT_COLUMNS} FROM settlement_accounts WHERE tid = %s "
                "ORDER BY version",
                (tid,),
            ).fetchall()
        return [AccountVersion(*row) for row in rows]

    # -- ledger ----------------------------------------------------------------------------
    def open_batch(self, tid: str) -> int:
        """The terminal's open batch number; KeyError if the terminal has none."""
        with self._transaction() as cur:
            row = cur.execute(
                "SELECT batch_no FROM batches WHERE tid = %s AND status = 'open'", (tid,)
            ).fetchone()
        if row is None:
            raise KeyError(tid)
        return int(row[0])

    def record_sales(self, sales: Sequence[SaleRecord]) -> list[SaleResult]:
        """Insert many approved sales in ONE transaction (one commit), in order.

        A sale whose (tid, stan, local_date) is already stored, or repeated earlier in
        ``sales``, is not inserted: it gets duplicate=True and the RRN of the sale stored under
        that key. Others get their new RRN. ValueError (and nothing inserted) if a sale names an
        unknown terminal, batch or account version.

        All the sales go in one ``INSERT ... SELECT FROM unnest(...)`` statement; a second
        statement, only when some key was already stored, fetches those RRNs. A transaction
        that PostgreSQL aborts as a deadlock with another writer of the same keys is run again
        (up to 3 times).
        """
        if not sales:
            return []
        # Repeats within the call are settled here: only a key's first sale is sent, so the
        # statement never meets its own rows and every returned row names one key.
        first: dict[_Key, SaleRecord] = {}
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
        for attempt in range(1, _DEADLOCK_ATTEMPTS + 1):
            try:
                inserted, stored = self._insert_sales(list(first), columns)
                break
            except psycopg.errors.DeadlockDetected:
                # Two writers inserting the same keys in opposite orders wait for each other
                # until PostgreSQL aborts one of them, whole: running it again is safe, and
                # finds the other's sales as duplicates.
                if attempt == _DEADLOCK_ATTEMPTS:
                    raise
        results: list[SaleResult] = []
        append = results.append
        for sale in sales:
            key = (sale.tid, sale.stan, sale.local_date)
            rrn = inserted.get(key)
            if rrn is not None and first[key] is sale:
                append(SaleResult(format_rrn(rrn), False))
            else:
                append(SaleResult(format_rrn(stored[key] if rrn is None else rrn), True))
        return results

    def _insert_sales(
        self, keys: list[_Key], columns: tuple[list[Any], ...]
    ) -> tuple[dict[_Key, int], dict[_Key, int]]:
        """One transaction: insert the sales (one per key, in ``columns``); the RRNs of those
        inserted and of those whose key was already stored."""
        with self._transaction() as cur:
            cur.execute(_INSERT_SALES, columns)
            inserted = {(tid, stan, date): rrn for rrn, tid, stan, date in cur.fetchall()}
            if len(inserted) == len(keys):
                return inserted, {}
            # A key stored before (or by a writer that committed while this INSERT waited on
            # it: under READ COMMITTED this next statement's snapshot sees it).
            missing = [key for key in keys if key not in inserted]
            cur.execute(
                _EXISTING_SALES,
                ([k[0] for k in missing], [k[1] for k in missing], [k[2] for k in missing]),
            )
            stored = {(tid, stan, date): rrn for rrn, tid, stan, date in cur.fetchall()}
            if len(stored) != len(missing):
                raise RuntimeError("a sale refused as a duplicate has no stored original")
            return inserted, stored

    def sale_exists(self, tid: str, stan: str, local_date: str) -> bool:
        """Whether the duplicate key (tid, stan, local_date) already has a sale."""
        with self._transaction() as cur:
            row = cur.execute(
                "SELECT 1 FROM sales WHERE tid = %s AND stan = %s AND local_date = %s",
                (tid, stan, local_date),
            ).fetchone()
        return row is not None

    def find_sale(self, tid: str, stan: str, transmission: str) -> StoredSale | None:
        """The sale a reversal names: same terminal, original STAN and original field 7 (the
        latest such sale, should a STAN and field 7 ever repeat a year later)."""
        with self._transaction() as cur:
            row = cur.execute(
                SALE_SELECT + "WHERE s.tid = %s AND s.stan = %s AND s.transmission = %s "
                "ORDER BY s.rrn DESC LIMIT 1",
                (tid, stan, transmission),
            ).fetchone()
        return None if row is None else stored_sale(row)

    def reverse_sale(self, rrn: str) -> bool:
        """Mark the sale reversed; False if it was already reversed or does not exist
        (idempotent)."""
        if not (rrn.isdigit() and rrn.isascii()):
            return False
        with self._transaction() as cur:
            cur.execute(
                "UPDATE sales SET status = 'reversed', reversed_at = %s "
                "WHERE rrn = %s AND status = 'approved'",
                (time.time(), int(rrn)),
            )
            return cur.rowcount == 1

    def sales(self, tid: str) -> list[StoredSale]:
        """Every sale of the terminal, in RRN order."""
        with self._transaction() as cur:
            rows = cur.execute(SALE_SELECT + "WHERE s.tid = %s ORDER BY s.rrn", (tid,)).fetchall()
        return [stored_sale(row) for row in rows]


class _AnnouncingTx(SQLTx):
    """``SQLTx`` that remembers the terminals whose settlement-account versions it wrote,
    whichever function of ``acqhost.domain.rebind`` did (activation names no terminal up front)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.changed: set[str] = set()

    def insert_version(self, v: AccountVersion) -> None:
        super().insert_version(v)
        self.changed.add(v.tid)

    def set_version_state(
        self, tid: str, version: int, from_states: Sequence[str], state: str, effective_from: float
    ) -> bool:
        moved = super().set_version_state(tid, version, from_states, state, effective_from)
        if moved:
            self.changed.add(tid)
        return moved


def _tx_on(cur: psycopg.Cursor[tuple[Any, ...]], write: bool) -> _AnnouncingTx:
    """The rebind flow's view of the transaction ``cur`` is in; a writer's audit appends
    take the advisory lock that gives the audit chain one order."""

    def execute(sql: str, params: tuple[Any, ...]) -> psycopg.Cursor[tuple[Any, ...]]:
        return cur.execute(_placeholders(sql), params)

    lock = f"SELECT pg_advisory_xact_lock({AUDIT_LOCK})" if write else None
    return _AnnouncingTx(execute, write=write, lock_audit=lock)


def _notify(cur: psycopg.Cursor[tuple[Any, ...]], kind: str, tids: Iterable[str]) -> None:
    """Announce, at commit, that ``kind`` of these terminals changed (see the module doc)."""
    cur.execute(_NOTIFY, (CHANNEL, kind, sorted(tids)))


@functools.cache
def _placeholders(sql: str) -> str:
    """The shared SQL's ``?`` placeholders as psycopg's ``%s`` (once per statement text)."""
    return sql.replace("?", "%s")
