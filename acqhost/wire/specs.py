"""Message specs as data: pyiso8583's own spec format, one JSON file per dialect.

The files live in ``specs/`` at the top of the source tree and ship inside the installed
package as ``acqhost/specs_data/``; :func:`load` finds them in either place.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ("SpecDict", "available", "load")

SpecDict = Mapping[str, Mapping[str, Any]]

_SOURCE_TREE_SPECS = Path(__file__).resolve().parents[2] / "specs"


def _spec_dir() -> Path:
    shipped = resources.files("acqhost").joinpath("specs_data")
    if shipped.is_dir():
        return Path(str(shipped))
    if _SOURCE_TREE_SPECS.is_dir():
        return _SOURCE_TREE_SPECS
    raise FileNotFoundError("acqhost spec files not found (neither specs_data nor specs/)")


def available() -> tuple[str, ...]:
    """Names of the specs that :func:`load` knows, sorted."""
    return tuple(sorted(p.stem for p in _spec_dir().glob("*.json")))


@cache
def _load_text(name: str) -> str:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"invalid spec name {name!r}")
    path = _spec_dir() / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown spec {name!r}; available: {', '.join(available())}")
    return path.read_text(encoding="utf-8")


def load(name: str) -> dict[str, dict[str, Any]]:
    """Return the spec called ``name`` (for example ``"acq87"`` or ``"cup-pos"``).

    The result is a fresh dict each call, usable as is with ``iso8583.decode``/``encode`` and
    with :func:`acqhost.wire.codec.compile_spec`.
    """
    spec: dict[str, dict[str, Any]] = json.loads(_load_text(name))
    return spec
