"""The live progress line of a running load test.

The engine hands ``Progress.update`` a ``Snapshot`` now and then (a few times a second at
most is plenty); it shows as one line (``format_line``), here cut in two::

    measuring 12.0/30 s  rate 1,234/s  in flight 64  answered 14,800
      errors 0  timeouts 0  p99 (last s) 4.21 ms

On a terminal the line is redrawn in place (rich's ``Live``, transient: ``stop`` erases it and
shows the cursor again, so the final report starts on a clean line). Elsewhere, when enabled
explicitly, each update is printed as a plain line, no control codes, for CI logs. Disabled,
every method returns at once. By default it is enabled when the stream is a terminal.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from types import TracebackType
from typing import IO

from rich.console import Console
from rich.live import Live
from rich.text import Text

__all__ = ("MEASURING", "WARM_UP", "Progress", "Snapshot", "format_line")

WARM_UP = "warm-up"
MEASURING = "measuring"


@dataclass(frozen=True)
class Snapshot:
    """Where a run stands. ``elapsed`` and ``planned`` (the run's length, when known) in
    seconds; ``rate`` requests sent per second lately; ``p99_us`` of the last second's answers
    (None: none); ``phase`` ``WARM_UP`` or ``MEASURING``."""

    elapsed: float
    planned: float | None
    rate: float
    in_flight: int
    answered: int
    errors: int
    timeouts: int
    p99_us: int | None
    phase: str


def _latency(us: int | None) -> str:
    if us is None:
        return "-"
    if us < 1_000:
        return f"{us} us"
    if us < 1_000_000:
        return f"{us / 1_000:.2f} ms"
    return f"{us / 1_000_000:.2f} s"


def _fields(snap: Snapshot) -> list[tuple[str, str]]:
    """(label, figure) pairs of the line, the phase and time first."""
    time = f"{snap.elapsed:.1f}"
    time += f"/{snap.planned:g} s" if snap.planned is not None else " s"
    return [
        (snap.phase, time),
        ("rate", f"{snap.rate:,.0f}/s"),
        ("in flight", f"{snap.in_flight:,}"),
        ("answered", f"{snap.answered:,}"),
        ("errors", f"{snap.errors:,}"),
        ("timeouts", f"{snap.timeouts:,}"),
        ("p99 (last s)", _latency(snap.p99_us)),
    ]


def format_line(snap: Snapshot) -> str:
    """The progress line as plain text."""
    return "  ".join(f"{label} {figure}" for label, figure in _fields(snap))


def _styled(snap: Snapshot) -> Text:
    text = Text(no_wrap=True, overflow="ellipsis")
    for i, (label, figure) in enumerate(_fields(snap)):
        if i:
            text.append("  ")
        if i == 0:
            text.append(label, style="yellow" if snap.phase == WARM_UP else "cyan")
        else:
            text.append(label, style="dim")
        style = "bold red" if label in ("errors", "timeouts") and figure != "0" else "bold"
        text.append(" " + figure, style=style)
    return text


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """The progress line on ``stream`` (default: standard error).

    ``enabled``: None shows it only when ``stream`` is a terminal; True shows it anyway (a
    plain line per update when not a terminal); False shows nothing. ``console``: a rich
    Console to draw on instead of ``stream`` (its file is the stream, and its idea of a
    terminal decides). Usable as a context manager: start, then stop.
    """

    def __init__(
        self,
        stream: IO[str] | None = None,
        enabled: bool | None = None,
        *,
        console: Console | None = None,
    ) -> None:
        out: IO[str] = sys.stderr
        if console is not None:
            out = console.file
        elif stream is not None:
            out = stream
        self.stream = out
        if enabled is None:
            enabled = console.is_terminal if console is not None else _is_terminal(out)
        self.enabled = enabled
        self._console: Console | None = None
        self._live: Live | None = None
        if self.enabled and (console is not None or _is_terminal(out)):
            drawn = console or Console(file=out)
            # a terminal that takes cursor moves; otherwise the plain lines
            if drawn.is_terminal and not drawn.is_dumb_terminal:
                self._console = drawn
        self.in_place = self._console is not None  # redrawn in place, not line by line

    def start(self) -> None:
        """Begin showing (idempotent). ``update`` starts it too."""
        if self._console is None or self._live is not None:
            return
        self._live = Live(
            Text(""),
            console=self._console,
            auto_refresh=False,  # redrawn on each update: no refresh thread
            transient=True,
            redirect_stdout=False,  # leave sys.stdout and sys.stderr alone
            redirect_stderr=False,
        )
        self._live.start()

    def update(self, snap: Snapshot) -> None:
        if not self.enabled:
            return
        if self._console is None:
            self.stream.write(format_line(snap) + "\n")
            self.stream.flush()
            return
        if self._live is None:
            self.start()
        if self._live is not None:
            self._live.update(_styled(snap), refresh=True)

    def stop(self) -> None:
        """Stop showing: on a terminal the line is erased and the cursor shown (idempotent)."""
        live, self._live = self._live, None
        if live is not None:
            live.stop()

    def __enter__(self) -> Progress:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
