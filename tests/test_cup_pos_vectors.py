"""China UnionPay (CUP) POS dialect: specs/cup-pos.json against published sample messages.

Every vector in tests/vectors/cup_pos.json is a hex dump copied from a public source (see its
"source").  "message_hex" is what the codec sees: the bytes after the 2-byte length and the 5-byte
TPDU (those two belong to the framing layer).  Some sources published the message without length,
TPDU and the 6-byte application header; for those ("app_header_present": false) the spec is used
with the header disabled (h.max_len = 0), everything else unchanged.
"""

import copy
import datetime
import json
import string
from pathlib import Path

import iso8583
import pytest

from acqhost.wire.codec import compile_spec
from acqhost.wire.specs import load

SPEC_PATH = Path(__file__).parents[1] / "specs" / "cup-pos.json"
VECTORS_PATH = Path(__file__).parent / "vectors" / "cup_pos.json"

with open(SPEC_PATH, encoding="utf-8") as f:
    SPEC = json.load(f)

with open(VECTORS_PATH, encoding="utf-8") as f:
    VECTORS = json.load(f)

IDS = [v["name"] for v in VECTORS]
PRINTABLE = set(string.printable) - set("\t\n\r\x0b\x0c")


def spec_for(vector):
    if vector["app_header_present"]:
        return SPEC
    spec = copy.deepcopy(SPEC)
    spec["h"]["max_len"] = 0
    return spec


def decode(vector):
    decoded, _ = iso8583.decode(bytes.fromhex(vector["message_hex"]), spec_for(vector))
    return decoded


def is_digits(value, length=None):
    return value.isdigit() and (length is None or len(value) == length)


def valid_mmdd(value):
    if not is_digits(value, 4):
        return False
    try:
        datetime.date(2000, int(value[:2]), int(value[2:]))  # leap year: 0229 is fine
    except ValueError:
        return False
    return True


def valid_hhmmss(value):
    if not is_digits(value, 6):
        return False
    return int(value[:2]) < 24 and int(value[2:4]) < 60 and int(value[4:]) < 60


# --- the spec itself -------------------------------------------------------------------------


def test_spec_defines_every_field():
    expected_keys = {"h", "t", "p", "1"} | {str(i) for i in range(2, 129)}
    assert set(SPEC) == expected_keys
    for key, field in SPEC.items():
        assert {"data_enc", "len_enc", "len_type", "max_len", "desc"} <= set(field), key
        if "left_pad" in field or "right_pad" in field:
            # pads only make sense for BCD/hex data counted in nibbles, and only one side
            assert field["data_enc"] == "b" and field.get("len_count") == "nibbles", key
            assert not ("left_pad" in field and "right_pad" in field), key


def test_spec_dialect_basics():
    assert SPEC["h"] == {**SPEC["h"], "data_enc": "b", "len_type": 0, "max_len": 6}
    assert SPEC["t"]["data_enc"] == "b" and SPEC["t"]["max_len"] == 2
    for key in ("p", "1", "52", "64", "128"):
        assert SPEC[key]["data_enc"] == "b" and SPEC[key]["max_len"] == 8, key
    for key in ("37", "38", "39", "41", "42", "49"):
        assert SPEC[key]["data_enc"] == "ascii" and SPEC[key]["len_type"] == 0, key
    for key, len_type in (("2", 1), ("32", 1), ("35", 1), ("48", 2), ("60", 2), ("61", 2)):
        field = SPEC[key]
        assert (field["data_enc"], field["len_enc"], field["len_type"]) == ("b", "bcd", len_type)
        assert field["len_count"] == "nibbles" and field["right_pad"] == "0", key
    assert SPEC["55"]["data_enc"] == "b" and SPEC["55"]["len_type"] == 2
    assert SPEC["63"]["data_enc"] == "ascii" and SPEC["63"]["len_type"] == 2


# --- the vectors -----------------------------------------------------------------------------


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_vector_framing(vector):
    raw = bytes.fromhex(vector["hex"])
    if vector["tpdu_hex"] is None:
        assert vector["length_hex"] is None
        assert vector["message_hex"] == vector["hex"]
        return
    length = int(vector["length_hex"], 16)
    assert raw[:2] == bytes.fromhex(vector["length_hex"])
    assert length == len(raw) - 2, "2-byte length prefix must cover TPDU + message"
    tpdu = bytes.fromhex(vector["tpdu_hex"])
    assert len(tpdu) == 5 and tpdu[0] == 0x60
    assert raw[2:7] == tpdu
    assert raw[7:] == bytes.fromhex(vector["message_hex"])


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_vector_decodes_to_expected(vector):
    decoded = decode(vector)
    expected = vector["expected"]
    for field in expected:
        assert decoded.get(field) == expected[field], f"field {field}"
    assert set(decoded) == set(expected)


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_vector_round_trips(vector):
    decoded = decode(vector)
    encoded, _ = iso8583.encode(copy.deepcopy(decoded), spec_for(vector))
    assert bytes(encoded) == bytes.fromhex(vector["message_hex"])


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_vector_is_sensible(vector):
    d = decode(vector)
    mti = d["t"]
    assert mti in {"0200", "0210", "0500", "0510", "0800", "0810"}
    assert mti in vector["name"]

    if vector["app_header_present"]:
        # BCD application header, application type 6x (e.g. 603100..., 613100...)
        assert is_digits(d["h"], 12) and d["h"][0] == "6"

    assert is_digits(d["11"], 6)
    assert len(d["41"]) == 8 and set(d["41"]) <= PRINTABLE and d["41"].strip()
    assert len(d["42"]) == 15 and set(d["42"]) <= PRINTABLE and d["42"].strip()

    # 60: n...017, 60.1 message type code n2, 60.2 batch number n6, 60.3 network mgmt code n3
    f60 = d["60"]
    assert is_digits(f60) and len(f60) <= 17
    batch = f60[2:8]
    assert is_digits(batch, 6)
    if mti in ("0800", "0810"):
        assert f60[:2] == "00"
        assert f60[8:11] in {"001", "003", "004"}  # sign-on: single / double / triple length keys
    if mti in ("0500", "0510"):
        assert f60[:2] == "00"
        assert f60[8:11] == "201"  # batch settlement
    if mti in ("0200", "0210"):
        assert f60[:2] == "22"  # purchase (消费)

    if mti.endswith("10"):
        assert valid_hhmmss(d["12"])
        assert valid_mmdd(d["13"])
        assert is_digits(d["37"], 12)
    if mti == "0510":
        # the published 0510 carries its verdict in 48 (a reconciliation code per block,
        # 1 = balanced) and no 39; 15 is the settlement date
        assert "39" not in d
        assert valid_mmdd(d["15"])
        assert [d["48"][30], d["48"][61]] == ["1", "1"]
    elif mti.endswith("10"):
        assert d["39"] == "00"
    if mti in ("0210", "0810"):
        assert is_digits(d["32"]) and len(d["32"]) <= 11
        if mti == "0810":
            # working keys (PIN key, MAC key and their check values) in field 62
            assert len(d["62"]) in (48, 80, 120) and len(bytes.fromhex(d["62"])) * 2 == len(d["62"])

    if mti == "0800":
        assert d["63"].isdigit()  # operator number

    if mti in ("0500", "0510"):
        assert d["49"] == "156"
        f48 = d["48"]
        assert is_digits(f48, 62)
        # domestic then foreign card totals: debit amt n12, debit count n3, credit amt n12,
        # credit count n3, reconciliation code n1
        for off in (0, 31):
            block = f48[off : off + 31]
            debit_amount, debit_count = int(block[0:12]), int(block[12:15])
            credit_amount, credit_count = int(block[15:27]), int(block[27:30])
            assert block[30] in "0123"
            assert (debit_amount == 0) == (debit_count == 0)
            assert (credit_amount == 0) == (credit_count == 0)
        if mti == "0500":
            assert d["63"].strip().isdigit()  # operator number, space padded

    if mti == "0200":
        assert d["3"] == "000000"  # purchase processing code
        assert is_digits(d["4"], 12) and int(d["4"]) > 0
        assert d["49"] == "156"
        assert d["22"][:2] in {"01", "02", "03", "05", "07", "90", "91", "95", "96", "98"}
        assert d["22"][2] in "012"
        assert is_digits(d["23"], 3)
        assert is_digits(d["25"], 2) and is_digits(d["26"], 2)
        assert is_digits(d["14"], 4) and 1 <= int(d["14"][2:]) <= 12
        pan = d["2"]
        assert is_digits(pan) and 13 <= len(pan) <= 19
        track2 = d["35"]
        assert "D" in track2 and track2.split("D")[0] == pan
        assert track2.split("D")[1][:4] == d["14"]  # expiry YYMM follows the separator
        assert len(d["52"]) == 16 and is_digits(d["53"], 16)
        assert d["55"].startswith("9F26")  # EMV ARQC first
        assert len(d["64"]) == 16


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_compiled_codec_reads_and_writes_the_vectors_as_pyiso8583_does(vector):
    spec = spec_for(vector)
    codec = compile_spec(spec, specialize_after=1)
    message = bytes.fromhex(vector["message_hex"])
    for _ in range(2):  # the exact path, then the specialised one
        assert codec.decode(message) == vector["expected"]
        assert codec.encode(vector["expected"]) == message


def test_spec_is_loadable_by_name_and_matches_the_file():
    assert load("cup-pos") == SPEC
