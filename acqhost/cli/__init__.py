"""The ``acqhost`` command: initialise a store, register terminals, serve; and the acquirer's
side of settlement-account changes: review, account history and rollback, signed vouchers,
operator unlock and the audit log's check."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys
import time
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from acqhost.config import Config, ConfigError, load_config
from acqhost.domain import audit, cards, crypto
from acqhost.store import open_store
from acqhost.store.base import NewAccount, Operator, StoreTx, Terminal

__all__ = ("main",)


class CliError(Exception):
    """A user error: printed without a traceback, exit status 2."""


def _config(args: argparse.Namespace, **flags: Any) -> Config:
    overrides = {"db": getattr(args, "db", None), "keys": getattr(args, "keys", None), **flags}
    return load_config(args.config, overrides)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument("--db", help="SQLite path (default ./acqhost.db) or database URL")
    p.add_argument("--keys", metavar="FILE", help="host key file (default: <db>.keys)")


def _shown(db: str) -> str:
    """The database as printed: a URL's password replaced by ***."""
    parts = urlsplit(db)
    if parts.password is None:
        return db
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


# -- init ------------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    cfg = _config(args)
    store = open_store(cfg.db)
    store.close()
    path = cfg.key_path
    if path.exists():
        keys = crypto.HostKeys.load(path)
        print(f"store ready: {_shown(cfg.db)}; host keys already in {path} (kept)")
    else:
        keys = crypto.HostKeys.generate()
        keys.save(path)
        print(f"store ready: {_shown(cfg.db)}; host keys written to {path} (mode 0600)")
    print(f"host public key: {keys.verify_key.hex()}")
    return 0


# -- terminals -------------------------------------------------------------------------------


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise CliError(message)


def _write_new(path: Path, text: str, mode: int) -> None:
    """Write ``text`` (UTF-8) to a file that must not exist yet, created with ``mode``."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise CliError(f"{path} exists: refusing to overwrite it") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def _audit_registration(tx: StoreTx, data_key: bytes, tid: str) -> None:
    """The audit log's first entry about a terminal, in the transaction that registers it:
    its version 1 and that version's fingerprint, so that an edit of it is found later."""
    first = tx.versions(tid)[0]
    audit.append(
        tx,
        data_key,
        at=first.created_at,
        actor=first.created_by,
        action="terminal.registered",
        tid=tid,
        subject="v1",
        detail={
            "version": 1,
            "before": None,
            "after": first.state,
            "account": first.account_masked,
            "bank_code": first.bank_code,
            "fingerprint": audit.fingerprint(data_key, first),
        },
    )


def cmd_terminal_add(args: argparse.Namespace) -> int:
    cfg = _config(args)
    keys = _host_keys(cfg)
    _check(
        len(args.tid) == 8 and args.tid.isascii() and args.tid.isprintable(),
        "--tid must be 8 printable ASCII characters",
    )
    _check(
        len(args.mid) == 15 and args.mid.isascii() and args.mid.isprintable(),
        "--mid must be 15 printable ASCII characters",
    )
    account = args.account.replace(" ", "")
    _check(
        account.isdigit() and 12 <= len(account) <= 19 and cards.luhn_ok(account),
        "--account must be 12 to 19 digits and pass the Luhn check",
    )
    _check(
        len(args.bank_code) == 12 and args.bank_code.isdigit(),
        "--bank-code must be a 12-digit CNAPS code",
    )
    _check(bool(args.holder.strip()), "--holder must not be empty")
    _check(
        (args.operator_id is None) == (args.operator_password is None),
        "--operator-id and --operator-password go together",
    )
    sale_limit = cfg.default_sale_limit if args.sale_limit is None else args.sale_limit
    _check(sale_limit > 0, "--sale-limit must be positive")
    seed = crypto.new_signing_key()
    now = time.time()
    terminal = Terminal(
        tid=args.tid,
        mid=args.mid,
        merchant_name=args.merchant_name,
        status="active",
        identity_public_key=crypto.verify_key_of(seed),
        sale_limit=sale_limit,
        test_limit=cfg.test_limit,
        created_at=now,
    )
    new_account = NewAccount(
        sealed_account=crypto.seal(keys.data_key, account.encode()),
        account_hash=crypto.account_hash(keys.data_key, account),
        account_masked=cards.mask_account(account),
        holder=args.holder.strip(),
        bank_code=args.bank_code,
        branch=args.branch or "",
        created_by="acqhost terminal add",
        reason="registration",
    )
    operator = None
    if args.operator_id is not None:
        operator = Operator(
            tid=args.tid,
            operator_id=args.operator_id,
            password_hash=crypto.hash_password(args.operator_password, fast=args.fast_hash),
            failures=0,
        )
    key_out = Path(args.key_out)
    _check(not key_out.exists(), f"{key_out} exists: refusing to overwrite a key file")
    store = open_store(cfg.db)
    try:
        store.add_terminal(
            terminal,
            new_account,
            operator,
            then=lambda tx: _audit_registration(tx, keys.data_key, args.tid),
        )
    except ValueError as e:
        raise CliError(str(e)) from None
    finally:
        store.close()
    key_file = {
        "tid": args.tid,
        "mid": args.mid,
        "terminal_signing_key": seed.hex(),
        "host_public_key": keys.verify_key.hex(),
        "host": cfg.host,
        "port": cfg.port,
        "framing": cfg.framing,
        "spec": cfg.spec,
    }
    _write_new(key_out, json.dumps(key_file, indent=2) + "\n", 0o600)
    print(
        f"terminal {args.tid} added (merchant {args.mid}, settles to "
        f"{new_account.account_masked} at {args.bank_code}); key file {key_out}"
    )
    return 0


def cmd_terminal_list(args: argparse.Namespace) -> int:
    cfg = _config(args)
    store = open_store(cfg.db)
    try:
        rows = []
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
    finally:
        store.close()
    _table(("TID", "MID", "STATUS", "ACCOUNT", "VER", "MERCHANT"), rows)
    return 0


def _width(text: str) -> int:
    """Columns ``text`` takes on a terminal: holder names in Chinese take two per character."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print rows under a header, each column as wide as its widest value."""
    cells = [[str(v) for v in row] for row in [header, *rows]]
    widths = [max(_width(r[i]) for r in cells) for i in range(len(header))]
    for row in cells:
        padded = (v + " " * (w - _width(v)) for v, w in zip(row, widths, strict=True))
        print("  ".join(padded).rstrip())


def cmd_terminal_disable(args: argparse.Namespace) -> int:
    cfg = _config(args)
    store = open_store(cfg.db)
    try:
        found = store.set_terminal_status(args.tid, "disabled")
    finally:
        store.close()
    _check(found, f"no terminal {args.tid}")
    print(f"terminal {args.tid} disabled")
    return 0


def _host_keys(cfg: Config) -> crypto.HostKeys:
    if not cfg.key_path.exists():
        raise CliError(f"no host keys at {cfg.key_path}: run `acqhost init` first")
    return crypto.HostKeys.load(cfg.key_path)


# -- serve -----------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _config(
        args,
        host=args.host,
        port=args.port,
        framing=args.framing,
        backend=args.backend,
        workers=args.workers,
        max_frame=args.max_frame,
        read_timeout=args.read_timeout,
        max_connections=args.max_connections,
        log_level=args.log_level,
    )
    _host_keys(cfg)  # fail early, in the parent
    if cfg.workers == 1:
        from acqhost.runtime.app import serve

        serve(cfg)
        return 0
    _check(cfg.port != 0, "--workers > 1 needs a fixed --port")
    return _serve_workers(cfg)


def _serve_workers(cfg: Config) -> int:
    """N processes sharing the port (SO_REUSEPORT); SIGTERM/SIGINT are passed on to them."""
    from acqhost.runtime.app import serve

    ctx = multiprocessing.get_context("spawn")
    children = [
        ctx.Process(target=serve, args=(cfg,), name=f"acqhost-{i}") for i in range(cfg.workers)
    ]
    for child in children:
        child.start()

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.pid is not None and child.exitcode is None:
                os.kill(child.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        child.join()
    return 0 if all(child.exitcode == 0 for child in children) else 1


# -- parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="acqhost", description="ISO 8583 acquirer host (profile ACQ1)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "init",
        help="create the store and the host keys",
        description="Create (or upgrade) the store and the host key file.",
    )
    _add_common(p)
    p.set_defaults(func=cmd_init)

    p = sub.add_parser(
        "serve",
        help="run the host",
        description="Serve POS terminals over TCP until SIGTERM or SIGINT.",
    )
    _add_common(p)
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default 8583)")
    p.add_argument("--framing", help="len2 (default), len4 or len2-tpdu")
    p.add_argument("--backend", help="asyncio (default; uvloop when installed) or trio")
    p.add_argument("--workers", type=int, help="processes sharing the port (default 1)")
    p.add_argument("--max-frame", type=int, help="largest frame in bytes (default 4096)")
    p.add_argument(
        "--read-timeout", type=float, help="seconds idle, stalled or not reading (default 30)"
    )
    p.add_argument("--max-connections", type=int, help="open connections at most (default 1000)")
    p.add_argument("--log-level", help="debug, info (default), warning, error")
    p.set_defaults(func=cmd_serve)

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
    _add_common(p)
    p.add_argument("--tid", required=True, help="terminal id, 8 characters (field 41)")
    p.add_argument("--mid", required=True, help="merchant id, 15 characters (field 42)")
    p.add_argument("--merchant-name", required=True)
    p.add_argument("--holder", required=True, help="settlement account holder name")
    p.add_argument("--account", required=True, help="settlement account number, 12-19 digits")
    p.add_argument("--bank-code", required=True, help="12-digit CNAPS bank code")
    p.add_argument("--branch", help="branch name")
    p.add_argument("--operator-id", help="operator id (for settlement account changes)")
    p.add_argument("--operator-password", help="operator password (stored as argon2id)")
    p.add_argument("--sale-limit", type=int, help="single-sale limit in minor units")
    p.add_argument(
        "--fast-hash", action="store_true", help="argon2id with minimal cost (tests and demos only)"
    )
    p.add_argument("--key-out", required=True, metavar="FILE", help="terminal key file to write")
    p.set_defaults(func=cmd_terminal_add)
    p = tsub.add_parser("list", help="list terminals", description="List terminals.")
    _add_common(p)
    p.set_defaults(func=cmd_terminal_list)
    p = tsub.add_parser(
        "disable",
        help="disable a terminal (answered 58 from then on)",
        description="Disable a terminal.",
    )
    _add_common(p)
    p.add_argument("tid")
    p.set_defaults(func=cmd_terminal_disable)
    _add_account_commands(sub)
    return parser


def _group(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, text: str
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    group = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
    return group.add_subparsers(dest=f"{name}_command", required=True, metavar="ACTION")


def _command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    text: str,
    func: Callable[[argparse.Namespace], int],
) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
    _add_common(p)
    p.set_defaults(func=func)
    return p


def _add_account_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The acquirer's commands for settlement-account changes (acqhost.cli.rebind)."""
    from acqhost.cli import rebind as c  # it imports this module's helpers

    def by(p: argparse.ArgumentParser) -> None:
        p.add_argument("--by", required=True, metavar="NAME", help="who (kept in the audit log)")

    g = _group(sub, "rebind", "review settlement-account change requests")
    p = _command(g, "list", "list change requests, oldest first", c.cmd_rebind_list)
    p.add_argument("--state", help="only requests in this state (e.g. PENDING_REVIEW)")
    p.add_argument("--tid", help="only this terminal's requests")
    p = _command(g, "show", "everything about one request", c.cmd_rebind_show)
    p.add_argument("rf", metavar="RF", type=str.upper, help="rebind reference (16 characters)")
    p = _command(g, "approve", "approve a pending request", c.cmd_rebind_approve)
    p.add_argument("rf", metavar="RF", type=str.upper)
    by(p)
    p = _command(g, "reject", "reject a pending request, saying why", c.cmd_rebind_reject)
    p.add_argument("rf", metavar="RF", type=str.upper)
    by(p)
    p.add_argument("--reason", required=True, metavar="TEXT", help="why (the merchant sees it)")
    text = "a voucher of a change signed by the host, for the merchant to keep"
    p = _command(g, "voucher", text, c.cmd_rebind_voucher)
    p.add_argument("rf", metavar="RF", type=str.upper)
    p.add_argument("--out", metavar="FILE", help="write it to FILE (never overwritten)")

    g = _group(sub, "account", "show, trace and roll back a terminal's settlement account")
    p = _command(g, "show", "the account in force now and any open change", c.cmd_account_show)
    p.add_argument("tid", metavar="TID")
    p = _command(g, "history", "every version of the account", c.cmd_account_history)
    p.add_argument("tid", metavar="TID")
    p = _command(
        g, "rollback", "restore an earlier version as a new version", c.cmd_account_rollback
    )
    p.add_argument("tid", metavar="TID")
    p.add_argument("--to-version", type=int, required=True, metavar="N", help="version to restore")
    by(p)
    p.add_argument("--reason", metavar="TEXT", help="why (kept with the new version)")

    g = _group(sub, "voucher", "check a change voucher")
    p = _command(g, "verify", "check a voucher's signature and content", c.cmd_voucher_verify)
    p.add_argument("file", metavar="FILE")
    text = "the host's Ed25519 public key, hex (default: the host key file's)"
    p.add_argument("--host-public-key", metavar="HEX", help=text)

    g = _group(sub, "audit", "check the audit log")
    _command(g, "verify", "check the audit log's hash chain and states", c.cmd_audit_verify)

    g = _group(sub, "operator", "manage terminal operators")
    p = _command(
        g, "unlock", "clear an operator's wrong-password count (after 75)", c.cmd_operator_unlock
    )
    p.add_argument("tid", metavar="TID")
    p.add_argument("operator_id", metavar="OPERATOR_ID")
    by(p)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except (CliError, ConfigError) as e:
        print(f"acqhost: {e}", file=sys.stderr)
        return 2
    except crypto.CryptoError as e:
        print(f"acqhost: {e}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    raise SystemExit(main())
