"""A hand-written codec for exactly one message layout: the benchmark's typical 0200.

MTI, primary bitmap 2,3,4,7,11,12,13,14,22,25,32,41,42,48,49,64 in the acq87 layout (ASCII
fields and lengths, binary bitmap and MAC, field 48 UTF-8). It checks what a careful person
would check for this one layout (MTI and bitmap, ASCII-ness, lengths, nothing left over) and
uses the cheapest CPython idioms known to us: one latin-1 decode of the whole message sliced per
field, one ``isascii`` per ASCII run, a template dict copied and filled. It stands for the
practical limit of CPython for this message; it is not part of acqhost.
"""

from __future__ import annotations

from binascii import a2b_hex

BITMAP = bytes.fromhex("723C048100C18001")
BITMAP_HEX = BITMAP.hex().upper()
_TEMPLATE = dict.fromkeys(
    ("t", "p", "2", "3", "4", "7", "11", "12", "13", "14", "22", "25", "32", "41", "42", "48",
     "49", "64"), ""
)  # fmt: skip
_LL = {f"{n:02d}": n for n in range(100)}
_LLL = {f"{n:03d}": n for n in range(1000)}
_L2 = tuple(f"{n:02d}" for n in range(100))
_L3 = tuple(f"{n:03d}".encode() for n in range(1000))


def decode(s: bytes) -> dict[str, str]:
    if s[4:12] != BITMAP:
        raise ValueError("not the benchmark's layout")
    t = s.decode("latin-1")
    n2 = _LL[t[12:14]]
    if n2 > 19:
        raise ValueError("field 2 too long")
    i = 14 + n2
    n32 = _LL[t[i + 53 : i + 55]]
    if n32 > 11:
        raise ValueError("field 32 too long")
    j = i + 55 + n32
    n48 = _LLL[t[j + 23 : j + 26]]
    k = j + 26 + n48
    if k + 11 != len(s):
        raise ValueError("bad length")
    if not (s[:4].isascii() and s[12 : j + 26].isascii() and s[k : k + 3].isascii()):
        raise ValueError("non-ASCII data")
    d = _TEMPLATE.copy()
    d["t"] = t[:4]
    d["p"] = BITMAP_HEX
    d["2"] = t[14:i]
    d["3"] = t[i : i + 6]
    d["4"] = t[i + 6 : i + 18]
    d["7"] = t[i + 18 : i + 28]
    d["11"] = t[i + 28 : i + 34]
    d["12"] = t[i + 34 : i + 40]
    d["13"] = t[i + 40 : i + 44]
    d["14"] = t[i + 44 : i + 48]
    d["22"] = t[i + 48 : i + 51]
    d["25"] = t[i + 51 : i + 53]
    d["32"] = t[i + 55 : j]
    d["41"] = t[j : j + 8]
    d["42"] = t[j + 8 : j + 23]
    d["48"] = s[j + 26 : k].decode("utf-8")
    d["49"] = t[k : k + 3]
    d["64"] = s[k + 3 : k + 11].hex().upper()
    return d


def encode(d: dict[str, str]) -> bytes:
    mti, f2, f3, f4, f7 = d["t"], d["2"], d["3"], d["4"], d["7"]
    f11, f12, f13, f14, f22 = d["11"], d["12"], d["13"], d["14"], d["22"]
    f25, f32, f41, f42, f49 = d["25"], d["32"], d["41"], d["42"], d["49"]
    f48 = d["48"].encode("utf-8")
    mac = a2b_hex(d["64"])
    if (
        len(mti) != 4 or len(f2) > 19 or len(f3) != 6 or len(f4) != 12 or len(f7) != 10
        or len(f11) != 6 or len(f12) != 6 or len(f13) != 4 or len(f14) != 4 or len(f22) != 3
        or len(f25) != 2 or len(f32) > 11 or len(f41) != 8 or len(f42) != 15
        or len(f48) > 999 or len(f49) != 3 or len(mac) != 8
    ):  # fmt: skip
        raise ValueError("field length")
    text = "".join(
        (_L2[len(f2)], f2, f3, f4, f7, f11, f12, f13, f14, f22, f25, _L2[len(f32)], f32, f41, f42)
    )
    return b"".join(
        (mti.encode("ascii"), BITMAP, text.encode("ascii"), _L3[len(f48)], f48,
         f49.encode("ascii"), mac)
    )  # fmt: skip
