"""Network management, 0800 -> 0810 (PROTOCOL.md 4.2): sign-on, sign-off, echo test."""

from __future__ import annotations

from acqhost.domain import crypto
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
    """Verify the terminal's signature over its ephemeral key; answer with the host's."""
    req, terminal = ctx.req, ctx.terminal
    assert terminal is not None
    kx_terminal = _hex32(ctx.tlv.get("KX"), "KX")
    signature = _hex32(ctx.tlv.get("SG"), "SG")
    if len(kx_terminal) != 32 or len(signature) != 64:
        raise Decline("30", "FORMAT_SIGNON")
    transcript = crypto.signon_request_transcript(terminal.tid, req["11"], req["7"], kx_terminal)
    if not crypto.verify(terminal.identity_public_key, transcript, signature):
        raise Decline("63", "BAD_SIGNATURE")
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
    ctx.effect = Effect(call=lambda store: store.save_session(session), then=_signed_on)
    response = crypto.signon_response_transcript(terminal.tid, req["11"], kx_host_pk, kx_terminal)
    ctx.resp["48"] = encode_tlv(
        {"KX": kx_host_pk.hex(), "SG": crypto.sign(state.host_keys.signing_seed, response).hex()}
    )


def _signed_on(state: HostState, ctx: Context, result: object) -> None:
    """The new session is durable: this process takes its keys at once."""
    assert ctx.terminal is not None
    state.session_keys(ctx.terminal.tid, reload=True)


def sign_off(state: HostState, ctx: Context) -> None:
    assert ctx.terminal is not None
    tid = ctx.terminal.tid
    ctx.effect = Effect(call=lambda store: store.drop_session(tid), then=_signed_off)


def _signed_off(state: HostState, ctx: Context, result: object) -> None:
    assert ctx.terminal is not None
    state.sessions.pop(ctx.terminal.tid, None)


def echo_test(state: HostState, ctx: Context) -> None:
    """Nothing to do: reaching here means the terminal is known and active."""
