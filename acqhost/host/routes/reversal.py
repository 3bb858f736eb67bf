"""Reversal, 0400 -> 0410 (PROTOCOL.md 5.2): idempotent, refused once the batch is settled."""

from __future__ import annotations

from acqhost.errors import Decline
from acqhost.host.context import Context, Effect
from acqhost.host.state import HostState
from acqhost.store.base import Store

__all__ = ("REVERSAL_ECHO", "REVERSAL_FIELDS", "reverse")

REVERSAL_FIELDS = ("3", "4", "7", "11", "41", "42", "49", "90")
REVERSAL_ECHO = ("3", "4", "7", "11", "41", "42", "49", "90")


def reverse(state: HostState, ctx: Context) -> None:
    """Field 90: original MTI (4) + original STAN (6) + original field 7 (10) + 22 zeros."""
    assert ctx.terminal is not None
    original = ctx.req["90"]
    if len(original) != 42 or not original.isdigit() or original[20:] != "0" * 22:
        raise Decline("30", "FORMAT_90")
    if original[:4] != "0200":
        raise Decline("25", "NOT_A_SALE")
    sale = state.store.find_sale(ctx.terminal.tid, original[4:10], original[10:20])
    if sale is None:
        raise Decline("25", "ORIGINAL_NOT_FOUND")
    if sale.batch_settled:
        raise Decline("12", "BATCH_SETTLED")
    if sale.status != "reversed":
        tid, rrn, stan, transmission = sale.tid, sale.rrn, original[4:10], original[10:20]

        def call(store: Store) -> bool:
            """Whether the sale is reversed now: not when a settlement closed its batch
            between the check above and this write."""
            if store.reverse_sale(rrn):
                return True
            stored = store.find_sale(tid, stan, transmission)
            return stored is not None and stored.status == "reversed"

        ctx.effect = Effect(call=call, then=_reversed)
    ctx.log["rrn"] = sale.rrn


def _reversed(state: HostState, ctx: Context, reversed_now: bool) -> None:
    """The 0410 once the write is done: 12 when the sale's batch was settled meanwhile."""
    if not reversed_now:
        raise Decline("12", "BATCH_SETTLED")
