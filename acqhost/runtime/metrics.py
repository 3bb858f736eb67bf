"""What the host counts for Prometheus, and how the counts are exported.

Counting is on the hot path, so it is plain Python: a dict of ints keyed by (MTI, response
code), a list of bucket counts per MTI for the latency, a few more ints for the ledger and
security events. Nothing of prometheus_client runs per message: :class:`HostCollector` reads
these counts (and the live figures: connections, the ledger's queue, the bank links' outbox)
when ``/metrics`` is scraped, in the event loop's thread, so no count is read half-written.
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from acqhost.domain.advices import LinkStatus
from acqhost.host.context import Context

if TYPE_CHECKING:
    from acqhost.runtime.server import Server

__all__ = ("COMMIT_BOUNDS", "LATENCY_BOUNDS", "Histogram", "HostCollector", "Metrics")

# Seconds from a request's arrival to its answer (sales include their group commit).
LATENCY_BOUNDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
# Seconds of one ledger flush (a group commit: one transaction, one fsync).
COMMIT_BOUNDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
# The label of an MTI the host has no route for (a label per value would let a peer that sends
# arbitrary MTIs make series without end).
OTHER = "other"


class Histogram:
    """Bucket counts (not cumulative) and their sum; ``counts[-1]`` is above the last bound."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus's buckets: (upper bound, count at or below it), ending with +Inf."""
        out, total = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
        return out


class Metrics:
    """The counts of one host process. :meth:`observe` is the dispatcher's hook: it runs once
    for every request, after its answer is built."""

    __slots__ = ("_mtis", "bank_links", "commits", "latency", "requests", "security",
                 "sign_ons_refused", "started", "store_up", "unreadable")  # fmt: skip

    def __init__(self, mtis: Iterable[str]) -> None:
        self._mtis = frozenset(mtis)  # the MTIs with a route: the others count as OTHER
        self.requests: dict[tuple[str, ...], int] = {}  # (MTI, field 39 answered) -> count
        self.latency: dict[str, Histogram] = {}  # MTI -> seconds from arrival to answer
        self.unreadable = 0  # frames that could not be decoded far enough for an answer
        self.security: dict[str, int] = {}  # answered 63: MAC_MISSING, BAD_MAC, BAD_SIGNATURE...
        self.sign_ons_refused: dict[str, int] = {}  # 0800 sign-ons not answered 00, by reason
        self.commits = Histogram(COMMIT_BOUNDS)  # ledger flushes
        self.started = time.time()
        # Read from the store when /metrics is scraped (None: the store did not answer).
        self.bank_links: list[LinkStatus] | None = []
        self.store_up = True

    def observe(self, ctx: Context | None) -> None:
        """Count one request and its answer (None: a frame that gets no answer)."""
        if ctx is None:
            self.unreadable += 1
            return
        mti = ctx.req.get("t")
        if mti not in self._mtis:
            mti = OTHER
        rc = ctx.resp.get("39", "")
        key = (mti, rc)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        latency = self.latency.get(mti)
        if latency is None:
            latency = self.latency[mti] = Histogram(LATENCY_BOUNDS)
        latency.observe(time.perf_counter() - ctx.started)
        if rc != "00":
            reason = ctx.reason or rc
            if rc == "63":
                self.security[reason] = self.security.get(reason, 0) + 1
            if ctx.route == "sign_on":
                self.sign_ons_refused[reason] = self.sign_ons_refused.get(reason, 0) + 1

    def ledger_flushed(self, writes: int, seconds: float) -> None:
        """The ledger's hook: one flush of ``writes`` writes took ``seconds``."""
        self.commits.observe(seconds)


def _counter(
    name: str, doc: str, labels: Sequence[str], values: Mapping[tuple[str, ...], int]
) -> Metric:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(key, value)
    return family


def _gauge(name: str, doc: str, value: float) -> Metric:
    return GaugeMetricFamily(name, doc, value=value)


class HostCollector(Collector):
    """Exports a server's :class:`Metrics` and live figures through prometheus_client."""

    def __init__(self, server: Server, metrics: Metrics, worker: int = 0) -> None:
        self.server = server
        self.metrics = metrics
        self.worker = worker

    def collect(self) -> Iterable[Metric]:
        server, m = self.server, self.metrics
        info = GaugeMetricFamily("acqhost_info", "This host process: 1, its labels say which",
                                 labels=("worker", "pid", "backend"))  # fmt: skip
        info.add_metric((str(self.worker), str(os.getpid()), server.config.backend), 1)
        yield info
        yield _gauge("acqhost_start_time_seconds", "When this process started (Unix time)",
                     m.started)  # fmt: skip
        yield _counter("acqhost_requests_total", "Requests answered, by MTI and field 39",
                       ("mti", "rc"), m.requests)  # fmt: skip
        yield CounterMetricFamily("acqhost_requests_unanswered_total",
                                  "Frames that could not be decoded far enough for an answer",
                                  value=m.unreadable)  # fmt: skip
        latency = HistogramMetricFamily(
            "acqhost_request_latency_seconds",
            "Seconds from a request's arrival to its answer, by MTI (sales: after the commit)",
            labels=("mti",),
        )
        for mti, histogram in sorted(m.latency.items()):
            latency.add_metric((mti,), histogram.cumulative(), histogram.sum)
        yield latency
        connections = server.connections
        yield _gauge("acqhost_connections_open", "Terminal connections open now",
                     len(connections.open))  # fmt: skip
        yield _counter("acqhost_connections_refused_total", "Connections refused, by reason",
                       ("reason",), {(k,): v for k, v in connections.refused.items()})  # fmt: skip
        failed: dict[tuple[str, ...], int] = {
            (k,): v for k, v in connections.handshakes_failed.items()
        }
        yield _counter("acqhost_tls_handshakes_failed_total",
                       "TLS handshakes that did not complete ([tls]), by kind: timeout, error "
                       "(not TLS, certificate refused), closed (the peer went away)",
                       ("kind",), failed)  # fmt: skip
        ledger = server.ledger
        yield _gauge("acqhost_ledger_queue", "Writes queued for the ledger now", ledger.backlog)
        yield CounterMetricFamily("acqhost_ledger_writes_total", "Writes made durable",
                                  value=ledger.written)  # fmt: skip
        commits = HistogramMetricFamily(
            "acqhost_ledger_commit_seconds", "Seconds of one ledger flush (one group commit)"
        )
        commits.add_metric((), m.commits.cumulative(), m.commits.sum)
        yield commits
        yield _counter("acqhost_security_events_total",
                       "Requests answered 63 (bad or missing MAC, bad signature...), by reason",
                       ("reason",), {(k,): v for k, v in m.security.items()})  # fmt: skip
        yield _counter("acqhost_sign_ons_refused_total", "Sign-ons not answered 00, by reason",
                       ("reason",), {(k,): v for k, v in m.sign_ons_refused.items()})  # fmt: skip
        yield from self._bank_links()

    def _bank_links(self) -> Iterable[Metric]:
        m = self.metrics
        yield _gauge("acqhost_store_up", "1 when the store answered the last scrape's query",
                     1 if m.store_up else 0)  # fmt: skip
        if m.bank_links is None:
            return
        families = (
            ("acqhost_bank_backlog", "Advices waiting for delivery to the bank", "queued"),
            ("acqhost_bank_oldest_advice_age_seconds",
             "Seconds the bank's oldest waiting advice has waited", "oldest_age"),
            ("acqhost_bank_retrying", "Waiting advices that have failed at least once",
             "retrying"),
            ("acqhost_bank_dead_letters", "Advices dead-lettered, not yet retried", "dead"),
        )  # fmt: skip
        for name, doc, attribute in families:
            family = GaugeMetricFamily(name, doc, labels=("bank",))
            for status in m.bank_links:
                family.add_metric((status.bank,), float(getattr(status, attribute)))
            yield family
