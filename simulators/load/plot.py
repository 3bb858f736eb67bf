"""``--plot FILE.png``: a run's per-second series as a picture.

Two panels sharing the x axis (seconds of planned send time since the start): requests per
second (sent, answered, timeouts and errors together) and the latency of each second's answers,
p50 / p90 / p99 / max in milliseconds on a log scale. A second where nothing was answered leaves
a gap in the latency lines.

matplotlib is an optional extra (``pip install 'acqhost[plot]'``), imported only when a plot is
asked for; without it ``plot`` raises ``PlotUnavailable``. The figure is drawn with
matplotlib's object API onto its Agg canvas, never through ``pyplot``: no display, no backend
to choose, no global figure state.
"""

from __future__ import annotations

import math
from pathlib import Path

from simulators.load.report import Summary

__all__ = ("INSTALL_HINT", "PlotUnavailable", "plot")

INSTALL_HINT = "--plot needs matplotlib: pip install 'acqhost[plot]'"
WIDTH_IN, HEIGHT_IN, DPI = 10.0, 6.5, 100
# series name -> Second attribute, drawn in this order
LATENCIES = (("p50", "p50_us"), ("p90", "p90_us"), ("p99", "p99_us"), ("max", "max_us"))


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed; the message is one line saying how to install it."""


def plot(summary: Summary, path: str | Path, title: str = "") -> None:
    """Write ``summary``'s per-second series to ``path`` as a PNG (whatever its suffix)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        raise PlotUnavailable(INSTALL_HINT) from None

    series = summary.series
    seconds = [s.second for s in series]
    fig = Figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    rates, latency = fig.subplots(2, 1, sharex=True)
    if title:
        fig.suptitle(title)

    # each second's count drawn across that second: from s to s + 1
    edges = [*seconds, seconds[-1] + 1] if series else []
    counts = (
        ("sent", [s.sent for s in series], "tab:blue"),
        ("answered", [s.answered for s in series], "tab:green"),
        ("timeouts + errors", [s.timeouts + s.errors for s in series], "tab:red"),
    )
    for name, values, color in counts:
        steps = [*values, values[-1]] if values else []
        rates.plot(edges, steps, label=name, drawstyle="steps-post", color=color)
    rates.set_ylabel("requests / s")
    peak = max((s.sent for s in series), default=0)
    rates.set_ylim(0, max(1, peak) * 1.25)  # headroom for the legend
    rates.grid(True, alpha=0.3)

    answered = any(s.answered for s in series)
    middles = [s.second + 0.5 for s in series]  # a second's latency mid-way across it
    for name, attr in LATENCIES:
        ms = [_ms(getattr(s, attr)) for s in series]
        latency.plot(middles, ms, label=name, marker="." if len(series) <= 60 else "")
    latency.set_ylabel("latency (ms)")
    latency.set_xlabel("seconds since the start (planned send time)")
    latency.grid(True, which="both", alpha=0.3)
    if answered:
        latency.set_yscale("log")
        latency.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    else:
        latency.text(
            0.5, 0.5, "nothing answered", ha="center", va="center", transform=latency.transAxes
        )
    if not series:
        rates.text(0.5, 0.5, "no requests", ha="center", va="center", transform=rates.transAxes)
    latency.set_xlim(0, max(seconds, default=0) + 1)
    for ax in (rates, latency):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", fontsize="small", ncols=4)
    fig.savefig(Path(path), format="png", dpi=DPI)


def _ms(us: int | None) -> float:
    return math.nan if us is None else us / 1_000
