"""A SQLite store whose disk fills up under load: sales are answered 96 (never 00 without
being durable), the host says so in one line without card data, the file stays intact
(``PRAGMA integrity_check``) with every sale answered 00 in it, and once space returns the
same host process approves again.

How the disk fills, chosen at run time:
- ``tmpfs``: the store on a size-limited tmpfs mounted for the test, filled up with a file
  (the real thing: writes fail with ENOSPC, SQLite says SQLITE_FULL). It needs the right to
  mount (root); elsewhere it is skipped.
- ``fsize``: the host process's RLIMIT_FSIZE lowered from outside (``prlimit``) to the size of
  its database file, so the WAL cannot grow (writes fail with EFBIG or are cut short, as when
  a quota or a full disk stops them part-way); raised again to give the space back. Works for
  any user, so it runs everywhere. Python ignores SIGXFSZ, so the process is not killed.
``PRAGMA max_page_count`` would make SQLite refuse the pages by itself, without a failing
write, so it is not used."""

from __future__ import annotations

import errno
import resource
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest

from simulators.processes import free_port, wait_listening
from simulators.terminal import TEST_PAN, TerminalClient
from tests.faultkit import Acked, check_store
from tests.hostkit import ACCOUNT, make_host
from tests.test_banklink_faults import log_events

ROOT = Path(__file__).resolve().parents[1]


class Space:
    """Where the store lives, and how its space is taken away and given back."""

    def __init__(self, how: str, folder: Path) -> None:
        self.how = how
        self.folder = folder
        self.pid = 0  # the host process (fsize)
        self.db = folder / "acqhost.db"

    def fill(self) -> None:
        if self.how == "tmpfs":
            with open(self.folder / "filler", "wb") as filler:
                try:
                    while True:
                        filler.write(b"\0" * 65536)
                        filler.flush()
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
        else:
            limit = self.db.stat().st_size
            resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    def free(self) -> None:
        if self.how == "tmpfs":
            (self.folder / "filler").unlink()
        else:
            unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
            resource.prlimit(self.pid, resource.RLIMIT_FSIZE, unlimited)


@contextmanager
def limited_space(how: str, tmp_path: Path) -> Iterator[Space]:
    if how == "fsize":
        yield Space(how, tmp_path)
        return
    folder = tmp_path / "disk"
    folder.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(folder)]
    try:
        done = subprocess.run(mount, capture_output=True, timeout=10)
    except OSError as e:  # no mount command
        pytest.skip(f"cannot mount a tmpfs: {e}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield Space(how, folder)
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True, timeout=10)


def start_host(db: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """The host, its output through a pipe into ``log``: a file it wrote itself would be
    held to its RLIMIT_FSIZE too."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "acqhost", "serve", "--db", str(db), "--port", str(port),
         "--log-level", "info"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip

    def copy() -> None:
        assert proc.stdout is not None
        with log.open("ab") as out:
            for line in proc.stdout:
                out.write(line)
                out.flush()

    threading.Thread(target=copy, daemon=True).start()
    wait_listening(port, proc)
    return proc


@pytest.mark.parametrize("how", ["tmpfs", "fsize"])
def test_a_full_disk_answers_96_corrupts_nothing_and_recovers(how: str, tmp_path: Path) -> None:
    with limited_space(how, tmp_path) as space:
        setup = make_host(space.folder)
        port = free_port()
        setup.with_port(port)
        log = tmp_path / "host.log"
        proc = start_host(space.db, port, log)
        space.pid = proc.pid
        acked = Acked()
        full: list[str] = []

        async def sell(client: TerminalClient, until: str | None, most: int) -> None:
            """``most`` sales, each approved; or, with ``until``, sales until one is answered
            that (within ``most``)."""
            for _ in range(most):
                ex = await client.sale(100)
                rc = acked.note(ex, 0.0)
                if rc == "00":
                    key = (client.tid, ex.request["11"], ex.request["13"])
                    acked.sales[key] = dict(ex.request, **{"37": ex.response["37"]})
                if rc == until:
                    return
                assert until is not None or rc == "00", rc
            assert until is None, f"no {until} in {most} sales: {acked.codes}"

        async def traffic() -> None:
            async with TerminalClient(setup.key_files["TERM0001"], timeout=5.0) as client:
                assert (await client.sign_on()).rc == "00"
                await sell(client, None, 50)
                space.fill()
                # The WAL grows with every commit: soon there is no room for the next one.
                await sell(client, "96", 5000)
                for _ in range(10):
                    full.append(acked.note(await client.sale(100), 0.0))
                assert (await client.echo()).rc == "00"  # what needs no write still works
                # A batch close cannot be written either: 96, and the batch stays open.
                count = len(acked.sales)
                assert (await client.settle(1, count, 100 * count)).rc == "96"
                space.free()
                await sell(client, "00", 20)  # at once, without a restart
                await sell(client, None, 50)
                count = len(acked.sales)
                assert (await client.settle(1, count, 100 * count)).rc == "00"

        try:
            anyio.run(traffic)
            assert proc.poll() is None, "the host died of a full disk"
        finally:
            proc.terminate()
            assert proc.wait(timeout=15) == 0
        assert full == ["96"] * 10, full
        with sqlite3.connect(space.db) as db:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        check_store(str(space.db), setup.config.key_path, ["TERM0001", "TERM0002"], acked)
    outage = log_events(log, "store unavailable")
    assert len(outage) >= acked.codes["96"], (len(outage), acked.codes)
    for event in outage:
        assert event["error"].startswith("StoreUnavailable('SQLite store"), event
        # SQLITE_FULL on a full disk; on a file-size limit SQLITE_FULL or SQLITE_IOERR_WRITE
        assert "(SQLITE_FULL)" in event["error"] or "(SQLITE_IOERR" in event["error"], event
        assert TEST_PAN not in str(event) and ACCOUNT not in str(event), event
    assert not [e for e in ("stage failed", "write failed") if log_events(log, e)]
