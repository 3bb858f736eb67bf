"""The audit log: an append-only, hash-chained record of every settlement-account state change.

Each entry says who (``actor``), when (``at``), what (``action``, the terminal, the subject: an
RF or a version) and the details (``detail``: canonical JSON with the state before and after,
masked account numbers only, the reason). Its ``digest`` is the keyed BLAKE2b of the previous
entry's digest and this entry's content (:func:`acqhost.domain.crypto.audit_digest`, keyed with the
host data key), and an entry that creates a version (a registration, a submission, a
rollback) carries that version's :func:`fingerprint`. :func:`verify` finds:

- an entry edited, inserted, or removed from anywhere but the end (the chain breaks);
- removed entries at the end that recorded a state the store still shows otherwise, and
  versions the log recorded that the store no longer has;
- a settlement-account version whose account, holder, bank or branch was edited (against its
  fingerprint), or whose sealed account number no longer matches its hash and masked form.

What it cannot find: the newest entries removed together with the changes they recorded (a
database restored from an older backup looks the same); keeping the latest digest elsewhere
would. The store refuses updates and deletes as well. Appends happen inside the transaction
that makes the change, so a change and its entry are durable together or not at all.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from typing import Any

from acqhost.domain import cards, crypto
from acqhost.store.base import AccountVersion, AuditEntry, Store, StoreTx

__all__ = ("GENESIS", "append", "content", "fingerprint", "verify")

# The "previous digest" of the first entry.
GENESIS = bytes(32)


def content(
    seq: int, at: float, actor: str, action: str, tid: str, subject: str, detail: str
) -> bytes:
    """The bytes an entry's digest covers: its fields as a canonical JSON array."""
    fields = [seq, repr(float(at)), actor, action, tid, subject, detail]
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def fingerprint(data_key: bytes, v: AccountVersion) -> str:
    """What an audit entry records of a version it creates: a keyed digest (hex) of the
    terminal, the version number and everything that says where the money goes."""
    fields = [v.tid, v.version, v.account_hash.hex(), v.holder, v.bank_code, v.branch]
    body = json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return crypto.audit_digest(data_key, b"version", body)[:16].hex()


def append(
    tx: StoreTx,
    data_key: bytes,
    *,
    at: float,
    actor: str,
    action: str,
    tid: str,
    subject: str,
    detail: Mapping[str, Any],
) -> AuditEntry:
    """Append one entry in the caller's transaction and return it."""
    last = tx.last_audit()
    seq = 1 if last is None else last.seq + 1
    prev = GENESIS if last is None else last.digest
    text = json.dumps(dict(detail), ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    digest = crypto.audit_digest(
        data_key, prev, content(seq, at, actor, action, tid, subject, text)
    )
    entry = AuditEntry(seq, at, actor, action, tid, subject, text, prev, digest)
    tx.insert_audit(entry)
    return entry


def verify(store: Store, data_key: bytes) -> tuple[int, list[str]]:
    """Check the whole log: (number of entries, problems found). No problems means the chain
    is whole and the settlement-account states in the store are the ones it last recorded."""
    problems: list[str] = []
    with store.transaction(write=False) as tx:
        entries = tx.audit_entries()
        prev = GENESIS
        recorded: dict[tuple[str, int], str] = {}
        fingerprints: dict[tuple[str, int], str] = {}
        for expected_seq, e in enumerate(entries, start=1):
            if e.seq != expected_seq:
                problems.append(f"entry {e.seq}: expected entry {expected_seq} here (a gap)")
            if not hmac.compare_digest(e.prev_digest, prev):
                problems.append(f"entry {e.seq}: does not follow the entry before it")
            body = content(e.seq, e.at, e.actor, e.action, e.tid, e.subject, e.detail)
            if not hmac.compare_digest(
                crypto.audit_digest(data_key, e.prev_digest, body), e.digest
            ):
                problems.append(f"entry {e.seq}: content does not match its digest (edited)")
            prev = e.digest
            try:
                detail = json.loads(e.detail)
                version = (
                    int(detail["version"])
                    if isinstance(detail, dict) and "version" in detail
                    else None
                )
            except (ValueError, TypeError):
                problems.append(f"entry {e.seq}: detail is not what the host writes (edited)")
                continue
            if version is None:
                continue
            if "after" in detail:
                recorded[(e.tid, version)] = str(detail["after"])
            if "fingerprint" in detail:
                fingerprints[(e.tid, version)] = str(detail["fingerprint"])
        tids = {t.tid for t in store.list_terminals()} | {tid for tid, _ in recorded}
        for tid in sorted(tids):
            versions = tx.versions(tid)
            for v in versions:
                problems.extend(_check_version(data_key, v, recorded, fingerprints))
            for (recorded_tid, number), state in recorded.items():
                if recorded_tid == tid and number > len(versions):
                    problems.append(
                        f"{tid} version {number}: recorded {state} in the audit log but not in "
                        "the store (deleted)"
                    )
    return len(entries), problems


def _check_version(
    data_key: bytes,
    v: AccountVersion,
    recorded: dict[tuple[str, int], str],
    fingerprints: dict[tuple[str, int], str],
) -> list[str]:
    problems = []
    where = f"{v.tid} version {v.version}"
    # Version 1 is registered ACTIVE; every other version enters the log when made.
    expected = recorded.get((v.tid, v.version), "ACTIVE" if v.version == 1 else None)
    if expected != v.state:
        problems.append(
            f"{where}: state {v.state} but the audit log last recorded "
            f"{expected or 'nothing'} (entries removed or state edited)"
        )
    known = fingerprints.get((v.tid, v.version))
    if known is not None and not hmac.compare_digest(
        known.encode(), fingerprint(data_key, v).encode()
    ):
        problems.append(f"{where}: account, holder, bank or branch differ from when it was made")
    try:
        account = crypto.unseal(data_key, v.sealed_account).decode("ascii")
        sound = hmac.compare_digest(crypto.account_hash(data_key, account), v.account_hash)
        sound = sound and cards.mask_account(account) == v.account_masked
    except (crypto.CryptoError, UnicodeDecodeError):
        sound = False
    if not sound:
        problems.append(f"{where}: the sealed account number does not match its hash or mask")
    return problems
