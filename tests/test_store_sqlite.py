"""SQLite-only store tests: the file's settings, one transaction per sale batch, no secret in
clear on disk, migrations, the activation query's index, and the writers' queue of several
host processes on one file."""

from __future__ import annotations

import fcntl
import hashlib
import os
import sqlite3
import threading
import time
from pathlib import Path

import nacl.encoding
import nacl.hash
import nacl.secret
import nacl.utils
import pytest

from acqhost.store import SchemaVersionError, SQLiteStore, StoreTx
from acqhost.store import sqlite as sqlite_store
from acqhost.store.migrations import sqlite as migrations
from acqhost.store.sql import INSERT_SALE
from tests.storekit import (
    CREATED,
    TID,
    Interrupted,
    make_account,
    make_sale,
    make_terminal,
    with_terminal,
)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "acqhost.db"


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


def test_record_sales_of_500_is_one_transaction(db_path: Path) -> None:
    store = with_terminal(SQLiteStore(db_path))
    statements: list[str] = []
    store._conn.set_trace_callback(statements.append)
    try:
        before = store._conn.total_changes
        results = store.record_sales([make_sale(f"{n:06d}") for n in range(500)])
        # Each sale: its row, and its batch's totals (migration 7's trigger).
        assert store._conn.total_changes - before == 2 * 500
    finally:
        store._conn.set_trace_callback(None)
        store.close()
    assert len(results) == 500 and not any(r.duplicate for r in results)
    verbs = [s.split(None, 1)[0].upper() for s in statements]
    assert verbs.count("BEGIN") == 1
    assert verbs.count("COMMIT") == 1
    # One statement a sale (traced again for each statement its trigger runs), nothing else.
    inserts = {s for s in statements if s.startswith("INSERT")}  # as traced, values bound
    assert len(inserts) == 500 and all(s.startswith(INSERT_SALE.split("(")[0]) for s in inserts)
    assert set(verbs) == {"BEGIN", "INSERT", "COMMIT"}
    assert verbs[0] == "BEGIN" and verbs[-1] == "COMMIT"


# --- SQLite: no secret in clear on disk -------------------------------------------------------


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


# --- SQLite: migrations -----------------------------------------------------------------------


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
    4: "bc58446a0d1b62a51b8e315a9ee404d3133be79ac886cf1ae34295351167dcec",
    5: "ab8101fe6eb8a7a8eed822a3e80e07eb44eb052147291556fc473304eb427000",
    6: "0f9cde2c4bbe2be4ce646cf28433990f08dbba4ea35f0de984417526d17ec47e",
    7: "e64741adba943743f95d29d40b84bbbe846d71a1de34de53e9ed9a5138e137dd",
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


def test_a_sale_and_a_settlements_totals_read_the_ledger_through_indexes(db_path: Path) -> None:
    """A sale's insert finds its batch by key, and a 0500's totals and the settlement report
    read the totals kept per batch (migration 7), not the batch's sales: each costs the same
    whatever the size of the ledger."""
    store = with_terminal(SQLiteStore(db_path))
    try:
        statements: list[str] = []
        store._conn.set_trace_callback(statements.append)
        store.record_sales([make_sale()])
        with store.transaction(TID) as tx:
            assert tx.batch_totals(TID, 1)
            tx.close_batch(TID, 1, CREATED + 100)
        with store.transaction(write=False) as tx:
            assert tx.settled(tid=TID)
        store._conn.set_trace_callback(None)
        explain = store._conn.execute
        plans = {
            s.split(None, 1)[0] + (" report" if "settled_totals AS g" in s else ""):
            " | ".join(r[-1] for r in explain("EXPLAIN QUERY PLAN " + s))
            for s in statements
            if s.split(None, 1)[0] in ("INSERT", "SELECT") and ("sales" in s or "totals" in s)
        }  # fmt: skip
        assert "SEARCH batches USING INDEX" in plans["INSERT"], plans
        assert plans["SELECT"].count("USING PRIMARY KEY (tid=? AND batch_no=?)") == 2, plans
        assert "SEARCH g USING PRIMARY KEY (tid=?)" in plans["SELECT report"], plans
        assert "SCAN" not in plans["INSERT"] + plans["SELECT"] + plans["SELECT report"], plans
        assert "sales" not in plans["SELECT"] + plans["SELECT report"], plans
    finally:
        store.close()
