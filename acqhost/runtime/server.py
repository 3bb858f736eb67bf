"""The TCP server: the only module where bytes meet sockets.

Shaped like trio's ``serve_listeners``: one task per connection, the stream closed in a
``finally``, a timeout around every read, and a graceful drain on shutdown (stop accepting,
stop reading, answer what was already read, flush the ledger, return). Runs on anyio, so on
asyncio (with uvloop when installed) and on trio alike.

Pipelined requests on one connection are worked on concurrently, so their sales share a group
commit, and answered strictly in the order they arrived.

On asyncio the connections themselves are the event loop's protocols (:class:`_AsyncioConnection`:
frames are worked on in ``data_received`` and answers written from the ledger's callback), not
anyio streams: an anyio stream pauses and resumes the transport around every read and costs a
cancel scope per read timeout and an event per answer, which measured at a third of the host's
CPU per message under paced load (benchmarks/README.md). Everything else -- the listener's
life, the ledger, services, signals, the drain -- is the same code on both backends, and the
behaviour is the same: the end-to-end tests run every case on both.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import signal
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, cast

import anyio
import anyio.abc

from acqhost.config import Config
from acqhost.errors import FramingError
from acqhost.host.core import Pipeline
from acqhost.log import get_logger
from acqhost.runtime.ledger import Ledger, Write
from acqhost.wire.framing import Frame, FrameDecoder, FrameEncoder, reply_tpdu

__all__ = ("Server", "Service", "run_backend")

log = get_logger("acqhost.server")

# Requests one connection may have in flight before we stop reading from it.
MAX_IN_FLIGHT = 256
READ_SIZE = 65536
# How long a graceful shutdown waits for answers to reach peers that stopped reading.
DRAIN_SECONDS = 10.0
# The most the stream path sends under one write deadline: a peer taking fewer than
# SEND_CHUNK bytes per read_timeout (137 bytes a second at the default) is cut.
SEND_CHUNK = 4096
# Why a connection whose peer took no answer for ``read_timeout`` seconds was closed: a peer
# that sends and never reads would otherwise hold its connection (and the answers) for ever.
WRITE_TIMEOUT = "write timeout (the peer does not read)"
# How often approved settlement-account changes whose effective-from passed are recorded
# ACTIVE (sales settle to them from that instant regardless).
ACTIVATE_SECONDS = 1.0


class _Slot:
    """One answer to send, in arrival order; an Event only when someone has to wait, or a
    callback (``notify``) to call when it is ready."""

    __slots__ = ("event", "notify", "out", "ready", "tpdu")

    def __init__(self, tpdu: bytes) -> None:
        self.out: bytes | None = None
        self.tpdu = tpdu
        self.ready = False
        self.event: anyio.Event | None = None
        self.notify: Callable[[], None] | None = None

    def finish(self, out: bytes | None) -> None:
        self.out = out
        self.ready = True
        if self.event is not None:
            self.event.set()
        if self.notify is not None:
            self.notify()

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
    stream: anyio.abc.SocketStream
    reading: anyio.CancelScope = field(default_factory=anyio.CancelScope)

    def stop(self) -> None:
        """Stop reading; the connection answers what it read, then closes."""
        self.reading.cancel()


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
        self._connections: set[_Connection | _AsyncioConnection] = set()
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
        for conn in list(self._connections):
            conn.stop()

    async def run(
        self,
        *,
        listener: anyio.abc.Listener[anyio.abc.SocketStream] | None = None,
        handle_signals: bool = True,
        task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        cfg = self.config
        native: asyncio.Server | None = None
        if listener is None and _on_asyncio():
            native = await asyncio.get_running_loop().create_server(
                lambda: _AsyncioConnection(self),
                cfg.host,
                cfg.port,
                reuse_port=cfg.workers > 1,
                backlog=65535,
                start_serving=False,
            )
            self.port = int(native.sockets[0].getsockname()[1])
        else:
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
                    if native is not None:
                        try:
                            with self._accepting:
                                await native.start_serving()
                                await anyio.sleep_forever()
                        finally:
                            native.close()
                    else:
                        assert listener is not None
                        try:
                            with self._accepting:
                                await self._accept_loop(listener, tg)
                        finally:
                            with anyio.CancelScope(shield=True):
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
                # The stream path's connections end with their task group; the protocols
                # (after a drain that timed out, or a failure) are closed here.
                for conn in list(self._connections):
                    if isinstance(conn, _AsyncioConnection):
                        conn.abort()
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
            conn = _Connection(stream)
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
        except* _WriteTimeout:
            log.warning("write timeout", peer=peer)
            reason = WRITE_TIMEOUT
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
        timeout = cfg.read_timeout
        now = anyio.current_time
        # The read timeout: a scope whose deadline is ``timeout`` after the last read as of
        # its making. A read only notes its time (a scope per read, or a deadline moved per
        # read, cost more than the rest of the read on trio); when the deadline passes, the
        # connection was idle that long -- or it read meanwhile, and a new scope takes over.
        # Waiting for the peer to take its answers is not idle time.
        last_read = now()
        while True:
            waiting_for_peer = False
            with anyio.CancelScope(deadline=last_read + timeout):
                while True:
                    if len(slots) >= MAX_IN_FLIGHT:  # the peer reads slower than it writes
                        waiting_for_peer = True
                        outbox.room = anyio.Event()
                        await outbox.room.wait()
                        waiting_for_peer = False
                        last_read = now()
                    try:
                        data = await stream.receive(READ_SIZE)
                    except anyio.EndOfStream:
                        try:
                            decoder.end_of_stream()
                        except FramingError as e:
                            log.warning("framing error", peer=_peer(stream), error=str(e))
                            return "partial frame at end of stream"
                        return "closed by peer"
                    last_read = now()
                    try:
                        frames = decoder.feed(data)
                    except FramingError as e:
                        log.warning("framing error", peer=_peer(stream), error=str(e))
                        return "framing error"
                    # No await between reading and queueing: a frame read is a frame
                    # answered, even when shutdown comes meanwhile.
                    for frame in frames:
                        slots.append(self._start(frame, tpdu_framing))
                    if frames:
                        outbox.wake.set()
                    if decoder.error is not None:  # good frames came before the bad header
                        log.warning("framing error", peer=_peer(stream), error=str(decoder.error))
                        return "framing error"
            # The deadline passed (shutdown's cancellation does not end up here).
            if waiting_for_peer:
                last_read = now()
            elif now() - last_read >= timeout:
                break
        return _read_timed_out(decoder, _peer(stream))

    def _start(
        self, frame: Frame, tpdu_framing: bool, notify: Callable[[], None] | None = None
    ) -> _Slot:
        slot = _Slot(reply_tpdu(frame.tpdu) if tpdu_framing else b"")
        slot.notify = notify
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
        timeout = self.config.read_timeout
        now = anyio.current_time
        # Only sends are timed: a deadline for each SEND_CHUNK bytes, so a peer that reads
        # slowly but steadily is not cut, lifted after the last.
        while True:
            with anyio.CancelScope() as sends:
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
                        data = b"".join(out)
                        for start in range(0, len(data), SEND_CHUNK):
                            sends.deadline = now() + timeout
                            await stream.send(data[start : start + SEND_CHUNK])
                        sends.deadline = math.inf
                        if sends.cancel_called:  # the deadline passed as the send ended:
                            break  # not a timeout, but this scope is spent
            if sends.cancelled_caught:
                raise _WriteTimeout  # ends the connection (the reader with it)


class _AsyncioConnection(asyncio.Protocol):
    """One connection on asyncio: what :meth:`Server._serve_connection` does, driven by the
    loop's callbacks. Frames are started as they are read; answers are written, in arrival
    order, as soon as the oldest is ready. Reading pauses while MAX_IN_FLIGHT answers are
    queued or the peer does not take what is written; a connection that stops (end of
    stream, read timeout, framing error, shutdown) answers what it read, then closes."""

    def __init__(self, server: Server) -> None:
        cfg = server.config
        self.server = server
        self.decoder = FrameDecoder(cfg.framing, cfg.max_frame)
        self.tpdu_framing = cfg.framing == "len2-tpdu"
        self.timeout = cfg.read_timeout
        self.encode = server.encoder.encode
        self.flush_log = server.pipeline.flush_log
        self.slots: deque[_Slot] = deque()
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.reason = "closed by peer"
        self.stopped = False  # reads no more: answers what it read, then closes
        self.paused = False  # reading paused (by us)
        self.write_paused = False  # the transport's buffer is full: the peer reads slowly
        self.written = 0  # bytes handed to the transport
        self.taken = 0  # of which the transport had passed on at the last check
        self.stalled_since: float | None = None  # answers waiting, none taken since
        self.last_read = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.send_due = False  # _send is scheduled: answers ready together go in one write

    # -- the loop's callbacks ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self.server
        if server._stopping or len(server._connections) >= server.config.max_connections:
            why = "host shutting down" if server._stopping else "max_connections"
            log.warning("connection refused", reason=why)
            cast(asyncio.Transport, transport).abort()
            return
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        server._connections.add(self)
        address = transport.get_extra_info("peername")
        self.peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else "?"
        log.info("connected", peer=self.peer)
        loop = asyncio.get_running_loop()
        self.last_read = loop.time()
        self.timer = loop.call_at(self.last_read + self.timeout, self._check_timeout)

    def data_received(self, data: bytes) -> None:
        if self.stopped:
            return
        self.last_read = asyncio.get_running_loop().time()
        try:
            try:
                frames = self.decoder.feed(data)
            except FramingError as e:
                log.warning("framing error", peer=self.peer, error=str(e))
                self.stop("framing error")
                return
            start, slots, tpdu, wake = self.server._start, self.slots, self.tpdu_framing, self._wake
            for frame in frames:
                slots.append(start(frame, tpdu, wake))
            if self.decoder.error is not None:  # good frames came before the bad header
                log.warning("framing error", peer=self.peer, error=str(self.decoder.error))
                self.stop("framing error")
            elif len(slots) >= MAX_IN_FLIGHT:
                self._reading()
            self._send()
        except Exception as e:  # our bug: logged; it closes this connection, not the host
            log.error("connection failed", peer=self.peer, exc_info=e)
            self.reason = f"internal error: {type(e).__name__}"
            self.abort()

    def eof_received(self) -> bool:
        try:
            self.decoder.end_of_stream()
        except FramingError as e:
            log.warning("framing error", peer=self.peer, error=str(e))
            self.stop("partial frame at end of stream")
        else:
            self.stop("closed by peer")
        return True  # keep the transport: what was read is still to be answered

    def pause_writing(self) -> None:
        self.write_paused = True
        self._reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:  # refused
            return
        self.transport = None
        self.stopped = True
        if self.timer is not None:
            self.timer.cancel()
        if exc is not None and not self.reason.startswith("internal error"):
            self.reason = f"connection lost: {type(exc).__name__}"
        self.server._connections.discard(self)
        log.info("disconnected", peer=self.peer, reason=self.reason)

    # -- ours ----------------------------------------------------------------------------------
    def stop(self, reason: str = "host shutting down") -> None:
        """Read no more; close once every answer to what was read is sent."""
        if self.stopped:
            return
        self.stopped = True
        self.reason = reason
        self._reading()
        self._send()

    def abort(self) -> None:
        """Close now, whatever is unsent."""
        self.stopped = True
        if self.transport is not None:
            self.transport.abort()

    def _wake(self) -> None:
        """An answer is ready: send it once the loop has run the callbacks due now (the rest
        of a group commit's answers), so they leave in one write."""
        if not self.send_due:
            self.send_due = True
            asyncio.get_running_loop().call_soon(self._send)

    def _send(self) -> None:
        """Write every answer ready at the head of the queue, in one write."""
        self.send_due = False
        slots = self.slots
        if slots and slots[0].ready:
            try:
                out = []
                encode = self.encode
                while slots and slots[0].ready:
                    slot = slots.popleft()
                    if slot.out is not None:
                        out.append(encode(slot.out, slot.tpdu))
                transport = self.transport
                if out and transport is not None:
                    self.flush_log()  # an answer never leaves before its log line
                    data = b"".join(out)
                    self.written += len(data)
                    transport.write(data)
            except Exception as e:  # an answer too long for the framing, a log disk full
                # As on the stream path: this connection closes (an answer may be missing),
                # the host goes on.
                log.error("connection failed", peer=self.peer, exc_info=e)
                self.reason = f"internal error: {type(e).__name__}"
                self.abort()
                return
            if self.paused:
                self._reading()
        if self.stopped and not slots and self.transport is not None:
            self.transport.close()  # after what is buffered has been written

    def _reading(self) -> None:
        """Pause or resume reading to match the state."""
        transport = self.transport
        if transport is None:
            return
        want = not self.stopped and not self.write_paused and len(self.slots) < MAX_IN_FLIGHT
        if want == self.paused:
            if want:
                transport.resume_reading()
                # The read timeout counts from here: a paused connection is not idle.
                self.last_read = asyncio.get_running_loop().time()
            else:
                transport.pause_reading()
            self.paused = not want

    def _check_timeout(self) -> None:
        """The read timeout (idle, or stalled inside a frame) and the write timeout (answers
        waiting in the transport and none of them taken for that long, however little is
        waiting): one timer, re-armed until the connection is lost; every quarter of the
        timeout while answers wait, so a write timeout comes 1-2.25 timeouts after the
        last byte the peer took."""
        transport = self.transport
        if transport is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        unsent = transport.get_write_buffer_size()
        if unsent:
            taken = self.written - unsent
            if self.stalled_since is None or taken > self.taken:
                self.stalled_since = now  # answers are leaving (or have just started to wait)
                self.taken = taken
            elif now - self.stalled_since >= self.timeout:
                log.warning("write timeout", peer=self.peer)
                self.reason = WRITE_TIMEOUT
                self.abort()
                return
        else:
            self.stalled_since = None
        if not (self.stopped or self.paused) and now - self.last_read >= self.timeout:
            self.stop(_read_timed_out(self.decoder, peer=self.peer))
        if unsent:
            due = now + self.timeout / 4
        elif self.stopped or self.paused:
            due = now + self.timeout
        else:
            due = self.last_read + self.timeout
        self.timer = loop.call_at(due, self._check_timeout)


def _read_timed_out(decoder: FrameDecoder, peer: str) -> str:
    """Log a read timeout; the reason the connection ends (idle, or inside a frame)."""
    what = "stalled inside a frame" if decoder.buffered else "idle"
    log.warning("read timeout", peer=peer, state=what)
    return f"read timeout ({what})"


class _WriteTimeout(Exception):
    """The peer took no answer for ``read_timeout`` seconds (the stream path)."""


def _on_asyncio() -> bool:
    """Whether the running event loop is asyncio's (anyio runs on asyncio or on trio)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


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
