"""Traffic files: requests as they reached the host, one JSON object a line (README, "Traffic
files"), with card data replaced by tokens.

A record is ``{"t": 0.125, "tid": "TERM0001", "mti": "0200", "fields": {...}, "expect":
{"39": "00"}}``: ``t`` the seconds since the file's first request, ``fields`` the request's
fields as the codec decodes them (binary fields in hex) without the MTI, bitmaps, PIN block
and MAC, ``expect`` (optional) fields of the answer a replay checks.

:func:`make_record` scrubs a request: the PAN (2) and the PAN of a track 2 (35) become tokens,
track 1 and 3 (45, 36) are dropped, so are 48 PW (the encrypted operator password) and 48 AC
(the account number) becomes a token, and any other run of 12 to 19 digits passing Luhn, in
any field or field 48 element, becomes a token too. A token is ``tok:`` and 12 hex digits (never
12 decimal digits) of a BLAKE2b keyed with the :class:`Tokens`' random key: the same number gives
the same token within one capture, and nothing gives the number back. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from acqhost.domain.cards import luhn_ok
from acqhost.errors import TLVError
from acqhost.wire.tlv import decode_tlv, encode_tlv

__all__ = (
    "TOKEN_PREFIX",
    "Tokens",
    "TrafficError",
    "TrafficRecord",
    "card_runs",
    "dumps",
    "make_record",
    "parse_record",
    "read_traffic",
    "scrub",
)

TOKEN_PREFIX: Final = "tok:"
# Fields never recorded: MTI and bitmaps (the record has them otherwise), the PIN block, the
# MACs, tracks 1 and 3 (card data with nothing a replay needs).
_DROPPED: Final = frozenset(("h", "t", "p", "1", "36", "45", "52", "64", "65", "128"))
# Field 48 elements never recorded: the operator password, encrypted under a session's key.
_DROPPED_ELEMENTS: Final = frozenset(("PW",))
_DIGIT_RUN: Final = re.compile(r"[0-9]+")
_RECORD_KEYS: Final = frozenset(("t", "tid", "mti", "fields", "expect"))


class TrafficError(ValueError):
    """A traffic file line that is not a record; its message names the line."""


@dataclass(slots=True)
class Tokens:
    """The tokens of one capture: a keyed BLAKE2b under a random key, so the same card number
    gets the same token throughout the capture and different captures share nothing."""

    key: bytes = field(default_factory=lambda: secrets.token_bytes(32))

    def token(self, number: str) -> str:
        """``tok:`` and the first 12 hex digits of the keyed digest that are not all decimal
        digits (about one digest in 280 starts with 12), so no token reads as a card number."""
        digest = hashlib.blake2b(number.encode(), key=self.key, digest_size=16).hexdigest()
        for start in range(len(digest) - 11):
            window = digest[start : start + 12]
            if not window.isdigit():
                return TOKEN_PREFIX + window
        return TOKEN_PREFIX + "f" + digest[:11]  # 32 decimal digits in 32: never in practice


def card_runs(text: str) -> list[str]:
    """Every run of 12 to 19 digits in ``text`` (digits on neither side) that passes Luhn."""
    return [
        m.group()
        for m in _DIGIT_RUN.finditer(text)
        if 12 <= len(m.group()) <= 19 and luhn_ok(m.group())
    ]


def _scrub_text(text: str, tokens: Tokens) -> str:
    def replace(m: re.Match[str]) -> str:
        run = m.group()
        return tokens.token(run) if 12 <= len(run) <= 19 and luhn_ok(run) else run

    return _DIGIT_RUN.sub(replace, text)


def _track2_pan(track2: str) -> str:
    for sep in ("=", "D"):
        at = track2.find(sep)
        if at >= 0:
            return track2[:at]
    return track2


def _scrub_48(value: str, tokens: Tokens) -> str:
    try:
        elements = decode_tlv(value)
    except TLVError:  # not TLV: scanned as text
        return _scrub_text(value, tokens)
    out = {}
    for tag, element in elements.items():
        if tag in _DROPPED_ELEMENTS:
            continue
        out[tag] = tokens.token(element) if tag == "AC" else _scrub_text(element, tokens)
    # A token may be longer than what it replaces: the lengths are recomputed.
    return encode_tlv(out)


def scrub(fields: Mapping[str, str], tokens: Tokens) -> dict[str, str]:
    """The fields of a request as a traffic record keeps them: no card data in clear."""
    out: dict[str, str] = {}
    for key, value in fields.items():
        if key in _DROPPED:
            continue
        if key == "2":
            out[key] = tokens.token(value)
        elif key == "35":
            out[key] = tokens.token(_track2_pan(value))
        elif key == "48":
            out[key] = _scrub_48(value, tokens)
        else:
            out[key] = _scrub_text(value, tokens)
    return out


@dataclass(frozen=True, slots=True)
class TrafficRecord:
    t: float
    tid: str
    mti: str
    fields: dict[str, str]
    expect: dict[str, str] | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": self.t, "tid": self.tid, "mti": self.mti}
        out["fields"] = self.fields
        if self.expect is not None:
            out["expect"] = self.expect
        return out


def make_record(
    t: float, request: Mapping[str, str], answer: Mapping[str, str] | None, tokens: Tokens
) -> TrafficRecord:
    """The record of ``request`` arriving ``t`` seconds into the capture; ``answer``'s response
    code (39) is its expectation."""
    expect = None
    if answer is not None and "39" in answer:
        expect = {"39": answer["39"]}
    return TrafficRecord(
        round(max(t, 0.0), 6),
        request.get("41", ""),
        request.get("t", ""),
        scrub(request, tokens),
        expect,
    )


def dumps(record: TrafficRecord) -> str:
    """One line of a traffic file (with its newline)."""
    return json.dumps(record.as_json(), ensure_ascii=False, separators=(",", ":")) + "\n"


def _field_key(key: str) -> bool:
    return key.isascii() and key.isdigit() and 2 <= int(key) <= 128 and key == str(int(key))


def _strings(value: object, what: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and _field_key(k) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError(f"{what} must be an object of field numbers (2-128) to strings")
    return value


def parse_record(line: str) -> TrafficRecord:
    """The record of one line; ValueError saying what is wrong."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    unknown = sorted(set(data) - _RECORD_KEYS)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}")
    for key in ("t", "tid", "mti", "fields"):
        if key not in data:
            raise ValueError(f"no {key!r}")
    t = data["t"]
    if isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t < float("inf"):
        raise ValueError(f"t must be a number of seconds, 0 or more, not {t!r}")
    tid = data["tid"]
    if not (isinstance(tid, str) and len(tid) == 8 and tid.isascii() and tid.isprintable()):
        raise ValueError(f"tid must be a terminal id of 8 printable characters, not {tid!r}")
    mti = data["mti"]
    if not (isinstance(mti, str) and len(mti) == 4 and mti.isascii() and mti.isdigit()):
        raise ValueError(f"mti must be 4 digits, not {mti!r}")
    fields = _strings(data["fields"], "fields")
    expect = _strings(data["expect"], "expect") if "expect" in data else None
    return TrafficRecord(float(t), tid, mti, fields, expect)


def read_traffic(lines: Iterable[str]) -> Iterator[TrafficRecord]:
    """The records of a traffic file's lines, in order; blank lines are skipped. TrafficError
    ``line N: ...`` at the first line that is not a record."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield parse_record(line)
        except ValueError as e:
            raise TrafficError(f"line {number}: {e}") from None
