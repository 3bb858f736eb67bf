"""Vouchers of settlement-account changes: what a merchant keeps as proof of a change.

A voucher is a JSON object naming the change (RF, terminal, merchant, the version it proposes,
its state and times, who decided it) and the version that was in force before it, signed by the
host's Ed25519 identity key. ``signature`` is the hex Ed25519 signature over the canonical JSON
(sorted keys, compact separators, UTF-8) of every other field, so anyone holding the host's
public key can check that nothing in it was changed (``acqhost voucher verify``). Account
numbers appear masked only: a voucher is handed to people and kept on paper.

Both functions here are pure: they read what they are given and touch no store and no file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from acqhost.domain import accounts, crypto
from acqhost.errors import AcqHostError
from acqhost.store.base import AccountVersion, RebindRequest, Terminal

__all__ = (
    "VOUCHER_TYPE",
    "VoucherError",
    "canonical",
    "load_voucher",
    "make_voucher",
    "previous_version",
    "summary",
    "utc_text",
    "verify_voucher",
)

# The first field of every voucher. It is signed with the rest, so a signature the host made
# over some other JSON object can never pass for a voucher.
VOUCHER_TYPE = "ACQ1 settlement account change voucher 1"

# States in which a version has been in force at some time (ROLLED_BACK ones were, until a
# rollback took effect).
_WAS_IN_FORCE = accounts.ONCE_IN_FORCE


class VoucherError(AcqHostError, ValueError):
    """A voucher that does not verify; the message says why."""


def utc_text(at: float | None) -> str | None:
    """A time as a voucher shows it: ISO 8601 UTC to the second (``2024-05-01T08:30:00Z``)."""
    if at is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def canonical(fields: Mapping[str, Any]) -> bytes:
    """The bytes a voucher's signature covers: ``fields`` as JSON with sorted keys and
    compact separators, UTF-8 (holder names stay as written, not ``\\u`` escapes)."""
    return json.dumps(
        dict(fields), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")


def previous_version(
    versions: Sequence[AccountVersion], request: RebindRequest, now: float
) -> AccountVersion | None:
    """The version in force before ``request``'s version took effect, or, while it has not
    (pending, approved but cooling off, rejected, cancelled), the one in force at ``now``.

    Only older versions count, and a version later rolled back still counts for the time it
    was in force, which is why this is not :func:`acqhost.domain.accounts.in_force`."""
    own = versions[request.version - 1]
    at = own.effective_from if own.state in _WAS_IN_FORCE else now
    for v in reversed(versions[: request.version - 1]):
        once = v.state in _WAS_IN_FORCE or v.state == "APPROVED"
        if once and v.effective_from <= at:
            return v
    return None


def make_voucher(
    request: RebindRequest,
    terminal: Terminal,
    versions: Sequence[AccountVersion],
    *,
    signing_seed: bytes,
    now: float,
) -> dict[str, Any]:
    """The signed voucher of ``request`` (a change of ``terminal``'s settlement account, whose
    every version is ``versions``, oldest first) as issued at ``now``."""
    proposed = versions[request.version - 1]
    previous = previous_version(versions, request, now)
    effective = None if request.state in accounts.NEVER_EFFECTIVE else proposed.effective_from
    fields: dict[str, Any] = {
        "voucher": VOUCHER_TYPE,
        "rf": request.rf,
        "tid": terminal.tid,
        "mid": terminal.mid,
        "merchant_name": terminal.merchant_name,
        "kind": request.kind,
        "state": request.state,
        "version": request.version,
        "restores": request.restores,
        "account_masked": proposed.account_masked,
        "holder": proposed.holder,
        "bank_code": proposed.bank_code,
        "branch": proposed.branch,
        "submitted_at": utc_text(request.submitted_at),
        "decided_by": request.decided_by or None,
        "decided_at": utc_text(request.decided_at),
        "note": request.note,
        "effective_from": utc_text(effective),
        "previous": None
        if previous is None
        else {
            "version": previous.version,
            "account_masked": previous.account_masked,
            "bank_code": previous.bank_code,
        },
        "issued_at": utc_text(now),
        "host_public_key": crypto.verify_key_of(signing_seed).hex(),
    }
    fields["signature"] = crypto.sign(signing_seed, canonical(fields)).hex()
    return fields


def _hex(value: object, size: int, what: str) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * size:
        raise VoucherError(f"{what} is not {2 * size} hex digits")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise VoucherError(f"{what} is not {2 * size} hex digits") from None


def load_voucher(text: str) -> object:
    """Parse a voucher file. A key given twice is refused: a reader would see one value and
    the signature check another (JSON parsers keep the last)."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in items:
            if key in seen:
                raise VoucherError(f"the field {key!r} appears twice")
            seen[key] = value
        return seen

    try:
        return json.loads(text, object_pairs_hook=pairs)
    except VoucherError:
        raise
    except ValueError:
        raise VoucherError("not a JSON document") from None


def verify_voucher(voucher: object, host_public_key: bytes) -> dict[str, Any]:
    """Check ``voucher`` (a parsed JSON document) against the host's public key; the voucher
    if it is whole and signed by that key, else :class:`VoucherError` saying why. A voucher
    naming another host key is refused even when its signature matches that key: whoever
    holds a key can sign anything with it."""
    if not isinstance(voucher, dict):
        raise VoucherError("not a JSON object")
    if voucher.get("voucher") != VOUCHER_TYPE:
        raise VoucherError("not a settlement account change voucher")
    fields = {k: v for k, v in voucher.items() if k != "signature"}
    if "signature" not in voucher:
        raise VoucherError("no signature")
    signature = _hex(voucher["signature"], 64, "signature")
    embedded = _hex(fields.get("host_public_key"), 32, "host_public_key")
    if embedded != host_public_key:
        raise VoucherError(
            f"signed for host key {embedded.hex()}, not the expected {host_public_key.hex()}"
        )
    if not crypto.verify(host_public_key, canonical(fields), signature):
        raise VoucherError("the signature does not match the content (a field was changed)")
    return voucher


def summary(voucher: Mapping[str, Any]) -> str:
    """One line naming what a verified voucher attests."""
    previous = voucher.get("previous")
    before = (
        f"; before: v{previous.get('version')} {previous.get('account_masked')}"
        if isinstance(previous, dict)
        else ""
    )
    when = voucher.get("effective_from") or "never effective"
    return (
        f"{voucher.get('rf')} {voucher.get('kind')} of terminal {voucher.get('tid')} "
        f"(merchant {voucher.get('mid')}): v{voucher.get('version')} "
        f"{voucher.get('account_masked')} at {voucher.get('bank_code')}, "
        f"{voucher.get('state')}, effective {when}{before}; issued {voucher.get('issued_at')}"
    )
