"""POS terminal simulator: signs on, echoes, sells, test-sells, reverses, settles its batch and
changes its settlement account (submit, inquire, cancel) against a host.

``TerminalClient`` is the terminal side of PROTOCOL.md (sign-on with Ed25519 and crypto_kx,
MAC'd requests, verified responses) over anyio, so tests drive it on asyncio and trio alike;
``acqhost-terminal`` is its command line, printing each exchange readably.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import secrets
import ssl
import stat
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from acqhost.domain import crypto
from acqhost.wire import specs
from acqhost.wire.codec import compile_spec
from acqhost.wire.framing import FrameDecoder, FrameEncoder
from acqhost.wire.tlv import decode_tlv, encode_tlv

__all__ = ("Exchange", "TerminalClient", "TerminalError", "main", "tls_client_context")

TEST_PAN = "6222021234567890128"  # Luhn-valid, for the simulator's sales
TPDU = bytes.fromhex("6000010000")


def tls_client_context(
    ca: str | None, cert: str | None = None, key: str | None = None
) -> ssl.SSLContext | None:
    """The TLS context of a client of a host with ``[tls]``: trusting the CA certificates in
    ``ca`` (PEM), presenting ``cert`` (and ``key``) when the host asks for a client
    certificate; None (plain TCP) without ``ca``. OSError or ssl.SSLError for a file that
    cannot be used."""
    if ca is None:
        return None
    context = ssl.create_default_context(cafile=ca)
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


class TerminalError(Exception):
    """The host's answer could not be trusted (bad signature or MAC) or did not come."""


@dataclass(frozen=True, slots=True)
class Exchange:
    request: dict[str, str]
    response: dict[str, str]

    @property
    def rc(self) -> str:
        return self.response.get("39", "")

    @property
    def tlv(self) -> dict[str, str]:
        return decode_tlv(self.response.get("48", ""))


class TerminalClient:
    """One terminal: its identity key, its session keys once signed on, one connection."""

    def __init__(
        self,
        key_file: dict[str, Any],
        *,
        host: str | None = None,
        port: int | None = None,
        timeout: float = 10.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.tid: str = key_file["tid"]
        self.mid: str = key_file["mid"]
        self.seed = bytes.fromhex(key_file["terminal_signing_key"])
        self.host_public_key = bytes.fromhex(key_file["host_public_key"])
        self.address = (host or key_file.get("host", "127.0.0.1"), port or key_file["port"])
        self.framing: str = key_file.get("framing", "len2")
        self.codec = compile_spec(specs.load(key_file.get("spec", "acq87")))
        self.timeout = timeout
        self.tls = tls  # a host with [tls]: tls_client_context
        self.keys: crypto.SessionKeys | None = None
        self._stan = itertools.count(secrets.randbelow(900_000) + 1)
        self._stream: anyio.abc.ByteStream | None = None
        self._decoder = FrameDecoder(self.framing)
        self._encoder = FrameEncoder(self.framing)
        self._pending: list[bytes] = []
        self.last_message = b""  # the last request's message, as sent

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> TerminalClient:
        return cls(json.loads(Path(path).read_text()), **kwargs)

    # -- connection ------------------------------------------------------------------------

    async def connect(self) -> None:
        host, port = self.address
        if self.tls is None:
            self._stream = await anyio.connect_tcp(host, port)
        else:
            self._stream = await anyio.connect_tcp(
                host, port, ssl_context=self.tls, tls_standard_compatible=False
            )
        self._decoder = FrameDecoder(self.framing)
        self._pending = []

    async def close(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
            self._stream = None

    async def __aenter__(self) -> TerminalClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send_raw(self, message: bytes) -> None:
        assert self._stream is not None, "not connected"
        tpdu = TPDU if self.framing == "len2-tpdu" else b""
        await self._stream.send(self._encoder.encode(message, tpdu))

    async def receive_raw(self) -> bytes:
        """The next frame from the host (pipelined answers are kept in arrival order)."""
        assert self._stream is not None, "not connected"
        with anyio.fail_after(self.timeout):
            while not self._pending:
                try:
                    data = await self._stream.receive(65536)
                except anyio.EndOfStream:
                    raise TerminalError("the host closed the connection") from None
                self._pending.extend(frame.message for frame in self._decoder.feed(data))
        return self._pending.pop(0)

    async def send_pipelined(self, requests: Sequence[dict[str, str]]) -> None:
        """Send every request, MAC'd, in one write: the host answers them in this order."""
        assert self._stream is not None, "not connected"
        tpdu = TPDU if self.framing == "len2-tpdu" else b""
        frames = (self._encoder.encode(self.encode(r, mac=True), tpdu) for r in requests)
        await self._stream.send(b"".join(frames))

    async def exchange_raw(self, message: bytes) -> bytes:
        await self.send_raw(message)
        return await self.receive_raw()

    # -- messages --------------------------------------------------------------------------

    def stan(self) -> str:
        return f"{next(self._stan) % 1_000_000:06d}"

    @staticmethod
    def now_fields() -> dict[str, str]:
        now = datetime.datetime.now(datetime.UTC)
        return {
            "7": now.strftime("%m%d%H%M%S"),
            "12": now.strftime("%H%M%S"),
            "13": now.strftime("%m%d"),
        }

    def encode(self, fields: dict[str, str], *, mac: bool) -> bytes:
        if not mac:
            return self.codec.encode(fields)
        if self.keys is None:
            raise TerminalError("not signed on")
        secondary = any(k.isdigit() and int(k) > 64 for k in fields)
        fields = dict(fields, **{"128" if secondary else "64": "0" * 16})
        body = self.codec.encode(fields)[:-8]
        return body + crypto.mac(self.keys.tx_mac, body)

    async def request(self, fields: dict[str, str], *, mac: bool = True) -> Exchange:
        """Send one request and return the decoded response (its MAC checked when it has one).
        The request's bytes stay in :attr:`last_message` (what a wiretap would capture)."""
        message = self.last_message = self.encode(fields, mac=mac)
        raw = await self.exchange_raw(message)
        response = self.codec.decode(raw)
        mac_field = "128" if "1" in response else "64"
        if mac_field in response and (
            self.keys is None or not crypto.mac_ok(self.keys.rx_mac, raw[:-8], raw[-8:])
        ):
            raise TerminalError("response MAC does not verify")
        return Exchange(fields, response)

    def signon_fields(self, *, field7: str | None = None) -> tuple[dict[str, str], bytes, bytes]:
        """A sign-on request (PROTOCOL.md 4.2), with the ephemeral key pair (public, secret)
        it offers: field 7 is the time now (UTC) unless given."""
        kx_pk, kx_sk = crypto.kx_keypair()
        stan = self.stan()
        f7 = self.now_fields()["7"] if field7 is None else field7
        transcript = crypto.signon_request_transcript(self.tid, stan, f7, kx_pk)
        tlv = encode_tlv({"KX": kx_pk.hex(), "SG": crypto.sign(self.seed, transcript).hex()})
        fields = {"t": "0800", "7": f7, "11": stan, "41": self.tid, "42": self.mid, "48": tlv,
                  "70": "001"}  # fmt: skip
        return fields, kx_pk, kx_sk

    async def sign_on(self, *, field7: str | None = None) -> Exchange:
        """Sign on: the session keys are taken once the host's answer verifies."""
        fields, kx_pk, kx_sk = self.signon_fields(field7=field7)
        ex = await self.request(fields, mac=False)
        if ex.rc == "00":
            self.take_signon(fields, kx_pk, kx_sk, ex.response)
        return ex

    def take_signon(
        self, fields: dict[str, str], kx_pk: bytes, kx_sk: bytes, response: dict[str, str]
    ) -> None:
        """Take the session keys of the approved answer ``response`` to the sign-on ``fields``
        (made with the key pair ``kx_pk``, ``kx_sk``) once the host's signature verifies."""
        reply = decode_tlv(response["48"])
        kx_host = bytes.fromhex(reply["KX"])
        signed = crypto.signon_response_transcript(self.tid, fields["11"], kx_host, kx_pk)
        if not crypto.verify(self.host_public_key, signed, bytes.fromhex(reply["SG"])):
            raise TerminalError("host signature on the sign-on response does not verify")
        rx, tx = crypto.terminal_session(kx_pk, kx_sk, kx_host)
        self.keys = crypto.SessionKeys.from_kx(rx, tx)

    def network_fields(self, code: str) -> dict[str, str]:
        """An 0800 with network management code ``code`` (field 70)."""
        return {"t": "0800", "7": self.now_fields()["7"], "11": self.stan(), "41": self.tid,
                "42": self.mid, "70": code}  # fmt: skip

    async def network(self, code: str, *, mac: bool = False) -> Exchange:
        return await self.request(self.network_fields(code), mac=mac)

    async def echo(self) -> Exchange:
        return await self.network("301")

    async def sign_off(self) -> Exchange:
        """Sign off, MAC'd under the session it ends (PROTOCOL.md 4.2). 00: the keys are
        dropped on both sides; any other answer leaves them as they were."""
        ex = await self.network("002", mac=True)
        if ex.rc == "00":
            self.keys = None
        return ex

    def sale_fields(
        self,
        amount: int,
        *,
        test: bool = False,
        pan: str = TEST_PAN,
        expiry: str = "3012",
        stan: str | None = None,
    ) -> dict[str, str]:
        t = self.now_fields()
        fields = {
            "t": "0200",
            "2": pan,
            "3": "000000",
            "4": f"{amount:012d}",
            "7": t["7"],
            "11": stan or self.stan(),
            "12": t["12"],
            "13": t["13"],
            "14": expiry,
            "22": "051",
            "25": "00",
            "41": self.tid,
            "42": self.mid,
            "49": "156",
        }
        if test:
            fields["48"] = encode_tlv({"TS": "1"})
        return fields

    async def sale(self, amount: int, **kwargs: Any) -> Exchange:
        return await self.request(self.sale_fields(amount, **kwargs))

    async def reverse(self, original: Exchange) -> Exchange:
        o = original.request
        t = self.now_fields()
        return await self.request(
            {
                "t": "0400",
                "3": o["3"],
                "4": o["4"],
                "7": t["7"],
                "11": self.stan(),
                "41": self.tid,
                "42": self.mid,
                "49": o["49"],
                "90": "0200" + o["11"] + o["7"] + "0" * 22,
            }
        )

    # -- settlement-account change (rebind), PROTOCOL.md 5.3 --------------------------------

    def rebind_fields(self, code: str, elements: dict[str, str], **extra: str) -> dict[str, str]:
        t = self.now_fields()
        fields = {"t": "0300", "7": t["7"], "11": self.stan(), "41": self.tid, "42": self.mid,
                  "91": code, "101": "SETTLEACCT", **extra}  # fmt: skip
        if elements:
            fields["48"] = encode_tlv(elements)
        return fields

    def submit_fields(
        self,
        *,
        operator_id: str,
        password: str,
        holder: str,
        bank_code: str,
        account: str | None = None,
        card_track2: str | None = None,
        branch: str = "",
    ) -> dict[str, str]:
        """A submit: the new card typed (48 AC) or inserted (its track 2 in field 35). The
        operator password travels encrypted under the session (48 PW)."""
        if self.keys is None:
            raise TerminalError("not signed on")
        elements = {"OP": operator_id, "PW": crypto.encrypt_password(self.keys.tx_enc, password),
                    "NM": holder, "BK": bank_code}  # fmt: skip
        if branch:
            elements["BR"] = branch
        extra: dict[str, str] = {}
        if account is not None:
            elements["AC"] = account
        if card_track2 is not None:
            extra["35"] = card_track2
        return self.rebind_fields("2", elements, **extra)

    async def rebind_submit(self, **kwargs: Any) -> Exchange:
        """Submit a change of settlement account (see :meth:`submit_fields`)."""
        return await self.request(self.submit_fields(**kwargs))

    async def rebind_inquire(self, rf: str | None = None) -> Exchange:
        """The state of request ``rf``, or of the terminal's latest request."""
        fields = self.rebind_fields("5", {"RF": rf} if rf else {})
        del fields["101"]
        return await self.request(fields)

    async def rebind_cancel(self, rf: str) -> Exchange:
        """Cancel a request still waiting for review."""
        fields = self.rebind_fields("3", {"RF": rf})
        del fields["101"]
        return await self.request(fields)

    # -- batch settlement, PROTOCOL.md 5.4 --------------------------------------------------

    def settle_fields(self, batch_no: int, count: int, amount: int) -> dict[str, str]:
        """A 0500 for batch ``batch_no`` with the terminal's totals: the number and the net
        amount (minor units) of its approved, unreversed sales."""
        elements = {"BN": f"{batch_no:06d}", "CT": str(count), "AM": str(amount)}
        return {"t": "0500", "7": self.now_fields()["7"], "11": self.stan(), "41": self.tid,
                "42": self.mid, "48": encode_tlv(elements)}  # fmt: skip

    async def settle(self, batch_no: int, count: int, amount: int) -> Exchange:
        """Settle batch ``batch_no`` with these totals: 00 closes it, 95 gives the host's."""
        return await self.request(self.settle_fields(batch_no, count, amount))

    async def settle_as_host_says(
        self, batch_no: int | None = None, totals: tuple[int, int] | None = None
    ) -> list[Exchange]:
        """Settle, filling in what is not given from the host's answers, as a terminal that
        keeps no batch of its own: the batch a 12 names as open (48 NB) when ``batch_no`` is
        None, the host's totals from a 95 when ``totals`` (count, amount) is None. Every
        exchange, the last one deciding."""
        asked = await self.settle(batch_no or 0, *(totals or (0, 0)))
        done = [asked]
        if batch_no is None and asked.rc == "12" and "NB" in asked.tlv:
            batch_no = int(asked.tlv["NB"])
            asked = await self.settle(batch_no, *(totals or (0, 0)))
            done.append(asked)
        if totals is None and asked.rc == "95":
            tlv = asked.tlv
            done.append(await self.settle(int(tlv["BN"]), int(tlv["CT"]), int(tlv["AM"])))
        return done


# -- command line ----------------------------------------------------------------------------


# What a response code means (PROTOCOL.md 3), printed beside a code other than 00.
RESPONSE_CODES = {
    "03": "unknown terminal",
    "05": "do not honour",
    "12": "invalid transaction",
    "13": "invalid amount",
    "14": "invalid card or account number",
    "25": "original not found",
    "30": "format error",
    "54": "expired card",
    "55": "incorrect operator password",
    "58": "not permitted to terminal",
    "61": "exceeds amount limit",
    "63": "security violation",
    "65": "exceeds frequency limit",
    "75": "operator password tries exceeded",
    "94": "duplicate transmission",
    "95": "reconcile error",
    "96": "system malfunction",
}


def describe(title: str, ex: Exchange) -> str:
    """One line for an exchange: its MTIs, response code and what field 48 says (account
    numbers only as the host masked them)."""
    r = ex.response
    rc = ex.rc
    meaning = RESPONSE_CODES.get(rc)
    parts = [f"{title}: {ex.request['t']} -> {r.get('t')} rc={rc}"
             + (f" ({meaning})" if meaning else "")]  # fmt: skip
    for name, label in (("37", "rrn"), ("38", "auth")):
        if name in r:
            parts.append(f"{label}={r[name]}")
    tlv = ex.tlv if "48" in r else {}
    if "RF" in tlv:
        parts.append(f"request {tlv['RF']} {tlv.get('ST', '')}")
        if "SA" in tlv:
            parts.append(f"new account {tlv['SA']}")
        if "EF" in tlv:
            parts.append(f"effective from {tlv['EF']} UTC")
    elif "SA" in tlv:
        parts.append(f"settles to {tlv['SA']} (version {tlv.get('SV')}, bank {tlv.get('BK')})")
    if "BN" in tlv:
        parts.append(f"batch {tlv['BN']}: count {tlv.get('CT')} amount {tlv.get('AM')}")
    if "NB" in tlv:
        parts.append(f"open batch {tlv['NB']}")
    if "RS" in tlv:
        parts.append(f"reason={tlv['RS']}")
    return "  ".join(parts)


async def run_demo(client: TerminalClient, amount: int) -> list[Exchange]:
    out = []
    async with client:
        steps: tuple[tuple[str, Callable[[], Awaitable[Exchange]]], ...] = (
            ("sign-on", client.sign_on),
            ("echo", client.echo),
            ("sale", lambda: client.sale(amount)),
            ("test sale", lambda: client.sale(1, test=True)),
        )
        for title, step in steps:
            ex = await step()
            print(describe(title, ex), flush=True)
            out.append(ex)
        ex = await client.reverse(out[2])
        print(describe("reversal of the sale", ex), flush=True)
        out.append(ex)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``acqhost-terminal``: 0 when the host answered the last request 00, 1 when it declined,
    2 when it could not be reached or trusted."""
    parser = argparse.ArgumentParser(
        prog="acqhost-terminal", description="POS terminal simulator for acqhost (ACQ1)."
    )
    parser.add_argument("--key-file", required=True, help="written by `acqhost terminal add`")
    parser.add_argument("--host", help="host address (default: from the key file)")
    parser.add_argument("--port", type=int, help="host port (default: from the key file)")
    parser.add_argument("--backend", default="asyncio", choices=("asyncio", "trio"))
    parser.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="connect with TLS, trusting the CA certificates in FILE (PEM)",
    )
    parser.add_argument(
        "--tls-cert", metavar="FILE", help="with --tls-ca: the client certificate to present (PEM)"
    )
    parser.add_argument("--tls-key", metavar="FILE", help="with --tls-cert: its key (PEM)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="sign on, echo, sale, test sale, reversal")
    p.add_argument("--amount", type=int, default=1234, help="sale amount in minor units")
    p = sub.add_parser("sale", help="sign on, then one sale")
    p.add_argument("amount", type=int)
    p.add_argument("--test", action="store_true", help="a test sale (48 TS=1)")
    sub.add_parser("echo", help="an echo test")
    p = sub.add_parser(
        "rebind",
        help="sign on, then ask to change the settlement account (0300, 91=2)",
        description="Sign on, then submit a change of the terminal's settlement account. The "
        "new card is typed (--account) or inserted (--card-track2).",
    )
    p.add_argument("--operator-id", required=True, help="the terminal operator's id (48 OP)")
    p.add_argument("--password", required=True, help="the operator's password (sent encrypted)")
    p.add_argument("--holder", required=True, help="account holder name (48 NM)")
    p.add_argument("--bank-code", required=True, help="12-digit CNAPS bank code (48 BK)")
    card = p.add_mutually_exclusive_group(required=True)
    card.add_argument("--account", help="the new account number, typed (48 AC)")
    card.add_argument("--card-track2", help="track 2 of the inserted new card (field 35)")
    p.add_argument("--branch", default="", help="branch name (48 BR)")
    p = sub.add_parser("inquire", help="sign on, then ask how a settlement-account change stands")
    p.add_argument("--rf", help="the request's reference (default: the latest request)")
    p = sub.add_parser("cancel", help="sign on, then cancel a change still waiting for review")
    p.add_argument("--rf", required=True, help="the request's reference")
    p = sub.add_parser(
        "settle",
        help="sign on, then settle the batch (0500)",
        description="Sign on, then settle the terminal's batch with the totals given. The "
        "simulator keeps no batch: without --batch it takes the open batch the host names "
        "(a 12 with 48 NB), and without --count and --amount the host's totals (a 95), so "
        "it then always reconciles.",
    )
    p.add_argument("--batch", type=int, help="the batch number (48 BN)")
    p.add_argument("--count", type=int, help="number of approved, unreversed sales (48 CT)")
    p.add_argument("--amount", type=int, help="their net amount in minor units (48 AM)")
    args = parser.parse_args(argv)
    if args.command == "settle" and (args.count is None) != (args.amount is None):
        parser.error("--count and --amount go together")
    if (args.tls_cert or args.tls_key) and not args.tls_ca:
        parser.error("--tls-cert and --tls-key go with --tls-ca")
    try:
        tls = tls_client_context(args.tls_ca, args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as e:
        print(f"acqhost-terminal: TLS files: {e.strerror or e}", file=sys.stderr)
        return 2
    try:
        client = TerminalClient.from_file(args.key_file, host=args.host, port=args.port, tls=tls)
    except OSError as exc:
        print(f"acqhost-terminal: key file {args.key_file}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # not JSON, a bad hex key, an unknown spec
        print(f"acqhost-terminal: key file {args.key_file}: {exc}", file=sys.stderr)
        return 2
    except (KeyError, TypeError) as exc:
        print(f"acqhost-terminal: key file {args.key_file}: no {exc} in it", file=sys.stderr)
        return 2
    mode = stat.S_IMODE(os.stat(args.key_file).st_mode)
    if mode & 0o077:  # the terminal's private key: the host refuses such a key file of its own
        print(f"acqhost-terminal: warning: key file {args.key_file} is readable by group or "
              f"others (mode {mode:04o}): chmod 600 it", file=sys.stderr)  # fmt: skip

    async def signed_on_request() -> tuple[str, Exchange]:
        if args.command == "sale":
            return "test sale" if args.test else "sale", await client.sale(
                args.amount, test=args.test
            )
        if args.command == "rebind":
            return "rebind", await client.rebind_submit(
                operator_id=args.operator_id,
                password=args.password,
                holder=args.holder,
                bank_code=args.bank_code,
                account=args.account,
                card_track2=args.card_track2,
                branch=args.branch,
            )
        if args.command == "inquire":
            return "rebind inquiry", await client.rebind_inquire(args.rf)
        return "rebind cancel", await client.rebind_cancel(args.rf)

    async def settle() -> int:
        totals = None if args.count is None else (args.count, args.amount)
        exchanges = await client.settle_as_host_says(args.batch, totals)
        for ex in exchanges:
            print(describe("settle", ex))
        return 0 if exchanges[-1].rc == "00" else 1

    async def go() -> int:
        if args.command == "demo":
            exchanges = await run_demo(client, args.amount)
            return 0 if all(ex.rc == "00" for ex in exchanges) else 1
        async with client:
            if args.command == "echo":
                ex = await client.echo()
                print(describe("echo", ex))
                return 0 if ex.rc == "00" else 1
            ex = await client.sign_on()
            print(describe("sign-on", ex))
            if ex.rc != "00":
                return 1
            if args.command == "settle":
                return await settle()
            title, ex = await signed_on_request()
            print(describe(title, ex))
            return 0 if ex.rc == "00" else 1

    try:
        result: int = anyio.run(go, backend=args.backend)
    except (OSError, TerminalError) as e:
        print(f"acqhost-terminal: {e}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    raise SystemExit(main())
