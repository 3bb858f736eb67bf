"""The host core: the route table, built once, and the two synchronous steps of a message.

:meth:`HostCore.decide` decodes a frame, picks its route by (MTI, processing code or network
code) and runs the route's stages: the answer is built, and what must be durable before it
may leave is ``ctx.effect``. The runtime makes that durable (group commit in its ledger), then
:meth:`HostCore.complete` finishes the answer from the write's outcome and
:meth:`HostCore.answer` MACs, encodes and logs it. Without an effect, ``answer`` follows
``decide`` at once. The server and the pipeline benchmark run exactly these calls. Every
failure answer is made by :func:`acqhost.host.answers.failure_answer`; only a frame whose MTI
cannot be read gets no answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

from acqhost.domain import crypto
from acqhost.errors import Decline, StoreUnavailable
from acqhost.host.answers import carries_mac, echo_fields, failure_answer
from acqhost.host.context import Context
from acqhost.host.routes import network, rebind, reversal, sale, settle
from acqhost.host.stages import (
    Stage,
    active,
    echo,
    fields,
    known_terminal,
    parse_tlv,
    require,
    signed_on,
    verify_mac,
)
from acqhost.host.state import HostState
from acqhost.log import get_logger, message_logger
from acqhost.log.ratelimit import SourceLimiter
from acqhost.wire.codec import Codec, CodecError

__all__ = ("UNDECODABLE", "HostCore", "Route", "build_routes", "response_mti")

# The route of a frame the codec could not decode in full (answered 30 when its MTI is known).
UNDECODABLE = "undecodable"

# Keys of a message without a secondary bitmap.
_PRIMARY_KEYS = frozenset(("h", "t", "p", *(str(n) for n in range(2, 65))))


class Route(NamedTuple):
    name: str
    stages: tuple[Stage, ...]
    echo: tuple[str, ...]


# The field that picks the route of an MTI: field 3 (processing code) unless named here; ""
# (no field) routes the MTI alone.
ROUTE_FIELD = {"0800": "70", "0300": "91", "0500": ""}


def build_routes() -> dict[tuple[str, str], Route]:
    """The route table, keyed by (MTI, field 3), or (MTI, the field ROUTE_FIELD names)."""
    mac_checked: tuple[Stage, ...] = (known_terminal, signed_on, verify_mac)
    rebind_head: tuple[Stage, ...] = (
        *mac_checked,
        fields(rebind.REBIND_FIELDS, ("3", "7", "11")),
        rebind.file_name,
        parse_tlv,
    )
    network_head: tuple[Stage, ...] = (
        known_terminal,
        active,
        require(*network.NETWORK_FIELDS),
        parse_tlv,
    )
    return {
        ("0800", "001"): Route(
            "sign_on", (*network_head, require("48"), network.sign_on), network.NETWORK_ECHO
        ),
        # Sign-off is MAC'd under the session it ends (PROTOCOL.md 4.2): 58 without one, 63
        # without a valid MAC, and the keys kept.
        ("0800", "002"): Route(
            "sign_off",
            (*mac_checked, require(*network.NETWORK_FIELDS), network.sign_off),
            network.NETWORK_ECHO,
        ),
        ("0800", "301"): Route("echo", (*network_head, network.echo_test), network.NETWORK_ECHO),
        ("0200", "000000"): Route(
            "sale",
            (
                *mac_checked,
                fields(sale.SALE_FIELDS, ("3", "4", "7", "11", "12", "13", "22", "25", "49")),
                parse_tlv,
                sale.card,
                sale.authorise,
            ),
            sale.SALE_ECHO,
        ),
        ("0300", "2"): Route(
            "rebind_submit",
            (*rebind_head, rebind.submit),
            rebind.REBIND_ECHO,
        ),
        ("0300", "5"): Route("rebind_inquire", (*rebind_head, rebind.inquire), rebind.REBIND_ECHO),
        ("0300", "3"): Route("rebind_cancel", (*rebind_head, rebind.cancel), rebind.REBIND_ECHO),
        ("0400", "000000"): Route(
            "reversal",
            (
                *mac_checked,
                fields(reversal.REVERSAL_FIELDS, ("3", "4", "7", "11", "49")),
                reversal.reverse,
            ),
            reversal.REVERSAL_ECHO,
        ),
        ("0500", ""): Route(
            "settle",
            (
                *mac_checked,
                fields(settle.SETTLE_FIELDS, ("3", "7", "11")),
                parse_tlv,
                settle.settle,
            ),
            settle.SETTLE_ECHO,
        ),
    }


def _unknown_route(state: HostState, ctx: Context) -> None:
    """Anything without a route: after the checks that decide whether we may MAC the answer,
    30 when field 3 or the field that routes the MTI is not all digits, else 12."""
    known_terminal(state, ctx)
    req = ctx.req
    if "64" in req or "128" in req:
        signed_on(state, ctx)
        verify_mac(state, ctx)
    for name in ("3", ROUTE_FIELD.get(req["t"], "3")):
        value = req.get(name)
        if value is not None and not (value.isdigit() and value.isascii()):
            raise Decline("30", f"FORMAT_{name}")
    raise Decline("12", "NO_ROUTE")


UNKNOWN = Route("unknown", (_unknown_route,), ("3", "4", "7", "11", "41", "42", "70"))


def response_mti(mti: str) -> str:
    """0200 -> 0210, 0800 -> 0810; a response MTI stays as it is; an MTI whose third position
    is not a digit gets 1 there (the answer to a malformed MTI is never that MTI)."""
    return mti[:2] + (str(int(mti[2]) | 1) if mti[2].isdigit() else "1") + mti[3:]


# response_mti of the MTIs seen (~0.6 us each time otherwise).
_response_mtis: dict[str, str] = {}

# How a format error names the codec's keys that are not field numbers.
_FIELD_NAMES = {"h": "HEADER", "t": "MTI", "p": "BITMAP", "1": "BITMAP"}
# The last hex digit of a bitmap whose last bit (64, or 128) is set.
_ODD_HEX = frozenset("13579BDFbdf")


class HostCore:
    """Everything that happens to a message between the framing and the ledger, synchronously."""

    def __init__(self, *, codec: Codec, state: HostState) -> None:
        self.codec = codec
        self.state = state
        state.encode = codec.encode
        # Only messages whose MAC verified earn a specialised codec function (a place among
        # max_layouts): layouts any peer can send would take them all (Codec.learning).
        codec.learning = False
        self.routes = build_routes()
        # What the failure answers to each MTI echo (PROTOCOL.md 3): its routes' echo fields.
        self.failure_echo = {key[0]: echo_fields(r.echo) for key, r in self.routes.items()}
        self.unknown_echo = echo_fields(UNKNOWN.echo)
        self.log = get_logger("acqhost.message")
        self.message_log = message_logger("acqhost.message")
        # One event per message at level info; checked here so a quieter host pays nothing.
        self.log_messages = state.config.log_level.lower() in ("debug", "info")
        # The warnings a peer can cause, limited per source (the connection sets the source).
        self.log_limiter = SourceLimiter(state.config.log_rate)
        # Message lines of routes anyone can send cheaply: echoes (no MAC, a terminal's
        # keep-alive) at debug only, undecodable frames within the peer's log rate.
        self._quiet: dict[str, Callable[[], bool]] = {UNDECODABLE: self._undecodable_line}
        if state.config.log_level.lower() != "debug":
            self._quiet["echo"] = lambda: False

    def flush_log(self) -> None:
        """Write out the per-message log lines of answers about to be sent."""
        self.message_log.flush()

    def complete(self, ctx: Context, result: Any, error: BaseException | None) -> None:
        """Finish the answer from the outcome of ``ctx.effect``'s write. A failed write
        answers 96: the request is then not approved, so nothing approved can be lost."""
        effect = ctx.effect
        assert effect is not None
        if error is not None:
            event = "store unavailable" if isinstance(error, StoreUnavailable) else "write failed"
            self._malfunction(ctx, event, error)
            return
        if effect.then is not None:
            try:
                effect.then(self.state, ctx, result)
            except Decline as d:
                self._decline(ctx, d)

    def answer(self, ctx: Context) -> bytes:
        """The answer's bytes, MAC'd when the request's was verified; its log line queued."""
        out = self.finish(ctx)
        if not self.log_messages:
            return out
        quiet = self._quiet.get(ctx.route)
        if quiet is not None and not quiet():
            return out
        req = ctx.req
        # What self.log.info("message", route=..., ..., **ctx.log) writes, without the chain.
        self.message_log.message(
            ctx.route,
            req.get("41"),
            req.get("t"),
            req.get("11"),
            ctx.resp.get("39"),
            ctx.reason or None,
            # ms to three decimals, as round(x * 1000, 3) gives them at half its cost
            round((time.perf_counter() - ctx.started) * 1_000_000) / 1000,
            ctx.log,
        )
        return out

    def decide(self, frame: bytes) -> Context | None:
        """Decode and run the route's stages: the response is built but not encoded."""
        started = time.perf_counter()
        try:
            req = self.codec.decode(frame)
        except CodecError as e:
            part = self.codec.decode_partial(frame)
            if self.log_limiter.allow("undecodable"):
                self.log.warning("undecodable", error=str(e), mti=part.get("t"), size=len(frame),
                                 source=self.log_limiter.source)  # fmt: skip
            if "t" not in part:
                return None
            return self._format_error(frame, part, _FIELD_NAMES.get(e.field, e.field), started)
        mti = req["t"]
        answer_mti = _response_mtis.get(mti)  # only four-digit MTIs are remembered
        if answer_mti is None:
            if not (mti.isdigit() and mti.isascii()):
                return self._format_error(frame, req, "MTI", started)
            answer_mti = response_mti(mti)
            if len(_response_mtis) < 1000:
                _response_mtis[mti] = answer_mti
        route = self.routes.get((mti, req.get(ROUTE_FIELD.get(mti, "3"), "")), UNKNOWN)
        state = self.state
        ctx = Context(frame, req, {"t": answer_mti}, state.clock(), started, route.name)
        echo(ctx, route.echo)
        try:
            for stage in route.stages:
                stage(state, ctx)
        except Decline as d:
            self._decline(ctx, d)
        except StoreUnavailable as e:  # an outage, not a bug: one line, no traceback
            self._malfunction(ctx, "store unavailable", e)
            return ctx
        except Exception:  # our bug, not the peer's: logged, answered 96
            self.log.exception("stage failed", route=route.name, tid=req.get("41"))
            self._decline(ctx, Decline("96", "SYSTEM_MALFUNCTION"))
            return ctx
        else:
            ctx.resp["39"] = "00"
        if ctx.mac_response:  # approved, or declined after its MAC verified (61, 94, ...)
            self.codec.learn_decoding(frame)
        return ctx

    def _format_error(
        self, frame: bytes, req: dict[str, str], what: str, started: float
    ) -> Context:
        """The 30 to a frame that does not decode whole or whose MTI is not four digits:
        ``req`` is what decoded. It is MAC'd only when the frame still carries a valid MAC
        of its known, signed-on terminal (the MAC field is the last eight bytes)."""
        state = self.state
        mti = req["t"]
        ctx = Context(frame, req, {"t": response_mti(mti)}, state.clock(), started, UNDECODABLE)
        secondary = "1" in req
        bitmap = req.get("1" if secondary else "p", "")
        if bitmap[-1:] in _ODD_HEX:  # bit 64 (or 128): the frame ends with a MAC
            ctx.req = {**req, "128" if secondary else "64": frame[-8:].hex().upper()}
            try:
                known_terminal(state, ctx)
                signed_on(state, ctx)
                verify_mac(state, ctx)
            except Decline:
                pass
            ctx.req = req
        self._decline(ctx, Decline("30", f"FORMAT_{what}"))
        return ctx

    def _malfunction(self, ctx: Context, event: str, error: BaseException) -> None:
        """96 for a write or a store that failed (not the peer's doing), logged in one line."""
        self.log.error(event, route=ctx.route, tid=ctx.req.get("41"), error=repr(error))
        self._decline(ctx, Decline("96", "SYSTEM_MALFUNCTION"))

    def _decline(self, ctx: Context, d: Decline) -> None:
        """Make ``ctx``'s answer the failure answer for ``d`` (PROTOCOL.md 3)."""
        req = ctx.req
        elements = dict(d.elements) if d.elements else {}
        if d.code == "05" and d.reason:
            elements["RS"] = d.reason
        echo = self.failure_echo.get(req["t"], self.unknown_echo)
        ctx.resp = failure_answer(req, ctx.resp["t"], d.code, echo, elements)
        ctx.mac_response = carries_mac(d.code, ctx.mac_response)
        ctx.reason = d.reason
        ctx.effect = None
        # A bad or missing MAC or signature: a security event of its own.
        if d.code == "63" and self.log_limiter.allow("security"):
            req = ctx.req
            self.log.warning("security", kind=d.reason, tid=req.get("41"), mti=req.get("t"),
                             stan=req.get("11"), route=ctx.route)  # fmt: skip

    def _undecodable_line(self) -> bool:
        return self.log_limiter.allow("message (undecodable)")

    def finish(self, ctx: Context) -> bytes:
        """Encode the response; MAC it when the request's MAC was verified."""
        resp = ctx.resp
        if not ctx.mac_response:
            return self.codec.encode(resp)
        assert ctx.keys is not None
        # The MAC is the last field: 64, or 128 when the response needs a secondary bitmap.
        resp["64" if _PRIMARY_KEYS.issuperset(resp) else "128"] = "0000000000000000"
        self.codec.learn_encoding(resp)
        body = self.codec.encode(resp)[:-8]
        return body + crypto.mac(ctx.keys.tx_mac, body)
