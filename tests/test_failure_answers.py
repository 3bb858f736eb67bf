"""Failure answers (PROTOCOL.md 3): what they echo so that a client matching answers by STAN and
terminal can match them, which of them carry a MAC, the 30 for a malformed MTI or field 3, and
the partial decode that lets a frame that does not decode whole be answered with what did.
The rule alone, the host core in process, then a real host on loopback."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from acqhost.domain import crypto
from acqhost.host.answers import (
    MATCH_FIELDS,
    UNMACED_CODES,
    carries_mac,
    echo_fields,
    failure_answer,
)
from acqhost.host.context import Context
from acqhost.host.core import UNKNOWN, HostCore, response_mti
from acqhost.runtime.dispatch import Dispatcher
from acqhost.wire import specs
from acqhost.wire.codec import compile_spec
from acqhost.wire.tlv import decode_tlv
from tests.fuzzkit import ECHO, FRAME_FIELDS
from tests.hostkit import HostSetup, make_host, running, signed_on

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import pipeline as bench

CODEC = compile_spec(specs.load("acq87"))


def check_failure_answer(request: dict[str, str], answer: dict[str, str], code: str) -> None:
    """``answer`` is the failure answer ``code`` to ``request`` (as far as it decoded)."""
    assert answer["t"] == response_mti(request["t"]) and answer["39"] == code, answer
    echo = ECHO.get(request["t"], echo_fields(UNKNOWN.echo))
    for name in echo:
        assert answer.get(name) == request.get(name), (name, request, answer)
    assert set(answer) <= FRAME_FIELDS | set(echo), answer


# -- the rule -----------------------------------------------------------------------------


def test_every_message_echoes_the_match_fields_and_its_own_in_field_order() -> None:
    assert echo_fields(()) == MATCH_FIELDS == ("7", "11", "41", "42")
    assert ECHO["0200"] == ("3", "4", "7", "11", "12", "13", "41", "42", "49")
    assert ECHO["0400"] == ("3", "4", "7", "11", "41", "42", "49", "90")
    assert ECHO["0500"] == ("3", "7", "11", "41", "42")
    assert ECHO["0800"] == ("7", "11", "41", "42", "70")
    assert ECHO["0300"] == ("7", "11", "41", "42", "91", "101")


def test_a_failure_answer_echoes_what_decoded_and_nothing_else() -> None:
    partial = {"t": "0200", "p": "7238000000C00000", "3": "000000", "11": "000042",
               "41": "TERM0001", "22": "051"}  # fmt: skip
    assert failure_answer(partial, "0210", "30", ECHO["0200"]) == {
        "t": "0210", "3": "000000", "11": "000042", "41": "TERM0001", "39": "30"
    }  # fmt: skip
    answer = failure_answer({"t": "0500", "11": "1"}, "0510", "12", ECHO["0500"], {"NB": "2"})
    assert answer == {"t": "0510", "11": "1", "39": "12", "48": "NB0012"}


@pytest.mark.parametrize("code", ["00", "03", "05", "12", "13", "25", "30", "58", "63", "94", "96"])
def test_03_58_and_63_carry_no_mac_others_do_when_the_request_was_verified(code: str) -> None:
    assert carries_mac(code, True) == (code not in UNMACED_CODES)
    assert not carries_mac(code, False)
    assert {"03", "58", "63"} == UNMACED_CODES


@pytest.mark.parametrize(("mti", "answer"), [("02A0", "0210"), ("0A00", "0A10"), ("ABCD", "AB1D"),
                                             ("020", "021")])  # fmt: skip
def test_the_answer_to_a_malformed_mti_is_never_that_mti(mti: str, answer: str) -> None:
    assert response_mti(mti) == answer


# -- the partial decode -------------------------------------------------------------------


def sale_frame(**changes: str) -> dict[str, str]:
    fields = {"t": "0200", "2": "6222021234567890128", "3": "000000", "4": "000000012345",
              "7": "1122101530", "11": "000042", "12": "101530", "13": "1122", "14": "3012",
              "22": "051", "25": "00", "41": "TERM0001", "42": "MERCHANT0000001",
              "48": "TS0011", "49": "156", "64": "0" * 16}  # fmt: skip
    fields.update(changes)
    return fields


def test_partial_decode_keeps_the_fields_before_the_one_that_fails() -> None:
    fields = sale_frame()
    whole = CODEC.encode(fields)
    assert CODEC.decode_partial(whole) == CODEC.decode(whole)
    bad_48 = whole.replace(b"006TS0011", b"0X6TS0011")  # field 48's LLL is not a number
    with pytest.raises(Exception, match="field 48"):
        CODEC.decode(bad_48)
    part = CODEC.decode_partial(bytearray(bad_48))
    assert part == {k: v for k, v in CODEC.decode(whole).items() if k not in ("48", "49", "64")}
    assert CODEC.decode_partial(whole[:4] + b"\x00") == {"t": "0200"}  # the bitmap is cut off
    assert CODEC.decode_partial(b"\xff\xfe") == {}


# -- the host core, in process --------------------------------------------------------------


@pytest.fixture
def host() -> Iterator[tuple[HostCore, crypto.SessionKeys]]:
    """A host core with its terminal signed on (the sign-on through the ledger)."""
    with tempfile.TemporaryDirectory() as folder:
        dispatcher, _, seed = bench.build(Path(folder) / "host.db")
        holder: list[crypto.SessionKeys] = []

        async def sign_on(dispatcher: Dispatcher) -> None:
            async with anyio.create_task_group() as tg:
                await tg.start(dispatcher.ledger.run)
                holder.append(await bench.sign_on(dispatcher, seed))
                dispatcher.ledger.close()

        anyio.run(sign_on, dispatcher)
        try:
            yield dispatcher.core, holder[0]
        finally:
            bench.close(dispatcher)


def macd(keys: crypto.SessionKeys, fields: dict[str, str]) -> bytes:
    body = CODEC.encode(fields)[:-8]
    return body + crypto.mac(keys.tx_mac, body)


def answer_of(core: HostCore, frame: bytes) -> tuple[Context, dict[str, str], bool]:
    """What the host answers to ``frame`` that needs no write: context, fields, MAC'd."""
    ctx = core.decide(frame)
    assert ctx is not None and ctx.effect is None
    answer = CODEC.decode(core.answer(ctx))
    return ctx, answer, "64" in answer or "128" in answer


@pytest.mark.parametrize("mti", ["02A0", "0A00", "020 ", "ABCD"])
def test_an_mti_that_is_not_four_digits_is_answered_30(host: Any, mti: str) -> None:
    core, keys = host
    fields = sale_frame(t=mti)
    ctx, answer, mac = answer_of(core, macd(keys, fields))
    assert answer["39"] == "30" and ctx.reason == "FORMAT_MTI"
    assert answer["t"] == response_mti(mti) != mti
    assert (answer["11"], answer["41"], answer["42"]) == ("000042", "TERM0001", "MERCHANT0000001")
    assert mac  # the frame's MAC verified: the 30 is MAC'd
    _, unmacd, mac = answer_of(core, CODEC.encode(fields))
    assert unmacd["39"] == "30" and not mac


@pytest.mark.parametrize(
    "fields",
    [
        sale_frame(**{"3": "00000A"}),
        sale_frame(**{"3": "A00000"}),
        {"t": "0400", "3": "0000X0", "4": "000000012345", "7": "1122101530", "11": "000042",
         "41": "TERM0001", "42": "MERCHANT0000001", "49": "156",
         "90": "0200" + "000041" + "1122101530" + "0" * 22, "128": "0" * 16},
        {"t": "0500", "3": "ABCDEF", "7": "1122101530", "11": "000042", "41": "TERM0001",
         "42": "MERCHANT0000001", "48": "BN006000001CT0010AM0010", "64": "0" * 16},
        {"t": "0300", "3": "ABCDEF", "7": "1122101530", "11": "000042", "41": "TERM0001",
         "42": "MERCHANT0000001", "48": "RF016ABCDEFGHIJKLMNOP", "91": "5", "128": "0" * 16},
    ],
    ids=["sale-3-end", "sale-3-start", "reversal", "settle", "rebind"],
)  # fmt: skip
def test_a_field_3_that_is_not_numeric_is_answered_30(host: Any, fields: dict[str, str]) -> None:
    core, keys = host
    ctx, answer, mac = answer_of(core, macd(keys, fields))
    assert ctx.reason == "FORMAT_3" and mac
    check_failure_answer(fields, answer, "30")


def test_a_sale_without_a_route_is_answered_12_with_every_echo_field(host: Any) -> None:
    core, keys = host
    fields = sale_frame(**{"3": "200000"})
    ctx, answer, mac = answer_of(core, macd(keys, fields))
    assert ctx.reason == "NO_ROUTE" and mac and answer["49"] == "156"
    check_failure_answer(fields, answer, "12")


def test_a_frame_that_fails_after_41_and_42_echoes_what_decoded(host: Any) -> None:
    core, keys = host
    fields = sale_frame()
    good = macd(keys, fields)
    bad_48 = good.replace(b"006TS0011", b"0X6TS0011")
    relaced = bad_48[:-8] + crypto.mac(keys.tx_mac, bad_48[:-8])  # a terminal's own bad 48
    decoded = {k: v for k, v in fields.items() if k not in ("48", "49", "64")}
    for frame, macs in ((relaced, True), (bad_48, False)):
        ctx, answer, mac = answer_of(core, frame)
        assert (ctx.route, ctx.reason, mac) == ("undecodable", "FORMAT_48", macs)
        check_failure_answer(decoded, answer, "30")
        assert "49" not in answer
    stranger = sale_frame(**{"41": "NOBODY01"})
    frame = macd(keys, stranger).replace(b"006TS0011", b"0X6TS0011")
    _, answer, mac = answer_of(core, frame)  # 30 comes before 03, and carries no MAC
    assert answer["39"] == "30" and answer["41"] == "NOBODY01" and not mac


def test_a_frame_that_fails_early_echoes_only_what_came_before(host: Any) -> None:
    core, keys = host
    good = macd(keys, sale_frame())
    bad_2 = good.replace(b"196222", b"1X6222", 1)  # field 2's LL: nothing after decodes
    _, answer, mac = answer_of(core, bad_2)
    assert answer == {"t": "0210", "p": answer["p"], "39": "30"} and not mac
    assert core.decide(b"\xff\xfe\x00") is None  # not even an MTI: no answer


def test_a_write_that_fails_answers_96_with_the_echo_and_nothing_approved(host: Any) -> None:
    core, keys = host
    fields = sale_frame(**{"11": "000077"})
    del fields["48"]
    ctx = core.decide(macd(keys, fields))
    assert ctx is not None and ctx.effect is not None
    core.complete(ctx, None, OSError("disk full"))
    answer = CODEC.decode(core.answer(ctx))
    check_failure_answer(fields, answer, "96")
    assert "64" in answer and "37" not in answer and "38" not in answer


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.builds(lambda mti, rest: mti + rest, st.sampled_from([b"0200", b"0400", b"0500",
                  b"0800", b"0300", b"02A0", b"ABCD"]), st.binary(max_size=200)),
        st.builds(lambda cut, flip: _damaged(cut, flip), st.integers(4, 140), st.integers(0, 255)),
    )
)  # fmt: skip
def test_whatever_arrives_is_answered_with_a_failure_answer_or_not_at_all(
    host: Any, frame: bytes
) -> None:
    core, _ = host
    ctx = core.decide(frame)
    if ctx is None:
        assert "t" not in CODEC.decode_partial(frame)
        return
    answer = CODEC.decode(core.answer(ctx))
    assert answer["39"] != "00" and answer["t"] == response_mti(ctx.req["t"])
    check_failure_answer(ctx.req, answer, answer["39"])


def _damaged(cut: int, flip: int) -> bytes:
    """A whole sale, MAC and all, with one byte changed at ``cut`` (or cut off there)."""
    whole = CODEC.encode(sale_frame())
    if flip == 0:
        return whole[:cut]
    return whole[:cut] + bytes([whole[cut % len(whole)] ^ flip]) + whole[cut + 1 :]


# -- a real host on loopback -----------------------------------------------------------------


@pytest.fixture
def setup(tmp_path: Path) -> HostSetup:
    return make_host(tmp_path)


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_a_client_matching_by_stan_and_terminal_matches_every_failure_answer(
    setup: HostSetup,
) -> None:
    async with running(setup):
        client = await signed_on(setup)
        assert client.keys is not None
        keys = client.keys
        settled = await client.sale(300)
        duplicate = await client.sale(400)
        assert (settled.rc, duplicate.rc) == ("00", "00")
        assert (await client.settle_as_host_says())[-1].rc == "00"  # both sales' batch
        o = settled.request
        not_signed_on = crypto.SessionKeys.from_kx(bytes(32), bytes(32))
        sale_bad_4 = dict(client.sale_fields(100), **{"4": "00000000012X"})
        bad_48 = client.encode(client.sale_fields(100, test=True), mac=True)
        bad_48 = bad_48.replace(b"006TS0011", b"0X6TS0011")[:-8]
        bad_48 += crypto.mac(keys.tx_mac, bad_48)  # MAC'd by the terminal as it is
        cases: list[tuple[dict[str, str], bytes, str, bool]] = []

        def add(fields: dict[str, str], code: str, *, with_keys: Any = keys,
                frame: bytes | None = None) -> None:  # fmt: skip
            if frame is None:
                secondary = any(k.isdigit() and int(k) > 64 for k in fields)
                mac_field = "128" if secondary else "64"
                body = client.codec.encode(dict(fields, **{mac_field: "0" * 16}))[:-8]
                frame = body + crypto.mac(with_keys.tx_mac, body)
            cases.append((fields, frame, code, code not in ("03", "58", "63")))

        add(sale_bad_4, "30")  # a format the stages check
        add(dict(client.sale_fields(100), **{"3": "00000X"}), "30")
        add(dict(client.sale_fields(100), t="02A0"), "30")
        decoded_48 = client.codec.decode_partial(bad_48)
        add(decoded_48, "30", frame=bad_48)  # does not decode whole
        add(dict(client.sale_fields(100), **{"41": "NOBODY01"}), "03")
        add(dict(client.sale_fields(100), **{"42": "MERCHANT0000002"}), "03")
        other = setup.client("TERM0002")
        add(dict(other.sale_fields(100)), "58", with_keys=not_signed_on)
        add(client.sale_fields(100), "63", with_keys=not_signed_on)
        add(duplicate.request, "94")
        add({"t": "0400", "3": o["3"], "4": o["4"], "7": o["7"], "11": client.stan(),
             "41": client.tid, "42": client.mid, "49": o["49"],
             "90": "0200" + o["11"] + o["7"] + "0" * 22}, "12")  # fmt: skip
        add(client.settle_fields(999_999, 0, 0), "12")
        add(dict(client.sale_fields(100), **{"3": "200000"}), "12")
        unknown_file = client.rebind_fields("2", {}, **{"101": "OTHERFILE"})
        add(unknown_file, "12")
        add({k: v for k, v in client.rebind_fields("2", {}).items() if k != "101"}, "30")
        matched_by = [(fields["41"], fields["11"]) for fields, *_ in cases]
        assert len(set(matched_by)) == len(cases)  # each request has a STAN of its own
        for _, frame, _, _ in cases:  # all sent before any answer is read
            await client.send_raw(frame)
        answers: dict[tuple[str, str], tuple[bytes, dict[str, str]]] = {}
        with anyio.fail_after(10):
            for _ in cases:
                raw = await client.receive_raw()
                answer = client.codec.decode(raw)
                answers[(answer["41"], answer["11"])] = (raw, answer)
        for fields, _, code, macd_answer in cases:
            raw, answer = answers.pop((fields["41"], fields["11"]))
            check_failure_answer(fields, answer, code)
            has_mac = "64" in answer or "128" in answer
            assert has_mac == macd_answer, (fields, answer)
            if has_mac:
                assert crypto.mac_ok(keys.rx_mac, raw[:-8], raw[-8:])
        assert not answers
        await client.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_network_failure_answers_echo_70_and_carry_no_mac(setup: HostSetup) -> None:
    async with running(setup):
        client = setup.client()
        async with client:
            fields = {"t": "0800", "7": "1122101530", "11": "000321", "41": "NOBODY01",
                      "42": client.mid, "70": "301"}  # fmt: skip
            ex = await client.request(fields, mac=False)
            check_failure_answer(fields, ex.response, "03")
            assert "64" not in ex.response
        terminal = await signed_on(setup)
        settle_12 = await terminal.settle(999_999, 0, 0)
        check_failure_answer(settle_12.request, settle_12.response, "12")
        assert decode_tlv(settle_12.response["48"]).keys() == {"NB"} and "64" in settle_12.response
        await terminal.close()
