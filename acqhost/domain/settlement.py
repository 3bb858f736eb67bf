"""Batch settlement (PROTOCOL.md 5.4): a terminal's 0500 against the host's ledger, and the
settlement report of what closed batches settled to each account.

What a batch's totals count: its approved, unreversed sales, test sales included. A test sale
is a real card payment whose money goes to the account it proves (its 0210 names that account,
48 SA/SV, like any sale's), so it settles like any other; a terminal counts every sale it had
approved and not reversed. Sales are totalled per settlement-account version they recorded: a
batch that spans an account change settles each part to its own account.

:func:`close` decides a 0500 inside ONE store transaction handed in by the caller (the host's
ledger writer): the batch's totals match the terminal's -> the batch closes, the next opens,
the audit log records it (``batch.closed``) and ``advise`` is called for each settlement
account the batch paid, in the same transaction; they differ -> 95 with the host's totals, the
batch stays open. A retransmitted 0500 (same fields 41, 11 and 7) after a close gets the first
answer again, read from that close's audit entry. A 0500 naming a batch that is settled or
unknown gets 12, naming the open batch (48 NB). Outcomes are returned, never raised.
"""

from __future__ import annotations

import calendar
import datetime
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from acqhost.domain import advices, audit, crypto
from acqhost.store.base import AccountVersion, Batch, BatchTotal, StoreTx

__all__ = (
    "CLOSED",
    "REPORT_UNMASKED",
    "Advise",
    "OpenTotals",
    "Outcome",
    "ReportLine",
    "close",
    "day_bounds",
    "open_totals",
    "report",
)

CLOSED = "batch.closed"  # the audit action of a batch closed by a 0500
REPORT_UNMASKED = "report.unmasked"  # the audit action of a report showing account numbers

# Queues one settlement advice (0520, PROTOCOL.md 6) in the closing transaction:
# advise(tx, data_key, tid, batch_no, account version, count, amount, now).
Advise = Callable[[StoreTx, bytes, str, int, AccountVersion, int, int, float], object]


@dataclass(frozen=True, slots=True)
class OpenTotals:
    """A terminal's open batch and what it holds: in all, and per settlement-account version."""

    batch_no: int
    count: int
    amount: int
    versions: tuple[BatchTotal, ...]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a 0500 gets.

    ``code`` 00 (closed, or a retransmission of the 0500 that closed it), 95 (totals differ)
    or 12 (``reason`` BATCH_SETTLED or NO_SUCH_BATCH). ``batch_no`` is the batch the terminal
    named; ``count`` and ``amount`` the host's totals of it (00, 95); ``versions`` those totals
    per settlement-account version; ``open_batch`` the batch the answer names as open: the one
    this close opened (for a retransmission, the one the close it repeats opened), or the open
    one; ``closed`` whether this call closed the batch (False for a retransmission's answer)."""

    code: str
    reason: str
    batch_no: int
    open_batch: int
    count: int = 0
    amount: int = 0
    versions: tuple[BatchTotal, ...] = ()
    closed: bool = False

    def elements(self) -> dict[str, str]:
        """The 0510's field 48: BN, CT, AM (the host's totals) with 00 and 95, and NB (the
        batch open now) with 00 and 12."""
        found: dict[str, str] = {}
        if self.code in ("00", "95"):
            found.update(BN=f"{self.batch_no:06d}", CT=str(self.count), AM=str(self.amount))
        if self.code in ("00", "12"):
            found["NB"] = f"{self.open_batch:06d}"
        return found


def _open(tx: StoreTx, tid: str) -> Batch:
    batch = tx.open_batch(tid)
    if batch is None:  # every terminal is registered with batch 1 open: our fault
        raise RuntimeError(f"terminal {tid} has no open batch")
    return batch


def open_totals(tx: StoreTx, tid: str) -> OpenTotals:
    """The terminal's open batch and its totals (locked until ``tx`` ends when it writes)."""
    batch = _open(tx, tid)
    versions = tuple(tx.batch_totals(tid, batch.batch_no))
    return OpenTotals(
        batch.batch_no,
        sum(v.count for v in versions),
        sum(v.amount for v in versions),
        versions,
    )


def close(
    tx: StoreTx,
    key: bytes,
    tid: str,
    batch_no: int,
    count: int,
    amount: int,
    now: float,
    *,
    stan: str,
    transmission: str,
    advise: Advise = advices.queue_settlement_advice,
) -> Outcome:
    """Decide the terminal's 0500 for batch ``batch_no`` with its totals ``count`` and
    ``amount`` (``stan`` and ``transmission``: its fields 11 and 7), in ``tx``.

    On a close, ``advise`` (queuing the 0520 in the outbox) is called once per
    settlement-account version the batch's sales settle to, by version, in ``tx``: if it
    raises, nothing is closed."""
    host = open_totals(tx, tid)
    if batch_no != host.batch_no:
        return _not_open(tx, tid, batch_no, host.batch_no, stan, transmission)
    if (count, amount) != (host.count, host.amount):
        return Outcome("95", "TOTALS_MISMATCH", batch_no, batch_no, host.count, host.amount,
                       host.versions)  # fmt: skip
    opened = tx.close_batch(tid, batch_no, now)
    accounts = {v.version: v for v in tx.versions(tid)}
    audit.append(
        tx,
        key,
        at=now,
        actor="terminal",
        action=CLOSED,
        tid=tid,
        subject=f"b{batch_no}",
        detail={
            "batch": batch_no,
            "next": opened.batch_no,
            "stan": stan,
            "transmission": transmission,
            "count": host.count,
            "amount": host.amount,
            "accounts": [
                {
                    "sv": v.account_version,
                    "account": accounts[v.account_version].account_masked,
                    "count": v.count,
                    "amount": v.amount,
                }
                for v in host.versions
            ],
        },
    )
    for v in host.versions:
        advise(tx, key, tid, batch_no, accounts[v.account_version], v.count, v.amount, now)
    return Outcome("00", "", batch_no, opened.batch_no, host.count, host.amount, host.versions,
                   closed=True)  # fmt: skip


def _not_open(
    tx: StoreTx, tid: str, batch_no: int, open_batch: int, stan: str, transmission: str
) -> Outcome:
    """A 0500 naming a batch other than the open one: the retransmission of the 0500 that
    closed it gets that 0500's answer; any other is 12."""
    if tx.batch(tid, batch_no) is None:
        return Outcome("12", "NO_SUCH_BATCH", batch_no, open_batch)
    entry = tx.audit_entry(tid, CLOSED, f"b{batch_no}")
    if entry is not None:
        first = json.loads(entry.detail)
        if (first.get("stan"), first.get("transmission")) == (stan, transmission):
            versions = tuple(
                BatchTotal(int(a["sv"]), int(a["count"]), int(a["amount"]))
                for a in first["accounts"]
            )
            return Outcome("00", "", batch_no, int(first["next"]), int(first["count"]),
                           int(first["amount"]), versions)  # fmt: skip
    return Outcome("12", "BATCH_SETTLED", batch_no, open_batch)


# -- the settlement report -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReportLine:
    """A line of the settlement report: what one closed batch of one terminal settled to one
    settlement-account version. ``account`` is masked unless the report was made unmasked."""

    batch_no: int
    tid: str
    mid: str
    closed_at: float
    account_version: int
    account: str = field(repr=False)
    holder: str
    bank_code: str
    count: int
    amount: int


def day_bounds(day: datetime.date) -> tuple[float, float]:
    """The UTC day ``day`` as [start, end) in unix seconds."""
    start = calendar.timegm(day.timetuple())
    return float(start), float(start + 86400)


def report(
    tx: StoreTx,
    key: bytes,
    *,
    tid: str | None = None,
    batch_no: int | None = None,
    day: datetime.date | None = None,
    unmasked: bool = False,
    by: str = "",
    now: float,
) -> list[ReportLine]:
    """What closed batches settled, per terminal, batch and settlement-account version
    (optionally of one terminal, one batch number, batches closed on one UTC ``day``).

    ``unmasked``: full account numbers (unsealed with the host data ``key``), and an audit
    entry ``report.unmasked`` saying who (``by``) was shown which lines, in ``tx`` (which must
    then be a write transaction): if it cannot be written, nothing is shown."""
    closed_from, closed_before = day_bounds(day) if day is not None else (None, None)
    found = tx.settled(tid, batch_no, closed_from, closed_before)
    lines = [
        ReportLine(
            s.batch_no,
            s.tid,
            s.mid,
            s.closed_at,
            s.account_version,
            crypto.unseal(key, s.sealed_account).decode("ascii") if unmasked else s.account_masked,
            s.holder,
            s.bank_code,
            s.count,
            s.amount,
        )
        for s in found
    ]
    if unmasked:
        if not by.strip():
            raise ValueError("who is shown full account numbers must be named")
        audit.append(
            tx,
            key,
            at=now,
            actor=by.strip(),
            action=REPORT_UNMASKED,
            tid=tid or "*",
            subject="settlement",
            detail={
                "tid": tid,
                "batch": batch_no,
                "day": None if day is None else day.isoformat(),
                "shown": [f"{s.tid} b{s.batch_no} v{s.account_version}" for s in found],
            },
        )
    return lines
