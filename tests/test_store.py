"""The store on both backends (SQLite files, PostgreSQL): the same answers to every call, one
transaction per call or per ``transaction`` block, durability, several instances and threads on
one database. What only one backend has is in test_store_sqlite.py and test_store_postgres.py.

The PostgreSQL tests each get a fresh database on the server named by ACQHOST_TEST_PG (see
tests/conftest.py); without it they are skipped, except under CI."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest

from acqhost.store import (
    Operator,
    PostgresStore,
    RebindRequest,
    Session,
    SQLiteStore,
    Store,
    StoreTx,
    open_store,
)
from tests.storekit import (
    CREATED,
    OPERATOR,
    TID,
    Interrupted,
    chain,
    execute_sql,
    make_account,
    make_sale,
    make_terminal,
    registration_entry,
    with_terminal,
)

Opener = Callable[[], Store]
INTEGRITY_ERRORS = (sqlite3.IntegrityError, psycopg.errors.IntegrityError)


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    opened: Store
    if request.param == "sqlite":
        opened = SQLiteStore(tmp_path / "a.db")
    else:
        opened = PostgresStore(request.getfixturevalue("pg_url"))
    try:
        yield opened
    finally:
        opened.close()


# --- terminals --------------------------------------------------------------------------------


def test_added_terminal_is_returned_and_listed_by_tid(store: Store) -> None:
    store.add_terminal(make_terminal("T0000002"), make_account(), None)
    store.add_terminal(make_terminal("T0000001"), make_account(), None)
    assert store.get_terminal("T0000002") == make_terminal("T0000002")
    assert store.get_terminal("NOSUCH00") is None
    assert [t.tid for t in store.list_terminals()] == ["T0000001", "T0000002"]


def test_a_second_terminal_with_the_same_tid_is_refused_and_the_first_kept(store: Store) -> None:
    with_terminal(store)
    with pytest.raises(ValueError, match="already exists"):
        store.add_terminal(make_terminal(merchant_name="Impostor"), make_account(), None)
    assert store.get_terminal(TID) == make_terminal()
    assert len(store.account_history(TID)) == 1


def test_terminal_with_an_operator_is_added(store: Store) -> None:
    operator = Operator(tid=TID, operator_id="01", password_hash=b"$argon2id$...", failures=0)
    store.add_terminal(make_terminal(), make_account(), operator)
    assert store.get_terminal(TID) is not None


def test_operator_of_another_terminal_is_refused(store: Store) -> None:
    operator = Operator(tid="OTHER001", operator_id="01", password_hash=b"h", failures=0)
    with pytest.raises(ValueError):
        store.add_terminal(make_terminal(), make_account(), operator)
    assert store.get_terminal(TID) is None


def test_terminal_is_disabled_and_enabled_again(store: Store) -> None:
    with_terminal(store)
    assert store.set_terminal_status(TID, "disabled") is True
    terminal = store.get_terminal(TID)
    assert terminal is not None and terminal.status == "disabled"
    assert store.set_terminal_status(TID, "active") is True
    terminal = store.get_terminal(TID)
    assert terminal is not None and terminal.status == "active"


def test_status_of_an_unknown_terminal_is_not_set(store: Store) -> None:
    assert store.set_terminal_status("NOSUCH00", "disabled") is False


def test_unknown_terminal_status_is_refused(store: Store) -> None:
    with_terminal(store)
    with pytest.raises(ValueError):
        store.set_terminal_status(TID, "paused")
    with pytest.raises(ValueError):
        store.add_terminal(make_terminal("T0000009", status="paused"), make_account(), None)


# --- sessions ---------------------------------------------------------------------------------


def test_session_is_saved_replaced_and_dropped(store: Store) -> None:
    with_terminal(store)
    assert store.get_session(TID) is None
    first = Session(tid=TID, sealed_rx=b"rx1", sealed_tx=b"tx1", signed_on_at=CREATED + 1)
    store.save_session(first)
    assert store.get_session(TID) == first
    second = Session(tid=TID, sealed_rx=b"rx2", sealed_tx=b"tx2", signed_on_at=CREATED + 2)
    store.save_session(second)
    assert store.get_session(TID) == second
    store.drop_session(TID)
    assert store.get_session(TID) is None
    store.drop_session(TID)  # signing off twice is harmless


def test_session_of_an_unknown_terminal_is_refused(store: Store) -> None:
    with pytest.raises(ValueError):
        store.save_session(Session(tid="NOSUCH00", sealed_rx=b"r", sealed_tx=b"t", signed_on_at=1))


# --- settlement accounts ----------------------------------------------------------------------


def test_new_terminal_settles_to_account_version_1(store: Store) -> None:
    with_terminal(store)
    current = store.current_account(TID, CREATED + 10)
    assert current is not None
    assert (current.tid, current.version, current.state) == (TID, 1, "ACTIVE")
    assert current.effective_from == CREATED
    assert current.sealed_account == make_account().sealed_account
    assert current.account_hash == make_account().account_hash
    assert current.account_masked == "6222********1234"
    assert (current.holder, current.bank_code, current.branch) == (
        "ZHANG SAN",
        "102100099996",
        "Haidian",
    )
    assert store.account_history(TID) == [current]


def test_no_account_is_in_force_before_it_is_effective_or_for_unknown_terminal(
    store: Store,
) -> None:
    with_terminal(store)
    assert store.current_account(TID, CREATED - 1) is None
    assert store.current_account("NOSUCH00", CREATED + 10) is None
    assert store.account_history("NOSUCH00") == []


# --- ledger -----------------------------------------------------------------------------------


def test_new_terminal_has_batch_1_open(store: Store) -> None:
    with_terminal(store)
    assert store.open_batch(TID) == 1
    with pytest.raises(KeyError):
        store.open_batch("NOSUCH00")


def test_recorded_sales_get_unique_12_digit_rrns(store: Store) -> None:
    with_terminal(store)
    results = store.record_sales([make_sale(f"{n:06d}") for n in range(1, 21)])
    assert [r.duplicate for r in results] == [False] * 20
    rrns = [r.rrn for r in results]
    assert all(len(rrn) == 12 and rrn.isdigit() for rrn in rrns)
    assert len(set(rrns)) == 20
    assert rrns == sorted(rrns)
    more = store.record_sales([make_sale("000099")])
    assert more[0].rrn > rrns[-1]


def test_recording_no_sales_records_nothing(store: Store) -> None:
    with_terminal(store)
    assert store.record_sales([]) == []
    assert store.sales(TID) == []


def test_sale_repeated_within_one_batch_is_a_duplicate(store: Store) -> None:
    with_terminal(store)
    first, other, again = store.record_sales(
        [make_sale("000001"), make_sale("000002"), make_sale("000001", amount=999)]
    )
    assert (first.duplicate, other.duplicate, again.duplicate) == (False, False, True)
    assert again.rrn == first.rrn  # names the sale already stored under that key
    stored = store.sales(TID)
    assert [s.stan for s in stored] == ["000001", "000002"]
    assert stored[0].amount == 1234


def test_sale_repeated_in_a_later_call_is_a_duplicate(store: Store) -> None:
    with_terminal(store)
    (first,) = store.record_sales([make_sale("000001")])
    again, new = store.record_sales([make_sale("000001"), make_sale("000003")])
    assert again.duplicate and again.rrn == first.rrn
    assert not new.duplicate and new.rrn != first.rrn
    assert len(store.sales(TID)) == 2


def test_same_stan_on_another_day_or_terminal_is_not_a_duplicate(store: Store) -> None:
    with_terminal(store)
    with_terminal(store, "T0000002")
    results = store.record_sales(
        [
            make_sale("000001"),
            make_sale("000001", local_date="0315"),
            make_sale("000001", "T0000002"),
        ]
    )
    assert [r.duplicate for r in results] == [False, False, False]
    assert len({r.rrn for r in results}) == 3


def test_sales_naming_an_unknown_batch_are_refused_all_or_nothing(store: Store) -> None:
    with_terminal(store)
    with pytest.raises(ValueError):
        store.record_sales([make_sale("000001"), make_sale("000002", batch_no=7)])
    with pytest.raises(ValueError):
        store.record_sales([make_sale("000001"), make_sale("000002", account_version=2)])
    with pytest.raises(ValueError):
        store.record_sales([make_sale("000001"), make_sale("000002", tid="NOSUCH00")])
    assert store.sales(TID) == []
    assert store.record_sales([make_sale("000001")])[0].duplicate is False


def test_stored_sale_keeps_what_was_recorded(store: Store) -> None:
    with_terminal(store)
    (result,) = store.record_sales([make_sale("000007", test=True, amount=50)])
    (stored,) = store.sales(TID)
    assert stored.rrn == result.rrn
    assert (stored.tid, stored.stan, stored.local_date, stored.transmission) == (
        TID,
        "000007",
        "0314",
        "0314101500",
    )
    assert (stored.amount, stored.currency, stored.auth_code, stored.test) == (
        50,
        "156",
        "A1B2C3",
        True,
    )
    assert (stored.account_version, stored.batch_no) == (1, 1)
    assert (stored.status, stored.batch_settled) == ("approved", False)
    assert store.sales("NOSUCH00") == []


def test_reversal_finds_the_original_and_reversing_is_idempotent(store: Store) -> None:
    with_terminal(store)
    (result,) = store.record_sales([make_sale("000005", transmission="0314101505")])
    found = store.find_sale(TID, "000005", "0314101505")
    assert found is not None and found.rrn == result.rrn and found.status == "approved"
    assert store.find_sale(TID, "000005", "0314101506") is None
    assert store.find_sale(TID, "000006", "0314101505") is None
    assert store.find_sale("T0000002", "000005", "0314101505") is None

    assert store.reverse_sale(result.rrn) is True
    assert store.reverse_sale(result.rrn) is False
    reversed_sale = store.find_sale(TID, "000005", "0314101505")
    assert reversed_sale is not None and reversed_sale.status == "reversed"
    assert store.sales(TID)[0].status == "reversed"


def test_reversing_an_unknown_rrn_changes_nothing(store: Store) -> None:
    with_terminal(store)
    store.record_sales([make_sale()])
    assert store.reverse_sale("999999999999") is False
    assert store.reverse_sale("not-an-rrn") is False
    assert store.reverse_sale("") is False
    assert [s.status for s in store.sales(TID)] == ["approved"]


# --- StoreTx.record_sales: sales inside the caller's transaction ------------------------------


def test_a_test_sale_and_the_state_change_it_brings_commit_together(store: Store) -> None:
    with_terminal(store)
    with store.transaction(TID) as tx:
        (result,) = tx.record_sales([make_sale("000001", test=True, amount=50)])
        assert not result.duplicate and tx.has_test_sale(TID, 1)
        assert tx.set_version_state(TID, 1, ("ACTIVE",), "VERIFIED", CREATED)
    assert [(s.rrn, s.test, s.amount) for s in store.sales(TID)] == [(result.rrn, True, 50)]
    assert [v.state for v in store.account_history(TID)] == ["VERIFIED"]


def test_a_transaction_that_raises_loses_its_test_sale_and_its_state_change(store: Store) -> None:
    with_terminal(store)
    with pytest.raises(RuntimeError), store.transaction(TID) as tx:
        assert [r.duplicate for r in tx.record_sales([make_sale("000001", test=True)])] == [False]
        assert tx.set_version_state(TID, 1, ("ACTIVE",), "VERIFIED", CREATED)
        assert tx.has_test_sale(TID, 1)  # there until the block fails
        raise RuntimeError("the answer could not be built, say")
    assert store.sales(TID) == [] and not store.sale_exists(TID, "000001", "0314")
    assert [v.state for v in store.account_history(TID)] == ["ACTIVE"]
    assert [r.duplicate for r in store.record_sales([make_sale("000001")])] == [False]


def test_sales_recorded_in_a_transaction_follow_the_duplicate_rule(store: Store) -> None:
    with_terminal(store)
    (first,) = store.record_sales([make_sale("000001")])
    with store.transaction(TID) as tx:
        assert tx.record_sales([]) == []
        again, new, repeat = tx.record_sales(
            [make_sale("000001"), make_sale("000002"), make_sale("000002", amount=7)]
        )
    assert (again.duplicate, again.rrn) == (True, first.rrn)
    assert not new.duplicate and new.rrn > first.rrn
    assert (repeat.duplicate, repeat.rrn) == (True, new.rrn)
    assert [(s.stan, s.amount) for s in store.sales(TID)] == [("000001", 1234), ("000002", 1234)]


def test_a_sale_refused_in_a_transaction_loses_the_whole_transaction(store: Store) -> None:
    with_terminal(store)
    with pytest.raises(ValueError), store.transaction(TID) as tx:
        assert tx.set_version_state(TID, 1, ("ACTIVE",), "VERIFIED", CREATED)
        tx.record_sales([make_sale("000001"), make_sale("000002", batch_no=7)])
    assert store.sales(TID) == []
    assert [v.state for v in store.account_history(TID)] == ["ACTIVE"]


# --- open_store -------------------------------------------------------------------------------


def test_open_store_picks_the_backend_from_the_name(tmp_path: Path) -> None:
    for name in (str(tmp_path / "plain.db"), f"sqlite:///{tmp_path / 'url.db'}"):
        opened = open_store(name)
        try:
            assert isinstance(opened, SQLiteStore)
        finally:
            opened.close()
    assert (tmp_path / "plain.db").exists() and (tmp_path / "url.db").exists()
    for bad in ("mysql://x/y", "", "sqlite:///"):
        with pytest.raises(ValueError):
            open_store(bad)


def test_open_store_refuses_an_in_memory_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A host opens its store twice (reader and ledger writer): two in-memory SQLite databases
    # would each see only their own writes.
    monkeypatch.chdir(tmp_path)
    for name in (":memory:", "sqlite:///:memory:"):
        with pytest.raises(ValueError, match="in-memory"):
            open_store(name)
    assert list(tmp_path.iterdir()) == []  # nor is a file of that name created


# --- batches and history ----------------------------------------------------------------------


def test_batch_settled_follows_the_batch_status(store: Store) -> None:
    with_terminal(store).record_sales([make_sale()])
    assert store.sales(TID)[0].batch_settled is False
    with store.transaction() as tx:
        opened = tx.close_batch(TID, 1, CREATED + 120)
        assert (opened.batch_no, opened.status, opened.opened_at) == (2, "open", CREATED + 120)
        with pytest.raises(ValueError, match="not open"):
            tx.close_batch(TID, 1, CREATED + 121)
    found = store.find_sale(TID, "000001", "0314101500")
    assert found is not None and found.batch_settled is True
    assert store.sales(TID)[0].batch_settled is True
    assert store.open_batch(TID) == 2


def test_history_and_ledger_cannot_be_rewritten_in_place(store: Store) -> None:
    with_terminal(store).record_sales([make_sale()])
    refused = [
        ("UPDATE settlement_accounts SET holder = 'MALLORY'", "never rewritten"),
        ("DELETE FROM settlement_accounts", "never deleted"),
        ("UPDATE sales SET amount = 1", "never rewritten"),
        ("DELETE FROM sales", "never deleted"),
    ]
    if isinstance(store, PostgresStore):
        refused += [
            ("TRUNCATE settlement_accounts CASCADE", "never deleted"),
            ("TRUNCATE sales", "never deleted"),
            ("TRUNCATE terminals CASCADE", "never deleted"),
        ]
    for statement, message in refused:
        with pytest.raises(INTEGRITY_ERRORS, match=message):
            execute_sql(store, statement)
    execute_sql(store, "UPDATE settlement_accounts SET state = 'VERIFIED'")  # a transition
    current = store.current_account(TID, CREATED + 1)
    assert current is not None and current.state == "VERIFIED"
    assert current.holder == "ZHANG SAN" and len(store.sales(TID)) == 1


# -- Store.add_terminal(then=...) --------------------------------------------------------------


def test_a_terminal_and_what_its_registration_writes_commit_together(store: Store) -> None:
    # `acqhost terminal add` writes the audit log's registration entry in the transaction
    # that registers the terminal: a failure there leaves neither behind.

    def entry_then_fail(tx: StoreTx) -> None:
        registration_entry(tx)
        raise RuntimeError("the disk is full, say")

    with pytest.raises(RuntimeError):
        store.add_terminal(make_terminal(), make_account(), None, then=entry_then_fail)
    assert store.get_terminal(TID) is None
    with store.transaction(write=False) as tx:
        assert tx.audit_entries() == [] and tx.versions(TID) == []
    # the tid is free again
    store.add_terminal(make_terminal(), make_account(), None, then=registration_entry)
    assert store.get_terminal(TID) is not None
    with store.transaction(write=False) as tx:
        assert [(e.action, e.tid) for e in tx.audit_entries()] == [("terminal.registered", TID)]


def test_then_raising_a_base_exception_after_writing_everything_it_can_leaves_nothing(
    store: Store,
) -> None:
    # ``then`` writes what a StoreTx can write about the new terminal (a second version, a
    # request for it, the operator's failures, an audit entry), then is interrupted: nothing
    # of the registration or of ``then`` is left, and the tid registers afresh (here without
    # an operator) as if never tried.
    def everything_then_interrupt(tx: StoreTx) -> None:
        registration_entry(tx)
        v1 = tx.versions(TID)[0]
        tx.insert_version(replace(v1, version=2, state="PENDING_REVIEW", holder="LI SI"))
        tx.insert_request(RebindRequest("RF00000000000001", TID, 2, "rebind", "01", "000001",
                                        "0314101500", "typed", 1.0, "PENDING_REVIEW", "", None, "",
                                        None))  # fmt: skip
        tx.set_operator_failures(TID, "01", 3)
        raise Interrupted

    with pytest.raises(Interrupted):
        store.add_terminal(make_terminal(), make_account(), OPERATOR,
                               then=everything_then_interrupt)  # fmt: skip
    assert store.get_terminal(TID) is None and store.list_terminals() == []
    assert store.account_history(TID) == []
    with pytest.raises(KeyError):
        store.open_batch(TID)
    with store.transaction(write=False) as tx:
        assert tx.operator(TID, "01") is None
        assert tx.requests() == [] and tx.audit_entries() == []
    store.add_terminal(make_terminal(), make_account(), None, then=registration_entry)
    with store.transaction(write=False) as tx:
        assert tx.operator(TID, "01") is None
        assert [v.version for v in tx.versions(TID)] == [1]
        assert [(e.seq, e.action) for e in tx.audit_entries()] == [(1, "terminal.registered")]
    assert store.open_batch(TID) == 1
    assert [r.duplicate for r in store.record_sales([make_sale()])] == [False]
    assert chain(store) == (1, [])


def test_a_failed_then_keeps_what_was_there_before(store: Store) -> None:
    # Another terminal and its audit entry exist; a registration whose ``then`` fails must not
    # touch them.
    store.add_terminal(make_terminal("T0000002"), make_account(), None,
                           then=lambda tx: registration_entry(tx, "T0000002"))  # fmt: skip
    store.record_sales([make_sale("000001", tid="T0000002")])

    def fail(tx: StoreTx) -> None:
        registration_entry(tx)
        raise RuntimeError("the disk is full, say")

    with pytest.raises(RuntimeError):
        store.add_terminal(make_terminal(), make_account(), OPERATOR, then=fail)
    assert [t.tid for t in store.list_terminals()] == ["T0000002"]
    assert [s.stan for s in store.sales("T0000002")] == ["000001"]
    assert len(store.account_history("T0000002")) == 1
    assert chain(store) == (1, [])
