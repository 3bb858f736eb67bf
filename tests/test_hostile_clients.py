"""Hostile clients over real loopback TCP, on asyncio and on trio (and under uvloop in a
subprocess): a frame sent a byte at a time, connections that never send, many connections from
one address, a host full of connections that never sent a valid frame, and tiny malformed frames
meant to fill the log. Timeouts are small, so every test takes a few seconds at most."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
import structlog

import acqhost.log.ratelimit
from acqhost.log.ratelimit import MAX_SOURCES, OTHER_SOURCES, SourceLimiter
from simulators.processes import free_port
from tests.hostkit import HostSetup, make_host, running, signed_on
from tests.test_crash import start_host
from tests.test_server_edges import echo_frame, read_answers, until_closed, wait_no_connections

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def connect(port: int, source: str = "127.0.0.1") -> anyio.abc.SocketStream:
    return await anyio.connect_tcp("127.0.0.1", port, local_host=source)


async def byte_a_byte(stream: anyio.abc.SocketStream, data: bytes, gap: float) -> None:
    """Send ``data`` a byte at a time until the host closes the connection."""
    try:
        for i in range(len(data)):
            await stream.send(data[i : i + 1])
            await anyio.sleep(gap)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass


async def closed_after(stream: anyio.abc.SocketStream, since: float, seconds: float = 4) -> float:
    """Seconds from ``since`` until the host closed ``stream`` (nothing else arrives)."""
    assert await until_closed(stream, seconds) == b""
    return time.monotonic() - since


def events(captured: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in captured if e["event"] == name]


# -- slow and idle connections -------------------------------------------------------------------


async def test_a_frame_sent_a_byte_at_a_time_is_cut_at_frame_timeout(tmp_path: Path) -> None:
    # Every byte comes well within read_timeout, but the frame as a whole takes longer than
    # frame_timeout: the connection is closed frame_timeout after the frame's first byte,
    # whether or not it had sent a valid frame before.
    setup = make_host(tmp_path, read_timeout=5, frame_timeout=0.6, first_frame_timeout=5)
    async with running(setup) as server:
        client = setup.client()
        for valid_first in (False, True):
            stream = await connect(setup.config.port)
            if valid_first:
                await stream.send(echo_frame(client))
                (answer,) = await read_answers(client, stream, 1)
                assert answer["39"] in ("00", "58")
            started = time.monotonic()
            async with anyio.create_task_group() as tg:
                tg.start_soon(byte_a_byte, stream, echo_frame(client), 0.05)
                elapsed = await closed_after(stream, started)
            assert 0.55 < elapsed < 1.1, elapsed
            await stream.aclose()
        await wait_no_connections(server)
        assert server.connections.closed["frame timeout"] == 2


async def test_a_silent_connection_is_cut_at_first_frame_timeout_a_signed_on_one_is_kept(
    tmp_path: Path,
) -> None:
    setup = make_host(tmp_path, read_timeout=1.5, frame_timeout=5, first_frame_timeout=0.5)
    async with running(setup) as server:
        started = time.monotonic()
        silent = await connect(setup.config.port)
        terminal = await signed_on(setup)  # a valid frame, then nothing
        signed = time.monotonic()
        assert 0.45 < await closed_after(silent, started) < 0.9
        await silent.aclose()
        assert len(server.connections.open) == 1  # the terminal's, past first_frame_timeout
        assert terminal._stream is not None
        elapsed = await closed_after(terminal._stream, signed)
        assert 1.4 < elapsed < 2.1, elapsed  # read_timeout after its last frame
        await terminal.close()
        assert server.connections.closed["first frame timeout"] == 1
        assert server.connections.closed["read timeout (idle)"] == 1


# -- connection limits ---------------------------------------------------------------------------


async def test_one_source_gets_at_most_max_connections_per_source(tmp_path: Path) -> None:
    setup = make_host(tmp_path, max_connections_per_source=3)
    async with running(setup) as server:
        client = setup.client()
        held = [await connect(setup.config.port) for _ in range(3)]
        for stream in held:
            await stream.send(echo_frame(client))
            await read_answers(client, stream, 1)
        started = time.monotonic()
        refused = await connect(setup.config.port)
        assert await closed_after(refused, started) < 0.5  # the 4th from 127.0.0.1
        await refused.aclose()
        other = await connect(setup.config.port, "127.0.0.2")  # another address is taken
        await other.send(echo_frame(client))
        await read_answers(client, other, 1)
        assert sorted(server.connections.per_source.items()) == [("127.0.0.1", 3),
                                                                   ("127.0.0.2", 1)]  # fmt: skip
        await held.pop().aclose()
        with anyio.fail_after(2):
            while server.connections.per_source["127.0.0.1"] > 2:
                await anyio.sleep(0.01)
        again = await connect(setup.config.port)  # the slot came back
        await again.send(echo_frame(client))
        assert len(await read_answers(client, again, 1)) == 1
        for stream in (*held, other, again):
            await stream.aclose()
        await wait_no_connections(server)
        assert server.connections.closed["refused (max_connections_per_source)"] == 1


async def test_at_max_connections_the_oldest_never_valid_connection_makes_room(
    tmp_path: Path,
) -> None:
    setup = make_host(tmp_path, max_connections=3)
    async with running(setup) as server:
        terminal = await signed_on(setup)  # valid: never evicted
        oldest = await connect(setup.config.port)
        await oldest.send(b"\x00\x40" + b"0200")  # part of a frame: not valid
        await anyio.sleep(0.05)
        newer = await connect(setup.config.port)
        await anyio.sleep(0.05)
        started = time.monotonic()
        late = await connect(setup.config.port)  # the host is full: the oldest goes
        assert await closed_after(oldest, started) < 0.5
        await late.send(echo_frame(terminal))  # the newcomer is served
        assert len(await read_answers(terminal, late, 1)) == 1
        later = await connect(setup.config.port)  # then the next oldest never-valid one
        assert await closed_after(newer, started) < 0.5
        await later.send(echo_frame(terminal))
        await read_answers(terminal, later, 1)
        refused = await connect(setup.config.port)  # all three sent a valid frame: refused
        assert await closed_after(refused, started) < 0.5
        assert (await terminal.sale(100)).rc == "00"
        for stream in (late, later):
            await stream.send(echo_frame(terminal))
            assert len(await read_answers(terminal, stream, 1)) == 1
            await stream.aclose()
        for stream in (oldest, newer, refused):
            await stream.aclose()
        await terminal.close()
        await wait_no_connections(server)
        closed = server.connections.closed
        assert (closed["evicted (max_connections)"], closed["refused (max_connections)"]) == (2, 1)


# -- log amplification ---------------------------------------------------------------------------


async def test_tiny_malformed_frames_are_logged_within_the_rate_then_summarised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(acqhost.log.ratelimit, "SUMMARY_SECONDS", 0.5)
    setup = make_host(tmp_path, log_rate=5)
    with structlog.testing.capture_logs() as captured:
        async with running(setup) as server:
            # 30 undecodable frames (an MTI and nothing else: answered 30) on one connection,
            # then 20 connections each with a bad length header: ~100 records unlimited.
            started = time.monotonic()
            stream = await connect(setup.config.port)
            await stream.send((b"\x00\x040200") * 30)
            await read_answers(setup.client(), stream, 30)
            await stream.aclose()
            for _ in range(20):
                bad = await connect(setup.config.port)
                await bad.send(b"\x00\x00")
                await until_closed(bad)
                await bad.aclose()
            other = await connect(setup.config.port, "127.0.0.2")  # has a bucket of its own
            await other.send(b"\x00\x00")
            await until_closed(other)
            await other.aclose()
            await wait_no_connections(server)
            with anyio.fail_after(3):
                while not events(captured, "suppressed"):
                    await anyio.sleep(0.05)

    def from_first(e: dict[str, Any]) -> bool:
        if e["event"] in ("connected", "disconnected", "framing error"):
            return bool(e["peer"].startswith("127.0.0.1:"))
        return e["event"] == "undecodable" or e.get("route") == "undecodable"

    logged = [e for e in captured if from_first(e)]
    assert {e.get("source") for e in events(captured, "undecodable")} == {"127.0.0.1"}
    # The burst, and what refilled meanwhile (5 a second).
    assert 5 <= len(logged) <= 5 + 5 * (time.monotonic() - started) + 1
    summaries = [e for e in events(captured, "suppressed") if e["source"] == "127.0.0.1"]
    # 30 x (undecodable, its message line) + 20 x (connected, framing error, disconnected) and
    # the first connection's connected and disconnected: all written or counted.
    assert sum(e["count"] for e in summaries) == 30 * 2 + 20 * 3 + 2 - len(logged)
    assert sum(e["events"].get("framing error", 0) for e in summaries) >= 15
    assert [e["peer"].rpartition(":")[0] for e in events(captured, "framing error")].count(
        "127.0.0.2"
    ) == 1


async def test_an_echo_writes_no_log_line_at_info(setup_echo: HostSetup) -> None:
    with structlog.testing.capture_logs() as captured:
        async with running(setup_echo):
            client = await signed_on(setup_echo)
            for _ in range(20):
                assert (await client.echo()).rc == "00"
            assert (await client.sale(100)).rc == "00"
            await client.close()
    routes = [e["route"] for e in events(captured, "message")]
    assert routes == ["sign_on", "sale"]


@pytest.fixture
def setup_echo(tmp_path: Path) -> HostSetup:
    return make_host(tmp_path)


# -- the same under uvloop, in a process of its own ----------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_uvloop_host_frame_and_first_frame_timeouts_and_per_source_limit(
    tmp_path: Path,
) -> None:
    setup = make_host(tmp_path, port=free_port())
    log = tmp_path / "host.log"
    proc = start_host(setup, log, "--frame-timeout", "0.6", "--first-frame-timeout", "0.4",
                      "--max-connections-per-source", "3", "--read-timeout", "5")  # fmt: skip
    try:
        terminal = await signed_on(setup)
        started = time.monotonic()
        silent = await connect(setup.config.port)
        slow = await connect(setup.config.port)
        await slow.send(echo_frame(terminal))  # valid: then a frame a byte at a time
        await read_answers(terminal, slow, 1)
        refused = await connect(setup.config.port)  # the 4th from 127.0.0.1
        assert await closed_after(refused, started) < 0.3
        async with anyio.create_task_group() as tg:
            slow_started = time.monotonic()
            tg.start_soon(byte_a_byte, slow, echo_frame(terminal), 0.05)
            assert 0.35 < await closed_after(silent, started) < 0.8
            assert 0.55 < await closed_after(slow, slow_started) < 1.1
        assert (await terminal.echo()).rc == "00"  # kept: it sent a valid frame
        for stream in (silent, slow, refused):
            await stream.aclose()
        await terminal.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    text = log.read_text()
    assert '"first frame timeout"' in text and '"frame timeout"' in text
    assert "max_connections_per_source" in text


# -- the limiter itself ----------------------------------------------------------------------------


def test_the_limiter_lets_a_burst_through_then_the_rate_per_source() -> None:
    limiter = SourceLimiter(4, now=0.0)
    assert [limiter.allow("x", "a", now=0.0) for _ in range(6)] == [True] * 4 + [False] * 2
    assert limiter.allow("x", "b", now=0.0)  # another source, another bucket
    assert limiter.allow("x", "a", now=0.25)  # one token a quarter second
    assert not limiter.allow("x", "a", now=0.25)
    assert limiter.suppressed("a") == 3
    with structlog.testing.capture_logs() as captured:
        assert limiter.summarise(now=2.0) == 3
        assert limiter.summarise(now=4.0) == 0  # said once; full buckets forgotten
    assert captured == [{"event": "suppressed", "source": "a", "count": 3, "seconds": 2.0,
                         "events": {"x": 3}, "log_level": "warning"}]  # fmt: skip
    assert not limiter._buckets
    assert all(SourceLimiter(0).allow("x", "a") for _ in range(1000))  # 0: no limit


def test_the_limiter_keeps_a_bounded_table_of_sources() -> None:
    limiter = SourceLimiter(1, now=0.0)
    for n in range(MAX_SOURCES + 50):
        limiter.allow("x", f"10.0.{n // 256}.{n % 256}", now=0.0)
    assert len(limiter._buckets) == MAX_SOURCES + 1
    assert limiter.suppressed(OTHER_SOURCES) == 49  # the sources beyond share one bucket


# -- the connection core's deadlines, without sockets ---------------------------------------------


def _core(valid: bool) -> Any:
    from acqhost.config import Config
    from acqhost.runtime.connection import ConnectionCore
    from acqhost.wire.framing import FrameEncoder

    config = Config(read_timeout=30, frame_timeout=10, first_frame_timeout=5)

    def start(message: bytes, finish: Any) -> bool:
        finish(None)
        return valid

    return ConnectionCore(config, FrameEncoder("len2", 4096), start, lambda: None, lambda: None,
                          peer="10.0.0.1:4000", now=0.0)  # fmt: skip


def test_a_frame_s_deadline_counts_from_its_first_byte_and_restarts_with_the_next_frame() -> None:
    core = _core(valid=True)
    assert core.deadline() == 5.0  # no valid frame yet
    core.received(b"\x00\x03abc\x00", now=1.0)  # a whole frame, and the next one begins
    assert (core.valid, core.frame_started, core.deadline()) == (True, 1.0, 11.0)
    for t in range(2, 11):  # a byte a second: the deadline stays
        core.received(b"\x40" if t == 2 else b"x", now=float(t))
        assert core.deadline() == 11.0
    assert not core.timed_out(10.9)
    assert core.timed_out(11.0) and core.reason == "frame timeout"
    idle = _core(valid=True)
    idle.received(b"\x00\x01a", now=1.0)
    assert (idle.frame_started, idle.deadline()) == (None, 31.0)  # read_timeout from here


def test_a_connection_without_a_valid_frame_ends_at_first_frame_timeout() -> None:
    core = _core(valid=False)
    core.received(b"\x00\x01a", now=1.0)  # a whole frame, but not a request the codec took
    assert not core.valid and core.deadline() == 5.0
    assert core.timed_out(5.0) and core.reason == "first frame timeout"
