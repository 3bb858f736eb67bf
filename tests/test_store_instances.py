"""Several store instances on one database, as several host processes (or a host and the CLI)
have: what one commits the others see, across a close and a reopen too, and concurrent writers
of the same sales get distinct RRNs with exactly one winner for each duplicate key."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from acqhost.store import PostgresStore, Session, SQLiteStore, Store
from tests.storekit import TID, make_account, make_sale, make_terminal, with_terminal

Opener = Callable[[], Store]


@pytest.fixture(params=["sqlite", "postgres"])
def reopen(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """Opens one more instance on the same durable database at each call."""
    if request.param == "sqlite":
        path = tmp_path / "acqhost.db"
        return lambda: SQLiteStore(path)
    url: str = request.getfixturevalue("pg_url")
    return lambda: PostgresStore(url)


def test_sales_and_the_duplicate_rule_survive_a_reopen(reopen: Opener) -> None:
    store = with_terminal(reopen())
    first = store.record_sales([make_sale("000001"), make_sale("000002")])
    store.save_session(Session(tid=TID, sealed_rx=b"rx", sealed_tx=b"tx", signed_on_at=5.0))
    store.close()

    store = reopen()
    try:
        assert [s.rrn for s in store.sales(TID)] == [r.rrn for r in first]
        assert store.get_terminal(TID) == make_terminal()
        assert store.get_session(TID) is not None
        again, new = store.record_sales([make_sale("000002"), make_sale("000003")])
        assert again.duplicate and again.rrn == first[1].rrn
        assert not new.duplicate and new.rrn > first[1].rrn
    finally:
        store.close()


def test_a_second_instance_on_the_same_database_sees_committed_rows(reopen: Opener) -> None:
    one = with_terminal(reopen())
    two = reopen()
    try:
        assert two.get_terminal(TID) == make_terminal()
        (sale,) = one.record_sales([make_sale("000001")])
        assert [s.rrn for s in two.sales(TID)] == [sale.rrn]
        (dup,) = two.record_sales([make_sale("000001")])
        assert dup.duplicate and dup.rrn == sale.rrn
        assert two.reverse_sale(sale.rrn) is True
        assert one.reverse_sale(sale.rrn) is False
        two.set_terminal_status(TID, "disabled")
        terminal = one.get_terminal(TID)
        assert terminal is not None and terminal.status == "disabled"
        with pytest.raises(ValueError, match="already exists"):
            two.add_terminal(make_terminal(), make_account(), None)
    finally:
        one.close()
        two.close()


def test_writers_on_one_database_get_distinct_rrns_and_one_wins_each_duplicate(
    reopen: Opener,
) -> None:
    with_terminal(reopen()).close()
    results: list[list[str]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def writer() -> None:
        mine: list[str] = []
        try:
            store = reopen()
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)
            start.abort()
            return
        try:
            start.wait()
            for n in range(40):
                # Every writer records the same 40 keys: exactly one insert may win each.
                result = store.record_sales([make_sale(f"{n:06d}")])
                mine.extend(r.rrn for r in result if not r.duplicate)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)
        finally:
            store.close()
            results.append(mine)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    inserted = [rrn for mine in results for rrn in mine]
    assert len(inserted) == len(set(inserted)) == 40
    check = reopen()
    try:
        assert sorted(s.rrn for s in check.sales(TID)) == sorted(inserted)
    finally:
        check.close()
