"""The records the store keeps and gives back: terminals, sessions, operators, settlement-account
versions, sales, batches, rebind requests and audit entries, with the rule of which version is in
force at a time. Plain values: no I/O."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from acqhost.errors import AcqHostError

__all__ = (
    "ACCOUNT_STATES",
    "IN_FORCE_STATES",
    "OPEN_REBIND_STATES",
    "TERMINAL_STATUSES",
    "AccountVersion",
    "AuditEntry",
    "Batch",
    "BatchTotal",
    "NewAccount",
    "Operator",
    "RebindRequest",
    "SaleRecord",
    "SaleResult",
    "SchemaVersionError",
    "Session",
    "SettlementLine",
    "StoredSale",
    "Terminal",
    "format_rrn",
    "in_force",
    "next_change",
)

TERMINAL_STATUSES = frozenset({"active", "disabled"})
# The account states in which a version is the one sales settle to, once its effective_from
# has passed: VERIFIED is ACTIVE plus a first approved test sale; an APPROVED version becomes
# ACTIVE at its effective_from, and until a host process records that (it may have been down
# at that moment) it is already the one in force.
IN_FORCE_STATES = ("APPROVED", "ACTIVE", "VERIFIED")
# Every state a settlement account version can be in (PROTOCOL.md 5.3).
ACCOUNT_STATES = (
    "PENDING_REVIEW",
    "APPROVED",
    "ACTIVE",
    "VERIFIED",
    "REJECTED",
    "CANCELLED",
    "ROLLED_BACK",
)
# A rebind request in one of these states is open: a terminal has at most one.
OPEN_REBIND_STATES = ("PENDING_REVIEW", "APPROVED")


def format_rrn(rowid: int) -> str:
    """Field 37 of a sale: the store's sequence number for it, zero-padded to 12 digits."""
    return f"{rowid:012d}"


class SchemaVersionError(AcqHostError, RuntimeError):
    """The database was written by a newer acqhost (its schema version is above the latest this
    code knows); it is refused rather than misread. Upgrade acqhost to open it."""

    def __init__(self, found: int, latest: int) -> None:
        super().__init__(
            f"database schema version {found} is newer than the latest this acqhost knows "
            f"({latest}); upgrade acqhost to open it"
        )
        self.found = found
        self.latest = latest

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.found, self.latest))


@dataclass(frozen=True, slots=True)
class Terminal:
    tid: str  # field 41, 8 chars
    mid: str  # field 42, 15 chars
    merchant_name: str
    status: str  # "active" or "disabled"
    identity_public_key: bytes  # Ed25519 verify key, 32 bytes
    sale_limit: int  # minor units, single-sale limit (61 above it)
    test_limit: int  # minor units, test-sale limit (13 above it), default 100
    created_at: float  # unix seconds


@dataclass(frozen=True, slots=True)
class Session:
    """Crypto_kx session keys of a signed-on terminal, sealed with the host data key."""

    tid: str
    sealed_rx: bytes  # host rx key (terminal -> host), sealed
    sealed_tx: bytes  # host tx key (host -> terminal), sealed
    signed_on_at: float


@dataclass(frozen=True, slots=True)
class Operator:
    tid: str
    operator_id: str
    password_hash: bytes  # argon2id string from pynacl, as bytes
    failures: int  # consecutive wrong passwords


@dataclass(frozen=True, slots=True)
class NewAccount:
    """A settlement account to record as a new version."""

    sealed_account: bytes  # account number sealed with the host data key
    account_hash: bytes  # keyed BLAKE2b of the account number, for equality checks
    account_masked: str  # e.g. 6222********1234
    holder: str
    bank_code: str  # 12-digit CNAPS code
    branch: str
    created_by: str
    reason: str


@dataclass(frozen=True, slots=True)
class AccountVersion:
    tid: str
    version: int  # 1, 2, ...
    sealed_account: bytes
    account_hash: bytes
    account_masked: str
    holder: str
    bank_code: str
    branch: str
    state: str  # one of ACCOUNT_STATES; version 1 starts ACTIVE
    effective_from: float
    created_by: str
    reason: str
    created_at: float


@dataclass(slots=True)  # not frozen: built once per sale, and frozen __init__ costs ~3 us
class SaleRecord:
    """An approved sale (or test sale) to be made durable before its 0210 leaves."""

    tid: str
    mid: str
    stan: str  # field 11
    local_date: str  # field 13 MMDD; (tid, stan, local_date) is the duplicate key
    local_time: str  # field 12
    transmission: str  # field 7 MMDDhhmmss
    amount: int  # minor units
    currency: str  # field 49
    pan_masked: str
    auth_code: str  # field 38
    test: bool
    account_version: int
    # The terminal's open batch as the host last read it. The store records the sale in the
    # terminal's open batch, which is this one or, when a settlement closed it meanwhile, a
    # later one; a batch beyond the open one is refused.
    batch_no: int
    received_at: float


@dataclass(slots=True)  # not frozen: built once per sale, and frozen __init__ costs ~0.2 us more
class SaleResult:
    """What recording a sale gave: its host RRN (field 37), or duplicate=True when the same
    (tid, stan, local_date) is already in the ledger (answered with 94)."""

    rrn: str
    duplicate: bool


@dataclass(frozen=True, slots=True)
class StoredSale:
    rrn: str
    tid: str
    stan: str
    local_date: str
    transmission: str
    amount: int
    currency: str
    auth_code: str
    test: bool
    account_version: int
    batch_no: int
    status: str  # "approved" or "reversed"
    batch_settled: bool


@dataclass(frozen=True, slots=True)
class Batch:
    """A terminal's batch: its sales settle together when a 0500 closes it (PROTOCOL.md 5.4).
    A terminal always has exactly one open batch; closing it opens the next number."""

    tid: str
    batch_no: int  # 1, 2, ...
    status: str  # "open" or "closed"
    opened_at: float
    closed_at: float | None


@dataclass(frozen=True, slots=True)
class BatchTotal:
    """The approved, unreversed sales (test sales too) of one batch that settle to one
    settlement-account version: their number and their amount in minor units."""

    account_version: int
    count: int
    amount: int


@dataclass(frozen=True, slots=True)
class SettlementLine:
    """What a closed batch settled to one settlement-account version: a line of the
    settlement report. The account number is sealed (with the host data key) and masked."""

    tid: str
    mid: str
    batch_no: int
    closed_at: float
    account_version: int
    sealed_account: bytes
    account_masked: str
    holder: str
    bank_code: str
    count: int
    amount: int


@dataclass(frozen=True, slots=True)
class RebindRequest:
    """A change of a terminal's settlement account: a 0300 submission (kind "rebind") or an
    acquirer's rollback (kind "rollback", which restores version ``restores`` as a new
    version). Its state is the state of the version it proposes."""

    rf: str  # 16-character reference
    tid: str
    version: int  # the settlement account version it proposes
    kind: str  # "rebind" or "rollback"
    operator_id: str  # the terminal operator, or the acquirer's user for a rollback
    stan: str  # field 11 of the 0300 ("" for a rollback)
    transmission: str  # field 7 of the 0300 ("" for a rollback)
    source: str  # "typed" (48 AC), "card" (35) or "acquirer"
    submitted_at: float
    state: str  # the version's state (read from settlement_accounts)
    decided_by: str  # reviewer, terminal operator (cancel), "auto"; "" while undecided
    decided_at: float | None
    note: str  # why it was rejected or cancelled
    restores: int | None  # the version a rollback restores


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One link of the append-only audit log: a state change, who made it, when and why.
    ``detail`` is canonical JSON (masked account numbers only); ``digest`` is the keyed
    BLAKE2b of the previous entry's digest and this entry's content."""

    seq: int  # 1, 2, ... without gaps
    at: float
    actor: str
    action: str
    tid: str
    subject: str  # an RF, or "v<N>" for a version
    detail: str
    prev_digest: bytes
    digest: bytes


def in_force(versions: Sequence[AccountVersion], now: float) -> AccountVersion | None:
    """The version sales settle to at ``now``: the latest of ``versions`` (oldest first) in one
    of IN_FORCE_STATES whose effective_from has passed. The one statement of the rule, for the
    store's ``current_account`` and for the host's cache of ``StoreTx.versions`` alike, so the
    two can never disagree."""
    for v in reversed(versions):
        if v.state in IN_FORCE_STATES and v.effective_from <= now:
            return v
    return None


def next_change(versions: Sequence[AccountVersion], now: float) -> float | None:
    """The earliest effective-from after ``now`` of an approved version: when the account in
    force will change next (a cache of :func:`in_force` must not outlive it)."""
    times = [v.effective_from for v in versions if v.state == "APPROVED" and v.effective_from > now]
    return min(times) if times else None
