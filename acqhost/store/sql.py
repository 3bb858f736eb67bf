"""What the SQL backends share: column lists, row mapping and parameter tuples.

SQLite and PostgreSQL differ in their placeholders (``?`` and ``%s``), transactions and
batching, not in their tables; the pieces both write the same way live here once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from acqhost.store.base import (
    TERMINAL_STATUSES,
    AccountVersion,
    AuditEntry,
    NewAccount,
    Operator,
    RebindRequest,
    StoredSale,
    Terminal,
    format_rrn,
)

__all__ = (
    "ACCOUNT_COLUMNS",
    "AUDIT_LOCK",
    "MIGRATION_LOCK",
    "SALE_SELECT",
    "TERMINAL_COLUMNS",
    "SQLTx",
    "account_v1_params",
    "check_new_terminal",
    "operator_params",
    "stored_sale",
    "terminal_params",
)

# pg_advisory_xact_lock keys (advisory locks are per database, so databases on one server do
# not wait for each other): "acqhost" in ASCII serialises migrations; the next one, appends to
# the audit log's hash chain.
MIGRATION_LOCK = 0x61_63_71_68_6F_73_74
AUDIT_LOCK = MIGRATION_LOCK + 1

TERMINAL_COLUMNS = (
    "tid, mid, merchant_name, status, identity_public_key, sale_limit, test_limit, created_at"
)
ACCOUNT_COLUMNS = (
    "tid, version, sealed_account, account_hash, account_masked, holder, bank_code, branch, "
    "state, effective_from, created_by, reason, created_at"
)
SALE_SELECT = (
    "SELECT s.rrn, s.tid, s.stan, s.local_date, s.transmission, s.amount, s.currency, "
    "s.auth_code, s.test, s.account_version, s.batch_no, s.status, b.status = 'closed' "
    "FROM sales AS s JOIN batches AS b ON b.tid = s.tid AND b.batch_no = s.batch_no "
)


def check_new_terminal(terminal: Terminal, operator: Operator | None) -> None:
    """ValueError for a registration no backend may store."""
    if terminal.status not in TERMINAL_STATUSES:
        raise ValueError(f"terminal status must be active or disabled: {terminal.status!r}")
    if operator is not None and operator.tid != terminal.tid:
        raise ValueError("the operator belongs to another terminal")


def terminal_params(t: Terminal) -> tuple[Any, ...]:
    """The values of TERMINAL_COLUMNS, in order."""
    return (t.tid, t.mid, t.merchant_name, t.status, t.identity_public_key, t.sale_limit,
            t.test_limit, t.created_at)  # fmt: skip


def account_v1_params(tid: str, a: NewAccount, now: float) -> tuple[Any, ...]:
    """The values of ACCOUNT_COLUMNS but version and state (1 and 'ACTIVE' in the SQL)."""
    return (tid, a.sealed_account, a.account_hash, a.account_masked, a.holder, a.bank_code,
            a.branch, now, a.created_by, a.reason, now)  # fmt: skip


def operator_params(o: Operator) -> tuple[Any, ...]:
    """(tid, operator_id, password_hash, failures)."""
    return (o.tid, o.operator_id, o.password_hash, o.failures)


def stored_sale(row: Sequence[Any]) -> StoredSale:
    """A row of SALE_SELECT."""
    return StoredSale(
        rrn=format_rrn(row[0]),
        tid=row[1],
        stan=row[2],
        local_date=row[3],
        transmission=row[4],
        amount=row[5],
        currency=row[6],
        auth_code=row[7],
        test=bool(row[8]),
        account_version=row[9],
        batch_no=row[10],
        status=row[11],
        batch_settled=bool(row[12]),
    )


class _Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


_REQUEST_SELECT = (
    "SELECT r.rf, r.tid, r.version, r.kind, r.operator_id, r.stan, r.transmission, r.source, "
    "r.submitted_at, a.state, r.decided_by, r.decided_at, r.note, r.restores "
    "FROM rebind_requests AS r "
    "JOIN settlement_accounts AS a ON a.tid = r.tid AND a.version = r.version "
)
_AUDIT_COLUMNS = "seq, at, actor, action, tid, subject, detail, prev_digest, digest"


class SQLTx:
    """``StoreTx`` over one open transaction of either SQL backend.

    The SQL is written once with ``?`` placeholders; ``execute`` is the backend's own (the
    PostgreSQL store passes one that sends ``%s``). ``lock`` statements are what PostgreSQL
    needs to serialise writers that SQLite's single write lock serialises already.
    """

    def __init__(
        self,
        execute: Callable[[str, tuple[Any, ...]], _Cursor],
        *,
        write: bool,
        lock_audit: str | None = None,
    ) -> None:
        self._execute = execute
        self._write = write
        self._lock_audit = lock_audit

    def _one(self, sql: str, params: tuple[Any, ...]) -> Any:
        return self._execute(sql, params).fetchone()

    def _all(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        return self._execute(sql, params).fetchall()

    def terminal(self, tid: str) -> Terminal | None:
        row = self._one(f"SELECT {TERMINAL_COLUMNS} FROM terminals WHERE tid = ?", (tid,))
        return None if row is None else Terminal(*row)

    def operator(self, tid: str, operator_id: str) -> Operator | None:
        row = self._one(
            "SELECT tid, operator_id, password_hash, failures FROM operators "
            "WHERE tid = ? AND operator_id = ?",
            (tid, operator_id),
        )
        return None if row is None else Operator(row[0], row[1], bytes(row[2]), row[3])

    def set_operator_failures(self, tid: str, operator_id: str, failures: int) -> None:
        self._execute(
            "UPDATE operators SET failures = ? WHERE tid = ? AND operator_id = ?",
            (failures, tid, operator_id),
        )

    def versions(self, tid: str) -> list[AccountVersion]:
        rows = self._all(
            f"SELECT {ACCOUNT_COLUMNS} FROM settlement_accounts WHERE tid = ? ORDER BY version",
            (tid,),
        )
        return [account_version(row) for row in rows]

    def insert_version(self, v: AccountVersion) -> None:
        self._execute(
            f"INSERT INTO settlement_accounts ({ACCOUNT_COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (v.tid, v.version, v.sealed_account, v.account_hash, v.account_masked, v.holder,
             v.bank_code, v.branch, v.state, v.effective_from, v.created_by, v.reason,
             v.created_at),
        )  # fmt: skip

    def set_version_state(
        self, tid: str, version: int, from_states: Sequence[str], state: str, effective_from: float
    ) -> bool:
        marks = ", ".join("?" * len(from_states))
        cursor = self._execute(
            "UPDATE settlement_accounts SET state = ?, effective_from = ? "
            f"WHERE tid = ? AND version = ? AND state IN ({marks})",
            (state, effective_from, tid, version, *from_states),
        )
        return cursor.rowcount == 1

    def request(self, rf: str) -> RebindRequest | None:
        row = self._one(_REQUEST_SELECT + "WHERE r.rf = ?", (rf,))
        return None if row is None else RebindRequest(*row)

    def request_for_message(self, tid: str, stan: str, transmission: str) -> RebindRequest | None:
        row = self._one(
            _REQUEST_SELECT + "WHERE r.tid = ? AND r.stan = ? AND r.transmission = ? "
            "AND r.kind = 'rebind' ORDER BY r.submitted_at DESC LIMIT 1",
            (tid, stan, transmission),
        )
        return None if row is None else RebindRequest(*row)

    def latest_request(self, tid: str) -> RebindRequest | None:
        row = self._one(_REQUEST_SELECT + "WHERE r.tid = ? ORDER BY r.version DESC LIMIT 1", (tid,))
        return None if row is None else RebindRequest(*row)

    def requests(self, state: str | None = None, tid: str | None = None) -> list[RebindRequest]:
        where, params = [], []
        if state is not None:
            where.append("a.state = ?")
            params.append(state)
        if tid is not None:
            where.append("r.tid = ?")
            params.append(tid)
        sql = _REQUEST_SELECT + (f"WHERE {' AND '.join(where)} " if where else "")
        rows = self._all(sql + "ORDER BY r.submitted_at, r.rf", tuple(params))
        return [RebindRequest(*row) for row in rows]

    def insert_request(self, r: RebindRequest) -> None:
        self._execute(
            "INSERT INTO rebind_requests (rf, tid, version, kind, operator_id, stan, "
            "transmission, source, submitted_at, decided_by, decided_at, note, restores) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (r.rf, r.tid, r.version, r.kind, r.operator_id, r.stan, r.transmission, r.source,
             r.submitted_at, r.decided_by, r.decided_at, r.note, r.restores),
        )  # fmt: skip

    def decide_request(self, rf: str, decided_by: str, decided_at: float, note: str) -> None:
        self._execute(
            "UPDATE rebind_requests SET decided_by = ?, decided_at = ?, note = ? WHERE rf = ?",
            (decided_by, decided_at, note, rf),
        )

    def due_versions(self, now: float) -> list[AccountVersion]:
        rows = self._all(
            f"SELECT {ACCOUNT_COLUMNS} FROM settlement_accounts "
            "WHERE state = 'APPROVED' AND effective_from <= ? ORDER BY effective_from, tid",
            (now,),
        )
        return [account_version(row) for row in rows]

    def has_test_sale(self, tid: str, version: int) -> bool:
        row = self._one(
            "SELECT 1 FROM sales WHERE tid = ? AND account_version = ? AND test = ? "
            "AND status = 'approved' LIMIT 1",
            (tid, version, True),
        )
        return row is not None

    def last_audit(self) -> AuditEntry | None:
        if self._write and self._lock_audit is not None:
            self._execute(self._lock_audit, ())
        row = self._one(f"SELECT {_AUDIT_COLUMNS} FROM audit_log ORDER BY seq DESC LIMIT 1", ())
        return None if row is None else audit_entry(row)

    def insert_audit(self, e: AuditEntry) -> None:
        self._execute(
            f"INSERT INTO audit_log ({_AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (e.seq, e.at, e.actor, e.action, e.tid, e.subject, e.detail, e.prev_digest,
             e.digest),
        )  # fmt: skip

    def audit_entries(self) -> list[AuditEntry]:
        rows = self._all(f"SELECT {_AUDIT_COLUMNS} FROM audit_log ORDER BY seq")
        return [audit_entry(row) for row in rows]


def account_version(row: Sequence[Any]) -> AccountVersion:
    """A row of ACCOUNT_COLUMNS."""
    return AccountVersion(*row)


def audit_entry(row: Sequence[Any]) -> AuditEntry:
    """A row of the audit log (BLOBs as bytes whatever the driver returns)."""
    seq, at, actor, action, tid, subject, detail, prev_digest, digest = row
    return AuditEntry(seq, at, actor, action, tid, subject, detail, bytes(prev_digest),
                      bytes(digest))  # fmt: skip
