"""The outbox of settlement updates to the banks (PROTOCOL.md 6): its records and every SQL
statement it runs, once, for both dialects.

An advice is written in the transaction of the change that causes it (``StoreTx.insert_advice``)
and then delivered at least once, in order per terminal, by whoever holds its bank's lease
(``bank_leases``: one deliverer per bank across every process and machine). The store keeps the
advice's fields sealed only (48 AC is a full account number) and never opens them: sealing,
opening and signing are ``acqhost.domain.advices``'.

Delivery order. An advice is deliverable once no earlier advice of its terminal is still
queued; a claim holds what it takes (its ``next_attempt_at`` moves past the claim) so that a
terminal has at most one advice in flight. On PostgreSQL, claimers pass over the rows another
claimer has locked (``FOR UPDATE SKIP LOCKED``), and a terminal's advices are queued under an
advisory lock of that terminal, so that their ids, the order they are delivered in, are the
order their transactions commit. On SQLite every writer already holds the one write lock.

The statements need SQLite 3.35 or later (``RETURNING``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from acqhost.store.dialect import Dialect, Execute

__all__ = (
    "ADVICE_COLUMNS",
    "ADVICE_STATES",
    "BankLease",
    "BankStatus",
    "NewAdvice",
    "OutboxSQL",
    "StoredAdvice",
)

# An advice to a bank (PROTOCOL.md 6) is queued until the bank acknowledges it (delivered) or
# it is given up on (dead, until someone retries it).
ADVICE_STATES = ("queued", "delivered", "dead")


@dataclass(frozen=True, slots=True)
class NewAdvice:
    """A settlement update to queue for a bank (``acqhost.domain.advices`` builds it). Its
    fields are sealed with the host data key: 48 AC is a full account number."""

    tid: str  # field 41: a terminal's advices are delivered in the order they were queued
    mti: str  # "0320" or "0520"
    bank_code: str  # 48 BK: which bank it goes to
    sealed_fields: bytes
    created_at: float


@dataclass(frozen=True, slots=True)
class StoredAdvice:
    """An advice in the outbox. Its ``id`` is its event id (fields 37 and 11 are made of it)."""

    id: int
    tid: str
    mti: str
    bank_code: str
    sealed_fields: bytes
    created_at: float
    state: str  # one of ADVICE_STATES
    attempts: int  # failed deliveries since it was queued (or last retried)
    next_attempt_at: float  # not deliverable before (a retry's backoff, or a claim's hold)
    last_error: str  # why the last delivery failed, or why it is dead; "" if none
    delivered_at: float | None
    ack_code: str  # the bank's field 39, once delivered


@dataclass(frozen=True, slots=True)
class BankStatus:
    """The outbox of one bank code, as an operator watches it: what waits, since when, how
    much of it has failed, and the latest failure. Delivered advices are not counted."""

    bank_code: str
    queued: int
    oldest_queued_at: float | None  # created_at of the oldest queued advice
    retrying: int  # queued advices that have failed at least once
    dead: int
    last_error: str  # the latest error of an undelivered advice; "" if none

    def oldest_age(self, now: float) -> float:
        """Seconds the oldest queued advice has waited at ``now`` (0 when none waits)."""
        return 0.0 if self.oldest_queued_at is None else max(0.0, now - self.oldest_queued_at)


@dataclass(frozen=True, slots=True)
class BankLease:
    """Who delivers to a bank: one owner at a time, until ``expires_at`` unless renewed."""

    bank: str
    owner: str
    expires_at: float


ADVICE_COLUMNS = (
    "id, tid, mti, bank_code, sealed_fields, created_at, state, attempts, next_attempt_at, "
    "last_error, delivered_at, ack_code"
)
# The advices not yet delivered, read through the two partial indexes that hold them.
_UNDELIVERED = (
    "SELECT id, bank_code, state, attempts, created_at, last_error, last_error_at "
    "FROM outbox WHERE state = 'queued' UNION ALL "
    "SELECT id, bank_code, state, attempts, created_at, last_error, last_error_at "
    "FROM outbox WHERE state = 'dead'"
)
_STATUS = (
    "SELECT bank_code, "
    "sum(CASE WHEN state = 'queued' THEN 1 ELSE 0 END), "
    "min(CASE WHEN state = 'queued' THEN created_at END), "
    "sum(CASE WHEN state = 'queued' AND attempts > 0 THEN 1 ELSE 0 END), "
    "sum(CASE WHEN state = 'dead' THEN 1 ELSE 0 END) "
    f"FROM ({_UNDELIVERED}) AS u GROUP BY bank_code"
)
_LAST_ERRORS = (
    "SELECT bank_code, last_error FROM ("
    "SELECT bank_code, last_error, row_number() OVER "
    "(PARTITION BY bank_code ORDER BY last_error_at DESC, id DESC) AS n "
    f"FROM ({_UNDELIVERED}) AS u WHERE last_error_at IS NOT NULL) AS e WHERE n = 1"
)


class OutboxSQL:
    """The outbox's part of ``acqhost.store.sql.SQLTx``: the statements run over one open
    transaction of either backend (its ``_execute`` and ``dialect``)."""

    __slots__ = ()

    dialect: ClassVar[Dialect]
    _execute: Execute

    def insert_advice(self, advice: NewAdvice) -> int:
        """Queue ``advice``, deliverable at once; its id."""
        a = advice
        if self.dialect.lock_outbox is not None:
            self._execute(self.dialect.lock_outbox, (a.tid,))
        row = self._execute(
            "INSERT INTO outbox (tid, mti, bank_code, sealed_fields, created_at, "
            "next_attempt_at) VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
            (a.tid, a.mti, a.bank_code, a.sealed_fields, a.created_at, a.created_at),
        ).fetchone()
        return int(row[0])

    def advices(self, tid: str | None = None, state: str | None = None) -> list[StoredAdvice]:
        """Advices by id, optionally of one terminal and/or state."""
        where, params = [], []
        if tid is not None:
            where.append("tid = ?")
            params.append(tid)
        if state is not None:
            where.append("state = ?")
            params.append(state)
        sql = f"SELECT {ADVICE_COLUMNS} FROM outbox " + (
            f"WHERE {' AND '.join(where)} " if where else ""
        )
        rows = self._execute(sql + "ORDER BY id", tuple(params)).fetchall()
        return [_advice(row) for row in rows]

    def claim_advices(
        self,
        bank_codes: Sequence[str],
        now: float,
        until: float,
        limit: int,
        terminals: Sequence[str] = (),
    ) -> list[StoredAdvice]:
        """The deliverable advices of ``bank_codes`` or of ``terminals`` (see
        ``Store.claim_advices``), oldest first, held until ``until``."""
        taken = []
        if bank_codes:
            taken.append(f"o.bank_code IN ({', '.join('?' * len(bank_codes))})")
        if terminals:
            taken.append(f"o.tid IN ({', '.join('?' * len(terminals))})")
        rows = self._execute(
            "UPDATE outbox SET next_attempt_at = ? WHERE id IN ("
            "SELECT o.id FROM outbox AS o "
            f"WHERE o.state = 'queued' AND ({' OR '.join(taken)}) AND o.next_attempt_at <= ? "
            "AND NOT EXISTS (SELECT 1 FROM outbox AS e WHERE e.tid = o.tid "
            "AND e.bank_code = o.bank_code AND e.state = 'queued' AND e.id < o.id) "
            f"ORDER BY o.id LIMIT ?{self.dialect.skip_locked}) "
            f"RETURNING {ADVICE_COLUMNS}",
            (until, *bank_codes, *terminals, now, limit),
        ).fetchall()
        return sorted((_advice(row) for row in rows), key=lambda a: a.id)

    def mark_delivered(self, advice_id: int, ack_code: str, now: float) -> bool:
        return self._changed(
            "UPDATE outbox SET state = 'delivered', delivered_at = ?, ack_code = ? "
            "WHERE id = ? AND state = 'queued'",
            (now, ack_code, advice_id),
        )

    def mark_failed(self, advice_id: int, error: str, next_attempt_at: float, now: float) -> bool:
        return self._changed(
            "UPDATE outbox SET attempts = attempts + 1, last_error = ?, last_error_at = ?, "
            "next_attempt_at = ? WHERE id = ? AND state = 'queued'",
            (error, now, next_attempt_at, advice_id),
        )

    def dead_letter(self, advice_id: int, reason: str, now: float) -> bool:
        return self._changed(
            "UPDATE outbox SET state = 'dead', last_error = ?, last_error_at = ? "
            "WHERE id = ? AND state = 'queued'",
            (reason, now, advice_id),
        )

    def retry_advice(self, advice_id: int, now: float) -> bool:
        return self._changed(
            "UPDATE outbox SET state = 'queued', attempts = 0, next_attempt_at = ?, "
            "created_at = ? WHERE id = ? AND state IN ('queued', 'dead')",
            (now, now, advice_id),
        )

    def retry_dead_advices(self, now: float, bank_codes: Sequence[str] | None) -> int:
        # Queued again from now: a retried advice's age (a bank's max_age) counts afresh.
        sql = "UPDATE outbox SET state = 'queued', attempts = 0, next_attempt_at = ?, "
        sql += "created_at = ? WHERE state = 'dead'"
        if bank_codes is None:
            return self._execute(sql, (now, now)).rowcount
        marks = ", ".join("?" * len(bank_codes))
        return self._execute(f"{sql} AND bank_code IN ({marks})", (now, now, *bank_codes)).rowcount

    def outbox_status(self) -> list[BankStatus]:
        """Run in one snapshot: the counts and the latest errors agree."""
        errors = dict(self._execute(_LAST_ERRORS, ()).fetchall())
        rows = self._execute(_STATUS, ()).fetchall()
        statuses = [
            BankStatus(code, int(queued), oldest, int(retrying), int(dead), errors.get(code, ""))
            for code, queued, oldest, retrying, dead in rows
        ]
        return sorted(statuses, key=lambda s: s.bank_code.encode())

    # -- bank leases -----------------------------------------------------------------------
    def acquire_bank_lease(self, bank: str, owner: str, now: float, expires_at: float) -> bool:
        """One statement, so that of several processes asking at once exactly one gets a
        lease nobody holds (the database orders their upserts of the one row)."""
        return self._changed(
            "INSERT INTO bank_leases (bank, owner, expires_at) VALUES (?, ?, ?) "
            "ON CONFLICT (bank) DO UPDATE SET owner = excluded.owner, "
            "expires_at = excluded.expires_at "
            "WHERE bank_leases.owner = excluded.owner OR bank_leases.expires_at <= ?",
            (bank, owner, expires_at, now),
        )

    def renew_bank_lease(self, bank: str, owner: str, now: float, expires_at: float) -> bool:
        return self._changed(
            "UPDATE bank_leases SET expires_at = ? WHERE bank = ? AND owner = ? AND expires_at > ?",
            (expires_at, bank, owner, now),
        )

    def release_bank_lease(self, bank: str, owner: str) -> bool:
        return self._changed("DELETE FROM bank_leases WHERE bank = ? AND owner = ?", (bank, owner))

    def bank_lease(self, bank: str) -> BankLease | None:
        row = self._execute(
            "SELECT bank, owner, expires_at FROM bank_leases WHERE bank = ?", (bank,)
        ).fetchone()
        return None if row is None else BankLease(*row)

    def _changed(self, sql: str, params: tuple[Any, ...]) -> bool:
        return self._execute(sql, params).rowcount == 1


def _advice(row: Sequence[Any]) -> StoredAdvice:
    """A row of ADVICE_COLUMNS (the sealed fields as bytes whatever the driver returns)."""
    (advice_id, tid, mti, bank_code, sealed, created_at, state, attempts, next_attempt_at,
     last_error, delivered_at, ack_code) = row  # fmt: skip
    return StoredAdvice(advice_id, tid, mti, bank_code, bytes(sealed), created_at, state,
                        attempts, next_attempt_at, last_error, delivered_at, ack_code)  # fmt: skip
