"""The ``acqhost`` command: initialise a store, register terminals, serve; and the acquirer's
side of settlement-account changes: review, account history and rollback, signed vouchers,
operator unlock and the audit log's check; the settlement report; the host's public key for
the banks.

The commands live in ``common`` (what they share), ``terminals`` (init and terminal),
``serve``, ``rebind`` (rebind, account, voucher, audit, operator), ``settle`` (settle report),
``keys`` (keys public) and ``banklink`` (status, retry); this module builds the parser from them
and runs one command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from acqhost.cli import banklink, keys, rebind, serve, settle, terminals
from acqhost.cli.common import CliError
from acqhost.config import ConfigError
from acqhost.domain.crypto import CryptoError
from acqhost.errors import ListenError, StoreOpenError

__all__ = ("build_parser", "main")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="acqhost", description="ISO 8583 acquirer host (profile ACQ1)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    terminals.add_init_command(sub)
    serve.add_serve_command(sub)
    terminals.add_terminal_commands(sub)
    rebind.add_account_commands(sub)
    keys.add_keys_commands(sub)
    settle.add_settle_commands(sub)
    banklink.add_banklink_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a user error (a bad option, setting or key file) is one line on
    stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except (CliError, ConfigError, CryptoError, ListenError, StoreOpenError) as e:
        print(f"acqhost: {e}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    raise SystemExit(main())
