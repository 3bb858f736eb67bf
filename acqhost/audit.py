"""The audit log: an append-only, hash-chained record of every settlement-account state change.

Each entry says who (``actor``), when (``at``), what (``action``, the terminal, the subject: an
RF or a version) and the details (``detail``: canonical JSON with the state before and after,
masked account numbers only, the reason). Its ``digest`` is the keyed BLAKE2b of the previous
entry's digest and this entry's content (:func:`acqhost.crypto.audit_digest`, keyed with the
host data key), so :func:`verify` finds any entry that was edited, removed from the middle or
inserted; an entry removed from the end is found because the states the log last recorded no
longer match the states in the store. The store refuses updates and deletes as well.

Appends happen inside the transaction that makes the change, so a change and its entry are
durable together or not at all.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from acqhost import crypto
from acqhost.store.base import AuditEntry, Store, StoreTx

__all__ = ("GENESIS", "append", "content", "verify")

# The "previous digest" of the first entry.
GENESIS = bytes(32)


def content(
    seq: int, at: float, actor: str, action: str, tid: str, subject: str, detail: str
) -> bytes:
    """The bytes an entry's digest covers: its fields as a canonical JSON array."""
    fields = [seq, repr(float(at)), actor, action, tid, subject, detail]
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


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
        for expected_seq, e in enumerate(entries, start=1):
            if e.seq != expected_seq:
                problems.append(f"entry {e.seq}: expected entry {expected_seq} here (a gap)")
            if e.prev_digest != prev:
                problems.append(f"entry {e.seq}: does not follow the entry before it")
            body = content(e.seq, e.at, e.actor, e.action, e.tid, e.subject, e.detail)
            if crypto.audit_digest(data_key, e.prev_digest, body) != e.digest:
                problems.append(f"entry {e.seq}: content does not match its digest (edited)")
            prev = e.digest
            try:
                detail = json.loads(e.detail)
            except ValueError:
                problems.append(f"entry {e.seq}: detail is not JSON")
                continue
            if isinstance(detail, dict) and "version" in detail and "after" in detail:
                recorded[(e.tid, int(detail["version"]))] = str(detail["after"])
        tids = {t.tid for t in store.list_terminals()} | {tid for tid, _ in recorded}
        for tid in sorted(tids):
            for v in tx.versions(tid):
                # Version 1 is registered ACTIVE; every other version enters the log when made.
                expected = recorded.get((tid, v.version), "ACTIVE" if v.version == 1 else None)
                if expected != v.state:
                    problems.append(
                        f"{tid} version {v.version}: state {v.state} but the audit log "
                        f"last recorded {expected or 'nothing'} (entries removed or state edited)"
                    )
    return len(entries), problems
