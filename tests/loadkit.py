"""Helpers for the acqhost-load tests: a real host in a process of its own on a loopback port
(the load tester runs its own event loop), its load terminals, and acqhost-load run in this
process (``cli.main``) or in one of its own (exit codes, stderr, ``--processes``)."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from acqhost.cli import main as acqhost
from acqhost.store import StoredSale, open_store
from simulators.load.cli import main as load_main
from simulators.load.register import register_terminals
from simulators.processes import free_port, stop, wait_listening

REPO = Path(__file__).parent.parent
SAMPLE = REPO / "simulators" / "traffic" / "sample.jsonl"


@dataclass
class Host:
    """A host serving store ``db`` on ``port``, with load terminals whose key files are in
    ``keys_dir``."""

    folder: Path
    db: str
    port: int
    keys_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    capture: Path | None = None
    log: Path = field(default_factory=Path)

    def target(self) -> list[str]:
        return ["--port", str(self.port), "--keys-dir", str(self.keys_dir), "--quiet"]

    def sales(self) -> list[StoredSale]:
        store = open_store(self.db)
        try:
            return [s for p in sorted(self.keys_dir.glob("*.json")) for s in store.sales(p.stem)]
        finally:
            store.close()


def make_store(folder: Path, terminals: int) -> tuple[str, Path]:
    """A fresh SQLite store with ``terminals`` load terminals (register.py) and their keys."""
    db = str(folder / "acqhost.db")
    with contextlib.redirect_stdout(io.StringIO()):
        assert acqhost(["init", "--db", db]) == 0
    keys_dir = folder / "keys"
    register_terminals(db, terminals, str(keys_dir))
    return db, keys_dir


@contextlib.contextmanager
def serving(folder: Path, terminals: int = 2, *, capture: bool = False) -> Iterator[Host]:
    """``python -m acqhost serve`` on a fresh store until the block ends (then stopped)."""
    db, keys_dir = make_store(folder, terminals)
    port = free_port()
    host = Host(folder, db, port, keys_dir, log=folder / "serve.log")
    argv = [sys.executable, "-m", "acqhost", "serve", "--db", db, "--port", str(port)]
    if capture:
        host.capture = folder / "capture.jsonl"
        argv += ["--capture", str(host.capture)]
    with open(host.log, "wb") as log:
        host.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    try:
        wait_listening(port, host.proc)
        yield host
    finally:
        stop(host.proc, seconds=10)


def run_load(argv: Sequence[str]) -> tuple[int, dict[str, Any]]:
    """``acqhost-load ARGV --json`` in this process: the exit code and the JSON report."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = load_main([*argv, "--json"])
    text = out.getvalue()
    return status, (json.loads(text) if text.strip() else {})


def run_load_process(argv: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``acqhost-load ARGV`` as a process of its own (text stdout and stderr)."""
    return subprocess.run(
        [sys.executable, "-m", "simulators.load.cli", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def check_adds_up(report: dict[str, Any]) -> None:
    """The report's invariants: every request sent ends once, in one of answered, timeouts
    and errors; per MTI, per response code and per second, the same requests again."""
    sent = report["sent"]
    assert sent == report["answered"] + report["timeouts"] + report["errors"], report
    assert sum(report["by_mti"].values()) == sent, report["by_mti"]
    assert sum(report["by_rc"].values()) == sent, report["by_rc"]
    assert report["by_rc"].get("timeout", 0) == report["timeouts"]
    assert report["by_rc"].get("error", 0) == report["errors"]
    series = report["series"]
    for name in ("sent", "answered", "timeouts", "errors"):
        assert sum(s[name] for s in series) == report[name], (name, series)


def wait_lines(path: Path, count: int, seconds: float = 5.0) -> list[str]:
    """The lines of ``path`` once it has at least ``count`` (a capture is written a few times
    a second)."""
    deadline = time.monotonic() + seconds
    while True:
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)
