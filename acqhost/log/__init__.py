"""Structured logging: one JSON object per line, with card data and secrets masked.

* :mod:`acqhost.log.masking` -- what is card data or a secret, and how it is masked
  (:func:`mask_text`, and :func:`mask_sensitive`, the processor every event goes through);
* :mod:`acqhost.log.setup` -- :func:`configure_logging` and :func:`get_logger`: structlog and
  the standard library's ``logging`` both write masked JSON lines to one stream;
* :mod:`acqhost.log.line` -- :class:`MessageLogger`, the per-message event written as the
  chain would write it, without the chain's cost.
"""

from __future__ import annotations

from acqhost.log.line import MessageLogger, message_logger
from acqhost.log.masking import mask_sensitive, mask_text
from acqhost.log.setup import configure_logging, get_logger

__all__ = (
    "MessageLogger",
    "configure_logging",
    "get_logger",
    "mask_sensitive",
    "mask_text",
    "message_logger",
)
