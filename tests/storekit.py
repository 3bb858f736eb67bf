"""What the store tests share: the records they store, a store with a terminal, SQL run
behind the store's back, and the audit log's registration entry."""

from __future__ import annotations

from dataclasses import replace
from typing import TypeVar

import nacl.secret
import nacl.utils

from acqhost.domain import audit
from acqhost.store import (
    NewAccount,
    Operator,
    PostgresStore,
    SaleRecord,
    SQLiteStore,
    Store,
    StoreTx,
    Terminal,
)

TID = "T0000001"
MID = "M00000000000001"
CREATED = 1_700_000_000.0
KEY = nacl.utils.random(nacl.secret.SecretBox.KEY_SIZE)
OPERATOR = Operator(tid=TID, operator_id="01", password_hash=b"$argon2id$...", failures=0)

S = TypeVar("S", bound=Store)


def make_terminal(tid: str = TID, **changes: object) -> Terminal:
    terminal = Terminal(
        tid=tid,
        mid=MID,
        merchant_name="Noodle House",
        status="active",
        identity_public_key=bytes(range(32)),
        sale_limit=500_000,
        test_limit=100,
        created_at=CREATED,
    )
    return replace(terminal, **changes)  # type: ignore[arg-type]


def make_account(**changes: object) -> NewAccount:
    account = NewAccount(
        sealed_account=b"\x01sealed-account-bytes",
        account_hash=b"\x02" * 32,
        account_masked="6222********1234",
        holder="ZHANG SAN",
        bank_code="102100099996",
        branch="Haidian",
        created_by="admin",
        reason="registration",
    )
    return replace(account, **changes)  # type: ignore[arg-type]


def make_sale(stan: str = "000001", tid: str = TID, **changes: object) -> SaleRecord:
    sale = SaleRecord(
        tid=tid,
        mid=MID,
        stan=stan,
        local_date="0314",
        local_time="101500",
        transmission="0314101500",
        amount=1234,
        currency="156",
        pan_masked="622202******1234",
        auth_code="A1B2C3",
        test=False,
        account_version=1,
        batch_no=1,
        received_at=CREATED + 60,
    )
    return replace(sale, **changes)  # type: ignore[arg-type]


def with_terminal(store: S, tid: str = TID) -> S:
    store.add_terminal(make_terminal(tid), make_account(), None)
    return store


def execute_sql(store: Store, statement: str) -> None:
    """Run one statement, committed, on the store's own connection: what anyone with access to
    the database could do behind the store's back."""
    if isinstance(store, SQLiteStore):
        store._conn.execute(statement)
    else:
        assert isinstance(store, PostgresStore)
        with store._conn.transaction():
            store._conn.execute(statement)


def registration_entry(tx: StoreTx, tid: str = TID) -> None:
    first = tx.versions(tid)[0]
    audit.append(tx, KEY, at=first.created_at, actor="test", action="terminal.registered",
                 tid=tid, subject="v1", detail={"version": 1})  # fmt: skip


def chain(store: Store) -> tuple[int, list[str]]:
    """audit.verify, but for the test accounts' sealed numbers (made-up bytes here)."""
    count, problems = audit.verify(store, KEY)
    return count, [p for p in problems if "sealed account number" not in p]


class Interrupted(BaseException):
    """What Ctrl-C (KeyboardInterrupt) or a cancellation is: not an Exception."""
