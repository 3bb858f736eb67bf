"""``acqhost serve --capture FILE``: every answered request as a traffic record (README,
"Traffic files"), card data replaced by tokens.

The dispatcher hands each answered request to :meth:`Capture.finishing`; the record is only
queued there (its time and the request's fields). A service turns the queue into lines and
appends them to the file a few times a second in a worker thread, and once more when the host
stops. The file
is created readable by its owner alone (0600).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc

from acqhost.domain.traffic import Tokens, dumps, make_record
from acqhost.host.context import Context

__all__ = ("FLUSH_SECONDS", "Capture")

# How often the queued records are written out.
FLUSH_SECONDS = 0.2


class Capture:
    """The traffic file of one host process."""

    def __init__(self, path: str) -> None:
        self.path = path
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)  # an existing file too: it holds traffic
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        self._tokens = Tokens()
        self._first: float | None = None  # perf_counter of the capture's first request
        self._queue: list[tuple[float, dict[str, str], str | None]] = []
        self.written = 0

    def finishing(
        self, ctx: Context, finish: Callable[[bytes | None], None]
    ) -> Callable[[bytes | None], None]:
        """``finish``, queuing the record of ``ctx``'s request once it is answered."""
        if self._first is None:  # the first request decided, so no record's t is below 0
            self._first = ctx.started
        first = self._first

        def recorded(out: bytes | None) -> None:
            finish(out)
            if out is not None and ctx.route != "undecodable":
                self._queue.append((ctx.started - first, ctx.req, ctx.resp.get("39")))

        return recorded

    def _take(self) -> list[tuple[float, dict[str, str], str | None]]:
        queue, self._queue = self._queue, []
        return queue

    def _write(self, queue: list[tuple[float, dict[str, str], str | None]]) -> None:
        if not queue or self._file.closed:
            return
        queue.sort(key=lambda item: item[0])
        tokens = self._tokens
        lines = [
            dumps(make_record(t, req, None if rc is None else {"39": rc}, tokens))
            for t, req, rc in queue
        ]
        self._file.write("".join(lines))
        self._file.flush()
        self.written += len(lines)

    def flush(self) -> None:
        """Append the queued records to the file, in the order of their arrival."""
        self._write(self._take())

    def close(self) -> None:
        self.flush()
        self._file.close()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[Any] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """The server's service: every FLUSH_SECONDS the queued records are formatted and
        written in a worker thread, off the event loop; flushed and closed when cancelled."""
        task_status.started()
        try:
            while True:
                await anyio.sleep(FLUSH_SECONDS)
                queue = self._take()
                if queue:  # the thread is waited for, cancelled or not: one writer at a time
                    await anyio.to_thread.run_sync(self._write, queue)
        finally:
            self.close()
