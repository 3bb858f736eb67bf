"""The ledger writer's own CPU per sale: ``Store.record_sales`` on a SQLite file, as the host's
ledger writer thread calls it.

Each variant (``--variant NAME:PREFILL[:CODE]``) is a store of its own, made as
benchmarks/e2e.py makes one (``acqhost init``, 64 terminals), its ledger first filled with a
history of PREFILL sales (benchmarks/ledger_growth.py's: a batch a terminal a day, settled, the
last day's open; 0 for an empty ledger), by the acqhost found in the checkout CODE (default:
this one): a variant may be another commit's code, to put two versions side by side. Every
variant runs in a process of its own that stays up for the whole run.

The measurement: ``--sales`` sales, built beforehand as the host builds them (one
``SaleRecord`` a sale: 64 terminals in turn, each its next STAN, today's date, varying
amounts, masked cards, the terminal's open batch and account version), recorded by
``Store.record_sales`` in groups of ``--groups`` sales (a group is what the ledger writer
commits at once: at 64 terminals x 1 in flight, up to 64 sales of 64 terminals), one
transaction and one fsync a group, with the store's own pragmas (WAL, synchronous=FULL).
The figure is the calling thread's CPU time (``time.thread_time``: user + system, the
fsync's wait not included) divided by the sales, so a busy machine moves it less than a
wall clock; the wall time per commit is printed beside it. Rounds alternate the variants
(A, B, A, B, ...) for each group size, each round in a new order; the table gives every
round's figure and the median, and each variant's median over the first variant's.

``--sql NAME=STATEMENT`` runs a statement on variant NAME's database once it is filled (say
``DROP INDEX sales_batch``, to compare a schema without it); ``--pragma NAME=STATEMENT`` runs
one on the store's own connection once it is open (say ``PRAGMA wal_autocheckpoint = 10000``;
``--pragma 'NAME=QUEUE WRITERS'`` makes the store queue its writers on a file lock as the
workers of ``acqhost serve --workers N`` do, ``SQLiteStore.queue_writers``).

``--pg URL`` (a superuser libpq URL) measures PostgreSQL instead: a database per variant
(dropped after), filled with COPY; the CPU counted is the calling thread's and that of the
server process serving the store's connection (/proc), whose median is printed apart too.

Run: ``python benchmarks/writer.py [--variant NAME:PREFILL[:CODE]]... [--groups 1,8,32]
[--sales N] [--rounds N] [--pg URL] [--keep]``. Its temporary files are removed unless ``--keep``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TERMINALS = 64
# The measured sales' STANs: far above any history's (ledger_growth: at most ~157,000 a
# terminal for 1e7 sales) and below the load's (500,000).
STAN_START = 300_000
QUEUE = "QUEUE WRITERS"  # --pragma's word for SQLiteStore.queue_writers()


# -- the worker: one variant's store, in a process of its own --------------------------------


class Worker:
    """One variant's store and the sales it records next."""

    def __init__(self, base: Path, prefill: int, pg: str | None) -> None:
        # The acqhost of this worker's checkout (first on sys.path) is imported before the
        # benchmarks' modules, which would put this checkout first.
        from acqhost.store import open_store

        # ...and the benchmarks' modules of the same checkout (the worker runs in it).
        sys.path.insert(0, str(Path.cwd() / "benchmarks"))
        import ledger_growth
        from e2e import cpu_seconds, make_store

        self.cpu_seconds = cpu_seconds
        self.pg = pg
        self.db = str(base / "acqhost.db")
        if pg:
            import psycopg

            self.dbname = f"acqhost_writer_{base.name}_{os.getpid()}"
            with psycopg.connect(pg, autocommit=True) as admin:
                admin.execute(f"CREATE DATABASE {self.dbname}")
            self.db = ledger_growth.pg_url(pg, self.dbname)
        with contextlib.redirect_stdout(io.StringIO()):
            make_store(base, TERMINALS, self.db if pg else None)
        self.tids = [f"T{i:07d}" for i in range(TERMINALS)]
        mids = [f"M{i:014d}" for i in range(TERMINALS)]
        began = time.perf_counter()
        if prefill:
            history = ledger_growth.History(
                prefill, self.tids, mids, datetime.datetime.now(datetime.UTC).date()
            )
            if pg:
                ledger_growth.fill_postgres(self.db, history)
            else:
                ledger_growth.fill_sqlite(Path(self.db), history)
        self.fill_s = time.perf_counter() - began
        self.store = open_store(self.db)
        self.batches = {tid: self.store.open_batch(tid) for tid in self.tids}
        self.versions = {tid: self.store.current_account(tid, time.time()) for tid in self.tids}
        self.mids = dict(zip(self.tids, mids, strict=True))
        self.made = 0
        self.random = random.Random(20261206)
        # PostgreSQL: the server process serving the store's connection, whose CPU counts too.
        self.backend = self.store._conn.info.backend_pid if pg else None  # type: ignore[attr-defined]

    def execute(self, statements: list[str], pragmas: list[str]) -> None:
        """``statements`` on the database (a connection of their own), then ``pragmas`` on the
        store's connection."""
        from acqhost.store import open_store

        if statements:
            self.store.close()
            if self.pg:
                import psycopg

                with psycopg.connect(self.db, autocommit=True) as conn:
                    for statement in statements:
                        conn.execute(statement)
            else:
                import sqlite3

                conn3 = sqlite3.connect(self.db, isolation_level=None)
                for statement in statements:
                    conn3.execute(statement)
                conn3.close()
            self.store = open_store(self.db)
            if self.pg:
                self.backend = self.store._conn.info.backend_pid  # type: ignore[attr-defined]
        for statement in pragmas:
            if statement == QUEUE:
                self.store.queue_writers()  # type: ignore[attr-defined]
            else:
                self.store._conn.execute(statement)  # type: ignore[attr-defined]

    def close(self) -> None:
        self.store.close()
        if self.pg:
            import psycopg

            with psycopg.connect(self.pg, autocommit=True) as admin:
                admin.execute(f"DROP DATABASE IF EXISTS {self.dbname} WITH (FORCE)")

    def sales(self, n: int) -> list[Any]:
        """The next ``n`` sales, 64 terminals in turn (as many in flight as terminals)."""
        from acqhost.store.base import SaleRecord

        now = datetime.datetime.now(datetime.UTC)
        mmdd, hms = now.strftime("%m%d"), now.strftime("%H%M%S")
        made = []
        for k in range(self.made, self.made + n):
            tid = self.tids[k % TERMINALS]
            version = self.versions[tid]
            assert version is not None
            made.append(
                SaleRecord(
                    tid, self.mids[tid], f"{STAN_START + k // TERMINALS:06d}", mmdd, hms,
                    mmdd + hms, self.random.randrange(100, 100_000), "156",
                    f"622202******{k % 10_000:04d}", f"{k % 1_000_000:06d}", False,
                    version.version, self.batches[tid], time.time(),
                )
            )  # fmt: skip
        self.made += n
        return made

    def measure(self, sales: int, group: int) -> dict[str, float]:
        """Record ``sales`` sales in groups of ``group``: CPU µs a sale, wall ms a commit."""
        made = self.sales(sales)
        groups = [made[i : i + group] for i in range(0, len(made), group)]
        record = self.store.record_sales
        server = self.cpu_seconds(self.backend) or 0.0 if self.backend else 0.0
        wall, cpu = time.perf_counter(), time.thread_time()
        for g in groups:
            results = record(g)
            assert not any(r.duplicate for r in results)
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
        if self.backend:
            server = (self.cpu_seconds(self.backend) or 0.0) - server
        return {
            "cpu_us": cpu / sales * 1e6,
            "server_us": server / sales * 1e6,
            "commit_ms": wall / len(groups) * 1e3,
        }


def worker_main(
    base: str, prefill: int, pg: str | None, sql: list[str], pragmas: list[str]
) -> None:
    """Serve one variant: lines of JSON in (``[sales, group]``), lines of JSON out."""
    worker = Worker(Path(base), prefill, pg)
    try:
        worker.execute(sql, pragmas)
        schema = worker.store.schema_version()  # type: ignore[attr-defined]
        print(json.dumps({"fill_s": worker.fill_s, "schema": schema}))
        sys.stdout.flush()
        for line in sys.stdin:
            sales, group = json.loads(line)
            print(json.dumps(worker.measure(sales, group)))
            sys.stdout.flush()
    finally:
        worker.close()


# -- the runner ------------------------------------------------------------------------------


class Variant:
    """A worker process serving one variant."""

    def __init__(
        self, spec: str, base: Path, pg: str | None, sql: list[str], pragmas: list[str]
    ) -> None:
        name, prefill, *code = spec.split(":", 2)
        self.name = name
        self.prefill = int(float(prefill))
        self.code = Path(code[0]).resolve() if code else ROOT
        where = base / name
        where.mkdir()
        env = {**os.environ, "PYTHONPATH": str(self.code)}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(where), str(self.prefill),
             *([f"--pg={pg}"] if pg else []),
             *(f"--sql=-={s}" for s in sql), *(f"--pragma=-={s}" for s in pragmas)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
            cwd=self.code,
        )  # fmt: skip
        self.ready: dict[str, Any] | None = None
        self.changes = [*sql, *pragmas]

    def wait_ready(self) -> dict[str, Any]:
        if self.ready is None:
            self.ready = self._answer()
        return self.ready

    def measure(self, sales: int, group: int) -> dict[str, float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps([sales, group]) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"variant {self.name}: its worker ended (exit {self.proc.wait()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument(
        "--variant",
        action="append",
        help="NAME:PREFILL[:CODE], e.g. this:1e6 or main:1e6:../main (default: this:0, this:1e6)",
    )
    parser.add_argument("--sql", action="append", default=[], help="NAME=STATEMENT")
    parser.add_argument("--pragma", action="append", default=[], help="NAME=STATEMENT")
    parser.add_argument("--groups", default="1,8,32", help="sales a commit (default 1,8,32)")
    parser.add_argument("--sales", type=int, default=1024, help="sales a measurement")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pg", metavar="URL", help="PostgreSQL superuser URL (else SQLite)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker_main(
            args.worker[0],
            int(args.worker[1]),
            args.pg,
            [s.split("=", 1)[1] for s in args.sql],
            [s.split("=", 1)[1] for s in args.pragma],
        )
        return 0
    specs = args.variant or ["this:0", "this:1e6"]
    groups = [int(g) for g in args.groups.split(",")]
    base = Path(tempfile.mkdtemp(prefix="acqhost-writer-"))
    variants: list[Variant] = []
    try:
        for spec in specs:
            name = spec.split(":", 1)[0]
            sql = [s.split("=", 1)[1] for s in args.sql if s.split("=", 1)[0] == name]
            pragmas = [s.split("=", 1)[1] for s in args.pragma if s.split("=", 1)[0] == name]
            variants.append(Variant(spec, base, args.pg, sql, pragmas))
        for v in variants:
            ready = v.wait_ready()
            print(
                f"  {v.name}: schema version {ready['schema']}, {v.prefill:,} sales filled in "
                f"{ready['fill_s']:.1f} s",
                file=sys.stderr,
                flush=True,
            )
        run(variants, groups, args)
    finally:
        for v in variants:
            v.close()
        if args.keep:
            print(f"  kept: {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 0


def run(variants: list[Variant], groups: list[int], args: argparse.Namespace) -> None:
    """Every round, every group size, the variants one after the other (order rotated)."""
    import sqlite3

    figures: dict[tuple[str, int], list[dict[str, float]]] = {}
    for v in variants:  # a first round, not counted: caches, the WAL's first pages
        v.measure(min(args.sales, 256), groups[-1])
    for r in range(args.rounds):
        for g in groups:
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for v in order:
                figures.setdefault((v.name, g), []).append(v.measure(args.sales, g))
        print(f"  round {r + 1} of {args.rounds} done", file=sys.stderr, flush=True)
    store = (
        "PostgreSQL (local server), CPU = the calling thread's (time.thread_time) and the server "
        "process's serving it (/proc)"
        if args.pg
        else f"SQLite {sqlite3.sqlite_version} (WAL, synchronous=FULL), CPU = the calling "
        "thread's (time.thread_time)"
    )
    print(
        f"{datetime.date.today()}: Store.record_sales on {store}; {TERMINALS} terminals, "
        f"{args.sales} sales a measurement, {args.rounds} rounds alternating; CPython "
        f"{sys.version.split()[0]}, {os.cpu_count()} cores"
    )
    for v in variants:
        code = "this checkout" if v.code == ROOT else "another checkout"
        changes = "".join(f"; {c}" for c in v.changes)
        print(f"  {v.name}: {v.prefill:,} sales before, the code of {code}{changes}")

    def cpu(f: dict[str, float]) -> float:
        return f["cpu_us"] + f["server_us"]

    first = variants[0].name
    for g in groups:
        print(f"\n{g} sale(s) a commit")
        print(
            f"{'variant':<14} {'ledger':>10}  {'CPU µs/sale, each round':<42} {'median':>7} "
            f"{'ratio':>6}  {'wall ms/commit':>14}" + ("  server µs/sale" if args.pg else "")
        )
        base = statistics.median(cpu(f) for f in figures[(first, g)])
        for v in variants:
            runs = figures[(v.name, g)]
            median = statistics.median(cpu(f) for f in runs)
            each = " ".join(f"{cpu(f):5.1f}" for f in runs)
            wall = statistics.median(f["commit_ms"] for f in runs)
            server = statistics.median(f["server_us"] for f in runs)
            print(
                f"{v.name:<14} {v.prefill:>10,}  {each:<42} {median:7.1f} {median / base:6.2f}  "
                f"{wall:14.2f}" + (f"  {server:15.1f}" if args.pg else "")
            )


if __name__ == "__main__":
    sys.exit(main())
