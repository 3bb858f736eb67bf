"""acqhost-load run against a real host on loopback (a process of its own): the report's
numbers add up, response codes agree with the host's store, open and closed loops, several
processes, thresholds and exit codes, timeouts, the capture under load, the CSV and the plot."""

from __future__ import annotations

import asyncio
import csv
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from acqhost.domain.traffic import card_runs, read_traffic
from acqhost.store import open_store
from simulators.load.register import BANK_CODE, HOLDER, OPERATOR, PASSWORD
from simulators.load.report import CSV_COLUMNS, TIMEOUT, Recorder
from simulators.load.runner import Plan, share_plan
from tests.loadkit import (
    Host,
    check_adds_up,
    run_load,
    run_load_process,
    serving,
    wait_lines,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TIDS = ("LD000001", "LD000002")
REBIND = [
    "--rebind-operator", OPERATOR, "--rebind-password", PASSWORD,
    "--rebind-holder", HOLDER, "--rebind-bank-code", BANK_CODE,
]  # fmt: skip


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    """One host for the tests that only read the load tester's report."""
    with serving(tmp_path_factory.mktemp("load-host")) as h:
        yield h


def scenario(folder: Path, text: str) -> str:
    path = folder / "scenario.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


# -- the numbers add up, and agree with the host ---------------------------------------------


def test_sales_test_sales_and_reversals_agree_with_the_store(tmp_path: Path) -> None:
    """A test sale above the host's test limit (100) is answered 13 and not kept; every 00 to a
    sale is a sale in the ledger, every 00 to a reversal a reversed one."""
    toml = scenario(tmp_path, "test_amount = 500\n[mix]\nsale = 6\ntest_sale = 2\nreversal = 3\n")
    with serving(tmp_path) as h:
        status, report = run_load([
            "run", *h.target(), "--scenario", toml, "--count", "150", "--seed", "7",
        ])  # fmt: skip
        sales = h.sales()
    assert status == 0
    check_adds_up(report)
    assert report["sent"] == report["answered"] == 150
    assert set(report["by_mti"]) == {"0200", "0400"}
    assert set(report["by_rc"]) == {"00", "13"}
    refused = report["by_rc"]["13"]  # the test sales
    assert refused > 0 and not any(s.test for s in sales)
    reversed_ = sum(s.status == "reversed" for s in sales)
    approved = sum(s.status == "approved" for s in sales)
    assert report["by_mti"]["0200"] == len(sales) + refused
    assert report["by_mti"]["0400"] == reversed_ > 0
    assert report["by_rc"]["00"] == len(sales) + reversed_
    # approved sales in the ledger: the 00 answers to 0200 less the reversed ones
    assert approved == (report["by_rc"]["00"] - reversed_) - reversed_


def test_every_kind_of_request_reaches_the_host(tmp_path: Path) -> None:
    mix = "sale=5,test_sale=1,reversal=2,inquiry=1,batch_close=1,rebind=1"
    with serving(tmp_path) as h:
        status, report = run_load([
            "run", *h.target(), "--mix", mix, *REBIND, "--count", "120", "--seed", "3",
        ])  # fmt: skip
        store = open_store(h.db)
        try:
            with store.transaction(write=False) as tx:
                rebinds = [r for tid in TIDS for r in tx.requests(tid=tid)]
            open_batches = [store.open_batch(tid) for tid in TIDS]
        finally:
            store.close()
    assert status == 0
    check_adds_up(report)
    assert report["answered"] == 120
    assert set(report["by_mti"]) == {"0200", "0300", "0400", "0500"}
    assert "00" in report["by_rc"]
    # no format error, duplicate or system error: every request was well made and new
    assert not {"30", "94", "96"} & set(report["by_rc"]), report["by_rc"]
    assert rebinds, "a rebind in the mix reached the host as a request"
    assert max(open_batches) > 1, "a batch close in the mix closed a batch"


def test_reversals_after_a_batch_close_reverse_sales_of_the_open_batch(tmp_path: Path) -> None:
    with serving(tmp_path, terminals=1) as h:
        status, report = run_load([
            "run", *h.target(), "--mix", "sale=4,reversal=2,batch_close=1", "--count", "120",
            "--seed", "11",
        ])  # fmt: skip
        reversed_ = sum(s.status == "reversed" for s in h.sales())
    assert status == 0
    check_adds_up(report)
    assert report["by_mti"]["0400"] == reversed_  # every reversal was accepted


# -- open and closed loop --------------------------------------------------------------------


def test_open_loop_sends_its_rate(host: Host) -> None:
    status, report = run_load(["run", *host.target(), "--rate", "200", "--duration", "2"])
    assert status == 0
    check_adds_up(report)
    assert report["duration_s"] == pytest.approx(2.0, rel=0.02)
    assert report["sent"] / report["duration_s"] == pytest.approx(200, rel=0.02)
    assert report["answered"] == report["sent"] and report["by_rc"] == {"00": report["sent"]}
    assert report["counts"]["unsent"] == 0
    assert [s["sent"] for s in report["series"]] == [pytest.approx(200, abs=4)] * 2


def test_open_loop_with_poisson_arrivals_and_a_warmup(host: Host) -> None:
    status, report = run_load([
        "run", *host.target(), "--rate", "150", "--arrivals", "poisson", "--seed", "5",
        "--warmup", "0.5", "--duration", "1.5",
    ])  # fmt: skip
    assert status == 0
    check_adds_up(report)
    assert report["counts"]["warmup"] > 0  # sent, but not in the figures
    assert report["sent"] == report["answered"] == pytest.approx(225, rel=0.25)


def test_closed_loop_answers_everything_in_order(host: Host) -> None:
    status, report = run_load([
        "run", *host.target(), "--connections", "4", "--depth", "8", "--count", "400",
    ])  # fmt: skip
    assert status == 0
    check_adds_up(report)
    assert report["sent"] == report["answered"] == 400
    assert report["by_rc"] == {"00": 400} and report["by_mti"] == {"0200": 400}
    counts = report["counts"]
    assert counts["unmatched"] == counts["out_of_order"] == 0
    assert counts["bad_mac"] == counts["undecodable"] == counts["reconnects"] == 0


# -- several processes -----------------------------------------------------------------------


def test_two_processes_add_up_to_the_whole_run(tmp_path: Path) -> None:
    with serving(tmp_path) as h:
        done = run_load_process(["run", *h.target(), "--processes", "2", "--count", "60",
                                 "--json"])  # fmt: skip
        per_terminal = Counter(s.tid for s in h.sales())
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    check_adds_up(report)
    # each process had one terminal and half the count; the host saw both halves
    assert report["sent"] == report["answered"] == report["by_rc"]["00"] == 60
    assert per_terminal == {"LD000001": 30, "LD000002": 30}


def test_a_plan_splits_into_shares_that_add_up() -> None:
    keys = [{"tid": f"T{i}", "mid": "M"} for i in range(5)]
    plan = Plan("127.0.0.1", 1, keys, connections=7, count=101, seed=4, rate="300")
    shares = [share_plan(plan, i, 3) for i in range(3)]
    assert sum(s.count or 0 for s in shares) == 101
    assert sum(s.connections or 0 for s in shares) == 7
    assert sorted(k["tid"] for s in shares for k in s.key_files) == [k["tid"] for k in keys]
    assert {s.rate_share for s in shares} == {3} and len({s.seed for s in shares}) == 3


def _second_of_samples(rec: Recorder, samples: list[tuple[float, float, str, str]]) -> None:
    for planned, latency, mti, rc in samples:
        rec.record(planned, None if rc == TIMEOUT else planned + latency, mti, rc)


def test_two_processes_exports_merge_into_one_recorder_of_all_samples() -> None:
    samples = [
        (i * 0.007, 0.0003 + (i % 97) * 0.00011, "0200" if i % 3 else "0400",
         TIMEOUT if i % 41 == 0 else ("00" if i % 5 else "13"))
        for i in range(900)
    ]  # fmt: skip
    one, two, everything = Recorder(), Recorder(), Recorder()
    _second_of_samples(one, samples[0::2])
    _second_of_samples(two, samples[1::2])
    _second_of_samples(everything, samples)
    merged = Recorder.from_export(json.loads(json.dumps(one.export())))
    merged.merge(Recorder.from_export(json.loads(json.dumps(two.export()))))
    assert merged.summary(6.3) == everything.summary(6.3)
    assert merged.encode() == everything.encode()
    assert merged.export() == everything.export()


# -- thresholds and exit codes ---------------------------------------------------------------


def test_a_failed_threshold_exits_3_and_names_it(host: Host) -> None:
    status, report = run_load([
        "run", *host.target(), "--count", "20", "--fail-if", "p99>0.001ms",
        "--fail-if", "errors>0",
    ])  # fmt: skip
    assert status == 3
    assert len(report["failed"]) == 1 and report["failed"][0].startswith("p99>0.001ms: p99 is ")
    text = run_load_process(["run", *host.target(), "--count", "20", "--fail-if", "p99>1us"])
    assert text.returncode == 3
    assert (
        [line for line in text.stdout.splitlines() if line.startswith("FAILED")]
        == [line for line in text.stdout.splitlines() if line.startswith("FAILED p99>1us: p99 is ")]
        != []
    )


def test_thresholds_that_hold_exit_0(host: Host) -> None:
    status, report = run_load([
        "run", *host.target(), "--count", "20", "--fail-if", "errors>0",
        "--fail-if", "timeouts>1%", "--fail-if", "p99>60s",
    ])  # fmt: skip
    assert status == 0 and report["failed"] == []


@pytest.fixture
def plain_key(tmp_path: Path) -> str:
    path = tmp_path / "plain.json"
    path.write_text(json.dumps({"tid": "TERM0001", "mid": "MERCHANT0000001"}))
    return str(path)


def _one_line_usage_error(argv: list[str], *words: str) -> None:
    done = run_load_process(argv)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("acqhost-load")
    for word in words:
        assert word in lines[0]


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["--key-file", "{missing}"], ("key file", "No such file")),
        (["--rate", "fast"], ("bad schedule", "fast")),
        (["--rate", "steps:100"], ("bad schedule",)),
        (["--rate", "file:{missing}"], ("rate file",)),
        (["--mix", "sale=eighty"], ("--mix",)),
        (["--mix", "sale=1,refund=1"], ("refund",)),
        (["--mix", "rebind=1"], ("--rebind-operator",)),
        (["--warmup", "-1"], ("--warmup",)),
        (["--repeat"], ("--prebuilt",)),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    tmp_path: Path, plain_key: str, options: list[str], words: tuple[str, ...]
) -> None:
    missing = str(tmp_path / "nowhere.json")
    options = [o.replace("{missing}", missing) for o in options]
    keys = [] if "--key-file" in options else ["--key-file", plain_key, "--no-mac"]
    _one_line_usage_error(["run", "--port", "9", *keys, *options, "--count", "5"], *words)


def test_a_malformed_threshold_exits_2_naming_it(plain_key: str) -> None:
    done = run_load_process(["run", "--port", "9", "--key-file", plain_key, "--no-mac",
                             "--fail-if", "p99>>5ms"])  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "bad threshold 'p99>>5ms'" in done.stderr


@pytest.mark.parametrize("options", [["--fail-if", "p99>>5ms"], ["--count", "0"]])
def test_argument_errors_are_one_line_too(plain_key: str, options: list[str]) -> None:
    _one_line_usage_error(["run", "--port", "9", "--key-file", plain_key, "--no-mac", *options])


def test_an_unreachable_target_exits_1(plain_key: str) -> None:
    from simulators.processes import free_port

    done = run_load_process(["run", "--port", str(free_port()), "--key-file", plain_key,
                             "--no-mac", "--count", "3", "--quiet"])  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) == 1 and "cannot connect" in done.stderr


# -- timeouts --------------------------------------------------------------------------------


class SilentTarget:
    """A TCP server in a thread of its own that accepts connections and never answers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self.received = 0
        ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(5)

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                self.received += len(data)
            writer.close()

        server = self.loop.run_until_complete(asyncio.start_server(swallow, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()
        server.close()
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def silent() -> Iterator[SilentTarget]:
    target = SilentTarget()
    yield target
    target.close()


@pytest.mark.parametrize(
    "load",
    [["--depth", "5", "--count", "5"], ["--rate", "20", "--duration", "0.5"]],
    ids=["closed", "open"],
)
def test_a_target_that_never_answers_gives_timeouts(
    silent: SilentTarget, plain_key: str, load: list[str]
) -> None:
    started = time.monotonic()
    status, report = run_load(["run", "--port", str(silent.port), "--key-file", plain_key,
                               "--no-mac", "--no-signon", "--timeout", "0.3", "--quiet",
                               *load])  # fmt: skip
    took = time.monotonic() - started
    assert status == 0
    check_adds_up(report)
    assert report["sent"] == report["timeouts"] >= 5
    assert report["answered"] == report["errors"] == 0
    assert report["by_rc"] == {TIMEOUT: report["sent"]}
    assert set(report["latency_us"].values()) == {None}
    assert silent.received > 0
    assert took < 0.5 + 0.3 + 1.5  # the run, then at most the timeout to drain


def test_a_timeout_frees_its_place_in_a_closed_loop(silent: SilentTarget, plain_key: str) -> None:
    status, report = run_load(["run", "--port", str(silent.port), "--key-file", plain_key,
                               "--no-mac", "--no-signon", "--timeout", "0.3", "--quiet",
                               "--depth", "1", "--duration", "1.5"])  # fmt: skip
    assert status == 0
    check_adds_up(report)
    # one request at a time, each given up after 0.3 s: about five in 1.5 s
    assert report["sent"] == report["timeouts"] >= 4


# -- the capture under load, the CSV and the plot --------------------------------------------


def test_a_capture_under_load_holds_no_card_number(tmp_path: Path) -> None:
    mix = "sale=6,test_sale=1,reversal=2,inquiry=1,rebind=1"
    with serving(tmp_path, capture=True) as h:
        status, report = run_load(
            [
                "run",
                *h.target(),
                "--mix",
                mix,
                *REBIND,
                "--connections",
                "2",
                "--depth",
                "4",
                "--count",
                "200",
            ]
        )
        assert h.capture is not None
        lines = wait_lines(h.capture, 200 + 2)  # the requests and the two sign-ons
    assert status == 0 and report["answered"] == 200
    assert len(lines) == 202
    text = "\n".join(lines)
    assert card_runs(text) == []
    records = list(read_traffic(lines))
    assert Counter(r.mti for r in records) == Counter({**report["by_mti"], "0800": 2})
    assert all(r.fields["2"].startswith("tok:") for r in records if "2" in r.fields)


def test_csv_and_plot_of_the_per_second_series(host: Host, tmp_path: Path) -> None:
    csv_path, png = tmp_path / "series.csv", tmp_path / "series.png"
    status, report = run_load([
        "run", *host.target(), "--rate", "100", "--duration", "2", "--csv", str(csv_path),
        "--plot", str(png),
    ])  # fmt: skip
    assert status == 0
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    body = [dict(zip(CSV_COLUMNS, row, strict=True)) for row in rows[1:]]
    assert [int(r["second"]) for r in body] == [0, 1]
    assert sum(int(r["sent"]) for r in body) == report["sent"]
    assert [int(r["sent"]) for r in body] == [s["sent"] for s in report["series"]]
    assert all(int(r["p50_us"]) <= int(r["p99_us"]) <= int(r["max_us"]) for r in body)
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 1000
