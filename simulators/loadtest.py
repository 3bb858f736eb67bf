"""Load tester: many connections of MAC'd sales against a host, closed-loop or paced.

It signs each terminal on first, builds every frame before the clock starts, then drives the
target with asyncio protocols (uvloop when installed) so that the generator costs as little as
possible. Closed loop (``--depth``): each connection keeps that many requests in flight, which
finds the maximum rate. Paced (``--rate``): requests leave on a fixed schedule whatever the
answers do, and latency counts from the scheduled time, so a slow host cannot hide queueing.

Loopback only: the target is always 127.0.0.1. Results are one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import anyio

from acqhost.wire.framing import FrameDecoder, FrameEncoder
from simulators.terminal import TerminalClient

__all__ = ("main",)


async def _sign_on(key_file: dict[str, Any], port: int) -> TerminalClient:
    client = TerminalClient(key_file, host="127.0.0.1", port=port)
    async with client:
        ex = await client.sign_on()
        if ex.rc != "00":
            raise SystemExit(f"sign-on of {client.tid} answered {ex.rc}")
    return client


def build_frames(
    clients: list[TerminalClient], total: int, mac: bool, offset: int = 0
) -> list[bytes]:
    """``total`` distinct sales, round-robin over the terminals; STAN and local date vary so
    that no two share the duplicate key."""
    encoder = FrameEncoder("len2")
    frames = []
    for i in range(total):
        client = clients[i % len(clients)]
        n = i // len(clients) + offset
        fields = client.sale_fields(100 + n % 900, stan=f"{n % 1_000_000:06d}")
        fields["13"] = f"{(n // 1_000_000) % 12 + 1:02d}{(n // 12_000_000) % 28 + 1:02d}"
        if mac:
            message = client.encode(fields, mac=True)
        else:
            message = client.codec.encode(dict(fields, **{"64": "0" * 16}))
        frames.append(encoder.encode(message))
    return frames


class _Connection(asyncio.Protocol):
    def __init__(self, run: _Run, frames: list[bytes]) -> None:
        self.run = run
        self.frames = frames
        self.next = 0
        self.sent: deque[float] = deque()
        self.decoder = FrameDecoder("len2", 65535)
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.run.rate is None:
            for _ in range(self.run.depth):
                self.send(time.perf_counter())

    def send(self, at: float) -> bool:
        if self.transport is None or self.run.stopping:
            return False
        if self.next >= len(self.frames):
            if not self.run.repeat or not self.frames:  # a host refuses a repeated sale
                self.run.exhausted = True
                return False
            self.next = 0
        self.sent.append(at)
        self.transport.write(self.frames[self.next])
        self.next += 1
        return True

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        run = self.run
        for frame in self.decoder.feed(data):
            started = self.sent.popleft()
            run.latencies.append(now - started)
            run.answered += 1
            if run.check is not None and run.answered % 97 == 0:
                run.check(frame.message)
            if run.rate is None:
                self.send(now)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.closed.done():
            self.closed.set_result(None)


class _Run:
    def __init__(self, depth: int, rate: float | None, check: Any, repeat: bool) -> None:
        self.depth = depth
        self.rate = rate
        self.check = check
        self.repeat = repeat
        self.latencies: list[float] = []
        self.answered = 0
        self.stopping = False
        self.exhausted = False  # a connection ran out of frames before the end: rate capped


async def drive(
    port: int,
    frames: list[bytes],
    connections: int,
    depth: int,
    rate: float | None,
    duration: float,
    check: Any = None,
    repeat: bool = False,
) -> dict[str, Any]:
    """Drive the target for ``duration`` s. ``repeat``: frames may be sent again once all
    were sent (only for an echo target); otherwise running out is reported as
    ``exhausted``, and the figures then understate the target."""
    loop = asyncio.get_running_loop()
    run = _Run(depth, rate, check, repeat)
    share = [frames[i::connections] for i in range(connections)]
    conns = []
    for part in share:
        _, proto = await loop.create_connection(
            lambda p=part: _Connection(run, p), "127.0.0.1", port
        )
        conns.append(proto)
    started = time.perf_counter()
    if rate is not None:
        interval = connections / rate

        async def pace(conn: _Connection, offset: float) -> None:
            due = started + offset
            while not run.stopping:
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if not conn.send(due):
                    return
                due += interval

        pacers = [
            asyncio.ensure_future(pace(c, i * interval / connections)) for i, c in enumerate(conns)
        ]
    await asyncio.sleep(duration)
    run.stopping = True
    elapsed = time.perf_counter() - started
    answered = run.answered
    if rate is not None:
        for p in pacers:
            p.cancel()
    await asyncio.sleep(0.2)  # let in-flight answers land (not counted in the rate)
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    lat = sorted(run.latencies)
    if not lat:
        raise SystemExit("no answers at all")
    return {
        "answered": answered,
        "seconds": round(elapsed, 3),
        "tps": round(answered / elapsed, 1),
        "p50_ms": round(lat[len(lat) // 2] * 1000, 3),
        "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 3),
        "mean_ms": round(statistics.fmean(lat) * 1000, 3),
        "connections": connections,
        "depth": depth,
        "rate": rate,
        "exhausted": run.exhausted,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="acqhost-loadtest", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--key-file",
        action="append",
        default=[],
        help="terminal key file (repeat for more terminals)",
    )
    parser.add_argument("--no-mac", action="store_true", help="plain sales (for the plain host)")
    parser.add_argument(
        "--echo",
        action="store_true",
        help="the target echoes: check nothing, and send frames again when all were sent",
    )
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--depth", type=int, default=8, help="requests in flight per connection")
    parser.add_argument("--rate", type=float, help="paced: requests per second in all")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds, at most 60")
    parser.add_argument("--frames", type=int, default=200_000, help="frames built in advance")
    parser.add_argument(
        "--offset",
        type=int,
        default=0,
        help="first sale number: runs against one store must not overlap",
    )
    args = parser.parse_args(argv)
    if not 0 < args.duration <= 60 or not 1 <= args.connections <= 512:
        parser.error("duration must be in (0, 60] and connections in [1, 512]")
    key_files = [json.loads(Path(p).read_text()) for p in args.key_file]
    if not key_files:
        parser.error("at least one --key-file")

    async def sign_all() -> list[TerminalClient]:
        return [await _sign_on(k, args.port) for k in key_files]

    if args.no_mac:
        clients = [TerminalClient(k, host="127.0.0.1", port=args.port) for k in key_files]
    else:
        clients = anyio.run(sign_all)
    frames = build_frames(clients, args.frames, mac=not args.no_mac, offset=args.offset)
    codec = clients[0].codec
    failures: list[str] = []

    def check(message: bytes) -> None:
        rc = codec.decode(message).get("39")
        if rc != "00" and len(failures) < 5:
            failures.append(str(rc))

    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency
        runner = asyncio.run
    result = runner(
        drive(
            args.port,
            frames,
            args.connections,
            args.depth,
            args.rate,
            args.duration,
            None if args.echo else check,
            repeat=args.echo,
        )
    )
    result["sample_failures"] = failures
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
