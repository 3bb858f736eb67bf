"""``acqhost keys public``: the host's Ed25519 public key, for banks (which verify the SG of
every advice with it) and for anyone checking a voucher. Nothing secret is printed."""

from __future__ import annotations

import argparse

from acqhost.cli.common import Subparsers, add_command, add_group, config_from, host_keys

__all__ = ("add_keys_commands", "cmd_keys_public")


def cmd_keys_public(args: argparse.Namespace) -> int:
    keys = host_keys(config_from(args))
    print(keys.verify_key.hex())
    return 0


def add_keys_commands(sub: Subparsers) -> None:
    ksub = add_group(sub, "keys", "show the host's public key")
    add_command(
        ksub,
        "public",
        "print the host's Ed25519 public (verify) key in hex: what banks verify advices with",
        cmd_keys_public,
    )
