"""What every ``acqhost`` command shares: its user errors, the options naming the store and
the keys, the configuration those give, the store and the host keys opened from it, files
written only when new, and tables printed in columns."""

from __future__ import annotations

import argparse
import os
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import urlsplit, urlunsplit

from acqhost.config import Config, load_config
from acqhost.domain import crypto
from acqhost.store import open_store
from acqhost.store.base import Store

__all__ = (
    "CliError",
    "Command",
    "Subparsers",
    "add_command",
    "add_common",
    "add_group",
    "config_from",
    "host_keys",
    "opened",
    "require",
    "shown_db",
    "table",
    "write_new",
)

# argparse names the type of ``add_subparsers()``'s result only privately, and it is generic
# for type checkers only: hence a string.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Command: TypeAlias = Callable[[argparse.Namespace], int]


class CliError(Exception):
    """A user error: printed without a traceback, exit status 2."""


def require(condition: bool, message: str) -> None:
    """CliError(``message``) unless ``condition`` holds."""
    if not condition:
        raise CliError(message)


# -- options and configuration -----------------------------------------------------------------


def add_common(p: argparse.ArgumentParser) -> None:
    """The options every command takes: the config file, the store, the host key file."""
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument("--db", help="SQLite path (default ./acqhost.db) or database URL")
    p.add_argument("--keys", metavar="FILE", help="host key file (default: <db>.keys)")


def add_group(sub: Subparsers, name: str, text: str) -> Subparsers:
    """A command group (``acqhost NAME ACTION``) described by ``text``; its actions' parsers."""
    group = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
    return group.add_subparsers(dest=f"{name}_command", required=True, metavar="ACTION")


def add_command(sub: Subparsers, name: str, text: str, func: Command) -> argparse.ArgumentParser:
    """A command run by ``func``, described by ``text``, with the common options."""
    p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
    add_common(p)
    p.set_defaults(func=func)
    return p


def config_from(args: argparse.Namespace, **flags: Any) -> Config:
    """The configuration for a command: its ``--config`` file, the environment, then its
    ``--db`` and ``--keys`` and the other ``flags`` given (None: not given)."""
    overrides = {"db": getattr(args, "db", None), "keys": getattr(args, "keys", None), **flags}
    return load_config(args.config, overrides)


def shown_db(db: str) -> str:
    """The database as printed: a URL's password replaced by ***."""
    parts = urlsplit(db)
    if parts.password is None:
        return db
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


# -- the store and the keys --------------------------------------------------------------------


@contextmanager
def opened(cfg: Config) -> Iterator[Store]:
    """The configured store, closed when the block ends; one it cannot open is a user error."""
    try:
        store = open_store(cfg.db)
    except ValueError as e:
        raise CliError(str(e)) from None
    try:
        yield store
    finally:
        store.close()


def host_keys(cfg: Config) -> crypto.HostKeys:
    """The host keys; a missing key file says how to make one."""
    if not cfg.key_path.exists():
        raise CliError(f"no host keys at {cfg.key_path}: run `acqhost init` first")
    return crypto.HostKeys.load(cfg.key_path)


def write_new(path: Path, text: str, mode: int) -> None:
    """Write ``text`` (UTF-8) to a file that must not exist yet, created with ``mode``: a key
    file or a voucher is never overwritten, not even by a race between check and write."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise CliError(f"{path} exists: refusing to overwrite it") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


# -- output ------------------------------------------------------------------------------------


def _width(text: str) -> int:
    """Columns ``text`` takes on a terminal: holder names in Chinese take two per character."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print rows under a header, each column as wide as its widest value."""
    cells = [[str(v) for v in row] for row in [header, *rows]]
    widths = [max(_width(r[i]) for r in cells) for i in range(len(header))]
    for row in cells:
        padded = (v + " " * (w - _width(v)) for v, w in zip(row, widths, strict=True))
        print("  ".join(padded).rstrip())
