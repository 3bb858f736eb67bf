"""Open-loop schedules (simulators/load/schedule.py): the forms a rate is written in, the send
times they give, and one-line errors."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from simulators.load.schedule import Schedule, ScheduleError, arrivals, parse_schedule


def count(schedule: Schedule, length: float) -> int:
    return sum(1 for _ in arrivals(schedule, length))


def test_a_constant_rate_sends_evenly() -> None:
    times = list(arrivals(parse_schedule("200"), 2.0))
    assert len(times) == pytest.approx(400, abs=1)
    gaps = {round(b - a, 9) for a, b in itertools.pairwise(times)}
    assert gaps == {0.005}
    assert all(0 < t < 2.0 for t in times) and times == sorted(times)


def test_steps_hold_each_rate_for_its_seconds_and_the_last_one_after() -> None:
    schedule = parse_schedule("steps:100@1,300@1,50@1")
    assert schedule.starts == (0.0, 1.0, 2.0) and schedule.rates == (100.0, 300.0, 50.0)
    times = list(arrivals(schedule, 5.0))
    per_second = [sum(1 for t in times if s <= t < s + 1) for s in range(5)]
    assert per_second == [pytest.approx(n, abs=1) for n in (100, 300, 50, 50, 50)]
    assert schedule.mean(3.0) == pytest.approx(150)


def test_a_zero_step_sends_nothing_for_its_time() -> None:
    times = list(arrivals(parse_schedule("steps:0@1,100@1"), 2.0))
    assert times and min(times) >= 1.0
    assert len(times) == pytest.approx(100, abs=1)


def test_a_ramp_goes_linearly_over_the_run() -> None:
    schedule = parse_schedule("ramp:100-300")
    assert schedule.rate(0, 4) == 100 and schedule.rate(2, 4) == 200 and schedule.rate(4, 4) == 300
    assert schedule.mean(4) == 200
    times = list(arrivals(schedule, 4.0))
    assert len(times) == pytest.approx(800, rel=0.02)
    first, last = (sum(1 for t in times if s <= t < s + 1) for s in (0, 3))
    assert first == pytest.approx(125, rel=0.05) and last == pytest.approx(275, rel=0.05)


def test_a_rate_file_relative_to_its_base(tmp_path: Path) -> None:
    (tmp_path / "rates.csv").write_text("# second,rate\n0,100\n\n2, 400  # the peak\n3,0\n")
    schedule = parse_schedule("file:rates.csv", tmp_path)
    assert schedule.starts == (0.0, 2.0, 3.0) and schedule.rates == (100.0, 400.0, 0.0)
    times = list(arrivals(schedule, 10.0))
    assert len(times) == pytest.approx(600, abs=2) and max(times) < 3.0


def test_poisson_arrivals_are_seeded_with_the_rate_as_mean() -> None:
    schedule = parse_schedule("500")
    a = list(arrivals(schedule, 4.0, poisson=True, seed=9))
    b = list(arrivals(schedule, 4.0, poisson=True, seed=9))
    c = list(arrivals(schedule, 4.0, poisson=True, seed=10))
    assert a == b != c
    assert len(a) == pytest.approx(2000, rel=0.1)
    gaps = [y - x for x, y in itertools.pairwise(a)]
    assert len(set(gaps)) > len(gaps) // 2  # not evenly spaced
    assert a == sorted(a)


def test_a_share_of_a_schedule_scales_its_rates() -> None:
    for text in ("300", "steps:100@1,300@1", "ramp:100-300"):
        whole, half = parse_schedule(text), parse_schedule(text).scaled(0.5)
        assert half.mean(2) == pytest.approx(whole.mean(2) / 2)
        assert count(whole, 2) == pytest.approx(2 * count(half, 2), rel=0.02)
    same = parse_schedule("300")
    assert same.scaled(1) is same


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("fast", "'fast' is not a rate"),
        ("-5", "a rate is 0 to 10,000,000"),
        ("nan", "a rate is 0 to 10,000,000"),
        ("20000000", "a rate is 0 to 10,000,000"),
        ("steps:100", "a step is RATE@SECONDS"),
        ("steps:100@x", "'x' is not seconds"),
        ("steps:100@-1", "seconds are 0 or more"),
        ("ramp:100", "a ramp is FROM-TO"),
        ("ramp:a-b", "is not a rate"),
        ("burst:100", "expected RATE, steps:, ramp: or file:"),
        ("file:nowhere.csv", "rate file nowhere.csv"),
    ],
)
def test_a_bad_schedule_is_one_line_naming_it(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ScheduleError) as exc:
        parse_schedule(text, tmp_path)
    assert words in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("1,100\n", "the first line must be for second 0"),
        ("", "the first line must be for second 0"),
        ("0,100\n0,200\n", "line 2: seconds must increase"),
        ("0,100\n5\n", "line 2: expected SECOND,RATE"),
        ("0,lots\n", "is not a rate"),
    ],
)
def test_a_bad_rate_file_is_one_line_naming_it(tmp_path: Path, content: str, words: str) -> None:
    (tmp_path / "rates.csv").write_text(content)
    with pytest.raises(ScheduleError) as exc:
        parse_schedule("file:rates.csv", tmp_path)
    assert words in str(exc.value) and "\n" not in str(exc.value)


def test_a_schedule_keeps_its_text() -> None:
    assert parse_schedule("steps:1@1").text == "steps:1@1"
    assert Schedule("x").rate(5, 10) == 0.0
    assert list(arrivals(parse_schedule("0"), 5)) == []
