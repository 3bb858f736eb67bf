"""The bank link: a server service that delivers one bank's settlement updates (PROTOCOL.md 6).

One link per ``[[banks]]`` table runs in every host process; the bank's lease in the store
(``Store.acquire_bank_lease``, renewed while held, with an expiry) lets exactly one of them,
across workers and hosts sharing the database, be the bank's dispatcher at a time. The holder
connects to the bank (TCP, TLS when the bank's table says so), claims the deliverable advices
(``Store.claim_advices``: oldest first, at most one per terminal, so a terminal's updates reach
the bank in the order they were queued while different terminals' travel together), signs each
as it is sent (48 SG), and waits for the bank's answer, matched on field 37:

- 00: delivered;
- a code the bank's ``final_codes`` name: refused for good, dead-lettered;
- any other code, or no answer in ``ack_timeout`` (or before the link failed): failed, due
  again after an exponential backoff with jitter (``retry_initial`` doubling to
  ``retry_max``), resent with the repeat MTI (0321 / 0521) and the same field 37;
- older than ``max_age`` before it could be delivered: dead-lettered.

Nothing is dropped: a dead letter stays in the outbox until ``acqhost banklink retry`` queues it
again. An idle link is kept alive with an 0800 echo every ``echo_interval``; a link that fails
(refused, reset, an echo unanswered) reconnects by itself, with the same backoff (stamina).
"""

from __future__ import annotations

import os
import random
import secrets
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import anyio
import anyio.abc
import anyio.to_thread
import stamina

from acqhost.config import BankConfig
from acqhost.domain import advices
from acqhost.domain.crypto import CryptoError, HostKeys
from acqhost.errors import AcqHostError, CodecError, FramingError, StoreUnavailable
from acqhost.log import get_logger
from acqhost.store import Store, StoredAdvice, open_store
from acqhost.wire import specs
from acqhost.wire.codec import compile_spec
from acqhost.wire.framing import FrameDecoder, FrameEncoder

__all__ = ("LEASE_SECONDS", "BankLink", "backoff")

log = get_logger("acqhost.banklink")

LEASE_SECONDS = 10.0  # a dispatcher that stops renewing is replaced this long after
POLL_SECONDS = 0.2  # how often an idle dispatcher looks for new advices
CLAIM_LIMIT = 128  # advices sent together (one per terminal)
MAX_FRAME = 4096
READ_SIZE = 65536

_T = TypeVar("_T")


class LinkDown(AcqHostError):
    """The bank's connection ended, or stopped answering."""


def backoff(bank: BankConfig, attempts: int) -> float:
    """Seconds before a delivery that has failed ``attempts`` times is tried again:
    ``retry_initial`` doubled per failure up to ``retry_max``, less up to a half at random (so
    that advices failed together do not come due together)."""
    wait = min(bank.retry_max, bank.retry_initial * 2 ** max(attempts - 1, 0))
    return float(wait * random.uniform(0.5, 1.0))


def _utc_field7(at: float) -> str:
    return time.strftime("%m%d%H%M%S", time.gmtime(at))


def tls_context(bank: BankConfig) -> ssl.SSLContext | None:
    """The client TLS context of a bank whose table has ``[banks.tls]``: its CA, and this
    host's certificate when it presents one."""
    if not bank.tls:
        return None
    context = ssl.create_default_context(cafile=bank.tls_ca_file)
    if bank.tls_cert_file:
        context.load_cert_chain(bank.tls_cert_file, bank.tls_key_file)
    return context


class BankLink:
    """The dispatcher of one bank, while this process holds its lease."""

    def __init__(
        self,
        bank: BankConfig,
        db: str,
        keys: HostKeys,
        *,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bank = bank
        self.db = db
        self.keys = keys
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.clock = clock
        self.codec = compile_spec(specs.load(bank.spec))
        self.encoder = FrameEncoder(bank.framing, MAX_FRAME)
        self.tls = tls_context(bank)
        self._store: Store | None = None
        self._limiter = anyio.CapacityLimiter(1)  # one store call at a time: one connection
        self._answers: dict[str, str] = {}  # field 37 -> 39, as the bank answers
        self._answered = anyio.Event()
        self._queued: anyio.Event | None = None  # set by nudge(): this process queued advices
        self._echoes = 0  # 0810s received
        self._stan = 0
        self.delivered = 0  # advices delivered by this link since it started

    def nudge(self) -> None:
        """This process has queued advices: look now rather than at the next poll (in the
        event loop's thread)."""
        if self._queued is not None:
            self._queued.set()

    # -- the service -----------------------------------------------------------------------------
    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        self._store = await anyio.to_thread.run_sync(open_store, self.db)
        task_status.started()
        try:
            while True:
                # A store that fails (locked, its server gone) ends neither the service nor
                # the host: the lease is asked for again after the pause.
                try:
                    if await self._call(self._take_lease):
                        log.info("bank lease taken", bank=self.bank.name, owner=self.owner)
                        await self._deliver_while_leased()
                        log.warning("bank lease lost", bank=self.bank.name, owner=self.owner)
                except StoreUnavailable as e:  # an outage: one line, asked again later
                    log.warning("bank link store unavailable", bank=self.bank.name, error=str(e))
                except Exception as e:
                    log.error("bank link failed", bank=self.bank.name, exc_info=e)
                await anyio.sleep(LEASE_SECONDS / 3)
        finally:
            with anyio.CancelScope(shield=True):
                await self._call(self._close)

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def _take_lease(self) -> bool:
        assert self._store is not None
        return self._store.acquire_bank_lease(
            self.bank.name, self.owner, self.clock(), LEASE_SECONDS
        )

    def _renew_lease(self) -> bool:
        assert self._store is not None
        return self._store.renew_bank_lease(self.bank.name, self.owner, self.clock(), LEASE_SECONDS)

    def _close(self) -> None:
        if self._store is not None:
            try:
                self._store.release_bank_lease(self.bank.name, self.owner)
            finally:
                self._store.close()

    async def _deliver_while_leased(self) -> None:
        bank = self.bank
        failures = 0
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._keep_lease, tg.cancel_scope)
            while True:
                stream = await self._connect()
                delivered = self.delivered
                try:
                    await self._session(stream)
                # The session's task group raises what failed in an exception group.
                except* (LinkDown, OSError, anyio.BrokenResourceError, anyio.EndOfStream,
                         FramingError, CodecError, ssl.SSLError) as down:  # fmt: skip
                    error = "; ".join(str(e) or repr(e) for e in down.exceptions)
                    log.warning("bank link down", bank=bank.name, error=error)
                except* StoreUnavailable as outage:  # the advices wait in the store
                    error = "; ".join(str(e) for e in outage.exceptions)
                    log.warning("bank link store unavailable", bank=bank.name, error=error)
                except* Exception as failed:  # our bug, or the store's: logged; the link goes on
                    log.error("bank link failed", bank=bank.name, exc_info=failed)
                finally:
                    with anyio.CancelScope(shield=True):
                        await stream.aclose()
                failures = 0 if self.delivered > delivered else failures + 1
                await anyio.sleep(backoff(bank, failures) if failures else 0)

    async def _keep_lease(self, scope: anyio.CancelScope) -> None:
        while True:
            await anyio.sleep(LEASE_SECONDS / 3)
            try:
                renewed = await self._call(self._renew_lease)
            except Exception as e:  # not renewed: it may expire, and another take it
                log.warning("bank lease not renewed", bank=self.bank.name, error=repr(e))
                renewed = False
            if not renewed:
                scope.cancel()  # stop delivering at once
                return

    async def _connect(self) -> anyio.abc.ByteStream:
        bank = self.bank
        async for attempt in stamina.retry_context(
            on=(OSError, ssl.SSLError),
            attempts=None,
            timeout=None,
            wait_initial=bank.retry_initial,
            wait_max=bank.retry_max,
            wait_jitter=bank.retry_initial,
        ):
            with attempt:
                with anyio.fail_after(bank.ack_timeout):
                    stream: anyio.abc.ByteStream
                    if self.tls is None:
                        stream = await anyio.connect_tcp(bank.host, bank.port)
                    else:
                        stream = await anyio.connect_tcp(
                            bank.host, bank.port, ssl_context=self.tls,
                            tls_standard_compatible=False,
                        )  # fmt: skip
                log.info("bank connected", bank=bank.name, host=bank.host, port=bank.port)
                return stream
        raise AssertionError("unreachable: retried without end")

    # -- one connection ----------------------------------------------------------------------------
    async def _session(self, stream: anyio.abc.ByteStream) -> None:
        bank = self.bank
        self._answers.clear()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._read_answers, stream)
            last_sent = self.clock()
            while True:
                batch = await self._call(self._claim)
                if batch:
                    await self._deliver(stream, batch)
                    last_sent = self.clock()
                    continue
                if self.clock() - last_sent >= bank.echo_interval:
                    await self._echo(stream)
                    last_sent = self.clock()
                self._queued = queued = anyio.Event()
                with anyio.move_on_after(POLL_SECONDS):
                    await queued.wait()

    def _claim(self) -> list[StoredAdvice]:
        assert self._store is not None
        bank = self.bank
        # Held past the answer's deadline: a dispatcher that dies mid-delivery leaves them
        # deliverable again soon after.
        return self._store.claim_advices(
            bank.bank_codes, self.clock(), bank.ack_timeout * 2, CLAIM_LIMIT, bank.terminals
        )

    async def _deliver(self, stream: anyio.abc.ByteStream, batch: Sequence[StoredAdvice]) -> None:
        bank, now = self.bank, self.clock()
        sending: dict[str, StoredAdvice] = {}
        old: list[StoredAdvice] = []
        unreadable: list[tuple[StoredAdvice, str]] = []
        out = []
        for stored in batch:
            if now - stored.created_at > bank.max_age:
                old.append(stored)
                continue
            try:
                advice = advices.open_advice(self.keys.data_key, stored)
            except CryptoError as e:  # not this host's data key, or not its row: never sendable
                unreadable.append((stored, str(e)))
                continue
            fields = dict(advice.fields)
            if stored.attempts:
                fields["t"] = fields["t"][:3] + "1"  # the repeat MTI: 0321, 0521
            fields["7"] = _utc_field7(now)
            try:
                signed = advices.sign_advice(fields, self.keys.signing_seed)
                frame = self.encoder.encode(self.codec.encode(signed))
            except (ValueError, FramingError) as e:  # its 48 too long for the bank's spec...
                unreadable.append((stored, f"cannot be sent in this bank's format: {e}"))
                continue
            sending[signed["37"]] = stored
            out.append(frame)
        if old or unreadable:
            why = f"older than max_age ({bank.max_age:g} s)"
            await self._call(self._dead_letter, [*((s, why) for s in old), *unreadable])
        if not out:
            return
        for key in sending:
            self._answers.pop(key, None)
        try:
            with anyio.fail_after(bank.ack_timeout):  # a bank that takes nothing is down
                await stream.send(b"".join(out))
            with anyio.move_on_after(bank.ack_timeout):
                while not all(key in self._answers for key in sending):
                    self._answered = anyio.Event()
                    await self._answered.wait()
        finally:
            # Also when the link fails (or the lease is lost) before every answer came: the
            # answers that did come are recorded, the advices without one failed (resent later
            # as repeats), else a bank that closes the connection after N answers would be
            # sent the same advices for ever.
            outcomes = [(stored, self._answers.pop(key, None)) for key, stored in sending.items()]
            with anyio.CancelScope(shield=True):
                await self._call(self._record, outcomes)
        if all(code is None for _, code in outcomes):
            raise LinkDown(f"no answer to {len(outcomes)} advices in {bank.ack_timeout:g} s")

    def _dead_letter(self, advices_and_reasons: Sequence[tuple[StoredAdvice, str]]) -> None:
        assert self._store is not None
        now = self.clock()
        with self._store.transaction() as tx:
            for stored, why in advices_and_reasons:
                tx.dead_letter(stored.id, why, now)
        for stored, why in advices_and_reasons:
            log.warning("advice dead-lettered", bank=self.bank.name, advice=stored.id,
                        mti=stored.mti, tid=stored.tid, why=why)  # fmt: skip

    def _record(self, outcomes: Sequence[tuple[StoredAdvice, str | None]]) -> None:
        """The bank's answers to one round, in one transaction."""
        assert self._store is not None
        bank, now = self.bank, self.clock()
        with self._store.transaction() as tx:
            for stored, code in outcomes:
                if code == "00":
                    tx.mark_delivered(stored.id, code, now)
                elif code is not None and code in bank.final_codes:
                    tx.dead_letter(stored.id, f"refused by the bank with {code}", now)
                else:
                    error = "no answer" if code is None else f"answered {code}"
                    tx.mark_failed(stored.id, error, now + backoff(bank, stored.attempts + 1), now)
        for stored, code in outcomes:
            if code == "00":
                self.delivered += 1
            elif code is not None and code in bank.final_codes:
                log.warning("advice dead-lettered", bank=bank.name, advice=stored.id,
                            mti=stored.mti, tid=stored.tid, rc=code)  # fmt: skip
            else:
                log.info("advice failed", bank=bank.name, advice=stored.id, mti=stored.mti,
                         tid=stored.tid, rc=code, attempts=stored.attempts + 1)  # fmt: skip

    async def _echo(self, stream: anyio.abc.ByteStream) -> None:
        self._stan = self._stan % 999_999 + 1
        now = self.clock()
        fields = {"t": "0800", "7": _utc_field7(now), "11": f"{self._stan:06d}", "70": "301"}
        seen = self._echoes
        with anyio.fail_after(self.bank.ack_timeout):
            await stream.send(self.encoder.encode(self.codec.encode(fields)))
        with anyio.move_on_after(self.bank.ack_timeout):
            while self._echoes == seen:
                self._answered = anyio.Event()
                await self._answered.wait()
        if self._echoes == seen:
            raise LinkDown(f"echo unanswered in {self.bank.ack_timeout:g} s")

    async def _read_answers(self, stream: anyio.abc.ByteStream) -> None:
        decoder = FrameDecoder(self.bank.framing, MAX_FRAME)
        while True:
            try:
                data = await stream.receive(READ_SIZE)
            except anyio.EndOfStream:
                raise LinkDown("the bank closed the connection") from None
            for frame in decoder.feed(data):
                answer = self.codec.decode(frame.message)
                mti = answer.get("t")
                if mti == "0810":
                    self._echoes += 1
                elif mti in ("0330", "0530") and "37" in answer:
                    self._answers[answer["37"]] = answer.get("39", "")
                else:
                    log.warning("unexpected message from the bank", bank=self.bank.name, mti=mti)
            self._answered.set()
