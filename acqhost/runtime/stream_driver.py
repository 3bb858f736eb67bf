"""A connection on an anyio stream (trio, or asyncio given a listener): two tasks drive a
:class:`ConnectionCore`, one reading, one sending.

Shaped like trio's ``serve_listeners``: one task per connection, the stream closed in a
``finally``, a timeout around reads, a deadline around sends.
"""

from __future__ import annotations

import math
import ssl

import anyio
import anyio.abc
from anyio.streams.tls import TLSStream

from acqhost.log import get_logger
from acqhost.runtime.connection import (
    WRITE_TIMEOUT,
    ConnectionCore,
    Connections,
)

__all__ = ("StreamConnection",)

log = get_logger("acqhost.server")

READ_SIZE = 65536
# The most sent under one write deadline: a peer taking fewer than SEND_CHUNK bytes per
# read_timeout (137 bytes a second at the default) is cut.
SEND_CHUNK = 4096


class _WriteTimeout(Exception):
    """The peer took no answer for ``read_timeout`` seconds."""


class StreamConnection:
    """One connection on ``stream``; :meth:`serve` returns once it is closed. With ``tls``
    the connection is admitted before its TLS handshake, which must end before the connection's
    ``first_frame_timeout``: until then it counts towards the limits, and is the first to be
    evicted, like any connection that has not yet sent a valid frame."""

    def __init__(
        self,
        connections: Connections,
        stream: anyio.abc.ByteStream,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.connections = connections
        self.stream = stream
        self.tls = tls
        self.handshaking = False
        self.timeout = connections.config.read_timeout
        self.reading = anyio.CancelScope()  # cancelled by stop()
        self.scope = anyio.CancelScope()  # cancelled by evict()
        self.core: ConnectionCore = connections.new_core(
            self, self._wake, _peer(stream), anyio.current_time()
        )
        self._answer_ready: anyio.Event | None = None  # the sender waits on it
        self._room: anyio.Event | None = None  # the reader waits on it, too much in flight

    async def admit(self) -> bool:
        """Whether the connection is taken (Connections.admit); if not, it is closed."""
        if self.connections.admit(self, self.core.source) is None:
            return True
        with anyio.CancelScope(shield=True):
            await self.stream.aclose()
        return False

    def evict(self, reason: str) -> None:
        """Close now, unanswered, to make room (see Connections.admit)."""
        self.core.stop(reason)
        self.core.reason = reason
        self.scope.cancel()

    def stop(self) -> None:
        """Stop reading; the connection answers what it read, then closes (at once while its
        TLS handshake runs: nothing was read)."""
        self.reading.cancel()
        if self.handshaking:
            self.core.stop("host shutting down")
            self.scope.cancel()

    def _wake(self) -> None:
        if self._answer_ready is not None:
            self._answer_ready.set()
            self._answer_ready = None

    async def serve(self) -> None:
        core, stream, limiter = self.core, self.stream, self.connections.limiter
        if limiter.allow("connected", core.source):
            log.info("connected", peer=core.peer)
        try:
            with self.scope:
                if self.tls is None or await self._handshake(self.tls):
                    await self._serve()
        except* _WriteTimeout:
            if limiter.allow("write timeout", core.source):
                log.warning("write timeout", peer=core.peer)
            core.reason = WRITE_TIMEOUT
        except* (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as group:
            core.reason = f"connection lost: {type(group.exceptions[0]).__name__}"
        except* Exception as group:  # our bug: logged; it closes this connection, not the host
            log.error("connection failed", peer=core.peer, exc_info=group.exceptions[0])
            core.reason = f"internal error: {type(group.exceptions[0]).__name__}"
        finally:
            self.connections.release(self, core.reason)
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            if limiter.allow("disconnected", core.source):
                log.info("disconnected", peer=core.peer, reason=core.reason)

    async def _handshake(self, context: ssl.SSLContext) -> bool:
        """The TLS handshake, by the first-frame deadline; False (counted and logged, the
        connection to be closed) when it fails or times out."""
        core = self.core
        self.handshaking = True
        with anyio.CancelScope(deadline=core.deadline()) as deadline:
            try:
                self.stream = await TLSStream.wrap(
                    self.stream, server_side=True, ssl_context=context, standard_compatible=False
                )
                return True
            except ssl.SSLError as e:
                self.connections.handshake_failed(core, "error", str(e))
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError) as e:
                self.connections.handshake_failed(core, "closed", str(e) or type(e).__name__)
            finally:
                self.handshaking = False
        if deadline.cancelled_caught:
            self.connections.handshake_failed(core, "timeout", "no handshake by the deadline")
        return False

    async def _serve(self) -> None:
        core = self.core
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._send_answers)
            try:
                with self.reading:
                    await self._read_requests()
                if self.reading.cancelled_caught:
                    core.stop("host shutting down")
            finally:
                core.stop(core.reason)  # the sender sends what is owed, then ends
                self._wake()

    async def _read_requests(self) -> None:
        core, stream = self.core, self.stream
        now = anyio.current_time
        # The read deadlines (ConnectionCore.deadline): a scope whose deadline is the first of
        # them as of its making. A read only notes its time (a scope per read, or a deadline
        # moved per read, cost more than the rest of the read on trio); when the deadline
        # passes, a deadline has passed -- or the connection read meanwhile, and a new scope
        # takes over. Only a partial frame's start moves the deadline closer. Waiting for the
        # peer to take its answers is not idle time.
        while True:
            waiting_for_peer = False
            with anyio.CancelScope(deadline=core.deadline()) as scope:
                while True:
                    if core.stopped:
                        return
                    if not core.reading:  # the peer reads slower than it writes
                        waiting_for_peer = True
                        self._room = room = anyio.Event()
                        await room.wait()
                        waiting_for_peer = False
                        core.resumed(now())
                        scope.deadline = min(scope.deadline, core.deadline())
                        continue
                    try:
                        data = await stream.receive(READ_SIZE)
                    except anyio.EndOfStream:
                        core.end_of_stream()
                        return
                    # No await between reading and starting its frames: a frame read is a
                    # frame answered, even when shutdown comes meanwhile.
                    core.received(data, now())
                    if core.frame_started is not None:
                        due = core.deadline()
                        if due < scope.deadline:
                            scope.deadline = due
            # The deadline passed (shutdown's and eviction's cancellations do not end up here).
            if waiting_for_peer:
                core.resumed(now())
            elif core.timed_out(now()):
                return

    async def _send_answers(self) -> None:
        """Send answers in arrival order; every answer ready at once goes in one write."""
        core, stream, timeout = self.core, self.stream, self.timeout
        now = anyio.current_time
        # Only sends are timed: a deadline for each SEND_CHUNK bytes, so a peer that reads
        # slowly but steadily is not cut, lifted after the last.
        while True:
            with anyio.CancelScope() as sends:
                while True:
                    data = core.output()
                    if self._room is not None and core.has_room:
                        self._room.set()
                        self._room = None
                    if not data:
                        if core.done:
                            return
                        if not (core.answers and core.answers[0].ready):
                            self._answer_ready = ready = anyio.Event()
                            await ready.wait()
                        continue
                    for start in range(0, len(data), SEND_CHUNK):
                        sends.deadline = now() + timeout
                        await stream.send(data[start : start + SEND_CHUNK])
                    sends.deadline = math.inf
                    if sends.cancel_called:  # the deadline passed as the send ended:
                        break  # not a timeout, but this scope is spent
            if sends.cancelled_caught:
                raise _WriteTimeout  # ends the connection (the reader with it)


def _peer(stream: anyio.abc.ByteStream) -> str:
    try:
        address = stream.extra(anyio.abc.SocketAttribute.remote_address)
    except Exception:
        return "?"
    if isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    return str(address)
