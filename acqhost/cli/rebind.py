"""The ``acqhost`` commands of the acquirer's side of settlement-account changes (PROTOCOL.md
5.3): list, show, approve and reject requests; show an account, its history, roll it back;
signed vouchers and their check; the audit log's check; unlocking a terminal operator.

Each command opens the store, works in one transaction and closes it, so it may run while host
processes serve: they see a decision within ``CACHE_SECONDS``, before it takes effect
(``acqhost.domain.accounts.DECISION_LEAD``). The rules are the domain's (``acqhost.domain.rebind``
and ``acqhost.domain.terminals``); these commands parse, print and choose the exit status.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from acqhost.cli.common import (
    CliError,
    Subparsers,
    add_command,
    add_group,
    config_from,
    host_keys,
    opened,
    require,
    table,
    write_new,
)
from acqhost.config import Config
from acqhost.domain import accounts, audit, rebind, terminals, voucher
from acqhost.domain.crypto import HostKeys
from acqhost.store.base import (
    ACCOUNT_STATES,
    OPEN_REBIND_STATES,
    AccountVersion,
    RebindRequest,
    Store,
    StoreTx,
)

__all__ = (
    "add_account_commands",
    "cmd_account_history",
    "cmd_account_rollback",
    "cmd_account_show",
    "cmd_audit_verify",
    "cmd_operator_unlock",
    "cmd_rebind_approve",
    "cmd_rebind_list",
    "cmd_rebind_reject",
    "cmd_rebind_show",
    "cmd_rebind_voucher",
    "cmd_voucher_verify",
)


def _utc(at: float | None) -> str:
    """A time as these commands print it: UTC to the second, or "-"."""
    return "-" if at is None else time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(at))


@contextmanager
def _deciding(store: Store, key: bytes, tid: str) -> Iterator[tuple[StoreTx, float]]:
    """:func:`acqhost.domain.terminals.deciding`, its refusals user errors."""
    try:
        with terminals.deciding(store, key, tid) as (tx, now):
            yield tx, now
    except ValueError as e:  # RebindError, or a store constraint (one open request)
        raise CliError(str(e)) from None


@contextmanager
def _reading(cfg: Config, keys: HostKeys) -> Iterator[tuple[StoreTx, float]]:
    """:func:`acqhost.domain.terminals.reading` on the configured store."""
    with opened(cfg) as store, terminals.reading(store, keys.data_key) as (tx, now):
        yield tx, now


def _request(tx: StoreTx, rf: str) -> RebindRequest:
    request = tx.request(rf)
    if request is None:
        raise CliError(f"no rebind request {rf}")
    return request


def _tid_of(store: Store, rf: str) -> str:
    with store.transaction(write=False) as tx:
        return _request(tx, rf).tid


def _version_text(v: AccountVersion | None) -> str:
    if v is None:
        return "none"
    return (
        f"v{v.version} {v.account_masked}, holder {v.holder}, bank {v.bank_code}, "
        f"branch {v.branch or '-'}, effective from {_utc(v.effective_from)} ({v.state})"
    )


def _named(value: str, option: str) -> str:
    require(bool(value.strip()), f"{option} must not be empty")
    return value.strip()


def cmd_rebind_list(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    keys = host_keys(cfg)
    state = args.state.upper() if args.state else None
    require(state in (None, *ACCOUNT_STATES), f"--state must be one of {', '.join(ACCOUNT_STATES)}")
    rows = []
    with _reading(cfg, keys) as (tx, _):
        versions: dict[str, list[AccountVersion]] = {}
        for r in tx.requests(state=state, tid=args.tid):
            if r.tid not in versions:
                versions[r.tid] = tx.versions(r.tid)
            v = versions[r.tid][r.version - 1]
            times = (_utc(r.submitted_at), r.decided_by or "-", _utc(r.decided_at))
            ef = _utc(terminals.effective_from_of(r, v))
            rows.append(
                (r.rf, r.tid, r.kind, r.state, f"v{r.version}", v.account_masked, *times, ef)
            )
    header = ("RF", "TID", "KIND", "STATE", "VER", "NEW ACCOUNT", "SUBMITTED", "DECIDED BY")
    table((*header, "DECIDED AT", "EFFECTIVE FROM"), rows)
    return 0


def cmd_rebind_show(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    keys = host_keys(cfg)
    with _reading(cfg, keys) as (tx, now):
        r = _request(tx, args.rf)
        terminal = tx.terminal(r.tid)
        versions = tx.versions(r.tid)
    proposed = versions[r.version - 1]
    by = "" if r.kind == "rollback" else f", {r.source} card number, operator {r.operator_id}"
    merchant = f" (merchant {terminal.mid}, {terminal.merchant_name})" if terminal else ""
    lines = [
        ("RF", r.rf),
        ("terminal", r.tid + merchant),
        ("kind", r.kind + (f" to version {r.restores}" if r.restores else "") + by),
        ("state", r.state),
        ("submitted", _utc(r.submitted_at)),
        ("decided", f"by {r.decided_by} at {_utc(r.decided_at)}" if r.decided_at else "-"),
        ("note", r.note or "-"),
        ("effective from", _utc(terminals.effective_from_of(r, proposed))),
        ("proposed", _version_text(proposed)),
        ("in force now", _version_text(accounts.in_force(versions, now))),
    ]
    for name, value in lines:
        print(f"{name + ':':<15} {value}")
    return 0


def cmd_rebind_approve(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    keys = host_keys(cfg)
    by = _named(args.by, "--by")
    with opened(cfg) as store:
        tid = _tid_of(store, args.rf)
        with _deciding(store, keys.data_key, tid) as (tx, now):
            ef = rebind.approve(tx, keys.data_key, args.rf, by, cfg.rebind, now)
            version = _request(tx, args.rf).version
    print(
        f"{args.rf} approved by {by}: version {version} of {tid} takes effect at {_utc(ef)} "
        f"(EF {accounts.ef_text(ef)})"
    )
    return 0


def cmd_rebind_reject(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    keys = host_keys(cfg)
    by, reason = _named(args.by, "--by"), _named(args.reason, "--reason")
    with opened(cfg) as store:
        tid = _tid_of(store, args.rf)
        with _deciding(store, keys.data_key, tid) as (tx, now):
            rebind.reject(tx, keys.data_key, args.rf, by, reason, now)
    print(f"{args.rf} of {tid} rejected by {by}: {reason}")
    return 0


def cmd_account_show(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    keys = host_keys(cfg)
    with _reading(cfg, keys) as (tx, now):
        terminal = tx.terminal(args.tid)
        if terminal is None:
            raise CliError(f"no terminal {args.tid}")
        versions = tx.versions(args.tid)
        requests = {r.version: r for r in tx.requests(tid=args.tid)}
    print(f"terminal {terminal.tid} (merchant {terminal.mid}, {terminal.merchant_name})")
    print(f"in force now: {_version_text(accounts.in_force(versions, now))}")
    changes = [v for v in versions if v.state in OPEN_REBIND_STATES]
    for v in changes:
        r = requests.get(v.version)
        print(f"open change:  {r.rf if r else '-'} {r.kind if r else ''} {_version_text(v)}")
    if not changes:
        print("open change:  none")
    return 0


def cmd_account_history(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    keys = host_keys(cfg)
    with _reading(cfg, keys) as (tx, now):
        versions = tx.versions(args.tid)
    require(bool(versions), f"no terminal {args.tid}")
    current = accounts.in_force(versions, now)
    states = terminals.shown_states(versions, now)
    rows = [
        (
            f"{v.version}{'*' if v is current else ''}",
            state,
            v.account_masked,
            v.holder,
            v.bank_code,
            _utc(v.effective_from),
            v.created_by,
            v.reason,
        )
        for v, state in zip(versions, states, strict=True)
    ]
    header = ("VER", "STATE", "ACCOUNT", "HOLDER", "BANK", "EFFECTIVE FROM", "CREATED BY")
    table((*header, "REASON"), rows)
    print("* in force now")
    return 0


def cmd_account_rollback(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    keys = host_keys(cfg)
    by = _named(args.by, "--by")
    with opened(cfg) as store, _deciding(store, keys.data_key, args.tid) as (tx, now):
        r = rebind.rollback(
            tx, keys.data_key, args.tid, args.to_version, by, args.reason or "", now
        )
        v = tx.versions(args.tid)[r.version - 1]
    print(
        f"{args.tid}: version {args.to_version} restored as version {r.version} "
        f"({v.account_masked} at {v.bank_code}), RF {r.rf}, effective from "
        f"{_utc(v.effective_from)} (EF {accounts.ef_text(v.effective_from)})"
    )
    return 0


def cmd_rebind_voucher(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    keys = host_keys(cfg)
    out = Path(args.out) if args.out else None
    require(out is None or not out.exists(), f"{out} exists: refusing to overwrite it")
    with _reading(cfg, keys) as (tx, now):
        request = _request(tx, args.rf)
        terminal = tx.terminal(request.tid)
        versions = tx.versions(request.tid)
    assert terminal is not None  # a request's terminal is never deleted
    doc = voucher.make_voucher(request, terminal, versions, signing_seed=keys.signing_seed, now=now)
    text = json.dumps(doc, ensure_ascii=False, indent=2) + "\n"
    if out is None:
        sys.stdout.write(text)
        return 0
    write_new(out, text, 0o644)
    print(f"voucher of {request.rf} ({request.state}) written to {out}")
    return 0


def cmd_voucher_verify(args: argparse.Namespace) -> int:
    if args.host_public_key:
        try:
            expected = bytes.fromhex(args.host_public_key)
        except ValueError:
            expected = b""
        require(len(expected) == 32, "--host-public-key must be 64 hex digits")
    else:
        expected = host_keys(config_from(args)).verify_key
    try:
        raw = Path(args.file).read_bytes()
    except OSError as e:
        raise CliError(f"cannot read {args.file}: {e.strerror}") from None
    try:
        doc = voucher.verify_voucher(voucher.load_voucher(raw.decode("utf-8")), expected)
    except ValueError as e:  # VoucherError, or not UTF-8 at all
        why = e if isinstance(e, voucher.VoucherError) else "not a JSON document"
        print(f"voucher INVALID: {why}")
        return 1
    print(f"voucher OK: {voucher.summary(doc)}")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    keys = host_keys(cfg)
    with opened(cfg) as store:
        count, problems = audit.verify(store, keys.data_key)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{count} entries; audit log BROKEN: {len(problems)} problem(s)")
        return 1
    print(f"{count} entries; audit log OK")
    return 0


def cmd_operator_unlock(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    keys = host_keys(cfg)
    by = _named(args.by, "--by")
    tid, operator_id = args.tid, args.operator_id
    with opened(cfg) as store, _deciding(store, keys.data_key, tid) as (tx, now):
        operator = terminals.unlock_operator(
            tx,
            keys.data_key,
            tid,
            operator_id,
            by=by,
            max_failures=cfg.rebind.operator_max_failures,
            now=now,
        )
    if operator is None:
        raise CliError(f"no operator {operator_id} on terminal {tid}")
    if not operator.failures:
        print(f"operator {operator_id} of {tid} has no wrong passwords to clear")
    else:
        print(
            f"operator {operator_id} of {tid} unlocked by {by} "
            f"({operator.failures} consecutive wrong passwords cleared)"
        )
    return 0


# -- parsers -------------------------------------------------------------------------------------


def add_account_commands(sub: Subparsers) -> None:
    """The acquirer's commands for settlement-account changes."""

    def by(p: argparse.ArgumentParser) -> None:
        p.add_argument("--by", required=True, metavar="NAME", help="who (kept in the audit log)")

    g = add_group(sub, "rebind", "review settlement-account change requests")
    p = add_command(g, "list", "list change requests, oldest first", cmd_rebind_list)
    p.add_argument("--state", help="only requests in this state (e.g. PENDING_REVIEW)")
    p.add_argument("--tid", help="only this terminal's requests")
    p = add_command(g, "show", "everything about one request", cmd_rebind_show)
    p.add_argument("rf", metavar="RF", type=str.upper, help="rebind reference (16 characters)")
    p = add_command(g, "approve", "approve a pending request", cmd_rebind_approve)
    p.add_argument("rf", metavar="RF", type=str.upper)
    by(p)
    p = add_command(g, "reject", "reject a pending request, saying why", cmd_rebind_reject)
    p.add_argument("rf", metavar="RF", type=str.upper)
    by(p)
    p.add_argument("--reason", required=True, metavar="TEXT", help="why (the merchant sees it)")
    text = "a voucher of a change signed by the host, for the merchant to keep"
    p = add_command(g, "voucher", text, cmd_rebind_voucher)
    p.add_argument("rf", metavar="RF", type=str.upper)
    p.add_argument("--out", metavar="FILE", help="write it to FILE (never overwritten)")

    g = add_group(sub, "account", "show, trace and roll back a terminal's settlement account")
    p = add_command(g, "show", "the account in force now and any open change", cmd_account_show)
    p.add_argument("tid", metavar="TID")
    p = add_command(g, "history", "every version of the account", cmd_account_history)
    p.add_argument("tid", metavar="TID")
    text = "restore an earlier version as a new version"
    p = add_command(g, "rollback", text, cmd_account_rollback)
    p.add_argument("tid", metavar="TID")
    p.add_argument("--to-version", type=int, required=True, metavar="N", help="version to restore")
    by(p)
    p.add_argument("--reason", metavar="TEXT", help="why (kept with the new version)")

    g = add_group(sub, "voucher", "check a change voucher")
    p = add_command(g, "verify", "check a voucher's signature and content", cmd_voucher_verify)
    p.add_argument("file", metavar="FILE")
    text = "the host's Ed25519 public key, hex (default: the host key file's)"
    p.add_argument("--host-public-key", metavar="HEX", help=text)

    g = add_group(sub, "audit", "check the audit log")
    add_command(g, "verify", "check the audit log's hash chain and states", cmd_audit_verify)

    g = add_group(sub, "operator", "manage terminal operators")
    text = "clear an operator's wrong-password count (after 75)"
    p = add_command(g, "unlock", text, cmd_operator_unlock)
    p.add_argument("tid", metavar="TID")
    p.add_argument("operator_id", metavar="OPERATOR_ID")
    by(p)
