"""The ``Store`` methods, written once for both SQL backends.

Each method is one transaction of the backend's (``SQLiteStore``, ``PostgresStore``) running
the statements of ``acqhost.store.sql``; the backend says how a transaction begins, ends and
locks, and how a read that is not inside one runs. Validation the database cannot do (a
status outside its list, an operator of another terminal) happens here, before any
transaction begins.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager

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
    in_force,
)
from acqhost.store.sql import SQLTx

__all__ = ("SQLStore",)


class SQLStore(ABC):
    """``Store`` over a backend's transactions.

    A backend provides :meth:`_write` (one write transaction: committed when its block ends,
    rolled back if it raises, a constraint violation raised as ValueError), :meth:`_snapshot`
    (one read-only transaction seeing one snapshot), ``_reader`` (an ``SQLTx`` whose every
    statement is a transaction of its own, for the single-statement reads) and :meth:`close`.
    """

    _reader: SQLTx

    @abstractmethod
    def close(self) -> None:
        """Close the connection (idempotent)."""

    @abstractmethod
    def _write(self) -> AbstractContextManager[SQLTx]: ...

    @abstractmethod
    def _snapshot(self) -> AbstractContextManager[SQLTx]: ...

    @contextmanager
    def transaction(self, tid: str | None = None, *, write: bool = True) -> Iterator[StoreTx]:
        """One transaction for the rebind flow, committed when the block ends normally and
        rolled back if it raises. A write transaction naming ``tid`` is serialised with every
        other one naming it, across processes; ``write=False`` reads one snapshot and never
        waits for a writer."""
        if not write:
            with self._snapshot() as tx:
                yield tx
            return
        with self._write() as tx:
            if tid is not None:
                tx.lock_terminal(tid)
            yield tx

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
        _check_new_terminal(terminal, operator)
        with self._write() as tx:
            tx.insert_terminal(terminal, account, operator)
            if then is not None:
                then(tx)

    def get_terminal(self, tid: str) -> Terminal | None:
        """The terminal, or None."""
        return self._reader.terminal(tid)

    def list_terminals(self) -> list[Terminal]:
        """Every terminal, by tid (in byte order)."""
        return self._reader.terminals()

    def set_terminal_status(self, tid: str, status: str) -> bool:
        """Set "active" or "disabled"; False if there is no such terminal."""
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"terminal status must be active or disabled: {status!r}")
        with self._write() as tx:
            return tx.set_terminal_status(tid, status)

    # -- sessions --------------------------------------------------------------------------
    def save_session(self, session: Session) -> None:
        """Insert or replace the terminal's session (a new sign-on replaces the old keys)."""
        with self._write() as tx:
            tx.save_session(session)

    def get_session(self, tid: str) -> Session | None:
        """The terminal's session, or None when it is not signed on."""
        return self._reader.session(tid)

    def drop_session(self, tid: str) -> None:
        """Forget the terminal's session keys (sign-off); no error if there are none."""
        with self._write() as tx:
            tx.drop_session(tid)

    # -- settlement accounts ---------------------------------------------------------------
    def current_account(self, tid: str, now: float) -> AccountVersion | None:
        """The version in force at ``now`` (``acqhost.store.base.in_force`` of its versions)."""
        return in_force(self._reader.versions(tid), now)

    def account_history(self, tid: str) -> list[AccountVersion]:
        """Every version of the terminal's settlement account, oldest first."""
        return self._reader.versions(tid)

    # -- ledger ----------------------------------------------------------------------------
    def open_batch(self, tid: str) -> int:
        """The terminal's open batch number; KeyError if the terminal has none."""
        batch = self._reader.open_batch(tid)
        if batch is None:
            raise KeyError(tid)
        return batch.batch_no

    def record_sales(
        self,
        sales: Sequence[SaleRecord],
        then: Callable[[StoreTx, list[SaleResult]], None] | None = None,
    ) -> list[SaleResult]:
        """Insert many approved sales in ONE transaction (one commit), in order.

        A sale whose (tid, stan, local_date) is already stored, or repeated earlier in
        ``sales``, is not inserted: it gets duplicate=True and the RRN of the sale stored under
        that key. Others get their new RRN. ValueError (and nothing inserted) if a sale names an
        unknown terminal, batch or account version. ``then(tx, results)`` runs in the same
        transaction; if it raises, nothing is recorded.
        """
        if not sales:
            return []
        with self._write() as tx:
            results = tx.record_sales(sales)
            if then is not None:
                then(tx, results)
            return results

    def sale_exists(self, tid: str, stan: str, local_date: str) -> bool:
        """Whether the duplicate key (tid, stan, local_date) already has a sale."""
        return self._reader.sale_exists(tid, stan, local_date)

    def find_sale(self, tid: str, stan: str, transmission: str) -> StoredSale | None:
        """The sale a reversal names: same terminal, original STAN and original field 7 (the
        latest such sale, should a STAN and field 7 ever repeat a year later)."""
        return self._reader.find_sale(tid, stan, transmission)

    def reverse_sale(self, rrn: str) -> bool:
        """Mark the sale reversed; False if it was already reversed, does not exist or its batch
        is closed (idempotent)."""
        if not (rrn.isdigit() and rrn.isascii()):
            return False
        with self._write() as tx:
            return tx.reverse_sale(int(rrn), time.time())

    def sales(self, tid: str) -> list[StoredSale]:
        """Every sale of the terminal, in RRN order."""
        return self._reader.sales(tid)


def _check_new_terminal(terminal: Terminal, operator: Operator | None) -> None:
    """ValueError for a registration no backend may store."""
    if terminal.status not in TERMINAL_STATUSES:
        raise ValueError(f"terminal status must be active or disabled: {terminal.status!r}")
    if operator is not None and operator.tid != terminal.tid:
        raise ValueError("the operator belongs to another terminal")
