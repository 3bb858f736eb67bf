"""The TCP server: the only module where bytes meet sockets.

Shaped like trio's ``serve_listeners``: one task per connection, the stream closed in a
``finally``, a timeout around every read, and a graceful drain on shutdown (stop accepting,
stop reading, answer what was already read, flush the ledger, return). Runs on anyio, so on
asyncio (with uvloop when installed) and on trio alike.

Pipelined requests on one connection are worked on concurrently, so their sales share a group
commit, and answered strictly in the order they arrived.
"""

from __future__ import annotations

import importlib.util
import signal
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc

from acqhost.config import Config
from acqhost.errors import FramingError
from acqhost.framing import Frame, FrameDecoder, FrameEncoder, reply_tpdu
from acqhost.ledger import Ledger, Write
from acqhost.logging import get_logger
from acqhost.pipeline.host import Pipeline

__all__ = ("Server", "Service", "run_backend")

log = get_logger("acqhost.server")

# Requests one connection may have in flight before we stop reading from it.
MAX_IN_FLIGHT = 256
READ_SIZE = 65536
# How long a graceful shutdown waits for answers to reach peers that stopped reading.
DRAIN_SECONDS = 10.0
# How often approved settlement-account changes whose effective-from passed are recorded
# ACTIVE (sales settle to them from that instant regardless).
ACTIVATE_SECONDS = 1.0


class _Slot:
    """One answer to send, in arrival order; an Event only when someone has to wait."""

    __slots__ = ("event", "out", "ready", "tpdu")

    def __init__(self, tpdu: bytes) -> None:
        self.out: bytes | None = None
        self.tpdu = tpdu
        self.ready = False
        self.event: anyio.Event | None = None

    def finish(self, out: bytes | None) -> None:
        self.out = out
        self.ready = True
        if self.event is not None:
            self.event.set()

    async def wait(self) -> None:
        if not self.ready:
            self.event = anyio.Event()
            await self.event.wait()


class _Outbox:
    """The answers of one connection, oldest first: filled by its reader, emptied by its
    sender. A deque and two events, so a pipelined frame costs no trip through the loop."""

    __slots__ = ("closed", "room", "slots", "wake")

    def __init__(self) -> None:
        self.slots: deque[_Slot] = deque()
        self.wake = anyio.Event()
        self.room: anyio.Event | None = None  # the reader waits on it when too much is queued
        self.closed = False

    def close(self) -> None:
        self.closed = True
        self.wake.set()


@dataclass(slots=True, eq=False)
class _Connection:
    reading: anyio.CancelScope = field(default_factory=anyio.CancelScope)


# A task that lives as long as the server: started with ``task_status`` before the server
# listens (it calls ``task_status.started()`` when ready), cancelled after the drain.
Service = Callable[..., Coroutine[Any, Any, None]]


class Server:
    """Serves one pipeline on one listener until :meth:`shutdown`."""

    def __init__(self, config: Config, pipeline: Pipeline, ledger: Ledger) -> None:
        self.config = config
        self.pipeline = pipeline
        self.ledger = ledger
        self.encoder = FrameEncoder(config.framing, config.max_frame)
        self.port: int | None = None
        self._connections: set[_Connection] = set()
        self._accepting: anyio.CancelScope | None = None  # made inside the event loop
        self._stopping = False
        self.services: list[Service] = []

    def shutdown(self) -> None:
        """Stop accepting and reading; answer what was read; then :meth:`run` returns."""
        if self._stopping:
            return
        self._stopping = True
        if self._accepting is not None:
            self._accepting.cancel()
        for conn in self._connections:
            conn.reading.cancel()

    async def run(
        self,
        *,
        listener: anyio.abc.Listener[anyio.abc.SocketStream] | None = None,
        handle_signals: bool = True,
        task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        cfg = self.config
        if listener is None:
            listener = await anyio.create_tcp_listener(
                local_host=cfg.host, local_port=cfg.port, reuse_port=cfg.workers > 1
            )
        sockname = listener.extra(anyio.abc.SocketAttribute.local_address)
        self.port = int(sockname[1])
        async with anyio.create_task_group() as writer_group:
            await writer_group.start(self.ledger.run)
            try:
                async with anyio.create_task_group() as tg:
                    if handle_signals:
                        tg.start_soon(self._watch_signals)
                    tg.start_soon(self._activate_changes)
                    for service in self.services:
                        await tg.start(service)
                    log.info("listening", host=cfg.host, port=self.port, framing=cfg.framing)
                    task_status.started(self.port)
                    self._accepting = anyio.CancelScope()
                    if self._stopping:
                        self._accepting.cancel()
                    with self._accepting:
                        await self._accept_loop(listener, tg)
                    await listener.aclose()
                    log.info("draining", connections=len(self._connections))
                    # The connection tasks end by themselves once their answers are sent; a
                    # peer that stopped reading gets DRAIN_SECONDS, then its task is cancelled.
                    with anyio.move_on_after(DRAIN_SECONDS):
                        while self._connections:
                            await anyio.sleep(0.01)
                    if self._connections:
                        log.warning("drain timed out", connections=len(self._connections))
                    tg.cancel_scope.cancel()
            finally:
                self.ledger.close()
        log.info("stopped", written=self.ledger.written, flushes=self.ledger.flushes)

    async def _activate_changes(self) -> None:
        while True:
            write = self.pipeline.activation_write()
            await self.ledger.submit(write)
            self.pipeline.after_activation(write)
            await anyio.sleep(ACTIVATE_SECONDS)

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal", signal=signal.Signals(signum).name)
                self.shutdown()
                return

    async def _accept_loop(
        self, listener: anyio.abc.Listener[anyio.abc.SocketStream], tg: anyio.abc.TaskGroup
    ) -> None:
        # anyio's Listener.serve spawns handlers in a task group of its own; ours lets the
        # drain wait for them after the accept loop is cancelled.
        async with anyio.create_task_group() as accepts:
            for sub in getattr(listener, "listeners", [listener]):
                accepts.start_soon(self._accept_one, sub, tg)

    async def _accept_one(self, listener: Any, tg: anyio.abc.TaskGroup) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as e:  # out of file descriptors, say: wait a moment, keep serving
                log.error("accept failed", error=str(e))
                await anyio.sleep(0.1)
                continue
            if len(self._connections) >= self.config.max_connections:
                log.warning("connection refused", reason="max_connections")
                await stream.aclose()
                continue
            conn = _Connection()
            self._connections.add(conn)
            tg.start_soon(self._serve_connection, stream, conn)

    async def _serve_connection(self, stream: anyio.abc.SocketStream, conn: _Connection) -> None:
        peer = _peer(stream)
        log.info("connected", peer=peer)
        outbox = _Outbox()
        reason = "closed by peer"
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._send_answers, stream, outbox)
                try:
                    with conn.reading:
                        reason = await self._read_requests(stream, outbox)
                    if conn.reading.cancelled_caught:
                        reason = "host shutting down"
                finally:
                    outbox.close()  # the sender sends what is queued, then ends
        except* (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as group:
            reason = f"connection lost: {type(group.exceptions[0]).__name__}"
        except* Exception as group:  # our bug: logged; it closes this connection, not the host
            log.error("connection failed", peer=peer, exc_info=group.exceptions[0])
            reason = f"internal error: {type(group.exceptions[0]).__name__}"
        finally:
            self._connections.discard(conn)
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            log.info("disconnected", peer=peer, reason=reason)

    async def _read_requests(self, stream: anyio.abc.SocketStream, outbox: _Outbox) -> str:
        cfg = self.config
        decoder = FrameDecoder(cfg.framing, cfg.max_frame)
        tpdu_framing = cfg.framing == "len2-tpdu"
        slots = outbox.slots
        while True:
            if len(slots) >= MAX_IN_FLIGHT:  # the peer reads slower than it writes: wait
                outbox.room = anyio.Event()
                await outbox.room.wait()
            try:
                with anyio.fail_after(cfg.read_timeout):
                    data = await stream.receive(READ_SIZE)
            except TimeoutError:
                what = "stalled inside a frame" if decoder.buffered else "idle"
                log.warning("read timeout", peer=_peer(stream), state=what)
                return f"read timeout ({what})"
            except anyio.EndOfStream:
                try:
                    decoder.end_of_stream()
                except FramingError as e:
                    log.warning("framing error", peer=_peer(stream), error=str(e))
                    return "partial frame at end of stream"
                return "closed by peer"
            try:
                frames = decoder.feed(data)
            except FramingError as e:
                log.warning("framing error", peer=_peer(stream), error=str(e))
                return "framing error"
            # No await between reading and queueing: a frame read is a frame answered, even
            # when shutdown comes meanwhile.
            for frame in frames:
                slots.append(self._start(frame, tpdu_framing))
            if frames:
                outbox.wake.set()
            if decoder.error is not None:  # good frames came before the bad header
                log.warning("framing error", peer=_peer(stream), error=str(decoder.error))
                return "framing error"

    def _start(self, frame: Frame, tpdu_framing: bool) -> _Slot:
        slot = _Slot(reply_tpdu(frame.tpdu) if tpdu_framing else b"")
        pipeline = self.pipeline
        ctx = pipeline.prepare(frame.message)
        if ctx is None:
            slot.finish(None)
        elif ctx.effect is None:
            slot.finish(pipeline.finish_and_log(ctx))
        else:
            write = pipeline.write_for(ctx)

            def answer(write: Write) -> None:  # in the loop's thread, once durable
                out = None
                try:
                    pipeline.after_write(ctx, write)
                    out = pipeline.finish_and_log(ctx)
                finally:
                    slot.finish(out)

            write.on_done = answer
            self.ledger.enqueue(write)
        return slot

    async def _send_answers(self, stream: anyio.abc.SocketStream, outbox: _Outbox) -> None:
        """Send answers in arrival order; every answer ready at once goes in one write."""
        encode = self.encoder.encode
        flush_log = self.pipeline.flush_log
        slots = outbox.slots
        while True:
            if not slots:
                if outbox.closed:
                    return
                await outbox.wake.wait()
                outbox.wake = anyio.Event()
                continue
            await slots[0].wait()
            out = []
            while slots and slots[0].ready:
                slot = slots.popleft()
                if slot.out is not None:
                    out.append(encode(slot.out, slot.tpdu))
            if outbox.room is not None and len(slots) < MAX_IN_FLIGHT:
                outbox.room.set()
                outbox.room = None
            if out:
                flush_log()  # an answer never leaves before its log line
                await stream.send(b"".join(out))


def _peer(stream: anyio.abc.SocketStream) -> str:
    try:
        address = stream.extra(anyio.abc.SocketAttribute.remote_address)
    except Exception:
        return "?"
    if isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    return str(address)


def run_backend(main: Any, backend: str) -> Any:
    """Run ``main()`` on ``backend``: asyncio gets uvloop when it is installed."""
    options: dict[str, Any] = {}
    if backend == "asyncio" and importlib.util.find_spec("uvloop") is not None:
        options["use_uvloop"] = True
    return anyio.run(main, backend=backend, backend_options=options)
