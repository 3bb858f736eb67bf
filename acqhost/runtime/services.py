"""Services that live as long as a server: recording due activations, and dropping cached
entries that other processes changed (PostgreSQL LISTEN/NOTIFY)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread

from acqhost.domain import accounts
from acqhost.host.state import HostState
from acqhost.log import get_logger
from acqhost.runtime.ledger import Ledger, Write
from acqhost.runtime.server import Service
from acqhost.store.base import AccountVersion, Store

if TYPE_CHECKING:  # psycopg is imported only by a host on PostgreSQL
    from acqhost.store.postgres import PostgresStore

__all__ = ("ACTIVATE_SECONDS", "activations", "cache_invalidation")

# How often approved settlement-account changes whose effective-from passed are recorded
# ACTIVE (sales settle to them from that instant regardless).
ACTIVATE_SECONDS = 1.0
# How long a starting host waits for its cache listener before it serves anyway (the listener
# keeps trying; meanwhile caches still expire within CACHE_SECONDS).
LISTEN_READY_SECONDS = 5.0


def activations(state: HostState, ledger: Ledger) -> Service:
    """A server service: every ACTIVATE_SECONDS, record as ACTIVE (through the ledger) every
    approved version whose effective-from has passed, and drop the cached accounts."""
    log = get_logger("acqhost.message")
    key = state.host_keys.data_key

    async def run(*, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            now = state.clock()

            def activate(store: Store, now: float = now) -> list[AccountVersion]:
                with store.transaction(write=False) as tx:
                    if not tx.due_versions(now):
                        return []
                with store.transaction() as tx:
                    return accounts.activate_due(tx, key, now)

            write = Write(call=activate)
            await ledger.submit(write)
            if write.error is not None:
                log.error("activation failed", error=repr(write.error))
            for version in write.result or ():
                state.accounts.pop(version.tid, None)
                log.info("account activated", tid=version.tid, version=version.version)
            if write.result:
                state.advices_queued()  # each activation queued its 0320
            await anyio.sleep(ACTIVATE_SECONDS)

    return run


def cache_invalidation(store: PostgresStore, state: HostState) -> Service:
    """A server service: other processes' changes announced by the database drop this host's
    cached entries at once (``acqhost.store.pg_listen``). The listener's thread hands each one
    to the event loop's thread, where the host state lives."""

    async def run(*, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        token = anyio.lowlevel.current_token()

        def deliver(kind: str, tid: str) -> None:  # in the listener's thread
            # RuntimeError: the event loop has ended, there is nothing left to invalidate.
            with contextlib.suppress(RuntimeError):
                anyio.from_thread.run_sync(state.invalidate, kind, tid, token=token)

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
