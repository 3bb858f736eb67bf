"""Where a sale's host CPU goes: a phase profile of ``acqhost serve`` under load.

For each load shape (connections x requests in flight per connection) it makes a fresh store
with one terminal per connection, starts ``python -m acqhost serve`` (one worker, SQLite) on a
free loopback port and drives it with the load generator (``acqhost-load run --prebuilt``), twice:

1. unprofiled: host CPU per sale and sales/s, the figures to compare with the echo server;
2. profiled: ``py-spy record --native --threads`` samples every thread of the host while the
   same load runs, and the samples are sorted into phases by the rules in ``PHASES``.

CPU, not wall time: a sample whose thread is waiting (epoll, a futex behind a lock, a
condition or the GIL, fsync's disk wait) is dropped (``is_waiting``). Each thread role (the
event loop's thread; all the others) has its user and system time measured from /proc in the
unprofiled pass; its samples in user space split the user time between the phases, its samples
in a system call (``SYSTEM_CALLS``) the system time (py-spy's stops catch threads at system
calls far more often than the time they spend in them). The sum, divided by the sales
answered, is the table's µs per sale: it adds up to the host's measured CPU, and a thread that
waits much does not weigh more for it. Sampling pauses the host (py-spy reads native stacks
from a stopped process), so the profiled pass answers fewer sales per second and costs more
per sale than the unprofiled one; both are printed.

In the same run, the floor: ``benchmarks/echo_server.py`` (a bare uvloop length-prefixed echo
server) driven by the same generator and shape (``--no-mac --echo``), CPU per message.

Needs py-spy in the virtual environment (``.venv/bin/pip install py-spy``) and the right to
trace the host (root, or ``kernel.yama.ptrace_scope`` 0). Loopback only; a few seconds per
measurement; every process it starts is stopped before it exits.

Run: ``python benchmarks/profile_sale.py [--shapes 64x1,8x4] [--duration S] [--out DIR]``;
``--from DIR`` reports again from a run's saved figures and stacks.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gzip
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "benchmarks"))

from e2e import load as e2e_load  # noqa: E402
from e2e import make_store, run_simple, stop  # noqa: E402

from simulators.processes import free_port, wait_listening  # noqa: E402

PY = sys.executable
PY_SPY = shutil.which("py-spy", path=str(Path(PY).parent)) or shutil.which("py-spy")

# -- the classification ------------------------------------------------------------------------
# A sample is a stack of frames, root first, each "function (file:line)" (Python) or
# "function (library or C file)" (native). Its phase: walking from the innermost frame out, the
# first frame that matches a pattern of a phase in PHASES (phases tried in the order listed
# for each frame); if no frame matches one, the first that matches a pattern of FALLBACK
# (modules whose code runs in several phases); else "other". A pattern is a substring of the
# frame's text. Phases whose code runs inside another phase's (encode inside the answer's MAC
# step, the log flush inside the write) match first because they are further in. Modules
# compiled with mypyc (acqhost.native) are native frames named CPyDef_<module>___<function>
# (or CPyPy_ for their Python-callable wrappers): matched by "<module>___" patterns.
PHASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("garbage collection", ("gc_collect_main", "gc_collect_with_callback", "gc_collect")),
    (
        "logging",
        (
            "acqhost/log/",
            "structlog/",
            "logging/__init__.py",
            "HostCore.flush_log",
            "_line___",
            "HostCore___flush_log",
        ),
    ),
    (
        "decode",
        (
            "<acqhost.wire.codec decode dispatch>",
            "<acqhost.wire.codec specialised decoder>",
            "decoder>",
            "Codec.decode",
            "peek_mti",
        ),
    ),
    (
        "encode",
        (
            "<acqhost.wire.codec encode dispatch>",
            "<acqhost.wire.codec specialised encoder>",
            "encoder>",
            "Codec.encode",
        ),
    ),
    ("MAC check", ("verify_mac (acqhost/host/stages.py", "stages___verify_mac")),
    ("MAC (answer)", ("HostCore.finish (acqhost/host/core.py", "HostCore___finish")),
    (
        "session and account lookup",
        (
            "acqhost/host/state.py",
            "known_terminal (",
            "signed_on (acqhost/host/stages.py",
            "state___HostState",
            "stages___known_terminal",
            "stages___signed_on",
        ),
    ),
    (
        "decisions (stages, context)",
        (
            "acqhost/host/",
            "acqhost/wire/tlv.py",
            "acqhost/runtime/dispatch.py",
            "acqhost/errors.py",
            "_core___",
            "_stages___",
            "_context___",
            "_answers___",
            "_sale___",
            "_tlv___",
            "_dispatch___",
        ),
    ),
    (
        "ledger: SQLite insert + commit (writer thread)",
        (
            "acqhost/store/",
            "apply_writes (acqhost/runtime/ledger.py",
            "ledger___apply_writes",
            "libsqlite3",
            "sqlite3",
            "pysqlite",
            "_sqlite",
            "fdatasync",
        ),
    ),
    (
        "ledger: hand-over between threads",
        (
            "acqhost/runtime/ledger.py",
            "_ledger___",
            "run_sync_in_worker_thread",
            "WorkerThread",
            "anyio/to_thread.py",
            "call_soon_threadsafe",
            "uv_async_send",
            "uv__async_io",
            "uv__async_send",
            "threading.py",
            "queue.py",
            "thread_run",
        ),
    ),
    (
        "read and frame",
        (
            "AsyncioConnection.data_received",
            "ConnectionCore.received",
            "AsyncioConnection___data_received",
            "ConnectionCore___received",
            "Answer____init__",
            "acqhost/wire/framing.py",
            "Answer.__init__",
            "uv__read",
            "uv__stream_io",
            "__uv_stream_on_read",
            "_ensure_handle_data",
        ),
    ),
    (
        "write",
        (
            "AsyncioConnection._send",
            "AsyncioConnection._wake",
            "ConnectionCore.output",
            "Answer.finish",
            "AsyncioConnection____send",
            "AsyncioConnection____wake",
            "ConnectionCore___output",
            "Answer___finish",
            "UVStream_write",
            "UVStream__",
            "uv_try_write",
            "uv__write",
            "uv_write",
        ),
    ),
)
FALLBACK: tuple[tuple[str, tuple[str, ...]], ...] = (
    # Domain helpers run in several phases (a MAC for the check and for the answer): their
    # caller's phase, found further out, counts first.
    ("decisions (stages, context)", ("acqhost/domain/", "_cards___")),
    (
        "event-loop overhead",
        (
            "loop.c",
            "uv_run",
            "uv__io_poll",
            "uv__run_",
            "uvloop",
            "asyncio/",
            "anyio/",
            "acqhost/runtime/",
            "_asyncio_driver___",
            "_connection___",
            "epoll",
        ),
    ),
)
ORDER = tuple(dict.fromkeys((*(name for name, _ in PHASES), *(name for name, _ in FALLBACK))))
ORDER += ("other",)

# Where a thread waits, off the CPU: the innermost named native frame of a sample (unnamed
# addresses after it are the system call wrappers inside the C library).
WAIT_FUNCTIONS = frozenset(
    (
        "epoll_wait",
        "epoll_pwait",
        "epoll_pwait2",
        "poll",
        "ppoll",
        "select",
        "pselect6",
        "nanosleep",
        "clock_nanosleep",
        "fdatasync",
        "fsync",
        "pthread_cond_wait",
        "pthread_cond_timedwait",
        "pthread_cond_clockwait",
        "sem_wait",
        "sem_timedwait",
        "sem_clockwait",
        "PyThread_acquire_lock_timed",
        "lock_PyThread_acquire_lock",
        "take_gil",
        "__lll_lock_wait",
        "futex_wait",
        "__futex_abstimed_wait_common",
    )
)

_NAME = re.compile(r"^(.*?) \(")


def frame_name(frame: str) -> str:
    m = _NAME.match(frame)
    return m.group(1) if m else frame


def parse_raw(text: str) -> list[tuple[int, list[str], int]]:
    """py-spy's ``--format raw --threads`` lines: (thread id, frames root first, count)."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")
        m = re.match(r"thread \((0x[0-9a-fA-F]+|\d+)\)", frames[0])
        tid = int(m.group(1), 0) if m else 0
        out.append((tid, frames[1:], int(count)))
    return out


def wait_addresses(samples: list[tuple[int, list[str], int]]) -> set[str]:
    """The unnamed innermost addresses seen right under a wait function: the futex system
    call wrappers of this run's C library, also reached through frames py-spy cannot name."""
    found = set()
    for _, frames, _ in samples:
        if len(frames) >= 2 and frames[-1].startswith("0x"):
            i = len(frames) - 1
            while i > 0 and frames[i].startswith("0x"):
                i -= 1
            if frame_name(frames[i]) in WAIT_FUNCTIONS:
                found.add(frames[-1].split(" ", 1)[0])
    return found


def is_waiting(frames: list[str], futex: set[str]) -> bool:
    if not frames:
        return True
    if frames[-1].startswith("0x") and frames[-1].split(" ", 1)[0] in futex:
        return True
    i = len(frames) - 1
    while i > 0 and frames[i].startswith("0x"):
        i -= 1
    return frame_name(frames[i]) in WAIT_FUNCTIONS


def phase_of(frames: list[str]) -> str:
    for rules in (PHASES, FALLBACK):
        for frame in reversed(frames):
            for name, patterns in rules:
                for pattern in patterns:
                    if pattern in frame:
                        return name
    return "other"


# System calls: a sample whose innermost named frame is one of these is in the kernel. py-spy
# stops the host to read native stacks, and a thread is caught at a system call far more often
# than the time it spends in them (measured: ~65% of the event loop's samples against ~25% of
# its CPU time in the kernel), so samples in the kernel and in user space each split only the
# CPU time /proc counts for their mode.
SYSTEM_CALLS = frozenset(
    (
        "read", "write", "writev", "readv", "pread64", "pwrite64", "fcntl64", "fcntl",
        "getpid", "sem_post", "pthread_cond_signal", "pthread_cond_broadcast", "epoll_ctl",
        "sendmsg", "recvmsg", "send", "recv", "sendto", "recvfrom", "accept4", "close",
        "openat", "fstat", "lseek", "futex", "syscall", "mmap", "munmap", "madvise", "brk",
        "clock_gettime",
    )
)  # fmt: skip


def in_kernel(frames: list[str]) -> bool:
    i = len(frames) - 1
    while i > 0 and frames[i].startswith("0x"):
        i -= 1
    return frame_name(frames[i]) in SYSTEM_CALLS


def classify(
    samples: list[tuple[int, list[str], int]],
) -> tuple[dict[int, dict[str, Counter[str]]], int]:
    """Per thread and mode ("user", "system"), the samples on the CPU counted by phase; and the
    waiting samples dropped."""
    futex = wait_addresses(samples)
    by_thread: dict[int, dict[str, Counter[str]]] = defaultdict(
        lambda: {"user": Counter(), "system": Counter()}
    )
    waiting = 0
    for tid, frames, count in samples:
        if is_waiting(frames, futex):
            waiting += count
        else:
            mode = "system" if in_kernel(frames) else "user"
            by_thread[tid][mode][phase_of(frames)] += count
    return by_thread, waiting


# -- processes ---------------------------------------------------------------------------------
def thread_cpu(pid: int) -> dict[int, tuple[float, float]]:
    """CPU seconds (user, system) of each thread of ``pid``, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        out[int(task.name)] = (int(fields[11]) / tick, int(fields[12]) / tick)
    return out


def load(
    port: int, keys: list[Path], shape: tuple[int, int], args: argparse.Namespace, *extra: str
) -> dict[str, Any]:
    """One acqhost-load run of prebuilt sales at ``shape`` (connections, depth in flight)."""
    result = e2e_load(port, keys, _load_args(shape, args), *extra)
    if result["sample_failures"]:
        raise SystemExit(f"sales not approved: {result['sample_failures']}")
    return result


def _load_args(shape: tuple[int, int], args: argparse.Namespace) -> argparse.Namespace:
    """What e2e.py's load takes: the shape, this script's duration, prebuilt sales for it."""
    connections, depth = shape
    return argparse.Namespace(connections=connections, depth=depth, duration=args.duration,
                              frames=int(args.duration * 50_000))  # fmt: skip


def echo_floor(
    keys: list[Path], shape: tuple[int, int], args: argparse.Namespace
) -> dict[str, Any]:
    """The bare echo server at ``shape``: its CPU per message (``cpu_us``), in this run."""
    run = _load_args(shape, args)
    result = run_simple("echo_server.py", [], keys, run, "--no-mac", "--no-signon", "--repeat")
    result["cpu_us"] = result["host_cpu_us"]
    return result


def profile_host(
    base: Path, keys: list[Path], shape: tuple[int, int], args: argparse.Namespace
) -> dict[str, Any]:
    port = free_port()
    log = (base / "host.log").open("wb")
    proc = subprocess.Popen(
        [PY, "-m", "acqhost", "serve", "--db", str(base / "acqhost.db"), "--port", str(port),
         "--backend", "asyncio", "--workers", "1", "--log-level", args.log_level],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    spy: subprocess.Popen[bytes] | None = None
    try:
        wait_listening(port, proc, 20)
        before = thread_cpu(proc.pid)
        plain = load(port, keys, shape, args, "--stan-start", "0")
        plain_cpu = by_role(proc.pid, before, thread_cpu(proc.pid))
        raw = base / "stacks.txt"
        assert PY_SPY is not None
        spy = subprocess.Popen(
            [PY_SPY, "record", "--pid", str(proc.pid), "--rate", str(args.rate),
             "--format", "raw", "--native", "--threads", "--function",
             "--output", str(raw)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        time.sleep(1.0)  # attached (its first samples are of an idle host)
        if spy.poll() is not None:
            assert spy.stderr is not None
            raise SystemExit(f"py-spy failed: {spy.stderr.read().decode()[-2000:]}")
        before = thread_cpu(proc.pid)
        profiled = load(port, keys, shape, args, "--stan-start", "5000000")
        profiled_cpu = by_role(proc.pid, before, thread_cpu(proc.pid))
        stop(spy, signal.SIGINT)  # py-spy writes its file on SIGINT
        spy = None
        samples = parse_raw(raw.read_text())
    finally:
        if spy is not None:
            stop(spy, signal.SIGINT)
        stop(proc)
        log.close()
    return {
        "plain": plain,
        "plain_cpu": plain_cpu,
        "profiled": profiled,
        "profiled_cpu": profiled_cpu,
        "main": proc.pid,
        "samples": samples,
    }


def by_role(
    pid: int, before: dict[int, tuple[float, float]], after: dict[int, tuple[float, float]]
) -> dict[str, tuple[float, float]]:
    """CPU seconds (user, system) between ``before`` and ``after``: of the event loop's thread
    (the main one) and of all the others together (the ledger writer, the libuv pool)."""
    out = {"event loop": [0.0, 0.0], "other threads": [0.0, 0.0]}
    for tid, (user, system) in after.items():
        u0, s0 = before.get(tid, (0.0, 0.0))
        role = out["event loop" if tid == pid else "other threads"]
        role[0] += user - u0
        role[1] += system - s0
    return {k: (v[0], v[1]) for k, v in out.items()}


# -- the report --------------------------------------------------------------------------------
def phase_table(run: dict[str, Any], rate: int) -> tuple[list[str], dict[str, float]]:
    """µs per sale by phase: each thread role's user and system CPU per sale in the unprofiled
    pass, split by the shares of that role's samples in user space and in the kernel in the
    profiled pass."""
    by_thread, waiting = classify(run["samples"])
    roles: dict[str, dict[str, Counter[str]]] = {
        role: {"user": Counter(), "system": Counter()} for role in ("event loop", "other threads")
    }
    for tid, modes in by_thread.items():
        role = roles["event loop" if tid == run["main"] else "other threads"]
        for mode, counts in modes.items():
            role[mode].update(counts)
    us: dict[str, float] = defaultdict(float)
    plain_sales = run["plain"]["answered"]
    for role, (user, system) in run["plain_cpu"].items():
        for mode, seconds in (("user", user), ("system", system)):
            counts = roles[role][mode]
            n = sum(counts.values())
            if not n:
                us["other"] += seconds / plain_sales * 1e6
                continue
            for phase, c in counts.items():
                us[phase] += seconds * c / n / plain_sales * 1e6
    total = sum(us.values())
    lines = [f"{'phase':<48}{'µs/sale':>9}{'share':>8}"]
    for phase in ORDER:
        if us.get(phase):
            lines.append(f"{phase:<48}{us[phase]:>9.1f}{us[phase] / total:>8.1%}")
    lines.append(f"{'total host CPU per sale (unprofiled pass)':<48}{total:>9.1f}")
    on_cpu = sum(sum(c.values()) for modes in roles.values() for c in modes.values())
    profiled_sales = run["profiled"]["answered"]
    profiled_total = sum(u + s for u, s in run["profiled_cpu"].values())
    lines.append(
        f"profiled pass: {profiled_total / profiled_sales * 1e6:.1f} µs/sale measured; samples "
        f"on CPU {on_cpu:,} ({on_cpu / rate:.2f} s at {rate}/s) against {profiled_total:.2f} s "
        f"measured; waiting samples dropped: {waiting:,}"
    )
    for name, modes in roles.items():
        (u, s), (pu, ps) = run["plain_cpu"][name], run["profiled_cpu"][name]
        lines.append(
            f"  {name}: user {u / plain_sales * 1e6:.1f} + system {s / plain_sales * 1e6:.1f}"
            f" µs/sale (profiled pass {pu / profiled_sales * 1e6:.1f} + "
            f"{ps / profiled_sales * 1e6:.1f}); samples on CPU: "
            f"{sum(modes['user'].values()):,} user, {sum(modes['system'].values()):,} system"
        )
    return lines, us


def top_stacks(run: dict[str, Any], phase: str, n: int) -> list[str]:
    """The innermost frames of the heaviest stacks of ``phase`` (for refining the rules)."""
    futex = wait_addresses(run["samples"])
    c: Counter[str] = Counter()
    for _, frames, count in run["samples"]:
        if not is_waiting(frames, futex) and phase_of(frames) == phase:
            c[" <- ".join(frame_name(f) for f in reversed(frames[-6:]))] += count
    return [f"{v:>6}  {k}" for k, v in c.most_common(n)]


def shape_report(run: dict[str, Any], echo: dict[str, Any], args: argparse.Namespace) -> list[str]:
    plain, profiled = run["plain"], run["profiled"]
    lines, us = phase_table(run, args.rate)
    cpu_us = sum(us.values())
    connections, depth = run["shape"]
    report = [
        "",
        f"== {connections} connections x {depth} in flight ({connections} terminals) ==",
        f"unprofiled: {plain['tps']:,.0f} sales/s, p50 {plain['p50_ms']:.2f} ms, "
        f"p99 {plain['p99_ms']:.2f} ms, host CPU {cpu_us:.1f} µs/sale",
        f"profiled:   {profiled['tps']:,.0f} sales/s",
        f"echo server: {echo['tps']:,.0f} messages/s, {echo['cpu_us']:.1f} µs/message; "
        f"acqhost / echo = {cpu_us / echo['cpu_us']:.1f}x",
        *lines,
    ]
    if args.explain:
        for phase in ORDER:
            report += [f"-- {phase}", *top_stacks(run, phase, 8)]
    return report


def save(out: Path, run: dict[str, Any], echo: dict[str, Any]) -> None:
    """The run's figures (JSON) and its stacks (gzipped, one line a stack: ``thread (tid);``
    frames root first, then the count), from which ``--from`` reports again."""
    name = "{}x{}".format(*run["shape"])
    figures = {k: v for k, v in run.items() if k != "samples"}
    (out / f"figures-{name}.json").write_text(json.dumps({"run": figures, "echo": echo}) + "\n")
    stacks = "".join(
        f"thread ({tid});{';'.join(frames)} {count}\n" for tid, frames, count in run["samples"]
    )
    (out / f"stacks-{name}.txt.gz").write_bytes(gzip.compress(stacks.encode()))


def load_saved(out: Path) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    runs = []
    for figures in sorted(out.glob("figures-*.json")):
        data = json.loads(figures.read_text())
        run = data["run"]
        name = figures.stem.removeprefix("figures-")
        run["samples"] = parse_raw(
            gzip.decompress((out / f"stacks-{name}.txt.gz").read_bytes()).decode()
        )
        runs.append((run, data["echo"]))
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default="64x1,8x4", help="connections x in flight, comma list")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per load pass")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--log-level", default="info", help="the host's log level")
    parser.add_argument("--out", help="directory for the figures, the raw stacks and the report")
    parser.add_argument("--from", dest="saved", help="report again from an --out directory")
    parser.add_argument("--explain", action="store_true", help="also print the top stacks")
    args = parser.parse_args()
    if args.saved:
        for run, echo in load_saved(Path(args.saved)):
            print("\n".join(shape_report(run, echo, args)))
        return 0
    if PY_SPY is None:
        raise SystemExit("py-spy not found: .venv/bin/pip install py-spy")
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    report = [
        f"{datetime.date.today()}: acqhost serve, 1 worker, asyncio (uvloop), SQLite, host log "
        f"level {args.log_level}, loopback; {args.duration:g} s per pass; py-spy "
        f"{args.rate}/s, --native --threads; CPython {sys.version.split()[0]}, "
        f"{os.cpu_count()} cores; PYTHONUNBUFFERED={os.environ.get('PYTHONUNBUFFERED', '')!r}"
    ]
    print(report[0], flush=True)
    for shape_text in args.shapes.split(","):
        connections, depth = (int(x) for x in shape_text.split("x"))
        base = Path(tempfile.mkdtemp(prefix="acqhost-profile-"))
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                keys = make_store(base, connections)
            echo = echo_floor(keys, (connections, depth), args)
            run = profile_host(base, keys, (connections, depth), args)
        finally:
            shutil.rmtree(base, ignore_errors=True)
        run["shape"] = [connections, depth]
        lines = shape_report(run, echo, args)
        print("\n".join(lines), flush=True)
        report += lines
        if out is not None:
            save(out, run, echo)
    if out is not None:
        (out / "report.txt").write_text("\n".join(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
