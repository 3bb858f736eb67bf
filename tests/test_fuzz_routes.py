"""Fuzzing in CI: framing, codec, field 48 and every route of the host, with hypothesis.

Requests of every route (sign-on, sign-off, echo, sale, test sale, reversal, rebind submit,
inquire and cancel, batch close) are made wrong (fields dropped, added or given random values
and lengths, random field 48 elements, another terminal or MTI; a valid, wrong, missing or
foreign MAC) or their MAC'd bytes mutated (and MAC'd again), then run through the server's own
pieces without an event loop (connection core in every framing, dispatcher, host core, a
real SQLite store). Each answer is held to tests/fuzzkit.py's
oracle: no exception escapes, every answer decodes, its code is one PROTOCOL.md documents
for the message, failure answers echo what PROTOCOL.md 3 says, nothing is approved without a
valid MAC. A bounded subset goes to a real server on loopback, from several connections at
once, while a normal terminal keeps signing on and selling on another.

The examples are derandomized and bounded, so CI sees the same inputs every run; the long,
coverage-guided run is tests/fuzz_atheris.py.
"""

from __future__ import annotations

import io
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from acqhost.errors import CodecError, TLVError
from acqhost.wire import specs
from acqhost.wire.codec import compile_spec
from acqhost.wire.framing import FRAMINGS
from acqhost.wire.tlv import decode_tlv, encode_tlv
from simulators.terminal import TerminalClient
from tests.codec_strategies import damaged, messages
from tests.fuzzkit import FuzzFailure, FuzzHost, Requests, framed
from tests.fuzzmutations import TAGS, fuzzed_request, mutate_bytes, random_tlv
from tests.hostkit import HostSetup, make_host, running

CI = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def host() -> Iterator[FuzzHost]:
    with tempfile.TemporaryDirectory() as folder:
        fuzz = FuzzHost(Path(folder), quiet=False)
        try:
            yield fuzz
        finally:
            fuzz.close()


ROUTES = ("sign_on", "sign_off", "echo", "sale", "test_sale", "reversal", "rebind_submit",
          "rebind_inquire", "rebind_cancel", "settle")  # fmt: skip


def test_the_fuzzed_routes_are_every_route_the_host_has(host: FuzzHost) -> None:
    assert set(host.valid_requests()) == set(ROUTES)
    routed = {route.name for route in host.core.routes.values()}
    assert routed == set(ROUTES) - {"test_sale"}  # a test sale is a sale with 48 TS


# -- the oracle can fail -------------------------------------------------------------------


def test_the_oracle_refuses_approvals_without_a_mac_and_undocumented_codes(
    host: FuzzHost,
) -> None:
    fields = host.valid_requests()["sale"]
    unmacd = host.codec.encode(fields)
    req, whole = host.decoded(unmacd)
    out = host.exchange(unmacd)
    assert out is not None and host.codec.decode(out)["39"] == "63"
    host.check(unmacd, req, whole, False, host.keys, out)  # the host's own answer passes
    approved = host.codec.encode({**host.codec.decode(out), "39": "00"})
    with pytest.raises(FuzzFailure, match="approved without a valid MAC"):
        host.check(unmacd, req, whole, False, host.keys, approved)
    undocumented = host.codec.encode({**host.codec.decode(out), "39": "96"})
    with pytest.raises(FuzzFailure, match="not documented"):
        host.check(unmacd, req, whole, False, host.keys, undocumented)
    with pytest.raises(FuzzFailure, match="not echoed"):
        answer = host.codec.decode(out)
        del answer["11"]
        host.check(unmacd, req, whole, False, host.keys, host.codec.encode(answer))
    with pytest.raises(FuzzFailure, match="no answer"):
        host.check(unmacd, req, whole, False, host.keys, None)
    macd = host.macd(fields)
    req, whole = host.decoded(macd)
    with pytest.raises(FuzzFailure, match="no MAC on answer 30"):
        host.check(macd, req, whole, True, host.keys, undocumented.replace(b"96", b"30"))


# -- every route, through the host core ----------------------------------------------------


@settings(CI, max_examples=500)
@given(route=st.sampled_from(ROUTES), rnd=st.randoms(use_true_random=False))
def test_wrong_requests_of_every_route_get_documented_answers(
    host: FuzzHost, route: str, rnd: random.Random
) -> None:
    host.run(fuzzed_request(host, rnd, route))


@settings(CI, max_examples=150)
@given(
    framing=st.sampled_from(FRAMINGS),
    routes=st.lists(st.sampled_from(ROUTES), min_size=1, max_size=4),
    rnd=st.randoms(use_true_random=False),
    damage=st.booleans(),
)
def test_pipelined_frames_in_every_framing_get_documented_answers_in_order(
    host: FuzzHost, framing: str, routes: list[str], rnd: random.Random, damage: bool
) -> None:
    messages = [fuzzed_request(host, rnd, route) for route in routes]
    stream = b"".join(framed(framing, m) for m in messages)
    if damage:  # the framing itself damaged: the frames before the damage are still answered
        stream = mutate_bytes(rnd, stream)
    answered = host.connection(framing, stream)
    if not damage:
        assert [m for m, _ in answered] == messages


@settings(CI, max_examples=100)
@given(framing=st.sampled_from(FRAMINGS), data=st.binary(max_size=300), remac=st.booleans())
def test_arbitrary_bytes_in_every_framing_get_documented_answers(
    host: FuzzHost, framing: str, data: bytes, remac: bool
) -> None:
    host.connection(framing, data, host.remac if remac else None)


# -- codec and field 48 ---------------------------------------------------------------------

# Every MTI of PROTOCOL.md: the terminals' requests and answers and the banks' advices.
MTIS = ("0200", "0210", "0300", "0310", "0320", "0330", "0400", "0410", "0500", "0510", "0520",
        "0530", "0800", "0810")  # fmt: skip
CODECS = {name: (compile_spec(specs.load(name)), specs.load(name)) for name in specs.available()}


@settings(CI, max_examples=300)
@given(name=st.sampled_from(sorted(CODECS)), mti=st.sampled_from(MTIS), data=st.data())
def test_mutated_messages_of_every_mti_raise_only_codec_error(
    name: str, mti: str, data: st.DataObject
) -> None:
    codec, spec = CODECS[name]
    message = {**data.draw(messages(spec)), "t": mti}
    try:
        valid = codec.encode(message)
    except CodecError:
        return
    broken = data.draw(damaged(valid))
    part = codec.decode_partial(broken)  # never raises: what decoded before the failure
    try:
        whole = codec.decode(broken)
    except CodecError as e:
        assert e.field and e.offset >= 0
        assert all(k in ("t", "h", "p", "1") or int(k) < 129 for k in part)
    else:
        assert part == whole
        fields = {k: v for k, v in whole.items() if k not in ("p", "1")}
        again = codec.decode(codec.encode(fields))
        assert {k: v for k, v in again.items() if k not in ("p", "1")} == fields


@settings(CI, max_examples=300)
@given(
    elements=st.dictionaries(st.sampled_from(TAGS), st.text(max_size=40), max_size=6),
    rnd=st.randoms(use_true_random=False),
)
def test_mutated_field_48_raises_only_tlv_error(
    elements: dict[str, str], rnd: random.Random
) -> None:
    text = encode_tlv(elements)
    assert decode_tlv(text) == elements
    for broken in (
        mutate_bytes(rnd, text.encode()).decode("utf-8", "replace"),
        random_tlv(rnd),
    ):
        try:
            decoded = decode_tlv(broken)
        except TLVError as e:
            assert 0 <= e.offset <= len(broken)
        else:
            assert encode_tlv(decoded) == broken


# -- after the barrage, and on a real server ------------------------------------------------


@settings(CI, max_examples=200)
@given(route=st.sampled_from(("sale", "test_sale", "reversal")), rnd=st.randoms())
def test_fuzzed_requests_leave_no_card_number_in_the_logs(
    host: FuzzHost, json_logs: io.StringIO, route: str, rnd: random.Random
) -> None:
    message = fuzzed_request(host, rnd, route)
    before = json_logs.tell()
    host.run(message)
    logged = json_logs.getvalue()[before:]
    req, _ = host.decoded(message)
    for name in ("2", "35"):
        digits = "".join(c for c in req.get(name, "") if c.isdigit())
        if len(digits) >= 12:
            assert digits[:12] not in logged, (name, logged)


def test_only_messages_whose_mac_verified_earn_a_specialised_codec_function(
    tmp_path: Path,
) -> None:
    """The codec keeps max_layouts specialised functions per direction. A peer sending frames
    of as many layouts, each twice, used to take every place (found by fuzzing: the host's
    memory grew with the layouts sent), leaving the terminals' own layouts on the exact path,
    about seven times slower to decode, for good."""
    host = FuzzHost(tmp_path, quiet=False)
    try:
        codec = host.core.codec
        sale = host.terminal.sale_fields(100)
        optional = ("3", "4", "7", "11", "12", "13", "14", "22", "25", "49")
        for n in range(codec.max_layouts + 10):
            present = [name for bit, name in enumerate(optional) if n >> bit & 1]
            fields = {name: sale[name] for name in ("t", "2", "41", "42", *present)}
            frame = host.codec.encode(fields)  # no MAC: anyone can send it
            for _ in range(2):
                host.run(frame)
        assert codec._dec_cache == {} and codec._enc_cache == {}
        for _ in range(2):
            answer = host.run(host.macd(host.terminal.sale_fields(100)))
            assert answer is not None and host.codec.decode(answer)["39"] == "00"
        assert len(codec._dec_cache) == len(codec._enc_cache) == 1
    finally:
        host.close()


def test_after_the_barrage_a_terminal_signs_on_and_sells(host: FuzzHost) -> None:
    host.sign_on()
    answer = host.run(host.macd(host.terminal.sale_fields(100, stan="999999")))
    assert answer is not None and host.codec.decode(answer)["39"] == "00"


@pytest.fixture
def setup(framing: str) -> Iterator[HostSetup]:
    with tempfile.TemporaryDirectory() as folder:
        setup = make_host(
            Path(folder),
            read_timeout=1.0,
            frame_timeout=0.5,
            first_frame_timeout=0.5,
            framing=framing,
        )
        for key_file in setup.key_files.values():
            key_file["framing"] = framing
        yield setup


async def _barrage(requests: Requests, setup: HostSetup, seed: int, count: int) -> int:
    """``count`` fuzzed requests on one connection, pipelined, their answers held to the
    oracle in order (a frame whose MTI does not decode gets none); how many were answered."""
    rnd = random.Random(seed)
    sender = TerminalClient(setup.key_files["TERM0001"])
    sent = [fuzzed_request(requests, rnd, rnd.choice(ROUTES)) for _ in range(count)]
    keys = requests.keys
    answered = 0
    async with sender:
        for message in sent:
            await sender.send_raw(message)
        for message in sent:
            req, whole = requests.decoded(message)
            out = None if "t" not in req else await sender.receive_raw()
            requests.check(message, req, whole, requests.mac_valid(message, req, whole), keys, out)
            answered += out is not None
    return answered


@pytest.mark.parametrize(
    ("anyio_backend", "framing"), [("asyncio", "len2"), ("trio", "len4"), ("asyncio", "len2-tpdu")]
)
@pytest.mark.anyio
async def test_a_real_server_answers_fuzzed_connections_and_keeps_serving_others(
    setup: HostSetup, framing: str
) -> None:
    async with running(setup):
        requests = Requests(setup)
        # Fuzzed sign-ons and sign-offs change the session while other connections' requests
        # are in flight, MAC'd under the keys they were sent with.
        requests.session_known = False
        await requests.terminal.connect()
        assert (await requests.terminal.sign_on()).rc == "00"
        await requests.terminal.close()
        answered: list[int] = []
        normal = setup.client("TERM0002")
        sales: list[str] = []

        async def barrage(seed: int) -> None:
            answered.append(await _barrage(requests, setup, seed, 25))

        async def garbage(data: bytes) -> None:
            stream = await anyio.connect_tcp("127.0.0.1", setup.config.port)
            async with stream:
                await stream.send(data)
                with anyio.move_on_after(3):
                    try:
                        while await stream.receive():
                            pass
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        pass

        async def sell() -> None:
            async with normal:
                assert (await normal.sign_on()).rc == "00"
                for _ in range(10):
                    sales.append((await normal.sale(100)).rc)
                    await anyio.sleep(0.01)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(sell)
                for seed in range(4):
                    tg.start_soon(barrage, seed)
                rnd = random.Random(7)
                for data in (b"\x00\x00", b"\xff\xff" + rnd.randbytes(100), b"00X1",
                             rnd.randbytes(300), framed(framing, b"0200")[:-2]):  # fmt: skip
                    tg.start_soon(garbage, data)
        assert sales == ["00"] * 10
        assert sum(answered) > 50  # most fuzzed requests decode far enough to be answered
        # After it all, a terminal still signs on and sells on a connection of its own.
        fresh = setup.client("TERM0001")
        async with fresh:
            assert (await fresh.sign_on()).rc == "00"
            assert (await fresh.sale(100)).rc == "00"
            assert (await fresh.echo()).rc == "00"
