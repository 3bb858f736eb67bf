"""Bank link benchmark: settlement updates delivered to the bank simulator over loopback, and
what delivering them costs the sales, in one run.

1. A store with ``--terminals`` terminals (each registration queues a 0320) and a backlog of
   ``--advices`` more advices (0520s queued as batch closes queue them).
   The backlog is spread over the terminals.
2. The sales' baseline: a host without a bank, closed-loop sales for ``--duration`` s
   (acqhost-load, 16 connections x 8 in flight).
3. The same host with the bank configured: the same sales while the link delivers the backlog;
   then the backlog's delivery rate (advices acknowledged by the bank per second, from the
   first to the last).
4. Batch close to the bank's acknowledgement: ``--closes`` terminals close their batch (0500),
   one at a time; for each, the time from its 0510 to the bank recording its 0520 (p50, p99).

Run: ``python benchmarks/banklink.py [--terminals N] [--advices N] [--duration S] [--closes N]``.
Loopback only; every process it starts is stopped before it exits.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from e2e import PY, load, make_store, stop  # noqa: E402

from acqhost.domain import advices  # noqa: E402
from acqhost.domain.crypto import HostKeys  # noqa: E402
from acqhost.store import open_store  # noqa: E402
from simulators.bankcore import read_journal  # noqa: E402
from simulators.processes import free_port, wait_listening  # noqa: E402
from simulators.terminal import TerminalClient  # noqa: E402

BANK_CODE = "102100099996"


def queue_backlog(db: str, count: int, terminals: int) -> None:
    """``count`` 0520s spread over the first ``terminals`` terminals, as batch closes queue
    them (a terminal's go to the bank one at a time, terminals side by side)."""
    store = open_store(db)
    key = HostKeys.load(Path(f"{db}.keys")).data_key
    try:
        done = 0
        while done < count:
            with store.transaction() as tx:
                for _ in range(min(1000, count - done)):
                    tid = f"T{done % terminals:07d}"
                    version = tx.versions(tid)[0]
                    advices.queue_settlement_advice(tx, key, tid, 1, version, 1, 100, time.time())
                    done += 1
    finally:
        store.close()


def queued(db: str) -> int:
    store = open_store(db)
    try:
        return sum(s.queued for s in store.outbox_status())
    finally:
        store.close()


def wait_drained(db: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while queued(db):
        if time.monotonic() > deadline:
            raise SystemExit(f"the bank link did not drain the outbox in {seconds:g} s")
        time.sleep(0.01)


def start_host(base: Path, config: Path, port: int) -> subprocess.Popen[bytes]:
    log = (base / "host.log").open("ab")
    proc = subprocess.Popen(
        [PY, "-m", "acqhost", "serve", "--config", str(config), "--db", str(base / "acqhost.db"),
         "--port", str(port), "--log-level", "warning"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_listening(port, proc, 20)
    return proc


def received_at(record: dict[str, Any]) -> float:
    text = record["received"].rstrip("Z")
    moment = datetime.datetime.fromisoformat(text).replace(tzinfo=datetime.UTC)
    return moment.timestamp()


async def close_batches(keys: list[Path], port: int) -> dict[str, float]:
    """Each terminal closes its batch (the totals as the host says them); when its 0510 came."""
    closed = {}
    for key in keys:
        data = json.loads(key.read_text())
        data["port"] = port
        client = TerminalClient(data)
        await client.connect()
        try:
            assert (await client.sign_on()).rc == "00"
            assert (await client.sale(100)).rc == "00"
            exchanges = await client.settle_as_host_says()
            assert exchanges[-1].rc == "00", exchanges[-1].response
            closed[client.tid] = time.time()
        finally:
            await client.close()
    return closed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--terminals", type=int, default=16)
    parser.add_argument("--advices", type=int, default=20_000)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--closes", type=int, default=16)
    args = parser.parse_args()
    args.connections, args.depth, args.frames = 16, 8, None
    base = Path(tempfile.mkdtemp(prefix="acqhost-banklink-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        keys = make_store(base, max(args.terminals, args.closes))
        db = str(base / "acqhost.db")
        queue_backlog(db, args.advices, args.terminals)
        backlog = queued(db)
        bank_port, host_port = free_port(), free_port()
        public = HostKeys.load(Path(f"{db}.keys")).verify_key.hex()
        journal = base / "bank.jsonl"
        bank = subprocess.Popen(
            [PY, "-m", "simulators.bank", "serve", "--port", str(bank_port), "--host-key", public,
             "--out", str(journal), "--log-level", "warning"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip
        procs.append(bank)
        wait_listening(bank_port, bank, 20)
        plain = base / "plain.toml"
        plain.write_text("")
        linked = base / "linked.toml"
        linked.write_text(
            f'[[banks]]\nname = "bank"\nport = {bank_port}\nbank_codes = ["{BANK_CODE}"]\n'
            "retry_initial = 0.1\nretry_max = 1\n"
        )

        host = start_host(base, plain, host_port)
        procs.append(host)
        baseline = load(host_port, keys[: args.terminals], args, "--stan-start", "0")
        stop(host)
        procs.remove(host)

        host = start_host(base, linked, host_port)
        procs.append(host)
        started = time.time()
        during = load(host_port, keys[: args.terminals], args, "--stan-start", "3000000")
        wait_drained(db, 600)
        records = list(read_journal(journal))
        times = sorted(received_at(r) for r in records)
        rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0

        closed = anyio.run(close_batches, keys[: args.closes], host_port)
        wait_drained(db, 60)
        records = list(read_journal(journal))
        latencies = []
        for tid, at in closed.items():
            mine = [r for r in records if r["mti"] == "0520" and r["41"] == tid
                    and received_at(r) >= at - 1]  # fmt: skip
            latencies.append((received_at(mine[-1]) - at) * 1000)
        latencies.sort()
    finally:
        for proc in procs:
            stop(proc)
        shutil.rmtree(base, ignore_errors=True)
    print(f"loopback; {args.terminals} terminals' sales, 16 connections x 8 in flight, "
          f"{args.duration:g} s; a backlog of {backlog:,} advices")  # fmt: skip
    print(f"{'what':<52}{'value':>12}")
    print(f"{'sales/s, no bank':<52}{baseline['tps']:>12,.0f}")
    print(f"{'sales/s, the link delivering the backlog meanwhile':<52}{during['tps']:>12,.0f}")
    print(f"{'  ratio (the link cost to sales)':<52}{during['tps'] / baseline['tps']:>12.2f}")
    print(f"{'advices acknowledged by the bank per second':<52}{rate:>12,.0f}")
    print(f"{'  backlog drained after (s)':<52}{times[-1] - started:>12.1f}")
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(f"{'batch close (0510) -> bank has its 0520, ms p50':<52}{p50:>12.1f}")
    print(f"{'  p99 (max of ' + str(len(latencies)) + ')':<52}{p99:>12.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
