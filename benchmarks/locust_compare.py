"""acqhost-load and Locust (simulators/locustfile.py) driving the same host on one machine.

One host (``acqhost serve``, SQLite store, one worker, ``--log-level warning``) with
``--terminals`` load terminals for each run; each generator drives them in a closed loop with one
sale in flight per terminal for ``--duration`` seconds:

- ``locust``: ``locust --headless -u T -r T -t Ds`` (one process, gevent);
- ``locust --processes 2``: a master and two worker processes, half the users each;
- ``acqhost-load``: ``acqhost-load run --connections T --depth 1 --mix sale=1`` (asyncio);
- ``acqhost-load --processes 2``: the same split across two processes.

Printed per generator (the median of ``--rounds`` rounds; generators alternate in each round):
sales per second and p50 / p99 latency as each tool reports them (Locust's percentiles are whole
milliseconds below 100 ms; acqhost-load's come from an HdrHistogram in microseconds), and CPU:
the generator's CPU per sale (all its processes, read from /proc every 0.25 s, over the steady
part of the run: from 3 s after start to 2 s before exit, so start-up and the final report are
left out), the cores it kept busy, the cores the host kept busy meanwhile, and the cores the
rest of the machine kept busy (``other``: the kernel's share of loopback networking that no
process is charged with, and anything else running, which skews the figures). A run with any
failure, timeout or error is refused.

Run: ``.venv/bin/python benchmarks/locust_compare.py [--duration S] [--rounds N]
[--terminals T]`` (needs ``pip install 'acqhost[locust]'``; Linux, for /proc). Loopback only;
every process it starts is stopped before it exits.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simulators.load.register import register_terminals  # noqa: E402
from simulators.processes import free_port, stop, wait_listening  # noqa: E402

PY = sys.executable
TICK = os.sysconf("SC_CLK_TCK")
GENERATORS = ("locust", "locust --processes 2", "acqhost-load", "acqhost-load --processes 2")


def _cpu_ticks(pid: int) -> tuple[int, int] | None:
    """(parent pid, utime + stime in clock ticks) of ``pid``, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rindex(")") + 2 :].split()
    return int(rest[1]), int(rest[11]) + int(rest[12])


def machine_cpu() -> float:
    """CPU seconds the whole machine has been busy (all cores, /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / TICK


def tree_cpu(root: int) -> float:
    """CPU seconds used so far by ``root`` and every process below it that is still alive."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (s := _cpu_ticks(int(entry))) is not None:
            stats[int(entry)] = s
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
            todo.extend(p for p, (ppid, _) in stats.items() if ppid == pid)
    return total / TICK


class Sampler(threading.Thread):
    """Samples (time, generator CPU s, host CPU s, machine CPU s) every 0.25 s until
    stopped."""

    def __init__(self, generator: int, host: int) -> None:
        super().__init__(daemon=True)
        self.pids = (generator, host)
        self.samples: list[tuple[float, float, float, float]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.25):
            gen, host = self.pids
            self.samples.append((time.monotonic(), tree_cpu(gen), tree_cpu(host), machine_cpu()))

    def steady(self, start: float, end: float) -> tuple[float, float, float]:
        """Cores busy (generator, host, anything else) from ``start`` + 3 s to ``end`` - 2 s."""
        window = [s for s in self.samples if start + 3 <= s[0] <= end - 2]
        if len(window) < 4:
            raise SystemExit("run too short for a steady CPU window: raise --duration")
        (t0, g0, h0, m0), (t1, g1, h1, m1) = window[0], window[-1]
        gen, host, machine = (g1 - g0) / (t1 - t0), (h1 - h0) / (t1 - t0), (m1 - m0) / (t1 - t0)
        return gen, host, max(0.0, machine - gen - host)


def command(name: str, port: int, keys: Path, folder: Path, args: argparse.Namespace):
    n, duration = str(args.terminals), args.duration
    if name.startswith("locust"):
        cmd = [PY, "-m", "locust", "-f", str(ROOT / "simulators" / "locustfile.py"),
               "--headless", "-u", n, "-r", n, "-t", f"{duration:g}s",
               "--host", f"tcp://127.0.0.1:{port}", "--csv", str(folder / "run"),
               "--only-summary", "--skip-log-setup", "--loglevel", "WARNING"]  # fmt: skip
    else:
        cmd = [PY, "-m", "simulators.load.cli", "run", "--port", str(port),
               "--keys-dir", str(keys), "--connections", n, "--depth", "1",
               "--duration", f"{duration:g}", "--mix", "sale=1", "--json", "--quiet"]  # fmt: skip
    if name.endswith("--processes 2"):
        cmd += ["--processes", "2"]
    return cmd


def run_one(name: str, port: int, host_pid: int, keys: Path, args: argparse.Namespace):
    """(sales/s, p50 ms, p99 ms, generator CPU us/sale, generator, host and other cores)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        env = dict(os.environ, ACQHOST_LOAD_KEYS_DIR=str(keys), ACQHOST_LOAD_MIX="sale=1")
        start = time.monotonic()
        proc = subprocess.Popen(
            command(name, port, keys, folder, args), cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        sampler = Sampler(proc.pid, host_pid)
        sampler.start()
        try:
            out, err = proc.communicate(timeout=args.duration + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise SystemExit(f"{name}: no end within {args.duration + 60:g} s") from None
        finally:
            sampler.done.set()
            sampler.join()
        end = time.monotonic()
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed ({proc.returncode}): {err[-2000:]}")
        if name.startswith("locust"):
            with open(folder / "run_stats.csv", newline="") as f:
                rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
            sale = rows[("0200", "sale")]
            if int(rows[("", "Aggregated")]["Failure Count"]):
                raise SystemExit(f"{name}: failures: {rows}")
            rate, p50, p99 = float(sale["Requests/s"]), float(sale["50%"]), float(sale["99%"])
        else:
            data = json.loads(out)
            if data["errors"] or data["timeouts"] or set(data["by_rc"]) != {"00"}:
                raise SystemExit(f"{name}: errors, timeouts or declines: {data['by_rc']}")
            rate = data["throughput_per_s"]
            p50, p99 = data["latency_us"]["p50"] / 1000, data["latency_us"]["p99"] / 1000
    gen_cores, host_cores, other = sampler.steady(start, end)
    return rate, p50, p99, gen_cores / rate * 1e6, gen_cores, host_cores, other


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--terminals", type=int, default=16)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, ...]]] = {name: [] for name in GENERATORS}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        db = str(folder / "acqhost.db")
        subprocess.run([PY, "-m", "acqhost", "init", "--db", db], check=True,
                       capture_output=True, cwd=folder)  # fmt: skip
        # Every run has terminals of its own: a terminal's STANs start at random, and two runs
        # of one terminal whose STAN ranges met would be answered 94 (duplicate).
        runs = args.rounds * len(GENERATORS)
        files = register_terminals(db, args.terminals * runs, str(folder / "registered"))
        keys = []
        for i in range(runs):
            keys.append(folder / f"keys{i}")
            keys[-1].mkdir()
            for path in files[i * args.terminals : (i + 1) * args.terminals]:
                shutil.copy(path, keys[-1])
        port = free_port()
        host = subprocess.Popen(
            [PY, "-m", "acqhost", "serve", "--db", db, "--port", str(port),
             "--log-level", "warning"],
            cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_listening(port, host)
            for r in range(args.rounds):
                order = GENERATORS if r % 2 == 0 else GENERATORS[::-1]
                for name in order:
                    run_keys = keys[r * len(GENERATORS) + GENERATORS.index(name)]
                    results[name].append(run_one(name, port, host.pid, run_keys, args))
                    print(f"round {r + 1} {name}: {results[name][-1][0]:,.0f} sales/s",
                          file=sys.stderr)  # fmt: skip
        finally:
            stop(host, seconds=10)
    print(
        f"host: SQLite, 1 worker; {args.terminals} terminals, one sale in flight each; "
        f"{args.duration:g} s a run; median of {args.rounds} rounds; {os.cpu_count()} cores"
    )
    print(f"{'generator':<28}{'sales/s':>9}{'p50 ms':>8}{'p99 ms':>8}"
          f"{'CPU us/sale':>13}{'gen cores':>11}{'host cores':>12}{'other':>7}"
          "  sales/s by round")  # fmt: skip
    for name in GENERATORS:
        m = [statistics.median(r[i] for r in results[name]) for i in range(7)]
        print(f"{name:<28}{m[0]:>9,.0f}{m[1]:>8.2f}{m[2]:>8.2f}{m[3]:>13.0f}"
              f"{m[4]:>11.2f}{m[5]:>12.2f}{m[6]:>7.2f}  "
              + ", ".join(f"{r[0]:,.0f}" for r in results[name]))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
