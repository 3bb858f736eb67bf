"""The ledger writer on a real SQLite file: group commit, order, failures, closing."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from acqhost.domain import crypto
from acqhost.runtime.ledger import Ledger, Write
from acqhost.store.base import NewAccount, SaleRecord, SaleResult, Terminal
from acqhost.store.sqlite import SQLiteStore

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def store_with_terminal(path: Path) -> SQLiteStore:
    store = SQLiteStore(path)
    key = bytes(32)
    store.add_terminal(
        Terminal("TERM0001", "MERCHANT0000001", "Shop", "active", bytes(32), 10**9, 100, 0.0),
        NewAccount(crypto.seal(key, b"6222020200112233446"), bytes(32), "6222****3446", "Z",
                   "102100099996", "", "test", "test"),
        None,
    )  # fmt: skip
    return store


def sale(stan: int) -> SaleRecord:
    return SaleRecord("TERM0001", "MERCHANT0000001", f"{stan:06d}", "1122", "101010",
                      "1122101010", 100, "156", "622202******0128", "123456", False, 1, 1,
                      time.time())  # fmt: skip


async def test_concurrent_sales_share_commits_and_each_gets_its_own_result(
    tmp_path: Path,
) -> None:
    store = store_with_terminal(tmp_path / "l.db")
    ledger = Ledger(SQLiteStore(tmp_path / "l.db"), batch=64)
    results: dict[int, SaleResult] = {}

    async def one(n: int) -> None:
        w = Write(sale=sale(n % 250))  # 50 of the 300 repeat an earlier key
        await ledger.submit(w)
        assert w.error is None
        results[n] = w.result

    async with anyio.create_task_group() as tg:
        await tg.start(ledger.run)
        async with anyio.create_task_group() as clients:
            for n in range(300):
                clients.start_soon(one, n)
        ledger.close()
    assert ledger.written == 300 and ledger.flushes < 30
    fresh = [r for r in results.values() if not r.duplicate]
    assert len(fresh) == 250 and len({r.rrn for r in fresh}) == 250
    assert sum(r.duplicate for r in results.values()) == 50
    assert len(store.sales("TERM0001")) == 250


async def test_callbacks_errors_and_order(tmp_path: Path) -> None:
    store_with_terminal(tmp_path / "l.db")
    ledger = Ledger(SQLiteStore(tmp_path / "l.db"))
    seen: list[str] = []
    unknown = sale(1)
    unknown.tid = "NOPE0000"  # refused by the store: no such terminal
    writes = [Write(sale=sale(7)), Write(sale=unknown), Write(sale=sale(9)),
              Write(call=lambda s: s.drop_session("TERM0001"))]  # fmt: skip
    for i, w in enumerate(writes):
        w.on_done = lambda w, i=i: seen.append(f"{i}:{'error' if w.error else 'ok'}")
    async with anyio.create_task_group() as tg:
        await tg.start(ledger.run)
        for w in writes:
            ledger.enqueue(w)
        ledger.close()
    # the bad sale fails alone: the sales grouped with it still commit, in order
    assert seen == ["0:ok", "1:error", "2:ok", "3:ok"]
    assert [s.stan for s in SQLiteStore(tmp_path / "l.db").sales("TERM0001")] == [
        "000007",
        "000009",
    ]
    assert isinstance(writes[1].error, ValueError)
    with pytest.raises(RuntimeError, match="closed"):
        ledger.enqueue(Write(sale=sale(8)))


async def test_a_failing_callback_does_not_stop_the_writer(tmp_path: Path) -> None:
    store_with_terminal(tmp_path / "l.db")
    ledger = Ledger(SQLiteStore(tmp_path / "l.db"))
    first, second = Write(sale=sale(1)), Write(sale=sale(2))

    def explode(w: Write) -> None:
        raise RuntimeError("bug in a callback")

    first.on_done = explode
    async with anyio.create_task_group() as tg:
        await tg.start(ledger.run)
        ledger.enqueue(first)
        await ledger.submit(second)
        ledger.close()
    assert second.error is None and not second.result.duplicate


async def test_a_write_with_slow_pre_work_is_applied_even_when_the_ledger_closes_at_once(
    tmp_path: Path,
) -> None:
    store_with_terminal(tmp_path / "l.db")
    ledger = Ledger(SQLiteStore(tmp_path / "l.db"))
    done: list[Write] = []
    w = Write(
        pre=lambda: time.sleep(0.2),
        call=lambda store: store.set_terminal_status("TERM0001", "disabled"),
        on_done=done.append,
    )
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(ledger.run)
            ledger.enqueue(w)
            ledger.close()  # before the pre work has even started
    assert done == [w] and w.error is None and w.result is True
    terminal = ledger.store.get_terminal("TERM0001")
    assert terminal is not None and terminal.status == "disabled"


async def test_slow_pre_work_neither_blocks_other_writes_nor_runs_unbounded(
    tmp_path: Path,
) -> None:
    from acqhost.runtime.ledger import PRE_THREADS

    store_with_terminal(tmp_path / "l.db")
    ledger = Ledger(SQLiteStore(tmp_path / "l.db"))
    running, most = 0, 0

    def slow() -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        time.sleep(0.1)
        running -= 1

    finished: list[str] = []
    async with anyio.create_task_group() as tg:
        await tg.start(ledger.run)
        for _ in range(8):
            ledger.enqueue(Write(pre=slow, call=lambda store: None,
                                 on_done=lambda w: finished.append("slow")))  # fmt: skip
        await anyio.sleep(0.01)
        started = time.perf_counter()
        await ledger.submit(Write(sale=sale(1)))
        sale_wait = time.perf_counter() - started
        finished.append("sale")
        ledger.close()
    assert sale_wait < 0.1  # not behind the 0.4 s of password checks
    assert finished[0] == "sale" and finished.count("slow") == 8
    assert most <= PRE_THREADS
