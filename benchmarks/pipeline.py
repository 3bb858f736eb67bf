"""Pipeline benchmark: sales per second through the whole pipeline, in one process, no sockets.

Each sale is a MAC'd 0200 frame from a signed-on terminal: decode, route, every stage (known
terminal, signed on, MAC, fields, card, duplicate, authorisation), the ledger write (in-memory
store, applied inline), response building, MAC and encode. Printed beside it, in the same run:
the floor of the same work without the pipeline (codec decode + MAC check + codec encode + MAC),
so the ratio shows what the stages cost. Run: ``python benchmarks/pipeline.py [--sales N]``.
"""

from __future__ import annotations

import argparse
import io
import time

import anyio

from acqhost.config import Config
from acqhost.domain import cards, crypto
from acqhost.host.core import Pipeline
from acqhost.log import configure_logging
from acqhost.runtime.ledger import Ledger
from acqhost.store.base import NewAccount, Terminal
from acqhost.store.memory import MemoryStore
from acqhost.wire import specs
from acqhost.wire.codec import compile_spec
from acqhost.wire.tlv import encode_tlv

TID, MID = "TERM0001", "MERCHANT0000001"
TARGET = 50_000


def build() -> tuple[Pipeline, crypto.HostKeys, bytes]:
    keys = crypto.HostKeys.generate()
    store = MemoryStore()
    seed = crypto.new_signing_key()
    account = "6222020200112233446"
    store.add_terminal(
        Terminal(TID, MID, "Bench Shop", "active", crypto.verify_key_of(seed), 10**9, 100, 0.0),
        NewAccount(crypto.seal(keys.data_key, account.encode()),
                   crypto.account_hash(keys.data_key, account), cards.mask_account(account),
                   "Bench", "102100099996", "", "bench", "bench"),
        None,
    )  # fmt: skip
    pipeline = Pipeline(
        codec=compile_spec(specs.load("acq87")),
        store=store,
        ledger=Ledger(store, inline=True),
        host_keys=keys,
        config=Config(db=":memory:"),
    )
    return pipeline, keys, seed


async def sign_on(pipeline: Pipeline, seed: bytes) -> crypto.SessionKeys:
    kx_pk, kx_sk = crypto.kx_keypair()
    transcript = crypto.signon_request_transcript(TID, "000001", "1122101530", kx_pk)
    tlv = encode_tlv({"KX": kx_pk.hex(), "SG": crypto.sign(seed, transcript).hex()})
    request = pipeline.codec.encode({"t": "0800", "7": "1122101530", "11": "000001", "41": TID,
                                     "42": MID, "48": tlv, "70": "001"})  # fmt: skip
    raw = await pipeline.handle(request)
    assert raw is not None
    reply = pipeline.codec.decode(raw)
    assert reply["39"] == "00", reply
    kx_host = bytes.fromhex(dict(_tlv(reply["48"]))["KX"])
    rx, tx = crypto.terminal_session(kx_pk, kx_sk, kx_host)
    return crypto.SessionKeys.from_kx(rx, tx)


def _tlv(text: str) -> list[tuple[str, str]]:
    from acqhost.wire.tlv import decode_tlv

    return list(decode_tlv(text).items())


def sales(pipeline: Pipeline, keys: crypto.SessionKeys, count: int) -> list[bytes]:
    out = []
    for i in range(count):
        fields = {"t": "0200", "2": "6222021234567890128", "3": "000000", "4": "000000012345",
                  "7": "1122101530", "11": f"{i % 1_000_000:06d}",
                  "12": "101530", "13": f"{1 + i // 1_000_000:04d}", "14": "3012", "22": "051",
                  "25": "00", "41": TID, "42": MID, "49": "156", "64": "0" * 16}  # fmt: skip
        body = pipeline.codec.encode(fields)[:-8]
        out.append(body + crypto.mac(keys.tx_mac, body))
    return out


def floor_per_second(pipeline: Pipeline, keys: crypto.SessionKeys, frames: list[bytes]) -> float:
    """Codec and MAC only: what any host must do per sale, without routes and stages."""
    codec = pipeline.codec
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


async def pipeline_per_second(pipeline: Pipeline, frames: list[bytes]) -> float:
    handle = pipeline.handle
    start = time.perf_counter()
    for frame in frames:
        await handle(frame)
    elapsed = time.perf_counter() - start
    return len(frames) / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sales", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    results: dict[str, list[float]] = {"floor": [], "logged": [], "quiet": []}
    for _ in range(args.rounds):
        for mode in ("logged", "quiet"):
            sink = io.StringIO()
            configure_logging("info" if mode == "logged" else "warning", sink)
            pipeline, _, seed = build()

            async def run(pipeline: Pipeline = pipeline, seed: bytes = seed) -> tuple[float, float]:
                keys = await sign_on(pipeline, seed)
                frames = sales(pipeline, keys, args.sales)
                floor = floor_per_second(pipeline, keys, frames)
                rate = await pipeline_per_second(pipeline, frames)
                return floor, rate

            floor, rate = anyio.run(run)
            results["floor"].append(floor)
            results[mode].append(rate)
            approved = sum(1 for s in pipeline.store.sales(TID))
            assert approved == args.sales, (approved, args.sales)
    best = {k: max(v) for k, v in results.items()}
    print(f"sales through the pipeline, one process, one core, {args.sales} per round, "
          f"best of {args.rounds}")  # fmt: skip
    print(f"{'what':<44}{'sales/s':>10}{'µs/sale':>10}")
    rows = (("codec + MAC only (floor)", best["floor"]),
            ("pipeline, one JSON log line per sale", best["logged"]),
            ("pipeline, per-message log off (warning)", best["quiet"]))  # fmt: skip
    for name, rate in rows:
        print(f"{name:<44}{rate:>10,.0f}{1e6 / rate:>10.1f}")
    print(f"pipeline (logged) / floor: {best['logged'] / best['floor']:.2f}   "
          f"target >= {TARGET:,} sales/s logged: "
          f"{'met' if best['logged'] >= TARGET else 'MISSED'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
