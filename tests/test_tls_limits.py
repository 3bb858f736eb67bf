"""A TLS handshake is a connection like any other ([tls], loopback, certificates by trustme):
it counts towards ``max_connections`` and ``max_connections_per_source`` from the moment TCP
connects, must be done by ``first_frame_timeout`` (not ``read_timeout``), is evicted first to
make room for a terminal, and every handshake that fails is counted for /metrics by kind; a
ClientHello that arrives with the connection is not lost; a wiretap sees the card number
without TLS and not with it. On asyncio, uvloop and trio."""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import pytest

from acqhost.runtime.server import Server
from simulators.terminal import TEST_PAN, TerminalClient, tls_client_context
from tests.hostkit import HostSetup, make_host, running
from tests.test_ops_metrics import scrape, value, with_metrics
from tests.test_tls import Pki, anyio_backend, pki, tls_host

__all__ = ("anyio_backend", "pki")  # the fixtures, used by name

pytestmark = pytest.mark.anyio


def limited_tls_host(tmp_path: Path, pki: Pki, **settings: Any) -> HostSetup:
    setup = with_metrics(tls_host(tmp_path, pki))
    setup.config = dataclasses.replace(setup.config, **settings)
    return setup


async def raw_tcp(setup: HostSetup) -> anyio.abc.SocketStream:
    return await anyio.connect_tcp("127.0.0.1", setup.config.port)


async def open_count(server: Server, count: int) -> None:
    """Wait (at most 2 s) until the server has ``count`` connections open."""
    with anyio.fail_after(2):
        while len(server.connections.open) != count:
            await anyio.sleep(0.01)


async def closed_by_host(stream: anyio.abc.SocketStream, within: float) -> float:
    """Seconds until the host closes ``stream`` (which sends nothing); fails after ``within``."""
    started = time.monotonic()
    with anyio.fail_after(within):
        try:
            while await stream.receive():
                pass
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            pass
    return time.monotonic() - started


async def test_a_silent_tls_client_holds_a_slot_until_first_frame_timeout_and_is_counted(
    tmp_path: Path, pki: Pki
) -> None:
    setup = limited_tls_host(tmp_path, pki, read_timeout=10.0, first_frame_timeout=0.5)
    async with running(setup) as server:
        silent = await raw_tcp(setup)
        await open_count(server, 1)  # the handshake holds a slot: it is limited like others
        assert len(server.connections.unproven) == 1
        waited = await closed_by_host(silent, within=3)  # read_timeout is 10 s
        assert 0.3 < waited < 3
        await silent.aclose()
        await open_count(server, 0)
        connections = server.connections
        assert connections.handshakes_failed == {"timeout": 1}
        assert connections.closed["tls handshake timeout"] == 1
        samples = await scrape(server)
        assert value(samples, "acqhost_tls_handshakes_failed_total", kind="timeout") == 1
        client = setup.client(tls=tls_client_context(pki.ca))
        async with client:  # terminals are still served
            assert (await client.sign_on()).rc == "00"


async def test_at_max_connections_a_handshake_in_progress_is_evicted_for_a_terminal(
    tmp_path: Path, pki: Pki
) -> None:
    setup = limited_tls_host(
        tmp_path, pki, max_connections=2, read_timeout=10.0, first_frame_timeout=8.0
    )
    async with running(setup) as server:
        first, second = await raw_tcp(setup), await raw_tcp(setup)
        await open_count(server, 2)
        client = setup.client(tls=tls_client_context(pki.ca), timeout=5)
        async with client:
            assert (await client.sign_on()).rc == "00"
            assert await closed_by_host(first, within=3) < 3  # the oldest never-valid one
            assert (await client.sale(100)).rc == "00"
            assert len(server.connections.open) == 2  # the terminal's and the second's
        closed = server.connections.closed
        assert (closed["evicted (max_connections)"], closed["refused (max_connections)"]) == (1, 0)
        for stream in (first, second):
            await stream.aclose()


async def test_a_shutdown_does_not_wait_for_a_handshake_in_progress(
    tmp_path: Path, pki: Pki
) -> None:
    setup = limited_tls_host(tmp_path, pki, read_timeout=20.0, first_frame_timeout=16.0)
    async with running(setup) as server:
        silent = await raw_tcp(setup)
        await open_count(server, 1)
        started = time.monotonic()
        server.shutdown()
        assert await closed_by_host(silent, within=6) < 6  # not first_frame_timeout's 16 s
        await open_count(server, 0)
    assert time.monotonic() - started < 6
    assert server.connections.handshakes_failed == {}  # a shutdown, not a failed handshake
    await silent.aclose()


async def test_handshakes_count_towards_max_connections_per_source(
    tmp_path: Path, pki: Pki
) -> None:
    setup = limited_tls_host(tmp_path, pki, max_connections_per_source=2, first_frame_timeout=8.0)
    async with running(setup) as server:
        held = [await raw_tcp(setup), await raw_tcp(setup)]
        await open_count(server, 2)
        third = await raw_tcp(setup)
        assert await closed_by_host(third, within=3) < 3
        assert server.connections.refused == {"max_connections_per_source": 1}
        assert len(server.connections.open) == 2
        for stream in (*held, third):
            await stream.aclose()


async def test_a_client_that_does_not_speak_tls_or_leaves_mid_handshake_is_counted(
    tmp_path: Path, pki: Pki
) -> None:
    setup = limited_tls_host(tmp_path, pki, first_frame_timeout=5.0)
    async with running(setup) as server:
        plain = await raw_tcp(setup)
        await plain.send(b"\x00\x2e0800" + b"\x00" * 44)  # a plain ISO 8583 frame
        assert await closed_by_host(plain, within=3) < 3
        await plain.aclose()
        leaving = await raw_tcp(setup)
        await open_count(server, 1)
        await leaving.aclose()
        await open_count(server, 0)
        assert server.connections.handshakes_failed == {"error": 1, "closed": 1}
        samples = await scrape(server)
        assert value(samples, "acqhost_tls_handshakes_failed_total", kind="error") == 1
        assert value(samples, "acqhost_tls_handshakes_failed_total", kind="closed") == 1


def echo_at_once(port: int, ca: str, client: TerminalClient) -> str:
    """A blocking client whose ClientHello leaves the moment TCP connects (so it is read
    before the host's TLS takes over the connection, as uvloop does): an echo test's field
    39 over TLS."""
    context = tls_client_context(ca)
    assert context is not None
    message = client.codec.encode(client.network_fields("301"))
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    with sock, context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        tls.sendall(len(message).to_bytes(2, "big") + message)
        size = int.from_bytes(_exactly(tls, 2), "big")
        return client.codec.decode(_exactly(tls, size))["39"]


def _exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "closed by the host"
        data += chunk
    return data


async def test_a_client_hello_sent_with_the_connection_is_not_lost(
    tmp_path: Path, pki: Pki
) -> None:
    setup = limited_tls_host(tmp_path, pki)
    async with running(setup) as server:
        client = setup.client()
        for _ in range(5):
            code = await anyio.to_thread.run_sync(echo_at_once, setup.config.port, pki.ca, client)
            assert code == "00"
        assert server.connections.handshakes_failed == {}


@asynccontextmanager
async def wiretap(port: int) -> AsyncIterator[tuple[int, list[bytes]]]:
    """A relay on loopback to ``port`` that records every byte it passes, both ways: (its
    port, what it saw)."""
    seen: list[bytes] = []

    async def pump(source: anyio.abc.SocketStream, sink: anyio.abc.SocketStream) -> None:
        try:
            async for chunk in source:
                seen.append(chunk)
                await sink.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        with suppress(Exception):
            await sink.send_eof()

    async def relay(client: anyio.abc.SocketStream) -> None:
        upstream = await anyio.connect_tcp("127.0.0.1", port)
        async with client, upstream, anyio.create_task_group() as tg:
            tg.start_soon(pump, client, upstream)
            tg.start_soon(pump, upstream, client)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, relay)
        yield listener.extra(anyio.abc.SocketAttribute.local_port), seen
        tg.cancel_scope.cancel()


async def test_the_wire_carries_the_card_number_in_clear_without_tls_and_not_with_it(
    tmp_path: Path, pki: Pki
) -> None:
    for tls in (False, True):
        folder = tmp_path / ("tls" if tls else "plain")
        folder.mkdir()
        setup = tls_host(folder, pki) if tls else make_host(folder)
        async with running(setup), wiretap(setup.config.port) as (port, seen):
            context = tls_client_context(pki.ca) if tls else None
            async with setup.client(port=port, tls=context, timeout=5) as client:
                assert (await client.sign_on()).rc == "00"
                assert (await client.sale(100)).rc == "00"
        wire = b"".join(seen)
        assert len(wire) > 200
        # PROTOCOL.md encrypts only the operator password: without [tls] a wiretap reads the
        # card number (SECURITY.md, "What is not defended").
        assert (TEST_PAN.encode() in wire) is not tls
