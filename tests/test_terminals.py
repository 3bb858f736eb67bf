"""acqhost.domain.terminals on a real SQLite store: what a registration takes and records, the
transactions of the acquirer's reads and decisions, unlocking an operator; and the layering the
command line and the domain keep (no SQL in cli/, no private names across modules)."""

from __future__ import annotations

import ast
import dataclasses
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from acqhost.config import RebindPolicy
from acqhost.domain import accounts, audit, cards, crypto, rebind, terminals
from acqhost.store import open_store
from acqhost.store.base import AccountVersion, Store

ROOT = Path(__file__).resolve().parents[1]
ACCOUNT = "6222020200112233446"  # Luhn-valid
NEW = "6217001234567890122"  # Luhn-valid
POLICY = RebindPolicy(review="manual", cooling_off=0, min_interval=0)
REG = terminals.Registration(
    tid="TERM0001",
    mid="MERCHANT0000001",
    merchant_name="Test Shop",
    holder=" 张三 ",
    account="6222 0202 0011 2233 446",
    bank_code="102100099996",
    branch="Xidan",
    sale_limit=100_000,
    test_limit=100,
    operator_id="01",
    operator_password="s3cret",
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(str(tmp_path / "acqhost.db"))
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def key() -> bytes:
    return crypto.HostKeys.generate().data_key


def registered(store: Store, key: bytes, **changes: object) -> terminals.Registered:
    reg = dataclasses.replace(REG, **changes)  # type: ignore[arg-type]
    return terminals.register(store, key, reg, by="tester", now=time.time(), fast_hash=True)


def due_change(store: Store, key: bytes, tid: str = "TERM0001") -> int:
    """A change approved early enough to be in force now, its activation not recorded."""
    sub = rebind.Submission(
        tid=tid, operator_id="01", stan="000001", transmission="0101120000", holder="张三",
        bank_code="102100099996", branch="", account=NEW, source="typed",
    )  # fmt: skip
    now = time.time()
    with store.transaction(tid) as tx:
        outcome = rebind.submit(tx, key, sub, password_ok=True, policy=POLICY, now=now)
        assert outcome.request is not None
        past = now - accounts.DECISION_LEAD - 2
        rebind.approve(tx, key, outcome.request.rf, "tester", POLICY, past)
        return outcome.request.version


# -- registration --------------------------------------------------------------------------------


def test_a_registration_is_recorded_as_given_trimmed() -> None:
    reg = terminals.check_registration(REG)
    assert (reg.account, reg.holder) == (ACCOUNT, "张三")
    assert ACCOUNT not in repr(reg) and "s3cret" not in repr(reg)  # no account, no password


@pytest.mark.parametrize(
    ("change", "name", "problem"),
    [
        ({"tid": "TERM001"}, "tid", "must be 8 printable ASCII characters"),
        ({"tid": "TERM000\n"}, "tid", "must be 8 printable ASCII characters"),
        ({"mid": "MERCHANT000000\u00e9"}, "mid", "must be 15 printable ASCII characters"),
        ({"account": "6222020200112233447"}, "account", "pass the Luhn check"),
        ({"account": "12345"}, "account", "12 to 19 digits"),
        ({"bank_code": "10210009999X"}, "bank_code", "12-digit CNAPS code"),
        ({"holder": "  "}, "holder", "must not be empty"),
        ({"sale_limit": 0}, "sale_limit", "must be positive"),
        ({"sale_limit": 10**12}, "sale_limit", "at most 999999999999"),
        ({"operator_password": None}, "operator_id", "go together"),
    ],
)
def test_a_registration_names_the_input_it_cannot_use(
    change: dict[str, object], name: str, problem: str
) -> None:
    with pytest.raises(terminals.RegistrationError) as exc:
        terminals.check_registration(dataclasses.replace(REG, **change))  # type: ignore[arg-type]
    assert exc.value.name == name and problem in exc.value.problem


def test_register_records_the_terminal_its_account_operator_and_audit_entry(
    store: Store, key: bytes
) -> None:
    done = registered(store, key)
    assert store.get_terminal("TERM0001") == done.terminal
    assert done.terminal.identity_public_key == crypto.verify_key_of(done.signing_seed)
    (v1,) = store.account_history("TERM0001")
    assert (v1.version, v1.state, v1.holder, v1.created_by) == (1, "ACTIVE", "张三", "tester")
    assert v1.account_masked == cards.mask_account(ACCOUNT) == done.account.account_masked
    assert crypto.unseal(key, v1.sealed_account) == ACCOUNT.encode()
    with store.transaction(write=False) as tx:
        operator = tx.operator("TERM0001", "01")
        (entry,) = tx.audit_entries()
    assert operator is not None and crypto.verify_password(operator.password_hash, "s3cret")
    assert (entry.action, entry.subject, entry.actor) == ("terminal.registered", "v1", "tester")
    assert audit.verify(store, key) == (1, [])


def test_a_taken_terminal_id_registers_nothing(store: Store, key: bytes) -> None:
    registered(store, key)
    with pytest.raises(ValueError):
        registered(store, key, mid="MERCHANT0000002", operator_id=None, operator_password=None)
    assert [t.mid for t in store.list_terminals()] == ["MERCHANT0000001"]
    assert audit.verify(store, key) == (1, [])


def test_a_terminal_without_an_operator(store: Store, key: bytes) -> None:
    registered(store, key, operator_id=None, operator_password=None)
    with store.transaction(write=False) as tx:
        assert tx.operator("TERM0001", "01") is None


# -- the acquirer's transactions -----------------------------------------------------------------


def test_record_due_activates_what_is_due_and_only_reads_otherwise(
    store: Store, key: bytes
) -> None:
    registered(store, key)
    assert terminals.record_due(store, key, time.time()) == []
    version = due_change(store, key)
    assert [v.version for v in terminals.record_due(store, key, time.time())] == [version]
    assert [v.state for v in store.account_history("TERM0001")] == ["ACTIVE", "ACTIVE"]
    assert terminals.record_due(store, key, time.time()) == []
    assert audit.verify(store, key)[1] == []


def test_reading_shows_due_activations_recorded(store: Store, key: bytes) -> None:
    registered(store, key)
    due_change(store, key)
    with terminals.reading(store, key, clock=lambda: 1e10) as (tx, now):
        assert now == 1e10
        assert [v.state for v in tx.versions("TERM0001")] == ["ACTIVE", "ACTIVE"]


def test_deciding_records_due_activations_and_a_refusal_undoes_them(
    store: Store, key: bytes
) -> None:
    registered(store, key)
    due_change(store, key)
    with pytest.raises(rebind.RebindError), terminals.deciding(store, key, "TERM0001") as (tx, now):
        assert tx.versions("TERM0001")[1].state == "ACTIVE"
        rebind.rollback(tx, key, "TERM0001", 2, "carol", "", now)  # already in force
    assert store.account_history("TERM0001")[1].state == "APPROVED"
    with terminals.deciding(store, key, "TERM0001") as (tx, now):
        rebind.rollback(tx, key, "TERM0001", 1, "carol", "", now)
    assert [v.state for v in store.account_history("TERM0001")] == ["ACTIVE", "ACTIVE", "APPROVED"]


def test_unlock_operator_clears_the_count_and_says_whether_it_was_locked(
    store: Store, key: bytes
) -> None:
    registered(store, key)
    with store.transaction("TERM0001") as tx:
        tx.set_operator_failures("TERM0001", "01", 3)
    with store.transaction("TERM0001") as tx:
        before = terminals.unlock_operator(
            tx, key, "TERM0001", "01", by="carol", max_failures=3, now=time.time()
        )
        again = terminals.unlock_operator(
            tx, key, "TERM0001", "01", by="carol", max_failures=3, now=time.time()
        )
        missing = terminals.unlock_operator(
            tx, key, "TERM0001", "99", by="carol", max_failures=3, now=time.time()
        )
        entries = tx.audit_entries()
        operator = tx.operator("TERM0001", "01")
    assert before is not None and before.failures == 3
    assert again is not None and again.failures == 0 and missing is None
    assert operator is not None and operator.failures == 0
    assert [(e.action, e.detail) for e in entries[1:]] == [
        ("operator.unlocked", '{"failures":3,"was_locked":true}')
    ]


# -- how versions are shown ----------------------------------------------------------------------


def version(number: int, state: str, effective_from: float) -> AccountVersion:
    return AccountVersion(
        tid="TERM0001", version=number, sealed_account=b"", account_hash=b"",
        account_masked="6222***********3446", holder="张三", bank_code="102100099996",
        branch="", state=state, effective_from=effective_from, created_by="tester",
        reason="", created_at=effective_from,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("stored", "shown"),
    [
        ([("ACTIVE", 10)], ["ACTIVE"]),
        ([("VERIFIED", 10), ("VERIFIED", 50)], [terminals.SUPERSEDED, "VERIFIED"]),
        ([("ACTIVE", 10), ("ACTIVE", 50)], [terminals.SUPERSEDED, "ACTIVE"]),
        # Approved, in force since 50 though no host recorded it yet.
        ([("VERIFIED", 10), ("APPROVED", 50)], [terminals.SUPERSEDED, "ACTIVE"]),
        # Approved, not yet in force: the old version still is.
        ([("VERIFIED", 10), ("APPROVED", 150)], ["VERIFIED", "APPROVED"]),
        ([("ACTIVE", 10), ("PENDING_REVIEW", 150)], ["ACTIVE", "PENDING_REVIEW"]),
        ([("ACTIVE", 10), ("REJECTED", 150), ("CANCELLED", 90)],
         ["ACTIVE", "REJECTED", "CANCELLED"]),
        # A rollback in force: what it undid is ROLLED_BACK, what it restored superseded.
        ([("VERIFIED", 10), ("ROLLED_BACK", 50), ("ACTIVE", 80)],
         [terminals.SUPERSEDED, "ROLLED_BACK", "ACTIVE"]),
        ([("VERIFIED", 10), ("VERIFIED", 50), ("APPROVED", 150)],
         [terminals.SUPERSEDED, "VERIFIED", "APPROVED"]),
    ],
)  # fmt: skip
def test_a_version_replaced_by_a_newer_one_in_force_is_shown_superseded(
    stored: list[tuple[str, float]], shown: list[str]
) -> None:
    versions = [version(n, state, ef) for n, (state, ef) in enumerate(stored, 1)]
    assert terminals.shown_states(versions, now=100.0) == shown
    assert [v.state for v in versions] == [state for state, _ in stored]  # as stored


# -- layering ------------------------------------------------------------------------------------


SQL = re.compile(
    r"\b(SELECT\b.*\bFROM|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|CREATE\s+TABLE)\b",
    re.IGNORECASE | re.DOTALL,
)


def _modules(folder: str) -> dict[Path, ast.Module]:
    return {p: ast.parse(p.read_text()) for p in sorted((ROOT / folder).glob("*.py"))}


def _imports(tree: ast.Module) -> Iterator[tuple[str, list[str]]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [alias.name for alias in node.names]


def test_the_cli_imports_no_private_names_holds_no_sql_and_stays_small() -> None:
    for path, tree in _modules("acqhost/cli").items():
        for module, names in _imports(tree):
            if module.startswith("acqhost"):
                assert not [n for n in names if n.startswith("_")], (path.name, module, names)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not SQL.search(node.value), (path.name, node.value)
            if isinstance(node, ast.Attribute):
                assert node.attr not in ("execute", "executemany", "cursor"), path.name
        assert len(path.read_text().splitlines()) < 500, path.name


def test_the_domain_imports_no_io_and_no_upper_layer() -> None:
    forbidden = ("acqhost.cli", "acqhost.runtime", "acqhost.host", "acqhost.log")
    forbidden += ("anyio", "trio", "asyncio", "socket", "sqlite3", "psycopg")
    for path, tree in _modules("acqhost/domain").items():
        for module, _ in _imports(tree):
            root = [f for f in forbidden if module == f or module.startswith(f + ".")]
            assert not root, (path.name, module)
