"""What a request nobody authenticated costs the host (SECURITY.md, "What is not defended"):
CPU per request through the host core (``decide`` + ``answer``, the path a connection takes,
in one process, no sockets) for an echo test (the baseline), a sale whose MAC is wrong (the
host reloads the terminal's session keys from the store before it answers 63) and an echo
naming a terminal id never seen (a store lookup per id). Variants alternate in rounds, each
printed as a multiple of the echo of the same round.

Run: ``python benchmarks/unauthenticated.py [--requests N] [--rounds N] [--pg URL]`` (``--pg``:
a PostgreSQL server URL; a database is made for the run and dropped after it).
"""

from __future__ import annotations

import argparse
import io
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import pipeline  # noqa: E402
from e2e import _pg_database, _pg_drop  # noqa: E402  (the e2e benchmark's databases)

from acqhost.host.core import HostCore  # noqa: E402
from acqhost.log import configure_logging  # noqa: E402


def per_request_us(core: HostCore, frames: Callable[[int], bytes], n: int) -> tuple[float, float]:
    """(CPU, wall-clock) microseconds per request: the wall clock is what the event loop
    spends, a store's round trip included."""
    made = [frames(i) for i in range(n)]
    cpu, wall = time.process_time(), time.perf_counter()
    for frame in made:
        ctx = core.decide(frame)
        assert ctx is not None
        core.answer(ctx)
    return (time.process_time() - cpu) / n * 1e6, (time.perf_counter() - wall) / n * 1e6


async def measure(db: str, args: argparse.Namespace) -> None:
    dispatcher, _keys, seed = pipeline.build(db)  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        await tg.start(dispatcher.ledger.run)
        session = await pipeline.sign_on(dispatcher, seed)
        core = dispatcher.core
        encode = core.codec.encode
        good = pipeline.sales(dispatcher, session, 1)[0]
        bad = good[:-8] + bytes(8)

        def echo(tid: str) -> bytes:
            return encode({"t": "0800", "7": "1122101530", "11": "000002", "41": tid,
                           "42": pipeline.MID, "70": "301"})  # fmt: skip

        variants: dict[str, Callable[[int], bytes]] = {
            "echo (known terminal)": lambda i: echo(pipeline.TID),
            "sale, wrong MAC": lambda i: bad,
            "echo, unknown terminal id": lambda i: echo(secrets.token_hex(4).upper()),
        }
        where = db.split("?")[0] if "://" in db else "SQLite"
        print(f"{where}: us per request, CPU / wall clock (x the echo of the round, by CPU)")
        for n in range(args.rounds):
            row = {name: per_request_us(core, f, args.requests) for name, f in variants.items()}
            base = row["echo (known terminal)"][0]
            print(f"round {n}: " + "; ".join(
                f"{name} {cpu:.1f} / {wall:.1f} ({cpu / base:.1f}x)"
                for name, (cpu, wall) in row.items()))  # fmt: skip
        dispatcher.ledger.close()
        tg.cancel_scope.cancel()
    pipeline.close(dispatcher)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pg", help="PostgreSQL server URL (a database is made for the run)")
    args = parser.parse_args()
    configure_logging("error", io.StringIO())
    with tempfile.TemporaryDirectory(prefix="acqhost-unauth-") as folder:
        anyio.run(measure, str(Path(folder) / "acqhost.db"), args)
    if args.pg:
        try:
            anyio.run(measure, _pg_database(args.pg, "unauthenticated"), args)
        finally:
            _pg_drop(args.pg, "unauthenticated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
