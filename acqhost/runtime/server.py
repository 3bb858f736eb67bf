"""The TCP server: the listener's life, services, signals and the graceful drain.

Runs on anyio, so on asyncio (with uvloop when installed) and on trio alike. On asyncio the
connections are the event loop's protocols (:mod:`acqhost.runtime.asyncio_driver`); given an
anyio listener, and on trio, they are anyio streams (:mod:`acqhost.runtime.stream_driver`).
Both drive the same :class:`~acqhost.runtime.connection.ConnectionCore`, and the end-to-end
tests run every case on both backends. A shutdown stops accepting and reading, answers what was
already read, flushes the ledger and returns.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import ssl
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import anyio.abc

from acqhost.config import Config, ConfigError
from acqhost.errors import ListenError
from acqhost.host.core import HostCore
from acqhost.log import get_logger, ratelimit
from acqhost.native import compiled as compiled_modules
from acqhost.runtime.asyncio_driver import AsyncioConnection
from acqhost.runtime.connection import Connections
from acqhost.runtime.dispatch import Dispatcher
from acqhost.runtime.ledger import Ledger
from acqhost.runtime.stream_driver import StreamConnection

__all__ = ("Server", "Service", "run_backend")

log = get_logger("acqhost.server")

# How long a graceful shutdown waits for answers to reach peers that stopped reading.
DRAIN_SECONDS = 10.0

# A task that lives as long as the server: started with ``task_status`` before the server
# listens (it calls ``task_status.started()`` when ready), cancelled after the drain.
Service = Callable[..., Coroutine[Any, Any, None]]


class Server:
    """Serves one host core on one listener until :meth:`shutdown`."""

    def __init__(self, config: Config, core: HostCore, ledger: Ledger) -> None:
        self.config = config
        self.core = core
        self.ledger = ledger
        self.dispatcher = Dispatcher(core, ledger)
        self.connections = Connections(
            config, self.dispatcher.start, core.flush_log, core.log_limiter
        )
        self.port: int | None = None
        self._accepting: anyio.CancelScope | None = None  # made inside the event loop
        self.services: list[Service] = []
        self.accepting = False  # listening, and not yet stopped: /readyz
        self.ops: object | None = None  # the operations endpoint ([metrics]), when there is one
        # [tls]: terminals connect over TLS (handshake within first_frame_timeout)
        self.tls: ssl.SSLContext | None = None
        if config.tls is not None:
            try:
                self.tls = config.tls.server_context()
            except ValueError as e:  # the files changed since the configuration was loaded
                raise ConfigError(str(e)) from None

    def shutdown(self) -> None:
        """Stop accepting and reading; answer what was read; then :meth:`run` returns."""
        connections = self.connections
        if connections.stopping:
            return
        connections.stopping = True
        if self._accepting is not None:
            self._accepting.cancel()
        for conn in list(connections.open):
            conn.stop()

    async def run(
        self,
        *,
        listener: anyio.abc.Listener[anyio.abc.SocketStream] | None = None,
        handle_signals: bool = True,
        task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until :meth:`shutdown` (SIGTERM or SIGINT with ``handle_signals``), then
        drain, flush the ledger and return."""
        if not handle_signals:
            await self._run(listener, task_status)
            return
        # The signals are watched until the ledger is flushed, not only until the drain: a
        # second SIGTERM (a process manager signalling every process of the group after the
        # parent of --workers passed one on) must not kill a host that is finishing its writes.
        async with anyio.create_task_group() as signals:
            signals.start_soon(self._watch_signals)
            await self._run(listener, task_status)
            signals.cancel_scope.cancel()

    async def _run(
        self,
        listener: anyio.abc.Listener[anyio.abc.SocketStream] | None,
        task_status: anyio.abc.TaskStatus[int],
    ) -> None:
        cfg = self.config
        connections = self.connections
        native: asyncio.Server | None = None
        try:
            # TLS is not the loop's (ssl= here): that would run the handshake before the
            # protocol sees the connection, which could be neither counted nor evicted. Each
            # connection starts its own (start_tls) once admitted.
            if listener is None and _on_asyncio():
                native = await asyncio.get_running_loop().create_server(
                    lambda: AsyncioConnection(connections, self.tls),
                    cfg.host,
                    cfg.port,
                    reuse_port=cfg.workers > 1,
                    backlog=65535,
                    start_serving=False,
                )
            elif listener is None:
                listener = await anyio.create_tcp_listener(
                    local_host=cfg.host, local_port=cfg.port, reuse_port=cfg.workers > 1
                )
        except OSError as e:
            # asyncio words its own message around the OS's; the OS's alone is the point.
            why = os.strerror(e.errno) if e.errno else str(e)
            raise ListenError(f"cannot listen on {cfg.host}:{cfg.port}: {why}") from None
        if native is not None:
            self.port = int(native.sockets[0].getsockname()[1])
        else:
            assert listener is not None
            sockname = listener.extra(anyio.abc.SocketAttribute.local_address)
            self.port = int(sockname[1])
        async with anyio.create_task_group() as writer_group:
            await writer_group.start(self.ledger.run)
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._summarise_logs)
                    for service in self.services:
                        await tg.start(service)
                    log.info("listening", host=cfg.host, port=self.port, framing=cfg.framing,
                             tls=self.tls is not None,
                             compiled=sum(compiled_modules().values()))  # fmt: skip
                    task_status.started(self.port)
                    self._accepting = anyio.CancelScope()
                    if connections.stopping:
                        self._accepting.cancel()
                    if native is not None:
                        try:
                            with self._accepting:
                                await native.start_serving()
                                self.accepting = not connections.stopping
                                await anyio.sleep_forever()
                        finally:
                            self.accepting = False
                            native.close()
                    else:
                        assert listener is not None
                        try:
                            with self._accepting:
                                self.accepting = not connections.stopping
                                await self._accept_loop(listener, tg)
                        finally:
                            self.accepting = False
                            with anyio.CancelScope(shield=True):
                                await listener.aclose()
                    log.info("draining", connections=len(connections.open))
                    # Connections end by themselves once their answers are sent; a peer that
                    # stopped reading gets DRAIN_SECONDS, then its connection is cut.
                    with anyio.move_on_after(DRAIN_SECONDS):
                        while connections.open:
                            await anyio.sleep(0.01)
                    if connections.open:
                        log.warning("drain timed out", connections=len(connections.open))
                    tg.cancel_scope.cancel()
            finally:
                # Stream connections end with their task group; protocols (after a drain
                # that timed out, or a failure) are closed here.
                for conn in list(connections.open):
                    if isinstance(conn, AsyncioConnection):
                        conn.abort()
                self.ledger.close()
                connections.limiter.summarise()
        log.info("stopped", written=self.ledger.written, flushes=self.ledger.flushes,
                 connections=dict(connections.closed))  # fmt: skip

    async def _summarise_logs(self) -> None:
        """What the log rate limit held back, summarised every SUMMARY_SECONDS."""
        while True:
            await anyio.sleep(ratelimit.SUMMARY_SECONDS)
            self.connections.limiter.summarise()

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal", signal=signal.Signals(signum).name)
                self.shutdown()

    async def _accept_loop(
        self, listener: anyio.abc.Listener[anyio.abc.SocketStream], tg: anyio.abc.TaskGroup
    ) -> None:
        # anyio's Listener.serve spawns handlers in a task group of its own; ours lets the
        # drain wait for them after the accept loop is cancelled.
        async with anyio.create_task_group() as accepts:
            for sub in getattr(listener, "listeners", [listener]):
                accepts.start_soon(self._accept_one, sub, tg)

    async def _accept_one(self, listener: Any, tg: anyio.abc.TaskGroup) -> None:
        connections = self.connections
        while True:
            try:
                stream = await listener.accept()
            except OSError as e:  # out of file descriptors, say: wait a moment, keep serving
                log.error("accept failed", error=str(e))
                await anyio.sleep(0.1)
                continue
            conn = StreamConnection(connections, stream, self.tls)
            if await conn.admit():
                tg.start_soon(conn.serve)


def _on_asyncio() -> bool:
    """Whether the running event loop is asyncio's (anyio runs on asyncio or on trio)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def run_backend(main: Any, backend: str) -> Any:
    """Run ``main()`` on ``backend``: asyncio gets uvloop when it is installed."""
    options: dict[str, Any] = {}
    if backend == "asyncio" and importlib.util.find_spec("uvloop") is not None:
        options["use_uvloop"] = True
    return anyio.run(main, backend=backend, backend_options=options)
