"""Every SQL statement of the store, once (the outbox's in ``acqhost.store.outbox``).

The statements are written with ``?`` placeholders in the SQL that SQLite and PostgreSQL both
speak (``INSERT ... ON CONFLICT`` for duplicates and upserts, ``excluded.``, ``LIMIT``). What
differs is in a :class:`~acqhost.store.dialect.Dialect`: how a parameter is written, the
collation that sorts by bytes, and locking: PostgreSQL locks a terminal's row (``FOR UPDATE``)
and the audit chain (an advisory lock) where SQLite's ``BEGIN IMMEDIATE`` already holds the
database's one write lock. The only statements written for one dialect are how each batches the
sales of ``record_sales``.

:class:`SQLTx` runs them over one open transaction of either backend: the ``StoreTx`` of the
rebind flow, and what each ``Store`` method does in a transaction of its own
(``acqhost.store.sqlstore``). A backend subclasses it to name its dialect and its batching.
SQLTx takes the statements of batches and settlement from ``acqhost.store.batches`` (kept
apart for this module's size).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, cast

from acqhost.store.base import (
    AccountVersion,
    AuditEntry,
    NewAccount,
    Operator,
    RebindRequest,
    SaleRecord,
    SaleResult,
    Session,
    StoredSale,
    Terminal,
    format_rrn,
)
from acqhost.store.batches import BatchStatements
from acqhost.store.dialect import (
    AUDIT_LOCK,
    MIGRATION_LOCK,
    POSTGRES,
    SQLITE,
    Cursor,
    Dialect,
    Execute,
)
from acqhost.store.outbox import OutboxSQL

__all__ = (
    "AUDIT_LOCK",
    "INSERT_SALE",
    "INSERT_SALES_FROM_ARRAYS",
    "MIGRATION_LOCK",
    "POSTGRES",
    "SQLITE",
    "STORED_SALES_FROM_ARRAYS",
    "Cursor",
    "Dialect",
    "Execute",
    "SQLTx",
    "SaleKey",
)

SaleKey = tuple[str, str, str]  # (tid, stan, local_date): the duplicate key

TERMINAL_COLUMNS = (
    "tid, mid, merchant_name, status, identity_public_key, sale_limit, test_limit, created_at"
)
ACCOUNT_COLUMNS = (
    "tid, version, sealed_account, account_hash, account_masked, holder, bank_code, branch, "
    "state, effective_from, created_by, reason, created_at"
)
SALE_COLUMNS = (
    "tid, mid, stan, local_date, local_time, transmission, amount, currency, pan_masked, "
    "auth_code, test, account_version, batch_no, received_at"
)
SALE_SELECT = (
    "SELECT s.rrn, s.tid, s.stan, s.local_date, s.transmission, s.amount, s.currency, "
    "s.auth_code, s.test, s.account_version, s.batch_no, s.status, b.status = 'closed' "
    "FROM sales AS s JOIN batches AS b ON b.tid = s.tid AND b.batch_no = s.batch_no "
)
REQUEST_SELECT = (
    "SELECT r.rf, r.tid, r.version, r.kind, r.operator_id, r.stan, r.transmission, r.source, "
    "r.submitted_at, a.state, r.decided_by, r.decided_at, r.note, r.restores "
    "FROM rebind_requests AS r "
    "JOIN settlement_accounts AS a ON a.tid = r.tid AND a.version = r.version "
)
AUDIT_COLUMNS = "seq, at, actor, action, tid, subject, detail, prev_digest, digest"
SALE_EXISTS = "SELECT 1 FROM sales WHERE tid = ? AND stan = ? AND local_date = ?"
STORED_SALE = "SELECT rrn FROM sales WHERE tid = ? AND stan = ? AND local_date = ?"

# A sale goes to its terminal's open batch: the one the host named or, when a settlement has
# closed that meanwhile, the next; a batch beyond the open one gives NULL (refused). It never
# joins a batch already settled: on PostgreSQL it waits for a settlement closing its batch
# (FOR KEY SHARE against the settlement's FOR UPDATE), then finds it closed and fails.
# SQLite's batching: one sale a statement, whose rowcount and lastrowid say what became of it
# (parameters: the columns, with the tid again before the batch).
INSERT_SALE = (
    f"INSERT INTO sales ({SALE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
    "(SELECT batch_no FROM batches WHERE tid = ? AND status = 'open' AND batch_no >= ?), ?) "
    "ON CONFLICT (tid, stan, local_date) DO NOTHING"
)
# PostgreSQL's batching: every sale of a call in one statement (one round trip), one array a
# column, unnested in order, so that the identity hands out RRNs in the order of the call.
INSERT_SALES_FROM_ARRAYS = (
    f"INSERT INTO sales ({SALE_COLUMNS}) SELECT tid, mid, stan, local_date, local_time, "
    "transmission, amount, currency, pan_masked, auth_code, test, account_version, "
    "(SELECT b.batch_no FROM batches AS b WHERE b.tid = input.tid AND b.status = 'open' "
    "AND b.batch_no >= input.batch_no FOR KEY SHARE), received_at "
    "FROM unnest(?::text[], ?::text[], ?::text[], ?::text[], ?::text[], ?::text[], "
    "?::bigint[], ?::text[], ?::text[], ?::text[], ?::boolean[], ?::integer[], "
    f"?::integer[], ?::double precision[]) WITH ORDINALITY AS input ({SALE_COLUMNS}, ord) "
    "ORDER BY ord "
    "ON CONFLICT (tid, stan, local_date) DO NOTHING "
    "RETURNING rrn, tid, stan, local_date"
)
# ...and the RRNs of the keys already stored, in one statement too.
STORED_SALES_FROM_ARRAYS = (
    "SELECT s.rrn, s.tid, s.stan, s.local_date FROM sales AS s "
    "JOIN unnest(?::text[], ?::text[], ?::text[]) AS k (tid, stan, local_date) "
    "ON s.tid = k.tid AND s.stan = k.stan AND s.local_date = k.local_date"
)


class SQLTx(BatchStatements, OutboxSQL):
    """``StoreTx`` over one open transaction of either SQL backend, with the statements of the
    ``Store`` methods besides.

    A backend's subclass names its :attr:`dialect` and implements :meth:`_insert_sales`; it is
    built on the driver's ``execute`` of the transaction (or, for a store's reads, of a
    statement that is a transaction of its own). What hosts cache and the transaction changed
    is collected in :attr:`changed` where the dialect announces it. It keeps no other state:
    a backend may run every transaction of a connection through one.
    """

    __slots__ = ("_execute", "_writing", "changed")

    dialect: ClassVar[Dialect]
    _execute: Execute

    def __init__(self, execute: Execute, *, write: bool) -> None:
        self._execute = self.dialect.bind(execute)
        self._writing = write
        # (kind, tid): "terminal", "session" or "account" of a terminal, changed here.
        self.changed: set[tuple[str, str]] = set()

    def _note(self, kind: str, tid: str) -> None:
        if self.dialect.announces:
            self.changed.add((kind, tid))

    def _one(self, sql: str, params: tuple[Any, ...]) -> Any:
        return self._execute(sql, params).fetchone()

    def _all(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        return self._execute(sql, params).fetchall()

    def lock_terminal(self, tid: str) -> None:
        """Make the other writers of this terminal wait for this transaction to end."""
        if self.dialect.lock_terminal is not None:
            self._execute(self.dialect.lock_terminal, (tid,))

    # -- terminals and operators -----------------------------------------------------------
    def terminal(self, tid: str) -> Terminal | None:
        row = self._one(f"SELECT {TERMINAL_COLUMNS} FROM terminals WHERE tid = ?", (tid,))
        return None if row is None else Terminal(*row)

    def terminals(self) -> list[Terminal]:
        """Every terminal, in byte order of tid (whatever the database's collation)."""
        order = f"ORDER BY tid COLLATE {self.dialect.byte_order}"
        rows = self._all(f"SELECT {TERMINAL_COLUMNS} FROM terminals {order}")
        return [Terminal(*row) for row in rows]

    def insert_terminal(self, t: Terminal, a: NewAccount, operator: Operator | None) -> None:
        """Register ``t`` with account version 1 (ACTIVE from ``t.created_at``), batch 1 open
        and the optional operator. ValueError if the tid exists."""
        now = t.created_at
        # ON CONFLICT rather than a look first: two processes adding the same tid at once get
        # one terminal and one "already exists".
        cursor = self._execute(
            f"INSERT INTO terminals ({TERMINAL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (tid) DO NOTHING",
            (t.tid, t.mid, t.merchant_name, t.status, t.identity_public_key, t.sale_limit,
             t.test_limit, now),
        )  # fmt: skip
        if cursor.rowcount != 1:
            raise ValueError(f"terminal {t.tid!r} already exists")
        self._insert_version(
            AccountVersion(t.tid, 1, a.sealed_account, a.account_hash, a.account_masked,
                           a.holder, a.bank_code, a.branch, "ACTIVE", now, a.created_by,
                           a.reason, now)
        )  # fmt: skip
        self._execute(
            "INSERT INTO batches (tid, batch_no, status, opened_at) VALUES (?, 1, 'open', ?)",
            (t.tid, now),
        )
        if operator is not None:
            o = operator
            self._execute(
                "INSERT INTO operators (tid, operator_id, password_hash, failures) "
                "VALUES (?, ?, ?, ?)",
                (o.tid, o.operator_id, o.password_hash, o.failures),
            )
        # A host that was asked about this tid has "no such terminal" cached.
        self._note("terminal", t.tid)

    def set_terminal_status(self, tid: str, status: str) -> bool:
        """False if there is no such terminal."""
        cursor = self._execute("UPDATE terminals SET status = ? WHERE tid = ?", (status, tid))
        if cursor.rowcount != 1:
            return False
        self._note("terminal", tid)
        return True

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

    # -- sessions --------------------------------------------------------------------------
    def session(self, tid: str) -> Session | None:
        row = self._one(
            "SELECT tid, sealed_rx, sealed_tx, signed_on_at FROM sessions WHERE tid = ?", (tid,)
        )
        return None if row is None else Session(*row)

    def save_session(self, s: Session) -> None:
        """Insert or replace the terminal's session."""
        self._execute(
            "INSERT INTO sessions (tid, sealed_rx, sealed_tx, signed_on_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (tid) DO UPDATE SET sealed_rx = excluded.sealed_rx, "
            "sealed_tx = excluded.sealed_tx, signed_on_at = excluded.signed_on_at",
            (s.tid, s.sealed_rx, s.sealed_tx, s.signed_on_at),
        )
        self._note("session", s.tid)

    def drop_session(self, tid: str) -> None:
        if self._execute("DELETE FROM sessions WHERE tid = ?", (tid,)).rowcount:
            self._note("session", tid)

    def insert_signon(self, tid: str, transmission: str, stan: str, at: float) -> bool:
        """Remember the terminal's sign-on with this field 7 and STAN, accepted at ``at``;
        False if it is remembered already (a replay). A concurrent transaction inserting the
        same one is waited for: of the two, one inserts it."""
        cursor = self._execute(
            "INSERT INTO signons (tid, transmission, stan, accepted_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (tid, transmission, stan) DO NOTHING",
            (tid, transmission, stan, at),
        )
        return cursor.rowcount == 1

    def forget_signons(self, tid: str, before: float) -> int:
        """Forget the terminal's sign-ons accepted before ``before``; how many."""
        cursor = self._execute(
            "DELETE FROM signons WHERE tid = ? AND accepted_at < ?", (tid, before)
        )
        return cursor.rowcount

    # -- settlement accounts ---------------------------------------------------------------
    def versions(self, tid: str) -> list[AccountVersion]:
        rows = self._all(
            f"SELECT {ACCOUNT_COLUMNS} FROM settlement_accounts WHERE tid = ? ORDER BY version",
            (tid,),
        )
        return [AccountVersion(*row) for row in rows]

    def insert_version(self, v: AccountVersion) -> None:
        self._insert_version(v)
        self._note("account", v.tid)

    def _insert_version(self, v: AccountVersion) -> None:
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
        if cursor.rowcount != 1:
            return False
        self._note("account", tid)
        return True

    def due_versions(self, now: float) -> list[AccountVersion]:
        rows = self._all(
            f"SELECT {ACCOUNT_COLUMNS} FROM settlement_accounts "
            "WHERE state = 'APPROVED' AND effective_from <= ? ORDER BY effective_from, tid",
            (now,),
        )
        return [AccountVersion(*row) for row in rows]

    # -- rebind requests -------------------------------------------------------------------
    def request(self, rf: str) -> RebindRequest | None:
        row = self._one(REQUEST_SELECT + "WHERE r.rf = ?", (rf,))
        return None if row is None else RebindRequest(*row)

    def request_for_message(self, tid: str, stan: str, transmission: str) -> RebindRequest | None:
        row = self._one(
            REQUEST_SELECT + "WHERE r.tid = ? AND r.stan = ? AND r.transmission = ? "
            "AND r.kind = 'rebind' ORDER BY r.submitted_at DESC LIMIT 1",
            (tid, stan, transmission),
        )
        return None if row is None else RebindRequest(*row)

    def latest_request(self, tid: str) -> RebindRequest | None:
        row = self._one(REQUEST_SELECT + "WHERE r.tid = ? ORDER BY r.version DESC LIMIT 1", (tid,))
        return None if row is None else RebindRequest(*row)

    def requests(self, state: str | None = None, tid: str | None = None) -> list[RebindRequest]:
        where, params = [], []
        if state is not None:
            where.append("a.state = ?")
            params.append(state)
        if tid is not None:
            where.append("r.tid = ?")
            params.append(tid)
        sql = REQUEST_SELECT + (f"WHERE {' AND '.join(where)} " if where else "")
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

    # -- audit log -------------------------------------------------------------------------
    def last_audit(self) -> AuditEntry | None:
        if self._writing and self.dialect.lock_audit is not None:
            self._execute(self.dialect.lock_audit, ())
        row = self._one(f"SELECT {AUDIT_COLUMNS} FROM audit_log ORDER BY seq DESC LIMIT 1", ())
        return None if row is None else _audit_entry(row)

    def insert_audit(self, e: AuditEntry) -> None:
        self._execute(
            f"INSERT INTO audit_log ({AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (e.seq, e.at, e.actor, e.action, e.tid, e.subject, e.detail, e.prev_digest,
             e.digest),
        )  # fmt: skip

    def audit_entries(self) -> list[AuditEntry]:
        rows = self._all(f"SELECT {AUDIT_COLUMNS} FROM audit_log ORDER BY seq")
        return [_audit_entry(row) for row in rows]

    def audit_entry(self, tid: str, action: str, subject: str) -> AuditEntry | None:
        row = self._one(
            f"SELECT {AUDIT_COLUMNS} FROM audit_log WHERE tid = ? AND action = ? AND subject = ? "
            "ORDER BY seq DESC LIMIT 1",
            (tid, action, subject),
        )
        return None if row is None else _audit_entry(row)

    # -- ledger ----------------------------------------------------------------------------
    def sale_exists(self, tid: str, stan: str, local_date: str) -> bool:
        return self._execute(SALE_EXISTS, (tid, stan, local_date)).fetchone() is not None

    def find_sale(self, tid: str, stan: str, transmission: str) -> StoredSale | None:
        """The latest sale of this terminal, STAN and field 7."""
        row = self._one(
            SALE_SELECT + "WHERE s.tid = ? AND s.stan = ? AND s.transmission = ? "
            "ORDER BY s.rrn DESC LIMIT 1",
            (tid, stan, transmission),
        )
        return None if row is None else _stored_sale(row)

    def sales(self, tid: str) -> list[StoredSale]:
        rows = self._all(SALE_SELECT + "WHERE s.tid = ? ORDER BY s.rrn", (tid,))
        return [_stored_sale(row) for row in rows]

    def reverse_sale(self, rrn: int, at: float) -> bool:
        """Mark the sale reversed at ``at``; False if it was not an approved sale of an open
        batch (a settlement closing its batch is waited for)."""
        cursor = self._execute(
            "UPDATE sales SET status = 'reversed', reversed_at = ? "
            "WHERE rrn = ? AND status = 'approved' AND EXISTS (SELECT 1 FROM batches AS b "
            "WHERE b.tid = sales.tid AND b.batch_no = sales.batch_no AND b.status = 'open'"
            f"{self.dialect.key_share})",
            (at, rrn),
        )
        return cursor.rowcount == 1

    def has_test_sale(self, tid: str, version: int) -> bool:
        row = self._one(
            "SELECT 1 FROM sales WHERE tid = ? AND account_version = ? AND test = ? "
            "AND status = 'approved' LIMIT 1",
            (tid, version, True),
        )
        return row is not None

    def record_sales(self, sales: Sequence[SaleRecord]) -> list[SaleResult]:
        """Insert the sales, in order. A sale whose (tid, stan, local_date) is already stored,
        or repeated earlier in ``sales``, is not inserted: it gets duplicate=True and the RRN of
        the sale stored under that key. Others get their new RRN. A sale naming an unknown
        terminal, batch or account version breaks a constraint (the transaction is lost)."""
        if not sales:
            return []
        rrns = self._insert_sales(sales)
        if None not in rrns:  # no duplicate: the usual case, kept to one pass
            return [SaleResult(format_rrn(rrn), False) for rrn in cast(list[int], rrns)]
        keys = [(s.tid, s.stan, s.local_date) for s in sales]
        missing = list({key for key, rrn in zip(keys, rrns, strict=True) if rrn is None})
        stored = self._stored_rrns(missing)
        if len(stored) != len(missing):
            raise RuntimeError("a sale refused as a duplicate has no stored original")
        return [
            SaleResult(format_rrn(stored[key]), True)
            if rrn is None
            else SaleResult(format_rrn(rrn), False)
            for key, rrn in zip(keys, rrns, strict=True)
        ]

    def _insert_sales(self, sales: Sequence[SaleRecord]) -> list[int | None]:
        """Insert what is new of ``sales`` (INSERT_SALE's ON CONFLICT rule); each sale's new
        RRN, or None for one not inserted (its key was stored already, or earlier in
        ``sales``). How a backend batches this is its own."""
        raise NotImplementedError

    def _stored_rrns(self, keys: list[SaleKey]) -> dict[SaleKey, int]:
        """The RRNs stored under ``keys`` (each distinct), one statement a key; a backend may
        batch them. Under READ COMMITTED this also sees a key that a writer committed while
        this transaction's insert waited for it."""
        found = {}
        for key in keys:
            row = self._one(STORED_SALE, key)
            if row is not None:
                found[key] = int(row[0])
        return found


def _stored_sale(row: Sequence[Any]) -> StoredSale:
    """A row of SALE_SELECT (a boolean whatever the driver returns)."""
    return StoredSale(format_rrn(row[0]), row[1], row[2], row[3], row[4], row[5], row[6],
                      row[7], bool(row[8]), row[9], row[10], row[11], bool(row[12]))  # fmt: skip


def _audit_entry(row: Sequence[Any]) -> AuditEntry:
    """A row of the audit log (BLOBs as bytes whatever the driver returns)."""
    seq, at, actor, action, tid, subject, detail, prev_digest, digest = row
    return AuditEntry(seq, at, actor, action, tid, subject, detail, bytes(prev_digest),
                      bytes(digest))  # fmt: skip
