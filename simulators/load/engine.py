"""The load tester's engine: connections that send requests and match their answers.

asyncio protocols (uvloop when installed), one per connection, so the generator costs little
per request. Two ways to drive a target:

- **closed loop** (``depth``): each connection keeps ``depth`` requests in flight and sends
  the next as an answer (or a timeout) frees a place; this finds the target's capacity.
- **open loop** (a plan of send times): requests leave at their planned times whatever the
  answers do. Latency counts from the planned time, so a target that falls behind is charged
  for the queue it causes (no coordinated omission); a request sent more than ``LATE_S`` after
  its time counts as late, and one still waiting for room (``max_in_flight``) at the end is
  reported as unsent.

Answers are matched to requests by key fields (41, 11, and 37 when the request carried one);
an answer without them is matched to its connection's oldest request, as hosts answer in
order. An answer matching no request in flight counts as unmatched; one that is not for its
connection's oldest request, as out of order. A request unanswered after ``timeout`` seconds
is a timeout; requests in flight on a connection that closes are errors, and the connection
is opened again.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from acqhost.wire.framing import FrameDecoder
from simulators.load.messages import LoadTerminal, Mix, Request, SignOn
from simulators.load.peek import Peek, Peeker
from simulators.load.report import ERROR, TIMEOUT, Recorder

__all__ = (
    "LATE_S",
    "Counts",
    "Engine",
    "MixSource",
    "PrebuiltSource",
    "Source",
    "mix_sources",
    "sign_on_all",
)

LATE_S: Final = 0.005  # a request sent this long after its planned time is late
_TICK_S: Final = 0.05  # how often timeouts are looked for
_RECONNECT_S: Final = 0.2


class Source:
    """Where a connection's requests come from. ``next`` gives the next request, or None
    when there are no more; ``learn`` sees each answer to a request that has fields."""

    learns = False
    terminals: Sequence[LoadTerminal] = ()

    def next(self) -> Request | None:
        raise NotImplementedError

    def learn(self, request: Request, answer: dict[str, str]) -> None:
        return None

    def terminal(self, tid: str) -> LoadTerminal | None:
        for t in self.terminals:
            if t.tid == tid:
                return t
        return None


class PrebuiltSource(Source):
    """Frames built before the clock starts; sent again from the first once all were sent
    when ``repeat`` (only for a target that does not mind repeats, such as an echo server)."""

    def __init__(
        self,
        requests: Sequence[Request],
        terminals: Sequence[LoadTerminal] = (),
        *,
        repeat: bool = False,
    ) -> None:
        self.requests = requests
        self.terminals = terminals
        self.repeat = repeat
        self._next = 0
        self.exhausted = False

    def next(self) -> Request | None:
        i = self._next
        if i >= len(self.requests):
            if not self.repeat or not self.requests:
                self.exhausted = True
                return None
            i = 0
        self._next = i + 1
        return self.requests[i]


class MixSource(Source):
    """Requests built as they leave (fresh STAN and dates, MAC'd) from a :class:`Mix`, taking
    the connection's terminals in turn."""

    def __init__(self, terminals: Sequence[LoadTerminal], mix: Mix) -> None:
        self.terminals = terminals
        self.mix = mix
        self._kinds = mix.kinds_iter()
        self._turn = itertools.cycle(terminals)
        self.learns = mix.learns

    def next(self) -> Request | None:
        return self.build()

    def build(self) -> Request:
        return self.mix.build(next(self._turn), next(self._kinds))

    def learn(self, request: Request, answer: dict[str, str]) -> None:
        if request.fields is not None:
            terminal = self.terminal(request.key[0])
            if terminal is not None:
                terminal.learn(request.fields, answer)


@dataclass
class _Second:
    """What happened to the requests planned in one second (fed to the Recorder at the end)."""

    latencies: Counter[int] = field(default_factory=Counter)
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (MTI, 39)
    timeouts: Counter[str] = field(default_factory=Counter)  # by MTI
    errors: Counter[str] = field(default_factory=Counter)


@dataclass
class Counts:
    """What the recorder does not hold: how requests left and how answers matched."""

    warmup: int = 0  # requests planned during the warm-up (sent, not in the figures)
    late: int = 0
    max_late_s: float = 0.0
    unsent: int = 0
    unmatched: int = 0
    out_of_order: int = 0
    bad_mac: int = 0  # answers whose MAC did not verify (counted as errors)
    undecodable: int = 0  # answers the codec refused (counted as errors)
    reconnects: int = 0
    in_flight: int = 0  # right now (for the progress line)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("in_flight")
        d["max_late_s"] = round(self.max_late_s, 6)
        return d


def _seen(answer: dict[str, str]) -> Peek:
    """What :class:`Peeker` gives, from a decoded answer."""
    get = answer.get
    return (get("41", ""), get("11", ""), get("39", "none"), get("37", ""),
            "64" in answer or "128" in answer)  # fmt: skip


class _Conn(asyncio.Protocol):
    __slots__ = ("closed", "decoder", "engine", "exhausted", "in_flight", "index", "order", "out",
                 "rest", "source", "transport", "waiting")  # fmt: skip

    def __init__(self, engine: Engine, source: Source, index: int) -> None:
        self.engine = engine
        self.source = source
        self.index = index
        self.decoder = FrameDecoder(engine.framing, 65535)
        self.rest = b""  # len2: the start of a frame not all received yet
        self.exhausted = False  # its source has no more requests
        self.transport: asyncio.Transport | None = None
        # key -> (planned, request); order: keys in the order sent
        self.in_flight: dict[tuple[str, ...], tuple[float, Request]] = {}
        self.order: deque[tuple[str, ...]] = deque()
        self.waiting: deque[float] = deque()  # open loop: planned times waiting for room
        self.out: list[bytes] = []  # frames to write at the end of this tick
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.engine.started:  # a connection opened again; the first ones wait for the start
            self.engine.refill(self)

    def send(self, planned: float, now: float) -> bool:
        """Send the source's next request, planned for ``planned``; False when there is none."""
        request = self.source.next()
        if request is None:
            return False
        self.engine.sending(planned, now)
        key = request.key
        if key in self.in_flight:  # the same key twice in flight: the first is lost
            self.engine.lost(self.in_flight.pop(key), ERROR)
        self.in_flight[key] = (planned, request)
        self.order.append(key)
        self.out.append(request.frame)
        return True

    def flush(self) -> None:
        """Write what :meth:`send` queued, in one write (one system call for a tick's
        requests on this connection)."""
        out = self.out
        if out and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        engine = self.engine
        messages: list[bytes] = []
        if engine.framing == "len2":  # FrameDecoder's len2 scan, inlined (the hot path)
            buf = self.rest + data if self.rest else data
            pos, size = 0, len(buf)
            while size - pos >= 2:
                end = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
                if end > size:
                    break
                messages.append(buf[pos + 2 : end])
                pos = end
            self.rest = buf[pos:] if pos < size else b""
        else:
            try:
                messages = [frame.message for frame in self.decoder.feed(data)]
            except ValueError:
                self.decoder = FrameDecoder(engine.framing, 65535)
                if self.transport is not None:
                    self.transport.close()
        peek, decode, verify = engine.peek, engine.decode, engine.verify
        in_flight, order, counts = self.in_flight, self.order, engine.counts
        learns = self.source.learns
        measure_from, seconds = engine.measure_from, engine.seconds
        for message in messages:
            answer = None
            try:
                seen = None if peek is None else peek(message)
                if seen is None:
                    answer = decode(message)
                    seen = _seen(answer)
            except (ValueError, IndexError):
                counts.undecodable += 1
                self._drop_oldest(ERROR)
                continue
            tid, stan, rc, rrn, has_mac = seen
            if stan:
                key: tuple[str, ...] = (tid, stan)
            else:  # no STAN: the oldest request's answer
                while order and order[0] not in in_flight:
                    order.popleft()
                if not order:
                    counts.unmatched += 1
                    continue
                key = order[0]
            entry = in_flight.pop(key, None)
            if entry is None:
                entry = in_flight.pop((tid, stan, rrn), None)
                if entry is None:
                    counts.unmatched += 1
                    continue
                key = entry[1].key
            if order[0] == key:
                order.popleft()
            else:
                while order and order[0] not in in_flight and order[0] != key:
                    order.popleft()
                if order and order[0] == key:
                    order.popleft()
                else:
                    counts.out_of_order += 1
            planned, request = entry
            if verify and has_mac and not engine.mac_ok(request, message):
                counts.bad_mac += 1
                engine.lost(entry, ERROR)
                continue
            if planned >= measure_from:
                acc = seconds.get(int(planned - measure_from)) or engine.second_of(planned)
                acc.latencies[int((now - planned) * 1_000_000)] += 1
                acc.outcomes[request.mti, rc] += 1
            if learns:
                self.source.learn(request, answer if answer is not None else decode(message))
        engine.refill(self)

    def _drop_oldest(self, kind: str) -> None:
        while self.order:
            entry = self.in_flight.pop(self.order.popleft(), None)
            if entry is not None:
                self.engine.lost(entry, kind)
                return

    def expire(self, deadline: float) -> None:
        """Every request planned before ``deadline`` and still in flight is a timeout."""
        in_flight, order = self.in_flight, self.order
        while order:
            entry = in_flight.get(order[0])
            if entry is None:
                order.popleft()
                continue
            if entry[0] >= deadline:
                break
            del in_flight[order.popleft()]
            self.engine.lost(entry, TIMEOUT)
        # out-of-order leftovers behind a younger head
        for key, entry in list(in_flight.items()):
            if entry[0] < deadline:
                del in_flight[key]
                self.engine.lost(entry, TIMEOUT)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        for entry in self.in_flight.values():
            self.engine.lost(entry, ERROR)
        self.in_flight.clear()
        self.order.clear()
        if not self.closed.done():
            self.closed.set_result(None)
        self.engine.lost_connection(self)


class Engine:
    """One load run against ``host``:``port`` (see the module's docstring)."""

    def __init__(
        self,
        host: str,
        port: int,
        sources: Sequence[Source],
        *,
        framing: str = "len2",
        depth: int = 1,
        plan: Iterable[tuple[float, int | None]] | None = None,
        duration: float | None = None,
        count: int | None = None,
        warmup: float = 0.0,
        timeout: float = 10.0,
        max_in_flight: int = 1024,
        verify: bool = True,
        start_at: float | None = None,
        on_second: Callable[[Engine], None] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """``sources``: one per connection. ``plan``: open loop, (seconds from the start,
        connection index or None for the next in turn) in time order; None: closed loop.
        The run ends after ``warmup`` + ``duration`` seconds, or when ``count`` requests
        after the warm-up were sent, or when the plan or the sources run out; then what is
        in flight gets up to ``timeout`` to be answered. ``start_at``: the wall-clock time
        (``time.time()``) the run starts at (processes of one run share it). ``tls``: connect
        with TLS (a host with ``[tls]``)."""
        if plan is None and depth < 1:
            raise ValueError("depth must be 1 or more")
        self.host, self.port = host, port
        self.sources = sources
        self.framing = framing
        self.depth = depth
        self.plan = plan
        self.duration = duration
        self.count = count
        self.warmup = warmup
        self.timeout = timeout
        self.max_in_flight = max_in_flight if plan is not None else depth
        self.verify = verify
        self.start_at = start_at
        self.on_second = on_second
        self.tls = tls
        self.counts = Counts()
        self.conns: list[_Conn] = []
        self.seconds: dict[int, _Second] = {}
        self.start = 0.0  # perf_counter of the run's start
        self.measure_from = 0.0  # perf_counter: planned times before this are warm-up
        self.stopping = False
        self.started = False  # the connections are open and the clock runs
        self.sent_measured = 0
        self.elapsed = 0.0  # of the measured part, once the run ended
        self.cpu_s = 0.0  # the process's CPU time during the measured part
        self._terminals = {t.tid: t for s in sources for t in s.terminals}
        codec = next((t.codec for t in self._terminals.values()), None)
        if codec is None:
            raise ValueError("no terminals")
        self.decode: Callable[[bytes], dict[str, str]] = codec.decode
        first = next(iter(self._terminals.values()))
        peeker = Peeker(first.spec)
        self.peek: Callable[[bytes], Peek | None] | None = peeker.peek if peeker.usable else None
        self._rr = 0

    # -- bookkeeping (the hot path) ----------------------------------------------------------

    def second_of(self, planned: float) -> _Second:
        """The tallies of the second ``planned`` falls in (after the warm-up)."""
        sec = int(planned - self.measure_from)
        acc = self.seconds.get(sec)
        if acc is None:
            acc = self.seconds[sec] = _Second()
        return acc

    def sending(self, planned: float, now: float) -> None:
        if planned < self.measure_from:
            self.counts.warmup += 1
        else:
            self.sent_measured += 1
            if self.count is not None and self.sent_measured >= self.count:
                self.stopping = True
        late = now - planned
        if late > LATE_S:
            self.counts.late += 1
            if late > self.counts.max_late_s:
                self.counts.max_late_s = late

    def lost(self, entry: tuple[float, Request], kind: str) -> None:
        if entry[0] >= self.measure_from:
            acc = self.second_of(entry[0])
            (acc.timeouts if kind == TIMEOUT else acc.errors)[entry[1].mti] += 1

    def mac_ok(self, request: Request, message: bytes) -> bool:
        """The MAC at the end of ``message`` (an answer to ``request``) verifies."""
        terminal = self._terminals.get(request.key[0])
        return terminal is None or not terminal.mac or terminal.mac_ok(message)

    # -- sending -----------------------------------------------------------------------------

    def refill(self, conn: _Conn) -> None:
        """Fill ``conn`` up to its depth (closed loop) or send what waits for room (open)."""
        if conn.transport is None:
            return
        limit = self.max_in_flight
        if self.plan is None:  # closed loop: Conn.send and sending, inlined (the hot path)
            in_flight = conn.in_flight
            if self.stopping or len(in_flight) >= limit:
                conn.flush()
                return
            now = time.perf_counter()
            take, order, out = conn.source.next, conn.order, conn.out
            measured = now >= self.measure_from
            while len(in_flight) < limit:
                request = take()
                if request is None:
                    self.exhausted(conn)
                    break
                key = request.key
                if key in in_flight:  # the same key twice in flight: the first is lost
                    self.lost(in_flight.pop(key), ERROR)
                in_flight[key] = (now, request)
                order.append(key)
                out.append(request.frame)
                if not measured:
                    self.counts.warmup += 1
                    continue
                self.sent_measured += 1
                if self.count is not None and self.sent_measured >= self.count:
                    self.stopping = True
                    break
        else:
            waiting = conn.waiting
            while waiting and len(conn.in_flight) < limit and not self.stopping:
                if not conn.send(waiting.popleft(), time.perf_counter()):
                    self.counts.unsent += 1
                    self.exhausted(conn)
        conn.flush()

    def exhausted(self, conn: _Conn) -> None:
        """``conn``'s source has run out: the run ends when every connection's has."""
        conn.exhausted = True
        if all(c.exhausted for c in self.conns):
            self.stopping = True

    def _dispatch(self, planned: float, index: int | None) -> None:
        if index is None:
            index = self._rr
            self._rr = (index + 1) % len(self.conns)
        conn = self.conns[index]
        if conn.exhausted:
            self.counts.unsent += 1
            return
        if conn.transport is not None and len(conn.in_flight) < self.max_in_flight:
            if not conn.waiting and not conn.send(planned, time.perf_counter()):
                self.counts.unsent += 1
                self.exhausted(conn)
                return
            if not conn.waiting:
                conn.flush()
                return
        conn.waiting.append(planned)
        self.refill(conn)

    async def _pace(self, plan: Iterator[tuple[float, int | None]], end: float | None) -> None:
        start = self.start
        for offset, index in plan:
            planned = start + offset
            if end is not None and planned >= end:
                return
            delay = planned - time.perf_counter()
            if delay > 0.0005:
                await asyncio.sleep(delay)
            if self.stopping:
                return
            self._dispatch(planned, index)

    # -- the run -----------------------------------------------------------------------------

    async def _connect(self, index: int) -> _Conn:
        loop = asyncio.get_running_loop()
        source = self.sources[index]
        _, conn = await loop.create_connection(
            lambda: _Conn(self, source, index), self.host, self.port, ssl=self.tls
        )
        return conn

    def lost_connection(self, conn: _Conn) -> None:
        if not self.stopping and self.conns and self.conns[conn.index] is conn:
            asyncio.get_running_loop().create_task(self._reconnect(conn.index))

    async def _reconnect(self, index: int) -> None:
        while not self.stopping:
            await asyncio.sleep(_RECONNECT_S)
            try:
                conn = await self._connect(index)
            except OSError:
                continue
            old = self.conns[index]
            conn.waiting = old.waiting
            conn.exhausted = old.exhausted
            self.conns[index] = conn
            self.counts.reconnects += 1
            self.refill(conn)
            return

    async def run(self) -> Recorder:
        """Drive the target; the recorder of the measured part."""
        self.conns = [await self._connect(i) for i in range(len(self.sources))]
        if self.start_at is not None:
            await asyncio.sleep(max(0.0, self.start_at - time.time()))
        self.start = time.perf_counter()
        self.measure_from = self.start + self.warmup
        self.started = True
        end = None if self.duration is None else self.measure_from + self.duration
        for conn in self.conns:
            self.refill(conn)
        cpu0 = None if self.warmup else time.process_time()
        pacer = None
        if self.plan is not None:
            pacer = asyncio.ensure_future(self._pace(iter(self.plan), end))
        while not self.stopping:
            now = time.perf_counter()
            if cpu0 is None and now >= self.measure_from:
                cpu0 = time.process_time()
            if end is not None and now >= end:
                break
            if pacer is not None and pacer.done():
                break
            await asyncio.sleep(_TICK_S)
            self._expire(time.perf_counter() - self.timeout)
            if self.plan is None:  # timeouts free places in a closed loop
                for conn in self.conns:
                    self.refill(conn)
            self._tick()
        self.stopping = True
        stopped = time.perf_counter()
        if pacer is not None:
            pacer.cancel()
        for conn in self.conns:
            self.counts.unsent += len(conn.waiting)
            conn.waiting.clear()
        self.elapsed = max(0.0, (end if end is not None else stopped) - self.measure_from)
        if end is not None:
            self.elapsed = min(self.elapsed, stopped - self.measure_from)
        self.cpu_s = time.process_time() - (cpu0 if cpu0 is not None else time.process_time())
        drain_until = time.perf_counter() + self.timeout
        while any(c.in_flight for c in self.conns) and time.perf_counter() < drain_until:
            await asyncio.sleep(0.01)
        self._expire(float("inf"))
        for conn in self.conns:
            if conn.transport is not None:
                conn.transport.close()
        self._tick()
        return self.recorder()

    def _expire(self, deadline: float) -> None:
        for conn in self.conns:
            conn.expire(deadline)

    def _tick(self) -> None:
        self.counts.in_flight = sum(len(c.in_flight) for c in self.conns)
        if self.on_second is not None:
            self.on_second(self)

    def recorder(self) -> Recorder:
        """Everything measured so far, as a Recorder (seconds from the end of warm-up)."""
        rec = Recorder(0.0)
        for sec, acc in sorted(self.seconds.items()):
            if acc.latencies:
                by_mti: Counter[str] = Counter()
                by_rc: Counter[str] = Counter()
                for (mti, rc), n in acc.outcomes.items():
                    by_mti[mti] += n
                    by_rc[rc] += n
                rec.record_answers(sec, acc.latencies, by_mti, by_rc)
            if acc.timeouts:
                rec.record_lost(sec, acc.timeouts, TIMEOUT)
            if acc.errors:
                rec.record_lost(sec, acc.errors, ERROR)
        return rec

    def last_second(self) -> tuple[int, int | None]:
        """Answers and their p99 (µs) for the last whole second planned (progress line)."""
        if not self.seconds:
            return 0, None
        sec = int(time.perf_counter() - self.measure_from) - 1
        acc = self.seconds.get(sec)
        if acc is None or not acc.latencies:
            return 0, None
        total = sum(acc.latencies.values())
        rank, seen = total * 0.99, 0
        for latency in sorted(acc.latencies):
            seen += acc.latencies[latency]
            if seen >= rank:
                return total, latency
        return total, None


async def _exchange(
    host: str, port: int, terminal: LoadTerminal, frame: bytes, tls: ssl.SSLContext | None
) -> bytes:
    reader, writer = await asyncio.open_connection(host, port, ssl=tls)
    try:
        writer.write(frame)
        decoder = FrameDecoder(terminal.framing, 65535)
        while True:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("the host closed the connection")
            frames = decoder.feed(data)
            if frames:
                return frames[0].message
    finally:
        writer.close()


async def sign_on_all(
    host: str, port: int, terminals: Iterable[LoadTerminal], *, parallel: int = 16,
    timeout: float = 10.0, tls: ssl.SSLContext | None = None,
) -> None:  # fmt: skip
    """Sign every terminal on (ValueError naming the first that could not)."""
    gate = asyncio.Semaphore(parallel)

    async def one(terminal: LoadTerminal) -> None:
        async with gate:
            pending: SignOn = terminal.signon()
            frame = terminal.frame(terminal.encode(pending.fields, mac=False))
            try:
                message = await asyncio.wait_for(
                    _exchange(host, port, terminal, frame, tls), timeout
                )
            except (OSError, TimeoutError) as exc:
                raise ValueError(f"sign-on of {terminal.tid}: {exc or 'no answer'}") from None
            terminal.signed_on(pending, terminal.codec.decode(message))

    await asyncio.gather(*(one(t) for t in terminals))


def mix_sources(terminals: Sequence[LoadTerminal], mix: Mix, connections: int) -> list[MixSource]:
    """``connections`` sources sharing ``mix``: connection i takes terminals i, i + n, ...;
    with fewer terminals than connections, terminals have several connections."""
    if connections <= len(terminals):
        return [MixSource(terminals[i::connections], mix) for i in range(connections)]
    return [MixSource([terminals[i % len(terminals)]], mix) for i in range(connections)]
