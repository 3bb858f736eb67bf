"""The bank down while terminals close their batches: every 0500 is answered as usual (00,
promptly), the 0520s wait in the outbox where ``acqhost banklink status`` shows the backlog,
and once the bank is back each reaches it exactly once, each terminal's in the order of its
batches, with the totals the host closed."""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path

import anyio
import pytest

from acqhost.domain import advices
from acqhost.domain.crypto import HostKeys
from acqhost.store import open_store
from acqhost.wire.tlv import decode_tlv
from simulators.processes import free_port
from tests.faultkit import Acked, check_store, four_terminals
from tests.hostkit import make_host, running, signed_on
from tests.test_banklink import bank_config, bank_system, with_bank
from tests.test_banklink_faults import (
    all_delivered,
    assert_delivered_once_in_order,
    banklink_status,
    outbox,
    until,
    write_config,
)


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_batches_closed_while_the_bank_is_down_reach_it_once_in_order_when_it_returns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    setup = with_bank(make_host(tmp_path), bank_config(port))
    tids = four_terminals(setup)
    config = write_config(tmp_path, port)  # the same bank, for acqhost banklink status
    acked = Acked()
    closing: list[float] = []
    async with running(setup):
        async with bank_system(setup, port):
            await until(all_delivered(setup.config.db), 10, "the registrations' 0320s")
        # The bank is down from here on.
        for tid in tids:
            client = await signed_on(setup, tid)
            for batch in (1, 2):
                amounts = [100 * batch + n for n in range(1, 4)]
                for amount in amounts:
                    ex = await client.sale(amount)
                    assert ex.rc == "00"
                    acked.sales[(tid, ex.request["11"], ex.request["13"])] = dict(
                        ex.request, **{"37": ex.response["37"]}
                    )
                started = time.monotonic()
                ex = await client.settle(batch, len(amounts), sum(amounts))
                closing.append(time.monotonic() - started)
                assert ex.rc == "00", ex.response
                acked.closed.add((tid, batch))
            await client.close()
        waiting = [a for a in outbox(setup.config.db) if a.state == "queued"]
        assert [a.mti for a in waiting] == ["0520"] * 8
        await anyio.sleep(0.3)  # the link has tried (and failed) to reach the bank
        (status,) = await anyio.to_thread.run_sync(banklink_status, setup, config, capsys)
        assert (status["queued"], status["dead"]) == (8, 0), status
        assert status["oldest_age"] > 0.3 and status["dispatcher"] != "-", status
        async with bank_system(setup, port) as bank:
            await until(all_delivered(setup.config.db), 10, "every 0520 delivered")
    # Answered as usual while the bank was down: nothing waited for it.
    assert max(closing) < 3.0, closing  # (well under any wait for the bank link)
    records = assert_delivered_once_in_order(setup.config.db, tmp_path / "bank.jsonl")
    assert (bank.bank.counters.accepted, bank.bank.counters.duplicates) == (8, 0)
    for tid in tids:
        settled = [decode_tlv(r["48"]) if isinstance(r["48"], str) else r["48"]
                   for r in records if r["41"] == tid and r["mti"] in ("0520", "0521")]  # fmt: skip
        assert [(e["BN"], e["CT"], e["AM"]) for e in settled] == [
            ("000001", "3", "306"),
            ("000002", "3", "606"),
        ], tid
    check_store(setup.config.db, setup.config.key_path, tids, acked)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_the_checks_find_a_lost_sale_and_a_lost_or_doubled_settlement_update(
    tmp_path: Path,
) -> None:
    setup = make_host(tmp_path)
    acked = Acked()
    async with running(setup):
        client = await signed_on(setup)
        ex = await client.sale(250)
        acked.sales[("TERM0001", ex.request["11"], ex.request["13"])] = dict(
            ex.request, **{"37": ex.response["37"]}
        )
        assert (await client.settle(1, 1, 250)).rc == "00"
        await client.close()
    db, keys, tids = setup.config.db, setup.config.key_path, ["TERM0001", "TERM0002"]
    assert check_store(db, keys, tids, acked)["advices"] == 3
    doubled = ("0520", "TERM0001", "1", 1, 1, 250)
    lost = Acked(sales={**acked.sales, ("TERM0001", "999999", "0101"): {"37": "1", "4": "1"}})
    with pytest.raises(AssertionError, match="not in the ledger"):
        check_store(db, keys, tids, lost)
    assert [a.mti for a in outbox(db)].count("0520") == 1
    store = open_store(db)
    try:
        with store.transaction("TERM0001") as tx:  # the same 0520 queued a second time
            version = tx.versions("TERM0001")[0]
            advices.queue_settlement_advice(tx, HostKeys.load(keys).data_key, "TERM0001", 1,
                                            version, 1, 250, time.time())  # fmt: skip
    finally:
        store.close()
    with pytest.raises(AssertionError, match=re.escape(f"extra {{{doubled}: 1}}")):
        check_store(db, keys, tids, acked)
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM outbox WHERE mti = '0520'")
    with pytest.raises(AssertionError, match=re.escape(f"missing {{{doubled}: 1}}")):
        check_store(db, keys, tids, acked)
