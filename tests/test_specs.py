"""Specs load by name, are pyiso8583 specs, and ship inside the built package."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import iso8583
import iso8583.specs
import pytest

from acqhost.wire import specs

ROOT = Path(__file__).resolve().parents[1]


def test_available_specs() -> None:
    assert {"acq87", "cup-pos"} <= set(specs.available())


def test_acq87_is_pyiso8583_default_with_utf8_field_48() -> None:
    acq87 = specs.load("acq87")
    default = copy.deepcopy(iso8583.specs.default)
    assert acq87["48"]["data_enc"] == "utf-8"
    for key in default:
        if key != "48":
            assert acq87[key] == default[key], key
    assert {k: v for k, v in acq87["48"].items() if k not in ("data_enc", "desc")} == {
        k: v for k, v in default["48"].items() if k not in ("data_enc", "desc")
    }


def test_spec_files_work_with_pyiso8583_unchanged() -> None:
    with open(ROOT / "specs" / "acq87.json", encoding="utf-8") as f:
        spec = json.load(f)
    data, _ = iso8583.encode({"t": "0300", "48": "NM006张三"}, spec)
    assert iso8583.decode(data, spec)[0]["48"] == "NM006张三"


def test_load_returns_a_fresh_copy() -> None:
    spec = specs.load("acq87")
    spec["2"]["max_len"] = 1
    assert specs.load("acq87")["2"]["max_len"] == 19


@pytest.mark.parametrize("name", ["nope", "../pyproject", "", ".hidden"])
def test_unknown_or_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        specs.load(name)


def test_wheel_ships_the_spec_files(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("acqhost-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for spec_file in (ROOT / "specs").glob("*.json"):
        assert f"acqhost/specs_data/{spec_file.name}" in names
    assert "acqhost/py.typed" in names
