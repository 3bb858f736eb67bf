"""The load tester's message builder: what each terminal sends and how it learns from answers.

Pure, synchronous and free of I/O, so the asyncio engine (``acqhost-load``), the Locust user
class and the tests share it. A :class:`LoadTerminal` is one terminal: its identity (a key
file, PROTOCOL.md 4.1), its session keys once signed on, its STAN sequence, and what it has
learnt from the host's answers (approved sales it may reverse, its open batch and totals).

Every request gets a fresh STAN and today's dates (fields 7, 12, 13, UTC). The n-th request of
a terminal in a run uses sequence number ``seq = start + n``: STAN ``seq % 999,999 + 1`` and
field 13 moved on ``seq // 999,999`` days, so that no two requests of a run share the host's
duplicate key (41, 11, 13) however long it runs. Unless given, ``start`` is a thousand numbers
per second since midnight UTC (:func:`clock_start`), so that runs one after another against
one store do not meet either while each terminal averages at most 1,000 requests a second
(a meeting would be a 94, counted like any answer; ``--stan-start`` sets it by hand).
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import random
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NamedTuple

from acqhost.domain import crypto
from acqhost.domain.cards import luhn_ok
from acqhost.wire import specs
from acqhost.wire.codec import Codec, compile_spec
from acqhost.wire.framing import FrameEncoder
from acqhost.wire.tlv import decode_tlv, encode_tlv
from simulators.load.template import offsets

__all__ = (
    "KINDS",
    "LoadTerminal",
    "Mix",
    "RebindData",
    "Request",
    "SignOn",
    "load_spec",
    "luhn_digit",
    "test_pan",
)

# The kinds of request a synthetic run mixes (README, "Load testing").
KINDS: Final = ("sale", "test_sale", "reversal", "inquiry", "rebind", "batch_close")
TPDU: Final = bytes.fromhex("6000010000")
TEST_BIN: Final = "622202"  # test cards: this prefix, then digits, then a Luhn check digit
_NO_MAC: Final = "0" * 16  # the MAC field's place while the body is encoded
_CARDS: Final = 16  # test cards each terminal's sales take in turn
_REVERSIBLE: Final = 256  # approved sales a terminal remembers for reversals
_STANS: Final = 999_999  # STANs 000001 to 999999
_PER_SECOND: Final = 1_000  # clock_start's numbers per second


def load_spec(name: str) -> dict[str, dict[str, Any]]:
    """A bundled spec by name (``acq87``, ``cup-pos``), or a pyiso8583 spec in a JSON file
    (a name ending ``.json``): for hosts that speak another dialect. ValueError when it is
    neither, or the file is not a spec the codec can compile."""
    if not name.endswith(".json"):
        return specs.load(name)
    try:
        spec = json.loads(Path(name).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"spec file {name}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"spec file {name}: not JSON ({exc.msg})") from None
    if not isinstance(spec, dict):
        raise ValueError(f"spec file {name}: not a pyiso8583 spec (a JSON object of fields)")
    try:
        compile_spec(spec)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"spec file {name}: {exc}") from None
    return spec


@functools.lru_cache(maxsize=8)
def _dialect(name: str) -> tuple[dict[str, dict[str, Any]], Codec]:
    """The spec ``name`` and its compiled codec, made once for all the terminals of a run
    (read only: a codec keeps no state of a message between calls)."""
    spec = load_spec(name)
    return spec, compile_spec(spec)


def clock_start(now: float | None = None) -> int:
    """Where a terminal's sequence starts when no ``stan_start`` is given: a thousand numbers
    per second since midnight UTC, so that runs one after another never meet as long as each
    sends at most 1,000 requests a second per terminal on average."""
    seconds = (time.time() if now is None else now) % 86_400
    return int(seconds * _PER_SECOND)


def luhn_digit(body: str) -> str:
    """The check digit that makes ``body`` + it pass Luhn."""
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


def test_pan(seed: str, length: int = 19) -> str:
    """A Luhn-valid test card number of ``length`` digits, the same for the same ``seed``:
    ``622202``, digits of a hash of the seed, the check digit."""
    digits = str(int.from_bytes(hashlib.blake2b(seed.encode(), digest_size=16).digest(), "big"))
    body = (TEST_BIN + digits)[: length - 1]
    pan = body + luhn_digit(body)
    assert luhn_ok(pan)
    return pan


class Request(NamedTuple):
    """One request ready to send: its frame, the key its answer is matched by (41, 11, and 37
    when the request carries one), its MTI and kind, and its fields (to learn from the
    answer). A named tuple: made for every request, it must be cheap."""

    frame: bytes
    key: tuple[str, ...]
    mti: str
    kind: str
    fields: dict[str, str] | None = None


@dataclass(slots=True)
class SignOn:
    """A sign-on in progress: the request's fields and the ephemeral key pair."""

    fields: dict[str, str]
    kx_public: bytes
    kx_secret: bytes = field(repr=False)


def answer_key(fields: Mapping[str, str], with_rrn: bool) -> tuple[str, ...]:
    """The key an answer is matched to its request by."""
    if with_rrn:
        return (fields.get("41", ""), fields.get("11", ""), fields.get("37", ""))
    return (fields.get("41", ""), fields.get("11", ""))


def _today() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class LoadTerminal:
    """One terminal of a load run (see the module's docstring)."""

    def __init__(
        self,
        key_file: Mapping[str, Any],
        *,
        spec: str | None = None,
        framing: str | None = None,
        mac: bool = True,
        stan_start: int | None = None,
        clock: Callable[[], datetime.datetime] = _today,
    ) -> None:
        self.tid: str = str(key_file["tid"])
        self.mid: str = str(key_file["mid"])
        seed = key_file.get("terminal_signing_key")
        self.seed = bytes.fromhex(seed) if seed else None
        host_pk = key_file.get("host_public_key")
        self.host_public_key = bytes.fromhex(host_pk) if host_pk else None
        self.framing: str = framing or str(key_file.get("framing", "len2"))
        self.spec, self.codec = _dialect(spec or str(key_file.get("spec", "acq87")))
        self.mac = mac
        self.keys: crypto.SessionKeys | None = None
        self.clock = clock
        self._encoder = FrameEncoder(self.framing)
        self._mac_fields: dict[tuple[str, ...], str] = {}  # field layout -> its MAC field
        # the sale's template (template.py), once compiled: None when the layout has none
        self._sale_template: tuple[str, ...] | None = None
        self._sale_compiled = False
        self._tpdu = TPDU if self.framing == "len2-tpdu" else b""
        start = clock_start() if stan_start is None else stan_start
        self._seq = start
        self._day0 = clock().date()
        self._date_cache: tuple[int | None, tuple[str, str, str]] | None = None
        self._shifted = (0, "")  # (days, field 13 that many days after the run's first day)
        self.pans = [test_pan(f"{self.tid}/card/{i}") for i in range(_CARDS)]
        # learnt from answers
        self.approved: deque[dict[str, str]] = deque(maxlen=_REVERSIBLE)
        self.batch = 0  # the open batch as the host named it (0: not known yet)
        self.batch_count = 0  # approved, unreversed sales since the host's last totals
        self.batch_amount = 0

    @classmethod
    def plain(cls, tid: str, mid: str, **kwargs: Any) -> LoadTerminal:
        """A terminal with no keys (``--no-mac --no-signon`` against any ISO 8583 host)."""
        return cls({"tid": tid, "mid": mid}, mac=False, **kwargs)

    # -- numbering ---------------------------------------------------------------------------

    def next_numbers(self) -> dict[str, str]:
        """Fields 7, 11, 12 and 13 of the next request."""
        f7, f11, f12, f13 = self._numbers()
        return {"7": f7, "11": f11, "12": f12, "13": f13}

    def _numbers(self) -> tuple[str, str, str, str]:
        seq = self._seq
        self._seq = seq + 1
        stan, days = seq % _STANS + 1, seq // _STANS
        # fields 7, 12 and 13 are made once a second (strftime is dear at load rates)
        second = int(time.time()) if self.clock is _today else None
        cached = self._date_cache
        if second is None or cached is None or cached[0] != second:
            now = self.clock()
            texts = (now.strftime("%m%d%H%M%S"), now.strftime("%H%M%S"), now.strftime("%m%d"))
            cached = self._date_cache = (second, texts)
        f7, f12, f13 = cached[1]
        if days:
            shifted = self._shifted
            if shifted[0] != days:
                day = self._day0 + datetime.timedelta(days=days)
                shifted = self._shifted = (days, day.strftime("%m%d"))
            f13 = shifted[1]
        return f7, f"{stan:06d}", f12, f13

    # -- sign-on -----------------------------------------------------------------------------

    def signon(self) -> SignOn:
        """The 0800 sign-on request (PROTOCOL.md 4.2); give its answer to :meth:`signed_on`."""
        if self.seed is None:
            raise ValueError(f"terminal {self.tid} has no signing key: it cannot sign on")
        kx_pk, kx_sk = crypto.kx_keypair()
        n = self.next_numbers()
        transcript = crypto.signon_request_transcript(self.tid, n["11"], n["7"], kx_pk)
        tlv = encode_tlv({"KX": kx_pk.hex(), "SG": crypto.sign(self.seed, transcript).hex()})
        fields = {"t": "0800", "7": n["7"], "11": n["11"], "41": self.tid, "42": self.mid,
                  "48": tlv, "70": "001"}  # fmt: skip
        return SignOn(fields, kx_pk, kx_sk)

    def signed_on(self, pending: SignOn, answer: Mapping[str, str]) -> None:
        """Take the session keys from a sign-on's answer; ValueError when it is not a good
        one (not 00, or the host's signature does not verify)."""
        rc = answer.get("39")
        if rc != "00":
            raise ValueError(f"sign-on of {self.tid} answered {rc}")
        reply = decode_tlv(answer.get("48", ""))
        kx_host = bytes.fromhex(reply["KX"])
        signed = crypto.signon_response_transcript(
            self.tid, pending.fields["11"], kx_host, pending.kx_public
        )
        if self.host_public_key is None or not crypto.verify(
            self.host_public_key, signed, bytes.fromhex(reply["SG"])
        ):
            raise ValueError(f"the host's signature on {self.tid}'s sign-on does not verify")
        rx, tx = crypto.terminal_session(pending.kx_public, pending.kx_secret, kx_host)
        self.keys = crypto.SessionKeys.from_kx(rx, tx)

    def static_session(self) -> None:
        """Session keys derived from the identity key alone, without a sign-on: for targets
        that echo or do not check MACs (``--no-signon`` with MACs on), never a real host."""
        if self.seed is None:
            raise ValueError(f"terminal {self.tid} has no signing key to derive keys from")
        k = hashlib.blake2b(self.seed, person=b"acqhost-load", digest_size=32).digest()
        self.keys = crypto.SessionKeys.from_kx(k, k)

    # -- encoding ----------------------------------------------------------------------------

    def encode(self, fields: dict[str, str], *, mac: bool | None = None) -> bytes:
        """The message of ``fields``, MAC'd (field 64, or 128 with a secondary bitmap) under
        the session key when this terminal MACs and ``mac`` is not False."""
        if not (self.mac if mac is None else mac):
            return self.codec.encode(fields)
        if self.keys is None:
            raise ValueError(f"terminal {self.tid} is not signed on")
        layout = tuple(fields)
        mac_field = self._mac_fields.get(layout)
        if mac_field is None:
            secondary = any(k.isdigit() and int(k) > 64 for k in fields)
            mac_field = self._mac_fields[layout] = "128" if secondary else "64"
        body = self.codec.encode({**fields, mac_field: _NO_MAC})[:-8]
        return body + hashlib.blake2b(body, key=self.keys.tx_mac, digest_size=8).digest()

    def frame(self, message: bytes) -> bytes:
        return self._encoder.encode(message, self._tpdu)

    def sale_request(self, amount: int, *, keep_fields: bool) -> Request:
        """A sale, as :meth:`sale_fields` and :meth:`request` make it, spliced into this
        terminal's sale template (template.py) when its layout allows one: the fields dict
        is made only when ``keep_fields`` (to learn from the answer)."""
        if not self._sale_compiled:
            self._sale_template = self._compile_sale()
            self._sale_compiled = True
        template = self._sale_template
        pan = self.pans[self._seq % _CARDS]
        f7, f11, f12, f13 = self._numbers()
        f4 = f"{amount:012d}"
        fields: dict[str, str] | None = None
        if keep_fields or template is None:
            fields = self._sale(pan, f4, f7, f11, f12, f13)
        if template is None:
            assert fields is not None
            return self.request(fields, "sale")
        s0, s1, s2, s3, s4, s5, s6 = template  # the constant text around the six values
        message = "".join((s0, pan, s1, f4, s2, f7, s3, f11, s4, f12, s5, f13, s6)).encode(
            "latin-1"
        )
        if self.mac:
            assert self.keys is not None
            message += hashlib.blake2b(message, key=self.keys.tx_mac, digest_size=8).digest()
        frame = self._encoder.encode(message, self._tpdu)
        return Request(frame, (self.tid, f11), "0200", "sale", fields)

    def _sale(self, pan: str, f4: str, f7: str, f11: str, f12: str, f13: str,
              expiry: str = "3012") -> dict[str, str]:  # fmt: skip
        """A sale's fields (PROTOCOL.md 5.1) with these card, amount and numbers."""
        return {"t": "0200", "2": pan, "3": "000000", "4": f4, "7": f7, "11": f11, "12": f12,
                "13": f13, "14": expiry, "22": "051", "25": "00", "41": self.tid,
                "42": self.mid, "49": "156"}  # fmt: skip

    def _compile_sale(self) -> tuple[str, ...] | None:
        """The constant parts of this terminal's sale (latin-1 text, the MAC left out) between
        fields 2, 4, 7, 11, 12 and 13, which ISO 8583 puts in that order."""
        fields = self._sale(self.pans[0], "000000000001", "0101000000", "000001", "000000", "0101")
        if self.mac:
            fields["64"] = _NO_MAC
        varying = ("2", "4", "7", "11", "12", "13")
        at = offsets(self.codec.encode, fields, varying)
        if at is None or [at[k] for k in varying] != sorted(at.values()):
            return None
        text = self.codec.encode(fields).decode("latin-1")
        if self.mac:
            text = text[:-8]
        parts, pos = [], 0
        for key in varying:
            parts.append(text[pos : at[key]])
            pos = at[key] + len(fields[key])
        parts.append(text[pos:])
        return tuple(parts)

    def request(self, fields: dict[str, str], kind: str, *, mac: bool | None = None) -> Request:
        frame = self._encoder.encode(self.encode(fields, mac=mac), self._tpdu)
        return Request(frame, answer_key(fields, "37" in fields), fields["t"], kind, fields)

    def answer_ok(self, message: bytes, answer: Mapping[str, str]) -> bool:
        """False when ``answer`` carries a MAC that does not verify under the session key."""
        mac_field = "128" if "1" in answer else "64"
        return mac_field not in answer or self.mac_ok(message)

    def mac_ok(self, message: bytes) -> bool:
        """The last 8 bytes of ``message`` are the MAC of the rest under the session key."""
        if self.keys is None:
            return False
        tag = hashlib.blake2b(message[:-8], key=self.keys.rx_mac, digest_size=8).digest()
        return secrets.compare_digest(tag, message[-8:])

    # -- requests ----------------------------------------------------------------------------

    def sale_fields(self, amount: int, *, test: bool = False, pan: str | None = None,
                    expiry: str = "3012") -> dict[str, str]:  # fmt: skip
        f7, f11, f12, f13 = self._numbers()
        pan = pan or self.pans[self._seq % _CARDS]
        fields = self._sale(pan, f"{amount:012d}", f7, f11, f12, f13, expiry)
        if test:
            fields["48"] = encode_tlv({"TS": "1"})
        return fields

    def reversal_fields(self, original: Mapping[str, str]) -> dict[str, str]:
        n = self.next_numbers()
        return {"t": "0400", "3": original["3"], "4": original["4"], "7": n["7"], "11": n["11"],
                "41": self.tid, "42": self.mid, "49": original.get("49", "156"),
                "90": original["t"] + original["11"] + original["7"] + "0" * 22}  # fmt: skip

    def inquiry_fields(self) -> dict[str, str]:
        n = self.next_numbers()
        return {"t": "0300", "7": n["7"], "11": n["11"], "41": self.tid, "42": self.mid,
                "91": "5"}  # fmt: skip

    def rebind_fields(self, operator: str, password: str, holder: str, bank_code: str,
                      account: str) -> dict[str, str]:  # fmt: skip
        if self.keys is None:
            raise ValueError(f"terminal {self.tid} is not signed on")
        n = self.next_numbers()
        pw = crypto.encrypt_password(self.keys.tx_enc, password)
        tlv = encode_tlv({"OP": operator, "PW": pw, "NM": holder, "BK": bank_code,
                          "AC": account})  # fmt: skip
        return {"t": "0300", "7": n["7"], "11": n["11"], "41": self.tid, "42": self.mid,
                "48": tlv, "91": "2", "101": "SETTLEACCT"}  # fmt: skip

    def batch_close_fields(self) -> dict[str, str]:
        """A 0500 with what this terminal knows of its open batch: 00 closes it; 12 names the
        open batch and 95 gives the host's totals, both learnt for the next close."""
        n = self.next_numbers()
        tlv = encode_tlv({"BN": f"{self.batch:06d}", "CT": str(self.batch_count),
                          "AM": str(self.batch_amount)})  # fmt: skip
        return {"t": "0500", "7": n["7"], "11": n["11"], "41": self.tid, "42": self.mid,
                "48": tlv}  # fmt: skip

    def echo_fields(self) -> dict[str, str]:
        n = self.next_numbers()
        return {"t": "0800", "7": n["7"], "11": n["11"], "41": self.tid, "42": self.mid,
                "70": "301"}  # fmt: skip

    # -- learning from answers -----------------------------------------------------------------

    def learn(self, request: Mapping[str, str], answer: Mapping[str, str]) -> None:
        """Update what this terminal knows from an answer to one of its requests."""
        mti, rc = request.get("t"), answer.get("39")
        if mti == "0200" and rc == "00":
            if "48" not in request:  # test sales (48 TS) are not reversed
                self.approved.append(dict(request))
            self.batch_count += 1
            self.batch_amount += int(request["4"])
        elif mti == "0400" and rc == "00":
            self.batch_count -= 1
            self.batch_amount -= int(request["4"])
        elif mti == "0500":
            tlv = _tlv(answer)
            if rc == "00":
                self.batch = int(tlv.get("NB", self.batch + 1))
                self.batch_count = self.batch_amount = 0
                self.approved.clear()  # a settled batch's sales are not reversed
            elif rc == "12" and tlv.get("NB", "").isdigit():
                self.batch = int(tlv["NB"])
            elif rc == "95" and tlv.get("CT", "").lstrip("-").isdigit():
                self.batch = int(tlv.get("BN", self.batch))
                self.batch_count = int(tlv["CT"])
                self.batch_amount = int(tlv.get("AM", "0"))


def _tlv(answer: Mapping[str, str]) -> dict[str, str]:
    try:
        return decode_tlv(answer.get("48", ""))
    except ValueError:
        return {}


@dataclass(frozen=True, slots=True)
class RebindData:
    """What a synthetic rebind submits: the operator's id and password, the holder name the
    merchant registered and the bank code; the new account is a fresh test number."""

    operator: str
    password: str
    holder: str
    bank_code: str


class Mix:
    """A synthetic mix of requests: each kind drawn with its weight (random, seeded)."""

    def __init__(
        self,
        weights: Mapping[str, int],
        *,
        amounts: tuple[int, int] = (100, 99_999),
        test_amount: int = 1,
        rebind: RebindData | None = None,
        seed: int | None = None,
    ) -> None:
        unknown = sorted(set(weights) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown kind {unknown[0]!r} in the mix (one of {', '.join(KINDS)})")
        if any(w < 0 for w in weights.values()) or not any(weights.values()):
            raise ValueError("the mix needs weights of 0 or more, at least one above 0")
        if weights.get("rebind") and rebind is None:
            raise ValueError("a mix with rebinds needs the operator, password, holder and bank")
        self.kinds = [k for k in KINDS if weights.get(k)]
        self.weights = [weights[k] for k in self.kinds]
        self.amounts = amounts
        self.test_amount = test_amount
        self.rebind = rebind
        self.random = random.Random(seed)
        # answers teach terminals something (the sales they may reverse, their batch)
        self.learns = bool(weights.get("reversal") or weights.get("batch_close"))
        self._accounts = 0

    def kinds_iter(self) -> Iterator[str]:
        choices, weights, rng = self.kinds, self.weights, self.random
        while True:
            yield from rng.choices(choices, weights, k=256)

    def build(self, terminal: LoadTerminal, kind: str) -> Request:
        """The next request of ``kind`` from ``terminal``. A reversal reverses one of the
        terminal's approved sales of this run; with none yet, it is a sale instead."""
        if kind == "reversal" and terminal.approved:
            original = terminal.approved.popleft()
            return terminal.request(terminal.reversal_fields(original), kind)
        if kind in ("sale", "reversal"):
            low, high = self.amounts
            amount = low + int(self.random.random() * (high - low + 1))
            return terminal.sale_request(amount, keep_fields=self.learns)
        if kind == "test_sale":
            return terminal.request(terminal.sale_fields(self.test_amount, test=True), kind)
        if kind == "inquiry":
            return terminal.request(terminal.inquiry_fields(), kind)
        if kind == "batch_close":
            return terminal.request(terminal.batch_close_fields(), kind)
        assert kind == "rebind" and self.rebind is not None
        self._accounts += 1
        r = self.rebind
        account = test_pan(f"{terminal.tid}/account/{self._accounts}")
        fields = terminal.rebind_fields(r.operator, r.password, r.holder, r.bank_code, account)
        return terminal.request(fields, kind)
