"""Settlement updates to the banks (PROTOCOL.md 6): the advices a change queues in its own
transaction, how the deliverer opens them, and their signature.

Queuing. ``queue_account_advice`` (a 0320: an account version became ACTIVE) and
``queue_settlement_advice`` (a 0520: a batch closed, one per settlement account) write the
advice into the transaction of the change that causes it, so that neither is ever committed
without the other. The store keeps the advice's fields only sealed with the host data key
(48 AC is the full account number) as JSON; fields 11 and 37 are not sealed but made of the
outbox id the store assigns: 37 is the id in 12 digits (the event id banks de-duplicate on) and
11 the id counted from 000001 to 999999 and round again.

A version that no rebind request brought (version 1, registered with its terminal) has no 48 RF:
its 0320 carries every other element.

Signing. SG is Ed25519 by the host's identity key over ``MTI + field 37 + the UTF-8 bytes of
field 48 before SG``, and SG is 48's last element. It is made when the advice is sent, not when
it is queued: the transactions that queue advices (activations, registrations, batch closes)
hold only the data key, the signing key stays with the bank link that uses it, and an advice
queued before the host's identity key was replaced is signed with the key the banks now trust.
Fields 7 and 11 are not signed, so a resend may bear its own transmission time.
:func:`sign_advice` and :func:`verify_advice` are the one statement of the rule, for the host
and for a bank alike.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from acqhost.config import BankConfig
from acqhost.domain import crypto
from acqhost.store.base import (
    AccountVersion,
    BankStatus,
    NewAdvice,
    RebindRequest,
    Store,
    StoredAdvice,
    StoreTx,
)
from acqhost.wire.tlv import decode_tlv, encode_tlv

__all__ = (
    "ACCOUNT_ADVICE",
    "SETTLEMENT_ADVICE",
    "Advice",
    "LinkStatus",
    "event_id",
    "link_status",
    "open_advice",
    "queue_account_advice",
    "queue_settlement_advice",
    "sign_advice",
    "signed_bytes",
    "stan_of",
    "verify_advice",
)

ACCOUNT_ADVICE = "0320"
SETTLEMENT_ADVICE = "0520"

# 48 SG's encoded element: tag, three length digits, 64 bytes of signature in hex.
_SG_ELEMENT = 5 + 2 * crypto.SIGNATURE_BYTES


@dataclass(frozen=True, slots=True)
class Advice:
    """An advice as the domain sees it: its fields in the codec's form (``"t"`` the MTI,
    ``"48"`` the TLV text, no SG until it is signed)."""

    id: int
    tid: str
    mti: str
    bank_code: str
    fields: dict[str, str] = field(repr=False)  # 48 AC is a full account number


def event_id(advice_id: int) -> str:
    """Field 37 of an advice: its outbox id in 12 digits."""
    return f"{advice_id:012d}"


def stan_of(advice_id: int) -> str:
    """Field 11 of an advice: its outbox id counted 000001 to 999999, and round again."""
    return f"{(advice_id - 1) % 999_999 + 1:06d}"


def queue_account_advice(
    tx: StoreTx,
    data_key: bytes,
    version: AccountVersion,
    request: RebindRequest | None,
    now: float,
) -> Advice:
    """Queue the 0320 of ``version`` becoming ACTIVE: 7, 41, 42, 91 = 2, 101 = SETTLEACCT and
    48 {RF (the request that brought it; none for version 1), AC, NM, BK, SV, EF}, with 11 and
    37 of its id."""
    mid = _mid(tx, version.tid)
    elements = {} if request is None else {"RF": request.rf}
    elements |= {
        "AC": _account(data_key, version),
        "NM": version.holder,
        "BK": version.bank_code,
        "SV": str(version.version),
        "EF": _utc("%Y%m%d%H%M%S", version.effective_from),
    }
    fields = {
        "t": ACCOUNT_ADVICE,
        "7": _utc("%m%d%H%M%S", now),
        "41": version.tid,
        "42": mid,
        "48": encode_tlv(elements),
        "91": "2",
        "101": "SETTLEACCT",
    }
    return _queue(tx, data_key, version.bank_code, fields, now)


def queue_settlement_advice(
    tx: StoreTx,
    data_key: bytes,
    tid: str,
    batch_no: int,
    version: AccountVersion,
    count: int,
    amount: int,
    now: float,
) -> Advice:
    """Queue the 0520 of batch ``batch_no`` of terminal ``tid`` for the sales that settle to
    ``version`` (``count`` of them, ``amount`` net in minor units): 7, 41, 42 and 48 {BN, AC,
    NM, BK, SV, CT, AM}, with 11 and 37 of its id. For the batch close's transaction, once per
    settlement account of the batch."""
    if version.tid != tid:
        raise ValueError(f"version {version.version} is {version.tid}'s, not {tid}'s")
    if not 1 <= batch_no <= 999_999 or count < 0:
        raise ValueError(f"no batch {batch_no} of {count} sales")
    elements = {
        "BN": f"{batch_no:06d}",
        "AC": _account(data_key, version),
        "NM": version.holder,
        "BK": version.bank_code,
        "SV": str(version.version),
        "CT": str(count),
        "AM": str(amount),
    }
    fields = {
        "t": SETTLEMENT_ADVICE,
        "7": _utc("%m%d%H%M%S", now),
        "41": tid,
        "42": _mid(tx, tid),
        "48": encode_tlv(elements),
    }
    return _queue(tx, data_key, version.bank_code, fields, now)


def _queue(
    tx: StoreTx, data_key: bytes, bank_code: str, fields: dict[str, str], now: float
) -> Advice:
    text = json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
    sealed = crypto.seal(data_key, text.encode("utf-8"))
    tid, mti = fields["41"], fields["t"]
    advice_id = tx.insert_advice(NewAdvice(tid, mti, bank_code, sealed, now))
    return Advice(advice_id, tid, mti, bank_code, _numbered(fields, advice_id))


def open_advice(data_key: bytes, stored: StoredAdvice) -> Advice:
    """The advice ``stored`` with its fields unsealed and numbered (11, 37), ready to sign and
    send. :class:`~acqhost.domain.crypto.CryptoError` if they do not open under ``data_key``
    or are not this row's (another MTI or terminal)."""
    try:
        fields = json.loads(crypto.unseal(data_key, stored.sealed_fields).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise crypto.CryptoError(f"advice {stored.id}: sealed fields are not JSON") from None
    if not (
        isinstance(fields, dict)
        and all(isinstance(v, str) for v in fields.values())
        and fields.get("t") == stored.mti
        and fields.get("41") == stored.tid
    ):
        raise crypto.CryptoError(f"advice {stored.id}: sealed fields do not match its row")
    return Advice(stored.id, stored.tid, stored.mti, stored.bank_code, _numbered(fields, stored.id))


# -- 48 SG ---------------------------------------------------------------------------------------


def signed_bytes(fields: Mapping[str, str]) -> bytes:
    """What SG signs: ``MTI + field 37 + the UTF-8 bytes of field 48 before SG`` (all of 48
    when it has no SG yet). ValueError (TLVError for a malformed 48) for an advice without
    them, or with elements after SG."""
    try:
        mti, f37, f48 = fields["t"], fields["37"], fields["48"]
        elements = decode_tlv(f48)
    except KeyError as missing:
        raise ValueError(f"an advice to sign has no {missing.args[0]}") from None
    if "SG" in elements:
        if list(elements)[-1] != "SG" or len(elements["SG"]) != 2 * crypto.SIGNATURE_BYTES:
            raise ValueError("48 SG is not the last element, or not a signature")
        f48 = f48[:-_SG_ELEMENT]
    if not (mti.isascii() and f37.isascii()):
        raise ValueError("the MTI and field 37 are ASCII")
    return mti.encode("ascii") + f37.encode("ascii") + f48.encode("utf-8")


def sign_advice(fields: Mapping[str, str], signing_seed: bytes) -> dict[str, str]:
    """``fields`` with 48 SG (hex) appended: the host's signature of :func:`signed_bytes`.
    ValueError if 48 is signed already."""
    if "SG" in decode_tlv(fields.get("48", "")):
        raise ValueError("the advice is signed already")
    signature = crypto.sign(signing_seed, signed_bytes(fields))
    return {**fields, "48": fields["48"] + encode_tlv({"SG": signature.hex()})}


def verify_advice(fields: Mapping[str, str], verify_key: bytes) -> bool:
    """Whether 48 SG, the last element of 48, is ``verify_key``'s signature of the advice
    (:func:`signed_bytes`). Never raises: anything malformed is simply False."""
    try:
        signature = bytes.fromhex(decode_tlv(fields["48"])["SG"])
        message = signed_bytes(fields)
    except (KeyError, ValueError):  # TLVError and CryptoError are ValueErrors
        return False
    return crypto.verify(verify_key, message, signature)


# -- helpers -------------------------------------------------------------------------------------


def _numbered(fields: Mapping[str, str], advice_id: int) -> dict[str, str]:
    """``fields`` with 11 and 37 of the advice's id, in field order (the MTI first)."""
    numbered = {**fields, "11": stan_of(advice_id), "37": event_id(advice_id)}
    return dict(sorted(numbered.items(), key=lambda kv: -1 if kv[0] == "t" else int(kv[0])))


def _mid(tx: StoreTx, tid: str) -> str:
    """The terminal's field 42."""
    terminal = tx.terminal(tid)
    if terminal is None:
        raise ValueError(f"no terminal {tid!r} to advise about")
    return terminal.mid


def _account(data_key: bytes, version: AccountVersion) -> str:
    """48 AC: the version's account number, unsealed."""
    return crypto.unseal(data_key, version.sealed_account).decode("ascii")


def _utc(pattern: str, at: float) -> str:
    # Field 7 (MMDDhhmmss) and 48 EF (YYYYMMDDhhmmss, as accounts.ef_text: not imported, since
    # accounts queues its advices through this module) are UTC.
    return time.strftime(pattern, time.gmtime(at))


# -- the banks' view -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkStatus:
    """What waits for one configured bank (its bank codes' outbox), and who delivers it."""

    bank: str
    queued: int
    oldest_age: float  # seconds the oldest undelivered advice has waited (0 when none)
    retrying: int  # undelivered advices that have failed at least once
    dead: int
    last_error: str
    dispatcher: str  # the lease's owner while unexpired, else ""

    def as_json(self) -> dict[str, object]:
        return {
            "bank": self.bank, "queued": self.queued, "oldest_age": round(self.oldest_age, 3),
            "retrying": self.retrying, "dead": self.dead, "last_error": self.last_error,
            "dispatcher": self.dispatcher,
        }  # fmt: skip


def link_status(store: Store, banks: Sequence[BankConfig], now: float) -> list[LinkStatus]:
    """Per configured bank, its bank codes' outbox summed (``Store.outbox_status``), and its
    dispatcher; then, as bank "(none)", what waits under bank codes that no bank takes (an
    advice of a terminal a bank takes by terminal id is counted under its bank code)."""
    by_code = {s.bank_code: s for s in store.outbox_status()}
    taken: set[str] = set()
    out = []
    for bank in banks:
        mine = [by_code[c] for c in bank.bank_codes if c in by_code]
        taken.update(bank.bank_codes)
        lease = store.bank_lease(bank.name)
        owner = lease.owner if lease is not None and lease.expires_at > now else ""
        out.append(_summed(bank.name, mine, owner, now))
    rest = [s for code, s in by_code.items() if code not in taken]
    if rest:
        out.append(_summed("(none)", rest, "", now))
    return out


def _summed(name: str, statuses: Sequence[BankStatus], owner: str, now: float) -> LinkStatus:
    errors = [s.last_error for s in statuses if s.last_error]
    return LinkStatus(
        name,
        sum(s.queued for s in statuses),
        max((s.oldest_age(now) for s in statuses), default=0.0),
        sum(s.retrying for s in statuses),
        sum(s.dead for s in statuses),
        errors[-1] if errors else "",
        owner,
    )
