"""Batch settlement (PROTOCOL.md 5.4) end to end over TCP on loopback, on asyncio and on trio:
0500 -> 0510 with 00, 95 and 12, the batch that closes and the one that opens, a batch spanning
a change of the settlement account (on SQLite and PostgreSQL), reversals and sales around a
settlement, retransmissions, format and security codes; the simulator's `settle` and the
acquirer's `acqhost settle report`."""

from __future__ import annotations

import contextlib
import csv
import getpass
import io
import json
import os
import time
from pathlib import Path

import anyio
import pytest

from acqhost.cli import main as cli
from acqhost.config import RebindPolicy
from acqhost.domain import cards, crypto, rebind, settlement
from acqhost.store import open_store
from acqhost.wire.tlv import decode_tlv, encode_tlv
from simulators.terminal import Exchange
from simulators.terminal import main as terminal_main
from tests import hostkit
from tests.hostkit import (
    ACCOUNT,
    BANK,
    HOLDER,
    HostSetup,
    make_host,
    make_postgres_host,
    running,
    signed_on,
)

pytestmark = pytest.mark.anyio

# Every test on both backends, each against a host of its own.
anyio_backend = hostkit.both_backends
setup = hostkit.host_setup

NEW_ACCOUNT = "6217000100200030007"


def expect(ex: Exchange, rc: str, **elements: str) -> None:
    """A 0510 with ``rc``, MAC'd unless PROTOCOL.md 3 says it cannot be, and exactly these 48
    elements."""
    assert ex.response["t"] == "0510", ex.response
    assert ex.rc == rc, (ex.rc, ex.tlv)
    assert ex.tlv == elements
    assert ("64" in ex.response) == (rc not in ("03", "58", "63"))
    for name in ("7", "11", "41", "42"):
        assert ex.response.get(name) == ex.request.get(name)


def batches(setup: HostSetup, tid: str = "TERM0001") -> dict[str, int]:
    """Each sale's batch, by RRN."""
    store = open_store(setup.config.db)
    try:
        return {s.rrn: s.batch_no for s in store.sales(tid)}
    finally:
        store.close()


async def test_matching_totals_close_the_batch_and_the_next_sale_is_in_the_next(
    setup: HostSetup,
) -> None:
    async with running(setup) as server:
        client = await signed_on(setup)
        first = await client.sale(1000)
        reversed_ = await client.sale(250)
        assert (await client.reverse(reversed_)).rc == "00"
        test = await client.sale(1, test=True)  # a test sale settles too
        ex = await client.settle(1, 2, 1001)
        expect(ex, "00", BN="000001", CT="2", AM="1001", NB="000002")
        assert server.core.state.batches["TERM0001"] == 2  # what the next sale records
        after = await client.sale(300)
        assert after.rc == "00"
        # A sale of the settled batch is not reversed any more.
        assert (await client.reverse(first)).rc == "12"
        expect(await client.settle(2, 1, 300), "00", BN="000002", CT="1", AM="300", NB="000003")
        await client.close()
    in_batch = batches(setup)
    rrns = [ex.response["37"] for ex in (first, reversed_, test, after)]
    assert [in_batch[rrn] for rrn in rrns] == [1, 1, 1, 2]


async def test_mismatched_totals_get_95_with_the_hosts_then_corrected_get_00(
    setup: HostSetup,
) -> None:
    async with running(setup):
        client = await signed_on(setup)
        for amount in (1200, 34):
            assert (await client.sale(amount)).rc == "00"
        expect(await client.settle(1, 2, 1200), "95", BN="000001", CT="2", AM="1234")
        expect(await client.settle(1, 1, 1234), "95", BN="000001", CT="2", AM="1234")
        assert (await client.sale(66)).rc == "00"  # the batch stayed open
        expect(await client.settle(1, 2, 1234), "95", BN="000001", CT="3", AM="1300")
        expect(await client.settle(1, 3, 1300), "00", BN="000001", CT="3", AM="1300", NB="000002")
        # An empty batch settles with zero totals.
        expect(await client.settle(2, 0, 0), "00", BN="000002", CT="0", AM="0", NB="000003")
        await client.close()


async def test_a_retransmitted_0500_after_the_close_gets_the_same_answer(setup: HostSetup) -> None:
    async with running(setup):
        client = await signed_on(setup)
        assert (await client.sale(500)).rc == "00"
        fields = client.settle_fields(1, 1, 500)
        first = await client.request(fields)
        expect(first, "00", BN="000001", CT="1", AM="500", NB="000002")
        assert (await client.sale(700)).rc == "00"  # batch 2 is not empty
        again = await client.request(fields)
        expect(again, "00", BN="000001", CT="1", AM="500", NB="000002")
        # Another 0500 for the settled batch, or one for a batch never opened: 12, naming the
        # open batch.
        expect(await client.settle(1, 1, 500), "12", NB="000002")
        expect(await client.settle(7, 0, 0), "12", NB="000002")
        expect(await client.settle(2, 1, 700), "00", BN="000002", CT="1", AM="700", NB="000003")
        await client.close()


async def test_sales_and_reversals_pipelined_behind_a_settlement(setup: HostSetup) -> None:
    async with running(setup):
        client = await signed_on(setup)
        sold = await client.sale(400)
        sale = client.sale_fields(900)
        reversal = {**sold.request, "t": "0400", "11": client.stan()}
        reversal["90"] = "0200" + sold.request["11"] + sold.request["7"] + "0" * 22
        for name in ("2", "12", "13", "14", "22", "25"):
            del reversal[name]
        await client.send_pipelined([client.settle_fields(1, 1, 400), sale, reversal])
        answers = [client.codec.decode(await client.receive_raw()) for _ in range(3)]
        assert [(a["t"], a["39"]) for a in answers] == [
            ("0510", "00"),
            ("0210", "00"),
            ("0410", "12"),
        ]
        await client.close()
    in_batch = batches(setup)
    assert (in_batch[sold.response["37"]], in_batch[answers[1]["37"]]) == (1, 2)


async def test_format_route_and_security_codes(setup: HostSetup) -> None:
    async with running(setup):
        client = await signed_on(setup)
        good = client.settle_fields(1, 0, 0)
        tlv = decode_tlv(good["48"])
        cases = [
            ({k: v for k, v in good.items() if k != "48"}, "30"),
            ({k: v for k, v in good.items() if k != "11"}, "30"),
            (dict(good, **{"48": encode_tlv({**tlv, "BN": "00001"})}), "30"),
            (dict(good, **{"48": encode_tlv({**tlv, "BN": "00000A"})}), "30"),
            (dict(good, **{"48": encode_tlv({"BN": "000001", "AM": "0"})}), "30"),
            (dict(good, **{"48": encode_tlv({**tlv, "CT": "-1"})}), "30"),
            (dict(good, **{"48": encode_tlv({**tlv, "AM": "1" * 19})}), "30"),
            (dict(good, **{"48": "BN006"}), "30"),  # malformed TLV
            (dict(good, **{"42": "MERCHANT0000002"}), "03"),
        ]
        for fields, code in cases:
            ex = await client.request(fields)
            assert ex.response["t"] == "0510" and ex.rc == code, (fields, ex.response)
            assert "48" not in ex.response
        assert (await client.request(good, mac=False)).rc == "63"  # no MAC
        bad = client.encode(client.settle_fields(1, 0, 0), mac=True)
        ex = client.codec.decode(await client.exchange_raw(bad[:-1] + bytes([bad[-1] ^ 1])))
        assert (ex["39"], "64" in ex) == ("63", False)
        # A processing code does not change the route; the answer echoes it.
        ex = await client.request(dict(client.settle_fields(1, 0, 0), **{"3": "920000"}))
        expect(ex, "00", BN="000001", CT="0", AM="0", NB="000002")
        assert ex.response["3"] == "920000"
        assert (await client.sign_off()).rc == "00"
        client.keys = crypto.SessionKeys.from_kx(bytes(32), bytes(32))
        assert (await client.settle(2, 0, 0)).rc == "58"
        await client.close()
    store = open_store(setup.config.db)
    try:
        assert store.open_batch("TERM0001") == 2
    finally:
        store.close()


def change_account(setup: HostSetup) -> float:
    """Version 2 (NEW_ACCOUNT), approved automatically as if submitted when the terminal was
    registered: its effective-from, no more than DECISION_LEAD after that."""
    store = open_store(setup.config.db)
    key = crypto.HostKeys.load(setup.config.key_path).data_key
    sub = rebind.Submission(tid="TERM0001", operator_id="01", stan="000001",
                            transmission="0101000000", holder=HOLDER, bank_code=BANK, branch="",
                            account=NEW_ACCOUNT, source="typed")  # fmt: skip
    policy = RebindPolicy(review="auto", cooling_off=0.0, min_interval=0.0)
    try:
        with store.transaction("TERM0001") as tx:
            registered = tx.versions("TERM0001")[0].created_at
            outcome = rebind.submit(tx, key, sub, password_ok=True, policy=policy,
                                    now=registered)  # fmt: skip
            assert outcome.code == "00", outcome
            return tx.versions("TERM0001")[1].effective_from
    finally:
        store.close()


def report(setup: HostSetup, *argv: str) -> str:
    where = ["--db", setup.config.db, "--keys", str(setup.config.key_path)]
    """What ``acqhost settle report`` writes to stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli(["settle", "report", *where, *argv]) == 0
    return out.getvalue()


# Each store once, each event loop once: what differs is the store's.
@pytest.mark.parametrize(
    ("store_kind", "anyio_backend"), [("sqlite", "trio"), ("postgresql", "asyncio")]
)
async def test_a_batch_spanning_an_account_change_settles_each_part_to_its_own_account(
    tmp_path: Path, store_kind: str, request: pytest.FixtureRequest
) -> None:
    if store_kind == "sqlite":
        setup = make_host(tmp_path)
    else:
        setup = make_postgres_host(tmp_path, request.getfixturevalue("pg_url"))
    async with running(setup) as server:
        client = await signed_on(setup)
        before = [await client.sale(amount) for amount in (1000, 2000)]
        assert [ex.tlv["SV"] for ex in before] == ["1", "1"]
        effective = change_account(setup)
        await anyio.sleep(max(0.0, effective - time.time()))
        server.core.state.invalidate("account", "TERM0001")  # cached before the change
        after = [await client.sale(amount) for amount in (300, 1)]
        assert (await client.sale(7, test=True)).tlv["SV"] == "2"
        assert (await client.reverse(after[1])).rc == "00"
        assert [ex.tlv["SV"] for ex in after] == ["2", "2"]
        expect(await client.settle(1, 4, 3307), "00", BN="000001", CT="4", AM="3307", NB="000002")
        assert (await client.sale(50)).tlv["SV"] == "2"  # batch 2, on the account in force
        await client.close()
    lines = list(csv.DictReader(io.StringIO(report(setup))))
    assert [(x["batch"], x["account_version"], x["count"], x["amount"]) for x in lines] == [
        ("1", "1", "2", "3000"),
        ("1", "2", "2", "307"),
    ]
    assert [x["account"] for x in lines] == [
        cards.mask_account(ACCOUNT),
        cards.mask_account(NEW_ACCOUNT),
    ]


async def test_settle_report_masked_and_unmasked(setup: HostSetup) -> None:
    async with running(setup):
        client = await signed_on(setup)
        assert (await client.sale(1234)).rc == "00"
        assert (await client.settle(1, 1, 1234)).rc == "00"
        await client.close()
        other = await signed_on(setup, "TERM0002")
        assert (await other.sale(99)).rc == "00"
        assert (await other.settle(1, 1, 99)).rc == "00"
        await other.close()
    today = time.strftime("%Y-%m-%d", time.gmtime())
    text = report(setup)
    rows = list(csv.reader(io.StringIO(text)))
    header = "batch tid mid closed_at account_version account holder bank_code count amount"
    assert rows[0] == header.split()
    masked = cards.mask_account(ACCOUNT)
    assert [r[:3] + r[4:] for r in rows[1:]] == [
        ["1", "TERM0001", "MERCHANT0000001", "1", masked, HOLDER, BANK, "1", "1234"],
        ["1", "TERM0002", "MERCHANT0000002", "1", masked, HOLDER, BANK, "1", "99"],
    ]
    assert all(r[3].startswith(today + "T") and r[3].endswith("Z") for r in rows[1:])
    assert ACCOUNT not in text
    assert report(setup, "--tid", "TERM0002", "--batch", "1", "--date", today).count("\n") == 2
    assert report(setup, "--batch", "2").count("\n") == 1  # the header alone
    assert report(setup, "--date", "2001-01-01").count("\n") == 1
    doc = json.loads(report(setup, "--format", "json", "--tid", "TERM0001"))
    assert doc == [
        {"batch": 1, "tid": "TERM0001", "mid": "MERCHANT0000001", "closed_at": rows[1][3],
         "account_version": 1, "account": masked, "holder": HOLDER, "bank_code": BANK,
         "count": 1, "amount": 1234},
    ]  # fmt: skip
    store = open_store(setup.config.db)
    try:
        with store.transaction(write=False) as tx:
            assert tx.audit_entry("*", settlement.REPORT_UNMASKED, "settlement") is None
    finally:
        store.close()

    unmasked = report(setup, "--unmasked", "--by", "auditor", "--format", "json")
    assert [line["account"] for line in json.loads(unmasked)] == [ACCOUNT, ACCOUNT]
    out = setup.folder / "settlement.csv"
    report(setup, "--unmasked", "--tid", "TERM0001", "--out", str(out))
    assert ACCOUNT in out.read_text() and os.stat(out).st_mode & 0o777 == 0o600
    assert cli(["settle", "report", "--db", setup.config.db, "--out", str(out)]) == 2
    assert cli(["settle", "report", "--db", setup.config.db, "--date", "yesterday"]) == 2
    # an unmasked report whose file cannot be written leaves no audit entry saying it was
    nowhere = setup.folder / "no" / "such" / "settlement.csv"
    unwritable = ["--unmasked", "--by", "mallory", "--out", str(nowhere)]
    assert cli(["settle", "report", "--db", setup.config.db, *unwritable]) == 2
    store = open_store(setup.config.db)
    try:
        with store.transaction(write=False) as tx:
            entries = [e for e in tx.audit_entries() if e.action == settlement.REPORT_UNMASKED]
    finally:
        store.close()
    assert [(e.actor, e.tid) for e in entries] == [
        ("auditor", "*"),
        (getpass.getuser(), "TERM0001"),
    ]
    assert json.loads(entries[1].detail)["shown"] == ["TERM0001 b1 v1"]
    assert all(ACCOUNT not in e.detail for e in entries)
    assert cli(["audit", "verify", "--db", setup.config.db]) == 0


async def test_simulator_settle_command_line(
    setup: HostSetup, anyio_backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running(setup):
        key_file, port = str(setup.folder / "TERM0001.json"), str(setup.config.port)
        common = ["--key-file", key_file, "--port", port, "--backend", anyio_backend]

        async def run(*argv: str) -> tuple[int, str]:
            capsys.readouterr()
            status = await anyio.to_thread.run_sync(terminal_main, [*common, *argv])
            return status, capsys.readouterr().out

        assert (await run("sale", "1500"))[0] == 0
        status, out = await run("settle", "--batch", "1", "--count", "1", "--amount", "1400")
        assert status == 1, out
        assert "settle: 0500 -> 0510 rc=95 (reconcile error)" in out
        assert "batch 000001: count 1 amount 1500" in out
        status, out = await run("settle")  # the host names the batch, then its totals
        assert status == 0, out
        assert out.count("settle: 0500 -> 0510") == 3
        assert "rc=12 (invalid transaction)  open batch 000001" in out
        assert "rc=00  batch 000001: count 1 amount 1500  open batch 000002" in out
        status, out = await run("settle", "--batch", "2", "--count", "0", "--amount", "0")
        assert status == 0 and "open batch 000003" in out, out
        with pytest.raises(SystemExit):
            terminal_main([*common, "settle", "--count", "1"])
