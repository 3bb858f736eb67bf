"""The compiled hot modules (acqhost/native.py): built with mypyc into a copy of the source
tree, they load compiled and the host's own tests pass against them, so a host built with
``make native`` behaves as the pure-Python one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from acqhost import native

ROOT = Path(__file__).resolve().parents[1]

# The test modules run against the compiled copy: the paths through the compiled modules
# (decide/complete/answer, every failure answer, the connection core and asyncio driver, the
# ledger, the message line, field 48).
AGAINST_COMPILED = (
    "tests/test_pipeline.py",
    "tests/test_failure_answers.py",
    "tests/test_server_edges.py",
    "tests/test_logging.py",
    "tests/test_tlv.py",
    "tests/test_ledger.py",
)


def _can_compile() -> bool:
    """A C compiler and Python's headers: what mypyc's extensions are built with."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return shutil.which(cc) is not None and headers.exists()


pytestmark = pytest.mark.skipif(
    not _can_compile(), reason="no C compiler or Python headers for mypyc"
)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture(scope="module")
def compiled_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("native") / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc", ".*", "build", "results")
    for name in ("acqhost", "specs", "simulators", "tests", "benchmarks"):
        shutil.copytree(ROOT / name, root / name, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", root)
    native.build(root)
    return root


def test_every_hot_module_loads_compiled(compiled_tree: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "acqhost.native", "status"],
        cwd=compiled_tree, env=_env(), capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    status = dict(line.split() for line in out.stdout.splitlines())
    assert status == dict.fromkeys(native.MODULES, "compiled")
    # ... and this interpreter, on the source tree, may load either: the same names.
    assert set(native.compiled()) == set(native.MODULES)


def test_the_host_tests_pass_against_the_compiled_modules(compiled_tree: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-x",
         "-p", "tests.native_check", *AGAINST_COMPILED],
        cwd=compiled_tree, env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "compiled: " + ",".join(native.MODULES) in done.stdout


def test_a_failed_build_leaves_no_compiled_module(tmp_path: Path) -> None:
    """A module mypyc cannot compile: the build says why and leaves the pure-Python tree."""
    root = tmp_path / "src"
    shutil.copytree(ROOT / "acqhost", root / "acqhost",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))  # fmt: skip
    tlv = root / "acqhost" / "wire" / "tlv.py"
    tlv.write_text(tlv.read_text() + "\n\ndef broken() -> int:\n    return 'not an int'\n")
    with pytest.raises(RuntimeError, match="mypyc failed"):
        native.build(root)
    assert list((root / "acqhost").rglob("*.so")) == []
