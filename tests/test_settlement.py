"""Batch settlement (PROTOCOL.md 5.4) in the domain and the store, on SQLite and PostgreSQL:
totals per settlement-account version, closing and opening batches, 95 and 12, the answer to a
retransmitted 0500, the hook that queues the settlement advices, sales and reversals racing a
settlement, and the settlement report (masked, and unmasked with its audit entry)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from acqhost.domain import accounts, advices, audit, cards, crypto, settlement, terminals
from acqhost.store import PostgresStore, SQLiteStore, Store, StoreTx
from acqhost.store.base import AccountVersion, BatchTotal
from acqhost.wire.tlv import decode_tlv
from tests.storekit import CREATED, KEY, MID, TID, chain, make_sale

ACCOUNT = "6222020200112233446"
NEW_ACCOUNT = "6217000100200030007"
NOW = CREATED + 3600
STAN, TRANSMISSION = "000123", "0314120000"


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "a.db")
    return str(request.getfixturevalue("pg_url"))


def open_at(url: str) -> Store:
    return PostgresStore(url) if "://" in url else SQLiteStore(url)


def register(store: Store) -> Store:
    """The terminal TID with its account version 1 (ACCOUNT), as `acqhost terminal add` does."""
    terminals.register(
        store,
        KEY,
        terminals.Registration(tid=TID, mid=MID, merchant_name="Noodle House", holder="张三",
                               account=ACCOUNT, bank_code="102100099996", branch="",
                               sale_limit=500_000, test_limit=100),
        by="admin",
        now=CREATED,
    )  # fmt: skip
    return store


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    opened = register(open_at(store_url))
    try:
        yield opened
    finally:
        opened.close()


def add_version(store: Store, account: str = NEW_ACCOUNT) -> None:
    """Version 2 of the terminal's account, in force, with its audit entry (as a change
    leaves it once active)."""
    with store.transaction(TID) as tx:
        v2 = dataclasses.replace(
            tx.versions(TID)[0],
            version=2,
            sealed_account=crypto.seal(KEY, account.encode()),
            account_hash=crypto.account_hash(KEY, account),
            account_masked=cards.mask_account(account),
            effective_from=CREATED + 60,
            created_at=CREATED + 60,
        )
        tx.insert_version(v2)
        fingerprint = audit.fingerprint(KEY, v2)
        accounts.record(tx, KEY, CREATED + 60, "test", "account.activated", TID, "v2", version=2,
                        before=None, after="ACTIVE", fingerprint=fingerprint)  # fmt: skip


def close(
    store: Store,
    batch_no: int,
    count: int,
    amount: int,
    *,
    stan: str = STAN,
    advise: settlement.Advise = advices.queue_settlement_advice,
) -> settlement.Outcome:
    """A terminal's 0500, decided in a transaction of its own."""
    with store.transaction() as tx:
        return settlement.close(tx, KEY, TID, batch_no, count, amount, NOW, stan=stan,
                                transmission=TRANSMISSION, advise=advise)  # fmt: skip


def sell(store: Store) -> list[str]:
    """Batch 1: two sales on version 1 (one reversed), a sale and a test sale on version 2.
    The RRNs."""
    add_version(store)
    results = store.record_sales(
        [
            make_sale("000001", amount=1000),
            make_sale("000002", amount=250),
            make_sale("000003", amount=700, account_version=2),
            make_sale("000004", amount=1, account_version=2, test=True),
        ]
    )
    assert store.reverse_sale(results[1].rrn)
    return [r.rrn for r in results]


def test_totals_count_approved_unreversed_sales_test_sales_too_per_version(store: Store) -> None:
    sell(store)
    with store.transaction(write=False) as tx:
        totals = settlement.open_totals(tx, TID)
    assert (totals.batch_no, totals.count, totals.amount) == (1, 3, 1701)
    assert totals.versions == (BatchTotal(1, 1, 1000), BatchTotal(2, 2, 701))


def test_matching_totals_close_the_batch_and_open_the_next(store: Store) -> None:
    sell(store)
    outcome = close(store, 1, 3, 1701)
    assert (outcome.code, outcome.batch_no, outcome.open_batch, outcome.closed) == (
        "00",
        1,
        2,
        True,
    )
    assert outcome.versions == (BatchTotal(1, 1, 1000), BatchTotal(2, 2, 701))
    assert outcome.elements() == {"BN": "000001", "CT": "3", "AM": "1701", "NB": "000002"}
    assert store.open_batch(TID) == 2
    with store.transaction(write=False) as tx:
        closed = tx.batch(TID, 1)
        assert closed is not None and (closed.status, closed.closed_at) == ("closed", NOW)
        assert settlement.open_totals(tx, TID) == settlement.OpenTotals(2, 0, 0, ())
        entry = tx.audit_entry(TID, settlement.CLOSED, "b1")
    assert entry is not None and entry.actor == "terminal"
    detail = json.loads(entry.detail)
    assert (detail["batch"], detail["next"], detail["count"], detail["amount"]) == (1, 2, 3, 1701)
    assert [a["account"] for a in detail["accounts"]] == [
        cards.mask_account(ACCOUNT),
        cards.mask_account(NEW_ACCOUNT),
    ]
    assert ACCOUNT not in entry.detail
    assert chain(store) == (3, [])  # the registration, version 2's activation, the close


def test_totals_that_differ_get_95_with_the_hosts_and_the_batch_stays_open(store: Store) -> None:
    sell(store)
    for count, amount in ((3, 1700), (4, 1701), (0, 0)):
        outcome = close(store, 1, count, amount)
        assert (outcome.code, outcome.reason, outcome.closed) == ("95", "TOTALS_MISMATCH", False)
        assert outcome.elements() == {"BN": "000001", "CT": "3", "AM": "1701"}
    assert store.open_batch(TID) == 1
    assert close(store, 1, 3, 1701).code == "00"


def test_a_close_queues_one_0520_per_settlement_account_in_its_transaction(
    store: Store,
) -> None:
    sell(store)
    before = {a.id for a in store.advices()}  # the registration's 0320 of version 1
    assert close(store, 1, 3, 1701).code == "00"
    queued = [a for a in store.advices() if a.id not in before]
    opened = [advices.open_advice(KEY, a) for a in queued]
    assert [(a.mti, a.tid, a.bank_code) for a in opened] == [("0520", TID, "102100099996")] * 2
    elements = [decode_tlv(a.fields["48"]) for a in opened]
    assert [(e["BN"], e["SV"], e["CT"], e["AM"]) for e in elements] == [
        ("000001", "1", "1", "1000"),
        ("000001", "2", "2", "701"),
    ]
    assert [e["AC"] for e in elements] == [ACCOUNT, NEW_ACCOUNT]
    assert close(store, 1, 3, 1701).code == "00"  # the retransmission queues nothing more
    assert len(store.advices()) == len(before) + 2


def test_advise_is_called_per_version_inside_the_closing_transaction(store: Store) -> None:
    sell(store)
    calls: list[tuple[object, ...]] = []

    def advise(tx: StoreTx, key: bytes, tid: str, batch: int, v: AccountVersion,
               *args: object) -> None:  # fmt: skip
        assert key == KEY and tx.open_batch(TID) is not None
        calls.append((tid, batch, v.version, *args))

    close(store, 1, 3, 1701, advise=advise)
    assert calls == [(TID, 1, 1, 1, 1000, NOW), (TID, 1, 2, 2, 701, NOW)]


def test_advise_that_fails_leaves_the_batch_open(store: Store) -> None:
    sell(store)

    def advise(tx: StoreTx, key: bytes, *args: object) -> None:
        raise RuntimeError("the outbox is full")

    with pytest.raises(RuntimeError):
        close(store, 1, 3, 1701, advise=advise)
    assert store.open_batch(TID) == 1
    with store.transaction(write=False) as tx:
        assert tx.audit_entry(TID, settlement.CLOSED, "b1") is None


def test_a_retransmitted_close_gets_the_first_answer_and_others_get_12(store: Store) -> None:
    sell(store)
    first = close(store, 1, 3, 1701)
    again = close(store, 1, 3, 1701)
    assert dataclasses.replace(again, closed=True) == first
    assert again.elements() == first.elements()
    # The same message however its totals read, once the batch is closed.
    assert close(store, 1, 0, 0).elements() == first.elements()
    other = close(store, 1, 3, 1701, stan="000124")
    assert (other.code, other.reason, other.elements()) == ("12", "BATCH_SETTLED", {"NB": "000002"})
    for unknown in (0, 3, 999999):
        outcome = close(store, unknown, 0, 0)
        assert (outcome.code, outcome.reason) == ("12", "NO_SUCH_BATCH")
        assert outcome.elements() == {"NB": "000002"}
    # The retransmission still answers as the first after the next batch closed too.
    assert close(store, 2, 0, 0, stan="000125").code == "00"
    assert close(store, 1, 3, 1701).elements() == first.elements()
    assert store.open_batch(TID) == 3


def test_a_settled_batch_keeps_its_sales_as_they_were(store: Store) -> None:
    rrns = sell(store)
    close(store, 1, 3, 1701)
    assert store.reverse_sale(rrns[0]) is False
    found = store.find_sale(TID, "000001", make_sale().transmission)
    assert found is not None and (found.status, found.batch_settled) == ("approved", True)
    # A sale the host still thinks of as in batch 1 goes to the batch open now.
    store.record_sales([make_sale("000005", batch_no=1)])
    with pytest.raises(ValueError):  # a batch beyond the open one is refused
        store.record_sales([make_sale("000006", batch_no=3)])
    batches = {s.stan: s.batch_no for s in store.sales(TID)}
    assert batches == {"000001": 1, "000002": 1, "000003": 1, "000004": 1, "000005": 2}
    with store.transaction(write=False) as tx:
        assert tx.batch_totals(TID, 1) == [BatchTotal(1, 1, 1000), BatchTotal(2, 2, 701)]


def test_a_sale_in_flight_is_counted_by_the_settlement_that_waits_for_it(store_url: str) -> None:
    with_one = open_at(store_url)
    other = open_at(store_url)
    try:
        register(with_one)
        selling, sold = threading.Event(), threading.Event()
        outcome: list[settlement.Outcome] = []

        def settle() -> None:
            selling.wait()
            with other.transaction() as tx:
                outcome.append(
                    settlement.close(tx, KEY, TID, 1, 1, 500, NOW, stan=STAN,
                                     transmission=TRANSMISSION)
                )  # fmt: skip
            sold.set()

        thread = threading.Thread(target=settle)
        thread.start()
        with with_one.transaction() as tx:
            tx.record_sales([make_sale("000001", amount=500)])
            selling.set()
            assert not sold.wait(0.3)  # the settlement waits for this transaction
        thread.join(10)
        assert outcome and outcome[0].code == "00"
    finally:
        with_one.close()
        other.close()


def test_a_sale_racing_a_settlement_never_joins_the_settled_batch(store_url: str) -> None:
    first, second = open_at(store_url), open_at(store_url)
    try:
        register(first)
        closing, done = threading.Event(), threading.Event()
        failed: list[BaseException] = []

        def sale() -> None:
            closing.wait()
            try:
                second.record_sales([make_sale("000002", batch_no=1)])
            except ValueError as e:  # PostgreSQL: it waited, then found batch 1 closed
                failed.append(e)
            done.set()

        thread = threading.Thread(target=sale)
        thread.start()
        with first.transaction() as tx:
            outcome = settlement.close(tx, KEY, TID, 1, 0, 0, NOW, stan=STAN,
                                       transmission=TRANSMISSION)  # fmt: skip
            assert outcome.code == "00"
            closing.set()
            assert not done.wait(0.3)  # the sale waits for the settlement
        thread.join(10)
        # SQLite serialises the two, and the sale goes to batch 2; on PostgreSQL it fails (the
        # terminal is answered 96 and sends it again). Never in batch 1, closed with 0 sales.
        assert [s.batch_no for s in first.sales(TID)] == ([] if failed else [2])
        assert bool(failed) == isinstance(first, PostgresStore)
    finally:
        first.close()
        second.close()


# -- the settlement report -----------------------------------------------------------------------


def test_report_lines_per_terminal_batch_and_version(store: Store) -> None:
    sell(store)
    with store.transaction(write=False) as tx:
        assert settlement.report(tx, KEY, now=NOW) == []  # nothing settled yet
    close(store, 1, 3, 1701)
    store.record_sales([make_sale("000009", amount=42, account_version=2, batch_no=2)])
    with store.transaction(write=False) as tx:
        lines = settlement.report(tx, KEY, now=NOW)
        assert settlement.report(tx, KEY, batch_no=2, now=NOW) == []  # open: not settled
        assert settlement.report(tx, KEY, tid="T0000009", now=NOW) == []
        day = datetime.datetime.fromtimestamp(NOW, datetime.UTC).date()
        assert settlement.report(tx, KEY, day=day, now=NOW) == lines
        before = day - datetime.timedelta(days=1)
        assert settlement.report(tx, KEY, day=before, now=NOW) == []
        assert tx.audit_entry("*", settlement.REPORT_UNMASKED, "settlement") is None
    assert [(x.tid, x.mid, x.batch_no, x.closed_at) for x in lines] == [(TID, MID, 1, NOW)] * 2
    assert [(x.account_version, x.count, x.amount) for x in lines] == [(1, 1, 1000), (2, 2, 701)]
    assert [x.account for x in lines] == [
        cards.mask_account(ACCOUNT),
        cards.mask_account(NEW_ACCOUNT),
    ]
    assert [(x.holder, x.bank_code) for x in lines] == [("张三", "102100099996")] * 2


def test_an_unmasked_report_is_in_the_audit_log(store: Store) -> None:
    sell(store)
    close(store, 1, 3, 1701)
    with store.transaction() as tx:
        lines = settlement.report(tx, KEY, unmasked=True, by="auditor", now=NOW + 1)
        with pytest.raises(ValueError, match="named"):
            settlement.report(tx, KEY, unmasked=True, by=" ", now=NOW + 1)
    assert [x.account for x in lines] == [ACCOUNT, NEW_ACCOUNT]
    with store.transaction(write=False) as tx:
        entry = tx.audit_entry("*", settlement.REPORT_UNMASKED, "settlement")
    assert entry is not None and (entry.actor, entry.at) == ("auditor", NOW + 1)
    assert json.loads(entry.detail)["shown"] == [f"{TID} b1 v1", f"{TID} b1 v2"]
    assert ACCOUNT not in entry.detail
    assert chain(store) == (4, [])
