"""The load report: recorder, summary, merge across processes, renderers and thresholds."""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
from collections import Counter

import pytest

from simulators.load.report import (
    CSV_COLUMNS,
    ERROR,
    HIGHEST_US,
    TIMEOUT,
    Recorder,
    Second,
    Summary,
    merge,
    render_csv,
    render_json,
    render_table,
)
from simulators.load.thresholds import (
    EXIT_FAILED,
    EXIT_USAGE,
    ThresholdError,
    argparse_type,
    evaluate,
    parse,
)


def within(actual: float | int | None, expected: float) -> bool:
    """3 significant digits: HdrHistogram's values are within 0.1% of the true ones."""
    assert actual is not None
    return abs(actual - expected) <= expected * 0.001 + 1


def latencies(n: int, seed: int) -> list[tuple[float, float, str, str]]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        planned = i / 1000
        rc = rnd.choice(["00", "00", "00", "05", "51", TIMEOUT, ERROR])
        mti = rnd.choice(["0200", "0400", "0800"])
        out.append((planned, planned + rnd.lognormvariate(-6, 1.5), mti, rc))
    return out


def test_percentiles_of_known_samples() -> None:
    rec = Recorder()
    for us in range(1, 10_001):  # 1 us .. 10 ms, one each
        rec.record(0.0, us / 1_000_000, "0200", "00")
    lat = rec.summary().latency_us
    assert within(lat["p50"], 5_000)
    assert within(lat["p90"], 9_000)
    assert within(lat["p99"], 9_900)
    assert within(lat["p99.9"], 9_990)
    assert within(lat["max"], 10_000)
    assert within(lat["mean"], 5_000.5)


def test_latency_counts_from_the_planned_time_and_is_clamped() -> None:
    rec = Recorder(start=100.0)
    rec.record(100.0, 100.25, "0200", "00")  # planned at 100, left late: 250 ms still
    rec.record(100.5, 100.5, "0200", "00")  # 0 us: recorded as the lowest, 1 us
    rec.record(100.5, 200.5, "0200", "00")  # 100 s: recorded as the highest, 60 s
    h = rec.histogram
    assert h.get_total_count() == 3
    assert h.get_min_value() == 1
    assert within(rec.summary().latency_us["max"], 60_000_000)
    assert within(h.get_value_at_percentile(50), 250_000)


def test_an_answer_needs_its_time() -> None:
    with pytest.raises(ValueError):
        Recorder().record(0.0, None, "0200", "00")
    rec = Recorder()
    rec.record(0.0, None, "0200", TIMEOUT)
    rec.record(0.0, None, "0200", ERROR)
    assert rec.histogram.get_total_count() == 0


def test_counts_per_mti_and_rc_and_the_invariant() -> None:
    samples = latencies(5_000, seed=1)
    rec = Recorder()
    for s in samples:
        rec.record(*s)
    summary = rec.summary()
    assert summary.sent == 5_000 == summary.answered + summary.timeouts + summary.errors
    assert summary.timeouts == sum(1 for s in samples if s[3] == TIMEOUT)
    assert summary.errors == sum(1 for s in samples if s[3] == ERROR)
    assert summary.answered == rec.histogram.get_total_count()
    for mti in ("0200", "0400", "0800"):
        assert summary.by_mti[mti] == sum(1 for s in samples if s[2] == mti)
    for rc in ("00", "05", "51", TIMEOUT, ERROR):
        assert summary.by_rc[rc] == sum(1 for s in samples if s[3] == rc)
    assert sum(summary.by_mti.values()) == sum(summary.by_rc.values()) == summary.sent
    assert list(summary.by_rc) == sorted(summary.by_rc)


def test_per_second_series() -> None:
    rec = Recorder(start=10.0)
    for i in range(100):  # second 0: 100 requests, 1 ms each, the last two time out
        rc = TIMEOUT if i >= 98 else "00"
        rec.record(10.0 + i / 100, 10.0 + i / 100 + 0.001, "0200", rc)
    rec.record(12.5, 12.5 + 0.02, "0200", "00")  # second 2; second 1 is empty
    rec.record(12.9, None, "0200", ERROR)
    rec.record(9.0, 9.002, "0200", "00")  # before the start: filed under second 0
    series = rec.summary().series
    assert [s.second for s in series] == [0, 1, 2]
    first = series[0]
    counts = (first.second, first.sent, first.answered, first.timeouts, first.errors)
    assert counts == (0, 101, 99, 2, 0)
    for value in (first.p50_us, first.p90_us, first.p99_us):  # all 1 ms but one 2 ms
        assert value is not None and abs(value - 1_000) <= 10  # 2 digits
    assert first.max_us is not None and abs(first.max_us - 2_000) <= 20
    assert series[1] == Second(1, 0, 0, 0, 0, None, None, None, None)
    assert series[2].sent == 2 and series[2].errors == 1 and series[2].answered == 1
    for value in (series[2].p50_us, series[2].p99_us, series[2].max_us):
        assert value is not None and abs(value - 20_000) <= 200  # 2 digits
    assert sum(s.sent for s in series) == rec.sent
    assert rec.summary().duration == 3.0
    assert rec.summary(duration=2.5).duration == 2.5


def test_merged_histograms_equal_one_recorder_fed_everything() -> None:
    samples = latencies(20_000, seed=2)
    whole, first, second = Recorder(), Recorder(), Recorder()
    for i, s in enumerate(samples):
        whole.record(*s)
        (first if i % 3 else second).record(*s)
    merged = merge([first.encode(), second.encode().decode()])  # bytes or str
    for p in (0, 1, 50, 90, 99, 99.9, 99.99, 100):
        assert merged.get_value_at_percentile(p) == whole.histogram.get_value_at_percentile(p)
    assert merged.get_total_count() == whole.histogram.get_total_count()
    assert merged.get_max_value() == whole.histogram.get_max_value()
    assert merged.get_min_value() == whole.histogram.get_min_value()
    assert merged.get_mean_value() == whole.histogram.get_mean_value()
    assert list(merged.counts) == list(whole.histogram.counts)  # bucket by bucket


def test_recorders_merge_exactly_through_their_export() -> None:
    samples = latencies(10_000, seed=3)
    whole = Recorder()
    parts = [Recorder(), Recorder(), Recorder()]
    for i, s in enumerate(samples):
        whole.record(*s)
        parts[i % 3].record(*s)
    total = Recorder.from_export(json.loads(json.dumps(parts[0].export())))
    for part in parts[1:]:
        total.merge(Recorder.from_export(json.loads(json.dumps(part.export()))))
    assert total.summary() == whole.summary()
    assert total.summary().sent == total.answered + total.timeouts + total.errors


def test_bulk_recording_equals_one_by_one() -> None:
    """What a generator tallies per second and adds with record_answers / record_lost gives
    exactly the export of the same requests recorded one by one."""
    rnd = random.Random(4)
    start = 1_000.0
    one_by_one = Recorder(start)
    answers: dict[int, tuple[Counter[int], Counter[str], Counter[str]]] = {}
    lost: dict[tuple[int, str], Counter[str]] = {}
    for i in range(6_000):
        planned = start + i / 1_500 + rnd.random() / 100  # seconds 0 .. 4
        rc = rnd.choice(["00", "00", "00", "05", "91", TIMEOUT, ERROR])
        mti = rnd.choice(["0200", "0400", "0800"])
        delay = rnd.lognormvariate(-6, 1.5)
        if i == 10:
            delay = 0.0  # recorded as 1 us
        elif i == 20:
            delay = 90.0  # recorded as 60 s
        one_by_one.record(planned, planned + delay, mti, rc)
        second = int(planned - start)
        if rc in (TIMEOUT, ERROR):
            lost.setdefault((second, rc), Counter())[mti] += 1
            continue
        # the latency as the recorder computes it; out of range ones left for it to clamp
        latency = round((planned + delay - planned) * 1_000_000)
        lat, mtis, rcs = answers.setdefault(second, (Counter(), Counter(), Counter()))
        lat[latency] += 1
        mtis[mti] += 1
        rcs[rc] += 1
    assert 0 in answers[0][0] and max(answers[0][0]) > HIGHEST_US  # clamping is exercised
    bulk = Recorder(start)
    for (second, kind), mtis in sorted(lost.items(), reverse=True):  # order does not matter
        bulk.record_lost(second, mtis, kind)
    for second, (lat, mtis, rcs) in answers.items():
        bulk.record_answers(second, lat, mtis, rcs)
    bulk.record_answers(7, {}, {}, {})  # nothing: no second 7
    bulk.record_lost(7, {"0200": 0}, TIMEOUT)
    assert bulk.export() == one_by_one.export()
    assert bulk.summary() == one_by_one.summary()
    assert bulk.summary().sent == 6_000


def test_bulk_recording_checks_its_arguments() -> None:
    rec = Recorder()
    with pytest.raises(ValueError, match="same requests"):
        rec.record_answers(0, {1_000: 2}, {"0200": 2}, {"00": 1})
    with pytest.raises(ValueError, match="same requests"):
        rec.record_answers(0, {1_000: 2}, {"0200": 1}, {"00": 2})
    with pytest.raises(ValueError, match="record_lost"):
        rec.record_answers(0, {1_000: 2}, {"0200": 2}, {"00": 1, TIMEOUT: 1})
    with pytest.raises(ValueError, match="kind"):
        rec.record_lost(0, {"0200": 1}, "00")
    assert rec.export() == Recorder().export()
    rec.record_lost(2, {"0200": 3, "0400": 1}, ERROR)
    rec.record_answers(1, {500: 2, 1_500: 2}, {"0200": 4}, {"00": 3, "05": 1})
    summary = rec.summary()
    assert (summary.sent, summary.answered, summary.errors) == (8, 4, 4)
    assert summary.by_rc == {"00": 3, "05": 1, ERROR: 4}
    assert summary.by_mti == {"0200": 7, "0400": 1}
    assert [s.sent for s in summary.series] == [0, 4, 4]
    assert summary.series[1].max_us is not None and abs(summary.series[1].max_us - 1_500) <= 15


def test_empty_recorder() -> None:
    summary = Recorder().summary()
    assert (summary.sent, summary.answered, summary.series) == (0, 0, [])
    assert all(v is None for v in summary.latency_us.values())
    assert summary.throughput == 0.0 and summary.share(0) == 0.0


def sample_summary() -> Summary:
    rec = Recorder()
    for i in range(1000):
        rc = "00" if i % 10 else (TIMEOUT if i % 20 else ERROR)
        rec.record(i / 500, i / 500 + (i + 1) * 10e-6, "0200" if i % 4 else "0800", rc)
    return rec.summary()


def test_table_shape() -> None:
    text = render_table(sample_summary())
    assert text.endswith("\n")
    lines = text.splitlines()
    assert not any(line != line.rstrip() for line in lines)
    for title in ("requests", "latency (from the planned send time)", "per MTI"):
        assert title in lines
    assert "per response code" in lines
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.startswith("  ")}
    assert rows["sent"] == ["1000"]
    assert rows["answered"] == ["900", "90.00%"]
    assert rows["timeouts"] == ["50", "5.00%"]
    assert rows["errors"] == ["50", "5.00%"]
    assert rows["throughput"] == ["450.0/s"]
    assert rows["0200"] == ["750", "75.00%"] and rows["0800"] == ["250", "25.00%"]
    assert rows["00"] == ["900", "90.00%"] and rows["timeout"] == ["50", "5.00%"]
    assert rows["p99"] == ["9.903", "ms"]
    # the figures of a section end in one column
    section = [line for line in lines if line.startswith("  p")]
    assert len({len(line) for line in section}) == 1
    assert "-" in render_table(Recorder().summary())


def test_json_shape() -> None:
    data = json.loads(render_json(sample_summary()))
    assert data["sent"] == 1000 and data["answered"] == 900
    assert data["throughput_per_s"] == 450.0
    assert set(data["latency_us"]) == {"p50", "p90", "p99", "p99.9", "max", "mean"}
    assert data["by_mti"] == {"0200": 750, "0800": 250}
    assert data["by_rc"] == {"00": 900, "error": 50, "timeout": 50}
    assert data["series"][0] == {
        "second": 0,
        "sent": 500,
        "answered": 450,
        "timeouts": 25,
        "errors": 25,
        "p50_us": data["series"][0]["p50_us"],
        "p90_us": data["series"][0]["p90_us"],
        "p99_us": data["series"][0]["p99_us"],
        "max_us": data["series"][0]["max_us"],
    }
    first = data["series"][0]  # second 0: latencies 10 us .. 5 ms, one per 10 us
    assert first["p50_us"] < first["p90_us"] < first["p99_us"] <= first["max_us"]
    assert abs(first["max_us"] - 5_000) <= 50  # 2 digits


def test_csv_shape() -> None:
    rec = Recorder()
    rec.record(0.1, 0.101, "0200", "00")
    rec.record(2.1, None, "0200", TIMEOUT)
    rows = list(csv.reader(io.StringIO(render_csv(rec.summary()))))
    assert rows[0] == list(CSV_COLUMNS)
    assert rows[0] == [
        "second",
        "sent",
        "answered",
        "timeouts",
        "errors",
        "p50_us",
        "p90_us",
        "p99_us",
        "max_us",
    ]
    assert rows[1][:5] == ["0", "1", "1", "0", "0"]
    assert all(995 <= int(v) <= 1005 for v in rows[1][5:])  # one answer: all its latency
    assert rows[2] == ["1", "0", "0", "0", "0", "", "", "", ""]
    assert rows[3] == ["2", "1", "0", "1", "0", "", "", "", ""]
    assert len(rows) == 4


# thresholds: sample_summary has p99 9.903 ms, max ~10 ms, errors 50 (5%), timeouts 50 (5%),
# 450 answers per second


@pytest.mark.parametrize(
    ("expr", "fails"),
    [
        ("p99>5ms", True),
        ("p99 > 10ms", False),
        ("p50>5000us", True),
        ("p50>6000us", False),
        ("p90>0.009s", True),
        ("p99.9>9.9ms", True),
        ("p99.9>=11ms", False),
        ("max>1s", False),
        ("max>9ms", True),
        ("mean>5ms", True),
        ("mean<1ms", False),
        ("errors>0.1%", True),
        ("errors>5%", False),
        ("errors>=5%", True),
        ("errors>0", True),
        ("errors>50", False),
        ("timeouts>4.9%", True),
        ("timeouts > 100", False),
        ("timeouts<=50", True),
        ("rate<500", True),
        ("rate<400/s", False),
        ("rate < 450.5 /s", True),
        ("rate>1000", False),
    ],
)
def test_every_threshold_form(expr: str, fails: bool) -> None:
    failures = evaluate([parse(expr)], sample_summary())
    assert bool(failures) is fails
    if fails:
        (failure,) = failures
        assert failure.reason.startswith(expr + ": ")
        assert "\n" not in failure.reason


def test_threshold_reasons() -> None:
    summary = sample_summary()
    checks = [parse(t) for t in ("p99>5ms", "errors>0.1%", "errors>0", "rate<500", "max>1s")]
    reasons = [f.reason for f in evaluate(checks, summary)]
    assert reasons == [
        "p99>5ms: p99 is 9.903 ms",
        "errors>0.1%: errors is 5.000%",
        "errors>0: errors is 50",
        "rate<500: rate is 450.0/s",
    ]
    assert parse("p99>5ms").value == 5_000 and parse("p99>2s").value == 2_000_000


def test_latency_threshold_without_answers_fails() -> None:
    rec = Recorder()
    rec.record(0.0, None, "0200", TIMEOUT)
    (failure,) = evaluate([parse("p99>5ms")], rec.summary())
    assert failure.reason == "p99>5ms: no answers, so no p99"
    assert evaluate([parse("errors>0")], Recorder().summary()) == []
    assert evaluate([parse("errors>0.1%")], Recorder().summary()) == []


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("p99", "expected METRIC OP VALUE"),
        ("p99>", "expected METRIC OP VALUE"),
        ("p99=5ms", "expected METRIC OP VALUE"),
        ("p99>-5ms", "expected METRIC OP VALUE"),
        ("p99>5", "needs a unit"),
        ("p99>5min", "needs a unit"),
        ("errors>1ms", "a count or N%"),
        ("errors>1.5", "whole number"),
        ("timeouts>2x", "a count or N%"),
        ("rate<5%", "per second"),
        ("p95>5ms", "unknown metric 'p95'"),
        ("", "expected METRIC OP VALUE"),
    ],
)
def test_bad_thresholds_are_one_line_errors(expr: str, message: str) -> None:
    with pytest.raises(ThresholdError) as err:
        parse(expr)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(f"bad threshold {expr!r}")


def test_bad_threshold_on_the_command_line_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = argparse.ArgumentParser(prog="acqhost-load")
    parser.add_argument("--fail-if", action="append", type=argparse_type, default=[])
    args = parser.parse_args(["--fail-if", "p99>5ms", "--fail-if", "errors>0.1%"])
    assert [t.metric for t in args.fail_if] == ["p99", "errors"]
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--fail-if", "p99>5"])
    assert exit_.value.code == EXIT_USAGE == 2
    assert "needs a unit" in capsys.readouterr().err
    assert EXIT_FAILED == 3
