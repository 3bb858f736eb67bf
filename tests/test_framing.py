"""Sans-I/O framing: round trips however the bytes are split, and every way a stream can break."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from acqhost.errors import FramingError
from acqhost.wire.framing import FRAMINGS, Frame, FrameDecoder, FrameEncoder, reply_tpdu

ROOT = Path(__file__).resolve().parent.parent
TPDU = b"\x60\x00\x01\x80\x02"

messages = st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=20)
tpdus = st.tuples(st.binary(min_size=2, max_size=2), st.binary(min_size=2, max_size=2)).map(
    lambda ds: b"\x60" + ds[0] + ds[1]
)


def frames_for(framing: str, msgs: list[bytes], tpdu: bytes = TPDU) -> list[Frame]:
    return [Frame(m, tpdu if framing == "len2-tpdu" else b"") for m in msgs]


def wire(framing: str, frames: list[Frame]) -> bytes:
    encoder = FrameEncoder(framing)
    return b"".join(encoder.encode(f.message, f.tpdu) for f in frames)


def feed_in_chunks(decoder: FrameDecoder, data: bytes, cuts: list[int]) -> list[Frame]:
    out: list[Frame] = []
    bounds = [0, *sorted({c % (len(data) + 1) for c in cuts}), len(data)]
    for start, end in itertools.pairwise(bounds):
        out += decoder.feed(data[start:end])
    return out


def raises_exactly(message: str) -> pytest.RaisesExc[FramingError]:
    return pytest.raises(FramingError, match=f"^{re.escape(message)}$")


def raises_starting(message: str) -> pytest.RaisesExc[FramingError]:
    return pytest.raises(FramingError, match=f"^{re.escape(message)}")


def error_of(framing: str, data: bytes, max_size: int = 4096) -> str:
    decoder = FrameDecoder(framing, max_size)
    with pytest.raises(FramingError) as info:
        decoder.feed(data)
        decoder.end_of_stream()
    return str(info.value)


# --- wire formats -------------------------------------------------------------------------


def test_len2_header_is_two_byte_big_endian_length() -> None:
    assert FrameEncoder("len2").encode(b"x" * 258) == b"\x01\x02" + b"x" * 258


def test_len4_header_is_four_ascii_digits() -> None:
    assert FrameEncoder("len4").encode(b"0800abc") == b"00070800abc"


def test_len2_tpdu_length_counts_tpdu_and_message() -> None:
    assert FrameEncoder("len2-tpdu").encode(b"0800", TPDU) == b"\x00\x09" + TPDU + b"0800"


def test_default_framing_is_len2_with_max_size_4096() -> None:
    decoder, encoder = FrameDecoder(), FrameEncoder()
    assert (decoder.framing, decoder.max_size) == ("len2", 4096)
    assert (encoder.framing, encoder.max_size) == ("len2", 4096)


def test_decoder_returns_tpdu_separately_from_message() -> None:
    assert FrameDecoder("len2-tpdu").feed(b"\x00\x09" + TPDU + b"0800") == [Frame(b"0800", TPDU)]


def test_framings_without_tpdu_give_empty_tpdu() -> None:
    assert FrameDecoder("len2").feed(b"\x00\x0208") == [Frame(b"08", b"")]
    assert FrameDecoder("len4").feed(b"000208") == [Frame(b"08", b"")]


# --- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("framing", FRAMINGS)
def test_many_frames_fed_one_byte_at_a_time_round_trip(framing: str) -> None:
    frames = frames_for(framing, [bytes([i % 256]) * (1 + i * 7 % 300) for i in range(60)])
    decoder = FrameDecoder(framing)
    out: list[Frame] = []
    for byte in wire(framing, frames):
        out += decoder.feed(bytes([byte]))
    assert out == frames
    assert decoder.buffered == 0
    decoder.end_of_stream()


@pytest.mark.parametrize("framing", FRAMINGS)
def test_pipelined_frames_in_one_feed_all_come_out_in_order(framing: str) -> None:
    frames = frames_for(framing, [b"0200" + str(i).encode() for i in range(500)])
    decoder = FrameDecoder(framing)
    assert decoder.feed(wire(framing, frames)) == frames
    assert decoder.buffered == 0


@pytest.mark.parametrize("framing", FRAMINGS)
def test_partial_frame_stays_buffered_until_completed(framing: str) -> None:
    data = wire(framing, frames_for(framing, [b"first", b"second"]))
    decoder = FrameDecoder(framing)
    cut = len(data) - 3
    assert [f.message for f in decoder.feed(data[:cut])] == [b"first"]
    assert decoder.buffered == cut - len(wire(framing, frames_for(framing, [b"first"])))
    assert [f.message for f in decoder.feed(data[cut:])] == [b"second"]
    assert decoder.buffered == 0


def test_buffered_counts_bytes_waiting() -> None:
    decoder = FrameDecoder("len2")
    decoder.feed(b"\x00\x05ab")
    assert decoder.buffered == 4
    decoder.feed(b"c")
    assert decoder.buffered == 5
    assert decoder.feed(b"de\x00") == [Frame(b"abcde")]
    assert decoder.buffered == 1


def test_empty_feed_returns_nothing() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"") == []
    assert decoder.buffered == 0


def test_decoder_accepts_bytearray_and_memoryview() -> None:
    decoder = FrameDecoder("len4")
    assert decoder.feed(bytearray(b"0003abc0")) == [Frame(b"abc")]
    assert decoder.feed(memoryview(b"002xy")) == [Frame(b"xy")]
    assert all(type(f.message) is bytes for f in decoder.feed(bytearray(b"0001z")))


@given(framing=st.sampled_from(FRAMINGS), msgs=messages, tpdu=tpdus, cuts=st.lists(st.integers()))
def test_frames_fed_in_random_chunks_round_trip(
    framing: str, msgs: list[bytes], tpdu: bytes, cuts: list[int]
) -> None:
    frames = frames_for(framing, msgs, tpdu)
    decoder = FrameDecoder(framing)
    assert feed_in_chunks(decoder, wire(framing, frames), cuts) == frames
    assert decoder.buffered == 0
    decoder.end_of_stream()


@given(framing=st.sampled_from(FRAMINGS), msgs=messages, cut=st.integers(min_value=1))
def test_stream_cut_anywhere_inside_a_frame_fails_at_end_of_stream(
    framing: str, msgs: list[bytes], cut: int
) -> None:
    data = wire(framing, frames_for(framing, msgs))
    boundaries = set()
    decoder = FrameDecoder(framing)
    pos = 0
    for frame in frames_for(framing, msgs):
        pos += len(FrameEncoder(framing).encode(frame.message, frame.tpdu))
        boundaries.add(pos)
    cut %= len(data)
    decoder.feed(data[:cut])
    if cut == 0 or cut in boundaries:
        decoder.end_of_stream()
    else:
        with raises_starting("stream ended inside a"):
            decoder.end_of_stream()


@given(
    framing=st.sampled_from(FRAMINGS), data=st.binary(max_size=200), cuts=st.lists(st.integers())
)
def test_arbitrary_bytes_raise_only_framing_error(
    framing: str, data: bytes, cuts: list[int]
) -> None:
    decoder = FrameDecoder(framing, max_size=100)
    try:
        for frame in feed_in_chunks(decoder, data, cuts):
            assert len(frame.message) + len(frame.tpdu) <= 100
        decoder.end_of_stream()
    except FramingError:
        pass


# --- max_size -----------------------------------------------------------------------------


@pytest.mark.parametrize("framing", FRAMINGS)
def test_frame_of_exactly_max_size_passes_and_one_more_fails(framing: str) -> None:
    max_size = 300
    body = max_size - (5 if framing == "len2-tpdu" else 0)
    tpdu = TPDU if framing == "len2-tpdu" else b""
    big = FrameEncoder(framing, max_size=1000)
    exact = big.encode(b"m" * body, tpdu)
    over = big.encode(b"m" * (body + 1), tpdu)

    assert FrameDecoder(framing, max_size).feed(exact) == [Frame(b"m" * body, tpdu)]
    assert FrameEncoder(framing, max_size).encode(b"m" * body, tpdu) == exact
    assert error_of(framing, over, max_size) == "frame length 301 exceeds max_size 300"
    with raises_exactly("frame length 301 exceeds max_size 300"):
        FrameEncoder(framing, max_size).encode(b"m" * (body + 1), tpdu)


def test_oversize_header_is_refused_before_the_body_arrives() -> None:
    decoder = FrameDecoder("len2")
    with raises_exactly("frame length 65535 exceeds max_size 4096"):
        decoder.feed(b"\xff\xff")


@pytest.mark.parametrize(
    ("framing", "max_size"),
    [("len2", 0), ("len2", 65536), ("len4", 10000), ("len2-tpdu", 5), ("len4", -1)],
)
def test_max_size_the_header_cannot_express_is_a_value_error(framing: str, max_size: int) -> None:
    with pytest.raises(ValueError, match=rf"^max_size {max_size} out of range for framing"):
        FrameDecoder(framing, max_size)
    with pytest.raises(ValueError, match=rf"^max_size {max_size} out of range for framing"):
        FrameEncoder(framing, max_size)


def test_unknown_framing_is_a_value_error() -> None:
    message = "^unknown framing 'len3'; expected one of len2, len4, len2-tpdu$"
    with pytest.raises(ValueError, match=message):
        FrameDecoder("len3")
    with pytest.raises(ValueError, match=message):
        FrameEncoder("len3")


# --- decoder errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("framing", "data"), [("len2", b"\x00\x00"), ("len4", b"0000"), ("len2-tpdu", b"\x00\x00")]
)
def test_zero_length_is_refused(framing: str, data: bytes) -> None:
    assert error_of(framing, data) == "zero-length frame"


@pytest.mark.parametrize(
    ("header", "shown"),
    [(b"12a4", b"12a4"), (b" 123", b" 123"), (b"+123", b"+123"), (b"-001", b"-001")],
)
def test_malformed_len4_header_is_refused(header: bytes, shown: bytes) -> None:
    assert error_of("len4", header + b"x" * 200) == f"len4 header {shown!r} is not 4 ASCII digits"


def test_non_ascii_digits_are_not_a_len4_header() -> None:
    # Arabic-Indic digit three in UTF-8: str.isdigit would say yes, bytes.isdigit says no.
    header = "٣".encode()[:2] + b"12"
    assert error_of("len4", header) == f"len4 header {header!r} is not 4 ASCII digits"


def test_partial_len4_header_that_cannot_become_digits_fails_at_once() -> None:
    decoder = FrameDecoder("len4")
    with raises_exactly("len4 header b'1a' is not 4 ASCII digits"):
        decoder.feed(b"1a")


@pytest.mark.parametrize("length", [1, 2, 3, 4])
def test_tpdu_framing_length_below_five_leaves_no_room_for_tpdu(length: int) -> None:
    assert (
        error_of("len2-tpdu", bytes([0, length]) + b"\x60" * length)
        == f"frame length {length} leaves no room for the 5-byte TPDU"
    )


def test_tpdu_framing_length_five_has_no_message() -> None:
    assert error_of("len2-tpdu", b"\x00\x05" + TPDU) == "frame length 5 holds a TPDU but no message"


def test_tpdu_with_wrong_first_byte_is_refused_as_soon_as_it_arrives() -> None:
    decoder = FrameDecoder("len2-tpdu")
    assert decoder.feed(b"\x00\x09") == []
    with raises_exactly("TPDU starts with 0x70, expected 0x60"):
        decoder.feed(b"\x70")


def test_partial_frame_at_end_of_stream_is_an_error() -> None:
    decoder = FrameDecoder("len2")
    decoder.feed(b"\x00\x0a0800")
    with raises_exactly("stream ended inside a frame: 4 of 10 bytes received"):
        decoder.end_of_stream()


def test_partial_tpdu_frame_at_end_of_stream_counts_tpdu_bytes() -> None:
    decoder = FrameDecoder("len2-tpdu")
    decoder.feed(b"\x00\x09" + TPDU[:3])
    with raises_exactly("stream ended inside a frame: 3 of 9 bytes received"):
        decoder.end_of_stream()


@pytest.mark.parametrize(("framing", "partial"), [("len2", b"\x00"), ("len4", b"001")])
def test_partial_header_at_end_of_stream_is_an_error(framing: str, partial: bytes) -> None:
    decoder = FrameDecoder(framing)
    decoder.feed(partial)
    size = 2 if framing == "len2" else 4
    message = f"stream ended inside a {size}-byte length header ({len(partial)} bytes received)"
    with raises_exactly(message):
        decoder.end_of_stream()


def test_clean_end_of_stream_between_frames_is_fine() -> None:
    decoder = FrameDecoder("len4")
    assert decoder.feed(b"0002ab") == [Frame(b"ab")]
    decoder.end_of_stream()


def test_decoder_is_dead_after_an_error() -> None:
    decoder = FrameDecoder("len2")
    with raises_exactly("zero-length frame"):
        decoder.feed(b"\x00\x00")
    assert str(decoder.error) == "zero-length frame"
    assert decoder.buffered == 0
    dead = "decoder already failed: zero-length frame"
    with raises_exactly(dead):
        decoder.feed(b"\x00\x02ok")
    with raises_exactly(dead):
        decoder.feed(b"")
    with raises_exactly(dead):
        decoder.end_of_stream()


def test_decoder_is_dead_after_end_of_stream_error() -> None:
    decoder = FrameDecoder("len2")
    decoder.feed(b"\x00")
    with pytest.raises(FramingError):
        decoder.end_of_stream()
    with raises_starting("decoder already failed: stream ended inside"):
        decoder.feed(b"\x01x")


def test_good_frames_before_a_bad_header_are_returned_and_the_error_follows() -> None:
    decoder = FrameDecoder("len2")
    assert decoder.error is None
    assert decoder.feed(b"\x00\x02ok\x00\x02hi\x00\x00") == [Frame(b"ok"), Frame(b"hi")]
    assert str(decoder.error) == "zero-length frame"
    # The first call after the deferred error raises the error itself, then the decoder is dead.
    with raises_exactly("zero-length frame"):
        decoder.feed(b"")
    with raises_exactly("decoder already failed: zero-length frame"):
        decoder.feed(b"")


def test_deferred_error_is_raised_by_end_of_stream() -> None:
    decoder = FrameDecoder("len4")
    assert decoder.feed(b"0002okXXXX") == [Frame(b"ok")]
    with raises_exactly("len4 header b'XXXX' is not 4 ASCII digits"):
        decoder.end_of_stream()


# --- encoder errors -----------------------------------------------------------------------


@pytest.mark.parametrize("framing", FRAMINGS)
def test_encoder_refuses_empty_message(framing: str) -> None:
    tpdu = TPDU if framing == "len2-tpdu" else b""
    with raises_exactly("cannot frame an empty message"):
        FrameEncoder(framing).encode(b"", tpdu)


def test_encoder_requires_a_tpdu_for_tpdu_framing() -> None:
    with raises_exactly("TPDU must be 5 bytes, got 0: b''"):
        FrameEncoder("len2-tpdu").encode(b"0800")


def test_encoder_refuses_tpdu_of_wrong_size() -> None:
    tpdu = TPDU + b"\x00"
    with raises_exactly(f"TPDU must be 5 bytes, got 6: {tpdu!r}"):
        FrameEncoder("len2-tpdu").encode(b"0800", tpdu)


def test_encoder_refuses_tpdu_with_wrong_first_byte() -> None:
    with raises_exactly("TPDU starts with 0x61, expected 0x60"):
        FrameEncoder("len2-tpdu").encode(b"0800", b"\x61" + TPDU[1:])


@pytest.mark.parametrize("framing", ["len2", "len4"])
def test_encoder_refuses_tpdu_for_framing_without_one(framing: str) -> None:
    with raises_exactly(f"framing '{framing}' carries no TPDU, got {TPDU!r}"):
        FrameEncoder(framing).encode(b"0800", TPDU)


# --- TPDU replies -------------------------------------------------------------------------


def test_reply_tpdu_swaps_destination_and_source() -> None:
    assert reply_tpdu(b"\x60\x00\x01\x80\x02") == b"\x60\x80\x02\x00\x01"


@given(tpdus)
def test_reply_tpdu_twice_is_the_original(tpdu: bytes) -> None:
    assert reply_tpdu(reply_tpdu(tpdu)) == tpdu


def test_reply_tpdu_refuses_malformed_tpdu() -> None:
    with raises_exactly("TPDU starts with 0x00, expected 0x60"):
        reply_tpdu(b"\x00\x00\x01\x80\x02")
    with raises_starting("TPDU must be 5 bytes, got 4"):
        reply_tpdu(b"\x60\x00\x01\x80")


def test_reply_frame_round_trips_through_decoder_with_swapped_tpdu() -> None:
    request = FrameDecoder("len2-tpdu").feed(b"\x00\x09" + TPDU + b"0800")[0]
    reply = FrameEncoder("len2-tpdu").encode(b"0810", reply_tpdu(request.tpdu))
    assert FrameDecoder("len2-tpdu").feed(reply) == [Frame(b"0810", b"\x60\x80\x02\x00\x01")]


# --- sans-I/O -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module",
    ["acqhost.wire.framing", "acqhost.wire.tlv", "acqhost.wire.codec", "acqhost.wire.specs"],
)
def test_module_imports_no_io_library(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "io = {'anyio', 'trio', 'socket', 'asyncio', 'selectors'}\n"
        "print(sorted(io & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
