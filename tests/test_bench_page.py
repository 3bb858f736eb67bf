"""benchmarks/page.py collects each benchmark's figures from what the benchmark prints: these
are outputs the benchmarks printed (recorded in benchmarks/README.md), and the figures, baselines
and ratios the page must take from them."""

# ruff: noqa: E501  (the outputs are quoted as the benchmarks print them, wide tables)

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import page

CODEC = """message: 0200, 16 fields, 146 bytes
codec           decode µs  encode µs   both µs
acqhost              2.38       1.25      3.63
pyiso8583           23.00      24.94     47.94
hand-written         2.32       1.03      3.35
pyiso8583 / acqhost     decode    9.7x  encode   19.9x  both   13.2x  (target >= 12x: met)
acqhost / hand-written  decode   1.03x  encode   1.21x  both   1.08x  (target <= 1.25x: met)
"""

E2E = """
loopback, 64 connections x 1 in flight (one terminal a connection), 4 s per measurement, host log level info
target           max TPS   p50 ms   p99 ms  half-rate p50   p99 ms  CPU µs/msg: max   half  x echo
echo             122,322     0.50     0.82                                      5.3       
plain              3,334    18.93    31.05                                    161.2          30.6x
asyncio-1         11,922     4.77    15.02           2.81    10.89             61.0  105.3   11.6x
asyncio-2          9,134     6.61    14.56           4.51    13.16             90.1  168.6   17.1x
asyncio-1-pg       8,743     6.78    18.09           4.28   129.92             63.5  108.1   12.0x  non-00 answers seen: ['96']
asyncio-1:  p99 at half rate 10.89 ms (goal <= 5)  CPU 11.6x the echo server's (goal <= 3x)
asyncio-2:  p99 at half rate 13.16 ms (goal <= 5)  CPU 17.1x the echo server's (goal <= 3x)  0.77x one worker's rate

loopback, 8 connections x 4 in flight (one terminal a connection), 4 s per measurement, host log level info
target           max TPS   p50 ms   p99 ms  half-rate p50   p99 ms  CPU µs/msg: max   half  x echo
echo             234,947     0.12     0.19                                      1.3       
asyncio-1         10,662     2.79     6.71           1.73     9.62             59.6  116.3   47.4x
"""  # noqa: W291

HOSTILE = """
phase                            sales/s   p50 ms   p99 ms  answered  log KiB
baseline                           7,649     7.25    24.66   114,730    27583
attacked                           7,016     6.99    33.09   105,246    26237
baseline after                     9,486     5.42    19.44   142,289    34190
attacked / mean of the baselines: sales/s 0.82x, p50 1.10x, p99 1.50x
"""

LOCUST = """generator                     sales/s  p50 ms  p99 ms  CPU us/sale  gen cores  host cores  other  sales/s by round
locust                          5,335    2.00    9.00           72       0.39        0.56   0.51  4,833, 5,335, 3,799
locust --processes 2            6,339    2.00    8.00           79       0.50        0.62   0.44  8,336, 6,339, 4,615
acqhost-load                    8,591    1.72    4.37           38       0.32        0.71   0.08  8,682, 8,680, 5,208
acqhost-load --processes 2      7,722    1.79    7.99           43       0.33        0.69   0.45  7,722, 8,269, 5,433
"""

PROFILE = """
== 64 connections x 1 in flight (64 terminals) ==
unprofiled: 12,759 sales/s, p50 4.70 ms, p99 10.01 ms, host CPU 60.5 µs/sale
profiled:   8,635 sales/s
echo server: 94,110 messages/s, 3.9 µs/message; acqhost / echo = 15.5x
phase                                             µs/sale   share
logging                                               4.9    8.0%
"""


def by_name(figures: list[page.Figure]) -> dict[tuple[str, str], page.Figure]:
    return {(f.name, f.baseline): f for f in figures}


def test_codec_ratios_are_the_ones_the_benchmark_states() -> None:
    got = by_name(page.parse_codec(CODEC))
    ref = got[("decode + encode a 0200, acqhost", "pyiso8583")]
    hand = got[("decode + encode a 0200, acqhost", "hand-written codec")]
    assert (ref.value, ref.baseline_value, ref.goal) == (3.63, 47.94, ">= 12x")
    assert ref.ratio == pytest.approx(13.2, abs=0.05)  # pyiso8583 over acqhost, as printed
    assert hand.ratio == pytest.approx(1.08, abs=0.005)  # acqhost over hand-written


def test_e2e_figures_per_shape_against_the_echo_server_of_that_shape() -> None:
    got = by_name(page.parse_e2e(E2E))
    cpu = got[("asyncio-1 64x1: host CPU per sale at max rate", "echo server µs/msg")]
    assert (cpu.value, cpu.baseline_value, cpu.goal) == (61.0, 5.3, "<= 3x")
    assert cpu.ratio == pytest.approx(11.5, abs=0.05)
    deep = got[("asyncio-1 8x4: host CPU per sale at max rate", "echo server µs/msg")]
    assert (deep.baseline_value, deep.goal) == (1.3, "<= 8x")
    p99 = got[("asyncio-1-pg 64x1: p99 at half its max rate", "echo server p99 (closed loop)")]
    assert (p99.value, p99.baseline_value) == (129.92, 0.82)  # the non-00 note is not a number
    plain = got[("asyncio-1 64x1: max rate", "plain asyncio + pyiso8583 host")]
    assert plain.ratio == pytest.approx(11_922 / 3_334)
    workers = got[("asyncio-2 64x1: max rate", "asyncio-1 (one worker)")]
    assert workers.ratio == pytest.approx(0.77, abs=0.005)
    assert not any(f.name.startswith(("echo", "plain", "target")) for f in got.values())


def test_hostile_compares_the_attacked_phase_with_the_mean_of_the_others() -> None:
    rate, p99 = page.parse_hostile(HOSTILE)
    assert rate.baseline_value == pytest.approx((7_649 + 9_486) / 2)
    assert rate.ratio == pytest.approx(0.82, abs=0.005)
    assert p99.ratio == pytest.approx(1.50, abs=0.005)


def test_rows_whose_names_begin_alike_are_told_apart() -> None:
    cpu, rate = page.parse_locust(LOCUST)
    assert (cpu.value, cpu.baseline_value) == (38, 72)  # not the --processes 2 rows
    assert (rate.value, rate.baseline_value) == (8_591, 5_335)


def test_profile_takes_each_shape_s_unprofiled_cost_and_echo_floor() -> None:
    (figure,) = page.parse_profile(PROFILE)
    assert (figure.value, figure.baseline_value) == (60.5, 3.9)
    assert figure.name.startswith("64x1")


def test_a_missing_row_is_an_error_not_a_figure() -> None:
    with pytest.raises(KeyError):
        page.parse_codec(CODEC.replace("hand-written ", "hand written "))


def test_scaling_ledger_sizes_are_compared_with_the_smallest_of_the_same_store() -> None:
    def row(store: str, n: int, cpu: float) -> dict[str, object]:
        return {"store": store, "label": str(n), "ledger": n,
                "host": {"cpu_us": cpu, "p99_ms": 9.0}, "echo": {"cpu_us": 4.0, "p99_ms": 0.8}}  # fmt: skip

    data = {"ledger": [row("sqlite", 1000, 60.0), row("sqlite", 10**6, 66.0),
                       row("pg", 1000, 80.0), row("pg", 10**6, 84.0)]}  # fmt: skip
    growth = [f for f in page.scaling_figures(data) if f.goal == "<= 1.2x"]
    assert [(f.name.split()[0], f.ratio) for f in growth] == [
        ("sqlite", pytest.approx(1.1)),
        ("pg", pytest.approx(1.05)),
    ]


def test_the_summary_is_a_markdown_table_with_every_figure_and_step() -> None:
    figures = page.parse_codec(CODEC)
    meta = {"when": "2026-12-06 23:05 UTC", "commit": "abc1234", "python": "3.11.7",
            "machine": "x86_64", "cores": 2, "load_before": 0.1, "load_after": 0.2,
            "minutes": 19.5, "command": "python benchmarks/page.py", "pngs": ["a/b.png"]}  # fmt: skip
    steps = [{"name": "codec", "status": "ok", "seconds": 3.0, "command": "python x"}]
    text = page.markdown(figures, steps, meta, {"codec": CODEC})
    table = [ln for ln in text.splitlines() if ln.startswith("| codec |")]
    assert len(table) == 3  # two figures, one step
    assert "| 3.63 µs | pyiso8583 | 47.9 | 13.21x (pyiso8583 / this) | >= 12x |" in table[0]
    assert "| 1.08x | <= 1.25x |" in table[1]
    assert "![b](a/b.png)" in text
    assert "```\n" + CODEC.strip() + "\n```" in text  # a step's own table, whole


def test_with_postgresql_a_step_s_options_are_replaced_not_repeated() -> None:
    e2e = next(s for s in page.STEPS if s.name == "e2e")
    args = argparse.Namespace(quick=False, pg="postgresql:///postgres")
    argv = page.command(e2e, args, Path("/out"))
    assert argv.count("--only") == 1
    assert argv[argv.index("--only") + 1].endswith("asyncio-1-pg,asyncio-1-native-pg,asyncio-2-pg")
    assert argv[argv.index("--pg") + 1] == "postgresql:///postgres"
    args.pg = None
    assert "--pg" not in page.command(e2e, args, Path("/out"))


@pytest.mark.parametrize("step", page.STEPS, ids=lambda s: s.name)
def test_every_option_the_page_passes_is_one_its_benchmark_takes(step: page.Step) -> None:
    source = (page.ROOT / "benchmarks" / step.script).read_text()
    taken = set(re.findall(r"add_argument\(\s*\"(--[a-z-]+)\"", source))
    given = {a for a in [*step.full, *step.quick, *step.pg, *(step.pg_quick or [])]
             if a.startswith("--")}  # fmt: skip
    assert given and given <= taken, given - taken
