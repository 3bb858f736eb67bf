"""Terminals and their settlement accounts as the acquirer handles them: what registering a
terminal takes and records, the transactions the acquirer's reads and decisions run in, the
states its account versions are shown in, and unlocking a terminal's operator.

Like the rest of the domain these are functions over a store (or one store transaction) handed
in by the caller; the command line only parses, prints and chooses exit codes around them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from acqhost.config import MAX_AMOUNT
from acqhost.domain import accounts, advices, audit, cards, crypto
from acqhost.errors import AcqHostError
from acqhost.store.base import (
    IN_FORCE_STATES,
    AccountVersion,
    NewAccount,
    Operator,
    RebindRequest,
    Store,
    StoreTx,
    Terminal,
)

__all__ = (
    "SUPERSEDED",
    "Registered",
    "Registration",
    "RegistrationError",
    "audit_registration",
    "check_registration",
    "deciding",
    "effective_from_of",
    "reading",
    "record_due",
    "register",
    "shown_states",
    "unlock_operator",
)


# How a version is shown once a newer version has replaced it as the one in force. Not a
# stored state (the store keeps the state the version last had): a way of showing history.
SUPERSEDED = "SUPERSEDED"


class RegistrationError(AcqHostError, ValueError):
    """A registration input that cannot be used. ``name`` is the input (``tid``, ``mid``,
    ``account``, ``bank_code``, ``holder``, ``sale_limit``), ``problem`` what it must be, so
    that a caller can name the input as its user typed it."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name} {problem}")
        self.name = name
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Registration:
    """A terminal to register with its settlement account (version 1) and, optionally, the
    operator who may change that account from the terminal."""

    tid: str  # field 41
    mid: str  # field 42
    merchant_name: str
    holder: str
    account: str = field(repr=False)  # the full number: never logged
    bank_code: str  # 12-digit CNAPS code
    branch: str
    sale_limit: int  # minor units
    test_limit: int  # minor units
    operator_id: str | None = None
    operator_password: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Registered:
    """What a registration recorded, and the terminal's identity key for its key file (the
    host keeps only the public half)."""

    terminal: Terminal
    account: NewAccount
    signing_seed: bytes = field(repr=False)


def _printable(text: str, length: int) -> bool:
    return len(text) == length and text.isascii() and text.isprintable()


def check_registration(reg: Registration) -> Registration:
    """``reg`` as it will be recorded (spaces taken out of the account number, the holder's
    name trimmed), or RegistrationError for the first input that cannot be: fields 41 and 42
    have fixed lengths; the account number is what a 0300 submit would accept (PROTOCOL.md
    5.3); a limit is worth something and fits field 4."""
    if not _printable(reg.tid, 8):
        raise RegistrationError("tid", "must be 8 printable ASCII characters")
    if not _printable(reg.mid, 15):
        raise RegistrationError("mid", "must be 15 printable ASCII characters")
    account = reg.account.replace(" ", "")
    if not (account.isdigit() and 12 <= len(account) <= 19 and cards.luhn_ok(account)):
        raise RegistrationError("account", "must be 12 to 19 digits and pass the Luhn check")
    if not (len(reg.bank_code) == 12 and reg.bank_code.isdigit()):
        raise RegistrationError("bank_code", "must be a 12-digit CNAPS code")
    if not reg.holder.strip():
        raise RegistrationError("holder", "must not be empty")
    if not 0 < reg.sale_limit <= MAX_AMOUNT:
        raise RegistrationError("sale_limit", f"must be positive and at most {MAX_AMOUNT}")
    if (reg.operator_id is None) != (reg.operator_password is None):
        raise RegistrationError("operator_id", "and an operator password go together")
    return dataclasses.replace(reg, holder=reg.holder.strip(), account=account)


def register(
    store: Store,
    key: bytes,
    reg: Registration,
    *,
    by: str,
    now: float,
    fast_hash: bool = False,
    keep: Callable[[bytes], None] | None = None,
) -> Registered:
    """Register a terminal: checked (:func:`check_registration`), then the terminal, its
    account version 1, its operator, the audit log's registration entry and version 1's 0320
    for its bank, all in one transaction. A new identity key pair is made for it. ValueError
    (from the store) when the terminal id is taken. ``fast_hash``: the operator's password
    hashed at minimal cost (tests and demos only). ``keep(seed)`` is called last inside that
    transaction to keep the terminal's private key (its key file): when it raises, nothing is
    registered, so no terminal is left whose private key is lost."""
    reg = check_registration(reg)
    seed = crypto.new_signing_key()
    terminal = Terminal(
        tid=reg.tid,
        mid=reg.mid,
        merchant_name=reg.merchant_name,
        status="active",
        identity_public_key=crypto.verify_key_of(seed),
        sale_limit=reg.sale_limit,
        test_limit=reg.test_limit,
        created_at=now,
    )
    account = NewAccount(
        sealed_account=crypto.seal(key, reg.account.encode()),
        account_hash=crypto.account_hash(key, reg.account),
        account_masked=cards.mask_account(reg.account),
        holder=reg.holder,
        bank_code=reg.bank_code,
        branch=reg.branch,
        created_by=by,
        reason="registration",
    )
    operator = None
    if reg.operator_id is not None and reg.operator_password is not None:
        operator = Operator(
            tid=reg.tid,
            operator_id=reg.operator_id,
            password_hash=crypto.hash_password(reg.operator_password, fast=fast_hash),
            failures=0,
        )

    def registered(tx: StoreTx) -> None:
        audit_registration(tx, key, reg.tid)
        # Version 1 is ACTIVE from the start: its bank learns of it as of any later version.
        advices.queue_account_advice(tx, key, tx.versions(reg.tid)[0], None, now)
        if keep is not None:
            keep(seed)

    store.add_terminal(terminal, account, operator, then=registered)
    return Registered(terminal, account, seed)


def audit_registration(tx: StoreTx, key: bytes, tid: str) -> None:
    """The audit log's first entry about a terminal, in the transaction that registers it:
    its version 1 and that version's fingerprint, so that an edit of it is found later."""
    first = tx.versions(tid)[0]
    audit.append(
        tx,
        key,
        at=first.created_at,
        actor=first.created_by,
        action="terminal.registered",
        tid=tid,
        subject="v1",
        detail={
            "version": 1,
            "before": None,
            "after": first.state,
            "account": first.account_masked,
            "bank_code": first.bank_code,
            "fingerprint": audit.fingerprint(key, first),
        },
    )


# -- the acquirer's transactions -----------------------------------------------------------------


def record_due(store: Store, key: bytes, now: float) -> list[AccountVersion]:
    """Record the activations that are due (as a running host does every second), so that
    what the acquirer reads is current even when no host runs. The versions activated; a
    store with nothing due is only read."""
    with store.transaction(write=False) as tx:
        if not tx.due_versions(now):
            return []
    with store.transaction() as tx:
        return accounts.activate_due(tx, key, now)


@contextmanager
def reading(
    store: Store, key: bytes, clock: Callable[[], float] = time.time
) -> Iterator[tuple[StoreTx, float]]:
    """A read transaction and the time it reads at; due activations are recorded first."""
    now = clock()
    record_due(store, key, now)
    with store.transaction(write=False) as tx:
        yield tx, now


@contextmanager
def deciding(
    store: Store, key: bytes, tid: str, clock: Callable[[], float] = time.time
) -> Iterator[tuple[StoreTx, float]]:
    """The write transaction of an acquirer's decision about ``tid``, and the time of the
    decision: read once the transaction holds its lock, so that waiting for the lock can never
    eat into the lead between a decision and its effective-from. Due activations are recorded
    first, so that when a host was down at an effective-from, that activation is on record
    before anything else is decided. A refusal (an exception) rolls back the whole transaction,
    those activations too: the running host or the next command records them."""
    with store.transaction(tid) as tx:
        now = clock()
        accounts.activate_due(tx, key, now)
        yield tx, now


def unlock_operator(
    tx: StoreTx, key: bytes, tid: str, operator_id: str, *, by: str, max_failures: int, now: float
) -> Operator | None:
    """Clear an operator's count of consecutive wrong passwords (the lockout of 75 ends with
    it), in the audit log with whether it had locked the operator out. The operator as it was,
    or None when the terminal has no such operator; one with no wrong passwords is left as
    it is, and nothing is logged."""
    operator = tx.operator(tid, operator_id)
    if operator is None or not operator.failures:
        return operator
    tx.set_operator_failures(tid, operator_id, 0)
    audit.append(
        tx,
        key,
        at=now,
        actor=by,
        action="operator.unlocked",
        tid=tid,
        subject=operator_id,
        detail={"failures": operator.failures, "was_locked": operator.failures >= max_failures},
    )
    return operator


# -- how requests and versions are shown -------------------------------------------------------


def effective_from_of(request: RebindRequest, version: AccountVersion) -> float | None:
    """A request's effective-from, or None for one that will never take effect."""
    return None if request.state in accounts.NEVER_EFFECTIVE else version.effective_from


def shown_states(versions: Sequence[AccountVersion], now: float) -> list[str]:
    """The state of each of a terminal's versions (oldest first) as the acquirer is shown it
    at ``now``. The store keeps the state a version last had, so a version that was in force
    (ACTIVE, VERIFIED) still has it after a newer version took over; shown so it would read as
    if sales still settled to it. Such a version is shown :data:`SUPERSEDED`. An APPROVED
    version whose effective-from has passed is shown ACTIVE: it is in force even before a host
    process records it so. Every other state is shown as stored."""
    current = accounts.in_force(versions, now)
    shown = []
    for v in versions:
        due = v.state in IN_FORCE_STATES and v.effective_from <= now
        if due and current is not None and v.version < current.version:
            shown.append(SUPERSEDED)
        elif due and v.state == "APPROVED":
            shown.append("ACTIVE")
        else:
            shown.append(v.state)
    return shown
