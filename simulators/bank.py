"""Bank system simulator: the TCP server the host delivers its settlement updates to
(PROTOCOL.md 6), with faults to order, and the totals of what it accepted.

``acqhost-bank serve`` listens (127.0.0.1 by default), answers every 0320 / 0321 / 0520 / 0521
with 0330 / 0530 after checking the host's signature, records each advice it accepts once
(de-duplicated on field 37) in a JSON Lines journal, and can refuse, answer other codes, drop,
delay or close connections, set by flags at start and changed while it runs through its control
port (one JSON object per line; ``acqhost-bank control`` sends them). ``acqhost-bank totals``
adds up a journal's 0520s in the columns of ``acqhost settle report``. The decisions are in
``simulators.bankcore``; this module is the sockets and the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import signal
import ssl
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.tls import TLSListener

from acqhost.errors import FramingError
from acqhost.runtime.server import run_backend
from acqhost.wire import specs
from acqhost.wire.framing import FRAMINGS, FrameDecoder, FrameEncoder, reply_tpdu
from simulators.bankcore import (
    TOTALS_COLUMNS,
    Bank,
    Faults,
    Journal,
    Rule,
    read_journal,
    settlement_totals,
)

__all__ = ("BankServer", "main")

log = logging.getLogger("acqhost-bank")

CONTROL_LINE_MAX = 65536
_GONE = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


@dataclass
class BankServer:
    """A :class:`Bank` on TCP: the advice port and, when asked for, the control port."""

    bank: Bank
    framing: str = "len2"
    max_frame: int = 4096
    # TLS on the advice port when given (a server context: the bank's certificate, and the CA
    # of the host's client certificate when it requires one).
    tls: ssl.SSLContext | None = None
    _connections: set[anyio.CancelScope] = field(default_factory=set)

    async def run(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        control_port: int | None = None,
        *,
        task_status: anyio.abc.TaskStatus[tuple[int, int | None]] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; ``task_status.started`` gets the ports bound (0: any free)."""
        FrameDecoder(self.framing, self.max_frame)  # a bad framing or size fails here
        async with contextlib.AsyncExitStack() as stack:
            tcp = await stack.enter_async_context(
                await anyio.create_tcp_listener(local_host=host, local_port=port)
            )
            bound = tcp.extra(anyio.abc.SocketAttribute.local_port)
            listener: anyio.abc.Listener[Any] = tcp
            if self.tls is not None:
                listener = TLSListener(tcp, self.tls, standard_compatible=False)
            control = None
            if control_port is not None:
                control = await stack.enter_async_context(
                    await anyio.create_tcp_listener(local_host=host, local_port=control_port)
                )
            tg = await stack.enter_async_context(anyio.create_task_group())
            bound_control = None
            if control is not None:
                bound_control = control.extra(anyio.abc.SocketAttribute.local_port)
                tg.start_soon(control.serve, self._serve_control)
            log.info(
                "listening on %s:%d%s; host key %s; journal %s (%d advices recorded)",
                host, bound, f", control port {bound_control}" if control else "",
                self.bank.host_public_key.hex(), self.bank.journal.path, len(self.bank.journal),
            )  # fmt: skip
            task_status.started((bound, bound_control))
            await listener.serve(self._serve_advices, tg)

    # -- advices ----------------------------------------------------------------------------

    async def _serve_advices(self, stream: anyio.abc.SocketStream) -> None:
        address = stream.extra(anyio.abc.SocketAttribute.remote_address, ("?", 0))
        peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
        decoder = FrameDecoder(self.framing, self.max_frame)
        encoder = FrameEncoder(self.framing, self.max_frame)
        advices = 0
        with anyio.CancelScope() as scope:
            self._connections.add(scope)
            log.info("connection from %s", peer)
            try:
                while True:
                    data = await stream.receive(65536)
                    for frame in decoder.feed(data):
                        outcome = self.bank.handle(frame.message)
                        if outcome.delay:
                            await anyio.sleep(outcome.delay)
                        if outcome.answer is not None:
                            tpdu = reply_tpdu(frame.tpdu) if frame.tpdu else b""
                            await stream.send(encoder.encode(outcome.answer, tpdu))
                        advices += outcome.advice
                        close_after = self.bank.faults.close_after
                        if outcome.advice and close_after and advices >= close_after:
                            log.info("closing %s after %d advices (close_after)", peer, advices)
                            return
            except FramingError as e:
                log.warning("closing %s: %s", peer, e)
            except _GONE:
                log.info("connection from %s ended", peer)
            finally:
                self._connections.discard(scope)
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
        if scope.cancel_called:
            log.info("closed %s (control: close)", peer)

    # -- control ----------------------------------------------------------------------------

    async def _serve_control(self, stream: anyio.abc.SocketStream) -> None:
        lines = BufferedByteReceiveStream(stream)
        async with stream:
            last = False
            while not last:
                try:
                    line = await lines.receive_until(b"\n", CONTROL_LINE_MAX)
                except anyio.IncompleteRead:  # the peer closed: a last line without newline
                    line, last = bytes(lines.buffer), True
                except (anyio.DelimiterNotFound, *_GONE):
                    return
                if not line.strip():
                    continue
                reply = self.control(line)
                try:
                    await stream.send(json.dumps(reply, ensure_ascii=False).encode() + b"\n")
                except _GONE:
                    return

    def control(self, line: bytes) -> dict[str, Any]:
        """One control command (a JSON object) and its reply: ``{"op": "get"}``,
        ``{"op": "set", SETTING: VALUE, ...}``, ``{"op": "reset"}`` (no faults) or
        ``{"op": "close"}`` (close every advice connection now). The reply is ``{"ok": true,
        "faults": ..., "counters": ..., "connections": N}`` or ``{"ok": false, "error": ...}``."""
        try:
            command = json.loads(line)
            if not isinstance(command, dict):
                raise ValueError("a command is a JSON object")
            op = command.pop("op", None)
            closed = None
            if op == "set":
                self.bank.set_faults(self.bank.faults.changed(command))
            elif op == "reset":
                self.bank.set_faults(Faults())
            elif op == "close":
                closed = len(self._connections)
                for scope in list(self._connections):
                    scope.cancel()
            elif op != "get":
                raise ValueError(f"op: get, set, reset or close, got {op!r}")
            if op != "set" and command:
                raise ValueError(f"{op} takes no settings")
        except ValueError as e:
            log.warning("control: %s", e)
            return {"ok": False, "error": str(e)}
        if op in ("set", "reset"):
            log.info("control: faults now %s", self.bank.faults.to_json())
        reply: dict[str, Any] = {
            "ok": True,
            "faults": self.bank.faults.to_json(),
            "counters": self.bank.counters.to_json(),
            "connections": len(self._connections) - (closed or 0),
        }
        if closed is not None:
            reply["closed"] = closed
        return reply


# -- command line -----------------------------------------------------------------------------


def _host_key(args: argparse.Namespace) -> bytes:
    text = args.host_key if args.host_key else Path(args.host_key_file).read_text()
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ValueError("the host public key is 64 hex digits (`acqhost keys public`)")
    return key


def _faults(args: argparse.Namespace) -> Faults:
    return Faults(
        refuse=args.refuse,
        answer=tuple(Rule.parse(r) for r in args.answer or ()),
        drop_every=args.drop_every,
        delay=args.delay,
        close_after=args.close_after,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    key, faults = _host_key(args), _faults(args)
    FrameDecoder(args.framing, args.max_frame)  # a bad --max-frame or --spec is a user
    specs.load(args.spec)  # error before the journal is opened
    bank = Bank(key, Journal(args.out), faults, spec=args.spec)
    server = BankServer(bank, framing=args.framing, max_frame=args.max_frame, tls=_tls(args))
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s acqhost-bank %(levelname)s %(message)s",
    )

    async def go() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(server.run, args.host, args.port, args.control_port)
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("%s: stopping", signal.Signals(signum).name)
                    tg.cancel_scope.cancel()
                    break

    try:
        run_backend(go, args.backend)
    except* OSError as group:  # the port taken, an address not this machine's: one line
        error = group.exceptions[0]
        why = os.strerror(error.errno) if error.errno else str(error)
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {why}") from None
    finally:
        bank.journal.close()
    return 0


def _tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The advice port's TLS: this bank's certificate and key, and the CA whose client
    certificates it requires, when given."""
    if args.tls_cert is None:
        if args.tls_client_ca is not None:
            raise ValueError("--tls-client-ca needs --tls-cert")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(args.tls_cert, args.tls_key)
        if args.tls_client_ca is not None:
            context.load_verify_locations(args.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"cannot load the TLS certificate: {e}") from None
    return context


def cmd_totals(args: argparse.Namespace) -> int:
    rows = settlement_totals(read_journal(args.journal))
    if args.format == "json":
        print(json.dumps(rows, ensure_ascii=False, indent=2))
    elif args.format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(TOTALS_COLUMNS)
        writer.writerows([r[c] for c in TOTALS_COLUMNS] for r in rows)
    else:
        from acqhost.cli.common import table

        table([c.upper() for c in TOTALS_COLUMNS], [list(r.values()) for r in rows])
    return 0


def cmd_control(args: argparse.Namespace) -> int:
    commands = args.command_json or ['{"op": "get"}']

    async def go() -> int:
        ok = True
        with anyio.fail_after(args.timeout):
            async with await anyio.connect_tcp(args.host, args.port) as stream:
                lines = BufferedByteReceiveStream(stream)
                for command in commands:
                    await stream.send(command.encode() + b"\n")
                    reply = await lines.receive_until(b"\n", CONTROL_LINE_MAX)
                    print(reply.decode())
                    ok = ok and json.loads(reply).get("ok") is True
        return 0 if ok else 1

    result: int = anyio.run(go)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="acqhost-bank",
        description="Bank system simulator for acqhost: receives the host's settlement "
        "updates (0320 / 0520 advices, PROTOCOL.md 6).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "serve",
        help="receive advices: verify, acknowledge, de-duplicate, record",
        description="Receive advices until SIGTERM / SIGINT: check the host's signature (63 "
        "when it does not verify), apply the faults, acknowledge (0330 / 0530, 39 = 00), "
        "record each field 37 once in the journal.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=9583, help="advice port (9583; 0: any free)")
    p.add_argument("--framing", default="len2", choices=FRAMINGS)
    p.add_argument("--spec", default="acq87", help="message spec (acq87)")
    p.add_argument("--max-frame", type=int, default=4096, help="largest frame (4096)")
    key = p.add_mutually_exclusive_group(required=True)
    key.add_argument("--host-key", metavar="HEX", help="the host's public key, hex")
    key.add_argument("--host-key-file", metavar="FILE", help="file holding that hex")
    p.add_argument("--out", default="bank.jsonl", metavar="FILE", help="journal (bank.jsonl)")
    p.add_argument("--control-port", type=int, metavar="PORT", help="control port (none)")
    p.add_argument("--tls-cert", metavar="PEM", help="TLS on the advice port: this certificate")
    p.add_argument("--tls-key", metavar="PEM", help="its key (default: in --tls-cert)")
    p.add_argument("--tls-client-ca", metavar="PEM", help="require client certificates of this CA")
    p.add_argument("--backend", default="asyncio", choices=("asyncio", "trio"))
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    f = p.add_argument_group("faults (also settable through the control port)")
    f.add_argument("--refuse", metavar="CODE", help="answer every advice with CODE, record none")
    f.add_argument(
        "--answer",
        action="append",
        metavar="PATTERN=CODE",
        help="answer advices matching PATTERN (4 digits: an MTI; else a pattern for field 37, "
        "as *7) with CODE, recording none; the first rule that matches wins over --refuse; "
        "CODE 00 processes them normally. Repeatable",
    )
    f.add_argument(
        "--drop-every",
        type=int,
        default=0,
        metavar="N",
        help="read every Nth advice but neither answer nor record it",
    )
    f.add_argument(
        "--delay", type=float, default=0.0, metavar="SECONDS", help="wait before each answer"
    )
    f.add_argument(
        "--close-after", type=int, default=0, metavar="N", help="close a connection after N advices"
    )
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser(
        "totals",
        help="the journal's 0520 totals, as `acqhost settle report`",
        description="Count and amount of the accepted 0520s per batch, terminal and "
        "settlement account, in the columns of `acqhost settle report`.",
    )
    p.add_argument("journal", metavar="FILE.jsonl")
    p.add_argument("--format", default="table", choices=("table", "csv", "json"))
    p.set_defaults(func=cmd_totals)
    p = sub.add_parser(
        "control",
        help="send control commands to a running simulator",
        description='Send each JSON command (default {"op": "get"}) to the control port '
        "and print each reply.",
    )
    p.add_argument("command_json", nargs="*", metavar="JSON")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True, help="the simulator's --control-port")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS")
    p.set_defaults(func=cmd_control)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``acqhost-bank``: 0 on success, 1 when a control command was refused, 2 for a user
    error (bad option, key, journal, address) as one line on stderr."""
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except (OSError, ValueError, TimeoutError) as e:
        print(f"acqhost-bank: {e}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    raise SystemExit(main())
