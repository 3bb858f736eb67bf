"""Wrong requests for the fuzzers (tests/fuzzkit.py has the host and the oracle): the valid
requests of every route with fields dropped, added or changed, field 48 elements changed or
replaced, another terminal, MTI or routing code, a valid, wrong, missing or foreign MAC, or
their MAC'd bytes mutated. Everything is drawn from a ``random.Random`` (hypothesis's
``st.randoms()``, or a seeded one for a bounded run on a real server)."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from acqhost.errors import CodecError, TLVError
from acqhost.wire.tlv import decode_tlv, encode_tlv
from tests.fuzzkit import Requests

# Field 48 elements worth drawing: every tag PROTOCOL.md names and one it does not.
TAGS = ("KX", "SG", "TS", "SA", "SV", "BK", "BR", "AC", "NM", "OP", "PW", "RF", "ST", "EF", "RS",
        "BN", "CT", "AM", "ZZ")  # fmt: skip
_ODD_TEXT = ("", " ", "0", "1", "-1", "00000A", "9" * 19, "张三", "\x00", "ABCDEFGHIJKLMNOP",
             "6222020200112233446", "102100099996", "0000")  # fmt: skip


def random_text(rnd: random.Random, size: int, *, ascii_only: bool = True) -> str:
    """``size`` characters: digits mostly, then letters, spaces and (UTF-8 fields) others."""
    pools = "0123456789" * 4 + "ABCDEFXYZ az-+=" + ("" if ascii_only else "张é\u0660")
    return "".join(rnd.choice(pools) for _ in range(size))


def random_tlv(rnd: random.Random) -> str:
    """A field 48 of random elements, sometimes broken (bad length, bad tag, cut short)."""
    elements = {
        rnd.choice(TAGS): rnd.choice(_ODD_TEXT)
        if rnd.random() < 0.5
        else random_text(rnd, rnd.randrange(0, 140), ascii_only=False)
        for _ in range(rnd.randrange(0, 6))
    }
    text = encode_tlv(elements)
    kind = rnd.randrange(6)
    if kind == 0 and text:
        cut = rnd.randrange(len(text))
        return text[:cut]
    if kind == 1:
        return text + rnd.choice(("Z", "AB", "ab001x", "AB01", "AB999x", "KX-01x"))
    return text


def field_value(rnd: random.Random, spec: dict[str, Any], name: str) -> str:
    """A value the codec can carry in field ``name``: right length, content anything."""
    fs = spec[name]
    if name == "48":
        return random_tlv(rnd)
    size = fs["max_len"] if fs["len_type"] == 0 else rnd.randrange(0, fs["max_len"] + 1)
    if fs["data_enc"] == "b":
        return "".join(rnd.choice("0123456789ABCDEF") for _ in range(size * 2))
    return random_text(rnd, size, ascii_only=fs["data_enc"] != "utf-8")


def mutate_fields(
    rnd: random.Random, fields: dict[str, str], spec: dict[str, Any], tids: tuple[str, ...]
) -> dict[str, str]:
    """``fields`` with one to four changes: a field dropped, added or given another value
    (its length and content random), field 48 replaced by random elements, another terminal
    or merchant, another MTI, processing code or network code."""
    out = dict(fields)
    numbers = [k for k in spec if k.isdigit() and k not in ("1", "64", "65", "128")]
    for _ in range(rnd.randrange(1, 5)):
        kind = rnd.randrange(10)
        if kind == 0 and len(out) > 1:
            out.pop(rnd.choice([k for k in out if k != "t"]), None)
        elif kind in (1, 2):
            name = rnd.choice(numbers)
            out[name] = field_value(rnd, spec, name)
        elif kind == 3:
            out["48"] = random_tlv(rnd)
        elif kind == 4:
            out["41"] = rnd.choice((*tids, "NOBODY01", "TERM000", "        "))
            if rnd.random() < 0.3:
                out["42"] = rnd.choice(("MERCHANT0000001", "MERCHANT0000002", "X" * 15))
        elif kind == 5:
            out["t"] = rnd.choice(("0200", "0210", "0300", "0400", "0420", "0500", "0800",
                                   "0820", "0100", "9999", "02A0", "0 00"))  # fmt: skip
        elif kind == 6:
            name = rnd.choice(("3", "70", "91", "101", "90"))
            out[name] = field_value(rnd, spec, name)
        elif kind in (8, 9):  # one element of field 48 changed, the others (a sealed PW) kept
            try:
                elements = decode_tlv(out.get("48", ""))
            except TLVError:
                elements = {}
            tag = rnd.choice(TAGS)
            if rnd.random() < 0.2:
                elements.pop(tag, None)
            elif rnd.random() < 0.6:
                elements[tag] = rnd.choice(_ODD_TEXT)
            else:
                elements[tag] = random_text(rnd, rnd.randrange(0, 40), ascii_only=False)
            out["48"] = encode_tlv(elements)
        else:
            name = rnd.choice([k for k in out if k != "t"] or ["3"])
            out[name] = rnd.choice(_ODD_TEXT)
    return out


def mutate_bytes(rnd: random.Random, data: bytes) -> bytes:
    """``data`` after a few edits: flips, set bytes, cuts, insertions, repeats."""
    out = bytearray(data)
    for _ in range(rnd.randrange(1, 4)):
        kind = rnd.randrange(6)
        at = rnd.randrange(max(len(out), 1))
        if kind == 0 and out:
            out[at] ^= 1 << rnd.randrange(8)
        elif kind == 1 and out:
            out[at] = rnd.choice((0x00, 0x20, 0x2B, 0x2D, 0x30, 0x39, 0x41, 0x80, 0xFF))
        elif kind == 2 and out:
            del out[at : at + rnd.randrange(1, 5)]
        elif kind == 3:
            out[at:at] = rnd.randbytes(rnd.randrange(1, 5))
        elif kind == 4:
            del out[at:]
        elif out:
            out[at:at] = out[at : at + rnd.randrange(1, 9)]
    return bytes(out)


MAC_MODES = ("valid", "valid", "valid", "none", "wrong", "other terminal", "remac after damage")


def fuzzed_request(host: Requests, rnd: random.Random, route: str) -> bytes:
    """A request of ``route`` made wrong: its fields mutated (encoded with a valid, wrong,
    missing or foreign MAC), or its MAC'd bytes mutated (and MAC'd again, sometimes)."""
    spec = host.spec
    fields = host.valid_requests()[route]
    tids = (host.terminal.tid, host.other.tid)
    mode = rnd.choice(MAC_MODES)
    if mode == "remac after damage" or rnd.random() < 0.3:
        damaged = mutate_bytes(rnd, host.macd(fields)) or b"0"  # no frame is empty
        return host.remac(damaged) if mode == "remac after damage" else damaged
    if rnd.random() < 0.8:
        fields = mutate_fields(rnd, fields, spec, tids)
    encode: Callable[[dict[str, str]], bytes]
    if mode == "valid":
        encode = host.macd
    elif mode == "other terminal":
        encode = lambda f: host.macd(f, host.other.keys)  # noqa: E731
    elif mode == "wrong":
        encode = lambda f: host.macd(f)[:-8] + rnd.randbytes(8)  # noqa: E731
    else:
        encode = host.codec.encode
    try:
        return encode(fields)
    except CodecError:  # an MTI or value the codec refuses to write: send the original
        return encode(host.valid_requests()[route])
