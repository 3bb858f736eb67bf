"""Log records a peer can cause, limited per source address.

A peer that sends a tiny malformed frame, or opens a connection and drops it, makes the host
write a log record far larger than what it sent. :class:`SourceLimiter` lets each source
address have at most ``rate`` such records a second (a token bucket holding ``rate`` records,
so a burst of that many passes at once), counts what it held back, and :meth:`summarise`
writes one line per source that lost records: ``suppressed`` with how many, of which events,
over how many seconds.
"""

from __future__ import annotations

import time
from collections import Counter

from acqhost.log.setup import get_logger

__all__ = ("MAX_SOURCES", "OTHER_SOURCES", "SUMMARY_SECONDS", "SourceLimiter", "source_of")

log = get_logger("acqhost.server")

# How often the host writes the summaries of what was suppressed (server.py's task).
SUMMARY_SECONDS = 10.0
# Sources tracked one by one; beyond them every new source shares one bucket, so a peer with
# many addresses cannot grow the table without bound.
MAX_SOURCES = 10_000
OTHER_SOURCES = "other sources"


class _Bucket:
    __slots__ = ("kinds", "suppressed", "tokens", "when")

    def __init__(self, tokens: float, when: float) -> None:
        self.tokens = tokens
        self.when = when
        self.suppressed = 0
        self.kinds: Counter[str] | None = None  # what was suppressed, made on the first


class SourceLimiter:
    """Token buckets of log records, one per source address. ``rate`` 0: no limit.

    :attr:`source` is the source whose frames are being worked on: the connection core sets it
    before handing its frames to the host core, so that the host core's warnings about a
    frame (``undecodable``, ``security``) count against the peer that sent it.
    """

    __slots__ = ("_buckets", "_since", "rate", "source")

    def __init__(self, rate: float, *, now: float | None = None) -> None:
        self.rate = rate
        self.source = "-"
        self._buckets: dict[str, _Bucket] = {}
        self._since = time.monotonic() if now is None else now

    def allow(self, event: str, source: str | None = None, now: float | None = None) -> bool:
        """Whether a record of ``event`` caused by ``source`` (default: :attr:`source`) may be
        written now; when not, it is counted for the next summary."""
        rate = self.rate
        if not rate:
            return True
        if source is None:
            source = self.source
        if now is None:
            now = time.monotonic()
        buckets = self._buckets
        bucket = buckets.get(source)
        if bucket is None:
            if len(buckets) >= MAX_SOURCES:
                source = OTHER_SOURCES
                bucket = buckets.get(source)
            if bucket is None:
                bucket = buckets[source] = _Bucket(rate, now)
        tokens = min(rate, bucket.tokens + (now - bucket.when) * rate)
        bucket.when = now
        if tokens >= 1.0:
            bucket.tokens = tokens - 1.0
            return True
        bucket.tokens = tokens
        bucket.suppressed += 1
        if bucket.kinds is None:
            bucket.kinds = Counter()
        bucket.kinds[event] += 1
        return False

    def suppressed(self, source: str) -> int:
        """Records of ``source`` held back since its last summary."""
        bucket = self._buckets.get(source)
        return 0 if bucket is None else bucket.suppressed

    def summarise(self, now: float | None = None) -> int:
        """Write one ``suppressed`` line per source that lost records since the last summary,
        and forget the sources whose buckets have filled up again; the records suppressed."""
        if now is None:
            now = time.monotonic()
        seconds = round(now - self._since, 1)
        self._since = now
        total = 0
        rate = self.rate
        for source, bucket in list(self._buckets.items()):
            if bucket.suppressed:
                kinds = dict(bucket.kinds or {})
                log.warning("suppressed", source=source, count=bucket.suppressed,
                            seconds=seconds, events=kinds)  # fmt: skip
                total += bucket.suppressed
                bucket.suppressed = 0
                bucket.kinds = None
            elif bucket.tokens + (now - bucket.when) * rate >= rate:
                del self._buckets[source]  # as good as new: no need to keep it
        return total


def source_of(peer: str) -> str:
    """The address part of a peer's ``host:port`` (IPv6 addresses hold colons too)."""
    address, sep, _ = peer.rpartition(":")
    return address if sep else peer
