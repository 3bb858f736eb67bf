"""The compiled codec agrees with pyiso8583: same bytes, same dicts, same rejections.

Each property runs twice over: on a fresh codec (the exact path) and on a codec that has
already specialised the message's layout (the fast path, falling back on anything odd).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import iso8583
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from acqhost.wire.codec import Codec, CodecError, compile_spec
from tests.codec_strategies import (
    damaged,
    messages,
    named_specs,
    random_specs,
    reference_decode,
    reference_encode,
    with_tertiary,
)

NAMED = named_specs()
NAMED["default+tertiary"] = with_tertiary(NAMED["default"])
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_same_decode(codec: Codec, data: bytes, spec: dict[str, Any]) -> None:
    expected = reference_decode(data, spec)
    if isinstance(expected, Exception):
        with pytest.raises(CodecError) as info:
            codec.decode(data)
        if isinstance(expected, iso8583.DecodeError):
            assert str(info.value) == str(expected)
            assert info.value.field == expected.field
            assert info.value.offset == expected.pos
    else:
        assert codec.decode(data) == expected
        assert list(codec.decode(data)) == list(expected)  # same key order too


def assert_same_encode(codec: Codec, msg: dict[str, Any], spec: dict[str, Any]) -> None:
    expected = reference_encode(msg, spec)
    before = copy.deepcopy(msg)
    if isinstance(expected, Exception):
        with pytest.raises(CodecError) as info:
            codec.encode(msg)
        if isinstance(expected, iso8583.EncodeError):
            assert str(info.value) == str(expected)
            assert info.value.field == expected.field
    else:
        assert codec.encode(msg) == expected
    assert msg == before, "encode must not change its input"


def warmed(spec: dict[str, Any], msg: dict[str, str]) -> Codec:
    """A codec that has specialised this message's layout in both directions."""
    codec = compile_spec(spec, specialize_after=1)
    with contextlib.suppress(CodecError):
        codec.decode(codec.encode(msg))
    return codec


spec_names = st.sampled_from(sorted(NAMED))


@SETTINGS
@given(data=st.data(), name=spec_names, warm=st.booleans())
def test_valid_messages_encode_byte_identically_and_round_trip(
    data: st.DataObject, name: str, warm: bool
) -> None:
    spec = NAMED[name]
    msg = data.draw(messages(spec))
    codec = warmed(spec, msg) if warm else compile_spec(spec)
    expected = reference_encode(msg, spec)
    assert not isinstance(expected, Exception), expected
    encoded = codec.encode(msg)
    assert encoded == expected
    decoded = codec.decode(encoded)
    assert decoded == iso8583.decode(encoded, spec)[0]
    assert {k: v for k, v in decoded.items() if k not in ("p", "1")} == msg


@SETTINGS
@given(data=st.data(), warm=st.booleans())
def test_random_specs_agree_with_pyiso8583(data: st.DataObject, warm: bool) -> None:
    spec = data.draw(random_specs())
    msg = data.draw(messages(spec))
    codec = warmed(spec, msg) if warm else compile_spec(spec)
    assert_same_encode(codec, msg, spec)
    encoded = reference_encode(msg, spec)
    if isinstance(encoded, bytes):
        assert_same_decode(codec, encoded, spec)
        # messages drawn valid round-trip exactly
        assert {k: v for k, v in codec.decode(encoded).items() if k not in ("p", "1")} == msg


@SETTINGS
@given(data=st.data(), name=spec_names)
def test_damaged_messages_both_reject_or_both_agree(data: st.DataObject, name: str) -> None:
    spec = NAMED[name]
    msg = data.draw(messages(spec))
    codec = warmed(spec, msg)
    encoded = reference_encode(msg, spec)
    assert isinstance(encoded, bytes)
    for _ in range(5):
        assert_same_decode(codec, data.draw(damaged(encoded)), spec)


@SETTINGS
@given(data=st.data())
def test_damaged_messages_under_random_specs(data: st.DataObject) -> None:
    spec = data.draw(random_specs())
    msg = data.draw(messages(spec))
    codec = warmed(spec, msg)
    encoded = reference_encode(msg, spec)
    if isinstance(encoded, bytes):
        for _ in range(5):
            assert_same_decode(codec, data.draw(damaged(encoded)), spec)


@SETTINGS
@given(name=spec_names, raw=st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_codec_error_and_agree(name: str, raw: bytes) -> None:
    spec = NAMED[name]
    assert_same_decode(compile_spec(spec), raw, spec)


@SETTINGS
@given(data=st.data(), name=spec_names)
def test_edited_field_values_agree_on_encode(data: st.DataObject, name: str) -> None:
    """Values that break the spec (too long, wrong alphabet, odd hex, odd keys) are refused
    exactly as pyiso8583 refuses them, on the fast path as on the exact one."""
    spec = NAMED[name]
    msg = data.draw(messages(spec))
    codec = warmed(spec, msg)
    keys = sorted(msg)
    edited = dict(msg)
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(keys))
        fs = spec.get(key, spec["t"])
        size = fs["max_len"] * (2 if fs["data_enc"] == "b" else 1)
        edited[key] = data.draw(
            st.one_of(
                # one past the limit, and the limit, in the field's own alphabet
                st.sampled_from(("1" * (size + 1), "1" * (size + 2), "1" * size, "1" * (size - 1))),
                st.text(max_size=25),
                st.text(alphabet="0123456789ABCDEFabcdefG ", max_size=25),
                st.sampled_from(("", "0", "12345", "é", "张三", "\x00", "1" * 1000)),
            )
        )
    if data.draw(st.booleans()):
        extra = data.draw(
            st.sampled_from(("p", "1", "65", "0", "193", "01", "h", "x", "²", "128", "129"))
        )
        edited[extra] = data.draw(st.sampled_from(("", "00", "ABCD", "0000000000000000")))
    assert_same_encode(codec, edited, spec)
