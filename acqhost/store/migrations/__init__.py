"""Schema migrations of both backends: ``migrations.sqlite`` and ``migrations.postgres``.

Each backend has its own list of ``(version, script)``, applied in order by its ``migrate``,
every script in one transaction with the schema version it brings, so a migration is either
wholly applied or not at all. Versions start at 1 and increase by one; a published migration is
never edited (tests pin each script's digest), a change is a new script (``in_dialect`` lists
them for both dialects).

The tables, indexes and their comments are written once, here, with the words each dialect
fills in: its types for bytes, reals and 64-bit integers, how the RRN is numbered, how a flag is
kept. What only one dialect has (SQLite's trigger bodies; PostgreSQL's refusal function and its
TRUNCATE triggers) is in that dialect's module.

Secrets never have a clear column: account numbers exist only sealed (``sealed_account``), as a
keyed hash (``account_hash``) and masked; cards only as ``pan_masked``; session keys only sealed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from acqhost.store.base import SchemaVersionError

__all__ = (
    "COUNT_TOTALS",
    "REFUSALS",
    "TABLES_V1",
    "TABLES_V2",
    "V3",
    "V4",
    "V5",
    "V6",
    "V7",
    "Migration",
    "Refusal",
    "due",
    "in_dialect",
    "latest_of",
    "up_to_date",
)

Migration = tuple[int, str]  # (version, script)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A trigger refusing what the store never does to a table (PROTOCOL.md 5.3: history is
    not rewritten): its name, what it fires before, the message it raises."""

    name: str
    before: str
    message: str


# Each table's refusals, in the order the published scripts create them.
REFUSALS: dict[str, tuple[Refusal, ...]] = {
    "settlement_accounts": (
        Refusal(
            "settlement_accounts_no_rewrite",
            "UPDATE OF tid, version, sealed_account, account_hash, account_masked, holder, "
            "bank_code,\n    branch, created_by, reason, created_at ON settlement_accounts",
            "settlement account versions are never rewritten",
        ),
        Refusal(
            "settlement_accounts_no_delete",
            "DELETE ON settlement_accounts",
            "settlement account versions are never deleted",
        ),
    ),
    "sales": (
        Refusal(
            "sales_no_rewrite",
            "UPDATE OF rrn, tid, mid, stan, local_date, local_time, transmission, amount, "
            "currency,\n    pan_masked, auth_code, test, account_version, batch_no, received_at "
            "ON sales",
            "sales are never rewritten; only their status changes",
        ),
        Refusal("sales_no_delete", "DELETE ON sales", "sales are never deleted"),
    ),
    "rebind_requests": (
        Refusal(
            "rebind_requests_no_rewrite",
            "UPDATE OF rf, tid, version, kind, operator_id, stan, transmission, source, "
            "submitted_at,\n    restores ON rebind_requests",
            "rebind requests are never rewritten; only their decision is recorded",
        ),
        Refusal(
            "rebind_requests_no_delete",
            "DELETE ON rebind_requests",
            "rebind requests are never deleted",
        ),
    ),
    "audit_log": (
        Refusal("audit_log_no_update", "UPDATE ON audit_log", "the audit log is append-only"),
        Refusal("audit_log_no_delete", "DELETE ON audit_log", "the audit log is append-only"),
    ),
}

# Words: {blob}, {real}, {bigint} (column types), {rrn} (the sales key and its numbering),
# {test_flag} (the test column), {is_test} (its condition), {rrn_comment}; blocks:
# {refuse_function} (before the first table with refusals) and {<table>_refusals} (REFUSALS in
# the dialect's triggers).
TABLES_V1 = """
CREATE TABLE terminals (
    tid                 TEXT PRIMARY KEY,
    mid                 TEXT NOT NULL,
    merchant_name       TEXT NOT NULL,
    status              TEXT NOT NULL CHECK (status IN ('active', 'disabled')),
    identity_public_key {blob} NOT NULL,
    sale_limit          {bigint} NOT NULL CHECK (sale_limit >= 0),
    test_limit          {bigint} NOT NULL CHECK (test_limit >= 0),
    created_at          {real} NOT NULL
);

CREATE TABLE operators (
    tid           TEXT NOT NULL REFERENCES terminals (tid),
    operator_id   TEXT NOT NULL,
    password_hash {blob} NOT NULL,
    failures      INTEGER NOT NULL DEFAULT 0 CHECK (failures >= 0),
    PRIMARY KEY (tid, operator_id)
);

-- Session keys belong to the terminal, not to a TCP connection; only sealed forms are kept.
CREATE TABLE sessions (
    tid          TEXT PRIMARY KEY REFERENCES terminals (tid),
    sealed_rx    {blob} NOT NULL,
    sealed_tx    {blob} NOT NULL,
    signed_on_at {real} NOT NULL
);
{refuse_function}
-- Versioned terminal -> account mapping: every version is kept and only its state (and the
-- effective-from time fixed when a change is approved) may change; the triggers below refuse
-- anything else, so history cannot be rewritten in place.
CREATE TABLE settlement_accounts (
    tid            TEXT NOT NULL REFERENCES terminals (tid),
    version        INTEGER NOT NULL CHECK (version >= 1),
    sealed_account {blob} NOT NULL,
    account_hash   {blob} NOT NULL,
    account_masked TEXT NOT NULL,
    holder         TEXT NOT NULL,
    bank_code      TEXT NOT NULL,
    branch         TEXT NOT NULL,
    state          TEXT NOT NULL CHECK (state IN ('PENDING_REVIEW', 'APPROVED', 'ACTIVE',
                       'VERIFIED', 'REJECTED', 'CANCELLED', 'ROLLED_BACK')),
    effective_from {real} NOT NULL,
    created_by     TEXT NOT NULL,
    reason         TEXT NOT NULL,
    created_at     {real} NOT NULL,
    PRIMARY KEY (tid, version)
);

{settlement_accounts_refusals}
CREATE TABLE batches (
    tid       TEXT NOT NULL REFERENCES terminals (tid),
    batch_no  INTEGER NOT NULL CHECK (batch_no >= 1),
    status    TEXT NOT NULL CHECK (status IN ('open', 'closed')),
    opened_at {real} NOT NULL,
    closed_at {real},
    PRIMARY KEY (tid, batch_no)
);

-- At most one open batch per terminal.
CREATE UNIQUE INDEX batches_one_open ON batches (tid) WHERE status = 'open';

{rrn_comment}CREATE TABLE sales (
    rrn             {rrn},
    tid             TEXT NOT NULL REFERENCES terminals (tid),
    mid             TEXT NOT NULL,
    stan            TEXT NOT NULL,
    local_date      TEXT NOT NULL,
    local_time      TEXT NOT NULL,
    transmission    TEXT NOT NULL,
    amount          {bigint} NOT NULL,
    currency        TEXT NOT NULL,
    pan_masked      TEXT NOT NULL,
    auth_code       TEXT NOT NULL,
    test            {test_flag},
    account_version INTEGER NOT NULL,
    batch_no        INTEGER NOT NULL,
    status          TEXT NOT NULL DEFAULT 'approved' CHECK (status IN ('approved', 'reversed')),
    received_at     {real} NOT NULL,
    reversed_at     {real},
    UNIQUE (tid, stan, local_date),
    FOREIGN KEY (tid, batch_no) REFERENCES batches (tid, batch_no),
    FOREIGN KEY (tid, account_version) REFERENCES settlement_accounts (tid, version)
);

{sales_refusals}"""

TABLES_V2 = """
-- A change of a terminal's settlement account (PROTOCOL.md 5.3): a 0300 submission or an
-- acquirer's rollback, proposing one new settlement account version. Its state is that
-- version's state. Only the decision (who, when, why) is ever filled in later.
CREATE TABLE rebind_requests (
    rf           TEXT PRIMARY KEY,
    tid          TEXT NOT NULL REFERENCES terminals (tid),
    version      INTEGER NOT NULL,
    kind         TEXT NOT NULL CHECK (kind IN ('rebind', 'rollback')),
    operator_id  TEXT NOT NULL,
    stan         TEXT NOT NULL,
    transmission TEXT NOT NULL,
    source       TEXT NOT NULL CHECK (source IN ('typed', 'card', 'acquirer')),
    submitted_at {real} NOT NULL,
    decided_by   TEXT NOT NULL DEFAULT '',
    decided_at   {real},
    note         TEXT NOT NULL DEFAULT '',
    restores     INTEGER,
    UNIQUE (tid, version),
    FOREIGN KEY (tid, version) REFERENCES settlement_accounts (tid, version)
);

-- A retransmitted 0300 (same fields 41, 11 and 7) finds the request it created.
CREATE INDEX rebind_requests_message ON rebind_requests (tid, stan, transmission);

-- At most one open request (a version waiting for review or for its effective-from) per
-- terminal: two concurrent submissions yield exactly one.
CREATE UNIQUE INDEX settlement_accounts_one_open ON settlement_accounts (tid)
    WHERE state IN ('PENDING_REVIEW', 'APPROVED');

{rebind_requests_refusals}
-- Append-only, hash-chained log of every state change (acqhost.domain.audit). The triggers stop
-- accidents; `acqhost audit verify` detects deliberate edits made around them.
CREATE TABLE audit_log (
    seq         {bigint} PRIMARY KEY CHECK (seq >= 1),
    at          {real} NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    tid         TEXT NOT NULL,
    subject     TEXT NOT NULL,
    detail      TEXT NOT NULL,
    prev_digest {blob} NOT NULL,
    digest      {blob} NOT NULL
);

{audit_log_refusals}
-- The first approved test sale on a version verifies it.
CREATE INDEX sales_test ON sales (tid, account_version) WHERE {is_test};
"""

# Every host process asks once a second for the approved versions whose effective-from has
# passed: an index of just those, so the question does not read every version of every
# terminal. The same words in both dialects.
V3 = """
CREATE INDEX settlement_accounts_due ON settlement_accounts (effective_from)
    WHERE state = 'APPROVED';
"""

# The outbox of settlement updates to the banks (PROTOCOL.md 6; acqhost.store.outbox), and the
# leases that let one process at a time deliver to each bank. Words: {rrn} (the id is numbered
# as the RRN is: it becomes the advice's field 37, 12 digits), {blob}, {real}.
V4 = """
-- One advice to a bank, queued in the transaction of the change that causes it (an account
-- version becoming ACTIVE: 0320; a batch closing: a 0520 per settlement account) and kept
-- once delivered. Its fields exist only sealed with the host data key (48 AC is a full account
-- number). A terminal's advices are delivered in the order of their ids.
CREATE TABLE outbox (
    id              {rrn},
    tid             TEXT NOT NULL REFERENCES terminals (tid),
    mti             TEXT NOT NULL CHECK (mti IN ('0320', '0520')),
    bank_code       TEXT NOT NULL,
    created_at      {real} NOT NULL,
    sealed_fields   {blob} NOT NULL,
    state           TEXT NOT NULL DEFAULT 'queued'
                        CHECK (state IN ('queued', 'delivered', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at {real} NOT NULL,
    last_error      TEXT NOT NULL DEFAULT '',
    last_error_at   {real},
    delivered_at    {real},
    ack_code        TEXT NOT NULL DEFAULT ''
);

-- A bank's next deliverable advices, oldest first...
CREATE INDEX outbox_queued ON outbox (bank_code, id) WHERE state = 'queued';
-- ...each once no earlier advice of its terminal is still queued.
CREATE INDEX outbox_queued_terminal ON outbox (tid, id) WHERE state = 'queued';
-- The dead letters, counted and retried per bank code.
CREATE INDEX outbox_dead ON outbox (bank_code, id) WHERE state = 'dead';

-- Who delivers to a bank: one owner at a time across every process and machine, until its
-- lease expires unless renewed.
CREATE TABLE bank_leases (
    bank       TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    expires_at {real} NOT NULL
);
"""

# The sign-ons accepted, to refuse replays (PROTOCOL.md 4.2; acqhost.domain.signon). Words:
# {real}.
V5 = """
-- A terminal's accepted sign-ons: one with a field 7 (transmission) and STAN already here is a
-- replay, refused after a restart and by every process sharing the store; of two processes
-- accepting the same one at once, only one inserts it. Written in the transaction that stores
-- the sign-on's session keys; a terminal's rows too old for a replay of them to be fresh are
-- deleted when it signs on again.
CREATE TABLE signons (
    tid          TEXT NOT NULL REFERENCES terminals (tid),
    transmission TEXT NOT NULL,
    stan         TEXT NOT NULL,
    accepted_at  {real} NOT NULL,
    PRIMARY KEY (tid, transmission, stan)
);
"""

# A 0500's totals (``batch_totals``, in the ledger writer's transaction) and the settlement
# report read the sales of one batch of one terminal: without this index, the only way in was
# UNIQUE (tid, stan, local_date), every sale the terminal ever made (benchmarks/README.md,
# "Ledger growth"). The same words in both dialects. Migration 7 drops it for totals kept per
# batch.
V6 = """
CREATE INDEX sales_batch ON sales (tid, batch_no);
"""


# Each batch's totals counted from its sales (rows of sales in a closed batch count in
# settled_totals): what migration 7 starts from, and what a fill of the ledger that bypasses
# the triggers (PostgreSQL's replica mode) does after it.
COUNT_TOTALS = """INSERT INTO open_totals (tid, batch_no, account_version, sold, total)
SELECT s.tid, s.batch_no, s.account_version, COUNT(*), SUM(s.amount)
FROM sales AS s JOIN batches AS b ON b.tid = s.tid AND b.batch_no = s.batch_no
WHERE s.status = 'approved' AND b.status = 'open'
GROUP BY s.tid, s.batch_no, s.account_version;

INSERT INTO settled_totals (tid, batch_no, account_version, sold, total)
SELECT s.tid, s.batch_no, s.account_version, COUNT(*), SUM(s.amount)
FROM sales AS s JOIN batches AS b ON b.tid = s.tid AND b.batch_no = s.batch_no
WHERE s.status = 'approved' AND b.status = 'closed'
GROUP BY s.tid, s.batch_no, s.account_version;
"""

# A batch's totals kept as its sales are recorded, instead of counted from its sales (which
# needed migration 6's index: one more entry a sale, on a page of each terminal's, benchmarks/
# README.md, "The ledger writer"). Words: {bigint}, {without_rowid} (SQLite's table kept in its
# key's order), {lock_ledger} (PostgreSQL: no sale recorded by another process between the
# counting and the triggers), {totals_triggers} (the dialect's triggers).
_TOTALS_COLUMNS = """(
    tid             TEXT NOT NULL,
    batch_no        INTEGER NOT NULL,
    account_version INTEGER NOT NULL,
    sold            {bigint} NOT NULL,
    total           {bigint} NOT NULL,
    PRIMARY KEY (tid, batch_no, account_version)
){without_rowid};"""

V7 = """
-- The approved, unreversed sales of each open batch per settlement-account version: their
-- number and amount, kept by the triggers below in the transaction that records or reverses a
-- sale, so a 0500's totals are a row a version whatever the size of the ledger. Only open
-- batches have rows here, one batch a terminal, so the rows a commit of many terminals'
-- sales changes share a few pages.
CREATE TABLE open_totals {totals_columns}

-- The same of each closed batch, moved here from open_totals when the batch closes (and kept
-- exact should one of its sales ever change): what the settlement report reads.
CREATE TABLE settled_totals {totals_columns}
{lock_ledger}
{count_totals}{totals_triggers}
DROP INDEX sales_batch;
"""


def in_dialect(
    words: Mapping[str, str], triggers: Callable[[str, Sequence[Refusal]], str]
) -> list[Migration]:
    """Every migration in one dialect's ``words``, with ``triggers(table, refusals)`` written
    for each table of REFUSALS."""
    blocks = {f"{table}_refusals": triggers(table, r) for table, r in REFUSALS.items()}
    filled = {**words, **blocks}
    return [
        (1, TABLES_V1.format_map(filled)),
        (2, TABLES_V2.format_map(filled)),
        (3, V3),
        (4, V4.format_map(filled)),
        (5, V5.format_map(filled)),
        (6, V6),
        (
            7,
            V7.format_map(
                {
                    **filled,
                    "totals_columns": _TOTALS_COLUMNS.format_map(filled),
                    "count_totals": COUNT_TOTALS,
                }
            ),
        ),
    ]


def latest_of(migrations: Sequence[Migration]) -> int:
    """The schema version a database has once every one of ``migrations`` is applied."""
    return migrations[-1][0] if migrations else 0


def up_to_date(found: int, latest: int) -> bool:
    """Whether a database at schema version ``found`` needs no migration. SchemaVersionError
    if a newer acqhost wrote it: it is refused rather than misread."""
    if found > latest:
        raise SchemaVersionError(found, latest)
    return found == latest


def due(current: int, version: int, latest: int) -> bool:
    """Whether migration ``version`` is to be applied to a database that, read under the
    migration lock, is at ``current``: False once another process has applied it."""
    if up_to_date(current, latest) or current >= version:
        return False
    if current != version - 1:
        raise RuntimeError(f"migration {version} found schema version {current}")
    return True
