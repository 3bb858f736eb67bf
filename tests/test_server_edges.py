"""Edges of the server's connection handling over real loopback TCP, on asyncio and on trio:
bad and partial frames among good ones, peers that reset or stop reading, backpressure and
its release, the read timeout while answers wait, shutdown and its drain, max_connections
accounting, log lines flushed before pipelined answers, and the same host under uvloop in a
subprocess (``acqhost serve``)."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sqlite3
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.abc
import anyio.to_thread
import pytest

import acqhost.runtime.connection
import acqhost.runtime.server
from acqhost.log import configure_logging
from acqhost.wire.framing import FrameDecoder
from simulators.processes import free_port
from simulators.terminal import TerminalClient, TerminalError
from tests import hostkit
from tests.hostkit import HostSetup, make_host, running, signed_on
from tests.test_crash import start_host
from tests.test_host_e2e import answers_until_closed

pytestmark = pytest.mark.anyio

# Every test on both backends, each against a host of its own.
anyio_backend = hostkit.both_backends
setup = hostkit.host_setup


def frames_of(client: TerminalClient, requests: list[dict[str, str]]) -> bytes:
    """The requests MAC'd and framed, back to back."""
    return b"".join(client._encoder.encode(client.encode(r, mac=True)) for r in requests)


def echo_frame(client: TerminalClient) -> bytes:
    t = client.now_fields()
    fields = {"t": "0800", "7": t["7"], "11": client.stan(), "41": client.tid,
              "42": client.mid, "70": "301"}  # fmt: skip
    return client._encoder.encode(client.encode(fields, mac=False))


async def connect_small(port: int, rcvbuf: int = 4096) -> anyio.abc.SocketStream:
    """A connection whose receive buffer is small, so a peer that does not read soon makes
    the host's writes wait."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    try:
        sock.connect(("127.0.0.1", port))
    except BlockingIOError:
        await anyio.wait_writable(sock)
    return await anyio.abc.SocketStream.from_socket(sock)


async def read_answers(
    client: TerminalClient, stream: anyio.abc.SocketStream, count: int, seconds: float = 10
) -> list[dict[str, str]]:
    """``count`` answers decoded, in the order they came."""
    decoder = FrameDecoder("len2")
    answers: list[dict[str, str]] = []
    with anyio.fail_after(seconds):
        while len(answers) < count:
            data = await stream.receive(65536)
            answers.extend(client.codec.decode(f.message) for f in decoder.feed(data))
    return answers


async def until_closed(stream: anyio.abc.SocketStream, seconds: float = 3) -> bytes:
    """What arrives before the host closes the connection (EOF or reset)."""
    got = b""
    with anyio.fail_after(seconds):
        while True:
            try:
                got += await stream.receive(65536)
            except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
                return got


async def wait_no_connections(server: acqhost.runtime.server.Server, seconds: float = 3) -> None:
    with anyio.fail_after(seconds):
        while server.connections.open:
            await anyio.sleep(0.01)


def stored_stans(db: str) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [s for (s,) in conn.execute("SELECT stan FROM sales ORDER BY rrn")]


# -- bad and partial frames among good ones -----------------------------------------------------


async def test_good_frames_before_a_bad_header_are_answered_in_order_then_closed(
    setup: HostSetup,
) -> None:
    async with running(setup) as server:
        client = await signed_on(setup)
        other = await signed_on(setup, "TERM0002")
        requests = [client.sale_fields(100 + i) for i in range(5)]
        stream = await anyio.connect_tcp("127.0.0.1", setup.config.port)
        await stream.send(frames_of(client, requests) + b"\x00\x00")  # then a zero length
        got = await until_closed(stream)
        answers = [client.codec.decode(f.message) for f in FrameDecoder("len2").feed(got)]
        assert [(a["11"], a["39"]) for a in answers] == [(r["11"], "00") for r in requests]
        await stream.aclose()
        assert (await other.sale(100)).rc == "00"  # only that connection was closed
        await client.close()
        await other.close()
        await wait_no_connections(server)


async def test_a_partial_frame_at_end_of_stream_still_gets_the_earlier_answers(
    setup: HostSetup,
) -> None:
    async with running(setup) as server:
        client = await signed_on(setup)
        requests = [client.sale_fields(200 + i) for i in range(5)]
        stream = await anyio.connect_tcp("127.0.0.1", setup.config.port)
        await stream.send(frames_of(client, requests) + b"\x00\x40" + b"0200")
        await stream.send_eof()
        got = await until_closed(stream)
        answers = [client.codec.decode(f.message) for f in FrameDecoder("len2").feed(got)]
        assert [(a["11"], a["39"]) for a in answers] == [(r["11"], "00") for r in requests]
        await stream.aclose()
        await client.close()
        await wait_no_connections(server)


# -- peers that reset, or stop reading ---------------------------------------------------------


async def test_peers_that_reset_mid_answer_free_their_connection_slots(tmp_path: Path) -> None:
    setup = make_host(tmp_path, max_connections=3)
    async with running(setup) as server:
        client = await signed_on(setup)
        keys = client.keys
        await client.close()
        for _ in range(12):  # more peers than max_connections, one after another
            rude = setup.client()
            rude.keys = keys
            await rude.connect()
            await rude.send_pipelined([rude.sale_fields(100) for _ in range(60)])
            assert rude._stream is not None
            raw = rude._stream.extra(anyio.abc.SocketAttribute.raw_socket)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await anyio.sleep(0.005)
            await rude._stream.aclose()
        await wait_no_connections(server)
        clients = []
        for tid in ("TERM0001", "TERM0001", "TERM0002"):  # max_connections at once
            c = setup.client(tid)
            c.keys = keys if tid == "TERM0001" else None
            await c.connect()
            clients.append(c)
        for c in clients:
            assert (await c.echo()).rc == "00"
        assert (await clients[0].sale(100)).rc == "00"
        for c in clients:
            await c.close()
        await wait_no_connections(server)
    stans = stored_stans(setup.config.db)
    assert len(stans) == len(set(stans))  # nothing applied twice


async def test_a_peer_that_stops_reading_blocks_neither_others_nor_itself_once_it_reads(
    setup: HostSetup,
) -> None:
    # More sales than may be in flight, from a peer with a small receive buffer that does
    # not read for a while: the host stops reading from it (MAX_IN_FLIGHT answers queued),
    # serves another terminal meanwhile, and when the peer reads, sends every answer in
    # order and reads on.
    async with running(setup):
        client = await signed_on(setup)
        requests = [client.sale_fields(100 + i % 500) for i in range(1000)]
        data = frames_of(client, requests)
        other = await signed_on(setup, "TERM0002")
        stream = await connect_small(setup.config.port)
        async with anyio.create_task_group() as tg:  # its send may wait for the host
            tg.start_soon(stream.send, data)
            for _ in range(6):  # 0.9 s without reading
                with anyio.fail_after(2):
                    assert (await other.sale(100)).rc == "00"
                await anyio.sleep(0.15)
        answers = await read_answers(client, stream, len(requests))
        assert [(a["11"], a["39"]) for a in answers] == [(r["11"], "00") for r in requests]
        await stream.send(echo_frame(client))
        (answer,) = await read_answers(client, stream, 1, seconds=2)
        assert answer["39"] == "00"
        await stream.aclose()
        await client.close()
        await other.close()


async def test_a_drain_that_times_out_closes_the_waiting_connection_and_still_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Shutdown while a connection's sales wait for the ledger (SQLite's write lock held by
    # another connection) longer than the drain time: the connection is closed without its
    # answers after the drain time, the host returns once the ledger has finished, the
    # sales are each committed once, and answers that become ready after the close go
    # nowhere (no write after close, no error).
    monkeypatch.setattr(acqhost.runtime.server, "DRAIN_SECONDS", 0.4)
    setup = make_host(tmp_path)
    async with running(setup) as server:
        client = await signed_on(setup)
        requests = [client.sale_fields(800 + i) for i in range(20)]
        blocker = sqlite3.connect(setup.config.db, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        await client.send_pipelined(requests)
        await anyio.sleep(0.2)
        started = time.monotonic()
        server.shutdown()
        assert client._stream is not None
        assert await until_closed(client._stream, 3) == b""  # no answer was ready
        closed = time.monotonic() - started
        blocker.execute("ROLLBACK")
        blocker.close()
        await client.close()
    assert 0.3 < closed < 1.5
    assert sorted(stored_stans(setup.config.db)) == sorted(r["11"] for r in requests)


# -- the read timeout while answers wait -------------------------------------------------------


async def test_waiting_for_a_locked_ledger_is_not_idle_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reading stops at MAX_IN_FLIGHT queued answers; while they wait for the ledger (here
    # SQLite's write lock, held by another connection for three read timeouts) the
    # connection is not idle: every answer comes, in order, and the connection reads on.
    monkeypatch.setattr(acqhost.runtime.connection, "MAX_IN_FLIGHT", 4)
    setup = make_host(tmp_path, read_timeout=0.3)
    async with running(setup):
        client = await signed_on(setup)
        requests = [client.sale_fields(300 + i) for i in range(8)]
        blocker = sqlite3.connect(setup.config.db, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            await client.send_pipelined(requests)
            await anyio.sleep(1.0)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        for request in requests:
            response = client.codec.decode(await client.receive_raw())
            assert (response["11"], response["39"]) == (request["11"], "00")
        assert (await client.echo()).rc == "00"
        await client.close()


async def test_answers_pending_at_a_read_timeout_are_still_sent_before_the_close(
    tmp_path: Path,
) -> None:
    setup = make_host(tmp_path, read_timeout=0.3)
    async with running(setup) as server:
        client = await signed_on(setup)
        requests = [client.sale_fields(400 + i) for i in range(3)]
        blocker = sqlite3.connect(setup.config.db, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            await client.send_pipelined(requests)
            await anyio.sleep(0.8)  # the read timeout passes while the sales wait
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        for request in requests:
            response = client.codec.decode(await client.receive_raw())
            assert (response["11"], response["39"]) == (request["11"], "00")
        with pytest.raises(TerminalError):
            await client.receive_raw()
        await client.close()
        await wait_no_connections(server)
    assert sorted(stored_stans(setup.config.db)) == sorted(r["11"] for r in requests)


# -- shutdown ----------------------------------------------------------------------------------


async def test_shutdown_after_the_peer_half_closed_answers_what_was_read(
    setup: HostSetup,
) -> None:
    async with running(setup) as server:
        client = await signed_on(setup)
        requests = [client.sale_fields(500 + i) for i in range(30)]
        await client.send_pipelined(requests)
        assert client._stream is not None
        await client._stream.send_eof()
        answered = [client.codec.decode(await client.receive_raw())]
        server.shutdown()
        answered += await answers_until_closed(client)
        await client.close()
    assert [a["11"] for a in answered] == [r["11"] for r in requests]  # all had been read
    assert {a["39"] for a in answered} == {"00"}


async def test_connections_refused_at_the_maximum_do_not_count_against_it(
    tmp_path: Path,
) -> None:
    setup = make_host(tmp_path, max_connections=1)
    async with running(setup) as server:
        first = await signed_on(setup)
        for _ in range(5):
            extra = await anyio.connect_tcp("127.0.0.1", setup.config.port)
            await until_closed(extra)
            await extra.aclose()
        assert (await first.sale(100)).rc == "00"
        await first.close()
        await wait_no_connections(server)
        again = await signed_on(setup, "TERM0002")  # the one slot is free again
        assert (await again.echo()).rc == "00"
        await again.close()


# -- log lines ---------------------------------------------------------------------------------


async def test_every_pipelined_answer_leaves_after_its_log_line_is_in_the_file(
    setup: HostSetup, tmp_path: Path, json_logs: object
) -> None:
    path = tmp_path / "host.log"
    with path.open("w", encoding="utf-8") as log_stream:
        configure_logging("info", log_stream)
        async with running(setup):
            client = await signed_on(setup)
            requests = [client.sale_fields(600 + i) for i in range(30)]
            await client.send_pipelined(requests)
            for request in requests:
                response = client.codec.decode(await client.receive_raw())
                assert response["39"] == "00"
                logged = {
                    e.get("stan")
                    for e in map(json.loads, path.read_text().splitlines())
                    if e.get("event") == "message"
                }
                assert request["11"] in logged
            await client.close()


# -- answers the framing cannot carry ----------------------------------------------------------


def _sign_on_request_size(setup: HostSetup) -> int:
    client = setup.client()
    t = client.now_fields()
    fields = {"t": "0800", "7": t["7"], "11": "000001", "41": client.tid, "42": client.mid,
              "48": "KX064" + "0" * 64 + "SG128" + "0" * 128, "70": "001"}  # fmt: skip
    return len(client.encode(fields, mac=False))


async def test_an_answer_too_long_for_the_framing_closes_the_connection(tmp_path: Path) -> None:
    # A sign-on's answer is two bytes longer than its request (field 39). With max_frame
    # between the two, the answer cannot be framed: the host must not leave the terminal
    # waiting on an open connection for an answer that will never come.
    (tmp_path / "probe").mkdir()
    size = _sign_on_request_size(make_host(tmp_path / "probe"))
    setup = make_host(tmp_path, max_frame=size + 1)
    async with running(setup) as server:
        client = setup.client()
        await client.connect()
        with pytest.raises(TerminalError):  # closed, not timed out (TimeoutError)
            client.timeout = 3
            await client.sign_on()
        await client.close()
        await wait_no_connections(server)


# -- the same host under uvloop, in a process of its own ---------------------------------------


@pytest.fixture
def subprocess_host(tmp_path: Path) -> Iterator[tuple[HostSetup, object]]:
    setup = make_host(tmp_path, port=free_port())
    proc = start_host(setup, tmp_path / "host.log")
    try:
        yield setup, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_uvloop_host_answers_more_than_in_flight_then_end_of_stream_in_order(
    subprocess_host: tuple[HostSetup, object],
) -> None:
    setup, _ = subprocess_host
    client = await signed_on(setup)
    stream = await connect_small(setup.config.port)
    requests = [client.sale_fields(100 + i % 500) for i in range(1000)]
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream.send, frames_of(client, requests))
        await anyio.sleep(0.3)  # not reading meanwhile: pause_writing, then resume_writing
    await stream.send_eof()
    answers = await read_answers(client, stream, len(requests))
    assert [(a["11"], a["39"]) for a in answers] == [(r["11"], "00") for r in requests]
    assert await until_closed(stream) == b""
    await stream.aclose()
    await client.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_uvloop_host_bad_frame_after_good_ones_and_peer_resets(
    subprocess_host: tuple[HostSetup, object],
) -> None:
    setup, _ = subprocess_host
    client = await signed_on(setup)
    for _ in range(5):
        rude = await anyio.connect_tcp("127.0.0.1", setup.config.port)
        await rude.send(frames_of(client, [client.sale_fields(100) for _ in range(50)]))
        raw = rude.extra(anyio.abc.SocketAttribute.raw_socket)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await rude.aclose()
    requests = [client.sale_fields(700 + i) for i in range(5)]
    stream = await anyio.connect_tcp("127.0.0.1", setup.config.port)
    await stream.send(frames_of(client, requests) + b"\xff\xff")
    got = await until_closed(stream)
    answers = [client.codec.decode(f.message) for f in FrameDecoder("len2").feed(got)]
    assert [(a["11"], a["39"]) for a in answers] == [(r["11"], "00") for r in requests]
    await stream.aclose()
    assert (await client.sale(100)).rc == "00"
    await client.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_uvloop_host_on_sigterm_answers_what_it_read_and_exits_cleanly(
    tmp_path: Path,
) -> None:
    setup = make_host(tmp_path, port=free_port())
    proc = start_host(setup, tmp_path / "host.log")
    try:
        client = await signed_on(setup)
        requests = [client.sale_fields(100 + i % 500) for i in range(300)]
        await client.send_pipelined(requests)
        answered = [client.codec.decode(await client.receive_raw())]
        proc.send_signal(signal.SIGTERM)
        answered += await answers_until_closed(client)
        await client.close()
        assert proc.wait(timeout=5) == 0
    finally:
        proc.kill()
        proc.wait()
    assert [a["11"] for a in answered] == [r["11"] for r in requests[: len(answered)]]
    assert {a["39"] for a in answered} == {"00"}
    with sqlite3.connect(setup.config.db) as db:
        stored = {f"{r:012d}" for (r,) in db.execute("SELECT rrn FROM sales")}
    assert stored == {a["37"] for a in answered}


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_uvloop_host_read_timeout_and_max_connections(tmp_path: Path) -> None:
    setup = make_host(tmp_path, port=free_port())
    proc = start_host(setup, tmp_path / "host.log", "--read-timeout", "0.4",
                      "--max-connections", "2")  # fmt: skip
    try:
        busy = await signed_on(setup)
        stalled = await anyio.connect_tcp("127.0.0.1", setup.config.port)
        await stalled.send(b"\x00\x40" + b"0200")  # half a frame, then silence
        started = time.monotonic()
        for _ in range(6):  # 1.2 s, never idle for a read timeout
            await anyio.sleep(0.2)
            assert (await busy.echo()).rc == "00"
        assert await until_closed(stalled) == b""
        assert 0.3 < time.monotonic() - started < 1.3
        await stalled.aclose()
        second = await signed_on(setup, "TERM0002")  # the stalled one's slot is free
        refused = await anyio.connect_tcp("127.0.0.1", setup.config.port)
        assert await until_closed(refused) == b""  # two are open: refused
        await refused.aclose()
        assert (await second.echo()).rc == "00" and (await busy.echo()).rc == "00"
        await second.close()
        await busy.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_uvloop_host_closes_a_connection_whose_answer_is_too_long(tmp_path: Path) -> None:
    (tmp_path / "probe").mkdir()
    size = _sign_on_request_size(make_host(tmp_path / "probe"))
    setup = make_host(tmp_path, port=free_port())
    log = tmp_path / "host.log"
    proc = start_host(setup, log, "--max-frame", str(size + 1))
    try:
        client = setup.client()
        client.timeout = 3
        await client.connect()
        with pytest.raises(TerminalError):  # closed, not timed out (TimeoutError)
            await client.sign_on()
        await client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    assert "Exception in callback" not in log.read_text()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_no_read_timer_outlives_its_connection(tmp_path: Path) -> None:
    # Every way a connection ends -- end of stream, a bad frame, a stall past the read
    # timeout, a reset, a refusal at max_connections, shutdown -- leaves no timer behind.
    def live_timers() -> int:
        scheduled: list[asyncio.TimerHandle] = asyncio.get_running_loop()._scheduled  # type: ignore[attr-defined]
        return len([h for h in scheduled if not h.cancelled() and "_check_timeout" in repr(h)])

    setup = make_host(tmp_path, read_timeout=0.3, max_connections=4)
    async with running(setup) as server:
        client = await signed_on(setup)
        ended = await anyio.connect_tcp("127.0.0.1", setup.config.port)
        await ended.send_eof()
        bad = await anyio.connect_tcp("127.0.0.1", setup.config.port)
        await bad.send(b"\x00\x00")
        stalled = await anyio.connect_tcp("127.0.0.1", setup.config.port)
        await stalled.send(b"\x00\x40" + b"0200")
        reset = await anyio.connect_tcp("127.0.0.1", setup.config.port)
        raw = reset.extra(anyio.abc.SocketAttribute.raw_socket)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await reset.aclose()
        for stream in (ended, bad, stalled):
            await until_closed(stream)
            await stream.aclose()
        await client.close()
        await wait_no_connections(server)
        assert live_timers() == 0
        held = [await anyio.connect_tcp("127.0.0.1", setup.config.port) for _ in range(4)]
        for stream in held:  # a valid frame each: none of them may be evicted
            await stream.send(echo_frame(client))
            await read_answers(client, stream, 1)
        refused = await anyio.connect_tcp("127.0.0.1", setup.config.port)
        await until_closed(refused)
        await refused.aclose()
        assert live_timers() == len(server.connections.open) == 4
        server.shutdown()
        for stream in held:
            await until_closed(stream)
            await stream.aclose()
        await wait_no_connections(server)
        assert live_timers() == 0


async def _fail_a_host(
    setup: HostSetup,
) -> tuple[TerminalClient, int, acqhost.runtime.server.Server]:
    """A host whose service fails (so run() raises), with a connection open at the time."""
    from acqhost.runtime.app import build_server, close_stores

    failed = anyio.Event()

    async def failing(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        task_status.started()
        await failed.wait()
        raise RuntimeError("service failed")

    server = build_server(setup.config)
    server.services.append(failing)
    with pytest.raises(BaseExceptionGroup):
        async with anyio.create_task_group() as tg:
            port = await tg.start(lambda task_status: server.run(
                handle_signals=False, task_status=task_status))  # fmt: skip
            setup.with_port(port)
            client = await signed_on(setup)
            failed.set()
    close_stores(server)
    return client, port, server


async def test_a_host_that_fails_closes_its_connections(setup: HostSetup) -> None:
    # On trio the connections are tasks of run()'s task group and end with it; on asyncio
    # they are the loop's protocols and must be closed explicitly.
    client, _, server = await _fail_a_host(setup)
    with anyio.fail_after(2), pytest.raises((TerminalError, anyio.BrokenResourceError)):
        await client.echo()
    await client.close()
    assert not server.connections.open


async def test_a_host_that_fails_stops_listening(setup: HostSetup) -> None:
    client, port, _ = await _fail_a_host(setup)
    await client.close()
    with pytest.raises(OSError):
        late = await anyio.connect_tcp("127.0.0.1", port)
        await late.aclose()
