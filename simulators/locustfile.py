"""Locust user class for acqhost: POS terminals sending MAC'd ISO 8583 requests over TCP.

Each Locust user is one terminal: it takes a key file (``acqhost terminal add --key-out``, or
``acqhost-load run --register N``), opens a plain TCP socket to the host, signs on, and then
runs tasks, each one request built by the load tester's message builder
(``simulators.load.messages``, the same as ``acqhost-load``) with one request in flight. Every
answer is MAC-checked and fires Locust's request event: type = MTI, name = kind (``signon``,
``sale``, ``test_sale``, ``reversal``, ``inquiry``, ``batch_close``), so Locust's statistics,
CSV files and web UI show latency, rate and failures per kind. A request fails when its answer
is not 00 (the error names the response code), the MAC does not verify, the answer does not
match the request, or on a timeout or connection error (the user then connects and signs on
again before its next task).

Settings (environment variables, read by each Locust process: give every worker the same):

``ACQHOST_LOAD_KEYS_DIR``
    directory of terminal key files (``*.json``, taken in name order). A terminal is driven by
    one user at a time, since a sign-on replaces the terminal's session keys: register at
    least as many terminals as users. In a distributed run the master gives each worker a
    share of the files (worker ``i`` of ``n``: files ``i, i + n, ...``) when a test starts,
    so every worker needs the same directory; start the workers before the test.
``--host tcp://HOST:PORT``
    the host; without it ``ACQHOST_LOAD_HOST`` (default 127.0.0.1) and ``ACQHOST_LOAD_PORT``,
    else the host and port in the key file.
``ACQHOST_LOAD_MIX``
    task weights, e.g. ``sale=80,test_sale=5,reversal=10,inquiry=4,batch_close=1`` (default
    ``sale=85,test_sale=5,reversal=10``). Inquiries and batch closes are left out by default
    because load terminals normally get non-00 answers to them (an inquiry with no account
    change pending is 25; a batch close is 12 or 95 until the terminal has learnt its batch and
    totals), which Locust counts as failures.
``ACQHOST_LOAD_WAIT``
    ``none`` (default: the next request as soon as the answer came, a closed loop) or a rate,
    requests per second per user (Locust's ``constant_throughput``).
``ACQHOST_LOAD_TIMEOUT``
    seconds to wait for an answer (default 10).

Run (``pip install 'acqhost[locust]'``; the host and its terminals' key files ready)::

    # one process, headless, 16 users for 60 s
    ACQHOST_LOAD_KEYS_DIR=keys locust -f simulators/locustfile.py --headless \\
        -u 16 -r 16 -t 60s --host tcp://127.0.0.1:8583

    # the web UI on http://127.0.0.1:8089 (users, rate and host chosen there)
    ACQHOST_LOAD_KEYS_DIR=keys locust -f simulators/locustfile.py --web-host 127.0.0.1 \\
        --host tcp://127.0.0.1:8583

    # distributed: one master (web UI or --headless --expect-workers 2), then the workers
    ACQHOST_LOAD_KEYS_DIR=keys locust -f simulators/locustfile.py --master \\
        --web-host 127.0.0.1 --host tcp://127.0.0.1:8583
    ACQHOST_LOAD_KEYS_DIR=keys locust -f simulators/locustfile.py --worker \\
        --master-host 127.0.0.1   # once per worker, on this machine or others

    # or one machine's cores: a master and 2 worker processes
    ACQHOST_LOAD_KEYS_DIR=keys locust -f simulators/locustfile.py --headless --processes 2 \\
        -u 16 -r 16 -t 60s --host tcp://127.0.0.1:8583
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from locust import User, constant, constant_throughput, events, task
from locust.exception import StopUser
from locust.runners import MasterRunner, WorkerRunner

from acqhost.wire.framing import FrameDecoder
from simulators.load.messages import LoadTerminal, Mix, Request

TASKS = ("sale", "test_sale", "reversal", "inquiry", "batch_close")
DEFAULT_MIX = {"sale": 85, "test_sale": 5, "reversal": 10, "inquiry": 0, "batch_close": 0}


def parse_mix(text: str) -> dict[str, int]:
    """``sale=80,reversal=10,...`` as weights of every task (those not named: 0)."""
    weights = dict.fromkeys(TASKS, 0)
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, _, weight = part.partition("=")
        kind = kind.strip()
        if kind not in weights or not weight.strip().isdigit():
            raise ValueError(f"ACQHOST_LOAD_MIX {text!r}: expected KIND=WEIGHT,... "
                             f"(kinds: {', '.join(TASKS)})")  # fmt: skip
        weights[kind] = int(weight)
    if not any(weights.values()):
        raise ValueError(f"ACQHOST_LOAD_MIX {text!r}: at least one weight above 0")
    return weights


def _wait_time() -> Any:
    text = os.environ.get("ACQHOST_LOAD_WAIT", "none").strip().lower()
    if text in ("", "none", "0"):
        return constant(0)
    return constant_throughput(float(text))


MIX = (
    parse_mix(os.environ["ACQHOST_LOAD_MIX"]) if os.environ.get("ACQHOST_LOAD_MIX") else DEFAULT_MIX
)
TIMEOUT = float(os.environ.get("ACQHOST_LOAD_TIMEOUT", "10"))


class _KeyFiles:
    """This process's share of the key files; a user takes the first free one. In a
    distributed run the master gives worker ``i`` of ``n`` files ``i, i + n, ...``."""

    def __init__(self) -> None:
        self.index, self.count = 0, 1
        self.taken: set[Path] = set()

    def share(self, index: int, count: int) -> None:
        self.index, self.count = index, count

    def take(self) -> Path:
        folder = os.environ.get("ACQHOST_LOAD_KEYS_DIR")
        if not folder:
            raise RuntimeError("set ACQHOST_LOAD_KEYS_DIR to a directory of key files")
        files = sorted(Path(folder).glob("*.json"))[self.index :: self.count]
        for path in files:
            if path not in self.taken:
                self.taken.add(path)
                return path
        raise RuntimeError(f"more users than key files ({len(files)} here): register more")

    def give_back(self, path: Path) -> None:
        self.taken.discard(path)


_KEYS = _KeyFiles()


class AnswerError(Exception):
    """An answer that is not the good answer to its request (rc, MAC or match)."""


class PosTerminal(User):
    """One POS terminal of acqhost (see the module's docstring)."""

    wait_time = _wait_time()

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self.key_path: Path | None = None
        self.terminal: LoadTerminal | None = None
        self.sock: socket.socket | None = None
        self.decoder: FrameDecoder | None = None
        self.address: tuple[str, int] = ("127.0.0.1", 0)
        # the builder of each kind (Locust's @task weights choose the kind): the weights
        # given so that the builder keeps what reversals and batch closes learn from
        self.mix = Mix({**{k: w for k, w in MIX.items() if w}, "sale": 1})

    # -- connection ---------------------------------------------------------------------------

    def on_start(self) -> None:
        try:
            self.key_path = _KEYS.take()
            key_file = json.loads(self.key_path.read_text())
            self.terminal = LoadTerminal(key_file)
            self.address = self._address(key_file)
        except (RuntimeError, OSError, ValueError, KeyError) as exc:
            self._fire("0800", "signon", 0.0, 0, exc)  # shown in the failures, then stop
            raise StopUser() from exc

    def on_stop(self) -> None:
        self._close()
        if self.key_path is not None:
            _KEYS.give_back(self.key_path)
            self.key_path = None

    def _address(self, key_file: dict[str, Any]) -> tuple[str, int]:
        if self.host:
            url = urlsplit(self.host if "://" in self.host else f"tcp://{self.host}")
            if url.hostname and url.port:
                return url.hostname, url.port
            raise ValueError(f"--host {self.host!r}: expected tcp://HOST:PORT")
        port = os.environ.get("ACQHOST_LOAD_PORT") or key_file.get("port")
        if not port:
            raise ValueError("give --host tcp://HOST:PORT or ACQHOST_LOAD_PORT")
        host = os.environ.get("ACQHOST_LOAD_HOST") or key_file.get("host") or "127.0.0.1"
        return str(host), int(port)

    def _connect(self) -> None:
        """Connect and sign on (a request event named ``signon``)."""
        terminal = self.terminal
        assert terminal is not None
        start = time.perf_counter()
        length = 0
        try:
            self.sock = socket.create_connection(self.address, timeout=TIMEOUT)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.decoder = FrameDecoder(terminal.framing, 65535)
            pending = terminal.signon()
            self.sock.sendall(terminal.frame(terminal.encode(pending.fields, mac=False)))
            message = self._read()
            length = len(message)
            terminal.signed_on(pending, terminal.codec.decode(message))
        except (OSError, ValueError) as exc:
            self._close()
            self._fire("0800", "signon", _ms(start), length, exc)
            time.sleep(1.0)  # gevent's sleep under Locust: a host that is down is not hammered
            return
        self._fire("0800", "signon", _ms(start), length, None)

    def _close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _read(self) -> bytes:
        """The next answer's message (the socket's timeout bounds each read)."""
        assert self.sock is not None and self.decoder is not None
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the host closed the connection")
            frames = self.decoder.feed(data)
            if frames:
                if len(frames) > 1 or self.decoder.buffered:
                    raise AnswerError("more than one answer to one request")
                return frames[0].message

    # -- one request ---------------------------------------------------------------------------

    def _send(self, kind: str) -> None:
        if self.sock is None:
            self._connect()
            if self.sock is None:
                return
        terminal = self.terminal
        assert terminal is not None
        request: Request = self.mix.build(terminal, kind)
        start = time.perf_counter()
        length = 0
        try:
            self.sock.sendall(request.frame)
            message = self._read()
            length = len(message)
            elapsed = _ms(start)
            answer = terminal.codec.decode(message)
            if not terminal.answer_ok(message, answer):
                raise AnswerError("the answer's MAC does not verify")
            if (answer.get("41"), answer.get("11")) != request.key[:2]:
                raise AnswerError(f"answer to {answer.get('41')}/{answer.get('11')}, "
                                  f"not to {'/'.join(request.key[:2])}")  # fmt: skip
            if request.fields is not None:  # None: a sale of a mix that learns nothing
                terminal.learn(request.fields, answer)
            rc = answer.get("39")
            error = None if rc == "00" else AnswerError(f"answered {rc}")
        except (OSError, ValueError, AnswerError) as exc:
            self._close()  # a late answer must not be taken for the next request's
            self._fire(request.mti, request.kind, _ms(start), length, exc)
            return
        self._fire(request.mti, request.kind, elapsed, length, error)

    def _fire(self, mti: str, kind: str, ms: float, length: int, exc: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type=mti, name=kind, response_time=ms, response_length=length,
            exception=exc, context={},
        )  # fmt: skip

    @task(MIX["sale"])
    def sale(self) -> None:
        self._send("sale")

    @task(MIX["test_sale"])
    def test_sale(self) -> None:
        self._send("test_sale")

    @task(MIX["reversal"])
    def reversal(self) -> None:
        """Reverses one of this user's approved sales; a sale while it has none."""
        self._send("reversal")

    @task(MIX["inquiry"])
    def inquiry(self) -> None:
        self._send("inquiry")

    @task(MIX["batch_close"])
    def batch_close(self) -> None:
        self._send("batch_close")


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


@events.init.add_listener
def _on_init(environment: Any, **_kwargs: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        environment.runner.register_message(
            "acqhost_key_share",
            lambda msg, **_kw: _KEYS.share(msg.data["index"], msg.data["count"]),
        )


@events.test_start.add_listener
def _share_key_files(environment: Any, **_kwargs: Any) -> None:
    """On the master, before any user is spawned: each worker's share of the key files (a
    terminal must be driven by one user at a time, since a sign-on replaces its keys)."""
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        workers = sorted(w.id for w in (*runner.clients.ready, *runner.clients.running,
                                        *runner.clients.spawning))  # fmt: skip
        for i, worker in enumerate(workers):
            runner.send_message("acqhost_key_share", {"index": i, "count": len(workers)}, worker)


@events.init_command_line_parser.add_listener
def _check_settings(parser: Any) -> None:
    """Fail at start, not in every user, when the settings are wrong."""
    folder = os.environ.get("ACQHOST_LOAD_KEYS_DIR")
    if folder and not any(Path(folder).glob("*.json")):
        raise SystemExit(f"ACQHOST_LOAD_KEYS_DIR {folder}: no *.json key file in it")
