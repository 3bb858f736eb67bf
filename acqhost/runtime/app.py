"""Assembling a host from its configuration: stores, keys, codec, pipeline, server."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread

from acqhost.config import Config
from acqhost.domain.crypto import HostKeys
from acqhost.host.core import Pipeline
from acqhost.log import configure_logging, get_logger
from acqhost.runtime.ledger import Ledger
from acqhost.runtime.server import Server, Service, run_backend
from acqhost.store import open_store
from acqhost.store.sqlite import SQLiteStore
from acqhost.wire import specs
from acqhost.wire.codec import compile_spec

if TYPE_CHECKING:
    from acqhost.store.postgres import PostgresStore

__all__ = ("build_server", "cache_invalidation", "serve")

_POSTGRES_PREFIXES = ("postgresql://", "postgres://")
# How long a starting host waits for its cache listener before it serves anyway (the listener
# keeps trying; meanwhile caches still expire within CACHE_SECONDS).
LISTEN_READY_SECONDS = 5.0


def build_server(cfg: Config) -> Server:
    """A server ready to run: the pipeline reads through one store connection, the ledger
    writes through another (its worker thread's)."""
    keys = HostKeys.load(cfg.key_path)
    reader = open_store(cfg.db)
    writer = reader if cfg.db == ":memory:" else open_store(cfg.db)
    if cfg.workers > 1 and isinstance(writer, SQLiteStore):
        writer.queue_writers()  # the workers' ledgers take turns without SQLite's sleeps
    ledger = Ledger(writer, batch=cfg.write_batch, inline=cfg.db == ":memory:")
    pipeline = Pipeline(
        codec=compile_spec(specs.load(cfg.spec)),
        store=reader,
        ledger=ledger,
        host_keys=keys,
        config=cfg,
    )
    server = Server(cfg, pipeline, ledger)
    if cfg.db.startswith(_POSTGRES_PREFIXES):
        from acqhost.store.postgres import PostgresStore

        assert isinstance(reader, PostgresStore)
        server.services.append(cache_invalidation(reader, pipeline))
    return server


def cache_invalidation(store: PostgresStore, pipeline: Pipeline) -> Service:
    """A server service: other processes' changes announced by the database drop this host's
    cached entries at once (``acqhost.store.pg_listen``). The listener's thread hands each one
    to the event loop's thread, where the pipeline lives."""

    async def run(*, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        token = anyio.lowlevel.current_token()

        def deliver(kind: str, tid: str) -> None:  # in the listener's thread
            # RuntimeError: the event loop has ended, there is nothing left to invalidate.
            with contextlib.suppress(RuntimeError):
                anyio.from_thread.run_sync(pipeline.invalidate, kind, tid, token=token)

        listener = store.cache_listener(deliver)
        listener.start()
        try:
            if not await anyio.to_thread.run_sync(listener.wait_ready, LISTEN_READY_SECONDS):
                get_logger("acqhost.cache").warning("cache listener not ready; serving anyway")
            task_status.started()
            await anyio.sleep_forever()
        finally:
            # In a worker thread: stop() waits for the listener's thread, which may itself be
            # waiting for this event loop to run a delivery.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(listener.stop)

    return run


def serve(cfg: Config) -> None:
    """Run a host until SIGTERM or SIGINT (the ``acqhost serve`` command)."""
    configure_logging(cfg.log_level)
    server = build_server(cfg)
    try:
        run_backend(server.run, cfg.backend)
    finally:
        server.pipeline.store.close()
        if server.ledger.store is not server.pipeline.store:
            server.ledger.store.close()
    get_logger("acqhost").info("exit", code=0)
