"""The compiled pipeline: route table built once, stages run per message, effects awaited.

``Pipeline.handle(frame) -> bytes | None`` is the whole host apart from sockets: decode, pick
the route by (MTI, processing code or network code), run its stages, make the route's effect
durable (group commit through the :class:`~acqhost.runtime.ledger.Ledger`), then build, MAC and
encode the response. Only an undecodable frame gets no answer.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

from acqhost.config import Config
from acqhost.domain import crypto
from acqhost.domain import rebind as rebind_flow
from acqhost.domain.crypto import HostKeys, SessionKeys
from acqhost.errors import Decline
from acqhost.host.routes import network, rebind, reversal, sale
from acqhost.host.context import Context
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
from acqhost.log import get_logger, message_logger
from acqhost.runtime.ledger import Ledger, Write
from acqhost.store.base import AccountVersion, SaleResult, Store, Terminal
from acqhost.wire.codec import Codec, CodecError
from acqhost.wire.tlv import encode_tlv

__all__ = ("Pipeline", "Route", "build_routes")

# How long cached terminals and accounts are trusted before the store is asked again, so a
# change made by the CLI reaches a running host within this many seconds. A cached account is
# also never trusted past the next effective-from the store knows of; with every decision
# taking effect acqhost.domain.rebind.DECISION_LEAD (> CACHE_SECONDS) after it is made, all host
# processes switch to a new account at its effective-from exactly.
CACHE_SECONDS = 1.0
assert CACHE_SECONDS < rebind_flow.DECISION_LEAD

# Keys of a message without a secondary bitmap.
_PRIMARY_KEYS = frozenset(("h", "t", "p", *(str(n) for n in range(2, 65))))


class Route(NamedTuple):
    name: str
    stages: tuple[Stage, ...]
    echo: tuple[str, ...]


# The field that picks the route of an MTI: field 3 (processing code) unless named here.
ROUTE_FIELD = {"0800": "70", "0300": "91"}


def build_routes() -> dict[tuple[str, str], Route]:
    """The route table, keyed by (MTI, field 3), or (MTI, the field ROUTE_FIELD names)."""
    mac_checked: tuple[Stage, ...] = (known_terminal, signed_on, verify_mac)
    rebind_head: tuple[Stage, ...] = (
        *mac_checked,
        fields(rebind.REBIND_FIELDS, ("7", "11")),
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
        ("0800", "002"): Route("sign_off", (*network_head, network.sign_off), network.NETWORK_ECHO),
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
    }


def _unknown_route(host: Pipeline, ctx: Context) -> None:
    """Anything without a route: 12, after the checks that decide whether we may MAC it."""
    known_terminal(host, ctx)
    if "64" in ctx.req or "128" in ctx.req:
        signed_on(host, ctx)
        verify_mac(host, ctx)
    raise Decline("12", "NO_ROUTE")


UNKNOWN = Route("unknown", (_unknown_route,), ("3", "4", "7", "11", "41", "42", "70"))


def response_mti(mti: str) -> str:
    """0200 -> 0210, 0800 -> 0810; a response MTI stays as it is."""
    return mti[:2] + str(int(mti[2]) | 1) + mti[3] if mti[2].isdigit() else mti


# response_mti of the MTIs seen (~0.6 us each time otherwise).
_response_mtis: dict[str, str] = {}


class Pipeline:
    """Everything that happens to a message between the framing and the socket."""

    def __init__(
        self,
        *,
        codec: Codec,
        store: Store,
        ledger: Ledger,
        host_keys: HostKeys,
        config: Config,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.codec = codec
        self.store = store
        self.ledger = ledger
        self.host_keys = host_keys
        self.config = config
        self.clock = clock
        self.routes = build_routes()
        self.log = get_logger("acqhost.message")
        self.message_log = message_logger("acqhost.message")
        # One event per message at level info; checked here so a quieter host pays nothing.
        self.log_messages = config.log_level.lower() in ("debug", "info")
        self._terminals: dict[str, tuple[float, Terminal | None]] = {}
        self._sessions: dict[str, tuple[float, SessionKeys, bytes]] = {}
        self._accounts: dict[str, tuple[float, AccountVersion | None]] = {}  # (expires, ...)
        self._batches: dict[str, int] = {}
        self._account_tlv: dict[tuple[str, int], str] = {}
        # Submits (41, 11, 7) this process refused lately, with the answer they got: a
        # retransmission gets the same answer instead of counting a wrong password twice.
        self.rebind_refusals: OrderedDict[tuple[str, str, str], Decline] = OrderedDict()

    # -- host state the stages read (cached) -------------------------------------------------

    def terminal(self, tid: str) -> Terminal | None:
        now = self.clock()
        hit = self._terminals.get(tid)
        if hit is not None and now - hit[0] < CACHE_SECONDS:
            return hit[1]
        terminal = self.store.get_terminal(tid)
        self._terminals[tid] = (now, terminal)
        if len(self._terminals) > 100_000:
            self._terminals.clear()
        return terminal

    def session_keys(self, tid: str, *, reload: bool = False) -> SessionKeys | None:
        """The terminal's session keys. Cached for CACHE_SECONDS: a sign-off or a new sign-on
        through another host process sharing the store reaches this one within that time
        (and a MAC that fails on cached keys reloads them at once)."""
        now = self.clock()
        if not reload:
            hit = self._sessions.get(tid)
            if hit is not None and now - hit[0] < CACHE_SECONDS:
                return hit[1]
        session = self.store.get_session(tid)
        if session is None:
            self._sessions.pop(tid, None)
            return None
        hit = self._sessions.get(tid)
        if hit is not None and hit[2] == session.sealed_rx:  # the same sign-on: keep its keys
            self._sessions[tid] = (now, hit[1], hit[2])
            return hit[1]
        data_key = self.host_keys.data_key
        keys = SessionKeys.from_kx(
            crypto.unseal(data_key, session.sealed_rx), crypto.unseal(data_key, session.sealed_tx)
        )
        self._sessions[tid] = (now, keys, session.sealed_rx)
        return keys

    def account(self, tid: str, now: float) -> AccountVersion | None:
        """The version in force at ``now``, cached until CACHE_SECONDS pass or the next
        effective-from comes, whichever is first."""
        hit = self._accounts.get(tid)
        if hit is not None and now < hit[0]:
            return hit[1]
        with self.store.transaction(write=False) as tx:
            versions = tx.versions(tid)
        account = rebind_flow.in_force(versions, now)
        expires = now + CACHE_SECONDS
        change = rebind_flow.next_change(versions, now)
        if change is not None and change < expires:
            expires = change
        self._accounts[tid] = (expires, account)
        return account

    def account_tlv(self, account: AccountVersion) -> str:
        """48 {SA, SV, BK} naming the account a sale settles to (the same text every time)."""
        key = (account.tid, account.version)
        text = self._account_tlv.get(key)
        if text is None:
            text = encode_tlv(
                {"SA": account.account_masked, "SV": str(account.version), "BK": account.bank_code}
            )
            self._account_tlv[key] = text
        return text

    def batch(self, tid: str) -> int:
        number = self._batches.get(tid)
        if number is None:
            number = self._batches[tid] = self.store.open_batch(tid)
        return number

    def sale_seen(self, tid: str, stan: str, local_date: str) -> bool:
        return self.store.sale_exists(tid, stan, local_date)

    def invalidate(self, kind: str, tid: str) -> None:
        """Forget what is cached of terminal ``tid`` because it changed in the store (another
        process says so): ``kind`` "terminal", "session" or "account" drops that entry, any
        other kind every entry of the terminal, and "*" (notifications may have been missed)
        every cache. Call it in the event loop's thread: the caches are not locked."""
        if kind == "*":
            self._terminals.clear()
            self._sessions.clear()
            self._accounts.clear()
            self._batches.clear()
        elif kind == "terminal":
            self._terminals.pop(tid, None)
        elif kind == "session":
            self._sessions.pop(tid, None)
        elif kind == "account":
            self._accounts.pop(tid, None)
        else:
            self._terminals.pop(tid, None)
            self._sessions.pop(tid, None)
            self._accounts.pop(tid, None)
            self._batches.pop(tid, None)

    # -- one message ---------------------------------------------------------------------------

    async def handle(self, frame: bytes) -> bytes | None:
        """Answer one request frame; None when it cannot be decoded far enough for a reply."""
        ctx = self.prepare(frame)
        if ctx is None:
            return None
        if ctx.effect is not None:
            write = self.write_for(ctx)
            # An inline ledger (in-memory store) applies the write at once: no coroutine.
            if not self.ledger.apply_now(write):
                await self.ledger.submit(write)
            self.after_write(ctx, write)
        out = self.finish_and_log(ctx)
        self.message_log.flush()
        return out

    def flush_log(self) -> None:
        """Write out the per-message log lines of answers about to be sent."""
        self.message_log.flush()

    def write_for(self, ctx: Context) -> Write:
        """The ledger write that makes ``ctx.effect`` durable."""
        effect = ctx.effect
        assert effect is not None
        if effect.sale is not None:
            return Write(effect.sale)
        if effect.session is not None:
            session = effect.session
            return Write(call=lambda store: store.save_session(session))
        if effect.drop_session is not None:
            tid = effect.drop_session
            return Write(call=lambda store: store.drop_session(tid))
        if effect.call is not None:
            return Write(call=effect.call, pre=effect.pre)
        rrn = effect.reverse_rrn
        assert rrn is not None
        return Write(call=lambda store: store.reverse_sale(rrn))

    def after_write(self, ctx: Context, write: Write) -> None:
        """Finish the response from the write's outcome. A failed write answers 96: the
        request is then not approved, so nothing approved can be lost."""
        effect = ctx.effect
        assert effect is not None
        if write.error is not None:
            self.log.error("write failed", route=ctx.route, tid=ctx.req.get("41"),
                           error=repr(write.error))  # fmt: skip
            self._decline(ctx, Decline("96", "SYSTEM_MALFUNCTION"))
            return
        if effect.sale is not None:
            result: SaleResult = write.result
            if result.duplicate:
                self._decline(ctx, Decline("94", "DUPLICATE"))
                return
            account = ctx.account
            assert account is not None
            ctx.resp["37"] = result.rrn
            ctx.resp["38"] = effect.sale.auth_code
            ctx.resp["48"] = self.account_tlv(account)
            if effect.sale.test and account.state != "VERIFIED":
                try:
                    self.ledger.enqueue(self._verify_write(account.tid, account.version))
                except RuntimeError:  # shutting down: the next test sale verifies it
                    self.log.warning("verify skipped", tid=account.tid, version=account.version)
        elif effect.then is not None:
            try:
                effect.then(self, ctx, write.result)
            except Decline as d:
                self._decline(ctx, d)
        elif effect.session is not None:
            self.session_keys(effect.session.tid, reload=True)
        elif effect.drop_session is not None:
            self._sessions.pop(effect.drop_session, None)

    # -- settlement-account changes taking effect -----------------------------------------------

    def _verify_write(self, tid: str, version: int) -> Write:
        """After an approved test sale on a version not yet VERIFIED: verify it (its answer
        does not wait for this)."""
        key, now = self.host_keys.data_key, self.clock()

        def verify(store: Store) -> bool:
            with store.transaction(tid) as tx:
                return rebind_flow.verify(tx, key, tid, version, now)

        def done(write: Write) -> None:
            self._accounts.pop(tid, None)
            if write.error is not None:
                self.log.error("verify failed", tid=tid, version=version, error=repr(write.error))
            elif write.result:
                self.log.info("account verified", tid=tid, version=version)

        return Write(call=verify, on_done=done)

    def activation_write(self) -> Write:
        """A write recording as ACTIVE every approved version whose effective-from has passed
        (run every second by the server; sales already settle to them in the meantime)."""
        key, now = self.host_keys.data_key, self.clock()

        def activate(store: Store) -> list[AccountVersion]:
            with store.transaction(write=False) as tx:
                if not tx.due_versions(now):
                    return []
            with store.transaction() as tx:
                return rebind_flow.activate_due(tx, key, now)

        return Write(call=activate)

    def after_activation(self, write: Write) -> None:
        if write.error is not None:
            self.log.error("activation failed", error=repr(write.error))
            return
        for version in write.result or ():
            self._accounts.pop(version.tid, None)
            self.log.info("account activated", tid=version.tid, version=version.version)

    def finish_and_log(self, ctx: Context) -> bytes:
        out = self.finish(ctx)
        if not self.log_messages:
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

    def prepare(self, frame: bytes) -> Context | None:
        """Decode and run the route's stages: the response is built but not encoded."""
        started = time.perf_counter()
        try:
            req = self.codec.decode(frame)
        except CodecError as e:
            mti = self.codec.peek_mti(frame)
            self.log.warning("undecodable", error=str(e), mti=mti, size=len(frame))
            if mti is None:
                return None
            ctx = Context(raw=frame, req={"t": mti}, resp={"t": response_mti(mti)})
            ctx.started = started
            ctx.route, ctx.reason = "undecodable", "FORMAT"
            ctx.resp["39"] = "30"
            return ctx
        mti = req["t"]
        route = self.routes.get((mti, req.get(ROUTE_FIELD.get(mti, "3"), "")), UNKNOWN)
        answer_mti = _response_mtis.get(mti)
        if answer_mti is None:
            answer_mti = response_mti(mti)
            if len(_response_mtis) < 1000:
                _response_mtis[mti] = answer_mti
        ctx = Context(frame, req, {"t": answer_mti}, self.clock(), started, route.name)
        echo(ctx, route.echo)
        try:
            for stage in route.stages:
                stage(self, ctx)
        except Decline as d:
            self._decline(ctx, d)
            return ctx
        except Exception:  # our bug, not the peer's: logged, answered 96
            self.log.exception("stage failed", route=route.name, tid=req.get("41"))
            self._decline(ctx, Decline("96", "SYSTEM_MALFUNCTION"))
            return ctx
        ctx.resp["39"] = "00"
        return ctx

    def _decline(self, ctx: Context, d: Decline) -> None:
        ctx.resp["39"] = d.code
        ctx.reason = d.reason
        ctx.effect = None
        elements = dict(d.elements) if d.elements else {}
        if d.code == "05" and d.reason:
            elements["RS"] = d.reason
        if elements:
            ctx.resp["48"] = encode_tlv(elements)
        else:
            ctx.resp.pop("48", None)
        if d.code == "63":  # a bad or missing MAC or signature: a security event of its own
            req = ctx.req
            self.log.warning("security", kind=d.reason, tid=req.get("41"), mti=req.get("t"),
                             stan=req.get("11"), route=ctx.route)  # fmt: skip

    def finish(self, ctx: Context) -> bytes:
        """Encode the response; MAC it when the request's MAC was verified."""
        resp = ctx.resp
        if not ctx.mac_response:
            return self.codec.encode(resp)
        assert ctx.keys is not None
        # The MAC is the last field: 64, or 128 when the response needs a secondary bitmap.
        resp["64" if _PRIMARY_KEYS.issuperset(resp) else "128"] = "0000000000000000"
        body = self.codec.encode(resp)[:-8]
        return body + crypto.mac(ctx.keys.tx_mac, body)
