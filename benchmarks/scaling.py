"""How a sale's cost grows with terminals, connections and ledger size, beside the echo floor.

One host (``python -m acqhost serve``, one worker, asyncio, SQLite; PostgreSQL as well with
``--pg URL``) on a free loopback port, driven by ``acqhost-load run --prebuilt`` (closed loop;
benchmarks/e2e.py ``load``). Three series:

a. terminals: 1, 4, 16, 64, 256 terminals (``--terminals``), each on its own connection with
   one sale in flight;
b. connections x depth at a fixed number of terminals (``--fixed``, 64): ``--shapes``, e.g. 8x1
   (eight terminals a connection, one sale in flight a connection), 8x4, 8x16, 64x1, 64x4;
c. ledger size: for each of ``--sizes`` a fresh store whose ledger is filled with that many
   recorded sales by benchmarks/ledger_growth.py (its ``measure``: fill, check, then two runs at
   64 x 1 on a host of its own).

Each point measures the host's throughput, CPU per sale (user + system of the host process from
/proc over the run, e2e's ``cpu_seconds``), p50 and p99; with PostgreSQL also the database
server's CPU per sale (its processes connected to the host's database). Beside each point, in
the same run and at the same shape, the bare uvloop echo server (benchmarks/echo_server.py,
``--no-mac --no-signon``): its CPU per message, and the host's CPU per sale as a multiple of it.
For the ledger series the ratio to the smallest ledger's CPU per sale is printed too (issue 14:
at most 1.2x). One run (64 terminals, or the nearest count asked) also writes acqhost-load's
per-second series (``--csv``) and its picture (``--plot``): rate and latency over time.

``--out DIR`` writes ``scaling.json`` (every figure) and the plots (PNG, matplotlib): cost per
sale and p99 against terminals, against connections x depth, against ledger size, and the
latency over time. ``--quick``: short runs at fewer points, a smoke test of the whole path.

Run: ``python benchmarks/scaling.py [--out DIR] [--duration S] [--pg URL] [--quick]``.
Loopback only; every process it starts is stopped, its stores removed, before it exits.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import ledger_growth  # noqa: E402
from e2e import PY, cpu_seconds, load, make_store, stop  # noqa: E402

from simulators.processes import free_port, wait_listening  # noqa: E402

QUICK = {"terminals": "1,16", "shapes": "8x1,8x4", "sizes": "1e3,1e4", "duration": 1.0}
ECHO_FLAGS = ("--no-mac", "--no-signon", "--repeat")


class Server:
    """A process serving on a loopback port; ``measure`` loads it and counts its CPU."""

    def __init__(self, argv: list[str], log: Path, port_flag: bool = True) -> None:
        self.port = free_port()
        self.log = log.open("ab")
        self.proc = subprocess.Popen(
            [*argv, *(["--port"] if port_flag else []), str(self.port)],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_listening(self.port, self.proc, 30)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        stop(self.proc)
        self.log.close()

    def measure(
        self, keys: list[Path], connections: int, depth: int, duration: float,
        *extra: str, db_cpu: Any = None,
    ) -> dict[str, Any]:  # fmt: skip
        shape = argparse.Namespace(
            connections=connections, depth=depth, duration=duration, frames=None
        )
        db_before = db_cpu() if db_cpu else {}
        before = cpu_seconds(self.proc.pid)
        result = load(self.port, keys, shape, *extra)
        after = cpu_seconds(self.proc.pid)
        if before is not None and after is not None and result["answered"]:
            result["cpu_us"] = (after - before) / result["answered"] * 1e6
        if db_cpu and result["answered"]:
            spent = sum(t - db_before.get(pid, 0.0) for pid, t in db_cpu().items())
            result["db_cpu_us"] = spent / result["answered"] * 1e6
        return result


def ratio(host: dict[str, Any], echo: dict[str, Any]) -> float | None:
    if host.get("cpu_us") and echo.get("cpu_us"):
        return float(host["cpu_us"] / echo["cpu_us"])
    return None


@contextlib.contextmanager
def host_store(
    store: str, base: Path, args: argparse.Namespace, count: int, pg_admin: Any
) -> Iterator[Any]:
    """(db flags, keys, database name or None) of a fresh store with ``count`` terminals."""
    folder = base / store
    folder.mkdir()
    if store == "sqlite":
        yield ["--db", str(folder / "acqhost.db")], make_store(folder, count), None
        return
    dbname = f"acqhost_scaling_{os.getpid()}"
    pg_admin.execute(f"CREATE DATABASE {dbname}")
    try:
        db, key_file = ledger_growth.pg_url(args.pg, dbname), str(folder / "acqhost.keys")
        yield ["--db", db, "--keys", key_file], make_store(folder, count, db, key_file), dbname
    finally:
        pg_admin.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")


def shape_series(
    store: str, base: Path, args: argparse.Namespace, echo: Server, pg_admin: Any
) -> dict[str, list[dict[str, Any]]]:
    """Series a (terminals) and b (connections x depth) on one host of ``store``."""
    counts = [int(n) for n in args.terminals.split(",")]
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    most = max([*counts, args.fixed])
    plotted = min(counts, key=lambda n: abs(n - 64))
    out: dict[str, list[dict[str, Any]]] = {"terminals": [], "shapes": []}
    with host_store(store, base, args, most, pg_admin) as (db_args, keys, dbname):
        db_cpu = (lambda: ledger_growth.backend_cpu(pg_admin, dbname)) if dbname else None
        host = Server(
            [PY, "-m", "acqhost", "serve", *db_args, "--host", "127.0.0.1", "--workers", "1",
             "--backend", "asyncio", "--log-level", args.log_level,
             # every connection comes from 127.0.0.1 (the default allows 64 an address)
             "--max-connections-per-source", str(max(most, *(c for c, _ in shapes)) + 16)],
            base / f"host-{store}.log",
        )  # fmt: skip
        run = [0]

        def point(series: str, label: str, terminals: int, c: int, d: int) -> None:
            extra: list[str] = []
            if series == "terminals" and terminals == plotted and args.out:
                stem = args.out / f"latency-{store}-{terminals}x1"
                extra = ["--csv", f"{stem}.csv", "--plot", f"{stem}.png"]
            run[0] += 1
            stan = ["--stan-start", str(run[0] * 1_000_000)]
            h = host.measure(keys[:terminals], c, d, args.duration, *stan, *extra, db_cpu=db_cpu)
            e = echo.measure(keys[:terminals], c, d, args.duration, *ECHO_FLAGS)
            row = {"store": store, "label": label, "terminals": terminals, "connections": c,
                   "depth": d, "host": h, "echo": e, "ratio": ratio(h, e)}  # fmt: skip
            out[series].append(row)
            progress(row)

        try:
            for n in counts:
                point("terminals", f"{n}x1", n, n, 1)
            for c, d in shapes:
                point("shapes", f"{c}x{d}", args.fixed, c, d)
        finally:
            host.close()
    return out


def ledger_series(
    store: str, args: argparse.Namespace, echo: Server, pg_admin: Any
) -> list[dict[str, Any]]:
    """Series c: ledger_growth's fill and two runs at 64 x 1 per size, the echo floor beside."""
    sizes = sorted(
        int(float(s)) for s in (args.pg_sizes if store == "pg" else args.sizes).split(",")
    )
    grow = argparse.Namespace(
        duration=args.duration, pg=args.pg if store == "pg" else None, keep=False,
        without_batch_index=False, connections=ledger_growth.TERMINALS, depth=1, frames=None,
    )  # fmt: skip
    keys = None
    rows: list[dict[str, Any]] = []
    for n in sizes:
        print(f"{store}: ledger of {n:,} sales", file=sys.stderr, flush=True)
        grown = ledger_growth.measure(n, grow, pg_admin)
        if keys is None:  # for the echo server, which reads only the terminal ids
            (args.scratch / f"echo-{store}").mkdir()
            keys = make_store(args.scratch / f"echo-{store}", ledger_growth.TERMINALS)
        e = echo.measure(keys, ledger_growth.TERMINALS, 1, args.duration, *ECHO_FLAGS)
        runs = grown["runs"]
        h = {
            "tps": statistics.median(r["tps"] for r in runs),
            "cpu_us": statistics.median(r["host_cpu_us"] for r in runs),
            "p50_ms": statistics.median(r["p50_ms"] for r in runs),
            "p99_ms": statistics.median(r["p99_ms"] for r in runs),
            "runs": runs,
        }
        if store == "pg":
            h["db_cpu_us"] = statistics.median(r["db_cpu_us"] for r in runs)
        row = {"store": store, "label": size_label(n), "ledger": n, "fill_s": grown["fill_s"],
               "db_bytes": grown["db_bytes"], "totals_ms": grown["totals_ms"],
               "host": h, "echo": e, "ratio": ratio(h, e)}  # fmt: skip
        rows.append(row)
        progress(row)
    smallest = rows[0]["host"]["cpu_us"] if rows else None
    for row in rows:
        row["vs_smallest"] = row["host"]["cpu_us"] / smallest if smallest else None
    return rows


def size_label(n: int) -> str:
    """1e6 for a power of ten, else the number."""
    text = f"{n:.0e}".replace("e+0", "e").replace("e+", "e")
    return text if float(text) == n else f"{n:,}"


def progress(row: dict[str, Any]) -> None:
    h, e = row["host"], row["echo"]
    print(
        f"  {row['store']} {row['label']}: host {h['tps']:,.0f}/s {h.get('cpu_us', 0):.1f} µs "
        f"p99 {h['p99_ms']:.2f} ms; echo {e.get('cpu_us', 0):.1f} µs",
        file=sys.stderr,
        flush=True,
    )


# -- report ------------------------------------------------------------------------------------


def table(title: str, rows: list[dict[str, Any]], ledger: bool = False) -> list[str]:
    lines = [title]
    head = f"{'store':<7}{'point':>8}{'sales/s':>10}{'CPU µs/sale':>13}{'p50 ms':>8}{'p99 ms':>8}"
    head += f"{'echo msg/s':>12}{'echo µs/msg':>13}{'x echo':>8}"
    server = any("db_cpu_us" in r["host"] for r in rows)
    head += f"{'server µs':>11}" if server else ""
    head += f"{'x smallest':>12}{'0500 ms':>9}" if ledger else ""
    lines.append(head)
    for r in rows:
        h, e = r["host"], r["echo"]
        line = (
            f"{r['store']:<7}{r['label']:>8}{h['tps']:>10,.0f}{h.get('cpu_us', 0):>13.1f}"
            f"{h['p50_ms']:>8.2f}{h['p99_ms']:>8.2f}{e['tps']:>12,.0f}{e.get('cpu_us', 0):>13.2f}"
            f"{r['ratio'] or 0:>7.1f}x"
        )
        if server:
            line += f"{h['db_cpu_us']:>11.1f}" if "db_cpu_us" in h else " " * 11
        if ledger:
            line += f"{r['vs_smallest'] or 0:>11.2f}x{r['totals_ms']:>9.2f}"
        lines.append(line)
    return lines


COLOURS = {"sqlite": "tab:blue", "pg": "tab:green", "server": "tab:olive", "echo": "tab:red"}
SERIES = (
    ("terminals", "terminals", "terminals (one connection each, 1 in flight)"),
    ("shapes", "connections x depth", "connections x depth ({fixed} terminals)"),
    ("ledger", "ledger size", "sales already in the ledger"),
)


def x_of(series: str, row: dict[str, Any]) -> Any:
    return (
        row["label"] if series == "shapes" else row["ledger" if series == "ledger" else "terminals"]
    )


def one_two_five(value: float) -> str:
    """A log axis' minor tick's label, at 2x and 5x a power of ten only."""
    return f"{value:g}" if f"{value:.0e}"[0] in "25" else ""


def plots(results: dict[str, Any], out: Path) -> list[str]:
    """Cost per sale and p99 against each series' x; the PNGs' names."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    made = []
    for series, what, xlabel in SERIES:
        rows = results[series]
        if not rows:
            continue
        fig = Figure(figsize=(10, 6.5), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        cost, p99 = fig.subplots(2, 1, sharex=True)
        fig.suptitle(f"{results['when']}: cost per sale against {what}, echo server beside")
        lines: list[tuple[str, str, list[dict[str, Any]], list[dict[str, Any]], str]] = []
        for store in sorted({r["store"] for r in rows}, reverse=True):  # sqlite first
            mine = [r for r in rows if r["store"] == store]
            lines.append(
                (f"acqhost ({store})", COLOURS[store], mine, [r["host"] for r in mine], "o")
            )
            if "db_cpu_us" in mine[0]["host"]:
                server = [{"cpu_us": r["host"]["db_cpu_us"]} for r in mine]
                lines.append(("PostgreSQL server", COLOURS["server"], mine, server, "s"))
        first = [r for r in rows if r["store"] == rows[0]["store"]]
        lines.append(("echo server", COLOURS["echo"], first, [r["echo"] for r in first], "^"))
        for label, colour, points, figures, marker in lines:
            xs = [x_of(series, r) for r in points]
            cost.plot(xs, [f.get("cpu_us") for f in figures], marker=marker, color=colour,
                      label=label)  # fmt: skip
            if "p99_ms" in figures[0]:
                p99.plot(xs, [f["p99_ms"] for f in figures], marker=marker, color=colour,
                         label=label)  # fmt: skip
        cost.set_ylabel("CPU µs per sale (process)")
        p99.set_ylabel("p99 latency (ms)")
        p99.set_xlabel(xlabel.format(fixed=results["fixed"]))
        for ax in (cost, p99):
            if series != "shapes":
                ax.set_xscale("log")
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: one_two_five(value)))
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(loc="best", fontsize="small")
        name = f"scaling-{series}.png"
        fig.savefig(out / name, format="png")
        made.append(name)
    return made


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--terminals", default="1,4,16,64,256", help="series a: counts")
    parser.add_argument("--shapes", default="8x1,8x4,8x16,64x1,64x4", help="series b: CxD,...")
    parser.add_argument("--fixed", type=int, default=64, help="series b: terminals")
    parser.add_argument("--sizes", default="1e3,1e5,1e6", help="series c: ledger sizes")
    parser.add_argument("--pg-sizes", help="series c on PostgreSQL (default: --sizes)")
    parser.add_argument("--series", default="terminals,shapes,ledger")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds a measurement")
    parser.add_argument("--log-level", default="info", help="the host's log level")
    parser.add_argument("--pg", metavar="URL", help="PostgreSQL superuser URL: its series too")
    parser.add_argument("--out", type=Path, help="folder for scaling.json and the PNGs")
    parser.add_argument("--quick", action="store_true", help="a smoke run: " + str(QUICK))
    args = parser.parse_args()
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    args.pg_sizes = args.pg_sizes or args.sizes
    wanted = args.series.split(",")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    # SIGTERM runs the finally blocks: hosts stopped, stores and databases removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    base = Path(tempfile.mkdtemp(prefix="acqhost-scaling-"))
    args.scratch = base
    stores = ["sqlite", *(["pg"] if args.pg else [])]
    results: dict[str, Any] = {
        "when": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(), "cores": os.cpu_count(), "fixed": args.fixed,
        "duration_s": args.duration, "log_level": args.log_level, "argv": sys.argv[1:],
        "load_before": os.getloadavg(), "terminals": [], "shapes": [], "ledger": [],
    }  # fmt: skip
    started = time.monotonic()
    pg_admin = None
    echo = Server([PY, str(ROOT / "benchmarks" / "echo_server.py")], base / "echo.log", False)
    try:
        if args.pg:
            import psycopg

            pg_admin = psycopg.connect(args.pg, autocommit=True)
        for store in stores:
            if "terminals" in wanted or "shapes" in wanted:
                for series, rows in shape_series(store, base, args, echo, pg_admin).items():
                    if series in wanted:
                        results[series] += rows
            if "ledger" in wanted:
                results["ledger"] += ledger_series(store, args, echo, pg_admin)
    finally:
        echo.close()
        if pg_admin is not None:
            pg_admin.close()
        shutil.rmtree(base, ignore_errors=True)
    results["seconds"] = time.monotonic() - started
    results["load_after"] = os.getloadavg()
    lines = [
        f"{results['when']}: acqhost serve, 1 worker, asyncio (uvloop), loopback, "
        f"{args.duration:g} s a measurement, host log level {args.log_level}; CPython "
        f"{results['python']}, {results['cores']} cores; load average "
        f"{results['load_before'][0]:.2f} before, {results['load_after'][0]:.2f} after"
    ]
    if results["terminals"]:
        lines += [
            "",
            *table("a. terminals, one connection each, 1 in flight", results["terminals"]),
        ]
    if results["shapes"]:
        lines += ["", *table(f"b. connections x depth, {args.fixed} terminals", results["shapes"])]
    if results["ledger"]:
        lines += [
            "",
            *table("c. ledger size, 64 x 1 (median of two runs)", results["ledger"], True),
        ]
    print("\n".join(lines))
    if args.out:
        (args.out / "scaling.json").write_text(json.dumps(results, indent=1) + "\n")
        (args.out / "scaling.txt").write_text("\n".join(lines) + "\n")
        results["plots"] = plots(results, args.out)
        print(f"written: {args.out}/scaling.json, " + ", ".join(results["plots"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
