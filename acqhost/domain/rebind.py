"""Settlement-account changes ("rebind", PROTOCOL.md 5.3): a terminal's submit, inquire and
cancel, the acquirer's review, and the acquirer's rollback. When decisions take effect, and
activation and verification, are :mod:`acqhost.domain.accounts`.

Every function here runs inside ONE store transaction (:meth:`Store.transaction`) handed in by
the caller (the host's ledger writer, or the CLI), decides from what the store returns, writes
the change and its audit entry, and returns; the transaction commits both or neither. Business
outcomes for a terminal are returned as an :class:`Outcome` (response code and reason), never
raised, so that what must persist with a refusal (a wrong-password count) is committed too. The
acquirer's commands get :class:`RebindError` for a refusal.
"""

from __future__ import annotations

import dataclasses
import secrets
import unicodedata
from dataclasses import dataclass, field

from acqhost.config import RebindPolicy
from acqhost.domain import accounts, audit, cards, crypto
from acqhost.errors import AcqHostError
from acqhost.store.base import (
    OPEN_REBIND_STATES,
    AccountVersion,
    RebindRequest,
    StoreTx,
)

__all__ = (
    "Outcome",
    "RebindError",
    "Submission",
    "approve",
    "cancel",
    "describe",
    "find",
    "new_rf",
    "normalise_name",
    "password_outcome",
    "reject",
    "rollback",
    "submit",
)

_RF_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O or 1/I to misread on a voucher


class RebindError(AcqHostError, ValueError):
    """An acquirer's command that cannot be carried out (unknown RF, wrong state, ...)."""


@dataclass(frozen=True, slots=True)
class Submission:
    """A terminal's 0300 submit, as decoded and format-checked by the pipeline."""

    tid: str
    operator_id: str
    stan: str  # field 11
    transmission: str  # field 7
    holder: str  # 48 NM
    bank_code: str  # 48 BK, 12 digits
    branch: str  # 48 BR or ""
    account: str = field(repr=False)  # 48 AC or the PAN of track 2: never logged
    source: str  # "typed" or "card"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a terminal's request gets: response code, reason (48 RS with code 05) and the
    request it concerns (for 48 RF, ST, EF, SA)."""

    code: str
    reason: str = ""
    request: RebindRequest | None = None
    elements: dict[str, str] = field(default_factory=dict)  # 48 RF, ST, EF, SA of ``request``


def new_rf() -> str:
    """A fresh 16-character rebind reference."""
    return "".join(secrets.choice(_RF_ALPHABET) for _ in range(16))


def normalise_name(name: str) -> str:
    """A holder name for comparison: NFKC (full-width letters become plain), case-folded,
    whitespace runs made one space, ends stripped."""
    return " ".join(unicodedata.normalize("NFKC", name).casefold().split())


# -- the terminal's requests ---------------------------------------------------------------------


def password_outcome(
    tx: StoreTx,
    key: bytes,
    tid: str,
    operator_id: str,
    password_ok: bool,
    max_failures: int,
    now: float,
) -> Outcome | None:
    """The operator check: None when it passes, else 55 (wrong) or 75 (locked out). Wrong
    passwords are counted; the count that reaches ``max_failures`` locks the operator out
    (every later attempt gets 75 until the acquirer unlocks it); a right one resets it."""
    operator = tx.operator(tid, operator_id)
    if operator is None:
        return Outcome("55", "UNKNOWN_OPERATOR")
    if operator.failures >= max_failures:
        return Outcome("75", "OPERATOR_LOCKED")
    if password_ok:
        if operator.failures:
            tx.set_operator_failures(tid, operator_id, 0)
        return None
    failures = operator.failures + 1
    tx.set_operator_failures(tid, operator_id, failures)
    if failures >= max_failures:
        accounts.record(
            tx,
            key,
            now,
            f"operator {operator_id}",
            "operator.locked",
            tid,
            operator_id,
            failures=failures,
        )
        return Outcome("75", "OPERATOR_LOCKED")
    return Outcome("55", "BAD_PASSWORD")


def submit(
    tx: StoreTx,
    key: bytes,
    sub: Submission,
    *,
    password_ok: bool,
    policy: RebindPolicy,
    now: float,
) -> Outcome:
    """A 0300 submit, after its formats were checked: the business checks in order (operator
    password 55/75, account number 14, holder name, same account, open request (05 with
    NAME_MISMATCH, SAME_ACCOUNT, PENDING_EXISTS), min_interval 65), then a new version
    PENDING_REVIEW (or APPROVED at once under ``review = "auto"``) and its request."""
    earlier = tx.request_for_message(sub.tid, sub.stan, sub.transmission)
    if earlier is not None:  # a retransmission (pipelined behind the original, say)
        return Outcome("94", "DUPLICATE", earlier, describe(tx, earlier, now))
    refused = password_outcome(
        tx, key, sub.tid, sub.operator_id, password_ok, policy.operator_max_failures, now
    )
    if refused is not None:
        return refused
    account = sub.account
    if not (12 <= len(account) <= 19 and cards.luhn_ok(account)):
        return Outcome("14", "BAD_ACCOUNT")
    versions = tx.versions(sub.tid)
    if any(v.state == "APPROVED" and v.effective_from <= now for v in versions):
        # In force (ACTIVE) since its effective-from, but not yet recorded so (host processes
        # do that every second): record it now, or it would be taken for an open request.
        accounts.activate_due(tx, key, now)
        versions = tx.versions(sub.tid)
    current = accounts.in_force(versions, now)
    if current is None:  # every terminal is registered with version 1: our fault
        raise RuntimeError(f"terminal {sub.tid} has no settlement account in force")
    if normalise_name(sub.holder) != normalise_name(current.holder):
        return Outcome("05", "NAME_MISMATCH")
    account_hash = crypto.account_hash(key, account)
    if secrets.compare_digest(account_hash, current.account_hash):
        return Outcome("05", "SAME_ACCOUNT")
    if any(v.state in OPEN_REBIND_STATES for v in versions):
        pending = [r for r in tx.requests(tid=sub.tid) if r.state in OPEN_REBIND_STATES]
        if not pending:
            return Outcome("05", "PENDING_EXISTS")
        return Outcome("05", "PENDING_EXISTS", pending[-1], describe(tx, pending[-1]))
    last = _last_accepted(tx, sub.tid)
    if last is not None and now - last < policy.min_interval:
        return Outcome("65", "TOO_FREQUENT")
    masked = cards.mask_account(account)
    number = versions[-1].version + 1
    ef = accounts.effective_from(now, policy.cooling_off)  # an estimate until it is approved
    actor = f"operator {sub.operator_id}"
    proposed = AccountVersion(
        tid=sub.tid,
        version=number,
        sealed_account=crypto.seal(key, account.encode("ascii")),
        account_hash=account_hash,
        account_masked=masked,
        holder=sub.holder.strip(),
        bank_code=sub.bank_code,
        branch=sub.branch,
        state="PENDING_REVIEW",
        effective_from=ef,
        created_by=actor,
        reason=f"rebind from the terminal ({sub.source} card number)",
        created_at=now,
    )
    tx.insert_version(proposed)
    rf = new_rf()
    tx.insert_request(
        RebindRequest(
            rf=rf,
            tid=sub.tid,
            version=number,
            kind="rebind",
            operator_id=sub.operator_id,
            stan=sub.stan,
            transmission=sub.transmission,
            source=sub.source,
            submitted_at=now,
            state="PENDING_REVIEW",
            decided_by="",
            decided_at=None,
            note="",
            restores=None,
        )
    )
    accounts.record(
        tx,
        key,
        now,
        actor,
        "rebind.submitted",
        sub.tid,
        rf,
        version=number,
        before=None,
        after="PENDING_REVIEW",
        account=masked,
        bank_code=sub.bank_code,
        source=sub.source,
        fingerprint=audit.fingerprint(key, proposed),
    )
    if policy.review == "auto":
        _approve(tx, key, rf, "auto", policy, now)
    request = tx.request(rf)
    assert request is not None
    return Outcome("00", "", request, describe(tx, request))


def _last_accepted(tx: StoreTx, tid: str) -> float | None:
    """When the terminal's latest change that was approved was approved."""
    times = [
        r.decided_at
        for r in tx.requests(tid=tid)
        if r.kind == "rebind"
        and r.decided_at is not None
        and r.state not in accounts.NEVER_EFFECTIVE
    ]
    return max(times) if times else None


def find(tx: StoreTx, tid: str, rf: str | None) -> RebindRequest | None:
    """The terminal's request ``rf`` (None if there is none, or it is another terminal's), or
    with no RF its latest request."""
    if not rf:
        return tx.latest_request(tid)
    request = tx.request(rf)
    return request if request is not None and request.tid == tid else None


def cancel(tx: StoreTx, key: bytes, tid: str, rf: str, now: float) -> Outcome:
    """A 0300 cancel: 25 for an unknown RF, 05 NOT_PENDING once it has been decided; a
    cancelled request cancelled again is 00 (the terminal may retransmit)."""
    request = find(tx, tid, rf) if rf else None
    if request is None:
        return Outcome("25", "NO_SUCH_REQUEST")
    if request.state == "CANCELLED":
        return Outcome("00", "", request, describe(tx, request))
    if request.state != "PENDING_REVIEW":
        return Outcome("05", "NOT_PENDING", request, describe(tx, request, now))
    _decide(tx, key, request, "CANCELLED", "terminal", "cancelled by the terminal", now)
    request = tx.request(rf)
    assert request is not None
    return Outcome("00", "", request, describe(tx, request))


def describe(tx: StoreTx, request: RebindRequest, now: float | None = None) -> dict[str, str]:
    """48 RF, ST, EF and SA for a request (no EF once it was rejected or cancelled). Given
    ``now``, an approved change whose effective-from has passed is ACTIVE, as it is in force
    even before a host process records it so."""
    version = tx.versions(request.tid)[request.version - 1]
    state = request.state
    if now is not None and state == "APPROVED" and version.effective_from <= now:
        state = "ACTIVE"
    elements = {"RF": request.rf, "ST": state}
    if request.state not in accounts.NEVER_EFFECTIVE:
        elements["EF"] = accounts.ef_text(version.effective_from)
    elements["SA"] = version.account_masked
    return elements


def _decide(
    tx: StoreTx,
    key: bytes,
    request: RebindRequest,
    state: str,
    by: str,
    note: str,
    now: float,
    effective_from: float | None = None,
) -> None:
    version = tx.versions(request.tid)[request.version - 1]
    ef = version.effective_from if effective_from is None else effective_from
    if not tx.set_version_state(request.tid, request.version, ("PENDING_REVIEW",), state, ef):
        raise RebindError(f"request {request.rf} is no longer PENDING_REVIEW")
    tx.decide_request(request.rf, by, now, note)
    detail: dict[str, object] = {
        "version": request.version,
        "before": "PENDING_REVIEW",
        "after": state,
    }
    if effective_from is not None:
        detail["effective_from"] = accounts.ef_text(ef)
    if note:
        detail["why"] = note
    accounts.record(tx, key, now, by, f"rebind.{state.lower()}", request.tid, request.rf, **detail)


# -- the acquirer's review -----------------------------------------------------------------------


def _pending(tx: StoreTx, rf: str) -> RebindRequest:
    request = tx.request(rf)
    if request is None:
        raise RebindError(f"no rebind request {rf}")
    if request.state != "PENDING_REVIEW":
        raise RebindError(f"request {rf} is {request.state}, not PENDING_REVIEW")
    return request


def _approve(tx: StoreTx, key: bytes, rf: str, by: str, policy: RebindPolicy, now: float) -> float:
    request = _pending(tx, rf)
    ef = accounts.effective_from(now, policy.cooling_off)
    _decide(tx, key, request, "APPROVED", by, "", now, effective_from=ef)
    return ef


def approve(tx: StoreTx, key: bytes, rf: str, by: str, policy: RebindPolicy, now: float) -> float:
    """A reviewer approves: APPROVED, effective ``cooling_off`` from now. Its effective-from."""
    if not by.strip():
        raise RebindError("a reviewer's name is required")
    return _approve(tx, key, rf, by, policy, now)


def reject(tx: StoreTx, key: bytes, rf: str, by: str, reason: str, now: float) -> None:
    """A reviewer rejects a pending request, saying why."""
    if not by.strip() or not reason.strip():
        raise RebindError("a reviewer's name and a reason are required")
    _decide(tx, key, _pending(tx, rf), "REJECTED", by, reason.strip(), now)


def rollback(
    tx: StoreTx, key: bytes, tid: str, to_version: int, by: str, reason: str, now: float
) -> RebindRequest:
    """The acquirer restores version ``to_version`` (one that was once in force) as a new
    version, effective :data:`~acqhost.domain.accounts.DECISION_LEAD` seconds from now; when it
    takes effect the versions in force since are marked ROLLED_BACK. Refused while a request is
    open."""
    if not by.strip():
        raise RebindError("the name of who rolls back is required")
    versions = tx.versions(tid)
    if not versions:
        raise RebindError(f"no terminal {tid}")
    if not 1 <= to_version <= len(versions):
        raise RebindError(f"{tid} has no version {to_version}")
    target = versions[to_version - 1]
    if target.state not in accounts.ONCE_IN_FORCE:
        raise RebindError(f"version {to_version} is {target.state}: it was never in force")
    open_ = [v for v in versions if v.state in OPEN_REBIND_STATES]
    if open_:
        raise RebindError(
            f"{tid} has an open change (version {open_[0].version}, {open_[0].state}); "
            "reject it or let it take effect first"
        )
    current = accounts.in_force(versions, now)
    if current is not None and current.version == to_version:
        raise RebindError(f"version {to_version} is already the one in force")
    number = versions[-1].version + 1
    why = f"rollback to version {to_version}" + (f": {reason.strip()}" if reason.strip() else "")
    ef = accounts.effective_from(now, 0.0)
    restored = dataclasses.replace(
        target,
        version=number,
        state="APPROVED",
        effective_from=ef,
        created_by=by,
        reason=why,
        created_at=now,
    )
    tx.insert_version(restored)
    rf = new_rf()
    tx.insert_request(
        RebindRequest(
            rf=rf,
            tid=tid,
            version=number,
            kind="rollback",
            operator_id=by,
            stan="",
            transmission="",
            source="acquirer",
            submitted_at=now,
            state="APPROVED",
            decided_by=by,
            decided_at=now,
            note=why,
            restores=to_version,
        )
    )
    accounts.record(
        tx,
        key,
        now,
        by,
        "account.rollback",
        tid,
        rf,
        version=number,
        before=None,
        after="APPROVED",
        restores=to_version,
        account=target.account_masked,
        effective_from=accounts.ef_text(ef),
        why=why,
        fingerprint=audit.fingerprint(key, restored),
    )
    request = tx.request(rf)
    assert request is not None
    return request
