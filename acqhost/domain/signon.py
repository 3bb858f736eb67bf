"""Sign-on freshness (PROTOCOL.md 4.2): how far a sign-on's field 7 is from the host's clock.

Field 7 (transmission date and time, ``MMDDhhmmss``, UTC) names no year. The year taken is the
one that puts it nearest the host's clock, so a sign-on sent just before New Year and received
just after it (or the other way round, with a terminal's clock a little ahead) is seconds old,
not a year. A sign-on further than ``signon_skew`` from the host's clock is refused, and so is
one the terminal already made (same field 7 and STAN): the store remembers accepted sign-ons
for :func:`remembered_for` seconds, long enough that a replay of one is stale by the time it
is forgotten.
"""

from __future__ import annotations

import datetime
import time

__all__ = ("field7_time", "offset", "remembered_for")

_UTC = datetime.UTC


def field7_time(field7: str, now: float) -> float | None:
    """The UTC time (seconds since the epoch) that ``field7`` (``MMDDhhmmss``) names in the
    year, of the one before, this one and the next, that puts it nearest ``now``; None when it
    is not ten digits naming a time of any of those years (the 29th of February names one only
    in a leap year)."""
    if len(field7) != 10 or not (field7.isdigit() and field7.isascii()):
        return None
    month, day, hour, minute, second = (int(field7[i : i + 2]) for i in range(0, 10, 2))
    year = time.gmtime(now).tm_year
    best: float | None = None
    for y in (year - 1, year, year + 1):
        try:
            at = datetime.datetime(y, month, day, hour, minute, second, tzinfo=_UTC).timestamp()
        except ValueError:  # no such date (or time) that year
            continue
        if best is None or abs(at - now) < abs(best - now):
            best = at
    return best


def offset(field7: str, now: float) -> float | None:
    """Seconds from ``now`` to the time ``field7`` names (negative: in the past); None when
    it names no time (:func:`field7_time`)."""
    at = field7_time(field7, now)
    return None if at is None else at - now


def remembered_for(skew: float) -> float:
    """How long an accepted sign-on must be remembered to refuse its replays: a sign-on whose
    field 7 is within ``skew`` of the clock when it is accepted is fresh until at most
    ``skew`` later again; after that its replay is refused as stale anyway."""
    return 2 * skew
