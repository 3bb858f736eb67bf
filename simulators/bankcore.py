"""The bank system simulator's decisions, without sockets: what a bank does with each settlement
update advice the host sends it (PROTOCOL.md 6), and the totals of what it accepted.

:class:`Bank` takes one message's bytes and returns what to answer (:class:`Outcome`): it checks
the host's signature (:func:`verify_advice_signature`), applies the configured :class:`Faults`,
de-duplicates on field 37 and appends each accepted advice to a :class:`Journal` (JSON Lines).
:func:`settlement_totals` adds up a journal's 0520s per batch, terminal and account, in the
columns of ``acqhost settle report``. ``simulators.bank`` puts this on TCP.
"""

from __future__ import annotations

import collections
import datetime
import fnmatch
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Final

from acqhost.cli.settle import TOTALS_COLUMNS  # the host's report's, so a diff holds
from acqhost.domain import crypto
from acqhost.domain.cards import mask_account
from acqhost.errors import TLVError
from acqhost.wire import specs
from acqhost.wire.codec import Codec, CodecError, compile_spec
from acqhost.wire.tlv import decode_tlv

__all__ = (
    "ADVICE_MTIS",
    "TOTALS_COLUMNS",
    "Bank",
    "Faults",
    "Journal",
    "Outcome",
    "Rule",
    "read_journal",
    "response_mti",
    "settlement_totals",
    "verify_advice_signature",
)

log = logging.getLogger("acqhost-bank")

ADVICE_MTIS: Final = frozenset({"0320", "0321", "0520", "0521"})
"""File update advices (0320, repeat 0321) and settlement advices (0520, repeat 0521)."""

# The field 48 elements each advice must carry (PROTOCOL.md 6), SG apart.
# A 0320's RF names the change that brought the version; the first version, registered with its
# terminal, has none.
REQUIRED_ELEMENTS: Final = {
    "032": ("AC", "NM", "BK", "SV", "EF"),
    "052": ("BN", "AC", "NM", "BK", "SV", "CT", "AM"),
}
REQUIRED_FIELDS: Final = ("7", "11", "37", "41", "42")
ECHOED: Final = ("7", "11", "37", "41", "42")
_NUMBER = re.compile(r"-?[0-9]{1,18}")
_DIGITS = re.compile(r"[0-9]{1,18}")
_ACCOUNT = re.compile(r"[0-9]{12,19}")
_CODE = re.compile(r"[0-9A-Z]{2}")


# -- the signature ----------------------------------------------------------------------------


def verify_advice_signature(host_public_key: bytes, mti: str, field37: str, field48: str) -> bool:
    """True if field 48's SG is the host's Ed25519 signature of this advice (PROTOCOL.md 6):
    over ``MTI + field 37 + the UTF-8 bytes of field 48 before the SG element``.

    SG must be the last element: anything after it would travel unsigned. A missing or
    malformed SG, malformed TLV or a wrong signature is False; it never raises. Built from
    PROTOCOL.md and ``acqhost.domain.crypto.verify`` only, so that the domain's own
    ``verify_advice`` can take its place.
    """
    try:
        elements = decode_tlv(field48)
    except TLVError:
        return False
    if not elements or list(elements)[-1] != "SG":
        return False
    sg = elements["SG"]
    raw = field48.encode("utf-8")
    element = b"SG%03d" % len(sg.encode("utf-8")) + sg.encode("utf-8")
    if not raw.endswith(element):
        return False
    try:
        signature = bytes.fromhex(sg)
        signed = mti.encode("ascii") + field37.encode("ascii") + raw[: -len(element)]
    except (ValueError, UnicodeEncodeError):
        return False
    return crypto.verify(host_public_key, signed, signature)


def response_mti(mti: str) -> str:
    """The answer's MTI: the third digit plus one, origin 0 (0320 and 0321 -> 0330)."""
    return mti[:2] + str(int(mti[2]) + 1) + "0"


# -- faults -----------------------------------------------------------------------------------


def _code(value: object, what: str) -> str:
    if not isinstance(value, str) or not _CODE.fullmatch(value):
        raise ValueError(f"{what}: a response code is 2 digits or capitals, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Rule:
    """``PATTERN=CODE``: answer advices that match PATTERN with CODE. A PATTERN of 4 digits is
    an MTI (``0520``); anything else is a shell-style pattern for field 37 (``*7``,
    ``00000000001?``). CODE ``00`` processes the advice normally (an exception to --refuse)."""

    pattern: str
    code: str

    @classmethod
    def parse(cls, text: object) -> Rule:
        if not isinstance(text, str) or text.count("=") != 1:
            raise ValueError(f"answer rule: expected PATTERN=CODE, got {text!r}")
        pattern, code = text.split("=")
        if not pattern:
            raise ValueError(f"answer rule {text!r}: empty pattern")
        return cls(pattern, _code(code, f"answer rule {text!r}"))

    def matches(self, mti: str, field37: str) -> bool:
        if len(self.pattern) == 4 and self.pattern.isdigit():
            return mti == self.pattern
        return fnmatch.fnmatchcase(field37, self.pattern)

    def __str__(self) -> str:
        return f"{self.pattern}={self.code}"


@dataclass(frozen=True, slots=True)
class Faults:
    """How the bank misbehaves. ``refuse``: answer every advice with this code; ``answer``:
    rules, the first that matches wins over ``refuse``; ``drop_every`` N: every Nth advice is
    read and never answered nor recorded (0: never); ``delay``: seconds before each answer;
    ``close_after`` N: close a connection once N advices came on it (0: never)."""

    refuse: str | None = None
    answer: tuple[Rule, ...] = ()
    drop_every: int = 0
    delay: float = 0.0
    close_after: int = 0

    def __post_init__(self) -> None:
        if self.refuse is not None:
            _code(self.refuse, "refuse")
        for name in ("drop_every", "close_after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: a whole number >= 0, got {value!r}")
        delay = self.delay
        if (
            isinstance(delay, bool)
            or not isinstance(delay, int | float)
            or not math.isfinite(delay)
            or not 0 <= delay <= 3600
        ):
            raise ValueError(f"delay: seconds from 0 to 3600, got {delay!r}")

    def code_for(self, mti: str, field37: str) -> str | None:
        """The code this advice is to be answered with instead of being processed, or None."""
        for rule in self.answer:
            if rule.matches(mti, field37):
                return None if rule.code == "00" else rule.code
        return self.refuse

    def changed(self, changes: Mapping[str, object]) -> Faults:
        """These faults with ``changes`` (names as in :meth:`to_json`) applied; ValueError for
        an unknown name or a bad value. ``refuse: null`` and ``answer: []`` clear them."""
        unknown = set(changes) - set(self.to_json())
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        values: dict[str, Any] = dict(changes)
        if "answer" in values:
            rules = values["answer"]
            if not isinstance(rules, list):
                raise ValueError("answer: a list of PATTERN=CODE strings")
            values["answer"] = tuple(Rule.parse(r) for r in rules)
        return replace(self, **values)

    def to_json(self) -> dict[str, Any]:
        return {
            "refuse": self.refuse,
            "answer": [str(r) for r in self.answer],
            "drop_every": self.drop_every,
            "delay": self.delay,
            "close_after": self.close_after,
        }


# -- the journal ------------------------------------------------------------------------------


def read_journal(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Each record of a JSON Lines journal; ValueError naming the line for one that is not a
    JSON object with a field 37."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise ValueError(f"{os.fspath(path)} line {number}: not JSON") from None
            if not isinstance(record, dict) or not isinstance(record.get("37"), str):
                raise ValueError(f"{os.fspath(path)} line {number}: not an advice record")
            yield record


def _content(mti: str, fields: Mapping[str, str], elements: Mapping[str, str]) -> str:
    """What a repeat of an advice must carry again: its kind, terminal, merchant and field 48
    (the signature apart, which differs when a repeat MTI is signed anew)."""
    unsigned = {k: v for k, v in elements.items() if k != "SG"}
    return json.dumps([mti[:3], fields.get("41"), fields.get("42"), unsigned], ensure_ascii=False)


class Journal:
    """The JSON Lines file of accepted advices (created 0600: it holds account numbers) and the
    field 37 values already in it, which survive a restart."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._seen: dict[str, str] = {}
        if self.path.exists():
            for record in read_journal(self.path):
                content = _content(str(record.get("mti")), record, record.get("48") or {})
                self._seen[record["37"]] = content
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file: IO[bytes] = os.fdopen(fd, "ab")

    def __len__(self) -> int:
        return len(self._seen)

    def content(self, field37: str) -> str | None:
        """What the advice recorded under ``field37`` carried (see :func:`_content`), or None."""
        return self._seen.get(field37)

    def append(self, record: dict[str, Any], content: str) -> None:
        """Write one record as a line and fsync it: an advice acknowledged is one kept."""
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
        self._file.write(line.encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._seen[record["37"]] = content

    def close(self) -> None:
        self._file.close()


# -- the bank ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """What to do about one message: send ``answer`` (None: send nothing) after ``delay``
    seconds; ``advice``: it was an advice (it counts towards ``close_after``)."""

    answer: bytes | None
    advice: bool = False
    delay: float = 0.0


@dataclass(slots=True)
class Counters:
    received: int = 0  # advices decoded
    accepted: int = 0  # recorded
    duplicates: int = 0  # a field 37 already recorded: acknowledged again
    conflicts: int = 0  # ... whose content differs from what was recorded
    refused: int = 0  # answered with a --refuse or --answer code
    dropped: int = 0  # never answered (drop_every)
    bad_signature: int = 0  # 63
    format_errors: int = 0  # 30
    other: int = 0  # messages that are not advices
    undecodable: int = 0  # no answer

    def to_json(self) -> dict[str, int]:
        return asdict(self)


def _utc_now(clock: Callable[[], float]) -> str:
    moment = datetime.datetime.fromtimestamp(clock(), datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Bank:
    """One bank system: the host's public key, its journal, its faults and counters."""

    host_public_key: bytes
    journal: Journal
    faults: Faults = field(default_factory=Faults)
    spec: str = "acq87"
    clock: Callable[[], float] = time.time
    counters: Counters = field(default_factory=Counters)
    codec: Codec = field(init=False, repr=False)
    _nth: int = field(default=0, init=False)  # advices since drop_every was last set

    def __post_init__(self) -> None:
        if len(self.host_public_key) != crypto.KEY_BYTES:
            raise ValueError("the host public key is 32 bytes (64 hex digits)")
        self.codec = compile_spec(specs.load(self.spec))

    def set_faults(self, faults: Faults) -> None:
        """Change the faults; a new ``drop_every`` counts from the next advice."""
        if faults.drop_every != self.faults.drop_every:
            self._nth = 0
        self.faults = faults

    def handle(self, message: bytes) -> Outcome:
        """Decide about one message (an advice is recorded, when accepted, before this returns)."""
        try:
            fields = self.codec.decode(message)
        except CodecError as e:
            self.counters.undecodable += 1
            log.warning("undecodable message (%s): not answered", e)
            return Outcome(None)
        mti = fields["t"]
        if mti not in ADVICE_MTIS:
            return self._other(mti, fields)
        self.counters.received += 1
        self._nth += 1
        faults = self.faults
        if faults.drop_every and self._nth % faults.drop_every == 0:
            self.counters.dropped += 1
            log.info("%s 37=%s dropped (drop_every %d)", mti, fields.get("37"), faults.drop_every)
            return Outcome(None, advice=True)
        code = self._advice(mti, fields)
        answer = {"t": response_mti(mti), "39": code}
        answer.update((k, fields[k]) for k in ECHOED if k in fields)
        return Outcome(self.codec.encode(answer), advice=True, delay=faults.delay)

    def _advice(self, mti: str, fields: dict[str, str]) -> str:
        field37, tid = fields.get("37", ""), fields.get("41")
        try:
            elements = decode_tlv(fields.get("48", ""))
        except TLVError as e:
            return self._format_error(mti, field37, f"field 48: {e}")
        missing = [n for n in REQUIRED_FIELDS if n not in fields]
        if missing:
            return self._format_error(mti, field37, f"missing field(s) {', '.join(missing)}")
        if not self._signed(mti, field37, fields.get("48", "")):
            self.counters.bad_signature += 1
            log.warning("%s 37=%s 41=%s -> 63: bad or missing signature", mti, field37, tid)
            return "63"
        code = self.faults.code_for(mti, field37)
        if code is not None:
            self.counters.refused += 1
            log.info("%s 37=%s 41=%s -> %s (refused, not recorded)", mti, field37, tid, code)
            return code
        problem = _element_problem(mti, elements)
        if problem:
            return self._format_error(mti, field37, problem)
        content = _content(mti, fields, elements)
        recorded = self.journal.content(field37)
        if recorded is not None:
            self.counters.duplicates += 1
            if recorded != content:
                self.counters.conflicts += 1
                log.warning("%s 37=%s repeats a recorded 37 with other content", mti, field37)
            log.info("%s 37=%s 41=%s -> 00 (duplicate, already recorded)", mti, field37, tid)
            return "00"
        record: dict[str, Any] = {"received": _utc_now(self.clock), "mti": mti}
        record.update((k, fields[k]) for k in REQUIRED_FIELDS)
        record["48"] = elements
        self.journal.append(record, content)
        self.counters.accepted += 1
        shown = {k: mask_account(v) if k == "AC" else v for k, v in elements.items() if k != "SG"}
        log.info("%s 37=%s 41=%s -> 00 recorded %s", mti, field37, tid, shown)
        return "00"

    def _signed(self, mti: str, field37: str, field48: str) -> bool:
        """The host's signature, over this MTI or (for a repeat 0321 / 0521 that kept the
        first transmission's signature) over the original 0320 / 0520."""
        if verify_advice_signature(self.host_public_key, mti, field37, field48):
            return True
        original = mti[:3] + "0"
        return original != mti and verify_advice_signature(
            self.host_public_key, original, field37, field48
        )

    def _format_error(self, mti: str, field37: str, problem: str) -> str:
        self.counters.format_errors += 1
        log.warning("%s 37=%s -> 30: %s", mti, field37, problem)
        return "30"

    def _other(self, mti: str, fields: dict[str, str]) -> Outcome:
        """Echo test 0800 -> 0810 00; another request -> 12; a response: no answer."""
        self.counters.other += 1
        if not (mti.isdigit() and len(mti) == 4 and int(mti[2]) % 2 == 0):
            log.warning("message %s is not a request: not answered", mti)
            return Outcome(None)
        code = "00" if mti == "0800" else "12"
        answer = {"t": response_mti(mti), "39": code}
        answer.update((k, fields[k]) for k in (*ECHOED, "70") if k in fields)
        log.info("%s -> %s", mti, code)
        return Outcome(self.codec.encode(answer))


def _element_problem(mti: str, elements: Mapping[str, str]) -> str | None:
    missing = [t for t in REQUIRED_ELEMENTS[mti[:3]] if t not in elements]
    if missing:
        return f"field 48 lacks {', '.join(missing)}"
    for tag, pattern in (("SV", _DIGITS), ("CT", _DIGITS), ("AM", _NUMBER), ("AC", _ACCOUNT)):
        if tag in elements and not pattern.fullmatch(elements[tag]):
            return f"field 48 {tag} is not a number of the right length"
    return None


# -- totals -----------------------------------------------------------------------------------


def settlement_totals(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The accepted 0520s' counts and amounts per batch, terminal, merchant and settlement
    account (version, number, holder, bank), in :data:`TOTALS_COLUMNS`, sorted by batch, tid,
    mid and account version. A field 37 seen twice counts once."""
    seen: set[str] = set()
    sums: dict[tuple[int, str, str, int, str, str, str], list[int]] = collections.defaultdict(
        lambda: [0, 0]
    )
    for record in records:
        if not str(record.get("mti", "")).startswith("052") or record["37"] in seen:
            continue
        seen.add(record["37"])
        try:
            e = record["48"]
            key = (
                int(e["BN"]),
                record["41"],
                record["42"],
                int(e["SV"]),
                e["AC"],
                e["NM"],
                e["BK"],
            )
            sums[key][0] += int(e["CT"])
            sums[key][1] += int(e["AM"])
        except (KeyError, TypeError, ValueError) as exc:
            problem = f"record 37={record['37']}: not a settlement advice ({exc!r})"
            raise ValueError(problem) from None
    rows = [
        dict(
            zip(
                TOTALS_COLUMNS,
                (batch, tid, mid, version, mask_account(ac), holder, bank, count, amount),
                strict=True,
            )
        )
        for (batch, tid, mid, version, ac, holder, bank), (count, amount) in sums.items()
    ]
    rows.sort(key=lambda r: tuple(r[c] for c in TOTALS_COLUMNS[:7]))
    return rows
