"""The bank system simulator (``acqhost-bank``) and what a bank needs from the host:
``acqhost keys public``."""

from __future__ import annotations

from pathlib import Path

import pytest

from acqhost.cli import main as cli
from acqhost.domain.crypto import HostKeys


def test_keys_public_prints_the_host_verify_key_and_nothing_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "acqhost.db")
    assert cli(["init", "--db", db]) == 0
    capsys.readouterr()
    keys = HostKeys.load(db + ".keys")
    assert cli(["keys", "public", "--db", db]) == 0
    out = capsys.readouterr().out
    assert out == keys.verify_key.hex() + "\n"
    assert keys.signing_seed.hex() not in out and keys.data_key.hex() not in out

    other = HostKeys.generate()
    other.save(tmp_path / "other.keys")
    assert cli(["keys", "public", "--keys", str(tmp_path / "other.keys")]) == 0
    assert capsys.readouterr().out == other.verify_key.hex() + "\n"


def test_keys_public_without_keys_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(["keys", "public", "--keys", str(tmp_path / "none.keys")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run `acqhost init` first" in err
