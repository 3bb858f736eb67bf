"""Settlement updates to the banks as the domain queues them (acqhost.domain.advices), on both
backends: registration and activation queue their 0320 in their own transaction, a batch close
its 0520s; the fields are PROTOCOL.md 6's and open only under the data key; SG signs and
verifies."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from acqhost.config import RebindPolicy
from acqhost.domain import accounts, advices, crypto, rebind, terminals
from acqhost.domain.advices import Advice
from acqhost.store import SQLiteStore, Store, StoredAdvice
from acqhost.store.postgres import PostgresStore
from acqhost.wire.tlv import decode_tlv, encode_tlv

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
KEYS = crypto.HostKeys.generate()
KEY = KEYS.data_key
ACCOUNT = "6222020200112233446"  # Luhn-valid
NEW = "6217001234567890122"  # Luhn-valid
AUTO = RebindPolicy(review="auto", cooling_off=100.0, min_interval=0.0)
REG = terminals.Registration(
    tid="TERM0001",
    mid="MERCHANT0000001",
    merchant_name="Test Shop",
    holder="张三",
    account=ACCOUNT,
    bank_code="102100099996",
    branch="Xidan",
    sale_limit=100_000,
    test_limit=100,
    operator_id="01",
    operator_password="s3cret",
)


def open_backend(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if kind == "sqlite":
        return SQLiteStore(tmp_path / "a.db")
    return PostgresStore(request.getfixturevalue("pg_url"))


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with closing(open_backend(request.param, request, tmp_path)) as opened:
        yield opened


def register(store: Store, tid: str = "TERM0001") -> None:
    reg = dataclasses.replace(REG, tid=tid)
    terminals.register(store, KEY, reg, by="tester", now=T0, fast_hash=True)


def opened(store: Store, tid: str | None = None) -> list[Advice]:
    return [advices.open_advice(KEY, a) for a in store.advices(tid)]


def change(store: Store, now: float, account: str = NEW, tid: str = "TERM0001") -> str:
    """A 0300 submit, approved at once (review auto), effective AUTO.cooling_off later: its RF."""
    sub = rebind.Submission(
        tid=tid, operator_id="01", stan="000001", transmission="1114221320", holder="张三",
        bank_code="103100000026", branch="", account=account, source="typed",
    )  # fmt: skip
    with store.transaction(tid) as tx:
        out = rebind.submit(tx, KEY, sub, password_ok=True, policy=AUTO, now=now)
    assert out.code == "00" and out.request is not None
    return out.request.rf


def activate(store: Store, now: float) -> list[int]:
    with store.transaction() as tx:
        return [v.version for v in accounts.activate_due(tx, KEY, now)]


# -- 0320: registration and activation ----------------------------------------------------------


def test_a_registration_queues_the_0320_of_version_1(store: Store) -> None:
    register(store)
    (advice,) = opened(store)
    assert (advice.tid, advice.mti, advice.bank_code) == ("TERM0001", "0320", "102100099996")
    assert advice.fields == {
        "t": "0320",
        "7": "1114221320",
        "11": advices.stan_of(advice.id),
        "37": advices.event_id(advice.id),
        "41": "TERM0001",
        "42": "MERCHANT0000001",
        "48": encode_tlv(
            {"AC": ACCOUNT, "NM": "张三", "BK": "102100099996", "SV": "1", "EF": "20231114221320"}
        ),
        "91": "2",
        "101": "SETTLEACCT",
    }
    assert len(advice.fields["37"]) == 12 and advice.fields["37"].isdigit()
    (stored,) = store.advices()
    assert (stored.state, stored.attempts, stored.next_attempt_at) == ("queued", 0, T0)


def test_a_refused_registration_queues_nothing(store: Store) -> None:
    register(store)
    with pytest.raises(ValueError, match="already exists"):
        register(store)
    assert len(store.advices()) == 1


def test_an_activation_queues_exactly_one_0320_in_its_transaction(store: Store) -> None:
    register(store)
    rf = change(store, T0 + 10)
    ef = T0 + 10 + AUTO.cooling_off
    assert len(store.advices()) == 1  # approved, not yet in force: nothing for the bank

    with pytest.raises(RuntimeError), store.transaction() as tx:
        assert [v.version for v in accounts.activate_due(tx, KEY, ef)] == [2]
        raise RuntimeError("the process dies before the commit")
    assert len(store.advices()) == 1  # neither the activation nor its advice

    assert activate(store, ef + 1) == [2]
    assert activate(store, ef + 2) == []  # once only
    first, second = opened(store)
    assert second.id > first.id and second.mti == "0320"
    assert decode_tlv(second.fields["48"]) == {
        "RF": rf,
        "AC": NEW,
        "NM": "张三",
        "BK": "103100000026",
        "SV": "2",
        "EF": accounts.ef_text(ef),
    }
    assert second.bank_code == "103100000026"  # routed to the new account's bank
    assert second.fields["7"] == "1114221511"  # when it was queued: ef + 1


def test_a_rollback_queues_the_0320_of_the_version_it_restores(store: Store) -> None:
    register(store)
    change(store, T0 + 10)
    ef = T0 + 10 + AUTO.cooling_off
    activate(store, ef)
    with store.transaction("TERM0001") as tx:
        request = rebind.rollback(tx, KEY, "TERM0001", 1, "ops", "merchant's request", ef + 10)
    assert len(store.advices()) == 2  # approved only
    assert activate(store, ef + 10 + accounts.DECISION_LEAD) == [3]
    last = opened(store)[-1]
    elements = decode_tlv(last.fields["48"])
    assert (elements["RF"], elements["AC"], elements["SV"]) == (request.rf, ACCOUNT, "3")
    assert last.bank_code == "102100099996"


def test_verification_records_a_due_activation_with_its_0320(store: Store) -> None:
    register(store)
    change(store, T0 + 10)
    ef = T0 + 10 + AUTO.cooling_off
    with store.transaction("TERM0001") as tx:
        assert not accounts.verify(tx, KEY, "TERM0001", 2, ef + 1)  # no test sale yet
    assert [a.fields["48"] for a in opened(store)][-1].endswith("SV0012EF014" + "20231114221510")


# -- 0520: a batch close's settlement advice ------------------------------------------------------


def test_a_batch_close_queues_a_0520_per_settlement_account(store: Store) -> None:
    register(store)
    with store.transaction("TERM0001") as tx:
        version = tx.versions("TERM0001")[0]
        advice = advices.queue_settlement_advice(
            tx, KEY, "TERM0001", 7, version, count=3, amount=12_345, now=T0 + 60
        )
    assert advice.mti == "0520" and advice.bank_code == "102100099996"
    assert advices.open_advice(KEY, store.advices()[-1]) == advice
    assert advice.fields == {
        "t": "0520",
        "7": "1114221420",
        "11": advices.stan_of(advice.id),
        "37": advices.event_id(advice.id),
        "41": "TERM0001",
        "42": "MERCHANT0000001",
        "48": encode_tlv(
            {
                "BN": "000007",
                "AC": ACCOUNT,
                "NM": "张三",
                "BK": "102100099996",
                "SV": "1",
                "CT": "3",
                "AM": "12345",
            }
        ),
    }


def test_a_0520_names_the_terminal_of_its_version(store: Store) -> None:
    register(store)
    register(store, "TERM0002")
    with (
        pytest.raises(ValueError, match="TERM0001's, not TERM0002's"),
        store.transaction() as tx,
    ):
        version = tx.versions("TERM0001")[0]
        advices.queue_settlement_advice(tx, KEY, "TERM0002", 1, version, 0, 0, T0)
    assert len(store.advices()) == 2  # the registrations'


# -- opening and numbering ----------------------------------------------------------------------


def test_fields_11_and_37_are_made_of_the_outbox_id() -> None:
    assert advices.event_id(42) == "000000000042"
    assert [advices.stan_of(n) for n in (1, 999_999, 1_000_000, 1_999_998)] == [
        "000001",
        "999999",
        "000001",
        "999999",
    ]


def test_an_advice_opens_only_under_the_data_key_and_on_its_own_row(store: Store) -> None:
    register(store)
    (stored,) = store.advices()
    with pytest.raises(crypto.CryptoError):
        advices.open_advice(crypto.HostKeys.generate().data_key, stored)
    for moved in (
        dataclasses.replace(stored, tid="TERM0009"),
        dataclasses.replace(stored, mti="0520"),
    ):
        with pytest.raises(crypto.CryptoError, match="do not match its row"):
            advices.open_advice(KEY, moved)


def test_a_claim_opens_what_it_takes(store: Store) -> None:
    """What the bank link does with a claim: each advice claimed, opened."""
    register(store)
    (stored,) = store.claim_advices(["102100099996"], T0 + 1, 30)
    assert advices.open_advice(KEY, stored) == opened(store)[0]
    assert store.claim_advices(["102100099996"], T0 + 2, 30) == []  # held


# -- 48 SG ----------------------------------------------------------------------------------------


def queued(store: Store) -> Advice:
    register(store)
    return opened(store)[0]


def test_a_signed_advice_verifies_with_the_host_key(store: Store) -> None:
    advice = queued(store)
    signed = advices.sign_advice(advice.fields, KEYS.signing_seed)
    elements = decode_tlv(signed["48"])
    assert list(elements)[-1] == "SG" and len(elements["SG"]) == 128
    assert signed["48"].startswith(advice.fields["48"])
    assert {k: v for k, v in signed.items() if k != "48"} == {
        k: v for k, v in advice.fields.items() if k != "48"
    }
    message = b"0320" + advice.fields["37"].encode() + advice.fields["48"].encode("utf-8")
    assert advices.signed_bytes(signed) == message == advices.signed_bytes(advice.fields)
    assert crypto.verify(KEYS.verify_key, message, bytes.fromhex(elements["SG"]))
    assert advices.verify_advice(signed, KEYS.verify_key)
    # Fields 7 and 11 are not signed: a resend may carry its own.
    assert advices.verify_advice({**signed, "7": "0101000000", "11": "000002"}, KEYS.verify_key)


def test_a_tampered_advice_fails_verification(store: Store) -> None:
    advice = queued(store)
    signed = advices.sign_advice(advice.fields, KEYS.signing_seed)
    sg = decode_tlv(signed["48"])["SG"]
    elements = decode_tlv(advice.fields["48"])
    other_account = encode_tlv({**elements, "AC": NEW})
    tampered = [
        {**signed, "48": other_account + encode_tlv({"SG": sg})},
        {**signed, "48": encode_tlv({**elements, "NM": "李四"}) + encode_tlv({"SG": sg})},
        {**signed, "37": advices.event_id(advice.id + 1)},
        {**signed, "t": "0520"},
        {**signed, "48": signed["48"] + encode_tlv({"AM": "1"})},  # unsigned, after SG
        {**signed, "48": signed["48"][:-1] + ("0" if sg[-1] != "0" else "1")},
        {**signed, "48": advice.fields["48"]},  # no SG
        {**signed, "48": "SG"},  # malformed 48
        {k: v for k, v in signed.items() if k != "37"},
    ]
    for fields in tampered:
        assert not advices.verify_advice(fields, KEYS.verify_key)
    assert not advices.verify_advice(signed, crypto.HostKeys.generate().verify_key)
    assert not advices.verify_advice(signed, b"short")


def test_an_advice_is_signed_once(store: Store) -> None:
    advice = queued(store)
    signed = advices.sign_advice(advice.fields, KEYS.signing_seed)
    with pytest.raises(ValueError, match="signed already"):
        advices.sign_advice(signed, KEYS.signing_seed)
    with pytest.raises(ValueError, match="no 37"):
        advices.sign_advice({"t": "0320", "48": ""}, KEYS.signing_seed)


def test_the_signature_counts_utf8_bytes_of_field_48() -> None:
    fields = {"t": "0520", "37": "000000000001", "48": encode_tlv({"NM": "张三丰", "AM": "1"})}
    signed = advices.sign_advice(fields, KEYS.signing_seed)
    assert signed["48"].startswith("NM009张三丰AM0011SG128")
    assert advices.verify_advice(signed, KEYS.verify_key)


def test_stored_advices_compare_by_value() -> None:
    # What a deliverer re-reads must equal what it claimed (frozen records, no identity).
    a = StoredAdvice(1, "T", "0320", "B", b"x", 0.0, "queued", 0, 0.0, "", None, "")
    assert a == dataclasses.replace(a)
