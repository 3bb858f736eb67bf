"""Reading an answer's key fields without decoding it all: the load tester's fast path.

To match an answer and count it, the load tester needs fields 11, 37, 39 and 41 and whether a
MAC is present; decoding every field costs several times more. A :class:`Peeker` compiles,
for each answer layout it meets (MTI and primary bitmap), a function that walks the fields
before 41 by their lengths and slices out those four. Layouts it cannot walk (a field before
41 that is not ASCII-length-prefixed ASCII or fixed binary, a message header, a spec whose MTI
or bitmap is not the acq87 kind) get None, and the caller decodes the whole message instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

__all__ = ("Peeker",)

Peek = tuple[str, str, str, str, bool]  # 41, 11, 39 ("none" when absent), 37, MAC present
_WANTED: Final = (11, 37, 39, 41)
_TEXT: Final = frozenset(("ascii", "latin-1", "latin1"))


class Peeker:
    def __init__(self, spec: Mapping[str, Any]) -> None:
        t, p = spec.get("t", {}), spec.get("p", {})
        self.usable = (
            spec.get("h", {}).get("max_len", 0) == 0
            and t.get("data_enc") in _TEXT
            and t.get("len_type") == 0
            and t.get("max_len") == 4
            and p.get("data_enc") == "b"
            and p.get("len_type") == 0
            and p.get("max_len") == 8
        )
        self.spec = spec
        self._plans: dict[bytes, Callable[[bytes], Peek] | None] = {}

    def peek(self, message: bytes) -> Peek | None:
        """(41, 11, 39, 37, has a MAC) of ``message``, or None: decode it instead. Raises
        ValueError (or IndexError) on a message too short for its own bitmap."""
        head = message[:12]
        plan = self._plans.get(head)
        if plan is None:
            if head in self._plans or not self.usable or len(head) < 12:
                return None
            plan = self._plans[head] = self._compile(head)
            if plan is None:
                return None
        return plan(message)

    def _compile(self, head: bytes) -> Callable[[bytes], Peek] | None:
        bitmap = int.from_bytes(head[4:12], "big")
        secondary = bool(bitmap >> 63 & 1)
        present = [n for n in range(2, 65) if bitmap >> (64 - n) & 1]
        lines = ["def peek(m):", f"    o = {20 if secondary else 12}"]
        out = dict.fromkeys(_WANTED, "''")
        for n in present:
            if n > 41:
                break
            fs = self.spec.get(str(n))
            if fs is None:
                return None
            enc, len_type, size = fs.get("data_enc"), fs.get("len_type"), fs.get("max_len")
            if len_type == 0:
                if enc not in _TEXT and enc != "b":
                    return None
                if n in _WANTED:
                    lines.append(f"    f{n} = m[o:o + {size}].decode('latin-1')")
                    out[n] = f"f{n}"
                lines.append(f"    o += {size}")
            else:
                if enc not in _TEXT or fs.get("len_enc") not in _TEXT or len_type > 3:
                    return None
                lines.append(f"    n = int(m[o:o + {len_type}])")
                if n in _WANTED:
                    lines.append(
                        f"    f{n} = m[o + {len_type}:o + {len_type} + n].decode('latin-1')"
                    )
                    out[n] = f"f{n}"
                lines.append(f"    o += {len_type} + n")
        rc = out[39] if out[39] != "''" else "'none'"
        mac = "bool(m[19] & 1)" if secondary else "bool(m[11] & 1)"
        lines.append(f"    return ({out[41]}, {out[11]}, {rc}, {out[37]}, {mac})")
        namespace: dict[str, Any] = {}
        exec(compile("\n".join(lines), "<acqhost-load peek>", "exec"), namespace)
        fn: Callable[[bytes], Peek] = namespace["peek"]
        return fn
