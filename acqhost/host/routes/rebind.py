"""Settlement-account change, 0300 -> 0310 (PROTOCOL.md 5.3): submit, inquire, cancel.

The stages check formats (30) and retransmissions (94) from what the event loop may read
cheaply; everything else is decided by :mod:`acqhost.domain.rebind` inside one store transaction
run by the ledger writer, after the operator's password was checked with argon2id in a thread of
its own (a tenth of a second that must not stall the loop or the group commit).

Order of the checks of a submit, first failure wins (PROTOCOL.md 3 puts formats first):
30 formats (OP, PW, NM, BK of 12 digits, AC digits or a readable track 2, a PW that opens under
the session key) -> 94 retransmission of an accepted submit (same 41, 11, 7; the answer names
its request) -> 55/75 operator password -> 14 account number -> 05 NAME_MISMATCH -> 05
SAME_ACCOUNT -> 05 PENDING_EXISTS -> 65 too soon after the last accepted change.

Requests pipelined on one connection are answered in order, but an inquire reads the store
when it arrives: one sent behind a submit before its 0310 came back may not see that submit
yet. (A terminal needs the submit's RF to ask about it, so it waits for the 0310 anyway.)
"""

from __future__ import annotations

import secrets
from typing import Any

from acqhost.domain import crypto, rebind
from acqhost.domain.cards import track2_card
from acqhost.errors import Decline
from acqhost.host.context import Context, Effect
from acqhost.host.state import HostState
from acqhost.store.base import Store
from acqhost.wire.tlv import encode_tlv

__all__ = (
    "FILE_NAME",
    "REBIND_ECHO",
    "REBIND_FIELDS",
    "cancel",
    "file_name",
    "inquire",
    "submit",
)

FILE_NAME = "SETTLEACCT"  # field 101 of a settlement-account change
REBIND_FIELDS = ("7", "11", "41", "42")
REBIND_ECHO = ("7", "11", "41", "42", "91", "101")
REFUSALS_KEPT = 1024  # refused submits remembered per host process, for retransmissions


def file_name(state: HostState, ctx: Context) -> None:
    """A submit must name the file it changes (30 without 101); any file but SETTLEACCT is
    one this host does not keep (12)."""
    name = ctx.req.get("101")
    if name is None:
        if ctx.req.get("91") == "2":
            raise Decline("30", "MISSING_101")
        return
    if name.strip() != FILE_NAME:
        raise Decline("12", "UNKNOWN_FILE")


def _text(ctx: Context, tag: str) -> str:
    value = ctx.tlv.get(tag, "").strip()
    if not value:
        raise Decline("30", f"MISSING_{tag}")
    return value


class _SubmitJob:
    """One submit's work off the event loop: the password check (``pre``, its own thread),
    then the decision (``call``, in the ledger writer's transaction)."""

    def __init__(
        self, state: HostState, sub: rebind.Submission, password: str, password_hash: bytes | None
    ) -> None:
        self.state = state
        self.sub = sub
        self._password = password
        self._hash = password_hash
        self.password_ok = False

    def check_password(self) -> None:
        # An unknown operator costs the same argon2id as a known one: the answer's timing
        # does not tell which operator ids exist.
        stored = self._hash if self._hash is not None else _dummy_hash()
        ok = crypto.verify_password(stored, self._password)
        self.password_ok = ok and self._hash is not None
        self._password = ""

    def apply(self, store: Store) -> rebind.Outcome:
        state = self.state
        with store.transaction(self.sub.tid) as tx:
            # The time of the decision is taken once the transaction holds its lock, so no
            # wait before it can eat into the lead before an effective-from.
            return rebind.submit(
                tx,
                state.host_keys.data_key,
                self.sub,
                password_ok=self.password_ok,
                policy=state.config.rebind,
                now=state.clock(),
            )


_dummy: list[bytes] = []


def _dummy_hash() -> bytes:
    """An argon2id hash of a random password, made once, with the real limits."""
    if not _dummy:
        _dummy.append(crypto.hash_password(secrets.token_hex(16)))
    return _dummy[0]


def submit(state: HostState, ctx: Context) -> None:
    """91 = 2: format checks, the retransmission check, then the effect that decides."""
    req, terminal, keys = ctx.req, ctx.terminal, ctx.keys
    assert terminal is not None and keys is not None
    operator_id = _text(ctx, "OP")
    sealed_password = _text(ctx, "PW")
    holder = _text(ctx, "NM")
    bank_code = _text(ctx, "BK")
    if len(bank_code) != 12 or not (bank_code.isdigit() and bank_code.isascii()):
        raise Decline("30", "FORMAT_BK")
    account = ctx.tlv.get("AC", "").strip()
    if account:
        if not (account.isdigit() and account.isascii()):
            raise Decline("30", "FORMAT_AC")
        source = "typed"
    elif "35" in req:
        account = track2_card(req["35"])[0]
        source = "card"
    else:
        raise Decline("30", "MISSING_AC")
    try:
        password = crypto.decrypt_password(keys.rx_enc, sealed_password)
    except crypto.CryptoError:
        raise Decline("30", "FORMAT_PW") from None
    # A retransmission of a refused submit gets the same answer (its wrong password is not
    # counted twice), one of an accepted submit a 94 naming its request, both without a
    # password check; the decision's transaction checks again, for one still in flight.
    refused = state.rebind_refusals.get((terminal.tid, req["11"], req["7"]))
    if refused is not None:
        raise Decline(refused.code, refused.reason, refused.elements)
    with state.store.transaction(write=False) as tx:
        earlier = tx.request_for_message(terminal.tid, req["11"], req["7"])
        if earlier is not None:
            raise Decline("94", "DUPLICATE", rebind.describe(tx, earlier, ctx.now))
        operator = tx.operator(terminal.tid, operator_id)
    job = _SubmitJob(
        state,
        rebind.Submission(
            tid=terminal.tid,
            operator_id=operator_id,
            stan=req["11"],
            transmission=req["7"],
            holder=holder,
            bank_code=bank_code,
            branch=ctx.tlv.get("BR", "").strip(),
            account=account,
            source=source,
        ),
        password,
        None if operator is None else operator.password_hash,
    )
    ctx.effect = Effect(call=job.apply, pre=job.check_password, then=_answer)
    ctx.log["operator"] = operator_id
    ctx.log["source"] = source


def inquire(state: HostState, ctx: Context) -> None:
    """91 = 5: the request named by 48 RF, or the terminal's latest; 25 when there is none."""
    assert ctx.terminal is not None
    with state.store.transaction(write=False) as tx:
        request = rebind.find(tx, ctx.terminal.tid, ctx.tlv.get("RF", "").strip() or None)
        if request is None:
            raise Decline("25", "NO_SUCH_REQUEST")
        ctx.resp["48"] = encode_tlv(rebind.describe(tx, request, ctx.now))
    ctx.log["rf"] = request.rf


def cancel(state: HostState, ctx: Context) -> None:
    """91 = 3: cancel the pending request named by 48 RF (decided in the ledger writer)."""
    assert ctx.terminal is not None
    rf = _text(ctx, "RF")
    tid = ctx.terminal.tid
    key, clock = state.host_keys.data_key, state.clock

    def apply(store: Store) -> rebind.Outcome:
        with store.transaction(tid) as tx:
            return rebind.cancel(tx, key, tid, rf, clock())

    ctx.effect = Effect(call=apply, then=_answer)
    ctx.log["rf"] = rf


def _answer(state: HostState, ctx: Context, outcome: Any) -> None:
    """The 0310 from what the transaction decided."""
    assert isinstance(outcome, rebind.Outcome)
    if outcome.request is not None:
        ctx.log["rf"] = outcome.request.rf
    if outcome.code != "00":
        refusal = Decline(outcome.code, outcome.reason, outcome.elements)
        if ctx.route == "rebind_submit" and outcome.code != "94":
            refusals = state.rebind_refusals
            refusals[(ctx.req["41"], ctx.req["11"], ctx.req["7"])] = refusal
            if len(refusals) > REFUSALS_KEPT:
                refusals.popitem(last=False)
        raise refusal
    ctx.resp["48"] = encode_tlv(outcome.elements)
    ctx.log["state"] = outcome.elements.get("ST")
