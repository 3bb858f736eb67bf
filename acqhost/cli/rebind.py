"""The ``acqhost`` commands of the acquirer's side of settlement-account changes (PROTOCOL.md
5.3): list, show, approve and reject requests; show an account, its history, roll it back;
signed vouchers and their check; the audit log's check; unlocking a terminal operator.

``acqhost.cli`` builds the parser and wires these in. Each command opens the store, works in one
transaction and closes it, so it may run while host processes serve: they see a decision within
``CACHE_SECONDS``, before it takes effect (``acqhost.domain.rebind.DECISION_LEAD``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from acqhost.cli import CliError, _check, _config, _host_keys, _table, _write_new
from acqhost.config import Config
from acqhost.domain import audit, rebind, voucher
from acqhost.domain.crypto import HostKeys
from acqhost.store import open_store
from acqhost.store.base import (
    ACCOUNT_STATES,
    OPEN_REBIND_STATES,
    AccountVersion,
    RebindRequest,
    Store,
    StoreTx,
)

__all__ = (
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
def _opened(cfg: Config) -> Iterator[Store]:
    try:
        store = open_store(cfg.db)
    except ValueError as e:
        raise CliError(str(e)) from None
    try:
        yield store
    finally:
        store.close()


def _record_due(store: Store, key: bytes, now: float) -> None:
    """Record the activations that are due (as a running host does every second), so that a
    read command shows the states as they are even when no host runs."""
    with store.transaction(write=False) as tx:
        if not tx.due_versions(now):
            return
    with store.transaction() as tx:
        rebind.activate_due(tx, key, now)


@contextmanager
def _reading(cfg: Config, keys: HostKeys) -> Iterator[tuple[StoreTx, float]]:
    """A read transaction on the configured store, and the time it reads at; due activations
    are recorded first, so what a command shows is current even when no host runs."""
    now = time.time()
    with _opened(cfg) as store:
        _record_due(store, keys.data_key, now)
        with store.transaction(write=False) as tx:
            yield tx, now


@contextmanager
def _deciding(store: Store, key: bytes, tid: str) -> Iterator[tuple[StoreTx, float]]:
    """The write transaction of an acquirer's decision about ``tid``, and the time of the
    decision: read once the transaction holds its lock, so that waiting for the lock can never
    eat into the lead between a decision and its effective-from. Due activations are recorded
    first, so that when a host was down at an effective-from, that activation is on record
    before anything else is decided. A refusal rolls back the whole transaction (those
    activations too: the running host or the next command records them)."""
    try:
        with store.transaction(tid) as tx:
            now = time.time()
            rebind.activate_due(tx, key, now)
            yield tx, now
    except ValueError as e:  # RebindError, or a store constraint (one open request)
        raise CliError(str(e)) from None


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
    _check(bool(value.strip()), f"{option} must not be empty")
    return value.strip()


def _effective(request: RebindRequest, version: AccountVersion) -> float | None:
    """A request's effective-from, or None for one that will never take effect."""
    return None if request.state in rebind.NEVER_EFFECTIVE else version.effective_from


def cmd_rebind_list(args: argparse.Namespace) -> int:
    cfg = _config(args)
    keys = _host_keys(cfg)
    state = args.state.upper() if args.state else None
    _check(state in (None, *ACCOUNT_STATES), f"--state must be one of {', '.join(ACCOUNT_STATES)}")
    rows = []
    with _reading(cfg, keys) as (tx, _):
        versions: dict[str, list[AccountVersion]] = {}
        for r in tx.requests(state=state, tid=args.tid):
            if r.tid not in versions:
                versions[r.tid] = tx.versions(r.tid)
            v = versions[r.tid][r.version - 1]
            times = (_utc(r.submitted_at), r.decided_by or "-", _utc(r.decided_at))
            ef = _utc(_effective(r, v))
            rows.append(
                (r.rf, r.tid, r.kind, r.state, f"v{r.version}", v.account_masked, *times, ef)
            )
    header = ("RF", "TID", "KIND", "STATE", "VER", "NEW ACCOUNT", "SUBMITTED", "DECIDED BY")
    _table((*header, "DECIDED AT", "EFFECTIVE FROM"), rows)
    return 0


def cmd_rebind_show(args: argparse.Namespace) -> int:
    cfg = _config(args)
    keys = _host_keys(cfg)
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
        ("effective from", _utc(_effective(r, proposed))),
        ("proposed", _version_text(proposed)),
        ("in force now", _version_text(rebind.in_force(versions, now))),
    ]
    for name, value in lines:
        print(f"{name + ':':<15} {value}")
    return 0


def cmd_rebind_approve(args: argparse.Namespace) -> int:
    cfg = _config(args)
    keys = _host_keys(cfg)
    by = _named(args.by, "--by")
    with _opened(cfg) as store:
        tid = _tid_of(store, args.rf)
        with _deciding(store, keys.data_key, tid) as (tx, now):
            ef = rebind.approve(tx, keys.data_key, args.rf, by, cfg.rebind, now)
            version = _request(tx, args.rf).version
    print(
        f"{args.rf} approved by {by}: version {version} of {tid} takes effect at {_utc(ef)} "
        f"(EF {rebind.ef_text(ef)})"
    )
    return 0


def cmd_rebind_reject(args: argparse.Namespace) -> int:
    cfg = _config(args)
    keys = _host_keys(cfg)
    by, reason = _named(args.by, "--by"), _named(args.reason, "--reason")
    with _opened(cfg) as store:
        tid = _tid_of(store, args.rf)
        with _deciding(store, keys.data_key, tid) as (tx, now):
            rebind.reject(tx, keys.data_key, args.rf, by, reason, now)
    print(f"{args.rf} of {tid} rejected by {by}: {reason}")
    return 0


def cmd_account_show(args: argparse.Namespace) -> int:
    cfg = _config(args)
    keys = _host_keys(cfg)
    with _reading(cfg, keys) as (tx, now):
        terminal = tx.terminal(args.tid)
        if terminal is None:
            raise CliError(f"no terminal {args.tid}")
        versions = tx.versions(args.tid)
        requests = {r.version: r for r in tx.requests(tid=args.tid)}
    print(f"terminal {terminal.tid} (merchant {terminal.mid}, {terminal.merchant_name})")
    print(f"in force now: {_version_text(rebind.in_force(versions, now))}")
    changes = [v for v in versions if v.state in OPEN_REBIND_STATES]
    for v in changes:
        r = requests.get(v.version)
        print(f"open change:  {r.rf if r else '-'} {r.kind if r else ''} {_version_text(v)}")
    if not changes:
        print("open change:  none")
    return 0


def cmd_account_history(args: argparse.Namespace) -> int:
    cfg = _config(args)
    keys = _host_keys(cfg)
    with _reading(cfg, keys) as (tx, now):
        versions = tx.versions(args.tid)
    _check(bool(versions), f"no terminal {args.tid}")
    current = rebind.in_force(versions, now)
    rows = [
        (
            f"{v.version}{'*' if v is current else ''}",
            v.state,
            v.account_masked,
            v.holder,
            v.bank_code,
            _utc(v.effective_from),
            v.created_by,
            v.reason,
        )
        for v in versions
    ]
    header = ("VER", "STATE", "ACCOUNT", "HOLDER", "BANK", "EFFECTIVE FROM", "CREATED BY")
    _table((*header, "REASON"), rows)
    print("* in force now")
    return 0


def cmd_account_rollback(args: argparse.Namespace) -> int:
    cfg = _config(args)
    keys = _host_keys(cfg)
    by = _named(args.by, "--by")
    with _opened(cfg) as store, _deciding(store, keys.data_key, args.tid) as (tx, now):
        r = rebind.rollback(
            tx, keys.data_key, args.tid, args.to_version, by, args.reason or "", now
        )
        v = tx.versions(args.tid)[r.version - 1]
    print(
        f"{args.tid}: version {args.to_version} restored as version {r.version} "
        f"({v.account_masked} at {v.bank_code}), RF {r.rf}, effective from "
        f"{_utc(v.effective_from)} (EF {rebind.ef_text(v.effective_from)})"
    )
    return 0


def cmd_rebind_voucher(args: argparse.Namespace) -> int:
    cfg = _config(args)
    keys = _host_keys(cfg)
    out = Path(args.out) if args.out else None
    _check(out is None or not out.exists(), f"{out} exists: refusing to overwrite it")
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
    _write_new(out, text, 0o644)
    print(f"voucher of {request.rf} ({request.state}) written to {out}")
    return 0


def cmd_voucher_verify(args: argparse.Namespace) -> int:
    if args.host_public_key:
        try:
            expected = bytes.fromhex(args.host_public_key)
        except ValueError:
            expected = b""
        _check(len(expected) == 32, "--host-public-key must be 64 hex digits")
    else:
        expected = _host_keys(_config(args)).verify_key
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
    cfg = _config(args)
    keys = _host_keys(cfg)
    with _opened(cfg) as store:
        count, problems = audit.verify(store, keys.data_key)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{count} entries; audit log BROKEN: {len(problems)} problem(s)")
        return 1
    print(f"{count} entries; audit log OK")
    return 0


def cmd_operator_unlock(args: argparse.Namespace) -> int:
    cfg = _config(args)
    keys = _host_keys(cfg)
    by = _named(args.by, "--by")
    tid, operator_id = args.tid, args.operator_id
    with _opened(cfg) as store, _deciding(store, keys.data_key, tid) as (tx, now):
        operator = tx.operator(tid, operator_id)
        if operator is None:
            raise CliError(f"no operator {operator_id} on terminal {tid}")
        if operator.failures:
            tx.set_operator_failures(tid, operator_id, 0)
            locked = operator.failures >= cfg.rebind.operator_max_failures
            audit.append(
                tx,
                keys.data_key,
                at=now,
                actor=by,
                action="operator.unlocked",
                tid=tid,
                subject=operator_id,
                detail={"failures": operator.failures, "was_locked": locked},
            )
    if not operator.failures:
        print(f"operator {operator_id} of {tid} has no wrong passwords to clear")
    else:
        print(
            f"operator {operator_id} of {tid} unlocked by {by} "
            f"({operator.failures} consecutive wrong passwords cleared)"
        )
    return 0
