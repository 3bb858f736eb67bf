"""``acqhost serve``: the host in this process, or ``--workers N`` processes sharing the port."""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys

from acqhost.cli.common import Subparsers, add_common, config_from, host_keys, require
from acqhost.config import Config, ConfigError
from acqhost.errors import ListenError, StoreOpenError

__all__ = ("USER_ERROR", "add_serve_command", "cmd_serve", "serve_worker", "serve_workers")


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = config_from(
        args,
        host=args.host,
        port=args.port,
        framing=args.framing,
        backend=args.backend,
        workers=args.workers,
        max_frame=args.max_frame,
        read_timeout=args.read_timeout,
        max_connections=args.max_connections,
        frame_timeout=args.frame_timeout,
        first_frame_timeout=args.first_frame_timeout,
        max_connections_per_source=args.max_connections_per_source,
        log_rate=args.log_rate,
        log_level=args.log_level,
        capture=args.capture,
        signon_skew=args.signon_skew,
    )
    host_keys(cfg)  # fail early, in the parent
    if cfg.workers == 1:
        from acqhost.runtime.app import serve

        serve(cfg)
        return 0
    require(cfg.port != 0, "--workers > 1 needs a fixed --port")
    return serve_workers(cfg)


def serve_workers(cfg: Config) -> int:
    """N processes sharing the port (SO_REUSEPORT); SIGTERM/SIGINT are passed on to them.
    Exit status 0 when every one of them ended well; 2 when one could not start (an operator
    mistake: the others are stopped)."""
    ctx = multiprocessing.get_context("spawn")
    children = [
        ctx.Process(target=serve_worker, args=(cfg, i), name=f"acqhost-{i}")
        for i in range(cfg.workers)
    ]

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.pid is not None and child.exitcode is None:
                os.kill(child.pid, signal.SIGTERM)

    # Before the children start: a signal meanwhile must reach them, not end this process.
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        child.start()
    running = {child.sentinel: child for child in children}
    while running:
        for sentinel in multiprocessing.connection.wait(list(running)):
            assert isinstance(sentinel, int)
            ended = running.pop(sentinel)
            ended.join()
            if ended.exitcode == USER_ERROR:  # a worker could not start: none serves
                forward(signal.SIGTERM, None)
    codes = {child.exitcode for child in children}
    if USER_ERROR in codes:
        return USER_ERROR
    return 0 if codes == {0} else 1


USER_ERROR = 2  # a worker's exit status for an operator mistake (its one line on stderr)


def serve_worker(cfg: Config, worker: int) -> None:
    """One of ``--workers``' processes: an operator mistake it meets on starting (a
    ``[metrics]`` port taken, a store it cannot open) is one line on stderr and exit status 2,
    not a traceback; the parent then stops the others and exits 2 too."""
    from acqhost.runtime.app import serve

    try:
        serve(cfg, worker)
    except (ListenError, StoreOpenError, ConfigError) as e:
        print(f"acqhost: worker {worker}: {e}", file=sys.stderr)
        raise SystemExit(USER_ERROR) from None


def add_serve_command(sub: Subparsers) -> None:
    p = sub.add_parser(
        "serve",
        help="run the host",
        description="Serve POS terminals over TCP until SIGTERM or SIGINT.",
    )
    add_common(p)
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default 8583)")
    p.add_argument("--framing", help="len2 (default), len4 or len2-tpdu")
    p.add_argument("--backend", help="asyncio (default; uvloop when installed) or trio")
    p.add_argument("--workers", type=int, help="processes sharing the port (default 1)")
    p.add_argument("--max-frame", type=int, help="largest frame in bytes (default 4096)")
    p.add_argument(
        "--read-timeout", type=float, help="seconds idle, stalled or not reading (default 30)"
    )
    p.add_argument("--max-connections", type=int, help="open connections at most (default 1000)")
    p.add_argument("--frame-timeout", type=float, help="seconds for a whole frame (default 10)")
    p.add_argument(
        "--first-frame-timeout", type=float, help="seconds to the first valid frame (default 5)"
    )
    p.add_argument(
        "--max-connections-per-source", type=int, help="open connections per address (default 64)"
    )
    p.add_argument(
        "--log-rate", type=float, help="log records per source address a second (default 20)"
    )
    p.add_argument("--log-level", help="debug, info (default), warning, error")
    p.add_argument(
        "--signon-skew",
        type=int,
        help="seconds a sign-on's field 7 may be from the host's UTC time (default 300)",
    )
    p.add_argument(
        "--capture",
        metavar="FILE",
        help="append every answered request to FILE as a traffic record, card data as tokens",
    )
    p.set_defaults(func=cmd_serve)
