"""PostgreSQL schema migrations, in order, and the function that applies them.

The same tables, columns, constraints and refusals as SQLite's, in PostgreSQL's types.
``migrate`` applies every script whose version is above the one-row ``schema_version`` table's
and advances it in the same transaction, under a transaction-scoped advisory lock, so that
processes opening a new database together apply each migration once (see
``acqhost.store.migrations``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from acqhost.store.migrations import (
    REFUSALS,
    Migration,
    Refusal,
    due,
    in_dialect,
    latest_of,
    up_to_date,
)
from acqhost.store.sql import MIGRATION_LOCK

__all__ = ("MIGRATIONS", "SCHEMA_VERSION_TABLE", "latest_version", "migrate", "schema_version")

# Created (in the first migration's transaction) before any migration runs: one row, the
# version of the schema. Not itself a migration so that it can say which migrations ran.
SCHEMA_VERSION_TABLE = """
CREATE TABLE schema_version (
    singleton BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    version   INTEGER NOT NULL CHECK (version >= 0)
);
INSERT INTO schema_version (version) VALUES (0);
"""

_WORDS = {
    "blob": "BYTEA",
    "real": "DOUBLE PRECISION",
    "bigint": "BIGINT",
    "rrn": "BIGINT GENERATED ALWAYS AS IDENTITY (MAXVALUE 999999999999) PRIMARY KEY",
    "test_flag": "BOOLEAN NOT NULL",
    "is_test": "test",
}

_REFUSE_FUNCTION = """
-- Raises the message given as the trigger's argument: the refusals below (class 23, so the
-- driver reports an integrity error, as SQLite's RAISE(ABORT) does).
CREATE FUNCTION acqhost_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%', TG_ARGV[0] USING ERRCODE = 'restrict_violation';
END;
$$;
"""

_RRN_COMMENT = """\
-- The RRN comes from an identity sequence, zero-padded to 12 digits: unique across every
-- process sharing the database and never handed out twice (a duplicate that loses its
-- ON CONFLICT still spends a number: RRNs have gaps, as they may). MAXVALUE keeps it within
-- field 37's 12 digits. UNIQUE (tid, stan, local_date) is the duplicate-transmission rule (94),
-- durable across restarts. Cards are kept masked only.
"""

# TRUNCATE skips row triggers: each table with refusals refuses it too, said once, before the
# first of them.
_TRUNCATE_NOTE = (
    "-- TRUNCATE skips row triggers; SQLite has no TRUNCATE, PostgreSQL needs its own refusal.\n"
)


def _triggers(table: str, refusals: Sequence[Refusal]) -> str:
    """PostgreSQL's triggers call acqhost_refuse: one per refusal, and one for TRUNCATE (a
    delete: the message of the table's DELETE refusal, its last)."""
    rows = [
        f"CREATE TRIGGER {r.name}\nBEFORE {r.before}\n{_for_each_row(r.message)}" for r in refusals
    ]
    note = _TRUNCATE_NOTE if table == next(iter(REFUSALS)) else ""
    truncate = (
        f"{note}CREATE TRIGGER {table}_no_truncate\nBEFORE TRUNCATE ON {table}\n"
        f"FOR EACH STATEMENT EXECUTE FUNCTION acqhost_refuse('{refusals[-1].message}');"
    )
    return "\n\n".join([*rows, truncate]) + "\n"


def _for_each_row(message: str) -> str:
    """A row trigger's action, wrapped (as published) to keep within 100 columns."""
    call = f"acqhost_refuse('{message}');"
    if len(f"FOR EACH ROW EXECUTE FUNCTION {call}") <= 100:
        return f"FOR EACH ROW EXECUTE FUNCTION {call}"
    if len(f"EXECUTE FUNCTION {call}") <= 100:
        return f"FOR EACH ROW\nEXECUTE FUNCTION {call}"
    return f"FOR EACH ROW EXECUTE FUNCTION\n    {call}"


MIGRATIONS: list[Migration] = in_dialect(
    {**_WORDS, "refuse_function": _REFUSE_FUNCTION, "rrn_comment": _RRN_COMMENT}, _triggers
)


def latest_version() -> int:
    """The schema version a database has once every migration is applied."""
    return latest_of(MIGRATIONS)


def migrate(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
    """Bring the database of ``conn`` up to the latest schema, one transaction per migration.

    A database already current costs one read. Otherwise each migration's transaction takes
    the advisory lock and re-reads the version under it, so processes opening a new database
    together apply each migration exactly once, and one that fails leaves nothing behind.
    """
    latest = latest_version()
    with conn.transaction(), conn.cursor() as cur:
        if up_to_date(schema_version(cur), latest):
            return
    for version, script in MIGRATIONS:
        with conn.transaction(), conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            current = schema_version(cur)
            if due(current, version, latest):
                if not _has_schema_version_table(cur):
                    cur.execute(SCHEMA_VERSION_TABLE)
                # No parameters: sent as one simple query, every statement of the script in
                # this transaction.
                cur.execute(script)
                cur.execute("UPDATE schema_version SET version = %s", (version,))


def schema_version(cur: psycopg.Cursor[tuple[Any, ...]]) -> int:
    """The version in ``schema_version``; 0 for a database acqhost has never touched."""
    if not _has_schema_version_table(cur):
        return 0
    row = cur.execute("SELECT version FROM schema_version").fetchone()
    return 0 if row is None else int(row[0])


def _has_schema_version_table(cur: psycopg.Cursor[tuple[Any, ...]]) -> bool:
    # A query on the catalog, not to_regclass(): that one answers from this backend's catalog
    # cache, which may still say "no such table" after another process created it while this
    # transaction waited for the migration lock.
    row = cur.execute(
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_tables "
        "WHERE schemaname = current_schema() AND tablename = 'schema_version')"
    ).fetchone()
    return bool(row and row[0])
