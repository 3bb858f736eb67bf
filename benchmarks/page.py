"""The performance page: every benchmark run again in one go, each figure beside its baseline.

One command runs each benchmark of this folder in turn, as its own process (a session of its
own, so that a timeout stops it and every process it started), with settings that keep the
whole within about 16 minutes on a 2-core machine, 22 with PostgreSQL (``--quick``: about 3
and 5 minutes, a smoke test of every step), then collects each figure with the baseline it is
measured against in the same run and their ratio, and writes to
``benchmarks/results/page-DATE/`` (``--out`` to choose):

- ``raw/STEP.txt`` (and ``.err``): each benchmark's own output, as it printed it;
- ``scaling/``: benchmarks/scaling.py's JSON, table and PNGs; ``profile/``: profile_sale.py's;
- ``figures.json``: every figure collected; ``summary.md``: the table to paste into
  benchmarks/README.md ("Performance page"), with the run's conditions and each step's command.

A step that fails, times out or cannot run here (py-spy missing for the phase profile) is
marked so in the summary, with its output kept, and the page goes on with the next. Temporary
files go to a folder of the run's own (``TMPDIR``), removed at the end. Loopback only.

Run: ``python benchmarks/page.py [--quick] [--pg URL] [--only STEP,...] [--skip STEP,...]
[--out DIR]`` (or ``make bench-page``; ``make bench-page PG=URL`` with PostgreSQL).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from e2e import CPU_RATIO_GOAL

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


@dataclass
class Figure:
    """One figure of the page: ``value`` measured against ``baseline_value`` in the same run;
    ``ratio`` as the benchmark states it (``ratio_of`` says which over which)."""

    step: str
    name: str
    value: float
    unit: str
    baseline: str = ""
    baseline_value: float | None = None
    ratio: float | None = None
    ratio_of: str = ""
    goal: str = ""


@dataclass
class Step:
    name: str
    script: str
    full: list[str]
    quick: list[str]
    timeout: float  # seconds, full run (quick: a third, at least 120)
    parse: Callable[[str], list[Figure]]
    pg: list[str] = field(default_factory=list)  # more arguments with --pg URL ({pg} in them)
    pg_quick: list[str] | None = None  # the same with --quick (default: ``pg``)


# -- parsing each benchmark's output -----------------------------------------------------------


def numbers(text: str) -> list[float]:
    """The numbers of a table row, in order: 12,345 / 3.4 / 15.5x / 80% all count."""
    return [
        float(n.replace(",", "")) for n in re.findall(r"-?\d[\d,]*\.?\d*(?=[x%]?(?:\s|$))", text)
    ]


def rows(text: str, names: list[str]) -> dict[str, list[float]]:
    """Each named row's numbers: a line that starts with the name and then whitespace."""
    found = {}
    for line in text.splitlines():
        for name in names:
            if line.startswith(name) and line[len(name) : len(name) + 2] == "  ":
                found[name] = numbers(line[len(name) :].split("non-00")[0])
    return found


def versus(step: str, name: str, value: float, unit: str, baseline: str, base: float,
           goal: str = "", inverse: bool = False) -> Figure:  # fmt: skip
    """``value`` over ``base`` (``inverse``: base over value)."""
    ratio = (base / value if inverse else value / base) if value and base else None
    how = f"{baseline} / this" if inverse else f"this / {baseline}"
    return Figure(step, name, value, unit, baseline, base, ratio, how, goal)


def parse_codec(text: str) -> list[Figure]:
    r = rows(text, ["acqhost", "pyiso8583", "hand-written"])
    acq, ref, hand = r["acqhost"][2], r["pyiso8583"][2], r["hand-written"][2]
    return [
        versus("codec", "decode + encode a 0200, acqhost", acq, "µs", "pyiso8583", ref,
               ">= 12x", inverse=True),
        versus("codec", "decode + encode a 0200, acqhost", acq, "µs", "hand-written codec",
               hand, "<= 1.25x"),
    ]  # fmt: skip


def parse_pipeline(text: str) -> list[Figure]:
    floor, logged, quiet = "codec + MAC only (floor)", "host, one JSON log line per sale", (
        "host, per-message log off (warning)")  # fmt: skip
    r = rows(text, [floor, logged, quiet])
    return [
        versus("pipeline", "in-process CPU per sale, logged", r[logged][1], "µs",
               "codec + MAC only", r[floor][1]),
        versus("pipeline", "in-process CPU per sale, log off", r[quiet][1], "µs",
               "codec + MAC only", r[floor][1]),
    ]  # fmt: skip


def parse_e2e(text: str) -> list[Figure]:
    """Per shape: each acqhost target's CPU per sale and rate against the echo server, its
    p99 at half its rate, one worker against the plain host, two workers against one."""
    figures = []
    for block in re.split(r"\n(?=loopback, )", text):
        head = re.match(r"loopback, (\d+) connections x (\d+) in flight", block)
        if not head:
            continue
        shape = f"{head[1]}x{head[2]}"
        goal = CPU_RATIO_GOAL.get((int(head[1]), int(head[2])))
        names = [ln.split()[0] for ln in block.splitlines()[2:] if ln and not ln[0].isspace()]
        r = rows(block, [n for n in names if ":" not in n])
        echo = r.get("echo", [])
        for name, v in r.items():
            if len(v) < 8:
                continue
            tps, half_p99, cpu = v[0], v[4], v[5]
            if len(echo) >= 4:
                figures.append(versus("e2e", f"{name} {shape}: host CPU per sale at max rate",
                                      cpu, "µs", "echo server µs/msg", echo[3],
                                      f"<= {goal:g}x" if goal else ""))  # fmt: skip
                figures.append(versus("e2e", f"{name} {shape}: max rate", tps, "sales/s",
                                      "echo server msgs/s", echo[0]))  # fmt: skip
            fsync = r.get("fdatasync", [])
            if len(fsync) >= 3:  # the floor of a durable answer: one fdatasync, same disk
                figures.append(versus("e2e", f"{name} {shape}: p99 at half its max rate",
                                      half_p99, "ms", "one fdatasync's p99 (same disk)",
                                      fsync[2], "<= 5 ms" if shape == "64x1" else ""))  # fmt: skip
            elif echo:
                figures.append(versus("e2e", f"{name} {shape}: p99 at half its max rate",
                                      half_p99, "ms", "echo server p99 (closed loop)", echo[2],
                                      "<= 5 ms" if shape == "64x1" else ""))  # fmt: skip
            if "plain" in r and name == "asyncio-1":
                figures.append(versus("e2e", f"{name} {shape}: max rate", tps, "sales/s",
                                      "plain asyncio + pyiso8583 host", r["plain"][0],
                                      ">= 5x"))  # fmt: skip
            one = name.replace("-2", "-1")
            if one != name and one in r:
                figures.append(versus("e2e", f"{name} {shape}: max rate", tps, "sales/s",
                                      f"{one} (one worker)", r[one][0],
                                      "scales with workers"))  # fmt: skip
    return figures


def parse_profile(text: str) -> list[Figure]:
    figures = []
    pattern = (r"== (\d+) connections x (\d+) in flight.*?\nunprofiled: ([\d,]+) sales/s.*?"
               r"host CPU ([\d.]+) µs/sale\n.*?echo server: ([\d,]+) messages/s, ([\d.]+) "
               r"µs/message")  # fmt: skip
    for m in re.finditer(pattern, text, re.S):
        figures.append(versus("profile", f"{m[1]}x{m[2]}: host CPU per sale (phase table in "
                              "profile/report.txt)", float(m[4]), "µs", "echo server µs/msg",
                              float(m[6])))  # fmt: skip
    return figures


def parse_banklink(text: str) -> list[Figure]:
    r = rows(text, ["sales/s, no bank", "sales/s, the link delivering the backlog meanwhile",
                    "advices acknowledged by the bank per second",
                    "batch close (0510) -> bank has its 0520, ms p50"])  # fmt: skip
    p99 = re.search(r"p99 \(max of \d+\)\s+([\d.]+)", text)
    return [
        versus("banklink", "sales/s while the link delivers a backlog",
               r["sales/s, the link delivering the backlog meanwhile"][0], "sales/s",
               "sales/s, no bank", r["sales/s, no bank"][0]),
        Figure("banklink", "advices acknowledged by the bank per second",
               r["advices acknowledged by the bank per second"][0], "/s"),
        Figure("banklink", "batch close to the bank's 0520, p50",
               r["batch close (0510) -> bank has its 0520, ms p50"][-1], "ms"),
        Figure("banklink", "batch close to the bank's 0520, p99", float(p99[1]) if p99 else 0,
               "ms"),
    ]  # fmt: skip


def parse_checkpoint(text: str) -> list[Figure]:
    r = rows(text, ["inline", "background"])
    return [
        versus("checkpoint", "commits/s, checkpoints in a thread", r["background"][0], "/s",
               "inline checkpoints (the host's way)", r["inline"][0]),
        versus("checkpoint", "commit p99, checkpoints in a thread", r["background"][2], "ms",
               "inline checkpoints (the host's way)", r["inline"][2]),
    ]  # fmt: skip


def parse_loadgen(text: str) -> list[Figure]:
    r = rows(text, ["streams", "protocol", "prebuilt", "re-MAC"])
    return [
        versus("loadgen", f"acqhost-load {name}: round trips/s", r[name][0], "/s",
               "minimal streams client", r["streams"][0], goal)
        for name, goal in (("prebuilt", ">= 80%"), ("re-MAC", ">= 40%"))
    ] + [
        versus("loadgen", f"acqhost-load {name}: CPU per round trip", r[name][1], "µs",
               "minimal protocol client", r["protocol"][1])
        for name in ("prebuilt", "re-MAC")
    ]  # fmt: skip


def parse_locust(text: str) -> list[Figure]:
    r = rows(text, ["locust", "locust --processes 2", "acqhost-load", "acqhost-load --processes 2"])
    return [
        versus("locust", "acqhost-load: generator CPU per sale", r["acqhost-load"][3], "µs",
               "Locust", r["locust"][3]),
        versus("locust", "acqhost-load: sales/s, 16 terminals", r["acqhost-load"][0], "sales/s",
               "Locust", r["locust"][0]),
    ]  # fmt: skip


def parse_hostile(text: str) -> list[Figure]:
    r = rows(text, ["baseline", "attacked", "baseline after"])
    mean = [(a + b) / 2 for a, b in zip(r["baseline"], r["baseline after"], strict=False)]
    count = re.search(r"([\d,]+) hostile connections from", text)
    what = f"{count[1] if count else 'the'} hostile connections"
    return [
        versus("hostile", f"64 terminals' sales/s under {what}", r["attacked"][0], "sales/s",
               "mean of the phases without", mean[0]),
        versus("hostile", f"64 terminals' p99 under {what}", r["attacked"][2], "ms",
               "mean of the phases without", mean[2]),
    ]  # fmt: skip


def scaling_figures(data: dict[str, Any]) -> list[Figure]:
    figures = []
    for series in ("terminals", "shapes", "ledger"):
        for row in data.get(series, []):
            host, echo, what = row["host"], row["echo"], f"{row['store']} {series} {row['label']}"
            figures.append(versus("scaling", f"{what}: host CPU per sale", host["cpu_us"], "µs",
                                  "echo server µs/msg", echo.get("cpu_us") or 0))  # fmt: skip
            figures.append(versus("scaling", f"{what}: p99", host["p99_ms"], "ms",
                                  "echo server p99", echo["p99_ms"]))  # fmt: skip
            first = next(r for r in data[series] if r["store"] == row["store"])
            if series == "ledger" and row is not first:
                figures.append(versus("scaling", f"{what}: host CPU per sale", host["cpu_us"],
                                      "µs", f"ledger of {first['label']}",
                                      first["host"]["cpu_us"], "<= 1.2x"))  # fmt: skip
    return figures


def parse_scaling(text: str) -> list[Figure]:
    match = re.search(r"written: (\S+)/scaling\.json", text)
    if not match:
        raise ValueError("scaling.py wrote no scaling.json")
    return scaling_figures(json.loads((ROOT / match[1] / "scaling.json").read_text()))


# -- the steps ---------------------------------------------------------------------------------

PG_URL = "{pg}"
STEPS = (
    Step("codec", "codec.py", ["--rounds", "15"], ["--rounds", "3", "--calls", "1000"], 300,
         parse_codec),
    Step("pipeline", "pipeline.py", ["--sales", "30000", "--rounds", "3"],
         ["--sales", "2000", "--rounds", "1"], 300, parse_pipeline),
    Step("e2e", "e2e.py", ["--duration", "4", "--shapes", "64x1,8x4", "--native", "--only",
                           "echo,plain,asyncio-1,asyncio-1-native,trio-1,asyncio-2,"
                           "asyncio-2-native"],
         ["--duration", "1", "--shapes", "64x1", "--native", "--only",
          "echo,plain,asyncio-1,asyncio-1-native,asyncio-2"],
         1500, parse_e2e, ["--pg", PG_URL, "--only",
                           "echo,plain,asyncio-1,asyncio-1-native,trio-1,asyncio-2,"
                           "asyncio-2-native,asyncio-1-pg,asyncio-1-native-pg,asyncio-2-pg"],
         ["--pg", PG_URL, "--only", "echo,plain,asyncio-1,asyncio-1-pg"]),
    Step("profile", "profile_sale.py", ["--shapes", "64x1,8x4", "--out", "{out}/profile"],
         ["--shapes", "8x4", "--duration", "1", "--out", "{out}/profile"], 400, parse_profile),
    Step("banklink", "banklink.py", ["--terminals", "16", "--advices", "10000", "--duration",
                                     "4", "--closes", "16"],
         ["--advices", "300", "--duration", "1", "--closes", "2"], 400, parse_banklink),
    Step("checkpoint", "checkpoint.py", ["--slices", "5", "--seconds", "2"],
         ["--slices", "1", "--seconds", "0.5"], 300, parse_checkpoint),
    Step("loadgen", "loadgen.py", ["--rounds", "3"], ["--rounds", "1", "--duration", "1"], 300,
         parse_loadgen),
    Step("locust", "locust_compare.py", ["--rounds", "2", "--duration", "10"],
         ["--rounds", "1", "--duration", "7"], 400, parse_locust),
    Step("hostile", "hostile.py", ["--duration", "10"], ["--duration", "2", "--hostile", "90"],
         300, parse_hostile),
    Step("scaling", "scaling.py", ["--sizes", "1e3,1e5,1e6,1e7", "--out", "{out}/scaling"],
         ["--quick", "--out", "{out}/scaling"], 1800, parse_scaling,
         ["--pg", PG_URL, "--pg-sizes", "1e3,1e6"], ["--pg", PG_URL]),
)  # fmt: skip


def command(step: Step, args: argparse.Namespace, out: Path) -> list[str]:
    """The step's command line; with ``--pg`` its PostgreSQL options (each an option and its
    value) replace the same options' values, or are added."""
    extra = list(step.quick if args.quick else step.full)
    if args.pg:
        pg = step.pg_quick if args.quick and step.pg_quick is not None else step.pg
        for option, value in zip(pg[::2], pg[1::2], strict=True):
            if option in extra:
                extra[extra.index(option) + 1] = value
            else:
                extra += [option, value]
    # the children run in ROOT: a folder below it is named from there (no machine path in
    # what they print)
    where = os.path.relpath(out, ROOT) if out.is_relative_to(ROOT) else str(out)
    subst = {"out": where, "pg": args.pg or ""}
    return [PY, str(ROOT / "benchmarks" / step.script), *(a.format(**subst) for a in extra)]


class Stopped(Exception):
    """The page was asked to stop (SIGTERM, SIGINT)."""


def run_step(argv: list[str], out: Path, name: str, timeout: float, env: dict[str, str]) -> str:
    """Run one benchmark in a session of its own; its status: ok, failed (N) or timeout."""
    with (out / "raw" / f"{name}.txt").open("wb") as stdout, \
         (out / "raw" / f"{name}.err").open("wb") as stderr:  # fmt: skip
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=stdout, stderr=stderr, env=env,
                                start_new_session=True)  # fmt: skip
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_group(proc)
            return "timeout"
        except BaseException:
            stop_group(proc)
            raise
        finally:
            stop_group(proc)  # what it started and left running
    return "ok" if proc.returncode == 0 else f"failed ({proc.returncode})"


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT to the step's whole session (its finally blocks stop its hosts), then SIGKILL
    to whatever is left after 30 s."""
    for sig, wait in ((signal.SIGINT, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


# -- the summary -------------------------------------------------------------------------------


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


# the steps whose own tables go into the summary as they printed them
EMBEDDED = {"e2e": "raw/e2e.txt", "scaling": "scaling/scaling.txt"}


def markdown(
    figures: list[Figure],
    steps: list[dict[str, Any]],
    meta: dict[str, Any],
    tables: dict[str, str] | None = None,
) -> str:
    lines = [
        f"Performance page of {meta['when']}: commit {meta['commit']}, CPython "
        f"{meta['python']}, {meta['machine']}, {meta['cores']} cores; load average "
        f"{meta['load_before']:.2f} at the start, {meta['load_after']:.2f} at the end; "
        f"{meta['minutes']:.1f} minutes in all. Command: `{meta['command']}`",
        "",
        "| step | figure | this run | baseline (same run) | baseline | ratio (this / baseline) "
        "| goal |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        ratio = "-" if f.ratio is None else f"{f.ratio:.2f}x"
        if f.ratio is not None and not f.ratio_of.endswith("/ " + f.baseline):
            ratio += f" ({f.ratio_of})"
        lines.append(f"| {f.step} | {f.name} | {fmt(f.value)} {f.unit} | {f.baseline or '-'} | "
                     f"{fmt(f.baseline_value)} | {ratio} | {f.goal or '-'} |")  # fmt: skip
    lines += ["", "| step | status | seconds | command (raw output: raw/STEP.txt) |",
              "|---|---|---|---|"]  # fmt: skip
    for s in steps:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | `{s['command']}` |")
    for name, text in (tables or {}).items():
        lines += ["", f"{name}, as it printed it:", "", "```", text.strip("\n"), "```"]
    pngs = sorted(p for p in meta["pngs"])
    if pngs:
        lines += ["", *(f"![{Path(p).stem}]({p})" for p in pngs)]
    return "\n".join(lines) + "\n"


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True, timeout=10)  # fmt: skip
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "acqhost", "simulators",
                            "benchmarks/*.py"], cwd=ROOT, capture_output=True, text=True,
                           timeout=10).stdout.strip()  # fmt: skip
    return out.stdout.strip() + (" (with local changes)" if dirty else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="short runs: a smoke test")
    parser.add_argument("--pg", metavar="URL", help="PostgreSQL superuser URL: its figures too")
    parser.add_argument("--only", help="comma list of steps: " + ",".join(s.name for s in STEPS))
    parser.add_argument("--skip", default="", help="comma list of steps to leave out")
    parser.add_argument("--out", type=Path, help="default benchmarks/results/page-DATE[-quick]")
    args = parser.parse_args()
    names = [s.name for s in STEPS]
    chosen = args.only.split(",") if args.only else names
    unknown = [n for n in [*chosen, *filter(None, args.skip.split(","))] if n not in names]
    if unknown:
        parser.error(f"unknown steps {unknown}: the steps are {','.join(names)}")
    today = datetime.datetime.now(datetime.UTC)
    out = args.out or ROOT / "benchmarks" / "results" / (
        f"page-{today:%Y-%m-%d}" + ("-quick" if args.quick else ""))  # fmt: skip
    if out.exists() and any(out.iterdir()):
        out = out.with_name(f"{out.name}-{today:%H%M}")
    (out / "raw").mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    scratch = out / "tmp"
    scratch.mkdir()
    env = dict(os.environ, TMPDIR=str(scratch))

    def stopped(*_: Any) -> None:
        raise Stopped

    signal.signal(signal.SIGTERM, stopped)
    meta: dict[str, Any] = {
        "when": f"{today:%Y-%m-%d %H:%M} UTC", "commit": git_commit(),
        "python": platform.python_version(), "machine": platform.machine(),
        "cores": os.cpu_count(), "load_before": os.getloadavg()[0],
        "command": " ".join(["python benchmarks/page.py", *sys.argv[1:]]).replace(
            args.pg or "\0", "URL"),
    }  # fmt: skip
    started = time.monotonic()
    figures: list[Figure] = []
    steps: list[dict[str, Any]] = []
    try:
        for step in STEPS:
            if step.name not in chosen or step.name in args.skip.split(","):
                continue
            argv = command(step, args, out)
            shown = " ".join(["python", *(os.path.relpath(a, ROOT) if a.startswith(str(ROOT))
                                          else a for a in argv[1:])])  # fmt: skip
            shown = shown.replace(args.pg, "URL") if args.pg else shown
            print(f"[{time.monotonic() - started:6.0f} s] {step.name}: {shown}", flush=True)
            began = time.monotonic()
            timeout = max(120.0, step.timeout / 3) if args.quick else step.timeout
            if step.name == "profile" and not shutil.which("py-spy", path=str(Path(PY).parent)):
                status = "skipped: py-spy not installed (.venv/bin/pip install py-spy)"
            else:
                status = run_step(argv, out, step.name, timeout, env)
            found: list[Figure] = []
            if status == "ok":
                try:
                    found = step.parse((out / "raw" / f"{step.name}.txt").read_text())
                except (KeyError, IndexError, ValueError, OSError) as exc:
                    status = f"ok, but its output did not parse ({type(exc).__name__}: {exc})"
            figures += found
            steps.append({"name": step.name, "status": status, "command": shown,
                          "seconds": time.monotonic() - began, "figures": len(found)})  # fmt: skip
            print(f"    {status}, {len(found)} figures, {steps[-1]['seconds']:.0f} s", flush=True)
    except (KeyboardInterrupt, Stopped):
        print("stopped: the page so far is written", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        meta["load_after"] = os.getloadavg()[0]
        meta["minutes"] = (time.monotonic() - started) / 60
        meta["pngs"] = [str(p.relative_to(out)) for p in out.rglob("*.png")]
        (out / "figures.json").write_text(json.dumps(
            {"meta": meta, "steps": steps, "figures": [asdict(f) for f in figures]}, indent=1
        ) + "\n")  # fmt: skip
        tables = {}
        for step in steps:
            path = out / EMBEDDED.get(step["name"], "-")
            if step["status"] == "ok" and path.is_file():
                tables[step["name"]] = path.read_text(errors="replace")
        (out / "summary.md").write_text(markdown(figures, steps, meta, tables))
    print(f"written: {out}/summary.md ({len(figures)} figures, {meta['minutes']:.1f} minutes)")
    return 0 if all(s["status"].startswith("ok") or "skipped" in s["status"] for s in steps) else 1


if __name__ == "__main__":
    raise SystemExit(main())
