"""Several host processes sharing one PostgreSQL database: a new account takes effect at its
effective-from in every process, changes reach other processes' caches at once (LISTEN/NOTIFY,
also after the listening connection was cut), and concurrent submissions for one terminal give
exactly one pending request (on SQLite too)."""

from __future__ import annotations

import dataclasses
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from acqhost.cli import main as cli
from acqhost.config import RebindPolicy
from acqhost.domain import accounts, crypto, rebind
from acqhost.runtime.app import build_server, close_stores
from acqhost.store import open_store
from acqhost.store.base import AccountVersion, SaleRecord, Store
from acqhost.store.pg_listen import APPLICATION_NAME, EVERYTHING
from simulators.processes import free_port, wait_listening
from simulators.terminal import Exchange, TerminalClient
from tests.hostkit import (
    ACCOUNT,
    BANK,
    HOLDER,
    HostSetup,
    make_host,
    make_postgres_host,
    running,
)

ROOT = Path(__file__).resolve().parents[1]
TID = "TERM0001"
# Two Luhn-valid accounts other than the registered one.
NEW_ACCOUNTS = ("6217000100200030007", "6228480012345678903")
CLOCK_SLACK = 0.005  # seconds: timestamps of the test and of the hosts are not exact
PROMPTLY = 0.5  # seconds: well under the caches' own lifetime (CACHE_SECONDS = 1)


def data_key(setup: HostSetup) -> bytes:
    return crypto.HostKeys.load(setup.config.key_path).data_key


@contextmanager
def opened(db: str) -> Iterator[Store]:
    store = open_store(db)
    try:
        yield store
    finally:
        store.close()


@contextmanager
def host_processes(setup: HostSetup, count: int, *extra: str) -> Iterator[list[int]]:
    """``count`` ``acqhost serve`` processes on the setup's database, each on its own port;
    stopped with SIGTERM (and expected to exit 0) when the block ends."""
    procs: list[subprocess.Popen[bytes]] = []
    ports = []
    try:
        for n in range(count):
            port = free_port()
            log = setup.folder / f"host{n}.log"
            proc = subprocess.Popen(
                [sys.executable, "-m", "acqhost", "serve", "--db", setup.config.db,
                 "--keys", str(setup.config.key_path), "--port", str(port),
                 "--log-level", "info", *extra],
                cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT,
            )  # fmt: skip
            procs.append(proc)
            try:
                wait_listening(port, proc)
            except RuntimeError as e:
                raise AssertionError(f"{e}: {log.read_text()}") from None
            ports.append(port)
        yield ports
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        codes = []
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=20))
            except subprocess.TimeoutExpired:  # never leave a host behind
                proc.kill()
                codes.append(proc.wait())
    assert codes == [0] * count


def clients(setup: HostSetup, ports: list[int]) -> list[TerminalClient]:
    """One client of TERM0001 per host. They share one STAN sequence, as one terminal would
    (the hosts share its duplicate check); sessions are shared by setting ``keys``."""
    made = [TerminalClient(setup.key_files[TID], port=port) for port in ports]
    for client in made[1:]:
        client._stan = made[0]._stan
    return made


async def answered_within(seconds: float, rc: str, request: Any, meanwhile: str = "00") -> float:
    """Send ``request()`` until it is answered ``rc``; how long that took (at most
    ``seconds``, else the test fails). Every earlier answer must be ``meanwhile``."""
    start = time.monotonic()
    while True:
        ex: Exchange = await request()
        elapsed = time.monotonic() - start
        if ex.rc == rc:
            return elapsed
        assert ex.rc == meanwhile, ex.response
        assert elapsed < seconds, f"still {ex.rc} after {elapsed:.3f} s"
        await anyio.sleep(0.01)


# -- activation across processes ----------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_two_host_processes_switch_to_the_new_account_at_effective_from(
    tmp_path: Path, pg_url: str
) -> None:
    setup = make_postgres_host(tmp_path, pg_url)
    policy = RebindPolicy(review="manual", cooling_off=2.0, min_interval=0.0)
    config = tmp_path / "acqhost.toml"
    config.write_text('[rebind]\nreview = "manual"\ncooling_off = 2\nmin_interval = 0\n')
    sold: list[tuple[str, float, float, str, str]] = []  # host, sent, answered, SV, RRN

    async def sell_until(name: str, client: TerminalClient, until: float) -> None:
        while time.time() < until:
            sent = time.time()
            ex = await client.sale(100)
            answered = time.time()
            assert ex.rc == "00", ex.response
            sold.append((name, sent, answered, ex.tlv["SV"], ex.response["37"]))

    with host_processes(setup, 2, "--config", str(config)) as ports:
        a, b = clients(setup, ports)
        async with a, b:
            assert (await a.sign_on()).rc == "00"
            b.keys = a.keys
            ex = await a.rebind_submit(
                operator_id="01", password="0000", holder=HOLDER, bank_code=BANK,
                account=NEW_ACCOUNTS[0],
            )  # fmt: skip
            assert ex.rc == "00" and ex.tlv["ST"] == "PENDING_REVIEW", ex.response
            for client in (a, b):
                assert (await client.sale(100)).tlv["SV"] == "1"

            def approve() -> float:
                with opened(pg_url) as store, store.transaction(TID) as tx:
                    now = time.time()
                    return rebind.approve(tx, data_key(setup), ex.tlv["RF"], "rev", policy, now)

            ef = await anyio.to_thread.run_sync(approve)
            async with anyio.create_task_group() as tg:
                tg.start_soon(sell_until, "A", a, ef + 0.5)
                tg.start_soon(sell_until, "B", b, ef + 0.5)

        # No process answered with the old account once EF had passed, nor with the new one
        # before it.
        for name in ("A", "B"):
            mine = [s for s in sold if s[0] == name]
            before = [sv for _, _, answered, sv, _ in mine if answered < ef - CLOCK_SLACK]
            after = [sv for _, sent, _, sv, _ in mine if sent > ef + CLOCK_SLACK]
            assert before and set(before) == {"1"}, name
            assert after and set(after) == {"2"}, name
        # Recorded ACTIVE by exactly one of the two processes (each tries every second).
        with opened(pg_url) as store:
            with anyio.fail_after(5):
                while store.account_history(TID)[1].state != "ACTIVE":
                    await anyio.sleep(0.05)
            with store.transaction(write=False) as tx:
                activated = [e for e in tx.audit_entries() if e.action == "account.activated"]
            assert [e.subject for e in activated] == ["v2"]
            # Every sale settles to the version its 0210 named.
            versions = {s.rrn: str(s.account_version) for s in store.sales(TID)}
        assert all(versions[rrn] == sv for *_, sv, rrn in sold)
    logs = [(tmp_path / f"host{n}.log").read_text() for n in range(2)]
    assert sum(log.count('"account activated"') for log in logs) == 1


# -- invalidation across processes --------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_sign_on_and_disable_reach_the_other_host_at_once(
    tmp_path: Path, pg_url: str
) -> None:
    setup = make_postgres_host(tmp_path, pg_url)
    with host_processes(setup, 2) as ports:
        a, b = clients(setup, ports)
        async with a, b:
            assert (await a.sign_on()).rc == "00"
            b.keys = a.keys
            assert (await b.sale(100)).rc == "00"  # B has the first session's keys cached
            assert (await a.sign_on()).rc == "00"  # new keys, through A
            # B drops the old keys as soon as it hears of the new sign-on...
            assert await answered_within(PROMPTLY, "63", lambda: b.sale(100)) < PROMPTLY
            b.keys = a.keys  # ...and takes the new ones at once
            assert (await b.sale(100)).rc == "00"
            assert (await a.sale(100)).rc == "00"

            # B has TERM0001 cached as active; the acquirer disables it through the CLI.
            assert (await b.sale(100)).rc == "00"
            status = await anyio.to_thread.run_sync(
                cli,
                ["terminal", "disable", TID, "--db", pg_url, "--keys", str(setup.config.key_path)],
            )
            assert status == 0
            assert await answered_within(PROMPTLY, "58", lambda: b.sale(100)) < PROMPTLY
            # A hears of it from the same notification, perhaps a moment after B.
            assert await answered_within(PROMPTLY, "58", lambda: a.sale(100)) < PROMPTLY


# -- the listener ----------------------------------------------------------------------------


def test_the_store_announces_committed_changes_to_what_hosts_cache(
    tmp_path: Path, pg_url: str
) -> None:
    setup = make_postgres_host(tmp_path, pg_url)
    key = data_key(setup)
    events: queue.Queue[tuple[str, str]] = queue.Queue()

    def put(kind: str, tid: str) -> None:
        events.put((kind, tid))

    def expect(*wanted: tuple[str, str]) -> None:
        got = [events.get(timeout=5) for _ in wanted]
        assert sorted(got) == sorted(wanted)

    from acqhost.store.postgres import PostgresStore

    store = PostgresStore(pg_url)
    try:
        listener = store.cache_listener(put)
        listener.start()
        try:
            assert listener.wait_ready(5)
            expect((EVERYTHING, ""))
            assert store.set_terminal_status(TID, "disabled")
            expect(("terminal", TID))
            assert not store.set_terminal_status("NOSUCHTM", "disabled")
            store.drop_session(TID)  # there is none: nothing changed
            store.record_sales([sale_record()])  # the hot path announces nothing
            # Nothing is announced for a rollback.
            with pytest.raises(RuntimeError), store.transaction(TID) as tx:
                tx.insert_version(new_version(tx.versions(TID)[0], 2))
                raise RuntimeError("changed my mind")
            store.set_terminal_status("TERM0002", "disabled")  # the next announcement
            expect(("terminal", "TERM0002"))
            # Activation names no terminal up front: the ones it changed are announced.
            with store.transaction(TID) as tx:
                tx.insert_version(new_version(tx.versions(TID)[0], 2, state="APPROVED"))
            expect(("account", TID))
            with store.transaction() as tx:
                assert len(accounts.activate_due(tx, key, time.time() + 1)) == 1
            expect(("account", TID))
            assert events.empty()
        finally:
            listener.stop()
    finally:
        store.close()
    assert listener.connections == 1


def sale_record() -> SaleRecord:
    return SaleRecord(
        tid=TID, mid="MERCHANT0000001", stan="000001", local_date="0101", local_time="120000",
        transmission="0101120000", amount=100, currency="156", pan_masked="6222********0128",
        auth_code="000001", test=False, account_version=1, batch_no=1, received_at=time.time(),
    )  # fmt: skip


def new_version(v1: AccountVersion, number: int, state: str = "PENDING_REVIEW") -> AccountVersion:
    return dataclasses.replace(v1, version=number, state=state, effective_from=time.time())


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_the_host_listens_again_after_its_connection_is_cut(
    tmp_path: Path, pg_url: str
) -> None:
    setup = make_postgres_host(tmp_path, pg_url)

    import psycopg

    def listener_pids() -> list[int]:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = %s",
                (APPLICATION_NAME,),
            ).fetchall()
        return [row[0] for row in rows]

    def cut(pid: int) -> None:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))

    def set_status(status: str) -> None:
        with opened(pg_url) as store:
            assert store.set_terminal_status(TID, status)

    async with running(setup):
        client = setup.client()
        async with client:
            assert (await client.sign_on()).rc == "00"
            assert (await client.sale(100)).rc == "00"  # TERM0001 cached as active
            await anyio.to_thread.run_sync(set_status, "disabled")
            assert await answered_within(PROMPTLY, "58", lambda: client.sale(100)) < PROMPTLY
            await anyio.to_thread.run_sync(set_status, "active")
            assert await answered_within(PROMPTLY, "00", lambda: client.sale(100), "58") < PROMPTLY

            (pid,) = await anyio.to_thread.run_sync(listener_pids)
            await anyio.to_thread.run_sync(cut, pid)
            with anyio.fail_after(5):  # a new connection, listening again
                while (pids := await anyio.to_thread.run_sync(listener_pids)) in ([], [pid]):
                    await anyio.sleep(0.05)
            assert len(pids) == 1
            await anyio.sleep(0.1)  # its LISTEN comes just after the connection shows up

            assert (await client.sale(100)).rc == "00"
            await anyio.to_thread.run_sync(set_status, "disabled")
            assert await answered_within(PROMPTLY, "58", lambda: client.sale(100)) < PROMPTLY


def test_a_host_on_sqlite_has_no_listener(tmp_path: Path) -> None:
    server = build_server(make_host(tmp_path).config)
    try:
        names = [service.__qualname__ for service in server.services]
        assert names == ["activations.<locals>.run"]  # no cache listener
    finally:
        close_stores(server)


# -- races ---------------------------------------------------------------------------------------


def submit_together(stores: list[Store], key: bytes, round_: int) -> list[Any]:
    """Each store submits a change of TERM0001 (to an account of its own) in a thread of its
    own, released together; their outcomes (or what they raised)."""
    policy = RebindPolicy(review="manual", cooling_off=0.0, min_interval=0.0)
    barrier = threading.Barrier(len(stores))
    outcomes: list[Any] = [None] * len(stores)

    def submit(n: int) -> None:
        sub = rebind.Submission(
            tid=TID, operator_id="01", stan=f"{round_ * 2 + n + 1:06d}",
            transmission="0101120000", holder=HOLDER, bank_code=BANK, branch="",
            account=NEW_ACCOUNTS[n], source="typed",
        )  # fmt: skip
        try:
            barrier.wait(5)
            with stores[n].transaction(TID) as tx:
                outcomes[n] = rebind.submit(
                    tx, key, sub, password_ok=True, policy=policy, now=time.time()
                )
        except BaseException as e:  # shown by the caller's assertion
            outcomes[n] = e

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return outcomes


@pytest.mark.parametrize("db_kind", ["sqlite", "postgresql"])
def test_concurrent_submissions_for_one_terminal_leave_one_pending_request(
    tmp_path: Path, db_kind: str, request: pytest.FixtureRequest
) -> None:
    if db_kind == "sqlite":
        setup = make_host(tmp_path)
    else:
        setup = make_postgres_host(tmp_path, request.getfixturevalue("pg_url"))
    key = data_key(setup)
    stores = [open_store(setup.config.db) for _ in range(2)]  # two processes, as it were
    try:
        for round_ in range(5):
            outcomes = submit_together(stores, key, round_)
            assert all(isinstance(o, rebind.Outcome) for o in outcomes), outcomes
            results = sorted((o.code, o.reason) for o in outcomes)
            assert results == [("00", ""), ("05", "PENDING_EXISTS")], round_
            with stores[0].transaction(TID) as tx:
                pending = tx.requests(state="PENDING_REVIEW", tid=TID)
                assert len(pending) == 1
                # Rejected, so that the next round may submit again.
                rebind.reject(tx, key, pending[0].rf, "rev", "test round", time.time())
        with stores[0].transaction(write=False) as tx:
            versions = tx.versions(TID)
        assert [v.state for v in versions] == ["ACTIVE"] + ["REJECTED"] * 5
        assert versions[0].account_hash == crypto.account_hash(key, ACCOUNT)
    finally:
        for store in stores:
            store.close()
