"""Edges of the server's write timeout over real loopback TCP, on asyncio (the stdlib loop
and uvloop) and on trio: a peer that stops reading is closed, one that reads slowly is not,
and no timer outlives its connection."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import time
from functools import partial
from pathlib import Path

import anyio
import anyio.abc
import anyio.to_thread
import pytest

import acqhost.runtime.server
from acqhost.runtime.asyncio_driver import AsyncioConnection
from acqhost.runtime.connection import WRITE_TIMEOUT
from acqhost.runtime.stream_driver import StreamConnection
from acqhost.wire.framing import FrameDecoder
from tests.hostkit import make_host, running
from tests.test_server_edges import connect_small, echo_frame, wait_no_connections

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> object:
    return request.param


UVLOOP = pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop")


def disconnect_reasons(json_logs: io.StringIO) -> list[str]:
    ends = [json.loads(line) for line in json_logs.getvalue().splitlines()]
    return [e["reason"] for e in ends if e["event"] == "disconnected"]


def unsent_in_host(server: acqhost.runtime.server.Server) -> int | None:
    """Bytes the host has written but the kernel did not take (asyncio's transport buffer);
    None on the stream path, where a send that does not fit waits instead."""
    for conn in server.connections.open:
        if isinstance(conn, AsyncioConnection) and conn.transport is not None:
            return conn.transport.get_write_buffer_size()
    return None


Connection = StreamConnection | AsyncioConnection


async def only_connection(server: acqhost.runtime.server.Server) -> Connection:
    """The host's one connection, once it has it."""
    with anyio.fail_after(2):
        while not server.connections.open:
            await anyio.sleep(0.01)
    (conn,) = server.connections.open
    return conn


def small_send_buffer(conn: Connection) -> None:
    """The host's kernel send buffer for ``conn`` made small, so a few thousand answers
    fill it."""
    if isinstance(conn, AsyncioConnection):
        assert conn.transport is not None
        sock: socket.socket = conn.transport.get_extra_info("socket")
    else:
        sock = conn.stream.extra(anyio.abc.SocketAttribute.raw_socket)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


def non_reading_peer(port: int) -> socket.socket:
    """A plain socket with a small receive buffer, connected: it reads only when asked (an
    asyncio transport would read on its own)."""
    peer = socket.socket()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    peer.connect(("127.0.0.1", port))
    return peer


# -- the write timeout -------------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio", UVLOOP, "trio"])
async def test_a_peer_that_stops_reading_with_a_little_unsent_is_still_closed(
    tmp_path: Path, json_logs: io.StringIO
) -> None:
    # A peer sends some requests, never reads, and goes quiet while keeping its socket open:
    # its answers fill both kernel buffers and a little (far below the high-water mark, so
    # pause_writing is never called) stays in the host's own buffer. A close "after what is
    # buffered has been written" would never come: the write timeout counts from the last
    # byte taken, however little is waiting, and closes it. On trio the stream path closes
    # it (the send waits, its deadline passes).
    setup = make_host(tmp_path, read_timeout=0.3)
    async with running(setup) as server:
        client = setup.client()
        peer = non_reading_peer(setup.config.port)
        try:
            small_send_buffer(await only_connection(server))
            with anyio.fail_after(5):
                for n in range(100):  # ten echoes at a time until some stay in the host
                    with contextlib.suppress(OSError):  # trio may have closed it already
                        peer.sendall(b"".join(echo_frame(client) for _ in range(10)))
                    await anyio.sleep(0.02)
                    unsent = unsent_in_host(server)
                    if unsent or (unsent is None and n >= 40):
                        break
            if unsent is not None:
                (conn,) = server.connections.open
                assert isinstance(conn, AsyncioConnection)
                assert conn.transport is not None
                _, high = conn.transport.get_write_buffer_limits()
                assert 0 < unsent < high and not conn.write_paused
            # Well past the read timeout, and the write timeout after it.
            await wait_no_connections(server, seconds=2.0)
        finally:
            peer.close()
    assert disconnect_reasons(json_logs)[0] in (WRITE_TIMEOUT, "read timeout (idle)")


@pytest.mark.parametrize("anyio_backend", ["asyncio", UVLOOP, "trio"])
async def test_a_peer_that_reads_slowly_but_steadily_is_not_cut(
    tmp_path: Path, json_logs: io.StringIO
) -> None:
    # "Once no answer has left for read_timeout, the connection is closed": here answers leave
    # every 20 ms (800 bytes, a dozen echo answers, at a time), so it must not be cut. asyncio
    # restarts the clock whenever the transport has passed bytes on; trio times each send of
    # at most SEND_CHUNK bytes, not one send of every ready answer joined.
    setup = make_host(tmp_path, read_timeout=0.2)
    async with running(setup) as server:
        client = setup.client()
        stream = await connect_small(setup.config.port)
        small_send_buffer(await only_connection(server))
        count = 1500
        data = b"".join(echo_frame(client) for _ in range(count))
        decoder = FrameDecoder("len2")
        answers = 0
        longest_gap = 0.0
        async with anyio.create_task_group() as tg:

            async def send() -> None:
                with contextlib.suppress(anyio.BrokenResourceError, OSError):
                    await stream.send(data)

            tg.start_soon(send)
            last = time.monotonic()
            with anyio.fail_after(8):
                while answers < count:
                    try:
                        got = await stream.receive(800)
                    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                        break
                    now = time.monotonic()
                    longest_gap, last = max(longest_gap, now - last), now
                    answers += len(decoder.feed(got))
                    await anyio.sleep(0.02)
            tg.cancel_scope.cancel()
        await stream.aclose()
        await wait_no_connections(server)
    reasons = disconnect_reasons(json_logs)
    assert longest_gap < 0.15  # something left at least every 150 ms
    assert answers == count and WRITE_TIMEOUT not in reasons, reasons


@pytest.mark.parametrize("anyio_backend", ["asyncio", UVLOOP])
async def test_the_timer_of_a_connection_ends_with_it(
    tmp_path: Path,
) -> None:
    # After a close by the peer, a read timeout and a write timeout, the connection's timer is
    # cancelled and not re-armed: nothing of a gone connection stays on the loop's timers.
    setup = make_host(tmp_path, read_timeout=0.2)
    async with running(setup) as server:
        client = setup.client()
        gone: list[AsyncioConnection] = []

        async def the_connection() -> AsyncioConnection:
            conn = await only_connection(server)
            assert isinstance(conn, AsyncioConnection)
            return conn

        stream = await anyio.connect_tcp("127.0.0.1", setup.config.port)  # closed by the peer
        gone.append(await the_connection())
        await stream.send(echo_frame(client))
        await stream.receive()
        await stream.aclose()
        await wait_no_connections(server)
        stream = await anyio.connect_tcp("127.0.0.1", setup.config.port)  # read timeout
        gone.append(await the_connection())
        await wait_no_connections(server)
        await stream.aclose()
        peer = non_reading_peer(setup.config.port)  # write timeout
        try:
            gone.append(await the_connection())
            small_send_buffer(gone[-1])
            data = b"".join(echo_frame(client) for _ in range(3000))
            peer.setblocking(False)
            with anyio.fail_after(3):
                while server.connections.open:
                    with contextlib.suppress(BlockingIOError, OSError):
                        data = data[peer.send(data) :]
                    await anyio.sleep(0.01)
        finally:
            peer.close()
        await anyio.sleep(0.5)  # past the timers' due times
        assert [c.core.reason for c in gone if c.core] == [
            "closed by peer",
            "read timeout (idle)",
            WRITE_TIMEOUT,
        ]
        for conn in gone:
            assert conn.transport is None and conn.timer is not None
            assert conn.timer.cancelled()


async def test_a_peer_that_sends_and_never_reads_is_closed_after_the_timeout(
    tmp_path: Path, json_logs: io.StringIO
) -> None:
    # Without a write timeout such a peer would hold its connection, and every answer the
    # host has for it, for ever: once no answer has left for read_timeout, the host closes it.
    # The peer is a plain socket (an asyncio transport would read on its own) with small
    # buffers at both ends, so that a few thousand answers fill them.
    setup = make_host(tmp_path, read_timeout=0.5)
    async with running(setup) as server:
        client = setup.client()
        peer = non_reading_peer(setup.config.port)
        small_send_buffer(await only_connection(server))
        data = b"".join(echo_frame(client) for _ in range(5_000))

        def send_all() -> None:  # returns when the host closes, if not before
            with contextlib.suppress(OSError):
                peer.sendall(data)

        started = time.monotonic()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(partial(anyio.to_thread.run_sync, send_all, abandon_on_cancel=True))
                with anyio.fail_after(10):
                    while WRITE_TIMEOUT not in json_logs.getvalue():
                        await anyio.sleep(0.05)
            assert time.monotonic() - started > 0.5
            await wait_no_connections(server)
        finally:
            peer.close()
    assert disconnect_reasons(json_logs) == [WRITE_TIMEOUT]
