"""The pipeline in process (no sockets): what the end-to-end tests cannot reach easily."""

from __future__ import annotations

import gc
import io
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest

from acqhost.host.core import response_mti
from acqhost.runtime.app import GC_YOUNG_THRESHOLD, tune_gc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import pipeline as bench


@pytest.mark.parametrize(("mti", "answer"), [("0200", "0210"), ("0800", "0810"),
                                             ("0400", "0410"), ("0210", "0210")])  # fmt: skip
def test_response_mti(mti: str, answer: str) -> None:
    assert response_mti(mti) == answer


def test_our_own_bug_in_a_stage_is_answered_96_and_logged(
    json_logs: io.StringIO, tmp_path: Path
) -> None:
    dispatcher, _, seed = bench.build(tmp_path / "host.db")

    async def run() -> dict[str, str]:
        async with anyio.create_task_group() as tg:
            await tg.start(dispatcher.ledger.run)
            keys = await bench.sign_on(dispatcher, seed)
            frame = bench.sales(dispatcher, keys, 1)[0]

            def broken(*args: object, **kwargs: object) -> None:
                raise RuntimeError("store exploded")

            # The account lookup's read of the store fails (the host core may be compiled:
            # its own methods cannot be replaced).
            state = dispatcher.core.state
            state.accounts.clear()
            state.store.transaction = broken  # type: ignore[method-assign,assignment]
            out = await dispatcher.handle(frame)
            dispatcher.ledger.close()
        assert out is not None
        return dispatcher.core.codec.decode(out)

    try:
        response = anyio.run(run)
        assert response["39"] == "96" and "38" not in response
        events = [json.loads(line) for line in json_logs.getvalue().splitlines()]
        assert any(e["event"] == "stage failed" and "store exploded" in e.get("exception", "")
                   for e in events)  # fmt: skip
        assert dispatcher.core.state.store.sales(bench.TID) == []
    finally:
        bench.close(dispatcher)


def test_the_benchmark_path_answers_every_sale_and_records_it(tmp_path: Path) -> None:
    """benchmarks/pipeline.py's own path: many sales in flight through the dispatcher, each
    answered 00 once its group commit is durable, each stored once."""
    dispatcher, _, seed = bench.build(tmp_path / "host.db")

    async def run() -> tuple[float, float, int]:
        async with anyio.create_task_group() as tg:
            await tg.start(dispatcher.ledger.run)
            keys = await bench.sign_on(dispatcher, seed)
            frames = bench.sales(dispatcher, keys, 300)
            result = await bench.through_the_host(dispatcher, frames, 64)
            dispatcher.ledger.close()
        return result

    try:
        rate, cpu, approved = anyio.run(run)
        assert approved == 300 and rate > 0 and cpu > 0
        assert len(dispatcher.core.state.store.sales(bench.TID)) == 300
        assert dispatcher.ledger.flushes < 300  # sales in flight share commits
    finally:
        bench.close(dispatcher)


@pytest.mark.parametrize(
    ("expiry", "now", "expired"),
    [
        ("2511", "2025-11-30T23:59:59", False),  # valid through its last second
        ("2511", "2025-12-01T00:00:00", True),
        ("2512", "2025-12-31T23:59:59", False),
        ("2512", "2026-01-01T00:00:00", True),
        ("2601", "2025-12-31T23:59:59", False),
        ("9912", "2026-01-01T00:00:00", False),
        ("2600", "2025-01-01T00:00:00", True),  # no month 0 or 13
        ("2613", "2025-01-01T00:00:00", True),
    ],
)
def test_a_card_is_valid_through_its_expiry_month(expiry: str, now: str, expired: bool) -> None:
    from acqhost.host.routes.sale import card_expired

    at = datetime.fromisoformat(now).replace(tzinfo=UTC).timestamp()
    year_2000 = datetime(2000, 1, 1, tzinfo=UTC).timestamp()
    # Another day asked in between: the month remembered for one day is not used on another.
    assert card_expired(expiry, at) is expired
    assert card_expired(expiry, year_2000) is (expiry[2:] in ("00", "13"))
    assert card_expired(expiry, at) is expired


def test_a_serving_host_freezes_what_start_up_made_and_collects_less_often() -> None:
    """acqhost serve's collector settings (runtime.app.tune_gc): on, less often, and what
    start-up made no longer walked."""
    threshold = gc.get_threshold()
    try:
        tune_gc()
        assert gc.isenabled()
        assert gc.get_freeze_count() > 1000  # modules, specs, caches
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *threshold[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
