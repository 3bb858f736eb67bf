"""The acquirer's commands for settlement-account changes: review (list, show, approve, reject),
account show, history and rollback, signed vouchers, the audit log's check and operator unlock,
on SQLite and PostgreSQL, and a CLI approval reaching a running host without a restart."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from acqhost.cli import main as cli
from acqhost.config import RebindPolicy
from acqhost.domain import accounts, cards, crypto, rebind, voucher
from acqhost.store import open_store
from acqhost.store.base import SaleRecord, Store
from tests.hostkit import ACCOUNT, BANK, HOLDER, add_terminal, make_host, running

NEW = "6217001234567890122"  # Luhn-valid, the account the terminals change to
POLICY = RebindPolicy(review="manual", cooling_off=0, min_interval=0)


@dataclass
class Host:
    """A store with terminals TERM0001 and TERM0002 registered through the CLI."""

    db: str
    keys: crypto.HostKeys
    args: list[str]  # --db (and --keys) for every command

    @contextmanager
    def store(self) -> Iterator[Store]:
        store = open_store(self.db)
        try:
            yield store
        finally:
            store.close()


@pytest.fixture
def host(tmp_path: Path) -> Host:
    setup = make_host(tmp_path)
    db = setup.config.db
    return Host(db, crypto.HostKeys.load(setup.config.key_path), ["--db", db])


def run(capsys: pytest.CaptureFixture[str], host: Host, *argv: str) -> tuple[int, str, str]:
    """``acqhost argv...`` on the host's store: (status, stdout, stderr). No output of any
    command ever holds a full account number."""
    capsys.readouterr()
    status = cli([*argv, *host.args])
    out, err = capsys.readouterr()
    for number in (ACCOUNT, NEW):
        assert number not in out + err
    return status, out, err


def refused_by_argparse(capsys: pytest.CaptureFixture[str], host: Host, *argv: str) -> str:
    """A command line argparse refuses: exit status 2; its message."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli([*argv, *host.args])
    assert exc.value.code == 2
    return capsys.readouterr().err


_stans = iter(range(1, 1_000_000))


def submit(
    host: Host,
    tid: str = "TERM0001",
    account: str = NEW,
    *,
    at: float | None = None,
    password_ok: bool = True,
) -> rebind.Outcome:
    """A terminal's 0300 submit, decided as the host decides it (no host running)."""
    sub = rebind.Submission(
        tid=tid,
        operator_id="01",
        stan=f"{next(_stans):06d}",
        transmission="0101120000",
        holder=HOLDER,
        bank_code=BANK,
        branch="Xidan",
        account=account,
        source="typed",
    )
    now = time.time() if at is None else at
    with host.store() as store, store.transaction(tid) as tx:
        return rebind.submit(
            tx, host.keys.data_key, sub, password_ok=password_ok, policy=POLICY, now=now
        )


def changed(host: Host, tid: str = "TERM0001", account: str = NEW, ago: float = 0.0) -> str:
    """A change submitted now and approved as if early enough to be in force since ``ago``
    seconds (its activation not yet recorded); its RF. (Submitting earlier is not possible:
    the terminal's first version is in force from its registration only.)"""
    outcome = submit(host, tid, account)
    assert outcome.request is not None
    decided = time.time() - ago - accounts.DECISION_LEAD - 1  # EF is rounded up to a second
    with host.store() as store, store.transaction(tid) as tx:
        rebind.approve(tx, host.keys.data_key, outcome.request.rf, "tester", POLICY, decided)
    return outcome.request.rf


def pending(host: Host, tid: str = "TERM0001", account: str = NEW) -> str:
    outcome = submit(host, tid, account)
    assert outcome.code == "00" and outcome.request is not None
    return outcome.request.rf


def audit_actions(host: Host) -> list[str]:
    with host.store() as store, store.transaction(write=False) as tx:
        return [f"{e.tid} {e.action}" for e in tx.audit_entries()]


# -- review ------------------------------------------------------------------------------------


def test_list_show_approve_and_reject_with_their_refusals(
    host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    rf1, rf2 = pending(host, "TERM0001"), pending(host, "TERM0002")
    status, out, _ = run(capsys, host, "rebind", "list")
    assert status == 0
    assert rf1 in out and rf2 in out and out.count("PENDING_REVIEW") == 2
    assert cards.mask_account(NEW) in out
    only = ("--state", "pending_review", "--tid", "TERM0002")
    status, out, _ = run(capsys, host, "rebind", "list", *only)
    assert status == 0 and rf2 in out and rf1 not in out
    status, _, err = run(capsys, host, "rebind", "list", "--state", "WAITING")
    assert status == 2 and "--state must be one of" in err

    status, out, _ = run(capsys, host, "rebind", "show", rf1.lower())  # as typed from a voucher
    assert status == 0
    lines = dict(line.split(":", 1) for line in out.splitlines())
    assert lines["state"].strip() == "PENDING_REVIEW"
    assert lines["proposed"].strip().startswith(f"v2 {cards.mask_account(NEW)}, holder {HOLDER}")
    assert "branch Xidan" in lines["proposed"] and BANK in lines["proposed"]
    assert lines["in force now"].strip().startswith(f"v1 {cards.mask_account(ACCOUNT)}")
    assert "MERCHANT0000001" in lines["terminal"]

    status, out, _ = run(capsys, host, "rebind", "approve", rf1, "--by", "alice")
    assert status == 0 and "takes effect at" in out
    with host.store() as store, store.transaction(write=False) as tx:
        request = tx.request(rf1)
        assert request is not None and request.state == "APPROVED"
        assert request.decided_by == "alice" and request.decided_at is not None
        ef = tx.versions("TERM0001")[1].effective_from
    assert 0 <= ef - request.decided_at - 86400 < 1  # the cooling-off, to a whole second
    assert accounts.ef_text(ef) in out

    status, _, err = run(capsys, host, "rebind", "approve", rf1, "--by", "alice")
    assert status == 2 and "APPROVED, not PENDING_REVIEW" in err
    status, _, err = run(capsys, host, "rebind", "reject", rf1, "--by", "bob", "--reason", "x")
    assert status == 2 and "not PENDING_REVIEW" in err
    status, _, err = run(capsys, host, "rebind", "approve", "NOSUCHREQUEST000", "--by", "a")
    assert status == 2 and "no rebind request NOSUCHREQUEST000" in err
    status, _, err = run(capsys, host, "rebind", "show", "NOSUCHREQUEST000")
    assert status == 2 and "no rebind request" in err
    status, _, err = run(capsys, host, "rebind", "approve", rf2, "--by", "  ")
    assert status == 2 and "--by must not be empty" in err
    assert "--by" in refused_by_argparse(capsys, host, "rebind", "approve", rf2)
    assert "--reason" in refused_by_argparse(capsys, host, "rebind", "reject", rf2, "--by", "b")
    status, _, err = run(capsys, host, "rebind", "reject", rf2, "--by", "bob", "--reason", " ")
    assert status == 2 and "--reason must not be empty" in err

    why = "holder not verified"
    status, out, _ = run(capsys, host, "rebind", "reject", rf2, "--by", "bob", "--reason", why)
    assert status == 0 and "rejected by bob" in out
    status, out, _ = run(capsys, host, "rebind", "show", rf2)
    lines = dict(line.split(":", 1) for line in out.splitlines())
    assert lines["state"].strip() == "REJECTED" and lines["note"].strip() == "holder not verified"
    assert lines["effective from"].strip() == "-" and lines["decided"].strip().startswith("by bob")
    status, _, err = run(capsys, host, "rebind", "approve", rf2, "--by", "alice")
    assert status == 2 and "REJECTED" in err
    status, out, _ = run(capsys, host, "audit", "verify")
    assert status == 0 and "6 entries; audit log OK" in out


def test_account_show_history_and_rollback_with_its_refusals(
    host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    changed(host)  # version 2, in force from now
    status, out, _ = run(capsys, host, "account", "show", "TERM0001")
    assert status == 0
    assert f"in force now: v2 {cards.mask_account(NEW)}" in out and "(ACTIVE)" in out
    assert "open change:  none" in out
    status, out, _ = run(capsys, host, "account", "history", "TERM0001")
    assert status == 0
    rows = [line.split() for line in out.splitlines()[1:-1]]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("1", "SUPERSEDED", cards.mask_account(ACCOUNT)),  # stored ACTIVE: no longer in force
        ("2*", "ACTIVE", cards.mask_account(NEW)),
    ]
    assert "operator 01" in out and "rebind from the terminal" in out and HOLDER in out

    argv = ("account", "rollback", "TERM0001", "--by", "carol")
    status, _, err = run(capsys, host, *argv, "--to-version", "2")
    assert status == 2 and "already the one in force" in err
    status, _, err = run(capsys, host, *argv, "--to-version", "9")
    assert status == 2 and "has no version 9" in err
    rf3 = pending(host, account=ACCOUNT)  # back to the first card, through the terminal
    status, _, err = run(capsys, host, *argv, "--to-version", "1")
    assert status == 2 and "open change (version 3, PENDING_REVIEW)" in err
    status, out, _ = run(capsys, host, "account", "show", "TERM0001")
    assert f"open change:  {rf3} rebind v3" in out
    assert run(capsys, host, "rebind", "reject", rf3, "--by", "bob", "--reason", "no")[0] == 0
    status, _, err = run(capsys, host, *argv, "--to-version", "3")
    assert status == 2 and "REJECTED: it was never in force" in err
    status, _, err = run(capsys, host, *argv[:3], "--to-version", "1", "--by", "")
    assert status == 2 and "--by must not be empty" in err
    assert "--to-version" in refused_by_argparse(capsys, host, *argv)

    status, out, _ = run(capsys, host, *argv, "--to-version", "1", "--reason", "merchant asked")
    assert status == 0 and "version 1 restored as version 4" in out
    with host.store() as store, store.transaction(write=False) as tx:
        v4 = tx.versions("TERM0001")[3]
        request = tx.latest_request("TERM0001")
    assert request is not None and request.kind == "rollback" and request.restores == 1
    assert request.rf in out and accounts.ef_text(v4.effective_from) in out
    assert v4.state == "APPROVED" and v4.created_by == "carol" and "merchant asked" in v4.reason
    assert v4.account_masked == cards.mask_account(ACCOUNT)
    status, _, err = run(capsys, host, *argv, "--to-version", "1")
    assert status == 2 and "open change (version 4, APPROVED)" in err
    status, out, _ = run(capsys, host, "account", "show", "TERM0001")
    assert f"open change:  {request.rf} rollback v4" in out

    for command in ("show", "history"):
        status, _, err = run(capsys, host, "account", command, "NOPE0000")
        assert status == 2 and "no terminal NOPE0000" in err
    status, _, err = run(capsys, host, *argv[:2], "NOPE0000", *argv[3:], "--to-version", "1")
    assert status == 2 and "no terminal NOPE0000" in err


def test_write_commands_record_due_activations_before_deciding(
    host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    changed(host, "TERM0001")  # due, but no host was running to record it
    rf = pending(host, "TERM0002")
    assert run(capsys, host, "rebind", "reject", rf, "--by", "bob", "--reason", "no")[0] == 0
    assert audit_actions(host)[-2:] == ["TERM0001 account.activated", "TERM0002 rebind.rejected"]
    with host.store() as store, store.transaction(write=False) as tx:
        assert tx.versions("TERM0001")[1].state == "ACTIVE"


# -- vouchers ----------------------------------------------------------------------------------


def test_a_voucher_is_signed_by_the_host_and_verifies(
    host: Host, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    rf = pending(host)
    assert run(capsys, host, "rebind", "approve", rf, "--by", "alice")[0] == 0
    status, out, _ = run(capsys, host, "rebind", "voucher", rf)
    assert status == 0
    doc = json.loads(out)
    with host.store() as store, store.transaction(write=False) as tx:
        ef = tx.versions("TERM0001")[1].effective_from
    expected = {
        "rf": rf,
        "tid": "TERM0001",
        "mid": "MERCHANT0000001",
        "merchant_name": "Test Shop",
        "kind": "rebind",
        "state": "APPROVED",
        "version": 2,
        "account_masked": cards.mask_account(NEW),
        "holder": HOLDER,
        "bank_code": BANK,
        "branch": "Xidan",
        "decided_by": "alice",
        "effective_from": voucher.utc_text(ef),
        "previous": {
            "version": 1,
            "account_masked": cards.mask_account(ACCOUNT),
            "bank_code": BANK,
        },
        "host_public_key": host.keys.verify_key.hex(),
    }
    assert {k: doc[k] for k in expected} == expected
    for name in ("submitted_at", "decided_at", "issued_at"):
        assert doc[name].endswith("Z") and len(doc[name]) == 20
    fields = {k: v for k, v in doc.items() if k != "signature"}
    body = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert crypto.verify(host.keys.verify_key, body.encode(), bytes.fromhex(doc["signature"]))

    path = tmp_path / "voucher.json"
    status, out, _ = run(capsys, host, "rebind", "voucher", rf, "--out", str(path))
    assert status == 0 and str(path) in out
    written = path.read_text()
    assert NEW not in written and ACCOUNT not in written
    status, _, err = run(capsys, host, "rebind", "voucher", rf, "--out", str(path))
    assert status == 2 and "refusing to overwrite" in err and path.read_text() == written
    status, out, _ = run(capsys, host, "voucher", "verify", str(path))
    assert status == 0 and out.startswith(f"voucher OK: {rf} rebind of terminal TERM0001")
    assert cards.mask_account(NEW) in out and "APPROVED" in out
    key = ("--host-public-key", host.keys.verify_key.hex())
    status, out, _ = run(capsys, host, "voucher", "verify", str(path), *key)
    assert status == 0 and out.startswith("voucher OK")
    status, _, err = run(capsys, host, "rebind", "voucher", "NOSUCHREQUEST000")
    assert status == 2 and "no rebind request" in err


def _invalid(capsys: pytest.CaptureFixture[str], host: Host, path: Path, doc: object) -> str:
    path.write_text(json.dumps(doc, ensure_ascii=False))
    status, out, _ = run(capsys, host, "voucher", "verify", str(path))
    assert status == 1 and out.startswith("voucher INVALID: ")
    return out


def test_an_edited_voucher_or_another_hosts_voucher_is_invalid(
    host: Host, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    rf = pending(host)
    status, out, _ = run(capsys, host, "rebind", "voucher", rf)
    genuine = json.loads(out)
    path = tmp_path / "v.json"
    edits = {"state": "VERIFIED", "account_masked": "6217***********9999", "holder": "李四"}
    for name, value in [*edits.items(), ("previous", None), ("version", 3)]:
        assert "a field was changed" in _invalid(capsys, host, path, {**genuine, name: value})
    extra = {**genuine, "note": "approved by phone"}
    assert "a field was changed" in _invalid(capsys, host, path, extra)

    with host.store() as store, store.transaction(write=False) as tx:
        request, terminal = tx.request(rf), tx.terminal("TERM0001")
        versions = tx.versions("TERM0001")
    assert request is not None and terminal is not None
    other = crypto.new_signing_key()
    forged = voucher.make_voucher(request, terminal, versions, signing_seed=other, now=time.time())
    assert "signed for host key" in _invalid(capsys, host, path, forged)
    forged["host_public_key"] = host.keys.verify_key.hex()  # claims the real host's key
    assert "a field was changed" in _invalid(capsys, host, path, forged)
    unsigned = {k: v for k, v in genuine.items() if k != "signature"}
    assert "no signature" in _invalid(capsys, host, path, unsigned)
    assert "not a JSON object" in _invalid(capsys, host, path, [genuine])
    other_kind = {**genuine, "voucher": "something else"}
    assert "not a settlement account change voucher" in _invalid(capsys, host, path, other_kind)
    path.write_text("{not json")
    status, out, _ = run(capsys, host, "voucher", "verify", str(path))
    assert status == 1 and out == "voucher INVALID: not a JSON document\n"
    # A field given twice: a reader sees the first, JSON parsers keep the last (genuine) one.
    text = json.dumps(genuine, ensure_ascii=False)
    path.write_text('{"account_masked": "6217***********9999", ' + text[1:])
    status, out, _ = run(capsys, host, "voucher", "verify", str(path))
    assert status == 1 and "'account_masked' appears twice" in out

    path.write_text(json.dumps(genuine))
    other_key = crypto.verify_key_of(other).hex()
    status, out, _ = run(
        capsys, host, "voucher", "verify", str(path), "--host-public-key", other_key
    )
    assert status == 1 and "signed for host key" in out
    status, _, err = run(capsys, host, "voucher", "verify", str(path), "--host-public-key", "xy")
    assert status == 2 and "64 hex digits" in err
    status, _, err = run(capsys, host, "voucher", "verify", str(tmp_path / "missing.json"))
    assert status == 2 and "cannot read" in err


def test_a_rollback_voucher_names_the_version_it_undid(
    host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    changed(host, ago=10)  # version 2
    at = time.time() - 5  # late enough for version 2, early enough for the rollback's EF
    with host.store() as store, store.transaction("TERM0001") as tx:
        accounts.activate_due(tx, host.keys.data_key, at)
        back = rebind.rollback(tx, host.keys.data_key, "TERM0001", 1, "carol", "fraud", at)
    status, out, _ = run(capsys, host, "rebind", "voucher", back.rf)
    assert status == 0
    doc = json.loads(out)
    assert doc["kind"] == "rollback" and doc["restores"] == 1
    assert doc["version"] == 3 and doc["state"] == "ACTIVE"
    assert doc["account_masked"] == cards.mask_account(ACCOUNT)
    assert doc["previous"]["version"] == 2  # rolled back now, but in force until version 3
    assert doc["previous"]["account_masked"] == cards.mask_account(NEW)
    assert history(capsys, host) == [("1", "SUPERSEDED"), ("2", "ROLLED_BACK"), ("3*", "ACTIVE")]


def history(capsys: pytest.CaptureFixture[str], host: Host) -> list[tuple[str, str]]:
    """``acqhost account history TERM0001``: each version's number (* in force) and state."""
    status, out, _ = run(capsys, host, "account", "history", "TERM0001")
    assert status == 0 and out.endswith("* in force now\n")
    return [(line.split()[0], line.split()[1]) for line in out.splitlines()[1:-1]]


def stored_states(host: Host) -> list[str]:
    with host.store() as store:
        return [v.state for v in store.account_history("TERM0001")]


def test_history_shows_a_verified_version_superseded_once_a_change_or_rollback_is_in_force(
    host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    with host.store() as store:  # a test sale on version 1, as the demo makes: VERIFIED
        test_sale = SaleRecord("TERM0001", "MERCHANT0000001", "000001", "0101", "120000",
                               "0101120000", 100, "156", "622202******0128", "123456", True,
                               1, 1, time.time())  # fmt: skip
        store.record_sales([test_sale])
        with store.transaction("TERM0001") as tx:
            assert accounts.verify(tx, host.keys.data_key, "TERM0001", 1, time.time())
    assert history(capsys, host) == [("1*", "VERIFIED")]

    rf = changed(host, ago=10)  # version 2, in force for 10 s
    assert history(capsys, host) == [("1", "SUPERSEDED"), ("2*", "ACTIVE")]
    assert stored_states(host) == ["VERIFIED", "ACTIVE"]  # the store keeps its states
    status, out, _ = run(capsys, host, "rebind", "show", rf)
    lines = dict(line.split(":", 1) for line in out.splitlines())
    assert status == 0 and lines["in force now"].strip().startswith("v2 ")

    at = time.time() - 5  # a rollback to version 1, in force for about 3 s
    with host.store() as store, store.transaction("TERM0001") as tx:
        rebind.rollback(tx, host.keys.data_key, "TERM0001", 1, "carol", "fraud", at)
    assert history(capsys, host) == [("1", "SUPERSEDED"), ("2", "ROLLED_BACK"), ("3*", "ACTIVE")]
    assert stored_states(host) == ["VERIFIED", "ROLLED_BACK", "ACTIVE"]
    status, out, _ = run(capsys, host, "audit", "verify")
    assert status == 0 and "audit log OK" in out


# -- the audit log -----------------------------------------------------------------------------


def test_audit_verify_detects_an_entry_edited_around_the_trigger(
    host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    rf = pending(host)
    assert run(capsys, host, "rebind", "approve", rf, "--by", "alice")[0] == 0
    status, out, _ = run(capsys, host, "audit", "verify")
    assert status == 0 and out == "4 entries; audit log OK\n"
    raw = sqlite3.connect(host.db)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            raw.execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = 1")
        raw.execute("DROP TRIGGER audit_log_no_update")
        edit = "detail = replace(detail, '102100099996', '103100000026')"
        raw.execute(f"UPDATE audit_log SET {edit} WHERE seq = 1")
        raw.commit()
    finally:
        raw.close()
    status, out, _ = run(capsys, host, "audit", "verify")
    assert status == 1
    assert "entry 1: content does not match its digest (edited)" in out
    assert "4 entries; audit log BROKEN: 1 problem(s)" in out


def test_audit_verify_detects_a_deleted_last_entry(
    host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    rf = pending(host)
    assert run(capsys, host, "rebind", "approve", rf, "--by", "alice")[0] == 0
    raw = sqlite3.connect(host.db)
    try:
        raw.execute("DROP TRIGGER audit_log_no_delete")
        raw.execute("DELETE FROM audit_log WHERE seq = (SELECT max(seq) FROM audit_log)")
        raw.commit()
    finally:
        raw.close()
    status, out, _ = run(capsys, host, "audit", "verify")
    assert status == 1
    assert (
        "TERM0001 version 2: state APPROVED but the audit log last recorded PENDING_REVIEW" in out
    )


# -- operators ---------------------------------------------------------------------------------


def test_operator_unlock_after_a_lockout(host: Host, capsys: pytest.CaptureFixture[str]) -> None:
    codes = [submit(host, password_ok=False).code for _ in range(POLICY.operator_max_failures)]
    assert codes == ["55"] * (POLICY.operator_max_failures - 1) + ["75"]
    assert submit(host).code == "75"  # the right password no longer helps
    status, out, _ = run(capsys, host, "operator", "unlock", "TERM0001", "01", "--by", "carol")
    assert status == 0 and "unlocked by carol (5 consecutive wrong passwords cleared)" in out
    with host.store() as store, store.transaction(write=False) as tx:
        operator = tx.operator("TERM0001", "01")
        entry = tx.audit_entries()[-1]
    assert operator is not None and operator.failures == 0
    assert (entry.action, entry.actor, entry.subject) == ("operator.unlocked", "carol", "01")
    assert json.loads(entry.detail) == {"failures": 5, "was_locked": True}
    assert submit(host).code == "00"

    status, out, _ = run(capsys, host, "operator", "unlock", "TERM0001", "01", "--by", "carol")
    assert status == 0 and "no wrong passwords to clear" in out
    status, _, err = run(capsys, host, "operator", "unlock", "TERM0001", "99", "--by", "carol")
    assert status == 2 and "no operator 99 on terminal TERM0001" in err
    status, _, err = run(capsys, host, "operator", "unlock", "NOPE0000", "01", "--by", "carol")
    assert status == 2 and "no operator 01 on terminal NOPE0000" in err
    assert "--by" in refused_by_argparse(capsys, host, "operator", "unlock", "TERM0001", "01")
    status, out, _ = run(capsys, host, "audit", "verify")
    assert status == 0 and "audit log OK" in out


COMMANDS = {
    "rebind": "list show approve reject voucher",
    "account": "show history rollback",
    "voucher": "verify",
    "audit": "verify",
    "operator": "unlock",
}


@pytest.mark.parametrize(
    "argv",
    [
        [group, *action]
        for group, actions in COMMANDS.items()
        for action in [[], *([a] for a in actions.split())]
    ],
)
def test_help_everywhere(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli([*argv, "--help"])
    assert exc.value.code == 0 and "usage: acqhost" in capsys.readouterr().out


# -- PostgreSQL --------------------------------------------------------------------------------


def test_review_voucher_unlock_and_audit_on_postgresql(
    pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import psycopg

    keys = str(tmp_path / "host.keys")
    assert cli(["init", "--db", pg_url, "--keys", keys]) == 0
    add_terminal(tmp_path, pg_url, "TERM0001", "MERCHANT0000001", "--keys", keys)
    host = Host(pg_url, crypto.HostKeys.load(keys), ["--db", pg_url, "--keys", keys])

    changed(host)  # version 2 in force; the next command records its activation
    status, out, _ = run(capsys, host, "account", "show", "TERM0001")
    assert status == 0 and "in force now: v2" in out and "(ACTIVE)" in out
    rf = pending(host, account=ACCOUNT)
    status, out, _ = run(capsys, host, "rebind", "list", "--state", "PENDING_REVIEW")
    assert status == 0 and rf in out and out.count("\n") == 2
    rollback = ("account", "rollback", "TERM0001", "--to-version", "1", "--by", "carol")
    status, _, err = run(capsys, host, *rollback)
    assert status == 2 and "open change" in err
    status, out, _ = run(capsys, host, "rebind", "approve", rf, "--by", "alice")
    assert status == 0 and "version 3 of TERM0001" in out
    status, _, err = run(capsys, host, "rebind", "reject", rf, "--by", "bob", "--reason", "late")
    assert status == 2 and "not PENDING_REVIEW" in err
    path = tmp_path / "voucher.json"
    assert run(capsys, host, "rebind", "voucher", rf, "--out", str(path))[0] == 0
    status, out, _ = run(capsys, host, "voucher", "verify", str(path))
    assert status == 0 and "APPROVED" in out and "before: v2" in out
    status, out, _ = run(capsys, host, "account", "history", "TERM0001")
    assert status == 0 and "2*" in out and "APPROVED" in out
    assert [submit(host, password_ok=False).code for _ in range(5)][-1] == "75"
    status, out, _ = run(capsys, host, "operator", "unlock", "TERM0001", "01", "--by", "carol")
    assert status == 0 and "unlocked by carol" in out
    status, out, _ = run(capsys, host, "audit", "verify")
    assert status == 0 and "8 entries; audit log OK" in out

    with psycopg.connect(pg_url, autocommit=True) as raw:
        raw.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update")
        raw.execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = 4")
    status, out, _ = run(capsys, host, "audit", "verify")
    assert status == 1 and "entry 4: content does not match its digest (edited)" in out


# -- a running host ----------------------------------------------------------------------------


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.anyio
async def test_a_cli_approval_reaches_the_running_host_without_a_restart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup = make_host(tmp_path)
    setup.config = dataclasses.replace(setup.config, rebind=POLICY)
    toml = tmp_path / "acqhost.toml"  # the same policy for the CLI
    toml.write_text('[rebind]\nreview = "manual"\ncooling_off = 0\nmin_interval = 0\n')
    args = ["--config", str(toml), "--db", setup.config.db]
    async with running(setup):
        client = setup.client()
        await client.connect()
        try:
            assert (await client.sign_on()).rc == "00"
            submitted = await client.rebind_submit(
                operator_id="01", password="0000", holder=HOLDER, bank_code=BANK, account=NEW
            )
            assert submitted.rc == "00" and submitted.tlv["ST"] == "PENDING_REVIEW"
            rf = submitted.tlv["RF"]
            argv = ["rebind", "approve", rf, "--by", "alice", *args]
            assert await anyio.to_thread.run_sync(cli, argv) == 0
            assert (await client.sale(500)).tlv["SV"] == "1"  # until EF: the old account
            await anyio.sleep(accounts.DECISION_LEAD + 1.2)  # EF: rounded up to a second
            sale = await client.sale(100, test=True)
            assert sale.rc == "00"
            assert sale.tlv == {"SA": cards.mask_account(NEW), "SV": "2", "BK": BANK}
            for _ in range(40):  # the test sale's proof is recorded just after its answer
                state = (await client.rebind_inquire(rf)).tlv["ST"]
                if state == "VERIFIED":
                    break
                await anyio.sleep(0.05)
            assert state == "VERIFIED"
        finally:
            await client.close()
    out = capsys.readouterr().out
    assert "approved by alice" in out and NEW not in out and ACCOUNT not in out
