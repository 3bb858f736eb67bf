"""Straight-line decoders and encoders specialised for one message layout.

Messages of one kind repeat their bitmap, so for a bitmap seen often enough the codec writes a
function that knows every field's position rule, constant-folds the offsets it can, checks the
ASCII regions in a few ``bytes.isascii`` calls instead of one decode per field, and builds the
result dict in one literal. These functions are only fast, not exact about errors: at the first
thing they do not expect they raise, and the caller goes back to the exact reference path,
which then either decodes the message the same way or raises pyiso8583's own error.
"""

from __future__ import annotations

import binascii
import codecs
import functools
from collections.abc import Callable, Sequence
from typing import Any

from acqhost.wire.codec._fields import FieldEncoder, FieldSpec, Source, field_spec

__all__ = ("SpecialDecoder", "SpecialEncoder", "ascii_like", "build_decoder", "build_encoder")

SpecialDecoder = Callable[[bytes], dict[str, str]]
SpecialEncoder = Callable[[dict[Any, Any]], bytes]

# Length prefix tables are built up to this many entries; longer fields fall back.
_TABLE_CAP = 10_000

# BCD byte -> its value 0..99, or None for a byte with a nibble above 9.
_BCD = tuple(
    (b >> 4) * 10 + (b & 15) if (b >> 4) <= 9 and (b & 15) <= 9 else None for b in range(256)
)


class _Fallback(Exception):
    """Raised by specialised code for anything it does not expect."""


def canonical_codec(name: str) -> str | None:
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None


def ascii_like(name: str) -> bool:
    """True for text codecs that map ASCII bytes to the same characters, one byte each."""
    return canonical_codec(name) in ("ascii", "utf-8", "iso8859-1", "cp1252")


# The tables below are made once per field shape and shared by every layout's function (which
# only read them): built anew per layout, they cost about 100 KB of memory for each layout a
# peer makes the codec specialise.
@functools.cache
def _digit_table(width: int, max_len: int) -> dict[str, int]:
    """Zero-padded decimal text -> value, for 0..max_len (capped) that fit in ``width``."""
    top = min(max_len, 10**width - 1, _TABLE_CAP - 1)
    return {f"{n:0{width}d}": n for n in range(top + 1)}


class _Pos:
    """A byte offset known at generation time as ``var + off`` (var None: a constant)."""

    __slots__ = ("off", "var")

    def __init__(self, var: str | None, off: int) -> None:
        self.var = var
        self.off = off

    def plus(self, delta: int) -> _Pos:
        return _Pos(self.var, self.off + delta)

    def __str__(self) -> str:
        if self.var is None:
            return str(self.off)
        if self.off == 0:
            return self.var
        return f"{self.var} + {self.off}"


class _DecoderWriter:
    def __init__(self) -> None:
        self.src = Source()
        self.fallback = self.src.name("Fallback", _Fallback)
        self.run: _Pos | None = None  # start of the current ASCII region
        self.uses_text = False
        self.counter = 0

    def fresh(self, hint: str) -> str:
        self.counter += 1
        return f"{hint}{self.counter}"

    def ascii_region(self, start: _Pos) -> None:
        if self.run is None:
            self.run = start

    def close_run(self, end: _Pos) -> None:
        if self.run is not None:
            self.src.line(f"if not s[{self.run}:{end}].isascii():")
            self.src.line(f"    raise {self.fallback}")
            self.run = None

    def length(self, fs: FieldSpec, pos: _Pos) -> str:
        """Emit code that reads a length prefix at ``pos``; return the variable holding it."""
        src, n, lt = self.src, self.fresh("n"), fs.len_type
        end = pos.plus(lt)
        if fs.len_enc == "b":
            self.close_run(pos)
            if lt == 1:
                src.line(f"{n} = s[{pos}]")
            elif lt == 2:
                src.line(f"{n} = (s[{pos}] << 8) | s[{pos.plus(1)}]")
            else:
                src.line(f"{n} = int.from_bytes(s[{pos}:{end}], 'big')")
        elif fs.len_enc == "bcd":
            self.close_run(pos)
            bcd = src.name("BCD", _BCD)
            if lt <= 3:
                parts = [f"{bcd}[s[{pos.plus(j)}]]" for j in range(lt)]
                expr = parts[0]
                for part in parts[1:]:
                    expr = f"({expr}) * 100 + {part}"
                src.line(f"{n} = {expr}")
            else:
                src.line(f"{n} = int(s[{pos}:{end}].hex(), 10)")
        elif ascii_like(fs.len_enc):
            # Only plain digits up to max_len are in the table; anything else (" 7", "+7",
            # "07" beyond max_len...) misses it and takes the exact path.
            self.ascii_region(pos)
            self.uses_text = True
            table = src.name("LL", _digit_table(lt, fs.max_len))
            src.line(f"{n} = {table}[t[{pos}:{end}]]")
            return n
        else:
            self.close_run(pos)
            src.line(f"{n} = int(s[{pos}:{end}].decode({fs.len_enc!r}))")
        src.line(f"if not 0 <= {n} <= {fs.max_len}:")
        src.line(f"    raise {self.fallback}")
        return n

    def field(self, fs: FieldSpec, pos: _Pos, exact: Callable[..., Any], v: str) -> _Pos:
        """Emit code that stores the field at ``pos`` into ``v``; return the next offset."""
        src = self.src
        if fs.len_type == 0:
            if fs.max_len < 0:
                return self.exact(pos, exact, v)
            size = (fs.max_len + 1) // 2 if fs.nibbles else fs.max_len
            start, end = pos, pos.plus(size)
            odd = fs.nibbles and fs.max_len & 1 == 1
            odd_expr = "True" if odd else "False"
        else:
            n = self.length(fs, pos)
            start = pos.plus(fs.len_type)
            nxt = self.fresh("i")
            size_expr = f"(({n} + 1) >> 1)" if fs.nibbles else n
            src.line(f"{nxt} = {start} + {size_expr}")
            end = _Pos(nxt, 0)
            odd_expr = f"{n} & 1"
            odd = fs.nibbles
        if fs.binary:
            self.close_run(start)
            if not odd:
                src.line(f"{v} = s[{start}:{end}].hex().upper()")
                return end
            target, v = v, self.fresh("x")
            src.line(f"{v} = s[{start}:{end}].hex().upper()")
            fixed = odd_expr == "True"  # a fixed odd count: no test at run time
            if not fixed:
                src.line(f"if {odd_expr}:")
                src.indent()
            branch = "if"
            if fs.left_pad:
                src.line(f"if {v}[:1] == {fs.left_pad!r}:")
                src.line(f"    {v} = {v}[1:]")
                branch = "elif"
            if fs.right_pad:
                src.line(f"{branch} {v}[-1:] == {fs.right_pad!r}:")
                src.line(f"    {v} = {v}[:-1]")
                branch = "elif"
            if branch == "if":
                src.line(f"raise {self.fallback}")
            else:
                src.line("else:")
                src.line(f"    raise {self.fallback}")
            if not fixed:
                src.dedent()
            src.line(f"{target} = {v}")
        elif canonical_codec(fs.data_enc) == "ascii":
            self.ascii_region(start)
            self.uses_text = True
            src.line(f"{v} = t[{start}:{end}]")
        else:
            self.close_run(start)
            src.line(f"{v} = s[{start}:{end}].decode({fs.data_enc!r})")
        return end

    def exact(self, pos: _Pos, exact: Callable[..., Any], v: str) -> _Pos:
        self.close_run(pos)
        dec = self.src.name("dec", exact)
        nxt = self.fresh("i")
        self.src.line(f"{v}, {nxt} = {dec}(s, {pos})")
        return _Pos(nxt, 0)


def build_decoder(
    *,
    header: tuple[FieldSpec, Callable[..., Any]] | None,
    mti: FieldSpec,
    bitmaps: Sequence[tuple[str, str, int]],
    fields: Sequence[tuple[FieldSpec, Callable[..., Any]]],
) -> SpecialDecoder:
    """A decoder for messages whose bitmaps are exactly the raw bytes behind ``bitmaps``.

    ``header`` must be fixed-length (the caller keys on the bitmap's position). ``bitmaps`` is
    ``(key, decoded_text, encoded_size)`` per bitmap key in output order; ``fields`` the data
    fields in wire order with their exact decoders.
    """
    w = _DecoderWriter()
    src = w.src
    # Copying a template (the bitmaps already in it) and storing into it beats one large
    # dict literal; it also keeps pyiso8583's key order.
    template: dict[str, str] = {}
    if header is not None:
        template["h"] = ""
    template["t"] = ""
    template.update((key, text) for key, text, _ in bitmaps)
    template.update((fs.key, "") for fs, _ in fields)
    pos = _Pos(None, 0)
    if header is not None:
        pos = w.field(header[0], pos, header[1], "d['h']")
    pos = w.field(mti, pos, None, "d['t']")  # type: ignore[arg-type]
    w.close_run(pos)
    for _, _, size in bitmaps:
        pos = pos.plus(size)
    for fs, exact in fields:
        pos = w.field(fs, pos, exact, f"d[{fs.key!r}]")
    w.close_run(pos)
    src.line(f"if {pos} != len(s):")
    src.line(f"    raise {w.fallback}")
    src.line("return d")
    body = src.lines
    prologue = ["def decode(s):"]
    if w.uses_text:
        prologue.append("    t = s.decode('latin-1')")
    prologue.append(f"    d = {src.name('TEMPLATE', template)}.copy()")
    src.lines = prologue + ["    " + line for line in body]
    return src.build("decode", "<acqhost.wire.codec specialised decoder>")


@functools.cache
def _length_table(fs: FieldSpec, as_text: bool) -> tuple[Any, ...] | None:
    """Encoded length prefixes for 0..max_len, stopping where pyiso8583 would refuse one."""
    lt, out = fs.len_type, list[Any]()
    for n in range(min(fs.max_len, _TABLE_CAP - 1) + 1):
        if fs.len_enc == "b":
            if n >= 256**lt:
                break
            out.append(n.to_bytes(lt, "big"))
        elif fs.len_enc == "bcd":
            text = f"{n:0{lt * 2}d}"
            if len(text) > lt * 2:
                break
            out.append(binascii.a2b_hex(text))
        else:
            try:
                enc = bytes(f"{n:0{lt}d}", fs.len_enc)
            except Exception:
                return None
            if len(enc) > lt:
                break
            out.append(enc.decode("ascii") if as_text else enc)
    return tuple(out)


class _EncoderWriter:
    def __init__(self) -> None:
        self.src = Source()
        self.fallback = self.src.name("Fallback", _Fallback)
        self.a2b = self.src.name("a2b", binascii.a2b_hex)
        self.parts: list[tuple[bool, str]] = []  # (is_text, expression), in output order
        self.counter = 0

    def fresh(self, hint: str) -> str:
        self.counter += 1
        return f"{hint}{self.counter}"

    def check(self, cond: str) -> None:
        self.src.line(f"if {cond}:")
        self.src.line(f"    raise {self.fallback}")

    def field(self, fs: FieldSpec, v: str, exact: FieldEncoder) -> None:
        src = self.src
        text_data = canonical_codec(fs.data_enc) == "ascii" and not fs.binary and not fs.nibbles
        if fs.binary:
            b = self.fresh("b")
            if fs.nibbles:
                n = self.fresh("n")
                src.line(f"{n} = len({v})")
                pad = fs.left_pad or fs.right_pad
                if pad:
                    padded = f"{pad!r} + {v}" if fs.left_pad else f"{v} + {pad!r}"
                    src.line(f"{b} = {self.a2b}({padded} if {n} & 1 else {v})")
                else:
                    src.line(f"{b} = {self.a2b}({v})")
            else:
                src.line(f"{b} = {self.a2b}({v})")
                n = f"len({b})"
            data: tuple[bool, str] = (False, b)
        elif text_data:
            # Joined with its neighbours and encoded once, so only an exact str will do: a
            # subclass may have an encode() of its own, which pyiso8583 would call.
            self.check(f"{v}.__class__ is not str")
            n = f"len({v})"
            data = (True, v)
        elif not fs.nibbles and canonical_codec(fs.data_enc) is not None:
            b = self.fresh("b")
            src.line(f"{b} = {v}.encode({fs.data_enc!r})")
            n = f"len({b})"
            data = (False, b)
        else:
            self.parts.append((False, f"{self.src.name('enc', exact)}({v}, 0)"))
            return
        if fs.len_type == 0:
            self.check(f"{n} != {fs.max_len}")
            self.parts.append(data)
            return
        prefix_text = text_data and ascii_like(fs.len_enc)
        table = _length_table(fs, prefix_text)
        if table is None:
            self.parts.append((False, f"{self.src.name('enc', exact)}({v}, 0)"))
            return
        if not n.isidentifier():
            var = self.fresh("n")
            src.line(f"{var} = {n}")
            n = var
        # The table holds prefixes for 0..max_len only: a longer value misses it (IndexError)
        # and takes the exact path, which raises pyiso8583's error.
        self.parts.append((prefix_text, f"{src.name('LEN', table)}[{n}]"))
        self.parts.append(data)


def build_encoder(
    *,
    header: tuple[FieldSpec, FieldEncoder] | None,
    mti: tuple[FieldSpec, FieldEncoder],
    bitmap: bytes,
    fields: Sequence[tuple[FieldSpec, FieldEncoder]],
    keys: Sequence[str],
) -> SpecialEncoder:
    """An encoder for dicts whose keys are exactly ``keys`` (in any order: the output does not
    depend on it); ``fields`` are the data fields among them, ``bitmap`` their bitmaps.

    It checks that it was given such a dict (same size, every key there) so that a caller may
    try it on any dict and fall back when it raises.
    """
    w = _EncoderWriter()
    src = w.src
    src.line("def encode(d):")
    src.indent()
    w.check(f"len(d) != {len(keys)}")
    used = {fs.key for fs, _ in fields} | {"t"} | ({"h"} if header is not None else set())
    for key in keys:
        if key not in used:
            w.check(f"{key!r} not in d")
    if header is not None:
        src.line("h = d['h']")
        w.field(header[0], "h", header[1])
    src.line("m = d['t']")
    w.field(mti[0], "m", mti[1])
    w.parts.append((False, src.name("BITMAP", bitmap)))
    for fs, exact in fields:
        v = w.fresh("v")
        src.line(f"{v} = d[{fs.key!r}]")
        w.field(fs, v, exact)
    # Adjacent ASCII pieces are joined as text and encoded once.
    pieces: list[str] = []
    run: list[str] = []
    for is_text, expr in [*w.parts, (False, "")]:
        if is_text:
            run.append(expr)
            continue
        if len(run) == 1:
            pieces.append(f"{run[0]}.encode('ascii')")
        elif run:
            pieces.append("''.join((" + ", ".join(run) + ",)).encode('ascii')")
        run = []
        if expr:
            pieces.append(expr)
    src.line("return b''.join((" + ", ".join(pieces) + ",))")
    return src.build("encode", "<acqhost.wire.codec specialised encoder>")


def mti_spec(data_enc: str) -> FieldSpec:
    """The MTI read as the fixed-length field pyiso8583 treats it as."""
    return field_spec(
        "t",
        {"data_enc": data_enc, "len_enc": "ascii", "len_type": 0,
         "max_len": 2 if data_enc == "b" else 4},
    )  # fmt: skip
