"""The Locust user class (simulators/locustfile.py) against a real host on loopback.

Locust is an optional extra (``acqhost[locust]``) and gevent-patches the process that imports
it, so it runs here only as a subprocess, and these tests are skipped without it.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from acqhost.cli import main as acqhost
from simulators.load.register import register_terminals
from simulators.processes import free_port, stop, wait_listening

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("locust") is None, reason="locust not installed (acqhost[locust])"
)

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = ROOT / "simulators" / "locustfile.py"
USERS = 4


@pytest.fixture
def host(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A host serving a fresh store with USERS load terminals: its port and the key files."""
    db = str(tmp_path / "acqhost.db")
    assert acqhost(["init", "--db", db]) == 0
    keys = tmp_path / "keys"
    register_terminals(db, USERS, str(keys))
    port = free_port()
    log = (tmp_path / "host.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "acqhost", "serve", "--db", db, "--port", str(port),
         "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
    )  # fmt: skip
    try:
        wait_listening(port, proc)
        yield port, keys
    finally:
        stop(proc, seconds=10)
        log.close()


def _locust(
    port: int, keys: Path, folder: Path, mix: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, ACQHOST_LOAD_KEYS_DIR=str(keys), ACQHOST_LOAD_MIX=mix)
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
           "-u", str(USERS), "-r", str(USERS), "-t", "4s", "--host", f"tcp://127.0.0.1:{port}",
           "--only-summary", "--skip-log-setup", *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=60)


def test_locust_drives_the_host_and_counts_every_kind(host: tuple[int, Path], tmp_path: Path):
    port, keys = host
    prefix = tmp_path / "run"
    out = _locust(port, keys, tmp_path, "sale=80,test_sale=5,reversal=15", "--csv", str(prefix))
    assert out.returncode == 0, out.stderr[-3000:]  # Locust exits 1 on any failure
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    signon, sale = rows[("0800", "signon")], rows[("0200", "sale")]
    assert int(signon["Request Count"]) == USERS and int(signon["Failure Count"]) == 0
    assert int(sale["Request Count"]) > 100 and int(sale["Failure Count"]) == 0
    assert int(rows[("0400", "reversal")]["Request Count"]) > 0
    assert int(rows[("0200", "test_sale")]["Request Count"]) > 0
    total = rows[("", "Aggregated")]
    assert int(total["Failure Count"]) == 0
    assert int(total["Request Count"]) == sum(
        int(r["Request Count"]) for key, r in rows.items() if key[0]
    )


def test_workers_of_a_distributed_run_share_the_terminals_out(host: tuple[int, Path], tmp_path):
    """A master and two worker processes, USERS users on USERS terminals: each worker drives
    its own half (two users on one terminal would undo each other's sign-on: bad MACs)."""
    port, keys = host
    prefix = tmp_path / "dist"
    out = _locust(port, keys, tmp_path, "sale=1", "--processes", "2", "--csv", str(prefix))
    assert out.returncode == 0, out.stderr[-3000:]
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    assert int(rows[("0800", "signon")]["Request Count"]) == USERS
    assert int(rows[("0200", "sale")]["Request Count"]) > 100
    assert int(rows[("", "Aggregated")]["Failure Count"]) == 0


def test_a_bad_mix_stops_locust_with_a_message(host: tuple[int, Path], tmp_path: Path):
    port, keys = host
    out = _locust(port, keys, tmp_path, "sale=80,refund=20")
    assert out.returncode != 0
    assert "ACQHOST_LOAD_MIX 'sale=80,refund=20'" in out.stderr
