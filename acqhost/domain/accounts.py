"""Settlement-account versions: when a decision takes effect, which version is in force, and
the changes of state nobody asks for (activation at the effective-from, verification by the
first approved test sale), each with its audit entry.

Timing. A decision (approval, rollback) takes effect at its effective-from, never sooner than
:data:`DECISION_LEAD` seconds after it is made. Host processes cache a terminal's account for
at most ``acqhost.host.state.CACHE_SECONDS`` (shorter than the lead) and never past the next
effective-from they know of, so at that instant every process, on every machine sharing the
store, switches to the new account: none answers with the old one after it.
"""

from __future__ import annotations

import math
import time

from acqhost.domain import advices, audit
from acqhost.store.base import AccountVersion, StoreTx, in_force, next_change

__all__ = (
    "DECISION_LEAD",
    "NEVER_EFFECTIVE",
    "ONCE_IN_FORCE",
    "activate_due",
    "ef_text",
    "effective_from",
    "in_force",
    "next_change",
    "record",
    "verify",
)

# Seconds between a decision and the earliest moment it takes effect (see the module doc).
DECISION_LEAD = 2.0


# States of a request whose version will never take effect: it has no effective-from.
NEVER_EFFECTIVE = ("REJECTED", "CANCELLED")
# States of a version that was once in force (and so may be restored by a rollback).
ONCE_IN_FORCE = ("ACTIVE", "VERIFIED", "ROLLED_BACK")


def ef_text(at: float) -> str:
    """48 EF: UTC ``YYYYMMDDhhmmss``."""
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(at))


def effective_from(decided_at: float, delay: float) -> float:
    """When a decision made at ``decided_at`` takes effect: ``delay`` later, but never sooner
    than DECISION_LEAD, and on a whole second, so that 48 EF (to the second) is exact."""
    return float(math.ceil(decided_at + max(delay, DECISION_LEAD)))


def record(
    tx: StoreTx,
    key: bytes,
    now: float,
    actor: str,
    action: str,
    tid: str,
    subject: str,
    **detail: object,
) -> None:
    """Append the audit entry of a change made in ``tx``."""
    audit.append(
        tx, key, at=now, actor=actor, action=action, tid=tid, subject=subject, detail=detail
    )


def activate_due(
    tx: StoreTx, key: bytes, now: float, tid: str | None = None
) -> list[AccountVersion]:
    """Record as ACTIVE every APPROVED version whose effective-from has passed (they are in
    force from then on whether or not this has run), and queue its 0320 for its bank in the
    same transaction (``acqhost.domain.advices``); a rollback's activation marks the versions
    it undoes ROLLED_BACK. Idempotent across processes: each version is activated, and
    advised, by exactly one. Given ``tid``, only that terminal's. The versions activated."""
    done: list[AccountVersion] = []
    for v in tx.due_versions(now):
        if tid is not None and v.tid != tid:
            continue
        if not tx.set_version_state(v.tid, v.version, ("APPROVED",), "ACTIVE", v.effective_from):
            continue  # another process did it meanwhile
        done.append(v)
        record(
            tx,
            key,
            now,
            "host",
            "account.activated",
            v.tid,
            f"v{v.version}",
            version=v.version,
            before="APPROVED",
            after="ACTIVE",
            effective_from=ef_text(v.effective_from),
        )
        request = next((r for r in tx.requests(tid=v.tid) if r.version == v.version), None)
        advices.queue_account_advice(tx, key, v, request, now)
        if request is None or request.kind != "rollback" or request.restores is None:
            continue
        for undone in tx.versions(v.tid)[request.restores : v.version - 1]:
            if undone.state in ("ACTIVE", "VERIFIED") and tx.set_version_state(
                v.tid, undone.version, ("ACTIVE", "VERIFIED"), "ROLLED_BACK", undone.effective_from
            ):
                record(
                    tx,
                    key,
                    now,
                    request.operator_id,
                    "account.rolled_back",
                    v.tid,
                    f"v{undone.version}",
                    version=undone.version,
                    before=undone.state,
                    after="ROLLED_BACK",
                    by_request=request.rf,
                )
    return done


def verify(tx: StoreTx, key: bytes, tid: str, version: int, now: float) -> bool:
    """After an approved test sale on ``version``: ACTIVE -> VERIFIED (first recording any
    due activation of the terminal's: a test sale's transaction locks that terminal only).
    True if this call verified it."""
    activate_due(tx, key, now, tid)
    if not tx.has_test_sale(tid, version):
        return False
    ef = tx.versions(tid)[version - 1].effective_from
    if not tx.set_version_state(tid, version, ("ACTIVE",), "VERIFIED", ef):
        return False
    record(
        tx,
        key,
        now,
        "host",
        "account.verified",
        tid,
        f"v{version}",
        version=version,
        before="ACTIVE",
        after="VERIFIED",
    )
    return True
