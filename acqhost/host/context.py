"""Per-message state and the host state the stages share.

A :class:`Context` lives for one message: the decoded request, the response being built, what
the stages learned (terminal, session keys, field 48) and the durable effect to apply before
the response may leave. Stages keep no state of their own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from acqhost.domain.crypto import SessionKeys
from acqhost.store.base import AccountVersion, SaleRecord, Session, Store, Terminal

if TYPE_CHECKING:
    from acqhost.host.core import Pipeline

__all__ = ("Context", "Effect")


@dataclass(slots=True)
class Effect:
    """A durable write the response waits for: a sale to record, a session to save or drop,
    a sale to reverse, or any other store work (``call``, in the ledger writer's thread, after
    ``pre`` in a thread of its own; ``then`` builds the answer from its result and may raise
    ``Decline``)."""

    sale: SaleRecord | None = None
    session: Session | None = None
    drop_session: str | None = None
    reverse_rrn: str | None = None
    call: Callable[[Store], Any] | None = None
    pre: Callable[[], None] | None = None
    then: Callable[[Pipeline, Context, Any], None] | None = None


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
