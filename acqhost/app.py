"""Assembling a host from its configuration: stores, keys, codec, pipeline, server."""

from __future__ import annotations

from acqhost import specs
from acqhost.codec import compile_spec
from acqhost.config import Config
from acqhost.crypto import HostKeys
from acqhost.ledger import Ledger
from acqhost.logging import configure_logging, get_logger
from acqhost.pipeline.host import Pipeline
from acqhost.server import Server, run_backend
from acqhost.store import open_store

__all__ = ("build_server", "serve")


def build_server(cfg: Config) -> Server:
    """A server ready to run: the pipeline reads through one store connection, the ledger
    writes through another (its worker thread's)."""
    keys = HostKeys.load(cfg.key_path)
    reader = open_store(cfg.db)
    writer = reader if cfg.db == ":memory:" else open_store(cfg.db)
    ledger = Ledger(writer, batch=cfg.write_batch, inline=cfg.db == ":memory:")
    pipeline = Pipeline(
        codec=compile_spec(specs.load(cfg.spec)),
        store=reader,
        ledger=ledger,
        host_keys=keys,
        config=cfg,
    )
    return Server(cfg, pipeline, ledger)


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
