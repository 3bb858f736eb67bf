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
    ADVICE_STATES,
    TERMINAL_STATUSES,
    AccountVersion,
    BankLease,
    BankStatus,
    NewAccount,
    Operator,
    SaleRecord,
    SaleResult,
    Session,
    StoredAdvice,
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

    def accept_signon(
        self, session: Session, transmission: str, stan: str, forget_before: float
    ) -> bool:
        """Store the session of the terminal's sign-on with field 7 ``transmission`` and STAN
        ``stan``, remembering that sign-on, in one transaction; False, and nothing changed, if
        it was accepted before (a replay). The terminal's sign-ons accepted before
        ``forget_before`` are forgotten."""
        with self._write() as tx:
            if not tx.insert_signon(session.tid, transmission, stan, session.signed_on_at):
                return False
            tx.save_session(session)
            tx.forget_signons(session.tid, forget_before)
            return True

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

    # -- the outbox of settlement updates (acqhost.store.outbox) -----------------------------
    def advices(self, tid: str | None = None, state: str | None = None) -> list[StoredAdvice]:
        """Advices in the order they were queued, optionally of one terminal and/or state."""
        if state is not None and state not in ADVICE_STATES:
            raise ValueError(f"advice state must be one of {', '.join(ADVICE_STATES)}: {state!r}")
        return self._reader.advices(tid, state)

    def claim_advices(
        self,
        bank_codes: Sequence[str],
        now: float,
        hold: float,
        limit: int = 100,
        terminals: Sequence[str] = (),
    ) -> list[StoredAdvice]:
        """Up to ``limit`` deliverable advices of ``bank_codes`` or ``terminals``, oldest
        first, each held for its claimer until ``now + hold`` (see Store.claim_advices)."""
        if hold <= 0 or limit < 1:
            raise ValueError("a claim holds its advices for a while, and takes at least one")
        if not bank_codes and not terminals:
            return []
        with self._write() as tx:
            return tx.claim_advices(
                sorted(set(bank_codes)), now, now + hold, limit, sorted(set(terminals))
            )

    def mark_delivered(self, advice_id: int, ack_code: str, now: float) -> bool:
        """The bank acknowledged the advice; False if it is not queued."""
        with self._write() as tx:
            return tx.mark_delivered(advice_id, ack_code, now)

    def mark_failed(self, advice_id: int, error: str, next_attempt_at: float, now: float) -> bool:
        """A delivery failed: one more attempt, the error and when to try again; False if the
        advice is not queued."""
        with self._write() as tx:
            return tx.mark_failed(advice_id, error, next_attempt_at, now)

    def dead_letter(self, advice_id: int, reason: str, now: float) -> bool:
        """Give up on a queued advice; False if it is not queued."""
        with self._write() as tx:
            return tx.dead_letter(advice_id, reason, now)

    def retry_advice(self, advice_id: int, now: float) -> bool:
        """Queue a dead or waiting advice again, deliverable at once; False if it is delivered
        or unknown."""
        with self._write() as tx:
            return tx.retry_advice(advice_id, now)

    def retry_dead_advices(self, now: float, bank_codes: Sequence[str] | None = None) -> int:
        """Queue again every dead advice (of ``bank_codes``, if given); how many."""
        if bank_codes is not None and not bank_codes:
            return 0
        with self._write() as tx:
            return tx.retry_dead_advices(now, bank_codes)

    def outbox_status(self) -> list[BankStatus]:
        """One entry per bank code with undelivered advices, by bank code."""
        with self._snapshot() as tx:
            return tx.outbox_status()

    def acquire_bank_lease(self, bank: str, owner: str, now: float, ttl: float) -> bool:
        """Hold ``bank``'s lease until ``now + ttl`` unless another holds it unexpired."""
        _check_lease(owner, ttl)
        with self._write() as tx:
            return tx.acquire_bank_lease(bank, owner, now, now + ttl)

    def renew_bank_lease(self, bank: str, owner: str, now: float, ttl: float) -> bool:
        """Extend ``owner``'s unexpired lease to ``now + ttl``; False once it is lost."""
        _check_lease(owner, ttl)
        with self._write() as tx:
            return tx.renew_bank_lease(bank, owner, now, now + ttl)

    def release_bank_lease(self, bank: str, owner: str) -> bool:
        """Give the lease up if ``owner`` holds it; whether it did."""
        with self._write() as tx:
            return tx.release_bank_lease(bank, owner)

    def bank_lease(self, bank: str) -> BankLease | None:
        """The bank's lease as recorded (perhaps expired), or None."""
        return self._reader.bank_lease(bank)


def _check_lease(owner: str, ttl: float) -> None:
    """ValueError for a lease nobody could tell apart from another's, or one that never
    holds: a lease's owner names one process (say host name, process id and a random part)."""
    if not owner:
        raise ValueError("a bank lease needs its owner's name")
    if not ttl > 0:
        raise ValueError(f"a bank lease lasts a positive time, not {ttl!r}")


def _check_new_terminal(terminal: Terminal, operator: Operator | None) -> None:
    """ValueError for a registration no backend may store."""
    if terminal.status not in TERMINAL_STATUSES:
        raise ValueError(f"terminal status must be active or disabled: {terminal.status!r}")
    if operator is not None and operator.tid != terminal.tid:
        raise ValueError("the operator belongs to another terminal")
