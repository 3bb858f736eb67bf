"""Message templates: one encoding of a request's layout, its varying fields spliced in.

A load tester sends the same layout of sale again and again with new values in a few
fixed-width fields (card, amount, 7, 11, 12, 13). Encoding the whole dict each time is most
of a request's cost; :func:`offsets` finds, once, where each varying field's bytes sit in the
encoded message, and a request is then the template with those bytes replaced. It refuses
(None) a layout where a field's value does not appear as its own bytes at one place (a
binary or BCD field, a length prefix that would change): the caller encodes the dict then.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

__all__ = ("offsets", "other_value")


def other_value(value: str) -> str:
    """A value of the same length differing from ``value`` in every character: each digit
    moved on by five, each other character replaced by one that is not it."""
    return "".join(
        str((int(c) + 5) % 10) if c.isdigit() else ("A" if c != "A" else "B") for c in value
    )


def offsets(
    encode: Callable[[dict[str, str]], bytes], fields: dict[str, str], varying: Iterable[str]
) -> dict[str, int] | None:
    """Where each ``varying`` field's ASCII bytes start in ``encode(fields)``, or None when
    changing one does not change exactly its own bytes there."""
    base = encode(fields)
    out = {}
    for key in varying:
        value = fields[key]
        changed = encode({**fields, key: other_value(value)})
        if len(changed) != len(base):
            return None
        diff = [i for i, (a, b) in enumerate(zip(base, changed, strict=True)) if a != b]
        if len(diff) != len(value) or diff[-1] - diff[0] != len(value) - 1:
            return None
        at = diff[0]
        if base[at : at + len(value)] != value.encode("ascii"):
            return None
        out[key] = at
    return out
