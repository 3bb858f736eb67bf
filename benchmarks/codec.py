"""Codec benchmark: µs per message to decode and to encode a typical 0200, in one process.

Three codecs on the same message: acqhost's compiled codec, pyiso8583 (the reference), and a
hand-written codec for exactly this layout (benchmarks/handwritten.py, the practical limit of
CPython). Rounds of each are interleaved so that machine noise hits all three alike; the
figure kept per codec is the best round. Run: ``python benchmarks/codec.py [--rounds N]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import iso8583

from acqhost.wire import specs
from acqhost.wire.codec import compile_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))
import handwritten

# A sale as terminals send it: 16 fields, PAN and expiry, acquirer id, TLV in 48, MAC in 64.
SALE_0200 = {
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
    "48": "TS0011OP00201",
    "49": "156",
    "64": "5A1F0C33D2E4B6A8",
}

TARGET_VS_PYISO = 12.0
TARGET_VS_HAND = 1.25


def per_call_us(fn: Callable[[Any], Any], arg: Any, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn(arg)
    return (time.perf_counter() - start) / calls * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=5000, help="calls per round (acqhost)")
    args = parser.parse_args()

    spec = specs.load("acq87")
    codec = compile_spec(spec)
    message = bytes(iso8583.encode(dict(SALE_0200), spec)[0])
    assert handwritten.decode(message) == iso8583.decode(message, spec)[0]
    assert handwritten.encode(SALE_0200) == message
    for _ in range(3):  # first sightings take the exact path, then the layout is specialised
        assert codec.decode(message) == iso8583.decode(message, spec)[0]
        assert codec.encode(SALE_0200) == message

    codecs: dict[str, tuple[Callable[[bytes], Any], Callable[[dict[str, str]], Any], int]] = {
        "acqhost": (codec.decode, codec.encode, args.calls),
        "pyiso8583": (
            lambda s: iso8583.decode(s, spec),
            lambda d: iso8583.encode(dict(d), spec),
            max(args.calls // 20, 50),
        ),
        "hand-written": (handwritten.decode, handwritten.encode, args.calls),
    }
    best: dict[str, list[float]] = {name: [float("inf"), float("inf")] for name in codecs}
    for _ in range(args.rounds):
        for name, (dec, enc, calls) in codecs.items():
            best[name][0] = min(best[name][0], per_call_us(dec, message, calls))
            best[name][1] = min(best[name][1], per_call_us(enc, SALE_0200, calls))

    print(f"message: 0200, {len(SALE_0200) - 1} fields, {len(message)} bytes")
    print(f"{'codec':<14}{'decode µs':>11}{'encode µs':>11}{'both µs':>10}")
    for name, (d_us, e_us) in best.items():
        print(f"{name:<14}{d_us:>11.2f}{e_us:>11.2f}{d_us + e_us:>10.2f}")
    acq, ref, hand = (sum(best[n]) for n in ("acqhost", "pyiso8583", "hand-written"))
    vs_ref = ref / acq
    vs_hand = acq / hand
    print(
        f"pyiso8583 / acqhost     decode {best['pyiso8583'][0] / best['acqhost'][0]:6.1f}x  "
        f"encode {best['pyiso8583'][1] / best['acqhost'][1]:6.1f}x  both {vs_ref:6.1f}x  "
        f"(target >= {TARGET_VS_PYISO:g}x: {'met' if vs_ref >= TARGET_VS_PYISO else 'MISSED'})"
    )
    print(
        f"acqhost / hand-written  decode {best['acqhost'][0] / best['hand-written'][0]:6.2f}x  "
        f"encode {best['acqhost'][1] / best['hand-written'][1]:6.2f}x  both {vs_hand:6.2f}x  "
        f"(target <= {TARGET_VS_HAND:g}x: {'met' if vs_hand <= TARGET_VS_HAND else 'MISSED'})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
