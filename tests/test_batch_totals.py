"""A batch's totals as the store keeps them (migration 7: open_totals and settled_totals, kept by
triggers as sales are recorded, reversed and their batches closed) agree with its sales counted
one by one, on both backends, and a database of schema 6 gains them on upgrade."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest

from acqhost.store import PostgresStore, SQLiteStore, Store
from acqhost.store.base import BatchTotal
from acqhost.store.migrations import postgres as pg_migrations
from acqhost.store.migrations import sqlite as sqlite_migrations
from acqhost.store.sql import SALE_COLUMNS
from tests.storekit import CREATED, TID, execute_sql, make_sale, with_terminal

OTHER = "T0000002"


def opened(where: str) -> Store:
    return SQLiteStore(where) if "://" not in where else PostgresStore(where)


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A SQLite path or a PostgreSQL URL (an empty database: the test makes its schema)."""
    yield str(tmp_path / "a.db") if request.param == "sqlite" else request.getfixturevalue("pg_url")


def counted(store: Store, tid: str) -> dict[int, list[BatchTotal]]:
    """Each batch's totals per version, counted from the terminal's sales one by one."""
    sums: dict[tuple[int, int], list[int]] = defaultdict(lambda: [0, 0])
    for sale in store.sales(tid):
        if sale.status == "approved":
            total = sums[(sale.batch_no, sale.account_version)]
            total[0] += 1
            total[1] += sale.amount
    batches: dict[int, list[BatchTotal]] = defaultdict(list)
    for (batch_no, version), (count, amount) in sorted(sums.items()):
        batches[batch_no].append(BatchTotal(version, count, amount))
    return batches


def assert_kept_as_counted(store: Store, tids: tuple[str, ...]) -> None:
    for tid in tids:
        want = counted(store, tid)
        with store.transaction(write=False) as tx:
            open_no = tx.open_batch(tid)
            assert open_no is not None
            kept = {n: tx.batch_totals(tid, n) for n in range(1, open_no.batch_no + 1)}
            settled = tx.settled(tid=tid)
        assert {n: t for n, t in kept.items() if t} == want, tid
        assert [
            (line.batch_no, BatchTotal(line.account_version, line.count, line.amount))
            for line in settled
        ] == [(n, t) for n, totals in want.items() if n < open_no.batch_no for t in totals], tid


def add_version(store: Store, tid: str, version: int) -> None:
    with store.transaction(tid) as tx:
        first = tx.versions(tid)[0]
        at = CREATED + version
        tx.insert_version(replace(first, version=version, effective_from=at, created_at=at))


def test_the_kept_totals_are_the_sales_counted_through_sales_reversals_and_closes(
    database: str,
) -> None:
    rng = random.Random(14)
    with closing(with_terminal(with_terminal(opened(database)), OTHER)) as store:
        add_version(store, TID, 2)
        stans = iter(range(1, 10_000))
        rrns: list[str] = []
        for step in range(40):
            tid = rng.choice((TID, OTHER))
            batch_no = store.open_batch(tid)
            action = rng.random()
            if action < 0.6:  # a group commit, with a duplicate now and then
                group = []
                for _ in range(rng.randrange(1, 6)):
                    who = rng.choice((TID, OTHER))
                    group.append(
                        make_sale(
                            f"{next(stans):06d}",
                            tid=who,
                            amount=rng.randrange(1, 100_000),
                            batch_no=1,  # stale: the store finds the open batch
                            account_version=rng.choice((1, 2)) if who == TID else 1,
                        )
                    )
                group.append(replace(group[0]))  # a retransmission in the same group
                results = store.record_sales(group)
                assert results[-1] == replace(results[0], duplicate=True)
                rrns += [r.rrn for r in results if not r.duplicate]
            elif action < 0.85 and rrns:  # a reversal; False once its batch is closed
                store.reverse_sale(rng.choice(rrns))
            else:
                with store.transaction(tid) as tx:
                    tx.close_batch(tid, batch_no, CREATED + 100 + step)
            assert_kept_as_counted(store, (TID, OTHER))
        assert store.open_batch(TID) + store.open_batch(OTHER) > 3  # some closes happened


def test_a_database_of_schema_6_gains_its_batches_totals_and_loses_the_index(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = sqlite_migrations if "://" not in database else pg_migrations
    assert backend.latest_version() == 7
    with monkeypatch.context() as patched:
        patched.setattr(backend, "MIGRATIONS", backend.MIGRATIONS[:6])
        with closing(with_terminal(with_terminal(opened(database)), OTHER)) as old:
            assert old.schema_version() == 6
            sales = [make_sale(f"{n:06d}", amount=100 + n) for n in range(1, 8)]
            results = old.record_sales([*sales, make_sale("000100", tid=OTHER)])
            old.reverse_sale(results[2].rrn)
            with old.transaction(TID) as tx:
                tx.close_batch(TID, 1, CREATED + 100)
            old.record_sales([make_sale(f"{n:06d}", amount=7 * n) for n in range(8, 11)])
            old.reverse_sale(old.sales(TID)[-1].rrn)
    with closing(opened(database)) as store:
        assert store.schema_version() == 7
        assert_kept_as_counted(store, (TID, OTHER))
        with store.transaction(write=False) as tx:
            kept = sum(100 + n for n in (1, 2, 4, 5, 6, 7))  # the third reversed
            assert tx.batch_totals(TID, 1) == [BatchTotal(1, 6, kept)]
            assert tx.batch_totals(TID, 2) == [BatchTotal(1, 2, 7 * 8 + 7 * 9)]
        store.record_sales([make_sale("000200", amount=5)])
        assert_kept_as_counted(store, (TID, OTHER))
    assert "sales_batch" not in indexes(database)


def indexes(database: str) -> list[str]:
    if "://" in database:
        with psycopg.connect(database) as conn:
            rows = conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'sales'")
            return [r[0] for r in rows]
    with closing(SQLiteStore(database)) as store:
        rows = store._conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
        return [r[0] for r in rows]


def test_a_terminals_totals_are_not_anothers_and_a_new_version_counts_apart(
    database: str,
) -> None:
    with closing(with_terminal(with_terminal(opened(database)), OTHER)) as store:
        add_version(store, TID, 2)
        store.record_sales(
            [make_sale("000001", amount=10), make_sale("000002", amount=20, account_version=2),
             make_sale("000003", tid=OTHER, amount=40)]
        )  # fmt: skip
        with store.transaction(write=False) as tx:
            assert tx.batch_totals(TID, 1) == [BatchTotal(1, 1, 10), BatchTotal(2, 1, 20)]
            assert tx.batch_totals(OTHER, 1) == [BatchTotal(1, 1, 40)]
            assert tx.batch_totals(TID, 2) == []


def test_sales_written_behind_the_stores_back_count_in_their_batchs_totals(
    database: str,
) -> None:
    """The triggers keep the totals exact whoever writes: a sale inserted into a closed batch
    counts in what that batch settled, and so does its reversal."""
    with closing(with_terminal(opened(database))) as store:
        store.record_sales([make_sale("000001", amount=10)])
        with store.transaction(TID) as tx:
            tx.close_batch(TID, 1, CREATED + 100)
        execute_sql(
            store,
            f"INSERT INTO sales ({SALE_COLUMNS}) VALUES ('{TID}', 'M', '000002', '0314', "
            "'101500', '0314101500', 32, '156', '622202******1234', 'A1', FALSE, 1, 1, 1.0)",
        )
        assert_kept_as_counted(store, (TID,))
        with store.transaction(write=False) as tx:
            assert tx.batch_totals(TID, 1) == [BatchTotal(1, 2, 42)]
            assert tx.batch_totals(TID, 2) == []
        execute_sql(store, "UPDATE sales SET status = 'reversed' WHERE stan = '000001'")
        assert_kept_as_counted(store, (TID,))
        with store.transaction(write=False) as tx:
            assert tx.batch_totals(TID, 1) == [BatchTotal(1, 1, 32)]
