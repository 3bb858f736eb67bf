"""How fast is the load tester itself? acqhost-load against the bundled echo server, beside a
minimal hand-written asyncio client, in the same run.

Each generator runs in its own process against ``benchmarks/echo_server.py`` (uvloop, bare
length-prefixed echo) for ``--duration`` seconds at ``--connections`` x ``--depth`` in flight:

- two minimal hand-written clients with prebuilt frames that count answers and nothing more
  (this file, ``client``): ``streams``, written the usual asyncio way (streams, one coroutine
  a connection, ``readexactly`` of each answer, one write per answer), and ``protocol``, the
  least a client can do (an asyncio protocol that counts the answers of a read by their
  length prefixes and sends as many frames as came back in one write);
- ``prebuilt``: ``acqhost-load run --prebuilt`` (sales built before the clock starts, no MAC):
  every answer is decoded, matched by 41/11, recorded in the HdrHistogram;
- ``re-MAC``: ``acqhost-load run`` building every sale as it leaves (fresh STAN and dates,
  test card, MAC under the terminal's key; ``--no-signon``, so a fixed session key).

Printed: round trips per second, the generator's CPU per round trip (its process's user +
system time over the whole run, setup included), and each figure as a share of each
hand-written client's from the same round (median over rounds). Targets (issue 13): prebuilt
>= 80% and re-MAC >= 40% of a minimal hand-written client. Rounds alternate the generators.

Run: ``.venv/bin/python benchmarks/loadgen.py [--duration S] [--rounds N] [--connections C]
[--depth D]``. Loopback only; every process it starts is stopped before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simulators.processes import free_port, wait_listening  # noqa: E402

PY = sys.executable
BASELINES = ("streams", "protocol")


class _Client(asyncio.Protocol):
    """The minimal client: keeps ``depth`` frames in flight, counts answers."""

    def __init__(self, frames: list[bytes], depth: int, counter: list[int]) -> None:
        self.frames, self.depth, self.counter = frames, depth, counter
        self.next = 0
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self._send(self.depth)

    def _send(self, n: int) -> None:
        frames, i = self.frames, self.next
        out = []
        for _ in range(n):
            out.append(frames[i])
            i = (i + 1) % len(frames)
        self.next = i
        self.transport.write(b"".join(out))

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos, n, got = 0, len(buf), 0
        while n - pos >= 2:
            end = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
            if end > n:
                break
            got += 1
            pos = end
        self.buf = buf[pos:]
        if got:
            self.counter[0] += got
            self._send(got)


async def _client(port: int, connections: int, depth: int, duration: float, frames: list[bytes]):
    loop = asyncio.get_running_loop()
    counter = [0]
    transports = []
    for _ in range(connections):
        t, _ = await loop.create_connection(
            lambda: _Client(frames, depth, counter), "127.0.0.1", port
        )
        transports.append(t)
    start, begin = counter[0], time.perf_counter()
    await asyncio.sleep(duration)
    done, elapsed = counter[0] - start, time.perf_counter() - begin
    for t in transports:
        t.close()
    print(json.dumps({"round_trips": done, "seconds": elapsed}))


async def _streams(port: int, connections: int, depth: int, duration: float, frames: list[bytes]):
    """The minimal client written the usual asyncio way: streams, one coroutine a connection,
    ``depth`` frames written first, then one more for each answer read."""
    counter = [0]
    stop = False

    async def one(offset: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = offset
        for _ in range(depth):
            writer.write(frames[i % len(frames)])
            i += 1
        try:
            while not stop:
                header = await reader.readexactly(2)
                await reader.readexactly((header[0] << 8) | header[1])
                counter[0] += 1
                writer.write(frames[i % len(frames)])
                i += 1
        finally:
            writer.close()

    tasks = [asyncio.ensure_future(one(c * 512)) for c in range(connections)]
    await asyncio.sleep(0.05)
    start, begin = counter[0], time.perf_counter()
    await asyncio.sleep(duration)
    done, elapsed = counter[0] - start, time.perf_counter() - begin
    stop = True
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps({"round_trips": done, "seconds": elapsed}))


def client_main(argv: list[str]) -> None:
    import uvloop

    kind, port, connections, depth, duration, key_file = argv
    from simulators.load.messages import LoadTerminal

    terminal = LoadTerminal(json.loads(Path(key_file).read_text()), mac=False)
    frames = [terminal.request(terminal.sale_fields(100 + i), "sale").frame for i in range(4096)]
    run = _client if kind == "protocol" else _streams
    uvloop.run(run(int(port), int(connections), int(depth), float(duration), frames))


def _timed(cmd: list[str]) -> tuple[dict[str, Any], float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise SystemExit(f"{cmd[2:5]} failed: {out.stderr[-1500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads(out.stdout), cpu


def _key_file(folder: Path) -> Path:
    from nacl.signing import SigningKey

    path = folder / "LD000001.json"
    seed = bytes(SigningKey.generate())
    path.write_text(json.dumps({"tid": "LD000001", "mid": "LOADMERCHANT001",
                                "terminal_signing_key": seed.hex()}))  # fmt: skip
    return path


def measure(args: argparse.Namespace, port: int, key: Path) -> dict[str, tuple[float, float]]:
    shape = ["--connections", str(args.connections), "--depth", str(args.depth)]
    load = [PY, "-m", "simulators.load.cli", "run", "--port", str(port), "--key-file", str(key),
            *shape, "--duration", str(args.duration), "--json", "--quiet",
            "--no-signon"]  # fmt: skip
    hand = [PY, str(Path(__file__)), "client"]
    rest = [str(port), str(args.connections), str(args.depth), str(args.duration), str(key)]
    runs = {
        "streams": [*hand, "streams", *rest],
        "protocol": [*hand, "protocol", *rest],
        "prebuilt": [*load, "--no-mac", "--prebuilt", "4096", "--repeat"],
        "re-MAC": load,
    }
    out = {}
    for name, cmd in runs.items():
        data, cpu = _timed(cmd)
        if name in BASELINES:
            trips, seconds = data["round_trips"], data["seconds"]
        else:
            trips, seconds = data["answered"], data["duration_s"]
            if data["errors"] or data["timeouts"] or data["counts"]["unmatched"]:
                raise SystemExit(f"{name}: errors, timeouts or unmatched answers: {data}")
        out[name] = (trips / seconds, cpu / trips * 1e6)
    return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        client_main(sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--depth", type=int, default=4)
    args = parser.parse_args()
    port = free_port()
    echo = subprocess.Popen([PY, str(ROOT / "benchmarks" / "echo_server.py"), str(port)])
    rounds = []
    try:
        wait_listening(port, echo)
        with tempfile.TemporaryDirectory() as folder:
            key = _key_file(Path(folder))
            for _ in range(args.rounds):
                rounds.append(measure(args, port, key))
    finally:
        echo.terminate()
        echo.wait(timeout=10)
    print(f"echo server on loopback, {args.connections} connections x {args.depth} in flight, "
          f"{args.duration:g} s a run, {args.rounds} rounds (median)")  # fmt: skip
    print(f"{'generator':<14}{'round trips/s':>15}{'CPU µs/trip':>13}"
          f"{'of streams':>12}{'of protocol':>13}")  # fmt: skip
    for name, target in (("streams", None), ("protocol", None), ("prebuilt", 0.8),
                         ("re-MAC", 0.4)):  # fmt: skip
        rate = statistics.median(r[name][0] for r in rounds)
        cpu = statistics.median(r[name][1] for r in rounds)
        line = f"{name:<14}{rate:>15,.0f}{cpu:>13.2f}"
        for base in BASELINES:
            line += f"{statistics.median(r[name][0] / r[base][0] for r in rounds):>12.0%} "
        if target is not None:
            line += f" (target >= {target:.0%} of a minimal hand-written client)"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
