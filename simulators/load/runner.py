"""One load run, in this process or split across several: terminals, sources, the engine.

A :class:`Plan` is everything a run needs that can cross a process boundary (plain data);
:func:`run_plan` carries it out in the current process and returns its :class:`Result`.
With ``processes`` > 1, :func:`run_split` gives each child process a share of the terminals,
connections, rate and count, starts them together, and adds their recorders up exactly
(HdrHistogram's encoded form, report.Recorder.export).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import queue
import ssl
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from acqhost.domain.traffic import TrafficError, TrafficRecord, read_traffic
from simulators.load.engine import (
    Engine,
    PrebuiltSource,
    Source,
    mix_sources,
    sign_on_all,
)
from simulators.load.messages import LoadTerminal, Mix, RebindData
from simulators.load.replay import Replayer, ReplayError, ReplaySource, map_terminals, skipped
from simulators.load.report import Recorder
from simulators.load.schedule import arrivals, parse_schedule
from simulators.terminal import tls_client_context

__all__ = ("Live", "Plan", "Result", "RunError", "run_plan", "run_split")


class RunError(RuntimeError):
    """The run could not take place (target unreachable, a sign-on refused); one line."""


@dataclass
class Plan:
    """A run, as plain data (module docstring)."""

    host: str
    port: int
    key_files: list[dict[str, Any]]
    spec: str | None = None
    framing: str | None = None
    mac: bool = True
    signon: bool = True
    connections: int | None = None  # None: one per terminal
    depth: int = 1
    rate: str | None = None  # a schedule (schedule.py); None: closed loop
    rate_share: int = 1  # this process sends 1/rate_share of the schedule's rate
    poisson: bool = False
    seed: int | None = None
    duration: float | None = None
    count: int | None = None
    warmup: float = 0.0
    timeout: float = 10.0
    max_in_flight: int = 1024
    verify: bool = True
    mix: dict[str, int] = field(default_factory=lambda: {"sale": 1})
    amounts: tuple[int, int] = (100, 99_999)
    test_amount: int = 1
    rebind: dict[str, str] | None = None
    prebuilt: int = 0  # > 0: that many sales built before the clock starts
    repeat: bool = False  # prebuilt frames sent again once all were (echo targets only)
    replay: str | None = None  # a traffic file
    speed: float | None = 1.0  # replay: the file's timing / speed; None: as fast as possible
    loops: int = 1
    password: str | None = None
    stan_start: int | None = None
    base: str | None = None  # where relative paths (rate files) are
    tls_ca: str | None = None  # connect with TLS, trusting these CA certificates (PEM)


@dataclass
class Result:
    recorder: Recorder
    counts: dict[str, int | float]
    elapsed: float
    cpu_s: float  # the generator's own CPU (all its processes) in the measured part
    mismatches: dict[str, int] = field(default_factory=dict)
    checked: int = 0
    prebuilt_exhausted: bool = False
    unsendable: dict[str, int] = field(default_factory=dict)  # replay: records skipped, why

    def export(self) -> dict[str, Any]:
        return {"recorder": self.recorder.export(), "counts": self.counts,
                "elapsed": self.elapsed, "cpu_s": self.cpu_s, "mismatches": self.mismatches,
                "checked": self.checked, "exhausted": self.prebuilt_exhausted}  # fmt: skip

    @classmethod
    def from_export(cls, data: dict[str, Any]) -> Result:
        return cls(Recorder.from_export(data["recorder"]), data["counts"], data["elapsed"],
                   data["cpu_s"], data["mismatches"], data["checked"],
                   data["exhausted"])  # fmt: skip


@dataclass(frozen=True)
class Live:
    """A moment of a running test, for the progress line."""

    elapsed: float
    measuring: bool
    answered_last_s: int
    answered: int
    p99_last_us: int | None
    in_flight: int
    errors: int
    timeouts: int


def _terminals(plan: Plan) -> list[LoadTerminal]:
    return [
        LoadTerminal(k, spec=plan.spec, framing=plan.framing, mac=plan.mac,
                     stan_start=None if plan.stan_start is None else plan.stan_start + i * 10**7)
        for i, k in enumerate(plan.key_files)
    ]  # fmt: skip


def _records(plan: Plan) -> list[TrafficRecord]:
    assert plan.replay is not None
    try:
        with open(plan.replay, encoding="utf-8") as f:
            records = [r for r in read_traffic(f) if not skipped(r)]
    except OSError as exc:
        raise RunError(f"traffic file {plan.replay}: {exc.strerror or exc}") from None
    except TrafficError as exc:
        raise RunError(f"traffic file {plan.replay}: {exc}") from None
    if not records:
        raise RunError(f"traffic file {plan.replay}: no request to replay")
    return records


def _replay_setup(plan: Plan, terminals: list[LoadTerminal]) -> tuple[list[Source], Any, Replayer]:
    records = _records(plan)
    try:
        mapping = map_terminals((r.tid for r in records), terminals)
    except ReplayError as exc:
        raise RunError(str(exc)) from None
    used = [t for t in terminals if t.tid in set(mapping.values())]
    replayer = Replayer(plan.password)
    sources = [ReplaySource(t, replayer) for t in used]
    index = {t.tid: i for i, t in enumerate(used)}
    order = []
    for _ in range(plan.loops):
        for r in records:
            tid = mapping[r.tid]
            sources[index[tid]].queue.append(r)
            order.append((r.t, index[tid]))
    span = records[-1].t
    times: Any
    if plan.rate is not None:
        times = zip(_send_times(plan), (i for _, i in order), strict=False)
    elif plan.speed is not None:
        speed = plan.speed
        times = (
            ((n // len(records)) * (span + 1.0) / speed + t / speed, i)
            for n, (t, i) in enumerate(order)
        )
    else:
        times = None
    return list(sources), times, replayer


def _sources(plan: Plan, terminals: list[LoadTerminal]) -> tuple[list[Source], Any]:
    connections = plan.connections or len(terminals)
    if plan.prebuilt:
        mix = Mix({"sale": 1}, amounts=plan.amounts, seed=plan.seed)
        per = -(-plan.prebuilt // connections)
        shares = mix_sources(terminals, mix, connections)
        sources: list[Source] = [
            PrebuiltSource([s.build() for _ in range(per)], s.terminals, repeat=plan.repeat)
            for s in shares
        ]
    else:
        rebind = RebindData(**plan.rebind) if plan.rebind else None
        mix = Mix(plan.mix, amounts=plan.amounts, test_amount=plan.test_amount, rebind=rebind,
                  seed=plan.seed)  # fmt: skip
        sources = list(mix_sources(terminals, mix, connections))
    times = None
    if plan.rate is not None:
        times = ((t, None) for t in _send_times(plan))
    return sources, times


def _send_times(plan: Plan) -> Iterator[float]:
    """The open loop's send times (seconds from the start): ``plan.rate``'s schedule, this
    process's share of it, over the warm-up and the duration (without one: until the run
    ends otherwise)."""
    assert plan.rate is not None
    schedule = parse_schedule(plan.rate, Path(plan.base) if plan.base else None)
    length = plan.warmup + (plan.duration if plan.duration is not None else 10**9)
    return arrivals(
        schedule.scaled(1 / plan.rate_share), length, poisson=plan.poisson, seed=plan.seed
    )


def run_plan(
    plan: Plan,
    *,
    start_at: float | None = None,
    on_live: Callable[[Live], None] | None = None,
    ready: Callable[[], float | None] | None = None,
) -> Result:
    """Carry ``plan`` out here. ``ready`` is called once the terminals are signed on and
    gives the wall-clock start (processes of one run start together)."""
    try:
        import uvloop

        runner: Callable[[Any], Any] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        runner = asyncio.run
    return runner(_run(plan, start_at, on_live, ready))  # type: ignore[no-any-return]


async def _run(
    plan: Plan,
    start_at: float | None,
    on_live: Callable[[Live], None] | None,
    ready: Callable[[], float | None] | None,
) -> Result:
    terminals = _terminals(plan)
    if not terminals:
        raise RunError("no terminals: give --key-file, --keys-dir or --register")
    try:
        tls = tls_client_context(plan.tls_ca)
    except (OSError, ssl.SSLError) as exc:
        raise RunError(f"--tls-ca {plan.tls_ca}: {exc.strerror or exc}") from None
    if plan.mac and plan.signon:
        try:
            await sign_on_all(plan.host, plan.port, terminals, timeout=plan.timeout, tls=tls)
        except ValueError as exc:
            raise RunError(str(exc)) from None
    elif plan.mac:
        for t in terminals:
            t.static_session()
    replayer = None
    if plan.replay is not None:
        sources, times, replayer = _replay_setup(plan, terminals)
    else:
        sources, times = _sources(plan, terminals)
    if ready is not None:
        start_at = ready()
    last = [0.0]

    def second(engine: Engine) -> None:
        now = time.perf_counter()
        if on_live is None or now - last[0] < 1.0:
            return
        last[0] = now
        answered, p99 = engine.last_second()
        seen = Counter[str]()
        for acc in engine.seconds.values():
            seen["a"] += sum(acc.outcomes.values())
            seen["e"] += sum(acc.errors.values())
            seen["t"] += sum(acc.timeouts.values())
        on_live(Live(now - engine.start, now >= engine.measure_from, answered, seen["a"], p99,
                     engine.counts.in_flight, seen["e"], seen["t"]))  # fmt: skip

    engine = Engine(
        plan.host, plan.port, sources,
        framing=terminals[0].framing, depth=plan.depth, plan=times,
        duration=plan.duration, count=plan.count, warmup=plan.warmup, timeout=plan.timeout,
        max_in_flight=plan.max_in_flight, verify=plan.verify and plan.mac and plan.signon,
        start_at=start_at,
        on_second=second, tls=tls,
    )  # fmt: skip
    try:
        recorder = await engine.run()
    except OSError as exc:
        raise RunError(
            f"cannot connect to {plan.host}:{plan.port}: {exc.strerror or exc}"
        ) from None
    exhausted = any(isinstance(s, PrebuiltSource) and s.exhausted for s in sources)
    result = Result(recorder, engine.counts.as_dict(), engine.elapsed, engine.cpu_s,
                    prebuilt_exhausted=exhausted)  # fmt: skip
    if replayer is not None:
        result.mismatches = dict(replayer.mismatches)
        result.checked = replayer.checked
        result.unsendable = dict(replayer.unsendable)
    return result


def share_plan(plan: Plan, i: int, n: int) -> Plan:
    def part(total: int | None) -> int | None:
        return None if total is None else total // n + (1 if i < total % n else 0)

    return replace(
        plan,
        key_files=plan.key_files[i::n],
        connections=part(plan.connections),
        count=part(plan.count),
        prebuilt=part(plan.prebuilt) or 0,
        rate_share=plan.rate_share * n,
        seed=None if plan.seed is None else plan.seed + i,
    )


def _child(index: int, plan: Plan, barrier: Any, out: Any, live: Any) -> None:
    def ready() -> float:
        barrier.wait()
        return time.time() + 0.2

    def on_live(moment: Live) -> None:
        with contextlib.suppress(queue.Full):
            live.put_nowait((index, moment))

    try:
        result = run_plan(plan, ready=ready, on_live=on_live)
        out.put(("ok", result.export()))
    except Exception as exc:
        barrier.abort()
        out.put(("error", str(exc)))


def run_split(plan: Plan, processes: int, on_live: Callable[[Live], None] | None = None) -> Result:
    """``plan`` across ``processes`` local processes, merged (module docstring)."""
    if plan.replay is not None:
        raise RunError("a replay runs in one process: leave out --processes")
    if processes > len(plan.key_files):
        raise RunError(f"{processes} processes need at least {processes} terminals")
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes)
    out = ctx.Queue()
    live = ctx.Queue(maxsize=1000)
    children = [
        ctx.Process(target=_child, args=(i, share_plan(plan, i, processes), barrier, out, live))
        for i in range(processes)
    ]
    for c in children:
        c.start()
    results: list[Result] = []
    errors: list[str] = []
    latest: dict[int, Live] = {}
    while len(results) + len(errors) < processes:
        try:
            status, data = out.get(timeout=0.5)
        except queue.Empty:
            if not any(c.is_alive() for c in children) and out.empty():
                errors.append("a load process ended without a result")
                break
            _drain_live(live, latest, on_live)
            continue
        if status == "ok":
            results.append(Result.from_export(data))
        else:
            errors.append(data)
    for c in children:
        c.join(timeout=10)
    if errors:
        raise RunError(errors[0])
    total = results[0]
    merged: dict[str, int | float] = {}
    mismatches: Counter[str] = Counter()
    for r in results:
        for name, value in r.counts.items():
            merged[name] = merged.get(name, 0) + value
        mismatches.update(r.mismatches)
    for r in results[1:]:
        total.recorder.merge(r.recorder)
    merged["max_late_s"] = max(float(r.counts.get("max_late_s", 0)) for r in results)
    return Result(total.recorder, merged, max(r.elapsed for r in results),
                  sum(r.cpu_s for r in results), dict(mismatches),
                  sum(r.checked for r in results),
                  any(r.prebuilt_exhausted for r in results))  # fmt: skip


def _drain_live(live: Any, latest: dict[int, Live], on_live: Callable[[Live], None] | None) -> None:
    got = False
    while True:
        try:
            index, moment = live.get_nowait()
        except queue.Empty:
            break
        latest[index] = moment
        got = True
    if got and on_live is not None:
        moments = list(latest.values())
        on_live(Live(max(m.elapsed for m in moments), all(m.measuring for m in moments),
                     sum(m.answered_last_s for m in moments), sum(m.answered for m in moments),
                     max((m.p99_last_us or 0 for m in moments), default=None) or None,
                     sum(m.in_flight for m in moments), sum(m.errors for m in moments),
                     sum(m.timeouts for m in moments)))  # fmt: skip
