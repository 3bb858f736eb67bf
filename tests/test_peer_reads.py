"""Store reads anyone can cause are bounded (acqhost.host.state.PEER_READS_PER_SECOND): forged
frames naming unknown terminal ids, or known ones with wrong MACs, cost store reads at that
rate and no faster, while registered terminals go on being served."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from acqhost.host.state import PEER_READS_PER_SECOND, ReadBudget
from acqhost.runtime.dispatch import Dispatcher

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import pipeline as bench

FLOOD = 3 * int(PEER_READS_PER_SECOND)


def test_the_budget_allows_its_rate_in_bursts_as_large_and_refills_with_time() -> None:
    budget = ReadBudget(10.0)
    assert [budget.take(100.0) for _ in range(12)].count(True) == 10
    assert not budget.take(100.0625)  # 0.625 of a token came back
    assert budget.take(100.125)  # 1.25
    assert not budget.take(100.125)
    assert [budget.take(200.0) for _ in range(12)].count(True) == 10  # full again, no more
    # A wall clock set back an hour takes nothing away: 0.25 s later, 2.5 tokens more.
    assert not budget.take(200.0 - 3600)
    assert budget.take(200.0 - 3600 + 0.25)


def counting(store: Any, method: str) -> list[int]:
    """Count the calls of the store's ``method`` (the store still answers them)."""
    calls = [0]
    real: Callable[..., Any] = getattr(store, method)

    def counted(*args: Any) -> Any:
        calls[0] += 1
        return real(*args)

    setattr(store, method, counted)
    return calls


def forged(dispatcher: Dispatcher, count: int, *, tid: str | None = None) -> list[bytes]:
    """0200s with a MAC field of zeros: of unknown terminals (a new id each), or of ``tid``."""
    codec = dispatcher.core.codec
    return [
        codec.encode({"t": "0200", "2": "6222021234567890128", "3": "000000",
                      "4": "000000012345", "7": "1122101530", "11": f"{i:06d}", "12": "101530",
                      "13": "1122", "14": "3012", "22": "051", "25": "00",
                      "41": tid or f"X{i:07d}", "42": bench.MID, "49": "156", "64": "0" * 16})
        for i in range(count)
    ]  # fmt: skip


def run_flood(
    tmp_path: Path, flood: Callable[[Dispatcher], list[bytes]], method: str, later: int
) -> None:
    """``later``: the reads one more forged frame costs a second after the flood."""
    dispatcher, _, seed = bench.build(tmp_path / "host.db")
    state = dispatcher.core.state
    now = [1_800_000_000.0]  # a clock that moves only when the test says
    real_clock = state.clock

    async def run() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(dispatcher.ledger.run)
            keys = await bench.sign_on(dispatcher, seed)  # on the real clock (freshness)
            state.clock = lambda: now[0]
            frames = flood(dispatcher)
            sales = bench.sales(dispatcher, keys, 20)
            reads = counting(state.store, method)
            codes = []
            for i, frame in enumerate(frames):
                out = await dispatcher.handle(frame)
                assert out is not None
                codes.append(dispatcher.core.codec.decode(out)["39"])
                if i % (len(frames) // 20) == 0:  # the real terminal meanwhile
                    sale = await dispatcher.handle(sales.pop())
                    assert sale is not None
                    assert dispatcher.core.codec.decode(sale)["39"] == "00"
            # The rate, in a burst at most as large, over a clock that stood still.
            assert reads[0] <= PEER_READS_PER_SECOND + 1, reads[0]
            assert set(codes) == {"03" if method == "get_terminal" else "63"}
            # A second later the budget is back: one more forged frame is looked up again.
            now[0] += 1.0
            before = reads[0]
            out = await dispatcher.handle(flood(dispatcher)[0])
            assert out is not None and reads[0] == before + later
            state.clock = real_clock
            dispatcher.ledger.close()

    try:
        anyio.run(run)
    finally:
        bench.close(dispatcher)


def test_a_flood_of_unknown_terminal_ids_costs_reads_at_the_bounded_rate(tmp_path: Path) -> None:
    run_flood(tmp_path, lambda d: forged(d, FLOOD), "get_terminal", 1)


def test_a_flood_of_wrong_macs_reloads_session_keys_at_the_bounded_rate(tmp_path: Path) -> None:
    # a second later: the cached keys' refresh (they are a second old), then the reload
    run_flood(tmp_path, lambda d: forged(d, FLOOD, tid=bench.TID), "get_session", 2)


def test_a_terminal_registered_after_start_is_found(tmp_path: Path) -> None:
    """Not in the ids known at start: looked up within the budget, and known from then on."""
    dispatcher, _, _ = bench.build(tmp_path / "host.db")
    state = dispatcher.core.state
    try:
        assert bench.TID in state.registered  # registered before the host state was made
        assert state.terminal("TERM0002") is None
        assert "TERM0002" not in state.registered
        state.terminals.clear()
        state.registered.discard(bench.TID)  # as if registered after this process started
        found = state.terminal(bench.TID)
        assert found is not None and found.tid == bench.TID
        assert bench.TID in state.registered
        # The store's notification of a change (PostgreSQL's LISTEN) names a terminal: known
        # from then on, whatever the budget has left.
        state.registered.discard(bench.TID)
        state.invalidate("terminal", bench.TID)
        assert bench.TID in state.registered
        state.registered.clear()
        state.invalidate("*", "")
        assert state.registered == {bench.TID}
    finally:
        bench.close(dispatcher)
