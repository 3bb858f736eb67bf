"""The store: every backend (memory, SQLite, PostgreSQL) gives the same answers; the durable ones
(SQLite, PostgreSQL) add durability, migrations, several processes on one database, one
transaction per sale batch, and no secret in clear.

The PostgreSQL tests each get a fresh database on the server named by ACQHOST_TEST_PG (see
tests/conftest.py); without it they are skipped, except under CI."""

from __future__ import annotations

import getpass
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import nacl.encoding
import nacl.hash
import nacl.secret
import nacl.utils
import psycopg
import pytest
from psycopg import pq, sql

from acqhost.store import (
    MemoryStore,
    NewAccount,
    Operator,
    SaleRecord,
    SaleResult,
    SchemaVersionError,
    Session,
    SQLiteStore,
    Store,
    Terminal,
    format_rrn,
    migrations,
    open_store,
    pg_migrations,
)
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


def test_open_store_opens_postgresql_urls(pg_url: str) -> None:
    for url in (pg_url, "postgres://" + pg_url.split("://", 1)[1]):
        opened = open_store(url)
        try:
            assert isinstance(opened, PostgresStore)
            assert opened.list_terminals() == []
        finally:
            opened.close()


def test_postgres_store_never_shows_the_password_of_its_url(pg_url: str) -> None:
    parts = urlsplit(pg_url)
    secret = parts.password or "s3cret-pw"
    if not parts.password:  # peer or trust authentication: carried, never asked for
        user = parts.username or getpass.getuser()
        port = f":{parts.port}" if parts.port else ""
        netloc = f"{user}:{secret}@{parts.hostname or ''}{port}"
        pg_url = urlunsplit(parts._replace(netloc=netloc))
    opened = PostgresStore(pg_url)
    try:
        assert secret not in repr(opened)
    finally:
        opened.close()
    unreachable = urlunsplit(urlsplit(pg_url)._replace(query="host=/nonexistent"))
    with pytest.raises(psycopg.OperationalError) as info:
        PostgresStore(unreachable)
    assert secret not in str(info.value)


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


# --- PostgreSQL: one connection, one transaction per method, one statement per sale batch -------


def frontend_messages(
    store: PostgresStore, tmp_path: Path, call: Callable[[], object]
) -> list[str]:
    """What ``call`` sends to the server, one protocol message a line: ``Query "BEGIN"``,
    ``Parse ...``, ``Sync`` (the end of one extended-protocol statement), ..."""
    trace = tmp_path / "libpq.trace"
    with trace.open("w") as file:
        store._conn.pgconn.trace(file.fileno())
        store._conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        try:
            call()
        finally:
            store._conn.pgconn.untrace()
    lines = trace.read_text().splitlines()
    return [line.split("\t", 2)[2] for line in lines if line.startswith("F\t")]


def test_postgres_record_sales_of_500_is_one_transaction_and_one_statement(
    pg_url: str, tmp_path: Path
) -> None:
    store = with_terminal(PostgresStore(pg_url))
    try:
        results: list[object] = []
        sent = frontend_messages(
            store,
            tmp_path,
            lambda: results.extend(store.record_sales([make_sale(f"{n:06d}") for n in range(500)])),
        )
        assert len(results) == 500
        with store._conn.transaction():
            row = store._conn.execute(
                "SELECT count(*), count(DISTINCT xmin::text) FROM sales"
            ).fetchone()
    finally:
        store.close()
    assert row == (500, 1)  # 500 rows, all written by one transaction
    assert sent[0].startswith('Query\t "BEGIN') and sent[-1] == 'Query\t "COMMIT"'
    assert sent.count("Sync") == 1  # one statement between them
    assert len([m for m in sent if m.startswith("Query")]) == 2


def test_postgres_every_method_is_one_transaction_and_leaves_none_open(
    pg_url: str, tmp_path: Path
) -> None:
    store = PostgresStore(pg_url)
    session = Session(tid=TID, sealed_rx=b"rx", sealed_tx=b"tx", signed_on_at=1.0)
    calls: list[Callable[[], object]] = [
        lambda: store.add_terminal(make_terminal(), make_account(), None),
        lambda: store.get_terminal(TID),
        store.list_terminals,
        lambda: store.set_terminal_status(TID, "active"),
        lambda: store.save_session(session),
        lambda: store.get_session(TID),
        lambda: store.drop_session(TID),
        lambda: store.current_account(TID, CREATED + 1),
        lambda: store.account_history(TID),
        lambda: store.open_batch(TID),
        lambda: store.record_sales([make_sale("000001"), make_sale("000002")]),
        lambda: store.record_sales([make_sale("000001"), make_sale("000003")]),  # + a look-up
        lambda: store.sale_exists(TID, "000001", "0314"),
        lambda: store.find_sale(TID, "000001", "0314101500"),
        lambda: store.reverse_sale("000000000001"),
        lambda: store.sales(TID),
        store.schema_version,
    ]
    try:
        assert store._conn.autocommit is False
        assert store._conn.isolation_level == psycopg.IsolationLevel.READ_COMMITTED
        for call in calls:
            sent = frontend_messages(store, tmp_path, call)
            begins = [m for m in sent if m.startswith('Query\t "BEGIN')]
            ends = [m for m in sent if m in ('Query\t "COMMIT"', 'Query\t "ROLLBACK"')]
            assert begins == [sent[0]] and ends == [sent[-1]] == ['Query\t "COMMIT"']
            assert store._conn.info.transaction_status == pq.TransactionStatus.IDLE
        # A refused write is rolled back whole, and the connection is ready for the next call.
        with pytest.raises(ValueError):
            store.record_sales([make_sale("000009"), make_sale("000010", batch_no=7)])
        assert store._conn.info.transaction_status == pq.TransactionStatus.IDLE
        assert not store.sale_exists(TID, "000009", "0314")
    finally:
        store.close()
    store.close()  # closing twice is harmless


def test_postgres_store_reconnects_after_losing_its_connection(pg_url: str) -> None:
    store = with_terminal(PostgresStore(pg_url))
    try:
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (store._conn.info.backend_pid,))
        with pytest.raises(psycopg.OperationalError):
            store.get_terminal(TID)  # the call under which it went away fails...
        assert store.get_terminal(TID) == make_terminal()  # ...and the next one reconnects
    finally:
        store.close()


def test_postgres_writers_deadlocked_on_the_same_keys_end_with_one_sale_per_key(
    pg_url: str,
) -> None:
    store = with_terminal(PostgresStore(pg_url))
    other = psycopg.connect(pg_url)  # another host, mid-transaction: holds its keys until commit
    outcome: list[object] = []

    def insert(stan: str) -> int:
        row = other.execute(
            "INSERT INTO sales (tid, mid, stan, local_date, local_time, transmission, amount, "
            "currency, pan_masked, auth_code, test, account_version, batch_no, received_at) "
            "VALUES (%s, %s, %s, '0314', '101500', '0314101500', 1, '156', '622202******1234', "
            "'A1B2C3', false, 1, 1, 0) RETURNING rrn",
            (TID, MID, stan),
        ).fetchone()
        assert row is not None
        return int(row[0])

    def record() -> None:
        try:
            outcome.extend(store.record_sales([make_sale("000001"), make_sale("000002")]))
        except BaseException as error:  # pragma: no cover - reported below
            outcome.append(error)

    try:
        # The store (deadlock_timeout 1 s) is the one PostgreSQL finds deadlocked and aborts.
        other.execute("SET deadlock_timeout = '20s'")
        theirs = [0, insert("000002")]
        thread = threading.Thread(target=record)
        thread.start()  # inserts 000001, then waits on the other's 000002
        with psycopg.connect(pg_url, autocommit=True) as watcher:
            for _ in range(200):
                waiting = watcher.execute(
                    "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s",
                    (store._conn.info.backend_pid,),
                ).fetchone()
                if waiting == (True,):
                    break
                time.sleep(0.05)
        theirs[0] = insert("000001")  # waits on the store's 000001: a deadlock
        other.commit()
        thread.join()
    finally:
        other.close()
        store.close()
    assert len(outcome) == 2, outcome
    first, second = outcome
    assert first == SaleResult(format_rrn(theirs[0]), True)
    assert second == SaleResult(format_rrn(theirs[1]), True)


# --- PostgreSQL: no secret in clear in any column -----------------------------------------------


def test_no_account_number_or_pan_in_clear_in_any_postgres_column(pg_url: str) -> None:
    account_number = "6222021234567890128"
    pan = "6217009876543210987"
    data_key = nacl.utils.random(nacl.secret.SecretBox.KEY_SIZE)
    box = nacl.secret.SecretBox(data_key)
    sealed = bytes(box.encrypt(account_number.encode()))
    account_hash = nacl.hash.blake2b(
        account_number.encode(), key=b"k" * 32, encoder=nacl.encoding.RawEncoder
    )
    account = make_account(
        sealed_account=sealed, account_hash=account_hash, account_masked="6222***********0128"
    )
    pan_masked = pan[:6] + "*" * 9 + pan[-4:]
    store = PostgresStore(pg_url)
    try:
        operator = Operator(tid=TID, operator_id="01", password_hash=b"$argon2id$h", failures=0)
        store.add_terminal(make_terminal(), account, operator)
        store.save_session(
            Session(TID, bytes(box.encrypt(b"k" * 32)), bytes(box.encrypt(b"t" * 32)), 1.0)
        )
        store.record_sales([make_sale(pan_masked=pan_masked)])
    finally:
        store.close()

    clear = [account_number, pan, account_number[6:-4], pan[6:-4]]
    with psycopg.connect(pg_url) as conn:
        columns = conn.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND data_type IN "
            "('text', 'bytea', 'character varying', 'character', 'json', 'jsonb', 'xml') "
            "ORDER BY table_name, ordinal_position"
        ).fetchall()

        def holding(needle: str | bytes) -> set[str]:
            """The columns with a value containing ``needle`` (bytes: in bytea columns)."""
            found = set()
            for table, column, data_type in columns:
                if isinstance(needle, bytes) != (data_type == "bytea"):
                    continue
                template = (
                    "SELECT count(*) FROM {} WHERE position(%s::bytea IN {}) > 0"
                    if isinstance(needle, bytes)
                    else "SELECT count(*) FROM {} WHERE strpos({}::text, %s) > 0"
                )
                query = sql.SQL(template).format(sql.Identifier(table), sql.Identifier(column))
                row = conn.execute(query, (needle,)).fetchone()
                if row is not None and row[0] > 0:
                    found.add(f"{table}.{column}")
            return found

        # The search does see what the store wrote...
        assert holding(sealed) == {"settlement_accounts.sealed_account"}
        assert holding(pan_masked) == {"sales.pan_masked"}
        # ...and no clear digits anywhere, as text or as bytes (ASCII or UTF-16).
        for digits in clear:
            assert holding(digits) == set()
            assert holding(digits.encode()) == set()
            assert holding(digits.encode("utf-16-le")) == set()
        every_column = conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema()"
        ).fetchall()
    tables = {table for table, _ in every_column}
    assert {"terminals", "operators", "sessions", "settlement_accounts", "batches", "sales"} <= (
        tables
    )
    names = {column for _, column in every_column}
    suspicious = {c for c in names if "pan" in c or "account" in c or c.endswith("_key")}
    assert suspicious == {
        "pan_masked",
        "sealed_account",
        "account_hash",
        "account_masked",
        "account_version",
        "identity_public_key",
    }


# --- PostgreSQL: migrations ---------------------------------------------------------------------


def pg_schema_version(url: str) -> int | None:
    """The version row, read behind the store's back; None without a schema_version table."""
    with psycopg.connect(url) as conn:
        if conn.execute("SELECT to_regclass('schema_version')").fetchone() == (None,):
            return None
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        assert row is not None
        return int(row[0])


def test_postgres_migration_versions_start_at_1_and_increase_by_one() -> None:
    versions = [version for version, _ in pg_migrations.MIGRATIONS]
    assert versions == list(range(1, len(versions) + 1))
    assert pg_migrations.latest_version() == versions[-1]


def test_fresh_postgres_database_ends_at_the_latest_schema_version(pg_url: str) -> None:
    assert pg_schema_version(pg_url) is None
    store = PostgresStore(pg_url)
    try:
        assert store.schema_version() == pg_migrations.latest_version()
    finally:
        store.close()
    assert pg_schema_version(pg_url) == pg_migrations.latest_version()


def test_postgres_database_from_a_newer_version_is_refused_untouched(pg_url: str) -> None:
    PostgresStore(pg_url).close()
    newer = pg_migrations.latest_version() + 1
    with psycopg.connect(pg_url) as conn:
        conn.execute("UPDATE schema_version SET version = %s", (newer,))
    with pytest.raises(SchemaVersionError, match="newer") as info:
        PostgresStore(pg_url)
    assert (info.value.found, info.value.latest) == (newer, pg_migrations.latest_version())
    assert pg_schema_version(pg_url) == newer


def test_older_postgres_database_is_upgraded_and_keeps_its_rows(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = with_terminal(PostgresStore(pg_url))
    (sale,) = store.record_sales([make_sale()])
    store.close()
    latest = pg_migrations.latest_version()
    upgrade = "CREATE TABLE probe (x INTEGER);\nINSERT INTO probe VALUES (42);"
    monkeypatch.setattr(
        pg_migrations, "MIGRATIONS", [*pg_migrations.MIGRATIONS, (latest + 1, upgrade)]
    )

    store = PostgresStore(pg_url)
    try:
        assert store.schema_version() == latest + 1
        with store._conn.transaction():
            assert store._conn.execute("SELECT x FROM probe").fetchall() == [(42,)]
        assert [s.rrn for s in store.sales(TID)] == [sale.rrn]
    finally:
        store.close()
    PostgresStore(pg_url).close()  # already current: the migration is not applied twice
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT x FROM probe").fetchall() == [(42,)]


def test_failed_postgres_migration_leaves_the_database_as_it_was(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    latest = pg_migrations.latest_version()
    broken = "CREATE TABLE half (x INTEGER);\nTHIS IS NOT SQL;"
    monkeypatch.setattr(
        pg_migrations, "MIGRATIONS", [*pg_migrations.MIGRATIONS, (latest + 1, broken)]
    )
    with pytest.raises(psycopg.errors.SyntaxError):
        PostgresStore(pg_url)
    assert pg_schema_version(pg_url) == latest  # the good migrations stay, each its own
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT to_regclass('half')").fetchone() == (None,)


def test_postgres_stores_opening_a_new_database_at_once_migrate_it_once(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    latest = pg_migrations.latest_version()
    # Not idempotent on purpose: applied twice, it would fail or leave two rows.
    upgrade = "CREATE TABLE probe (x INTEGER);\nINSERT INTO probe VALUES (42);"
    monkeypatch.setattr(
        pg_migrations, "MIGRATIONS", [*pg_migrations.MIGRATIONS, (latest + 1, upgrade)]
    )
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def opener() -> None:
        try:
            start.wait()
            PostgresStore(pg_url).close()
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=opener) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert pg_schema_version(pg_url) == latest + 1
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT x FROM probe").fetchall() == [(42,)]
