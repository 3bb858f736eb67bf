"""The acqhost command line (init, terminal add/list/disable, serve's checks), and the README's
demo. The configuration's own tests are in test_config.py."""

from __future__ import annotations

import io
import json
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from acqhost.cli import main as cli
from acqhost.cli.common import shown_db
from tests.hostkit import ACCOUNT, add_terminal

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def db(tmp_path: Path) -> str:
    path = str(tmp_path / "acqhost.db")
    assert cli(["init", "--db", path]) == 0
    return path


def test_init_writes_private_host_keys_and_is_rerunnable(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = Path(db + ".keys")
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600
    before = keys.read_bytes()
    assert cli(["init", "--db", db]) == 0
    assert keys.read_bytes() == before  # never overwritten
    assert "kept" in capsys.readouterr().out


def test_terminal_add_writes_the_key_file_protocol_names(db: str, tmp_path: Path) -> None:
    data = add_terminal(tmp_path, db, "TERM0009", "MERCHANT0000009")
    assert {"tid", "mid", "terminal_signing_key", "host_public_key", "host", "port"} <= set(data)
    assert len(bytes.fromhex(data["terminal_signing_key"])) == 32
    assert len(bytes.fromhex(data["host_public_key"])) == 32
    assert stat.S_IMODE((tmp_path / "TERM0009.json").stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--tid": "SHORT"}, "--tid must be 8"),
        ({"--mid": "M1"}, "--mid must be 15"),
        ({"--account": "6222020200112233447"}, "Luhn"),
        ({"--account": "12345"}, "12 to 19 digits"),
        ({"--bank-code": "12345"}, "12-digit CNAPS"),
    ],
)
def test_terminal_add_refuses_bad_input(
    db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict[str, str],
    message: str,
) -> None:  # fmt: skip
    args = {"--tid": "TERM0003", "--mid": "MERCHANT0000003", "--merchant-name": "Shop",
            "--holder": "Li Si", "--account": ACCOUNT, "--bank-code": "102100099996",
            "--key-out": str(tmp_path / "t.json"), **change}  # fmt: skip
    argv = ["terminal", "add", "--db", db, "--fast-hash"]
    for k, v in args.items():
        argv += [k, v]
    assert cli(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


def test_duplicate_terminal_and_key_file_are_refused(
    db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    add_terminal(tmp_path, db, "TERM0004", "MERCHANT0000004")
    with pytest.raises(AssertionError):  # same key file path: refused before anything
        add_terminal(tmp_path, db, "TERM0004", "MERCHANT0000004")
    assert "refusing to overwrite" in capsys.readouterr().err


def test_list_masks_accounts_and_disable_takes_effect(
    db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    add_terminal(tmp_path, db, "TERM0005", "MERCHANT0000005")
    capsys.readouterr()
    assert cli(["terminal", "list", "--db", db]) == 0
    out = capsys.readouterr().out
    assert "TERM0005" in out and "active" in out and ACCOUNT not in out and "3446" in out
    assert cli(["terminal", "disable", "--db", db, "TERM0005"]) == 0
    assert cli(["terminal", "list", "--db", db]) == 0
    assert "disabled" in capsys.readouterr().out
    assert cli(["terminal", "disable", "--db", db, "NOPE0000"]) == 2


def test_commands_without_host_keys_say_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = cli(["serve", "--db", str(tmp_path / "x.db")])
    assert status == 2 and "acqhost init" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_port_already_taken_is_one_line_and_exit_2(
    db: str, backend: str, capsys: pytest.CaptureFixture[str], json_logs: io.StringIO
) -> None:
    # json_logs: serve configures logging onto this test's captured stdout; the fixture puts
    # it back for the tests after.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status = cli(["serve", "--db", db, "--port", str(port), "--backend", backend])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert err.lower().strip().splitlines() == [
        f"acqhost: cannot listen on 127.0.0.1:{port}: address already in use"
    ]


@pytest.mark.parametrize(
    "argv", [[], ["init"], ["serve"], ["terminal"], ["terminal", "add"], ["terminal", "list"],
             ["terminal", "disable"]],
)  # fmt: skip
def test_help_everywhere(argv: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "acqhost", *argv, "--help"], cwd=ROOT, capture_output=True,
        text=True,
    )  # fmt: skip
    assert result.returncode == 0 and "usage: acqhost" in result.stdout


def test_readme_demo_runs_start_to_finish(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "simulators.demo", str(tmp_path / "demo")], cwd=ROOT,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for line in ("sign-on: 0800 -> 0810 rc=00", "sale: 0200 -> 0210 rc=00",
                 "test sale: 0200 -> 0210 rc=00", "reversal of the sale: 0400 -> 0410 rc=00",
                 "settles to 6222***********3446 (version 1", "PENDING_REVIEW",
                 "settles to 6222***********3453 (version 2", "voucher OK:",
                 "settle: 0500 -> 0510 rc=00  batch 000001: count 2 amount 2",
                 "the bank acknowledged every advice", "host stopped (exit 0)",
                 "bank simulator stopped (exit 0)"):  # fmt: skip
        assert line in out
    # The bank got both versions' 0320s and the batch's 0520 per account, and its totals are
    # the host's.
    advices = [line.split()[:4] for line in out.splitlines() if line[:4] in ("0320", "0520")]
    assert [(a[0], a[3]) for a in advices] == [
        ("0320", "v1"), ("0320", "v2"), ("0520", "v1"), ("0520", "v2")
    ]  # fmt: skip
    comparison = next(line for line in out.splitlines() if " vs " in line)
    assert comparison.startswith("== acqhost settle report --format totals")
    assert comparison.endswith(": match")
    assert "1,DEMO0001,DEMOMERCHANT001,2,6222***********3453,张三,102100099996,1,1" in out
    log = (tmp_path / "demo" / "host.log").read_text()
    bank_log = (tmp_path / "demo" / "bank.log").read_text()
    assert ACCOUNT not in log + bank_log and "6222021234567890128" not in log
    assert "6222020200112233453" not in log + bank_log + out  # the new account: masked
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("VER  STATE")) + 1
    history = [line.split()[:2] for line in lines[start : start + 2]]
    assert history == [["1", "SUPERSEDED"], ["2*", "VERIFIED"]]  # version 1 was VERIFIED
    json.loads(log.splitlines()[0])  # JSON lines


def test_a_database_url_password_is_never_printed() -> None:
    assert shown_db("postgresql://acq:s3cret@db.example:5432/acq") == (
        "postgresql://acq:***@db.example:5432/acq"
    )
    assert shown_db("acqhost.db") == "acqhost.db"
