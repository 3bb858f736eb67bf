"""The host end to end over TCP on loopback, on asyncio and on trio: every message type and
response code of PROTOCOL.md 4-5.2, MACs, pipelining, bad frames, slow clients, shutdown."""

from __future__ import annotations

import io
import json
import socket
import sqlite3
import struct
import time
from pathlib import Path

import anyio
import anyio.abc
import pytest

from acqhost.cli import main as cli
from acqhost.domain import cards, crypto
from acqhost.log import configure_logging
from acqhost.wire.tlv import decode_tlv, encode_tlv
from simulators.terminal import TEST_PAN, Exchange, TerminalClient, TerminalError
from tests import hostkit
from tests.hostkit import (
    ACCOUNT,
    BANK,
    HostSetup,
    make_host,
    running,
    signed_on,
)

pytestmark = pytest.mark.anyio

# Every test on both backends, each against a host of its own.
anyio_backend = hostkit.both_backends
setup = hostkit.host_setup


async def answers_until_closed(client: TerminalClient, seconds: float = 5) -> list[dict[str, str]]:
    """Every answer still to come on ``client``'s connection, until the host closes it."""
    answered = []
    with anyio.fail_after(seconds):
        while True:
            try:
                answered.append(client.codec.decode(await client.receive_raw()))
            except TerminalError:
                return answered


async def test_sign_on_echo_sale_test_sale_and_reversal(setup: HostSetup) -> None:
    async with running(setup) as server:
        client = await signed_on(setup)
        assert client.keys is not None  # the host's signature and key exchange verified
        assert (await client.echo()).rc == "00"
        sale = await client.sale(1234)
        assert sale.rc == "00"
        r = sale.response
        assert r["t"] == "0210" and r["4"] == "000000001234" and len(r["38"]) == 6
        assert r["37"].isdigit() and len(r["37"]) == 12
        assert sale.tlv == {"SA": cards.mask_account(ACCOUNT), "SV": "1", "BK": BANK}
        test = await client.sale(100, test=True)
        assert test.rc == "00" and test.tlv["SA"] == cards.mask_account(ACCOUNT)
        assert test.response["37"] != r["37"]
        reversal = await client.reverse(sale)
        assert reversal.rc == "00" and reversal.response["t"] == "0410"
        assert (await client.reverse(sale)).rc == "00"  # idempotent
        assert (await client.sign_off()).rc == "00"
        client.keys = crypto.SessionKeys.from_kx(bytes(32), bytes(32))  # stale keys
        assert (await client.request(client.sale_fields(5))).rc == "58"
        await client.close()
        sales = {s.rrn: s for s in server.core.state.store.sales("TERM0001")}
        assert sales[r["37"]].status == "reversed" and sales[r["37"]].amount == 1234
        assert sales[test.response["37"]].test


async def test_sale_declines_carry_their_codes(setup: HostSetup) -> None:
    async with running(setup):
        client = await signed_on(setup)
        bad_luhn = TEST_PAN[:-1] + str((int(TEST_PAN[-1]) + 1) % 10)
        cases = [
            (client.sale_fields(100, pan=bad_luhn), "14"),
            (client.sale_fields(100, expiry="2001"), "54"),
            (client.sale_fields(100, expiry="3013"), "54"),
            (client.sale_fields(0), "13"),
            (client.sale_fields(1_000_001), "61"),
            (client.sale_fields(101, test=True), "13"),
            ({k: v for k, v in client.sale_fields(100).items() if k != "4"}, "30"),
            ({k: v for k, v in client.sale_fields(100).items() if k != "14"}, "30"),
            (dict(client.sale_fields(100), **{"48": "TS01"}), "30"),  # malformed TLV
            (dict(client.sale_fields(100), **{"3": "310000"}), "12"),  # no such route
            (dict(client.sale_fields(100), t="0100"), "12"),
        ]
        for fields, code in cases:
            ex = await client.request(fields)  # the client checks every response MAC
            assert ex.rc == code, (fields, ex.response)
            assert "37" not in ex.response and "38" not in ex.response
        track2 = {k: v for k, v in client.sale_fields(250).items() if k not in ("2", "14")}
        track2["35"] = TEST_PAN + "D3012101"
        assert (await client.request(track2)).rc == "00"
        await client.close()


async def test_duplicate_transmission_is_refused_with_94(setup: HostSetup) -> None:
    async with running(setup):
        client = await signed_on(setup)
        fields = client.sale_fields(700)
        first = await client.request(fields)
        again = await client.request(dict(fields, **{"4": "000000000001"}))
        assert (first.rc, again.rc) == ("00", "94")
        assert "38" not in again.response
        await client.close()


async def test_unknown_terminal_merchant_mismatch_and_disabled(setup: HostSetup) -> None:
    async with running(setup) as server:
        client = await signed_on(setup)
        stranger = dict(client.sale_fields(100), **{"41": "NOBODY01"})
        ex = await client.request(stranger)
        assert ex.rc == "03" and "64" not in ex.response  # 03 carries no MAC
        wrong_mid = dict(client.sale_fields(100), **{"42": "MERCHANT0000002"})
        assert (await client.request(wrong_mid)).rc == "03"
        other = setup.client("TERM0002")
        await other.connect()
        ex = await other.request(other.sale_fields(100), mac=False)
        assert ex.rc == "58" and "64" not in ex.response  # not signed on
        assert cli(["terminal", "disable", "--db", setup.config.db, "TERM0001"]) == 0
        server.core.state.invalidate("terminal", "TERM0001")  # skip the 1 s cache
        ex = await client.request(client.sale_fields(100))
        assert ex.rc == "58" and "64" not in ex.response
        assert (await client.echo()).rc == "58"
        await client.close()
        await other.close()


async def test_bad_and_missing_mac_get_63_without_mac(
    setup: HostSetup, json_logs: io.StringIO
) -> None:
    async with running(setup):
        client = await signed_on(setup)
        good = client.encode(client.sale_fields(100), mac=True)
        tampered = good[:-1] + bytes([good[-1] ^ 1])
        response = client.codec.decode(await client.exchange_raw(tampered))
        assert response["39"] == "63" and "64" not in response
        flipped = good[:20] + bytes([good[20] ^ 1]) + good[21:]  # data changed, MAC kept
        assert client.codec.decode(await client.exchange_raw(flipped))["39"] == "63"
        ex = await client.request(client.sale_fields(100), mac=False)
        assert ex.rc == "63" and "64" not in ex.response
        assert (await client.sale(100)).rc == "00"  # the connection is still fine
        await client.close()
    events = [json.loads(line) for line in json_logs.getvalue().splitlines()]
    security = [e for e in events if e["event"] == "security"]
    assert [e["kind"] for e in security] == ["BAD_MAC", "BAD_MAC", "MAC_MISSING"]
    assert all(e["level"] == "warning" and e["tid"] == "TERM0001" for e in security)


async def test_sign_on_with_a_bad_signature_gets_63(setup: HostSetup) -> None:
    async with running(setup):
        client = setup.client()
        client.seed = crypto.new_signing_key()  # not the key the host knows
        async with client:
            ex = await client.sign_on()
            assert ex.rc == "63" and client.keys is None
            bad_tlv = encode_tlv({"KX": "zz" * 32, "SG": "00" * 64})
            t = client.now_fields()
            ex = await client.request(
                {"t": "0800", "7": t["7"], "11": "000001", "41": client.tid, "42": client.mid,
                 "48": bad_tlv, "70": "001"}, mac=False)  # fmt: skip
            assert ex.rc == "30"


async def test_undecodable_request_with_an_mti_gets_30(setup: HostSetup) -> None:
    async with running(setup):
        client = setup.client()
        async with client:
            response = client.codec.decode(await client.exchange_raw(b"0200\x00\x00"))
            assert response == {"t": "0210", "p": response["p"], "39": "30"}
            assert (await client.echo()).rc == "00"  # and the connection stays open


async def test_reversal_codes(setup: HostSetup) -> None:
    async with running(setup):
        client = await signed_on(setup)
        sale = await client.sale(500)
        missing = dict(sale.request, **{"11": "999999"})
        assert (await client.reverse(Exchange(missing, {}))).rc == "25"
        with sqlite3.connect(setup.config.db) as db:
            db.execute("UPDATE batches SET status = 'closed' WHERE tid = 'TERM0001'")
        assert (await client.reverse(sale)).rc == "12"
        await client.close()


async def test_pipelined_requests_are_answered_in_order(setup: HostSetup) -> None:
    async with running(setup) as server:
        client = await signed_on(setup)
        requests = [client.sale_fields(100 + i) for i in range(40)]
        await client.send_pipelined(requests)
        for request in requests:
            response = client.codec.decode(await client.receive_raw())
            assert (response["11"], response["39"]) == (request["11"], "00")
        assert server.ledger.flushes < server.ledger.written  # sales shared commits
        await client.close()


async def test_more_requests_than_may_be_in_flight_then_end_of_stream_all_get_answers(
    setup: HostSetup,
) -> None:
    # 1,500 sales in one write, then the peer's end of stream: the host stops reading while
    # MAX_IN_FLIGHT answers wait for their commits, reads on as they leave, and closes only
    # after the last answer, in order.
    async with running(setup) as server:
        client = await signed_on(setup)
        other = await signed_on(setup, "TERM0002")
        requests = [client.sale_fields(100 + i % 500) for i in range(1500)]
        await client.send_pipelined(requests)
        assert client._stream is not None
        await client._stream.send_eof()
        assert (await other.sale(100)).rc == "00"  # served meanwhile
        for request in requests:
            response = client.codec.decode(await client.receive_raw())
            assert (response["11"], response["39"]) == (request["11"], "00")
        with pytest.raises(TerminalError):  # then the host closes
            await client.receive_raw()
        await client.close()
        await other.close()
        assert server.ledger.written >= 1501


async def test_slow_client_does_not_block_others(setup: HostSetup) -> None:
    async with running(setup):
        slow = await anyio.connect_tcp("127.0.0.1", setup.config.port)
        await slow.send(b"\x00\x40" + b"0200")  # half a frame, then silence
        client = await signed_on(setup)
        with anyio.fail_after(2):
            for _ in range(5):
                assert (await client.sale(100)).rc == "00"
        await client.close()
        await slow.aclose()


@pytest.mark.parametrize("garbage", [b"\x00\x00", b"\xff\xff" + b"x" * 10, b"\x10\x01"])
async def test_bad_frames_close_only_their_own_connection(setup: HostSetup, garbage: bytes) -> None:
    async with running(setup):
        client = await signed_on(setup)
        bad = await anyio.connect_tcp("127.0.0.1", setup.config.port)
        await bad.send(garbage)
        with anyio.fail_after(3):
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await bad.receive()
        await bad.aclose()
        assert (await client.sale(100)).rc == "00"
        await client.close()


async def test_stalled_partial_frame_is_closed_after_the_read_timeout(tmp_path: Path) -> None:
    setup = make_host(tmp_path, read_timeout=0.3)
    async with running(setup):
        stalled = await anyio.connect_tcp("127.0.0.1", setup.config.port)
        await stalled.send(b"\x00\x20abc")
        started = time.monotonic()
        with anyio.fail_after(3), pytest.raises(anyio.EndOfStream):
            await stalled.receive()
        assert 0.25 < time.monotonic() - started < 2.5
        await stalled.aclose()


async def test_the_read_timeout_counts_from_the_last_read_not_the_first(tmp_path: Path) -> None:
    setup = make_host(tmp_path, read_timeout=0.5)
    async with running(setup):
        client = await signed_on(setup)
        for _ in range(8):  # busy for 1.6 s, three timeouts' worth: never idle for one
            await anyio.sleep(0.2)
            assert (await client.echo()).rc == "00"
        last = time.monotonic()
        with anyio.fail_after(3), pytest.raises(TerminalError):
            await client.receive_raw()  # nothing more is sent: the host closes
        assert 0.45 < time.monotonic() - last < 2.0
        await client.close()


async def test_graceful_shutdown_answers_every_request_it_read(setup: HostSetup) -> None:
    async with running(setup) as server:
        client = await signed_on(setup)
        requests = [client.sale_fields(300 + i) for i in range(20)]
        await client.send_pipelined(requests)
        answered = [client.codec.decode(await client.receive_raw())]
        server.shutdown()
        # answers to what the host had read, then the host closes
        answered += await answers_until_closed(client)
        await client.close()
    assert [a["11"] for a in answered] == [r["11"] for r in requests[: len(answered)]]
    assert {a["39"] for a in answered} == {"00"}
    with sqlite3.connect(setup.config.db) as db:
        stored = {f"{r:012d}" for (r,) in db.execute("SELECT rrn FROM sales")}
    # every approval is durable, and nothing was committed without being answered
    assert stored == {a["37"] for a in answered}


async def test_field_48_in_chinese_and_log_lines_carry_no_card_data(
    setup: HostSetup, json_logs: io.StringIO
) -> None:
    async with running(setup):
        client = await signed_on(setup)
        fields = client.sale_fields(100)
        fields["48"] = encode_tlv({"NM": "张三", "XX": "未知"})
        ex = await client.request(fields)
        assert ex.rc == "00" and decode_tlv(ex.response["48"])["SA"].startswith("6222")
        await client.close()
    lines = [json.loads(line) for line in json_logs.getvalue().splitlines()]
    assert TEST_PAN not in json_logs.getvalue() and ACCOUNT not in json_logs.getvalue()
    sale = [e for e in lines if e.get("route") == "sale"]
    assert sale and {"tid", "mti", "stan", "rc", "latency_ms"} <= set(sale[0])


async def test_each_answer_leaves_after_its_log_line_is_in_the_log_file(
    setup: HostSetup, tmp_path: Path, json_logs: io.StringIO
) -> None:
    # Per-message lines are buffered, not flushed one by one; the server flushes them before
    # it sends their answers. A buffered file (8 KiB) read through a second handle shows it.
    # (json_logs restores the log stream afterwards.)
    path = tmp_path / "host.log"
    with path.open("w", encoding="utf-8") as stream:
        configure_logging("info", stream)
        async with running(setup):
            client = await signed_on(setup)
            for amount in (100, 200, 300):
                sale = await client.sale(amount)
                assert sale.rc == "00"
                lines = [json.loads(line) for line in path.read_text().splitlines()]
                logged = [e for e in lines if e.get("event") == "message"]
                assert logged[-1]["stan"] == sale.response["11"]
                assert logged[-1]["route"] == "sale" and logged[-1]["rc"] == "00"
            await client.close()


@pytest.mark.parametrize("framing", ["len4", "len2-tpdu"])
async def test_other_framings_by_configuration(tmp_path: Path, framing: str) -> None:
    setup = make_host(tmp_path, framing=framing)
    for data in setup.key_files.values():
        data["framing"] = framing
    async with running(setup):
        client = await signed_on(setup)
        if framing == "len2-tpdu":  # the reply's TPDU has destination and source swapped
            assert client._stream is not None
            await client._stream.send(
                client._encoder.encode(
                    client.encode(client.sale_fields(100), mac=True), bytes.fromhex("6000010002")
                )
            )
            with anyio.fail_after(5):
                data = await client._stream.receive()
            assert data[2:7] == bytes.fromhex("6000020001")
        assert (await client.sale(100)).rc == "00"
        await client.close()


async def test_connections_beyond_the_maximum_are_refused(tmp_path: Path) -> None:
    setup = make_host(tmp_path, max_connections=2)
    async with running(setup):
        first, second = await signed_on(setup), await signed_on(setup, "TERM0002")
        third = await anyio.connect_tcp("127.0.0.1", setup.config.port)
        with anyio.fail_after(3), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
            await third.receive()
        await third.aclose()
        assert (await first.sale(100)).rc == "00" and (await second.sale(100)).rc == "00"
        await first.close()
        await second.close()


async def test_format_errors_name_the_field(setup: HostSetup) -> None:
    async with running(setup) as server:
        client = await signed_on(setup)
        cases = {"4": "00000000012X", "11": "00001A", "25": "0X", "49": None, "12": None}
        for name, value in cases.items():
            fields = client.sale_fields(100)
            if value is None:
                del fields[name]
            else:
                fields[name] = value
            ex = await client.request(fields)
            assert ex.rc == "30", name
            ctx = server.core.decide(client.encode(fields, mac=True))
            assert ctx is not None
            assert ctx.reason == (f"MISSING_{name}" if value is None else f"FORMAT_{name}")
        await client.close()


async def test_retransmitted_approval_gets_94_even_where_it_would_now_be_declined(
    setup: HostSetup,
) -> None:
    async with running(setup) as server:
        client = await signed_on(setup)
        fields = client.sale_fields(5000)
        assert (await client.request(fields)).rc == "00"
        with sqlite3.connect(setup.config.db) as db:  # the limit drops below the amount
            db.execute("UPDATE terminals SET sale_limit = 100 WHERE tid = 'TERM0001'")
        server.core.state.invalidate("terminal", "TERM0001")
        assert (await client.request(fields)).rc == "94"
        assert (await client.request(client.sale_fields(5000))).rc == "61"
        await client.close()


async def test_a_sale_the_ledger_cannot_write_is_answered_96_not_approved(
    setup: HostSetup,
) -> None:
    async with running(setup) as server:
        client = await signed_on(setup)
        assert (await client.sale(100)).rc == "00"
        with sqlite3.connect(setup.config.db) as db:  # the ledger table disappears
            db.execute("ALTER TABLE sales RENAME TO sales_elsewhere")
        ex = await client.sale(100)
        assert ex.rc == "96" and "38" not in ex.response and "37" not in ex.response
        assert (await client.echo()).rc == "00"  # the host itself carries on
        await client.close()
        assert server.ledger.written >= 2


async def test_sign_off_through_another_host_process_reaches_this_one(setup: HostSetup) -> None:
    """Two hosts share the store; a sign-off made through one is seen by the other within
    the cache time (here: at once, the cache cleared as a second would)."""
    async with running(setup) as server:
        client = await signed_on(setup)
        assert (await client.sale(100)).rc == "00"
        with sqlite3.connect(setup.config.db) as db:  # what the other process's sign-off does
            db.execute("DELETE FROM sessions WHERE tid = 'TERM0001'")
        assert (await client.sale(100)).rc == "00"  # still cached, for at most a second
        sessions = server.core.state.sessions
        for tid, entry in sessions.items():
            sessions[tid] = (entry[0] - 2, *entry[1:])
        ex = await client.request(client.sale_fields(100))
        assert ex.rc == "58" and "64" not in ex.response
        await client.close()


async def test_a_peer_that_leaves_before_its_answers_only_loses_its_connection(
    setup: HostSetup,
) -> None:
    async with running(setup):
        client = await signed_on(setup)
        for _ in range(20):  # pipelined sales, then gone before the answers
            rude = setup.client()
            rude.keys = client.keys
            await rude.connect()
            await rude.send_pipelined([rude.sale_fields(100) for _ in range(50)])
            assert rude._stream is not None
            raw = rude._stream.extra(anyio.abc.SocketAttribute.raw_socket)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await rude._stream.aclose()  # a reset: the host's writes to it fail
        await anyio.sleep(0.3)
        assert (await client.sale(100)).rc == "00"  # the host is still serving
        await client.close()
