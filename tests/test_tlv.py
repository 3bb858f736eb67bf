"""Field 48 TLV: byte-length semantics, round trips, and every malformed element."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from acqhost.errors import TLVError
from acqhost.wire.tlv import decode_tlv, encode_tlv, is_tag

TAG_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
tags = st.text(alphabet=TAG_CHARS, min_size=2, max_size=2)
# Any text that UTF-8 can encode (no lone surrogates), including CJK and emoji; short enough
# to stay under 999 bytes even at 4 bytes a character.
values = st.text(alphabet=st.characters(codec="utf-8"), max_size=240)
element_maps = st.dictionaries(tags, values, max_size=12)


def tlv_error(field48: str) -> tuple[str, int]:
    with pytest.raises(TLVError) as info:
        decode_tlv(field48)
    return str(info.value), info.value.offset


# --- byte-length semantics --------------------------------------------------------------------


def test_chinese_name_length_counts_utf8_bytes() -> None:
    assert encode_tlv({"NM": "张三"}) == "NM006张三"
    assert decode_tlv("NM006张三") == {"NM": "张三"}


def test_three_character_chinese_name_has_length_009() -> None:
    assert encode_tlv({"NM": "张三丰"}) == "NM009张三丰"


def test_elements_after_a_chinese_value_are_found_by_byte_length() -> None:
    field48 = "OP0011NM006张三BK012102100099996AC0166222020200001234"
    assert decode_tlv(field48) == {
        "OP": "1",
        "NM": "张三",
        "BK": "102100099996",
        "AC": "6222020200001234",
    }


def test_mixed_width_characters_count_their_own_byte_sizes() -> None:
    # a: 1 byte, é: 2, 张: 3, 😀: 4
    assert encode_tlv({"NM": "aé张😀"}) == "NM010aé张😀"


def test_character_length_used_as_byte_length_is_rejected() -> None:
    assert tlv_error("NM002张三") == (
        "value of tag NM (2 bytes) ends inside a UTF-8 character at offset 0",
        0,
    )


# --- decoding -----------------------------------------------------------------------------


def test_empty_field_decodes_to_empty_dict() -> None:
    assert decode_tlv("") == {}
    assert encode_tlv({}) == ""


def test_decoder_keeps_unknown_tags_and_order() -> None:
    decoded = decode_tlv("ZZ003abcTS0011X9000")
    assert decoded == {"ZZ": "abc", "TS": "1", "X9": ""}
    assert list(decoded) == ["ZZ", "TS", "X9"]


def test_zero_length_value_is_empty_string() -> None:
    assert decode_tlv("RF000") == {"RF": ""}


def test_value_may_contain_text_that_looks_like_elements() -> None:
    assert decode_tlv("BR010NM005abcdeTS0011") == {"BR": "NM005abcde", "TS": "1"}


def test_encoder_keeps_insertion_order() -> None:
    assert encode_tlv({"SV": "3", "SA": "6222********1234"}) == "SV0013SA0166222********1234"


# --- round trips -----------------------------------------------------------------------------


@given(element_maps)
def test_encode_then_decode_round_trips(elements: dict[str, str]) -> None:
    decoded = decode_tlv(encode_tlv(elements))
    assert decoded == elements
    assert list(decoded) == list(elements)


@given(element_maps)
def test_decode_then_encode_gives_back_the_same_text(elements: dict[str, str]) -> None:
    field48 = encode_tlv(elements)
    assert encode_tlv(decode_tlv(field48)) == field48


@given(element_maps)
def test_length_digits_are_utf8_byte_counts(elements: dict[str, str]) -> None:
    field48 = encode_tlv(elements)
    pos = 0
    for tag, value in elements.items():
        assert field48[pos : pos + 2] == tag
        assert int(field48[pos + 2 : pos + 5]) == len(value.encode("utf-8"))
        pos += 5 + len(value)
    assert pos == len(field48)


@given(st.dictionaries(tags, st.text(alphabet=st.characters(max_codepoint=127)), max_size=8))
def test_ascii_and_unicode_paths_agree(elements: dict[str, str]) -> None:
    # A trailing non-ASCII element sends the same ASCII elements through the UTF-8 path.
    elements.pop("ZZ", None)
    ascii_only = encode_tlv(elements)
    assert decode_tlv(ascii_only + "ZZ003张") == {**decode_tlv(ascii_only), "ZZ": "张"}


@given(st.text(max_size=60))
def test_arbitrary_text_raises_only_tlv_error(field48: str) -> None:
    try:
        decoded = decode_tlv(field48)
    except TLVError as error:
        assert 0 <= error.offset < len(field48)
    else:
        assert encode_tlv(decoded) == field48


@given(element_maps, st.integers(min_value=0))
def test_truncated_field_is_rejected_at_the_last_element(
    elements: dict[str, str], cut: int
) -> None:
    field48 = encode_tlv(elements)
    if not field48:
        return
    cut %= len(field48)
    starts = []
    pos = 0
    for value in elements.values():
        starts.append(pos)
        pos += 5 + len(value)
    if cut in starts:
        assert decode_tlv(field48[:cut]) == dict(list(elements.items())[: starts.index(cut)])
    else:
        with pytest.raises(TLVError) as info:
            decode_tlv(field48[:cut])
        assert info.value.offset == max(s for s in starts if s < cut)


# --- decoding errors -------------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["nm", "Nm", "N-", "  ", "张三", "ÀB", "\uff2e"])
def test_bad_tag_is_rejected_with_its_offset(tag: str) -> None:
    field48 = "TS0011" + tag + "0011"
    assert tlv_error(field48) == (f"bad tag {(tag + '0')[:2]!r} at offset 6", 6)


def test_lower_case_tag_message() -> None:
    assert tlv_error("TS0011nm0011") == ("bad tag 'nm' at offset 6", 6)


def test_non_ascii_tag_offset_counts_characters_not_bytes() -> None:
    assert tlv_error("NM006张三张三001x") == ("bad tag '张三' at offset 7", 7)


def test_lone_trailing_character_is_a_bad_tag() -> None:
    assert tlv_error("TS0011N") == ("bad tag 'N' at offset 6", 6)


@pytest.mark.parametrize(
    ("digits", "shown"), [("0a1", "0a1"), (" 01", " 01"), ("-01", "-01"), ("01", "01")]
)
def test_non_digit_length_is_rejected(digits: str, shown: str) -> None:
    assert tlv_error("TS0011NM" + digits) == (
        f"length {shown!r} of tag NM is not 3 digits at offset 6",
        6,
    )


def test_unicode_digits_are_not_a_length() -> None:
    arabic_indic = "\u0660\u0660\u0661"  # 001 in Arabic-Indic digits: str.isdigit() is True
    assert tlv_error(f"NM{arabic_indic}x") == (
        f"length {arabic_indic!r} of tag NM is not 3 digits at offset 0",
        0,
    )


def test_non_digit_length_after_chinese_value_has_character_offset() -> None:
    assert tlv_error("NM006张三BK0x2") == ("length '0x2' of tag BK is not 3 digits at offset 7", 7)


def test_value_running_past_the_end_is_rejected() -> None:
    assert tlv_error("TS0011AC0166222") == (
        "value of tag AC runs past the end: 16 bytes declared, 4 left at offset 6",
        6,
    )


def test_value_running_past_the_end_counts_bytes_left() -> None:
    assert tlv_error("TS0011NM009张三") == (
        "value of tag NM runs past the end: 9 bytes declared, 6 left at offset 6",
        6,
    )


def test_value_cut_inside_a_utf8_sequence_is_rejected() -> None:
    assert tlv_error("TS0011NM004张三") == (
        "value of tag NM (4 bytes) ends inside a UTF-8 character at offset 6",
        6,
    )


def test_duplicate_tag_is_rejected_at_the_second_occurrence() -> None:
    assert tlv_error("TS0011AM0011TS0011") == ("duplicate tag TS at offset 12", 12)


def test_duplicate_tag_after_chinese_value_has_character_offset() -> None:
    assert tlv_error("NM006张三NM006李四") == ("duplicate tag NM at offset 7", 7)


def test_lone_surrogate_in_value_is_not_utf8_text() -> None:
    assert tlv_error("NM003\udcff") == ("value of tag NM is not valid UTF-8 text at offset 0", 0)


def test_tlv_error_is_a_value_error_carrying_msg_and_offset() -> None:
    with pytest.raises(ValueError) as info:
        decode_tlv("TS0011TS0011")
    assert isinstance(info.value, TLVError)
    assert (info.value.msg, info.value.offset) == ("duplicate tag TS", 6)


# --- encoding errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["nm", "N", "NMX", "", "N_", "张三"])
def test_encoder_rejects_bad_tag_with_its_offset(tag: str) -> None:
    with pytest.raises(TLVError, match=re.escape(f"bad tag {tag!r} at offset 6")):
        encode_tlv({"TS": "1", tag: "x"})


def test_encoder_accepts_value_of_exactly_999_bytes() -> None:
    value = "张" * 333
    assert encode_tlv({"NM": value}) == "NM999" + value


def test_encoder_rejects_value_over_999_utf8_bytes() -> None:
    # 334 characters but 1002 bytes: the byte count is what must fit in LLL.
    with pytest.raises(TLVError) as info:
        encode_tlv({"TS": "1", "NM": "张" * 334})
    assert str(info.value) == "value of tag NM is 1002 UTF-8 bytes, more than 999 at offset 6"
    assert info.value.offset == 6


def test_encoder_offset_counts_characters_of_earlier_values() -> None:
    with pytest.raises(TLVError) as info:
        encode_tlv({"NM": "张三", "x": "1"})
    assert info.value.offset == 7


def test_encoder_rejects_value_with_lone_surrogate() -> None:
    with pytest.raises(
        TLVError, match=re.escape("value of tag NM is not valid UTF-8 text at offset 0")
    ):
        encode_tlv({"NM": "\udcff"})


def test_is_tag() -> None:
    assert is_tag("NM") and is_tag("X9") and is_tag("00")
    assert not is_tag("nm") and not is_tag("N") and not is_tag("NMX") and not is_tag("\uff2e\uff2d")
