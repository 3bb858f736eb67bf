"""``--fail-if`` thresholds: conditions on a run's Summary that make it fail, for CI.

A threshold is ``METRIC OP VALUE`` (spaces optional), OP one of ``>``, ``>=``, ``<``, ``<=``;
the run fails when the condition holds:

- latency, ``p50``, ``p90``, ``p99``, ``p99.9``, ``max`` or ``mean``, with a unit ``us``, ``ms``
  or ``s``: ``p99>5ms``, ``max >= 1.5s``. With nothing answered a latency threshold fails;
- ``errors`` or ``timeouts``: a count (``errors>0``) or a percentage of the requests sent
  (``errors>0.1%``);
- ``rate``: answers per second over the run (``rate<500``, ``rate < 500/s``).

Exit codes for the command that checks them: ``EXIT_OK`` (0) all held, ``EXIT_USAGE`` (2) a bad
expression or other usage error, ``EXIT_FAILED`` (3) at least one threshold failed.
"""

from __future__ import annotations

import argparse
import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from simulators.load.report import PERCENTILES, Summary, format_us

__all__ = (
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "Failure",
    "Threshold",
    "ThresholdError",
    "argparse_type",
    "evaluate",
    "parse",
)

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_FAILED = 3

LATENCY = (*PERCENTILES, "max", "mean")
COUNTS = ("errors", "timeouts")
UNITS_US = {"us": 1.0, "ms": 1_000.0, "s": 1_000_000.0}
OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}
_EXPR = re.compile(
    r"^\s*(?P<metric>[a-z][a-z0-9.]*)\s*(?P<op>>=|<=|>|<)\s*"
    r"(?P<number>\d+(?:\.\d+)?|\.\d+)\s*(?P<unit>[a-z%/]*)\s*$"
)


class ThresholdError(ValueError):
    """A threshold expression that does not parse; the message is one line."""


@dataclass(frozen=True)
class Failure:
    threshold: Threshold
    reason: str  # one line: "p99>5ms: p99 is 7.200 ms"


@dataclass(frozen=True)
class Threshold:
    text: str  # as given
    metric: str  # p50 ... mean, errors, timeouts, rate
    op: str
    value: float  # microseconds for latency, a count, a percentage or a rate
    percent: bool = False  # errors / timeouts given as a share of the requests sent

    def actual(self, summary: Summary) -> float | None:
        """The summary's figure in this threshold's terms (None: a latency with no answers)."""
        if self.metric in LATENCY:
            value = summary.latency_us[self.metric]
            return None if value is None else float(value)
        if self.metric == "rate":
            return summary.throughput
        count = summary.errors if self.metric == "errors" else summary.timeouts
        return summary.share(count) if self.percent else float(count)

    def check(self, summary: Summary) -> Failure | None:
        actual = self.actual(summary)
        if actual is None:
            return Failure(self, f"{self.text}: no answers, so no {self.metric}")
        if not OPS[self.op](actual, self.value):
            return None
        return Failure(self, f"{self.text}: {self.metric} is {self._show(actual)}")

    def _show(self, actual: float) -> str:
        if self.metric in LATENCY:
            return format_us(actual)
        if self.metric == "rate":
            return f"{actual:.1f}/s"
        return f"{actual:.3f}%" if self.percent else f"{actual:g}"


def parse(text: str) -> Threshold:
    """One ``--fail-if`` expression; ``ThresholdError`` with a one-line message when bad."""
    m = _EXPR.match(text)
    if m is None:
        raise ThresholdError(f"bad threshold {text!r}: expected METRIC OP VALUE, e.g. 'p99>5ms'")
    metric, op, number, unit = m["metric"], m["op"], float(m["number"]), m["unit"]
    if metric in LATENCY:
        if unit not in UNITS_US:
            raise ThresholdError(f"bad threshold {text!r}: {metric} needs a unit: us, ms or s")
        return Threshold(text, metric, op, number * UNITS_US[unit])
    if metric in COUNTS:
        if unit not in ("", "%"):
            raise ThresholdError(f"bad threshold {text!r}: {metric} is a count or N%")
        if unit == "" and not number.is_integer():
            raise ThresholdError(f"bad threshold {text!r}: a count is a whole number")
        return Threshold(text, metric, op, number, percent=unit == "%")
    if metric == "rate":
        if unit not in ("", "/s"):
            raise ThresholdError(f"bad threshold {text!r}: rate is per second: N or N/s")
        return Threshold(text, metric, op, number)
    known = ", ".join((*LATENCY, *COUNTS, "rate"))
    raise ThresholdError(f"bad threshold {text!r}: unknown metric {metric!r} (one of {known})")


def argparse_type(text: str) -> Threshold:
    """``parse`` for ``argparse`` (``type=``): a bad expression is a usage error, exit 2."""
    try:
        return parse(text)
    except ThresholdError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def evaluate(thresholds: Iterable[Threshold], summary: Summary) -> list[Failure]:
    """The thresholds that failed, in the order given (empty: the run passes)."""
    return [f for f in (t.check(summary) for t in thresholds) if f is not None]
