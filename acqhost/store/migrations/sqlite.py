"""SQLite schema migrations, in order, and the function that applies them.

``migrate`` applies every script whose version is above the database's ``PRAGMA user_version``
and advances ``user_version`` in the same transaction (see ``acqhost.store.migrations``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from acqhost.store.migrations import Migration, Refusal, due, in_dialect, latest_of, up_to_date

__all__ = ("MIGRATIONS", "latest_version", "migrate", "statements", "user_version")

_WORDS = {
    "blob": "BLOB",
    "real": "REAL",
    "bigint": "INTEGER",
    "rrn": "INTEGER PRIMARY KEY AUTOINCREMENT",
    "test_flag": "INTEGER NOT NULL CHECK (test IN (0, 1))",
    "is_test": "test = 1",
    "refuse_function": "",  # SQLite's triggers raise by themselves
}

_RRN_COMMENT = """\
-- The RRN is the rowid, zero-padded to 12 digits: unique across every process sharing the
-- file. AUTOINCREMENT so that a rowid is never handed out twice, even after a delete.
-- UNIQUE (tid, stan, local_date) is the duplicate-transmission rule (94), durable across
-- restarts. Cards are kept masked only.
"""


def _count(change: str, sold: str, total: str) -> str:
    """The two statements by which a trigger adds ``sold`` sales of ``total`` to the totals of
    the sale's batch: open_totals while it is open, else (the first changed nothing:
    ``changes()`` in a trigger counts that trigger's own last statement) settled_totals. One
    look-up of the batch, the price of a sale's totals being exact whoever inserts it."""
    columns = (
        "    INSERT INTO {table} (tid, batch_no, account_version, sold, total)\n"
        "    SELECT NEW.tid, NEW.batch_no, NEW.account_version,\n"
        f"        {sold},\n"
        f"        {total}\n"
    )
    upsert = (
        "    ON CONFLICT (tid, batch_no, account_version)\n"
        "    DO UPDATE SET sold = sold + excluded.sold, total = total + excluded.total;"
    )
    return (
        f"-- {change}\n"
        + columns.format(table="open_totals")
        + "    FROM batches\n"
        + "    WHERE tid = NEW.tid AND batch_no = NEW.batch_no AND status = 'open'\n"
        + upsert
        + "\n"
        + columns.format(table="settled_totals")
        + "    WHERE changes() = 0\n"
        + upsert
    )


def _move(source: str, target: str, status: str) -> str:
    """A batch's totals moved from ``source`` to ``target`` when it becomes ``status``."""
    where = f"tid = NEW.tid AND batch_no = NEW.batch_no AND NEW.status = '{status}'"
    return (
        f"    INSERT INTO {target} (tid, batch_no, account_version, sold, total)\n"
        f"    SELECT tid, batch_no, account_version, sold, total FROM {source}\n"
        f"    WHERE {where}\n"
        "    ON CONFLICT (tid, batch_no, account_version)\n"
        "    DO UPDATE SET sold = sold + excluded.sold, total = total + excluded.total;\n"
        f"    DELETE FROM {source}\n"
        f"    WHERE {where};"
    )


_TOTALS_TRIGGERS = f"""
-- A sale counts in its batch's totals while it is approved.
CREATE TRIGGER sales_count
AFTER INSERT ON sales
WHEN NEW.status = 'approved'
BEGIN
{_count("recorded approved: one more sale and its amount", "1", "NEW.amount")}
END;

CREATE TRIGGER sales_recount
AFTER UPDATE OF status ON sales
WHEN OLD.status <> NEW.status
BEGIN
{
    _count(
        "reversed: one sale and its amount less (approved again: more)",
        "CASE NEW.status WHEN 'approved' THEN 1 ELSE -1 END",
        "CASE NEW.status WHEN 'approved' THEN NEW.amount ELSE -NEW.amount END",
    )
}
END;

-- A batch that closes takes its totals to settled_totals (and back, were it ever reopened).
CREATE TRIGGER batches_move_totals
AFTER UPDATE OF status ON batches
WHEN OLD.status <> NEW.status
BEGIN
{_move("open_totals", "settled_totals", "closed")}
{_move("settled_totals", "open_totals", "open")}
END;
"""


def _triggers(table: str, refusals: Sequence[Refusal]) -> str:
    """SQLite's triggers raise by themselves."""
    return (
        "\n\n".join(
            f"CREATE TRIGGER {r.name}\nBEFORE {r.before}\n"
            f"BEGIN\n    SELECT RAISE(ABORT, '{r.message}');\nEND;"
            for r in refusals
        )
        + "\n"
    )


MIGRATIONS: list[Migration] = in_dialect(
    {
        **_WORDS,
        "rrn_comment": _RRN_COMMENT,
        "without_rowid": " WITHOUT ROWID",
        "lock_ledger": "",  # BEGIN IMMEDIATE holds the file's one write lock
        "totals_triggers": _TOTALS_TRIGGERS,
    },
    _triggers,
)


def latest_version() -> int:
    """The schema version a database has once every migration is applied."""
    return latest_of(MIGRATIONS)


def user_version(conn: sqlite3.Connection) -> int:
    """The database's schema version."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the database of ``conn`` (in autocommit mode) up to the latest schema, one
    transaction per migration.

    The version is re-read under the write lock, so processes opening a new file together
    apply each migration exactly once.
    """
    latest = latest_version()
    if up_to_date(user_version(conn), latest):
        return
    for version, script in MIGRATIONS:
        conn.execute("BEGIN IMMEDIATE")
        try:
            if due(user_version(conn), version, latest):
                for statement in statements(script):
                    conn.execute(statement)
                # PRAGMA takes no parameters; version is an int from our own list.
                conn.execute(f"PRAGMA user_version = {int(version)}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


def statements(script: str) -> list[str]:
    """Split a script into complete SQL statements (trigger bodies and quoted ``;`` included).

    ``sqlite3.Cursor.executescript`` would commit before running, so migrations run statement
    by statement inside the caller's transaction instead.
    """
    result: list[str] = []
    buffer = ""
    for piece in script.split(";"):
        buffer += piece + ";"
        if sqlite3.complete_statement(buffer):
            text = buffer.strip()
            if _has_sql(text):
                result.append(text)
            buffer = ""
    if _has_sql(buffer.rstrip(";").strip()):
        raise ValueError(f"incomplete SQL statement at the end of a migration: {buffer!r}")
    return result


def _has_sql(text: str) -> bool:
    """True if ``text`` holds more than comments, whitespace and semicolons."""
    lines = (line.split("--", 1)[0] for line in text.splitlines())
    return any(line.strip(" \t;") for line in lines)
