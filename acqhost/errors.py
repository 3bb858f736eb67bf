"""The one error hierarchy of acqhost.

The peer's fault (a frame or message we cannot accept: answered with response code 30 or a
closed connection) is a different class from our own bug, which propagates as whatever it is.
"""

from __future__ import annotations

__all__ = (
    "AcqHostError",
    "CodecError",
    "Decline",
    "FramingError",
    "ListenError",
    "StoreUnavailable",
    "TLVError",
)


class AcqHostError(Exception):
    """Base of every error acqhost raises on purpose."""


class CodecError(AcqHostError, ValueError):
    """An ISO 8583 message could not be decoded or encoded.

    ``field`` names the field where it failed (``"h"``, ``"t"``, ``"p"``, ``"1"`` or a field
    number as a string) and ``offset`` the byte offset in the message where that field starts
    (for encoding: where it would have started in the output). ``str(error)`` is the same text
    pyiso8583 gives for the same input: ``"<msg>: field <f> pos <n>"`` when decoding and
    ``"<msg>: field <f>"`` when encoding.
    """

    def __init__(self, msg: str, field: str, offset: int, *, decoding: bool = True) -> None:
        text = f"{msg}: field {field} pos {offset}" if decoding else f"{msg}: field {field}"
        super().__init__(text)
        self.msg = msg
        self.field = field
        self.offset = offset
        self.decoding = decoding

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_codec_error, (self.msg, self.field, self.offset, self.decoding))


def _rebuild_codec_error(msg: str, field: str, offset: int, decoding: bool) -> CodecError:
    return CodecError(msg, field, offset, decoding=decoding)


class FramingError(AcqHostError, ValueError):
    """A length header or frame that breaks the framing rules (zero, oversize, malformed,
    or a stream that ends inside a frame). The connection it came on must be closed."""


class TLVError(AcqHostError, ValueError):
    """Field 48 is not a well-formed sequence of ``TT LLL VALUE`` elements (response code 30).

    ``offset`` is the character offset in field 48 where the bad element starts.
    """

    def __init__(self, msg: str, offset: int) -> None:
        super().__init__(f"{msg} at offset {offset}")
        self.msg = msg
        self.offset = offset


class Decline(AcqHostError):
    """Ends a pipeline route with a response code (field 39) and an optional machine-readable
    reason (48 RS, sent with code 05). ``elements`` are other field 48 elements the answer
    carries (the RF and state of the request a refused 0300 concerns)."""

    def __init__(self, code: str, reason: str = "", elements: dict[str, str] | None = None) -> None:
        super().__init__(f"{code} {reason}".strip())
        self.code = code
        self.reason = reason
        self.elements = elements


class StoreOpenError(AcqHostError, ValueError):
    """The store named cannot be opened (not a database, unreachable, no such directory);
    the message is one line naming it, never a password."""


class StoreUnavailable(AcqHostError):
    """The store cannot be reached or written just now: its server is down or restarting, or
    its disk is full or failing. Not our bug and not the peer's: the request is answered 96,
    so nothing is approved; the store's next call tries again (on a new connection when the
    old one died). A PostgreSQL server that dies during a COMMIT may have made it durable:
    a sale's retransmission then gets 94, and nothing is applied twice. The message is one
    line, never a password or card data."""


class ListenError(AcqHostError, OSError):
    """The host cannot listen where it was told to (the port is taken, the address is not
    this machine's): an operator's mistake, said in one line."""
