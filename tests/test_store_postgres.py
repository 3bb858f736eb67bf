"""PostgreSQL-only store tests: transactions as the server sees them, reconnects, deadlocks,
no clear card data in any column, and migrations. They run when ACQHOST_TEST_PG names a server."""

from __future__ import annotations

import getpass
import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import nacl.encoding
import nacl.hash
import nacl.secret
import nacl.utils
import psycopg
import pytest
from psycopg import pq, sql

from acqhost.errors import StoreOpenError, StoreUnavailable
from acqhost.store import (
    Operator,
    SaleResult,
    SchemaVersionError,
    Session,
    StoreTx,
    format_rrn,
    open_store,
)
from acqhost.store.base import BatchTotal
from acqhost.store.batches import BATCH_TOTALS
from acqhost.store.migrations import postgres as pg_migrations
from acqhost.store.postgres import PostgresStore
from tests.storekit import (
    CREATED,
    MID,
    TID,
    chain,
    make_account,
    make_sale,
    make_terminal,
    registration_entry,
    with_terminal,
)


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
    with pytest.raises(StoreOpenError) as info:
        PostgresStore(unreachable)
    assert str(info.value).startswith("cannot open PostgreSQL store: ")
    assert secret not in str(info.value)


# --- PostgreSQL: one connection, one transaction per method, one statement per sale batch -----


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
        # The call under which it went away fails, as an outage (answered 96, one log line)...
        with pytest.raises(StoreUnavailable, match="PostgreSQL unavailable: terminating"):
            store.get_terminal(TID)
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


# --- PostgreSQL: no secret in clear in any column ---------------------------------------------


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


# --- PostgreSQL: migrations -------------------------------------------------------------------


def pg_schema_version(url: str) -> int | None:
    """The version row, read behind the store's back; None without a schema_version table."""
    with psycopg.connect(url) as conn:
        if conn.execute("SELECT to_regclass('schema_version')").fetchone() == (None,):
            return None
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        assert row is not None
        return int(row[0])


# As test_store_sqlite.PUBLISHED: PostgreSQL's scripts, never edited once published.
PUBLISHED = {
    1: "5b4eea6b462a31e87a550acd109d3efd899cfe9d543726e9ad93289dce126407",
    2: "51ed7ee1d298887d402cd382fde5475015022b95172a2ebd814bdc19d920121a",
    3: "2cccc8872c32cb9a8522dfdb967066266e6ca97ef681100670f397c7d7d452ef",
    4: "15634974f7b79bc08b883f5162fd5810fcdf5b713284f661d4a065aca6f1862a",
    5: "3e06123db565212a69003c42bd4b16a0c4be53e1f09c3079f36c9e03f69430c8",
    6: "0f9cde2c4bbe2be4ce646cf28433990f08dbba4ea35f0de984417526d17ec47e",
    7: "f39a94feee0bd505013fff170db275029ee5256ef13cf045d0662aec2cbc2f0d",
}


def test_published_postgres_migrations_are_never_edited() -> None:
    scripts = dict(pg_migrations.MIGRATIONS)
    for version, digest in PUBLISHED.items():
        assert hashlib.sha256(scripts[version].encode()).hexdigest() == digest, version


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


# -- Store.add_terminal(then=...) --------------------------------------------------------------


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


def test_a_postgres_settlements_totals_read_the_totals_kept_not_the_sales(pg_url: str) -> None:
    """A 0500's totals read the rows kept for its batch (migration 7) by key, not its sales
    (with sequential scans off: on tables of one row the planner would rightly prefer one)."""
    store = with_terminal(PostgresStore(pg_url))
    try:
        store.record_sales([make_sale()])
        with store.transaction(TID) as tx:
            assert tx.batch_totals(TID, 1) == [BatchTotal(1, 1, make_sale().amount)]
        with psycopg.connect(pg_url) as conn:
            conn.execute("SET enable_seqscan = off")
            plan = "\n".join(
                row[0]
                for row in conn.execute(
                    "EXPLAIN " + BATCH_TOTALS.replace("?", "%s"),
                    (TID, 1, TID, 1),
                )
            )
        assert "open_totals_pkey" in plan and "settled_totals_pkey" in plan, plan
        assert " sales" not in plan, plan
    finally:
        store.close()
