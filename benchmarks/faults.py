"""The long fault run: the faults of tests/test_faults_*.py, over and over, under load.

A host (``acqhost serve --workers 2``, a bank simulator behind its ``[[banks]]`` table) serves
``acqhost-load`` traffic (sales from load terminals, open loop) and four terminals running a mix
of sales, reversals, settlement-account changes (auto review) and batch closes that keep what
they were answered. Every ``--every`` seconds one fault, in turn:
- kill -9 of one worker (the one holding the bank's lease when it is known);
- kill -9 of the whole host (parent and workers), started again;
- the bank down for a few seconds;
- with ``--pg``: the PostgreSQL server stopped (immediate: a crash) and started again a few
  seconds later, on a cluster of the run's own (initdb/pg_ctl of the Debian packages).
At the end the same checks as the tests: every sale and reversal answered 00 in the ledger
(a sample of the sales sent again: 94), account versions consistent, exactly one advice per
event (every registration or activation, every closed batch's account with its totals), each
delivered to the bank once and in order per terminal, the audit chain whole, SQLite's
``PRAGMA integrity_check`` ok; the load terminals' ledger holds at least the sales answered
00 to acqhost-load.

Run: ``python benchmarks/faults.py --minutes 10 [--pg] [--every 8] [--rate 50]``.
Exit status 0 when every check holds, 1 otherwise. Loopback only; every process it starts is
stopped before it exits.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from acqhost.domain.crypto import HostKeys  # noqa: E402
from acqhost.store import open_store  # noqa: E402
from simulators.load.register import register_terminals  # noqa: E402
from simulators.processes import free_port, wait_listening  # noqa: E402
from tests.faultkit import (  # noqa: E402
    REBIND_POLICY,
    Acked,
    Cluster,
    check_store,
    cluster,
    four_terminals,
    postgres_bin,
    retransmissions_refused,
    terminal_mix,
    victim_worker,
    workers_of,
)
from tests.hostkit import HostSetup, make_host, make_postgres_host  # noqa: E402
from tests.test_banklink_faults import (  # noqa: E402
    all_delivered,
    assert_delivered_once_in_order,
    bank_process,
    log_events,
    start,
    stop,
    wait_for,
    write_config,
)

LOAD_TERMINALS = 8


class Run:
    """The processes of the run and what was done to them."""

    def __init__(self, args: argparse.Namespace, folder: Path, pg: Cluster | None) -> None:
        self.args = args
        self.folder = folder
        self.pg = pg
        self.port, self.bank_port = free_port(), free_port()
        self.log = folder / "host.log"
        if pg is not None:
            self.setup: HostSetup = make_postgres_host(folder, pg.url)
            self.tids = four_terminals(self.setup, "--keys", str(self.setup.config.key_path))
        else:
            self.setup = make_host(folder)
            self.tids = four_terminals(self.setup)
        self.setup.with_port(self.port)
        self.config = write_config(folder, self.bank_port)
        self.config.write_text(
            f'[host]\nkeys = "{self.setup.config.key_path}"\n\n'
            + self.config.read_text()
            + REBIND_POLICY
        )
        self.keys_dir = folder / "load-keys"
        register_terminals(
            self.setup.config.db, LOAD_TERMINALS, str(self.keys_dir), config=str(self.config)
        )
        self.host: subprocess.Popen[bytes] | None = None
        self.bank: contextlib.ExitStack | None = None
        self.done: Counter[str] = Counter()
        self.started = time.monotonic()

    def say(self, what: str) -> None:
        print(f"{time.monotonic() - self.started:7.1f} s  {what}", flush=True)

    # -- processes ------------------------------------------------------------------------
    def start_host(self, workers: int = 2) -> None:
        listening = len(log_events(self.log, "listening")) if self.log.exists() else 0
        self.host = start(
            [sys.executable, "-m", "acqhost", "serve", "--config", str(self.config),
             "--db", self.setup.config.db, "--port", str(self.port), "--workers", str(workers),
             "--log-level", "info"],
            self.log,
        )  # fmt: skip
        wait_listening(self.port, self.host)
        wait_for(
            lambda: len(log_events(self.log, "listening")) >= listening + workers,
            15,
            f"{workers} workers listening",
        )

    def start_bank(self) -> None:
        self.bank = contextlib.ExitStack()
        key = HostKeys.load(self.setup.config.key_path).verify_key
        self.bank.enter_context(bank_process(self.folder, self.bank_port, key))

    def stop_bank(self) -> None:
        if self.bank is not None:
            self.bank.close()
            self.bank = None

    # -- faults ---------------------------------------------------------------------------
    def kill_worker(self) -> None:
        assert self.host is not None
        workers = workers_of(self.host.pid)
        victim = victim_worker(self.host.pid, self.log)
        if victim is None:
            return self.kill_host()
        os.kill(victim, signal.SIGKILL)
        self.done["worker killed"] += 1
        self.say(f"kill -9 worker {victim} ({len(workers) - 1} left)")

    def kill_host(self) -> None:
        assert self.host is not None
        os.killpg(self.host.pid, signal.SIGKILL)
        self.host.wait(timeout=10)
        self.say("kill -9 host (parent and workers)")
        time.sleep(0.5)
        self.start_host()
        self.done["host killed"] += 1
        self.say("host started again")

    def bank_outage(self) -> None:
        self.stop_bank()
        self.say("bank down")
        time.sleep(self.args.outage)
        self.start_bank()
        self.done["bank outage"] += 1
        self.say("bank up")

    def pg_restart(self) -> None:
        assert self.pg is not None
        self.pg.stop()
        self.say("PostgreSQL stopped (immediate)")
        time.sleep(self.args.outage)
        self.pg.start()
        self.done["PostgreSQL restart"] += 1
        self.say("PostgreSQL started")

    def faults(self) -> list[Any]:
        order: list[Any] = [self.kill_worker, self.kill_host, self.bank_outage]
        if self.pg is not None:
            order.append(self.pg_restart)
        return order


def load_command(run: Run, seconds: float) -> list[str]:
    return [
        sys.executable, "-m", "simulators.load.cli", "run", "--port", str(run.port),
        "--keys-dir", str(run.keys_dir), "--rate", str(run.args.rate),
        "--duration", str(seconds), "--timeout", "3", "--json", "--quiet",
    ]  # fmt: skip


async def traffic(run: Run, acked: Acked) -> dict[str, Any]:
    seconds = run.args.minutes * 60
    load = subprocess.Popen(
        load_command(run, seconds), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    stop_mix = anyio.Event()
    async with anyio.create_task_group() as tg:
        for n, tid in enumerate(run.tids):
            key_file = run.setup.key_files[tid]
            tg.start_soon(
                lambda k=key_file, r=(n == 0): terminal_mix(
                    k, acked, stop_mix, rebind=r, pause=0.02
                )
            )
        faults = run.faults()
        deadline = time.monotonic() + seconds
        n = 0
        while time.monotonic() + run.args.every < deadline:
            await anyio.sleep(run.args.every)
            await anyio.to_thread.run_sync(faults[n % len(faults)])
            n += 1
            run.say(acked.summary())
        await anyio.sleep(max(0.0, deadline - time.monotonic()))
        stop_mix.set()
    out, err = await anyio.to_thread.run_sync(load.communicate)
    if load.returncode != 0:
        raise SystemExit(f"acqhost-load failed: {err.decode()[-2000:]}")
    report: dict[str, Any] = json.loads(out)
    return report


def load_tids(run: Run) -> list[str]:
    return sorted(p.stem for p in run.keys_dir.glob("*.json"))


def load_sales(run: Run) -> int:
    store = open_store(run.setup.config.db)
    try:
        return sum(len(store.sales(tid)) for tid in load_tids(run))
    finally:
        store.close()


def finish(run: Run, acked: Acked, report: dict[str, Any]) -> list[str]:
    """The checks; what failed (empty when everything holds)."""
    failed: list[str] = []

    def check(what: str, fn: Any) -> Any:
        try:
            result = fn()
            run.say(f"ok      {what}" + (f": {result}" if result is not None else ""))
            return result
        except (AssertionError, SystemExit) as e:
            failed.append(f"{what}: {e}")
            run.say(f"FAILED  {what}: {e}")
            return None

    assert run.host is not None
    if run.host.poll() is not None or len(workers_of(run.host.pid)) < 2:
        stop(run.host)
        run.start_host()
    check(
        "every advice delivered",
        lambda: wait_for(all_delivered(run.setup.config.db), 60, "delivery"),
    )

    async def resend() -> int:
        return sum(
            [await retransmissions_refused(run.setup.key_files[t], acked, 20) for t in run.tids]
        )

    check("approved sales sent again answered 94", lambda: anyio.run(resend))
    stop(run.host)
    run.stop_bank()
    check(
        "store against the acknowledgements",
        lambda: check_store(
            run.setup.config.db, run.setup.config.key_path, run.tids + load_tids(run), acked
        ),
    )
    check(
        "bank journal: each advice once, in order",
        lambda: len(assert_delivered_once_in_order(run.setup.config.db, run.folder / "bank.jsonl")),
    )
    approved = report["by_rc"].get("00", 0)

    def load_ok() -> str:
        stored = load_sales(run)
        assert stored >= approved, (stored, approved)
        return f"{stored} in the ledger, {approved} answered 00"

    check("acqhost-load sales in the ledger", load_ok)
    if run.pg is None:

        def integrity() -> str:
            with sqlite3.connect(run.setup.config.db) as db:
                rows = db.execute("PRAGMA integrity_check").fetchall()
            assert rows == [("ok",)], rows
            return "ok"

        check("SQLite integrity_check", integrity)
    return failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--every", type=float, default=8.0, help="seconds between faults")
    parser.add_argument(
        "--outage", type=float, default=3.0, help="seconds a bank or database is down"
    )
    parser.add_argument("--rate", type=float, default=50.0, help="acqhost-load sales a second")
    parser.add_argument("--pg", action="store_true", help="PostgreSQL (a cluster of the run's own)")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="acqhost-faults-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        pg = None
        if args.pg:
            bin_dir = postgres_bin()
            if bin_dir is None:
                raise SystemExit(
                    "--pg: no initdb/pg_ctl under /usr/lib/postgresql/*/bin (.ci/postgres.sh)"
                )
            pg = stack.enter_context(cluster(bin_dir))
        with contextlib.redirect_stdout(io.StringIO()):  # the CLI's lines of the set-up
            run = Run(args, Path(tmp), pg)
        store = "PostgreSQL (own cluster)" if pg else "SQLite"
        run.say(
            f"{store}; acqhost serve --workers 2; {LOAD_TERMINALS} load terminals at "
            f"{args.rate:g}/s + 4 mix terminals; a fault every {args.every:g} s "
            f"for {args.minutes:g} min"
        )
        run.start_bank()
        stack.callback(run.stop_bank)
        run.start_host()
        stack.callback(lambda: run.host is not None and stop(run.host))
        acked = Acked()
        report = anyio.run(traffic, run, acked)
        run.say(f"faults: {dict(run.done)}")
        run.say(f"mix terminals: {acked.summary()}")
        codes = " ".join(f"{rc}:{n}" for rc, n in sorted(report["by_rc"].items()))
        run.say(
            f"acqhost-load: sent {report['sent']}, answered {report['answered']}, timeouts "
            f"{report['timeouts']}, errors {report['errors']}; codes {codes}"
        )
        failed = finish(run, acked, report)
        run.say("every check holds" if not failed else f"{len(failed)} check(s) failed")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
