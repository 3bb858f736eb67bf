"""PostgreSQL restarted under load, on a cluster of the test's own (initdb and pg_ctl of the
Debian packages; .ci/postgres.sh installs them): while the server is down, requests that need
the store are answered 96 at once, /readyz says 503, and the host (two workers) stays up; once
the server is back, the same processes approve sales, close batches and deliver their
settlement updates again, without a restart. Nothing answered 00 is lost."""

from __future__ import annotations

import os
import statistics
import urllib.error
import urllib.request
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from acqhost.domain.crypto import HostKeys
from simulators.processes import free_port
from simulators.terminal import TEST_PAN
from tests.faultkit import (
    Acked,
    Cluster,
    check_store,
    cluster,
    postgres_bin,
    terminal_mix,
    workers_of,
)
from tests.hostkit import ACCOUNT, make_postgres_host
from tests.test_banklink_faults import (
    all_delivered,
    assert_delivered_once_in_order,
    bank_process,
    host_process,
    log_events,
    wait_for,
    write_config,
)
from tests.test_faults_kill import until_more


def server_binaries() -> Path:
    found = postgres_bin()
    if found is None:
        why = "no PostgreSQL server binaries (initdb, pg_ctl) under /usr/lib/postgresql/*/bin"
        if os.environ.get("CI"):
            pytest.fail(f"{why}: CI installs them (.ci/postgres.sh)")
        pytest.skip(why)
    return found


def readyz(port: int) -> int:
    """The status of the host's /readyz."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as e:
        return e.code


def test_a_postgresql_restart_answers_96_meanwhile_and_the_host_recovers(tmp_path: Path) -> None:
    with cluster(server_binaries()) as pg:
        run_restart(pg, tmp_path)


def run_restart(pg: Cluster, tmp_path: Path) -> None:
    setup = make_postgres_host(tmp_path, pg.url)
    port, bank_port = free_port(), free_port()
    setup.with_port(port)
    config = write_config(tmp_path, bank_port)
    metrics_port = free_port()
    config.write_text(config.read_text() + f"\n[metrics]\nport = {metrics_port}\n")
    ready: list[int] = []
    log = tmp_path / "host.log"
    tids = ["TERM0001", "TERM0002"]
    acked = Acked()
    down: dict[str, int] = {}

    async def traffic() -> None:
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            for tid in tids:
                tg.start_soon(
                    lambda t=tid: terminal_mix(setup.key_files[t], acked, stop, pause=0.005)
                )
            await until_more(acked, 40, 20)
            await anyio.to_thread.run_sync(pg.stop)
            before = acked.codes.copy()
            await anyio.sleep(2.0)
            down.update(acked.codes - before)
            ready.append(await anyio.to_thread.run_sync(readyz, metrics_port))
            assert proc.poll() is None, "the host died with its database"
            await anyio.to_thread.run_sync(pg.start)
            # The same host approves again (its connections made anew), closes batches.
            await until_more(acked, 60, 20)
            closed = len(acked.closed)
            with anyio.fail_after(20):
                while len(acked.closed) < closed + 2:
                    await anyio.sleep(0.05)
            stop.set()
            ready.append(await anyio.to_thread.run_sync(readyz, metrics_port))

    keys = HostKeys.load(setup.config.key_path)
    with (
        bank_process(tmp_path, bank_port, keys.verify_key),
        host_process(setup, config, log, port, workers=2) as proc,
    ):
        anyio.run(traffic)
        wait_for(all_delivered(setup.config.db), 20, "every advice delivered")
        # Each worker's cache listener listens again (its backoff is 5 s at most).
        wait_for(lambda: len(log_events(log, "cache listener listening")) >= 4, 10, "LISTEN")
        assert len(workers_of(proc.pid)) == 2, "a worker died with the database"
        assert proc.poll() is None
    assert ready == [503, 200]  # not ready while the store was down, ready again after
    # While it was down: 96 and nothing else (no approval), answered promptly.
    assert down.get("96", 0) >= 10 and set(down) <= {"96"}, down
    assert statistics.median(acked.latencies["96"]) < 0.1, sorted(acked.latencies["96"])[-5:]
    assert max(acked.latencies["96"]) < 2.0, sorted(acked.latencies["96"])[-5:]
    check_store(setup.config.db, setup.config.key_path, tids, acked)
    assert_delivered_once_in_order(setup.config.db, tmp_path / "bank.jsonl")
    # The host never restarted.
    assert len(log_events(log, "listening")) == 2
    # The outage is said in one line a request, without a traceback (no "stage failed", no
    # "bank link failed": those are for bugs), and without card data.
    outage = log_events(log, "store unavailable")
    assert len(outage) >= down["96"], (len(outage), down)
    for event in outage:
        assert "PostgreSQL unavailable" in event["error"], event
        assert TEST_PAN not in str(event) and ACCOUNT not in str(event), event
    bugs = [e for e in ("stage failed", "bank link failed", "write failed") if log_events(log, e)]
    assert bugs == [], bugs
