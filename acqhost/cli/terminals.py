"""``acqhost init`` (the store and the host keys) and ``acqhost terminal add|list|disable``:
registering a terminal with its settlement account and writing its key file, listing the
terminals with the accounts in force, disabling one."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from acqhost.cli.common import (
    CliError,
    Subparsers,
    add_common,
    config_from,
    host_keys,
    opened,
    require,
    shown_db,
    table,
    write_new,
)
from acqhost.domain import crypto, terminals

__all__ = (
    "add_init_command",
    "add_terminal_commands",
    "cmd_init",
    "cmd_terminal_add",
    "cmd_terminal_disable",
    "cmd_terminal_list",
)


def cmd_init(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    with opened(cfg):
        pass  # opening creates or upgrades the store
    path = cfg.key_path
    if path.exists():
        keys = crypto.HostKeys.load(path)
        print(f"store ready: {shown_db(cfg.db)}; host keys already in {path} (kept)")
    else:
        keys = crypto.HostKeys.generate()
        keys.save(path)
        print(f"store ready: {shown_db(cfg.db)}; host keys written to {path} (mode 0600)")
    print(f"host public key: {keys.verify_key.hex()}")
    return 0


def cmd_terminal_add(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    keys = host_keys(cfg)
    require(
        (args.operator_id is None) == (args.operator_password is None),
        "--operator-id and --operator-password go together",
    )
    if args.operator_password == "-":  # from standard input: not in the process list
        args.operator_password = sys.stdin.readline().rstrip("\r\n")
        require(bool(args.operator_password), "--operator-password -: no password on stdin")
    registration = terminals.Registration(
        tid=args.tid,
        mid=args.mid,
        merchant_name=args.merchant_name,
        holder=args.holder,
        account=args.account,
        bank_code=args.bank_code,
        branch=args.branch or "",
        sale_limit=cfg.default_sale_limit if args.sale_limit is None else args.sale_limit,
        test_limit=cfg.test_limit,
        operator_id=args.operator_id,
        operator_password=args.operator_password,
    )
    try:
        registration = terminals.check_registration(registration)
    except terminals.RegistrationError as e:
        raise CliError(f"--{e.name.replace('_', '-')} {e.problem}") from None
    key_out = Path(args.key_out)
    require(not key_out.exists(), f"{key_out} exists: refusing to overwrite a key file")
    written: list[Path] = []

    def keep(seed: bytes) -> None:
        """The key file, written inside the registering transaction: if it cannot be, the
        terminal is not registered (and its private key is not lost)."""
        key_file = {  # PROTOCOL.md 4.1
            "tid": args.tid,
            "mid": args.mid,
            "terminal_signing_key": seed.hex(),
            "host_public_key": keys.verify_key.hex(),
            "host": cfg.host,
            "port": cfg.port,
            "framing": cfg.framing,
            "spec": cfg.spec,
        }
        try:
            write_new(key_out, json.dumps(key_file, indent=2) + "\n", 0o600)
        except OSError as e:
            raise CliError(f"key file {key_out}: {e.strerror or e}; nothing registered") from None
        written.append(key_out)

    with opened(cfg) as store:
        try:
            done = terminals.register(
                store,
                keys.data_key,
                registration,
                by="acqhost terminal add",
                now=time.time(),
                fast_hash=args.fast_hash,
                keep=keep,
            )
        except ValueError as e:  # the terminal id is taken
            raise CliError(str(e)) from None
        except BaseException:
            for path in written:  # written, but the registration did not commit
                path.unlink(missing_ok=True)
            raise
    print(
        f"terminal {args.tid} added (merchant {args.mid}, settles to "
        f"{done.account.account_masked} at {args.bank_code}); key file {key_out}"
    )
    return 0


def cmd_terminal_list(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    rows = []
    with opened(cfg) as store:
        for t in store.list_terminals():
            account = store.current_account(t.tid, time.time())
            rows.append(
                (
                    t.tid,
                    t.mid,
                    t.status,
                    account.account_masked if account else "-",
                    f"v{account.version}" if account else "-",
                    t.merchant_name,
                )
            )
    table(("TID", "MID", "STATUS", "ACCOUNT", "VER", "MERCHANT"), rows)
    return 0


def cmd_terminal_disable(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    with opened(cfg) as store:
        found = store.set_terminal_status(args.tid, "disabled")
    require(found, f"no terminal {args.tid}")
    print(f"terminal {args.tid} disabled")
    return 0


# -- parsers -------------------------------------------------------------------------------------


def add_init_command(sub: Subparsers) -> None:
    p = sub.add_parser(
        "init",
        help="create the store and the host keys",
        description="Create (or upgrade) the store and the host key file.",
    )
    add_common(p)
    p.set_defaults(func=cmd_init)


def add_terminal_commands(sub: Subparsers) -> None:
    term = sub.add_parser(
        "terminal", help="register, list and disable terminals", description="Manage POS terminals."
    )
    tsub = term.add_subparsers(dest="terminal_command", required=True, metavar="ACTION")
    p = tsub.add_parser(
        "add",
        help="register a terminal and write its key file",
        description="Register a terminal with its settlement account "
        "(version 1) and write the terminal's key file.",
    )
    add_common(p)
    p.add_argument("--tid", required=True, help="terminal id, 8 characters (field 41)")
    p.add_argument("--mid", required=True, help="merchant id, 15 characters (field 42)")
    p.add_argument("--merchant-name", required=True)
    p.add_argument("--holder", required=True, help="settlement account holder name")
    p.add_argument("--account", required=True, help="settlement account number, 12-19 digits")
    p.add_argument("--bank-code", required=True, help="12-digit CNAPS bank code")
    p.add_argument("--branch", help="branch name")
    p.add_argument("--operator-id", help="operator id (for settlement account changes)")
    p.add_argument(
        "--operator-password",
        help="operator password (stored as argon2id); - reads it from the first line of "
        "standard input, so that it is not in the process list or the shell's history",
    )
    p.add_argument("--sale-limit", type=int, help="single-sale limit in minor units")
    p.add_argument(
        "--fast-hash", action="store_true", help="argon2id with minimal cost (tests and demos only)"
    )
    p.add_argument("--key-out", required=True, metavar="FILE", help="terminal key file to write")
    p.set_defaults(func=cmd_terminal_add)
    p = tsub.add_parser("list", help="list terminals", description="List terminals.")
    add_common(p)
    p.set_defaults(func=cmd_terminal_list)
    p = tsub.add_parser(
        "disable",
        help="disable a terminal (answered 58 from then on)",
        description="Disable a terminal.",
    )
    add_common(p)
    p.add_argument("tid")
    p.set_defaults(func=cmd_terminal_disable)
