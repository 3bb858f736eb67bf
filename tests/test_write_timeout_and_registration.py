"""Edges of the write timeout (server), the writers' queue (SQLite) and
Store.add_terminal(then=...), over real loopback TCP, real SQLite files and, when
ACQHOST_TEST_PG is set, real PostgreSQL."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import anyio
import anyio.abc
import nacl.secret
import nacl.utils
import pytest

import acqhost.server
from acqhost import audit
from acqhost.framing import FrameDecoder
from acqhost.server import WRITE_TIMEOUT
from acqhost.store import MemoryStore, Operator, SQLiteStore, Store
from acqhost.store import sqlite as sqlite_store
from acqhost.store.base import RebindRequest, StoreTx
from acqhost.store.postgres import PostgresStore
from tests.hostkit import make_host, running
from tests.test_server_edges import connect_small, echo_frame, host_socket, wait_no_connections
from tests.test_store import TID, make_account, make_sale, make_terminal, with_terminal

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> object:
    return request.param


UVLOOP = pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop")


def disconnect_reasons(json_logs: io.StringIO) -> list[str]:
    ends = [json.loads(line) for line in json_logs.getvalue().splitlines()]
    return [e["reason"] for e in ends if e["event"] == "disconnected"]


def unsent_in_host(server: acqhost.server.Server) -> int | None:
    """Bytes the host has written but the kernel did not take (asyncio's transport buffer);
    None on the stream path, where a send that does not fit waits instead."""
    for conn in server._connections:
        if isinstance(conn, acqhost.server._AsyncioConnection) and conn.transport is not None:
            return conn.transport.get_write_buffer_size()
    return None


# -- the write timeout -------------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio", UVLOOP, "trio"])
async def test_a_peer_that_stops_reading_with_a_little_unsent_is_still_closed(
    tmp_path: Path, json_logs: io.StringIO
) -> None:
    # A peer sends some requests, never reads, and goes quiet while keeping its socket open:
    # its answers fill both kernel buffers and a little (far below the high-water mark, so
    # pause_writing is never called) stays in the host's own buffer. A close "after what is
    # buffered has been written" would never come: the write timeout counts from the last
    # byte taken, however little is waiting, and closes it. On trio the stream path closes
    # it (the send waits, its deadline passes).
    setup = make_host(tmp_path, read_timeout=0.3)
    async with running(setup) as server:
        client = setup.client()
        peer = socket.socket()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        peer.connect(("127.0.0.1", setup.config.port))
        try:
            with anyio.fail_after(2):
                while not server._connections:
                    await anyio.sleep(0.01)
            host_socket(server).setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            with anyio.fail_after(5):
                for n in range(100):  # ten echoes at a time until some stay in the host
                    with contextlib.suppress(OSError):  # trio may have closed it already
                        peer.sendall(b"".join(echo_frame(client) for _ in range(10)))
                    await anyio.sleep(0.02)
                    unsent = unsent_in_host(server)
                    if unsent or (unsent is None and n >= 40):
                        break
            if unsent is not None:
                (conn,) = server._connections
                assert isinstance(conn, acqhost.server._AsyncioConnection)
                assert conn.transport is not None
                _, high = conn.transport.get_write_buffer_limits()
                assert 0 < unsent < high and not conn.write_paused
            # Well past the read timeout, and the write timeout after it.
            await wait_no_connections(server, seconds=2.0)
        finally:
            peer.close()
    assert disconnect_reasons(json_logs)[0] in (WRITE_TIMEOUT, "read timeout (idle)")


@pytest.mark.parametrize("anyio_backend", ["asyncio", UVLOOP, "trio"])
async def test_a_peer_that_reads_slowly_but_steadily_is_not_cut(
    tmp_path: Path, json_logs: io.StringIO
) -> None:
    # "Once no answer has left for read_timeout, the connection is closed": here answers leave
    # every 20 ms (800 bytes, a dozen echo answers, at a time), so it must not be cut. asyncio
    # restarts the clock whenever the transport has passed bytes on; trio times each send of
    # at most SEND_CHUNK bytes, not one send of every ready answer joined.
    setup = make_host(tmp_path, read_timeout=0.2)
    async with running(setup) as server:
        client = setup.client()
        stream = await connect_small(setup.config.port)
        with anyio.fail_after(2):
            while not server._connections:
                await anyio.sleep(0.01)
        host_socket(server).setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        count = 1500
        data = b"".join(echo_frame(client) for _ in range(count))
        decoder = FrameDecoder("len2")
        answers = 0
        longest_gap = 0.0
        async with anyio.create_task_group() as tg:

            async def send() -> None:
                with contextlib.suppress(anyio.BrokenResourceError, OSError):
                    await stream.send(data)

            tg.start_soon(send)
            last = time.monotonic()
            with anyio.fail_after(8):
                while answers < count:
                    try:
                        got = await stream.receive(800)
                    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                        break
                    now = time.monotonic()
                    longest_gap, last = max(longest_gap, now - last), now
                    answers += len(decoder.feed(got))
                    await anyio.sleep(0.02)
            tg.cancel_scope.cancel()
        await stream.aclose()
        await wait_no_connections(server)
    reasons = disconnect_reasons(json_logs)
    assert longest_gap < 0.15  # something left at least every 150 ms
    assert answers == count and WRITE_TIMEOUT not in reasons, reasons


@pytest.mark.parametrize("anyio_backend", ["asyncio", UVLOOP])
async def test_the_timer_of_a_connection_ends_with_it(
    tmp_path: Path,
) -> None:
    # After a close by the peer, a read timeout and a write timeout, the connection's timer is
    # cancelled and not re-armed: nothing of a gone connection stays on the loop's timers.
    setup = make_host(tmp_path, read_timeout=0.2)
    async with running(setup) as server:
        client = setup.client()
        gone: list[acqhost.server._AsyncioConnection] = []

        async def the_connection() -> acqhost.server._AsyncioConnection:
            with anyio.fail_after(2):
                while not server._connections:
                    await anyio.sleep(0.01)
            (conn,) = server._connections
            assert isinstance(conn, acqhost.server._AsyncioConnection)
            return conn

        stream = await anyio.connect_tcp("127.0.0.1", setup.config.port)  # closed by the peer
        gone.append(await the_connection())
        await stream.send(echo_frame(client))
        await stream.receive()
        await stream.aclose()
        await wait_no_connections(server)
        stream = await anyio.connect_tcp("127.0.0.1", setup.config.port)  # read timeout
        gone.append(await the_connection())
        await wait_no_connections(server)
        await stream.aclose()
        peer = socket.socket()  # write timeout
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        peer.connect(("127.0.0.1", setup.config.port))
        try:
            gone.append(await the_connection())
            host_socket(server).setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            data = b"".join(echo_frame(client) for _ in range(3000))
            peer.setblocking(False)
            with anyio.fail_after(3):
                while server._connections:
                    with contextlib.suppress(BlockingIOError, OSError):
                        data = data[peer.send(data) :]
                    await anyio.sleep(0.01)
        finally:
            peer.close()
        await anyio.sleep(0.5)  # past the timers' due times
        assert [c.reason for c in gone] == ["closed by peer", "read timeout (idle)", WRITE_TIMEOUT]
        for conn in gone:
            assert conn.transport is None and conn.timer is not None
            assert conn.timer.cancelled()


# -- Store.add_terminal(then=...) --------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    opened: Store
    if request.param == "memory":
        opened = MemoryStore()
    elif request.param == "sqlite":
        opened = SQLiteStore(tmp_path / "a.db")
    else:
        opened = PostgresStore(request.getfixturevalue("pg_url"))
    try:
        yield opened
    finally:
        opened.close()


KEY = nacl.utils.random(nacl.secret.SecretBox.KEY_SIZE)
OPERATOR = Operator(tid=TID, operator_id="01", password_hash=b"$argon2id$...", failures=0)


def registration_entry(tx: StoreTx, tid: str = TID) -> None:
    first = tx.versions(tid)[0]
    audit.append(tx, KEY, at=first.created_at, actor="test", action="terminal.registered",
                 tid=tid, subject="v1", detail={"version": 1})  # fmt: skip


def chain(store: Store) -> tuple[int, list[str]]:
    """audit.verify, but for the test accounts' sealed numbers (made-up bytes here)."""
    count, problems = audit.verify(store, KEY)
    return count, [p for p in problems if "sealed account number" not in p]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "acqhost.db"


class Interrupted(BaseException):
    """What Ctrl-C (KeyboardInterrupt) or a cancellation is: not an Exception."""


def test_then_raising_a_base_exception_after_writing_everything_it_can_leaves_nothing(
    any_store: Store,
) -> None:
    # ``then`` writes what a StoreTx can write about the new terminal (a second version, a
    # request for it, the operator's failures, an audit entry), then is interrupted: nothing
    # of the registration or of ``then`` is left, and the tid registers afresh (here without
    # an operator) as if never tried.
    def everything_then_interrupt(tx: StoreTx) -> None:
        registration_entry(tx)
        v1 = tx.versions(TID)[0]
        tx.insert_version(replace(v1, version=2, state="PENDING_REVIEW", holder="LI SI"))
        tx.insert_request(RebindRequest("RF00000000000001", TID, 2, "rebind", "01", "000001",
                                        "0314101500", "typed", 1.0, "PENDING_REVIEW", "", None, "",
                                        None))  # fmt: skip
        tx.set_operator_failures(TID, "01", 3)
        raise Interrupted

    with pytest.raises(Interrupted):
        any_store.add_terminal(make_terminal(), make_account(), OPERATOR,
                               then=everything_then_interrupt)  # fmt: skip
    assert any_store.get_terminal(TID) is None and any_store.list_terminals() == []
    assert any_store.account_history(TID) == []
    with pytest.raises(KeyError):
        any_store.open_batch(TID)
    with any_store.transaction(write=False) as tx:
        assert tx.operator(TID, "01") is None
        assert tx.requests() == [] and tx.audit_entries() == []
    any_store.add_terminal(make_terminal(), make_account(), None, then=registration_entry)
    with any_store.transaction(write=False) as tx:
        assert tx.operator(TID, "01") is None
        assert [v.version for v in tx.versions(TID)] == [1]
        assert [(e.seq, e.action) for e in tx.audit_entries()] == [(1, "terminal.registered")]
    assert any_store.open_batch(TID) == 1
    assert [r.duplicate for r in any_store.record_sales([make_sale()])] == [False]
    assert chain(any_store) == (1, [])


def test_a_failed_then_keeps_what_was_there_before(any_store: Store) -> None:
    # Another terminal and its audit entry exist; a registration whose ``then`` fails must not
    # touch them (the memory store restores whole dicts from a copy).
    any_store.add_terminal(make_terminal("T0000002"), make_account(), None,
                           then=lambda tx: registration_entry(tx, "T0000002"))  # fmt: skip
    any_store.record_sales([make_sale("000001", tid="T0000002")])

    def fail(tx: StoreTx) -> None:
        registration_entry(tx)
        raise RuntimeError("the disk is full, say")

    with pytest.raises(RuntimeError):
        any_store.add_terminal(make_terminal(), make_account(), OPERATOR, then=fail)
    assert [t.tid for t in any_store.list_terminals()] == ["T0000002"]
    assert [s.stan for s in any_store.sales("T0000002")] == ["000001"]
    assert len(any_store.account_history("T0000002")) == 1
    assert chain(any_store) == (1, [])


def test_postgres_registrations_at_once_chain_their_audit_entries_in_one_order(
    pg_url: str,
) -> None:
    # Several processes (here threads, each with its own connection) register terminals at
    # once, each with its audit entry in its own transaction: the advisory lock gives the
    # chain one order (no duplicate seq, no fork), and each registration is announced.
    PostgresStore(pg_url).close()  # migrated once, before the race
    tids = [f"T000010{i}" for i in range(6)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(tids))

    def register(tid: str) -> None:
        store = PostgresStore(pg_url)
        try:
            barrier.wait()
            store.add_terminal(make_terminal(tid), make_account(), None,
                               then=lambda tx: registration_entry(tx, tid))  # fmt: skip
        except BaseException as e:  # reported below
            errors.append(e)
        finally:
            store.close()

    heard: list[tuple[str, str]] = []
    check = PostgresStore(pg_url)
    listener = check.cache_listener(lambda kind, tid: heard.append((kind, tid)))
    listener.start()
    try:
        time.sleep(0.3)  # listening
        threads = [threading.Thread(target=register, args=(tid,)) for tid in tids]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert errors == []
        assert chain(check) == (len(tids), [])
        with check.transaction(write=False) as tx:
            assert sorted(e.tid for e in tx.audit_entries()) == tids
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and len({t for k, t in heard if k == "terminal"}) < 6:
            time.sleep(0.02)
        assert {t for k, t in heard if k == "terminal"} == set(tids)
    finally:
        listener.stop()
        check.close()


def test_postgres_a_failed_then_announces_nothing(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    heard: list[tuple[str, str]] = []
    listener = store.cache_listener(lambda kind, tid: heard.append((kind, tid)))
    listener.start()
    try:
        time.sleep(0.3)

        def fail(tx: StoreTx) -> None:
            registration_entry(tx)
            raise RuntimeError("no")

        with pytest.raises(RuntimeError):
            store.add_terminal(make_terminal(), make_account(), None, then=fail)
        store.add_terminal(make_terminal("T0000002"), make_account(), None)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and ("terminal", "T0000002") not in heard:
            time.sleep(0.02)
        assert [h for h in heard if h[0] != "*"] == [("terminal", "T0000002")]
    finally:
        listener.stop()
        store.close()


# -- the writers' queue ------------------------------------------------------------------------


def queue_is_free(db_path: Path) -> bool:
    probe = os.open(f"{db_path}.writers", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(probe)


def test_a_queued_writer_that_cannot_begin_frees_the_queue(db_path: Path) -> None:
    # Its turn in the queue, then SQLite's own lock is held by a writer outside the queue (the
    # CLI, say) past the busy timeout: BEGIN IMMEDIATE fails, and the turn is given back.
    store = with_terminal(SQLiteStore(db_path))
    store.queue_writers()
    store._conn.execute("PRAGMA busy_timeout = 100")
    blocker = sqlite3.connect(db_path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            store.record_sales([make_sale()])
        assert queue_is_free(db_path)
        blocker.execute("ROLLBACK")
        assert [r.duplicate for r in store.record_sales([make_sale()])] == [False]
        assert queue_is_free(db_path)
    finally:
        blocker.close()
        store.close()


def test_a_queued_registration_interrupted_in_then_frees_the_queue(db_path: Path) -> None:
    store = SQLiteStore(db_path)
    store.queue_writers()
    try:

        def interrupt(tx: StoreTx) -> None:
            assert not queue_is_free(db_path)  # its turn is held meanwhile
            raise Interrupted

        with pytest.raises(Interrupted):
            store.add_terminal(make_terminal(), make_account(), None, then=interrupt)
        assert queue_is_free(db_path) and store.get_terminal(TID) is None
        assert not store._conn.in_transaction
        with pytest.raises(ValueError, match="already exists"):  # in the queue, rolled back
            with_terminal(with_terminal(store))
        assert queue_is_free(db_path)
    finally:
        store.close()


def test_a_queued_writer_gets_its_turn_when_it_comes_just_before_the_deadline(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The queue held for most of QUEUE_SECONDS: the waiting writer still gets its turn (the
    # deadline counts from when it started waiting, not from its last attempt).
    monkeypatch.setattr(sqlite_store, "QUEUE_SECONDS", 0.5)
    store = with_terminal(SQLiteStore(db_path))
    store.queue_writers()
    holder = os.open(f"{db_path}.writers", os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        timer = threading.Timer(0.4, fcntl.flock, (holder, fcntl.LOCK_UN))
        timer.start()
        started = time.monotonic()
        assert [r.duplicate for r in store.record_sales([make_sale()])] == [False]
        assert 0.35 < time.monotonic() - started < 0.5
        timer.join()
    finally:
        os.close(holder)
        store.close()
