"""The bank link (PROTOCOL.md 6) against the bank system simulator, over real TCP on
127.0.0.1: settlement updates queued by registrations, activations and batch closes reach the
bank, in order per terminal, each once in the bank's journal, through outages, refusals and two
dispatchers sharing one store."""

from __future__ import annotations

import dataclasses
import json
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
import trustme

from acqhost.cli import main as cli
from acqhost.config import BankConfig
from acqhost.domain.crypto import HostKeys
from acqhost.runtime.banklink import BankLink, backoff
from acqhost.store import open_store
from simulators.bank import BankServer
from simulators.bankcore import Bank, Faults, Journal, read_journal, settlement_totals
from simulators.processes import free_port
from tests.hostkit import BANK, HostSetup, make_host, running, signed_on

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def bank_config(port: int, **changes: Any) -> BankConfig:
    fast = {"retry_initial": 0.05, "retry_max": 0.2, "ack_timeout": 1.0, "echo_interval": 0.5}
    return BankConfig(name="bank", port=port, bank_codes=(BANK,), **{**fast, **changes})


def with_bank(setup: HostSetup, bank: BankConfig) -> HostSetup:
    setup.config = dataclasses.replace(setup.config, banks=(bank,))
    return setup


def host_keys(setup: HostSetup) -> HostKeys:
    return HostKeys.load(setup.config.key_path)


@asynccontextmanager
async def bank_system(
    setup: HostSetup, port: int, faults: Faults | None = None, tls: ssl.SSLContext | None = None
) -> AsyncIterator[BankServer]:
    """The bank simulator on ``port``, trusting this host's key, its journal in the folder."""
    bank = Bank(
        host_keys(setup).verify_key, Journal(setup.folder / "bank.jsonl"), faults or Faults()
    )
    server = BankServer(bank, tls=tls)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(server.run, "127.0.0.1", port, None)
            yield server
            tg.cancel_scope.cancel()
    finally:
        bank.journal.close()


def journal(setup: HostSetup) -> list[dict[str, Any]]:
    path = setup.folder / "bank.jsonl"
    return list(read_journal(path)) if path.exists() else []


async def until(check: Callable[[], bool], seconds: float = 10.0) -> None:
    with anyio.fail_after(seconds):
        while not check():
            await anyio.sleep(0.05)


def outbox(setup: HostSetup) -> list[tuple[int, str, str, str]]:
    store = open_store(setup.config.db)
    try:
        return [(a.id, a.tid, a.mti, a.state) for a in store.advices()]
    finally:
        store.close()


async def sell_and_settle(setup: HostSetup, amounts: list[int]) -> None:
    client = await signed_on(setup)
    for amount in amounts:
        assert (await client.sale(amount)).rc == "00"
    assert (await client.settle(1, len(amounts), sum(amounts))).rc == "00"
    await client.close()


async def test_registrations_and_a_batch_close_reach_the_bank_and_their_totals_agree(
    tmp_path: Path,
) -> None:
    port = free_port()
    setup = with_bank(make_host(tmp_path), bank_config(port))
    async with bank_system(setup, port) as bank, running(setup):
        await sell_and_settle(setup, [1000, 250])
        # Two registrations' 0320, one 0520: delivered once the bank has acknowledged them.
        await until(lambda: [s for *_, s in outbox(setup)] == ["delivered"] * 3)
    records = journal(setup)
    assert [(r["mti"], r["41"]) for r in records[:2]] == [
        ("0320", "TERM0001"),
        ("0320", "TERM0002"),
    ]
    assert (records[2]["mti"], records[2]["48"]["CT"], records[2]["48"]["AM"]) == (
        "0520",
        "2",
        "1250",
    )
    assert bank.bank.counters.duplicates == 0 and bank.bank.counters.bad_signature == 0
    assert {state for *_, state in outbox(setup)} == {"delivered"}
    # The bank's totals are the host's settlement report, one diff away.
    report = tmp_path / "report.csv"
    db = setup.config.db
    assert cli(["settle", "report", "--db", db, "--format", "totals", "--out", str(report)]) == 0
    host_lines = report.read_text().splitlines()
    bank_lines = [",".join(str(v) for v in row.values()) for row in settlement_totals(records)]
    assert host_lines[1:] == bank_lines


async def test_a_bank_down_for_a_while_gets_every_update_once_in_order(tmp_path: Path) -> None:
    port = free_port()
    setup = with_bank(make_host(tmp_path), bank_config(port))
    async with running(setup):
        await sell_and_settle(setup, [500])
        await anyio.sleep(1.0)  # the link tries, and backs off
        assert journal(setup) == []
        async with bank_system(setup, port):
            await until(lambda: [s for *_, s in outbox(setup)] == ["delivered"] * 3)
    ids = [r["37"] for r in journal(setup)]
    assert ids == sorted(ids) and len(set(ids)) == 3


async def test_an_answer_the_bank_marks_final_dead_letters_and_retry_sends_it_again(
    tmp_path: Path,
) -> None:
    port = free_port()
    setup = with_bank(make_host(tmp_path), bank_config(port, final_codes=("14",)))
    async with bank_system(setup, port, Faults(refuse="14")) as bank, running(setup):
        await until(lambda: [s for *_, s in outbox(setup)] == ["dead", "dead"])
        assert journal(setup) == []
        bank.bank.set_faults(Faults())
        assert cli(["banklink", "retry", "--all-dead", "--db", setup.config.db]) == 0
        await until(lambda: [s for *_, s in outbox(setup)] == ["delivered", "delivered"])
    assert len(journal(setup)) == 2


async def test_a_refused_signature_is_retried_then_dead_lettered_when_too_old(
    tmp_path: Path,
) -> None:
    port = free_port()
    setup = with_bank(make_host(tmp_path), bank_config(port, max_age=1.5))
    other = HostKeys.generate()  # the bank trusts another host's key: every SG is refused
    async with bank_system(setup, port) as bank:
        bank.bank.host_public_key = other.verify_key
        async with running(setup):
            await until(lambda: [s for *_, s in outbox(setup)] == ["dead", "dead"], 8)
    assert journal(setup) == [] and bank.bank.counters.bad_signature >= 2


async def test_two_dispatchers_on_one_store_deliver_each_update_once(tmp_path: Path) -> None:
    port = free_port()
    setup = make_host(tmp_path)
    bank = bank_config(port)
    links = [BankLink(bank, setup.config.db, host_keys(setup), owner=f"host-{n}") for n in (1, 2)]
    async with bank_system(setup, port) as server, anyio.create_task_group() as tg:
        for link in links:
            await tg.start(link.run)
        await until(lambda: [s for *_, s in outbox(setup)] == ["delivered"] * 2)
        await anyio.sleep(0.5)
        tg.cancel_scope.cancel()
    assert sorted(link.delivered for link in links) == [0, 2]
    assert server.bank.counters.duplicates == 0


def test_backoff_doubles_up_to_its_cap_with_jitter() -> None:
    bank = bank_config(1, retry_initial=1.0, retry_max=8.0)
    for attempts, cap in ((1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0)):
        waits = [backoff(bank, attempts) for _ in range(50)]
        assert all(cap / 2 <= w <= cap for w in waits), (attempts, waits[:3])
        assert len(set(waits)) > 1


async def test_a_bank_over_tls_with_a_client_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "host.pem", tmp_path / "host.key"
    ca.cert_pem.write_to_path(str(ca_file))
    client = ca.issue_cert("acqhost.example")
    client.cert_chain_pems[0].write_to_path(str(cert_file))
    client.private_key_pem.write_to_path(str(key_file))
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    ca.configure_trust(server_tls)
    server_tls.verify_mode = ssl.CERT_REQUIRED  # the bank takes only this CA's clients
    port = free_port()
    tls = {"tls_ca_file": str(ca_file), "tls_cert_file": str(cert_file),
           "tls_key_file": str(key_file)}  # fmt: skip
    setup = with_bank(make_host(tmp_path), bank_config(port, **tls))
    async with bank_system(setup, port, tls=server_tls), running(setup):
        await until(lambda: [s for *_, s in outbox(setup)] == ["delivered"] * 2)
    assert [r["mti"] for r in journal(setup)] == ["0320", "0320"]


def test_banklink_status_and_retry_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup = make_host(tmp_path)  # two registrations: two 0320s queued
    toml = tmp_path / "banks.toml"
    toml.write_text(f'[[banks]]\nname = "icbc"\nport = 9\nbank_codes = ["{BANK}"]\n')
    db = setup.config.db
    capsys.readouterr()
    assert cli(["banklink", "status", "--config", str(toml), "--db", db, "--json"]) == 0
    (status,) = json.loads(capsys.readouterr().out)
    assert (status["bank"], status["queued"], status["dead"], status["dispatcher"]) == (
        "icbc", 2, 0, "")  # fmt: skip
    store = open_store(db)
    try:
        first = store.advices()[0].id
        assert store.dead_letter(first, "refused by the bank with 14", time.time())
    finally:
        store.close()
    assert cli(["banklink", "status", "--config", str(toml), "--db", db]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["BANK", "QUEUED", "OLDEST", "RETRYING", "DEAD"]
    assert lines[1].split()[:2] == ["icbc", "1"] and lines[1].split()[4] == "1"
    assert "refused by the bank with 14" in lines[1]
    assert cli(["banklink", "retry", str(first), "--db", db, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"queued_again": 1}
    assert cli(["banklink", "retry", "999999", "--db", db]) == 2
    assert "advice 999999 is not waiting or dead" in capsys.readouterr().err
    assert cli(["banklink", "retry", "--db", db]) == 2
    assert cli(["banklink", "retry", "--all-dead", "--bank", "nope", "--db", db,
                "--config", str(toml)]) == 2  # fmt: skip
    assert "no bank named 'nope'" in capsys.readouterr().err
