"""One connection, without I/O: the bytes read go in, the answers to send come out.

The core of every connection, whatever drives it (:mod:`acqhost.runtime.asyncio_driver` on
asyncio's protocols, :mod:`acqhost.runtime.stream_driver` on anyio streams, so on trio): the
frame decoder, the requests in flight answered strictly in arrival order (pipelined requests
are worked on concurrently, so their sales share a group commit), when to stop reading, and
why the connection ended. A driver feeds it what it reads (:meth:`ConnectionCore.received`,
:meth:`~ConnectionCore.end_of_stream`), sends what :meth:`~ConnectionCore.output` gives, reads
only while :attr:`~ConnectionCore.reading` holds and closes once :attr:`~ConnectionCore.done`.

The core also keeps a connection's read deadlines (the driver keeps the clock and asks
:meth:`~ConnectionCore.deadline` when to look, :meth:`~ConnectionCore.timed_out` whether one
passed): ``read_timeout`` since the last byte; ``frame_timeout`` from a frame's first byte to
its last, so a peer sending a frame a byte at a time is closed however often it sends; and,
until the connection has sent a *valid frame* (one the codec decoded in full into a request,
which the host then answers), ``first_frame_timeout`` from its opening. :class:`Connections`
keeps the limits of the server's connections: ``max_connections`` (at the limit, a new
connection evicts the oldest that has never sent a valid frame, else it is refused) and
``max_connections_per_source``. The log records a peer can cause go through the server's
:class:`~acqhost.log.ratelimit.SourceLimiter`.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from typing import Any, Protocol

from acqhost.config import Config
from acqhost.errors import FramingError
from acqhost.log import get_logger
from acqhost.log.ratelimit import SourceLimiter, source_of
from acqhost.wire.framing import FrameDecoder, FrameEncoder, reply_tpdu

__all__ = (
    "EVICTED",
    "FIRST_FRAME_TIMEOUT",
    "FRAME_TIMEOUT",
    "MAX_IN_FLIGHT",
    "WRITE_TIMEOUT",
    "Answer",
    "ConnectionCore",
    "Connections",
    "Start",
)

log = get_logger("acqhost.server")

# Requests one connection may have in flight before it stops reading.
MAX_IN_FLIGHT = 256
# Why a connection whose peer took no answer for ``read_timeout`` seconds was closed: a peer
# that sends and never reads would otherwise hold its connection (and the answers) for ever.
WRITE_TIMEOUT = "write timeout (the peer does not read)"
# Why a connection was closed by its read deadlines, or to make room for a new one.
FRAME_TIMEOUT = "frame timeout"
FIRST_FRAME_TIMEOUT = "first frame timeout"
EVICTED = "evicted (max_connections)"


class Answer:
    """The answer to one request, in arrival order: ready once its bytes are known (None for
    a request that gets no answer)."""

    __slots__ = ("notify", "out", "ready", "tpdu")

    def __init__(self, tpdu: bytes, notify: Callable[[], None]) -> None:
        self.out: bytes | None = None
        self.tpdu = tpdu
        self.ready = False
        self.notify = notify

    def finish(self, out: bytes | None) -> None:
        self.out = out
        self.ready = True
        self.notify()


# Starts the work on one request message; calls ``finish`` with the answer, now or later.
# Returns whether the message was a valid frame: decoded in full into a request.
Start = Callable[[bytes, Callable[[bytes | None], None]], bool]


class Driver(Protocol):
    """What :class:`Connections` needs of a connection's driver."""

    @property
    def core(self) -> ConnectionCore | None: ...

    def evict(self, reason: str) -> None:
        """Close now, whatever is unsent, for ``reason``."""


class ConnectionCore:
    """The state of one connection; its driver does the I/O and keeps the time."""

    __slots__ = (
        "_decoder",
        "_encode",
        "_first_frame_timeout",
        "_flush_log",
        "_frame_timeout",
        "_limiter",
        "_notify",
        "_proven",
        "_read_timeout",
        "_start",
        "_tpdu",
        "answers",
        "frame_started",
        "last_read",
        "opened",
        "peer",
        "reason",
        "source",
        "stopped",
        "valid",
    )

    def __init__(
        self,
        config: Config,
        encoder: FrameEncoder,
        start: Start,
        flush_log: Callable[[], None],
        notify: Callable[[], None],
        *,
        peer: str,
        now: float,
        limiter: SourceLimiter | None = None,
        proven: Callable[[], None] = lambda: None,
    ) -> None:
        self._decoder = FrameDecoder(config.framing, config.max_frame)
        self._tpdu = config.framing == "len2-tpdu"
        self._encode = encoder.encode
        self._start = start
        self._flush_log = flush_log
        self._notify = notify  # an answer became ready
        self._limiter = limiter or SourceLimiter(0)
        self._proven = proven  # the first valid frame came
        self._read_timeout = config.read_timeout
        self._frame_timeout = config.frame_timeout
        self._first_frame_timeout = config.first_frame_timeout
        self.answers: deque[Answer] = deque()
        self.peer = peer
        self.source = source_of(peer)
        self.reason = "closed by peer"
        self.stopped = False  # reads no more: answers what it read, then closes
        self.last_read = now
        self.opened = now
        self.frame_started: float | None = None  # when the partial frame buffered began
        self.valid = False  # a valid frame came

    # -- input ---------------------------------------------------------------------------------
    def received(self, data: bytes, now: float) -> None:
        """Start every whole frame in ``data``; a framing error stops reading (the frames
        before it are still answered)."""
        self.last_read = now
        decoder = self._decoder
        try:
            frames = decoder.feed(data)
        except FramingError as e:
            self._framing_error(e, "framing error")
            return
        if frames:
            self._limiter.source = self.source  # the host core's warnings name this peer
            answers, start, notify = self.answers, self._start, self._notify
            valid = False
            for frame in frames:
                answer = Answer(reply_tpdu(frame.tpdu) if self._tpdu else b"", notify)
                # Appended first: an answer may be finished at once, inside start().
                answers.append(answer)
                if start(frame.message, answer.finish):
                    valid = True
            if valid and not self.valid:
                self.valid = True
                self._proven()
            # What is left began in this read (a frame ended in it).
            self.frame_started = now if decoder.buffered else None
        elif self.frame_started is None and decoder.buffered:
            self.frame_started = now
        if decoder.error is not None:  # good frames came before the bad header
            self._framing_error(decoder.error, "framing error")

    def end_of_stream(self) -> None:
        """The peer will send no more."""
        try:
            self._decoder.end_of_stream()
        except FramingError as e:
            self._framing_error(e, "partial frame at end of stream")
        else:
            self.stop("closed by peer")

    def deadline(self) -> float:
        """When the first read deadline passes (while reading): ``read_timeout`` after the last
        read, ``frame_timeout`` after a partial frame began, ``first_frame_timeout`` after the
        opening while no valid frame came."""
        due = self.last_read + self._read_timeout
        started = self.frame_started
        if started is not None and started + self._frame_timeout < due:
            due = started + self._frame_timeout
        if not self.valid and self.opened + self._first_frame_timeout < due:
            due = self.opened + self._first_frame_timeout
        return due

    def timed_out(self, now: float) -> bool:
        """Whether a read deadline has passed by ``now``; if so reading stops (and the event
        is logged)."""
        if self.stopped or now < self.deadline():
            return False
        buffered = self._decoder.buffered
        started = self.frame_started
        if not self.valid and now >= self.opened + self._first_frame_timeout:
            event, reason = "first frame timeout", FIRST_FRAME_TIMEOUT
        elif started is not None and now >= started + self._frame_timeout:
            event, reason = "frame timeout", FRAME_TIMEOUT
        else:
            state = "stalled inside a frame" if buffered else "idle"
            event, reason = "read timeout", f"read timeout ({state})"
        if self._limiter.allow(event, self.source):
            log.warning(event, peer=self.peer, buffered=buffered,
                        seconds=round(now - self.opened, 3))  # fmt: skip
        self.stop(reason)
        return True

    def resumed(self, now: float) -> None:
        """Reading resumes after the host paused it: the time paused was not the peer's."""
        self.last_read = now
        if self.frame_started is not None:
            self.frame_started = now

    def stop(self, reason: str = "host shutting down") -> None:
        """Read no more; the connection closes once every answer to what was read is sent."""
        if not self.stopped:
            self.stopped = True
            self.reason = reason

    def _framing_error(self, error: FramingError, reason: str) -> None:
        if self._limiter.allow("framing error", self.source):
            log.warning("framing error", peer=self.peer, error=str(error))
        self.stop(reason)

    # -- output --------------------------------------------------------------------------------
    @property
    def has_room(self) -> bool:
        """Fewer than MAX_IN_FLIGHT answers owed."""
        return len(self.answers) < MAX_IN_FLIGHT

    @property
    def reading(self) -> bool:
        """Whether to read: not stopped, and room for more requests."""
        return not self.stopped and len(self.answers) < MAX_IN_FLIGHT

    @property
    def done(self) -> bool:
        """Stopped, and every answer sent: close."""
        return self.stopped and not self.answers

    def output(self) -> bytes:
        """Every answer ready at the head of the queue, framed, as one piece (b"" when none);
        their log lines are written first, so an answer never leaves before its line."""
        answers = self.answers
        if not answers or not answers[0].ready:
            return b""
        encode = self._encode
        out = []
        while answers and answers[0].ready:
            answer = answers.popleft()
            if answer.out is not None:
                out.append(encode(answer.out, answer.tpdu))
        if not out:
            return b""
        self._flush_log()
        return b"".join(out)


class Connections:
    """A server's connections, whatever drives them: how a new one's core is made, which are
    open (and from which source address), which have never sent a valid frame (oldest first),
    whether one more may open, and how many ended for each reason."""

    def __init__(
        self,
        config: Config,
        start: Start,
        flush_log: Callable[[], None],
        limiter: SourceLimiter | None = None,
    ) -> None:
        self.config = config
        self.encoder = FrameEncoder(config.framing, config.max_frame)
        self._start = start
        self._flush_log = flush_log
        self.limiter = limiter or SourceLimiter(config.log_rate)
        self.open: dict[Any, str] = {}  # the drivers of the open connections: their source
        self.unproven: dict[Any, None] = {}  # open, no valid frame yet, oldest first
        self.per_source: Counter[str] = Counter()
        self.closed: Counter[str] = Counter()  # why connections ended (refused ones too)
        self.stopping = False  # the host is shutting down: no new connections
        self.refused: dict[str, int] = {}  # connections refused, by reason (the metrics')
        # TLS handshakes that did not complete: "timeout", "error" (not TLS, a certificate
        # refused...), "closed" (the peer went away); the metrics'
        self.handshakes_failed: dict[str, int] = {}

    def admit(self, conn: Driver, source: str) -> str | None:
        """Take ``conn``, from address ``source``, as open, or say why it is refused (and
        log that, and count it in ``refused``). At ``max_connections`` the oldest connection
        that has never sent a valid frame is closed to make room; with none, the new one is
        refused."""
        config = self.config
        refusal = None
        if self.stopping:
            refusal = "host shutting down"
        elif self.per_source[source] >= config.max_connections_per_source:
            refusal = "max_connections_per_source"
        elif len(self.open) >= config.max_connections:
            victim = next(iter(self.unproven), None)
            if victim is None:
                refusal = "max_connections"
            else:
                self._evict(victim)
        if refusal is not None:
            self.closed[f"refused ({refusal})"] += 1
            self.refused[refusal] = self.refused.get(refusal, 0) + 1
            if self.limiter.allow("connection refused", source):
                log.warning("connection refused", source=source, reason=refusal)
            return refusal
        self.open[conn] = source
        self.unproven[conn] = None
        self.per_source[source] += 1
        return None

    def release(self, conn: Driver, reason: str) -> None:
        """``conn`` has closed (or is closing), for ``reason``; a second call does nothing."""
        source = self.open.pop(conn, None)
        if source is None:
            return
        self.unproven.pop(conn, None)
        left = self.per_source[source] - 1
        if left:
            self.per_source[source] = left
        else:
            del self.per_source[source]
        self.closed[reason] += 1

    def handshake_failed(self, core: ConnectionCore, kind: str, error: str) -> None:
        """The TLS handshake of ``core``'s connection failed (``kind``: timeout, error or
        closed): counted, logged as a security event, and the connection is to close."""
        self.handshakes_failed[kind] = self.handshakes_failed.get(kind, 0) + 1
        core.stop(f"tls handshake {kind}")
        if self.limiter.allow("tls handshake failed", core.source):
            log.warning("tls handshake failed", peer=core.peer, kind=kind, error=error)

    def _evict(self, victim: Driver) -> None:
        self.release(victim, EVICTED)
        core = victim.core
        if core is not None and self.limiter.allow("connection evicted", core.source):
            log.warning("connection evicted", peer=core.peer, reason="max_connections")
        victim.evict(EVICTED)

    def new_core(
        self, conn: Driver, notify: Callable[[], None], peer: str, now: float
    ) -> ConnectionCore:
        def proven() -> None:
            self.unproven.pop(conn, None)

        return ConnectionCore(
            self.config, self.encoder, self._start, self._flush_log, notify, peer=peer,
            now=now, limiter=self.limiter, proven=proven,
        )  # fmt: skip
