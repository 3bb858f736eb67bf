"""Replaying a traffic file (acqhost.domain.traffic): each record becomes a fresh request.

What a replay changes in a record, so the host takes it as new traffic and not as a repeat:

- fields 7, 11, 12 and 13 get the terminal's next numbers (see messages.py); 37, when a
  request carries one, a new 12-digit reference; 41 and 42 the terminal's own;
- field 90 of a reversal names its original as this replay sent it (the original's new STAN
  and field 7), when the original is earlier in the replay;
- a token (``tok:`` and 12 hex digits) becomes a Luhn-valid test card number, the same token
  the same number throughout the replay; in field 35 a test track 2 (``PAN=3012101``);
- the MAC is made again under the terminal's session key.

Sign-on and sign-off records (0800, 70 = 001 or 002) are not replayed: the load tester signs
its terminals on itself, and a sign-off would end the session. Records of terminals the
tester has no key file for are mapped onto the key files it has that the file does not name,
in order.

A record's ``expect`` is compared with its answer field by field; each difference counts under
``FIELD: expected X, got Y``.
"""

from __future__ import annotations

import re
import secrets
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from acqhost.domain import crypto
from acqhost.domain.traffic import TOKEN_PREFIX, TrafficRecord
from acqhost.wire.tlv import decode_tlv, encode_tlv
from simulators.load.engine import Source
from simulators.load.messages import LoadTerminal, Request, test_pan

__all__ = ("ReplayError", "ReplaySource", "Replayer", "map_terminals")

_TOKEN: Final = re.compile(re.escape(TOKEN_PREFIX) + r"[0-9a-f]{12}")
_SKIPPED_NETWORK: Final = frozenset(("001", "002"))


class ReplayError(ValueError):
    """A traffic file the tester cannot replay with the terminals it has (one line)."""


def map_terminals(tids: Iterable[str], terminals: Sequence[LoadTerminal]) -> dict[str, str]:
    """The file's terminal ids -> the tester's: each to itself when there is a key file for
    it, the others onto the key files the file does not name, in order."""
    have = {t.tid for t in terminals}
    wanted = list(dict.fromkeys(tids))
    spare = [t.tid for t in terminals if t.tid not in set(wanted)]
    out = {}
    for tid in wanted:
        if tid in have:
            out[tid] = tid
        elif spare:
            out[tid] = spare.pop(0)
        else:
            raise ReplayError(
                f"the traffic file has terminal {tid} and no key file is left for it: "
                "give one more --key-file"
            )
    return out


def skipped(record: TrafficRecord) -> bool:
    return record.mti == "0800" and record.fields.get("70") in _SKIPPED_NETWORK


@dataclass
class Replayer:
    """What all terminals of one replay share: token -> card numbers, and the mismatches."""

    password: str | None = None  # the operator password put back into rebind submits (48 PW)

    def __post_init__(self) -> None:
        self.cards: dict[str, str] = {}
        self.mismatches: Counter[str] = Counter()
        self.unsendable: Counter[str] = Counter()  # records skipped: why
        self.checked = 0
        self._rrn = secrets.randbelow(10**11)

    def card(self, token: str) -> str:
        pan = self.cards.get(token)
        if pan is None:
            pan = self.cards[token] = test_pan(token)
        return pan

    def detokenize(self, text: str) -> str:
        return _TOKEN.sub(lambda m: self.card(m.group()), text)

    def field(self, key: str, value: str) -> str:
        """Field ``key`` of a record with its tokens replaced: in 4 (an amount that happened
        to pass Luhn) an amount of the replay's own, the same for the same token; in 48 each
        TLV element on its own (its length follows); elsewhere test card numbers."""
        if key == "4" and _TOKEN.fullmatch(value):
            return f"{100 + int(value[len(TOKEN_PREFIX) :], 16) % 99_900:012d}"
        if key == "48":
            try:
                elements = decode_tlv(value)
            except ValueError:
                return self.detokenize(value)
            return encode_tlv({tag: self.detokenize(v) for tag, v in elements.items()})
        return self.detokenize(value)

    def rrn(self) -> str:
        self._rrn += 1
        return f"{self._rrn % 10**12:012d}"

    def check(self, expect: dict[str, str], answer: dict[str, str]) -> None:
        self.checked += 1
        for key, value in expect.items():
            got = answer.get(key)
            if got != value:
                self.mismatches[f"{key}: expected {value}, got {got or 'none'}"] += 1


class ReplaySource(Source):
    """One terminal's records of a replay, rewritten as they leave (module docstring)."""

    learns = True

    def __init__(self, terminal: LoadTerminal, replayer: Replayer) -> None:
        self.terminals = (terminal,)
        self.replayer = replayer
        self.queue: deque[TrafficRecord] = deque()
        self._sent: dict[tuple[str, str], tuple[str, str]] = {}  # (11, 7) as filed -> as sent
        self._expect: dict[tuple[str, ...], dict[str, str]] = {}

    def next(self) -> Request | None:
        """The next record's request; a record that cannot be encoded (say, a field that the
        capture tokenized and no test value fits) is counted and skipped."""
        while self.queue:
            record = self.queue.popleft()
            try:
                return self.build(record)
            except ValueError as exc:
                self.replayer.unsendable[f"{record.mti}: {exc}"] += 1
        return None

    def build(self, record: TrafficRecord) -> Request:
        t = self.terminals[0]
        r = self.replayer
        fields = {k: r.field(k, v) if TOKEN_PREFIX in v else v for k, v in record.fields.items()}
        fields["t"] = record.mti
        n = t.next_numbers()
        old = (record.fields.get("11", ""), record.fields.get("7", ""))
        for key in ("7", "11", "12", "13"):
            if key in fields or key == "11":
                fields[key] = n[key]
        self._sent[old] = (fields["11"], fields.get("7", n["7"]))
        if "37" in fields:
            fields["37"] = r.rrn()
        fields["41"], fields["42"] = t.tid, t.mid
        if "35" in fields and fields["35"].isdigit():  # a token made a PAN: make a track 2
            fields["35"] = fields["35"] + "=3012101"
        original = fields.get("90", "")
        if len(original) >= 20:
            moved = self._sent.get((original[4:10], original[10:20]))
            if moved is not None:
                fields["90"] = original[:4] + moved[0] + moved[1] + original[20:]
        if "48" in fields and r.password is not None and fields.get("91") == "2":
            fields["48"] = self._with_password(fields["48"])
        request = t.request(fields, record.mti)
        if record.expect:
            self._expect[request.key] = record.expect
        return request

    def _with_password(self, value: str) -> str:
        t = self.terminals[0]
        try:
            elements = decode_tlv(value)
        except ValueError:
            return value
        if "PW" not in elements and t.keys is not None and self.replayer.password is not None:
            elements["PW"] = crypto.encrypt_password(t.keys.tx_enc, self.replayer.password)
        return encode_tlv(elements)

    def learn(self, request: Request, answer: dict[str, str]) -> None:
        expect = self._expect.pop(request.key, None)
        if expect is not None:
            self.replayer.check(expect, answer)


def plan(
    records: Sequence[TrafficRecord],
    index: dict[str, int],
    *,
    speed: float | None,
    loops: int = 1,
    gap: float = 1.0,
) -> Iterator[tuple[float, int]]:
    """(send time, connection) of each record, ``loops`` times through the file: at the
    file's own times divided by ``speed`` (None: all at 0, for a closed loop), each pass
    ``gap`` seconds after the last one's final record."""
    span = records[-1].t if records else 0.0
    for loop in range(loops):
        base = 0.0 if speed is None else loop * (span + gap) / speed
        for record in records:
            yield (0.0 if speed is None else base + record.t / speed), index[record.tid]
