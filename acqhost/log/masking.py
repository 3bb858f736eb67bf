"""What is card data or a secret in a log event, and how it is masked.

:func:`mask_sensitive` is the structlog processor that masks a whole event; it runs after
exceptions are formatted and before anything is rendered. :func:`mask_text` applies the text
rules to one string.

Masking rules, in order:

1. **Key names** (case-insensitive, at any depth):

   * secrets -- ``password``, ``pw``, ``pin``, ``key``, ``seed``, ``secret``, ``data_key``,
     ``track1``/``track2``, ISO fields ``35``, ``36``, ``45``, ``52``, and any name ending in
     ``_key``, ``_seed``, ``_secret``, ``password``, ``_pw``, ``_pin`` or ``track2`` -- the value
     becomes ``"***"`` (``None`` and ``""`` are kept, so a missing value stays visible);
   * ``pan``, ``card_number``, ISO field ``2`` (or a name ending in ``_pan``) -- first 6 and
     last 4 kept; ``account``, ``ac``, ``acct``, ``account_number`` (or ending in ``_account``)
     -- first 4 and last 4 kept;
   * known-safe numeric keys (``stan``, ``amount``, ``rrn``, ``mti``, ``rc``, ``tid``, ``mid``,
     ``bank_code``, ``effective_from``, ISO fields ``3 4 7 11 12 13 37 38 39 41 42 49 70`` ...)
     each with the longest digit string that field can be: a value that is an ASCII digit
     string (or a non-negative int) no longer than that is left alone -- the 12-digit amount
     ``000000001000`` and RRN stay readable. Anything else under such a key is scanned as text.

2. **Text** everywhere else (the event, every value, nested dicts/lists/tuples, bytes decoded
   as latin-1, other objects through ``repr``, and dict keys):

   * track 2 -- a run of 12+ digits followed by ``=`` or ``D``: the PAN is masked as below and
     everything after the separator becomes ``*****``;
   * field 48 elements -- ``PW`` + LLL: the value becomes ``***``; ``AC`` + LLL with a 12-19
     digit value: first 4 and last 4 kept; ``BK``/``EF``/``AM``/``CT``/``RF`` elements whose
     value has that tag's shape are kept (a bank code is not a card number);
   * any other run of 12 or more digits: a 13-19 digit Luhn-valid run (a PAN) keeps its first 6
     and last 4, every other run its first 4 and last 4. So 12-digit numbers are masked unless
     they sit under a known-safe key or in a known TLV element; runs under 12 digits (STAN,
     field 7, amounts in words) are never touched.

   Digits split by spaces or dashes (``6222 0212 ...``) are not recognised: the host never
   formats card numbers that way, and such text only comes from a peer's free-text fields.

The rules never mutate the caller's objects: nested containers are copied when they are masked.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final

from structlog.typing import EventDict, WrappedLogger

from acqhost.domain.cards import luhn_ok, mask_account, mask_pan

__all__ = ("classify_key", "mask_sensitive", "mask_text", "nothing_to_mask")

# --- key rules -------------------------------------------------------------------------------
# A rule is an int (cheaper to test on every key of every event than anything richer): > 0 is
# a known-safe key with the longest digit string its value may be, 0 a key whose value is
# scanned as text, < 0 a key whose value is masked (or kept) for its name alone.
_SCAN: Final = 0
_SECRET: Final = -1
_PAN: Final = -2
_ACCOUNT: Final = -3
_KEEP: Final = -4  # structlog's own bookkeeping keys: never card data

# fmt: off
_SECRET_KEYS: Final = (
    "password", "passwd", "pw", "pin", "pin_block", "key", "seed", "secret", "data_key",
    "signing_seed", "signing_key", "mac_key", "enc_key", "session_key", "rx_mac", "rx_enc",
    "tx_mac", "tx_enc", "track1", "track_1", "track2", "track_2", "track3", "track_3", "cvv",
    "cvv2", "cvc", "35", "36", "45", "52",
)
_PAN_KEYS: Final = ("pan", "card_number", "card_no", "primary_account_number", "2")
_ACCOUNT_KEYS: Final = (
    "account", "ac", "acct", "account_no", "account_number", "settlement_account",
)
_KEEP_KEYS: Final = ("logger", "level", "timestamp")
# Known-safe numbers and the longest digit string each can legitimately be.
_SAFE_KEYS: Final = {
    "mti": 4, "t": 4, "rc": 2, "39": 2, "stan": 6, "11": 6, "processing_code": 6, "3": 6,
    "amount": 12, "4": 12, "5": 12, "6": 12, "transmission_time": 10, "7": 10,
    "local_time": 6, "12": 6, "local_date": 4, "13": 4, "expiry": 4, "14": 4, "22": 3,
    "25": 2, "rrn": 12, "37": 12, "auth_code": 6, "38": 6, "tid": 8, "41": 8, "mid": 15,
    "42": 15, "currency": 3, "49": 3, "70": 3, "90": 42, "bk": 12, "bank_code": 12,
    "ef": 14, "effective_from": 14, "bn": 6, "batch": 6, "batch_no": 6, "ct": 12,
    "count": 12, "am": 18, "sv": 10, "version": 10, "latency_ms": 12, "event_id": 12,
    "port": 5, "pid": 10, "size": 12, "length": 12, "bytes": 12,
}
# fmt: on

_STATIC_RULES: Final[dict[str, int]] = {
    **dict.fromkeys(_SECRET_KEYS, _SECRET),
    **dict.fromkeys(_PAN_KEYS, _PAN),
    **dict.fromkeys(_ACCOUNT_KEYS, _ACCOUNT),
    **dict.fromkeys(_KEEP_KEYS, _KEEP),
    **_SAFE_KEYS,
}

_SECRET_SUFFIXES: Final = ("_key", "_seed", "_secret", "password", "_pw", "_pin", "track2")

# Classified keys, including every key seen that is not in the static table (bounded).
_rules: dict[str, int] = dict(_STATIC_RULES)
_RULES_MAX: Final = 4096 + len(_STATIC_RULES)


def classify_key(key: str) -> int:
    """The masking rule for ``key`` (rule 1 of the module docstring), as an int: > 0 a
    known-safe key whose value is left alone when it is a digit string no longer than that,
    0 a key whose value is scanned as text, < 0 a key whose value is masked (or kept) for the
    key's name alone."""
    low = key.lower()
    rule = _STATIC_RULES.get(low)
    if rule is not None:
        return rule
    if low.endswith(_SECRET_SUFFIXES):
        return _SECRET
    if low.endswith("_pan"):
        return _PAN
    if low.endswith("_account"):
        return _ACCOUNT
    return _SCAN


# --- text ------------------------------------------------------------------------------------

# Cheap test for "anything at all to look at": 12 digits in a row, or a possible PW/AC header
# (substring tests are far cheaper than a regex alternation on digit-rich text).
_RUN12: Final = re.compile(r"[0-9]{12}", re.ASCII).search
# Left-most first, so a digit run is always matched from its start.
_TOKEN: Final = re.compile(
    r"(?P<tag>AC|PW|BK|EF|AM|CT|RF)(?P<len>[0-9]{3})"
    r"|(?P<digits>[0-9]{12,})(?:(?P<sep>[=D])(?P<rest>[0-9A-F?]*))?",
    re.ASCII,
)
_DIGITS: Final = re.compile(r"-?[0-9]+", re.ASCII)


def _shape_ok(tag: str, length: int, value: str) -> bool:
    """Is ``value`` what a real, non-secret element ``tag`` of ``length`` looks like?"""
    if tag == "RF":
        return length == 16
    if tag == "BK":
        return length == 12 and value.isdigit()
    if tag == "EF":
        return length == 14 and value.isdigit()
    if tag == "AM":
        return length <= 19 and _DIGITS.fullmatch(value) is not None
    return length <= 12 and value.isdigit()  # CT


def _mask_digits(digits: str) -> str:
    n = len(digits)
    if 13 <= n <= 19 and luhn_ok(digits):
        return mask_pan(digits)
    return digits[:4] + "*" * (n - 8) + digits[-4:]


def nothing_to_mask(text: str) -> bool:
    """True when :func:`mask_text` certainly returns ``text`` unchanged: it is too short to
    hold anything, or has neither 12 digits in a row nor a possible PW/AC header. False only
    says that ``text`` needs a closer look."""
    return len(text) < 6 or (_RUN12(text) is None and "PW" not in text and "AC" not in text)


def mask_text(text: str) -> str:
    """``text`` with PANs, track 2, account numbers and 48 AC/PW values masked (rule 2 of the
    module docstring). Returns ``text`` itself when there is nothing to mask."""
    # nothing_to_mask, inline: this runs for most strings of every event.
    if len(text) < 6 or (_RUN12(text) is None and "PW" not in text and "AC" not in text):
        return text
    out: list[str] = []
    pos = 0
    n = len(text)
    search = _TOKEN.search
    while (m := search(text, pos)) is not None:
        tag = m.group("tag")
        if tag is not None:
            length = int(m.group("len"))
            vstart = m.end()
            vend = min(vstart + length, n)
            if tag == "PW":
                # Also swallow a digit run the value ran into: no fragment of it is shown.
                while vend < n and text[vend - 1 : vend + 1].isdigit():
                    vend += 1
                out.append(text[pos:vstart])
                out.append("***")
                pos = vend
                continue
            value = text[vstart:vend]
            whole = vstart + length <= n and not (vend < n and text[vend].isdigit())
            if whole and tag == "AC" and 12 <= length <= 19 and value.isdigit():
                out.append(text[pos:vstart])
                out.append(mask_account(value))
                pos = vend
                continue
            if whole and tag != "AC" and _shape_ok(tag, length, value):
                out.append(text[pos:vend])
                pos = vend
                continue
            # Not a real element: look at its digits again as ordinary text.
            out.append(text[pos : m.start() + 2])
            pos = m.start() + 2
            continue
        out.append(text[pos : m.start()])
        out.append(_mask_digits(m.group("digits")))
        sep = m.group("sep")
        if sep is not None:
            out.append(sep + "*****" if m.group("rest") else sep)
        pos = m.end()
    out.append(text[pos:])
    return "".join(out)


# --- values ----------------------------------------------------------------------------------

_MAX_DEPTH: Final = 16
_BIG: Final = 10**11  # ints below this have at most 11 digits: nothing to mask


def _clean(value: Any, rule: int, depth: int) -> Any:
    """``value`` with its sensitive parts masked under ``rule``; ``value`` itself if clean."""
    kind = type(value)
    if rule > 0:
        if kind is str:
            if len(value) <= rule and value.isdigit() and value.isascii():
                return value
        elif kind is int and 0 <= value < 10**rule:
            return value
    elif rule == _SECRET:
        return value if value is None or (kind is str and not value) else "***"
    elif rule in (_PAN, _ACCOUNT):
        return _mask_number(value, mask_pan if rule == _PAN else mask_account, depth)
    elif rule == _KEEP and kind is str:
        return value

    if kind is str:
        return mask_text(value)
    if value is None or kind is bool or (kind is float and -1e11 < value < 1e11):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return value if -_BIG < value < _BIG else mask_text(str(value))
    if depth >= _MAX_DEPTH:
        return "<nested too deep>"
    if isinstance(value, dict):
        return _clean_dict(value, depth + 1)
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean(item, rule, depth + 1) for item in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return mask_text(bytes(value).decode("latin-1"))
    if isinstance(value, str):  # str subclasses (StrEnum)
        masked = mask_text(value)
        return value if masked == value else masked
    # Anything else would be rendered through repr() anyway; mask what that shows.
    return mask_text(repr(value))


def _mask_number(value: Any, masker: Callable[[str], str], depth: int) -> Any:
    if value is None:
        return value
    if isinstance(value, str):
        return masker(value) if value else value
    if isinstance(value, int) and not isinstance(value, bool):
        return masker(str(value))
    if isinstance(value, bytes | bytearray):
        return masker(bytes(value).decode("latin-1"))
    if isinstance(value, list | tuple) and depth < _MAX_DEPTH:
        return [_mask_number(item, masker, depth + 1) for item in value]
    return "***"


def _rule_of(key: Any) -> tuple[int, Any]:
    """The rule for ``key`` and the key as it may be shown (masked if it holds card data)."""
    rule = _rules.get(key) if type(key) is str else None
    if rule is not None:
        return rule, key
    text = key if isinstance(key, str) else str(key)
    rule = classify_key(text)
    shown = mask_text(text)
    if shown != text:
        return rule, shown  # never remember a key that carries card data
    if len(_rules) >= _RULES_MAX:
        _rules.clear()
        _rules.update(_STATIC_RULES)
    if type(key) is str:
        _rules[key] = rule
    return rule, key


def _clean_dict(mapping: dict[Any, Any], depth: int) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for key, value in mapping.items():
        rule, shown = _rule_of(key)
        out[shown] = _clean(value, rule, depth)
    return out


def mask_sensitive(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: mask card data, account numbers and secrets everywhere in the
    event (see the module docstring for the rules).

    Changes ``event_dict`` in place (structlog gives each event its own dict) but never the
    objects inside it.
    """
    renamed: list[tuple[Any, Any]] | None = None
    rules = _rules
    run12 = _RUN12
    for key, value in event_dict.items():
        rule = rules.get(key)
        if rule is None:
            rule, shown = _rule_of(key)
            if shown is not key:
                renamed = renamed or []
                renamed.append((key, shown))
        # Fast paths for what nearly every event holds (short ids, codes, timings); they give
        # the same answer as _clean, which handles everything else.
        kind = type(value)
        if kind is str and rule >= 0:
            if rule and len(value) <= rule and value.isdigit() and value.isascii():
                continue
            if len(value) < 6 or (run12(value) is None and "PW" not in value and "AC" not in value):
                continue
        elif ((kind is float or kind is int) and rule >= 0 and -1e11 < value < 1e11) or (
            rule == _KEEP and kind is str
        ):
            continue
        new = _clean(value, rule, 0)
        if new is not value:
            event_dict[key] = new  # same key: allowed while iterating
    if renamed:
        for key, shown in renamed:
            event_dict[shown] = event_dict.pop(key)
    return event_dict
