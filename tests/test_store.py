"""The store: every backend (memory, SQLite, PostgreSQL) gives the same answers; the durable ones
(SQLite, PostgreSQL) add durability, migrations, several processes on one database, one
transaction per sale batch, and no secret in clear.

The PostgreSQL tests each get a fresh database on the server named by ACQHOST_TEST_PG (see
tests/conftest.py); without it they are skipped, except under CI."""

from __future__ import annotations

import fcntl
import hashlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import nacl.encoding
import nacl.hash
import nacl.secret
import nacl.utils
import psycopg
import pytest

from acqhost.domain import audit
from acqhost.store import (
    MemoryStore,
    NewAccount,
    Operator,
    SaleRecord,
    SchemaVersionError,
    Session,
    SQLiteStore,
    Store,
    Terminal,
    open_store,
)
from acqhost.store import sqlite as sqlite_store
from acqhost.store.base import RebindRequest, StoreTx
from acqhost.store.migrations import sqlite as migrations
from acqhost.store.postgres import PostgresStore

TID = "T0000001"
MID = "M00000000000001"
CREATED = 1_700_000_000.0

S = TypeVar("S", bound=Store)
Opener = Callable[[], Store]
INTEGRITY_ERRORS = (sqlite3.IntegrityError, psycopg.errors.IntegrityError)


def make_terminal(tid: str = TID, **changes: object) -> Terminal:
    terminal = Terminal(
        tid=tid,
        mid=MID,
        merchant_name="Noodle House",
        status="active",
        identity_public_key=bytes(range(32)),
        sale_limit=500_000,
        test_limit=100,
        created_at=CREATED,
    )
    return replace(terminal, **changes)  # type: ignore[arg-type]


def make_account(**changes: object) -> NewAccount:
    account = NewAccount(
        sealed_account=b"\x01sealed-account-bytes",
        account_hash=b"\x02" * 32,
        account_masked="6222********1234",
        holder="ZHANG SAN",
        bank_code="102100099996",
        branch="Haidian",
        created_by="admin",
        reason="registration",
    )
    return replace(account, **changes)  # type: ignore[arg-type]


def make_sale(stan: str = "000001", tid: str = TID, **changes: object) -> SaleRecord:
    sale = SaleRecord(
        tid=tid,
        mid=MID,
        stan=stan,
        local_date="0314",
        local_time="101500",
        transmission="0314101500",
        amount=1234,
        currency="156",
        pan_masked="622202******1234",
        auth_code="A1B2C3",
        test=False,
        account_version=1,
        batch_no=1,
        received_at=CREATED + 60,
    )
    return replace(sale, **changes)  # type: ignore[arg-type]


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    opened: Store
    if request.param == "memory":
        opened = MemoryStore()
    elif request.param == "sqlite":
        opened = SQLiteStore(tmp_path / "a.db")
    else:
        opened = PostgresStore(request.getfixturevalue("pg_url"))
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture(params=["sqlite", "postgres"])
def reopen(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """Opens one more instance on the same durable database at each call."""
    if request.param == "sqlite":
        path = tmp_path / "acqhost.db"
        return lambda: SQLiteStore(path)
    url: str = request.getfixturevalue("pg_url")
    return lambda: PostgresStore(url)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "acqhost.db"


def with_terminal(store: S, tid: str = TID) -> S:
    store.add_terminal(make_terminal(tid), make_account(), None)
    return store


def execute_sql(store: Store, statement: str) -> None:
    """Run one statement, committed, on the store's own connection: what anyone with access to
    the database could do behind the store's back."""
    if isinstance(store, SQLiteStore):
        store._conn.execute(statement)
    else:
        assert isinstance(store, PostgresStore)
        with store._conn.transaction():
            store._conn.execute(statement)


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


# --- open_store -------------------------------------------------------------------------------


def test_open_store_picks_the_backend_from_the_name(tmp_path: Path) -> None:
    memory = open_store(":memory:")
    assert isinstance(memory, MemoryStore)
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


# --- durable backends: several instances, processes and threads on one database ----------------


def test_sqlite_pragmas_for_a_shared_durable_file(db_path: Path) -> None:
    store = SQLiteStore(db_path)
    try:
        conn = store._conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    finally:
        store.close()


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


def test_record_sales_of_500_is_one_transaction(db_path: Path) -> None:
    store = with_terminal(SQLiteStore(db_path))
    statements: list[str] = []
    store._conn.set_trace_callback(statements.append)
    try:
        before = store._conn.total_changes
        results = store.record_sales([make_sale(f"{n:06d}") for n in range(500)])
        assert store._conn.total_changes - before == 500
    finally:
        store._conn.set_trace_callback(None)
        store.close()
    assert len(results) == 500 and not any(r.duplicate for r in results)
    verbs = [s.split(None, 1)[0].upper() for s in statements]
    assert verbs.count("BEGIN") == 1
    assert verbs.count("COMMIT") == 1
    assert verbs.count("INSERT") == 500
    assert verbs[0] == "BEGIN" and verbs[-1] == "COMMIT"


def test_batch_settled_follows_the_batch_status(reopen: Opener) -> None:
    store = with_terminal(reopen())
    try:
        store.record_sales([make_sale()])
        # Closing batches arrives with 0500 support; close this one by hand.
        execute_sql(store, "UPDATE batches SET status = 'closed', closed_at = 1")
        found = store.find_sale(TID, "000001", "0314101500")
        assert found is not None and found.batch_settled is True
        assert store.sales(TID)[0].batch_settled is True
    finally:
        store.close()


def test_history_and_ledger_cannot_be_rewritten_in_place(reopen: Opener) -> None:
    store = with_terminal(reopen())
    try:
        store.record_sales([make_sale()])
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
    finally:
        store.close()


# --- SQLite: no secret in clear on disk ----------------------------------------------------------


def test_no_account_number_or_pan_in_clear_in_the_database_files(db_path: Path) -> None:
    account_number = "6222021234567890128"
    pan = "6217009876543210987"
    data_key = nacl.utils.random(nacl.secret.SecretBox.KEY_SIZE)
    sealed = bytes(nacl.secret.SecretBox(data_key).encrypt(account_number.encode()))
    account_hash = nacl.hash.blake2b(
        account_number.encode(), key=b"k" * 32, encoder=nacl.encoding.RawEncoder
    )
    account = make_account(
        sealed_account=sealed, account_hash=account_hash, account_masked="6222***********0128"
    )
    store = SQLiteStore(db_path)
    store.add_terminal(make_terminal(), account, None)
    store.record_sales([make_sale(pan_masked=pan[:6] + "*" * 9 + pan[-4:])])

    secrets = [account_number.encode(), pan.encode(), account_number[6:-4].encode()]
    secrets.append(pan[6:-4].encode())
    wal = Path(f"{db_path}-wal")
    assert wal.exists()
    while_open = db_path.read_bytes() + wal.read_bytes()
    assert sealed in while_open  # the grep does see what the store wrote
    store.close()
    after_close = db_path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    assert sealed in after_close
    for blob in (while_open, after_close):
        for secret in secrets:
            assert secret not in blob
            assert secret.decode().encode("utf-16-le") not in blob

    # No column could hold them in clear either: secrets are sealed_*, *_hash or *_masked.
    conn = sqlite3.connect(db_path)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        columns = {c[1] for t in tables for c in conn.execute(f"PRAGMA table_info({t})")}
    finally:
        conn.close()
    suspicious = {c for c in columns if "pan" in c or "account" in c or c.endswith("_key")}
    assert suspicious == {
        "pan_masked",
        "sealed_account",
        "account_hash",
        "account_masked",
        "account_version",
        "identity_public_key",
    }


# --- SQLite: migrations -------------------------------------------------------------------------


def test_migration_versions_start_at_1_and_increase_by_one() -> None:
    versions = [version for version, _ in migrations.MIGRATIONS]
    assert versions == list(range(1, len(versions) + 1))
    assert migrations.latest_version() == versions[-1]


# A published migration is never edited: a database that applied it must stay what a new one
# gets. A change to the schema is a new migration, pinned here once published.
PUBLISHED = {
    1: "8bb753dde8d676998b74080b8be511b333583b0ad245a1c098bf6f4b50f7f2ce",
    2: "30cb67d2b29db1dd75cec30f80d80d06ec1125667767a40bddb32ae942262a3a",
    3: "2cccc8872c32cb9a8522dfdb967066266e6ca97ef681100670f397c7d7d452ef",
}


def test_published_migrations_are_never_edited() -> None:
    scripts = dict(migrations.MIGRATIONS)
    for version, digest in PUBLISHED.items():
        assert hashlib.sha256(scripts[version].encode()).hexdigest() == digest, version


def test_migration_scripts_split_into_whole_statements() -> None:
    script = "CREATE TABLE a (x TEXT DEFAULT ';');\n-- a comment; with a semicolon\n" + (
        "CREATE TRIGGER t BEFORE DELETE ON a BEGIN SELECT RAISE(ABORT, 'no'); END;\n"
    )
    parts = migrations.statements(script)
    assert len(parts) == 2
    assert parts[1].startswith("-- a comment") and parts[1].endswith("END;")
    with pytest.raises(ValueError, match="incomplete"):
        migrations.statements("CREATE TRIGGER t BEFORE DELETE ON a BEGIN SELECT 1;")


def test_fresh_database_ends_at_the_latest_schema_version(db_path: Path) -> None:
    store = SQLiteStore(db_path)
    try:
        assert store.schema_version() == migrations.latest_version()
    finally:
        store.close()
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == migrations.latest_version()
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        conn.close()
    assert {"terminals", "operators", "sessions", "settlement_accounts", "batches", "sales"} <= (
        tables
    )


def test_database_from_a_newer_version_is_refused_untouched(db_path: Path) -> None:
    SQLiteStore(db_path).close()
    newer = migrations.latest_version() + 1
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version = {newer}")
    conn.close()
    with pytest.raises(SchemaVersionError, match="newer") as info:
        SQLiteStore(db_path)
    assert (info.value.found, info.value.latest) == (newer, migrations.latest_version())
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == newer
    finally:
        conn.close()


def test_older_database_is_upgraded_and_keeps_its_rows(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = with_terminal(SQLiteStore(db_path))
    (sale,) = store.record_sales([make_sale()])
    store.close()
    latest = migrations.latest_version()
    upgrade = "CREATE TABLE probe (x INTEGER);\nINSERT INTO probe VALUES (42);"
    monkeypatch.setattr(migrations, "MIGRATIONS", [*migrations.MIGRATIONS, (latest + 1, upgrade)])

    store = SQLiteStore(db_path)
    try:
        assert store.schema_version() == latest + 1
        assert store._conn.execute("SELECT x FROM probe").fetchall() == [(42,)]
        assert [s.rrn for s in store.sales(TID)] == [sale.rrn]
    finally:
        store.close()
    SQLiteStore(db_path).close()  # already current: the migration is not applied twice


def test_failed_migration_leaves_the_database_as_it_was(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    SQLiteStore(db_path).close()
    latest = migrations.latest_version()
    broken = "CREATE TABLE half (x INTEGER);\nTHIS IS NOT SQL;"
    monkeypatch.setattr(migrations, "MIGRATIONS", [*migrations.MIGRATIONS, (latest + 1, broken)])
    with pytest.raises(sqlite3.OperationalError):
        SQLiteStore(db_path)
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == latest
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'half'").fetchone() is None
    finally:
        conn.close()


def test_the_once_a_second_activation_query_reads_only_approved_versions(db_path: Path) -> None:
    store = with_terminal(SQLiteStore(db_path))
    try:
        statements: list[str] = []
        store._conn.set_trace_callback(statements.append)
        with store.transaction(write=False) as tx:
            assert tx.due_versions(CREATED + 10) == []
        store._conn.set_trace_callback(None)
        query = next(s for s in statements if "effective_from <=" in s)
        plan = store._conn.execute("EXPLAIN QUERY PLAN " + query).fetchall()
        assert any("USING INDEX settlement_accounts_due" in row[-1] for row in plan), plan
    finally:
        store.close()


def test_queued_writers_take_turns_and_a_failed_write_frees_the_queue(db_path: Path) -> None:
    # The ledgers of --workers N processes: each write transaction waits on an OS lock first.
    first = with_terminal(SQLiteStore(db_path))
    second = SQLiteStore(db_path)
    first.queue_writers()
    second.queue_writers()
    done = threading.Event()

    def write_second() -> None:
        second.record_sales([make_sale("000002")])
        done.set()

    probe = os.open(f"{db_path}.writers", os.O_RDWR)
    try:
        with first.transaction():
            with pytest.raises(BlockingIOError):  # the queue's lock is held meanwhile
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            waiting = threading.Thread(target=write_second)
            waiting.start()
            assert not done.wait(0.3)  # its turn comes after this transaction
        assert done.wait(5)
        waiting.join()
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # and free once nobody writes
        fcntl.flock(probe, fcntl.LOCK_UN)
        with pytest.raises(ValueError):  # an unknown terminal: rolled back, lock released
            first.record_sales([make_sale("000003", tid="NOSUCH01")])
        assert [r.duplicate for r in second.record_sales([make_sale("000004")])] == [False]
        assert [s.stan for s in first.sales(TID)] == ["000002", "000004"]
    finally:
        os.close(probe)
        first.close()
        second.close()


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


def test_a_queued_writer_gives_up_when_the_queue_is_held_too_long(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker stopped in the middle of its turn: the others' writes fail (the host answers
    # 96) after the queue's timeout, as with SQLite's own lock, instead of hanging.
    monkeypatch.setattr(sqlite_store, "QUEUE_SECONDS", 0.3)
    store = with_terminal(SQLiteStore(db_path))
    store.queue_writers()
    holder = os.open(f"{db_path}.writers", os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        started = time.monotonic()
        with pytest.raises(sqlite3.OperationalError, match="writers' queue"):
            store.record_sales([make_sale("000001")])
        assert 0.25 < time.monotonic() - started < 3
        fcntl.flock(holder, fcntl.LOCK_UN)
        assert [r.duplicate for r in store.record_sales([make_sale("000001")])] == [False]
    finally:
        os.close(holder)
        store.close()


# -- Store.add_terminal(then=...) --------------------------------------------------------------


KEY = nacl.utils.random(nacl.secret.SecretBox.KEY_SIZE)
OPERATOR = Operator(tid=TID, operator_id="01", password_hash=b"$argon2id$...", failures=0)


def registration_entry(tx: StoreTx, tid: str = TID) -> None:
    first = tx.versions(tid)[0]
    audit.append(tx, KEY, at=first.created_at, actor="test", action="terminal.registered",
                 tid=tid, subject="v1", detail={"version": 1})  # fmt: skip


def chain(store: Store) -> tuple[int, list[str]]:
    """audit.verify, but for the test accounts' sealed numbers (made-up bytes here)."""
    count, problems = audit.verify(store, KEY)
    return count, [p for p in problems if "sealed account number" not in p]


class Interrupted(BaseException):
    """What Ctrl-C (KeyboardInterrupt) or a cancellation is: not an Exception."""


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
    # touch them (the memory store restores whole dicts from a copy).
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


def test_postgres_registrations_at_once_chain_their_audit_entries_in_one_order(
    pg_url: str,
) -> None:
    # Several processes (here threads, each with its own connection) register terminals at
    # once, each with its audit entry in its own transaction: the advisory lock gives the
    # chain one order (no duplicate seq, no fork), and each registration is announced.
    PostgresStore(pg_url).close()  # migrated once, before the race
    tids = [f"T000010{i}" for i in range(6)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(tids))

    def register(tid: str) -> None:
        store = PostgresStore(pg_url)
        try:
            barrier.wait()
            store.add_terminal(make_terminal(tid), make_account(), None,
                               then=lambda tx: registration_entry(tx, tid))  # fmt: skip
        except BaseException as e:  # reported below
            errors.append(e)
        finally:
            store.close()

    heard: list[tuple[str, str]] = []
    check = PostgresStore(pg_url)
    listener = check.cache_listener(lambda kind, tid: heard.append((kind, tid)))
    listener.start()
    try:
        time.sleep(0.3)  # listening
        threads = [threading.Thread(target=register, args=(tid,)) for tid in tids]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert errors == []
        assert chain(check) == (len(tids), [])
        with check.transaction(write=False) as tx:
            assert sorted(e.tid for e in tx.audit_entries()) == tids
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and len({t for k, t in heard if k == "terminal"}) < 6:
            time.sleep(0.02)
        assert {t for k, t in heard if k == "terminal"} == set(tids)
    finally:
        listener.stop()
        check.close()


def test_postgres_a_failed_then_announces_nothing(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    heard: list[tuple[str, str]] = []
    listener = store.cache_listener(lambda kind, tid: heard.append((kind, tid)))
    listener.start()
    try:
        time.sleep(0.3)

        def fail(tx: StoreTx) -> None:
            registration_entry(tx)
            raise RuntimeError("no")

        with pytest.raises(RuntimeError):
            store.add_terminal(make_terminal(), make_account(), None, then=fail)
        store.add_terminal(make_terminal("T0000002"), make_account(), None)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and ("terminal", "T0000002") not in heard:
            time.sleep(0.02)
        assert [h for h in heard if h[0] != "*"] == [("terminal", "T0000002")]
    finally:
        listener.stop()
        store.close()


# -- the writers' queue ------------------------------------------------------------------------


def queue_is_free(db_path: Path) -> bool:
    probe = os.open(f"{db_path}.writers", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(probe)


def test_a_queued_writer_that_cannot_begin_frees_the_queue(db_path: Path) -> None:
    # Its turn in the queue, then SQLite's own lock is held by a writer outside the queue (the
    # CLI, say) past the busy timeout: BEGIN IMMEDIATE fails, and the turn is given back.
    store = with_terminal(SQLiteStore(db_path))
    store.queue_writers()
    store._conn.execute("PRAGMA busy_timeout = 100")
    blocker = sqlite3.connect(db_path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            store.record_sales([make_sale()])
        assert queue_is_free(db_path)
        blocker.execute("ROLLBACK")
        assert [r.duplicate for r in store.record_sales([make_sale()])] == [False]
        assert queue_is_free(db_path)
    finally:
        blocker.close()
        store.close()


def test_a_queued_registration_interrupted_in_then_frees_the_queue(db_path: Path) -> None:
    store = SQLiteStore(db_path)
    store.queue_writers()
    try:

        def interrupt(tx: StoreTx) -> None:
            assert not queue_is_free(db_path)  # its turn is held meanwhile
            raise Interrupted

        with pytest.raises(Interrupted):
            store.add_terminal(make_terminal(), make_account(), None, then=interrupt)
        assert queue_is_free(db_path) and store.get_terminal(TID) is None
        assert not store._conn.in_transaction
        with pytest.raises(ValueError, match="already exists"):  # in the queue, rolled back
            with_terminal(with_terminal(store))
        assert queue_is_free(db_path)
    finally:
        store.close()


def test_a_queued_writer_gets_its_turn_when_it_comes_just_before_the_deadline(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The queue held for most of QUEUE_SECONDS: the waiting writer still gets its turn (the
    # deadline counts from when it started waiting, not from its last attempt).
    monkeypatch.setattr(sqlite_store, "QUEUE_SECONDS", 0.5)
    store = with_terminal(SQLiteStore(db_path))
    store.queue_writers()
    holder = os.open(f"{db_path}.writers", os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        timer = threading.Timer(0.4, fcntl.flock, (holder, fcntl.LOCK_UN))
        timer.start()
        started = time.monotonic()
        assert [r.duplicate for r in store.record_sales([make_sale()])] == [False]
        assert 0.35 < time.monotonic() - started < 0.5
        timer.join()
    finally:
        os.close(holder)
        store.close()


def test_the_writers_queue_is_released_after_a_refused_and_a_failed_write(
    db_path: Path,
) -> None:
    db = str(db_path)
    store = with_terminal(SQLiteStore(db))
    other = SQLiteStore(db)
    try:
        store.queue_writers()
        other.queue_writers()
        with pytest.raises(ValueError):  # an unknown terminal: a constraint refuses it
            store.record_sales([make_sale(tid="NOBODY01")])
        assert queue_is_free(db_path)
        store._conn.execute("PRAGMA busy_timeout = 50")
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # a writer that does not queue (the CLI, say)
        try:
            with pytest.raises(sqlite3.OperationalError):  # database is locked
                store.record_sales([make_sale()])
            assert queue_is_free(db_path)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        with pytest.raises(RuntimeError), store.transaction() as tx:  # a caller's error
            assert tx is not None
            raise RuntimeError("boom")
        assert queue_is_free(db_path)
        (result,) = other.record_sales([make_sale()])
        assert not result.duplicate
    finally:
        store.close()
        other.close()
