"""acqhost-load --plot: the per-second series as a PNG, and the message without matplotlib."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib.image
import pytest

from simulators.load.plot import INSTALL_HINT, PlotUnavailable, plot
from simulators.load.report import ERROR, TIMEOUT, Recorder, Summary

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def few_seconds() -> Summary:
    """Four seconds: rising rate and latency, second 2 nothing answered, some lost."""
    rec = Recorder()
    for second in range(4):
        for i in range(100 * (second + 1)):
            planned = second + i / (100 * (second + 1))
            rc = "00" if second != 2 else (TIMEOUT if i % 2 else ERROR)
            rec.record(planned, planned + (second + 1) * 0.001 + i * 1e-6, "0200", rc)
    return rec.summary()


def read_back(path: Path) -> tuple[int, ...]:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    return tuple(matplotlib.image.imread(path).shape)


def test_plot_writes_a_png(tmp_path: Path) -> None:
    summary = few_seconds()
    assert summary.series[2].answered == 0 and summary.series[2].p99_us is None
    out = tmp_path / "run.png"
    plot(summary, out, title="4 s, rising")
    height, width, channels = read_back(out)
    assert (height, width) == (650, 1000) and channels in (3, 4)
    plot(summary, str(tmp_path / "named.PLOT"))  # a str path, any suffix: still a PNG
    assert read_back(tmp_path / "named.PLOT")[:2] == (650, 1000)


def test_plot_of_an_empty_run(tmp_path: Path) -> None:
    plot(Recorder().summary(), tmp_path / "empty.png")
    lost = Recorder()
    lost.record(0.5, None, "0200", TIMEOUT)
    plot(lost.summary(), tmp_path / "lost.png")  # requests, but nothing answered
    assert read_back(tmp_path / "empty.png")[:2] == read_back(tmp_path / "lost.png")[:2]


def test_without_matplotlib_a_one_line_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("matplotlib.backends.backend_agg", "matplotlib.figure", "matplotlib.ticker"):
        monkeypatch.setitem(sys.modules, name, None)  # makes the import fail
    with pytest.raises(PlotUnavailable) as err:
        plot(few_seconds(), tmp_path / "run.png")
    assert isinstance(err.value, RuntimeError)
    assert str(err.value) == INSTALL_HINT == "--plot needs matplotlib: pip install 'acqhost[plot]'"
    assert not (tmp_path / "run.png").exists()
