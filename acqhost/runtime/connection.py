"""One connection, without I/O: the bytes read go in, the answers to send come out.

The core of every connection, whatever drives it (:mod:`acqhost.runtime.asyncio_driver` on
asyncio's protocols, :mod:`acqhost.runtime.stream_driver` on anyio streams, so on trio): the
frame decoder, the requests in flight answered strictly in arrival order (pipelined requests
are worked on concurrently, so their sales share a group commit), when to stop reading, and
why the connection ended. A driver feeds it what it reads (:meth:`ConnectionCore.received`,
:meth:`~ConnectionCore.end_of_stream`), sends what :meth:`~ConnectionCore.output` gives, reads
only while :attr:`~ConnectionCore.reading` holds and closes once :attr:`~ConnectionCore.done`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from acqhost.config import Config
from acqhost.errors import FramingError
from acqhost.log import get_logger
from acqhost.wire.framing import FrameDecoder, FrameEncoder, reply_tpdu

__all__ = ("MAX_IN_FLIGHT", "WRITE_TIMEOUT", "Answer", "ConnectionCore", "Connections", "Start")

log = get_logger("acqhost.server")

# Requests one connection may have in flight before it stops reading.
MAX_IN_FLIGHT = 256
# Why a connection whose peer took no answer for ``read_timeout`` seconds was closed: a peer
# that sends and never reads would otherwise hold its connection (and the answers) for ever.
WRITE_TIMEOUT = "write timeout (the peer does not read)"


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
Start = Callable[[bytes, Callable[[bytes | None], None]], None]


class ConnectionCore:
    """The state of one connection; its driver does the I/O and keeps the time."""

    __slots__ = (
        "_decoder",
        "_encode",
        "_flush_log",
        "_notify",
        "_start",
        "_tpdu",
        "answers",
        "last_read",
        "peer",
        "reason",
        "stopped",
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
    ) -> None:
        self._decoder = FrameDecoder(config.framing, config.max_frame)
        self._tpdu = config.framing == "len2-tpdu"
        self._encode = encoder.encode
        self._start = start
        self._flush_log = flush_log
        self._notify = notify  # an answer became ready
        self.answers: deque[Answer] = deque()
        self.peer = peer
        self.reason = "closed by peer"
        self.stopped = False  # reads no more: answers what it read, then closes
        self.last_read = now

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
        answers, start, notify = self.answers, self._start, self._notify
        for frame in frames:
            answer = Answer(reply_tpdu(frame.tpdu) if self._tpdu else b"", notify)
            # Appended first: an answer may be finished at once, inside start().
            answers.append(answer)
            start(frame.message, answer.finish)
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

    def read_timed_out(self) -> None:
        """No byte for ``read_timeout``: idle, or stalled inside a frame."""
        what = "stalled inside a frame" if self._decoder.buffered else "idle"
        log.warning("read timeout", peer=self.peer, state=what)
        self.stop(f"read timeout ({what})")

    def stop(self, reason: str = "host shutting down") -> None:
        """Read no more; the connection closes once every answer to what was read is sent."""
        if not self.stopped:
            self.stopped = True
            self.reason = reason

    def _framing_error(self, error: FramingError, reason: str) -> None:
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
    open, and whether one more may open."""

    def __init__(self, config: Config, start: Start, flush_log: Callable[[], None]) -> None:
        self.config = config
        self.encoder = FrameEncoder(config.framing, config.max_frame)
        self._start = start
        self._flush_log = flush_log
        self.open: set[Any] = set()  # the drivers of the open connections
        self.stopping = False  # the host is shutting down: no new connections
        self.refused: dict[str, int] = {}  # connections refused, by reason (the metrics')

    def refusal(self) -> str | None:
        """Why a new connection is refused now (counted in ``refused``); None when it is
        taken."""
        reason = self._refusal()
        if reason is not None:
            self.refused[reason] = self.refused.get(reason, 0) + 1
        return reason

    def _refusal(self) -> str | None:
        if self.stopping:
            return "host shutting down"
        if len(self.open) >= self.config.max_connections:
            return "max_connections"
        return None

    def new_core(self, notify: Callable[[], None], peer: str, now: float) -> ConnectionCore:
        return ConnectionCore(
            self.config, self.encoder, self._start, self._flush_log, notify, peer=peer, now=now
        )
