"""Shared fixtures. Only ``pg_url`` lives here, and a test gets it only by asking for it.

``pg_url`` is a fresh, empty PostgreSQL database for one test, created on the server named by
``ACQHOST_TEST_PG`` (a libpq URL of a superuser connection, such as
``postgresql:///postgres?host=/var/run/postgresql``) and dropped after it. Without that
variable the test is skipped, except under CI (``CI`` set), where PostgreSQL must be tested and
a missing server fails the test.
"""

from __future__ import annotations

import io
import os
import secrets
import sys
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from acqhost.log import configure_logging

PG_ENV = "ACQHOST_TEST_PG"


def with_dbname(url: str, dbname: str) -> str:
    """``url`` (a libpq URL) naming database ``dbname`` instead."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"{PG_ENV} must be a postgresql:// URL")
    # Not urlunsplit: it drops the "//" of an empty host (postgresql:///db?host=/socket/dir).
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{parts.netloc}/{dbname}{query}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """The URL of a new database, dropped (with any connection left on it) after the test."""
    admin_url = os.environ.get(PG_ENV, "")
    if not admin_url:
        if os.environ.get("CI"):
            pytest.fail(f"{PG_ENV} is not set: CI must run the PostgreSQL tests (see .ci/run)")
        pytest.skip(f"{PG_ENV} is not set (a superuser libpq URL runs the PostgreSQL tests)")
    import psycopg  # only here: a test run without PostgreSQL never imports it
    from psycopg import sql

    name = f"acqhost_test_{secrets.token_hex(6)}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_dbname(admin_url, name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


class _CurrentStdout:
    """Writes wherever sys.stdout is at the time (pytest swaps it per test)."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    sink = io.StringIO()
    configure_logging("info", sink)
    yield sink
    configure_logging("info", _CurrentStdout())  # type: ignore[arg-type]
