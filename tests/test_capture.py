"""Traffic files (README, "Traffic files"): the record format and its reader, card data as
tokens, ``acqhost serve --capture`` on a real host over loopback, the ``capture`` setting and
the sample traffic and scenario files."""

from __future__ import annotations

import hashlib
import json
import re
import stat
from pathlib import Path

import anyio
import pytest

from acqhost.cli import build_parser
from acqhost.config import ConfigError, load_config
from acqhost.domain.cards import luhn_ok
from acqhost.domain.traffic import (
    Tokens,
    TrafficError,
    card_runs,
    dumps,
    make_record,
    read_traffic,
    scrub,
)
from acqhost.runtime.capture import Capture
from acqhost.wire.tlv import decode_tlv, encode_tlv
from simulators.load.cli import read_scenario
from simulators.load.messages import KINDS
from simulators.load.schedule import parse_schedule
from simulators.load.thresholds import parse
from simulators.terminal import TEST_PAN, Exchange
from tests.hostkit import ACCOUNT, BANK, HOLDER, make_host, running

NEW_ACCOUNT = "6222021234567890003"  # Luhn-valid, a test settlement account
TRACK2 = f"{TEST_PAN}=30121010000000000"
TRAFFIC = Path(__file__).parent.parent / "simulators" / "traffic"
TOKEN = re.compile(r"tok:[0-9a-f]{12}")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def digit_runs(text: str) -> list[str]:
    """Every 12-19 digit run passing Luhn, as a scanner looking for card numbers finds them."""
    return [r for r in re.findall(r"[0-9]+", text) if 12 <= len(r) <= 19 and luhn_ok(r)]


assert luhn_ok(NEW_ACCOUNT) and luhn_ok(TEST_PAN)


# -- scrubbing ------------------------------------------------------------------------------------


def test_card_data_becomes_tokens_stable_within_a_capture() -> None:
    tokens = Tokens()
    fields = {
        "t": "0300", "p": "00", "2": TEST_PAN, "4": "000000001000", "35": TRACK2,
        "41": "TERM0001", "52": "00112233AABBCCDD", "64": "0011223344556677",
        "48": encode_tlv({"OP": "01", "PW": "ab" * 20, "AC": NEW_ACCOUNT, "NM": HOLDER,
                          "XX": f"ref {ACCOUNT} end"}),
        "62": f"card{TEST_PAN}x", "90": "0200" + "1" * 16 + "0" * 22,
    }  # fmt: skip
    out = scrub(fields, tokens)
    assert set(out) == {"2", "4", "35", "41", "48", "62", "90"}  # no MTI, bitmap, PIN, MAC
    pan = tokens.token(TEST_PAN)
    assert TOKEN.fullmatch(pan)
    assert out["2"] == out["35"] == pan  # track 2: the token of its PAN, nothing else
    assert out["62"] == f"card{pan}x"
    assert out["4"] == "000000001000" and out["90"] == fields["90"]
    elements = decode_tlv(out["48"])
    assert elements == {"OP": "01", "AC": tokens.token(NEW_ACCOUNT), "NM": HOLDER,
                        "XX": f"ref {tokens.token(ACCOUNT)} end"}  # fmt: skip
    assert scrub(fields, tokens) == out  # the same capture: the same tokens
    assert scrub(fields, Tokens())["2"] != pan  # another capture's key: others
    assert digit_runs(json.dumps(out)) == [] and card_runs(json.dumps(out)) == []
    bad48 = scrub({"48": f"not tlv {TEST_PAN}"}, tokens)
    assert bad48 == {"48": f"not tlv {pan}"}


def test_a_record_round_trips_through_the_reader() -> None:
    request = {"t": "0200", "2": TEST_PAN, "3": "000000", "4": "000000001000", "41": "TERM0001"}
    record = make_record(1.25, request, {"t": "0210", "39": "00", "38": "123456"}, Tokens())
    line = dumps(record)
    assert line.endswith("\n") and line.count("\n") == 1
    data = json.loads(line)
    assert data["t"] == 1.25 and data["tid"] == "TERM0001" and data["mti"] == "0200"
    assert data["expect"] == {"39": "00"} and "t" not in data["fields"]
    assert list(read_traffic([line])) == [record]
    assert "expect" not in json.loads(dumps(make_record(0, request, None, Tokens())))


BAD_LINES = [
    ("{", "not JSON"),
    ("[]", "not a JSON object"),
    ('{"t": 0, "tid": "TERM0001", "mti": "0200"}', "no 'fields'"),
    ('{"t": -1, "tid": "TERM0001", "mti": "0200", "fields": {}}', "t must be"),
    ('{"t": true, "tid": "TERM0001", "mti": "0200", "fields": {}}', "t must be"),
    ('{"t": 0, "tid": "T1", "mti": "0200", "fields": {}}', "tid must be"),
    ('{"t": 0, "tid": "TERM0001", "mti": "02x0", "fields": {}}', "mti must be"),
    ('{"t": 0, "tid": "TERM0001", "mti": "0200", "fields": {"2": 5}}', "fields must be"),
    ('{"t": 0, "tid": "TERM0001", "mti": "0200", "fields": {"1": "x"}}', "fields must be"),
    ('{"t": 0, "tid": "TERM0001", "mti": "0200", "fields": {}, "expect": []}', "expect must"),
    ('{"t": 0, "tid": "TERM0001", "mti": "0200", "fields": {}, "why": 1}', "unknown key 'why'"),
]


@pytest.mark.parametrize(("line", "why"), BAD_LINES)
def test_the_reader_refuses_a_malformed_line_naming_it(line: str, why: str) -> None:
    good = '{"t": 0, "tid": "TERM0001", "mti": "0800", "fields": {"70": "301"}}'
    with pytest.raises(TrafficError) as exc:
        list(read_traffic([good, "", good, line, good]))
    message = str(exc.value)
    assert message.startswith("line 4: ") and why in message and "\n" not in message


# -- the sample files -----------------------------------------------------------------------------


def test_the_sample_traffic_file_reads_and_holds_test_cards_only() -> None:
    with open(TRAFFIC / "sample.jsonl", encoding="utf-8") as f:
        records = list(read_traffic(f))
    assert {r.tid for r in records} == {"TERM0001"}
    assert {r.mti for r in records} == {"0200", "0400"}  # no sign-on: a replayer signs on
    assert [r.t for r in records] == sorted(r.t for r in records)
    assert all(r.expect is not None and "39" in r.expect for r in records)
    assert any(decode_tlv(r.fields.get("48", "")).get("TS") == "1" for r in records)
    text = (TRAFFIC / "sample.jsonl").read_text()
    # The only card numbers are the documented test cards (the 622202123456789xxxx range).
    assert digit_runs(text) and all(r.startswith("622202123456789") for r in digit_runs(text))


def test_the_scenario_file_is_one_the_load_tester_takes() -> None:
    scenario, base = read_scenario(str(TRAFFIC / "scenario.toml"))
    assert base == TRAFFIC.resolve()
    assert set(scenario["mix"]) == set(KINDS)  # every kind, with its weight
    assert all(isinstance(w, int) and w >= 0 for w in scenario["mix"].values())
    assert scenario["duration"] > 0 and parse_schedule(scenario["rate"]).mean(30) > 0
    for text in scenario["fail_if"]:
        parse(text)
    assert set(scenario["rebind"]) == {"operator", "password", "holder", "bank_code"}


# -- the capture setting --------------------------------------------------------------------------


def test_capture_is_a_setting_off_by_default(tmp_path: Path) -> None:
    assert load_config(None, {}, environ={}).capture == ""
    assert load_config(None, {}, environ={"ACQHOST_CAPTURE": "t.jsonl"}).capture == "t.jsonl"
    path = tmp_path / "acqhost.toml"
    path.write_text('[host]\ncapture = "x.jsonl"\n')
    assert load_config(path, {}, environ={}).capture == "x.jsonl"
    assert load_config(path, {"capture": "y.jsonl"}, environ={}).capture == "y.jsonl"
    args = build_parser().parse_args(["serve", "--capture", "z.jsonl"])
    assert args.capture == "z.jsonl"


def test_bad_capture_settings_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "acqhost.toml"
    path.write_text("[host]\ncapture = 5\n")
    with pytest.raises(ConfigError, match=r"\[host\] capture must be a file path"):
        load_config(path, {}, environ={})
    with pytest.raises(ConfigError, match="option --capture needs workers = 1, not 2"):
        load_config(None, {"capture": "t.jsonl", "workers": 2}, environ={})


# -- a host capturing -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_host_records_every_answered_request_without_card_data(tmp_path: Path) -> None:
    capture = tmp_path / "traffic.jsonl"
    setup = make_host(tmp_path, capture=str(capture))
    exchanges: list[Exchange] = []
    async with running(setup) as server:
        assert server.dispatcher.capture is not None
        client = setup.client()
        await client.connect()
        exchanges.append(await client.sign_on())
        sale = await client.sale(1000)
        exchanges += [sale, await client.sale(50, test=True), await client.reverse(sale)]
        with anyio.fail_after(5):  # written while the host runs, a few times a second
            while len(capture.read_text().splitlines()) < 4:
                await anyio.sleep(0.05)
        exchanges.append(await client.sale(2000))  # the same card again
        submit = dict(operator_id="01", password="0000", holder=HOLDER, bank_code=BANK)
        exchanges.append(await client.rebind_submit(**submit, account=NEW_ACCOUNT))
        exchanges.append(await client.rebind_submit(**submit, card_track2=TRACK2))
        exchanges.append(await client.echo())
        await client.close()
    assert [ex.rc for ex in exchanges[:5]] == ["00"] * 5
    assert stat.S_IMODE(capture.stat().st_mode) == 0o600

    text = capture.read_text(encoding="utf-8")
    with open(capture, encoding="utf-8") as f:
        records = list(read_traffic(f))
    assert len(records) == len(exchanges)  # one a request
    assert [r.mti for r in records] == [ex.request["t"] for ex in exchanges]
    assert [r.expect for r in records] == [{"39": ex.rc} for ex in exchanges]
    assert {r.tid for r in records} == {"TERM0001"}
    assert records[0].t == 0.0 and [r.t for r in records] == sorted(r.t for r in records)
    for record, ex in zip(records, exchanges, strict=True):
        assert set(record.fields) == set(ex.request) - {"t", "52"}  # no MAC either
        for key in ("3", "4", "11", "42", "90"):
            assert record.fields.get(key) == ex.request.get(key)

    # No card or account number, track 2 or password in clear; the same card, the same token.
    assert digit_runs(text) == []
    for secret in (TEST_PAN, NEW_ACCOUNT, TRACK2, "=3012"):
        assert secret not in text
    sales = [r for r in records if r.mti == "0200"]
    assert len({r.fields["2"] for r in sales}) == 1 and TOKEN.fullmatch(sales[0].fields["2"])
    typed, inserted = (decode_tlv(r.fields["48"]) for r in records if r.mti == "0300")
    assert "PW" not in typed and "PW" not in inserted and TOKEN.fullmatch(typed["AC"])
    assert records[6].fields["35"] == sales[0].fields["2"]  # track 2: its PAN's token


@pytest.mark.anyio
async def test_no_capture_no_file(tmp_path: Path) -> None:
    setup = make_host(tmp_path)
    async with running(setup) as server:
        assert server.dispatcher.capture is None
        client = setup.client()
        await client.connect()
        assert (await client.sign_on()).rc == "00"
        assert (await client.sale(1000)).rc == "00"
        await client.close()
    assert not list(tmp_path.glob("*.jsonl"))


@pytest.mark.anyio
async def test_the_sample_expectations_hold_on_a_host(tmp_path: Path) -> None:
    """Replayed as README says (sign on first; fresh 7, 11, 12, 13; a reversal's 90 pointing
    at the sale as sent), every record of the sample is answered as it expects."""
    with open(TRAFFIC / "sample.jsonl", encoding="utf-8") as f:
        records = list(read_traffic(f))
    setup = make_host(tmp_path)
    sent: dict[str, dict[str, str]] = {}  # the sample's STAN -> the request as sent
    async with running(setup):
        client = setup.client()
        await client.connect()
        assert (await client.sign_on()).rc == "00"
        for record in records:
            fields = {"t": record.mti, **record.fields, "11": client.stan()}
            fields.update((k, v) for k, v in client.now_fields().items() if k in fields)
            if "90" in fields:
                original = sent[fields["90"][4:10]]
                fields["90"] = "0200" + original["11"] + original["7"] + "0" * 22
            sent[record.fields["11"]] = fields
            answer = await client.request(fields)
            assert record.expect is not None
            assert {k: answer.response.get(k) for k in record.expect} == record.expect, record
        await client.close()


def test_a_capture_appends_to_an_existing_file_and_makes_it_0600(tmp_path: Path) -> None:
    path = tmp_path / "traffic.jsonl"
    path.write_text('{"t":0,"tid":"TERM0001","mti":"0800","fields":{"70":"301"}}\n')
    path.chmod(0o644)
    capture = Capture(str(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    capture.close()
    capture.close()  # closing twice is harmless (a server's stores are closed after its run)
    assert len(path.read_text().splitlines()) == 1


def test_a_token_never_reads_as_a_number() -> None:
    tokens = Tokens(bytes(32))
    # A number whose keyed digest starts with 12 decimal digits (about one in 280).
    number = next(
        n
        for n in (f"62220212345{i:08d}" for i in range(100_000))
        if hashlib.blake2b(n.encode(), key=tokens.key, digest_size=16).hexdigest()[:12].isdigit()
    )
    token = tokens.token(number)
    assert TOKEN.fullmatch(token) and not token[4:].isdigit() and tokens.token(number) == token
