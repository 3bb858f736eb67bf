"""Field 48 private data: a sequence of ``TT LLL VALUE`` elements (PROTOCOL.md section 2).

``TT`` is two upper-case ASCII letters or digits, ``LLL`` three ASCII digits giving the number
of UTF-8 *bytes* of ``VALUE``. Field 48 reaches us as a ``str`` (the codec decodes it from
UTF-8), so a three-character Chinese holder name is ``NM009张三丰``: lengths count bytes, while
error offsets count characters of that ``str``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from acqhost.errors import TLVError

__all__ = ("MAX_VALUE_BYTES", "decode_tlv", "encode_tlv", "is_tag")

MAX_VALUE_BYTES: Final = 999
"""The longest value an element can carry (three length digits)."""

_TAG_CHARS: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
# Set and dict look-ups validate and convert in one step: cheaper than isascii/isdigit/int.
_TAGS: Final = frozenset(a + b for a in _TAG_CHARS for b in _TAG_CHARS)
_LENGTHS: Final = {f"{n:03d}": n for n in range(MAX_VALUE_BYTES + 1)}


def is_tag(tag: str) -> bool:
    """True if ``tag`` is a well-formed element tag: two of ``A``-``Z``, ``0``-``9``."""
    return tag in _TAGS


def decode_tlv(field48: str) -> dict[str, str]:
    """Split field 48 into ``{tag: value}`` in the order the elements appear.

    Unknown tags are kept (the host ignores them, but they are data). An empty string gives
    ``{}``. Raises :class:`TLVError`, whose ``offset`` is the character offset of the bad
    element, for a bad tag, a length that is not three digits, a value running past the end,
    a value ending inside a UTF-8 character, or a duplicate tag.
    """
    if field48.isascii():
        # Pure ASCII (nearly every field 48): character offsets are byte offsets.
        return _decode_ascii(field48)
    return _decode_utf8(field48)


def _decode_ascii(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    n = len(text)
    pos = 0
    while pos < n:
        tag = text[pos : pos + 2]
        if tag not in _TAGS:
            raise _bad_tag(tag, pos)
        length = _LENGTHS.get(text[pos + 2 : pos + 5])
        if length is None:
            raise _bad_length(tag, text[pos + 2 : pos + 5], pos)
        start = pos + 5
        end = start + length
        if end > n:
            raise _past_end(tag, length, n - start, pos)
        if tag in out:
            raise TLVError(f"duplicate tag {tag}", pos)
        out[tag] = text[start:end]
        pos = end
    return out


def _decode_utf8(text: str) -> dict[str, str]:
    raw = text.encode("utf-8", "surrogatepass")
    out: dict[str, str] = {}
    n = len(raw)
    pos = 0  # byte offset; errors convert it to a character offset
    while pos < n:
        # Tags and lengths are ASCII; latin-1 maps any other byte to a character that fails
        # the look-ups below.
        tag = raw[pos : pos + 2].decode("latin-1")
        if tag not in _TAGS:
            offset = _char_offset(raw, pos)
            raise _bad_tag(text[offset : offset + 2], offset)
        length = _LENGTHS.get(raw[pos + 2 : pos + 5].decode("latin-1"))
        if length is None:
            offset = _char_offset(raw, pos)
            raise _bad_length(tag, text[offset + 2 : offset + 5], offset)
        start = pos + 5
        end = start + length
        if end > n:
            raise _past_end(tag, length, n - start, _char_offset(raw, pos))
        try:
            value = raw[start:end].decode("utf-8")
        except UnicodeDecodeError:
            raise _bad_value(tag, length, raw[start:end], _char_offset(raw, pos)) from None
        if tag in out:
            raise TLVError(f"duplicate tag {tag}", _char_offset(raw, pos))
        out[tag] = value
        pos = end
    return out


def _char_offset(raw: bytes, byte_offset: int) -> int:
    # Only reached on errors, and only at element starts, which follow whole values.
    return len(raw[:byte_offset].decode("utf-8", "surrogatepass"))


def _bad_tag(tag: str, offset: int) -> TLVError:
    return TLVError(f"bad tag {tag!r}", offset)


def _bad_length(tag: str, digits: str, offset: int) -> TLVError:
    return TLVError(f"length {digits!r} of tag {tag} is not 3 digits", offset)


def _bad_value(tag: str, length: int, value: bytes, offset: int) -> TLVError:
    try:
        value.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return TLVError(
            f"value of tag {tag} ({length} bytes) ends inside a UTF-8 character", offset
        )
    # Whole characters, but a lone surrogate: a str that no UTF-8 field could have produced.
    return TLVError(f"value of tag {tag} is not valid UTF-8 text", offset)


def _past_end(tag: str, length: int, left: int, offset: int) -> TLVError:
    return TLVError(
        f"value of tag {tag} runs past the end: {length} bytes declared, {max(left, 0)} left",
        offset,
    )


def encode_tlv(elements: Mapping[str, str]) -> str:
    """Join ``{tag: value}`` into field 48 text, keeping the mapping's order.

    Raises :class:`TLVError` (``offset`` = where the element would start in the result) for a
    bad tag, a value longer than 999 UTF-8 bytes, or a value that cannot be encoded as UTF-8
    (a lone surrogate).
    """
    parts: list[str] = []
    offset = 0
    for tag, value in elements.items():
        if tag not in _TAGS:
            raise _bad_tag(tag, offset)
        if value.isascii():
            size = len(value)
        else:
            try:
                size = len(value.encode("utf-8"))
            except UnicodeEncodeError:
                raise TLVError(f"value of tag {tag} is not valid UTF-8 text", offset) from None
        if size > MAX_VALUE_BYTES:
            raise TLVError(
                f"value of tag {tag} is {size} UTF-8 bytes, more than {MAX_VALUE_BYTES}", offset
            )
        parts.append(f"{tag}{size:03d}{value}")
        offset += 5 + len(value)
    return "".join(parts)
