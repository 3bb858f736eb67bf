"""Field specs, and the exact per-field decoders and encoders generated from them.

Each field of a spec becomes a small Python function whose source is written for that field
alone: its length type, encodings and limits are literals in the code, so nothing reads the
spec at run time. These functions follow pyiso8583's rules to the letter, error messages
included; they are the codec's reference path (first sightings of a layout and every error).
"""

from __future__ import annotations

import binascii
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from acqhost.errors import CodecError

__all__ = (
    "FieldDecoder",
    "FieldEncoder",
    "FieldSpec",
    "Source",
    "coerce_bytes",
    "compile_field_decoder",
    "compile_field_encoder",
    "field_spec",
    "no_layout_yet",
    "unusable_field",
)

FieldDecoder = Callable[[bytes, int], tuple[str, int]]
FieldEncoder = Callable[[Any, int], bytes]


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One field of a spec, normalised the way pyiso8583 reads it."""

    key: str
    data_enc: str
    len_enc: str
    len_type: int
    max_len: int
    nibbles: bool
    left_pad: str
    right_pad: str

    @property
    def len_count(self) -> str:
        return "nibbles" if self.nibbles else "bytes"

    @property
    def binary(self) -> bool:
        return self.data_enc == "b"


def field_spec(key: str, raw: Mapping[str, Any]) -> FieldSpec:
    """Normalise one field's spec dict; ValueError when it is not a usable pyiso8583 spec."""
    try:
        data_enc = raw["data_enc"]
        len_enc = raw["len_enc"]
        len_type = raw["len_type"]
        max_len = raw["max_len"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"spec field {key!r} lacks {e}") from None
    len_count = raw.get("len_count", "bytes")
    left_pad = raw.get("left_pad", "")
    right_pad = raw.get("right_pad", "")
    if not isinstance(data_enc, str) or not isinstance(len_enc, str):
        raise ValueError(f"spec field {key!r}: data_enc and len_enc must be strings")
    for name, value in (("len_type", len_type), ("max_len", max_len)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"spec field {key!r}: {name} must be an integer")
    if len_type < 0:
        raise ValueError(f"spec field {key!r}: len_type must not be negative")
    if len_count not in ("bytes", "nibbles"):
        raise ValueError(f"spec field {key!r}: len_count must be 'bytes' or 'nibbles'")
    if not isinstance(left_pad, str) or not isinstance(right_pad, str):
        raise ValueError(f"spec field {key!r}: left_pad and right_pad must be strings")
    return FieldSpec(
        key=key,
        data_enc=data_enc,
        len_enc=len_enc,
        len_type=len_type,
        max_len=max_len,
        nibbles=len_count == "nibbles",
        left_pad=left_pad[:1],
        right_pad=right_pad[:1],
    )


class Source:
    """A tiny builder for generated functions: lines, indentation, and the names they use."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.names: dict[str, object] = {}
        self._depth = 0

    def line(self, text: str) -> None:
        self.lines.append("    " * self._depth + text)

    def indent(self) -> None:
        self._depth += 1

    def dedent(self) -> None:
        self._depth -= 1

    def name(self, hint: str, value: object) -> str:
        """Bind ``value`` to a fresh global name of the generated module and return it."""
        for existing, bound in self.names.items():
            if bound is value and existing.startswith(hint):
                return existing
        candidate = f"{hint}{len(self.names)}"
        self.names[candidate] = value
        return candidate

    def build(self, func: str, filename: str) -> Callable[..., Any]:
        namespace: dict[str, Any] = dict(self.names)
        code = compile("\n".join(self.lines) + "\n", filename, "exec")
        exec(code, namespace)
        built: Callable[..., Any] = namespace[func]
        return built


def _padded(fs: FieldSpec, var: str) -> str:
    """The expression pyiso8583's ``_add_pad_field`` evaluates for an odd nibble count."""
    if fs.left_pad:
        return f"{fs.left_pad!r} + {var}"
    if fs.right_pad:
        return f"{var} + {fs.right_pad!r}"
    return var


def _bad(msg: str, key: str, pos: int) -> CodecError:
    return CodecError(msg, key, pos)


def _bad_enc(msg: str, key: str, pos: int) -> CodecError:
    return CodecError(msg, key, pos, decoding=False)


def compile_field_decoder(fs: FieldSpec) -> FieldDecoder:
    """``dec(s, i) -> (value, next_i)``: pyiso8583's ``_decode_field`` for this one field."""
    src = Source()
    bad = src.name("bad", _bad)
    k = repr(fs.key)
    count = fs.len_count
    lt, ml = fs.len_type, fs.max_len
    src.line("def dec(s, i):")
    src.indent()
    if lt > 0:
        src.line(f"lb = s[i:i + {lt}]")
        src.line(f"if len(lb) != {lt}:")
        src.line(
            f"    raise {bad}(f'Field length is {{len(lb)}} bytes wide, expecting {lt}', {k}, i)"
        )
        if fs.len_enc == "b":
            src.line("n = int.from_bytes(lb, 'big', signed=False)")
        elif fs.len_enc == "bcd":
            src.line("try:")
            src.line("    n = int(lb.hex(), 10)")
            src.line("except Exception:")
            src.line(f"    raise {bad}('Failed to decode field length, invalid BCD data', {k}, i)")
        else:
            src.line("try:")
            src.line(f"    ls = lb.decode({fs.len_enc!r})")
            src.line("except LookupError:")
            src.line(
                f"    raise {bad}('Failed to decode field length, unknown encoding specified', "
                f"{k}, i) from None"
            )
            src.line("except Exception:")
            src.line(f"    raise {bad}('Failed to decode field length, invalid data', {k}, i)")
            src.line("try:")
            src.line("    n = int(ls)")
            src.line("except Exception:")
            src.line(f"    raise {bad}('Failed to decode field length, non-numeric data', {k}, i)")
        src.line(f"if n > {ml}:")
        src.line(
            f"    raise {bad}(f'Field data is {{n}} {count}, larger than maximum {ml}', {k}, i)"
        )
        src.line(f"i += {lt}")
    else:
        src.line(f"n = {ml}")
    src.line("if n == 0:")
    src.line("    return '', i")
    src.line("bl = (n + 1) // 2" if fs.nibbles else "bl = n")
    src.line("data = s[i:i + bl]")
    src.line("if len(data) != bl:")
    actual = "len(data) * 2" if fs.nibbles else "len(data)"
    src.line(f"    raise {bad}(f'Field data is {{{actual}}} {count}, expecting {{n}}', {k}, i)")
    if fs.binary:
        src.line("v = data.hex().upper()")
        if fs.nibbles:
            src.line("if n & 1:")
            src.indent()
            if fs.left_pad:
                src.line(f"if v[:1] == {fs.left_pad!r}:")
                src.line("    return v[1:], i + bl")
            if fs.right_pad:
                src.line(f"if v[-1:] == {fs.right_pad!r}:")
                src.line("    return v[:-1], i + bl")
            src.line(f"raise {bad}(f'Field data is {{len(v)}} nibbles, expecting {{n}}', {k}, i)")
            src.dedent()
    else:
        src.line("try:")
        src.line(f"    v = data.decode({fs.data_enc!r})")
        src.line("except LookupError:")
        src.line(
            f"    raise {bad}('Failed to decode field, unknown encoding specified', {k}, i) "
            "from None"
        )
        src.line("except Exception:")
        src.line(f"    raise {bad}('Failed to decode field, invalid data', {k}, i) from None")
    src.line("return v, i + bl")
    return src.build("dec", f"<acqhost.wire.codec field {fs.key} decoder>")


def compile_field_encoder(fs: FieldSpec) -> FieldEncoder:
    """``enc(value, pos) -> bytes``: pyiso8583's ``_encode_field`` for this one field.

    ``pos`` is where the field starts in the output; it only travels into errors.
    """
    src = Source()
    bad = src.name("bad", _bad_enc)
    k = repr(fs.key)
    count = fs.len_count
    lt, ml = fs.len_type, fs.max_len
    src.line("def enc(v, pos):")
    src.indent()
    if fs.binary:
        a2b = src.name("a2b_hex", binascii.a2b_hex)
        src.line("try:")
        src.indent()
        if fs.nibbles:
            src.line("if len(v) & 1:")
            src.line(f"    dv = {_padded(fs, 'v')}")
            src.line("else:")
            src.line("    dv = v")
        else:
            src.line("dv = v")
        src.line(f"data = {a2b}(dv)")
        src.dedent()
        src.line("except Exception:")
        src.indent()
        if fs.nibbles:
            src.line("if len(dv) % 2 == 1:")
            src.line(
                f"    raise {bad}('Failed to encode field, odd-length nibble data, specify pad', "
                f"{k}, pos) from None"
            )
        src.line("if len(dv) % 2 == 1:")
        src.line(
            f"    raise {bad}('Failed to encode field, odd-length hex data', {k}, pos) from None"
        )
        src.line(f"raise {bad}('Failed to encode field, non-hex data', {k}, pos) from None")
        src.dedent()
        src.line("n = len(v)" if fs.nibbles else "n = len(data)")
    else:
        src.line("try:")
        src.line(f"    data = v.encode({fs.data_enc!r})")
        src.line("except LookupError:")
        src.line(
            f"    raise {bad}('Failed to encode field, unknown encoding specified', {k}, pos) "
            "from None"
        )
        src.line("except Exception:")
        src.line(f"    raise {bad}('Failed to encode field, invalid data', {k}, pos) from None")
        src.line("n = len(data) * 2" if fs.nibbles else "n = len(data)")
    if lt == 0:
        src.line(f"if n != {ml}:")
        src.line(f"    raise {bad}(f'Field data is {{n}} {count}, expecting {ml}', {k}, pos)")
        src.line("return data")
        return src.build("enc", f"<acqhost.wire.codec field {fs.key} encoder>")
    src.line(f"if n > {ml}:")
    src.line(f"    raise {bad}(f'Field data is {{n}} {count}, larger than maximum {ml}', {k}, pos)")
    fit = "Failed to encode field length, field length does not fit into configured field size"
    if fs.len_enc == "b":
        src.line("try:")
        src.line(f"    lb = n.to_bytes({lt}, 'big', signed=False)")
        src.line("except OverflowError:")
        src.line(f"    raise {bad}({fit!r}, {k}, pos) from None")
    elif fs.len_enc == "bcd":
        a2b = src.name("a2b_hex", binascii.a2b_hex)
        src.line(f"ls = '{{:0{lt * 2}d}}'.format(n)")
        src.line(f"if len(ls) > {lt * 2}:")
        src.line(f"    raise {bad}({fit!r}, {k}, pos)")
        src.line(f"lb = {a2b}(ls)")
    else:
        src.line("try:")
        src.line(f"    lb = bytes('{{:0{lt}d}}'.format(n), {fs.len_enc!r})")
        src.line("except LookupError:")
        src.line(
            f"    raise {bad}('Failed to encode field length, unknown encoding specified', "
            f"{k}, pos) from None"
        )
        src.line("except Exception as e:")
        src.line(f"    raise {bad}(f'Failed to encode field length, {{e}}', {k}, pos) from None")
        src.line(f"if len(lb) > {lt}:")
        src.line(f"    raise {bad}({fit!r}, {k}, pos)")
    src.line("return lb + data")
    return src.build("enc", f"<acqhost.wire.codec field {fs.key} encoder>")


def unusable_field(key: str, why: str) -> tuple[FieldDecoder, FieldEncoder]:
    """Decoder and encoder of a field whose spec entry cannot be used: they refuse."""
    message = f"Field spec is unusable ({why})"

    def dec(s: bytes, i: int) -> tuple[str, int]:
        raise CodecError(message, key, i)

    def enc(v: Any, pos: int) -> bytes:
        raise CodecError(message, key, pos, decoding=False)

    return dec, enc


def no_layout_yet(fields: dict[Any, Any]) -> bytes:
    """The codec's last specialised encoder before it has one: refuses everything."""
    raise LookupError("no specialised encoder yet")


def coerce_bytes(s: object) -> bytes:
    """``s`` as bytes when it is bytes or a bytearray; TypeError as pyiso8583 gives it."""
    if isinstance(s, bytes | bytearray):
        return bytes(s)
    raise TypeError(f"Encoded ISO8583 data must be bytes or bytearray, not {s.__class__.__name__}")
