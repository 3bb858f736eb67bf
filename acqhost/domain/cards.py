"""Card data: Luhn, track 2 and the masks shown and logged instead of card and account numbers.

Pure functions of the text they are given; they never log or keep anything.
"""

from __future__ import annotations

from typing import Final

from acqhost.errors import Decline

__all__ = ("luhn_ok", "mask_account", "mask_pan", "track2_card")


def mask_pan(pan: str) -> str:
    """First 6 and last 4 characters kept, ``*`` between (``622202*********0123``).

    Shorter than 13 characters: all but the last 4 masked; 4 or fewer: all masked.
    """
    return _mask(pan, 6, 13)


def mask_account(account: str) -> str:
    """First 4 and last 4 characters kept, ``*`` between (``6222********1234``, as 48 SA).

    Shorter than 12 characters: all but the last 4 masked; 4 or fewer: all masked.
    """
    return _mask(account, 4, 12)


def _mask(text: str, head: int, full_from: int) -> str:
    n = len(text)
    if n >= full_from:
        return text[:head] + "*" * (n - head - 4) + text[-4:]
    return _mask_short(text)


def _mask_short(text: str) -> str:
    n = len(text)
    if n <= 4:
        return "*" * n
    return "*" * (n - 4) + text[-4:]


# Every digit doubled, minus 9 when above 9, as the translation table of bytes.translate.
_LUHN_DOUBLED: Final = bytes.maketrans(b"0123456789", b"0246813579")


def luhn_ok(digits: str) -> bool:
    """True if ``digits`` is a non-empty string of ASCII digits passing the Luhn check."""
    if not digits or not digits.isascii() or not digits.isdigit():
        return False
    # From the right: the check digit and every second one plain, the others doubled. The
    # digit sum of a string is its bytes' sum minus 48 per character.
    data = digits.encode()
    total = sum(data[::-2]) + sum(data[-2::-2].translate(_LUHN_DOUBLED)) - 48 * len(data)
    return total % 10 == 0


def track2_card(track2: str) -> tuple[str, str]:
    """(PAN, expiry YYMM) of a track 2 (``PAN=YYMM...``, ``D`` for ``=`` allowed); 30 when it
    has no separator or no whole expiry, or either is not digits."""
    sep = track2.find("=")
    if sep < 0:
        sep = track2.find("D")
    pan, expiry = track2[:sep], track2[sep + 1 : sep + 5]
    if sep < 0 or len(expiry) != 4:
        raise Decline("30", "FORMAT_35")
    if not (pan.isdigit() and pan.isascii() and expiry.isdigit() and expiry.isascii()):
        raise Decline("30", "FORMAT_CARD")
    return pan, expiry
