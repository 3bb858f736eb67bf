"""Cache invalidation across host processes sharing one PostgreSQL database.

Every committed change to something a host caches (a terminal's status, its session keys, its
settlement-account versions) sends ``pg_notify('acqhost_cache', '<kind>:<tid>')`` inside its
own transaction (``acqhost.store.postgres``), so PostgreSQL delivers it at commit and never for
a rollback. A :class:`CacheListener` holds a connection of its own that ``LISTEN``\\ s on that
channel and hands each ``(kind, tid)`` to a callback, from a daemon thread.

Notifications only make caches drop stale entries sooner: a host's caches also expire by
themselves (``acqhost.host.state.CACHE_SECONDS``), and a cached account never outlives the
next effective-from it knows of, so correctness never rests on a notification arriving. What
they buy is promptness: a disabled terminal, a new sign-on or a new account version is seen by
every process at once rather than within a second.

Notifications sent while the listener has no connection are lost; so after every (re)connection
the callback is told :data:`EVERYTHING` (kind ``"*"``, tid ``""``) and should drop its caches
wholesale.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import structlog
from psycopg.conninfo import conninfo_to_dict

__all__ = ("CHANNEL", "EVERYTHING", "CacheListener", "parse_payload")

CHANNEL = "acqhost_cache"
EVERYTHING = "*"
# How the listener's connection shows up in pg_stat_activity.
APPLICATION_NAME = "acqhost-cache-listener"
# A LISTEN connection is idle for hours: TCP keepalives let a silently dead peer (a machine or
# network gone) show up as an error within about a minute, instead of never. Used only where
# the connection string does not choose its own (libpq ignores them on Unix sockets).
_KEEPALIVES = {
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
}

# structlog's own (lazy) logger: the store sits below acqhost.log, which configures it.
log: structlog.typing.FilteringBoundLogger = structlog.get_logger("acqhost.cache")

Callback = Callable[[str, str], None]


def parse_payload(payload: str) -> tuple[str, str]:
    """``"<kind>:<tid>"`` as (kind, tid); a tid may itself hold a colon, a kind may not."""
    kind, _, tid = payload.partition(":")
    return kind, tid


class CacheListener:
    """``LISTEN acqhost_cache`` on a connection of its own, in a daemon thread.

    ``callback(kind, tid)`` runs in that thread for every notification, and with
    :data:`EVERYTHING` after every (re)connection. A connection that drops is replaced, waiting
    ``min_backoff`` seconds at first and twice as long after each failed attempt, up to
    ``max_backoff``. The callback may block (handing the work to an event loop, say), but must
    not wait for a thread that is calling :meth:`stop`.
    """

    def __init__(
        self,
        conninfo: str,
        callback: Callback,
        *,
        min_backoff: float = 0.1,
        max_backoff: float = 5.0,
    ) -> None:
        params: dict[str, Any] = dict(_KEEPALIVES)
        params["application_name"] = APPLICATION_NAME
        params.update(conninfo_to_dict(conninfo))  # the caller's own choices win
        self._params = params  # may hold a password: never logged
        self._callback = callback
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._backend_pid: int | None = None
        self._wake_r, self._wake_w = os.pipe()  # a byte in it ends the wait for notifications
        self._thread = threading.Thread(target=self._run, name=APPLICATION_NAME, daemon=True)
        self.connections = 0  # successful (re)connections so far

    def start(self) -> None:
        """Start the thread; it connects (retrying until it can) and listens."""
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the listener is listening; False if ``timeout`` seconds pass first."""
        return self._ready.wait(timeout)

    @property
    def backend_pid(self) -> int | None:
        """The PostgreSQL backend of the listening connection (None while there is none)."""
        return self._backend_pid

    def stop(self, timeout: float = 5.0) -> None:
        """Stop listening, close the connection and end the thread (idempotent)."""
        if not self._stopping.is_set():
            self._stopping.set()
            os.write(self._wake_w, b"x")
        if self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive() and self._wake_r >= 0:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1

    # -- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = self._min_backoff
        while not self._stopping.is_set():
            try:
                conn = psycopg.connect(autocommit=True, **self._params)
            except psycopg.Error as error:
                log.warning("cache listener cannot connect", error=str(error), retry_in=backoff)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, self._max_backoff)
                continue
            try:
                conn.execute(f"LISTEN {CHANNEL}")
                self._backend_pid = conn.info.backend_pid
                self.connections += 1
                log.info("cache listener listening", channel=CHANNEL, backend=self._backend_pid)
                # Whatever changed while nobody listened went unannounced.
                self._deliver(EVERYTHING, "")
                self._ready.set()
                backoff = self._min_backoff
                self._listen(conn)
            except psycopg.Error as error:
                log.warning("cache listener lost its connection", error=str(error))
            finally:
                self._ready.clear()
                self._backend_pid = None
                conn.close()
            # A moment's pause even after a good connection: one that keeps being dropped
            # right after LISTEN must not make this a busy loop.
            self._stopping.wait(backoff)
            backoff = min(backoff * 2, self._max_backoff)
        log.info("cache listener stopped")

    def _listen(self, conn: psycopg.Connection[Any]) -> None:
        """Deliver notifications until stopped (returns) or the connection fails (raises)."""
        # poll, not select: a busy host's descriptors may be numbered past select's 1024.
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            if any(fd == self._wake_r for fd, _ in poller.poll()):
                return
            # timeout=0: what has arrived, without waiting. A connection that died shows up
            # as readable too; reading it raises OperationalError.
            for notify in conn.notifies(timeout=0):
                self._deliver(*parse_payload(notify.payload))

    def _deliver(self, kind: str, tid: str) -> None:
        try:
            self._callback(kind, tid)
        except Exception:  # the callback's bug must not end the listening
            log.exception("cache invalidation failed", kind=kind, tid=tid)
