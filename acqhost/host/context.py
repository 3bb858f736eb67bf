"""Per-message state: the context one message is worked on in, and the effect it waits for.

A :class:`Context` lives for one message: the decoded request, the response being built, what
the stages learned (terminal, session keys, field 48) and the durable effect to apply before
the response may leave. Stages keep no state of their own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from acqhost.domain.crypto import SessionKeys
from acqhost.host.state import HostState
from acqhost.store.base import AccountVersion, SaleRecord, Store, Terminal

__all__ = ("Context", "Effect")


@dataclass(slots=True)
class Effect:
    """A durable write the answer waits for.

    ``sale`` is grouped with its neighbours' into one transaction (one fsync) unless ``call``
    is given; ``call`` is any other store work, run in the ledger writer's thread in a
    transaction of its own, after ``pre`` (slow work such as an argon2id check) in a thread of
    its own. Once durable, ``then(state, ctx, result)`` finishes the answer from the result and
    may raise ``Decline``; a failed write is answered 96 without it."""

    sale: SaleRecord | None = None
    call: Callable[[Store], Any] | None = None
    pre: Callable[[], None] | None = None
    then: Callable[[HostState, Context, Any], None] | None = None


@dataclass(slots=True)
class Context:
    raw: bytes
    req: dict[str, str]
    resp: dict[str, str]
    now: float = field(default_factory=time.time)
    started: float = 0.0  # perf_counter at arrival, for the latency in the log
    route: str = ""
    terminal: Terminal | None = None
    keys: SessionKeys | None = None
    tlv: dict[str, str] = field(default_factory=dict)
    mac_response: bool = False  # set once the request's MAC has been verified
    effect: Effect | None = None
    account: AccountVersion | None = None
    card: tuple[str, str] | None = None  # (PAN, expiry YYMM): never logged
    reason: str = ""  # why it was declined, for the log
    log: dict[str, Any] = field(default_factory=dict)
