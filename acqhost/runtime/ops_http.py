"""The operations endpoint: ``/metrics`` for Prometheus, ``/healthz`` and ``/readyz``.

A server service (``[metrics] port`` turns it on) with a small HTTP/1.1 server of its own in
the event loop, on both backends: it answers one request a connection and closes. Serving it in
the loop rather than in a thread of prometheus_client's keeps every count read in the thread
that writes it, and makes ``/healthz`` honest: a loop too busy to answer it is not healthy.

- ``/healthz``: 200 while the process runs its event loop.
- ``/readyz``: 200 when the listener accepts terminals (not before it listens, not while the
  host drains) and the store answers a trivial query within STORE_SECONDS; else 503, saying why.
- ``/metrics``: :class:`~acqhost.runtime.metrics.HostCollector`'s figures, this process's CPU
  and memory (prometheus_client's ProcessCollector), and the bank links' outbox, read from the
  store at the scrape (the same from every process sharing the store).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.abc
import anyio.to_thread
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, ProcessCollector, generate_latest
from prometheus_client.registry import CollectorRegistry

from acqhost.config_ops import MetricsConfig
from acqhost.domain.advices import link_status
from acqhost.errors import ListenError
from acqhost.log import get_logger
from acqhost.runtime.metrics import HostCollector, Metrics
from acqhost.runtime.server import Server
from acqhost.store import Store, open_store

__all__ = ("STORE_SECONDS", "OpsEndpoint")

log = get_logger("acqhost.ops")

STORE_SECONDS = 2.0  # a store that takes longer to answer is not ready
REQUEST_SECONDS = 5.0  # for a client to send its request and take the answer
MAX_HEAD = 8192  # bytes of request line and headers
MAX_CLIENTS = 16  # requests served at once; more are closed unanswered

_T = TypeVar("_T")
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}  # fmt: skip
_TEXT = "text/plain; charset=utf-8"


class OpsEndpoint:
    """The operations endpoint of one server; :meth:`run` is its service. Making it hooks the
    counting into the server's dispatcher and ledger."""

    def __init__(self, server: Server, settings: MetricsConfig, *, worker: int = 0) -> None:
        self.server = server
        self.settings = settings
        self.metrics = Metrics(mti for mti, _ in server.core.routes)
        server.dispatcher.observe = self.metrics.observe
        server.ledger.on_flush = self.metrics.ledger_flushed
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(HostCollector(server, self.metrics, worker))
        ProcessCollector(registry=self.registry)
        self.port: int | None = None  # once listening
        self._store: Store | None = None  # this endpoint's own connection, used in a thread
        self._limiter: anyio.CapacityLimiter | None = None
        self._clients = 0

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        settings = self.settings
        try:
            listener = await anyio.create_tcp_listener(
                local_host=settings.host, local_port=settings.port
            )
        except OSError as e:
            why = e.strerror or str(e)
            raise ListenError(f"[metrics] cannot listen on {settings.host}:{settings.port}: "
                              f"{why}") from None  # fmt: skip
        self._limiter = anyio.CapacityLimiter(1)
        self.port = int(listener.extra(anyio.abc.SocketAttribute.local_address)[1])
        log.info("metrics listening", host=settings.host, port=self.port)
        task_status.started()
        try:
            async with listener:
                await listener.serve(self._handle)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(STORE_SECONDS):
                await anyio.to_thread.run_sync(self._close_store, limiter=self._limiter)

    # -- the store, in a thread ---------------------------------------------------------------
    async def _query(self, fn: Callable[[Store], _T]) -> tuple[bool, _T | None]:
        """(answered, result) of ``fn`` on the endpoint's store connection; not answered when
        it failed or took longer than STORE_SECONDS (the thread is then left to finish)."""
        with anyio.move_on_after(STORE_SECONDS):
            try:
                result = await anyio.to_thread.run_sync(
                    self._call, fn, abandon_on_cancel=True, limiter=self._limiter
                )
            except Exception as e:
                log.warning("store check failed", error=str(e) or repr(e))
                return False, None
            return True, result
        log.warning("store check timed out", seconds=STORE_SECONDS)
        return False, None

    def _call(self, fn: Callable[[Store], _T]) -> _T:
        if self._store is None:
            self._store = open_store(self.server.config.db)
        try:
            return fn(self._store)
        except Exception:
            self._close_store()  # connect again next time: the database may have restarted
            raise

    def _close_store(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            try:
                store.close()
            except Exception as e:
                log.warning("store close failed", error=str(e) or repr(e))

    # -- the answers -------------------------------------------------------------------------
    async def healthz(self) -> tuple[int, str, bytes]:
        return 200, _TEXT, b"ok\n"

    async def readyz(self) -> tuple[int, str, bytes]:
        if not self.server.accepting:
            return 503, _TEXT, b"not ready: the listener is not accepting connections\n"
        answered, _ = await self._query(lambda store: store.get_terminal(""))
        if not answered:
            return 503, _TEXT, b"not ready: the store does not answer\n"
        return 200, _TEXT, b"ready\n"

    async def metrics_text(self) -> tuple[int, str, bytes]:
        banks = self.server.config.banks
        answered, links = await self._query(lambda store: link_status(store, banks, time.time()))
        self.metrics.store_up = answered
        self.metrics.bank_links = links
        return 200, CONTENT_TYPE_PLAIN_0_0_4, generate_latest(self.registry)

    async def _handle(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            if self._clients >= MAX_CLIENTS:
                return
            self._clients += 1
            try:
                with anyio.move_on_after(REQUEST_SECONDS):
                    head = await _read_head(stream)
                    method, path = _request_line(head)
                    status, content_type, body = await self._answer(method, path)
                    header = (
                        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                        "Connection: close\r\n\r\n"
                    )
                    await stream.send(header.encode() + (b"" if method == "HEAD" else body))
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                pass  # the client went away
            finally:
                self._clients -= 1

    async def _answer(self, method: str, path: str) -> tuple[int, str, bytes]:
        pages: dict[str, Callable[[], Any]] = {
            "/metrics": self.metrics_text, "/healthz": self.healthz, "/readyz": self.readyz,
        }  # fmt: skip
        if not method:
            return 400, _TEXT, b"bad request\n"
        page = pages.get(path)
        if page is None:
            return 404, _TEXT, b"not found: /metrics, /healthz or /readyz\n"
        if method not in ("GET", "HEAD"):
            return 405, _TEXT, b"GET or HEAD only\n"
        answer: tuple[int, str, bytes] = await page()
        return answer


async def _read_head(stream: anyio.abc.SocketStream) -> bytes:
    """The request line and headers (the body, if any, is ignored); b"" when too long."""
    head = b""
    while b"\r\n\r\n" not in head and b"\n\n" not in head:
        if len(head) > MAX_HEAD:
            return b""
        head += await stream.receive(4096)
    return head


def _request_line(head: bytes) -> tuple[str, str]:
    """(method, path without its query); ("", "") when the request line is not HTTP's."""
    line = head.split(b"\n", 1)[0].strip()
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return "", ""
    try:
        method, target = parts[0].decode("ascii"), parts[1].decode("ascii")
    except UnicodeDecodeError:
        return "", ""
    return method, target.split("?", 1)[0]
