"""An in-memory ``Store`` for unit tests and the in-process pipeline benchmark.

Same semantics as ``SQLiteStore`` (duplicate rule, 12-digit RRNs from a counter, ValueError for
what SQLite's constraints would refuse), nothing durable. One thread at a time.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from acqhost.store.base import (
    OPEN_REBIND_STATES,
    TERMINAL_STATUSES,
    AccountVersion,
    AuditEntry,
    NewAccount,
    Operator,
    RebindRequest,
    SaleRecord,
    SaleResult,
    Session,
    StoredSale,
    StoreTx,
    Terminal,
    format_rrn,
    in_force,
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
        self._requests: dict[str, _Request] = {}  # by rf, in insertion order
        self._audit: list[AuditEntry] = []
        self._lock = threading.RLock()

    # -- host ------------------------------------------------------------------------------
    def close(self) -> None:
        """Nothing to release."""

    @contextmanager
    def transaction(self, tid: str | None = None, *, write: bool = True) -> Iterator[StoreTx]:
        """One transaction: the rebind flow's tables are copied first and restored if the
        block raises (a read only reads: nothing to copy)."""
        with self._lock:
            if not write:
                yield _MemoryTx(self)
                return
            saved = (
                dict(self._operators),
                {tid: list(v) for tid, v in self._accounts.items()},
                {rf: dataclasses.replace(r) for rf, r in self._requests.items()},
                list(self._audit),
            )
            try:
                yield _MemoryTx(self)
            except BaseException:
                self._operators, self._accounts, self._requests, self._audit = saved
                raise

    # -- terminals -------------------------------------------------------------------------
    def add_terminal(
        self,
        terminal: Terminal,
        account: NewAccount,
        operator: Operator | None,
        then: Callable[[StoreTx], None] | None = None,
    ) -> None:
        """Register a terminal with settlement account version 1 (ACTIVE, effective from
        ``terminal.created_at``), batch 1 open and the optional operator, with ``then`` (see
        Store.add_terminal): all or nothing. ValueError if the tid exists."""
        with self._lock:  # one registration at a time, as the transactions are
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
            if then is None:
                return
            try:
                with self.transaction(tid) as tx:  # restores accounts, operators and audit
                    then(tx)
            except BaseException:
                del self._terminals[tid], self._batches[(tid, 1)], self._open_batches[tid]
                del self._sales_by_tid[tid]
                self._accounts.pop(tid, None)
                if operator is not None:
                    self._operators.pop((tid, operator.operator_id), None)
                raise

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
        """The version in force at ``now`` (``acqhost.store.base.in_force`` of its versions)."""
        return in_force(self._accounts.get(tid, []), now)

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


@dataclass(slots=True)
class _Request:
    tid: str
    version: int
    kind: str
    operator_id: str
    stan: str
    transmission: str
    source: str
    submitted_at: float
    decided_by: str
    decided_at: float | None
    note: str
    restores: int | None


class _MemoryTx:
    """``StoreTx`` over a ``MemoryStore``'s dicts, with the constraints SQL would keep."""

    def __init__(self, store: MemoryStore) -> None:
        self._s = store

    def terminal(self, tid: str) -> Terminal | None:
        return self._s._terminals.get(tid)

    def operator(self, tid: str, operator_id: str) -> Operator | None:
        return self._s._operators.get((tid, operator_id))

    def set_operator_failures(self, tid: str, operator_id: str, failures: int) -> None:
        key = (tid, operator_id)
        operator = self._s._operators.get(key)
        if operator is not None:
            self._s._operators[key] = dataclasses.replace(operator, failures=failures)

    def versions(self, tid: str) -> list[AccountVersion]:
        return list(self._s._accounts.get(tid, ()))

    def insert_version(self, version: AccountVersion) -> None:
        versions = self._s._accounts.get(version.tid)
        if versions is None:
            raise ValueError(f"rejected by the store: no terminal {version.tid!r}")
        if version.version != len(versions) + 1:
            raise ValueError(f"rejected by the store: version {version.version} exists")
        if version.state in OPEN_REBIND_STATES and any(
            v.state in OPEN_REBIND_STATES for v in versions
        ):
            raise ValueError("rejected by the store: the terminal has an open request")
        versions.append(version)

    def set_version_state(
        self, tid: str, version: int, from_states: Sequence[str], state: str, effective_from: float
    ) -> bool:
        versions = self._s._accounts.get(tid, [])
        if not 1 <= version <= len(versions) or versions[version - 1].state not in from_states:
            return False
        if state in OPEN_REBIND_STATES and any(
            v.state in OPEN_REBIND_STATES for v in versions if v.version != version
        ):
            raise ValueError("rejected by the store: the terminal has an open request")
        versions[version - 1] = dataclasses.replace(
            versions[version - 1], state=state, effective_from=effective_from
        )
        return True

    def _view(self, rf: str, r: _Request) -> RebindRequest:
        state = self._s._accounts[r.tid][r.version - 1].state
        return RebindRequest(rf, r.tid, r.version, r.kind, r.operator_id, r.stan,
                             r.transmission, r.source, r.submitted_at, state, r.decided_by,
                             r.decided_at, r.note, r.restores)  # fmt: skip

    def request(self, rf: str) -> RebindRequest | None:
        r = self._s._requests.get(rf)
        return None if r is None else self._view(rf, r)

    def request_for_message(self, tid: str, stan: str, transmission: str) -> RebindRequest | None:
        found = [
            self._view(rf, r)
            for rf, r in self._s._requests.items()
            if r.kind == "rebind" and (r.tid, r.stan, r.transmission) == (tid, stan, transmission)
        ]
        return max(found, key=lambda r: r.submitted_at) if found else None

    def latest_request(self, tid: str) -> RebindRequest | None:
        mine = self.requests(tid=tid)
        return max(mine, key=lambda r: r.version) if mine else None

    def requests(self, state: str | None = None, tid: str | None = None) -> list[RebindRequest]:
        found = [
            self._view(rf, r) for rf, r in self._s._requests.items() if tid is None or r.tid == tid
        ]
        found = [r for r in found if state is None or r.state == state]
        return sorted(found, key=lambda r: (r.submitted_at, r.rf))

    def insert_request(self, request: RebindRequest) -> None:
        versions = self._s._accounts.get(request.tid, [])
        if request.rf in self._s._requests:
            raise ValueError(f"rejected by the store: request {request.rf!r} exists")
        if not 1 <= request.version <= len(versions):
            raise ValueError(f"rejected by the store: no version {request.version}")
        if any(r.tid == request.tid and r.version == request.version
               for r in self._s._requests.values()):  # fmt: skip
            raise ValueError("rejected by the store: the version has a request")
        r = request
        self._s._requests[r.rf] = _Request(
            r.tid, r.version, r.kind, r.operator_id, r.stan, r.transmission, r.source,
            r.submitted_at, r.decided_by, r.decided_at, r.note, r.restores,
        )  # fmt: skip

    def decide_request(self, rf: str, decided_by: str, decided_at: float, note: str) -> None:
        r = self._s._requests.get(rf)
        if r is not None:
            r.decided_by, r.decided_at, r.note = decided_by, decided_at, note

    def due_versions(self, now: float) -> list[AccountVersion]:
        due = [
            v
            for versions in self._s._accounts.values()
            for v in versions
            if v.state == "APPROVED" and v.effective_from <= now
        ]
        return sorted(due, key=lambda v: (v.effective_from, v.tid))

    def has_test_sale(self, tid: str, version: int) -> bool:
        return any(
            s.record.test and s.record.account_version == version and s.status == "approved"
            for s in self._s._sales_by_tid.get(tid, ())
        )

    def last_audit(self) -> AuditEntry | None:
        return self._s._audit[-1] if self._s._audit else None

    def insert_audit(self, entry: AuditEntry) -> None:
        log = self._s._audit
        if entry.seq != (log[-1].seq + 1 if log else 1):
            raise ValueError(f"rejected by the store: audit entry {entry.seq} out of order")
        log.append(entry)

    def audit_entries(self) -> list[AuditEntry]:
        return list(self._s._audit)
