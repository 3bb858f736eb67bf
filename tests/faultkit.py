"""What the fault tests (tests/test_faults_*.py) and the long fault run (benchmarks/faults.py)
share: terminals running a mix of traffic that keeps what the host acknowledged, the checks
of the store against it, the processes of a host (its workers found, killed), and a
PostgreSQL cluster of the test's own that it can stop and start."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from acqhost.domain import advices, audit
from acqhost.domain.crypto import HostKeys
from acqhost.store import open_store
from acqhost.wire.tlv import decode_tlv
from simulators.processes import free_port
from simulators.terminal import Exchange, TerminalClient, TerminalError
from tests.hostkit import BANK, HOLDER, HostSetup
from tests.test_banklink_faults import add_terminals, log_events

# Settlement accounts a terminal's rebinds alternate between (Luhn-valid, not the first one).
NEW_ACCOUNTS = ("6222020200112233453", "6222020200112233461")
# A policy that lets a short run see changes submitted, approved and made ACTIVE.
REBIND_POLICY = '[rebind]\nreview = "auto"\ncooling_off = 0\nmin_interval = 0\n'
# What a terminal meets when the host it talks to goes away (killed, restarting).
GONE = (
    TerminalError,
    OSError,
    TimeoutError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
)
VERSION_STATES_ADVISED = ("ACTIVE", "VERIFIED")  # each has had its 0320 queued


@dataclass
class Acked:
    """What terminals were told: sales approved (by tid, stan, date: the request with its 37),
    reversals approved (RRNs), batches closed, rebinds accepted; every answer code counted."""

    sales: dict[tuple[str, str, str], dict[str, str]] = field(default_factory=dict)
    reversed: set[str] = field(default_factory=set)
    closed: set[tuple[str, int]] = field(default_factory=set)
    rebinds: list[str] = field(default_factory=list)
    codes: Counter[str] = field(default_factory=Counter)
    broken: int = 0  # connections that failed under a request (host gone)
    latencies: dict[str, list[float]] = field(default_factory=dict)  # by code: seconds

    def note(self, ex: Exchange, seconds: float) -> str:
        rc = ex.rc
        self.codes[rc] += 1
        self.latencies.setdefault(rc, []).append(seconds)
        return rc

    def summary(self) -> str:
        codes = " ".join(f"{rc}:{n}" for rc, n in sorted(self.codes.items()))
        return (
            f"sales approved {len(self.sales)}, reversals {len(self.reversed)}, batches closed "
            f"{len(self.closed)}, rebinds {len(self.rebinds)}; answers {codes}; "
            f"connections broken {self.broken}"
        )


async def terminal_mix(
    key_file: dict[str, Any],
    acked: Acked,
    stop: anyio.Event,
    *,
    rebind: bool = False,
    timeout: float = 3.0,
    pause: float = 0.0,
) -> None:
    """One terminal until ``stop``: sales, a reversal of an approved sale of the open batch
    every 6th request, a batch close (with the host's totals) every 20th, and, with
    ``rebind``, a change of its settlement account every 25th. When the host goes away it
    connects (and signs on) again."""
    client = TerminalClient(key_file, timeout=timeout)
    approved: list[Exchange] = []
    n = 0
    while not stop.is_set():
        try:
            await client.connect()
            if (await client.sign_on()).rc != "00":
                raise TerminalError("sign-on refused")
            while not stop.is_set():
                n += 1
                started = time.monotonic()
                if n % 20 == 0:
                    for ex in await client.settle_as_host_says():
                        acked.note(ex, time.monotonic() - started)
                    if ex.rc == "00":
                        acked.closed.add((client.tid, int(ex.tlv["BN"])))
                        approved.clear()  # settled: no longer reversible
                elif n % 6 == 0 and approved:
                    original = approved.pop(random.randrange(len(approved)))
                    if acked.note(await client.reverse(original), time.monotonic() - started) == (
                        "00"
                    ):
                        acked.reversed.add(original.response["37"])
                elif rebind and n % 25 == 0:
                    account = NEW_ACCOUNTS[(n // 25) % 2]
                    ex = await client.rebind_submit(
                        operator_id="01", password="0000", holder=HOLDER, bank_code=BANK,
                        account=account,
                    )  # fmt: skip
                    if acked.note(ex, time.monotonic() - started) == "00":
                        acked.rebinds.append(ex.tlv["RF"])
                else:
                    ex = await client.sale(100 + n % 900)
                    if acked.note(ex, time.monotonic() - started) == "00":
                        key = (client.tid, ex.request["11"], ex.request["13"])
                        acked.sales[key] = dict(ex.request, **{"37": ex.response["37"]})
                        approved.append(ex)
                if pause:
                    await anyio.sleep(pause)
        except GONE:
            acked.broken += 1
        finally:
            await client.close()
        if not stop.is_set():
            await anyio.sleep(0.05)


async def retransmissions_refused(key_file: dict[str, Any], acked: Acked, most: int) -> int:
    """Send again up to ``most`` of the terminal's approved sales (spread over the run): each
    must be answered 94. How many were sent."""
    mine = [s for (tid, _, _), s in acked.sales.items() if tid == key_file["tid"]]
    sample = mine[:: max(1, len(mine) // most)][:most]
    async with TerminalClient(key_file, timeout=5.0) as client:
        assert (await client.sign_on()).rc == "00"
        for sale in sample:
            request = {k: v for k, v in sale.items() if k != "37"}
            ex = await client.request(request)
            assert ex.rc == "94", (sale["41"], sale["11"], ex.rc)
    return len(sample)


def four_terminals(setup: HostSetup, *extra: str) -> list[str]:
    """TERM0003 and TERM0004 besides make_host's two, their key files in ``setup``."""
    tids = list(add_terminals(setup, *extra))
    for tid in tids[2:]:
        setup.key_files[tid] = json.loads((setup.folder / f"{tid}.json").read_text())
    setup.with_port(setup.config.port)
    return tids


# -- the store against what was acknowledged -------------------------------------------------


def check_store(db: str, key_path: Path, tids: list[str], acked: Acked) -> dict[str, int]:
    """Every approved sale in the ledger once with its RRN, every approved reversal reversed;
    each terminal's account versions numbered 1..n, each sale settling to one of them; one
    0320 per version made ACTIVE and one 0520 per closed batch and account version, with the
    batch's totals, and nothing else in the outbox; the audit log's chain whole. Counts of
    what was checked."""
    data_key = HostKeys.load(key_path).data_key
    store = open_store(db)
    try:
        stored = {}
        rrns: Counter[str] = Counter()
        for tid in tids:
            for sale in store.sales(tid):
                stored[(sale.tid, sale.stan, sale.local_date)] = sale
                rrns[sale.rrn] += 1
        assert [r for r, n in rrns.items() if n > 1] == [], "an RRN stored twice"
        for key, request in acked.sales.items():
            sale = stored.get(key)
            assert sale is not None, f"approved sale {key} not in the ledger"
            assert int(sale.rrn) == int(request["37"]), (key, sale.rrn, request["37"])
            assert sale.amount == int(request["4"]), key
        by_rrn = {int(s.rrn): s for s in stored.values()}
        for rrn in acked.reversed:
            assert by_rrn[int(rrn)].status == "reversed", f"approved reversal of {rrn} lost"

        expected: Counter[tuple[Any, ...]] = Counter()
        closed = 0
        with store.transaction(write=False) as tx:
            for tid in tids:
                versions = tx.versions(tid)
                numbers = [v.version for v in versions]
                assert numbers == list(range(1, len(versions) + 1)), (tid, numbers)
                pending = [v for v in versions if v.state == "PENDING_REVIEW"]
                assert len(pending) <= 1, (tid, pending)
                for v in versions:
                    if v.state in VERSION_STATES_ADVISED:
                        expected[("0320", tid, str(v.version))] += 1
                assert {s.account_version for s in stored.values() if s.tid == tid} <= set(
                    numbers
                ), tid
                open_no = tx.open_batch(tid).batch_no  # type: ignore[union-attr]
                for batch_no in range(1, open_no):
                    closed += 1
                    for t in tx.batch_totals(tid, batch_no):
                        key = ("0520", tid, str(t.account_version), batch_no, t.count, t.amount)
                        expected[key] += 1
                assert {(t, b) for t, b in acked.closed if t == tid} <= {
                    (tid, b) for b in range(1, open_no)
                }, tid
        queued: Counter[tuple[Any, ...]] = Counter()
        for stored_advice in store.advices():
            fields = advices.open_advice(data_key, stored_advice).fields
            tlv = decode_tlv(fields["48"])
            if stored_advice.mti == "0320":
                queued[("0320", stored_advice.tid, tlv["SV"])] += 1
            else:
                key = ("0520", stored_advice.tid, tlv["SV"], int(tlv["BN"]), int(tlv["CT"]),
                       int(tlv["AM"]))  # fmt: skip
                queued[key] += 1
        missing, extra = expected - queued, queued - expected
        assert not missing and not extra, f"outbox: missing {dict(missing)}, extra {dict(extra)}"
        entries, problems = audit.verify(store, data_key)
        assert problems == [], problems
        return {"sales": len(stored), "batches_closed": closed, "advices": sum(queued.values()),
                "audit_entries": entries}  # fmt: skip
    finally:
        store.close()


# -- processes -------------------------------------------------------------------------------


def workers_of(pid: int) -> list[int]:
    """The ``--workers`` processes of the host whose parent is ``pid`` (not multiprocessing's
    resource tracker)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    found = []
    for child in children:
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            found.append(int(child))
    return found


def victim_worker(pid: int, log: Path) -> int | None:
    """A worker of the host ``pid`` to kill: the one holding a bank's lease (taken as its log
    ``log`` says) when one does, so that another must take the deliveries over."""
    workers = workers_of(pid)
    owners = {int(e["owner"].split(":")[1]) for e in log_events(log, "bank lease taken")}
    return next((w for w in workers if w in owners), workers[0] if workers else None)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the host and its workers at once (it was started in a session of its own)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


# -- a PostgreSQL cluster of one's own -------------------------------------------------------


def postgres_bin() -> Path | None:
    """The newest Debian PostgreSQL server binaries (initdb, pg_ctl), or None."""
    found = []
    for path in Path("/usr/lib/postgresql").glob("*/bin"):
        if path.parent.name.isdigit() and (path / "initdb").exists() and (path / "pg_ctl").exists():
            found.append((int(path.parent.name), path))
    return max(found)[1] if found else None


class Cluster:
    """A throwaway PostgreSQL cluster: data and socket directory in a temporary directory, a
    free port, trust authentication for role ``acqhost``. Run as user ``postgres`` when this
    process is root (the server refuses to run as root)."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="acqhost-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = "postgres"
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.url = f"postgresql://acqhost@/postgres?host={self.root}&port={self.port}"

    def _run(self, *argv: str) -> None:
        done = subprocess.run(
            [str(self.bin / argv[0]), *argv[1:]], user=self.user, capture_output=True,
            text=True, cwd=self.root, timeout=60,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {done.stdout}{done.stderr}")

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "acqhost", "-A", "trust", "--no-sync")

    def start(self) -> None:
        options = f"-k {self.root} -p {self.port} -c listen_addresses='' -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w",
                  "start")  # fmt: skip

    def stop(self, mode: str = "immediate") -> None:
        """``immediate``: as a crash does, every connection cut, recovery at the next start."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(RuntimeError):  # not running
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def cluster(bin_dir: Path) -> Iterator[Cluster]:
    """A started throwaway cluster, removed afterwards."""
    pg = Cluster(bin_dir)
    try:
        pg.init()
        pg.start()
        yield pg
    finally:
        pg.remove()
