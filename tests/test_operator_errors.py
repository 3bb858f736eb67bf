"""Operator mistakes are one line naming what is wrong, and exit status 2 (no traceback):
a store that is not a database or cannot be reached, key files missing or malformed."""

from __future__ import annotations

from pathlib import Path

import pytest

from acqhost.cli import main as acqhost
from simulators.terminal import main as terminal


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_a_file_that_is_not_a_database_is_named(tmp_path: Path, capsys) -> None:
    db = tmp_path / "notes.db"
    db.write_text("these are not the tables you are looking for\n")
    assert acqhost(["terminal", "list", "--db", str(db)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line == f"acqhost: cannot open SQLite store {db}: file is not a database"
    assert db.read_text().startswith("these are not")  # left as it was


def test_a_store_in_a_missing_directory_is_named(tmp_path: Path, capsys) -> None:
    db = tmp_path / "no" / "such" / "acqhost.db"
    assert acqhost(["init", "--db", str(db)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"acqhost: cannot open SQLite store {db}: ")
    assert not db.parent.exists()


def test_an_unreachable_postgresql_store_is_one_line_without_its_password(capsys) -> None:
    url = "postgresql://load:s3cret-pw@127.0.0.1:1/acqhost?connect_timeout=2"
    assert acqhost(["terminal", "list", "--db", url]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("acqhost: cannot open PostgreSQL store: ")
    assert "s3cret-pw" not in line


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "No such file or directory"),
        ("{", "Expecting property name"),
        ('{"tid": "TERM0001"}', "no 'mid' in it"),
        (
            '{"tid": "TERM0001", "mid": "MERCHANT0000001", "terminal_signing_key": "zz",'
            ' "host_public_key": "00", "port": 1}',
            "non-hexadecimal",
        ),
    ],
)
def test_the_terminal_simulator_names_a_bad_key_file(
    tmp_path: Path, capsys, content: str | None, says: str
) -> None:
    key_file = tmp_path / "TERM0001.json"
    if content is not None:
        key_file.write_text(content)
    assert terminal(["--key-file", str(key_file), "sale", "100"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"acqhost-terminal: key file {key_file}: ")
    assert says in line


# -- operator commands complete or change nothing ------------------------------------------------


def _add(db: str, tid: str, key_out: Path) -> int:
    return acqhost(
        ["terminal", "add", "--db", db, "--tid", tid, "--mid", "MERCHANT0000001",
         "--merchant-name", "Shop", "--holder", "Holder", "--account", "6222020200112233446",
         "--bank-code", "102100099996", "--fast-hash", "--key-out", str(key_out)]
    )  # fmt: skip


def _tids(db: str, capsys) -> list[str]:
    capsys.readouterr()
    assert acqhost(["terminal", "list", "--db", db]) == 0
    return [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:] if line.strip()]


def test_a_key_file_that_cannot_be_written_registers_nothing(tmp_path: Path, capsys) -> None:
    db = str(tmp_path / "acqhost.db")
    assert acqhost(["init", "--db", db]) == 0
    assert _add(db, "TERM0001", tmp_path / "missing" / "TERM0001.json") == 2
    line = _one_line(capsys.readouterr().err)
    assert line.endswith("No such file or directory; nothing registered")
    assert _tids(db, capsys) == []
    # the same command with a key file it can write registers the terminal
    assert _add(db, "TERM0001", tmp_path / "TERM0001.json") == 0
    assert _tids(db, capsys) == ["TERM0001"]
    assert (tmp_path / "TERM0001.json").stat().st_mode & 0o777 == 0o600


def test_a_terminal_id_taken_leaves_no_key_file(tmp_path: Path, capsys) -> None:
    db = str(tmp_path / "acqhost.db")
    assert acqhost(["init", "--db", db]) == 0
    assert _add(db, "TERM0001", tmp_path / "first.json") == 0
    assert _add(db, "TERM0001", tmp_path / "second.json") == 2
    assert "already exists" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "second.json").exists()
    assert _tids(db, capsys) == ["TERM0001"]
