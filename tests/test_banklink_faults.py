"""The bank link under faults, end to end over 127.0.0.1: the bank simulator restarted in the
middle of a stream of updates, a host SIGKILLed with updates still undelivered, several host
processes (``--workers 2``, and two hosts on one PostgreSQL database) with one dispatcher
between them, a bank that drops answers or closes connections. Each time: every update reaches
the bank's journal, once, in outbox order per terminal."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from acqhost.cli import main as cli
from acqhost.domain import advices
from acqhost.domain.crypto import HostKeys
from acqhost.store import StoredAdvice, open_store
from simulators.bankcore import Faults, read_journal
from simulators.processes import free_port, wait_listening
from tests.hostkit import BANK, HostSetup, add_terminal, make_host, make_postgres_host, running
from tests.test_banklink import bank_config, bank_system, with_bank

ROOT = Path(__file__).resolve().parents[1]
MORE_TERMINALS = ("TERM0003", "TERM0004")
FAST = {"retry_initial": 0.05, "retry_max": 0.2, "ack_timeout": 1.0, "echo_interval": 0.5}


# -- helpers: the outbox and the journal -----------------------------------------------------------


def add_terminals(setup: HostSetup, *extra: str) -> tuple[str, ...]:
    """TERM0003 and TERM0004 besides make_host's two (each queues its registration's 0320)."""
    for n, tid in enumerate(MORE_TERMINALS, 3):
        add_terminal(setup.folder, setup.config.db, tid, f"MERCHANT000000{n}", *extra)
    return ("TERM0001", "TERM0002", *MORE_TERMINALS)


def queue_settlements(setup: HostSetup, tids: tuple[str, ...], batches: range) -> None:
    """One 0520 per batch and terminal, terminals interleaved, each in its own transaction
    (as a batch close queues it)."""
    data_key = HostKeys.load(setup.config.key_path).data_key
    store = open_store(setup.config.db)
    try:
        for batch in batches:
            for tid in tids:
                with store.transaction(tid) as tx:
                    version = tx.versions(tid)[0]
                    advices.queue_settlement_advice(
                        tx, data_key, tid, batch, version, batch, 100 * batch, time.time()
                    )
    finally:
        store.close()


def outbox(db: str) -> list[StoredAdvice]:
    store = open_store(db)
    try:
        return store.advices()
    finally:
        store.close()


def journal(path: Path) -> list[dict[str, Any]]:
    return list(read_journal(path)) if path.exists() else []


def assert_delivered_once_in_order(db: str, journal_path: Path) -> list[dict[str, Any]]:
    """Every advice of the outbox delivered (acknowledged 00), its field 37 once in the
    journal, and each terminal's advices recorded in the order of their outbox ids. The
    journal's records."""
    queued = outbox(db)
    records = journal(journal_path)
    assert queued and {(a.state, a.ack_code) for a in queued} == {("delivered", "00")}
    ids = [r["37"] for r in records]
    assert len(ids) == len(set(ids)), "a field 37 recorded twice"
    assert sorted(ids) == sorted(advices.event_id(a.id) for a in queued)
    for tid in {a.tid for a in queued}:
        expected = [advices.event_id(a.id) for a in queued if a.tid == tid]
        assert [r["37"] for r in records if r["41"] == tid] == expected, tid
    return records


async def until(check: Callable[[], bool], seconds: float, what: str) -> None:
    with anyio.move_on_after(seconds):
        while not check():
            await anyio.sleep(0.02)
        return
    raise AssertionError(f"not within {seconds:g} s: {what}")


def wait_for(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds:g} s: {what}")
        time.sleep(0.05)


def all_delivered(db: str) -> Callable[[], bool]:
    return lambda: {a.state for a in outbox(db)} == {"delivered"}


# -- helpers: processes ----------------------------------------------------------------------------


def write_config(folder: Path, bank_port: int, name: str = "bank.toml", **bank: Any) -> Path:
    settings = {**FAST, **bank}
    lines = ["[[banks]]", 'name = "bank"', f"port = {bank_port}", f'bank_codes = ["{BANK}"]']
    lines += [f"{key} = {value!r}" for key, value in settings.items()]
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def log_events(log: Path, event: str) -> list[dict[str, Any]]:
    found = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == event:
            found.append(record)
    return found


def stop(proc: subprocess.Popen[bytes], seconds: float = 20) -> int | None:
    """SIGTERM, then (after ``seconds``) SIGKILL to its process group: the process and any
    worker it spawned (each is started in a session of its own). Its exit status, None if it
    had to be killed."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # not reaped yet: its group is still ours
        proc.wait(timeout=seconds)
        return None


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


@contextmanager
def host_process(
    setup: HostSetup, config: Path, log: Path, port: int, workers: int = 1
) -> Iterator[subprocess.Popen[bytes]]:
    """``acqhost serve --config`` on ``port`` until the block ends (SIGTERM), once its
    ``workers`` processes all listen."""
    listening = len(log_events(log, "listening")) if log.exists() else 0
    proc = start(
        [sys.executable, "-m", "acqhost", "serve", "--config", str(config),
         "--db", setup.config.db, "--keys", str(setup.config.key_path), "--port", str(port),
         "--workers", str(workers), "--log-level", "info"],
        log,
    )  # fmt: skip
    try:
        try:
            wait_listening(port, proc)
            wait_for(
                lambda: len(log_events(log, "listening")) >= listening + workers,
                15,
                f"{workers} workers listening",
            )
        except (RuntimeError, AssertionError) as e:
            raise AssertionError(f"{e}: {log.read_text(errors='replace')}") from None
        yield proc
    finally:
        stop(proc)


@contextmanager
def bank_process(
    folder: Path, port: int, host_key: bytes, *faults: str
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``acqhost-bank serve`` on ``port``, its journal bank.jsonl in ``folder``, with a
    control port (the second item)."""
    control_port = free_port()
    log = folder / "bank.log"
    proc = start(
        [sys.executable, "-m", "simulators.bank", "serve", "--port", str(port),
         "--control-port", str(control_port), "--host-key", host_key.hex(),
         "--out", str(folder / "bank.jsonl"), *faults],
        log,
    )  # fmt: skip
    try:
        try:
            wait_listening(port, proc)
            wait_listening(control_port, proc)
        except RuntimeError as e:
            raise AssertionError(f"{e}: {log.read_text(errors='replace')}") from None
        yield proc, control_port
    finally:
        stop(proc, 10)


def control(port: int, command: dict[str, Any]) -> dict[str, Any]:
    """One command on the bank simulator's control port, and its reply."""
    with socket.create_connection(("127.0.0.1", port), 5) as sock:
        sock.sendall(json.dumps(command).encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(65536)
            assert chunk, "the control port closed without a reply"
            reply += chunk
    answer: dict[str, Any] = json.loads(reply)
    assert answer["ok"] is True, answer
    return answer


def banklink_status(setup: HostSetup, config: Path, capsys: pytest.CaptureFixture[str]) -> Any:
    capsys.readouterr()
    db, keys = setup.config.db, str(setup.config.key_path)
    status = cli(
        ["banklink", "status", "--json", "--config", str(config), "--db", db, "--keys", keys]
    )
    assert status == 0
    return json.loads(capsys.readouterr().out)


def sell_and_settle(setup: HostSetup, tids: tuple[str, ...]) -> None:
    """A sale and a batch close on each terminal: one 0520 each."""

    async def go() -> None:
        with anyio.fail_after(20):
            for tid in tids:
                async with setup.client(tid) as client:
                    assert (await client.sign_on()).rc == "00"
                    assert (await client.sale(700)).rc == "00"
                    assert (await client.settle(1, 1, 700)).rc == "00"

    anyio.run(go)


# -- the bank restarts in the middle of a stream ---------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_a_bank_restarted_mid_stream_gets_every_update_once_in_order(
    tmp_path: Path,
) -> None:
    port = free_port()
    setup = with_bank(make_host(tmp_path), bank_config(port))
    tids = add_terminals(setup)
    queue_settlements(setup, tids, range(1, 11))
    total = len(outbox(setup.config.db))
    assert total == 4 + 40
    journal_path = tmp_path / "bank.jsonl"
    # Each answer comes 40 ms after the bank has recorded its advice, and the link sends four
    # advices at a time (one per terminal): stopped in the middle of such a round, the bank
    # has recorded advices it will never have acknowledged.
    slow = Faults(delay=0.04)
    async with running(setup):
        async with bank_system(setup, port, slow) as first:
            await until(lambda: len(first.bank.journal) >= 14, 15, "14 advices recorded")
        recorded = [r["37"] for r in journal(journal_path)]
        assert 14 <= len(recorded) < total
        await anyio.sleep(0.5)  # the bank is down; the link records what was answered
        assert len(journal(journal_path)) == len(recorded)
        queued = {advices.event_id(a.id) for a in outbox(setup.config.db) if a.state == "queued"}
        assert queued & set(recorded), "no advice recorded by the bank and unacknowledged"
        async with bank_system(setup, port, slow) as second:  # same port, same journal
            await until(all_delivered(setup.config.db), 20, "every advice delivered")
    assert_delivered_once_in_order(setup.config.db, journal_path)
    assert first.bank.counters.accepted + second.bank.counters.accepted == total
    # What the first bank recorded but never acknowledged came again: acknowledged, not
    # recorded again.
    assert second.bank.counters.duplicates >= len(queued & set(recorded))
    assert second.bank.counters.conflicts == 0


# -- the host is killed with updates undelivered ---------------------------------------------------


def test_a_host_killed_with_updates_undelivered_delivers_them_after_a_restart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bank_port, host_port = free_port(), free_port()
    setup = make_host(tmp_path, port=host_port)
    tids = add_terminals(setup)
    config = write_config(tmp_path, bank_port)
    log = tmp_path / "host.log"
    with host_process(setup, config, log, host_port) as proc:
        sell_and_settle(setup, tids[:2])  # two 0520s, after the four registrations' 0320s
        wait_for(lambda: bool(log_events(log, "bank lease taken")), 10, "the lease taken")
        (status,) = banklink_status(setup, config, capsys)
        assert (status["queued"], status["dead"]) == (6, 0)
        assert f":{proc.pid}:" in status["dispatcher"]
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    assert [a.state for a in outbox(setup.config.db)] == ["queued"] * 6
    keys = HostKeys.load(setup.config.key_path)
    with (
        bank_process(tmp_path, bank_port, keys.verify_key) as (_, control_port),
        host_process(setup, config, log, host_port),
    ):
        # The dead host's lease runs out (10 s at most), then the new host delivers.
        wait_for(all_delivered(setup.config.db), 30, "every advice delivered")
        counters = control(control_port, {"op": "get"})["counters"]
    records = assert_delivered_once_in_order(setup.config.db, tmp_path / "bank.jsonl")
    assert [r["mti"] for r in records].count("0520") == 2
    assert (counters["accepted"], counters["duplicates"], counters["bad_signature"]) == (6, 0, 0)
    assert len(log_events(log, "bank lease taken")) == 2  # the killed host's, the new one's


# -- one dispatcher among several processes --------------------------------------------------------


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_one_dispatcher_among_host_processes_delivers_each_update_once(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    """PostgreSQL: two hosts of two workers each (four processes) on one database; SQLite:
    one host of two workers. Each runs the bank's link; one holds its lease."""
    bank_port = free_port()
    if backend == "postgres":
        setup = make_postgres_host(tmp_path, request.getfixturevalue("pg_url"))
        tids = add_terminals(setup, "--keys", str(setup.config.key_path))
        hosts = 2
    else:
        setup = make_host(tmp_path)
        tids = add_terminals(setup)
        hosts = 1
    config = write_config(tmp_path, bank_port, ack_timeout=5.0)
    keys = HostKeys.load(setup.config.key_path)
    logs = [tmp_path / f"host{n}.log" for n in range(hosts)]
    with contextlib.ExitStack() as stack:
        _, control_port = stack.enter_context(bank_process(tmp_path, bank_port, keys.verify_key))
        for log in logs:
            stack.enter_context(host_process(setup, config, log, free_port(), workers=2))
        # Updates queued while every process is up and asks for the lease.
        for first in (1, 4):
            queue_settlements(setup, tids, range(first, first + 3))
            time.sleep(0.3)
        wait_for(all_delivered(setup.config.db), 20, "every advice delivered")
        (status,) = banklink_status(setup, config, capsys)
        counters = control(control_port, {"op": "get"})["counters"]
        # Before any process stops (the dispatcher's lease is released when it stops, and
        # another process may take it then).
        taken = [e for log in logs for e in log_events(log, "bank lease taken")]
    total = 4 + 6 * len(tids)
    assert_delivered_once_in_order(setup.config.db, tmp_path / "bank.jsonl")
    # Sent once each: no other process sent any of them again.
    assert (counters["received"], counters["accepted"]) == (total, total)
    assert counters["duplicates"] == 0
    assert len(taken) == 1, taken
    assert (status["queued"], status["dead"], status["dispatcher"]) == (0, 0, taken[0]["owner"])
    assert sum(len(log_events(log, "listening")) for log in logs) == 2 * hosts


# -- a bank that drops answers, or closes connections ----------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_dropped_answers_are_resent_with_the_repeat_mti_and_the_same_37(
    tmp_path: Path,
) -> None:
    port = free_port()
    setup = with_bank(make_host(tmp_path), bank_config(port, ack_timeout=0.5))
    tids = add_terminals(setup)
    queue_settlements(setup, tids, range(1, 4))
    async with bank_system(setup, port, Faults(drop_every=3)) as bank, running(setup):
        await until(all_delivered(setup.config.db), 20, "every advice delivered")
    records = assert_delivered_once_in_order(setup.config.db, tmp_path / "bank.jsonl")
    assert bank.bank.counters.dropped >= 5 and bank.bank.counters.duplicates == 0
    # An advice sent again (after a dropped answer) came as a repeat, 0321 / 0521, under the
    # 37 of its first transmission; one that never failed as itself.
    attempts = {advices.event_id(a.id): a.attempts for a in outbox(setup.config.db)}
    for record in records:
        repeat = attempts[record["37"]] > 0
        assert record["mti"][3] == ("1" if repeat else "0"), (record["37"], record["mti"])
    assert sum(1 for r in records if r["mti"] in ("0321", "0521")) >= 3


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_a_bank_that_closes_connections_gets_the_rest_after_reconnections(
    tmp_path: Path, json_logs: io.StringIO
) -> None:
    port = free_port()
    setup = with_bank(make_host(tmp_path), bank_config(port, ack_timeout=0.5))
    tids = add_terminals(setup)
    queue_settlements(setup, tids, range(1, 4))
    # Two advices per connection, while the link sends one per terminal (four) at a time.
    async with bank_system(setup, port, Faults(close_after=2)) as bank, running(setup):
        await until(all_delivered(setup.config.db), 20, "every advice delivered")
    assert_delivered_once_in_order(setup.config.db, tmp_path / "bank.jsonl")
    assert bank.bank.counters.accepted == 16
    # Each time the bank closed, the link was down (a warning), not failing (an error).
    events = [json.loads(line) for line in json_logs.getvalue().splitlines()]
    assert "bank link down" in {e["event"] for e in events}
    assert [e for e in events if e["level"] == "error"] == []
