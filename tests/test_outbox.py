"""The outbox of settlement updates and the bank leases (acqhost.store.outbox) on both
backends: what a claim takes (oldest first, a terminal's advices in order, one in flight),
failures and their retries, dead letters, the per-bank status, one lease owner at a time. What
only one backend has (SKIP LOCKED claimers, the files' bytes, indexes, migrations) is at the end.

The advices here carry made-up sealed bytes: the store never opens them (test_advices.py has
the domain's)."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg
import pytest

from acqhost.config import RebindPolicy
from acqhost.domain import accounts, advices, crypto, rebind, terminals
from acqhost.store import NewAdvice, PostgresStore, SQLiteStore, Store
from acqhost.store.migrations import postgres as pg_migrations
from acqhost.store.migrations import sqlite as sqlite_migrations
from tests.storekit import CREATED, TID, with_terminal

OTHER = "T0000002"
BANK, BANK_B = "102100099996", "103100000026"
T0 = CREATED + 1000


def open_backend(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if kind == "sqlite":
        return SQLiteStore(tmp_path / "a.db")
    return PostgresStore(request.getfixturevalue("pg_url"))


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with closing(open_backend(request.param, request, tmp_path)) as opened:
        yield with_terminal(with_terminal(opened), OTHER)


def queue(store: Store, tid: str = TID, bank: str = BANK, at: float = T0, mti: str = "0320") -> int:
    with store.transaction(tid) as tx:
        return tx.insert_advice(NewAdvice(tid, mti, bank, b"sealed " + tid.encode(), at))


def claim(store: Store, now: float = T0, banks: tuple[str, ...] = (BANK,), **kw: Any) -> list[int]:
    return [a.id for a in store.claim_advices(banks, now, kw.pop("hold", 30.0), **kw)]


# -- queuing and claiming ----------------------------------------------------------------------


def test_an_advice_is_queued_deliverable_at_once(store: Store) -> None:
    first, second = queue(store), queue(store, OTHER, mti="0520")
    assert second > first
    a, b = store.advices()
    assert (a.id, a.tid, a.mti, a.bank_code) == (first, TID, "0320", BANK)
    assert a.sealed_fields == b"sealed " + TID.encode()
    assert (a.created_at, a.state, a.attempts, a.next_attempt_at) == (T0, "queued", 0, T0)
    assert (a.last_error, a.delivered_at, a.ack_code) == ("", None, "")
    assert (b.tid, b.mti) == (OTHER, "0520")
    assert [x.id for x in store.advices(OTHER)] == [second]
    assert store.advices(state="delivered") == []
    assert claim(store, T0 - 1) == []  # not before it was queued
    assert claim(store) == [first, second]


def test_a_rolled_back_transaction_queues_nothing(store: Store) -> None:
    with pytest.raises(RuntimeError), store.transaction(TID) as tx:
        tx.insert_advice(NewAdvice(TID, "0320", BANK, b"x", T0))
        raise RuntimeError("the process dies before the commit")
    assert store.advices() == []
    with pytest.raises(ValueError):  # an advice about no terminal breaks a constraint
        queue(store, "NOBODY01")
    with pytest.raises(ValueError):
        queue(store, mti="0200")


def test_a_terminals_next_advice_waits_until_its_first_is_delivered(store: Store) -> None:
    t1, t2, o1, t3 = queue(store), queue(store), queue(store, OTHER), queue(store)
    assert claim(store) == [t1, o1]  # one in flight per terminal
    assert claim(store, T0 + 1) == []  # held; the others wait behind them
    assert store.mark_delivered(t1, "00", T0 + 2)
    assert claim(store, T0 + 3) == [t2]
    assert store.mark_delivered(t2, "00", T0 + 4) and store.mark_delivered(o1, "00", T0 + 4)
    assert claim(store, T0 + 5) == [t3]
    delivered = store.advices(state="delivered")
    assert [(a.id, a.delivered_at, a.ack_code) for a in delivered] == [
        (t1, T0 + 2, "00"),
        (t2, T0 + 4, "00"),
        (o1, T0 + 4, "00"),
    ]
    assert not store.mark_delivered(t1, "00", T0 + 6)  # once only


def test_a_terminals_order_holds_within_each_bank_and_no_bank_holds_up_another(
    store: Store,
) -> None:
    to_a, to_b, to_a2 = queue(store, bank=BANK), queue(store, bank=BANK_B), queue(store, bank=BANK)
    # Bank A down (or taken by no bank): the terminal's update to bank B goes all the same.
    assert claim(store, banks=(BANK_B,)) == [to_b]
    assert claim(store, banks=(BANK,)) == [to_a]  # A's second waits for its first
    store.mark_failed(to_a, "no answer", T0 + 5, T0)
    assert claim(store, T0 + 1, banks=(BANK,)) == []  # still first in A's lane
    store.mark_delivered(to_a, "00", T0 + 6)
    assert claim(store, T0 + 6, banks=(BANK,)) == [to_a2]
    assert claim(store, banks=()) == []


def test_a_retried_advice_ages_from_its_retry(store: Store) -> None:
    first = queue(store)
    assert store.dead_letter(first, "older than max_age", T0 + 100)
    assert store.retry_advice(first, T0 + 200)
    (advice,) = store.advices()
    assert (advice.state, advice.created_at, advice.attempts) == ("queued", T0 + 200, 0)
    second = queue(store, OTHER)
    assert store.dead_letter(second, "refused", T0 + 300)
    assert store.retry_dead_advices(T0 + 400) == 1
    assert [a.created_at for a in store.advices(OTHER)] == [T0 + 400]


def test_a_claim_takes_the_oldest_first_up_to_its_limit(store: Store) -> None:
    tids = [f"T00001{n:02d}" for n in range(5)]
    for tid in tids:
        with_terminal(store, tid)
    ids = [queue(store, tid) for tid in reversed(tids)]
    assert claim(store, limit=2) == ids[:2]
    assert claim(store, limit=10) == ids[2:]


def test_a_claim_holds_its_advices_until_the_hold_passes(store: Store) -> None:
    # The claimer died without a word: after the hold the advice is deliverable again.
    advice = queue(store)
    assert claim(store, hold=30) == [advice]
    assert claim(store, T0 + 29.9) == []
    assert claim(store, T0 + 30) == [advice]
    (again,) = store.advices()
    assert (again.next_attempt_at, again.attempts) == (T0 + 60, 0)
    with pytest.raises(ValueError):
        claim(store, hold=0)


# -- failures, dead letters, retries -----------------------------------------------------------


def test_a_failed_delivery_is_tried_again_after_its_backoff(store: Store) -> None:
    first, second = queue(store), queue(store)
    claim(store)
    assert store.mark_failed(first, "connection refused", T0 + 60, T0 + 1)
    assert claim(store, T0 + 59) == []  # neither it nor the terminal's next
    assert claim(store, T0 + 60) == [first]
    assert store.mark_failed(first, "no answer in 10 s", T0 + 180, T0 + 61)
    (failed, _) = store.advices()
    assert (failed.state, failed.attempts, failed.last_error) == ("queued", 2, "no answer in 10 s")
    assert failed.next_attempt_at == T0 + 180
    assert store.retry_advice(first, T0 + 100)  # an operator does not wait for the backoff
    assert claim(store, T0 + 100) == [first]
    assert store.advices()[0].attempts == 0
    assert store.mark_delivered(first, "00", T0 + 101)
    assert not store.mark_failed(first, "late", T0 + 200, T0 + 101)
    assert claim(store, T0 + 101) == [second]


def test_a_dead_letter_lets_the_terminals_next_advice_go_until_it_is_retried(
    store: Store,
) -> None:
    first, second, other = queue(store), queue(store), queue(store, OTHER, bank=BANK_B)
    assert store.dead_letter(first, "bank answered 30", T0 + 1)
    assert not store.dead_letter(first, "again", T0 + 1)
    assert not store.mark_delivered(first, "00", T0 + 1)
    assert claim(store, T0 + 1) == [second]
    (dead,) = store.advices(state="dead")
    assert (dead.id, dead.last_error) == (first, "bank answered 30")
    assert store.retry_advice(first, T0 + 2)
    assert store.advices(state="dead") == []
    assert claim(store, T0 + 40) == [first]  # queued again (its terminal's next is held)

    assert store.dead_letter(first, "x", T0 + 41) and store.dead_letter(other, "y", T0 + 41)
    assert store.retry_dead_advices(T0 + 42, [BANK_B]) == 1
    assert [a.id for a in store.advices(state="dead")] == [first]
    assert store.retry_dead_advices(T0 + 42, []) == 0
    assert store.retry_dead_advices(T0 + 42) == 1
    assert store.advices(state="dead") == []
    store.mark_delivered(second, "00", T0 + 43)
    assert not store.retry_advice(second, T0 + 44)  # delivered stays delivered
    assert not store.retry_advice(10**9, T0 + 44)
    with pytest.raises(ValueError):
        store.advices(state="lost")


def test_the_status_of_each_bank_code(store: Store) -> None:
    assert store.outbox_status() == []
    a1, a2, b1 = (
        queue(store, at=T0),
        queue(store, OTHER, at=T0 + 5),
        queue(store, OTHER, bank=BANK_B, at=T0 + 7),
    )
    delivered, waiting = queue(store, at=T0 + 8), queue(store, at=T0 + 9)
    store.mark_failed(a1, "connection refused", T0 + 60, T0 + 10)
    store.mark_failed(a2, "no answer", T0 + 60, T0 + 11)
    store.dead_letter(b1, "bank answered 30", T0 + 12)
    store.mark_failed(a1, "connection reset", T0 + 90, T0 + 13)
    assert store.mark_delivered(a1, "00", T0 + 14)
    store.mark_delivered(delivered, "00", T0 + 15)  # not counted
    assert [x.id for x in store.advices(state="queued")] == [a2, waiting]
    a, b = store.outbox_status()
    assert (a.bank_code, a.queued, a.oldest_queued_at, a.retrying, a.dead) == (
        BANK, 2, T0 + 5, 1, 0
    )  # fmt: skip
    assert a.last_error == "no answer"  # the delivered one's errors are over
    assert a.oldest_age(T0 + 65) == 60 and b.oldest_age(T0) == 0
    assert (b.bank_code, b.queued, b.oldest_queued_at, b.retrying, b.dead) == (
        BANK_B, 0, None, 0, 1
    )  # fmt: skip
    assert b.last_error == "bank answered 30"


# -- bank leases -------------------------------------------------------------------------------


def test_a_bank_lease_has_one_owner_until_it_expires(store: Store) -> None:
    assert store.bank_lease("icbc") is None
    assert store.acquire_bank_lease("icbc", "host-a", T0, ttl=10)
    assert not store.acquire_bank_lease("icbc", "host-b", T0 + 9.9, ttl=10)
    assert store.acquire_bank_lease("ccb", "host-b", T0, ttl=10)  # another bank's is its own
    assert store.acquire_bank_lease("icbc", "host-a", T0 + 5, ttl=10)  # holding it still
    assert store.renew_bank_lease("icbc", "host-a", T0 + 14, ttl=10)
    assert store.bank_lease("icbc") is not None
    assert store.bank_lease("icbc").expires_at == T0 + 24  # type: ignore[union-attr]
    assert not store.renew_bank_lease("icbc", "host-b", T0 + 15, ttl=10)
    assert not store.release_bank_lease("icbc", "host-b")
    assert not store.acquire_bank_lease("icbc", "host-b", T0 + 23.9, ttl=10)

    assert store.acquire_bank_lease("icbc", "host-b", T0 + 24, ttl=10)  # expired: taken over
    assert not store.renew_bank_lease("icbc", "host-a", T0 + 24, ttl=10)  # lost for good
    lease = store.bank_lease("icbc")
    assert lease is not None and (lease.owner, lease.expires_at) == ("host-b", T0 + 34)
    assert not store.renew_bank_lease("icbc", "host-b", T0 + 34, ttl=10)  # expired itself
    assert store.release_bank_lease("icbc", "host-b")
    assert store.bank_lease("icbc") is None
    assert store.acquire_bank_lease("icbc", "host-a", T0 + 35, ttl=10)  # free at once
    with pytest.raises(ValueError):
        store.acquire_bank_lease("icbc", "host-a", T0, ttl=0)
    with pytest.raises(ValueError):
        store.acquire_bank_lease("icbc", "", T0, ttl=10)


def race_for_lease(opener: Callable[[], Store], owners: list[str], now: float) -> list[str]:
    """Each owner a process of its own (here a thread with its own connection), all asking
    at once: who got the lease."""
    won: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(owners))

    def race(owner: str) -> None:
        try:
            with closing(opener()) as mine:
                barrier.wait()
                if mine.acquire_bank_lease("icbc", owner, now, ttl=50):
                    won.append(owner)
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=race, args=(owner,)) for owner in owners]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert errors == []
    return won


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_owners_racing_for_a_lease_get_one_winner(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if kind == "sqlite":
        opener: Callable[[], Store] = lambda: SQLiteStore(tmp_path / "a.db")  # noqa: E731
    else:
        url = request.getfixturevalue("pg_url")
        opener = lambda: PostgresStore(url)  # noqa: E731
    opener().close()  # migrated once, before the race
    owners = [f"host-{n}" for n in range(6)]
    first = race_for_lease(opener, owners, T0)  # a lease nobody holds
    assert len(first) == 1
    again = race_for_lease(opener, owners, T0 + 49)  # held still
    assert again == first  # only its owner may have it again
    later = race_for_lease(opener, owners, T0 + 100)  # just expired
    assert len(later) == 1


# -- SQLite only -------------------------------------------------------------------------------


def test_sqlite_claims_read_the_outbox_through_its_indexes(tmp_path: Path) -> None:
    with closing(with_terminal(SQLiteStore(tmp_path / "a.db"))) as store:
        queue(store)
        statements: list[str] = []
        store._conn.set_trace_callback(statements.append)
        claim(store, banks=(BANK, BANK_B))
        store.outbox_status()
        store._conn.set_trace_callback(None)
        explain = store._conn.execute
        plans = {
            s.split(None, 1)[0]: " | ".join(r[-1] for r in explain("EXPLAIN QUERY PLAN " + s))
            for s in statements
            if "outbox" in s
        }
    assert "INDEX outbox_queued " in plans["UPDATE"] and "outbox_queued_terminal" in plans["UPDATE"]
    # Undelivered advices only: through the partial indexes, never the whole table.
    assert "outbox_dead" in plans["SELECT"] and "outbox_queued" in plans["SELECT"]
    assert not re.search(r"SCAN outbox(?! USING)", plans["SELECT"])


AUTO = RebindPolicy(review="auto", cooling_off=10.0, min_interval=0.0)
ACCOUNT, NEW = "6222021234567890128", "6217009876543210981"  # Luhn-valid


def register_and_change(store: Store, key: bytes, account: str, new: str) -> None:
    """Version 1 registered (its 0320), version 2 approved and activated (its 0320)."""
    reg = terminals.Registration(
        tid="TERM0001", mid="MERCHANT0000001", merchant_name="Shop", holder="ZHANG SAN",
        account=account, bank_code=BANK, branch="", sale_limit=1000, test_limit=100,
        operator_id="01", operator_password="pw",
    )  # fmt: skip
    terminals.register(store, key, reg, by="tester", now=T0, fast_hash=True)
    sub = rebind.Submission(
        tid="TERM0001", operator_id="01", stan="000001", transmission="1114221320",
        holder="ZHANG SAN", bank_code=BANK_B, branch="", account=new, source="typed",
    )  # fmt: skip
    with store.transaction("TERM0001") as tx:
        out = rebind.submit(tx, key, sub, password_ok=True, policy=AUTO, now=T0)
    assert out.code == "00"
    with store.transaction() as tx:
        assert len(accounts.activate_due(tx, key, T0 + 100)) == 1
    assert len(store.advices("TERM0001")) == 2


def test_sqlite_no_account_number_in_clear_in_the_outbox_on_disk(tmp_path: Path) -> None:
    key = crypto.HostKeys.generate().data_key
    path = tmp_path / "a.db"
    store = SQLiteStore(path)
    register_and_change(store, key, ACCOUNT, NEW)
    sealed = [a.sealed_fields for a in store.advices()]
    assert [advices.open_advice(key, a).fields["41"] for a in store.advices()] == ["TERM0001"] * 2
    wal = Path(f"{path}-wal")
    while_open = path.read_bytes() + wal.read_bytes()
    store.close()
    after_close = path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    for blob in (while_open, after_close):
        assert all(s in blob for s in sealed)  # the search does see what the store wrote
        for number in (ACCOUNT, NEW, ACCOUNT[6:-4], NEW[6:-4]):
            assert number.encode() not in blob
            assert number.encode("utf-16-le") not in blob


def test_sqlite_a_database_of_schema_3_gains_the_outbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "a.db"
    with monkeypatch.context() as patched:
        patched.setattr(sqlite_migrations, "MIGRATIONS", sqlite_migrations.MIGRATIONS[:3])
        with closing(with_terminal(SQLiteStore(path))) as old:
            assert old.schema_version() == 3
    with closing(SQLiteStore(path)) as store:
        assert store.schema_version() == sqlite_migrations.latest_version() >= 4
        assert store.get_terminal(TID) is not None
        assert claim(store, banks=(BANK,)) == [] and store.bank_lease("icbc") is None
        assert claim(store, banks=(BANK,)) == [] and queue(store) == 1


# -- PostgreSQL only ---------------------------------------------------------------------------


def test_postgres_two_claimers_never_get_the_same_advice(pg_url: str) -> None:
    with closing(PostgresStore(pg_url)) as setup:
        tids = [f"T0001{n:03d}" for n in range(40)]
        for tid in tids:
            with_terminal(setup, tid)
        ids = {queue(setup, tid): tid for _ in range(3) for tid in tids}
    claimed: list[tuple[str, int]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def deliverer() -> None:
        try:
            with closing(PostgresStore(pg_url)) as mine:
                barrier.wait()
                idle = 0
                while idle < 20:
                    got = mine.claim_advices([BANK], time.time(), 600.0, limit=7)
                    with lock:
                        claimed.extend((a.tid, a.id) for a in got)
                    for a in got:
                        assert mine.mark_delivered(a.id, "00", time.time())
                    idle = 0 if got else idle + 1
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=deliverer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert sorted(i for _, i in claimed) == sorted(ids)  # each exactly once
    for tid in tids:  # and each terminal's in order
        mine = [i for t, i in claimed if t == tid]
        assert mine == sorted(mine) and len(mine) == 3


def test_postgres_a_claimer_passes_over_the_rows_another_claim_holds_locked(
    pg_url: str,
) -> None:
    with closing(with_terminal(with_terminal(PostgresStore(pg_url)), OTHER)) as first:
        mine, theirs = queue(first), queue(first, OTHER)
        got: list[list[int]] = []
        with closing(PostgresStore(pg_url)) as second:
            other = threading.Thread(target=lambda: got.append(claim(second)))
            with first.transaction() as tx:
                # A claim still in its transaction (locking its row), as a deliverer's is for
                # a moment: the other claimer neither waits for it nor takes that row.
                taken = tx.claim_advices([BANK], T0, T0 + 30, 1)  # type: ignore[attr-defined]
                assert [a.id for a in taken] == [mine]
                other.start()
                other.join(3)
                meanwhile = list(got)
            other.join(10)
    assert meanwhile == [[theirs]]


def unlocked(store: Store, tid: str = TID) -> int:
    """Queue an advice in a transaction that does not name (and lock) its terminal, as an
    activation's does."""
    with store.transaction() as tx:
        return tx.insert_advice(NewAdvice(tid, "0320", BANK, b"x", T0))


def test_postgres_a_terminals_advices_are_numbered_in_commit_order(pg_url: str) -> None:
    with closing(with_terminal(with_terminal(PostgresStore(pg_url)), OTHER)) as first:
        later: list[int] = []
        with closing(PostgresStore(pg_url)) as second, closing(PostgresStore(pg_url)) as third:
            with first.transaction() as tx:  # a transaction not naming the terminal
                earlier = tx.insert_advice(NewAdvice(TID, "0320", BANK, b"x", T0))
                # Its id is taken; another transaction queuing for the terminal now would take
                # a greater one and might commit first: it waits instead.
                thread = threading.Thread(target=lambda: later.append(unlocked(second)))
                thread.start()
                thread.join(0.5)
                assert later == []  # waits for this one to commit
                assert unlocked(third, OTHER) > earlier  # another terminal's does not wait
            thread.join(10)
    assert later and later[0] > earlier


def test_postgres_no_account_number_in_clear_in_any_outbox_column(pg_url: str) -> None:
    key = crypto.HostKeys.generate().data_key
    with closing(PostgresStore(pg_url)) as store:
        register_and_change(store, key, ACCOUNT, NEW)
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT * FROM outbox").fetchall()
        names = [d.name for d in conn.execute("SELECT * FROM outbox LIMIT 0").description or ()]
    assert len(rows) == 2 and "sealed_fields" in names
    for row in rows:
        for value in row:
            raw = bytes(value) if isinstance(value, bytes | memoryview) else str(value).encode()
            for number in (ACCOUNT, NEW, ACCOUNT[6:-4], NEW[6:-4]):
                assert number.encode() not in raw


def test_postgres_a_database_of_schema_3_gains_the_outbox(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patched:
        patched.setattr(pg_migrations, "MIGRATIONS", pg_migrations.MIGRATIONS[:3])
        with closing(with_terminal(PostgresStore(pg_url))) as old:
            assert old.schema_version() == 3
    with closing(PostgresStore(pg_url)) as store:
        assert store.schema_version() == pg_migrations.latest_version() >= 4
        assert store.get_terminal(TID) is not None
        assert claim(store) == [] and queue(store) == 1
        assert store.acquire_bank_lease("icbc", "host-a", T0, ttl=10)
