"""The statements of batches and settlement (PROTOCOL.md 5.4), once for both SQL dialects: the
open batch, its totals per settlement-account version, closing it and opening the next, and
what closed batches settled (the settlement report).

:class:`BatchStatements` is part of ``acqhost.store.sql.SQLTx`` (kept in a module of its own
for its size); it runs its statements through that class's ``_one``, ``_all`` and
``_execute`` and reads the dialect's row lock from its ``dialect``.

Locking. A settlement reads the open batch with ``for_update`` (PostgreSQL's ``FOR UPDATE``)
before it reads the batch's totals: sales and reversals of that batch, which read it ``FOR KEY
SHARE``, wait for the settlement to end (and then find it closed), and the settlement waits for
those begun before it to commit, so its totals count them. On SQLite the one write lock
already puts every writer in one order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol

from acqhost.store.base import Batch, BatchTotal, SettlementLine

__all__ = ("BATCH_COLUMNS", "BATCH_TOTALS", "BatchStatements", "Changed", "RowLock")

BATCH_COLUMNS = "tid, batch_no, status, opened_at, closed_at"
# A batch's totals (migration 7): parameters tid, batch_no, tid, batch_no.
BATCH_TOTALS = (
    "SELECT account_version, sold, total FROM open_totals WHERE tid = ? AND batch_no = ? "
    "AND sold > 0 UNION ALL SELECT account_version, sold, total FROM settled_totals "
    "WHERE tid = ? AND batch_no = ? AND sold > 0 ORDER BY account_version"
)


class RowLock(Protocol):
    """What these statements need of a dialect."""

    @property
    def for_update(self) -> str:
        """Appended to a read of rows about to change; "" where writers are already ordered."""


class Changed(Protocol):
    """What these statements read of a write's result."""

    @property
    def rowcount(self) -> int: ...


class BatchStatements:
    """``StoreTx``'s batch and settlement statements (a part of ``SQLTx``)."""

    __slots__ = ()

    dialect: ClassVar[RowLock]
    _writing: bool
    _execute: Callable[[str, tuple[Any, ...]], Changed]

    def _one(self, sql: str, params: tuple[Any, ...]) -> Any:
        raise NotImplementedError

    def _all(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        raise NotImplementedError

    def open_batch(self, tid: str) -> Batch | None:
        """The terminal's open batch; None if it has none. In a write transaction it is locked
        until the transaction ends (see the module's doc)."""
        sql = f"SELECT {BATCH_COLUMNS} FROM batches WHERE tid = ? AND status = 'open'"
        if not self._writing:
            row = self._one(sql, (tid,))
            return None if row is None else Batch(*row)
        lock = self.dialect.for_update
        row = self._one(sql + lock, (tid,))
        if row is None and lock:
            # READ COMMITTED: when the batch was closed by the writer this waited for, the
            # batch that writer opened is seen only by a statement begun after it committed.
            row = self._one(sql + lock, (tid,))
        return None if row is None else Batch(*row)

    def batch(self, tid: str, batch_no: int) -> Batch | None:
        row = self._one(
            f"SELECT {BATCH_COLUMNS} FROM batches WHERE tid = ? AND batch_no = ?", (tid, batch_no)
        )
        return None if row is None else Batch(*row)

    def batch_totals(self, tid: str, batch_no: int) -> list[BatchTotal]:
        """Approved (unreversed) sales of the batch, test sales too, per account version: the
        totals the store keeps as it records and reverses sales (migration 7's triggers), in
        open_totals while the batch is open, in settled_totals once it is closed."""
        rows = self._all(BATCH_TOTALS, (tid, batch_no, tid, batch_no))
        return [BatchTotal(int(v), int(c), int(a)) for v, c, a in rows]

    def close_batch(self, tid: str, batch_no: int, at: float) -> Batch:
        """Close the open batch ``batch_no`` and open the next; the batch opened. ValueError
        if ``batch_no`` is not the terminal's open batch."""
        cursor = self._execute(
            "UPDATE batches SET status = 'closed', closed_at = ? "
            "WHERE tid = ? AND batch_no = ? AND status = 'open'",
            (at, tid, batch_no),
        )
        if cursor.rowcount != 1:
            raise ValueError(f"batch {batch_no} of {tid} is not open")
        # After the close: at most one batch of a terminal is open (a unique index).
        self._execute(
            "INSERT INTO batches (tid, batch_no, status, opened_at) VALUES (?, ?, 'open', ?)",
            (tid, batch_no + 1, at),
        )
        return Batch(tid, batch_no + 1, "open", at, None)

    def settled(
        self,
        tid: str | None = None,
        batch_no: int | None = None,
        closed_from: float | None = None,
        closed_before: float | None = None,
    ) -> list[SettlementLine]:
        """One line per closed batch and settlement-account version with approved sales,
        optionally of one terminal, one batch number, or batches closed in [closed_from,
        closed_before); by tid (byte order), batch and version."""
        where, params = ["b.status = 'closed'", "g.sold > 0"], []
        for condition, value in (
            ("g.tid = ?", tid),
            ("g.batch_no = ?", batch_no),
            ("b.closed_at >= ?", closed_from),
            ("b.closed_at < ?", closed_before),
        ):
            if value is not None:
                where.append(condition)
                params.append(value)
        # The totals each closed batch settled, kept as its sales were recorded (migration 7):
        # a row a batch and version, not a read of the batch's sales.
        rows = self._all(
            "SELECT g.tid, t.mid, g.batch_no, b.closed_at, g.account_version, a.sealed_account, "
            "a.account_masked, a.holder, a.bank_code, g.sold, g.total "
            "FROM settled_totals AS g "
            "JOIN batches AS b ON b.tid = g.tid AND b.batch_no = g.batch_no "
            "JOIN terminals AS t ON t.tid = g.tid "
            "JOIN settlement_accounts AS a ON a.tid = g.tid AND a.version = g.account_version "
            f"WHERE {' AND '.join(where)}",
            tuple(params),
        )
        lines = [
            SettlementLine(tid, mid, int(n), float(closed), int(version), bytes(sealed), masked,
                           holder, bank, int(count), int(amount))
            for tid, mid, n, closed, version, sealed, masked, holder, bank, count, amount in rows
        ]  # fmt: skip
        # Sorted here, not by the database's collation: Python compares str by code point,
        # which is the byte order of UTF-8 on both backends.
        lines.sort(key=lambda line: (line.tid, line.batch_no, line.account_version))
        return lines
