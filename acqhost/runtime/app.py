"""Assembling a host from its configuration: stores, keys, codec, host core, ledger, server,
and its services (activations, cache invalidation, a bank link per bank)."""

from __future__ import annotations

import gc
import io
import os
import stat
import sys

from acqhost.config import Config
from acqhost.domain.crypto import HostKeys
from acqhost.errors import ListenError
from acqhost.host.core import HostCore
from acqhost.host.state import HostState
from acqhost.log import configure_logging, get_logger
from acqhost.runtime.banklink import BankLink
from acqhost.runtime.capture import Capture
from acqhost.runtime.ledger import Ledger
from acqhost.runtime.ops_http import OpsEndpoint
from acqhost.runtime.server import Server, run_backend
from acqhost.runtime.services import activations, cache_invalidation
from acqhost.store import open_store
from acqhost.store.sqlite import SQLiteStore
from acqhost.wire import specs
from acqhost.wire.codec import compile_spec

__all__ = ("buffer_stdout", "build_server", "close_stores", "serve", "tune_gc")

# The collector's first threshold for a serving host (CPython's default is 700 allocations).
GC_YOUNG_THRESHOLD = 7000

_POSTGRES_PREFIXES = ("postgresql://", "postgres://")


def build_server(cfg: Config, *, worker: int = 0) -> Server:
    """A server ready to run: the host core reads through one store connection, the ledger
    writes through another (its worker thread's). ``worker``: this process's index among
    ``--workers`` (its metrics port is ``[metrics] port`` + ``worker``)."""
    keys = HostKeys.load(cfg.key_path)
    reader = open_store(cfg.db)
    writer = open_store(cfg.db)
    if isinstance(reader, SQLiteStore):
        _warn_if_shared(reader.path)
    if cfg.workers > 1 and isinstance(writer, SQLiteStore):
        writer.queue_writers()  # the workers' ledgers take turns without SQLite's sleeps
    ledger = Ledger(writer, batch=cfg.write_batch)
    state = HostState(store=reader, host_keys=keys, config=cfg)
    core = HostCore(codec=compile_spec(specs.load(cfg.spec)), state=state)
    server = Server(cfg, core, ledger)
    server.services.append(activations(state, ledger))
    if cfg.capture:
        capture = Capture(cfg.capture)
        server.dispatcher.capture = capture
        server.services.append(capture.run)
    # Every process runs a link per bank; the bank's lease makes one of them its dispatcher.
    links = [BankLink(bank, cfg.db, keys) for bank in cfg.banks]
    server.services.extend(link.run for link in links)

    def advices_queued() -> None:
        for link in links:
            link.nudge()

    state.advices_queued = advices_queued
    if cfg.db.startswith(_POSTGRES_PREFIXES):
        from acqhost.store.postgres import PostgresStore

        assert isinstance(reader, PostgresStore)
        server.services.append(cache_invalidation(reader, state))
    if cfg.metrics is not None:  # [metrics]: /metrics, /healthz, /readyz
        ops = OpsEndpoint(server, cfg.metrics.for_worker(worker), worker=worker)
        server.ops = ops
        server.services.append(ops.run)
    return server


def _warn_if_shared(path: str) -> None:
    """A store file others may read is the operator's choice (a backup group, say), but worth
    a word: it holds sales, names and sealed secrets (acqhost creates it 0600)."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        get_logger("acqhost.server").warning(
            "store readable by group or others", path=path, mode=f"{mode:04o}"
        )


def close_stores(server: Server) -> None:
    """Close the store connections (and the capture file) of a server that has stopped (or
    never ran)."""
    server.core.state.store.close()
    server.ledger.store.close()
    if server.dispatcher.capture is not None:
        server.dispatcher.capture.close()


def _first(group: BaseExceptionGroup[ListenError]) -> ListenError:
    inner = group.exceptions[0]
    return inner if isinstance(inner, ListenError) else _first(inner)


def buffer_stdout() -> None:
    """Let stdout buffer what is written to it, whatever PYTHONUNBUFFERED or a terminal asked.

    The per-message log lines are written to the stream's buffer and flushed together before
    the answers they belong to leave (``MessageLogger.flush``); written through, each line was
    a write system call of its own (about 1 µs a sale at 64 connections x 1,
    benchmarks/README.md). What is written, and by when, does not change: every other event
    is flushed as it is written (structlog's WriteLogger, the standard library's handler)."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=False, write_through=False)


def tune_gc() -> None:
    """Make the cyclic garbage collector cheaper for a serving host. A sale allocates some
    dozens of container objects that reference counting frees (a sale makes no cycles), and
    the collector, run every 700 allocations by default, walks what is young at that moment:
    ~2-3 µs of CPU a sale by benchmarks/pipeline.py with and without this, 2-9 µs by the
    phase profiles of the same day (benchmarks/README.md). Collect once and freeze what start-up
    made (modules, specs, caches: never garbage, no longer walked by any collection), then run
    the youngest collection every GC_YOUNG_THRESHOLD allocations. Cycles, should any come, are
    still collected: later, not never."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def serve(cfg: Config, worker: int = 0) -> None:
    """Run a host until SIGTERM or SIGINT (the ``acqhost serve`` command; ``worker``: this
    process's index among ``--workers``)."""
    buffer_stdout()
    configure_logging(cfg.log_level)
    server = build_server(cfg, worker=worker)
    tune_gc()
    try:
        run_backend(server.run, cfg.backend)
    except BaseExceptionGroup as group:
        # A service that cannot listen (a [metrics] port taken) fails inside the server's task
        # group: its one-line error, as the terminals' listener gives it.
        taken, rest = group.split(ListenError)
        if taken is None or rest is not None:
            raise
        raise _first(taken) from None
    finally:
        close_stores(server)
    get_logger("acqhost").info("exit", code=0)
