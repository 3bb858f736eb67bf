"""Helpers for tests that run a real host: a SQLite store in a temporary folder, a terminal
registered through the CLI, and the server on a loopback port in the test's event loop."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest

from acqhost.cli import main as cli
from acqhost.config import Config, load_config
from acqhost.runtime.app import build_server, close_stores
from acqhost.runtime.server import Server
from simulators.terminal import TerminalClient

ACCOUNT = "6222020200112233446"  # Luhn-valid settlement account
HOLDER = "张三"
BANK = "102100099996"


# Fixtures of the modules that run every test on both backends against a host of their own:
# they import these two (registered under the names the tests ask for).
@pytest.fixture(name="anyio_backend", params=["asyncio", "trio"])
def both_backends(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(name="setup")
def host_setup(tmp_path: Path) -> HostSetup:
    return make_host(tmp_path)


@dataclass
class HostSetup:
    config: Config
    key_files: dict[str, dict[str, Any]]
    folder: Path

    def client(self, tid: str = "TERM0001", **kwargs: Any) -> TerminalClient:
        return TerminalClient(self.key_files[tid], **kwargs)

    def with_port(self, port: int) -> None:
        for data in self.key_files.values():
            data["port"] = port
        self.config = dataclasses.replace(self.config, port=port)


def add_terminal(folder: Path, db: str, tid: str, mid: str, *extra: str) -> dict[str, Any]:
    key_out = folder / f"{tid}.json"
    status = cli(
        ["terminal", "add", "--db", db, "--tid", tid, "--mid", mid,
         "--merchant-name", "Test Shop", "--holder", HOLDER, "--account", ACCOUNT,
         "--bank-code", BANK, "--operator-id", "01", "--operator-password", "0000",
         "--fast-hash", "--key-out", str(key_out), *extra]
    )  # fmt: skip
    assert status == 0
    data: dict[str, Any] = json.loads(key_out.read_text())
    return data


def make_host(folder: Path, **settings: Any) -> HostSetup:
    """A store with two terminals (TERM0001 with a 10 000.00 limit, TERM0002)."""
    db = str(folder / "acqhost.db")
    assert cli(["init", "--db", db]) == 0
    files = {
        "TERM0001": add_terminal(
            folder, db, "TERM0001", "MERCHANT0000001", "--sale-limit", "1000000"
        ),
        "TERM0002": add_terminal(folder, db, "TERM0002", "MERCHANT0000002"),
    }
    overrides = {"db": db, "port": 0, "read_timeout": 5.0, **settings}
    setup = HostSetup(load_config(None, overrides, environ={}), files, folder)
    setup.with_port(setup.config.port)  # the key files name the port the host will use
    return setup


def make_postgres_host(folder: Path, url: str) -> HostSetup:
    """``make_host`` on a PostgreSQL database, its host keys in a file of their own."""
    keys = str(folder / "host.keys")
    assert cli(["init", "--db", url, "--keys", keys]) == 0
    files = {
        tid: add_terminal(folder, url, tid, f"MERCHANT000000{n}", "--keys", keys)
        for n, tid in ((1, "TERM0001"), (2, "TERM0002"))
    }
    overrides = {"db": url, "keys": keys, "port": 0, "read_timeout": 5.0}
    return HostSetup(load_config(None, overrides, environ={}), files, folder)


def make_host_on(kind: str, folder: Path, request: Any) -> HostSetup:
    """``make_host`` for ``kind`` "sqlite", else ``make_postgres_host`` on a new database (the
    test's ``pg_url`` fixture, taken from ``request``: skipped without PostgreSQL)."""
    if kind == "sqlite":
        return make_host(folder)
    return make_postgres_host(folder, request.getfixturevalue("pg_url"))


@asynccontextmanager
async def running(setup: HostSetup) -> AsyncIterator[Server]:
    """The host serving on a free loopback port until the block ends (then drained)."""
    server = build_server(setup.config)
    try:
        async with anyio.create_task_group() as tg:
            port = await tg.start(partial(server.run, handle_signals=False))
            setup.with_port(port)
            try:
                yield server
            finally:
                server.shutdown()
    finally:
        close_stores(server)


async def signed_on(setup: HostSetup, tid: str = "TERM0001") -> TerminalClient:
    """A terminal of ``setup``, connected and signed on."""
    client = setup.client(tid)
    await client.connect()
    assert (await client.sign_on()).rc == "00"
    return client
