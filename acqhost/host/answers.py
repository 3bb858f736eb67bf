"""What a failure answer carries (PROTOCOL.md 3), written once for every route, for requests
without a route and for frames that do not decode whole.

A failure answer (any code but 00) has the response MTI, field 39, whichever of the request's
fields 7, 11, 41 and 42 decoded and the echo fields of its message type (a 0210 echoes 3, 4, 7,
11, 12, 13, 41, 42 and 49), so that a client matching answers by STAN and terminal can match it;
field 48 only when the failure names elements (05 RS, 95 totals, 94 the request's RF). Nothing
else of an answer being built survives a failure (no 37, 38 or settlement account of a sale the
ledger refused). Answers with 03, 58 and 63 carry no MAC, there being no trusted key to make
one; other answers to requests whose MAC verified carry one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from acqhost.wire.tlv import encode_tlv

__all__ = ("MATCH_FIELDS", "UNMACED_CODES", "carries_mac", "echo_fields", "failure_answer")

MATCH_FIELDS = ("7", "11", "41", "42")  # echoed by every failure answer, whatever its message
UNMACED_CODES = frozenset(("03", "58", "63"))


def echo_fields(message_echo: Iterable[str]) -> tuple[str, ...]:
    """The fields a failure answer echoes for a message whose answers echo ``message_echo``:
    those and :data:`MATCH_FIELDS`, in field order."""
    return tuple(sorted({*MATCH_FIELDS, *message_echo}, key=int))


def failure_answer(
    req: Mapping[str, str],
    mti: str,
    code: str,
    echo: Iterable[str],
    elements: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The fields of the answer ``mti`` with code ``code`` to ``req`` (what of it decoded):
    the fields named by ``echo`` that ``req`` has, 39, and 48 when there are ``elements``."""
    resp = {"t": mti}
    for name in echo:
        value = req.get(name)
        if value is not None:
            resp[name] = value
    resp["39"] = code
    if elements:
        resp["48"] = encode_tlv(dict(elements))
    return resp


def carries_mac(code: str, request_mac_verified: bool) -> bool:
    """Whether the answer with ``code`` carries a MAC: when the request's verified, unless the
    code is 03, 58 or 63."""
    return request_mac_verified and code not in UNMACED_CODES
