"""What the SQL backends share: column lists, row mapping and parameter tuples.

SQLite and PostgreSQL differ in their placeholders (``?`` and ``%s``), transactions and
batching, not in their tables; the pieces both write the same way live here once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from acqhost.store.base import (
    TERMINAL_STATUSES,
    NewAccount,
    Operator,
    StoredSale,
    Terminal,
    format_rrn,
)

__all__ = (
    "ACCOUNT_COLUMNS",
    "SALE_SELECT",
    "TERMINAL_COLUMNS",
    "account_v1_params",
    "check_new_terminal",
    "operator_params",
    "stored_sale",
    "terminal_params",
)

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
