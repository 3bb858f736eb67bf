"""Open-loop schedules: the request rate over a run, and the send times it gives.

A schedule is written as one of:

- ``500``: a constant 500 requests per second;
- ``steps:100@10,200@10,400@20``: 100/s for 10 s, then 200/s for 10 s, then 400/s for 20 s
  (the last rate holds if the run is longer);
- ``ramp:100-1000``: a linear ramp from 100/s to 1000/s over the run's length;
- ``file:rates.csv``: a rate file, lines ``SECOND,RATE`` (``#`` comments and blank lines
  allowed), each rate holding from its second until the next line's; the first line at 0.

Arrivals are ``uniform`` (evenly spaced at the current rate) or ``poisson`` (exponential gaps
with the current rate as mean, seeded). Times are seconds from the start of the run.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ("Schedule", "ScheduleError", "arrivals", "parse_schedule")


class ScheduleError(ValueError):
    """A schedule that does not parse; the message is one line."""


@dataclass(frozen=True)
class Schedule:
    """Piecewise rates: ``rates[i]`` from ``starts[i]`` on (``starts[0] == 0``); a ramp is
    linear from ``ramp[0]`` to ``ramp[1]`` over ``length`` seconds instead."""

    text: str
    starts: tuple[float, ...] = (0.0,)
    rates: tuple[float, ...] = (0.0,)
    ramp: tuple[float, float] | None = None

    def scaled(self, factor: float) -> Schedule:
        """The same schedule at ``factor`` times the rate (one process's share of it)."""
        if factor == 1:
            return self
        ramp = None if self.ramp is None else (self.ramp[0] * factor, self.ramp[1] * factor)
        return Schedule(self.text, self.starts, tuple(r * factor for r in self.rates), ramp)

    def rate(self, t: float, length: float) -> float:
        if self.ramp is not None:
            a, b = self.ramp
            return a + (b - a) * min(1.0, max(0.0, t / length)) if length > 0 else a
        return self.rates[bisect.bisect_right(self.starts, t) - 1]

    def next_change(self, t: float) -> float | None:
        """The first time after ``t`` the rate steps (None: it never does again)."""
        i = bisect.bisect_right(self.starts, t)
        return self.starts[i] if self.ramp is None and i < len(self.starts) else None

    def mean(self, length: float) -> float:
        """The average rate over ``length`` seconds."""
        if length <= 0:
            return self.rate(0.0, length)
        if self.ramp is not None:
            return sum(self.ramp) / 2
        total, t = 0.0, 0.0
        while t < length:
            nxt = self.next_change(t)
            until = length if nxt is None else min(nxt, length)
            total += self.rate(t, length) * (until - t)
            t = until
        return total / length


def _rate(text: str, whole: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ScheduleError(f"bad schedule {whole!r}: {text!r} is not a rate") from None
    if not 0 <= value <= 10_000_000 or value != value:
        raise ScheduleError(f"bad schedule {whole!r}: a rate is 0 to 10,000,000 per second")
    return value


def _seconds(text: str, whole: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ScheduleError(f"bad schedule {whole!r}: {text!r} is not seconds") from None
    if not 0 <= value < float("inf"):
        raise ScheduleError(f"bad schedule {whole!r}: seconds are 0 or more")
    return value


def parse_schedule(text: str, base: Path | None = None) -> Schedule:
    """The schedule ``text`` says (module docstring); a rate file's path is relative to
    ``base`` when given. ScheduleError with a one-line message when it is wrong."""
    kind, sep, rest = text.partition(":")
    if not sep:
        return Schedule(text, rates=(_rate(text, text),))
    if kind == "steps":
        starts, rates, t = [], [], 0.0
        for part in rest.split(","):
            rate, at, secs = part.partition("@")
            if not at:
                raise ScheduleError(f"bad schedule {text!r}: a step is RATE@SECONDS")
            starts.append(t)
            rates.append(_rate(rate, text))
            t += _seconds(secs, text)
        return Schedule(text, tuple(starts), tuple(rates))
    if kind == "ramp":
        a, dash, b = rest.partition("-")
        if not dash:
            raise ScheduleError(f"bad schedule {text!r}: a ramp is FROM-TO")
        return Schedule(text, ramp=(_rate(a, text), _rate(b, text)))
    if kind == "file":
        path = Path(rest) if base is None else base / rest
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise ScheduleError(f"rate file {rest}: {exc.strerror or exc}") from None
        starts, rates = [], []
        for n, line in enumerate(lines, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            second, comma, rate = line.partition(",")
            if not comma:
                raise ScheduleError(f"rate file {rest}, line {n}: expected SECOND,RATE")
            start = _seconds(second.strip(), f"{rest}:{n}")
            if starts and start <= starts[-1]:
                raise ScheduleError(f"rate file {rest}, line {n}: seconds must increase")
            starts.append(start)
            rates.append(_rate(rate.strip(), f"{rest}:{n}"))
        if not starts or starts[0] != 0:
            raise ScheduleError(f"rate file {rest}: the first line must be for second 0")
        return Schedule(text, tuple(starts), tuple(rates))
    raise ScheduleError(f"bad schedule {text!r}: expected RATE, steps:, ramp: or file:")


def arrivals(
    schedule: Schedule, length: float, *, poisson: bool = False, seed: int | None = None
) -> Iterator[float]:
    """Send times (seconds from the start) over ``length`` seconds, in order."""
    rng = random.Random(seed)
    t = 0.0
    while t < length:
        rate = schedule.rate(t, length)
        if rate <= 0:
            nxt = schedule.next_change(t)
            if nxt is None:
                return
            t = nxt
            continue
        gap = rng.expovariate(rate) if poisson else 1.0 / rate
        nxt = schedule.next_change(t)
        if nxt is not None and t + gap > nxt and not poisson:
            # uniform: the gap straddles a step; the part after it runs at the new rate
            t = nxt
            continue
        t += gap
        if t < length:
            yield t
