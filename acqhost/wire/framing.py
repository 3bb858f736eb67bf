"""Sans-I/O message framing: length headers in, whole ISO 8583 messages out.

The server feeds whatever bytes a read returned into a :class:`FrameDecoder` and gets back the
complete frames; it writes what a :class:`FrameEncoder` returns. Nothing here touches a socket,
so every framing rule is testable with plain bytes (the h11 shape).

Three framings, chosen by name (PROTOCOL.md section 1):

``"len2"``
    2-byte unsigned big-endian length of the message that follows (jPOS NACChannel style).
    The ACQ1 default.
``"len4"``
    4 ASCII decimal digits giving the length of the message (jPOS ASCIIChannel style).
``"len2-tpdu"``
    2-byte big-endian length, then a 5-byte TPDU (``0x60`` + dest(2) + src(2)), then the
    message; the length counts TPDU + message (China UnionPay style).
"""

from __future__ import annotations

from typing import Final, NamedTuple

from acqhost.errors import FramingError

__all__ = (
    "FRAMINGS",
    "TPDU_ID",
    "TPDU_SIZE",
    "Frame",
    "FrameDecoder",
    "FrameEncoder",
    "reply_tpdu",
)

FRAMINGS: Final = ("len2", "len4", "len2-tpdu")
"""The framing names accepted by :class:`FrameDecoder` and :class:`FrameEncoder`."""

TPDU_ID: Final = 0x60
"""First byte of every TPDU."""

TPDU_SIZE: Final = 5
"""Bytes in a TPDU: ``0x60`` + destination address (2) + source address (2)."""

_HEADER_SIZE: Final = {"len2": 2, "len4": 4, "len2-tpdu": 2}
# The largest length each header can express.
_HEADER_LIMIT: Final = {"len2": 0xFFFF, "len4": 9999, "len2-tpdu": 0xFFFF}
# The smallest legal length value: a TPDU frame needs its TPDU and at least one message byte.
_MIN_LENGTH: Final = {"len2": 1, "len4": 1, "len2-tpdu": TPDU_SIZE + 1}


class Frame(NamedTuple):
    """One decoded frame: the message bytes and, for ``"len2-tpdu"``, its 5-byte TPDU."""

    message: bytes
    tpdu: bytes = b""


def _check_config(framing: str, max_size: int) -> None:
    if framing not in _HEADER_SIZE:
        raise ValueError(f"unknown framing {framing!r}; expected one of {', '.join(FRAMINGS)}")
    low, high = _MIN_LENGTH[framing], _HEADER_LIMIT[framing]
    if isinstance(max_size, bool) or not isinstance(max_size, int) or not low <= max_size <= high:
        raise ValueError(
            f"max_size {max_size!r} out of range for framing {framing!r} ({low} to {high})"
        )


def _check_tpdu(tpdu: bytes) -> None:
    if len(tpdu) != TPDU_SIZE:
        raise FramingError(f"TPDU must be {TPDU_SIZE} bytes, got {len(tpdu)}: {bytes(tpdu)!r}")
    if tpdu[0] != TPDU_ID:
        raise FramingError(f"TPDU starts with 0x{tpdu[0]:02x}, expected 0x{TPDU_ID:02x}")


def _length_error(length: int, max_size: int) -> FramingError:
    if length == 0:
        return FramingError("zero-length frame")
    return FramingError(f"frame length {length} exceeds max_size {max_size}")


def _len4_header_error(header: bytes | bytearray) -> FramingError:
    return FramingError(f"len4 header {bytes(header)!r} is not 4 ASCII digits")


def reply_tpdu(tpdu: bytes) -> bytes:
    """Return the TPDU for a reply to a frame that carried ``tpdu``: destination and source
    addresses swapped, as a host does.

    Raises :class:`FramingError` if ``tpdu`` is not 5 bytes starting with ``0x60``.
    """
    _check_tpdu(tpdu)
    return bytes(tpdu[0:1]) + bytes(tpdu[3:5]) + bytes(tpdu[1:3])


class FrameDecoder:
    """Incremental decoder: feed it bytes as they arrive, get back every complete frame.

    A length header is checked as soon as it is complete, so an oversize or malformed header
    is refused before its body is buffered. Any :class:`FramingError` kills the decoder: the
    peer's stream can no longer be trusted to be in step, and the caller closes the connection.

    When one :meth:`feed` holds good frames followed by a bad header, the good frames are
    returned and the error is raised by the next :meth:`feed` or :meth:`end_of_stream` call
    (like h11's ``next_event``), so requests a terminal pipelined before the garbage still get
    their answers. :attr:`error` shows the pending error at once for callers that want to
    close without waiting.
    """

    __slots__ = ("_buf", "_error", "_error_raised", "_framing", "_header_size", "_max_size")

    def __init__(self, framing: str = "len2", max_size: int = 4096) -> None:
        """Raise ValueError for an unknown ``framing`` or a ``max_size`` the header cannot
        express (1 to 65535 for len2, 1 to 9999 for len4, 6 to 65535 for len2-tpdu).
        ``max_size`` bounds the header's length value (for len2-tpdu: TPDU + message)."""
        _check_config(framing, max_size)
        self._framing = framing
        self._max_size = max_size
        self._header_size = _HEADER_SIZE[framing]
        self._buf = bytearray()
        self._error: FramingError | None = None
        self._error_raised = False

    @property
    def framing(self) -> str:
        """The framing name this decoder was built for."""
        return self._framing

    @property
    def max_size(self) -> int:
        """The largest length value accepted in a header."""
        return self._max_size

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as part of a frame."""
        return len(self._buf)

    @property
    def error(self) -> FramingError | None:
        """The error that killed this decoder, or None while it is healthy."""
        return self._error

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Add ``data`` (any amount, possibly empty) and return the frames now complete, in
        stream order (frame fields are always ``bytes``). Raises :class:`FramingError` on a
        framing violation, and on every call once the decoder has failed."""
        if self._error is not None:
            raise self._raise_dead()
        buf = self._buf
        src: bytes | bytearray
        if buf:
            buf += data
            src = buf
        else:
            # Nothing buffered (the usual case): parse the caller's bytes in place, so
            # whole frames are sliced straight out of them and only a tail is copied.
            src = data if type(data) is bytes else bytes(data)
        frames: list[Frame] = []
        try:
            if self._framing == "len2":
                pos = self._scan_len2(src, frames)
            elif self._framing == "len4":
                pos = self._scan_len4(src, frames)
            else:
                pos = self._scan_tpdu(src, frames)
        except FramingError as exc:
            self._error = exc
            buf.clear()
            if frames:
                return frames
            self._error_raised = True
            raise
        if src is buf:
            if pos:
                del buf[:pos]
        elif pos < len(src):
            buf += src[pos:]
        return frames

    def end_of_stream(self) -> None:
        """Tell the decoder the peer closed its side. Raises :class:`FramingError` if a
        partial length header or partial frame is buffered (or the decoder has failed)."""
        if self._error is not None:
            raise self._raise_dead()
        buf = self._buf
        have = len(buf)
        if not have:
            return
        header = self._header_size
        if have < header:
            exc = FramingError(
                f"stream ended inside a {header}-byte length header ({have} bytes received)"
            )
        else:
            length = int(buf[:4]) if self._framing == "len4" else (buf[0] << 8) | buf[1]
            exc = FramingError(
                f"stream ended inside a frame: {have - header} of {length} bytes received"
            )
        self._error = exc
        self._error_raised = True
        buf.clear()
        raise exc

    def _raise_dead(self) -> FramingError:
        error = self._error
        assert error is not None
        if not self._error_raised:
            # Deferred from a feed() that returned good frames: the caller has not seen it yet.
            self._error_raised = True
            return error
        return FramingError(f"decoder already failed: {error}")

    # The three scanners are separate tight loops (no per-frame dispatch on the framing).
    # Each appends complete frames to ``frames`` and returns the offset of the first byte not
    # consumed; a partial header or frame stays for the next feed.

    def _scan_len2(self, src: bytes | bytearray, frames: list[Frame]) -> int:
        max_size = self._max_size
        append = frames.append
        n = len(src)
        pos = 0
        while n - pos >= 2:
            length = (src[pos] << 8) | src[pos + 1]
            if length == 0 or length > max_size:
                raise _length_error(length, max_size)
            end = pos + 2 + length
            if end > n:
                break
            append(Frame(bytes(src[pos + 2 : end])))
            pos = end
        return pos

    def _scan_len4(self, src: bytes | bytearray, frames: list[Frame]) -> int:
        max_size = self._max_size
        append = frames.append
        n = len(src)
        pos = 0
        while n - pos >= 4:
            header = src[pos : pos + 4]
            if not header.isdigit():  # bytes.isdigit: ASCII 0-9 only, so no sign or space
                raise _len4_header_error(header)
            length = int(header)
            if length == 0 or length > max_size:
                raise _length_error(length, max_size)
            end = pos + 4 + length
            if end > n:
                break
            append(Frame(bytes(src[pos + 4 : end])))
            pos = end
        if 0 < n - pos < 4 and not src[pos:n].isdigit():
            # A partial header that can never become 4 digits: fail now, not at the read timeout.
            raise _len4_header_error(src[pos:n])
        return pos

    def _scan_tpdu(self, src: bytes | bytearray, frames: list[Frame]) -> int:
        max_size = self._max_size
        append = frames.append
        n = len(src)
        pos = 0
        while n - pos >= 2:
            length = (src[pos] << 8) | src[pos + 1]
            if length == 0 or length > max_size:
                raise _length_error(length, max_size)
            if length < TPDU_SIZE:
                raise FramingError(f"frame length {length} leaves no room for the 5-byte TPDU")
            if length == TPDU_SIZE:
                raise FramingError("frame length 5 holds a TPDU but no message")
            if n - pos > 2 and src[pos + 2] != TPDU_ID:
                raise FramingError(f"TPDU starts with 0x{src[pos + 2]:02x}, expected 0x60")
            end = pos + 2 + length
            if end > n:
                break
            append(Frame(bytes(src[pos + 7 : end]), bytes(src[pos + 2 : pos + 7])))
            pos = end
        return pos


class FrameEncoder:
    """Puts the length header (and TPDU) in front of an encoded message."""

    __slots__ = ("_framing", "_max_size")

    def __init__(self, framing: str = "len2", max_size: int = 4096) -> None:
        """Same ``framing`` and ``max_size`` rules as :class:`FrameDecoder`."""
        _check_config(framing, max_size)
        self._framing = framing
        self._max_size = max_size

    @property
    def framing(self) -> str:
        """The framing name this encoder was built for."""
        return self._framing

    @property
    def max_size(self) -> int:
        """The largest length value this encoder writes."""
        return self._max_size

    def encode(self, message: bytes, tpdu: bytes = b"") -> bytes:
        """Return ``message`` framed for the wire.

        For ``"len2-tpdu"`` a 5-byte ``tpdu`` starting with ``0x60`` is required (usually
        :func:`reply_tpdu` of the request's); the other framings take none. Raises
        :class:`FramingError` for an empty message, a length over ``max_size`` (the length
        counts the TPDU) or a wrong TPDU.
        """
        framing = self._framing
        if framing == "len2-tpdu":
            _check_tpdu(tpdu)
            length = TPDU_SIZE + len(message)
        elif tpdu:
            raise FramingError(f"framing {framing!r} carries no TPDU, got {bytes(tpdu)!r}")
        else:
            length = len(message)
        if not message:
            raise FramingError("cannot frame an empty message")
        if length > self._max_size:
            raise FramingError(f"frame length {length} exceeds max_size {self._max_size}")
        if framing == "len4":
            return b"%04d" % length + message
        if framing == "len2":
            return length.to_bytes(2, "big") + message
        return length.to_bytes(2, "big") + tpdu + message
