"""``acqhost serve --workers 2``: two processes share the port and the SQLite store; a terminal
signed on through one is served by the other; SIGTERM stops both cleanly."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

import anyio
import pytest

from simulators.processes import free_port
from tests.hostkit import make_host
from tests.test_crash import start_host


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_two_workers_share_port_and_store(tmp_path: Path) -> None:
    setup = make_host(tmp_path, port=free_port())
    proc = start_host(setup, tmp_path / "host.log", "--workers", "2")
    try:
        approved = 0
        for round_ in range(6):  # new connections land on either worker
            client = setup.client()
            async with client:
                if round_ % 3 == 0:
                    assert (await client.sign_on()).rc == "00"
                    keys = client.keys
                client.keys = keys  # the session belongs to the terminal, not the worker
                for _ in range(5):
                    ex = await client.sale(100)
                    assert ex.rc == "00", ex.response
                    approved += 1
            await anyio.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    log = (tmp_path / "host.log").read_text()
    assert log.count('"listening"') == 2
    with sqlite3.connect(setup.config.db) as db:
        assert db.execute("SELECT COUNT(*) FROM sales").fetchone()[0] == approved
