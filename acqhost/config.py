"""Host configuration: a TOML file, then environment variables, then command-line flags.

Every setting has a default, so a host runs with no file at all. The TOML file holds the same
names as the flags (``[host]`` table, ``max_frame`` not ``max-frame``) and the settlement-account
policy (``[rebind]`` table); the environment uses ``ACQHOST_`` + the upper-case name of a
``[host]`` setting (``ACQHOST_PORT=9000``).

The whole configuration is checked when it is loaded, every value where it was given: its type,
its range or its choices, unknown settings and tables, and the settings that must agree with
each other. A bad one is a :class:`ConfigError` whose one line names the setting as it was
given (``acqhost.toml: [host] port``, ``environment variable ACQHOST_PORT``, ``option --port``),
the value and what is allowed, rather than a traceback once the host is starting.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from acqhost.config_ops import OPS_TABLES, MetricsConfig, TlsConfig, check_metrics, ops_tables
from acqhost.wire import specs
from acqhost.wire.framing import FRAMINGS

__all__ = (
    "BACKENDS",
    "FRAME_SIZES",
    "LOG_LEVELS",
    "MAX_AMOUNT",
    "MAX_SIGNON_SKEW",
    "REVIEW_POLICIES",
    "TABLES",
    "BankConfig",
    "Config",
    "ConfigError",
    "RebindPolicy",
    "load_config",
)

BACKENDS = ("asyncio", "trio")
REVIEW_POLICIES = ("manual", "auto")
# The levels acqhost.log.configure_logging accepts, in any case (tests check that they agree).
LOG_LEVELS = ("debug", "info", "warning", "warn", "error", "critical")
# The frame sizes each framing's length header can express: what FrameDecoder accepts as its
# max_size (tests check that they agree). A len2-tpdu frame holds its 5-byte TPDU and a message.
FRAME_SIZES: Mapping[str, tuple[int, int]] = {
    "len2": (1, 0xFFFF),
    "len4": (1, 9999),
    "len2-tpdu": (6, 0xFFFF),
}
# The largest amount field 4 carries (12 digits of minor units): no limit is worth more.
MAX_AMOUNT = 999_999_999_999
# The largest signon_skew: field 7 names no year, which is inferred as the one nearest the
# host's clock, and a window of more than a day would keep captured sign-ons usable as long.
MAX_SIGNON_SKEW = 86_400
# The tables a configuration file may hold ([[banks]]: an array of tables, one a bank).
TABLES = ("host", "rebind", "banks", *OPS_TABLES)


class ConfigError(ValueError):
    """A setting that cannot be used, named with where it came from."""


class _Refused(Exception):
    """A value a rule does not allow (its caller names the setting)."""


@dataclass(frozen=True, slots=True)
class _Rule:
    """What one setting allows: a type (a number may also be given as text, as the environment
    gives it), then a range or a set of choices."""

    kind: type  # int, float or str
    allowed: str  # what is allowed, as a message says it; with choices: filled in from them
    ok: Callable[[Any], bool] = lambda value: True
    choices: Callable[[], Sequence[str]] | None = None
    fold: bool = False  # choices in any case, kept in lower case

    def describe(self) -> str:
        if self.choices is None:
            return self.allowed
        *most, last = self.choices()
        return f"one of {', '.join(most)} or {last}" if most else last

    def apply(self, value: object) -> Any:
        """The value as the configuration keeps it; _Refused when it is not allowed."""
        converted = _convert(self.kind, value)
        if self.fold:
            converted = converted.lower()
        if self.choices is not None and converted not in self.choices():
            raise _Refused
        if not self.ok(converted):
            raise _Refused
        return converted


def _convert(kind: type, value: object) -> Any:
    if isinstance(value, bool):  # a TOML true is neither text nor a number here
        raise _Refused
    if kind is str:
        if isinstance(value, str):
            return value
        raise _Refused
    if isinstance(value, str):
        try:
            return int(value.strip()) if kind is int else float(value.strip())
        except ValueError:
            raise _Refused from None
    if isinstance(value, int):
        return value if kind is int else float(value)
    if kind is float and isinstance(value, float):
        return value
    raise _Refused


def _whole(low: int, high: int | None = None) -> _Rule:
    if high is None:
        return _Rule(int, f"a whole number of at least {low}", lambda v: v >= low)
    return _Rule(int, f"a whole number from {low} to {high}", lambda v: low <= v <= high)


def _seconds(*, zero: bool) -> _Rule:
    if zero:
        return _Rule(float, "a number of seconds, 0 or more", lambda v: math.isfinite(v) and v >= 0)
    return _Rule(float, "a number of seconds above 0", lambda v: math.isfinite(v) and v > 0)


def _choice(choices: Callable[[], Sequence[str]], *, fold: bool = False) -> _Rule:
    return _Rule(str, "", choices=choices, fold=fold)


def _text(allowed: str, *, empty: bool = False) -> _Rule:
    return _Rule(str, allowed, lambda v: empty or bool(v.strip()))


# The [host] settings (and ACQHOST_* variables, and flags), in the order Config has them.
_HOST_RULES: Mapping[str, _Rule] = {
    "host": _text("a non-empty host name or address"),
    "port": _whole(0, 65535),  # 0: any free port (tests)
    "framing": _choice(lambda: FRAMINGS),
    "spec": _choice(specs.available),
    "max_frame": _whole(1, 0xFFFF),  # and within what the framing's header can express
    "read_timeout": _seconds(zero=False),
    "frame_timeout": _seconds(zero=False),
    "first_frame_timeout": _seconds(zero=False),
    "max_connections": _whole(1),
    "max_connections_per_source": _whole(1),
    "log_rate": _Rule(
        float,
        "a number of records a second, 0 (no limit) or at least 1",
        lambda v: math.isfinite(v) and (v == 0 or v >= 1),
    ),
    "backend": _choice(lambda: BACKENDS),
    "workers": _whole(1),
    "db": _text("a non-empty SQLite path or database URL"),
    "keys": _text("a file path (empty for the default)", empty=True),
    "log_level": _choice(lambda: LOG_LEVELS, fold=True),
    "test_limit": _whole(0, MAX_AMOUNT),
    "default_sale_limit": _whole(1, MAX_AMOUNT),
    "write_batch": _whole(1),
    "capture": _text("a file path (empty: no capture)", empty=True),
    "signon_skew": _whole(1, MAX_SIGNON_SKEW),
}
_REBIND_RULES: Mapping[str, _Rule] = {
    "review": _choice(lambda: REVIEW_POLICIES),
    "cooling_off": _seconds(zero=True),
    "min_interval": _seconds(zero=True),
    "operator_max_failures": _whole(1),
}


def _apply(rule: _Rule, value: object, where: str) -> Any:
    try:
        return rule.apply(value)
    except _Refused:
        raise ConfigError(f"{where} must be {rule.describe()}, not {value!r}") from None


def _unknown(where: str, name: str, known: Sequence[str]) -> ConfigError:
    return ConfigError(f"{where}unknown setting {name}; known: {', '.join(known)}")


def _strings(value: object, ok: Callable[[str], bool]) -> tuple[str, ...]:
    """A list of strings, each of which ``ok`` allows; _Refused otherwise."""
    if not isinstance(value, list) or not all(isinstance(v, str) and ok(v) for v in value):
        raise _Refused
    return tuple(value)


def _tid(v: str) -> bool:
    return len(v) == 8 and v.isascii() and v.isprintable()


def _bank_code(v: str) -> bool:
    return len(v) == 12 and v.isdigit() and v.isascii()


def _response_code(v: str) -> bool:
    return len(v) == 2 and v.isascii() and v.isalnum() and v != "00"


# The [[banks]] settings that are lists: (what is allowed, what each item must be).
_LIST_RULES: Mapping[str, tuple[str, Callable[[str], bool]]] = {
    "bank_codes": ("a list of 12-digit bank codes (48 BK)", _bank_code),
    "terminals": ("a list of terminal ids of 8 printable characters", _tid),
    "final_codes": ("a list of 2-character response codes other than 00", _response_code),
}
_BANK_RULES: Mapping[str, _Rule] = {
    "name": _text("a non-empty name"),
    "host": _text("a non-empty host name or address"),
    "port": _whole(1, 65535),
    "framing": _choice(lambda: FRAMINGS),
    "spec": _choice(specs.available),
    "max_age": _seconds(zero=False),
    "retry_initial": _seconds(zero=False),
    "retry_max": _seconds(zero=False),
    "ack_timeout": _seconds(zero=False),
    "echo_interval": _seconds(zero=False),
}
_TLS_RULES: Mapping[str, _Rule] = {
    "ca_file": _text("the path of the CA certificates that sign the bank's certificate"),
    "cert_file": _text("the path of this host's client certificate (PEM)"),
    "key_file": _text("the path of this host's client certificate's key (PEM)"),
}


@dataclass(frozen=True, slots=True)
class BankConfig:
    """One ``[[banks]]`` table: a bank system the host delivers settlement updates to
    (PROTOCOL.md 6), the advices it takes (by 48 BK or by terminal), and how delivery is
    retried. Durations in seconds."""

    name: str
    port: int
    host: str = "127.0.0.1"
    framing: str = "len2"
    spec: str = "acq87"
    bank_codes: tuple[str, ...] = ()  # advices whose 48 BK is one of these
    terminals: tuple[str, ...] = ()  # and advices of these terminals
    final_codes: tuple[str, ...] = ()  # answers that refuse an advice for good: dead-lettered
    max_age: float = 3 * 86400.0  # an advice undelivered this long is dead-lettered
    retry_initial: float = 0.5  # the first retry's wait; doubled, with jitter, up to retry_max
    retry_max: float = 60.0
    ack_timeout: float = 10.0  # an advice unanswered this long is sent again
    echo_interval: float = 30.0  # an idle link is kept alive with an echo this often
    tls_ca_file: str = ""  # [banks.tls]: TLS when given
    tls_cert_file: str = ""  # a client certificate, with its key
    tls_key_file: str = ""

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca_file)

    def takes(self, tid: str, bank_code: str) -> bool:
        """Whether an advice of terminal ``tid`` naming bank ``bank_code`` goes to this bank."""
        return bank_code in self.bank_codes or tid in self.terminals

    @classmethod
    def from_table(cls, table: object, file: str, number: int) -> BankConfig:
        """The bank the ``number``-th ``[[banks]]`` table of ``file`` describes; ConfigError
        naming the setting."""
        where = f"{file}: [[banks]] #{number}"
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where} must be a table ([[banks]]), not {table!r}")
        values: dict[str, Any] = {}
        for name, value in table.items():
            at = f"{where} {name}"
            if name in _BANK_RULES:
                values[name] = _apply(_BANK_RULES[name], value, at)
            elif name in _LIST_RULES:
                allowed, ok = _LIST_RULES[name]
                try:
                    values[name] = _strings(value, ok)
                except _Refused:
                    raise ConfigError(f"{at} must be {allowed}, not {value!r}") from None
            elif name == "tls":
                values.update(_tls(value, file, number))
            else:
                known = [*_BANK_RULES, *_LIST_RULES, "tls"]
                raise _unknown(f"{file}: ", f"[[banks]] #{number} {name}", known)
        for required in ("name", "port"):
            if required not in values:
                raise ConfigError(f"{where} needs {required} ({_BANK_RULES[required].describe()})")
        if not values.get("bank_codes") and not values.get("terminals"):
            raise ConfigError(f"{where} takes no advice: give bank_codes, terminals or both")
        bank = cls(**values)
        if bank.retry_initial > bank.retry_max:
            raise ConfigError(f"{where} retry_initial must not exceed retry_max")
        return bank


def _tls(table: object, file: str, number: int) -> dict[str, str]:
    where = f"{file}: [[banks]] #{number} tls"
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table ([banks.tls]), not {table!r}")
    values: dict[str, str] = {}
    for name, value in table.items():
        rule = _TLS_RULES.get(name)
        if rule is None:
            raise _unknown(f"{file}: ", f"[[banks]] #{number} tls {name}", list(_TLS_RULES))
        values[f"tls_{name}"] = _apply(rule, value, f"{where} {name}")
    if "tls_ca_file" not in values:
        raise ConfigError(f"{where} needs ca_file ({_TLS_RULES['ca_file'].describe()})")
    if ("tls_cert_file" in values) != ("tls_key_file" in values):
        raise ConfigError(f"{where} cert_file and key_file go together")
    return values


def _banks(value: object, file: str) -> tuple[BankConfig, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{file}: banks must be an array of tables ([[banks]]), not {value!r}")
    banks = tuple(BankConfig.from_table(t, file, i + 1) for i, t in enumerate(value))
    names = [b.name for b in banks]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"{file}: [[banks]] name {name!r} is given to two banks")
    # An advice goes to one bank: a bank code or a terminal taken by two would go to either.
    for what in ("bank_codes", "terminals"):
        taken: dict[str, str] = {}
        for bank in banks:
            values: tuple[str, ...] = getattr(bank, what)
            for value in values:
                if value in taken:
                    raise ConfigError(f"{file}: [[banks]] {what} {value!r} is taken by "
                                      f"{taken[value]!r} and {bank.name!r}")  # fmt: skip
                taken[value] = bank.name
    return banks


@dataclass(frozen=True, slots=True)
class RebindPolicy:
    """The ``[rebind]`` table: how settlement-account changes are reviewed and paced
    (durations in seconds)."""

    review: str = "manual"  # "manual": an acquirer's reviewer decides; "auto": approved at once
    cooling_off: float = 86400.0  # from approval to ACTIVE
    min_interval: float = 86400.0  # between accepted changes of one terminal (65 sooner)
    operator_max_failures: int = 5  # consecutive wrong passwords before lockout (75)

    @classmethod
    def from_table(cls, table: Any, file: str | None = None) -> RebindPolicy:
        """The policy a ``[rebind]`` table describes (read from ``file``, if it was);
        ConfigError for unknown settings and bad values."""
        prefix = f"{file}: " if file else ""
        if not isinstance(table, Mapping):
            raise ConfigError(f"{prefix}rebind must be a table ([rebind]), not {table!r}")
        values: dict[str, Any] = {}
        for name, value in table.items():
            rule = _REBIND_RULES.get(name)
            if rule is None:
                raise _unknown(prefix, f"[rebind] {name}", list(_REBIND_RULES))
            values[name] = _apply(rule, value, f"{prefix}[rebind] {name}")
        return cls(**values)

    def validate(self) -> RebindPolicy:
        """This policy, or ConfigError for a value its rules do not allow."""
        for name, rule in _REBIND_RULES.items():
            _apply(rule, getattr(self, name), f"[rebind] {name}")
        return self


@dataclass(frozen=True, slots=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8583
    framing: str = "len2"
    spec: str = "acq87"
    max_frame: int = 4096
    # seconds a connection may stay idle, stall inside a frame, or leave its answers untaken
    read_timeout: float = 30.0
    frame_timeout: float = 10.0  # from a frame's first byte to its last
    first_frame_timeout: float = 5.0  # from connecting to the first valid frame
    max_connections: int = 1000
    max_connections_per_source: int = 64  # open connections from one address
    log_rate: float = 20.0  # log records a peer may cause, per source address per second
    backend: str = "asyncio"
    workers: int = 1
    db: str = "acqhost.db"
    keys: str = ""  # host key file; see key_path
    log_level: str = "info"
    test_limit: int = 100  # minor units; a test sale above it gets 13
    default_sale_limit: int = 100_000_00  # minor units, for terminals added without a limit
    write_batch: int = 512  # most sales committed in one transaction
    capture: str = ""  # traffic file answered requests are recorded in (README, Traffic files)
    # seconds a sign-on's field 7 may be from the host's UTC time (PROTOCOL.md 4.2); accepted
    # sign-ons are remembered twice as long, to refuse replays
    signon_skew: int = 300
    rebind: RebindPolicy = field(default_factory=RebindPolicy)  # the [rebind] table
    banks: tuple[BankConfig, ...] = ()  # the [[banks]] tables
    metrics: MetricsConfig | None = None  # the [metrics] table (acqhost.config_ops); None: off
    tls: TlsConfig | None = None  # the [tls] table: the terminals' listener speaks TLS

    @property
    def key_path(self) -> Path:
        """The host key file: ``keys``, else beside a SQLite file (``<db>.keys``), else (a
        database URL) ``acqhost.keys`` in the working directory."""
        if self.keys:
            return Path(self.keys)
        if "://" in self.db:
            return Path("acqhost.keys")
        return Path(f"{self.db}.keys")

    def validate(self, origin: Mapping[str, str] | None = None) -> Config:
        """This configuration, or ConfigError for a value its rules do not allow or settings
        that do not agree. ``origin`` names where settings came from (for the messages);
        a setting not in it is named as it is."""
        where = dict(origin or {})
        for name, rule in _HOST_RULES.items():
            _apply(rule, getattr(self, name), where.get(name, name))
        self.rebind.validate()
        if self.capture and self.workers > 1:
            # One file, one token key and one clock per capture: a process's own.
            raise ConfigError(
                f"{where.get('capture', 'capture')} needs workers = 1, not {self.workers}"
            )
        low, high = FRAME_SIZES[self.framing]
        if not low <= self.max_frame <= high:
            framing = where.get("framing", "the default")
            raise ConfigError(
                f"{where.get('max_frame', 'max_frame')} must be a whole number from {low} to "
                f"{high} with framing {self.framing} ({framing}), not {self.max_frame!r}"
            )
        try:
            check_metrics(self.metrics, self.host, self.port, self.workers)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return self


def _read(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the configuration: defaults < TOML file ``path`` < environment < ``overrides``
    (the command line; None values mean "not given"). Every value is checked where it is
    given; ConfigError names the first that cannot be used."""
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    rebind = RebindPolicy()
    banks: tuple[BankConfig, ...] = ()
    ops: dict[str, Any] = {}
    if path is not None:
        data = _read(path)
        for name, value in data.items():
            if name not in TABLES:
                what = f"table [{name}]" if isinstance(value, dict) else f"setting {name}"
                known = "[host], [rebind], [[banks]], [metrics] and [tls]"
                raise ConfigError(f"{path}: unknown {what} (settings go in {known})")
        host = data.get("host", {})
        if not isinstance(host, dict):
            raise ConfigError(f"{path}: host must be a table ([host]), not {host!r}")
        for name, value in host.items():
            rule = _HOST_RULES.get(name)
            if rule is None:
                raise _unknown(f"{path}: ", f"[host] {name}", list(_HOST_RULES))
            origin[name] = f"{path}: [host] {name}"
            values[name] = _apply(rule, value, origin[name])
        rebind = RebindPolicy.from_table(data.get("rebind", {}), str(path))
        banks = _banks(data.get("banks", []), str(path))
        try:
            ops = ops_tables(data, str(path))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    env = os.environ if environ is None else environ
    for name, rule in _HOST_RULES.items():
        variable = f"ACQHOST_{name.upper()}"
        raw = env.get(variable)
        if raw is not None:
            origin[name] = f"environment variable {variable}"
            values[name] = _apply(rule, raw, origin[name])
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        rule = _HOST_RULES.get(name)
        if rule is None:  # the command line's own mistake, not its user's
            raise _unknown("", name, list(_HOST_RULES))
        origin[name] = f"option --{name.replace('_', '-')}"
        values[name] = _apply(rule, value, origin[name])
    config = Config(**values, rebind=rebind, banks=banks, **ops)
    return config.validate(origin)
