"""Kill -9 the host in the middle of a burst of sales: after a restart, every sale that got an
approved 0210 is in the ledger, and its retransmission is refused with 94."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from simulators.processes import free_port, wait_listening
from simulators.terminal import TerminalClient, TerminalError
from tests.hostkit import HostSetup, make_host

ROOT = Path(__file__).resolve().parents[1]


def start_host(setup: HostSetup, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "acqhost", "serve", "--db", setup.config.db,
         "--port", str(setup.config.port), "--log-level", "info", *extra],
        cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_listening(setup.config.port, proc)
    except RuntimeError as e:
        proc.kill()
        raise AssertionError(f"{e}: {log.read_text()}") from None
    return proc


async def burst(setup: HostSetup, approved: list[dict[str, str]], killed: anyio.Event) -> None:
    """One connection pipelining sales, 8 in flight, until the host dies."""
    client = setup.client()
    try:
        async with client:
            assert (await client.sign_on()).rc == "00"
            assert client._stream is not None
            in_flight: list[dict[str, str]] = []
            for _ in range(2000):
                while len(in_flight) < 8:
                    fields = client.sale_fields(100)
                    in_flight.append(fields)
                    await client.send_raw(client.encode(fields, mac=True))
                response = client.codec.decode(await client.receive_raw())
                request = in_flight.pop(0)
                assert response["11"] == request["11"]
                if response["39"] == "00":
                    approved.append(dict(request, **{"37": response["37"]}))
    except (TerminalError, OSError, anyio.BrokenResourceError, anyio.EndOfStream):
        assert killed.is_set(), "the host went away before it was killed"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_kill_9_loses_no_approved_sale(tmp_path: Path) -> None:
    setup = make_host(tmp_path, port=free_port())
    log = tmp_path / "host.log"
    proc = start_host(setup, log)
    approved: list[dict[str, str]] = []
    killed = anyio.Event()
    try:
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(burst, setup, approved, killed)
            with anyio.fail_after(20):
                while len(approved) < 150:
                    await anyio.sleep(0.01)
            killed.set()
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert len(approved) >= 150

    with sqlite3.connect(setup.config.db) as db:
        stored = {f"{rrn:012d}": (tid, stan, date) for rrn, tid, stan, date in
                  db.execute("SELECT rrn, tid, stan, local_date FROM sales")}  # fmt: skip
    for sale in approved:
        assert stored.get(sale["37"]) == (sale["41"], sale["11"], sale["13"]), sale["37"]

    proc = start_host(setup, log)
    try:
        client = TerminalClient(setup.key_files["TERM0001"])
        async with client:
            assert (await client.sign_on()).rc == "00"
            for sale in approved[:: max(1, len(approved) // 40)]:
                retransmission = {k: v for k, v in sale.items() if k != "37"}
                assert (await client.request(retransmission)).rc == "94"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
