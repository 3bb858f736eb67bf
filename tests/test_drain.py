"""SIGTERM while sales are in flight, to ``acqhost serve`` in a process of its own, on asyncio
(uvloop) and on trio, with one worker and with two: the host stops accepting, answers what it
read, flushes the ledger and exits 0; every sale answered 00 is in the ledger, and nothing the
host did not answer is. A second SIGTERM during the drain (a process manager signalling every
process of the group) does not cut it short. With ``[metrics]``, each worker exports its own
figures on its own port (``port`` + its index)."""

from __future__ import annotations

import itertools
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import anyio
import pytest

from simulators.processes import free_port
from simulators.terminal import TerminalClient, TerminalError
from tests.hostkit import HostSetup, make_host
from tests.test_crash import start_host

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]


async def pipelined_until_closed(
    client: TerminalClient, count: int, signalled: anyio.Event
) -> list[dict[str, str]]:
    """Send ``count`` sales at once on ``client``; once ``signalled``, read answers until the
    host closes the connection. The answers, decoded."""
    requests = [client.sale_fields(100 + i % 500) for i in range(count)]
    await client.send_pipelined(requests)
    answers = [client.codec.decode(await client.receive_raw())]
    await signalled.wait()
    try:
        while True:
            answers.append(client.codec.decode(await client.receive_raw()))
    except (TerminalError, anyio.BrokenResourceError, OSError):
        pass
    assert [a["11"] for a in answers] == [r["11"] for r in requests[: len(answers)]]
    return answers


async def drain_under_load(
    setup: HostSetup, proc: subprocess.Popen[bytes], *, connections: int
) -> list[dict[str, str]]:
    """Sales in flight on ``connections`` connections, SIGTERM, the answers."""
    clients = []
    for i in range(connections):
        client = setup.client()
        await client.connect()
        if i == 0:
            assert (await client.sign_on()).rc == "00"
        clients.append(client)
    for i, client in enumerate(clients):
        client.keys = clients[0].keys  # one terminal's session, on every worker
        client._stan = itertools.count(1000 * (i + 1))  # no two sales alike (else 94)
    answers: list[list[dict[str, str]]] = [[] for _ in clients]
    signalled = anyio.Event()

    async def one(i: int) -> None:
        answers[i] = await pipelined_until_closed(clients[i], 300, signalled)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for i in range(len(clients)):
                tg.start_soon(one, i)
            await anyio.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            signalled.set()
        assert await anyio.to_thread.run_sync(proc.wait, 20) == 0
    for client in clients:
        await client.close()
    return [a for per_client in answers for a in per_client]


def check_ledger(setup: HostSetup, answered: list[dict[str, str]]) -> None:
    assert {a["39"] for a in answered} == {"00"}
    with sqlite3.connect(setup.config.db) as db:
        stored = {f"{r:012d}" for (r,) in db.execute("SELECT rrn FROM sales")}
    assert {a["37"] for a in answered} <= stored
    # Sales read before the signal but not answered cannot be in the ledger without an
    # answer having been owed: the drain answers everything it read.
    assert len(stored) == len(answered)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
async def test_sigterm_answers_the_sales_in_flight_flushes_them_and_exits_0(
    tmp_path: Path, backend: str
) -> None:
    setup = make_host(tmp_path, port=free_port())
    log = tmp_path / "host.log"
    proc = start_host(setup, log, "--backend", backend)
    try:
        answered = await drain_under_load(setup, proc, connections=3)
    finally:
        proc.kill()
        proc.wait()
    check_ledger(setup, answered)
    text = log.read_text()
    assert '"draining"' in text and '"stopped"' in text
    assert '"drain timed out"' not in text


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
async def test_a_second_sigterm_while_the_ledger_waits_does_not_cut_the_drain_short(
    tmp_path: Path, backend: str
) -> None:
    setup = make_host(tmp_path, port=free_port())
    log = tmp_path / "host.log"
    proc = start_host(setup, log, "--backend", backend)
    try:
        client = setup.client()
        async with client:
            assert (await client.sign_on()).rc == "00"
            # The sales wait for the ledger while SQLite's write lock is held here.
            blocker = sqlite3.connect(setup.config.db, isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")
            requests = [client.sale_fields(100 + i) for i in range(20)]
            await client.send_pipelined(requests)
            await anyio.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            await anyio.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            await anyio.sleep(0.3)
            assert proc.poll() is None, log.read_text()
            blocker.execute("ROLLBACK")
            blocker.close()
            answered = [client.codec.decode(await client.receive_raw()) for _ in requests]
        assert await anyio.to_thread.run_sync(proc.wait, 20) == 0
    finally:
        proc.kill()
        proc.wait()
    check_ledger(setup, answered)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
async def test_sigterm_to_two_workers_drains_both_and_exits_0(tmp_path: Path, backend: str) -> None:
    setup = make_host(tmp_path, port=free_port())
    log = tmp_path / "host.log"
    proc = start_host(setup, log, "--backend", backend, "--workers", "2")
    try:
        answered = await drain_under_load(setup, proc, connections=6)
    finally:
        proc.kill()
        proc.wait()
    check_ledger(setup, answered)
    text = log.read_text()
    assert text.count('"stopped"') == 2


async def test_each_worker_exports_its_own_metrics_on_its_own_port(tmp_path: Path) -> None:
    metrics_port = two_free_ports()
    config = tmp_path / "acqhost.toml"
    config.write_text(f"[metrics]\nport = {metrics_port}\n")
    setup = make_host(tmp_path, port=free_port())
    proc = start_host(setup, tmp_path / "host.log", "--workers", "2", "--config", str(config))
    try:
        texts = []
        for port in (metrics_port, metrics_port + 1):
            url = f"http://127.0.0.1:{port}/metrics"
            texts.append(await anyio.to_thread.run_sync(fetch_when_up, url))
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    workers = sorted(line.split('worker="')[1][0] for t in texts for line in t.splitlines()
                     if line.startswith("acqhost_info{"))  # fmt: skip
    assert workers == ["0", "1"]


def two_free_ports() -> int:
    """A loopback port that is free, with the next one free too (worker 1's)."""
    for _ in range(100):
        port = free_port()
        if port >= 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two free loopback ports in a row")


def fetch_when_up(url: str, seconds: float = 15) -> str:
    end = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                return str(answer.read().decode())
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


async def test_a_worker_whose_metrics_port_is_taken_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """Worker 1 cannot listen on [metrics] port + 1: one line naming it, no traceback, the
    other worker stopped, and the parent's exit status 2."""
    metrics_port = two_free_ports()
    config = tmp_path / "acqhost.toml"
    config.write_text(f"[metrics]\nport = {metrics_port}\n")
    setup = make_host(tmp_path, port=free_port())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", metrics_port + 1))
        taken.listen()
        out = subprocess.run(
            [sys.executable, "-m", "acqhost", "serve", "--db", setup.config.db,
             "--port", str(setup.config.port), "--workers", "2", "--config", str(config),
             "--log-level", "warning"],
            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("acqhost: worker 1: "), lines
    assert str(metrics_port + 1) in lines[0]
