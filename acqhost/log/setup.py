"""Setting up structured logging: one JSON object per line, masked, for structlog and the
standard library's ``logging`` alike.

:func:`configure_logging` sets up structlog (and routes the standard library's ``logging``
through the same masking and rendering, so a third-party library cannot print a PAN either);
:func:`get_logger` gives the loggers that follow it. :class:`Configuration` records what the
newest call set up, for the per-message line (``acqhost.log.line``) to check against.
"""

from __future__ import annotations

import json
import logging as _stdlib_logging
import sys
from typing import Any, ClassVar, Final, TextIO, cast

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

from acqhost.log.masking import mask_sensitive

__all__ = ("Configuration", "configure_logging", "get_logger")

_LEVELS: Final = {
    "debug": 10,
    "info": 20,
    "warning": 30,
    "warn": 30,
    "error": 40,
    "critical": 50,
}

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


class Configuration:
    """What one call of :func:`configure_logging` set up; :attr:`current` is the newest.

    The per-message line writes to :attr:`stream` itself, and only while :attr:`processors`
    (the list structlog runs, which ``structlog.testing.capture_logs`` edits in place) still
    equals :attr:`snapshot` (a copy taken here).
    """

    # The newest configuration; None until configure_logging runs (structlog's defaults then).
    # A class attribute, not a function, as it is read once per logged message.
    current: ClassVar[Configuration | None] = None

    __slots__ = ("processors", "snapshot", "stream", "threshold")

    def __init__(self, processors: list[Processor], threshold: int, stream: TextIO) -> None:
        self.processors = processors
        self.snapshot = list(processors)
        self.threshold = threshold
        self.stream = stream


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

    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        context_class=dict,
        logger_factory=logger_factory,
        # Not cached by structlog: _Logger caches per configuration instead.
        cache_logger_on_first_use=False,
    )
    Configuration.current = Configuration(processors, threshold, out)

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

    __slots__ = ("_bound", "_configuration", "_name")

    def __init__(self, name: str | None) -> None:
        self._name = name
        self._bound: Any = None
        self._configuration: object = _UNBUILT

    def __getattr__(self, attr: str) -> Any:
        configuration = Configuration.current
        if self._configuration is not configuration:
            args = () if self._name is None else (self._name,)
            self._bound = structlog.wrap_logger(None, logger_factory_args=args).bind()
            self._configuration = configuration
        return getattr(self._bound, attr)

    def __repr__(self) -> str:
        return f"<acqhost logger {self._name!r}>"


# Not any configuration, not even None (structlog's defaults): a new _Logger builds on first use.
_UNBUILT: Final = object()


def get_logger(name: str | None = None) -> FilteringBoundLogger:
    """A structlog logger; ``name`` (usually ``__name__``) appears as the ``logger`` key.

    Safe to create at import time: it follows the newest :func:`configure_logging`.
    """
    return cast(FilteringBoundLogger, _Logger(name))
