"""The load tester's message builder (simulators/load/messages.py), pure: test cards, STANs and
dates, the requests of each kind, MACs, what a terminal learns from answers, and the mix."""

from __future__ import annotations

import datetime
import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

from acqhost.domain.cards import luhn_ok
from acqhost.wire import specs
from acqhost.wire.tlv import decode_tlv, encode_tlv
from simulators.load.messages import (
    KINDS,
    TEST_BIN,
    LoadTerminal,
    Mix,
    RebindData,
    answer_key,
    clock_start,
    load_spec,
    luhn_digit,
)
from simulators.load.messages import test_pan as card_for  # not a test
from simulators.load.template import offsets

KEY_FILE = {"tid": "LD000001", "mid": "LOADMERCHANT001", "terminal_signing_key": "22" * 32}
NOON = datetime.datetime(2026, 3, 14, 12, 30, 45, tzinfo=datetime.UTC)
REBIND = RebindData("OP01", "load-test-1", "Load Test", "102100099996")


def terminal(stan_start: int = 0) -> LoadTerminal:
    t = LoadTerminal(KEY_FILE, stan_start=stan_start, clock=lambda: NOON)
    t.static_session()
    return t


def decode(t: LoadTerminal, frame: bytes) -> dict[str, str]:
    length = int.from_bytes(frame[:2], "big")
    assert length == len(frame) - 2  # len2 framing
    return t.codec.decode(frame[2:])


# -- test cards ------------------------------------------------------------------------------


def test_test_cards_are_luhn_valid_stable_and_in_the_test_range() -> None:
    pans = [card_for(f"seed/{i}") for i in range(200)]
    assert all(luhn_ok(p) and p.startswith(TEST_BIN) and len(p) == 19 for p in pans)
    assert len(set(pans)) == 200 and pans == [card_for(f"seed/{i}") for i in range(200)]
    short = card_for("seed/0", 16)
    assert len(short) == 16 and luhn_ok(short)
    for body in ("7992739871", "62220212345678901", "0"):
        assert luhn_ok(body + luhn_digit(body))


# -- numbers ---------------------------------------------------------------------------------


def test_stans_follow_on_and_dates_are_the_clocks() -> None:
    t = terminal(stan_start=41)
    first, second = t.next_numbers(), t.next_numbers()
    assert (first["11"], second["11"]) == ("000042", "000043")
    assert first["7"] == "0314123045" and first["12"] == "123045" and first["13"] == "0314"


def test_after_999999_stans_the_local_date_moves_on_a_day() -> None:
    t = terminal(stan_start=999_997)
    numbers = [t.next_numbers() for _ in range(3)]
    assert [n["11"] for n in numbers] == ["999998", "999999", "000001"]
    assert [n["13"] for n in numbers] == ["0314", "0314", "0315"]  # no (41, 11, 13) twice


def test_without_a_stan_start_the_numbers_start_from_the_clock() -> None:
    """A thousand numbers a second since midnight UTC: a run of d seconds that sends at most
    1,000 requests a second per terminal ends before the next run's start."""
    midnight = 1_765_000_000 - 1_765_000_000 % 86_400
    assert clock_start(midnight) == 0
    assert clock_start(midnight + 12.3456) == 12_345
    assert clock_start(midnight + 86_400) == 0  # a new day, a new field 13
    first, later = clock_start(midnight + 100), clock_start(midnight + 160)
    assert first + 60 * 1_000 <= later
    before = clock_start()
    seq = int(LoadTerminal(KEY_FILE, mac=False).next_numbers()["11"]) - 1  # STAN = seq + 1
    after = clock_start()
    low, high = before % 999_999, after % 999_999
    assert low <= seq <= high or high < low  # (or a wrap, or midnight, came between)


# -- requests --------------------------------------------------------------------------------


def test_a_sale_request_decodes_to_its_fields_with_a_mac() -> None:
    t = terminal()
    fields = t.sale_fields(12_345)
    request = t.request(fields, "sale")
    assert request.mti == "0200" and request.kind == "sale" and request.fields == fields
    assert request.key == ("LD000001", fields["11"])
    decoded = decode(t, request.frame)
    for key in ("2", "3", "4", "11", "14", "22", "25", "41", "42", "49"):
        assert decoded[key] == fields[key]
    assert decoded["4"] == "000000012345" and luhn_ok(decoded["2"])
    assert "48" not in fields
    message = request.frame[2:]
    assert (
        message[-8:]
        == hashlib.blake2b(
            message[:-8], key=t.keys.tx_mac if t.keys else b"", digest_size=8
        ).digest()
    )


def test_sales_take_the_terminals_test_cards_in_turn() -> None:
    t = terminal()
    pans = [t.sale_fields(100)["2"] for _ in range(40)]
    assert len(set(pans)) == 16 and set(pans) == set(t.pans)
    assert all(luhn_ok(p) and p.startswith(TEST_BIN) for p in pans)


def test_a_test_sale_carries_ts_1() -> None:
    fields = terminal().sale_fields(50, test=True)
    assert decode_tlv(fields["48"]) == {"TS": "1"} and fields["4"] == "000000000050"


def test_a_request_with_a_reference_is_matched_by_it_too() -> None:
    fields = {"t": "0200", "41": "LD000001", "11": "000007", "37": "000000000123"}
    assert answer_key(fields, True) == ("LD000001", "000007", "000000000123")
    assert answer_key(fields, False) == ("LD000001", "000007")
    assert answer_key({}, False) == ("", "")


def test_a_reversal_names_its_original() -> None:
    t = terminal()
    sale = t.sale_fields(777)
    reversal = t.reversal_fields(sale)
    assert reversal["t"] == "0400" and reversal["4"] == sale["4"] and reversal["3"] == "000000"
    assert reversal["90"] == "0200" + sale["11"] + sale["7"] + "0" * 22
    assert len(reversal["90"]) == 42 and reversal["11"] != sale["11"]
    decode(t, t.request(reversal, "reversal").frame)


def test_inquiry_batch_close_echo_and_rebind_requests() -> None:
    t = terminal()
    assert t.inquiry_fields()["91"] == "5"
    close = t.batch_close_fields()
    assert close["t"] == "0500" and decode_tlv(close["48"]) == {
        "BN": "000000",
        "CT": "0",
        "AM": "0",
    }
    assert t.echo_fields()["70"] == "301"
    account = card_for("acct")
    rebind = t.rebind_fields("OP01", "load-test-1", "Load Test", "102100099996", account)
    elements = decode_tlv(rebind["48"])
    assert rebind["91"] == "2" and rebind["101"] == "SETTLEACCT"
    assert elements["OP"] == "OP01" and elements["AC"] == account and elements["BK"]
    assert "load-test-1" not in elements["PW"]  # encrypted under the session key
    for fields in (t.inquiry_fields(), close, t.echo_fields(), rebind):
        decode(t, t.request(fields, "x").frame)


def test_a_terminal_without_keys_cannot_mac() -> None:
    t = LoadTerminal(KEY_FILE)
    with pytest.raises(ValueError, match="not signed on"):
        t.request(t.sale_fields(100), "sale")
    plain = LoadTerminal.plain("TERM0001", "MERCHANT0000001")
    request = plain.request(plain.sale_fields(100), "sale")
    assert "64" not in decode(plain, request.frame)
    with pytest.raises(ValueError, match="no signing key"):
        plain.signon()


def test_an_answers_mac_is_checked_under_the_receive_key() -> None:
    t = terminal()
    assert t.keys is not None
    answer = {"t": "0210", "11": "000001", "39": "00", "41": "LD000001", "64": "0" * 16}
    body = t.codec.encode(answer)[:-8]
    good = body + hashlib.blake2b(body, key=t.keys.rx_mac, digest_size=8).digest()
    assert t.answer_ok(good, t.codec.decode(good))
    bad = good[:-1] + bytes([good[-1] ^ 1])
    assert not t.answer_ok(bad, t.codec.decode(bad))
    unmacd = t.codec.encode({k: v for k, v in answer.items() if k != "64"})
    assert t.answer_ok(unmacd, t.codec.decode(unmacd))


def test_a_static_session_is_the_same_for_the_same_key() -> None:
    a, b = terminal(), terminal()
    assert a.keys is not None and b.keys is not None and a.keys.tx_mac == b.keys.tx_mac


# -- learning from answers -------------------------------------------------------------------


def test_a_terminal_learns_its_sales_and_batch_from_answers() -> None:
    t = terminal()
    sale, test_sale = t.sale_fields(1_000), t.sale_fields(50, test=True)
    t.learn(sale, {"39": "00"})
    t.learn(test_sale, {"39": "00"})
    t.learn(t.sale_fields(2_000), {"39": "05"})
    assert list(t.approved) == [sale]  # test sales are not reversed; refused ones not kept
    assert (t.batch_count, t.batch_amount) == (2, 1_050)
    t.learn(t.reversal_fields(sale), {"39": "00"})
    assert (t.batch_count, t.batch_amount) == (1, 50)
    close = t.batch_close_fields()
    t.learn(close, {"39": "12", "48": encode_tlv({"NB": "000004"})})
    assert t.batch == 4
    t.learn(close, {"39": "95", "48": encode_tlv({"BN": "000004", "CT": "3", "AM": "700"})})
    assert (t.batch, t.batch_count, t.batch_amount) == (4, 3, 700)
    t.learn(close, {"39": "00", "48": encode_tlv({"NB": "000005"})})
    assert (t.batch, t.batch_count, t.batch_amount) == (5, 0, 0)
    t.learn(close, {"39": "95", "48": "not tlv"})  # an unreadable 48 teaches nothing
    assert (t.batch, t.batch_count, t.batch_amount) == (5, 0, 0)


def test_a_closed_batch_s_sales_are_no_longer_reversible() -> None:
    t = terminal()
    t.learn(t.sale_fields(1_000), {"39": "00"})
    t.learn(t.batch_close_fields(), {"39": "00", "48": encode_tlv({"NB": "000002"})})
    assert not t.approved


# -- the mix ---------------------------------------------------------------------------------


def test_a_mix_draws_kinds_by_weight_reproducibly() -> None:
    weights = {"sale": 70, "inquiry": 20, "batch_close": 10}
    a = Mix(weights, seed=1).kinds_iter()
    draws = [next(a) for _ in range(5_000)]
    b = Mix(weights, seed=1).kinds_iter()
    assert draws == [next(b) for _ in range(5_000)]
    seen = Counter(draws)
    assert set(seen) == set(weights)
    for kind, weight in weights.items():
        assert seen[kind] / 5_000 == pytest.approx(weight / 100, abs=0.03)


@pytest.mark.parametrize(
    ("weights", "rebind", "words"),
    [
        ({"refund": 1}, None, "unknown kind 'refund'"),
        ({"sale": 0}, None, "at least one above 0"),
        ({"sale": -1, "inquiry": 2}, None, "0 or more"),
        ({"rebind": 1}, None, "operator, password, holder and bank"),
    ],
)
def test_a_bad_mix_is_refused(weights: dict[str, int], rebind: None, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        Mix(weights, rebind=rebind)


def test_a_reversal_with_nothing_to_reverse_is_a_sale() -> None:
    t = terminal()
    mix = Mix({"reversal": 1}, amounts=(500, 500), seed=3)
    first = mix.build(t, "reversal")
    assert (first.mti, first.kind) == ("0200", "sale") and first.fields is not None
    assert first.fields["4"] == "000000000500"
    t.learn(first.fields, {"39": "00"})
    second = mix.build(t, "reversal")
    assert (second.mti, second.kind) == ("0400", "reversal") and second.fields is not None
    assert second.fields["90"][4:10] == first.fields["11"]
    assert not t.approved  # reversed once only


def test_every_kind_builds_a_request() -> None:
    t = terminal()
    mix = Mix(dict.fromkeys(KINDS, 1), amounts=(100, 200), test_amount=77, rebind=REBIND, seed=2)
    mtis = {}
    for kind in KINDS:
        request = mix.build(t, kind)
        assert request.fields is not None
        decode(t, request.frame)
        mtis[kind] = request.mti
        if kind == "test_sale":
            assert request.fields["4"] == "000000000077" and "48" in request.fields
        if kind == "sale":
            assert 100 <= int(request.fields["4"]) <= 200
        if kind == "rebind":
            account = decode_tlv(request.fields["48"])["AC"]
            assert luhn_ok(account) and account.startswith(TEST_BIN)
    assert mtis == {"sale": "0200", "test_sale": "0200", "reversal": "0200", "inquiry": "0300",
                    "rebind": "0300", "batch_close": "0500"}  # fmt: skip


# -- the sale template ------------------------------------------------------------------------


@pytest.mark.parametrize("mac", [True, False])
def test_a_templated_sale_is_byte_for_byte_the_encoded_one(mac: bool) -> None:
    spliced = LoadTerminal(KEY_FILE, mac=mac, stan_start=5)
    encoded = LoadTerminal(KEY_FILE, mac=mac, stan_start=5)
    if mac:
        spliced.static_session()
        encoded.static_session()
    for amount in (1, 250, 99_999, 123_456_789):
        fast = spliced.sale_request(amount, keep_fields=True)
        assert fast.fields is not None
        slow = encoded.request(dict(fast.fields), "sale")
        assert fast.frame == slow.frame
        assert fast.key == slow.key and fast.mti == "0200"
    assert spliced.sale_request(7, keep_fields=False).fields is None


def test_offsets_refuse_a_layout_whose_length_prefix_would_change() -> None:
    terminal = LoadTerminal(KEY_FILE, mac=False)
    fields = terminal.sale_fields(100)
    fields["2"] = "622202123456789012"  # 18 digits: the other value keeps the length ...
    assert offsets(terminal.codec.encode, fields, ("2", "4")) is not None
    assert offsets(terminal.codec.encode, fields, ("3",)) is not None
    # ... but a field whose bytes are not its text (the binary MAC) has no offset
    fields["64"] = "0" * 16
    assert offsets(terminal.codec.encode, fields, ("64",)) is None


def test_a_spec_may_come_from_a_json_file(tmp_path: Path) -> None:
    path = tmp_path / "dialect.json"
    path.write_text(json.dumps(specs.load("acq87")))
    terminal = LoadTerminal(KEY_FILE, mac=False, spec=str(path))
    assert terminal.spec == specs.load("acq87")
    bad = tmp_path / "bad.json"
    bad.write_text('{"t": 1}')
    for name, says in ((str(bad), "bad.json"), (str(tmp_path / "none.json"), "none.json")):
        with pytest.raises(ValueError, match=says):
            load_spec(name)
