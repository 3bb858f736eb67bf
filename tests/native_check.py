"""A pytest plugin for tests/test_native.py's run against the compiled modules: it says at the
end which of acqhost.native.MODULES that run loaded compiled."""

from __future__ import annotations

from typing import Any

from acqhost import native


def pytest_terminal_summary(terminalreporter: Any) -> None:
    names = [name for name, compiled in native.compiled().items() if compiled]
    terminalreporter.write_line("compiled: " + ",".join(names))
