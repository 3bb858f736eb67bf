"""The default store: one SQLite file, shared by every host process on the machine.

WAL lets readers run beside the one writer; ``synchronous=FULL`` makes every COMMIT durable (an
approved sale must survive a power cut before its 0210 leaves); ``busy_timeout`` lets processes
queue for the write lock instead of failing. The connection runs in autocommit mode and each
write method is exactly one explicit ``BEGIN IMMEDIATE`` ... ``COMMIT`` transaction: taking the
write lock up front means a transaction never has to upgrade a read lock and fail half-way.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

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
from acqhost.store.migrations import sqlite as migrations
from acqhost.store.sql import (
    ACCOUNT_COLUMNS,
    SALE_SELECT,
    TERMINAL_COLUMNS,
    SQLTx,
    account_v1_params,
    check_new_terminal,
    operator_params,
    stored_sale,
    terminal_params,
)

__all__ = ("SQLiteStore",)

_INSERT_SALE = (
    "INSERT INTO sales (tid, mid, stan, local_date, local_time, transmission, amount, currency, "
    "pan_masked, auth_code, test, account_version, batch_no, received_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (tid, stan, local_date) DO NOTHING"
)


# How long a queued writer waits for its turn: SQLite's own busy timeout.
QUEUE_SECONDS = 5.0
# How often a waiting writer tries again: a tenth of a millisecond, ~1/10 of the commit it
# waits for (a blocking lock would wake sooner, but could not give up).
QUEUE_POLL_SECONDS = 0.0001


def _take_turn(fd: int) -> None:
    """Lock the writers' queue file ``fd`` (closing it, or the process ending, unlocks it).

    Polled rather than blocking, so that a writer stuck in its turn (a stopped process)
    makes the others fail their writes after QUEUE_SECONDS, as SQLite's lock would, instead
    of waiting for ever. Tries backing off from 0.1 to 1 ms measured worse with two workers
    (31-34k sales/s against 37-41k, half-rate p99 9-19 ms against 5-6): the wait is short
    and noticing its end is what matters."""
    deadline = 0.0
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            now = time.monotonic()
            if not deadline:
                deadline = now + QUEUE_SECONDS
            elif now >= deadline:
                raise sqlite3.OperationalError(
                    f"database is locked: no turn in the writers' queue in {QUEUE_SECONDS:g} s"
                ) from None
        time.sleep(QUEUE_POLL_SECONDS)


class SQLiteStore:
    """``Store`` on one SQLite file (created, or upgraded to the latest schema, on open).

    Use one instance per thread at a time; every process or worker thread that writes opens its
    own instance on the same file.
    """

    def __init__(self, path: str | Path) -> None:
        # check_same_thread=False: an instance may be created in one thread and then used
        # (one thread at a time) by a worker thread, such as the group committer.
        conn = sqlite3.connect(
            str(path), isolation_level=None, check_same_thread=False, timeout=5.0
        )
        try:
            conn.execute("PRAGMA busy_timeout = 5000")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            migrations.migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self.path = str(path)
        self._queue_fd: int | None = None

    def queue_writers(self) -> None:
        """Make this connection's write transactions wait their turn on an OS file lock
        (``<db>.writers``) before taking SQLite's. Writers that all do this (the ledgers of
        ``--workers N`` host processes on one file) get their turn within 0.1 ms of the one
        before them committing (``_take_turn``), where SQLite's own busy handler sleeps and
        retries, up to 100 ms a time."""
        if self._queue_fd is None:
            self._queue_fd = os.open(f"{self.path}.writers", os.O_RDWR | os.O_CREAT, 0o600)

    # -- host ------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._conn.close()
        if self._queue_fd is not None:
            os.close(self._queue_fd)
            self._queue_fd = None

    def schema_version(self) -> int:
        """The database's schema version (``PRAGMA user_version``)."""
        return migrations.user_version(self._conn)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; a constraint violation becomes ValueError (caller's input)."""
        conn = self._conn
        queue = self._queue_fd
        if queue is not None:
            _take_turn(queue)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except sqlite3.IntegrityError as error:
                self._rollback()
                raise ValueError(f"rejected by the store: {error}") from error
            except BaseException:
                self._rollback()
                raise
        finally:
            if queue is not None:
                fcntl.flock(queue, fcntl.LOCK_UN)

    @contextmanager
    def transaction(self, tid: str | None = None, *, write: bool = True) -> Iterator[StoreTx]:
        """One transaction for the rebind flow. A write transaction holds the file's write
        lock from its start (which serialises it with every writer, of any terminal); a read
        transaction sees one snapshot and never waits for the writer."""
        if write:
            with self._write() as conn:
                yield SQLTx(conn.execute, write=True)
            return
        conn = self._conn
        conn.execute("BEGIN")
        try:
            yield SQLTx(conn.execute, write=False)
        finally:
            self._rollback()

    def _rollback(self) -> None:
        # SQLite may already have rolled back on its own (e.g. a full disk).
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")

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
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM terminals WHERE tid = ?", (terminal.tid,)).fetchone():
                raise ValueError(f"terminal {terminal.tid!r} already exists")
            conn.execute(
                f"INSERT INTO terminals ({TERMINAL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                terminal_params(terminal),
            )
            conn.execute(
                f"INSERT INTO settlement_accounts ({ACCOUNT_COLUMNS}) "
                "VALUES (?, 1, ?, ?, ?, ?, ?, ?, 'ACTIVE', ?, ?, ?, ?)",
                account_v1_params(terminal.tid, account, now),
            )
            conn.execute(
                "INSERT INTO batches (tid, batch_no, status, opened_at) VALUES (?, 1, 'open', ?)",
                (terminal.tid, now),
            )
            if operator is not None:
                conn.execute(
                    "INSERT INTO operators (tid, operator_id, password_hash, failures) "
                    "VALUES (?, ?, ?, ?)",
                    operator_params(operator),
                )
            if then is not None:
                then(SQLTx(conn.execute, write=True))

    def get_terminal(self, tid: str) -> Terminal | None:
        """The terminal, or None."""
        row = self._conn.execute(
            f"SELECT {TERMINAL_COLUMNS} FROM terminals WHERE tid = ?", (tid,)
        ).fetchone()
        return None if row is None else Terminal(*row)

    def list_terminals(self) -> list[Terminal]:
        """Every terminal, by tid."""
        rows = self._conn.execute(f"SELECT {TERMINAL_COLUMNS} FROM terminals ORDER BY tid")
        return [Terminal(*row) for row in rows]

    def set_terminal_status(self, tid: str, status: str) -> bool:
        """Set "active" or "disabled"; False if there is no such terminal."""
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"terminal status must be active or disabled: {status!r}")
        with self._write() as conn:
            cursor = conn.execute("UPDATE terminals SET status = ? WHERE tid = ?", (status, tid))
        return cursor.rowcount == 1

    # -- sessions --------------------------------------------------------------------------
    def save_session(self, session: Session) -> None:
        """Insert or replace the terminal's session (a new sign-on replaces the old keys)."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO sessions (tid, sealed_rx, sealed_tx, signed_on_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (tid) DO UPDATE SET "
                "sealed_rx = excluded.sealed_rx, sealed_tx = excluded.sealed_tx, "
                "signed_on_at = excluded.signed_on_at",
                (session.tid, session.sealed_rx, session.sealed_tx, session.signed_on_at),
            )

    def get_session(self, tid: str) -> Session | None:
        """The terminal's session, or None when it is not signed on."""
        row = self._conn.execute(
            "SELECT tid, sealed_rx, sealed_tx, signed_on_at FROM sessions WHERE tid = ?", (tid,)
        ).fetchone()
        return None if row is None else Session(*row)

    def drop_session(self, tid: str) -> None:
        """Forget the terminal's session keys (sign-off); no error if there are none."""
        with self._write() as conn:
            conn.execute("DELETE FROM sessions WHERE tid = ?", (tid,))

    # -- settlement accounts ---------------------------------------------------------------
    def current_account(self, tid: str, now: float) -> AccountVersion | None:
        """The version in force at ``now`` (``acqhost.store.base.in_force`` of its versions)."""
        return in_force(self.account_history(tid), now)

    def account_history(self, tid: str) -> list[AccountVersion]:
        """Every version of the terminal's settlement account, oldest first."""
        rows = self._conn.execute(
            f"SELECT {ACCOUNT_COLUMNS} FROM settlement_accounts WHERE tid = ? ORDER BY version",
            (tid,),
        )
        return [AccountVersion(*row) for row in rows]

    # -- ledger ----------------------------------------------------------------------------
    def open_batch(self, tid: str) -> int:
        """The terminal's open batch number; KeyError if the terminal has none."""
        row = self._conn.execute(
            "SELECT batch_no FROM batches WHERE tid = ? AND status = 'open'", (tid,)
        ).fetchone()
        if row is None:
            raise KeyError(tid)
        return int(row[0])

    def record_sales(self, sales: Sequence[SaleRecord]) -> list[SaleResult]:
        """Insert many approved sales in ONE transaction (one fsync), in order.

        A sale whose (tid, stan, local_date) is already stored, or repeated earlier in
        ``sales``, is not inserted: it gets duplicate=True and the RRN of the sale stored under
        that key. Others get their new RRN. ValueError (and nothing inserted) if a sale names an
        unknown terminal, batch or account version.
        """
        if not sales:
            return []
        results: list[SaleResult] = []
        append = results.append
        with self._write() as conn:
            execute = conn.execute
            for sale in sales:
                cursor = execute(
                    _INSERT_SALE,
                    (
                        sale.tid,
                        sale.mid,
                        sale.stan,
                        sale.local_date,
                        sale.local_time,
                        sale.transmission,
                        sale.amount,
                        sale.currency,
                        sale.pan_masked,
                        sale.auth_code,
                        1 if sale.test else 0,
                        sale.account_version,
                        sale.batch_no,
                        sale.received_at,
                    ),
                )
                if cursor.rowcount == 1:
                    append(SaleResult(format_rrn(cursor.lastrowid or 0), False))
                else:
                    row = execute(
                        "SELECT rrn FROM sales WHERE tid = ? AND stan = ? AND local_date = ?",
                        (sale.tid, sale.stan, sale.local_date),
                    ).fetchone()
                    append(SaleResult(format_rrn(row[0]), True))
        return results

    def sale_exists(self, tid: str, stan: str, local_date: str) -> bool:
        """Whether the duplicate key (tid, stan, local_date) already has a sale."""
        row = self._conn.execute(
            "SELECT 1 FROM sales WHERE tid = ? AND stan = ? AND local_date = ?",
            (tid, stan, local_date),
        ).fetchone()
        return row is not None

    def find_sale(self, tid: str, stan: str, transmission: str) -> StoredSale | None:
        """The sale a reversal names: same terminal, original STAN and original field 7 (the
        latest such sale, should a STAN and field 7 ever repeat a year later)."""
        row = self._conn.execute(
            SALE_SELECT + "WHERE s.tid = ? AND s.stan = ? AND s.transmission = ? "
            "ORDER BY s.rrn DESC LIMIT 1",
            (tid, stan, transmission),
        ).fetchone()
        return None if row is None else stored_sale(row)

    def reverse_sale(self, rrn: str) -> bool:
        """Mark the sale reversed; False if it was already reversed or does not exist
        (idempotent)."""
        if not (rrn.isdigit() and rrn.isascii()):
            return False
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE sales SET status = 'reversed', reversed_at = ? "
                "WHERE rrn = ? AND status = 'approved'",
                (time.time(), int(rrn)),
            )
        return cursor.rowcount == 1

    def sales(self, tid: str) -> list[StoredSale]:
        """Every sale of the terminal, in RRN order."""
        rows = self._conn.execute(SALE_SELECT + "WHERE s.tid = ? ORDER BY s.rrn", (tid,))
        return [stored_sale(row) for row in rows]
