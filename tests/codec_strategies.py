"""Hypothesis strategies for the codec's differential tests against pyiso8583.

Three things are drawn: specs (pyiso8583's built-ins, ours, and random ones exercising every
option of the spec format), messages that are valid for a spec (so they must round-trip), and
damaged bytes.
"""

from __future__ import annotations

import copy
from typing import Any

import iso8583
import iso8583.specs
from hypothesis import assume
from hypothesis import strategies as st

from acqhost.wire import specs as acq_specs

TEXT_CODECS = ("ascii", "latin-1", "utf-8", "cp500")
LEN_CODECS = ("ascii", "cp500", "bcd", "b")

# What each text codec can carry, for drawing valid values.
_ALPHABETS = {
    "ascii": st.characters(min_codepoint=32, max_codepoint=126),
    "latin-1": st.characters(min_codepoint=32, max_codepoint=255),
    "utf-8": st.characters(blacklist_categories=("Cs",)),
    "cp500": st.characters(min_codepoint=32, max_codepoint=126),
}


def named_specs() -> dict[str, dict[str, Any]]:
    return {
        "default": copy.deepcopy(iso8583.specs.default),
        "default_ascii": copy.deepcopy(iso8583.specs.default_ascii),
        "acq87": acq_specs.load("acq87"),
        "cup-pos": acq_specs.load("cup-pos"),
    }


def with_tertiary(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec with fields 129..192 defined (pyiso8583 supports a tertiary bitmap)."""
    spec = copy.deepcopy(spec)
    for n in range(129, 193):
        spec[str(n)] = copy.deepcopy(spec[str(n - 64)])
    return spec


@st.composite
def field_specs(draw: st.DrawFn, key: str) -> dict[str, Any]:
    data_enc = draw(st.sampled_from(("b", *TEXT_CODECS)))
    len_type = draw(st.sampled_from((0, 0, 0, 1, 2, 3, 4)))
    nibbles = draw(st.booleans()) if data_enc == "b" or draw(st.integers(0, 9)) == 0 else False
    max_len = draw(st.integers(0, 24)) if len_type == 0 else draw(st.integers(0, 60))
    fs: dict[str, Any] = {
        "data_enc": data_enc,
        "len_enc": draw(st.sampled_from(LEN_CODECS)),
        "len_type": len_type,
        "max_len": max_len,
        "desc": f"field {key}",
    }
    if nibbles:
        fs["len_count"] = "nibbles"
    elif draw(st.booleans()):
        fs["len_count"] = "bytes"
    pad = draw(st.sampled_from(("", "left", "right", "both", "left-lower")))
    if pad in ("left", "both"):
        fs["left_pad"] = draw(st.sampled_from(("0", "F", "0x")))
    if pad in ("right", "both"):
        fs["right_pad"] = draw(st.sampled_from(("0", "F", "D")))
    if pad == "left-lower":
        fs["left_pad"] = "f"
    return fs


@st.composite
def random_specs(draw: st.DrawFn) -> dict[str, Any]:
    """A spec: a base layout with a dozen fields replaced by random ones, and random
    header, MTI and bitmap encodings."""
    base = draw(st.sampled_from(("default", "default_ascii", "cup-pos")))
    spec = named_specs()[base]
    if draw(st.booleans()):
        spec = with_tertiary(spec)
    numbers = draw(st.lists(st.integers(2, 128), min_size=1, max_size=12, unique=True))
    for n in numbers:
        spec[str(n)] = draw(field_specs(str(n)))
    spec["t"] = dict(spec["t"], data_enc=draw(st.sampled_from(("b", "ascii", "cp500"))))
    for key in ("p", "1"):
        spec[key] = dict(spec[key], data_enc=draw(st.sampled_from(("b", "ascii", "cp500"))))
    header = draw(st.sampled_from(("none", "keep", "random")))
    if header == "none":
        spec["h"] = dict(spec["h"], max_len=0)
    elif header == "random":
        spec["h"] = draw(field_specs("h"))
    return spec


def _fits_prefix(n: int, fs: dict[str, Any]) -> bool:
    lt = fs["len_type"]
    if lt == 0:
        return True
    if fs["len_enc"] == "b":
        return n < 256**lt
    if fs["len_enc"] == "bcd":
        return n < 100**lt
    return n < 10**lt


@st.composite
def field_values(draw: st.DrawFn, fs: dict[str, Any]) -> str | None:
    """A value that pyiso8583 encodes and decodes back unchanged, or None when the field
    cannot carry any (say an odd fixed nibble count without a pad)."""
    nibbles = fs.get("len_count", "bytes") == "nibbles"
    limit = fs["max_len"]
    if fs["data_enc"] == "b":
        pads = [p[:1] for p in (fs.get("left_pad", ""), fs.get("right_pad", "")) if p[:1]]
        usable_pad = pads and pads[0] in "0123456789ABCDEF"
        count = limit if fs["len_type"] == 0 else draw(st.integers(0, limit))
        if not _fits_prefix(count, fs):
            return None
        if nibbles and count % 2 == 1 and not usable_pad:
            return None
        digits = count if nibbles else count * 2
        # An odd count is padded with the left pad if any, else the right one, and decoding
        # strips exactly that one nibble again: any upper-case hex value round-trips.
        return draw(st.text(alphabet="0123456789ABCDEF", min_size=digits, max_size=digits))
    codec = fs["data_enc"]
    if nibbles:
        if fs["len_type"] == 0:
            if limit % 2:
                return None
            size = limit // 2
        else:
            size = draw(st.integers(0, limit // 2))
        if not _fits_prefix(size * 2, fs):
            return None
        return draw(st.text(alphabet="0123456789", min_size=size, max_size=size))
    size = limit if fs["len_type"] == 0 else draw(st.integers(0, limit))
    if not _fits_prefix(size, fs):
        return None
    if codec == "utf-8":
        # draw characters until the UTF-8 size is exactly right
        chars = draw(st.lists(_ALPHABETS[codec], max_size=size))
        text, used = "", 0
        for ch in chars:
            width = len(ch.encode("utf-8"))
            if used + width <= size:
                text, used = text + ch, used + width
        return text + "x" * (size - used)
    return draw(st.text(alphabet=_ALPHABETS[codec], min_size=size, max_size=size))


@st.composite
def messages(draw: st.DrawFn, spec: dict[str, Any], max_fields: int = 24) -> dict[str, str]:
    """A message valid for ``spec``: MTI, header when the spec has one, and some fields."""
    msg: dict[str, str] = {}
    if spec["h"]["max_len"] > 0:
        header = draw(field_values(spec["h"]))
        assume(header is not None)
        msg["h"] = header
    if spec["t"]["data_enc"] == "b":
        msg["t"] = draw(st.text(alphabet="0123456789", min_size=4, max_size=4))
    else:
        msg["t"] = draw(st.sampled_from(("0200", "0210", "0800", "0500", "0300", "1100")))
    numbers = [n for n in range(2, 193) if str(n) in spec and n != 65]
    chosen = draw(st.lists(st.sampled_from(numbers), max_size=max_fields, unique=True))
    for n in chosen:
        value = draw(field_values(spec[str(n)]))
        if value is not None:
            msg[str(n)] = value
    return msg


def reference_encode(msg: dict[str, Any], spec: dict[str, Any]) -> bytes | Exception:
    try:
        return bytes(iso8583.encode(copy.deepcopy(msg), spec)[0])
    except Exception as e:
        return e


def reference_decode(data: bytes, spec: dict[str, Any]) -> dict[str, str] | Exception:
    try:
        return iso8583.decode(data, spec)[0]
    except Exception as e:
        return e


@st.composite
def damaged(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` after a few random edits: flips, cuts, insertions, repeats."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(("flip", "set", "cut", "insert", "truncate", "repeat")))
        at = draw(st.integers(0, max(len(out) - 1, 0)))
        if kind == "flip" and out:
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and out:
            out[at] = draw(st.sampled_from((0x00, 0x20, 0x2B, 0x2D, 0x39, 0x41, 0x80, 0xFF)))
        elif kind == "cut" and out:
            del out[at : at + draw(st.integers(1, 4))]
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "truncate":
            del out[at:]
        elif kind == "repeat" and out:
            out[at:at] = out[at : at + draw(st.integers(1, 8))]
    return bytes(out)
