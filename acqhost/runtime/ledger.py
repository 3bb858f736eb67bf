"""The ledger writer: every durable write of the running host, with group commit.

Sales approved by concurrent connections are queued here and made durable together: one
worker-thread call, one transaction and one fsync for everything queued meanwhile. A caller
gets its result (the sale's RRN, or "duplicate") only after that commit, so a 0210 never
leaves before its sale is on disk. Other writes (sessions, reversals) travel through the same
queue, in order, each in its own transaction.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread

from acqhost.log import get_logger
from acqhost.store.base import SaleRecord, SaleResult, Store

log = get_logger("acqhost.ledger")

__all__ = ("PRE_THREADS", "Ledger", "Write")

# Threads for the ``pre`` work of writes (argon2id password checks) at one time.
PRE_THREADS = 2


@dataclass(slots=True)
class Write:
    """One queued write: a sale (grouped with its neighbours) or any other store call."""

    sale: SaleRecord | None = None
    call: Callable[[Store], Any] | None = None
    # Slow work to do first, in a thread of its own (an argon2id password check): it must
    # neither block the event loop nor hold up the group commit of everyone's sales.
    pre: Callable[[], None] | None = None
    result: Any = None
    error: BaseException | None = None
    done: anyio.Event | None = None  # made only when a task waits for the worker
    # Called in the event loop's thread once the write is durable (or failed), instead of
    # waking a waiting task: the server's way to answer a sale without a task per sale.
    on_done: Callable[[Write], None] | None = None


def apply_writes(store: Store, writes: Sequence[Write], batch: int) -> None:
    """Run ``writes`` in order against ``store``; consecutive sales go in one transaction."""
    i = 0
    while i < len(writes):
        w = writes[i]
        if w.sale is None:
            assert w.call is not None
            if w.error is None:  # not when its ``pre`` failed
                try:
                    w.result = w.call(store)
                except Exception as e:  # handed to the waiting caller, who decides
                    w.error = e
            i += 1
            continue
        j = i
        while j < len(writes) and writes[j].sale is not None and j - i < batch:
            j += 1
        group = writes[i:j]
        try:
            results: list[SaleResult] = store.record_sales([g.sale for g in group])  # type: ignore[misc]
            for g, r in zip(group, results, strict=True):
                g.result = r
        except Exception as e:
            if len(group) == 1:
                group[0].error = e
            else:  # the group was rolled back whole: one sale at a time, so one bad sale
                apply_writes(store, group, 1)  # fails alone and the others still commit
        i = j


class Ledger:
    """Queues writes and applies them in a worker thread with its own store connection."""

    def __init__(self, store: Store, *, batch: int = 512) -> None:
        self.store = store
        self._batch = batch
        self._queue: list[Write] = []
        self._wakeup = anyio.Event()
        self._closed = False
        self._preparing: list[Write] = []  # writes whose ``pre`` is still to start
        self._pre_pending = 0  # writes whose ``pre`` has not finished (queued or running)
        # Made in run() (they belong to the event loop): the writer has a thread of its own,
        # so password checks never wait for it nor it for them; at most PRE_THREADS checks
        # (argon2id, 64 MiB each) run at once.
        self._write_limiter: anyio.CapacityLimiter | None = None
        self._pre_limiter: anyio.CapacityLimiter | None = None
        self.flushes = 0  # worker-thread calls (each one fsync per group of sales)
        self.written = 0
        # Called after each flush with (writes, seconds it took): the metrics' commit time.
        self.on_flush: Callable[[int, float], None] | None = None

    @property
    def backlog(self) -> int:
        """Writes queued and not yet being written (those still being prepared included)."""
        return len(self._queue) + self._pre_pending

    async def submit(self, w: Write) -> None:
        """Queue ``w`` and wait until it is durable (or has failed: see ``w.error``)."""
        w.done = done = anyio.Event()
        self.enqueue(w)
        await done.wait()

    def enqueue(self, w: Write) -> None:
        """Queue ``w`` without waiting; ``w.on_done`` is called when it is durable."""
        if self._closed:
            raise RuntimeError("ledger is closed")
        if w.pre is not None:
            self._pre_pending += 1
            self._preparing.append(w)
        else:
            self._queue.append(w)
        self._wakeup.set()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """The writer task: drain the queue until :meth:`close` and the queue is empty."""
        self._write_limiter = anyio.CapacityLimiter(1)
        self._pre_limiter = anyio.CapacityLimiter(PRE_THREADS)
        task_status.started()
        async with anyio.create_task_group() as tg:
            await self._write_loop(tg)

    async def _write_loop(self, tg: anyio.abc.TaskGroup) -> None:
        while True:
            while self._preparing:
                tg.start_soon(self._prepare, self._preparing.pop(0))
            if not self._queue:
                if self._closed and not self._pre_pending:
                    return
                await self._wakeup.wait()
                self._wakeup = anyio.Event()
                continue
            writes, self._queue = self._queue, []
            # Shielded: a cancelled host still finishes (and reports) what it started writing.
            started = time.perf_counter()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(
                    apply_writes, self.store, writes, self._batch, limiter=self._write_limiter
                )
            self.flushes += 1
            self.written += len(writes)
            if self.on_flush is not None:
                self.on_flush(len(writes), time.perf_counter() - started)
            for w in writes:
                if w.on_done is not None:
                    try:
                        w.on_done(w)
                    except Exception:  # a caller's bug must not stop the writer
                        log.exception("write callback failed")
                elif w.done is not None:
                    w.done.set()

    async def _prepare(self, w: Write) -> None:
        """Run ``w.pre`` in a thread, then queue ``w`` for the writer."""
        try:
            with anyio.CancelScope(shield=True):  # finish what was started, as writes do
                await anyio.to_thread.run_sync(self._run_pre, w, limiter=self._pre_limiter)
        finally:
            self._pre_pending -= 1
            self._queue.append(w)
            self._wakeup.set()

    @staticmethod
    def _run_pre(w: Write) -> None:
        assert w.pre is not None
        try:
            w.pre()
        except Exception as e:  # handed to the caller like a failed write; the call is skipped
            w.error = e
        w.pre = None

    def close(self) -> None:
        """Stop after the writes already queued (and those still being prepared); later
        submissions fail."""
        self._closed = True
        self._wakeup.set()
