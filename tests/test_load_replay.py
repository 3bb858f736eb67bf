"""acqhost-load replay: the sample traffic file against a real host on loopback (twice on one
store, as its expectations say), expectations that differ, a capture made under load replayed,
and the rewriting of records (pure)."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from acqhost.domain.cards import luhn_ok
from acqhost.domain.traffic import TrafficRecord, read_traffic
from acqhost.wire.tlv import decode_tlv, encode_tlv
from simulators.load.messages import TEST_BIN, LoadTerminal, Request
from simulators.load.register import PASSWORD
from simulators.load.replay import (
    Replayer,
    ReplayError,
    ReplaySource,
    map_terminals,
    plan,
    skipped,
)
from tests.loadkit import (
    SAMPLE,
    check_adds_up,
    run_load,
    run_load_process,
    serving,
    wait_lines,
)


def sample_records() -> list[TrafficRecord]:
    with open(SAMPLE, encoding="utf-8") as f:
        return list(read_traffic(f))


def write_records(path: Path, records: list[TrafficRecord]) -> str:
    path.write_text("".join(json.dumps(r.as_json()) + "\n" for r in records), encoding="utf-8")
    return str(path)


# -- against a host --------------------------------------------------------------------------


def test_the_sample_replays_twice_on_one_store_as_it_expects(tmp_path: Path) -> None:
    expected_rc = Counter((r.expect or {})["39"] for r in sample_records())
    with serving(tmp_path, terminals=1) as h:
        reports = []
        for how in (["--as-fast-as-possible"], ["--speed", "10"]):
            status, report = run_load(
                ["replay", str(SAMPLE), *h.target(), *how, "--fail-on-mismatch"]
            )
            assert status == 0, report
            reports.append(report)
        sales = h.sales()
    for report in reports:
        check_adds_up(report)
        assert report["sent"] == report["answered"] == 7
        assert report["by_mti"] == {"0200": 6, "0400": 1}
        assert report["by_rc"] == dict(expected_rc)  # no 94: both replays were new traffic
        assert report["expectations"] == {"checked": 7, "mismatches": {}, "unsendable": {}}
    # at its own timing / 10 the file's 2.5 s take about a quarter of a second
    assert 0.2 <= reports[1]["duration_s"] < 1.0
    # each replay: the five sales answered 00 in the ledger, one of them reversed
    assert len(sales) == 10 and sum(s.status == "reversed" for s in sales) == 2


def test_loops_replay_the_file_again_as_new_traffic(tmp_path: Path) -> None:
    with serving(tmp_path, terminals=1) as h:
        status, report = run_load(["replay", str(SAMPLE), *h.target(), "--as-fast-as-possible",
                                   "--loops", "3", "--fail-on-mismatch"])  # fmt: skip
    assert status == 0
    check_adds_up(report)
    assert report["sent"] == report["answered"] == 21
    assert report["expectations"] == {"checked": 21, "mismatches": {}, "unsendable": {}}
    assert "94" not in report["by_rc"]


def test_a_wrong_expectation_is_counted_and_fails_the_replay(tmp_path: Path) -> None:
    records = sample_records()
    records[0] = TrafficRecord(records[0].t, records[0].tid, records[0].mti,
                               records[0].fields, {"39": "05"})  # fmt: skip
    wrong = write_records(tmp_path / "wrong.jsonl", records)
    with serving(tmp_path, terminals=1) as h:
        fail_status, failed = run_load(["replay", wrong, *h.target(), "--as-fast-as-possible",
                                        "--fail-on-mismatch"])  # fmt: skip
        status, counted = run_load(["replay", wrong, *h.target(), "--as-fast-as-possible"])
    assert fail_status == 3
    assert status == 0  # counted, not failed, without --fail-on-mismatch
    for report in (failed, counted):
        check_adds_up(report)
        assert report["sent"] == 7
        assert report["expectations"] == {
            "checked": 7,
            "mismatches": {"39: expected 05, got 00": 1},
            "unsendable": {},
        }
        assert report["failed"] == []


def test_a_traffic_file_with_more_terminals_than_key_files_cannot_run(tmp_path: Path) -> None:
    records = sample_records()
    records.append(TrafficRecord(3.0, "TERM0002", "0200",
                                 dict(records[0].fields, **{"41": "TERM0002"}),
                                 {"39": "00"}))  # fmt: skip
    two = write_records(tmp_path / "two.jsonl", records)
    with serving(tmp_path, terminals=1) as h:
        done = run_load_process(["replay", two, *h.target()])
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) == 1 and "TERM0002" in done.stderr


def two_terminals(tmp_path: Path) -> str:
    """The sample (TERM0001, seven requests) and one sale of TERM0002 after it."""
    records = sample_records()
    records.append(TrafficRecord(2.6, "TERM0002", "0200",
                                 dict(records[0].fields, **{"41": "TERM0002"}),
                                 {"39": "00"}))  # fmt: skip
    return write_records(tmp_path / "two.jsonl", records)


def test_a_timed_replay_of_two_terminals_sends_every_record(tmp_path: Path) -> None:
    with serving(tmp_path) as h:
        status, report = run_load(
            [
                "replay",
                two_terminals(tmp_path),
                *h.target(),
                "--speed",
                "20",
                "--loops",
                "2",
                "--fail-on-mismatch",
            ]
        )
    assert status == 0
    check_adds_up(report)
    assert report["sent"] == report["answered"] == 16
    assert report["expectations"] == {"checked": 16, "mismatches": {}, "unsendable": {}}


def test_a_replay_as_fast_as_possible_sends_every_terminals_records(tmp_path: Path) -> None:
    with serving(tmp_path) as h:
        status, report = run_load(["replay", two_terminals(tmp_path), *h.target(),
                                   "--as-fast-as-possible", "--loops", "2"])  # fmt: skip
    assert status == 0
    check_adds_up(report)
    assert report["sent"] + report["counts"]["unsent"] == 16
    assert report["sent"] == 16


def test_a_malformed_traffic_file_cannot_run(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(SAMPLE.read_text() + '{"t": 9, "tid": "TERM0001"}\n')
    with serving(tmp_path, terminals=1) as h:
        done = run_load_process(["replay", str(bad), *h.target()])
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) == 1 and "line 8" in done.stderr


def _in_process(argv: list[str]) -> tuple[int, dict[str, Any]]:
    return run_load(argv)


def _in_a_process(argv: list[str]) -> tuple[int, dict[str, Any]]:
    """The replay in a process of its own, given 5 s (60 requests take well under one)."""
    try:
        done = run_load_process([*argv, "--json"], timeout=5)
    except subprocess.TimeoutExpired:
        return -1, {}
    return done.returncode, (json.loads(done.stdout) if done.stdout.strip() else {})


def _capture_then_replay(
    tmp_path: Path, amount: int, how: Callable[[list[str]], tuple[int, dict[str, Any]]]
) -> tuple[list[str], dict[str, Any], dict[str, Any], int]:
    """A capture of a synthetic run (sales of ``amount``), then the capture replayed against
    the same host: its lines, the run's report, the replay's report and exit code."""
    toml = tmp_path / "scenario.toml"
    toml.write_text(
        f"amounts = [{amount}, {amount}]\ntest_amount = 50\n"
        "[mix]\nsale = 5\ntest_sale = 1\nreversal = 2\ninquiry = 1\n"
    )
    with serving(tmp_path, terminals=1, capture=True) as h:
        assert h.capture is not None
        status, run = run_load(["run", *h.target(), "--scenario", str(toml), "--count", "60"])
        assert status == 0 and run["answered"] == 60
        lines = wait_lines(h.capture, 61)  # and the sign-on
        copy = tmp_path / "captured.jsonl"
        copy.write_text("".join(line + "\n" for line in lines))
        status, replay = how(
            ["replay", str(copy), *h.target(), "--as-fast-as-possible", "--fail-on-mismatch"]
        )
    return lines, run, replay, status


def test_a_capture_made_under_load_replays_as_it_was_answered(tmp_path: Path) -> None:
    lines, run, replay, status = _capture_then_replay(tmp_path, 1000, _in_process)
    assert not any('"4":"tok:' in line for line in lines)  # 000000001000 is not Luhn-valid
    assert len(lines) == 61
    check_adds_up(replay)
    assert status == 0, replay["expectations"]
    assert replay["sent"] == replay["answered"] == 60  # the sign-on is not replayed
    assert replay["by_mti"] == run["by_mti"]
    assert replay["by_rc"] == run["by_rc"] and "94" not in replay["by_rc"]
    assert replay["expectations"] == {"checked": 60, "mismatches": {}, "unsendable": {}}


def test_a_capture_with_luhn_valid_amounts_replays_too(tmp_path: Path) -> None:
    lines, _, replay, status = _capture_then_replay(tmp_path, 1008, _in_a_process)
    assert any('"4":"tok:' in line for line in lines)  # 000000001008 is Luhn-valid
    assert status == 0, "the replay did not end in 5 s" if status == -1 else replay
    check_adds_up(replay)
    assert replay["sent"] == 60
    assert replay["expectations"] == {"checked": 60, "mismatches": {}, "unsendable": {}}


def test_a_tokenized_amount_is_replayed_as_an_amount() -> None:
    source = ReplaySource(terminal(), Replayer())
    record = sample_records()[0]
    request = source.build(
        TrafficRecord(0, "TERM0001", "0200", dict(record.fields, **{"4": "tok:df15de425193"}))
    )
    assert request.fields is not None
    amount = request.fields["4"]
    assert len(amount) == 12 and amount.isdigit()


# -- rewriting records (pure) ----------------------------------------------------------------


def terminal(tid: str = "LD000001") -> LoadTerminal:
    t = LoadTerminal({"tid": tid, "mid": "LOADMERCHANT001", "terminal_signing_key": "11" * 32},
                     stan_start=41)  # fmt: skip
    t.static_session()
    return t


def test_a_replayed_record_gets_fresh_numbers_and_the_terminals_identity() -> None:
    records = sample_records()
    t = terminal()
    source = ReplaySource(t, Replayer())
    built = [source.build(r) for r in records]
    for record, request in zip(records, built, strict=True):
        fields = request.fields
        assert fields is not None and fields["t"] == record.mti
        assert fields["41"] == t.tid and fields["42"] == t.mid
        assert fields["11"] != record.fields["11"]
        assert set(fields) - {"t"} == set(record.fields)
        assert fields["7"] != record.fields["7"]  # today's, not the file's
        for key in ("3", "4", "14", "22", "25", "49"):
            assert fields.get(key) == record.fields.get(key)
        assert request.key == (t.tid, fields["11"])
        assert t.codec.decode(request.frame[2:]) is not None
    assert len({r.fields["11"] for r in built if r.fields}) == len(built)
    # the reversal points at its sale as this replay sent it
    sale, reversal = built[4].fields, built[5].fields
    assert sale is not None and reversal is not None
    assert reversal["90"][:20] == "0200" + sale["11"] + sale["7"]
    assert reversal["90"][20:] == records[5].fields["90"][20:]


def test_tokens_become_test_cards_the_same_throughout_a_replay() -> None:
    replayer = Replayer()
    source = ReplaySource(terminal(), replayer)
    base = {"3": "000000", "4": "000000001000", "11": "000001", "7": "0101000000",
            "14": "3012", "22": "051", "25": "00", "41": "X", "42": "Y", "49": "156"}  # fmt: skip

    def sale(key: str, token: str) -> Request:
        return source.build(TrafficRecord(0, "TERM0001", "0200", dict(base, **{key: token})))

    first, again = sale("2", "tok:0123456789ab"), sale("2", "tok:0123456789ab")
    other, track = sale("2", "tok:ba9876543210"), sale("35", "tok:0123456789ab")
    pans = [r.fields["2"] for r in (first, again, other) if r.fields]
    assert pans[0] == pans[1] != pans[2]
    assert all(luhn_ok(p) and p.startswith(TEST_BIN) for p in pans)
    assert track.fields is not None and track.fields["35"] == pans[0] + "=3012101"


def test_a_rebind_with_a_tokenized_account_replays_as_valid_tlv() -> None:
    source = ReplaySource(terminal(), Replayer(PASSWORD))
    tlv = encode_tlv({"OP": "OP01", "NM": "Load Test", "BK": "102100099996",
                      "AC": "tok:a57fb730c153"})  # fmt: skip
    record = TrafficRecord(0, "LD000001", "0300", {
        "7": "1206184904", "11": "476207", "41": "LD000001", "42": "LOADMERCHANT001",
        "48": tlv, "91": "2", "101": "SETTLEACCT"}, {"39": "00"})  # fmt: skip
    request = source.build(record)
    assert request.fields is not None
    elements = decode_tlv(request.fields["48"])
    assert luhn_ok(elements["AC"]) and elements["AC"].startswith(TEST_BIN)
    assert "PW" in elements  # the operator password put back


def test_expectations_are_compared_field_by_field() -> None:
    replayer = Replayer()
    replayer.check({"39": "00"}, {"39": "00", "38": "123456"})
    replayer.check({"39": "00", "38": "654321"}, {"39": "05"})
    replayer.check({"39": "00"}, {})
    assert replayer.checked == 3
    assert replayer.mismatches == Counter({
        "39: expected 00, got 05": 1, "38: expected 654321, got none": 1,
        "39: expected 00, got none": 1,
    })  # fmt: skip


def test_terminals_map_onto_key_files_the_file_does_not_name() -> None:
    ts = [terminal("LD000001"), terminal("TERM0002"), terminal("LD000003")]
    mapping = map_terminals(["TERM0001", "TERM0002", "TERM0001", "TERM0009"], ts)
    assert mapping == {"TERM0001": "LD000001", "TERM0002": "TERM0002", "TERM0009": "LD000003"}
    with pytest.raises(ReplayError, match="TERM0004"):
        map_terminals(["TERM0001", "TERM0002", "TERM0003", "TERM0004"], ts)


def test_sign_ons_and_sign_offs_are_not_replayed() -> None:
    def network(code: str) -> TrafficRecord:
        return TrafficRecord(0, "TERM0001", "0800", {"70": code})

    assert skipped(network("001")) and skipped(network("002"))
    assert not skipped(network("301"))
    assert not any(skipped(r) for r in sample_records())


def test_the_replay_plan_follows_the_files_timing() -> None:
    records = sample_records()
    times = list(plan(records, {"TERM0001": 0}, speed=2.0, loops=2, gap=1.0))
    span = records[-1].t
    assert [t for t, _ in times[:7]] == [r.t / 2 for r in records]
    assert [t for t, _ in times[7:]] == pytest.approx([(span + 1 + r.t) / 2 for r in records])
    assert {i for _, i in times} == {0}
    assert [t for t, _ in plan(records, {"TERM0001": 0}, speed=None)] == [0.0] * 7
