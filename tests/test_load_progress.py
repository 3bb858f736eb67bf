"""acqhost-load's live progress line: plain lines off a terminal, nothing when disabled, and a
line redrawn in place (and erased at the end) on a terminal."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from simulators.load.progress import MEASURING, WARM_UP, Progress, Snapshot, format_line

SNAP = Snapshot(
    elapsed=12.0,
    planned=30.0,
    rate=1_234.4,
    in_flight=64,
    answered=14_800,
    errors=0,
    timeouts=0,
    p99_us=4_210,
    phase=MEASURING,
)
LINE = (
    "measuring 12.0/30 s  rate 1,234/s  in flight 64  answered 14,800  errors 0  timeouts 0"
    "  p99 (last s) 4.21 ms"
)


def snaps() -> list[Snapshot]:
    return [
        Snapshot(0.5, None, 0.0, 0, 0, 0, 0, None, WARM_UP),
        Snapshot(1.5, 2.5, 9_876.5, 1_024, 123_456, 3, 7, 850, WARM_UP),
        SNAP,
        Snapshot(40.25, 30.0, 10.0, 0, 1_000_000, 0, 0, 2_500_000, MEASURING),
    ]


def test_the_line() -> None:
    assert format_line(SNAP) == LINE
    first, second, _, last = (format_line(s) for s in snaps())
    assert first == (
        "warm-up 0.5 s  rate 0/s  in flight 0  answered 0  errors 0  timeouts 0  p99 (last s) -"
    )
    assert second.startswith("warm-up 1.5/2.5 s  rate 9,876/s  in flight 1,024  answered 123,456")
    assert second.endswith("errors 3  timeouts 7  p99 (last s) 850 us")
    assert last.startswith("measuring 40.2/30 s") and last.endswith("p99 (last s) 2.50 s")


def test_enabled_off_a_terminal_prints_plain_lines() -> None:
    out = io.StringIO()
    progress = Progress(out, enabled=True)
    assert progress.enabled and not progress.in_place
    with progress:
        for snap in snaps():
            progress.update(snap)
    text = out.getvalue()
    assert text.splitlines() == [format_line(s) for s in snaps()]
    assert LINE in text.splitlines()
    assert "\x1b" not in text and "\r" not in text  # no control codes


@pytest.mark.parametrize("enabled", [False, None])  # None: a StringIO is no terminal
def test_disabled_prints_nothing(enabled: bool | None) -> None:
    out = io.StringIO()
    progress = Progress(out, enabled=enabled)
    assert not progress.enabled
    progress.start()
    for snap in snaps():
        progress.update(snap)
    progress.stop()
    progress.stop()
    assert out.getvalue() == ""


def test_on_a_terminal_the_line_is_redrawn_then_erased() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200, color_system="standard")
    progress = Progress(console=console)
    assert progress.enabled and progress.in_place and progress.stream is out
    progress.stop()  # before start: nothing to do
    with progress:
        for snap in snaps():
            progress.update(snap)
    progress.stop()  # twice: nothing more
    text = out.getvalue()
    assert "\x1b[?25l" in text  # cursor hidden while running ...
    assert text.rindex("\x1b[?25h") > text.rindex("\x1b[?25l")  # ... and shown again
    assert text.endswith("\x1b[2K")  # the line erased: the report starts on a clean line
    assert "1,234/s" in text and "14,800" in text and "4.21" in text
    assert text.count("\n") <= 1  # redrawn in place, not a line per update


def test_a_narrow_terminal_and_an_update_without_start() -> None:
    out = io.StringIO()
    progress = Progress(out, enabled=True, console=Console(file=out, force_terminal=True, width=30))
    progress.update(SNAP)  # starts it
    progress.update(SNAP)
    progress.stop()
    assert out.getvalue().endswith("\x1b[2K")


def test_a_dumb_terminal_gets_plain_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "dumb")
    out = io.StringIO()
    progress = Progress(out, enabled=True, console=Console(file=out, force_terminal=True))
    assert not progress.in_place
    progress.update(SNAP)
    assert out.getvalue() == LINE + "\n"
