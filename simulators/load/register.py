"""``acqhost-load --register N --db DB``: load terminals in a local store, with key files.

Terminal ``LD000001`` to ``LD00000N`` (merchant ``LOADMERCHANT`` and three digits, holder
``Load Test``, a test settlement account, operator ``OP01`` with password ``load-test-1``,
a sale limit of 100,000,000 minor units) are registered with ``acqhost terminal add``; their
key files go to ``keys_dir`` (default: ``<db>.load-keys``, created 0700) as ``<tid>.json``.
A terminal whose key file is already there is not registered again, so runs can repeat.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

from simulators.load.messages import test_pan

__all__ = ("HOLDER", "OPERATOR", "PASSWORD", "RegisterError", "register_terminals")

HOLDER = "Load Test"
OPERATOR = "OP01"
PASSWORD = "load-test-1"
BANK_CODE = "102100099996"


class RegisterError(RuntimeError):
    """Registration failed; the message is one line."""


def register_terminals(
    db: str, count: int, keys_dir: str | None = None, *, config: str | None = None
) -> list[Path]:
    """The key files of load terminals 1 to ``count`` in store ``db``, registering those that
    have none yet."""
    from acqhost.cli import main as acqhost

    directory = Path(keys_dir) if keys_dir else Path(f"{db}.load-keys")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths = []
    for i in range(1, count + 1):
        tid = f"LD{i:06d}"
        path = directory / f"{tid}.json"
        if not path.exists():
            argv = ["terminal", "add", "--db", db, "--tid", tid,
                    "--mid", f"LOADMERCHANT{i % 1000:03d}",
                    "--merchant-name", "Load Test Merchant", "--holder", HOLDER,
                    "--account", test_pan(f"load/{tid}"), "--bank-code", BANK_CODE,
                    "--operator-id", OPERATOR, "--operator-password", PASSWORD, "--fast-hash",
                    "--sale-limit", "100000000", "--key-out", str(path)]  # fmt: skip
            if config:
                argv[2:2] = ["--config", config]
            err = io.StringIO()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                try:
                    status = acqhost(argv)
                except SystemExit as exc:
                    status = exc.code if isinstance(exc.code, int) else 2
            if status != 0:
                line = (err.getvalue().strip().splitlines() or ["failed"])[-1]
                raise RegisterError(f"registering load terminal {tid}: {line}")
            os.chmod(path, 0o600)
        paths.append(path)
    return paths
