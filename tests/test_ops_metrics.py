"""The operations endpoint of a real host on loopback, on asyncio and on trio: /metrics read
with urllib and parsed as Prometheus's text format (requests by MTI and code, latency, the
ledger, connections refused, security events, the bank links' outbox), /healthz and /readyz
(ready while accepting, 503 while draining and when the store does not answer)."""

from __future__ import annotations

import dataclasses
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from prometheus_client.parser import text_string_to_metric_families

from acqhost.config import BankConfig
from acqhost.config_ops import MetricsConfig
from acqhost.runtime.ops_http import OpsEndpoint
from acqhost.runtime.server import Server
from acqhost.store import open_store
from acqhost.store.outbox import NewAdvice
from simulators.processes import free_port
from simulators.terminal import TerminalClient
from tests.hostkit import BANK, HostSetup, make_host, running, signed_on

pytestmark = pytest.mark.anyio

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def with_metrics(setup: HostSetup, **changes: object) -> HostSetup:
    setup.config = dataclasses.replace(setup.config, metrics=MetricsConfig(0), **changes)
    return setup


def ops_of(server: Server) -> OpsEndpoint:
    assert isinstance(server.ops, OpsEndpoint) and server.ops.port is not None
    return server.ops


async def get(server: Server, path: str) -> tuple[int, str]:
    """(status, body) of GET ``path`` on the server's operations endpoint."""
    url = f"http://127.0.0.1:{ops_of(server).port}{path}"

    def fetch() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                return int(answer.status), answer.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    with anyio.fail_after(10):
        return await anyio.to_thread.run_sync(fetch)


async def scrape(server: Server) -> Samples:
    status, text = await get(server, "/metrics")
    assert status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_count_requests_by_mti_and_code_latency_ledger_and_security_events(
    tmp_path: Path,
) -> None:
    setup = with_metrics(make_host(tmp_path))
    async with running(setup) as server:
        client = await signed_on(setup)
        for _ in range(5):
            assert (await client.sale(100)).rc == "00"
        bad_mac = client.encode(client.sale_fields(100), mac=True)
        answer = client.codec.decode(await client.exchange_raw(bad_mac[:-8] + bytes(8)))
        assert answer["39"] == "63"
        forged = dict(setup.key_files["TERM0001"])
        forged["terminal_signing_key"] = setup.key_files["TERM0002"]["terminal_signing_key"]
        async with TerminalClient(forged) as impostor:
            assert (await impostor.sign_on()).rc == "63"
        samples = await scrape(server)
        await client.close()

    assert value(samples, "acqhost_requests_total", mti="0200", rc="00") == 5
    assert value(samples, "acqhost_requests_total", mti="0200", rc="63") == 1
    assert value(samples, "acqhost_requests_total", mti="0800", rc="00") == 1
    assert value(samples, "acqhost_requests_total", mti="0800", rc="63") == 1
    assert value(samples, "acqhost_request_latency_seconds_count", mti="0200") == 6
    assert value(samples, "acqhost_request_latency_seconds_bucket", mti="0200", le="+Inf") == 6
    assert 0 < value(samples, "acqhost_request_latency_seconds_sum", mti="0200") < 6
    assert value(samples, "acqhost_security_events_total", reason="BAD_MAC") == 1
    assert value(samples, "acqhost_security_events_total", reason="BAD_SIGNATURE") == 1
    assert value(samples, "acqhost_sign_ons_refused_total", reason="BAD_SIGNATURE") == 1
    assert value(samples, "acqhost_connections_open") == 1  # the client; the impostor left
    assert value(samples, "acqhost_ledger_queue") == 0
    assert value(samples, "acqhost_ledger_writes_total") >= 6  # a session and five sales
    assert value(samples, "acqhost_ledger_commit_seconds_count") >= 1
    assert value(samples, "acqhost_store_up") == 1
    assert value(samples, "process_cpu_seconds_total") > 0


async def test_an_mti_without_a_route_is_counted_as_other(tmp_path: Path) -> None:
    setup = with_metrics(make_host(tmp_path))
    async with running(setup) as server:
        client = await signed_on(setup)
        fields = dict(client.sale_fields(100), t="0100")
        assert (await client.request(fields)).rc == "12"
        samples = await scrape(server)
        await client.close()
    assert value(samples, "acqhost_requests_total", mti="other", rc="12") == 1
    assert not any(labels and ("mti", "0100") in labels for _, labels in samples)


async def test_connections_refused_at_the_maximum_are_counted(tmp_path: Path) -> None:
    setup = with_metrics(make_host(tmp_path, max_connections=1))
    async with running(setup) as server:
        client = await signed_on(setup)
        second = await anyio.connect_tcp("127.0.0.1", setup.config.port)
        with anyio.fail_after(5):  # the host closes it at once
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError, OSError)):
                await second.receive()
        await second.aclose()
        samples = await scrape(server)
        await client.close()
    assert value(samples, "acqhost_connections_refused_total", reason="max_connections") == 1
    assert value(samples, "acqhost_connections_open") == 1


async def test_the_bank_links_backlog_and_oldest_advice_age_come_from_the_outbox(
    tmp_path: Path,
) -> None:
    bank = BankConfig(name="bank1", port=free_port(), bank_codes=(BANK,), retry_initial=5.0)
    setup = with_metrics(make_host(tmp_path), banks=(bank,))
    store = open_store(setup.config.db)
    try:
        with store.transaction() as tx:  # the bank is down: they stay queued
            for age in (120.0, 30.0):
                tx.insert_advice(NewAdvice("TERM0001", "0320", BANK, b"x", time.time() - age))
        queued = len(store.advices(state="queued"))  # with those the terminals' set-up queued
    finally:
        store.close()
    async with running(setup) as server:
        samples = await scrape(server)
    assert queued >= 2
    assert value(samples, "acqhost_bank_backlog", bank="bank1") == queued
    assert 120 <= value(samples, "acqhost_bank_oldest_advice_age_seconds", bank="bank1") < 180


async def test_healthz_and_readyz_answer_while_serving_and_other_paths_do_not(
    tmp_path: Path,
) -> None:
    setup = with_metrics(make_host(tmp_path))
    async with running(setup) as server:
        assert await get(server, "/healthz") == (200, "ok\n")
        assert await get(server, "/readyz") == (200, "ready\n")
        assert (await get(server, "/readyz?verbose=1"))[0] == 200
        assert (await get(server, "/nothing"))[0] == 404


async def test_readyz_is_503_while_the_host_drains(tmp_path: Path) -> None:
    setup = with_metrics(make_host(tmp_path))
    async with running(setup) as server:
        client = await signed_on(setup)
        # Sales waiting for the ledger (SQLite's write lock held elsewhere) hold the drain open.
        blocker = sqlite3.connect(setup.config.db, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        requests = [client.sale_fields(100 + i) for i in range(5)]
        await client.send_pipelined(requests)
        await anyio.sleep(0.2)
        server.shutdown()
        try:
            status, body = await get(server, "/readyz")
            assert (status, body) == (503, "not ready: the listener is not accepting connections\n")
            assert (await get(server, "/healthz"))[0] == 200
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        answers = [client.codec.decode(await client.receive_raw()) for _ in requests]
        assert [a["39"] for a in answers] == ["00"] * len(requests)
        await client.close()


async def test_readyz_is_503_when_the_store_does_not_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = with_metrics(make_host(tmp_path))
    monkeypatch.setattr("acqhost.runtime.ops_http.STORE_SECONDS", 0.3)
    async with running(setup) as server:
        ops = ops_of(server)

        def hang(fn: object) -> object:  # a store whose server stopped answering
            time.sleep(1.0)
            return None

        monkeypatch.setattr(ops, "_call", hang)
        assert await get(server, "/readyz") == (503, "not ready: the store does not answer\n")
        samples = await scrape(server)
        assert value(samples, "acqhost_store_up") == 0
        monkeypatch.undo()
        with anyio.fail_after(5):
            while (await get(server, "/readyz"))[0] != 200:  # answers again: ready again
                await anyio.sleep(0.2)
