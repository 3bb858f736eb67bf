"""Hostile-client benchmark: well-behaved terminals' latency and rate while 1,000 hostile
connections hold on to the same host.

One host (``acqhost serve``, its default limits unless given) on loopback. In one run:
1. baseline: 64 terminals at 1 request in flight (``acqhost-load run --prebuilt``, closed
   loop; benchmarks/e2e.py ``load()``) for ``--duration`` seconds (and again at the end, as
   the machine's noise between phases shows);
2. attacked: this process opens ``--hostile`` connections (asyncio, loopback only) spread over
   ``--sources`` loopback addresses (127.0.1.1, ...) and keeps that many open, each opened
   again soon after the host closes it: a third send a frame's length header and then one byte
   a second, never a whole frame ("slowloris"); a third first send a valid echo (so no
   first-frame deadline and no eviction applies to them), then do the same; a third connect
   and send nothing. Once they are open, the same load runs again for ``--duration`` seconds.
Printed: the terminals' sales/s, p50 and p99 for both; how many hostile connections the host
closed and why (the host's own count, from its ``stopped`` line) and what this process saw
(per kind: closed, and after how long); and the bytes the host logged in each phase.

Run: ``python benchmarks/hostile.py [--duration S] [--hostile N] [--sources K] [-- HOST FLAGS]``.
Every process it starts is stopped before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from acqhost.wire import specs  # noqa: E402
from acqhost.wire.codec import Codec, compile_spec  # noqa: E402
from benchmarks.e2e import PY, load, make_store, stop  # noqa: E402
from simulators.processes import free_port, wait_listening  # noqa: E402

KINDS = ("slowloris", "slowloris after a valid frame", "idle")


@functools.cache
def _codec() -> Codec:
    return compile_spec(specs.load("acq87"))  # tens of milliseconds: once


def echo_frame(n: int) -> bytes:
    """A valid 0800 echo test of a terminal the host does not know (answered 03)."""
    message = _codec().encode({"t": "0800", "7": time.strftime("%m%d%H%M%S", time.gmtime()),
                            "11": f"{n % 1_000_000:06d}", "41": f"HX{n % 1_000_000:06d}",
                            "42": "HOSTILE00000000", "70": "301"})  # fmt: skip
    return len(message).to_bytes(2, "big") + message


class Attack:
    """``count`` hostile connections kept open against ``port`` until :meth:`stop`."""

    def __init__(self, port: int, count: int, sources: int, gap: float) -> None:
        self.port = port
        self.count = count
        self.sources = [f"127.0.1.{i + 1}" for i in range(sources)]
        self.gap = gap  # seconds between a slowloris's bytes
        self.open = 0
        self.opened = 0
        self.closed: dict[str, list[float]] = defaultdict(list)  # kind: lifetimes
        self.failed: Counter[str] = Counter()  # connect errors
        self.running = True

    async def run(self) -> None:
        await asyncio.gather(*(self._one(i) for i in range(self.count)))

    async def _one(self, i: int) -> None:
        kind = KINDS[i % len(KINDS)]
        source = self.sources[i % len(self.sources)]
        while self.running:
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", self.port, local_addr=(source, 0)
                )
            except OSError as e:
                self.failed[type(e).__name__] += 1
                await asyncio.sleep(0.5)
                continue
            self.open += 1
            self.opened += 1
            started = time.monotonic()
            try:
                await self._behave(kind, i, reader, writer)
            except (OSError, asyncio.IncompleteReadError):
                pass  # closed by the host (reset, or before the echo's answer)
            finally:
                self.open -= 1
                writer.close()
            if self.running:
                self.closed[kind].append(time.monotonic() - started)
                await asyncio.sleep(0.1)

    async def _behave(
        self, kind: str, i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if kind == "slowloris after a valid frame":
            writer.write(echo_frame(i))
            size = int.from_bytes(await reader.readexactly(2), "big")
            await reader.readexactly(size)
        if kind == "idle":
            while self.running and await reader.read(4096):
                pass
            return
        pending = b"\x00\x40" + b"0" * 64  # a 64-byte frame, a byte a gap: never whole
        for k in range(len(pending)):
            if not self.running:
                return
            writer.write(pending[k : k + 1])
            try:
                if not await asyncio.wait_for(reader.read(4096), self.gap):
                    return  # closed by the host
            except TimeoutError:
                continue

    def stop(self) -> None:
        self.running = False


def attack_in_thread(attack: Attack) -> tuple[threading.Thread, Callable[[], None]]:
    """The attack on an event loop of its own, in a thread; and what ends it (every hostile
    connection closed)."""
    loop = asyncio.new_event_loop()
    task = loop.create_task(attack.run())

    def main() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(task)
        except asyncio.CancelledError:
            loop.run_until_complete(asyncio.sleep(0.2))  # the closes go out
        finally:
            loop.close()

    def end() -> None:
        attack.stop()
        task.cancel()

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    return thread, lambda: loop.call_soon_threadsafe(end)


def raise_file_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < need:
        raise SystemExit(f"open-file limit {soft} is below the {need} this run needs")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per phase")
    parser.add_argument("--hostile", type=int, default=1000, help="hostile connections")
    parser.add_argument("--sources", type=int, default=16, help="their loopback addresses")
    parser.add_argument("--gap", type=float, default=1.0, help="seconds between slow bytes")
    parser.add_argument("--backend", default="asyncio", help="the host's backend")
    parser.add_argument("host_flags", nargs="*", help="more `acqhost serve` flags (after --)")
    args = parser.parse_args()
    args.connections, args.depth, args.frames = 64, 1, None
    raise_file_limit(2 * (args.hostile + args.connections) + 256)
    base = Path(tempfile.mkdtemp(prefix="acqhost-hostile-"))
    try:
        keys = make_store(base, args.connections)
        port = free_port()
        log_path = base / "host.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [PY, "-m", "acqhost", "serve", "--db", str(base / "acqhost.db"),
                 "--port", str(port), "--backend", args.backend, *args.host_flags],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            try:
                wait_listening(port, proc, 20)
                results = run_phases(port, keys, args, log_path)
            finally:
                stop(proc)
        results["host_closed"] = host_counts(log_path)
        report(results, args)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


def run_phases(port: int, keys: list[Path], args: argparse.Namespace, log: Path) -> dict[str, Any]:
    size = log.stat().st_size
    baseline = load(port, keys, args, "--stan-start", "0")
    baseline["log_bytes"], size = log.stat().st_size - size, log.stat().st_size
    attack = Attack(port, args.hostile, args.sources, args.gap)
    thread, end = attack_in_thread(attack)
    deadline = time.monotonic() + 20
    while attack.open < args.hostile * 0.95 and time.monotonic() < deadline:
        time.sleep(0.1)
    open_at_start = attack.open
    size = log.stat().st_size
    try:
        attacked = load(port, keys, args, "--stan-start", "3000000")
        attacked["log_bytes"] = log.stat().st_size - size
        attacked["hostile_open_at_start"] = open_at_start
        attacked["hostile_open_at_end"] = attack.open
    finally:
        end()
        thread.join(timeout=10)
    time.sleep(1)
    size = log.stat().st_size
    after = load(port, keys, args, "--stan-start", "6000000")
    after["log_bytes"] = log.stat().st_size - size
    return {"baseline": baseline, "attacked": attacked, "baseline after": after, "attack": attack}


def host_counts(log: Path) -> dict[str, int]:
    """Why the host's connections ended, from its last line (``stopped``)."""
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if '"stopped"' in line:
            counts: dict[str, int] = json.loads(line).get("connections", {})
            return counts
    return {}


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    attack: Attack = results["attack"]
    flags = f", flags {' '.join(args.host_flags)}" if args.host_flags else ""
    print(f"\nloopback, {args.connections} terminals x 1 in flight, {args.duration:g} s a phase; "
          f"{args.hostile} hostile connections from {args.sources} addresses "
          f"(host backend {args.backend}{flags})")  # fmt: skip
    print(f"{'phase':<30}{'sales/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'answered':>10}{'log KiB':>9}")
    for name in ("baseline", "attacked", "baseline after"):
        r = results[name]
        print(f"{name:<30}{r['tps']:>10,.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
              f"{r['answered']:>10,}{r['log_bytes'] / 1024:>9.0f}"
              + (f"  non-00: {r['sample_failures']}" if r["sample_failures"] else ""))  # fmt: skip
    a = results["attacked"]
    b = {k: (results["baseline"][k] + results["baseline after"][k]) / 2
         for k in ("tps", "p50_ms", "p99_ms")}  # fmt: skip
    print(f"attacked / mean of the baselines: sales/s {a['tps'] / b['tps']:.2f}x, p50 "
          f"{a['p50_ms'] / b['p50_ms']:.2f}x, p99 {a['p99_ms'] / b['p99_ms']:.2f}x")  # fmt: skip
    print(f"hostile connections open when the attacked phase began: {a['hostile_open_at_start']}"
          f", at its end: {a['hostile_open_at_end']}; opened in all: {attack.opened:,}"
          + (f"; connect errors: {dict(attack.failed)}" if attack.failed else ""))  # fmt: skip
    print("closed by the host, as the attacker saw it (median lifetime):")
    for kind in KINDS:
        lives = attack.closed.get(kind, [])
        median = f"{statistics.median(lives):.1f} s" if lives else "-"
        print(f"  {kind:<32}{len(lives):>7,}  {median}")
    print("the host's count of why connections ended (the terminals' own included):")
    for reason, n in sorted(results["host_closed"].items(), key=lambda kv: -kv[1]):
        print(f"  {reason:<44}{n:>7,}")


if __name__ == "__main__":
    raise SystemExit(main())
