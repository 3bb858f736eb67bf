"""The store interface: what the pipeline, the CLI and the server need from durable storage.

SQLite (``acqhost.store.sqlite``) is the default; a PostgreSQL backend implements the same
protocol. Secrets never reach the store in clear: session keys and account numbers arrive
already sealed (``acqhost.crypto``) and leave sealed; the store keeps masked forms and keyed
hashes for display and equality.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from acqhost.errors import AcqHostError

__all__ = (
    "IN_FORCE_STATES",
    "TERMINAL_STATUSES",
    "AccountVersion",
    "NewAccount",
    "Operator",
    "SaleRecord",
    "SaleResult",
    "SchemaVersionError",
    "Session",
    "Store",
    "StoredSale",
    "Terminal",
    "format_rrn",
)

TERMINAL_STATUSES = frozenset({"active", "disabled"})
# The account states in which a version is the one sales settle to (once effective):
# VERIFIED is ACTIVE plus a first approved test sale.
IN_FORCE_STATES = ("ACTIVE", "VERIFIED")


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
    state: str  # "ACTIVE" for version 1; the rebind states arrive with 0300 support
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
    batch_no: int
    received_at: float


@dataclass(frozen=True, slots=True)
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
    ) -> None:
        """Register a terminal with settlement account version 1 (ACTIVE, effective now) and
        batch 1 open. ValueError if the tid exists."""

    def get_terminal(self, tid: str) -> Terminal | None: ...

    def list_terminals(self) -> list[Terminal]: ...

    def set_terminal_status(self, tid: str, status: str) -> bool:
        """False if there is no such terminal."""

    # -- sessions --------------------------------------------------------------------------
    def save_session(self, session: Session) -> None:
        """Insert or replace the terminal's session (a new sign-on replaces the old keys)."""

    def get_session(self, tid: str) -> Session | None: ...

    def drop_session(self, tid: str) -> None: ...

    # -- settlement accounts ---------------------------------------------------------------
    def current_account(self, tid: str, now: float) -> AccountVersion | None:
        """The version in force: the latest ACTIVE (or VERIFIED, which is ACTIVE plus a first
        approved test sale) version whose effective_from <= now."""

    def account_history(self, tid: str) -> list[AccountVersion]: ...

    # -- ledger ----------------------------------------------------------------------------
    def open_batch(self, tid: str) -> int:
        """The terminal's open batch number."""

    def record_sales(self, sales: Sequence[SaleRecord]) -> list[SaleResult]:
        """Insert many approved sales in ONE transaction (one fsync), in order; a sale whose
        (tid, stan, local_date) is already stored (or repeated earlier in ``sales``) is not
        inserted and gets duplicate=True. RRNs are unique 12-digit strings assigned here."""

    def sale_exists(self, tid: str, stan: str, local_date: str) -> bool:
        """Whether (tid, stan, local_date) already has a sale: the duplicate pre-check."""

    def find_sale(self, tid: str, stan: str, transmission: str) -> StoredSale | None:
        """The sale a reversal names: same terminal, original STAN and original field 7."""

    def reverse_sale(self, rrn: str) -> bool:
        """Mark the sale reversed; False if it was already reversed (idempotent)."""

    def sales(self, tid: str) -> list[StoredSale]: ...
