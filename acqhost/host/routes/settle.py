"""Batch settlement, 0500 -> 0510 (PROTOCOL.md 5.4).

The stage checks the formats of 48 BN (6 digits), CT and AM (decimal) and hands the decision
to :func:`acqhost.domain.settlement.close`, run by the ledger writer in one store transaction:
00 closes the batch and opens the next (48 BN, CT, AM of the batch closed and NB, the batch
open now), 95 gives the host's totals of the open batch (48 BN, CT, AM), 12 a batch that is
settled or unknown (48 NB, the open batch). A retransmission of the 0500 that closed a batch
gets its answer again.

Order of the checks (PROTOCOL.md 3): 03 terminal, 58 active and signed on, 63 MAC, 30 fields
7, 11, 41, 42 and 48 {BN, CT, AM}, then the ledger's decision.
"""

from __future__ import annotations

from typing import Any

from acqhost.domain import settlement
from acqhost.errors import Decline
from acqhost.host.context import Context, Effect
from acqhost.host.state import HostState
from acqhost.store.base import Store
from acqhost.wire.tlv import encode_tlv

__all__ = ("SETTLE_ECHO", "SETTLE_FIELDS", "settle")

SETTLE_FIELDS = ("7", "11", "41", "42", "48")
SETTLE_ECHO = ("3", "7", "11", "41", "42")

# The longest CT and AM read: a count of sales and an amount in minor units fit in 64 bits.
_MAX_DIGITS = 18


def _number(ctx: Context, tag: str, *, exactly: int = 0) -> int:
    value = ctx.tlv.get(tag)
    if value is None:
        raise Decline("30", f"MISSING_{tag}")
    if not (value.isdigit() and value.isascii()) or (
        len(value) != exactly if exactly else len(value) > _MAX_DIGITS
    ):
        raise Decline("30", f"FORMAT_{tag}")
    return int(value)


def settle(state: HostState, ctx: Context) -> None:
    """48 BN, CT, AM checked (30), then the effect that decides."""
    terminal = ctx.terminal
    assert terminal is not None
    batch_no = _number(ctx, "BN", exactly=6)
    count = _number(ctx, "CT")
    amount = _number(ctx, "AM")
    tid, stan, transmission = terminal.tid, ctx.req["11"], ctx.req["7"]
    key, clock = state.host_keys.data_key, state.clock

    def apply(store: Store) -> settlement.Outcome:
        # No terminal lock: the open batch's row lock orders the settlements of a terminal,
        # and its sales, which lock the batch before the terminal, wait for it.
        with store.transaction() as tx:
            return settlement.close(tx, key, tid, batch_no, count, amount, clock(), stan=stan,
                                    transmission=transmission)  # fmt: skip

    ctx.effect = Effect(call=apply, then=_answer)
    ctx.log["batch"] = batch_no
    ctx.log["count"] = count
    ctx.log["am"] = amount


def _answer(state: HostState, ctx: Context, outcome: Any) -> None:
    """The 0510 from what the transaction decided; the next sale goes to the new batch."""
    assert isinstance(outcome, settlement.Outcome)
    if outcome.closed:
        state.batches[ctx.req["41"]] = outcome.open_batch
        state.advices_queued()  # its 0520s: the bank link need not wait for its next look
    if outcome.code != "00":
        raise Decline(outcome.code, outcome.reason, outcome.elements())
    ctx.resp["48"] = encode_tlv(outcome.elements())
