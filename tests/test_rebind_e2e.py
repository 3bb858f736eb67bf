"""Settlement-account changes (PROTOCOL.md 5.3) end to end over TCP on loopback: every path of
submit, inquire and cancel with its 39 and 48 and what the store holds afterwards; the whole
story (review, cooling-off, activation, verification by test sale, rollback) on SQLite and
PostgreSQL, with no account number in clear at rest or in the log; and the simulator's rebind
command line."""

from __future__ import annotations

import calendar
import dataclasses
import io
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from acqhost.cli import main as cli
from acqhost.config import RebindPolicy, load_config
from acqhost.domain import accounts, audit, cards, crypto
from acqhost.store import open_store
from acqhost.store.base import Store, StoreTx
from acqhost.wire.tlv import decode_tlv, encode_tlv
from simulators.terminal import Exchange, TerminalClient
from simulators.terminal import main as terminal_main
from tests.hostkit import (
    ACCOUNT,
    BANK,
    HOLDER,
    HostSetup,
    add_terminal,
    make_host,
    make_host_on,
    running,
    signed_on,
)

pytestmark = pytest.mark.anyio


def luhn_complete(body: str) -> str:
    """``body`` with the check digit that makes it Luhn-valid."""
    return next(body + d for d in "0123456789" if cards.luhn_ok(body + d))


def bad_check(number: str) -> str:
    """``number`` with a check digit that fails the Luhn test."""
    return number[:-1] + str((int(number[-1]) + 1) % 10)


def full_width(text: str) -> str:
    """``text`` in full-width forms (as some terminals' input methods type it)."""
    return "".join("\u3000" if c == " " else chr(ord(c) + 0xFEE0) for c in text)


NEW_ACCOUNT = luhn_complete("621700010020003000")  # 19 digits
THIRD_ACCOUNT = luhn_complete("622848001234567890")
CARD_PAN = luhn_complete("62284800987654321")  # 18 digits, on the inserted card
OLD_SA, NEW_SA = cards.mask_account(ACCOUNT), cards.mask_account(NEW_ACCOUNT)
UNKNOWN_RF = "ZZZZZZZZZZZZZZZZ"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def with_policy(setup: HostSetup, **policy: Any) -> HostSetup:
    """The host's [rebind] policy; changes unpaced unless the test says otherwise."""
    values = {"review": "manual", "cooling_off": 3600.0, "min_interval": 0.0, **policy}
    setup.config = dataclasses.replace(setup.config, rebind=RebindPolicy(**values))
    return setup


def submit_fields(client: TerminalClient, **kwargs: Any) -> dict[str, str]:
    """A valid typed submit of NEW_ACCOUNT unless ``kwargs`` say otherwise."""
    values = {
        "operator_id": "01",
        "password": "0000",
        "holder": HOLDER,
        "bank_code": BANK,
        "account": NEW_ACCOUNT,
        **kwargs,
    }
    return client.submit_fields(**values)


def edit_48(fields: dict[str, str], **elements: str | None) -> dict[str, str]:
    """``fields`` with 48 elements replaced (a value) or removed (None)."""
    tlv = decode_tlv(fields["48"])
    for tag, value in elements.items():
        if value is None:
            tlv.pop(tag, None)
        else:
            tlv[tag] = value
    return dict(fields, **{"48": encode_tlv(tlv)})


def expect(ex: Exchange, rc: str, **elements: str) -> dict[str, str]:
    """Assert a 0310's 39 and the named 48 elements; RS is there exactly when 39 is 05."""
    assert ex.response["t"] == "0310", ex.response
    assert ex.rc == rc, (ex.rc, ex.tlv)
    tlv = ex.tlv
    for tag, value in elements.items():
        assert tlv.get(tag) == value, (tag, tlv)
    assert ("RS" in tlv) == (rc == "05"), tlv
    if rc not in ("03", "58", "63"):  # those have no key to MAC with (PROTOCOL.md 3)
        assert "64" in ex.response or "128" in ex.response
    return tlv


def has(obj: object, **expected: object) -> None:
    """Assert the named attributes of ``obj`` (a store record)."""
    assert {name: getattr(obj, name) for name in expected} == expected


def ef_seconds(ef: str) -> int:
    return calendar.timegm(time.strptime(ef, "%Y%m%d%H%M%S"))


def expect_accepted(ex: Exchange, state: str, sa: str, effective: float) -> str:
    """A 00 naming a fresh request (RF) in ``state`` for the account ``sa``, effective from
    ``effective`` (48 EF, to the second). Its RF."""
    tlv = expect(ex, "00", ST=state, SA=sa)
    assert re.fullmatch(r"[A-Z2-9]{16}", tlv["RF"]), tlv
    assert abs(ef_seconds(tlv["EF"]) - effective) <= 1.5, (tlv["EF"], effective)
    return tlv["RF"]


@contextmanager
def reading(setup: HostSetup) -> Iterator[StoreTx]:
    """A read transaction on the host's store, through a connection of its own."""
    store = open_store(setup.config.db)
    try:
        with store.transaction(write=False) as tx:
            yield tx
    finally:
        store.close()


async def wait_state(client: TerminalClient, rf: str, state: str, seconds: float = 5.0) -> None:
    """Inquire until the request is in ``state`` (activation runs every second)."""
    with anyio.fail_after(seconds):
        while (await client.rebind_inquire(rf)).tlv.get("ST") != state:
            await anyio.sleep(0.1)


# -- submit, inquire, cancel ---------------------------------------------------------------------


async def test_submit_for_review_inquire_and_cancel(tmp_path: Path) -> None:
    setup = with_policy(make_host(tmp_path), cooling_off=3600.0)
    async with running(setup):
        client = await signed_on(setup)
        expect(await client.rebind_inquire(), "25")  # nothing submitted yet
        fields = submit_fields(client, branch="Haidian")
        now = time.time()
        rf = expect_accepted(await client.request(fields), "PENDING_REVIEW", NEW_SA, now + 3600)
        with reading(setup) as tx:
            request, versions = tx.request(rf), tx.versions("TERM0001")
        has(request, tid="TERM0001", kind="rebind", state="PENDING_REVIEW", source="typed")
        has(request, version=2, operator_id="01", stan=fields["11"], transmission=fields["7"])
        assert [v.state for v in versions] == ["ACTIVE", "PENDING_REVIEW"]
        has(versions[1], account_masked=NEW_SA, holder=HOLDER, bank_code=BANK, branch="Haidian")
        assert NEW_ACCOUNT.encode() not in versions[1].sealed_account
        # The same message again (41, 11, 7) is a retransmission: 94 naming the first request.
        expect(await client.request(fields), "94", RF=rf, ST="PENDING_REVIEW", SA=NEW_SA)
        other = submit_fields(client, account=THIRD_ACCOUNT)
        expect(await client.request(other), "05", RS="PENDING_EXISTS", RF=rf)
        sale = await client.sale(100)  # sales settle to version 1 meanwhile
        assert sale.rc == "00" and sale.tlv["SA"] == OLD_SA and sale.tlv["SV"] == "1"

        by_rf = expect(await client.rebind_inquire(rf), "00", RF=rf, ST="PENDING_REVIEW", SA=NEW_SA)
        assert expect(await client.rebind_inquire(), "00") == by_rf  # no RF: the latest
        expect(await client.rebind_inquire(UNKNOWN_RF), "25")
        stranger = await signed_on(setup, "TERM0002")
        expect(await stranger.rebind_inquire(rf), "25")  # another terminal's request
        expect(await stranger.rebind_cancel(rf), "25")
        expect(await stranger.rebind_inquire(), "25")
        await stranger.close()

        cancelled = expect(await client.rebind_cancel(rf), "00", RF=rf, ST="CANCELLED", SA=NEW_SA)
        assert "EF" not in cancelled
        expect(await client.rebind_cancel(rf), "00", RF=rf, ST="CANCELLED")  # idempotent
        expect(await client.rebind_cancel(UNKNOWN_RF), "25")
        expect(await client.rebind_inquire(rf), "00", ST="CANCELLED")
        with reading(setup) as tx:
            has(tx.request(rf), state="CANCELLED", decided_by="terminal")
            assert [v.state for v in tx.versions("TERM0001")] == ["ACTIVE", "CANCELLED"]
        # The refused message again is a retransmission: its first answer, not a new decision.
        expect(await client.request(other), "05", RS="PENDING_EXISTS", RF=rf)
        # Once cancelled, a new request may be made, and it is the latest.
        ex = await client.request(submit_fields(client, account=THIRD_ACCOUNT))
        third_sa = cards.mask_account(THIRD_ACCOUNT)
        rf2 = expect_accepted(ex, "PENDING_REVIEW", third_sa, time.time() + 3600)
        assert rf2 != rf
        expect(await client.rebind_inquire(), "00", RF=rf2, ST="PENDING_REVIEW")
        await client.close()


async def test_auto_review_approves_at_once_and_changes_are_paced(tmp_path: Path) -> None:
    setup = with_policy(make_host(tmp_path), review="auto", cooling_off=2.5, min_interval=3600.0)
    async with running(setup):
        client = await signed_on(setup)
        now = time.time()
        ex = await client.request(submit_fields(client))
        rf = expect_accepted(ex, "APPROVED", NEW_SA, now + 2.5)
        with reading(setup) as tx:
            has(tx.request(rf), state="APPROVED", decided_by="auto")
            version = tx.versions("TERM0001")[1]
        assert version.state == "APPROVED" and abs(version.effective_from - now - 2.5) < 1
        expect(await client.rebind_cancel(rf), "05", RS="NOT_PENDING", RF=rf, ST="APPROVED")
        # An approved change not yet in force is still open (PENDING_EXISTS comes before 65).
        third = submit_fields(client, account=THIRD_ACCOUNT)
        expect(await client.request(third), "05", RS="PENDING_EXISTS", RF=rf)
        # From EF on the change is in force (ACTIVE), whether or not a host process has
        # recorded that yet: no longer open, and another change is too soon (min_interval).
        await sleep_until(version.effective_from)
        expect(await client.rebind_inquire(rf), "00", RF=rf, ST="ACTIVE", SA=NEW_SA)
        tlv = expect(await client.request(submit_fields(client, account=ACCOUNT)), "65")
        assert "RF" not in tlv
        expect(await client.request(submit_fields(client)), "05", RS="SAME_ACCOUNT")
        await wait_state(client, rf, "ACTIVE")
        sale = await client.sale(100)
        assert (sale.tlv["SA"], sale.tlv["SV"]) == (NEW_SA, "2")
        expect(await client.request(submit_fields(client, account=THIRD_ACCOUNT)), "65")
        with reading(setup) as tx:
            assert len(tx.requests(tid="TERM0001")) == 1
        await client.close()


async def test_operator_password_and_lockout(tmp_path: Path) -> None:
    setup = with_policy(make_host(tmp_path), operator_max_failures=3)

    def failures() -> int:
        with reading(setup) as tx:
            operator = tx.operator("TERM0001", "01")
        assert operator is not None
        return operator.failures

    async with running(setup):
        client = await signed_on(setup)
        expect(await client.request(submit_fields(client, operator_id="99")), "55")
        wrong = submit_fields(client, password="9999")
        expect(await client.request(wrong), "55")
        expect(await client.request(wrong), "55")  # retransmitted: the same answer ...
        assert failures() == 1  # ... but one wrong password
        expect(await client.request(submit_fields(client, password="1234")), "55")
        assert failures() == 2
        # The right password resets the count, even when the request fails a later check.
        expect(await client.request(submit_fields(client, holder="李四")), "05", RS="NAME_MISMATCH")
        assert failures() == 0
        for _ in range(2):
            expect(await client.request(submit_fields(client, password="9999")), "55")
        expect(await client.request(submit_fields(client, password="9999")), "75")  # the 3rd
        assert failures() == 3
        expect(await client.request(submit_fields(client)), "75")  # right, but locked out
        expect(await client.request(submit_fields(client, password="9999")), "75")
        assert failures() == 3
        with reading(setup) as tx:
            assert tx.requests(tid="TERM0001") == []
            locked = [e for e in tx.audit_entries() if e.action == "operator.locked"]
        assert [(e.tid, e.subject) for e in locked] == [("TERM0001", "01")]
        # Operators belong to their terminal: TERM0002's operator 01 is not locked out.
        other = await signed_on(setup, "TERM0002")
        expect(await other.request(submit_fields(other)), "00", ST="PENDING_REVIEW")
        await other.close()
        await client.close()


async def test_every_submit_check_with_its_code(tmp_path: Path) -> None:
    setup = with_policy(make_host(tmp_path))
    setup.key_files["TERM0003"] = add_terminal(
        tmp_path, setup.config.db, "TERM0003", "MERCHANT0000003", "--holder", "Zhang San"
    )
    async with running(setup):
        client = await signed_on(setup)
        ok = submit_fields(client)

        def track2(pan: str, rest: str = "=30121010000") -> dict[str, str]:
            return dict(edit_48(submit_fields(client), AC=None), **{"35": pan + rest})

        other_key = crypto.encrypt_password(bytes(32), "0000")
        cases = [  # (39 and 48 RS, what is wrong, the submit)
            ("14", "Luhn-bad", edit_48(ok, AC=bad_check(NEW_ACCOUNT))),
            ("14", "11 digits", edit_48(ok, AC=luhn_complete("6222020200"))),
            ("14", "20 digits", edit_48(ok, AC=luhn_complete("6222020200112233446"))),
            ("14", "Luhn-bad card", track2(bad_check(CARD_PAN))),
            ("14", "short card", track2(luhn_complete("6222020200"))),
            ("30", "BK of 11 digits", edit_48(ok, BK=BANK[:-1])),
            ("30", "BK of 13 digits", edit_48(ok, BK=BANK + "1")),
            ("30", "BK not digits", edit_48(ok, BK=BANK[:-1] + "X")),
            ("30", "no OP", edit_48(ok, OP=None)),
            ("30", "no PW", edit_48(ok, PW=None)),
            ("30", "no NM", edit_48(ok, NM=None)),
            ("30", "blank NM", edit_48(ok, NM="   ")),
            ("30", "no BK", edit_48(ok, BK=None)),
            ("30", "no AC, no 35", edit_48(ok, AC=None)),
            ("30", "AC not digits", edit_48(ok, AC=NEW_ACCOUNT[:-3] + "12A")),
            ("30", "AC full-width digits", edit_48(ok, AC=full_width(ACCOUNT))),
            ("30", "PW not hex", edit_48(ok, PW="zz" * 40)),
            ("30", "PW under another key", edit_48(ok, PW=other_key)),
            ("30", "track 2 without separator", track2(CARD_PAN, "30121010000")),
            ("30", "malformed 48", dict(ok, **{"48": "OP02"})),
            ("05 NAME_MISMATCH", "another holder", edit_48(ok, NM="李四")),
            ("05 SAME_ACCOUNT", "the current account", edit_48(ok, AC=ACCOUNT)),
            ("05 SAME_ACCOUNT", "the current account, inserted", track2(ACCOUNT)),
        ]
        for expected, name, fields in cases:
            ex = await client.request(dict(fields, **{"11": client.stan()}))
            rc, _, reason = expected.partition(" ")
            assert (ex.rc, ex.tlv.get("RS", "")) == (rc, reason), name
            expect(ex, rc)
            assert "RF" not in ex.tlv, name
        with reading(setup) as tx:
            assert tx.requests() == []  # none of them made a request
            assert [v.state for v in tx.versions("TERM0001")] == ["ACTIVE"]
            operator = tx.operator("TERM0001", "01")
            assert operator is not None and operator.failures == 0

        # Accepted: the inserted card (field 35, no AC), and holder names that differ from the
        # registered one only in whitespace, case or full width.
        latin = await signed_on(setup, "TERM0003")
        accepted = [
            (client, track2(CARD_PAN), "card", cards.mask_account(CARD_PAN)),
            (client, submit_fields(client, holder=f" {HOLDER}\t"), "typed", NEW_SA),
            (latin, submit_fields(latin, holder="zhang san"), "typed", NEW_SA),
            (latin, submit_fields(latin, holder="  ZHANG   SAN "), "typed", NEW_SA),
            (latin, submit_fields(latin, holder=full_width("Zhang SAN")), "typed", NEW_SA),
        ]
        for terminal, fields, source, sa in accepted:
            ex = await terminal.request(fields)
            rf = expect_accepted(ex, "PENDING_REVIEW", sa, time.time() + 3600)
            with reading(setup) as tx:
                has(tx.request(rf), source=source, state="PENDING_REVIEW")
                assert tx.versions(terminal.tid)[-1].account_masked == sa
            expect(await terminal.rebind_cancel(rf), "00", ST="CANCELLED")
        await latin.close()
        await client.close()


async def test_route_and_security_codes(tmp_path: Path) -> None:
    setup = with_policy(make_host(tmp_path))
    async with running(setup):
        client = await signed_on(setup)
        ok = submit_fields(client)
        no_101 = {k: v for k, v in ok.items() if k != "101"}
        inquire = client.rebind_fields("5", {})
        cases = [
            ("91 = 9", dict(ok, **{"91": "9"}), "12"),
            ("91 = 1", dict(inquire, **{"91": "1"}), "12"),
            ("101 of another file", dict(ok, **{"101": "MERCHANTS"}), "12"),
            ("inquiry of another file", dict(inquire, **{"101": "MERCHANTS"}), "12"),
            ("submit without 101", no_101, "30"),
            ("no field 11", {k: v for k, v in ok.items() if k != "11"}, "30"),
            ("field 7 not digits", dict(ok, **{"7": "12311200XX"}), "30"),
            ("cancel without RF", client.rebind_fields("3", {}), "30"),
        ]
        for name, fields, rc in cases:
            fields = dict(fields, **{"11": client.stan()}) if "11" in fields else fields
            assert (await client.request(fields)).rc == rc, name
        good = client.encode(ok, mac=True)
        tampered = client.codec.decode(await client.exchange_raw(good[:-1] + bytes([good[-1] ^ 1])))
        assert (tampered["t"], tampered["39"]) == ("0310", "63") and "64" not in tampered
        ex = await client.request(ok, mac=False)
        assert ex.rc == "63" and "64" not in ex.response and "128" not in ex.response
        unknown = await client.request(dict(ok, **{"41": "NOBODY01"}))
        assert unknown.rc == "03" and "64" not in unknown.response
        assert (await client.request(dict(ok, **{"42": "MERCHANT0000002"}))).rc == "03"
        # TERM0002 has never signed on: whatever keys it MACs with, 58 before the MAC check.
        stranger = setup.client("TERM0002")
        await stranger.connect()
        stranger.keys = client.keys
        ex = await stranger.request(submit_fields(stranger))
        assert ex.rc == "58" and "64" not in ex.response
        await stranger.close()
        with reading(setup) as tx:
            assert tx.requests() == []
        # After all that, the submit itself is still accepted.
        expect(await client.request(ok), "00", ST="PENDING_REVIEW")
        await client.close()


async def test_the_first_failing_check_wins(tmp_path: Path) -> None:
    """PROTOCOL.md 3 and 5.3: 03 -> 58 -> 63 -> formats (30) -> retransmission (94) ->
    password (55/75) -> account number (14) -> holder name -> same account -> open request."""
    setup = with_policy(make_host(tmp_path), operator_max_failures=2)
    async with running(setup):
        client = await signed_on(setup)
        bad_luhn = bad_check(NEW_ACCOUNT)
        ok = submit_fields(client)
        stranger = setup.client("TERM0002")
        await stranger.connect()
        stranger.keys = crypto.SessionKeys.from_kx(bytes(32), bytes(32))
        bad_mac = client.encode(dict(edit_48(ok, OP=None), **{"11": client.stan()}), mac=True)
        bad_mac = bad_mac[:-1] + bytes([bad_mac[-1] ^ 1])
        assert (await client.request(dict(ok, **{"41": "NOBODY01"}), mac=False)).rc == "03"
        assert (await stranger.request(submit_fields(stranger), mac=False)).rc == "58"
        assert client.codec.decode(await client.exchange_raw(bad_mac))["39"] == "63"
        await stranger.close()
        steps: list[tuple[dict[str, str], str, str | None]] = [
            (submit_fields(client, password="9", holder=""), "30", None),  # format, not 55
            (submit_fields(client, password="9", bank_code="1"), "30", None),  # BK before 55
            (submit_fields(client, account=bad_luhn, bank_code="1"), "30", None),  # BK before 14
            (submit_fields(client, password="9", account=bad_luhn), "55", None),
            (submit_fields(client, account=bad_luhn, holder="李四"), "14", None),
            (submit_fields(client, holder="李四", account=ACCOUNT), "05", "NAME_MISMATCH"),
        ]
        for fields, rc, reason in steps:
            ex = await client.request(fields)
            assert (ex.rc, ex.tlv.get("RS")) == (rc, reason), fields["48"]
        rf = expect(await client.request(ok), "00", ST="PENDING_REVIEW")["RF"]
        same = submit_fields(client, account=ACCOUNT)  # also: another request is open
        expect(await client.request(same), "05", RS="SAME_ACCOUNT")
        # Lock the operator out; the retransmitted submit is still answered 94 (it comes first).
        for rc in ("55", "75"):
            expect(await client.request(submit_fields(client, password="9")), rc)
        expect(await client.request(ok), "94", RF=rf)
        expect(await client.request(submit_fields(client, account=bad_luhn)), "75")
        await client.close()


# -- the whole story, on SQLite and PostgreSQL ---------------------------------------------------


async def acquirer(setup: HostSetup, toml: Path, *argv: str) -> float:
    """An acquirer's command (``acqhost ...``) on the host's store and config file, while the
    host runs; the effective-from of terminal TERM0001's newest version afterwards."""
    where = ["--config", str(toml), "--db", setup.config.db, "--keys", str(setup.config.key_path)]
    assert await anyio.to_thread.run_sync(cli, [*argv, *where]) == 0
    with reading(setup) as tx:
        return tx.versions("TERM0001")[-1].effective_from


async def sale_on(
    client: TerminalClient, boundary: float, before: str, after: str, *, test: bool = False
) -> Exchange:
    """A sale; its 48 SV must be ``before`` if it was answered before ``boundary`` and
    ``after`` if it was sent after it (in between, either is right)."""
    sent = time.time()
    ex = await client.sale(1 if test else 100, test=test)
    answered = time.time()
    assert ex.rc == "00"
    if answered < boundary:
        assert ex.tlv["SV"] == before, (ex.tlv, boundary - answered)
    elif sent >= boundary:
        assert ex.tlv["SV"] == after, (ex.tlv, sent - boundary)
    return ex


async def sleep_until(at: float) -> None:
    await anyio.sleep(max(0.0, at - time.time()))


def at_rest(setup: HostSetup) -> list[bytes]:
    """What the store holds: the SQLite file and its WAL, or every row of every PostgreSQL
    table as text (bytea as hex, so a number kept as bytes shows as its hex)."""
    if "://" not in setup.config.db:
        db = Path(setup.config.db)
        files = (db, Path(f"{db}-wal"), Path(f"{db}-journal"))
        return [p.read_bytes() for p in files if p.exists()]
    import psycopg
    from psycopg import sql

    tables = "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
    rows = sql.SQL("SELECT t::text FROM {} t")
    with psycopg.connect(setup.config.db) as conn:
        return [
            "\n".join(row for (row,) in conn.execute(rows.format(sql.Identifier(table)))).encode()
            for (table,) in conn.execute(tables).fetchall()
        ]


# Each store once, each event loop once: the flow is the store's, and every other test in this
# file runs on both event loops.
@pytest.mark.parametrize(
    ("store_kind", "anyio_backend"), [("sqlite", "trio"), ("postgresql", "asyncio")]
)
async def test_the_whole_story(
    tmp_path: Path, store_kind: str, json_logs: io.StringIO, request: pytest.FixtureRequest
) -> None:
    setup = make_host_on(store_kind, tmp_path, request)
    toml = tmp_path / "acqhost.toml"  # the host and the acquirer's commands read one policy
    toml.write_text('[rebind]\nreview = "manual"\ncooling_off = 3\nmin_interval = 0\n')
    setup.config = dataclasses.replace(setup.config, rebind=load_config(toml, environ={}).rebind)
    sold: dict[str, str] = {}  # RRN -> the SV the 0210 named

    async def sale(boundary: float, before: str, after: str, *, test: bool = False) -> Exchange:
        ex = await sale_on(client, boundary, before, after, test=test)
        sold[ex.response["37"]] = ex.tlv["SV"]
        return ex

    async with running(setup):
        client = await signed_on(setup)
        now = time.time()
        ex = await client.request(submit_fields(client, branch="Chaoyang"))
        rf = expect_accepted(ex, "PENDING_REVIEW", NEW_SA, now + 3.0)
        await sale(float("inf"), "1", "")
        ef = await acquirer(setup, toml, "rebind", "approve", rf, "--by", "reviewer")
        assert time.time() + 2.5 < ef  # 3 s of cooling-off from the approval
        tlv = expect(await client.rebind_inquire(rf), "00", RF=rf, ST="APPROVED", SA=NEW_SA)
        assert tlv["EF"] == accounts.ef_text(ef)
        ex = await sale(ef, "1", "2")  # cooling-off: still the old account
        assert ex.tlv["SA"] == OLD_SA
        await sleep_until(ef - 1.0)
        await sale(ef, "1", "2")
        await sleep_until(ef)
        ex = await sale(ef, "1", "2", test=True)  # in force from EF on: a test sale proves it
        assert (ex.tlv["SA"], ex.tlv["SV"], ex.tlv["BK"]) == (NEW_SA, "2", BANK)
        # VERIFIED in the test sale's own transaction: the inquire right after its 0210
        # reads it, with no wait.
        expect(await client.rebind_inquire(rf), "00", RF=rf, ST="VERIFIED", SA=NEW_SA)
        assert (await client.sale(100)).tlv["SV"] == "2"

        rollback = ("account", "rollback", "TERM0001", "--to-version", "1", "--by", "ops")
        back_ef = await acquirer(setup, toml, *rollback, "--reason", "merchant asked")
        assert back_ef >= time.time() + accounts.DECISION_LEAD - 0.5
        await sale(back_ef, "2", "3")
        await sleep_until(back_ef)
        ex = await sale(back_ef, "2", "3")
        assert (ex.tlv["SA"], ex.tlv["SV"]) == (OLD_SA, "3")
        await wait_state(client, rf, "ROLLED_BACK")
        # The terminal's latest request is now the acquirer's rollback.
        latest = expect(await client.rebind_inquire(), "00", ST="ACTIVE", SA=OLD_SA)
        await client.close()

        with reading(setup) as tx:
            versions = tx.versions("TERM0001")
            requests = tx.requests(tid="TERM0001")
        assert [v.state for v in versions] == ["ACTIVE", "ROLLED_BACK", "ACTIVE"]
        assert [v.account_masked for v in versions] == [OLD_SA, NEW_SA, OLD_SA]
        assert versions[2].account_hash == versions[0].account_hash
        assert [r.rf for r in requests] == [rf, latest["RF"]]
        has(requests[0], kind="rebind", state="ROLLED_BACK", decided_by="reviewer")
        has(requests[1], kind="rollback", state="ACTIVE", restores=1, source="acquirer")
        # Every sale is in the ledger with the version its 0210 named.
        store: Store = open_store(setup.config.db)
        try:
            ledger = {s.rrn: str(s.account_version) for s in store.sales("TERM0001")}
            count, problems = audit.verify(
                store, crypto.HostKeys.load(setup.config.key_path).data_key
            )
        finally:
            store.close()
        assert {rrn: ledger[rrn] for rrn in sold} == sold
        assert {"1", "2", "3"} <= set(sold.values())
        assert problems == [] and count >= 7
        stored = at_rest(setup)  # the WAL too, while the host has the database open
        assert len(stored) >= (2 if store_kind == "sqlite" else 5)
    stored += at_rest(setup)
    assert any(NEW_SA.encode() in data for data in stored)  # masked it is there
    log = json_logs.getvalue()
    assert "rebind_submit" in log and "account activated" in log
    for account in (ACCOUNT, NEW_ACCOUNT):
        assert account not in log
        for data in stored:
            assert account.encode() not in data and account.encode().hex().encode() not in data


# -- the simulator's command line ----------------------------------------------------------------


async def test_simulator_rebind_command_line(
    tmp_path: Path, anyio_backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    setup = with_policy(make_host(tmp_path))
    async with running(setup):
        key_file, port = str(tmp_path / "TERM0001.json"), str(setup.config.port)
        common = ["--key-file", key_file, "--port", port, "--backend", anyio_backend]
        submit = f"rebind --operator-id 01 --password 0000 --holder {HOLDER} --bank-code {BANK}"
        submit = submit.split()

        async def run(*argv: str) -> tuple[int, str]:
            capsys.readouterr()
            status = await anyio.to_thread.run_sync(terminal_main, [*common, *argv])
            out = capsys.readouterr().out
            for secret in (NEW_ACCOUNT, THIRD_ACCOUNT, CARD_PAN):
                assert secret not in out
            return status, out

        status, out = await run(*submit, "--account", NEW_ACCOUNT, "--branch", "Haidian")
        assert status == 0, out
        assert "sign-on: 0800 -> 0810 rc=00" in out
        found = re.search(r"rebind: 0300 -> 0310 rc=00  request ([A-Z2-9]{16}) PENDING_REVIEW", out)
        assert found, out
        rf = found.group(1)
        assert f"new account {NEW_SA}" in out and "effective from 20" in out

        status, out = await run(*submit, "--account", THIRD_ACCOUNT)
        assert status == 1
        assert "rc=05 (do not honour)" in out and f"request {rf}" in out
        assert "reason=PENDING_EXISTS" in out
        status, out = await run(*submit, "--password", "9999", "--account", THIRD_ACCOUNT)
        assert status == 1 and "rc=55 (incorrect operator password)" in out
        for argv in (("inquire", "--rf", rf), ("inquire",)):
            status, out = await run(*argv)
            assert status == 0 and f"rc=00  request {rf} PENDING_REVIEW" in out, out
        status, out = await run("inquire", "--rf", UNKNOWN_RF)
        assert status == 1 and "rc=25 (original not found)" in out
        status, out = await run("cancel", "--rf", rf)
        assert status == 0 and f"request {rf} CANCELLED" in out

        status, out = await run(*submit, "--card-track2", CARD_PAN + "=30121010000")
        assert status == 0 and cards.mask_account(CARD_PAN) in out, out
        with reading(setup) as tx:
            latest = tx.latest_request("TERM0001")
        assert latest is not None and latest.source == "card" and latest.rf in out
        for wrong in (("--account", NEW_ACCOUNT, "--card-track2", CARD_PAN + "=3012"), ()):
            with pytest.raises(SystemExit) as exited:
                terminal_main([*common, *submit, *wrong])
            assert exited.value.code == 2
