"""Stages shared by every route, in the order PROTOCOL.md section 3 fixes: known terminal and
matching merchant (03), active and signed on (58), MAC (63), mandatory fields (30)."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable

from acqhost.domain import crypto
from acqhost.errors import Decline, TLVError
from acqhost.host.context import Context
from acqhost.host.state import HostState
from acqhost.wire.tlv import decode_tlv

__all__ = (
    "Stage",
    "active",
    "digits",
    "fields",
    "known_terminal",
    "parse_tlv",
    "require",
    "signed_on",
    "verify_mac",
)

Stage = Callable[[HostState, Context], None]


def known_terminal(state: HostState, ctx: Context) -> None:
    """03 unless field 41 names a registered terminal and field 42 is its merchant."""
    tid = ctx.req.get("41")
    terminal = state.terminal(tid) if tid else None
    if terminal is None or terminal.mid != ctx.req.get("42"):
        raise Decline("03", "UNKNOWN_TERMINAL" if terminal is None else "MERCHANT_MISMATCH")
    ctx.terminal = terminal


def active(state: HostState, ctx: Context) -> None:
    """58 for a disabled terminal."""
    assert ctx.terminal is not None
    if ctx.terminal.status != "active":
        raise Decline("58", "TERMINAL_DISABLED")


def signed_on(state: HostState, ctx: Context) -> None:
    """58 for a disabled terminal or one without session keys."""
    terminal = ctx.terminal
    assert terminal is not None
    if terminal.status != "active":  # active(), without a call
        raise Decline("58", "TERMINAL_DISABLED")
    keys = state.session_keys(terminal.tid)
    if keys is None:
        raise Decline("58", "NOT_SIGNED_ON")
    ctx.keys = keys


def verify_mac(state: HostState, ctx: Context) -> None:
    """63 for a missing or wrong MAC. The MAC field (64, or 128 with a secondary bitmap) is the
    last field of the message, so it covers every byte before the last eight."""
    assert ctx.keys is not None and ctx.terminal is not None
    req, raw = ctx.req, ctx.raw
    if "1" in req and "128" not in req and "64" in req:
        data, tag = _mac_in_64(state, req, raw)  # PROTOCOL.md 4.2's sign-off wording
    elif req.get("128" if "1" in req else "64") is None:
        raise Decline("63", "MAC_MISSING")
    else:
        data, tag = raw[:-8], raw[-8:]
    if not crypto.mac_ok(ctx.keys.rx_mac, data, tag):
        # Another host process may have taken a newer sign-on: reload the keys once, within
        # the rate of reads anyone may cause (state.PEER_READS_PER_SECOND).
        if not state.peer_reads.take(state.clock()):
            raise Decline("63", "BAD_MAC")
        fresh = state.session_keys(ctx.terminal.tid, reload=True)
        if fresh is None or not crypto.mac_ok(fresh.rx_mac, data, tag):
            raise Decline("63", "BAD_MAC")
        ctx.keys = fresh
    ctx.mac_response = True


def _mac_in_64(state: HostState, req: dict[str, str], raw: bytes) -> tuple[bytes, bytes]:
    """(the bytes before field 64, field 64) of a message with a secondary bitmap whose MAC is
    in 64, not 128 (PROTOCOL.md 4.2 words the sign-off's MAC so; 4.3 covers the bytes before
    the MAC field). Field 64's place is found by encoding the request again with another
    value in it: 63 (BAD_MAC) when that does not give the frame back but for those 8 bytes."""
    encode = state.encode
    if encode is None:
        raise Decline("63", "BAD_MAC")
    other = "".join("0123456789ABCDEF"[(int(c, 16) + 8) % 16] for c in req["64"])
    changed = encode({**req, "64": other})
    diff = [i for i, (a, b) in enumerate(zip(raw, changed, strict=False)) if a != b]
    if len(changed) != len(raw) or len(diff) != 8 or diff[-1] - diff[0] != 7:
        raise Decline("63", "BAD_MAC")
    at = diff[0]
    return raw[:at], raw[at : at + 8]


def require(*names: str) -> Stage:
    """30 unless every named field is present."""
    wanted = tuple(names)

    def stage(state: HostState, ctx: Context) -> None:
        req = ctx.req
        for name in wanted:
            if name not in req:
                raise Decline("30", f"MISSING_{name}")

    stage.__name__ = f"require_{'_'.join(wanted)}"
    return stage


def digits(*names: str) -> Stage:
    """30 unless every named field present is all ASCII digits (the codec has fixed lengths)."""
    wanted = tuple(names)

    def stage(state: HostState, ctx: Context) -> None:
        req = ctx.req
        for name in wanted:
            value = req.get(name)
            if value is not None and not (value.isdigit() and value.isascii()):
                raise Decline("30", f"FORMAT_{name}")

    stage.__name__ = f"digits_{'_'.join(wanted)}"
    return stage


def fields(required: tuple[str, ...], numeric: tuple[str, ...]) -> Stage:
    """30 unless every ``required`` field is present and every ``numeric`` one present is all
    ASCII digits: :func:`require` and :func:`digits` in one stage, checked with set and string
    operations instead of a Python loop per field when the message is fine."""
    need = frozenset(required)
    always = tuple(n for n in numeric if n in need)
    sometimes = tuple(n for n in numeric if n not in need)
    check_required = require(*required)
    check_digits = digits(*numeric)
    # The values of ``always`` in one C call (one name gives the value itself, which joins
    # to the same text).
    get_always: Callable[[dict[str, str]], Iterable[str]] = (
        operator.itemgetter(*always) if always else lambda req: ()
    )

    def stage(state: HostState, ctx: Context) -> None:
        req = ctx.req
        if not need.issubset(req):
            check_required(state, ctx)  # names the first missing field
        text = "".join(get_always(req))
        for n in sometimes:
            if n in req:
                text += req[n]
        if text and not (text.isdigit() and text.isascii()):
            check_digits(state, ctx)  # raises, naming the first bad field

    stage.__name__ = "fields"
    return stage


def parse_tlv(state: HostState, ctx: Context) -> None:
    """Field 48 into ``ctx.tlv``; a malformed TLV is a format error (30)."""
    raw = ctx.req.get("48")
    if raw:
        try:
            ctx.tlv = decode_tlv(raw)
        except TLVError:
            raise Decline("30", "BAD_TLV") from None


def echo(ctx: Context, names: Iterable[str]) -> None:
    req, resp = ctx.req, ctx.resp
    for name in names:
        value = req.get(name)
        if value is not None:
            resp[name] = value
