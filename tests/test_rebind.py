"""The rebind flow's decisions (acqhost.domain.rebind) and the audit log, inside real store
transactions, on both backends: SQLite and PostgreSQL give the same answers."""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import pytest

from acqhost.config import RebindPolicy
from acqhost.domain import accounts, audit, cards, crypto, rebind
from acqhost.domain.rebind import Outcome, RebindError, Submission
from acqhost.store import NewAccount, Operator, SaleResult, SQLiteStore, Store, StoreTx
from acqhost.store.postgres import PostgresStore
from tests.storekit import make_sale, make_terminal

TID, OTHER = "T0000001", "T0000002"
T0 = 1_700_000_000.0
OLD = "6222020200112233446"
NEW = "6222020200112233453"
THIRD = "6222020200112233461"
KEY = crypto.HostKeys.generate().data_key
MANUAL = RebindPolicy(review="manual", cooling_off=100.0, min_interval=1000.0)
AUTO = RebindPolicy(review="auto", cooling_off=100.0, min_interval=0.0)


def open_backend(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """A store of ``kind`` with terminals TID and OTHER, each with operator 01 (password 0000)
    and account OLD held by ZHANG SAN as version 1."""
    opened: Store
    if kind == "sqlite":
        opened = SQLiteStore(tmp_path / "a.db")
    else:
        opened = PostgresStore(request.getfixturevalue("pg_url"))
    password_hash = crypto.hash_password("0000", fast=True)
    for tid in (TID, OTHER):
        opened.add_terminal(
            make_terminal(tid, created_at=T0),
            NewAccount(crypto.seal(KEY, OLD.encode()), crypto.account_hash(KEY, OLD),
                       cards.mask_account(OLD), "ZHANG SAN", "102100099996", "", "admin",
                       "registration"),
            Operator(tid, "01", password_hash, 0),
        )  # fmt: skip
    return opened


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with closing(open_backend(request.param, request, tmp_path)) as opened:
        yield opened


def sub(account: str = NEW, **changes: object) -> Submission:
    s = Submission(tid=TID, operator_id="01", stan="000001", transmission="1122101530",
                   holder="ZHANG SAN", bank_code="102100099996", branch="", account=account,
                   source="typed")  # fmt: skip
    return replace(s, **changes)  # type: ignore[arg-type]


def submit(
    store: Store,
    s: Submission | None = None,
    *,
    ok: bool = True,
    policy: RebindPolicy = MANUAL,
    now: float = T0 + 10,
) -> Outcome:
    s = s or sub()
    with store.transaction(s.tid) as tx:
        return rebind.submit(tx, KEY, s, password_ok=ok, policy=policy, now=now)


def states(store: Store, tid: str = TID) -> list[str]:
    with store.transaction(write=False) as tx:
        return [v.state for v in tx.versions(tid)]


def approve(store: Store, rf: str, now: float, policy: RebindPolicy = MANUAL) -> float:
    with store.transaction() as tx:
        return rebind.approve(tx, KEY, rf, "reviewer", policy, now)


def activate(store: Store, now: float) -> list[int]:
    with store.transaction() as tx:
        return [v.version for v in accounts.activate_due(tx, KEY, now)]


def test_accepted_submit_is_a_new_version_pending_review_and_the_old_one_stays_in_force(
    store: Store,
) -> None:
    out = submit(store)
    assert out.code == "00" and out.request is not None
    rf = out.request.rf
    assert len(rf) == 16 and rf.isalnum()
    ef = accounts.ef_text(T0 + 10 + 100)
    sa = cards.mask_account(NEW)
    assert out.elements == {"RF": rf, "ST": "PENDING_REVIEW", "EF": ef, "SA": sa}
    assert states(store) == ["ACTIVE", "PENDING_REVIEW"]
    current = store.current_account(TID, T0 + 10**6)
    assert current is not None and current.version == 1
    with store.transaction(write=False) as tx:
        request = tx.request(rf)
        version = tx.versions(TID)[1]
    assert request is not None and (request.kind, request.source) == ("rebind", "typed")
    assert crypto.unseal(KEY, version.sealed_account) == NEW.encode()
    assert version.account_hash == crypto.account_hash(KEY, NEW)


def test_auto_review_approves_at_once_and_the_version_is_in_force_from_its_effective_from(
    store: Store,
) -> None:
    out = submit(store, policy=AUTO, now=T0 + 10)
    assert out.code == "00" and out.elements["ST"] == "APPROVED"
    ef = T0 + 10 + AUTO.cooling_off
    assert store.current_account(TID, ef - 0.001).version == 1  # type: ignore[union-attr]
    assert store.current_account(TID, ef).version == 2  # type: ignore[union-attr]
    assert activate(store, ef - 0.001) == []
    assert activate(store, ef) == [2]
    assert activate(store, ef + 1) == []  # exactly once
    assert states(store) == ["ACTIVE", "ACTIVE"]


def test_a_short_cooling_off_still_takes_effect_after_the_decision_lead(store: Store) -> None:
    out = submit(store, policy=replace(AUTO, cooling_off=0.0), now=T0)
    assert out.elements["EF"] == accounts.ef_text(T0 + accounts.DECISION_LEAD)


def test_wrong_passwords_are_counted_and_lock_the_operator_out(store: Store) -> None:
    policy = replace(MANUAL, operator_max_failures=3)
    assert submit(store, ok=False, policy=policy).code == "55"
    assert submit(store, ok=True, policy=policy, s=sub(holder="someone else")).reason == (
        "NAME_MISMATCH"
    )  # a right password resets the count
    codes = [submit(store, ok=False, policy=policy).code for _ in range(3)]
    assert codes == ["55", "55", "75"]
    locked = submit(store, ok=True, policy=policy)
    assert (locked.code, locked.reason) == ("75", "OPERATOR_LOCKED")
    with store.transaction(write=False) as tx:
        operator = tx.operator(TID, "01")
        actions = [e.action for e in tx.audit_entries()]
    assert operator is not None and operator.failures == 3
    assert actions == ["operator.locked"]
    assert states(store) == ["ACTIVE"]


def test_unknown_operator_gets_55(store: Store) -> None:
    assert submit(store, sub(operator_id="99")) == Outcome("55", "UNKNOWN_OPERATOR")


@pytest.mark.parametrize(
    ("account", "code", "reason"),
    [
        ("6222020200112233447", "14", "BAD_ACCOUNT"),  # Luhn fails
        ("62220202009", "14", "BAD_ACCOUNT"),  # 11 digits
        ("62220202001122334460", "14", "BAD_ACCOUNT"),  # 20 digits
        (OLD, "05", "SAME_ACCOUNT"),
    ],
)
def test_account_number_checks(store: Store, account: str, code: str, reason: str) -> None:
    assert submit(store, sub(account)) == Outcome(code, reason)
    assert states(store) == ["ACTIVE"]


FULL_WIDTH = "\uff3a\uff28\uff21\uff2e\uff27\u3000\uff33\uff21\uff2e"  # ZHANG SAN, full width


@pytest.mark.parametrize("holder", [" zhang   san ", "Zhang San", FULL_WIDTH])
def test_holder_name_matches_after_whitespace_case_and_width_normalisation(
    store: Store, holder: str
) -> None:
    assert submit(store, sub(holder=holder)).code == "00"


def test_another_holder_name_is_refused(store: Store) -> None:
    assert submit(store, sub(holder="LI SI")) == Outcome("05", "NAME_MISMATCH")


def test_second_request_while_one_is_open_names_the_open_one(store: Store) -> None:
    first = submit(store)
    assert first.request is not None
    second = submit(store, sub(THIRD, stan="000002"))
    assert (second.code, second.reason) == ("05", "PENDING_EXISTS")
    assert second.elements["RF"] == first.request.rf
    assert states(store) == ["ACTIVE", "PENDING_REVIEW"]


def test_changes_closer_than_min_interval_are_refused_with_65(store: Store) -> None:
    first = submit(store, now=T0)
    assert first.request is not None
    ef = approve(store, first.request.rf, now=T0 + 5)
    activate(store, ef)
    too_soon = submit(store, sub(THIRD, stan="000002"), now=T0 + 5 + 999)
    assert too_soon == Outcome("65", "TOO_FREQUENT")
    later = submit(store, sub(THIRD, stan="000003"), now=T0 + 5 + 1000)
    assert later.code == "00"


def test_rejected_or_cancelled_requests_do_not_count_towards_min_interval(store: Store) -> None:
    first = submit(store, now=T0)
    assert first.request is not None
    with store.transaction() as tx:
        rebind.reject(tx, KEY, first.request.rf, "reviewer", "holder unclear", T0 + 1)
    again = submit(store, sub(stan="000002"), now=T0 + 2)
    assert again.code == "00" and again.request is not None
    with store.transaction(TID) as tx:
        assert rebind.cancel(tx, KEY, TID, again.request.rf, T0 + 3).code == "00"
    assert submit(store, sub(stan="000003"), now=T0 + 4).code == "00"
    assert states(store) == ["ACTIVE", "REJECTED", "CANCELLED", "PENDING_REVIEW"]


def test_reject_records_who_and_why(store: Store) -> None:
    out = submit(store)
    assert out.request is not None
    with store.transaction() as tx:
        rebind.reject(tx, KEY, out.request.rf, "reviewer", "documents missing", T0 + 20)
        request = tx.request(out.request.rf)
    assert request is not None
    assert (request.state, request.decided_by, request.decided_at, request.note) == (
        "REJECTED", "reviewer", T0 + 20, "documents missing")  # fmt: skip
    with store.transaction(write=False) as tx:
        assert "EF" not in rebind.describe(tx, request)


def test_review_refusals(store: Store) -> None:
    out = submit(store)
    assert out.request is not None
    rf = out.request.rf
    with pytest.raises(RebindError, match="no rebind request"), store.transaction() as tx:
        rebind.approve(tx, KEY, "NOSUCHREQUEST000", "reviewer", MANUAL, T0)
    with pytest.raises(RebindError, match="name"), store.transaction() as tx:
        rebind.approve(tx, KEY, rf, " ", MANUAL, T0)
    with pytest.raises(RebindError, match="reason"), store.transaction() as tx:
        rebind.reject(tx, KEY, rf, "reviewer", "", T0)
    approve(store, rf, T0 + 20)
    with (
        pytest.raises(RebindError, match="APPROVED, not PENDING_REVIEW"),
        store.transaction() as tx,
    ):
        rebind.reject(tx, KEY, rf, "reviewer", "too late", T0 + 21)


def test_cancel_only_a_pending_request_of_ones_own_terminal(store: Store) -> None:
    out = submit(store)
    assert out.request is not None
    rf = out.request.rf
    with store.transaction(OTHER) as tx:
        assert rebind.cancel(tx, KEY, OTHER, rf, T0 + 20) == Outcome("25", "NO_SUCH_REQUEST")
        assert rebind.find(tx, OTHER, rf) is None
    with store.transaction(TID) as tx:
        first = rebind.cancel(tx, KEY, TID, rf, T0 + 20)
        again = rebind.cancel(tx, KEY, TID, rf, T0 + 21)
    assert first.code == again.code == "00"
    assert first.elements == {"RF": rf, "ST": "CANCELLED", "SA": cards.mask_account(NEW)}
    approved = submit(store, sub(stan="000002"), policy=AUTO, now=T0 + 30)
    assert approved.request is not None
    with store.transaction(TID) as tx:
        late = rebind.cancel(tx, KEY, TID, approved.request.rf, T0 + 31)
    assert (late.code, late.reason) == ("05", "NOT_PENDING")


def test_latest_request_is_found_without_an_rf(store: Store) -> None:
    first = submit(store)
    assert first.request is not None
    with store.transaction(TID) as tx:
        rebind.cancel(tx, KEY, TID, first.request.rf, T0 + 11)
    second = submit(store, sub(stan="000002"), now=T0 + 12)
    assert second.request is not None
    with store.transaction(write=False) as tx:
        latest = rebind.find(tx, TID, None)
        assert rebind.find(tx, OTHER, None) is None
        by_message = tx.request_for_message(TID, "000002", "1122101530")
    assert latest is not None and latest.rf == second.request.rf
    assert by_message is not None and by_message.rf == second.request.rf


def test_first_approved_test_sale_verifies_an_active_version(store: Store) -> None:
    out = submit(store, policy=AUTO, now=T0)
    ef = T0 + AUTO.cooling_off
    with store.transaction(TID) as tx:
        assert not accounts.verify(tx, KEY, TID, 2, ef)  # no test sale yet (activates it)
    assert states(store) == ["ACTIVE", "ACTIVE"]
    store.record_sales([make_sale("000009", test=True, account_version=2)])
    with store.transaction(TID) as tx:
        assert accounts.verify(tx, KEY, TID, 2, ef + 1)
        assert not accounts.verify(tx, KEY, TID, 2, ef + 2)  # once
    assert states(store) == ["ACTIVE", "VERIFIED"]
    assert out.request is not None


def test_a_test_sale_verifies_in_its_own_transaction_touching_only_its_terminal(
    store: Store,
) -> None:
    """What the host's verifying test sale does: the sale and VERIFIED commit together (or,
    when the verification fails, neither), and the other terminal's due change is left to
    the activation service."""
    submit(store, policy=AUTO, now=T0)
    submit(store, sub(tid=OTHER), policy=AUTO, now=T0)
    ef = T0 + AUTO.cooling_off
    test_sale = make_sale("000009", test=True, account_version=2)

    def broken(tx: StoreTx, results: list[SaleResult]) -> None:
        assert accounts.verify(tx, KEY, TID, 2, ef + 1)
        raise RuntimeError("after the state change")

    with pytest.raises(RuntimeError):
        store.record_sales([test_sale], then=broken)
    assert store.sales(TID) == [] and states(store) == ["ACTIVE", "APPROVED"]
    verified: list[bool] = []

    def verify(tx: StoreTx, results: list[SaleResult]) -> None:
        assert not results[0].duplicate
        verified.append(accounts.verify(tx, KEY, TID, 2, ef + 1))

    (result,) = store.record_sales([test_sale], then=verify)
    assert verified == [True] and not result.duplicate
    assert states(store) == ["ACTIVE", "VERIFIED"]
    assert states(store, OTHER) == ["ACTIVE", "APPROVED"]  # in force, recorded later
    assert [s.rrn for s in store.sales(TID)] == [result.rrn]
    assert activate(store, ef + 2) == [2]


def test_rollback_restores_an_earlier_version_as_a_new_one(store: Store) -> None:
    out = submit(store, policy=AUTO, now=T0)
    ef = T0 + AUTO.cooling_off
    activate(store, ef)
    with store.transaction(TID) as tx:
        request = rebind.rollback(tx, KEY, TID, 1, "ops", "merchant's request", ef + 10)
    assert (request.kind, request.state, request.restores) == ("rollback", "APPROVED", 1)
    takes_effect = ef + 10 + accounts.DECISION_LEAD
    assert store.current_account(TID, takes_effect - 0.001).version == 2  # type: ignore[union-attr]
    current = store.current_account(TID, takes_effect)
    assert current is not None and current.version == 3
    assert current.account_hash == crypto.account_hash(KEY, OLD)
    assert "rollback to version 1" in current.reason and current.created_by == "ops"
    assert activate(store, takes_effect) == [3]
    assert states(store) == ["ACTIVE", "ROLLED_BACK", "ACTIVE"]
    assert out.request is not None


def test_rollback_refusals(store: Store) -> None:
    with pytest.raises(RebindError, match="already the one in force"), store.transaction(TID) as tx:
        rebind.rollback(tx, KEY, TID, 1, "ops", "", T0)
    with pytest.raises(RebindError, match="no version 5"), store.transaction(TID) as tx:
        rebind.rollback(tx, KEY, TID, 5, "ops", "", T0)
    out = submit(store)
    assert out.request is not None
    with pytest.raises(RebindError, match="open change"), store.transaction(TID) as tx:
        rebind.rollback(tx, KEY, TID, 1, "ops", "", T0 + 20)
    with store.transaction() as tx:
        rebind.reject(tx, KEY, out.request.rf, "reviewer", "no", T0 + 30)
    with pytest.raises(RebindError, match="never in force"), store.transaction(TID) as tx:
        rebind.rollback(tx, KEY, TID, 2, "ops", "", T0 + 40)
    with pytest.raises(RebindError, match="name"), store.transaction(TID) as tx:
        rebind.rollback(tx, KEY, TID, 1, "", "", T0 + 40)


def test_a_failed_transaction_leaves_nothing_behind(store: Store) -> None:
    with pytest.raises(RuntimeError), store.transaction(TID) as tx:
        out = rebind.submit(tx, KEY, sub(), password_ok=True, policy=MANUAL, now=T0)
        assert out.code == "00"
        raise RuntimeError("crash before commit")
    assert states(store) == ["ACTIVE"]
    with store.transaction(write=False) as tx:
        assert tx.requests() == [] and tx.audit_entries() == []


def test_the_store_itself_allows_one_open_request_per_terminal(store: Store) -> None:
    submit(store)
    with store.transaction(write=False) as tx:
        pending = tx.versions(TID)[1]
    with pytest.raises(ValueError), store.transaction(TID) as tx:
        tx.insert_version(replace(pending, version=3))
    assert states(store) == ["ACTIVE", "PENDING_REVIEW"]


# --- the audit log ------------------------------------------------------------------------------


def story(store: Store) -> None:
    """Submit, approve, activate, test-sell, roll back, reject: every kind of entry."""
    out = submit(store, now=T0)
    assert out.request is not None
    ef = approve(store, out.request.rf, T0 + 1)
    activate(store, ef)
    store.record_sales([make_sale("000009", test=True, account_version=2)])
    with store.transaction(TID) as tx:
        accounts.verify(tx, KEY, TID, 2, ef + 1)
        rebind.rollback(tx, KEY, TID, 1, "ops", "merchant's request", ef + 2)
    activate(store, ef + 2 + accounts.DECISION_LEAD)
    other = submit(store, sub(tid=OTHER), now=T0)
    assert other.request is not None
    with store.transaction() as tx:
        rebind.reject(tx, KEY, other.request.rf, "reviewer", "no", T0 + 5)


def test_every_state_change_is_in_the_audit_log_and_it_verifies(store: Store) -> None:
    story(store)
    with store.transaction(write=False) as tx:
        entries = tx.audit_entries()
    assert [e.action for e in entries] == [
        "rebind.submitted", "rebind.approved", "account.activated", "account.verified",
        "account.rollback", "account.activated", "account.rolled_back", "rebind.submitted",
        "rebind.rejected",
    ]  # fmt: skip
    assert [e.seq for e in entries] == list(range(1, 10))
    assert entries[0].prev_digest == audit.GENESIS
    assert all(b.prev_digest == a.digest for a, b in itertools.pairwise(entries))
    assert audit.verify(store, KEY) == (9, [])
    text = " ".join(e.detail for e in entries)
    assert NEW not in text and OLD not in text and cards.mask_account(NEW) in text


def test_audit_verify_needs_the_host_data_key(store: Store) -> None:
    story(store)
    count, problems = audit.verify(store, crypto.HostKeys.generate().data_key)
    assert count == 9
    assert all(any(p.startswith(f"entry {n}: content") for p in problems) for n in range(1, 10))


def tamper(store: Store, statement: str) -> None:
    """What someone with write access to the database could do around the triggers."""
    if isinstance(store, SQLiteStore):
        conn = sqlite3.connect(store.path)
        conn.executescript(
            "DROP TRIGGER audit_log_no_update; DROP TRIGGER audit_log_no_delete; "
            "DROP TRIGGER settlement_accounts_no_rewrite; "
            "DROP TRIGGER settlement_accounts_no_delete; DROP TRIGGER rebind_requests_no_delete;"
            "PRAGMA foreign_keys = OFF;"
        )
        conn.executescript(statement)
        conn.commit()
        conn.close()
    else:
        assert isinstance(store, PostgresStore)
        tables = ("audit_log", "settlement_accounts", "rebind_requests")
        with store._conn.transaction():
            for table in tables:
                store._conn.execute(f"ALTER TABLE {table} DISABLE TRIGGER USER")  # type: ignore[arg-type]
            store._conn.execute(statement)  # type: ignore[arg-type]
            for table in tables:
                store._conn.execute(f"ALTER TABLE {table} ENABLE TRIGGER USER")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("statement", "found"),
    [
        ("UPDATE audit_log SET actor = 'someone else' WHERE seq = 2", "entry 2: content"),
        ("DELETE FROM audit_log WHERE seq = 4", "entry 5: expected entry 4"),
        ("DELETE FROM audit_log WHERE seq = 9", "T0000002 version 2: state REJECTED"),
        ("UPDATE settlement_accounts SET state = 'VERIFIED' WHERE version = 3",
         "T0000001 version 3: state VERIFIED"),
        ("UPDATE settlement_accounts SET bank_code = '999999999999' WHERE version = 2",
         "T0000001 version 2: account, holder, bank or branch differ"),
        ("UPDATE settlement_accounts SET sealed_account = (SELECT sealed_account FROM "
         "settlement_accounts WHERE version = 2 AND tid = 'T0000001') WHERE version = 1",
         "T0000001 version 1: the sealed account number does not match"),
        ("DELETE FROM rebind_requests WHERE tid = 'T0000002'; "
         "DELETE FROM settlement_accounts WHERE tid = 'T0000002' AND version = 2",
         "T0000002 version 2: recorded REJECTED in the audit log but not in the store"),
        ("UPDATE audit_log SET detail = '{\"version\": \"two\"}' WHERE seq = 3",
         "entry 3: detail is not what the host writes"),
    ],
)  # fmt: skip
def test_audit_verify_detects_edits_and_deletions(store: Store, statement: str, found: str) -> None:
    story(store)
    assert audit.verify(store, KEY)[1] == []
    tamper(store, statement)
    problems = audit.verify(store, KEY)[1]
    assert any(p.startswith(found) for p in problems), problems


def test_the_store_refuses_to_edit_or_delete_audit_entries(store: Store) -> None:
    story(store)
    from tests.storekit import execute_sql

    for statement in ("UPDATE audit_log SET actor = 'x'", "DELETE FROM audit_log"):
        with pytest.raises(Exception, match="append-only"):
            execute_sql(store, statement)
    assert audit.verify(store, KEY) == (9, [])


def test_a_retransmitted_submit_is_a_duplicate_naming_the_first_request(store: Store) -> None:
    first = submit(store)
    assert first.request is not None
    again = submit(store, ok=False)  # decided after the first committed: no password counted
    assert (again.code, again.reason) == ("94", "DUPLICATE")
    assert again.elements["RF"] == first.request.rf
    with store.transaction(write=False) as tx:
        operator = tx.operator(TID, "01")
    assert operator is not None and operator.failures == 0


def test_effective_from_falls_on_a_whole_second_never_sooner_than_the_lead(store: Store) -> None:
    out = submit(store, now=T0 + 0.25)
    assert out.request is not None
    ef = approve(store, out.request.rf, T0 + 0.25, replace(MANUAL, cooling_off=0.0))
    assert ef == T0 + 3 and ef >= T0 + 0.25 + accounts.DECISION_LEAD


def test_a_read_transaction_sees_one_snapshot(store: Store, tmp_path: Path) -> None:
    out = submit(store, policy=AUTO, now=T0)
    assert out.request is not None
    other = (
        SQLiteStore(store.path)
        if isinstance(store, SQLiteStore)
        else PostgresStore(store._conninfo)  # type: ignore[attr-defined]
    )
    try:
        with store.transaction(write=False) as tx:
            before = [v.state for v in tx.versions(TID)]
            assert activate(other, T0 + AUTO.cooling_off) == [2]  # committed meanwhile
            during = [v.state for v in tx.versions(TID)]
        assert before == during == ["ACTIVE", "APPROVED"]
        assert states(store) == ["ACTIVE", "ACTIVE"]
    finally:
        other.close()
