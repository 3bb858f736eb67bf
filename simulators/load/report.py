"""Load reports: a recorder of every request's outcome, its summary, and the ways to print it.

``Recorder.record`` takes one request: the time it was *planned* to leave, the time its answer
came (or ``None``), its MTI and the answer's response code, or ``TIMEOUT`` / ``ERROR``. Latency
counts from the planned time, not from the moment the request actually left, so that a
generator held back by a slow target still charges the wait to the target (no coordinated
omission). Latencies go into an HdrHistogram in microseconds, 1 us to 60 s, 3 significant
digits; longer ones are recorded as 60 s, shorter ones as 1 us. Timeouts and errors are
counted but have no latency.

Each request counts once in ``sent`` and once in exactly one of ``answered``, ``timeouts`` and
``errors``, so ``sent == answered + timeouts + errors`` always holds. The per-second series
files requests under the second of their planned time (seconds since the recorder's start) and
gives that second's p50, p90, p99 and max from a histogram with 2 significant digits (to save
memory).

A generator that keeps its own tallies adds them in bulk, one call per second and outcome:
``Recorder.record_answers`` takes a second's latencies as ``{latency_us: count}`` with the counts
per MTI and response code, ``Recorder.record_lost`` its timeouts or errors per MTI. The result
is the same as recording those requests one by one.

Several processes merge exactly: ``Recorder.export`` gives a JSON-able dict whose histograms
are HdrHistogram's encoded form, ``Recorder.from_export`` and ``Recorder.merge`` add them up;
``merge`` does the same for bare encoded histograms.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]  # no types shipped

__all__ = (
    "CSV_COLUMNS",
    "ERROR",
    "HIGHEST_US",
    "LOWEST_US",
    "PERCENTILES",
    "SIGNIFICANT_DIGITS",
    "TIMEOUT",
    "Recorder",
    "Second",
    "Summary",
    "format_us",
    "merge",
    "new_histogram",
    "render_csv",
    "render_json",
    "render_table",
)

LOWEST_US = 1
HIGHEST_US = 60_000_000
SIGNIFICANT_DIGITS = 3
SECOND_DIGITS = 2  # the per-second histograms
TIMEOUT = "timeout"
ERROR = "error"
# name in the summary -> percentile
PERCENTILES: dict[str, float] = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99.9": 99.9}


def new_histogram(digits: int = SIGNIFICANT_DIGITS) -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, digits)


def _decode(encoded: bytes | str) -> HdrHistogram:
    return HdrHistogram.decode(encoded.encode() if isinstance(encoded, str) else encoded)


def merge(encoded_histograms: Iterable[bytes | str]) -> HdrHistogram:
    """One histogram holding every value of the encoded ones (``HdrHistogram.encode()``): the
    counts add up bucket by bucket, so the result is exactly the histogram of all values."""
    total = new_histogram()
    for encoded in encoded_histograms:
        total.add(_decode(encoded))
    return total


def _us(seconds: float) -> int:
    return _clamp(round(seconds * 1_000_000))


def _clamp(us: int) -> int:
    return min(HIGHEST_US, max(LOWEST_US, us))


@dataclass
class _Bucket:
    sent: int = 0
    answered: int = 0
    timeouts: int = 0
    errors: int = 0
    histogram: HdrHistogram = field(default_factory=lambda: new_histogram(SECOND_DIGITS))


@dataclass(frozen=True)
class Second:
    """One second of the series: requests planned in it and how they ended."""

    second: int
    sent: int
    answered: int
    timeouts: int
    errors: int
    # latency of that second's answers, from a 2-digit histogram; None when nothing answered
    p50_us: int | None
    p90_us: int | None
    p99_us: int | None
    max_us: int | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "second": self.second,
            "sent": self.sent,
            "answered": self.answered,
            "timeouts": self.timeouts,
            "errors": self.errors,
            "p50_us": self.p50_us,
            "p90_us": self.p90_us,
            "p99_us": self.p99_us,
            "max_us": self.max_us,
        }


@dataclass(frozen=True)
class Summary:
    """The final figures. Latencies in microseconds (``None`` when nothing was answered);
    ``throughput`` is answers per second over ``duration`` seconds."""

    duration: float
    sent: int
    answered: int
    timeouts: int
    errors: int
    latency_us: dict[str, int | float | None]  # p50, p90, p99, p99.9, max, mean
    by_mti: dict[str, int]
    by_rc: dict[str, int]  # response codes, and "timeout" / "error"
    series: list[Second]

    @property
    def throughput(self) -> float:
        return self.answered / self.duration if self.duration > 0 else 0.0

    @property
    def rate(self) -> float:
        """Requests sent per second."""
        return self.sent / self.duration if self.duration > 0 else 0.0

    def share(self, count: int) -> float:
        """``count`` as a percentage of ``sent`` (0 when nothing was sent)."""
        return 100.0 * count / self.sent if self.sent else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "duration_s": self.duration,
            "sent": self.sent,
            "answered": self.answered,
            "timeouts": self.timeouts,
            "errors": self.errors,
            "throughput_per_s": round(self.throughput, 3),
            "latency_us": dict(self.latency_us),
            "by_mti": dict(self.by_mti),
            "by_rc": dict(self.by_rc),
            "series": [s.as_dict() for s in self.series],
        }


class Recorder:
    """Collects the outcome of every request of a run (or of one process of it)."""

    def __init__(self, start: float = 0.0) -> None:
        self.start = start  # the series counts seconds from here (same clock as record's)
        self.histogram = new_histogram()
        self.sent = 0
        self.answered = 0
        self.timeouts = 0
        self.errors = 0
        self.by_mti: Counter[str] = Counter()
        self.by_rc: Counter[str] = Counter()
        self._seconds: dict[int, _Bucket] = {}

    def _bucket(self, planned: float) -> _Bucket:
        return self._bucket_at(math.floor(planned - self.start))

    def _bucket_at(self, second: int) -> _Bucket:
        second = max(0, second)
        bucket = self._seconds.get(second)
        if bucket is None:
            bucket = self._seconds[second] = _Bucket()
        return bucket

    def record(self, planned: float, answered: float | None, mti: str, rc: str) -> None:
        """One request planned for ``planned`` (seconds, the clock of ``start``), answered at
        ``answered`` with response code ``rc``; or ``rc`` is ``TIMEOUT`` or ``ERROR`` (then
        ``answered`` is ignored). ``mti`` is the request's."""
        bucket = self._bucket(planned)
        self.sent += 1
        bucket.sent += 1
        self.by_mti[mti] += 1
        self.by_rc[rc] += 1
        if rc == TIMEOUT:
            self.timeouts += 1
            bucket.timeouts += 1
        elif rc == ERROR:
            self.errors += 1
            bucket.errors += 1
        else:
            if answered is None:
                raise ValueError("an answered request needs its answer time")
            latency = _us(answered - planned)
            self.histogram.record_value(latency)
            bucket.histogram.record_value(latency)
            self.answered += 1
            bucket.answered += 1

    def record_answers(
        self,
        second: int,
        latencies_us: Mapping[int, int],
        by_mti: Mapping[str, int],
        by_rc: Mapping[str, int],
    ) -> None:
        """Answered requests planned in ``second`` (counted from ``start``, as the series):
        ``latencies_us`` maps a latency in microseconds to how many requests had it (clamped
        as ``record`` does); ``by_mti`` and ``by_rc`` count the same requests per request MTI
        and per response code (not ``TIMEOUT`` / ``ERROR``: ``record_lost`` takes those).
        ``ValueError`` when the three totals differ."""
        total = sum(latencies_us.values())
        if sum(by_mti.values()) != total or sum(by_rc.values()) != total:
            raise ValueError("latencies, MTIs and response codes must count the same requests")
        if TIMEOUT in by_rc or ERROR in by_rc:
            raise ValueError("timeouts and errors go to record_lost")
        if total == 0:
            return
        bucket = self._bucket_at(second)
        for latency, count in latencies_us.items():
            if count:
                value = _clamp(latency)
                self.histogram.record_value(value, count)
                bucket.histogram.record_value(value, count)
        self.sent += total
        self.answered += total
        bucket.sent += total
        bucket.answered += total
        _add(self.by_mti, by_mti)
        _add(self.by_rc, by_rc)

    def record_lost(self, second: int, mti_counts: Mapping[str, int], kind: str) -> None:
        """Requests planned in ``second`` that timed out (``kind`` ``TIMEOUT``) or failed
        (``ERROR``), counted per request MTI."""
        if kind not in (TIMEOUT, ERROR):
            raise ValueError(f"kind is {TIMEOUT!r} or {ERROR!r}, not {kind!r}")
        total = sum(mti_counts.values())
        if total == 0:
            return
        bucket = self._bucket_at(second)
        self.sent += total
        bucket.sent += total
        if kind == TIMEOUT:
            self.timeouts += total
            bucket.timeouts += total
        else:
            self.errors += total
            bucket.errors += total
        _add(self.by_mti, mti_counts)
        self.by_rc[kind] += total

    def encode(self) -> bytes:
        """The latency histogram, HdrHistogram-encoded (base64 of the compressed form)."""
        return bytes(self.histogram.encode())

    def merge(self, other: Recorder) -> None:
        """Add ``other``'s requests to this one's (same start assumed): exact."""
        self.histogram.add(other.histogram)
        self.sent += other.sent
        self.answered += other.answered
        self.timeouts += other.timeouts
        self.errors += other.errors
        self.by_mti.update(other.by_mti)
        self.by_rc.update(other.by_rc)
        for second, theirs in other._seconds.items():
            ours = self._seconds.setdefault(second, _Bucket())
            ours.sent += theirs.sent
            ours.answered += theirs.answered
            ours.timeouts += theirs.timeouts
            ours.errors += theirs.errors
            ours.histogram.add(theirs.histogram)

    def export(self) -> dict[str, Any]:
        """Everything recorded, JSON-able, for another process to merge (``from_export``)."""
        return {
            "start": self.start,
            "histogram": self.encode().decode(),
            "sent": self.sent,
            "answered": self.answered,
            "timeouts": self.timeouts,
            "errors": self.errors,
            "by_mti": dict(self.by_mti),
            "by_rc": dict(self.by_rc),
            "seconds": {
                str(s): [b.sent, b.answered, b.timeouts, b.errors, b.histogram.encode().decode()]
                for s, b in sorted(self._seconds.items())
            },
        }

    @classmethod
    def from_export(cls, data: Mapping[str, Any]) -> Recorder:
        rec = cls(float(data["start"]))
        rec.histogram.add(_decode(data["histogram"]))
        rec.sent = int(data["sent"])
        rec.answered = int(data["answered"])
        rec.timeouts = int(data["timeouts"])
        rec.errors = int(data["errors"])
        rec.by_mti.update({str(k): int(v) for k, v in data["by_mti"].items()})
        rec.by_rc.update({str(k): int(v) for k, v in data["by_rc"].items()})
        for second, (sent, answered, timeouts, errors, encoded) in data["seconds"].items():
            bucket = _Bucket(int(sent), int(answered), int(timeouts), int(errors))
            bucket.histogram.add(_decode(encoded))
            rec._seconds[int(second)] = bucket
        return rec

    def series(self) -> list[Second]:
        """Every second from 0 to the last one with a request (empty seconds included)."""
        if not self._seconds:
            return []
        out = []
        for second in range(max(self._seconds) + 1):
            b = self._seconds.get(second) or _Bucket()
            latency: list[int | None] = [None] * 4
            if b.answered:
                h = b.histogram
                latency = [int(h.get_value_at_percentile(p)) for p in (50.0, 90.0, 99.0)]
                latency.append(int(h.get_max_value()))
            out.append(Second(second, b.sent, b.answered, b.timeouts, b.errors, *latency))
        return out

    def summary(self, duration: float | None = None) -> Summary:
        """The figures; ``duration`` (s) defaults to the seconds the series spans."""
        series = self.series()
        if duration is None:
            duration = float(len(series))
        h = self.histogram
        latency: dict[str, int | float | None]
        if self.answered:
            latency = {k: int(h.get_value_at_percentile(p)) for k, p in PERCENTILES.items()}
            latency["max"] = int(h.get_max_value())
            latency["mean"] = round(float(h.get_mean_value()), 1)
        else:
            latency = dict.fromkeys([*PERCENTILES, "max", "mean"])
        return Summary(
            duration=duration,
            sent=self.sent,
            answered=self.answered,
            timeouts=self.timeouts,
            errors=self.errors,
            latency_us=latency,
            by_mti=dict(sorted(self.by_mti.items())),
            by_rc=dict(sorted(self.by_rc.items())),
            series=series,
        )


def _add(counter: Counter[str], counts: Mapping[str, int]) -> None:
    """``counter.update(counts)`` without the zero counts (``record`` never adds a zero)."""
    for key, count in counts.items():
        if count:
            counter[key] += count


def format_us(us: int | float | None) -> str:
    """A latency in µs as the reports print it: ``850 us``, ``4.210 ms``, ``1.500 s``."""
    if us is None:
        return "-"
    if us < 1_000:
        return f"{us:g} us"
    if us < 1_000_000:
        return f"{us / 1_000:.3f} ms"
    return f"{us / 1_000_000:.3f} s"


def _rows(title: str, rows: list[tuple[str, ...]]) -> list[str]:
    """``title``, then the rows indented: the first column left-aligned, the others right."""
    if not rows:
        return [title, "  -"]
    widths = [max(len(r[i]) if i < len(r) else 0 for r in rows) for i in range(len(rows[0]))]
    out = [title]
    for row in rows:
        cells = [f"{row[0]:<{widths[0]}}"]
        cells += [f"{c:>{w}}" for c, w in zip(row[1:], widths[1:], strict=False)]
        out.append(("  " + "  ".join(cells)).rstrip())
    return out


def render_table(summary: Summary) -> str:
    """The final report as aligned plain text (ends with a newline)."""
    s = summary

    def counted(name: str, n: int) -> tuple[str, str, str]:
        return (name, str(n), f"{s.share(n):.2f}%")

    lines = _rows(
        "requests",
        [
            ("sent", str(s.sent), ""),
            counted("answered", s.answered),
            counted("timeouts", s.timeouts),
            counted("errors", s.errors),
            ("duration", f"{s.duration:.3f} s", ""),
            ("throughput", f"{s.throughput:.1f}/s", ""),
        ],
    )
    lines.append("")
    lines += _rows(
        "latency (from the planned send time)",
        [(k, format_us(v)) for k, v in s.latency_us.items()],
    )
    lines.append("")
    lines += _rows("per MTI", [counted(k, v) for k, v in s.by_mti.items()])
    lines.append("")
    lines += _rows("per response code", [counted(k, v) for k, v in s.by_rc.items()])
    return "\n".join(lines) + "\n"


def render_json(summary: Summary) -> str:
    """The summary, per-second series included, as one JSON object (ends with a newline)."""
    return json.dumps(summary.as_dict(), indent=2) + "\n"


CSV_COLUMNS = (
    "second",
    "sent",
    "answered",
    "timeouts",
    "errors",
    "p50_us",
    "p90_us",
    "p99_us",
    "max_us",
)


def render_csv(summary: Summary) -> str:
    """The per-second series as CSV with a header line; empty latencies when nothing answered."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for s in summary.series:
        row = s.as_dict()
        writer.writerow(["" if row[c] is None else row[c] for c in CSV_COLUMNS])
    return out.getvalue()
