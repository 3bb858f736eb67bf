"""Network management, 0800 -> 0810 (PROTOCOL.md 4.2): sign-on, sign-off, echo test.

A sign-on is refused (63, the terminal's current keys kept) unless its signature verifies, its
field 7 is within ``signon_skew`` of the host's clock, and the store has not accepted it before
(the same terminal, field 7 and STAN: a replay). A sign-off is MAC'd under the current session
(its route checks that before this module sees it), so no outsider can knock a terminal off.
"""

from __future__ import annotations

from acqhost.domain import crypto, signon
from acqhost.errors import Decline
from acqhost.host.context import Context, Effect
from acqhost.host.state import HostState
from acqhost.store.base import Session
from acqhost.wire.tlv import encode_tlv

__all__ = ("NETWORK_ECHO", "NETWORK_FIELDS", "echo_test", "sign_off", "sign_on")

NETWORK_FIELDS = ("7", "11", "41", "42")
NETWORK_ECHO = ("7", "11", "41", "42", "70")


def _hex32(value: str | None, what: str) -> bytes:
    try:
        raw = bytes.fromhex(value or "")
    except ValueError:
        raise Decline("30", f"FORMAT_{what}") from None
    return raw


def sign_on(state: HostState, ctx: Context) -> None:
    """Verify the terminal's signature over its ephemeral key and the sign-on's freshness;
    answer with the host's key once the store has taken the sign-on as new."""
    req, terminal = ctx.req, ctx.terminal
    assert terminal is not None
    kx_terminal = _hex32(ctx.tlv.get("KX"), "KX")
    signature = _hex32(ctx.tlv.get("SG"), "SG")
    if len(kx_terminal) != 32 or len(signature) != 64:
        raise Decline("30", "FORMAT_SIGNON")
    field7, stan = req["7"], req["11"]
    sent = signon.offset(field7, ctx.now)
    if sent is None:
        raise Decline("30", "FORMAT_7")
    transcript = crypto.signon_request_transcript(terminal.tid, stan, field7, kx_terminal)
    if not crypto.verify(terminal.identity_public_key, transcript, signature):
        raise Decline("63", "BAD_SIGNATURE")
    skew = state.config.signon_skew
    if abs(sent) > skew:
        ctx.log["offset"] = round(sent)
        raise Decline("63", "STALE_SIGNON")
    kx_host_pk, kx_host_sk = crypto.kx_keypair()
    try:
        rx, tx = crypto.host_session(kx_host_pk, kx_host_sk, kx_terminal)
    except crypto.CryptoError:
        raise Decline("63", "BAD_KX") from None
    data_key = state.host_keys.data_key
    session = Session(
        tid=terminal.tid,
        sealed_rx=crypto.seal(data_key, rx),
        sealed_tx=crypto.seal(data_key, tx),
        signed_on_at=ctx.now,
    )
    forget_before = ctx.now - signon.remembered_for(skew)
    ctx.effect = Effect(
        call=lambda store: store.accept_signon(session, field7, stan, forget_before),
        then=_signed_on,
    )
    response = crypto.signon_response_transcript(terminal.tid, stan, kx_host_pk, kx_terminal)
    ctx.resp["48"] = encode_tlv(
        {"KX": kx_host_pk.hex(), "SG": crypto.sign(state.host_keys.signing_seed, response).hex()}
    )


def _signed_on(state: HostState, ctx: Context, accepted: object) -> None:
    """The new session is durable: this process takes its keys at once. A sign-on the store
    had accepted before is a replay: 63, and the terminal keeps its keys."""
    assert ctx.terminal is not None
    if not accepted:
        raise Decline("63", "REPLAYED_SIGNON")
    state.session_keys(ctx.terminal.tid, reload=True)


def sign_off(state: HostState, ctx: Context) -> None:
    """Drop the terminal's session keys. Its route has verified the request's MAC under them,
    and the answer is MAC'd under them too, though they are gone by the time it leaves."""
    assert ctx.terminal is not None
    tid = ctx.terminal.tid
    ctx.effect = Effect(call=lambda store: store.drop_session(tid), then=_signed_off)


def _signed_off(state: HostState, ctx: Context, result: object) -> None:
    assert ctx.terminal is not None
    state.sessions.pop(ctx.terminal.tid, None)


def echo_test(state: HostState, ctx: Context) -> None:
    """Nothing to do: reaching here means the terminal is known and active."""
