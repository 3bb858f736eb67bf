"""SQLite schema migrations, in order.

Each entry is ``(version, script)``. ``acqhost.store.sqlite`` applies every script whose version
is above the database's ``PRAGMA user_version`` and advances ``user_version`` in the same
transaction, so a migration is either wholly applied or not at all. Versions start at 1 and
increase by one; a published migration is never edited, a change is a new entry.

Secrets never have a clear column: account numbers exist only sealed (``sealed_account``), as a
keyed hash (``account_hash``) and masked; cards only as ``pan_masked``; session keys only sealed.
"""

from __future__ import annotations

import sqlite3

__all__ = ("MIGRATIONS", "latest_version", "statements")

_V1 = """
CREATE TABLE terminals (
    tid                 TEXT PRIMARY KEY,
    mid                 TEXT NOT NULL,
    merchant_name       TEXT NOT NULL,
    status              TEXT NOT NULL CHECK (status IN ('active', 'disabled')),
    identity_public_key BLOB NOT NULL,
    sale_limit          INTEGER NOT NULL CHECK (sale_limit >= 0),
    test_limit          INTEGER NOT NULL CHECK (test_limit >= 0),
    created_at          REAL NOT NULL
);

CREATE TABLE operators (
    tid           TEXT NOT NULL REFERENCES terminals (tid),
    operator_id   TEXT NOT NULL,
    password_hash BLOB NOT NULL,
    failures      INTEGER NOT NULL DEFAULT 0 CHECK (failures >= 0),
    PRIMARY KEY (tid, operator_id)
);

-- Session keys belong to the terminal, not to a TCP connection; only sealed forms are kept.
CREATE TABLE sessions (
    tid          TEXT PRIMARY KEY REFERENCES terminals (tid),
    sealed_rx    BLOB NOT NULL,
    sealed_tx    BLOB NOT NULL,
    signed_on_at REAL NOT NULL
);

-- Versioned terminal -> account mapping: every version is kept and only its state (and the
-- effective-from time fixed when a change is approved) may change; the triggers below refuse
-- anything else, so history cannot be rewritten in place.
CREATE TABLE settlement_accounts (
    tid            TEXT NOT NULL REFERENCES terminals (tid),
    version        INTEGER NOT NULL CHECK (version >= 1),
    sealed_account BLOB NOT NULL,
    account_hash   BLOB NOT NULL,
    account_masked TEXT NOT NULL,
    holder         TEXT NOT NULL,
    bank_code      TEXT NOT NULL,
    branch         TEXT NOT NULL,
    state          TEXT NOT NULL CHECK (state IN ('PENDING_REVIEW', 'APPROVED', 'ACTIVE',
                       'VERIFIED', 'REJECTED', 'CANCELLED', 'ROLLED_BACK')),
    effective_from REAL NOT NULL,
    created_by     TEXT NOT NULL,
    reason         TEXT NOT NULL,
    created_at     REAL NOT NULL,
    PRIMARY KEY (tid, version)
);

CREATE TRIGGER settlement_accounts_no_rewrite
BEFORE UPDATE OF tid, version, sealed_account, account_hash, account_masked, holder, bank_code,
    branch, created_by, reason, created_at ON settlement_accounts
BEGIN
    SELECT RAISE(ABORT, 'settlement account versions are never rewritten');
END;

CREATE TRIGGER settlement_accounts_no_delete
BEFORE DELETE ON settlement_accounts
BEGIN
    SELECT RAISE(ABORT, 'settlement account versions are never deleted');
END;

CREATE TABLE batches (
    tid       TEXT NOT NULL REFERENCES terminals (tid),
    batch_no  INTEGER NOT NULL CHECK (batch_no >= 1),
    status    TEXT NOT NULL CHECK (status IN ('open', 'closed')),
    opened_at REAL NOT NULL,
    closed_at REAL,
    PRIMARY KEY (tid, batch_no)
);

-- At most one open batch per terminal.
CREATE UNIQUE INDEX batches_one_open ON batches (tid) WHERE status = 'open';

-- The RRN is the rowid, zero-padded to 12 digits: unique across every process sharing the
-- file. AUTOINCREMENT so that a rowid is never handed out twice, even after a delete.
-- UNIQUE (tid, stan, local_date) is the duplicate-transmission rule (94), durable across
-- restarts. Cards are kept masked only.
CREATE TABLE sales (
    rrn             INTEGER PRIMARY KEY AUTOINCREMENT,
    tid             TEXT NOT NULL REFERENCES terminals (tid),
    mid             TEXT NOT NULL,
    stan            TEXT NOT NULL,
    local_date      TEXT NOT NULL,
    local_time      TEXT NOT NULL,
    transmission    TEXT NOT NULL,
    amount          INTEGER NOT NULL,
    currency        TEXT NOT NULL,
    pan_masked      TEXT NOT NULL,
    auth_code       TEXT NOT NULL,
    test            INTEGER NOT NULL CHECK (test IN (0, 1)),
    account_version INTEGER NOT NULL,
    batch_no        INTEGER NOT NULL,
    status          TEXT NOT NULL DEFAULT 'approved' CHECK (status IN ('approved', 'reversed')),
    received_at     REAL NOT NULL,
    reversed_at     REAL,
    UNIQUE (tid, stan, local_date),
    FOREIGN KEY (tid, batch_no) REFERENCES batches (tid, batch_no),
    FOREIGN KEY (tid, account_version) REFERENCES settlement_accounts (tid, version)
);

CREATE TRIGGER sales_no_rewrite
BEFORE UPDATE OF rrn, tid, mid, stan, local_date, local_time, transmission, amount, currency,
    pan_masked, auth_code, test, account_version, batch_no, received_at ON sales
BEGIN
    SELECT RAISE(ABORT, 'sales are never rewritten; only their status changes');
END;

CREATE TRIGGER sales_no_delete
BEFORE DELETE ON sales
BEGIN
    SELECT RAISE(ABORT, 'sales are never deleted');
END;
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
    submitted_at REAL NOT NULL,
    decided_by   TEXT NOT NULL DEFAULT '',
    decided_at   REAL,
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
BEGIN
    SELECT RAISE(ABORT, 'rebind requests are never rewritten; only their decision is recorded');
END;

CREATE TRIGGER rebind_requests_no_delete
BEFORE DELETE ON rebind_requests
BEGIN
    SELECT RAISE(ABORT, 'rebind requests are never deleted');
END;

-- Append-only, hash-chained log of every state change (acqhost.domain.audit). The triggers stop
-- accidents; `acqhost audit verify` detects deliberate edits made around them.
CREATE TABLE audit_log (
    seq         INTEGER PRIMARY KEY CHECK (seq >= 1),
    at          REAL NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    tid         TEXT NOT NULL,
    subject     TEXT NOT NULL,
    detail      TEXT NOT NULL,
    prev_digest BLOB NOT NULL,
    digest      BLOB NOT NULL
);

CREATE TRIGGER audit_log_no_update
BEFORE UPDATE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END;

CREATE TRIGGER audit_log_no_delete
BEFORE DELETE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END;

-- The first approved test sale on a version verifies it.
CREATE INDEX sales_test ON sales (tid, account_version) WHERE test = 1;
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


def statements(script: str) -> list[str]:
    """Split a script into complete SQL statements (trigger bodies and quoted ``;`` included).

    ``sqlite3.Cursor.executescript`` would commit before running, so migrations run statement
    by statement inside the caller's transaction instead.
    """
    result: list[str] = []
    buffer = ""
    for piece in script.split(";"):
        buffer += piece + ";"
        if sqlite3.complete_statement(buffer):
            text = buffer.strip()
            if _has_sql(text):
                result.append(text)
            buffer = ""
    if _has_sql(buffer.rstrip(";").strip()):
        raise ValueError(f"incomplete SQL statement at the end of a migration: {buffer!r}")
    return result


def _has_sql(text: str) -> bool:
    """True if ``text`` holds more than comments, whitespace and semicolons."""
    lines = (line.split("--", 1)[0] for line in text.splitlines())
    return any(line.strip(" \t;") for line in lines)
