"""The shape of acqhost/ (ARCHITECTURE.md), beyond what the import-linter contracts in
pyproject.toml check: no import cycles, a synchronous host core, no private names taken from
another module, no SQL in the CLI, modules of a readable size."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "acqhost"
SOURCES = sorted(PACKAGE.rglob("*.py"))
# One module per concept: "under about 500 lines".
MAX_LINES = 520


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycles_not_even_for_type_checking() -> None:
    graph = grimp.build_graph("acqhost")  # every import statement, TYPE_CHECKING ones too
    edges = {m: {i for i in graph.find_modules_directly_imported_by(m) if i in graph.modules}
             for m in graph.modules}  # fmt: skip
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for other in sorted(edges[module]):
            if state.get(other) == 1:
                cycles.append([*stack[stack.index(other) :], other])
            elif other not in state:
                visit(other)
        stack.pop()
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)
    assert cycles == []


@pytest.mark.parametrize(
    "path",
    [p for p in SOURCES if "host" in p.relative_to(PACKAGE).parts[:1]],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_the_host_core_is_synchronous(path: Path) -> None:
    tree = ast.parse(path.read_text())
    asynchronous = (ast.Await, ast.AsyncFunctionDef, ast.AsyncFor, ast.AsyncWith)
    found = [type(node).__name__ for node in ast.walk(tree) if isinstance(node, asynchronous)]
    assert found == []


def private_imports(text: str, here: str) -> list[str]:
    """What module ``here`` (of source ``text``) takes that is private to another: ``from
    acqhost.x import _name``, or anything from a ``_module`` outside its own package."""
    found = []
    for node in ast.walk(ast.parse(text)):
        if not (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("acqhost")):
            continue
        source = node.module or ""
        for alias in node.names:
            if alias.name.startswith("_") and not alias.name.startswith("__"):
                found.append(f"{source}.{alias.name}")
        parts = source.split(".")
        for i, part in enumerate(parts):
            package = ".".join(parts[:i])
            if part.startswith("_") and not (here == package or here.startswith(package + ".")):
                found.append(source)
    return found


@pytest.mark.parametrize(
    "path", SOURCES + sorted((ROOT / "tests").glob("*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_no_module_takes_another_modules_private_names(path: Path) -> None:
    assert private_imports(path.read_text(), module_name(path)) == []


SQL = re.compile(r"\b(SELECT\s+\S+.*\bFROM|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|"
                 r"CREATE\s+TABLE|BEGIN\s+IMMEDIATE)\b")  # fmt: skip


@pytest.mark.parametrize(
    "path", sorted((PACKAGE / "cli").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_the_cli_writes_no_sql(path: Path) -> None:
    assert SQL.findall(path.read_text()) == []


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_stay_readable(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_the_checks_see_what_they_look_for() -> None:
    """The detectors themselves find what they look for, and pass what is allowed."""
    text = "from acqhost.log.setup import _handler\nfrom acqhost.wire.codec._codec import Codec\n"
    assert private_imports(text, "acqhost.cli.common") == [
        "acqhost.log.setup._handler",
        "acqhost.wire.codec._codec",
    ]
    assert private_imports(text.splitlines()[1], "acqhost.wire.codec") == []
    assert module_name(PACKAGE / "wire" / "codec" / "__init__.py") == "acqhost.wire.codec"
    assert SQL.findall("db.execute('DELETE FROM sales WHERE rrn = ?')")
    assert not SQL.findall("select the terminal from the list")
