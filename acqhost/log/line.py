"""The per-message event, written as structlog would write it but without the processor chain.

The host logs one ``"message"`` event per ISO 8583 message; through structlog's processors that
line costs several times the rest of the host's work on a sale. :class:`MessageLogger` writes
the same line directly whenever it can tell that the chain would only render it.
"""

from __future__ import annotations

import contextvars
import datetime
import logging
import time
from json.encoder import encode_basestring_ascii as _json_str
from typing import Any, Final, TextIO, TypeVar

import structlog

from acqhost.log.masking import classify_key, mask_text, nothing_to_mask
from acqhost.log.setup import Configuration, get_logger

__all__ = ("IsoTimestamps", "MessageLogger", "message_logger")

# The keys of the event, in the order structlog puts them: the call's keywords, then "event",
# then what the processors add. Keys a caller's extras must not use (the keyword call would
# fail, or a processor would overwrite the value in place), so those take structlog's path.
_MESSAGE_KEYS: Final = ("route", "tid", "mti", "stan", "rc", "reason", "latency_ms")
_RESERVED: Final = frozenset(
    (*_MESSAGE_KEYS, "event", "logger", "level", "timestamp", "exc_info", "stack_info")
)

# Contexts in which merge_contextvars added nothing. get_contextvars answers the question
# exactly but costs a good part of a fast line, while most messages are logged in a context
# that has not changed since the last one, and comparing with a context seen before is cheap.
# `_plain` holds no variable set to Ellipsis (how structlog clears one), so none of structlog's;
# `_cleared` holds some, listed beside it in one tuple that threads replace whole.
_plain: contextvars.Context | None = None
_cleared: tuple[contextvars.Context | None, tuple[contextvars.ContextVar[Any], ...]] = (None, ())


def _context_bound() -> bool:
    """Would ``merge_contextvars`` (first in ``configure_logging``'s chain, the only chain the
    fast line writes for) add anything to an event now?"""
    global _plain, _cleared
    context = contextvars.copy_context()
    # Contexts compare as mappings: same variables, equal values; in constant time when the
    # mapping underneath is the same one, as it is while nothing sets a variable.
    try:
        if context == _plain:
            return False  # no variable of structlog's in it at all
        seen, cleared = _cleared
        if context == seen:
            # structlog's variables were all cleared in `seen`; they must still be, by `is`, as
            # == could let through an object that claims to equal anything.
            for var in cleared:
                if context[var] is not Ellipsis:
                    break
            else:
                return False
    except Exception:  # a value whose == fails: look properly instead
        pass
    if structlog.contextvars.get_contextvars():
        return True
    cleared = tuple(var for var, value in context.items() if value is Ellipsis)
    if cleared:
        _cleared = (context, cleared)
    else:
        _plain = context
    return False


def _json_value(value: Any, rule: int | None) -> str | None:
    """``value`` as JSON text when ``mask_sensitive`` leaves it alone under ``rule`` (a rule of
    ``classify_key``) and the chain's JSON renderer would render it so; None when it needs the
    full path."""
    if rule is None or rule < 0:
        return None
    kind = type(value)
    if kind is str:
        if (rule and len(value) <= rule and value.isdigit() and value.isascii()) or (
            nothing_to_mask(value)
        ):
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


# The message event's own keys: an extra key among them is an error, as in any call.
_EVENT_KEYS = frozenset(("event", "route", "tid", "mti", "stan", "rc", "reason", "latency_ms"))


class MessageLogger:
    """The one event logged per message (``"message"``), written at a fraction of the cost of
    the processor chain, to the same stream, as the same JSON line.

    ``log.message(route, tid, mti, stan, rc, reason, latency_ms, extra)`` writes what
    ``get_logger(name).info("message", route=route, tid=tid, ..., latency_ms=latency_ms,
    **extra)`` writes: the same keys in the same order, the same values, level, logger name and
    timestamp format. It can skip the chain because it knows the event's shape: values that
    ``mask_sensitive`` leaves alone (short ids and codes, numbers, ``None``, booleans) are
    rendered directly, and the timestamp's text is built once per second. Anything else -- a
    value that may hold card data, an unknown extra key, context bound with
    ``bind_contextvars``, a processor chain that is not ``configure_logging``'s (such as
    ``structlog.testing.capture_logs``) -- goes through structlog as the call above, so the
    masking guarantee is the chain's own.

    Lines written directly are not flushed one by one (a write system call per message cost
    more than the rest of the line): :meth:`flush` writes them out, and the server calls it
    before it sends the answers whose lines they are. Any other event logged to the stream
    flushes them too, in order.
    """

    __slots__ = ("_configuration", "_extra_keys", "_heads", "_logger", "_middles", "_pending",
                 "_suffix", "_timestamps", "_writes")  # fmt: skip

    def __init__(self, name: str) -> None:
        self._logger = get_logger(name)
        self._configuration: Configuration | None = None  # the one _writes was worked out for
        self._writes = False
        # What the chain's processors add after the event's own keys, in their order.
        self._suffix = (
            f', "event": "message", "logger": {_json_str(name)}, "level": "info", "timestamp": "'
        )
        self._timestamps = IsoTimestamps()
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

    def message(
        self,
        route: Any,  # any values, as for any event (str, or None, for the host's own)
        tid: Any,
        mti: Any,
        stan: Any,
        rc: Any,
        reason: Any,
        latency_ms: Any,  # float
        extra: dict[str, Any],
    ) -> None:
        """Log the per-message event at level info (see the class docstring)."""
        configuration = Configuration.current
        if configuration is not None:
            if configuration is not self._configuration:
                self._configuration = configuration
                self._writes = configuration.threshold <= logging.INFO
            if not self._writes:
                return  # the level is above info: structlog's filter would drop it too
            if configuration.processors == configuration.snapshot and not _context_bound():
                line = self.render(route, tid, mti, stan, rc, reason, latency_ms, extra)
                if line is not None:
                    stream = configuration.stream
                    stream.write(line + "\n")
                    self._pending = stream
                    return
        if extra and not _EVENT_KEYS.isdisjoint(extra):  # as Python's call would (compiled: not)
            raise TypeError(f"extra keys repeat the event's: {sorted(_EVENT_KEYS & set(extra))}")
        self._logger.info("message", route=route, tid=tid, mti=mti, stan=stan, rc=rc,
                          reason=reason, latency_ms=latency_ms, **extra)  # fmt: skip

    def render(
        self,
        route: Any,  # any values, as for any event (str, or None, for the host's own)
        tid: Any,
        mti: Any,
        stan: Any,
        rc: Any,
        reason: Any,
        latency_ms: Any,  # float
        extra: dict[str, Any],
    ) -> str | None:
        """The line :meth:`message` writes directly for this event (without the newline),
        or None when some value needs the processor chain."""
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
        return f'{line}{self._suffix}{self._timestamps.at(time.time_ns())}"}}'


class IsoTimestamps:
    """Times as structlog's ``TimeStamper(fmt="iso", utc=True)`` writes them, with the date and
    time of day formatted once per second (the formatting is most of a timestamp's cost)."""

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def at(self, ns: int) -> str:
        """The time ``ns`` (ns since the epoch) as ``datetime.now(timezone.utc).isoformat()``
        with ``+00:00`` as ``Z``: microseconds, no fraction when they are zero."""
        second, micros = divmod(ns // 1000, 1_000_000)
        if second != self._second:
            self._second = second
            self._text = (
                datetime.datetime.fromtimestamp(second, datetime.UTC).replace(tzinfo=None)
            ).isoformat()
        return f"{self._text}.{micros:06d}Z" if micros else f"{self._text}Z"


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
    rule = classify_key(key)
    return (rule, f", {_json_str(key)}: ") if rule >= 0 else None


# The rules mask_sensitive applies to the event's fixed keys (none is a secret, PAN or
# account key; if one were, _json_value would send its values through the chain).
_MESSAGE_RULES: Final = {key: classify_key(key) for key in _MESSAGE_KEYS}
_HEAD_RULES: Final = (_MESSAGE_RULES["route"], _MESSAGE_RULES["tid"], _MESSAGE_RULES["mti"])
_MIDDLE_RULES: Final = (_MESSAGE_RULES["rc"], _MESSAGE_RULES["reason"])
_STAN_RULE: Final = _MESSAGE_RULES["stan"]
_LATENCY_RULE: Final = _MESSAGE_RULES["latency_ms"]


def message_logger(name: str) -> MessageLogger:
    """A :class:`MessageLogger`: the per-message event, as ``get_logger(name)`` would log it."""
    return MessageLogger(name)
