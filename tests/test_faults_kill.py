"""kill -9 under load: four terminals run sales, reversals, settlement-account changes (auto
review: submitted, approved and made ACTIVE by the host) and batch closes against ``acqhost
serve --workers 2`` while one worker, then the whole host, is SIGKILLed and the host started
again. Afterwards: every sale answered 00 is in the ledger once (its retransmission answers
94), every reversal answered 00 is recorded, the account versions are consistent, the outbox
holds exactly one advice per event (each registration or activation, each closed batch's
account), every advice reaches the bank simulator once and in order, and the audit log's
chain verifies. On SQLite, and on PostgreSQL when ACQHOST_TEST_PG names a server."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from acqhost.domain.crypto import HostKeys
from simulators.processes import free_port
from tests.faultkit import (
    REBIND_POLICY,
    Acked,
    check_store,
    four_terminals,
    kill_group,
    retransmissions_refused,
    terminal_mix,
    victim_worker,
    workers_of,
)
from tests.hostkit import HostSetup, make_host, make_postgres_host
from tests.test_banklink_faults import (
    all_delivered,
    assert_delivered_once_in_order,
    bank_process,
    host_process,
    wait_for,
    write_config,
)


async def until_more(acked: Acked, more: int, seconds: float) -> None:
    """Until ``more`` further sales have been approved."""
    target = len(acked.sales) + more
    with anyio.fail_after(seconds):
        while len(acked.sales) < target:
            await anyio.sleep(0.02)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_kill_9_of_a_worker_and_of_the_host_loses_and_doubles_nothing(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    port, bank_port = free_port(), free_port()
    setup: HostSetup
    if backend == "postgres":
        setup = make_postgres_host(tmp_path, request.getfixturevalue("pg_url"))
        tids = four_terminals(setup, "--keys", str(setup.config.key_path))
    else:
        setup = make_host(tmp_path)
        tids = four_terminals(setup)
    setup.with_port(port)
    config = write_config(tmp_path, bank_port)
    config.write_text(config.read_text() + REBIND_POLICY)
    log = tmp_path / "host.log"
    keys = HostKeys.load(setup.config.key_path)
    acked = Acked()
    killed: list[str] = []

    async def traffic() -> None:
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            for n, tid in enumerate(tids):
                tg.start_soon(
                    lambda t=tid, r=(n == 0): terminal_mix(
                        setup.key_files[t], acked, stop, rebind=r
                    )
                )
            with contextlib.ExitStack() as stack:
                proc = stack.enter_context(host_process(setup, config, log, port, workers=2))
                await until_more(acked, 60, 20)
                assert len(workers_of(proc.pid)) == 2
                victim = victim_worker(proc.pid, log)
                assert victim is not None
                os.kill(victim, signal.SIGKILL)
                killed.append(f"worker {victim}")
                await until_more(acked, 60, 20)
                kill_group(proc)
                killed.append("host")
            await anyio.sleep(0.3)  # requests meet a host that is gone
            with host_process(setup, config, log, port, workers=2):
                await until_more(acked, 60, 20)
                stop.set()
                for tid in tids:
                    assert await retransmissions_refused(setup.key_files[tid], acked, 10) > 0
                # A killed dispatcher's lease runs out (10 s at most), then another delivers.
                await anyio.to_thread.run_sync(
                    wait_for, all_delivered(setup.config.db), 30, "every advice delivered"
                )

    with bank_process(tmp_path, bank_port, keys.verify_key):
        anyio.run(traffic)
    checked = check_store(setup.config.db, setup.config.key_path, tids, acked)
    assert_delivered_once_in_order(setup.config.db, tmp_path / "bank.jsonl")
    assert killed == [killed[0], "host"]
    assert acked.closed and acked.reversed and acked.rebinds, acked.summary()
    assert acked.broken > 0, "no terminal noticed a kill"
    assert checked["advices"] > len(tids), checked
    # Nothing outside the mix: no 96 from a healthy store, no refused sign-on or MAC.
    assert set(acked.codes) <= {"00", "05", "12", "94", "95"}, acked.codes
