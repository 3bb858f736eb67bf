"""Ledger growth: the host's cost per sale against the number of sales its ledger already holds.

For each ledger size (``--sizes``, default 1e3, 1e6 and 1e7 recorded sales) a fresh store is made
as benchmarks/e2e.py makes one (``acqhost init``, 64 terminals) and its ledger is filled with a
history of that many sales, written in bulk with SQL (SQLite: one transaction, executemany;
PostgreSQL: COPY). The rows are those the host writes (``acqhost.store.sql``'s columns):

- the history spans D = min(360, ceil(n / 64)) past UTC days; each terminal has one batch a
  day, closed at 22:00 by a 0500 (its ``batch.closed`` audit entry, chained by
  ``acqhost.domain.audit``, and its 0520 advice, sealed by ``acqhost.domain.advices`` and
  delivered); the last day's batch stays open, so all but 1/D of the sales are settled;
- a terminal's sales are spread over its days between 08:00 and 20:00, STAN one per message
  (each sale and each 0500), so (tid, stan, local_date) is unique as the host requires;
  RRNs increase with time as the host hands them out, amounts and auth codes vary, cards are
  masked as the host masks them, one sale in 200 is reversed (its status and time set as a
  0400 sets them).

Foreign keys are not checked while the rows go in (a PostgreSQL COPY would spend most of its
time on them); the fill is then checked through the store's own API: one terminal's sales
(``Store.sales``), its settlement report (``settled``) against the totals written, its open
batch, and the whole audit chain (``audit.verify``). Each batch's totals (migration 7) are
kept by the store's triggers as the rows go in on SQLite, counted after the COPY on PostgreSQL.

Then one host (``python -m acqhost serve``, one worker, log level warning) on a free loopback
port is driven twice, ``--duration`` seconds each, at 64 connections x 1 in flight by
``acqhost-load run --prebuilt`` (benchmarks/e2e.py's ``load``), its STANs far above the history's
and its dates today's, so nothing is a duplicate. Host CPU per sale comes from /proc over each
run (e2e's ``cpu_seconds``). Printed per run: size, sales/s, host CPU µs a sale, its ratio to
the smallest size's in the same round (issue 14's target: <= 1.2 at 1e6 and 1e7), p50, p99,
and the database's size; per size, once the host has stopped, the time a 0500's totals take
(``settlement.open_totals`` in a write transaction, as the ledger's writer runs it). With
PostgreSQL, also the server's CPU a sale (its processes serving the database, from /proc).
``--rounds`` alternates the order of the sizes between rounds.

``--pg URL`` (a superuser libpq URL) measures PostgreSQL instead: a database of its own per size
(dropped after), filled with COPY, then VACUUM ANALYZE and a CHECKPOINT (what autovacuum and
the checkpointer would have done in the ledger's life, so that neither starts during a run).

Run: ``python benchmarks/ledger_growth.py [--sizes 1e3,1e6,1e7] [--duration S] [--rounds N]
[--pg URL] [--keep]``. Loopback only; every process it starts is
stopped, its temporary files (and databases) removed unless ``--keep``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import io
import math
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from e2e import PY, cpu_seconds, load, make_store, stop  # noqa: E402

from acqhost.domain import advices, audit, cards, settlement  # noqa: E402
from acqhost.domain.crypto import HostKeys  # noqa: E402
from acqhost.store import open_store  # noqa: E402
from acqhost.store.base import Store  # noqa: E402
from acqhost.store.migrations import COUNT_TOTALS  # noqa: E402
from acqhost.store.sql import SALE_COLUMNS  # noqa: E402
from simulators.load.messages import test_pan  # noqa: E402
from simulators.processes import free_port, wait_listening  # noqa: E402

TERMINALS = 64
DAY = 86_400
MAX_DAYS = 360
STANS = 999_999  # field 11 runs 000001..999999, then again
REVERSED_EVERY = 200
# The load's STANs (acqhost-load --stan-start): far above any history's (at most ~157,000 a
# terminal for 1e7 sales), one range a run.
RUN_STANS = (500_000, 750_000)
FILL_COLUMNS = f"{SALE_COLUMNS}, status, reversed_at"
HMS = [f"{s // 3600:02d}{s // 60 % 60:02d}{s % 60:02d}" for s in range(DAY)]


@dataclass
class Closed:
    """A batch a 0500 closed: what its audit entry and 0520 record."""

    tid: str
    batch_no: int
    closed_at: float
    stan: str
    transmission: str
    count: int = 0  # approved, unreversed sales
    amount: int = 0


@dataclass
class History:
    """``n`` sales of ``tids`` over the past days (see the module's doc), made as rows."""

    n: int
    tids: list[str]
    mids: list[str]
    today: datetime.date
    days: int = 0
    closed: list[Closed] = field(default_factory=list)
    per_terminal: list[int] = field(default_factory=list)
    test: Any = 0  # the test column's "false": 0 for SQLite, "f" in PostgreSQL's COPY text

    def __post_init__(self) -> None:
        t = len(self.tids)
        self.days = max(1, min(MAX_DAYS, math.ceil(self.n / t)))
        self.per_terminal = [self.n // t + (1 if i < self.n % t else 0) for i in range(t)]

    def day_start(self, d: int) -> float:
        day = self.today - datetime.timedelta(days=self.days - d)
        return float(calendar_seconds(day))

    def batches(self) -> list[tuple[str, int, str, float, float | None]]:
        """Every batch row: (tid, batch_no, status, opened_at, closed_at), a batch a day."""
        rows: list[tuple[str, int, str, float, float | None]] = []
        for i, tid in enumerate(self.tids):
            opened = self.day_start(0)
            for d in range(self.days):
                if d == self.days - 1:
                    rows.append((tid, d + 1, "open", opened, None))
                else:
                    closed = self.close_time(d, i)
                    rows.append((tid, d + 1, "closed", opened, closed))
                    opened = closed
        return rows

    def close_time(self, d: int, i: int) -> float:
        return self.day_start(d) + 22 * 3600 + i * 0.5

    def rows(self) -> Iterator[tuple[Any, ...]]:
        """The sales in RRN order (FILL_COLUMNS); fills ``closed`` as it goes."""
        t, days = len(self.tids), self.days
        seq = [0] * t  # each terminal's messages so far (its next STAN)
        sold = [0] * t
        masks = [
            [cards.mask_pan(test_pan(f"{tid}/card/{c}")) for c in range(8)] for tid in self.tids
        ]
        x = 12345
        self.closed = []
        for d in range(days):
            start = self.day_start(d)
            mmdd = (self.today - datetime.timedelta(days=days - d)).strftime("%m%d")
            counts = [k * (d + 1) // days - k * d // days for k in self.per_terminal]
            slots = max(counts) * t
            open_totals = [[0, 0] for _ in range(t)]
            for j in range(max(counts)):
                for i in range(t):
                    if j >= counts[i]:
                        continue
                    at = start + 8 * 3600 + (j * t + i) * (12 * 3600 / slots)
                    hms = HMS[int(at - start)]
                    x = (x * 1103515245 + 12345) & 0x7FFFFFFF
                    amount = 100 + x % 99_900
                    s = seq[i]
                    seq[i] = s + 1
                    n = sold[i]
                    sold[i] = n + 1
                    reversed_ = n % REVERSED_EVERY == REVERSED_EVERY - 1
                    if not reversed_:
                        totals = open_totals[i]
                        totals[0] += 1
                        totals[1] += amount
                    yield (
                        self.tids[i], self.mids[i], f"{s % STANS + 1:06d}", mmdd, hms,
                        mmdd + hms, amount, "156", masks[i][n % 8],
                        f"{(x >> 8) % 1_000_000:06d}", self.test, 1, d + 1, at,
                        "reversed" if reversed_ else "approved", at + 60.0 if reversed_ else None,
                    )  # fmt: skip
            if d == days - 1:
                break
            for i, tid in enumerate(self.tids):  # each terminal's 0500, one STAN each
                closed_at = self.close_time(d, i)
                s = seq[i]
                seq[i] = s + 1
                self.closed.append(
                    Closed(tid, d + 1, closed_at, f"{s % STANS + 1:06d}",
                           mmdd + HMS[int(closed_at - start)], *open_totals[i])
                )  # fmt: skip


def calendar_seconds(day: datetime.date) -> int:
    return int(datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.UTC).timestamp())


# -- filling ---------------------------------------------------------------------------------


def fill_sqlite(path: Path, history: History) -> None:
    """The batches and sales in one transaction, executemany (foreign keys off, as a new
    connection has them; no journal while it runs), then WAL again as the store keeps it."""
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = OFF")
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA cache_size = -1000000")
        conn.execute("BEGIN")
        batches = history.batches()
        # init opened batch 1 of each terminal: it becomes the history's first.
        conn.executemany(
            "UPDATE batches SET status = ?, opened_at = ?, closed_at = ? "
            "WHERE tid = ? AND batch_no = ?",
            [(status, o, c, tid, b) for tid, b, status, o, c in batches if b == 1],
        )
        conn.executemany(
            "INSERT INTO batches (tid, batch_no, status, opened_at, closed_at) "
            "VALUES (?, ?, ?, ?, ?)",
            [row for row in batches if row[1] != 1],
        )
        marks = ", ".join("?" * len(FILL_COLUMNS.split(",")))
        conn.executemany(f"INSERT INTO sales ({FILL_COLUMNS}) VALUES ({marks})", history.rows())
        conn.execute("COMMIT")
        conn.execute("PRAGMA journal_mode = WAL")
    finally:
        conn.close()


def fill_postgres(url: str, history: History) -> None:
    """The batches and sales with COPY in one transaction (foreign-key triggers skipped:
    session_replication_role = replica; so are those keeping each batch's totals, which are
    counted after), then VACUUM ANALYZE and CHECKPOINT."""
    import psycopg

    history.test = "f"
    with psycopg.connect(url, autocommit=False) as conn:
        conn.execute("SET session_replication_role = replica")
        batches = history.batches()
        with conn.cursor() as cur:
            cur.executemany(
                "UPDATE batches SET status = %s, opened_at = %s, closed_at = %s "
                "WHERE tid = %s AND batch_no = %s",
                [(status, o, c, tid, b) for tid, b, status, o, c in batches if b == 1],
            )
            with cur.copy(
                "COPY batches (tid, batch_no, status, opened_at, closed_at) FROM STDIN"
            ) as copy:
                for row in batches:
                    if row[1] != 1:
                        copy.write_row(row)
            with cur.copy(f"COPY sales ({FILL_COLUMNS}) FROM STDIN") as copy:
                chunk: list[str] = []
                for row in history.rows():
                    chunk.append("\t".join(_copy_text(v) for v in row))
                    if len(chunk) == 20_000:
                        copy.write("\n".join(chunk) + "\n")
                        chunk = []
                if chunk:
                    copy.write("\n".join(chunk) + "\n")
            # Replica mode skipped the triggers that keep each batch's totals: counted here.
            cur.execute(COUNT_TOTALS)
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")


def _copy_text(value: Any) -> str:
    if value is None:
        return "\\N"
    return value if isinstance(value, str) else repr(value)


def close_batches(db: str, key: bytes, history: History) -> None:
    """What each 0500 wrote besides closing its batch, in one transaction through the store:
    its audit entry (settlement.close's) and, for a batch with approved sales, its 0520 in
    the outbox, sealed, and delivered five seconds later."""
    store = open_store(db)
    try:
        with store.transaction() as tx:
            versions = {tid: tx.versions(tid)[0] for tid in history.tids}
            for c in history.closed:
                account = versions[c.tid]
                sold = (
                    [{"sv": 1, "account": account.account_masked, "count": c.count,
                      "amount": c.amount}]
                    if c.count
                    else []
                )  # fmt: skip
                audit.append(
                    tx, key, at=c.closed_at, actor="terminal", action=settlement.CLOSED,
                    tid=c.tid, subject=f"b{c.batch_no}",
                    detail={"batch": c.batch_no, "next": c.batch_no + 1, "stan": c.stan,
                            "transmission": c.transmission, "count": c.count,
                            "amount": c.amount, "accounts": sold},
                )  # fmt: skip
                if c.count:
                    advice = advices.queue_settlement_advice(
                        tx, key, c.tid, c.batch_no, account, c.count, c.amount, c.closed_at
                    )
                    tx.mark_delivered(advice.id, "00", c.closed_at + 5)
    finally:
        store.close()


def check(db: str, key: bytes, history: History) -> None:
    """The fill as the store reads it: SystemExit if anything differs from what was written."""
    store: Store = open_store(db)
    tid = history.tids[0]
    try:
        sales = store.sales(tid)
        rrns = [s.rrn for s in sales]
        want = [c for c in history.closed if c.tid == tid]
        with store.transaction(write=False) as tx:
            lines = tx.settled(tid=tid)
        problems = []
        if len(sales) != history.per_terminal[0]:
            problems.append(f"{tid} has {len(sales)} sales, {history.per_terminal[0]} written")
        if rrns != sorted(rrns) or len(set(rrns)) != len(rrns):
            problems.append("RRNs do not increase")
        if sum(ln.count for ln in lines) != sum(c.count for c in want) or sum(
            ln.amount for ln in lines
        ) != sum(c.amount for c in want):
            problems.append("the settlement report differs from the totals written")
        if store.open_batch(tid) != history.days:
            problems.append(f"open batch {store.open_batch(tid)}, not {history.days}")
        entries, chain = audit.verify(store, key)
        problems += chain
        if problems:
            raise SystemExit(f"the ledger of {history.n:,} sales is not as written: {problems}")
        print(
            f"  checked: {tid} has {len(sales):,} sales, {len(lines)} settled batches, open "
            f"batch {history.days}; audit chain of {entries:,} entries whole",
            file=sys.stderr,
            flush=True,
        )
    finally:
        store.close()


# -- one size ----------------------------------------------------------------------------------


def db_bytes(db: str) -> int:
    if "://" not in db:
        return sum(os.path.getsize(p) for p in (db, db + "-wal", db + "-shm") if os.path.exists(p))
    import psycopg

    with psycopg.connect(db, autocommit=True) as conn:
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
        return int(row[0]) if row else 0


def measure(n: int, args: argparse.Namespace, pg_admin: Any) -> dict[str, Any]:
    """Make, fill and check a ledger of ``n`` sales, then serve it and load it twice."""
    base = Path(tempfile.mkdtemp(prefix=f"acqhost-growth-{n}-"))
    dbname = f"acqhost_growth_{n}_{os.getpid()}"
    try:
        if args.pg:
            pg_admin.execute(f"CREATE DATABASE {dbname}")
            db = pg_url(args.pg, dbname)
            with contextlib.redirect_stdout(io.StringIO()):
                keys = make_store(base, TERMINALS, db)
            key_file = base / "acqhost.keys"
        else:
            with contextlib.redirect_stdout(io.StringIO()):
                keys = make_store(base, TERMINALS)
            db = str(base / "acqhost.db")
            key_file = base / "acqhost.db.keys"
        key = HostKeys.load(key_file).data_key
        tids = [f"T{i:07d}" for i in range(TERMINALS)]
        mids = [f"M{i:014d}" for i in range(TERMINALS)]
        history = History(n, tids, mids, datetime.datetime.now(datetime.UTC).date())
        began = time.perf_counter()
        if args.pg:
            fill_postgres(db, history)
        else:
            fill_sqlite(Path(db), history)
        rows_s = time.perf_counter() - began
        close_batches(db, key, history)
        fill_s = time.perf_counter() - began
        print(
            f"  filled: sales and batches {rows_s:.1f} s, audit and advices of "
            f"{len(history.closed):,} closes {fill_s - rows_s:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        check(db, key, history)
        size = db_bytes(db)
        server = None
        if args.pg:
            server = functools.partial(backend_cpu, pg_admin, dbname)
        runs = serve_and_load(db, key_file, keys, base, args, server)
        return {
            "n": n, "fill_s": fill_s, "db_bytes": size, "runs": runs,
            "totals_ms": totals_ms(db, tids[:8]),
        }  # fmt: skip
    finally:
        if args.keep:
            print(f"  kept: {base}" + (f", database {dbname}" if args.pg else ""), file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
            if args.pg:
                pg_admin.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")


def totals_ms(db: str, tids: list[str]) -> float:
    """The median time of a 0500's totals (``settlement.open_totals``: the open batch, locked,
    and its sales' totals) in a write transaction of its own, as the ledger's writer runs it,
    over ``tids``: the part of a settlement that reads the ledger."""
    store = open_store(db)
    times = []
    try:
        for tid in tids:
            began = time.perf_counter()
            with store.transaction(tid) as tx:
                settlement.open_totals(tx, tid)
            times.append((time.perf_counter() - began) * 1000)
    finally:
        store.close()
    return statistics.median(times)


def backend_cpu(pg_admin: Any, dbname: str) -> dict[int, float]:
    """CPU seconds so far of each PostgreSQL process connected to database ``dbname`` (the
    host's connections, an autovacuum worker), from /proc: the server's share of a sale."""
    rows = pg_admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = %s", (dbname,)
    ).fetchall()
    found = {}
    for (pid,) in rows:
        seconds = cpu_seconds(pid)
        if seconds is not None:
            found[pid] = seconds
    return found


def serve_and_load(
    db: str,
    key_file: Path,
    keys: list[Path],
    base: Path,
    args: argparse.Namespace,
    server: Callable[[], dict[int, float]] | None,
) -> list[dict[str, Any]]:
    """Start a host on ``db``, load it twice: each run's figures, with the host's CPU per
    sale and, given ``server`` (the database server's processes' CPU), the server's."""
    port = free_port()
    log = (base / "host.log").open("wb")
    proc = subprocess.Popen(
        [PY, "-m", "acqhost", "serve", "--db", db, "--keys", str(key_file), "--host",
         "127.0.0.1", "--port", str(port), "--workers", "1", "--log-level", "warning"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    runs = []
    try:
        wait_listening(port, proc, 120)
        for stan in RUN_STANS:
            db_before = server() if server is not None else {}
            before = cpu_seconds(proc.pid)
            result = load(port, keys, args, "--stan-start", str(stan))
            after = cpu_seconds(proc.pid)
            if before is not None and after is not None:
                result["host_cpu_us"] = (after - before) / result["answered"] * 1e6
            if server is not None:
                # A process gone before the end of the run is not counted (none was seen to).
                spent = sum(t - db_before.get(pid, 0.0) for pid, t in server().items())
                result["db_cpu_us"] = spent / result["answered"] * 1e6
            runs.append(result)
    finally:
        stop(proc)
        log.close()
    return runs


def pg_url(url: str, dbname: str) -> str:
    """``url`` naming database ``dbname`` instead."""
    parts = urllib.parse.urlsplit(url)
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{parts.netloc}/{dbname}{query}"


# -- the run -----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--sizes", default="1e3,1e6,1e7", help="ledger sizes (comma list)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per load run")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--pg", metavar="URL", help="PostgreSQL superuser URL (else SQLite)")
    parser.add_argument("--keep", action="store_true", help="keep the stores made")
    args = parser.parse_args()
    sizes = sorted(int(float(s)) for s in args.sizes.split(","))
    # e2e.load's settings: 64 connections x 1 in flight, 60,000 sales built per second.
    args.connections, args.depth, args.frames = TERMINALS, 1, None
    pg_admin = None
    if args.pg:
        import psycopg

        pg_admin = psycopg.connect(args.pg, autocommit=True)
    results: list[list[dict[str, Any]]] = []
    try:
        for r in range(args.rounds):
            order = sizes if r % 2 == 0 else sizes[::-1]
            done = {}
            for n in order:
                print(f"round {r + 1}: {n:,} sales", file=sys.stderr, flush=True)
                done[n] = measure(n, args, pg_admin)
            results.append([done[n] for n in sizes])
    finally:
        if pg_admin is not None:
            pg_admin.close()
    report(results, args)
    return 0


def report(results: list[list[dict[str, Any]]], args: argparse.Namespace) -> None:
    store = "PostgreSQL (local server)" if args.pg else "SQLite (WAL, synchronous=FULL)"
    print(
        f"{store}, one worker, log level warning; {TERMINALS} connections x 1 in flight, "
        f"{args.duration:g} s a run, two runs a host"
    )
    print(
        f"{'round':>5}{'ledger sales':>14}{'fill s':>8}{'db MB':>9}{'run':>5}{'sales/s':>9}"
        f"{'host µs/sale':>14}{'ratio':>7}{'p50 ms':>8}{'p99 ms':>8}"
        + (f"{'server µs/sale':>16}" if args.pg else "")
        + f"{'0500 totals ms':>16}"
    )
    for r, sizes in enumerate(results, start=1):
        base = statistics.mean(run["host_cpu_us"] for run in sizes[0]["runs"])
        for s in sizes:
            for k, run in enumerate(s["runs"], start=1):
                cpu = run["host_cpu_us"]
                print(
                    f"{r:>5}{s['n']:>14,}{s['fill_s']:>8.1f}{s['db_bytes'] / 1e6:>9.1f}{k:>5}"
                    f"{run['tps']:>9,.0f}{cpu:>14.1f}{cpu / base:>7.2f}{run['p50_ms']:>8.2f}"
                    f"{run['p99_ms']:>8.2f}"
                    + (f"{run['db_cpu_us']:>16.1f}" if "db_cpu_us" in run else "")
                    + (f"{s['totals_ms']:>16.2f}" if k == 1 else "")
                    + (f"  non-00: {run['sample_failures']}" if run["sample_failures"] else "")
                )
    print(summary(results, "host_cpu_us", "host"))
    if args.pg:
        print(summary(results, "db_cpu_us", "server"))


def summary(results: list[list[dict[str, Any]]], figure: str, name: str) -> str:
    """The median of ``figure`` over every run of each size, and its ratio to the smallest
    size's (issue 14's target: <= 1.2)."""
    per_size: dict[int, list[float]] = {}
    for sizes in results:
        for s in sizes:
            per_size.setdefault(s["n"], []).extend(run[figure] for run in s["runs"])
    medians = {n: statistics.median(v) for n, v in sorted(per_size.items())}
    smallest, *larger = medians
    parts = [f"{n:,}: {medians[n]:.1f} ({medians[n] / medians[smallest]:.2f}x)" for n in larger]
    worst = max((medians[n] / medians[smallest] for n in larger), default=1.0)
    return (
        f"median {name} µs/sale, {smallest:,} sales: {medians[smallest]:.1f}; "
        + ", ".join(parts)
        + f" (target <= 1.2x: {'met' if worst <= 1.2 else 'MISSED'})"
    )


if __name__ == "__main__":
    raise SystemExit(main())
