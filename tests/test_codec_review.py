"""Regression tests from a review of the compiled codec against pyiso8583.

Each test is one input where acqhost and pyiso8583 disagree (or where the codec breaks its own
contract), each fixed since.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any

import iso8583
import iso8583.specs
import pytest

from acqhost.wire.codec import CodecError, compile_spec

DEFAULT = copy.deepcopy(iso8583.specs.default)
BM_2 = bytes.fromhex("4000000000000000")


def test_spec_key_that_is_a_non_decimal_digit_is_ignored() -> None:
    """ "²".isdigit() is True but int("²") raises: _codec.py line 96 crashes compile_spec."""
    spec = copy.deepcopy(DEFAULT)
    spec["²"] = copy.deepcopy(spec["2"])
    data = b"0200" + BM_2 + b"03123"
    codec = compile_spec(spec)  # ValueError: invalid literal for int() with base 10: '²'
    assert codec.decode(data) == iso8583.decode(data, spec)[0]


def test_non_str_spec_key_is_not_field_2() -> None:
    """pyiso8583 looks fields up as spec["2"]; an int key 2 is not that field, so it raises
    (KeyError) and the codec must reject too. The codec str()s every spec key (line 76)."""
    spec: dict[Any, Any] = copy.deepcopy(DEFAULT)
    spec[2] = spec.pop("2")
    with pytest.raises(KeyError):
        iso8583.decode(b"0200" + BM_2 + b"03123", spec)
    with pytest.raises(KeyError):
        iso8583.encode({"t": "0200", "2": "123"}, spec)
    codec = compile_spec(spec)
    with pytest.raises(CodecError):
        codec.decode(b"0200" + BM_2 + b"03123")
    with pytest.raises(CodecError):
        codec.encode({"t": "0200", "2": "123"})


def test_non_str_spec_key_does_not_replace_the_str_one() -> None:
    """With both "2" and 2 in the spec, pyiso8583 uses spec["2"]; the codec's
    {str(k): ...} keeps whichever comes last."""
    spec: dict[Any, Any] = copy.deepcopy(DEFAULT)
    spec[2] = {"data_enc": "ascii", "len_enc": "ascii", "len_type": 0, "max_len": 3}
    msg = {"t": "0200", "2": "123"}
    expected = bytes(iso8583.encode(copy.deepcopy(msg), spec)[0])
    assert expected == b"0200" + BM_2 + b"03123"
    codec = compile_spec(spec)
    assert codec.encode(msg) == expected
    assert codec.decode(expected) == iso8583.decode(expected, spec)[0]


class _Encodes(str):
    """A str subclass with its own encode(), which pyiso8583 calls for text fields."""

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b"0000"


def test_fast_path_encodes_str_subclass_through_its_encode() -> None:
    """The specialised encoder joins adjacent ASCII fields as text and encodes the join once
    (_special.py build_encoder, lines 364-378), so a value's own encode() is never called.
    pyiso8583 calls field_data.encode() and refuses the 4-byte result for fixed field 3."""
    spec = copy.deepcopy(DEFAULT)
    msg = {"t": "0200", "3": "000000", "4": "000000012345"}
    codec = compile_spec(spec, specialize_after=1)
    codec.encode(msg)
    codec.encode(msg)  # layout specialised and in use
    odd = {"t": "0200", "3": _Encodes("000000"), "4": "000000012345"}
    with pytest.raises(iso8583.EncodeError) as ref:
        iso8583.encode(copy.deepcopy(odd), spec)
    assert str(ref.value) == "Field data is 4 bytes, expecting 6: field 3"
    with pytest.raises(CodecError) as got:
        codec.encode(odd)
    assert str(got.value) == str(ref.value)


def test_encode_does_not_add_keys_to_a_defaultdict() -> None:
    """ "02" selects field 2, and reading doc["2"] (_codec.py line 375) inserts "2" into a
    defaultdict: encode must leave its input unchanged."""
    spec = copy.deepcopy(DEFAULT)
    msg: defaultdict[str, str] = defaultdict(str, {"t": "0200", "02": "x"})
    expected = bytes(iso8583.encode(copy.deepcopy(msg), spec)[0])
    codec = compile_spec(spec)
    assert codec.encode(msg) == expected
    assert dict(msg) == {"t": "0200", "02": "x"}
