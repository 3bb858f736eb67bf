"""What the fuzzers share: a host on a real SQLite store with a signed-on terminal, driven
synchronously through the server's own pieces (connection core, dispatcher, host core, the
write an answer waits for), the valid requests of every route (tests/fuzzmutations.py makes
them wrong), and the oracle every answer is held to.

Used by tests/test_fuzz_routes.py (hypothesis, in CI) and tests/fuzz_atheris.py (the long
coverage-guided run). The oracle: no exception escapes the host; every answer decodes; its
response code is one PROTOCOL.md documents for its message and never 96 (the host's own
fault: the store here does not fail); a failure answer echoes what PROTOCOL.md 3 says and
nothing else; an answer carries a MAC only when the request's verified, and then a valid one;
nothing is approved without a valid MAC (or, for a sign-on, a valid signature).
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable
from pathlib import Path

from acqhost.domain import crypto
from acqhost.errors import CodecError, FramingError, TLVError
from acqhost.host.answers import UNMACED_CODES, echo_fields
from acqhost.host.core import UNKNOWN, HostCore, response_mti
from acqhost.host.routes import network, rebind, reversal, sale, settle
from acqhost.log import configure_logging
from acqhost.runtime.app import build_server, close_stores
from acqhost.runtime.connection import ConnectionCore
from acqhost.runtime.dispatch import Dispatcher
from acqhost.runtime.ledger import Ledger, Write, apply_writes
from acqhost.wire import specs
from acqhost.wire.framing import FrameDecoder, FrameEncoder, reply_tpdu
from acqhost.wire.tlv import decode_tlv, encode_tlv
from simulators.terminal import TPDU
from tests.hostkit import ACCOUNT, BANK, HOLDER, HostSetup, make_host

# The response codes PROTOCOL.md documents for the answer to each request MTI (sections 3 and
# 5): the checks every terminal request passes (03, 58, 63, 30), 12 for a request without a
# route, and those of the message's own business rules. 96 is documented too, but only for
# a store that fails, which the fuzzers' does not: here it is the host's bug.
COMMON_CODES = frozenset(("03", "12", "30", "58", "63"))
CODES = {
    "0800": COMMON_CODES | {"00"},
    "0200": COMMON_CODES | {"00", "13", "14", "54", "61", "94"},
    "0400": COMMON_CODES | {"00", "25"},
    "0300": COMMON_CODES | {"00", "05", "14", "25", "55", "65", "75", "94"},
    "0500": COMMON_CODES | {"00", "95"},
}
# What every answer to each request MTI echoes (PROTOCOL.md 5 and 3); others: UNKNOWN's.
ECHO = {
    "0200": echo_fields(sale.SALE_ECHO),
    "0300": echo_fields(rebind.REBIND_ECHO),
    "0400": echo_fields(reversal.REVERSAL_ECHO),
    "0500": echo_fields(settle.SETTLE_ECHO),
    "0800": echo_fields(network.NETWORK_ECHO),
}
# Fields a failure answer may carry besides its echo: MTI, bitmaps, 39, 48 and the MAC.
FRAME_FIELDS = frozenset(("t", "p", "1", "39", "48", "64", "128"))
# Routes whose requests carry no MAC (PROTOCOL.md 4.2): their answers carry none either.
UNMACED_ROUTES = frozenset((("0800", "001"), ("0800", "301")))


class FuzzFailure(AssertionError):
    """The host broke the oracle's rules for one frame."""


class Requests:
    """Requests of TERM0001 (its session keys in :attr:`keys`, once signed on) and TERM0002
    (registered, never signed on: :attr:`other`'s keys are no session's), and the oracle
    every answer to them is held to. :class:`FuzzHost` adds the host itself; a test of a
    real server uses this alone."""

    def __init__(self, setup: HostSetup) -> None:
        self.setup = setup
        self.spec = specs.load(setup.config.spec)
        self.terminal = setup.client("TERM0001")
        self.codec = self.terminal.codec
        self.other = setup.client("TERM0002")
        self.other.keys = crypto.SessionKeys.from_kx(bytes(32), bytes(32))  # not the host's
        # The key pairs of the sign-ons offered for fuzzing (by public key, hex): one the host
        # approves (sent as it was, or with changes the signature does not cover) gives
        # TERM0001 a new session, whose keys the harness then takes.
        self.signons: dict[str, tuple[bytes, bytes]] = {}
        # Whether the host's session of TERM0001 is always the one in :attr:`keys` (so that
        # an answer to a request MAC'd under them must carry a MAC): not so for a server
        # taking fuzzed sign-ons and sign-offs on several connections at once.
        self.session_known = True

    @property
    def keys(self) -> crypto.SessionKeys:
        assert self.terminal.keys is not None
        return self.terminal.keys

    # -- requests ---------------------------------------------------------------------------

    def valid_requests(self) -> dict[str, dict[str, str]]:
        """A request of every route the host has, as TERM0001 would send it (unMAC'd)."""
        t = self.terminal
        original = t.sale_fields(100)
        signon, kx_pk, kx_sk = t.signon_fields()
        self.signons[kx_pk.hex()] = (kx_pk, kx_sk)
        if len(self.signons) > 64:
            del self.signons[next(iter(self.signons))]
        submit = t.submit_fields(operator_id="01", password="0000", holder=HOLDER,
                                 bank_code=BANK, account=ACCOUNT)  # fmt: skip
        inquire = t.rebind_fields("5", {"RF": "ABCDEFGHIJKLMNOP"})
        cancel = t.rebind_fields("3", {"RF": "ABCDEFGHIJKLMNOP"})
        del inquire["101"], cancel["101"]
        return {
            "sign_on": signon,
            "sign_off": t.network_fields("002"),
            "echo": t.network_fields("301"),
            "sale": original,
            "test_sale": t.sale_fields(1, test=True),
            "reversal": {"t": "0400", "3": "000000", "4": original["4"], "7": original["7"],
                         "11": t.stan(), "41": t.tid, "42": t.mid, "49": "156",
                         "90": "0200" + original["11"] + original["7"] + "0" * 22},
            "rebind_submit": submit,
            "rebind_inquire": inquire,
            "rebind_cancel": cancel,
            "settle": t.settle_fields(1, 0, 0),
        }  # fmt: skip

    def macd(self, fields: dict[str, str], keys: crypto.SessionKeys | None = None) -> bytes:
        """``fields`` encoded with a MAC (64, or 128 with a secondary bitmap) under ``keys``
        (TERM0001's session by default)."""
        secondary = any(k.isdigit() and int(k) > 64 for k in fields)
        fields = {k: v for k, v in fields.items() if k not in ("64", "128")}
        fields["128" if secondary else "64"] = "0" * 16
        body = self.codec.encode(fields)[:-8]
        return body + crypto.mac((keys or self.keys).tx_mac, body)

    def remac(self, message: bytes) -> bytes:
        """``message`` with its last eight bytes replaced by TERM0001's MAC of the rest."""
        body = message[:-8]
        return body + crypto.mac(self.keys.tx_mac, body)

    def seal_password(self, message: bytes) -> bytes:
        """``message`` with its 48 PW, when it decodes and names operator 01, replaced by that
        text sealed under TERM0001's session as PROTOCOL.md 4.3 says (fuzzed bytes cannot
        forge a SecretBox: without this the checks behind it would stay out of reach). Other
        operators are left alone: each costs an argon2id check with the real limits."""
        try:
            fields = self.codec.decode(message)
            elements = decode_tlv(fields.get("48", ""))
        except (CodecError, TLVError):
            return message
        if "PW" not in elements or elements.get("OP") != "01":
            return message
        elements["PW"] = crypto.encrypt_password(self.keys.tx_enc, elements["PW"])
        try:
            return self.codec.encode({**fields, "48": encode_tlv(elements)})
        except (CodecError, TLVError):
            return message

    # -- the oracle -------------------------------------------------------------------------

    def decoded(self, message: bytes) -> tuple[dict[str, str], bool]:
        """(what of ``message`` decodes, whether all of it does)."""
        try:
            return self.codec.decode(message), True
        except CodecError:
            return self.codec.decode_partial(message), False

    def mac_valid(self, message: bytes, req: dict[str, str], whole: bool) -> bool:
        """Whether ``message`` carries a valid MAC of TERM0001's session (PROTOCOL.md 4.3: over
        every byte before the MAC field; a sign-off's may be in 64 beside a secondary bitmap,
        4.2). Of a message that does not decode whole (``req`` is what did) only a bitmap
        naming the MAC field and a valid MAC in the last eight bytes count."""
        key = self.keys.tx_mac
        last_mac = len(message) > 8 and crypto.mac(key, message[:-8]) == message[-8:]
        if not whole:
            bitmap = req.get("1" if "1" in req else "p", "")
            return last_mac and bitmap[-1:] in "13579BDF" and bitmap != ""
        if last_mac and ("128" if "1" in req else "64") in req:
            return True
        if "1" in req and "64" in req:
            tag = bytes.fromhex(req["64"])
            at = message.find(tag)
            while at >= 0:
                if crypto.mac(key, message[:at]) == tag:
                    return True
                at = message.find(tag, at + 1)
        return False

    def check(
        self,
        message: bytes,
        req: dict[str, str],
        whole: bool,
        macd_in: bool,
        keys: crypto.SessionKeys,
        out: bytes | None,
    ) -> dict[str, str] | None:
        """Hold the answer ``out`` to ``message`` (``req``: what of it decoded, ``whole``: all
        of it; ``macd_in``: its MAC verifies under ``keys``) to the oracle's rules: the answer
        decoded, or FuzzFailure."""
        mti = req.get("t")
        if out is None:
            if mti is not None:
                raise FuzzFailure(f"no answer to a message whose MTI {mti!r} decoded")
            return None
        if mti is None:
            raise FuzzFailure("an answer to a message without an MTI")
        try:
            answer = self.codec.decode(out)
        except CodecError as e:
            raise FuzzFailure(f"the answer does not decode: {e}") from None
        code = answer.get("39")
        where = f"request {req!r}, answer {answer!r}"
        if answer["t"] != response_mti(mti):
            raise FuzzFailure(f"answer MTI {answer['t']} to {mti}: {where}")
        if code not in CODES.get(mti, COMMON_CODES):
            raise FuzzFailure(f"response code {code!r} is not documented for {mti}: {where}")
        route_field = {"0800": "70", "0300": "91", "0500": ""}.get(mti, "3")
        route = (mti, req.get(route_field, "")) if whole else None
        has_mac = "64" in answer or "128" in answer
        if has_mac:
            if code in UNMACED_CODES or not macd_in:
                raise FuzzFailure(f"a MAC on answer {code} to an unverified request: {where}")
            if crypto.mac(keys.rx_mac, out[:-8]) != out[-8:]:
                raise FuzzFailure(f"the answer's MAC does not verify: {where}")
        elif (
            macd_in
            and self.session_known
            and code not in UNMACED_CODES
            and route not in UNMACED_ROUTES
            and (req.get("41"), req.get("42")) == (self.terminal.tid, self.terminal.mid)
        ):
            raise FuzzFailure(f"no MAC on answer {code} to a verified request: {where}")
        if code == "00":
            self._check_approval(message, req, route, macd_in, answer, where)
        else:
            echo = ECHO.get(mti, echo_fields(UNKNOWN.echo))
            for name in echo:
                if answer.get(name) != req.get(name):
                    raise FuzzFailure(f"field {name} not echoed as PROTOCOL.md 3 says: {where}")
            extra = set(answer) - FRAME_FIELDS - set(echo)
            if extra:
                raise FuzzFailure(f"failure answer carries {sorted(extra)}: {where}")
        return answer

    def _signed_on_by_fuzz(self, req: dict[str, str], answer: dict[str, str]) -> None:
        """Take the keys of an approved sign-on of TERM0001's that the harness made."""
        if req.get("70") != "001" or req.get("41") != self.terminal.tid:
            return
        pair = self.signons.get(decode_tlv(req["48"])["KX"].lower())
        if pair is None:
            raise FuzzFailure(f"a sign-on the harness did not make was approved: {req!r}")
        self.terminal.take_signon(req, *pair, answer)

    def _check_approval(
        self,
        message: bytes,
        req: dict[str, str],
        route: tuple[str, str] | None,
        macd_in: bool,
        answer: dict[str, str],
        where: str,
    ) -> None:
        if route == ("0800", "301"):
            return  # an echo test carries no MAC
        if route == ("0800", "001"):
            if not self._signature_valid(req):
                raise FuzzFailure(f"sign-on approved without a valid signature: {where}")
            return
        if not macd_in:
            raise FuzzFailure(f"approved without a valid MAC: {where}")
        if route == ("0200", "000000") and not {"37", "38", "48"} <= set(answer):
            raise FuzzFailure(f"approved sale without 37, 38 and 48: {where}")

    def _signature_valid(self, req: dict[str, str]) -> bool:
        tid = req.get("41", "")
        client = {self.terminal.tid: self.terminal, self.other.tid: self.other}.get(tid)
        if client is None:
            return False
        tlv = decode_tlv(req["48"])
        transcript = crypto.signon_request_transcript(
            tid, req["11"], req["7"], bytes.fromhex(tlv["KX"])
        )
        public = crypto.verify_key_of(client.seed)
        return crypto.verify(public, transcript, bytes.fromhex(tlv["SG"]))


class _Discard(io.StringIO):
    """A log sink that keeps nothing."""

    def write(self, text: str) -> int:
        return len(text)


class WriteAtOnce(Ledger):
    """A ledger without its writer task: each write is applied as it is queued (its ``pre``
    first), and its ``on_done`` called at once. For driving the host without an event loop."""

    def enqueue(self, w: Write) -> None:
        if w.pre is not None:
            try:
                w.pre()
            except Exception as e:  # handed over as the ledger does: the call is skipped
                w.error = e
            w.pre = None
        apply_writes(self.store, [w], 1)
        if w.on_done is not None:
            w.on_done(w)


class FuzzHost(Requests):
    """A host on a SQLite store in ``folder`` (TERM0001 signed on, TERM0002 not), run without
    an event loop through the server's own pieces: connection core, dispatcher, host core, and
    a ledger that writes at once."""

    def __init__(self, folder: Path, *, quiet: bool = True) -> None:
        if quiet:  # the per-message lines would dominate a long run, and fill a buffer
            configure_logging("warning", _Discard())
        super().__init__(make_host(folder))
        self.server = build_server(self.setup.config)
        self.core: HostCore = self.server.core
        self.dispatcher = Dispatcher(self.core, WriteAtOnce(self.server.ledger.store))
        self.sign_on()

    def close(self) -> None:
        close_stores(self.server)

    def exchange(self, message: bytes) -> bytes | None:
        """The host's answer to one message (None: not decodable far enough for an answer)."""
        answers: list[bytes | None] = []
        self.dispatcher.start(message, answers.append)
        self.core.flush_log()
        (out,) = answers
        return out

    def sign_on(self) -> None:
        """Sign TERM0001 on afresh (after a fuzzed sign-off dropped its keys)."""
        fields, kx_pk, kx_sk = self.terminal.signon_fields()
        raw = self.exchange(self.codec.encode(fields))
        assert raw is not None
        self.terminal.take_signon(fields, kx_pk, kx_sk, self.codec.decode(raw))
        assert self.terminal.keys is not None

    def run(self, message: bytes) -> bytes | None:
        """The host's answer to ``message``, held to the oracle (FuzzFailure if it breaks a
        rule)."""
        return self._checked(message, self.exchange)

    def _checked(self, message: bytes, answer_of: Callable[[bytes], bytes | None]) -> bytes | None:
        """``answer_of(message)``, held to the oracle. An approved sign-on the harness made
        gives TERM0001 new keys; a validly MAC'd sign-off ends its session: it signs on again."""
        req, whole = self.decoded(message)
        macd_in = self.mac_valid(message, req, whole)
        keys = self.keys
        out = answer_of(message)
        try:
            answer = self.check(message, req, whole, macd_in, keys, out)
            if answer is not None and answer["39"] == "00" and answer["t"] == "0810":
                self._signed_on_by_fuzz(req, answer)
        finally:
            if self.core.state.store.get_session(self.terminal.tid) is None:
                self.sign_on()
        return out

    def connection(
        self, framing: str, data: bytes, transform: Callable[[bytes], bytes] | None = None
    ) -> list[tuple[bytes, bytes | None]]:
        """``data`` arriving on one connection whose framing is ``framing`` (each whole frame's
        message passed through ``transform`` when longer than a MAC): every request with its
        answer, each held to the oracle. A connection answers each frame whose MTI decodes,
        in order, each TPDU swapped, the frames before a framing error too; the error stops
        it (FuzzFailure otherwise)."""
        config = dataclasses.replace(self.setup.config, framing=framing)
        encoder = FrameEncoder(framing, config.max_frame)
        conn = ConnectionCore(config, encoder, self.dispatcher.start, self.core.flush_log,
                              lambda: None, peer="127.0.0.1:1", now=0.0)  # fmt: skip
        decoder = FrameDecoder(framing, config.max_frame)
        try:
            frames = decoder.feed(data)
        except FramingError:
            frames = []
        refused = decoder.error is not None
        used = 0
        exchanged = []
        for frame in frames:
            used += len(encoder.encode(frame.message, frame.tpdu))
            message = frame.message
            if transform is not None and len(message) > 8:
                message = transform(message)
                try:
                    encoder.encode(message, frame.tpdu)
                except FramingError:  # grown past max_frame (a sealed PW is longer)
                    message = frame.message

            def answer_of(message: bytes, tpdu: bytes = frame.tpdu) -> bytes | None:
                conn.received(encoder.encode(message, tpdu), 0.0)
                answers = FrameDecoder(framing, config.max_frame).feed(conn.output())
                if len(answers) > 1:
                    raise FuzzFailure(f"{len(answers)} answers to one frame")
                if answers and tpdu and answers[0].tpdu != reply_tpdu(tpdu):
                    raise FuzzFailure(f"TPDU {answers[0].tpdu!r} in reply to {tpdu!r}")
                return answers[0].message if answers else None

            exchanged.append((message, self._checked(message, answer_of)))
        conn.received(data[used:], 0.0)
        if conn.output() or conn.answers:
            raise FuzzFailure("an answer to bytes that hold no whole frame")
        if conn.stopped != refused:
            raise FuzzFailure(f"framing error {refused}, connection stopped {conn.stopped}")
        return exchanged


def framed(framing: str, message: bytes) -> bytes:
    """``message`` as a terminal using ``framing`` sends it."""
    return FrameEncoder(framing).encode(message, TPDU if framing == "len2-tpdu" else b"")
