"""The hot modules compiled to C with mypyc, beside their pure-Python sources.

``python -m acqhost.native build`` (``make native``) compiles :data:`MODULES` in place: each
``.py`` gets a ``.so`` next to it, which Python imports instead, and one shared library of
mypyc's runtime (``acqhost/compiled__mypyc*.so``). Without them (no C compiler, or after
``python -m acqhost.native clean``), the same modules run as Python: the compiled modules are
the same source, type-checked by mypy as every module is, so there is nothing to switch.
``status`` says which modules this interpreter loads compiled; ``acqhost serve`` logs it.

What it is worth, per sale through the production path, is measured by
``benchmarks/e2e.py --native`` (compiled and pure hosts in the same run): see
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ("MODULES", "build", "clean", "compiled", "main")

# The modules a sale runs through on the event loop's thread, by the phase profile
# (benchmarks/profile_sale.py): the host core and its sale route, the connection driver and
# core, the message log line, cards and field 48. Not the MACs: thin calls into hashlib and
# libsodium, whose callers count on any input being refused with False or CryptoError, never
# the TypeError a compiled signature raises. Not the ledger: Python classes (a test's ledger
# that writes at once) cannot subclass a compiled class, and its loop side is small.
MODULES = (
    "acqhost.host.core",
    "acqhost.host.stages",
    "acqhost.host.context",
    "acqhost.host.answers",
    "acqhost.host.state",
    "acqhost.host.routes.sale",
    "acqhost.runtime.dispatch",
    "acqhost.runtime.connection",
    "acqhost.runtime.asyncio_driver",
    "acqhost.log.line",
    "acqhost.domain.cards",
    "acqhost.wire.tlv",
)

# mypyc's runtime library for the group, a module of the package (not a top-level name).
GROUP = "acqhost.compiled"

ROOT = Path(__file__).resolve().parent.parent

_SETUP = """\
import sys
from mypyc.build import mypycify
from setuptools import setup
setup(name="acqhost-native", packages=[], py_modules=[],
      ext_modules=mypycify(sys.argv[1:], opt_level="3", group_name={group!r},
                           target_dir="build/native"),
      script_args=["-q", "build_ext", "--inplace", "--build-temp", "build/native"])
"""


def compiled() -> dict[str, bool]:
    """Whether this interpreter loads each of :data:`MODULES` compiled."""
    out = {}
    for name in MODULES:
        module = importlib.import_module(name)
        out[name] = not str(getattr(module, "__file__", "")).endswith(".py")
    return out


def _sources() -> list[str]:
    """The modules' files, relative to the source tree the build runs in."""
    return [str(Path(*name.split("."))) + ".py" for name in MODULES]


def clean(root: Path = ROOT) -> int:
    """Remove the compiled modules under ``root``; the number of files removed."""
    removed = 0
    for path in (root / "acqhost").rglob("*.so"):
        path.unlink()
        removed += 1
    shutil.rmtree(root / "build" / "native", ignore_errors=True)
    return removed


def build(root: Path = ROOT) -> None:
    """Compile :data:`MODULES` of the source tree at ``root`` in place (the old ones removed
    first). Raises RuntimeError with the compiler's output when it fails."""
    clean(root)
    done = subprocess.run(
        [sys.executable, "-c", _SETUP.format(group=GROUP), *_sources()],
        cwd=root, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        clean(root)  # nothing half-built is left to be imported
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-30:])
        raise RuntimeError(f"mypyc failed (exit {done.returncode}):\n{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m acqhost.native", description=__doc__)
    parser.add_argument("command", choices=("build", "clean", "status"))
    parser.add_argument(
        "--root", type=Path, default=ROOT, help="the source tree (default: this one)"
    )
    args = parser.parse_args(argv)
    if args.command == "build":
        try:
            build(args.root)
        except (RuntimeError, OSError) as e:
            print(f"acqhost.native: {e}", file=sys.stderr)
            return 1
        print(f"compiled {len(MODULES)} modules under {args.root / 'acqhost'}")
    elif args.command == "clean":
        print(f"removed {clean(args.root)} compiled files")
    else:
        for name, native in compiled().items():
            print(f"{name:34} {'compiled' if native else 'python'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
