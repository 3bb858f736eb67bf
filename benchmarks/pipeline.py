"""Pipeline benchmark: sales per second through the path production runs, in one process, with
no sockets.

Each sale is a MAC'd 0200 frame from a signed-on terminal, handed to the runtime's
:class:`~acqhost.runtime.dispatch.Dispatcher` as a connection hands it over: the host core's
``decide`` (decode, route, every stage: known terminal, signed on, MAC, fields, card,
authorisation), the ledger's group commit on a real SQLite file (WAL, synchronous FULL, in its
writer thread), then ``complete`` and ``answer`` (response, MAC, encode, log line). Up to
``--in-flight`` sales are outstanding at once, as pipelined connections keep them. Printed
beside it, in the same run: the floor of the same work without the host (codec decode + MAC
check + codec encode + MAC), so the ratio shows what the host costs. CPU is the process's
(every thread). ``--metrics``: with the counting a host with ``[metrics]`` does per message
(acqhost.runtime.metrics). Run: ``python benchmarks/pipeline.py [--sales N] [--in-flight N]
[--metrics]``.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import anyio

from acqhost.config import Config
from acqhost.domain import cards, crypto
from acqhost.host.core import HostCore
from acqhost.host.state import HostState
from acqhost.log import configure_logging
from acqhost.runtime.app import tune_gc
from acqhost.runtime.dispatch import Dispatcher
from acqhost.runtime.ledger import Ledger
from acqhost.runtime.metrics import Metrics
from acqhost.store import open_store
from acqhost.store.base import NewAccount, Terminal
from acqhost.wire import specs
from acqhost.wire.codec import compile_spec
from acqhost.wire.tlv import decode_tlv, encode_tlv

TID, MID = "TERM0001", "MERCHANT0000001"
# The terminal's side of the wire (its requests, the floor, reading the answers) has a codec of
# its own, as a terminal does: the host's codec learns only the layouts of messages whose MAC
# verified, so the answers it writes would decode on its exact path.
TERMINAL = compile_spec(specs.load("acq87"))


def build(db: Path) -> tuple[Dispatcher, crypto.HostKeys, bytes]:
    """A host on a new SQLite store at ``db`` with one registered terminal (its identity seed
    returned); run ``dispatcher.ledger.run`` before handing it messages."""
    keys = crypto.HostKeys.generate()
    store = open_store(str(db))
    seed = crypto.new_signing_key()
    account = "6222020200112233446"
    store.add_terminal(
        Terminal(TID, MID, "Bench Shop", "active", crypto.verify_key_of(seed), 10**9, 100, 0.0),
        NewAccount(crypto.seal(keys.data_key, account.encode()),
                   crypto.account_hash(keys.data_key, account), cards.mask_account(account),
                   "Bench", "102100099996", "", "bench", "bench"),
        None,
    )  # fmt: skip
    config = Config(db=str(db))
    state = HostState(store=store, host_keys=keys, config=config)
    core = HostCore(codec=compile_spec(specs.load("acq87")), state=state)
    return Dispatcher(core, Ledger(open_store(str(db)), batch=config.write_batch)), keys, seed


def close(dispatcher: Dispatcher) -> None:
    dispatcher.core.state.store.close()
    dispatcher.ledger.store.close()


async def sign_on(dispatcher: Dispatcher, seed: bytes) -> crypto.SessionKeys:
    codec = TERMINAL
    kx_pk, kx_sk = crypto.kx_keypair()
    field7 = time.strftime("%m%d%H%M%S", time.gmtime())  # a sign-on must be fresh
    transcript = crypto.signon_request_transcript(TID, "000001", field7, kx_pk)
    tlv = encode_tlv({"KX": kx_pk.hex(), "SG": crypto.sign(seed, transcript).hex()})
    request = codec.encode({"t": "0800", "7": field7, "11": "000001", "41": TID,
                            "42": MID, "48": tlv, "70": "001"})  # fmt: skip
    raw = await dispatcher.handle(request)
    assert raw is not None
    reply = codec.decode(raw)
    assert reply["39"] == "00", reply
    kx_host = bytes.fromhex(decode_tlv(reply["48"])["KX"])
    rx, tx = crypto.terminal_session(kx_pk, kx_sk, kx_host)
    return crypto.SessionKeys.from_kx(rx, tx)


def sales(dispatcher: Dispatcher, keys: crypto.SessionKeys, count: int) -> list[bytes]:
    codec = TERMINAL
    out = []
    for i in range(count):
        fields = {"t": "0200", "2": "6222021234567890128", "3": "000000", "4": "000000012345",
                  "7": "1122101530", "11": f"{i % 1_000_000:06d}",
                  "12": "101530", "13": f"{1 + i // 1_000_000:04d}", "14": "3012", "22": "051",
                  "25": "00", "41": TID, "42": MID, "49": "156", "64": "0" * 16}  # fmt: skip
        body = codec.encode(fields)[:-8]
        out.append(body + crypto.mac(keys.tx_mac, body))
    return out


def floor_per_second(
    dispatcher: Dispatcher, keys: crypto.SessionKeys, frames: list[bytes]
) -> float:
    """Codec and MAC only: what any host must do per sale, without routes and stages."""
    codec = TERMINAL
    start = time.perf_counter()
    for frame in frames:
        req = codec.decode(frame)
        assert crypto.mac_ok(keys.tx_mac, frame[:-8], frame[-8:])
        resp = {"t": "0210", "3": req["3"], "4": req["4"], "7": req["7"], "11": req["11"],
                "12": req["12"], "13": req["13"], "37": "000000000001", "38": "123456",
                "39": "00", "41": req["41"], "42": req["42"], "48": "SA0196222***********3446",
                "49": req["49"], "64": "0" * 16}  # fmt: skip
        body = codec.encode(resp)[:-8]
        _ = body + crypto.mac(keys.tx_mac, body)
    return len(frames) / (time.perf_counter() - start)


async def through_the_host(
    dispatcher: Dispatcher, frames: list[bytes], in_flight: int
) -> tuple[float, float, int]:
    """(sales per second, CPU seconds per sale, approved): ``in_flight`` outstanding at once;
    each answer, as a connection sends it, after the log lines are flushed."""
    start_sale, flush_log = dispatcher.start, dispatcher.core.flush_log
    codec = TERMINAL
    pending = iter(frames)
    approved = [0]
    left = [len(frames)]
    done = anyio.Event()

    def finish(out: bytes | None) -> None:
        flush_log()
        if out is not None and codec.decode(out)["39"] == "00":
            approved[0] += 1
        left[0] -= 1
        frame = next(pending, None)
        if frame is not None:
            start_sale(frame, finish)
        elif not left[0]:
            done.set()

    cpu, wall = time.process_time(), time.perf_counter()
    for frame in [next(pending) for _ in range(min(in_flight, len(frames)))]:
        start_sale(frame, finish)
    await done.wait()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return len(frames) / wall, cpu / len(frames), approved[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sales", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=256)
    parser.add_argument("--metrics", action="store_true", help="count as [metrics] does")
    args = parser.parse_args()

    results: dict[str, list[tuple[float, float]]] = {"floor": [], "logged": [], "quiet": []}
    for _ in range(args.rounds):
        for mode in ("logged", "quiet"):
            sink = io.StringIO()
            configure_logging("info" if mode == "logged" else "warning", sink)
            with tempfile.TemporaryDirectory() as tmp:
                dispatcher, _, seed = build(Path(tmp) / "bench.db")
                tune_gc()  # as acqhost serve does once its server is built
                if args.metrics:
                    metrics = Metrics(mti for mti, _ in dispatcher.core.routes)
                    dispatcher.observe = metrics.observe
                    dispatcher.ledger.on_flush = metrics.ledger_flushed

                async def run(
                    dispatcher: Dispatcher = dispatcher, seed: bytes = seed, mode: str = mode
                ) -> None:
                    async with anyio.create_task_group() as tg:
                        await tg.start(dispatcher.ledger.run)
                        keys = await sign_on(dispatcher, seed)
                        frames = sales(dispatcher, keys, args.sales)
                        floor = floor_per_second(dispatcher, keys, frames)
                        rate, cpu, approved = await through_the_host(
                            dispatcher, frames, args.in_flight
                        )
                        assert approved == args.sales, (approved, args.sales)
                        dispatcher.ledger.close()
                    results["floor"].append((floor, 1 / floor))
                    results[mode].append((rate, cpu))

                try:
                    anyio.run(run)
                    stored = len(dispatcher.core.state.store.sales(TID))
                    assert stored == args.sales, (stored, args.sales)
                finally:
                    close(dispatcher)
    best = {k: max(v) for k, v in results.items()}
    print(f"sales through the host core and a SQLite ledger, one process, {args.sales} per "
          f"round, {args.in_flight} in flight, best of {args.rounds}"
          f"{', metrics counted' if args.metrics else ''}")  # fmt: skip
    print(f"{'what':<44}{'sales/s':>10}{'CPU µs/sale':>13}")
    rows = (("codec + MAC only (floor)", best["floor"]),
            ("host, one JSON log line per sale", best["logged"]),
            ("host, per-message log off (warning)", best["quiet"]))  # fmt: skip
    for name, (rate, cpu) in rows:
        print(f"{name:<44}{rate:>10,.0f}{cpu * 1e6:>13.1f}")
    print(f"host (logged) CPU per sale / floor: {best['logged'][1] / best['floor'][1]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
