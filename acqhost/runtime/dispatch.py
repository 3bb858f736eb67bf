"""From a request message to its answer: the host core decides, the ledger makes the decision
durable, the core answers. The same calls for the server and for the pipeline benchmark."""

from __future__ import annotations

from collections.abc import Callable

import anyio

from acqhost.host.context import Context
from acqhost.host.core import UNDECODABLE, HostCore
from acqhost.runtime.capture import Capture
from acqhost.runtime.ledger import Ledger, Write

__all__ = ("Dispatcher",)


class Dispatcher:
    """Runs one request message through ``core`` and ``ledger``."""

    def __init__(self, core: HostCore, ledger: Ledger, capture: Capture | None = None) -> None:
        self.core = core
        self.ledger = ledger
        self.capture = capture  # --capture: every answered request recorded
        # Called with each request's context once its answer is built (None: no answer); the
        # metrics' counting (acqhost.runtime.metrics), kept to a few dict updates.
        self.observe: Callable[[Context | None], None] | None = None

    def start(self, message: bytes, finish: Callable[[bytes | None], None]) -> bool:
        """Work on ``message``; ``finish(answer)`` is called in the event loop's thread, at
        once when nothing must be made durable first, else once the ledger has written it
        (None: the message could not be decoded far enough for an answer). Returns whether
        the message was a valid frame: decoded in full into a request."""
        core, observe = self.core, self.observe
        ctx = core.decide(message)
        if ctx is None:
            if observe is not None:
                observe(None)
            finish(None)
            return False
        if self.capture is not None:
            finish = self.capture.finishing(ctx, finish)
        effect = ctx.effect
        if effect is None:
            out = core.answer(ctx)
            if observe is not None:
                observe(ctx)
            finish(out)
            return ctx.route != UNDECODABLE
        # A sale with a call of its own is recorded by that call, not grouped.
        write = Write(effect.sale if effect.call is None else None, effect.call, effect.pre)

        def done(write: Write) -> None:  # in the loop's thread, once durable (or failed)
            out = None
            try:
                core.complete(ctx, write.result, write.error)
                out = core.answer(ctx)
                if observe is not None:
                    observe(ctx)
            finally:
                finish(out)

        write.on_done = done
        self.ledger.enqueue(write)
        return True

    async def handle(self, message: bytes) -> bytes | None:
        """The answer to ``message``, its log line written (for callers without a connection:
        tests and the pipeline benchmark)."""
        answers: list[bytes | None] = []
        ready = anyio.Event()

        def finish(out: bytes | None) -> None:
            answers.append(out)
            ready.set()

        self.start(message, finish)
        await ready.wait()
        self.core.flush_log()
        return answers[0]
