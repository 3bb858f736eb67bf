"""A connection on asyncio: the event loop's protocol drives a :class:`ConnectionCore`.

Frames are worked on in ``data_received`` and answers written from the ledger's callback, not
through anyio streams: a stream pauses and resumes the transport around every read and costs a
cancel scope per read timeout and an event per answer, which measured at a third of the host's
CPU per message under paced load (benchmarks/README.md).
"""

from __future__ import annotations

import asyncio
import ssl
from typing import cast

from acqhost.log import get_logger
from acqhost.log.ratelimit import source_of
from acqhost.runtime.connection import WRITE_TIMEOUT, ConnectionCore, Connections

__all__ = ("AsyncioConnection",)

log = get_logger("acqhost.server")


class AsyncioConnection(asyncio.Protocol):
    """One connection, driven by the loop's callbacks. Reading pauses while the core owes too
    many answers or the peer does not take what is written; one timer keeps the read deadlines
    and the write timeout."""

    def __init__(self, connections: Connections, tls: ssl.SSLContext | None = None) -> None:
        self.connections = connections
        self.tls = tls
        # With TLS: the TCP transport, the handshake's task and what came before it was done
        # (see _handshake); self.transport is the TLS transport once the handshake is done.
        self.raw: asyncio.Transport | None = None
        self.handshake: asyncio.Task[None] | None = None
        self.early: list[bytes] = []  # TLS records read before the TLS protocol took over
        self.plain: list[bytes | None] = []  # data (None: EOF) before start_tls returned
        self.handshake_timed_out = False
        self.timeout = connections.config.read_timeout
        self.core: ConnectionCore | None = None
        self.transport: asyncio.Transport | None = None
        self.paused = False  # reading paused (by us)
        self.write_paused = False  # the transport's buffer is full: the peer reads slowly
        self.written = 0  # bytes handed to the transport
        self.taken = 0  # of which the transport had passed on at the last check
        self.stalled_since: float | None = None  # answers waiting, none taken since
        self.timer: asyncio.TimerHandle | None = None
        self.due = 0.0  # when the timer fires
        self.send_due = False  # _send is scheduled: answers ready together go in one write

    # -- the loop's callbacks ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        connections = self.connections
        address = transport.get_extra_info("peername")
        peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else "?"
        if connections.admit(self, source_of(peer)) is not None:
            cast(asyncio.Transport, transport).abort()
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        self.core = core = connections.new_core(self, self._wake, peer, now)
        if connections.limiter.allow("connected", core.source):
            log.info("connected", peer=peer)
        if self.tls is None:
            self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        else:
            self.raw = raw = cast(asyncio.Transport, transport)
            raw.pause_reading()  # asyncio's loop honours it; uvloop starts reading regardless
            self.handshake = loop.create_task(self._handshake(raw, self.tls))
            loop.call_soon(self._feed_early_soon)
        self._arm(core.deadline())

    # -- TLS: admitted (and limited, and evictable) before the handshake -------------------------
    async def _handshake(self, raw: asyncio.Transport, context: ssl.SSLContext) -> None:
        """The TLS handshake by the first-frame deadline (the timer cancels it then); then the
        connection goes on as any other, on the TLS transport."""
        core = self.core
        assert core is not None
        loop = asyncio.get_running_loop()
        backstop = max(core.deadline() - loop.time(), 0.001) + 1.0  # the timer comes first
        error: BaseException | None = None
        try:
            tls = await loop.start_tls(
                raw, self, context, server_side=True, ssl_handshake_timeout=backstop
            )
        except (Exception, asyncio.CancelledError) as e:
            tls, error = None, e
        self.handshake = None
        if tls is None or core.stopped:
            if not core.reason.startswith(("evicted", "host shutting down")):
                kind = self._failure(error)
                why = "not done by first_frame_timeout" if kind == "timeout" else _text(error)
                self.connections.handshake_failed(core, kind, why)
            self.connections.release(self, core.reason)
            raw.abort()
            if tls is not None:
                tls.abort()
            return
        self.transport = tls
        plain, self.plain = self.plain, []
        for data in plain:  # what asyncio's TLS protocol passed on before start_tls returned
            if data is None:
                self.eof_received()
            else:
                self.data_received(data)
        self._reading()

    def _failure(self, error: BaseException | None) -> str:
        if self.handshake_timed_out or (
            isinstance(error, ConnectionAbortedError) and "handshake" in str(error)
        ):
            return "timeout"
        if isinstance(error, ssl.SSLError):
            return "error"
        return "closed"

    def _feed_early_soon(self) -> None:
        # Runs after the handshake task's first step (start_tls: pause, the TLS protocol set,
        # its connection_made and resume_reading scheduled); _feed_early runs after those.
        asyncio.get_running_loop().call_soon(self._feed_early)

    def _feed_early(self) -> None:
        """Hand the TLS protocol what uvloop read before it took over (the ClientHello)."""
        early, self.early = self.early, []
        raw = self.raw
        if not early or raw is None or self.handshake is None:
            return
        protocol = raw.get_protocol()
        if protocol is self:
            return
        data = b"".join(early)
        try:
            while data:  # asyncio's and uvloop's TLS protocols are buffered protocols
                buffer = protocol.get_buffer(len(data))  # type: ignore[attr-defined]
                n = min(len(buffer), len(data))
                buffer[:n] = data[:n]
                protocol.buffer_updated(n)  # type: ignore[attr-defined]
                data = data[n:]
        except Exception:  # the handshake has failed meanwhile: it ends the connection
            self.abort()

    def data_received(self, data: bytes) -> None:
        core = self.core
        if core is None or core.stopped:
            return
        if self.transport is None:  # TLS, not yet handed over: see _handshake
            if self.raw is not None and self.raw.get_protocol() is self:
                self.early.append(data)  # TLS records
            else:
                self.plain.append(data)
            return
        try:
            core.received(data, asyncio.get_running_loop().time())
            if core.frame_started is not None and not core.stopped:
                self._deadline_moved()
            if not core.reading:
                self._reading()
            self._send()
        except Exception as e:  # our bug: logged; it closes this connection, not the host
            self._failed(e)

    def eof_received(self) -> bool:
        if self.transport is None and self.raw is not None:
            self.plain.append(None)
            return True
        if self.core is not None:
            self.core.end_of_stream()
            self._reading()
            self._send()
        return True  # keep the transport: what was read is still to be answered

    def pause_writing(self) -> None:
        self.write_paused = True
        self._reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._reading()

    def connection_lost(self, exc: Exception | None) -> None:
        core = self.core
        if self.transport is None or core is None:  # refused, or a TLS handshake's end
            return
        self.transport = None
        core.stop(core.reason)
        if self.timer is not None:
            self.timer.cancel()
        if exc is not None and not core.reason.startswith(("internal error", "evicted")):
            core.reason = f"connection lost: {type(exc).__name__}"
        connections = self.connections
        connections.release(self, core.reason)
        if connections.limiter.allow("disconnected", core.source):
            log.info("disconnected", peer=core.peer, reason=core.reason)

    # -- ours ----------------------------------------------------------------------------------
    def stop(self, reason: str = "host shutting down") -> None:
        """Read no more; close once every answer to what was read is sent."""
        if self.handshake is not None and self.core is not None:  # nothing read, nothing owed
            self.core.stop(reason)
            self.handshake.cancel()
            return
        if self.core is not None and not self.core.stopped:
            self.core.stop(reason)
            self._reading()
            self._send()

    def evict(self, reason: str) -> None:
        """Close now, unanswered, to make room (see Connections.admit)."""
        if self.core is not None:
            self.core.stop(reason)
            self.core.reason = reason
        self.abort()

    def abort(self) -> None:
        """Close now, whatever is unsent."""
        if self.core is not None:
            self.core.stop(self.core.reason)
        if self.handshake is not None:
            self.handshake.cancel()
        if self.transport is not None:
            self.transport.abort()

    def _failed(self, error: Exception) -> None:
        assert self.core is not None
        log.error("connection failed", peer=self.core.peer, exc_info=error)
        self.core.reason = f"internal error: {type(error).__name__}"
        self.abort()

    def _wake(self) -> None:
        """An answer is ready: send it once the loop has run the callbacks due now (the rest
        of a group commit's answers), so they leave in one write."""
        if not self.send_due:
            self.send_due = True
            asyncio.get_running_loop().call_soon(self._send)

    def _send(self) -> None:
        """Write every answer ready at the head of the queue, in one write."""
        self.send_due = False
        core, transport = self.core, self.transport
        if core is None or transport is None:
            return
        try:
            data = core.output()
        except Exception as e:  # an answer too long for the framing, a log disk full: this
            self._failed(e)  # connection closes (an answer may be missing), the host goes on
            return
        if data:
            self.written += len(data)
            transport.write(data)
        if self.paused:  # answers left: there may be room to read again
            self._reading()
        if core.done:
            transport.close()  # after what is buffered has been written

    def _reading(self) -> None:
        """Pause or resume reading to match the state."""
        transport, core = self.transport, self.core
        if transport is None or core is None:
            return
        want = core.reading and not self.write_paused
        if want == self.paused:
            if want:
                transport.resume_reading()
                # The read deadlines count from here: a paused connection is not idle.
                core.resumed(asyncio.get_running_loop().time())
                self._deadline_moved()
            else:
                transport.pause_reading()
            self.paused = not want

    def _arm(self, due: float) -> None:
        self.due = due
        self.timer = asyncio.get_running_loop().call_at(due, self._check_timeout)

    def _deadline_moved(self) -> None:
        """A read deadline may now come before the timer (a partial frame began): re-arm."""
        assert self.core is not None
        due = self.core.deadline()
        if due < self.due and self.timer is not None:
            self.timer.cancel()
            self._arm(due)

    def _check_timeout(self) -> None:
        """The read deadlines (ConnectionCore.deadline: idle, a frame too slow, no valid frame
        yet) and the write timeout (answers waiting in the transport and none of them taken
        for ``read_timeout``, however little is waiting): one timer, re-armed until the
        connection is lost; every quarter of the timeout while answers wait, so a write
        timeout comes 1-2.25 timeouts after the last byte the peer took."""
        transport, core = self.transport, self.core
        if core is None:
            return
        now = asyncio.get_running_loop().time()
        if transport is None:
            if self.handshake is None:  # closed
                return
            if now >= core.deadline():  # the TLS handshake is not done by the deadline
                self.handshake_timed_out = True
                core.stop("tls handshake timeout")
                self.handshake.cancel()
                return
            self._arm(core.deadline())
            return
        unsent = transport.get_write_buffer_size()
        if unsent:
            taken = self.written - unsent
            if self.stalled_since is None or taken > self.taken:
                self.stalled_since = now  # answers are leaving (or have just started to wait)
                self.taken = taken
            elif now - self.stalled_since >= self.timeout:
                if self.connections.limiter.allow("write timeout", core.source):
                    log.warning("write timeout", peer=core.peer)
                core.reason = WRITE_TIMEOUT
                self.abort()
                return
        else:
            self.stalled_since = None
        if not (core.stopped or self.paused) and core.timed_out(now):
            self._reading()
            self._send()
        if unsent:
            due = now + self.timeout / 4
        elif core.stopped or self.paused:
            due = now + self.timeout
        else:
            due = core.deadline()
        self._arm(due)


def _text(error: BaseException | None) -> str:
    if error is None:
        return "connection lost"
    return str(error) or type(error).__name__
