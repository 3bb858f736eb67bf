"""The security review's checks (SECURITY.md), each against the real thing: captured MAC'd
requests replayed byte for byte (sale, reversal, rebind submit and cancel, batch close,
sign-off) on a host on loopback; signatures and MACs made for one purpose or terminal offered
for another; every comparison of a secret in constant time (an AST check that is shown to
catch a plain ``==``); the store created 0600; and a whole day's flows at DEBUG level with no
card number, track 2, account number, password or key in the log, the capture file or the
store (the SQLite file's bytes, every PostgreSQL row)."""

from __future__ import annotations

import ast
import dataclasses
import io
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from acqhost.cli import main as cli
from acqhost.domain import advices, crypto, voucher
from acqhost.log import configure_logging
from acqhost.runtime.app import build_server, close_stores
from acqhost.store import open_store
from acqhost.wire.tlv import decode_tlv
from simulators.terminal import TEST_PAN, TerminalClient
from simulators.terminal import main as terminal_main
from tests.hostkit import (
    BANK,
    HOLDER,
    add_terminal,
    make_host,
    make_host_on,
    running,
    signed_on,
)
from tests.test_rebind_e2e import at_rest

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "Zq7-operator-Secret"


def _luhn_complete(body: str) -> str:
    total = 0
    for i, c in enumerate(reversed(body)):
        d = int(c)
        if i % 2 == 0:
            d = d * 2 - 9 if d * 2 > 9 else d * 2
        total += d
    return body + str((10 - total % 10) % 10)


TRACK2_PAN = _luhn_complete("621483000012345")
NEW_ACCOUNT = _luhn_complete("621700001000123456")
TRACK2 = f"{TRACK2_PAN}=30121010000012345678"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def replay(client: TerminalClient, message: bytes) -> dict[str, str]:
    """Send captured bytes again, as they were; the host's answer, decoded."""
    return client.codec.decode(await client.exchange_raw(message))


# --- replays ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_captured_macd_requests_replayed_change_nothing(tmp_path: Path) -> None:
    setup = make_host(tmp_path)
    async with running(setup) as server:
        store = server.core.state.store
        client = await signed_on(setup)
        sale = await client.sale(100)
        sale_bytes = client.last_message
        assert sale.rc == "00"
        assert (await replay(client, sale_bytes))["39"] == "94"
        assert len(store.sales("TERM0001")) == 1

        assert (await client.reverse(sale)).rc == "00"
        reversal_bytes = client.last_message
        assert (await replay(client, reversal_bytes))["39"] == "00"  # idempotent, documented
        (stored,) = store.sales("TERM0001")
        assert stored.status == "reversed"

        submit = await client.rebind_submit(
            operator_id="01", password="0000", holder=HOLDER, bank_code=BANK, account=NEW_ACCOUNT
        )
        assert submit.rc == "00", submit.response
        submit_bytes = client.last_message
        rf = submit.tlv["RF"]
        assert (await client.rebind_cancel(rf)).rc == "00"
        cancel_bytes = client.last_message
        # A submit replayed is 94 naming its request, a cancel is answered as done (00): both
        # leave the one request CANCELLED, before or after each other.
        for captured, code in ((submit_bytes, "94"), (cancel_bytes, "00"), (submit_bytes, "94")):
            answer = await replay(client, captured)
            assert (answer["39"], decode_tlv(answer["48"])["ST"]) == (code, "CANCELLED"), answer
        with store.transaction(write=False) as tx:
            (request,) = tx.requests(tid="TERM0001")
        assert (request.rf, request.state) == (rf, "CANCELLED")

        await client.sale(250)
        closed = (await client.settle_as_host_says())[-1]
        assert closed.rc == "00", closed.response
        close_bytes = client.last_message
        open_batch, queued = store.open_batch("TERM0001"), len(store.advices("TERM0001"))
        again = await replay(client, close_bytes)
        assert again["39"] == "00"  # a retransmission gets its answer again...
        assert store.open_batch("TERM0001") == open_batch  # ...and closes nothing more
        assert len(store.advices("TERM0001")) == queued

        assert (await client.sign_off()).rc == "00"
        sign_off_bytes = client.last_message
        assert (await client.sign_on()).rc == "00"
        # Under the new session, the old session's requests are forgeries.
        assert (await replay(client, sign_off_bytes))["39"] == "63"
        assert (await replay(client, sale_bytes))["39"] == "63"
        assert (await client.sale(300)).rc == "00"  # the replays did not sign it off
        await client.close()


@pytest.mark.anyio
async def test_a_request_macd_for_one_terminal_is_refused_for_another(tmp_path: Path) -> None:
    setup = make_host(tmp_path)
    async with running(setup):
        one, two = await signed_on(setup, "TERM0001"), await signed_on(setup, "TERM0002")
        fields = one.sale_fields(100)
        as_two = dict(fields, **{"41": two.tid, "42": two.mid})
        # MAC'd with TERM0001's session key, sent as TERM0002: 63 and nothing recorded.
        forged = one.encode(as_two, mac=True)
        assert (await replay(two, forged))["39"] == "63"
        # TERM0002's sign-on signed with TERM0001's identity key: 63.
        stolen = TerminalClient({**setup.key_files["TERM0002"],
                                 "terminal_signing_key": setup.key_files["TERM0001"][
                                     "terminal_signing_key"]})  # fmt: skip
        async with stolen:
            assert (await stolen.sign_on()).rc == "63"
        assert (await two.sale(100)).rc == "00"  # TERM0002's own session still works
        for c in (one, two):
            await c.close()


@pytest.mark.anyio
async def test_the_hosts_sign_on_signature_is_no_terminals_sign_on_signature(
    tmp_path: Path,
) -> None:
    setup = make_host(tmp_path)
    async with running(setup):
        client = await signed_on(setup)
        fields, _, _ = client.signon_fields()
        host_answer = await client.sign_on()
        # The host's SG over its answer, offered as the terminal's SG over a new sign-on.
        forged = dict(fields, **{"48": fields["48"].replace(
            fields["48"][fields["48"].index("SG") + 5:], host_answer.tlv["SG"])})  # fmt: skip
        assert (await client.request(forged, mac=False)).rc == "63"
        await client.close()


def test_what_the_host_key_signs_for_each_purpose_cannot_be_taken_for_another() -> None:
    """The host's Ed25519 key signs sign-on answers, vouchers and bank advices. Each kind of
    signed message starts with bytes no other kind can start with, so a signature the host made
    for one can never verify as another."""
    kx = bytes(range(32))
    answer = crypto.signon_response_transcript("TERM0001", "000001", kx, kx)
    voucher_bytes = voucher.canonical({"type": voucher.VOUCHER_TYPE, "rf": "X"})
    advice_0320 = advices.signed_bytes({"t": "0320", "37": "000000000001", "48": "RF003ABC"})
    advice_0520 = advices.signed_bytes({"t": "0520", "37": "000000000002", "48": "BN006000001"})
    starts = {
        "sign-on answer": (answer, b"ACQ1-SIGNON-RESP"),
        "voucher": (voucher_bytes, b"{"),
        "account advice": (advice_0320, b"0320"),
        "settlement advice": (advice_0520, b"0520"),
    }
    for name, (message, prefix) in starts.items():
        assert message.startswith(prefix), name
        for other, (_, other_prefix) in starts.items():
            if other != name:
                assert not message.startswith(other_prefix), (name, other)
    # The sign-on transcripts join terminal id, STAN and field 7 without separators: each
    # must have its field's fixed width, or ("TERM000", "1000001") would sign as
    # ("TERM0001", "000001").
    crypto.signon_request_transcript("TERM0001", "000001", "0101000000", kx)
    for tid, stan, field7 in (("TERM000", "1000001", "0101000000"),
                              ("TERM00011", "00001", "0101000000"),
                              ("TERM0001", "00001", "01010000000")):  # fmt: skip
        with pytest.raises(crypto.CryptoError):
            crypto.signon_request_transcript(tid, stan, field7, kx)
        with pytest.raises(crypto.CryptoError):
            crypto.signon_response_transcript(tid, stan, kx, kx)
    # Each direction and purpose of a session has a key of its own.
    rx, tx = crypto.host_session(*crypto.kx_keypair(), crypto.kx_keypair()[0])
    keys = crypto.SessionKeys.from_kx(rx, tx)
    assert len({keys.rx_mac, keys.rx_enc, keys.tx_mac, keys.tx_enc}) == 4
    tag = crypto.mac(keys.tx_mac, b"0210 an answer")
    assert not crypto.mac_ok(keys.rx_mac, b"0210 an answer", tag)


# --- constant-time comparisons ----------------------------------------------------------------

# Names of values that are secrets or authenticate something: MACs, digests, hashes,
# signatures, passwords, fingerprints, keys and seeds.
_SECRET_NAME = re.compile(
    r"(^|_)(mac|macs|tag|digest|hash|hashed|signature|sig|password|fingerprint|seed|secret"
    r"|mac_key|data_key|rx_mac|tx_mac)($|_)",
    re.IGNORECASE,
)


def _names_a_secret(node: ast.expr) -> bool:
    if isinstance(node, ast.Name):  # an upper-case name is a constant (a length, a rule)
        return not node.id.isupper() and bool(_SECRET_NAME.search(node.id))
    if isinstance(node, ast.Attribute):
        return bool(_SECRET_NAME.search(node.attr))
    if isinstance(node, ast.Call):
        func = node.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
        return bool(_SECRET_NAME.search(name)) and name not in ("len",)
    if isinstance(node, ast.Subscript):
        return _names_a_secret(node.value) and not isinstance(node.slice, ast.Slice)
    return False


def plain_secret_comparisons(source: str) -> list[int]:
    """Lines of ``source`` comparing a secret with ``==`` or ``!=`` (not with a constant)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        for op, left, right in zip(node.ops, operands, operands[1:], strict=False):
            if not isinstance(op, (ast.Eq, ast.NotEq)):
                continue
            if isinstance(left, ast.Constant) or isinstance(right, ast.Constant):
                continue
            if _names_a_secret(left) or _names_a_secret(right):
                lines.append(node.lineno)
    return lines


def _sources() -> Iterator[Path]:
    for folder in ("acqhost", "simulators"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_secrets_are_compared_in_constant_time_everywhere() -> None:
    found = {
        str(path.relative_to(ROOT)): lines
        for path in _sources()
        if (lines := plain_secret_comparisons(path.read_text(encoding="utf-8")))
    }
    assert found == {}, "compare secrets with hmac.compare_digest, not == / !="


@pytest.mark.parametrize(
    ("source", "flagged"),
    [
        ("ok = mac == expected", True),
        ("if crypto.audit_digest(k, p, b) != e.digest: pass", True),
        ("same = stored.password_hash == hashed", True),
        ("bad = fingerprint(key, v) != known", True),
        ("ok = signature[0] == other", True),
        ("ok = hmac.compare_digest(mac, expected)", False),
        ("ok = len(signature) == 64", False),
        ("ok = tag == 'PW'", False),
        ("ok = digest[:16] == prefix", False),
        ("ok = amount == total", False),
        ("ok = len(signature) == SIGNATURE_BYTES", False),
    ],
)
def test_the_constant_time_check_catches_a_plain_comparison(source: str, flagged: bool) -> None:
    assert bool(plain_secret_comparisons(source)) is flagged


def test_an_operator_password_can_come_from_stdin_not_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = str(tmp_path / "acqhost.db")
    assert cli(["init", "--db", db]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    add_terminal(tmp_path, db, "TERM0009", "MERCHANT0000009", "--operator-password", "-")
    store = open_store(db)
    try:
        with store.transaction(write=False) as tx:
            operator = tx.operator("TERM0009", "01")
    finally:
        store.close()
    assert operator is not None
    assert crypto.verify_password(operator.password_hash, PASSWORD)
    assert not crypto.verify_password(operator.password_hash, "-")


# --- files at rest ----------------------------------------------------------------------------


def test_a_new_sqlite_store_and_its_wal_are_created_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)  # the usual umask, which leaves files world-readable
    try:
        store = open_store(str(tmp_path / "acqhost.db"))
        try:
            with store.transaction() as tx:
                tx.set_operator_failures("NOBODY", "00", 0)
        finally:
            store.close()
    finally:
        os.umask(old)
    made = [p for p in tmp_path.iterdir() if p.name.startswith("acqhost.db")]
    assert made and {p.name for p in made} >= {"acqhost.db"}
    for path in made:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path.name


def test_the_terminal_simulator_warns_of_a_key_file_others_can_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "acqhost.db")
    assert cli(["init", "--db", db]) == 0
    add_terminal(tmp_path, db, "TERM0009", "MERCHANT0000009")
    key_file = tmp_path / "TERM0009.json"
    nobody = ["--key-file", str(key_file), "--port", "9", "echo"]  # nothing listens: exit 2
    capsys.readouterr()
    assert terminal_main(nobody) == 2
    assert "readable by group or others" not in capsys.readouterr().err  # written 0600
    key_file.chmod(0o644)
    assert terminal_main(nobody) == 2
    assert "key file" in (err := capsys.readouterr().err) and "(mode 0644): chmod 600 it" in err


def test_an_existing_store_keeps_the_mode_its_operator_gave_it_and_the_host_says_so(
    tmp_path: Path, debug_logs: io.StringIO
) -> None:
    setup = make_host(tmp_path)
    path = Path(setup.config.db)
    close_stores(build_server(setup.config))
    assert "store readable by group or others" not in debug_logs.getvalue()  # made 0600
    path.chmod(0o640)  # e.g. a backup group may read it
    close_stores(build_server(setup.config))
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert '"store readable by group or others"' in debug_logs.getvalue()
    assert '"mode": "0640"' in debug_logs.getvalue()


# --- no secret in the clear: logs, capture, store -------------------------------------------


@pytest.fixture
def debug_logs() -> Iterator[io.StringIO]:
    sink = io.StringIO()
    configure_logging("debug", sink)
    yield sink
    configure_logging("info", io.StringIO())


def _forms(secret: bytes | str) -> list[bytes]:
    """How a secret could show: as text, and raw bytes as themselves and in hex."""
    if isinstance(secret, str):
        return [secret.encode()]
    return [secret, secret.hex().encode(), secret.hex().upper().encode()]


@pytest.mark.anyio
@pytest.mark.parametrize(("kind", "anyio_backend"), [("sqlite", "trio"), ("postgres", "asyncio")])
async def test_no_card_number_account_password_or_key_in_clear_after_a_days_flows(
    tmp_path: Path, kind: str, debug_logs: io.StringIO, request: pytest.FixtureRequest
) -> None:
    setup = make_host_on(kind, tmp_path, request)
    # A third terminal with an operator password that cannot appear by chance.
    keys_arg = [] if kind == "sqlite" else ["--keys", str(setup.config.key_path)]
    setup.key_files["TERM0003"] = add_terminal(
        tmp_path, setup.config.db, "TERM0003", "MERCHANT0000003",
        "--operator-password", PASSWORD, *keys_arg,
    )  # fmt: skip
    capture = tmp_path / "capture.jsonl"
    setup.config = dataclasses.replace(setup.config, capture=str(capture))
    async with running(setup) as server:
        setup.with_port(setup.config.port)
        client = await signed_on(setup, "TERM0003")
        session = client.keys
        assert session is not None
        sale = await client.sale(100)
        assert sale.rc == "00"
        track = await client.request(
            {k: v for k, v in client.sale_fields(200).items() if k not in ("2", "14")}
            | {"35": TRACK2}
        )
        assert track.rc == "00", track.response
        assert (await client.reverse(sale)).rc == "00"
        wrong = await client.rebind_submit(
            operator_id="01", password=PASSWORD + "x", holder=HOLDER, bank_code=BANK,
            account=NEW_ACCOUNT,
        )  # fmt: skip
        assert wrong.rc == "55"
        submit = await client.rebind_submit(
            operator_id="01", password=PASSWORD, holder=HOLDER, bank_code=BANK,
            account=NEW_ACCOUNT,
        )  # fmt: skip
        assert submit.rc == "00", submit.response
        assert (await client.rebind_inquire()).rc == "00"
        assert (await client.settle_as_host_says())[-1].rc == "00"
        assert (await client.sign_off()).rc == "00"
        await client.close()
        host_keys = server.core.state.host_keys
    key_file = setup.key_files["TERM0003"]
    secrets_: dict[str, list[bytes]] = {
        "PAN": _forms(TEST_PAN),
        "track 2 PAN": _forms(TRACK2_PAN),
        "track 2": _forms(TRACK2.split("=")[1]),
        "settlement account": _forms("6222020200112233446"),
        "new account": _forms(NEW_ACCOUNT),
        "operator password": _forms(PASSWORD),
        "terminal identity key": _forms(bytes.fromhex(key_file["terminal_signing_key"])),
        "host identity key": _forms(host_keys.signing_seed),
        "host data key": _forms(host_keys.data_key),
        **{
            f"session {name}": _forms(getattr(session, name))
            for name in ("rx_mac", "rx_enc", "tx_mac", "tx_enc")
        },
    }
    log = debug_logs.getvalue()
    assert log.count('"0200"') >= 2 and '"0300"' in log and '"0500"' in log  # logged
    places = {
        "log": [log.encode()],
        "capture": [capture.read_bytes()],
        "store": at_rest(setup),
    }
    assert places["capture"][0], "the capture recorded the flows"
    # The scan finds what is there: the terminal's key file holds its identity key.
    key_file_bytes = (tmp_path / "TERM0003.json").read_bytes()
    assert any(form in key_file_bytes for form in secrets_["terminal identity key"])
    leaks = [
        (what, where)
        for what, forms in secrets_.items()
        for where, contents in places.items()
        if any(form in content for form in forms for content in contents)
    ]
    assert leaks == []


def test_every_test_security_md_names_exists() -> None:
    """SECURITY.md points at tests as ``test_x.py::test_name`` (or ``::test_name`` after the
    file it is in): each must be there, so that the page cannot outlive its proof."""
    text = (ROOT / "SECURITY.md").read_text(encoding="utf-8")
    named, current = [], None
    for file, name in re.findall(r"`(test_\w+\.py)?(?:::(test_\w+))?`", text):
        current = file or current
        assert current is not None
        assert (ROOT / "tests" / current).is_file(), current
        if name:
            named.append((current, name))
    assert len(named) > 20
    missing = [
        f"{file}::{name}"
        for file, name in named
        if not re.search(rf"^(async )?def {name}\(", (ROOT / "tests" / file).read_text(), re.M)
    ]
    assert missing == []
