"""The compiled codec: an exact reference path, and specialised fast paths per layout."""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Callable, Mapping
from typing import Any

from acqhost.errors import CodecError
from acqhost.wire.codec._fields import (
    FieldDecoder,
    FieldEncoder,
    FieldSpec,
    Source,
    coerce_bytes,
    compile_field_decoder,
    compile_field_encoder,
    field_spec,
    no_layout_yet,
    unusable_field,
)
from acqhost.wire.codec._special import (
    SpecialDecoder,
    SpecialEncoder,
    ascii_like,
    build_decoder,
    build_encoder,
    mti_spec,
)

__all__ = ("Codec", "compile_spec")

# bit positions (1..8, most significant first) set in each byte value
_BITS = tuple(tuple(bit for bit in range(1, 9) if byte >> (8 - bit) & 1) for byte in range(256))
_HEX_TEXT = re.compile(r"(?:[0-9A-Fa-f]{16}){1,2}")
_HEX_HIGH = frozenset(b"89ABCDEFabcdef")
_ALL_FIELDS = frozenset(range(1, 193))
_PRIMARY = frozenset(range(1, 65))
_SECONDARY = frozenset(range(65, 129))
_TERTIARY = frozenset(range(129, 193))


class _Bitmap:
    """How one bitmap key (``p`` or ``1``) is carried: binary 8 bytes or text 16 bytes."""

    __slots__ = ("binary", "data_enc", "size")

    def __init__(self, fs: FieldSpec) -> None:
        self.data_enc = fs.data_enc
        self.binary = fs.binary
        self.size = 8 if fs.binary else 16


def _unexpected(exc: Exception, field: str, pos: int, decoding: bool) -> CodecError:
    what = "decode" if decoding else "encode"
    return CodecError(f"Failed to {what} message, {type(exc).__name__}: {exc}", field, pos,
                      decoding=decoding)  # fmt: skip


class Codec:
    """An ISO 8583 codec compiled from one pyiso8583 spec. Build it with :func:`compile_spec`.

    ``decode`` and ``encode`` give exactly what ``iso8583.decode(data, spec)[0]`` and
    ``bytes(iso8583.encode(fields, spec)[0])`` give, and reject exactly what they reject, with
    :class:`~acqhost.errors.CodecError` and the same message. Layouts seen at least
    ``specialize_after`` times get a function of their own; up to ``max_layouts`` of them are
    kept per direction.
    """

    def __init__(
        self, spec: Mapping[str, Mapping[str, Any]], *, specialize_after: int = 2,
        max_layouts: int = 512,
    ) -> None:  # fmt: skip
        if specialize_after < 1:
            raise ValueError("specialize_after must be at least 1")
        self.specialize_after = specialize_after
        self.max_layouts = max_layouts
        # Header, MTI and bitmaps are read for every message: they must be usable now. Data
        # fields are read only by the messages that carry them (pyiso8583 looks them up as
        # spec["2"], never spec[2]; other keys are not fields, metadata say).
        specs: dict[str, FieldSpec] = {}
        for key in ("h", "t", "p", "1"):
            if key in spec:
                raw = spec[key]
                if key != "h" and isinstance(raw, Mapping):
                    # pyiso8583 reads only data_enc of the MTI and the bitmaps
                    raw = {"len_enc": "ascii", "len_type": 0, "max_len": 0, **raw}
                try:
                    specs[key] = field_spec(key, raw)
                except (AttributeError, TypeError):
                    raise ValueError(f"spec field {key!r} is not a field spec mapping") from None
            elif key != "1":
                raise ValueError(f"spec lacks field {key!r}")
        self._mti = mti_spec(specs["t"].data_enc)
        self._mti_dec = compile_field_decoder(self._mti)
        self._mti_enc = compile_field_encoder(self._mti)
        h = specs["h"]
        self._header: FieldSpec | None = h if h.max_len > 0 else None
        self._header_dec = compile_field_decoder(h) if self._header else None
        self._header_enc = compile_field_encoder(h) if self._header else None
        self._bitmaps: dict[str, _Bitmap] = {
            key: _Bitmap(specs[key]) for key in ("p", "1") if key in specs
        }
        self._specs: dict[int, FieldSpec] = {}
        self._dec: dict[int, FieldDecoder] = {}
        self._enc: dict[int, FieldEncoder] = {}
        for key, raw in spec.items():
            if not (isinstance(key, str) and key.isascii() and key.isdigit()):
                continue
            if str(int(key)) != key or key == "0":
                continue
            try:
                fs = field_spec(key, raw)
            except (ValueError, AttributeError, TypeError) as e:
                # Unusable, but only a message that carries this field finds out (as with
                # pyiso8583); such layouts fail on the exact path and are never specialised.
                self._dec[int(key)], self._enc[int(key)] = unusable_field(key, str(e))
                continue
            self._specs[int(key)] = fs
            self._dec[int(key)] = compile_field_decoder(fs)
            self._enc[int(key)] = compile_field_encoder(fs)
        self._dec_cache: dict[bytes, SpecialDecoder] = {}
        self._dec_seen: dict[bytes, int] = {}
        self._enc_cache: dict[tuple[Any, ...], SpecialEncoder] = {}
        self._enc_seen: dict[tuple[Any, ...], int] = {}
        self._enc_last: list[SpecialEncoder] = [no_layout_yet]
        self._bitmap_start = self._fixed_bitmap_start()
        # Whether decode and encode count layouts toward specialised functions by themselves;
        # a host sets it False and calls learn_* for the messages it trusts (else any peer
        # could take every place, leaving the terminals' messages on the exact path).
        self.learning = True
        self._layout_key = self._build_layout_key()
        self.decode: Callable[[bytes | bytearray], dict[str, str]] = self._build_dispatch()
        """Decode one message; the same dict ``iso8583.decode(data, spec)[0]`` gives."""
        self.encode: Callable[[dict[str, str]], bytes] = self._build_encode_dispatch()
        """Encode a dict of fields (left unchanged); the bytes ``iso8583.encode`` gives."""

    # -- decoding ---------------------------------------------------------------------------

    def _fixed_bitmap_start(self) -> int | None:
        """Where the primary bitmap starts, when that is the same for every message."""
        for bm in self._bitmaps.values():
            if not (bm.binary or ascii_like(bm.data_enc)):
                return None
        h = self._header
        if h is None:
            return self._mti.max_len
        if h.len_type != 0 or h.max_len < 0:
            return None
        header_size = (h.max_len + 1) // 2 if h.nibbles else h.max_len
        return header_size + self._mti.max_len

    def _build_dispatch(self) -> Callable[[bytes | bytearray], dict[str, str]]:
        src = Source()
        general = src.name("general", self._decode_general)
        coerce = src.name("coerce", coerce_bytes)
        cache = src.name("cache", self._dec_cache)
        src.line("def decode(s):")
        src.indent()
        src.line("if s.__class__ is not bytes:")
        src.line(f"    s = {coerce}(s)")
        b0 = self._bitmap_start
        if b0 is not None:
            src.line("try:")
            src.indent()
            src.line(f"f = {cache}.get({self._key_expr(src, b0)})")
            src.dedent()
            src.line("except IndexError:")
            src.line(f"    return {general}(s)")
            src.line("if f is not None:")
            src.line("    try:")
            src.line("        return f(s)")
            src.line("    except Exception:")
            src.line("        pass")
        src.line(f"return {general}(s)")
        dispatch = src.build("decode", "<acqhost.wire.codec decode dispatch>")
        dispatch.__doc__ = "Decode one message (bytes) to a dict of field key -> str."
        return dispatch

    def _build_layout_key(self) -> Callable[[bytes], bytes | None]:
        """A message's key in the decoder cache, as the dispatch computes it (None: none)."""
        b0 = self._bitmap_start
        if b0 is None:
            return lambda s: None
        src = Source()
        src.line("def key(s):")
        src.line("    try:")
        src.line(f"        return {self._key_expr(src, b0)}")
        src.line("    except IndexError:")
        src.line("        return None")
        return src.build("key", "<acqhost.wire.codec layout key>")

    def learn_decoding(self, data: bytes) -> None:
        """Count the layout of ``data`` (trusted) toward a specialised decoder."""
        if len(self._dec_cache) >= self.max_layouts:
            return
        key = self._layout_key(data)
        if key is not None and key not in self._dec_cache:
            with contextlib.suppress(CodecError):
                self._decode_general(bytes(data), learn=True)

    def learn_encoding(self, fields: dict[str, str]) -> None:
        """Count the layout of ``fields`` (trusted) toward a specialised encoder."""
        key = tuple(fields)
        if key not in self._enc_cache and len(self._enc_cache) < self.max_layouts:
            with contextlib.suppress(CodecError):
                self._encode_general(fields, key, learn=True)

    def _key_expr(self, src: Source, b0: int) -> str:
        """Code for the raw bytes of every bitmap present, read from ``s`` at ``b0``."""
        p, sec = self._bitmaps["p"], self._bitmaps.get("1")
        high = src.name("HIGH", _HEX_HIGH)

        def first_bit(at: int, bm: _Bitmap) -> str:
            return f"s[{at}] & 128" if bm.binary else f"s[{at}] in {high}"

        one = b0 + p.size
        if sec is None:  # no secondary bitmap in the spec: such messages take the exact path
            return f"(None if {first_bit(b0, p)} else s[{b0}:{one}])"
        two, three = one + sec.size, one + 2 * sec.size
        return (
            f"((s[{b0}:{three}] if {first_bit(one, sec)} else s[{b0}:{two}]) "
            f"if {first_bit(b0, p)} else s[{b0}:{one}])"
        )

    def _bitmap(self, s: bytes, d: dict[str, str], i: int, key: str, offset: int,
                extended: bool, fields: set[int]) -> int:  # fmt: skip
        bm = self._bitmaps.get(key)
        if bm is None:
            raise CodecError(f"Field {key} is not defined in the spec", key, i)
        size: int = bm.size
        data = s[i : i + size]
        if len(data) != size:
            got, want = (len(data) + size, size * 2) if extended else (len(data), size)
            raise CodecError(f"Field data is {got} bytes, expecting {want}", key, i)
        if bm.binary:
            text = data.hex().upper()
            raw = data
        else:
            try:
                text = data.decode(bm.data_enc)
            except LookupError:
                raise CodecError(
                    "Failed to decode field, unknown encoding specified", key, i
                ) from None
            except Exception:
                raise CodecError("Failed to decode field, invalid data", key, i) from None
            try:
                raw = bytes.fromhex(text)
            except Exception:
                raise CodecError("Failed to decode field, non-hex data", key, i) from None
        d[key] = d[key] + text if extended else text
        for byte_idx, byte in enumerate(raw):
            base = offset + byte_idx * 8
            for bit in _BITS[byte]:
                fields.add(base + bit)
        return i + size

    def _decode_general(
        self, s: bytes, d: dict[str, str] | None = None, *, learn: bool = False
    ) -> dict[str, str]:
        """The reference path: pyiso8583's algorithm, compiled per field. Into ``d`` when
        given, which then keeps what decoded before an error. The layout counts toward a
        specialised decoder while :attr:`learning`, or when ``learn``."""
        if d is None:
            d = {}
        field, i = "h", 0
        try:
            if self._header_dec is not None:
                d["h"], i = self._header_dec(s, 0)
            field = "t"
            d["t"], i = self._mti_dec(s, i)
            fields: set[int] = set()
            field = "p"
            start = i
            i = self._bitmap(s, d, i, field, 0, False, fields)
            if 1 in fields:
                field = "1"
                i = self._bitmap(s, d, i, field, 64, False, fields)
                fields.remove(1)
            if 65 in fields:
                i = self._bitmap(s, d, i, field, 128, True, fields)
                fields.remove(65)
            bitmap_end = i
            order = sorted(fields)
            for number in order:
                field = str(number)
                dec = self._dec.get(number)
                if dec is None:
                    raise CodecError(f"Field {field} is not defined in the spec", field, i)
                d[field], i = dec(s, i)
            if i != len(s):
                raise CodecError("Extra data after last field", field, i)
        except CodecError:
            raise
        except Exception as e:  # the reference raises more than DecodeError; so do not we
            raise _unexpected(e, field, i, True) from e
        if self._bitmap_start is not None and (learn or self.learning):
            self._maybe_specialize_decoder(s, start, bitmap_end, d, order)
        return d

    def _maybe_specialize_decoder(
        self, s: bytes, start: int, end: int, d: dict[str, str], order: list[int]
    ) -> None:
        key = s[start:end]
        if key in self._dec_cache or len(self._dec_cache) >= self.max_layouts:
            return
        seen = self._dec_seen.get(key, 0) + 1
        if seen < self.specialize_after:
            if len(self._dec_seen) > 8 * self.max_layouts:
                self._dec_seen.clear()
            self._dec_seen[key] = seen
            return
        self._dec_seen.pop(key, None)
        # Only layouts whose bitmap bytes alone decide them: binary, or plain hex digits
        # (bytes.fromhex also skips spaces, which would make the key ambiguous).
        for k, bm in self._bitmaps.items():
            if k in d and not bm.binary and not _HEX_TEXT.fullmatch(d[k]):
                return
        bitmaps = []
        for k in ("p", "1"):
            if k in d:
                bm = self._bitmaps[k]
                size = (len(d[k]) // 16) * bm.size
                bitmaps.append((k, d[k], size))
        header = None
        if self._header is not None and self._header_dec is not None:
            header = (self._header, self._header_dec)
        fields = [(self._specs[n], self._dec[n]) for n in order]
        self._dec_cache[key] = build_decoder(
            header=header, mti=self._mti, bitmaps=bitmaps, fields=fields
        )

    def decode_partial(self, data: bytes | bytearray) -> dict[str, str]:
        """What of a message decodes, in order, up to the field where decoding fails: the
        header, MTI, bitmaps and the fields before that one, as ``decode`` gives them (all of
        them when the whole message decodes; ``{}`` when not even the header does). For the
        answer to a message that does not decode whole."""
        d: dict[str, str] = {}
        with contextlib.suppress(CodecError):
            self._decode_general(coerce_bytes(data), d)
        return d

    def peek_mti(self, data: bytes) -> str | None:
        """The MTI of a message that may not decode as a whole, or None when even the
        header and MTI do not (a host answers the former with a format error)."""
        try:
            i = 0
            if self._header_dec is not None:
                _, i = self._header_dec(data, 0)
            mti, _ = self._mti_dec(data, i)
        except Exception:
            return None
        return mti if len(mti) == 4 and mti.isdigit() else None

    # -- encoding ---------------------------------------------------------------------------

    def _build_encode_dispatch(self) -> Callable[[dict[str, str]], bytes]:
        src = Source()
        general = src.name("general", self._encode_general)
        cache = src.name("cache", self._enc_cache)
        # The specialised encoder used last is tried first, before the key tuple is even
        # built: it checks for itself that the dict has its keys and refuses any other.
        last = src.name("last", self._enc_last)
        src.line("def encode(fields):")
        src.indent()
        src.line("if fields.__class__ is not dict:")
        src.line("    if not isinstance(fields, dict):")
        src.line("        raise TypeError(f'Decoded ISO8583 data must be dict, not "
                 "{fields.__class__.__name__}')")  # fmt: skip
        src.line("else:")
        src.line("    try:")
        src.line(f"        return {last}[0](fields)")
        src.line("    except Exception:")
        src.line("        pass")
        src.line("key = tuple(fields)")
        src.line(f"f = {cache}.get(key)")
        src.line("if f is not None:")
        src.line("    try:")
        src.line("        out = f(fields)")
        src.line(f"        {last}[0] = f")
        src.line("        return out")
        src.line("    except Exception:")
        src.line("        pass")
        src.line(f"return {general}(fields, key)")
        dispatch = src.build("encode", "<acqhost.wire.codec encode dispatch>")
        dispatch.__doc__ = "Encode a dict of field key -> str to one message (bytes)."
        return dispatch

    def _bitmap_bytes(self, key: str, numbers: set[int], offset: int, pos: int) -> bytes:
        bm = self._bitmaps.get(key)
        if bm is None:
            raise CodecError(f"Field {key} is not defined in the spec", key, pos, decoding=False)
        raw = bytearray(8)
        for n in numbers:
            n -= 1 + offset
            raw[n // 8] |= 1 << (7 - n % 8)
        if bm.binary:
            return bytes(raw)
        try:
            return raw.hex().upper().encode(bm.data_enc)
        except LookupError:
            raise CodecError("Failed to encode field, unknown encoding specified", key, pos,
                             decoding=False) from None  # fmt: skip
        except Exception:
            raise CodecError("Failed to encode field, invalid data", key, pos,
                             decoding=False) from None  # fmt: skip

    def _encode_general(
        self, doc: dict[Any, Any], key: tuple[Any, ...], *, learn: bool = False
    ) -> bytes:
        """The reference path: pyiso8583's algorithm, without touching the caller's dict. The
        layout counts toward a specialised encoder while :attr:`learning`, or when ``learn``.

        It reads a shallow copy of the same type: looking a field up in a dict subclass may
        change it (a defaultdict adds the key), as it changes the dict pyiso8583 is given.
        """
        if doc.__class__ is not dict:
            doc = copy.copy(doc)
        out = bytearray()
        field = "h"
        try:
            # pyiso8583 pops these: bitmaps are always computed from the fields present.
            keys = [k for k in doc if k != "1" and k != "65"]
            if self._header is not None and self._header_enc is not None:
                if "h" not in doc:
                    raise CodecError("Field data is required according to specifications",
                                     "h", 0, decoding=False)  # fmt: skip
                out += self._header_enc(doc["h"], 0)
            field = "t"
            if "t" not in doc:
                raise CodecError("Field data is required", "t", len(out), decoding=False)
            out += self._mti_enc(doc["t"], len(out))
            field = "p"
            try:
                numbers = {int(k) for k in keys if k.isnumeric()}
            except AttributeError:
                bad = [k for k in keys if not isinstance(k, str)]
                raise CodecError(f"Dictionary contains invalid fields {bad}", "p", len(out),
                                 decoding=False) from None  # fmt: skip
            if not numbers <= _ALL_FIELDS:
                outside = sorted(numbers - _ALL_FIELDS)
                raise CodecError(f"Dictionary contains fields outside of 1-192 range {outside}",
                                 "p", len(out), decoding=False)  # fmt: skip
            tertiary = numbers & _TERTIARY
            if tertiary:
                numbers.add(65)
            secondary = numbers & _SECONDARY
            if secondary:
                numbers.add(1)
            bitmap_start = len(out)
            out += self._bitmap_bytes("p", numbers & _PRIMARY, 0, len(out))
            if 1 in numbers:
                field = "1"
                out += self._bitmap_bytes("1", secondary, 64, len(out))
                numbers.remove(1)
            if 65 in numbers:
                out += self._bitmap_bytes("1", tertiary, 128, len(out))
                numbers.remove(65)
            bitmap = bytes(out[bitmap_start:])
            order = sorted(numbers)
            for number in order:
                field = str(number)
                enc = self._enc.get(number)
                if enc is None:
                    raise CodecError(f"Field {field} is not defined in the spec", field,
                                     len(out), decoding=False)  # fmt: skip
                out += enc(doc[field], len(out))
        except CodecError:
            raise
        except Exception as e:  # the reference raises more than EncodeError; so do not we
            raise _unexpected(e, field, len(out), False) from e
        if learn or self.learning:
            self._maybe_specialize_encoder(key, keys, bitmap, order)
        return bytes(out)

    def _maybe_specialize_encoder(
        self, key: tuple[Any, ...], keys: list[Any], bitmap: bytes, order: list[int]
    ) -> None:
        if key in self._enc_cache or len(self._enc_cache) >= self.max_layouts:
            return
        seen = self._enc_seen.get(key, 0) + 1
        if seen < self.specialize_after:
            if len(self._enc_seen) > 8 * self.max_layouts:
                self._enc_seen.clear()
            self._enc_seen[key] = seen
            return
        self._enc_seen.pop(key, None)
        # Only plain layouts: every numeric key written the one way str(int) writes it.
        if any(k.isnumeric() and str(int(k)) != k for k in keys):
            return
        header = None
        if self._header is not None and self._header_enc is not None:
            header = (self._header, self._header_enc)
        self._enc_cache[key] = build_encoder(
            header=header,
            mti=(self._mti, self._mti_enc),
            bitmap=bitmap,
            fields=[(self._specs[n], self._enc[n]) for n in order],
            keys=key,
        )


def compile_spec(
    spec: Mapping[str, Mapping[str, Any]], *, specialize_after: int = 2, max_layouts: int = 512
) -> Codec:
    """Compile a pyiso8583 spec (``acqhost.wire.specs.load("acq87")``, say) to a :class:`Codec`.

    ValueError if the spec is not a usable pyiso8583 spec (a field lacking ``data_enc``,
    ``len_enc``, ``len_type`` or ``max_len``, or with values of the wrong type).
    """
    return Codec(spec, specialize_after=specialize_after, max_layouts=max_layouts)
