"""The compiled codec on chosen inputs: exact error texts, the fast path, and its contract."""

from __future__ import annotations

import copy
import pickle
import tracemalloc
from typing import Any

import iso8583
import iso8583.specs
import pytest

from acqhost.wire import specs
from acqhost.wire.codec import CodecError, compile_spec
from tests.codec_strategies import with_tertiary

DEFAULT = copy.deepcopy(iso8583.specs.default)
DEFAULT_ASCII = copy.deepcopy(iso8583.specs.default_ascii)
TERTIARY = with_tertiary(DEFAULT)
BM_2 = bytes.fromhex("4000000000000000")

SALE = {
    "t": "0200",
    "2": "6222021234567890123",
    "3": "000000",
    "4": "000000012345",
    "7": "1122101530",
    "11": "004711",
    "12": "101530",
    "13": "1122",
    "14": "2812",
    "22": "051",
    "25": "00",
    "32": "48021000",
    "41": "TERM0001",
    "42": "MERCHANT0000001",
    "48": "NM006张三TS0011",
    "49": "156",
    "64": "5A1F0C33D2E4B6A8",
}

DECODE_ERRORS = [
    (DEFAULT, b"02", "Field data is 2 bytes, expecting 4: field t pos 0"),
    (DEFAULT, b"0200\x00\x00", "Field data is 2 bytes, expecting 8: field p pos 4"),
    (DEFAULT, b"0200" + BM_2 + b"1", "Field length is 1 bytes wide, expecting 2: field 2 pos 12"),
    (
        DEFAULT,
        b"0200" + BM_2 + b"1x",
        "Failed to decode field length, non-numeric data: field 2 pos 12",
    ),
    (
        DEFAULT,
        b"0200" + BM_2 + b"20" + b"1" * 20,
        "Field data is 20 bytes, larger than maximum 19: field 2 pos 12",
    ),
    (DEFAULT, b"0200" + BM_2 + b"05111", "Field data is 3 bytes, expecting 5: field 2 pos 14"),
    (DEFAULT, b"0200" + BM_2 + b"031\xff1", "Failed to decode field, invalid data: field 2 pos 14"),
    (DEFAULT, b"0200" + BM_2 + b"03111X", "Extra data after last field: field 2 pos 17"),
    (
        DEFAULT,
        b"0200" + BM_2 + b"\xb203111",
        "Failed to decode field length, invalid data: field 2 pos 12",
    ),
    (
        DEFAULT,
        b"0200\x80" + bytes(7) + b"\x80",
        "Field data is 1 bytes, expecting 8: field 1 pos 12",
    ),
    (
        DEFAULT,
        b"0200\x80" + bytes(7) + b"\x80" + bytes(7) + bytes(3),
        "Field data is 11 bytes, expecting 16: field 1 pos 20",
    ),
    (
        DEFAULT_ASCII,
        b"0200400000000000000G03123",
        "Failed to decode field, non-hex data: field p pos 4",
    ),
    (DEFAULT, b"0200" + bytes(8) + b"x", "Extra data after last field: field p pos 12"),
]

ENCODE_ERRORS: list[tuple[dict[str, Any], dict[Any, Any], str]] = [
    (DEFAULT, {"2": "1"}, "Field data is required: field t"),
    (DEFAULT, {"t": "020"}, "Field data is 3 bytes, expecting 4: field t"),
    (
        DEFAULT,
        {"t": "0200", "193": "1"},
        "Dictionary contains fields outside of 1-192 range [193]: field p",
    ),
    (DEFAULT, {"t": "0200", 1: "1"}, "Dictionary contains invalid fields [1]: field p"),
    (DEFAULT, {"t": "0200", "3": "12345"}, "Field data is 5 bytes, expecting 6: field 3"),
    (
        DEFAULT,
        {"t": "0200", "2": "1" * 20},
        "Field data is 20 bytes, larger than maximum 19: field 2",
    ),
    (
        DEFAULT,
        {"t": "0200", "64": "1" * 15},
        "Failed to encode field, odd-length hex data: field 64",
    ),
    (DEFAULT, {"t": "0200", "64": "G" * 16}, "Failed to encode field, non-hex data: field 64"),
    (DEFAULT, {"t": "0200", "2": "é"}, "Failed to encode field, invalid data: field 2"),
    (DEFAULT, {"t": "0200", "2": 12}, "Failed to encode field, invalid data: field 2"),
]


@pytest.mark.parametrize(("spec", "data", "message"), DECODE_ERRORS)
@pytest.mark.parametrize("warm", [False, True])
def test_decode_errors_carry_pyiso8583s_message_field_and_offset(
    spec: dict[str, Any], data: bytes, message: str, warm: bool
) -> None:
    codec = compile_spec(spec, specialize_after=1)
    if warm:  # layouts with field 2 alone are specialised, as most cases here use
        codec.decode(codec.encode({"t": "0200", "2": "123"}))
    with pytest.raises(iso8583.DecodeError) as ref:
        iso8583.decode(data, spec)
    with pytest.raises(CodecError) as ours:
        codec.decode(data)
    assert str(ours.value) == message == str(ref.value)
    assert (ours.value.field, ours.value.offset) == (ref.value.field, ref.value.pos)
    assert isinstance(ours.value, ValueError)


@pytest.mark.parametrize(("spec", "fields", "message"), ENCODE_ERRORS)
def test_encode_errors_carry_pyiso8583s_message_and_field(
    spec: dict[str, Any], fields: dict[Any, Any], message: str
) -> None:
    codec = compile_spec(spec)
    with pytest.raises(iso8583.EncodeError) as ref:
        iso8583.encode(copy.deepcopy(fields), spec)
    with pytest.raises(CodecError) as ours:
        codec.encode(fields)
    assert str(ours.value) == message == str(ref.value)
    assert ours.value.field == ref.value.field


def test_nibble_field_without_matching_pad_is_refused_like_pyiso8583() -> None:
    spec = specs.load("cup-pos")
    codec = compile_spec(spec)
    msg = codec.decode(codec.encode({"h": "603100311108", "t": "0800", "22": "051"}))
    assert msg["22"] == "051"
    # field 22 is n3 right-padded with "0": a last nibble other than the pad is refused
    data = codec.encode({"h": "603100311108", "t": "0800", "22": "051"})
    broken = data[:-1] + bytes([data[-1] | 0x0F])
    with pytest.raises(CodecError) as ours:
        codec.decode(broken)
    assert str(ours.value) == "Field data is 4 nibbles, expecting 3: field 22 pos 16"
    with pytest.raises(iso8583.DecodeError) as ref:
        iso8583.decode(broken, spec)
    assert str(ref.value) == str(ours.value)


def test_encode_ignores_bitmap_keys_and_recomputes_them_without_touching_input() -> None:
    fields = {"t": "0200", "65": "x", "1": "y", "p": "z", "66": "1"}
    before = dict(fields)
    codec = compile_spec(DEFAULT, specialize_after=1)
    for _ in range(3):
        assert codec.encode(fields) == bytes(iso8583.encode(dict(fields), DEFAULT)[0])
    assert fields == before


def test_bitmap_keys_given_by_the_caller_are_ignored_as_pyiso8583_pops_them() -> None:
    codec = compile_spec(DEFAULT, specialize_after=1)
    plain = {"t": "0200", "2": "1234"}
    for extra in ({"65": "ABCD"}, {"1": "0" * 16}, {"p": "FFFF"}, {"65": "", "1": ""}):
        for _ in range(2):
            assert codec.encode(dict(plain, **extra)) == codec.encode(plain)


def test_non_canonical_numeric_keys_behave_as_in_pyiso8583() -> None:
    codec = compile_spec(DEFAULT, specialize_after=1)
    odd = {"t": "0200", "01": "x", "2": "1"}  # "01" counts as field 1: an empty secondary bitmap
    for _ in range(3):
        assert codec.encode(odd) == bytes(iso8583.encode(dict(odd), DEFAULT)[0])
    with pytest.raises(ValueError):  # pyiso8583 lets int("²") escape
        iso8583.encode({"t": "0200", "²": "x"}, DEFAULT)
    with pytest.raises(CodecError):
        codec.encode({"t": "0200", "²": "x"})


def test_tertiary_bitmap_fields_round_trip() -> None:
    codec = compile_spec(TERTIARY, specialize_after=1)
    msg = {"t": "0100", "2": "4111111111111111", "70": "301", "150": "1" * 16, "192": "00" * 8}
    for _ in range(3):
        data = codec.encode(msg)
        assert data == bytes(iso8583.encode(dict(msg), TERTIARY)[0])
        decoded = codec.decode(data)
        assert decoded == iso8583.decode(data, TERTIARY)[0]
        assert len(decoded["1"]) == 32


def test_tertiary_bitmap_cut_short_names_both_parts_in_its_size() -> None:
    codec = compile_spec(TERTIARY)
    data = codec.encode({"t": "0100", "150": "1" * 16})
    cut = data[: 4 + 8 + 8 + 5]
    with pytest.raises(CodecError) as ours:
        codec.decode(cut)
    assert str(ours.value) == "Field data is 13 bytes, expecting 16: field 1 pos 20"


def test_fields_missing_from_the_spec_raise_codec_error() -> None:
    # pyiso8583's default spec has no 129..192: it raises KeyError; we raise CodecError
    data = compile_spec(TERTIARY).encode({"t": "0100", "150": "1" * 16})
    with pytest.raises(KeyError):
        iso8583.decode(data, DEFAULT)
    with pytest.raises(CodecError, match="field 150"):
        compile_spec(DEFAULT).decode(data)


def test_a_layout_seen_twice_gets_a_specialised_function_that_gives_the_same_answers() -> None:
    spec = specs.load("acq87")
    codec = compile_spec(spec)
    data = codec.encode(SALE)
    assert codec._enc_cache == {}
    assert codec.encode(SALE) == data
    assert len(codec._enc_cache) == 1
    first = codec.decode(data)
    assert codec._dec_cache == {}
    second = codec.decode(data)
    assert len(codec._dec_cache) == 1
    third = codec.decode(data)
    assert first == second == third == iso8583.decode(data, spec)[0]
    assert list(third) == list(iso8583.decode(data, spec)[0])
    assert codec.encode(SALE) == bytes(iso8583.encode(dict(SALE), spec)[0])


def test_specialised_functions_fall_back_to_the_exact_error() -> None:
    spec = specs.load("acq87")
    codec = compile_spec(spec, specialize_after=1)
    data = codec.encode(SALE)
    codec.decode(data)
    assert len(codec._dec_cache) == 1
    non_ascii = data.replace(b"TERM0001", b"TERM\xff001")
    with pytest.raises(CodecError) as info:
        codec.decode(non_ascii)
    assert str(info.value) == str(_ref_error(non_ascii, spec))
    signed_length = data.replace(b"0848021000", b"+848021000")  # int() takes "+8" as 8
    assert codec.decode(signed_length) == iso8583.decode(signed_length, spec)[0]
    too_long = dict(SALE, **{"32": "1" * 12})
    with pytest.raises(CodecError, match="larger than maximum 11: field 32"):
        codec.encode(too_long)


def _ref_error(data: bytes, spec: dict[str, Any]) -> Exception:
    try:
        iso8583.decode(data, spec)
    except Exception as e:
        return e
    raise AssertionError("pyiso8583 accepted it")


def test_unusual_length_text_is_read_as_pyiso8583_reads_it() -> None:
    """pyiso8583 reads lengths with int(): " 3" and "+3" are 3. The fast path's digit
    tables miss them and the exact path answers the same."""
    codec = compile_spec(DEFAULT, specialize_after=1)
    codec.decode(b"0200" + BM_2 + b"03123")
    for prefix in (b" 3", b"+3", b"3 "):
        data = b"0200" + BM_2 + prefix + b"123"
        assert codec.decode(data) == iso8583.decode(data, DEFAULT)[0]


def test_codec_never_reads_the_spec_after_compiling() -> None:
    spec = specs.load("acq87")
    codec = compile_spec(spec)
    spec.clear()
    for _ in range(3):
        assert codec.decode(codec.encode(SALE))["48"] == SALE["48"]


def _one_field_messages(count: int) -> list[dict[str, str]]:
    out = []
    for n in range(2, 2 + count):
        fs = DEFAULT[str(n)]
        out.append({"t": "0200", str(n): ("00" if fs["data_enc"] == "b" else "1") * fs["max_len"]})
    return out


def test_layout_cache_is_bounded() -> None:
    codec = compile_spec(DEFAULT, max_layouts=4)
    for msg in _one_field_messages(30):
        for _ in range(2):
            data = codec.encode(msg)
            assert codec.decode(data) == iso8583.decode(data, DEFAULT)[0]
    assert len(codec._dec_cache) == 4
    assert len(codec._enc_cache) == 4


def test_layouts_seen_once_are_never_compiled() -> None:
    """A peer sending ever new bitmaps costs the exact path, never a compilation each."""
    codec = compile_spec(DEFAULT)
    for msg in _one_field_messages(30):
        codec.decode(codec.encode(msg))
    assert codec._dec_cache == {}
    assert codec._enc_cache == {}


def test_input_types() -> None:
    codec = compile_spec(DEFAULT)
    data = codec.encode({"t": "0800", "70": "301"})
    assert codec.decode(bytearray(data)) == codec.decode(data)
    with pytest.raises(TypeError):
        codec.decode("0800")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        codec.encode([("t", "0800")])  # type: ignore[arg-type]


def test_codec_error_pickles_with_its_context() -> None:
    codec = compile_spec(DEFAULT)
    with pytest.raises(CodecError) as info:
        codec.decode(b"02")
    again = pickle.loads(pickle.dumps(info.value))
    assert (str(again), again.field, again.offset) == (str(info.value), "t", 0)


def test_spec_entries_are_checked_when_used_as_pyiso8583_uses_them() -> None:
    """A broken data-field entry fails only the messages that carry that field; keys that are
    not fields (metadata) are ignored; header, MTI and bitmaps must be usable at once."""
    broken = copy.deepcopy(DEFAULT)
    del broken["2"]["len_type"]
    broken["note"] = "a spec with a remark"  # type: ignore[assignment]
    codec = compile_spec(broken)
    plain = {"t": "0800", "70": "301"}
    assert codec.encode(plain) == bytes(iso8583.encode(dict(plain), broken)[0])
    with pytest.raises(KeyError):  # pyiso8583 fails on the missing len_type
        iso8583.encode({"t": "0200", "2": "123"}, broken)
    with pytest.raises(CodecError, match=r"Field spec is unusable .*len_type.*: field 2"):
        codec.encode({"t": "0200", "2": "123"})
    with pytest.raises(CodecError, match="field 2 pos 12"):
        codec.decode(b"0200" + BM_2 + b"03123")
    with pytest.raises(ValueError, match="lacks field 't'"):
        compile_spec({k: v for k, v in DEFAULT.items() if k != "t"})
    lean = dict(DEFAULT, p={"data_enc": "b"}, t={"data_enc": "ascii"})  # all pyiso8583 reads
    assert compile_spec(lean).encode(plain) == bytes(iso8583.encode(dict(plain), lean)[0])
    with pytest.raises(ValueError, match="spec field 'p' lacks 'data_enc'"):
        compile_spec(dict(DEFAULT, p={}))


@pytest.mark.parametrize("len_enc", ["ascii", "bcd", "b", "cp500"])
@pytest.mark.parametrize("nibbles", [False, True])
def test_length_one_past_the_maximum_is_refused_on_the_fast_path(
    len_enc: str, nibbles: bool
) -> None:
    spec = copy.deepcopy(DEFAULT)
    spec["2"] = {"data_enc": "b", "len_enc": len_enc, "len_type": 2, "max_len": 19,
                 "left_pad": "0", "desc": "PAN"}  # fmt: skip
    if nibbles:
        spec["2"]["len_count"] = "nibbles"
    codec = compile_spec(spec, specialize_after=1)
    good = codec.encode({"t": "0200", "2": "1" * (19 if nibbles else 38)})
    codec.decode(good)
    assert len(codec._dec_cache) == 1
    prefix = {"ascii": b"20", "bcd": b"\x00\x20", "b": b"\x00\x14", "cp500": "20".encode("cp500")}
    data = good[:12] + prefix[len_enc] + good[14:] + b"\x11"
    unit = "nibbles" if nibbles else "bytes"
    with pytest.raises(CodecError) as ours:
        codec.decode(data)
    assert str(ours.value) == f"Field data is 20 {unit}, larger than maximum 19: field 2 pos 12"
    assert str(ours.value) == str(_ref_error(data, spec))
    with pytest.raises(CodecError, match=r"larger than maximum 19: field 2$"):
        codec.encode({"t": "0200", "2": "1" * (20 if nibbles else 40)})


def test_alternating_layouts_and_key_orders_encode_exactly() -> None:
    """The last specialised encoder is tried on every dict first: it must refuse dicts of
    other layouts, also ones of the same size."""
    spec = specs.load("acq87")
    codec = compile_spec(spec, specialize_after=1)
    response = {"t": "0210", "3": "000000", "11": "000001", "39": "00", "64": "00" * 8}
    same_size = {"t": "0210", "3": "000000", "11": "000001", "38": "123456", "64": "00" * 8}
    reordered = dict(reversed(list(response.items())))
    with_p = dict(response, p="ignored")
    without_t = {k: v for k, v in with_p.items() if k != "t"}
    for _ in range(3):
        for msg in (SALE, response, same_size, reordered, with_p, SALE, same_size):
            assert codec.encode(msg) == bytes(iso8583.encode(dict(msg), spec)[0])
        with pytest.raises(CodecError, match="Field data is required: field t"):
            codec.encode(without_t)
    assert codec.encode(reordered) == codec.encode(response)


def test_text_bitmaps_with_spaces_decode_as_pyiso8583_and_are_never_specialised() -> None:
    """bytes.fromhex skips spaces, so pyiso8583 reads "40 00 0000000000" as a 7-byte
    bitmap. Such bitmaps are not keys a specialised decoder could trust."""
    codec = compile_spec(DEFAULT_ASCII, specialize_after=1)
    clean = b"0200" + b"4000000000000000" + b"03123"
    spaced = b"0200" + b"40 00 0000000000" + b"03123"
    for data in (clean, spaced, spaced, clean):
        assert codec.decode(data) == iso8583.decode(data, DEFAULT_ASCII)[0]
    assert list(codec._dec_cache) == [b"4000000000000000"]


def test_a_spec_without_a_secondary_bitmap_still_gets_fast_decoders() -> None:
    spec = {k: v for k, v in DEFAULT.items() if k != "1"}
    codec = compile_spec(spec, specialize_after=1)
    data = codec.encode({"t": "0200", "2": "123"})
    for _ in range(2):
        assert codec.decode(data) == iso8583.decode(data, spec)[0]
    assert len(codec._dec_cache) == 1
    with_secondary = b"0200\x80" + bytes(7) + bytes(8)
    with pytest.raises(CodecError, match="field 1"):  # pyiso8583: KeyError('1')
        codec.decode(with_secondary)


def test_a_peer_that_fills_the_layout_cache_costs_little_memory() -> None:
    """Any peer can make the codec specialise max_layouts layouts (each message twice, each
    with other fields). Each layout's function used to build its own length-prefix tables,
    about 110 KB a layout (56 MB for 512 in the acq87 spec); the tables are shared now."""
    codec = compile_spec(specs.load("acq87"))
    values = {**SALE, "37": "000000000001", "38": "123456", "39": "00", "44": "x"}
    optional = ("3", "4", "7", "11", "12", "13", "14", "22", "25", "37", "38", "39", "41", "42",
                "49")  # fmt: skip
    frames = []
    for n in range(codec.max_layouts):  # each n a different subset of the optional fields
        present = [name for bit, name in enumerate(optional) if (n + 7) >> bit & 1]
        fields = {name: values[name] for name in ("t", "2", "32", "44", "48", *present)}
        frames.append(codec.encode(fields))
    tracemalloc.start()
    try:
        for frame in frames:
            codec.decode(frame)
            codec.decode(frame)
        used, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(codec._dec_cache) == codec.max_layouts
    assert used < 8_000_000, f"{used / 1e6:.1f} MB for {codec.max_layouts} layouts"
