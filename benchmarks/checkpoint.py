"""WAL checkpoint benchmark: commit latency of the ledger's writes, checkpoints inline or beside.

A SQLiteStore connection commits groups of sales (``--group`` per transaction, one fsync each)
as fast as it can while a second connection reads, as the host's ledger and pipeline do. Two
ways of checkpointing:
- inline: what the host does (SQLite's default): the COMMIT that takes the WAL past 1000 pages
  also copies it into the database file and fsyncs that;
- background: the ledger's connection with ``wal_autocheckpoint = 0`` and a thread on its own
  connection that runs ``wal_checkpoint(PASSIVE)`` every ``--interval`` seconds, followed by
  ``wal_checkpoint(RESTART)`` when the WAL holds ``--restart-pages`` or more (without that, a
  busy writer never lets SQLite start the WAL again and it grows without bound), and a
  TRUNCATE checkpoint when the store closes.
The disk's fsync rate here moves from minute to minute, so the two alternate in short slices
(a fresh database file each) and each one's commits are pooled over all its slices. Printed:
commits per second, p50/p99/p99.9/max commit latency, the largest WAL file seen.

Run: ``python benchmarks/checkpoint.py [--slices N] [--seconds S] [--group G]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

from acqhost.domain import crypto
from acqhost.store.base import NewAccount, SaleRecord, Terminal
from acqhost.store.sqlite import SQLiteStore

TID, MID = "TERM0001", "MERCHANT0000001"


class Checkpointer:
    """The background way: checkpoints in a thread of their own, beside the commits."""

    def __init__(self, path: Path, interval: float, restart_pages: int) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA busy_timeout = 5000")
        self.conn.execute("PRAGMA synchronous = FULL")  # the database fsynced before a restart
        self.interval, self.restart_pages = interval, restart_pages
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            pages = self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
            if pages >= self.restart_pages:
                self.conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        self.conn.close()


def new_store(path: Path) -> None:
    store = SQLiteStore(path)
    key = bytes(32)
    store.add_terminal(
        Terminal(TID, MID, "Bench Shop", "active", bytes(32), 10**9, 100, 0.0),
        NewAccount(crypto.seal(key, b"6222020200112233446"), bytes(32), "6222****3446", "Bench",
                   "102100099996", "", "bench", "bench"),
        None,
    )  # fmt: skip
    store.close()


def sales(first: int, count: int) -> list[SaleRecord]:
    now = time.time()
    return [
        SaleRecord(TID, MID, f"{n % 1_000_000:06d}", f"{1 + n // 1_000_000:04d}", "101530",
                   "1122101530", 12345, "156", "622202*********0128", "123456", False, 1, 1, now)
        for n in range(first, first + count)
    ]  # fmt: skip


def one_slice(folder: Path, background: bool, args: argparse.Namespace) -> tuple[list[float], int]:
    """Commit latencies (s) of one slice and the largest WAL file (bytes) seen."""
    path = folder / ("background.db" if background else "inline.db")
    new_store(path)
    writer, reader = SQLiteStore(path), SQLiteStore(path)
    checkpointer = None
    if background:
        writer._conn.execute("PRAGMA wal_autocheckpoint = 0")  # this connection only
        checkpointer = Checkpointer(path, args.interval, args.restart_pages)
    wal = Path(f"{path}-wal")
    latencies: list[float] = []
    largest = 0
    n = 0
    group = args.group
    end = time.perf_counter() + args.seconds
    try:
        while time.perf_counter() < end:
            batch = sales(n, group)
            n += group
            start = time.perf_counter()
            writer.record_sales(batch)
            latencies.append(time.perf_counter() - start)
            reader.sale_exists(TID, batch[0].stan, batch[0].local_date)
            if len(latencies) % 50 == 0:
                largest = max(largest, wal.stat().st_size)
        largest = max(largest, wal.stat().st_size)
    finally:
        if checkpointer is not None:
            checkpointer.stop()
        reader.close()
        writer.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return latencies, largest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=10, help="slices of each way")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one slice")
    parser.add_argument("--group", type=int, default=50, help="sales per commit")
    parser.add_argument("--interval", type=float, default=0.1, help="s between checkpoints")
    parser.add_argument("--restart-pages", type=int, default=4000, help="WAL pages to RESTART")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="acqhost-ckpt-"))
    results: dict[str, tuple[list[float], int]] = {"inline": ([], 0), "background": ([], 0)}
    try:
        for _ in range(args.slices):
            for name in ("inline", "background"):
                latencies, largest = one_slice(folder, name == "background", args)
                pooled, wal = results[name]
                results[name] = (pooled + latencies, max(wal, largest))
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    total = args.slices * args.seconds
    print(f"commits of {args.group} sales, {args.slices} x {args.seconds:g} s slices of each "
          f"way, interleaved ({os.cpu_count()} cores); background: every {args.interval:g} s, "
          f"RESTART at {args.restart_pages} pages")  # fmt: skip
    print(f"{'checkpoints':<12}{'commits/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}"
          f"{'max ms':>9}{'WAL MB':>8}")  # fmt: skip
    for name, (latencies, wal) in results.items():
        latencies.sort()

        def q(p: float, latencies: list[float] = latencies) -> float:
            return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

        print(f"{name:<12}{len(latencies) / total:>10,.0f}{q(0.5):>9.2f}{q(0.99):>9.2f}"
              f"{q(0.999):>10.2f}{latencies[-1] * 1000:>9.2f}{wal / 1e6:>8.1f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
