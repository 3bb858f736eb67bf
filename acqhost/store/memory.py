"""An in-memory ``Store`` for unit tests and the in-process pipeline benchmark.

Same semantics as ``SQLiteStore`` (duplicate rule, 12-digit RRNs from a counter, ValueError for
what SQLite's constraints would refuse), nothing durable. One thread at a time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from acqhost.store.base import (
    IN_FORCE_STATES,
    TERMINAL_STATUSES,
    AccountVersion,
    NewAccount,
    Operator,
    SaleRecord,
    SaleResult,
    Session,
    StoredSale,
    Terminal,
    format_rrn,
)

__all__ = ("MemoryStore",)


@dataclass(slots=True)
class _Sale:
    rowid: int
    record: SaleRecord
    status: str = "approved"
    reversed_at: float | None = None


class MemoryStore:
    """``Store`` in dicts. RRNs count from 1, as SQLite row ids do on a new file."""

    def __init__(self) -> None:
        self._terminals: dict[str, Terminal] = {}
        self._operators: dict[tuple[str, str], Operator] = {}
        self._sessions: dict[str, Session] = {}
        self._accounts: dict[str, list[AccountVersion]] = {}
        self._batches: dict[tuple[str, int], bool] = {}  # (tid, batch_no) -> closed
        self._open_batches: dict[str, int] = {}
        self._sales: dict[int, _Sale] = {}
        self._sales_by_key: dict[tuple[str, str, str], _Sale] = {}  # (tid, stan, local_date)
        self._sales_by_tid: dict[str, list[_Sale]] = {}
        self._last_rowid = 0

    # -- host ------------------------------------------------------------------------------
    def close(self) -> None:
        """Nothing to release."""

    # -- terminals -------------------------------------------------------------------------
    def add_terminal(
        self,
        terminal: Terminal,
        account: NewAccount,
        operator: Operator | None,
    ) -> None:
        """Register a terminal with settlement account version 1 (ACTIVE, effective from
        ``terminal.created_at``), batch 1 open and the optional operator. ValueError if the
        tid exists."""
        if terminal.status not in TERMINAL_STATUSES:
            raise ValueError(f"terminal status must be active or disabled: {terminal.status!r}")
        if operator is not None and operator.tid != terminal.tid:
            raise ValueError("the operator belongs to another terminal")
        tid = terminal.tid
        if tid in self._terminals:
            raise ValueError(f"terminal {tid!r} already exists")
        now = terminal.created_at
        self._terminals[tid] = terminal
        self._accounts[tid] = [
            AccountVersion(
                tid=tid,
                version=1,
                sealed_account=account.sealed_account,
                account_hash=account.account_hash,
                account_masked=account.account_masked,
                holder=account.holder,
                bank_code=account.bank_code,
                branch=account.branch,
                state="ACTIVE",
                effective_from=now,
                created_by=account.created_by,
                reason=account.reason,
                created_at=now,
            )
        ]
        self._batches[(tid, 1)] = False
        self._open_batches[tid] = 1
        self._sales_by_tid[tid] = []
        if operator is not None:
            self._operators[(tid, operator.operator_id)] = operator

    def get_terminal(self, tid: str) -> Terminal | None:
        """The terminal, or None."""
        return self._terminals.get(tid)

    def list_terminals(self) -> list[Terminal]:
        """Every terminal, by tid."""
        return [self._terminals[tid] for tid in sorted(self._terminals)]

    def set_terminal_status(self, tid: str, status: str) -> bool:
        """Set "active" or "disabled"; False if there is no such terminal."""
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"terminal status must be active or disabled: {status!r}")
        terminal = self._terminals.get(tid)
        if terminal is None:
            return False
        self._terminals[tid] = Terminal(
            tid=terminal.tid,
            mid=terminal.mid,
            merchant_name=terminal.merchant_name,
            status=status,
            identity_public_key=terminal.identity_public_key,
            sale_limit=terminal.sale_limit,
            test_limit=terminal.test_limit,
            created_at=terminal.created_at,
        )
        return True

    # -- sessions --------------------------------------------------------------------------
    def save_session(self, session: Session) -> None:
        """Insert or replace the terminal's session (a new sign-on replaces the old keys)."""
        if session.tid not in self._terminals:
            raise ValueError(f"rejected by the store: no terminal {session.tid!r}")
        self._sessions[session.tid] = session

    def get_session(self, tid: str) -> Session | None:
        """The terminal's session, or None when it is not signed on."""
        return self._sessions.get(tid)

    def drop_session(self, tid: str) -> None:
        """Forget the terminal's session keys (sign-off); no error if there are none."""
        self._sessions.pop(tid, None)

    # -- settlement accounts ---------------------------------------------------------------
    def current_account(self, tid: str, now: float) -> AccountVersion | None:
        """The version in force: the latest ACTIVE (or VERIFIED) version whose
        effective_from <= now."""
        for version in reversed(self._accounts.get(tid, ())):
            if version.state in IN_FORCE_STATES and version.effective_from <= now:
                return version
        return None

    def account_history(self, tid: str) -> list[AccountVersion]:
        """Every version of the terminal's settlement account, oldest first."""
        return list(self._accounts.get(tid, ()))

    # -- ledger ----------------------------------------------------------------------------
    def open_batch(self, tid: str) -> int:
        """The terminal's open batch number; KeyError if the terminal has none."""
        return self._open_batches[tid]

    def record_sales(self, sales: Sequence[SaleRecord]) -> list[SaleResult]:
        """Insert many approved sales, all or nothing, in order; a sale whose (tid, stan,
        local_date) is already stored, or repeated earlier in ``sales``, gets duplicate=True
        and the RRN of the sale stored under that key. ValueError (and nothing inserted) if a
        sale names an unknown terminal, batch or account version."""
        for sale in sales:
            self._check_references(sale)
        results: list[SaleResult] = []
        by_key = self._sales_by_key
        for sale in sales:
            key = (sale.tid, sale.stan, sale.local_date)
            existing = by_key.get(key)
            if existing is not None:
                results.append(SaleResult(format_rrn(existing.rowid), True))
                continue
            self._last_rowid += 1
            stored = _Sale(self._last_rowid, sale)
            self._sales[stored.rowid] = stored
            by_key[key] = stored
            self._sales_by_tid[sale.tid].append(stored)
            results.append(SaleResult(format_rrn(stored.rowid), False))
        return results

    def _check_references(self, sale: SaleRecord) -> None:
        if sale.tid not in self._terminals:
            raise ValueError(f"rejected by the store: no terminal {sale.tid!r}")
        if (sale.tid, sale.batch_no) not in self._batches:
            raise ValueError(f"rejected by the store: no batch {sale.batch_no} of {sale.tid!r}")
        versions = self._accounts[sale.tid]
        if not 1 <= sale.account_version <= len(versions):
            raise ValueError(
                f"rejected by the store: no account version {sale.account_version} of {sale.tid!r}"
            )

    def sale_exists(self, tid: str, stan: str, local_date: str) -> bool:
        """Whether the duplicate key (tid, stan, local_date) already has a sale."""
        return (tid, stan, local_date) in self._sales_by_key

    def find_sale(self, tid: str, stan: str, transmission: str) -> StoredSale | None:
        """The sale a reversal names: same terminal, original STAN and original field 7 (the
        latest such sale)."""
        for stored in reversed(self._sales_by_tid.get(tid, ())):
            record = stored.record
            if record.stan == stan and record.transmission == transmission:
                return self._stored(stored)
        return None

    def reverse_sale(self, rrn: str) -> bool:
        """Mark the sale reversed; False if it was already reversed or does not exist
        (idempotent)."""
        if not (rrn.isdigit() and rrn.isascii()):
            return False
        stored = self._sales.get(int(rrn))
        if stored is None or stored.status != "approved":
            return False
        stored.status = "reversed"
        stored.reversed_at = time.time()
        return True

    def sales(self, tid: str) -> list[StoredSale]:
        """Every sale of the terminal, in RRN order."""
        return [self._stored(stored) for stored in self._sales_by_tid.get(tid, ())]

    def _stored(self, stored: _Sale) -> StoredSale:
        record = stored.record
        return StoredSale(
            rrn=format_rrn(stored.rowid),
            tid=record.tid,
            stan=record.stan,
            local_date=record.local_date,
            transmission=record.transmission,
            amount=record.amount,
            currency=record.currency,
            auth_code=record.auth_code,
            test=record.test,
            account_version=record.account_version,
            batch_no=record.batch_no,
            status=stored.status,
            batch_settled=self._batches[(record.tid, record.batch_no)],
        )
