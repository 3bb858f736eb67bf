"""PostgreSQL schema migrations, in order.

Each entry is ``(version, script)``, the PostgreSQL twin of ``acqhost.store.migrations``: the
same tables, columns, constraints and refusals, in PostgreSQL's types. ``acqhost.store.postgres``
applies every script whose version is above the one-row ``schema_version`` table's and advances
it in the same transaction, under a transaction-scoped advisory lock, so a migration is either
wholly applied or not at all, and processes opening a new database together apply it once.
Versions start at 1 and increase by one; a published migration is never edited, a change is a
new entry (and the SQLite list gets its own).

Secrets never have a clear column: account numbers exist only sealed (``sealed_account``), as a
keyed hash (``account_hash``) and masked; cards only as ``pan_masked``; session keys only sealed.
"""

from __future__ import annotations

__all__ = ("MIGRATIONS", "SCHEMA_VERSION_TABLE", "latest_version")

# Created (in the first migration's transaction) before any migration runs: one row, the
# version of the schema. Not itself a migration so that it can say which migrations ran.
SCHEMA_VERSION_TABLE = """
CREATE TABLE schema_version (
    singleton BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    version   INTEGER NOT NULL CHECK (version >= 0)
);
INSERT INTO schema_version (version) VALUES (0);
"""

_V1 = """
CREATE TABLE terminals (
    tid                 TEXT PRIMARY KEY,
    mid                 TEXT NOT NULL,
    merchant_name       TEXT NOT NULL,
    status              TEXT NOT NULL CHECK (status IN ('active', 'disabled')),
    identity_public_key BYTEA NOT NULL,
    sale_limit          BIGINT NOT NULL CHECK (sale_limit >= 0),
    test_limit          BIGINT NOT NULL CHECK (test_limit >= 0),
    created_at          DOUBLE PRECISION NOT NULL
);

CREATE TABLE operators (
    tid           TEXT NOT NULL REFERENCES terminals (tid),
    operator_id   TEXT NOT NULL,
    password_hash BYTEA NOT NULL,
    failures      INTEGER NOT NULL DEFAULT 0 CHECK (failures >= 0),
    PRIMARY KEY (tid, operator_id)
);

-- Session keys belong to the terminal, not to a TCP connection; only sealed forms are kept.
CREATE TABLE sessions (
    tid          TEXT PRIMARY KEY REFERENCES terminals (tid),
    sealed_rx    BYTEA NOT NULL,
    sealed_tx    BYTEA NOT NULL,
    signed_on_at DOUBLE PRECISION NOT NULL
);

-- Raises the message given as the trigger's argument: the refusals below (class 23, so the
-- driver reports an integrity error, as SQLite's RAISE(ABORT) does).
CREATE FUNCTION acqhost_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%', TG_ARGV[0] USING ERRCODE = 'restrict_violation';
END;
$$;

-- Versioned terminal -> account mapping: every version is kept and only its state (and the
-- effective-from time fixed when a change is approved) may change; the triggers below refuse
-- anything else, so history cannot be rewritten in place.
CREATE TABLE settlement_accounts (
    tid            TEXT NOT NULL REFERENCES terminals (tid),
    version        INTEGER NOT NULL CHECK (version >= 1),
    sealed_account BYTEA NOT NULL,
    account_hash   BYTEA NOT NULL,
    account_masked TEXT NOT NULL,
    holder         TEXT NOT NULL,
    bank_code      TEXT NOT NULL,
    branch         TEXT NOT NULL,
    state          TEXT NOT NULL CHECK (state IN ('PENDING_REVIEW', 'APPROVED', 'ACTIVE',
                       'VERIFIED', 'REJECTED', 'CANCELLED', 'ROLLED_BACK')),
    effective_from DOUBLE PRECISION NOT NULL,
    created_by     TEXT NOT NULL,
    reason         TEXT NOT NULL,
    created_at     DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (tid, version)
);

CREATE TRIGGER settlement_accounts_no_rewrite
BEFORE UPDATE OF tid, version, sealed_account, account_hash, account_masked, holder, bank_code,
    branch, created_by, reason, created_at ON settlement_accounts
FOR EACH ROW EXECUTE FUNCTION acqhost_refuse('settlement account versions are never rewritten');

CREATE TRIGGER settlement_accounts_no_delete
BEFORE DELETE ON settlement_accounts
FOR EACH ROW EXECUTE FUNCTION acqhost_refuse('settlement account versions are never deleted');

-- TRUNCATE skips row triggers; SQLite has no TRUNCATE, PostgreSQL needs its own refusal.
CREATE TRIGGER settlement_accounts_no_truncate
BEFORE TRUNCATE ON settlement_accounts
FOR EACH STATEMENT EXECUTE FUNCTION acqhost_refuse('settlement account versions are never deleted');

CREATE TABLE batches (
    tid       TEXT NOT NULL REFERENCES terminals (tid),
    batch_no  INTEGER NOT NULL CHECK (batch_no >= 1),
    status    TEXT NOT NULL CHECK (status IN ('open', 'closed')),
    opened_at DOUBLE PRECISION NOT NULL,
    closed_at DOUBLE PRECISION,
    PRIMARY KEY (tid, batch_no)
);

-- At most one open batch per terminal.
CREATE UNIQUE INDEX batches_one_open ON batches (tid) WHERE status = 'open';

-- The RRN comes from an identity sequence, zero-padded to 12 digits: unique across every
-- process sharing the database and never handed out twice (a duplicate that loses its
-- ON CONFLICT still spends a number: RRNs have gaps, as they may). MAXVALUE keeps it within
-- field 37's 12 digits. UNIQUE (tid, stan, local_date) is the duplicate-transmission rule (94),
-- durable across restarts. Cards are kept masked only.
CREATE TABLE sales (
    rrn             BIGINT GENERATED ALWAYS AS IDENTITY (MAXVALUE 999999999999) PRIMARY KEY,
    tid             TEXT NOT NULL REFERENCES terminals (tid),
    mid             TEXT NOT NULL,
    stan            TEXT NOT NULL,
    local_date      TEXT NOT NULL,
    local_time      TEXT NOT NULL,
    transmission    TEXT NOT NULL,
    amount          BIGINT NOT NULL,
    currency        TEXT NOT NULL,
    pan_masked      TEXT NOT NULL,
    auth_code       TEXT NOT NULL,
    test            BOOLEAN NOT NULL,
    account_version INTEGER NOT NULL,
    batch_no        INTEGER NOT NULL,
    status          TEXT NOT NULL DEFAULT 'approved' CHECK (status IN ('approved', 'reversed')),
    received_at     DOUBLE PRECISION NOT NULL,
    reversed_at     DOUBLE PRECISION,
    UNIQUE (tid, stan, local_date),
    FOREIGN KEY (tid, batch_no) REFERENCES batches (tid, batch_no),
    FOREIGN KEY (tid, account_version) REFERENCES settlement_accounts (tid, version)
);

CREATE TRIGGER sales_no_rewrite
BEFORE UPDATE OF rrn, tid, mid, stan, local_date, local_time, transmission, amount, currency,
    pan_masked, auth_code, test, account_version, batch_no, received_at ON sales
FOR EACH ROW
EXECUTE FUNCTION acqhost_refuse('sales are never rewritten; only their status changes');

CREATE TRIGGER sales_no_delete
BEFORE DELETE ON sales
FOR EACH ROW EXECUTE FUNCTION acqhost_refuse('sales are never deleted');

CREATE TRIGGER sales_no_truncate
BEFORE TRUNCATE ON sales
FOR EACH STATEMENT EXECUTE FUNCTION acqhost_refuse('sales are never deleted');
"""

_V2 = """
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
    submitted_at DOUBLE PRECISION NOT NULL,
    decided_by   TEXT NOT NULL DEFAULT '',
    decided_at   DOUBLE PRECISION,
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

CREATE TRIGGER rebind_requests_no_rewrite
BEFORE UPDATE OF rf, tid, version, kind, operator_id, stan, transmission, source, submitted_at,
    restores ON rebind_requests
FOR EACH ROW EXECUTE FUNCTION
    acqhost_refuse('rebind requests are never rewritten; only their decision is recorded');

CREATE TRIGGER rebind_requests_no_delete
BEFORE DELETE ON rebind_requests
FOR EACH ROW EXECUTE FUNCTION acqhost_refuse('rebind requests are never deleted');

CREATE TRIGGER rebind_requests_no_truncate
BEFORE TRUNCATE ON rebind_requests
FOR EACH STATEMENT EXECUTE FUNCTION acqhost_refuse('rebind requests are never deleted');

-- Append-only, hash-chained log of every state change (acqhost.domain.audit). The triggers stop
-- accidents; `acqhost audit verify` detects deliberate edits made around them.
CREATE TABLE audit_log (
    seq         BIGINT PRIMARY KEY CHECK (seq >= 1),
    at          DOUBLE PRECISION NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    tid         TEXT NOT NULL,
    subject     TEXT NOT NULL,
    detail      TEXT NOT NULL,
    prev_digest BYTEA NOT NULL,
    digest      BYTEA NOT NULL
);

CREATE TRIGGER audit_log_no_update
BEFORE UPDATE ON audit_log
FOR EACH ROW EXECUTE FUNCTION acqhost_refuse('the audit log is append-only');

CREATE TRIGGER audit_log_no_delete
BEFORE DELETE ON audit_log
FOR EACH ROW EXECUTE FUNCTION acqhost_refuse('the audit log is append-only');

CREATE TRIGGER audit_log_no_truncate
BEFORE TRUNCATE ON audit_log
FOR EACH STATEMENT EXECUTE FUNCTION acqhost_refuse('the audit log is append-only');

-- The first approved test sale on a version verifies it.
CREATE INDEX sales_test ON sales (tid, account_version) WHERE test;
"""

# Every host process asks once a second for the approved versions whose effective-from has
# passed: an index of just those, so the question does not read every version of every
# terminal.
_V3 = """
CREATE INDEX settlement_accounts_due ON settlement_accounts (effective_from)
    WHERE state = 'APPROVED';
"""

MIGRATIONS: list[tuple[int, str]] = [
    (1, _V1),
    (2, _V2),
    (3, _V3),
]


def latest_version() -> int:
    """The schema version a database has once every migration is applied."""
    return MIGRATIONS[-1][0] if MIGRATIONS else 0
