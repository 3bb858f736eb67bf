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
from typing import Any

from acqhost.errors import StoreOpenError, StoreUnavailable
from acqhost.store.base import SaleRecord
from acqhost.store.migrations import sqlite as migrations
from acqhost.store.sql import INSERT_SALE, SQLITE, SQLTx
from acqhost.store.sqlstore import SQLStore

__all__ = ("QUEUE_POLL_SECONDS", "QUEUE_SECONDS", "SQLiteStore", "SQLiteTx")

# How long a queued writer waits for its turn: SQLite's own busy timeout.
QUEUE_SECONDS = 5.0
# How often a waiting writer tries again: a tenth of a millisecond, ~1/10 of the commit it
# waits for (a blocking lock would wake sooner, but could not give up).
QUEUE_POLL_SECONDS = 0.0001


# SQLITE_FULL (the disk, or the file size this process may write, is exhausted) and
# SQLITE_IOERR (a write or fsync failed): the transaction is rolled back whole, the file is
# as it was, and the next one may succeed once space returns.
_UNAVAILABLE = (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR)


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


class SQLiteTx(SQLTx):
    """``SQLTx`` on a SQLite connection: sales are inserted one statement each, which is
    cheap in process and tells each one's fate by its rowcount and rowid (its RRN)."""

    __slots__ = ()

    dialect = SQLITE
    _execute: Callable[[str, tuple[Any, ...]], sqlite3.Cursor]  # the connection's own

    def _insert_sales(self, sales: Sequence[SaleRecord]) -> list[int | None]:
        rrns: list[int | None] = []
        append = rrns.append
        execute = self._execute
        for sale in sales:
            cursor = execute(
                INSERT_SALE,
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
                    sale.tid,
                    sale.batch_no,
                    sale.received_at,
                ),
            )
            append(cursor.lastrowid if cursor.rowcount == 1 else None)
        return rrns


class SQLiteStore(SQLStore):
    """``Store`` on one SQLite file (created, or upgraded to the latest schema, on open).

    Use one instance per thread at a time; every process or worker thread that writes opens its
    own instance on the same file.
    """

    def __init__(self, path: str | Path) -> None:
        # check_same_thread=False: an instance may be created in one thread and then used
        # (one thread at a time) by a worker thread, such as the group committer.
        try:
            _create_private(path)
            conn = sqlite3.connect(
                str(path), isolation_level=None, check_same_thread=False, timeout=5.0
            )
        except sqlite3.Error as exc:  # a directory that does not exist, a path not allowed
            raise StoreOpenError(f"cannot open SQLite store {path}: {exc}") from None
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise StoreOpenError(f"cannot open SQLite store {path}: {why}") from None
        try:
            try:
                conn.execute("PRAGMA busy_timeout = 5000")
                conn.execute("PRAGMA journal_mode = WAL")
            except sqlite3.DatabaseError as exc:  # "file is not a database" and the like
                raise StoreOpenError(f"cannot open SQLite store {path}: {exc}") from None
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            migrations.migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self.path = str(path)
        self._queue_fd: int | None = None
        # Autocommit: each of the store's reads is a transaction of its own. Transactions run
        # through one SQLiteTx each for reading and writing (it keeps no state of its own).
        self._reader = SQLiteTx(conn.execute, write=False)
        self._writer = SQLiteTx(conn.execute, write=True)

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
    def _write(self) -> Iterator[SQLTx]:
        """One write transaction, holding the file's write lock from its start (which
        serialises it with every writer, of any terminal); a constraint violation becomes
        ValueError (the caller's input)."""
        conn = self._conn
        queue = self._queue_fd
        if queue is not None:
            _take_turn(queue)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._writer
                conn.execute("COMMIT")
            except sqlite3.IntegrityError as error:
                self._rollback()
                raise ValueError(f"rejected by the store: {error}") from error
            except sqlite3.OperationalError as error:
                self._rollback()
                if error.sqlite_errorcode & 0xFF in _UNAVAILABLE:
                    raise StoreUnavailable(
                        f"SQLite store {self.path}: {error} ({error.sqlite_errorname})"
                    ) from error
                raise
            except BaseException:
                self._rollback()
                raise
        finally:
            if queue is not None:
                fcntl.flock(queue, fcntl.LOCK_UN)

    @contextmanager
    def _snapshot(self) -> Iterator[SQLTx]:
        """A read transaction: one snapshot (from its first read), never waiting for the
        writer."""
        conn = self._conn
        conn.execute("BEGIN")
        try:
            yield self._reader
        finally:
            self._rollback()

    def _rollback(self) -> None:
        # SQLite may already have rolled back on its own (e.g. a full disk).
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")


def _create_private(path: str | Path) -> None:
    """Create a new store file with mode 0600 (SQLite gives its WAL and shared-memory files
    the database file's mode): sales, holder names and sealed secrets are no one else's to
    read, whatever the umask. An existing file keeps the mode its operator gave it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)
