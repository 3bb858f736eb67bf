"""End-to-end benchmark: a load generator in its own process drives hosts over loopback.

In one run, with the same generator (``acqhost-load run --prebuilt``: many connections,
pipelining, sales built and MAC'd before the clock starts):
- ceiling: a bare length-prefixed echo server on uvloop (benchmarks/echo_server.py);
- plain: asyncio + pyiso8583, one SQLite commit per sale (benchmarks/plain_host.py);
- acqhost on asyncio (uvloop) and on trio, 1 and 2 workers, durable SQLite ledger.
Closed loop finds each target's maximum rate; acqhost is then paced at half its maximum to
read p50/p99 latency. Targets: >= 60% of the ceiling, >= 5x plain, p99 <= 5 ms at half rate.

Run: ``python benchmarks/e2e.py [--duration S] [--connections N] [--depth K]``. Loopback only;
every process it starts is stopped before it exits.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from simulators.processes import free_port, wait_listening

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


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


def make_store(base: Path, terminals: int, db: str | None = None) -> list[Path]:
    """``acqhost init`` and ``terminals`` terminals T0000000... (their key files in ``base``)
    on ``db``: by default the SQLite file ``base/acqhost.db`` with its host key file beside
    it; a database URL keeps its host key file in ``base/acqhost.keys``."""
    sys.path.insert(0, str(ROOT))
    from acqhost.cli import main as acqhost

    where = ["--db", str(base / "acqhost.db")]
    if db is not None:
        where = ["--db", db, "--keys", str(base / "acqhost.keys")]
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
    base: Path, keys: list[Path], args: argparse.Namespace, backend: str, workers: int
) -> dict[str, Any]:
    run = base / f"run-{backend}-{workers}"
    run.mkdir()
    for name in ("acqhost.db", "acqhost.db.keys"):
        shutil.copy2(base / name, run / name)
    port = free_port()
    log = (run / "host.log").open("wb")
    proc = subprocess.Popen(
        [
            PY,
            "-m",
            "acqhost",
            "serve",
            "--db",
            str(run / "acqhost.db"),
            "--port",
            str(port),
            "--backend",
            backend,
            "--workers",
            str(workers),
            "--log-level",
            args.log_level,
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
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
    for result, start, end in ((peak, before, middle), (half, middle, after)):
        if start is not None and end is not None:
            result["host_cpu_us"] = (end - start) / result["answered"] * 1e6
    return {"peak": peak, "half": half}


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
        return load(port, keys, args, *extra)
    finally:
        stop(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--terminals", type=int, default=8)
    parser.add_argument(
        "--frames",
        type=int,
        help="distinct sales built per measurement (default: 60,000 per second of it)",
    )
    parser.add_argument("--log-level", default="info", help="the hosts' log level")
    parser.add_argument("--only", help="comma list: echo,plain,asyncio-1,trio-1,asyncio-2,trio-2")
    args = parser.parse_args()
    wanted = set((args.only or "echo,plain,asyncio-1,trio-1,asyncio-2,trio-2").split(","))
    base = Path(tempfile.mkdtemp(prefix="acqhost-e2e-"))
    try:
        keys = make_store(base, args.terminals)
        results: dict[str, Any] = {}
        if "echo" in wanted:
            results["echo"] = run_simple(
                "echo_server.py", [], keys, args, "--no-mac", "--no-signon", "--repeat"
            )
        if "plain" in wanted:
            results["plain"] = run_simple(
                "plain_host.py", [str(base / "plain.db")], keys, args, "--no-mac", "--no-signon"
            )
        for name in ("asyncio-1", "trio-1", "asyncio-2", "trio-2"):
            if name in wanted:
                backend, workers = name.split("-")
                results[name] = run_acqhost(base, keys, args, backend, int(workers))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    report(results, args)
    return 0


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"loopback, {args.connections} connections x {args.depth} in flight, "
        f"{args.duration:g} s per measurement, host log level {args.log_level}"
    )
    print(
        f"{'target':<22}{'max TPS':>10}{'p50 ms':>9}{'p99 ms':>9}{'half-rate p50':>15}{'p99 ms':>9}"
        f"{'host µs/sale: max':>19}{'half':>6}"
    )
    echo = results.get("echo", {}).get("tps")
    plain = results.get("plain", {}).get("tps")
    for name, r in results.items():
        peak = r.get("peak", r)
        half = r.get("half")
        line = f"{name:<22}{peak['tps']:>10,.0f}{peak['p50_ms']:>9.2f}{peak['p99_ms']:>9.2f}"
        if half:
            line += f"{half['p50_ms']:>15.2f}{half['p99_ms']:>9.2f}"
            if "host_cpu_us" in peak and "host_cpu_us" in half:
                line += f"{peak['host_cpu_us']:>19.1f}{half['host_cpu_us']:>6.1f}"
        if peak.get("sample_failures") and name != "echo":  # an echo has no field 39
            line += f"  non-00 answers seen: {peak['sample_failures']}"
        print(line)
    for name, r in results.items():
        if "peak" not in r:
            continue
        tps = r["peak"]["tps"]
        parts = [f"{name}:"]
        if echo:
            parts.append(f"{tps / echo:.0%} of ceiling (target >= 60%)")
        if plain:
            parts.append(f"{tps / plain:.1f}x plain (target >= 5x)")
        parts.append(f"p99 at half rate {r['half']['p99_ms']:.2f} ms (target <= 5)")
        print("  ".join(parts))


if __name__ == "__main__":
    raise SystemExit(main())
