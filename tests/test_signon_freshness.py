"""Sign-on freshness and the MAC'd sign-off (PROTOCOL.md 4.2): a captured sign-on replayed, a
sign-on whose field 7 is off the host's clock, the replay after a restart and through another
host process, two identical sign-ons at once, and sign-offs without, with a wrong and with a
valid MAC. On a real host on loopback (asyncio and trio), on SQLite and, where the store
decides, on PostgreSQL too (ACQHOST_TEST_PG; skipped without it, as in tests/conftest.py)."""

from __future__ import annotations

import calendar
import io
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, closing
from functools import partial
from pathlib import Path

import anyio
import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from acqhost.domain import crypto, signon
from acqhost.runtime.app import build_server, close_stores
from acqhost.store import PostgresStore, Session, SQLiteStore, Store
from acqhost.store.migrations import postgres as pg_migrations
from acqhost.store.migrations import sqlite as sqlite_migrations
from acqhost.wire.tlv import decode_tlv
from simulators.terminal import TerminalClient
from tests import hostkit
from tests.hostkit import (
    HostSetup,
    make_host,
    make_postgres_host,
    running,
    signed_on,
)
from tests.storekit import CREATED, TID, with_terminal

pytestmark = pytest.mark.anyio

# Every test on both backends, each against a host of its own.
anyio_backend = hostkit.both_backends
setup = hostkit.host_setup


@pytest.fixture(params=["sqlite", "postgres"])
def any_setup(request: pytest.FixtureRequest, tmp_path: Path) -> HostSetup:
    """A host's store on either backend."""
    if request.param == "sqlite":
        return make_host(tmp_path)
    return make_postgres_host(tmp_path, request.getfixturevalue("pg_url"))


def field7(offset: float = 0.0) -> str:
    """Field 7 ``offset`` seconds from now (UTC)."""
    return time.strftime("%m%d%H%M%S", time.gmtime(time.time() + offset))


async def send_once(setup: HostSetup, message: bytes, port: int | None = None) -> dict[str, str]:
    """``message`` sent on a connection of its own (as whoever captured it would), answered."""
    async with setup.client(port=port) as wiretap:
        return wiretap.codec.decode(await wiretap.exchange_raw(message))


async def assert_session_works(client: TerminalClient) -> None:
    """The terminal's keys are the host's: a MAC'd sale is approved (and its answer's MAC
    verifies, or the client raises)."""
    sale = await client.sale(100)
    assert sale.rc == "00" and "64" in sale.response


def security_events(logs: io.StringIO) -> list[dict[str, object]]:
    events = [json.loads(line) for line in logs.getvalue().splitlines()]
    return [e for e in events if e.get("event") == "security"]


# -- field 7 and the host's clock --------------------------------------------------------------


def utc(text: str) -> int:
    return calendar.timegm(time.strptime(text, "%Y-%m-%d %H:%M:%S"))


@pytest.mark.parametrize(
    ("now", "value", "seconds"),
    [
        ("2026-06-15 12:00:00", "0615120000", 0),
        ("2026-06-15 12:00:00", "0615115500", -300),
        ("2026-06-15 12:00:00", "0615121001", 601),
        # New Year: the year that puts field 7 nearest the clock, on either side of it
        ("2026-12-31 23:59:50", "0101000005", 15),
        ("2027-01-01 00:00:05", "1231235950", -15),
        ("2027-01-01 00:00:05", "0101000000", -5),
        # The 29th of February exists in leap years only: the nearest of those is far away.
        ("2028-02-29 12:00:00", "0229120100", 60),
        ("2027-03-01 00:00:00", "0229000000", 365 * 86400),
    ],
)  # fmt: skip
def test_field_7_is_read_in_the_year_nearest_the_host_clock(
    now: str, value: str, seconds: float
) -> None:
    assert signon.offset(value, utc(now)) == seconds


@settings(max_examples=300, deadline=None)
@given(
    now=st.integers(utc("2000-01-01 00:00:00"), utc("2099-12-31 23:59:59")),
    delta=st.integers(-150 * 86400, 150 * 86400),
)
def test_field_7_of_a_time_within_months_of_the_clock_names_that_time(now: int, delta: int) -> None:
    sent = now + delta
    assert signon.offset(time.strftime("%m%d%H%M%S", time.gmtime(sent)), now) == delta


@pytest.mark.parametrize(
    "value", ["1332000000", "0230120000", "0615240000", "061512000", "06151200001", "0615 12000",
              "\uff10\uff16\uff11\uff15\uff11\uff12\uff10\uff10\uff10\uff10", "abcdefghij", ""],
)  # fmt: skip
def test_field_7_that_names_no_time_is_none(value: str) -> None:
    assert signon.field7_time(value, utc("2026-06-15 12:00:00")) is None


def test_a_sign_on_is_remembered_until_a_replay_of_it_would_be_stale() -> None:
    # accepted at 0 with field 7 at -skew .. +skew: fresh until +2 skew at most
    assert signon.remembered_for(300) == 600


# -- replayed and stale sign-ons on a running host ---------------------------------------------


async def test_a_replayed_sign_on_is_refused_and_the_terminal_keeps_its_session(
    setup: HostSetup, json_logs: io.StringIO
) -> None:
    async with running(setup):
        client = await signed_on(setup)
        captured = client.last_message
        sent = client.codec.decode(captured)
        answer = await send_once(setup, captured)  # the exact bytes, again
        assert answer["t"] == "0810" and answer["39"] == "63"
        assert "64" not in answer and "48" not in answer  # no MAC, no host key
        assert [answer[f] for f in ("7", "11", "41", "42", "70")] == [
            sent[f] for f in ("7", "11", "41", "42", "70")
        ]
        await assert_session_works(client)
        await client.close()
    events = security_events(json_logs)
    assert [(e["kind"], e["tid"], e["stan"]) for e in events] == [
        ("REPLAYED_SIGNON", "TERM0001", sent["11"])
    ]
    text = json_logs.getvalue()
    assert client.keys is not None
    offered = decode_tlv(sent["48"])
    for secret in (client.keys.tx_mac.hex(), client.keys.rx_mac.hex(), *offered.values()):
        assert secret not in text


@pytest.mark.parametrize("minutes", [10, -10])
async def test_a_sign_on_whose_field_7_is_10_minutes_off_is_refused(
    setup: HostSetup, json_logs: io.StringIO, minutes: int
) -> None:
    async with running(setup):
        client = await signed_on(setup)
        async with setup.client() as late:
            ex = await late.sign_on(field7=field7(minutes * 60))
            assert ex.rc == "63" and "64" not in ex.response and "48" not in ex.response
            assert late.keys is None
        await assert_session_works(client)  # the current keys were kept
        await client.close()
    (event,) = security_events(json_logs)
    assert event["kind"] == "STALE_SIGNON" and event["tid"] == "TERM0001"
    lines = [json.loads(line) for line in json_logs.getvalue().splitlines()]
    (refused,) = [e for e in lines if e.get("rc") == "63"]
    assert refused["reason"] == "STALE_SIGNON"
    assert abs(int(str(refused["offset"])) - minutes * 60) <= 5


async def test_a_sign_on_within_the_skew_is_accepted_and_replaces_the_keys(
    setup: HostSetup,
) -> None:
    async with running(setup):
        first = await signed_on(setup)
        async with setup.client() as second:
            assert (await second.sign_on(field7=field7(-240))).rc == "00"
            await assert_session_works(second)
            assert (await first.request(first.sale_fields(100))).rc == "63"  # old keys
        await first.close()


async def test_the_skew_is_a_setting(tmp_path: Path) -> None:
    setup = make_host(tmp_path, signon_skew=30)
    async with running(setup), setup.client() as client:
        assert (await client.sign_on(field7=field7(-60))).rc == "63"
        assert (await client.sign_on(field7=field7(-20))).rc == "00"


async def test_a_sign_on_whose_field_7_names_no_time_is_a_format_error(setup: HostSetup) -> None:
    async with running(setup), setup.client() as client:
        ex = await client.sign_on(field7="1332250000")
        assert ex.rc == "30" and ex.response["7"] == "1332250000"


async def test_a_stale_sign_on_with_a_bad_signature_is_logged_as_a_bad_signature(
    setup: HostSetup, json_logs: io.StringIO
) -> None:
    async with running(setup), setup.client() as client:
        client.seed = crypto.new_signing_key()  # not the key the host knows
        assert (await client.sign_on(field7=field7(3600))).rc == "63"
    assert [e["kind"] for e in security_events(json_logs)] == ["BAD_SIGNATURE"]


async def test_a_replay_is_refused_after_a_restart(any_setup: HostSetup) -> None:
    async with running(any_setup):
        client = await signed_on(any_setup)
        captured = client.last_message
        await client.close()
    async with running(any_setup):  # a new server on the same store
        answer = await send_once(any_setup, captured)
        assert answer["39"] == "63" and "48" not in answer
        client.address = (client.address[0], any_setup.config.port)
        await client.connect()
        await assert_session_works(client)  # the keys of the sign-on that was accepted
        await client.close()


@asynccontextmanager
async def two_hosts(setup: HostSetup) -> AsyncIterator[tuple[int, int]]:
    """Two host servers on one store (as two worker processes, or two machines, are): their
    ports."""
    servers = [build_server(setup.config) for _ in range(2)]
    try:
        async with anyio.create_task_group() as tg:
            ports = [await tg.start(partial(s.run, handle_signals=False)) for s in servers]
            try:
                yield ports[0], ports[1]
            finally:
                for server in servers:
                    server.shutdown()
    finally:
        for server in servers:
            close_stores(server)


async def test_a_replay_through_another_host_process_is_refused(any_setup: HostSetup) -> None:
    async with two_hosts(any_setup) as (one, other), any_setup.client(port=one) as client:
        assert (await client.sign_on()).rc == "00"
        answer = await send_once(any_setup, client.last_message, port=other)
        assert answer["39"] == "63"
        await assert_session_works(client)


async def race(setup: HostSetup, ports: tuple[int, ...], message: bytes) -> list[str]:
    """``message`` sent at once on a connection to each of ``ports``: the answers' codes."""
    clients = [setup.client(port=port) for port in ports]
    codes: list[str] = []

    async def send(client: TerminalClient) -> None:
        codes.append(client.codec.decode(await client.exchange_raw(message))["39"])

    for client in clients:
        await client.connect()
    try:
        async with anyio.create_task_group() as tg:
            for client in clients:
                tg.start_soon(send, client)
    finally:
        for client in clients:
            await client.close()
    return codes


async def test_of_identical_sign_ons_at_once_exactly_one_is_accepted(any_setup: HostSetup) -> None:
    async with two_hosts(any_setup) as ports:
        terminal = any_setup.client()
        for _ in range(5):  # a new sign-on each round, sent twice to each host at once
            fields, _, _ = terminal.signon_fields()
            codes = await race(any_setup, (*ports, *ports), terminal.encode(fields, mac=False))
            assert sorted(codes) == ["00", "63", "63", "63"]


# -- sign-off ----------------------------------------------------------------------------------


async def test_a_sign_off_without_a_valid_mac_is_refused_and_the_session_keeps_working(
    setup: HostSetup, json_logs: io.StringIO
) -> None:
    async with running(setup):
        client = await signed_on(setup)
        ex = await client.network("002")  # no MAC: all that anyone knowing 41 and 42 can send
        assert ex.rc == "63" and "128" not in ex.response
        assert (ex.response["11"], ex.response["41"], ex.response["70"]) == (
            ex.request["11"], "TERM0001", "002"
        )  # fmt: skip
        await assert_session_works(client)
        good = client.encode(client.network_fields("002"), mac=True)
        wrong = good[:-1] + bytes([good[-1] ^ 1])
        answer = client.codec.decode(await client.exchange_raw(wrong))
        assert answer["39"] == "63" and "128" not in answer
        outsider = setup.client()
        outsider.keys = crypto.SessionKeys.from_kx(bytes(32), bytes(32))
        forged = outsider.encode(outsider.network_fields("002"), mac=True)
        assert client.codec.decode(await client.exchange_raw(forged))["39"] == "63"
        await assert_session_works(client)
        await client.close()
    kinds = [e["kind"] for e in security_events(json_logs)]
    assert kinds == ["MAC_MISSING", "BAD_MAC", "BAD_MAC"]


async def test_a_sign_off_with_a_valid_mac_drops_the_keys(setup: HostSetup) -> None:
    async with running(setup):
        client = await signed_on(setup)
        keys = client.keys
        ex = await client.sign_off()  # the client checks the answer's MAC under the session
        # Field 70 brings the secondary bitmap, so the MAC is in field 128 (PROTOCOL.md 4.3),
        # both ways.
        assert ex.rc == "00" and "128" in ex.response and ex.response["70"] == "002"
        assert "128" in client.codec.decode(client.last_message)
        assert client.keys is None
        client.keys = keys
        ex = await client.request(client.sale_fields(100))
        assert ex.rc == "58" and "64" not in ex.response
        ex = await client.request(client.network_fields("002"))  # signed off already
        assert ex.rc == "58" and "128" not in ex.response
        assert (await client.sign_on()).rc == "00"
        await assert_session_works(client)
        await client.close()


def mac_in_64(client: TerminalClient, fields: dict[str, str]) -> tuple[bytes, int]:
    """A sign-off MAC'd as PROTOCOL.md 4.2 words it: the MAC in field 64 beside field 70's
    secondary bitmap, over every byte before field 64; and where field 64 starts."""
    assert client.keys is not None
    blank = client.codec.encode({**fields, "64": "00" * 8})
    at = len(blank) - 8 - len(client.codec.encode({"t": fields["t"], "70": fields["70"]})) + 20
    assert blank[at : at + 8] == bytes(8)
    return blank[:at] + crypto.mac(client.keys.tx_mac, blank[:at]) + blank[at + 8 :], at


async def test_a_sign_off_may_carry_its_mac_in_field_64_as_the_protocol_words_it(
    setup: HostSetup,
) -> None:
    async with running(setup):
        client = await signed_on(setup)
        frame, at = mac_in_64(client, client.network_fields("002"))
        wrong = frame[:at] + bytes([frame[at] ^ 1]) + frame[at + 1 :]
        assert client.codec.decode(await client.exchange_raw(wrong))["39"] == "63"
        await assert_session_works(client)
        answer = client.codec.decode(await client.exchange_raw(frame))
        assert answer["39"] == "00" and "128" in answer  # the 0810's MAC: 128 (4.3)
        ex = await client.request(client.sale_fields(100))  # the keys are gone
        assert ex.rc == "58"
        await client.close()


# -- the store: both backends ------------------------------------------------------------------

OTHER = "T0000002"


def opened(where: str) -> Store:
    """A store (a process's own connection) on the database at ``where``."""
    return SQLiteStore(where) if "://" not in where else PostgresStore(where)


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Where the test's database is (a SQLite path or a PostgreSQL URL), with two terminals."""
    if request.param == "sqlite":
        where = str(tmp_path / "a.db")
    else:
        where = request.getfixturevalue("pg_url")
    with closing(opened(where)) as store:
        with_terminal(with_terminal(store), OTHER)
    yield where


def session(n: int, tid: str = TID) -> Session:
    return Session(tid, f"rx{n}".encode(), f"tx{n}".encode(), CREATED + n)


def test_a_sign_on_is_accepted_once_and_its_replay_changes_nothing(database: str) -> None:
    with closing(opened(database)) as store:
        assert store.accept_signon(session(1), "0314101500", "000001", CREATED)
        assert store.get_session(TID) == session(1)
        assert not store.accept_signon(session(2), "0314101500", "000001", CREATED)
        assert store.get_session(TID) == session(1)  # the replay's keys were not stored
        # another STAN, another field 7, another terminal: other sign-ons
        assert store.accept_signon(session(3), "0314101500", "000002", CREATED)
        assert store.accept_signon(session(4), "0314101501", "000002", CREATED)
        assert store.accept_signon(session(5, OTHER), "0314101501", "000002", CREATED)
        assert store.get_session(TID) == session(4)
    with closing(opened(database)) as reopened:  # remembered across a restart
        assert not reopened.accept_signon(session(6), "0314101500", "000001", CREATED)
        with pytest.raises(ValueError):
            reopened.accept_signon(session(7, "NOSUCH00"), "0314101500", "000001", CREATED)


def test_a_terminals_old_sign_ons_are_forgotten_when_it_signs_on_again(database: str) -> None:
    with closing(opened(database)) as store:
        assert store.accept_signon(session(0), "0314101500", "000001", 0)
        assert store.accept_signon(session(0, OTHER), "0314101500", "000001", 0)
        assert store.accept_signon(session(500), "0314102320", "000002", 0)
        # at CREATED + 1000, with sign-ons remembered 600 s: the first goes, the second stays
        assert store.accept_signon(session(1000), "0314103140", "000003", CREATED + 400)
        assert store.accept_signon(session(1001), "0314101500", "000001", CREATED + 401)
        assert not store.accept_signon(session(1002), "0314102320", "000002", CREATED + 402)
        # another terminal's are its own
        assert not store.accept_signon(session(1003, OTHER), "0314101500", "000001", CREATED)


def accept_at_once(stores: list[Store], stan: str) -> dict[int, bool]:
    """Each store (a process of its own) accepts the same sign-on, all at once: what each
    answered, by its index (each with a session of its own, ``session(index)``)."""
    start = threading.Barrier(len(stores))
    results: dict[int, bool] = {}
    errors: list[BaseException] = []

    def accept(n: int, store: Store) -> None:
        try:
            start.wait()
            results[n] = store.accept_signon(session(n), "0314101500", stan, 0)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=accept, args=(n, s)) for n, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    return results


def test_of_processes_accepting_one_sign_on_at_once_exactly_one_does(database: str) -> None:
    stores = [opened(database) for _ in range(6)]
    try:
        for round_ in range(5):
            results = accept_at_once(stores, f"{round_:06d}")
            winners = [n for n, accepted in results.items() if accepted]
            assert len(winners) == 1 and len(results) == len(stores)
            assert stores[0].get_session(TID) == session(winners[0])
    finally:
        for store in stores:
            store.close()


def test_a_database_of_schema_4_gains_the_sign_ons_and_keeps_its_sessions(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = sqlite_migrations if "://" not in database else pg_migrations
    assert backend.latest_version() >= 5
    # The fixture's database is at the latest schema: start again, from schema 4.
    if "://" in database:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("DROP SCHEMA public CASCADE")
            conn.execute("CREATE SCHEMA public")
    else:
        Path(database).unlink()
    with monkeypatch.context() as patched:
        patched.setattr(backend, "MIGRATIONS", backend.MIGRATIONS[:4])
        with closing(with_terminal(opened(database))) as old:
            assert old.schema_version() == 4
            old.save_session(session(1))
    with closing(opened(database)) as store:
        assert store.schema_version() == backend.latest_version()
        assert store.get_session(TID) == session(1)
        assert store.accept_signon(session(2), "0314101500", "000001", 0)
        assert not store.accept_signon(session(3), "0314101500", "000001", 0)
