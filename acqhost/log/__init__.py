"""Structured logging: one JSON object per line, with card data and secrets masked.

:func:`configure_logging` sets up structlog (and routes the standard library's ``logging``
through the same masking and rendering, so a third-party library cannot print a PAN either).
:func:`mask_sensitive` is the processor that masks; it runs after exceptions are formatted and
before anything is rendered.

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

import datetime
import json
import logging as _stdlib_logging
import re
import sys
import time
from collections.abc import Callable
from json.encoder import encode_basestring_ascii as _json_str
from typing import Any, Final, TextIO, TypeVar, cast

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

from acqhost.domain.cards import luhn_ok, mask_account, mask_pan

__all__ = (
    "MessageLogger",
    "configure_logging",
    "get_logger",
    "mask_sensitive",
    "mask_text",
    "message_logger",
)

_LEVELS: Final = {
    "debug": 10,
    "info": 20,
    "warning": 30,
    "warn": 30,
    "error": 40,
    "critical": 50,
}

# --- key rules -------------------------------------------------------------------------------
# A rule is an int: > 0 is a known-safe key with the longest digit string its value may be.
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


def _classify(key: str) -> int:
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


def mask_text(text: str) -> str:
    """``text`` with PANs, track 2, account numbers and 48 AC/PW values masked (rule 2 of the
    module docstring). Returns ``text`` itself when there is nothing to mask."""
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
    rule = _classify(text)
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


# --- set-up ----------------------------------------------------------------------------------


# One encoder for every line: json.dumps with a ``default`` builds a new encoder per call.
# mask_sensitive has already turned every unknown object into (masked) text; repr is a backstop.
_encoder: Final = json.JSONEncoder(default=repr)


def _serialize(obj: Any, **_ignored: Any) -> str:
    return _encoder.encode(obj)


class _NamedWriteLogger(structlog.WriteLogger):
    """A WriteLogger that knows the name it was asked for by :func:`get_logger`."""

    def __init__(self, file: TextIO, name: str | None) -> None:
        super().__init__(file)
        self.name = name


def _add_logger_name(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    name = getattr(logger, "name", None)
    if name is not None:
        event_dict["logger"] = name
    return event_dict


class _Handler(_stdlib_logging.StreamHandler[TextIO]):
    """Our handler on the stdlib root logger, marked so a new configuration replaces it."""


def configure_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Log one JSON object per line to ``stream`` (default: ``sys.stdout`` at call time).

    Each line holds ``event``, the event's keys, ``level`` and ``timestamp`` (ISO 8601, UTC),
    masked by :func:`mask_sensitive`. Records of the standard library's ``logging`` (from
    libraries) go through the same masking to the same stream. May be called again (tests
    do); loggers from :func:`get_logger` follow the newest configuration.
    """
    threshold = _LEVELS.get(level.lower())
    if threshold is None:
        raise ValueError(f"unknown log level {level!r}; one of {', '.join(_LEVELS)}")
    out = sys.stdout if stream is None else stream
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    renderer = structlog.processors.JSONRenderer(serializer=_serialize)
    # Secrets can hide in bound context and in exception text: mask after both are in place.
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        mask_sensitive,
        _add_logger_name,
        structlog.processors.add_log_level,
        timestamper,
        renderer,
    ]

    def logger_factory(*args: Any) -> _NamedWriteLogger:
        return _NamedWriteLogger(out, str(args[0]) if args else None)

    _chain[0] = _Chain(processors, list(processors), threshold, out)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        context_class=dict,
        logger_factory=logger_factory,
        # Not cached by structlog: _Logger caches per configuration instead.
        cache_logger_on_first_use=False,
    )
    _generation[0] += 1

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_logger_name,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            mask_sensitive,
            structlog.processors.add_log_level,
            timestamper,
            renderer,
        ],
    )
    root = _stdlib_logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(handler)
    handler = _Handler(out)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(threshold)


class _Logger:
    """What :func:`get_logger` returns: a bound logger built once per configuration.

    structlog's own lazy proxy, uncached, rebuilds a bound logger on every call (about 10 us);
    cached, it never sees a later configuration. This keeps the built logger until
    :func:`configure_logging` runs again. (``structlog.testing.capture_logs`` still works: it
    edits the processor list in place, which built loggers share.)
    """

    __slots__ = ("_bound", "_generation", "_name")

    def __init__(self, name: str | None) -> None:
        self._name = name
        self._bound: Any = None
        self._generation = -1

    def __getattr__(self, attr: str) -> Any:
        if self._generation != _generation[0]:
            args = () if self._name is None else (self._name,)
            self._bound = structlog.wrap_logger(None, logger_factory_args=args).bind()
            self._generation = _generation[0]
        return getattr(self._bound, attr)

    def __repr__(self) -> str:
        return f"<acqhost logger {self._name!r}>"


# Bumped by configure_logging; a one-item list so that no `global` statement is needed.
_generation: list[int] = [0]


def get_logger(name: str | None = None) -> FilteringBoundLogger:
    """A structlog logger; ``name`` (usually ``__name__``) appears as the ``logger`` key.

    Safe to create at import time: it follows the newest :func:`configure_logging`.
    """
    return cast(FilteringBoundLogger, _Logger(name))


# --- the per-message event, without the processor chain ---------------------------------------


class _Chain:
    """What :func:`configure_logging` set up, for :class:`MessageLogger` to check against."""

    __slots__ = ("processors", "snapshot", "stream", "threshold")

    def __init__(
        self,
        processors: list[Processor],
        snapshot: list[Processor],
        threshold: int,
        stream: TextIO,
    ) -> None:
        self.processors = processors  # the list structlog runs (edited in place by capture_logs)
        self.snapshot = snapshot  # a copy, to see such edits
        self.threshold = threshold
        self.stream = stream


# The newest configuration; None until configure_logging runs (structlog's defaults then).
_chain: list[_Chain | None] = [None]

# The keys of the event, in the order structlog puts them: the call's keywords, then "event",
# then what the processors add. Keys a caller's extras must not use (the keyword call would
# fail, or a processor would overwrite the value in place), so those take structlog's path.
_MESSAGE_KEYS: Final = ("route", "tid", "mti", "stan", "rc", "reason", "latency_ms")
_RESERVED: Final = frozenset(
    (*_MESSAGE_KEYS, "event", "logger", "level", "timestamp", "exc_info", "stack_info")
)

# Where bind_contextvars keeps its variables (every one it ever made, bound or cleared): far
# cheaper to look at than the whole context. Without it, get_contextvars says the same.
_bound_vars: dict[str, Any] | None = getattr(structlog.contextvars, "_CONTEXT_VARS", None)


def _context_bound() -> bool:
    """Would ``merge_contextvars`` add anything to an event now?"""
    if _bound_vars is None:  # pragma: no cover
        return bool(structlog.contextvars.get_contextvars())
    if not _bound_vars:
        return False
    return any(var.get(Ellipsis) is not Ellipsis for var in _bound_vars.values())


def _json_value(value: Any, rule: int | None) -> str | None:
    """``value`` as JSON text when :func:`mask_sensitive` leaves it alone under ``rule`` and
    :data:`_encoder` would render it so; None when it needs the full path."""
    if rule is None or rule < 0:
        return None
    kind = type(value)
    if kind is str:
        if (rule and len(value) <= rule and value.isdigit() and value.isascii()) or len(value) < 6:
            return _json_str(value)
        if _RUN12(value) is None and "PW" not in value and "AC" not in value:
            return _json_str(value)
        return None
    if kind is int:
        return int.__repr__(value) if -1e11 < value < 1e11 else None
    if kind is float:
        return float.__repr__(value) if -1e11 < value < 1e11 else None
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    return None


class MessageLogger:
    """The one event logged per message (``"message"``), written at a fraction of the cost of
    the processor chain, to the same stream, as the same JSON line.

    ``log.message(route, tid, mti, stan, rc, reason, latency_ms, extra)`` writes what
    ``get_logger(name).info("message", route=route, tid=tid, ..., latency_ms=latency_ms,
    **extra)`` writes: the same keys in the same order, the same values, level, logger name and
    timestamp format. It can skip the chain because it knows the event's shape: values that
    :func:`mask_sensitive` leaves alone (short ids and codes, numbers, ``None``, booleans) are
    rendered directly, and the timestamp's text is built once per second. Anything else -- a
    value that may hold card data, an unknown extra key, context bound with
    ``bind_contextvars``, a processor chain that is not :func:`configure_logging`'s (such as
    ``structlog.testing.capture_logs``) -- goes through structlog as the call above, so the
    masking guarantee is the chain's own.

    Lines written directly are not flushed one by one (a write system call per message cost
    more than the rest of the line): :meth:`flush` writes them out, and the server calls it
    before it sends the answers whose lines they are. Any other event logged to the stream
    flushes them too, in order.
    """

    __slots__ = ("_extra_keys", "_generation", "_heads", "_last_second", "_logger",
                 "_middles", "_name", "_pending", "_stamp", "_suffix", "_writer")  # fmt: skip

    def __init__(self, name: str) -> None:
        self._name = name
        self._logger = get_logger(name)
        self._generation = -1
        self._writer: _NamedWriteLogger | None = None
        self._suffix = ""
        self._last_second = -1
        self._stamp = ""
        self._heads: dict[tuple[str, str | None, str | None], str | None] = {}
        self._middles: dict[tuple[str | None, str | None], str | None] = {}
        self._extra_keys: dict[Any, tuple[int, str] | None] = {}
        self._pending: TextIO | None = None  # the stream holding lines not yet flushed

    def flush(self) -> None:
        """Write out the lines :meth:`message` left in the stream's buffer."""
        stream = self._pending
        if stream is not None:
            self._pending = None
            stream.flush()

    def _writer_for(self, chain: _Chain) -> _NamedWriteLogger | None:
        if self._generation != _generation[0]:
            self._generation = _generation[0]
            self._writer = None
            if chain.threshold <= _LEVELS["info"]:
                self._writer = _NamedWriteLogger(chain.stream, self._name)
                self._suffix = (
                    f', "event": "message", "logger": {_json_str(self._name)}, '
                    '"level": "info", "timestamp": "'
                )
        return self._writer

    def _timestamp(self, ns: int) -> str:
        """The time ``ns`` (ns since the epoch) as ``datetime.now(timezone.utc).isoformat()``
        with ``+00:00`` as ``Z``, as structlog's ``TimeStamper(fmt="iso", utc=True)`` writes
        it (microseconds, no fraction when they are zero); the date and time of day are
        formatted once per second."""
        second, micros = divmod(ns // 1000, 1_000_000)
        if second != self._last_second:
            self._last_second = second
            self._stamp = (
                datetime.datetime.fromtimestamp(second, datetime.UTC).replace(tzinfo=None)
            ).isoformat()
        return f"{self._stamp}.{micros:06d}Z" if micros else f"{self._stamp}Z"

    def message(
        self,
        route: str,
        tid: str | None,
        mti: str | None,
        stan: str | None,
        rc: str | None,
        reason: str | None,
        latency_ms: float,
        extra: dict[str, Any],
    ) -> None:
        """Log the per-message event at level info (see the class docstring)."""
        chain = _chain[0]
        if chain is not None:
            writer = self._writer_for(chain)
            if writer is None:
                return  # the level is above info: structlog's filter would drop it too
            if chain.processors == chain.snapshot and not _context_bound():
                line = self._line(route, tid, mti, stan, rc, reason, latency_ms, extra)
                if line is not None:
                    stream = chain.stream
                    stream.write(line + "\n")
                    self._pending = stream
                    return
        self._logger.info("message", route=route, tid=tid, mti=mti, stan=stan, rc=rc,
                          reason=reason, latency_ms=latency_ms, **extra)  # fmt: skip

    def _line(
        self,
        route: str,
        tid: str | None,
        mti: str | None,
        stan: str | None,
        rc: str | None,
        reason: str | None,
        latency_ms: float,
        extra: dict[str, Any],
    ) -> str | None:
        """The JSON line, or None when some value needs the processor chain."""
        # Route, terminal, MTI, response code and reason take few values: the JSON text of
        # each combination (or None: it needs the chain) is remembered, as the masking rules
        # for these keys never change. A STAN is six digits, a latency a small float.
        head = self._heads.get((route, tid, mti), _MISSING)
        if head is _MISSING:
            head = _json_values(self._heads, (route, tid, mti), _HEAD, _HEAD_RULES)
        middle = self._middles.get((rc, reason), _MISSING)
        if middle is _MISSING:
            middle = _json_values(self._middles, (rc, reason), _MIDDLE, _MIDDLE_RULES)
        if head is None or middle is None:
            return None
        if type(stan) is str and len(stan) <= 6 and stan.isdigit() and stan.isascii():
            stan_text: str | None = f'"{stan}"'  # ASCII digits: nothing to escape
        else:
            stan_text = _json_value(stan, _STAN_RULE)
        if type(latency_ms) is float and -1e11 < latency_ms < 1e11:
            latency_text: str | None = float.__repr__(latency_ms)
        else:
            latency_text = _json_value(latency_ms, _LATENCY_RULE)
        if stan_text is None or latency_text is None:
            return None
        line = f"{head}{stan_text}{middle}{latency_text}"
        if extra:
            keys = self._extra_keys
            for key, value in extra.items():
                known = keys.get(key)
                if known is None:
                    known = _remember(keys, key, _extra_key(key))
                    if known is None:
                        return None
                rule, key_text = known
                if type(value) is int and -1e11 < value < 1e11:
                    line += f"{key_text}{int.__repr__(value)}"
                else:
                    text = _json_value(value, rule)
                    if text is None:
                        return None
                    line += f"{key_text}{text}"
        return f'{line}{self._suffix}{self._timestamp(time.time_ns())}"}}'


_MISSING: Final[Any] = object()
_REMEMBER_MAX: Final = 4096


_HEAD: Final = '{{"route": {}, "tid": {}, "mti": {}, "stan": '
_MIDDLE: Final = ', "rc": {}, "reason": {}, "latency_ms": '


def _json_values(
    cache: dict[Any, str | None], values: tuple[Any, ...], template: str, rules: tuple[int, ...]
) -> str | None:
    """``template`` filled with the JSON texts of ``values``, or None if one needs the chain;
    remembered in ``cache`` when every value is a str or None (1, 1.0 and True are equal keys,
    but not the same text)."""
    texts = [_json_value(value, rule) for value, rule in zip(values, rules, strict=True)]
    text = None if None in texts else template.format(*texts)
    if all(value is None or type(value) is str for value in values):
        _remember(cache, values, text)
    return text


_T = TypeVar("_T")


def _remember(cache: dict[Any, _T], key: Any, value: _T) -> _T:
    if len(cache) >= _REMEMBER_MAX:
        cache.clear()
    cache[key] = value
    return value


def _extra_key(key: Any) -> tuple[int, str] | None:
    """(masking rule, ``, "key": ``) for a key of the caller's extras; None when the key
    needs the chain (not a str, one the event already has, or one that is itself masked)."""
    if type(key) is not str or key in _RESERVED or mask_text(key) != key:
        return None
    rule = _classify(key)
    return (rule, f", {_json_str(key)}: ") if rule >= 0 else None


# The rules mask_sensitive applies to the event's fixed keys (none is a secret, PAN or
# account key; if one were, _json_value would send its values through the chain).
_MESSAGE_RULES: Final = {key: _classify(key) for key in _MESSAGE_KEYS}
_HEAD_RULES: Final = (_MESSAGE_RULES["route"], _MESSAGE_RULES["tid"], _MESSAGE_RULES["mti"])
_MIDDLE_RULES: Final = (_MESSAGE_RULES["rc"], _MESSAGE_RULES["reason"])
_STAN_RULE: Final = _MESSAGE_RULES["stan"]
_LATENCY_RULE: Final = _MESSAGE_RULES["latency_ms"]


def message_logger(name: str) -> MessageLogger:
    """A :class:`MessageLogger`: the per-message event, as ``get_logger(name)`` would log it."""
    return MessageLogger(name)
