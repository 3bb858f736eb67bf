"""The store interface: what the host, the CLI and the server need from durable storage (the
records it keeps are ``acqhost.store.records``, re-exported here).

SQLite (``acqhost.store.sqlite``) is the default; a PostgreSQL backend implements the same
protocol. Secrets never reach the store in clear: session keys and account numbers arrive
already sealed (``acqhost.domain.crypto``) and leave sealed; the store keeps masked forms and keyed
hashes for display and equality.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Protocol

from acqhost.store.outbox import ADVICE_STATES, BankLease, BankStatus, NewAdvice, StoredAdvice
from acqhost.store.records import (
    ACCOUNT_STATES,
    IN_FORCE_STATES,
    OPEN_REBIND_STATES,
    TERMINAL_STATUSES,
    AccountVersion,
    AuditEntry,
    Batch,
    BatchTotal,
    NewAccount,
    Operator,
    RebindRequest,
    SaleRecord,
    SaleResult,
    SchemaVersionError,
    Session,
    SettlementLine,
    StoredSale,
    Terminal,
    format_rrn,
    in_force,
    next_change,
)

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
    "Batch",
    "BatchTotal",
    "NewAccount",
    "NewAdvice",
    "Operator",
    "RebindRequest",
    "SaleRecord",
    "SaleResult",
    "SchemaVersionError",
    "Session",
    "SettlementLine",
    "Store",
    "StoreTx",
    "StoredAdvice",
    "StoredSale",
    "Terminal",
    "format_rrn",
    "in_force",
    "next_change",
)


class StoreTx(Protocol):
    """What the rebind flow reads and writes inside ONE store transaction
    (:meth:`Store.transaction`). Business outcomes are decided by ``acqhost.domain.rebind``
    from what these return; the store only keeps its constraints (one open request per terminal, no
    rewritten history)."""

    def terminal(self, tid: str) -> Terminal | None: ...

    def operator(self, tid: str, operator_id: str) -> Operator | None: ...

    def set_operator_failures(self, tid: str, operator_id: str, failures: int) -> None: ...

    def versions(self, tid: str) -> list[AccountVersion]:
        """Every version of the terminal's account, oldest first."""

    def insert_version(self, version: AccountVersion) -> None: ...

    def set_version_state(
        self, tid: str, version: int, from_states: Sequence[str], state: str, effective_from: float
    ) -> bool:
        """Move a version to ``state`` if it is in one of ``from_states``; False otherwise
        (another process got there first)."""

    def request(self, rf: str) -> RebindRequest | None: ...

    def request_for_message(self, tid: str, stan: str, transmission: str) -> RebindRequest | None:
        """The request a 0300 with these fields 41, 11 and 7 created (a retransmission)."""

    def latest_request(self, tid: str) -> RebindRequest | None: ...

    def requests(self, state: str | None = None, tid: str | None = None) -> list[RebindRequest]:
        """Requests, oldest first, optionally of one state and/or one terminal."""

    def insert_request(self, request: RebindRequest) -> None:
        """ValueError if the terminal already has an open request (or the RF exists)."""

    def decide_request(self, rf: str, decided_by: str, decided_at: float, note: str) -> None: ...

    def due_versions(self, now: float) -> list[AccountVersion]:
        """APPROVED versions, of every terminal, whose effective_from <= now."""

    def has_test_sale(self, tid: str, version: int) -> bool:
        """Whether an approved test sale settles to this version."""

    def record_sales(self, sales: Sequence[SaleRecord]) -> list[SaleResult]:
        """:meth:`Store.record_sales` inside this transaction (same duplicates, same RRNs), so
        that a test sale and the state change it brings commit together, or neither does. A
        sale the store refuses (unknown terminal, batch or account version) loses the whole
        transaction: the block ends in ValueError."""

    def last_audit(self) -> AuditEntry | None:
        """The newest audit entry; in a write transaction, appends wait for this one to end."""

    def insert_audit(self, entry: AuditEntry) -> None: ...

    def audit_entries(self) -> list[AuditEntry]:
        """The whole audit log, in order."""

    def audit_entry(self, tid: str, action: str, subject: str) -> AuditEntry | None:
        """The newest audit entry of this terminal, action and subject."""

    def open_batch(self, tid: str) -> Batch | None:
        """The terminal's open batch. In a write transaction it is locked until the transaction
        ends: sales and reversals of it wait (a settlement is about to close it), and so does
        another transaction's ``open_batch``."""

    def batch(self, tid: str, batch_no: int) -> Batch | None: ...

    def batch_totals(self, tid: str, batch_no: int) -> list[BatchTotal]:
        """The batch's approved, unreversed sales (test sales too) per settlement-account
        version, by version."""

    def close_batch(self, tid: str, batch_no: int, at: float) -> Batch:
        """Close the terminal's open batch ``batch_no`` at ``at`` and open the next number;
        the batch opened. ValueError if ``batch_no`` is not the open batch."""

    def settled(
        self,
        tid: str | None = None,
        batch_no: int | None = None,
        closed_from: float | None = None,
        closed_before: float | None = None,
    ) -> list[SettlementLine]:
        """What closed batches settled, one line per terminal, batch and settlement-account
        version with sales, optionally of one terminal, one batch number, and batches closed
        in [closed_from, closed_before); ordered by tid (byte order), batch, version."""

    def insert_advice(self, advice: NewAdvice) -> int:
        """Queue ``advice`` (deliverable at once) in this transaction; its id, which orders it
        after every advice of its terminal already committed."""

    def mark_delivered(self, advice_id: int, ack_code: str, now: float) -> bool:
        """``Store.mark_delivered`` in this transaction (a dispatcher records the answers to
        one round of advices together)."""

    def mark_failed(self, advice_id: int, error: str, next_attempt_at: float, now: float) -> bool:
        """``Store.mark_failed`` in this transaction."""

    def dead_letter(self, advice_id: int, reason: str, now: float) -> bool:
        """``Store.dead_letter`` in this transaction."""


class Store(Protocol):
    """Synchronous store. Each method is one transaction. Implementations are safe to call
    from one thread at a time per instance; the server gives the group committer its own
    instance (its own connection) in a worker thread."""

    # -- host ------------------------------------------------------------------------------
    def close(self) -> None: ...

    # -- terminals -------------------------------------------------------------------------
    def add_terminal(
        self,
        terminal: Terminal,
        account: NewAccount,
        operator: Operator | None,
        then: Callable[[StoreTx], None] | None = None,
    ) -> None:
        """Register a terminal with settlement account version 1 (ACTIVE, effective now) and
        batch 1 open. ValueError if the tid exists. ``then`` runs in the same transaction,
        after (the audit log's registration entry): if it raises, nothing is registered."""

    def get_terminal(self, tid: str) -> Terminal | None: ...

    def list_terminals(self) -> list[Terminal]: ...

    def set_terminal_status(self, tid: str, status: str) -> bool:
        """False if there is no such terminal."""

    # -- sessions --------------------------------------------------------------------------
    def save_session(self, session: Session) -> None:
        """Insert or replace the terminal's session (a new sign-on replaces the old keys)."""

    def get_session(self, tid: str) -> Session | None: ...

    def drop_session(self, tid: str) -> None: ...

    def accept_signon(
        self, session: Session, transmission: str, stan: str, forget_before: float
    ) -> bool:
        """A sign-on (PROTOCOL.md 4.2): store ``session`` and remember the sign-on (the
        terminal, field 7 ``transmission`` and STAN ``stan``) in one transaction. False, and
        nothing changed, if that sign-on was accepted before (a replay), by any process sharing
        the store; of several accepting the same one at once, exactly one gets True. The
        terminal's sign-ons accepted before ``forget_before`` are forgotten."""

    # -- settlement accounts ---------------------------------------------------------------
    def current_account(self, tid: str, now: float) -> AccountVersion | None:
        """The version in force at ``now``: :func:`in_force` of the terminal's versions (the
        latest ACTIVE, VERIFIED or APPROVED one whose effective_from <= now)."""

    def transaction(
        self, tid: str | None = None, *, write: bool = True
    ) -> AbstractContextManager[StoreTx]:
        """One transaction for the rebind flow, committed when the block ends normally and
        rolled back if it raises. A write transaction naming ``tid`` is serialised with every
        other one naming it, across processes; ``write=False`` only reads."""

    def account_history(self, tid: str) -> list[AccountVersion]: ...

    # -- ledger ----------------------------------------------------------------------------
    def open_batch(self, tid: str) -> int:
        """The terminal's open batch number."""

    def record_sales(
        self,
        sales: Sequence[SaleRecord],
        then: Callable[[StoreTx, list[SaleResult]], None] | None = None,
    ) -> list[SaleResult]:
        """Insert many approved sales in ONE transaction (one fsync), in order; a sale whose
        (tid, stan, local_date) is already stored (or repeated earlier in ``sales``) is not
        inserted and gets duplicate=True. RRNs are unique 12-digit strings assigned here.
        ``then(tx, results)`` runs in the same transaction, after (what a test sale changes of
        its version's state): if it raises, nothing is recorded. A transaction the database
        aborts as a deadlock may be run again, ``then`` with it."""

    def sale_exists(self, tid: str, stan: str, local_date: str) -> bool:
        """Whether (tid, stan, local_date) already has a sale: the duplicate pre-check."""

    def find_sale(self, tid: str, stan: str, transmission: str) -> StoredSale | None:
        """The sale a reversal names: same terminal, original STAN and original field 7."""

    def reverse_sale(self, rrn: str) -> bool:
        """Mark the sale reversed; False if it was already reversed (idempotent) or its batch
        is closed (settled sales stay as they were)."""

    def sales(self, tid: str) -> list[StoredSale]: ...

    # -- the outbox of settlement updates (PROTOCOL.md 6) ----------------------------------
    def advices(self, tid: str | None = None, state: str | None = None) -> list[StoredAdvice]:
        """Advices in the order they were queued, optionally of one terminal and/or state."""

    def claim_advices(
        self,
        bank_codes: Sequence[str],
        now: float,
        hold: float,
        limit: int = 100,
        terminals: Sequence[str] = (),
    ) -> list[StoredAdvice]:
        """Up to ``limit`` deliverable advices of ``bank_codes`` (48 BK) or of ``terminals``
        (a bank may take a terminal's advices whatever their BK), oldest first, each held for
        its claimer until ``now + hold`` (its next_attempt_at): no other claim gets it before,
        and if the claimer dies it is deliverable again after. Deliverable: queued, its
        next_attempt_at passed, and no earlier advice of its terminal for the same bank code
        still queued (so a terminal has at most one in flight to a bank, and its advices reach
        each bank in order; one stuck for a bank that is down, or that no bank takes, holds up
        none of another bank's)."""

    def mark_delivered(self, advice_id: int, ack_code: str, now: float) -> bool:
        """The bank acknowledged the advice; False if it is not queued."""

    def mark_failed(self, advice_id: int, error: str, next_attempt_at: float, now: float) -> bool:
        """A delivery failed: one more attempt, the error, and when to try again; False if the
        advice is not queued."""

    def dead_letter(self, advice_id: int, reason: str, now: float) -> bool:
        """Give up on a queued advice (``reason`` is kept as its last error); the terminal's
        later advices are deliverable again. False if it is not queued."""

    def retry_advice(self, advice_id: int, now: float) -> bool:
        """A dead or waiting advice is queued again, deliverable at once with its attempts
        and its age (``created_at``, what a bank's max_age counts from) counted afresh; False
        for a delivered or unknown one."""

    def retry_dead_advices(self, now: float, bank_codes: Sequence[str] | None = None) -> int:
        """Queue again every dead advice (of ``bank_codes``, if given); how many."""

    def outbox_status(self) -> list[BankStatus]:
        """One entry per bank code with undelivered advices, by bank code."""

    def acquire_bank_lease(self, bank: str, owner: str, now: float, ttl: float) -> bool:
        """Become (or stay) the one owner of ``bank``'s lease until ``now + ttl``: True if
        nobody else holds an unexpired lease on it. Exactly one of several processes asking
        at once gets it."""

    def renew_bank_lease(self, bank: str, owner: str, now: float, ttl: float) -> bool:
        """Extend ``owner``'s unexpired lease to ``now + ttl``; False if it has expired or is
        another's (the owner has lost it and must stop delivering)."""

    def release_bank_lease(self, bank: str, owner: str) -> bool:
        """Give the lease up, if ``owner`` holds it, so that another may take it at once."""

    def bank_lease(self, bank: str) -> BankLease | None:
        """The bank's lease as recorded (perhaps expired), or None."""
