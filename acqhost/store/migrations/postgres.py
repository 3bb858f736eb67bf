"""PostgreSQL schema migrations, in order, and the function that applies them.

The same tables, columns, constraints and refusals as SQLite's, in PostgreSQL's types.
``migrate`` applies every script whose version is above the one-row ``schema_version`` table's
and advances it in the same transaction, under a transaction-scoped advisory lock, so that
processes opening a new database together apply each migration once (see
``acqhost.store.migrations``).
"""

from __future__ import annotations

import textwrap
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


def _count(changes: str) -> str:
    """The body of a trigger function adding the sales and amounts of ``changes`` (rows of
    tid, batch_no, account_version, sold, total) to their batches' totals: open_totals while
    a batch is open, settled_totals once closed (looked for only when some batch was not
    open, the rare case: a second join of the batches costs as much as the first). Each
    batch's row once, in key order: two transactions adding to the same rows never wait for
    each other in a circle."""
    upsert = """    INSERT INTO {table} AS t (tid, batch_no, account_version, sold, total)
    SELECT c.tid, c.batch_no, c.account_version, SUM(c.sold), SUM(c.total)
    FROM ({changes}) AS c
    JOIN batches AS b ON b.tid = c.tid AND b.batch_no = c.batch_no
    WHERE b.status {test} 'open'
    GROUP BY c.tid, c.batch_no, c.account_version
    ORDER BY c.tid, c.batch_no, c.account_version
    ON CONFLICT (tid, batch_no, account_version)
    DO UPDATE SET sold = t.sold + excluded.sold, total = t.total + excluded.total;"""
    return f"""DECLARE
    counted BIGINT;
BEGIN
{upsert.format(table="open_totals", test="=", changes=changes)}
    GET DIAGNOSTICS counted = ROW_COUNT;
    IF counted < (SELECT COUNT(*) FROM (SELECT DISTINCT tid, batch_no, account_version
                  FROM ({changes}) AS c) AS k) THEN
{textwrap.indent(upsert.format(table="settled_totals", test="<>", changes=changes), "    ")}
    END IF;
    RETURN NULL;
END;"""


def _move(source: str, target: str) -> str:
    """A batch's totals moved from ``source`` to ``target``."""
    return f"""        WITH moved AS (
            DELETE FROM {source} WHERE tid = NEW.tid AND batch_no = NEW.batch_no
            RETURNING tid, batch_no, account_version, sold, total
        )
        INSERT INTO {target} AS t (tid, batch_no, account_version, sold, total)
        SELECT tid, batch_no, account_version, sold, total FROM moved
        ON CONFLICT (tid, batch_no, account_version)
        DO UPDATE SET sold = t.sold + excluded.sold, total = t.total + excluded.total;"""


_TOTALS_TRIGGERS = f"""
-- A sale counts in its batch's totals while it is approved. Statement triggers: the sales a
-- statement records (a group commit's, one statement) are counted together.
CREATE FUNCTION acqhost_count_sales() RETURNS trigger LANGUAGE plpgsql AS $$
{
    _count(
        "SELECT tid, batch_no, account_version, 1 AS sold, amount AS total "
        "FROM recorded WHERE status = 'approved'",
    )
}
$$;

CREATE TRIGGER sales_count
AFTER INSERT ON sales REFERENCING NEW TABLE AS recorded
FOR EACH STATEMENT EXECUTE FUNCTION acqhost_count_sales();

-- Reversed: one sale and its amount less (approved again: more).
CREATE FUNCTION acqhost_recount_sales() RETURNS trigger LANGUAGE plpgsql AS $$
{
    _count(
        "SELECT n.tid, n.batch_no, n.account_version, "
        "CASE n.status WHEN 'approved' THEN 1 ELSE -1 END AS sold, "
        "CASE n.status WHEN 'approved' THEN n.amount ELSE -n.amount END AS total "
        "FROM old_sales AS o JOIN new_sales AS n ON n.rrn = o.rrn WHERE o.status <> n.status"
    )
}
$$;

-- On every update of sales: a trigger with transition tables cannot name columns (and only
-- the status of a sale may change: sales_no_rewrite).
CREATE TRIGGER sales_recount
AFTER UPDATE ON sales REFERENCING OLD TABLE AS old_sales NEW TABLE AS new_sales
FOR EACH STATEMENT EXECUTE FUNCTION acqhost_recount_sales();

-- A batch that closes takes its totals to settled_totals (and back, were it ever reopened).
CREATE FUNCTION acqhost_move_totals() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'closed' THEN
{_move("open_totals", "settled_totals")}
    ELSE
{_move("settled_totals", "open_totals")}
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER batches_move_totals
AFTER UPDATE OF status ON batches
FOR EACH ROW WHEN (OLD.status <> NEW.status) EXECUTE FUNCTION acqhost_move_totals();
"""

_LOCK_LEDGER = """
-- No sale recorded or reversed, no batch closed, by another process until this commits.
LOCK TABLE sales, batches IN SHARE MODE;
"""

MIGRATIONS: list[Migration] = in_dialect(
    {
        **_WORDS,
        "refuse_function": _REFUSE_FUNCTION,
        "rrn_comment": _RRN_COMMENT,
        "without_rowid": "",
        "lock_ledger": _LOCK_LEDGER,
        "totals_triggers": _TOTALS_TRIGGERS,
    },
    _triggers,
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
