"""Host configuration: a TOML file, then environment variables, then command-line flags.

Every setting has a default, so a host runs with no file at all. The TOML file holds the same
names as the flags (``[host]`` table, ``max_frame`` not ``max-frame``); the environment uses
``ACQHOST_`` + the upper-case name (``ACQHOST_PORT=9000``).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from acqhost.wire.framing import FRAMINGS

__all__ = ("Config", "ConfigError", "RebindPolicy", "load_config")

BACKENDS = ("asyncio", "trio")
REVIEW_POLICIES = ("manual", "auto")


class ConfigError(ValueError):
    """A setting that cannot be used, named with where it came from."""


@dataclass(frozen=True, slots=True)
class RebindPolicy:
    """The ``[rebind]`` table: how settlement-account changes are reviewed and paced
    (durations in seconds)."""

    review: str = "manual"  # "manual": an acquirer's reviewer decides; "auto": approved at once
    cooling_off: float = 86400.0  # from approval to ACTIVE
    min_interval: float = 86400.0  # between accepted changes of one terminal (65 sooner)
    operator_max_failures: int = 5  # consecutive wrong passwords before lockout (75)

    @classmethod
    def from_table(cls, table: Any, source: str = "[rebind]") -> RebindPolicy:
        """The policy a ``[rebind]`` table describes; ConfigError for unknown or bad values."""
        if not isinstance(table, Mapping):
            raise ConfigError(f"{source} must be a table")
        values: dict[str, Any] = {}
        for name, value in table.items():
            if name not in ("review", "cooling_off", "min_interval", "operator_max_failures"):
                raise ConfigError(f"{source}: unknown setting {name}")
            if name == "review":
                if value not in REVIEW_POLICIES:
                    raise ConfigError(f"{source}: review must be manual or auto, not {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{source}: {name} must be a number, not {value!r}")
            elif value < (1 if name == "operator_max_failures" else 0):
                raise ConfigError(f"{source}: {name} out of range: {value!r}")
            elif name == "operator_max_failures" and not isinstance(value, int):
                raise ConfigError(f"{source}: {name} must be a whole number, not {value!r}")
            values[name] = float(value) if name in ("cooling_off", "min_interval") else value
        return cls(**values)


@dataclass(frozen=True, slots=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8583
    framing: str = "len2"
    spec: str = "acq87"
    max_frame: int = 4096
    # seconds a connection may stay idle, stall inside a frame, or leave its answers untaken
    read_timeout: float = 30.0
    max_connections: int = 1000
    backend: str = "asyncio"
    workers: int = 1
    db: str = "acqhost.db"
    keys: str = ""  # host key file; see key_path
    log_level: str = "info"
    test_limit: int = 100  # minor units; a test sale above it gets 13
    default_sale_limit: int = 100_000_00  # minor units, for terminals added without a limit
    write_batch: int = 512  # most sales committed in one transaction
    extra: Mapping[str, Any] = field(default_factory=dict)  # the file's other tables
    rebind: RebindPolicy = field(default_factory=RebindPolicy)  # the [rebind] table

    @property
    def key_path(self) -> Path:
        """The host key file: ``keys``, else beside a SQLite file (``<db>.keys``), else (a
        database URL) ``acqhost.keys`` in the working directory."""
        if self.keys:
            return Path(self.keys)
        if "://" in self.db:
            return Path("acqhost.keys")
        return Path(f"{self.db}.keys")

    def validate(self) -> Config:
        if self.framing not in FRAMINGS:
            raise ConfigError(f"framing must be one of {', '.join(FRAMINGS)}: {self.framing!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be asyncio or trio: {self.backend!r}")
        for name in ("max_frame", "max_connections", "workers", "write_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if not self.read_timeout > 0:
            raise ConfigError("read_timeout must be positive")
        if not 0 <= self.port <= 65535:  # 0: any free port (tests)
            raise ConfigError(f"port out of range: {self.port}")
        return self


_FIELDS = {f.name: f for f in fields(Config) if f.name not in ("extra", "rebind")}


def _coerce(name: str, value: Any, source: str) -> Any:
    kind = type(getattr(Config(), name))
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if isinstance(value, str):
        try:
            if kind is int:
                return int(value)
            if kind is float:
                return float(value)
        except ValueError:
            raise ConfigError(f"{source}: {name} must be a number, not {value!r}") from None
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    raise ConfigError(f"{source}: {name} must be {kind.__name__}, not {value!r}")


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the configuration: defaults < TOML file ``path`` < environment < ``overrides``
    (the command line; None values mean "not given")."""
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    rebind = RebindPolicy()
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: {e}") from None
        host_table = data.pop("host", {})
        if not isinstance(host_table, dict):
            raise ConfigError(f"{path}: [host] must be a table")
        for name, value in host_table.items():
            if name not in _FIELDS:
                raise ConfigError(f"{path}: unknown setting [host] {name}")
            values[name] = _coerce(name, value, str(path))
        extra = data
        rebind = RebindPolicy.from_table(extra.get("rebind", {}), f"{path}: [rebind]")
    env = os.environ if environ is None else environ
    for name in _FIELDS:
        raw = env.get(f"ACQHOST_{name.upper()}")
        if raw is not None:
            values[name] = _coerce(name, raw, f"ACQHOST_{name.upper()}")
    for name, value in (overrides or {}).items():
        if value is not None:
            if name not in _FIELDS:
                raise ConfigError(f"unknown setting {name}")
            values[name] = _coerce(name, value, f"--{name.replace('_', '-')}")
    return dataclasses.replace(Config(), **values, extra=extra, rebind=rebind).validate()
