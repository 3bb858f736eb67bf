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


MIGRATIONS: list[Migration] = in_dialect({**_WORDS, "rrn_comment": _RRN_COMMENT}, _triggers)


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
