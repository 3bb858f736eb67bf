"""End-to-end benchmark: a load generator in its own process drives hosts over loopback.

For each load shape (connections x requests in flight per connection, one terminal per
connection), in one run, with the same generator (``acqhost-load run --prebuilt``: sales
built and MAC'd before the clock starts, answers matched and recorded in an HdrHistogram):
- echo: a bare length-prefixed echo server on uvloop (benchmarks/echo_server.py), the floor:
  its CPU per message is what the sockets alone cost at this shape;
- plain: asyncio + pyiso8583, one SQLite commit per sale (benchmarks/plain_host.py);
- acqhost on asyncio (uvloop) and on trio, 1 and 2 workers, on SQLite and (``--pg URL``) on
  PostgreSQL, durable ledger.
Closed loop finds each target's maximum rate; acqhost is then paced at half its maximum to
read p50/p99 latency. For acqhost the host's CPU per sale (its processes' user + system time
from /proc over each load run) is printed beside the echo server's CPU per message, and their
ratio (issue 14: at most 3x at 64 x 1, 8x at 8 x 4); and two workers' rate as a multiple of
one's.

``--native`` adds the asyncio hosts with their hot modules compiled (acqhost/native.py), built
into a copy of the sources for the run; every host runs from a copy of the sources, so modules
compiled in place do not count for the pure-Python targets.

Run: ``python benchmarks/e2e.py [--shapes 64x1,8x4] [--duration S] [--only ...] [--pg URL]
[--native]``.
Loopback only; every process it starts is stopped before it exits.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from simulators.processes import free_port, stop, wait_listening

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def load(port: int, keys: list[Path], args: argparse.Namespace, *extra: str) -> dict[str, Any]:
    """One acqhost-load run (prebuilt sales, closed loop unless ``extra`` has --rate)."""
    cmd = [
        PY, "-m", "simulators.load.cli", "run", "--port", str(port),
        "--connections", str(args.connections), "--depth", str(args.depth),
        "--duration", str(args.duration), "--timeout", "30",
        "--prebuilt", str(args.frames or int(args.duration * 60_000)),
        "--json", "--quiet", *extra,
    ]  # fmt: skip
    for k in keys:
        cmd += ["--key-file", str(k)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"load generator failed: {out.stderr[-2000:]}")
    report: dict[str, Any] = json.loads(out.stdout)
    if report.get("prebuilt_exhausted"):
        raise SystemExit(
            f"the load generator ran out of distinct sales at "
            f"{report['throughput_per_s']:,.0f} TPS: raise --frames so the target, not the "
            "generator, sets the rate"
        )
    latency = report["latency_us"]
    return {
        "answered": report["answered"],
        "seconds": report["duration_s"],
        "tps": report["throughput_per_s"],
        "p50_ms": (latency["p50"] or 0) / 1000,
        "p99_ms": (latency["p99"] or 0) / 1000,
        "mean_ms": (latency["mean"] or 0) / 1000,
        "sample_failures": sorted(rc for rc in report["by_rc"] if rc != "00"),
        "generator_cpu_us": report["generator_cpu_us_per_request"],
    }


def make_store(
    base: Path, terminals: int, db: str | None = None, keys_file: str | None = None
) -> list[Path]:
    """``acqhost init`` and ``terminals`` terminals T0000000... (their key files in ``base``)
    on ``db``: by default the SQLite file ``base/acqhost.db`` with its host key file beside
    it; a database URL keeps its host key file in ``keys_file`` (default
    ``base/acqhost.keys``)."""
    with contextlib.redirect_stdout(io.StringIO()):  # its lines name temporary paths
        return _make_store(base, terminals, db, keys_file)


def _make_store(base: Path, terminals: int, db: str | None, keys_file: str | None) -> list[Path]:
    sys.path.insert(0, str(ROOT))
    from acqhost.cli import main as acqhost

    where = ["--db", str(base / "acqhost.db")]
    if db is not None:
        where = ["--db", db, "--keys", keys_file or str(base / "acqhost.keys")]
    assert acqhost(["init", *where]) == 0
    keys = []
    for i in range(terminals):
        key = base / f"T{i:07d}.json"
        assert (
            acqhost(
                [
                    "terminal",
                    "add",
                    *where,
                    "--tid",
                    f"T{i:07d}",
                    "--mid",
                    f"M{i:014d}",
                    "--merchant-name",
                    "Bench",
                    "--holder",
                    "Bench",
                    "--account",
                    "6222020200112233446",
                    "--bank-code",
                    "102100099996",
                    "--sale-limit",
                    "100000000",
                    "--key-out",
                    str(key),
                ]
            )
            == 0
        )
        keys.append(key)
    return keys


def run_acqhost(
    base: Path, keys: list[Path], args: argparse.Namespace, name: str
) -> dict[str, Any]:
    """``name`` is BACKEND-WORKERS[-native][-pg]: one host (its hot modules compiled with
    ``-native``), closed loop then paced at half its rate."""
    backend, workers, *flags = name.split("-")
    store = "pg" in flags
    run = base / f"run-{name}"
    run.mkdir()
    if store:  # a fresh PostgreSQL database of the shape's terminals
        db, keys_file = _pg_database(args.pg, name), str(run / "host.keys")
        keys = make_store(run, len(keys), db, keys_file)
        db_args = ["--db", db, "--keys", keys_file]
    else:
        for file in ("acqhost.db", "acqhost.db.keys"):
            shutil.copy2(base / file, run / file)
        db_args = ["--db", str(run / "acqhost.db")]
    port = free_port()
    log = (run / "host.log").open("wb")
    proc = subprocess.Popen(
        [PY, "-m", "acqhost", "serve", *db_args, "--port", str(port), "--backend", backend,
         "--workers", workers, "--log-level", args.log_level],
        cwd=SOURCES["native" if "native" in flags else "python"], stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_listening(port, proc, 20)
        before = cpu_seconds(proc.pid)
        peak = load(port, keys, args, "--stan-start", "0")
        middle = cpu_seconds(proc.pid)
        half = load(port, keys, args, "--rate", str(peak["tps"] / 2), "--stan-start", "3000000")
        after = cpu_seconds(proc.pid)
    finally:
        stop(proc)
        log.close()
        if store:
            _pg_drop(args.pg, name)
    for result, start, end in ((peak, before, middle), (half, middle, after)):
        if start is not None and end is not None:
            result["host_cpu_us"] = (end - start) / result["answered"] * 1e6
    return {"peak": peak, "half": half}


# The source trees hosts run from (their working directory, first on their path): "python",
# the sources alone, so that modules compiled in place (make native) do not count for the
# pure-Python targets; with --native, "native", a copy with the hot modules compiled.
SOURCES: dict[str, Path] = {}


def copy_sources(base: Path, compiled: bool) -> Path:
    """A copy of acqhost/ and specs/ under ``base``, its hot modules compiled or not."""
    root = base / ("native" if compiled else "python")
    ignore = shutil.ignore_patterns("__pycache__", "*.so")
    for name in ("acqhost", "specs"):
        shutil.copytree(ROOT / name, root / name, ignore=ignore)
    if compiled:
        from acqhost import native

        native.build(root)
    return root


def _pg_name(name: str) -> str:
    return "acqhost_e2e_" + name.replace("-", "_")


def _pg_database(url: str, name: str) -> str:
    """A fresh database for one run on the server of ``url``; its URL."""
    import psycopg

    db = _pg_name(name)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {db}")
    parts = urlsplit(url)  # the same server, database ``db``
    return f"{parts.scheme}://{parts.netloc}/{db}" + (f"?{parts.query}" if parts.query else "")


def _pg_drop(url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {_pg_name(name)} WITH (FORCE)")


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) of process ``pid`` and its children (the workers), from
    /proc; None where there is no /proc. Counted over a whole load run, sign-on included."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        pids = [pid]
        for task in Path(f"/proc/{pid}/task").iterdir():
            pids += [int(c) for c in (task / "children").read_text().split()]
        total = 0.0
        for p in pids:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        return total
    except (OSError, ValueError):
        return None


def run_simple(
    script: str, port_args: list[str], keys: list[Path], args: argparse.Namespace, *extra: str
) -> dict[str, Any]:
    port = free_port()
    proc = subprocess.Popen(
        [PY, str(ROOT / "benchmarks" / script), str(port), *port_args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_listening(port, proc, 20)
        before = cpu_seconds(proc.pid)
        result = load(port, keys, args, *extra)
        after = cpu_seconds(proc.pid)
        if before is not None and after is not None:
            result["host_cpu_us"] = (after - before) / result["answered"] * 1e6
        return result
    finally:
        stop(proc)


TARGETS = ("echo", "plain", "asyncio-1", "trio-1", "asyncio-2", "trio-2")
# issue 14: host CPU per sale over the echo server's CPU per message, at most
CPU_RATIO_GOAL = {(64, 1): 3.0, (8, 4): 8.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument(
        "--shapes", default="64x1,8x4", help="CxD,...: C connections (and terminals) x D"
    )
    parser.add_argument(
        "--frames",
        type=int,
        help="distinct sales built per measurement (default: 60,000 per second of it)",
    )
    parser.add_argument("--log-level", default="info", help="the hosts' log level")
    parser.add_argument(
        "--only", help="comma list of " + ",".join(TARGETS) + " (a -pg suffix: on PostgreSQL)"
    )
    parser.add_argument("--pg", metavar="URL", help="a PostgreSQL server (superuser URL)")
    parser.add_argument(
        "--native",
        action="store_true",
        help="also the hosts with their hot modules compiled (-native targets; acqhost.native)",
    )
    args = parser.parse_args()
    default = list(TARGETS) + (["asyncio-1-pg", "asyncio-2-pg"] if args.pg else [])
    if args.native:
        default += [f"{t}-native" for t in default if t.startswith("asyncio")]
    wanted = (args.only or ",".join(default)).split(",")
    if any(w.endswith("-pg") for w in wanted) and not args.pg:
        parser.error("a -pg target needs --pg URL")
    sources = Path(tempfile.mkdtemp(prefix="acqhost-e2e-src-"))
    try:
        SOURCES["python"] = copy_sources(sources, compiled=False)
        if any("native" in w.split("-") for w in wanted):
            SOURCES["native"] = copy_sources(sources, compiled=True)
        run_shapes(args, wanted)
    finally:
        shutil.rmtree(sources, ignore_errors=True)
    return 0


def run_shapes(args: argparse.Namespace, wanted: list[str]) -> None:
    for shape in args.shapes.split(","):
        connections, depth = (int(n) for n in shape.split("x"))
        args.connections, args.depth = connections, depth
        base = Path(tempfile.mkdtemp(prefix="acqhost-e2e-"))
        try:
            keys = make_store(base, connections)
            results: dict[str, Any] = {}
            for name in wanted:
                if name == "echo":
                    results[name] = run_simple(
                        "echo_server.py", [], keys, args, "--no-mac", "--no-signon", "--repeat"
                    )
                elif name == "plain":
                    results[name] = run_simple(
                        "plain_host.py", [str(base / "plain.db")], keys, args,
                        "--no-mac", "--no-signon",
                    )  # fmt: skip
                else:
                    results[name] = run_acqhost(base, keys, args, name)
            # The latency floor of a durable answer: the disk's fdatasync, where the stores are.
            results["fdatasync"] = fsync_latency(base)
        finally:
            shutil.rmtree(base, ignore_errors=True)
        report(results, args)


def fsync_latency(directory: Path, seconds: float = 2.0) -> dict[str, float]:
    """p50 and p99 (ms) of one 8 KiB write + fdatasync in ``directory`` for ``seconds``: what
    one commit at least waits for on this disk. A sale answered at half rate waits for the
    commit under way (if any) and then its own, so its p99 is bounded below by about this p99."""
    fd = os.open(directory / "fsync-probe", os.O_WRONLY | os.O_CREAT, 0o600)
    took: list[float] = []
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            os.write(fd, b"\0" * 8192)
            started = time.perf_counter()
            os.fdatasync(fd)
            took.append((time.perf_counter() - started) * 1000)
    finally:
        os.close(fd)
    took.sort()
    return {"n": len(took), "p50_ms": took[len(took) // 2], "p99_ms": took[int(len(took) * 0.99)]}


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"\nloopback, {args.connections} connections x {args.depth} in flight (one terminal "
        f"a connection), {args.duration:g} s per measurement, host log level {args.log_level}"
    )
    print(
        f"{'target':<14}{'max TPS':>10}{'p50 ms':>9}{'p99 ms':>9}{'half-rate p50':>15}"
        f"{'p99 ms':>9}{'CPU µs/msg: max':>17}{'half':>7}{'x echo':>8}"
    )
    echo_cpu = results.get("echo", {}).get("host_cpu_us")
    fsync = results.pop("fdatasync", None)
    for name, r in results.items():
        peak = r.get("peak", r)
        half = r.get("half")
        line = f"{name:<14}{peak['tps']:>10,.0f}{peak['p50_ms']:>9.2f}{peak['p99_ms']:>9.2f}"
        line += f"{half['p50_ms']:>15.2f}{half['p99_ms']:>9.2f}" if half else " " * 24
        cpu = peak.get("host_cpu_us")
        line += f"{cpu:>17.1f}" if cpu is not None else " " * 17
        line += f"{half['host_cpu_us']:>7.1f}" if half and "host_cpu_us" in half else " " * 7
        if cpu is not None and echo_cpu and name != "echo":
            line += f"{cpu / echo_cpu:>7.1f}x"
        if peak.get("sample_failures") and name != "echo":  # an echo has no field 39
            line += f"  non-00 answers seen: {peak['sample_failures']}"
        print(line)
    if fsync:
        print(
            f"{'fdatasync':<14}{fsync['n']:>10,}{fsync['p50_ms']:>9.2f}{fsync['p99_ms']:>9.2f}"
            "   (8 KiB write + fdatasync on the stores' disk, back to back, 2 s: the floor"
            " of a commit)"
        )
    goal = CPU_RATIO_GOAL.get((args.connections, args.depth))
    for name, r in results.items():
        if "peak" not in r:
            continue
        floor = f"; one fdatasync's p99 {fsync['p99_ms']:.2f}" if fsync else ""
        parts = [f"{name}:", f"p99 at half rate {r['half']['p99_ms']:.2f} ms (goal <= 5{floor})"]
        cpu = r["peak"].get("host_cpu_us")
        if cpu:  # how much of the machine the host took at its maximum rate
            parts.append(f"{r['peak']['tps'] * cpu / 1e6:.2f} cores")
        if goal and cpu and echo_cpu:
            parts.append(f"CPU {cpu / echo_cpu:.1f}x the echo server's (goal <= {goal:g}x)")
        one = results.get(name.replace("-2", "-1")) if "-2" in name else None
        if one is not None:
            parts.append(f"{r['peak']['tps'] / one['peak']['tps']:.2f}x one worker's rate")
        print("  ".join(parts))


if __name__ == "__main__":
    raise SystemExit(main())
