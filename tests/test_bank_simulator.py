"""The bank system simulator (``acqhost-bank``) and what a bank needs from the host:
``acqhost keys public``."""

from __future__ import annotations

import json
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from acqhost.cli import main as cli
from acqhost.domain import crypto
from acqhost.domain.crypto import HostKeys
from acqhost.wire import specs
from acqhost.wire.codec import compile_spec
from acqhost.wire.framing import FrameDecoder, FrameEncoder
from acqhost.wire.tlv import decode_tlv, encode_tlv
from simulators.bank import BankServer
from simulators.bank import main as bank_main
from simulators.bankcore import TOTALS_COLUMNS, Bank, Faults, Journal, Rule
from simulators.processes import free_port, wait_listening
from tests.hostkit import ACCOUNT, BANK, HOLDER


def test_keys_public_prints_the_host_verify_key_and_nothing_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "acqhost.db")
    assert cli(["init", "--db", db]) == 0
    capsys.readouterr()
    keys = HostKeys.load(db + ".keys")
    assert cli(["keys", "public", "--db", db]) == 0
    out = capsys.readouterr().out
    assert out == keys.verify_key.hex() + "\n"
    assert keys.signing_seed.hex() not in out and keys.data_key.hex() not in out

    other = HostKeys.generate()
    other.save(tmp_path / "other.keys")
    assert cli(["keys", "public", "--keys", str(tmp_path / "other.keys")]) == 0
    assert capsys.readouterr().out == other.verify_key.hex() + "\n"


def test_keys_public_without_keys_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(["keys", "public", "--keys", str(tmp_path / "none.keys")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run `acqhost init` first" in err


# -- advices, built here from PROTOCOL.md 6 with the host's real keys ---------------------------

ROOT = Path(__file__).resolve().parents[1]
KEYS = HostKeys.generate()
TID, MID = "TERM0001", "MERCHANT0000001"
ACCOUNT2 = "6222020200112233453"
CODEC = compile_spec(specs.load("acq87"))


def advice(
    mti: str,
    rrn: str,
    elements: dict[str, str],
    *,
    tid: str = TID,
    mid: str = MID,
    signed_as: str | None = None,
    keys: HostKeys = KEYS,
) -> dict[str, str]:
    """An advice whose 48 ends in SG: the host's signature over MTI + 37 + the 48 before SG."""
    body = encode_tlv(elements)
    signed = (signed_as or mti).encode() + rrn.encode() + body.encode("utf-8")
    sg = encode_tlv({"SG": crypto.sign(keys.signing_seed, signed).hex()})
    fields = {"t": mti, "7": "0102030405", "11": rrn[-6:], "37": rrn, "41": tid, "42": mid,
              "48": body + sg}  # fmt: skip
    if mti.startswith("032"):
        fields.update({"91": "2", "101": "SETTLEACCT"})
    return fields


def file_update(rrn: str, **change: str) -> dict[str, str]:
    elements = {"RF": "RF00000000000001", "AC": ACCOUNT2, "NM": HOLDER, "BK": BANK, "SV": "2",
                "EF": "20250102030405", **change}  # fmt: skip
    return advice("0320", rrn, elements)


def settlement(
    rrn: str, ct: int, am: int, *, bn: str = "000001", sv: str = "1", ac: str = ACCOUNT,
    tid: str = TID, mid: str = MID, mti: str = "0520",
) -> dict[str, str]:  # fmt: skip
    elements = {"BN": bn, "AC": ac, "NM": HOLDER, "BK": BANK, "SV": sv, "CT": str(ct),
                "AM": str(am)}  # fmt: skip
    return advice(mti, rrn, elements, tid=tid, mid=mid)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class Link:
    """One connection to the simulator, as the host's bank link would hold it."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder("len2")
        self.pending: list[bytes] = []

    async def send(self, *messages: dict[str, str]) -> None:
        frames = (FrameEncoder("len2").encode(CODEC.encode(m)) for m in messages)
        await self.stream.send(b"".join(frames))

    async def receive(self, seconds: float = 3) -> dict[str, str]:
        with anyio.fail_after(seconds):
            while not self.pending:
                data = await self.stream.receive(65536)
                self.pending.extend(f.message for f in self.decoder.feed(data))
        return CODEC.decode(self.pending.pop(0))

    async def exchange(self, message: dict[str, str]) -> dict[str, str]:
        await self.send(message)
        return await self.receive()

    async def closed(self, seconds: float = 3) -> bool:
        """True once the simulator closes the connection (no answer may come first)."""
        with anyio.fail_after(seconds):
            try:
                data = await self.stream.receive(65536)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return True
        raise AssertionError(f"an answer came instead: {data!r}")


@dataclass
class Running:
    server: BankServer
    port: int
    control_port: int | None
    journal: Path

    @property
    def bank(self) -> Bank:
        return self.server.bank

    @asynccontextmanager
    async def link(self) -> AsyncIterator[Link]:
        async with await anyio.connect_tcp("127.0.0.1", self.port) as stream:
            yield Link(stream)

    async def control(self, *commands: dict[str, Any] | str) -> list[dict[str, Any]]:
        replies = []
        assert self.control_port is not None
        with anyio.fail_after(3):
            async with await anyio.connect_tcp("127.0.0.1", self.control_port) as stream:
                buffered = BufferedByteReceiveStream(stream)
                for command in commands:
                    text = command if isinstance(command, str) else json.dumps(command)
                    await stream.send(text.encode() + b"\n")
                    replies.append(json.loads(await buffered.receive_until(b"\n", 65536)))
        return replies


@asynccontextmanager
async def running(
    tmp_path: Path, faults: Faults | None = None, *, control: bool = False
) -> AsyncIterator[Running]:
    journal = tmp_path / "bank.jsonl"
    bank = Bank(KEYS.verify_key, Journal(journal), faults or Faults())
    server = BankServer(bank)
    try:
        async with anyio.create_task_group() as tg:
            port, control_port = await tg.start(server.run, "127.0.0.1", 0, 0 if control else None)
            yield Running(server, port, control_port, journal)
            tg.cancel_scope.cancel()
    finally:
        bank.journal.close()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_advices_are_acknowledged_echoing_their_fields_and_recorded(tmp_path: Path) -> None:
    async with running(tmp_path) as bank, bank.link() as link:
        update, settle = file_update("000000000001"), settlement("000000000002", 3, 4500)
        for request, answer_mti in ((update, "0330"), (settle, "0530")):
            answer = await link.exchange(request)
            assert answer["t"] == answer_mti and answer["39"] == "00"
            assert {k: answer[k] for k in ("7", "11", "37", "41", "42")} == {
                k: request[k] for k in ("7", "11", "37", "41", "42")
            }
    records = lines(bank.journal)
    assert [r["mti"] for r in records] == ["0320", "0520"]
    first, second = records
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", first["received"])
    assert {k: first[k] for k in ("7", "11", "37", "41", "42")} == {
        k: update[k] for k in ("7", "11", "37", "41", "42")
    }
    assert first["48"] == decode_tlv(update["48"])  # every element, AC in full, SG kept
    assert first["48"]["AC"] == ACCOUNT2 and first["48"]["NM"] == HOLDER
    assert second["48"]["CT"] == "3" and second["48"]["AM"] == "4500"
    assert stat.S_IMODE(bank.journal.stat().st_mode) == 0o600


@pytest.mark.anyio
async def test_a_field_37_is_recorded_once_and_acknowledged_every_time(tmp_path: Path) -> None:
    first = settlement("000000000011", 1, 100)
    repeat = settlement("000000000011", 1, 100, mti="0521")  # signed anew as 0521
    kept = dict(first, t="0521")  # a repeat that kept the first transmission's signature
    async with running(tmp_path) as bank, bank.link() as link:
        for request in (first, first, repeat, kept):
            answer = await link.exchange(request)
            assert (answer["t"], answer["39"], answer["37"]) == ("0530", "00", "000000000011")
        update = file_update("000000000012")
        assert (await link.exchange(update))["39"] == "00"
        assert (await link.exchange(dict(update, t="0321")))["t"] == "0330"
        assert bank.bank.counters.duplicates == 4 and bank.bank.counters.conflicts == 0
    assert [r["37"] for r in lines(bank.journal)] == ["000000000011", "000000000012"]
    # after a restart the journal still knows them; the same 37 with other totals is a
    # conflict: acknowledged (the bank has it) but logged and counted, never recorded
    async with running(tmp_path) as bank, bank.link() as link:
        assert (await link.exchange(first))["39"] == "00"
        assert (await link.exchange(settlement("000000000011", 2, 200)))["39"] == "00"
        assert bank.bank.counters.duplicates == 2 and bank.bank.counters.conflicts == 1
    assert len(lines(bank.journal)) == 2


def tampered_48(message: dict[str, str]) -> dict[str, str]:
    return dict(message, **{"48": message["48"].replace("AM0044500", "AM0045400")})


def unsigned(message: dict[str, str]) -> dict[str, str]:
    elements = decode_tlv(message["48"])
    del elements["SG"]
    return dict(message, **{"48": encode_tlv(elements)})


def sg_not_last(message: dict[str, str]) -> dict[str, str]:
    return dict(message, **{"48": message["48"] + encode_tlv({"BR": "x"})})


@pytest.mark.parametrize(
    "spoil",
    [
        tampered_48,
        lambda m: dict(m, **{"37": "000000000999"}),  # another 37 under the same SG
        lambda m: dict(m, t="0320"),  # signed as a 0520
        unsigned,
        sg_not_last,
        lambda m: settlement("000000000021", 3, 4500) | {"48": advice(
            "0520", "000000000021", decode_tlv(unsigned(m)["48"]), keys=HostKeys.generate()
        )["48"]},  # signed by another key
    ],
    ids=["48", "37", "mti", "no-SG", "SG-not-last", "other-key"],
)  # fmt: skip
@pytest.mark.anyio
async def test_a_bad_or_missing_signature_is_63_and_not_recorded(
    tmp_path: Path, spoil: Callable[[dict[str, str]], dict[str, str]]
) -> None:
    genuine = settlement("000000000021", 3, 4500)
    async with running(tmp_path) as bank, bank.link() as link:
        answer = await link.exchange(spoil(genuine))
        assert answer["39"] == "63" and answer["11"] == genuine["11"]
        assert not bank.journal.read_text()
        assert (await link.exchange(genuine))["39"] == "00"  # the 37 was not taken
    assert len(lines(bank.journal)) == 1


@pytest.mark.anyio
async def test_refuse_and_answer_rules_answer_their_code_and_record_nothing(
    tmp_path: Path,
) -> None:
    faults = Faults(refuse="05", answer=(Rule.parse("0320=00"), Rule.parse("*7=96")))
    async with running(tmp_path, faults) as bank, bank.link() as link:
        assert (await link.exchange(settlement("000000000031", 1, 1)))["39"] == "05"
        assert (await link.exchange(settlement("000000000037", 1, 1)))["39"] == "96"
        assert (await link.exchange(file_update("000000000037")))["39"] == "00"  # 0320 first
        assert (await link.exchange(file_update("000000000038")))["39"] == "00"
    assert [r["37"] for r in lines(bank.journal)] == ["000000000037", "000000000038"]


@pytest.mark.anyio
async def test_malformed_advices_get_30_and_other_messages_their_answers(tmp_path: Path) -> None:
    no_ct = advice("0520", "000000000041", {"BN": "000001", "AC": ACCOUNT, "NM": HOLDER,
                                            "BK": BANK, "SV": "1", "AM": "5"})  # fmt: skip
    async with running(tmp_path) as bank, bank.link() as link:
        assert (await link.exchange(no_ct))["39"] == "30"
        assert (await link.exchange(dict(no_ct, **{"48": "SG9"})))["39"] == "30"
        echo = await link.exchange({"t": "0800", "7": "0102030405", "11": "000001", "70": "301"})
        assert (echo["t"], echo["39"], echo["70"]) == ("0810", "00", "301")
        other = await link.exchange({"t": "0200", "11": "000002", "41": TID})
        assert (other["t"], other["39"]) == ("0210", "12")
    assert not bank.journal.read_text()


@pytest.mark.anyio
async def test_drop_every_reads_but_never_answers_nor_records(tmp_path: Path) -> None:
    async with running(tmp_path, Faults(drop_every=2)) as bank, bank.link() as link:
        await link.send(*(settlement(f"00000000005{i}", 1, i) for i in range(1, 5)))
        assert [(await link.receive())["37"] for _ in range(2)] == ["000000000051", "000000000053"]
        with pytest.raises(TimeoutError):
            await link.receive(0.3)
        # the host's retry of a dropped advice is the next advice: answered and recorded
        assert (await link.exchange(settlement("000000000052", 1, 2)))["39"] == "00"
    assert [r["37"] for r in lines(bank.journal)] == [
        "000000000051",
        "000000000053",
        "000000000052",
    ]


@pytest.mark.anyio
async def test_close_after_closes_each_connection_after_n_advices(tmp_path: Path) -> None:
    async with running(tmp_path, Faults(close_after=2)) as bank:
        for round_ in range(2):
            async with bank.link() as link:
                batch = [settlement(f"0000000006{round_}{i}", 1, i) for i in range(3)]
                await link.send(*batch)
                assert [(await link.receive())["39"] for _ in range(2)] == ["00", "00"]
                assert await link.closed()
    assert len(lines(bank.journal)) == 4  # the third of each connection was never read


@pytest.mark.anyio
async def test_delay_holds_each_answer_back(tmp_path: Path) -> None:
    async with running(tmp_path, Faults(delay=0.3)) as bank, bank.link() as link:
        started = time.monotonic()
        assert (await link.exchange(settlement("000000000071", 1, 1)))["39"] == "00"
        assert time.monotonic() - started >= 0.3


@pytest.mark.anyio
async def test_the_control_port_changes_the_faults_while_it_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running(tmp_path, control=True) as bank, bank.link() as link:
        (state,) = await bank.control({"op": "get"})
        assert state["ok"] and state["faults"] == Faults().to_json()
        assert state["connections"] == 1 and state["counters"]["accepted"] == 0

        (reply,) = await bank.control({"op": "set", "refuse": "05"})
        assert reply["faults"]["refuse"] == "05"
        assert (await link.exchange(settlement("000000000091", 1, 1)))["39"] == "05"
        await bank.control({"op": "set", "answer": ["0520=00"]})
        assert (await link.exchange(settlement("000000000091", 1, 1)))["39"] == "00"
        await bank.control({"op": "set", "answer": [], "drop_every": 1})
        await link.send(settlement("000000000092", 1, 1))
        with pytest.raises(TimeoutError):
            await link.receive(0.3)
        (reply,) = await bank.control({"op": "reset"})
        assert reply["faults"] == Faults().to_json()
        assert (
            reply["counters"] | {"received": 3, "accepted": 1, "refused": 1, "dropped": 1}
            == (reply["counters"])
        )
        assert (await link.exchange(settlement("000000000093", 1, 1)))["39"] == "00"

        refused = await bank.control(
            "not json", [1], {"op": "fly"}, {"op": "get", "refuse": "05"},
            {"op": "set", "refuse": "5"}, {"op": "set", "delay": -1}, {"op": "set", "bogus": 1},
            {"op": "set", "answer": ["0520"]}, {"op": "set", "drop_every": "2"},
        )  # fmt: skip
        assert [r["ok"] for r in refused] == [False] * 9
        assert all(r["error"] for r in refused)
        assert bank.bank.faults == Faults()
        with anyio.fail_after(3):  # a last command without a newline, as printf | nc sends it
            async with await anyio.connect_tcp("127.0.0.1", bank.control_port or 0) as stream:
                await stream.send(b'{"op": "set", "delay": 0.01}')
                await stream.send_eof()
                reply = BufferedByteReceiveStream(stream)
                assert json.loads(await reply.receive_until(b"\n", 65536))["ok"]
                with pytest.raises(anyio.EndOfStream):
                    await stream.receive()
        assert bank.bank.faults == Faults(delay=0.01)

        # the command line's control command, as an operator would use it
        argv = ["control", "--port", str(bank.control_port), '{"op": "set", "close_after": 5}']
        assert await anyio.to_thread.run_sync(bank_main, argv) == 0
        assert json.loads(capsys.readouterr().out)["faults"]["close_after"] == 5
        argv = ["control", "--port", str(bank.control_port), '{"op": "set", "refuse": 5}']
        assert await anyio.to_thread.run_sync(bank_main, argv) == 1

        (reply,) = await bank.control({"op": "close"})
        assert reply["closed"] == 1 and reply["connections"] == 0
        assert await link.closed()
    assert [r["37"] for r in lines(bank.journal)] == ["000000000091", "000000000093"]


def test_totals_per_batch_terminal_and_account_in_csv_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    journal = tmp_path / "bank.jsonl"
    bank = Bank(KEYS.verify_key, Journal(journal))
    t2 = {"tid": "TERM0002", "mid": "MERCHANT0000002"}
    for request in (
        settlement("000000000101", 3, 4500),
        settlement("000000000102", 1, 100, sv="2", ac=ACCOUNT2),  # a new account mid-batch
        settlement("000000000103", 2, 250, bn="000002", sv="2", ac=ACCOUNT2),
        settlement("000000000104", 5, 1000, **t2),
        settlement("000000000101", 3, 4500, mti="0521"),  # a repeat: counted once
        file_update("000000000105"),  # not a settlement
    ):
        assert bank.codec.decode(bank.handle(CODEC.encode(request)).answer or b"")["39"] == "00"
    bank.journal.close()

    assert bank_main(["totals", str(journal), "--format", "csv"]) == 0
    one, two = "6222***********3446", "6222***********3453"
    assert capsys.readouterr().out == (
        "batch,tid,mid,account_version,account,holder,bank_code,count,amount\n"
        f"1,TERM0001,MERCHANT0000001,1,{one},张三,102100099996,3,4500\n"
        f"1,TERM0001,MERCHANT0000001,2,{two},张三,102100099996,1,100\n"
        f"1,TERM0002,MERCHANT0000002,1,{one},张三,102100099996,5,1000\n"
        f"2,TERM0001,MERCHANT0000001,2,{two},张三,102100099996,2,250\n"
    )
    assert bank_main(["totals", str(journal), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0] == {
        "batch": 1, "tid": "TERM0001", "mid": "MERCHANT0000001", "account_version": 1,
        "account": one, "holder": HOLDER, "bank_code": BANK, "count": 3, "amount": 4500,
    }  # fmt: skip
    assert [(r["count"], r["amount"]) for r in rows] == [(3, 4500), (1, 100), (5, 1000), (2, 250)]
    assert bank_main(["totals", str(journal)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == [c.upper() for c in TOTALS_COLUMNS] and len(table) == 5
    assert ACCOUNT not in "".join(table)


def test_user_errors_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "bank.jsonl")
    key = KEYS.verify_key.hex()
    for argv in (
        ["serve", "--host-key", "abcd", "--out", out],
        ["serve", "--host-key-file", str(tmp_path / "missing.pub"), "--out", out],
        ["serve", "--host-key", key, "--out", out, "--answer", "0520"],
        ["serve", "--host-key", key, "--out", out, "--refuse", "5"],
        ["serve", "--host-key", key, "--out", out, "--drop-every", "-1"],
        ["serve", "--host-key", key, "--out", out, "--spec", "nope"],
        ["totals", str(tmp_path / "missing.jsonl")],
        ["control", "--port", str(free_port()), "--timeout", "2"],
    ):
        assert bank_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("acqhost-bank: ") and err.count("\n") == 1, (argv, err)
    assert not Path(out).exists()
    Path(out).write_text('{"37": "000000000001", "mti": "0520", "48": {}}\n')
    assert bank_main(["totals", out]) == 2
    assert "not a settlement advice" in capsys.readouterr().err
    Path(out).write_text("{\n")
    assert bank_main(["totals", out]) == 2
    assert "line 1: not JSON" in capsys.readouterr().err
    with socket.socket() as taken:  # the port is another's
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        fresh = str(tmp_path / "fresh.jsonl")
        assert bank_main(["serve", "--host-key", key, "--out", fresh, "--port", str(port)]) == 2
    err = capsys.readouterr().err.lower()
    assert err == f"acqhost-bank: cannot listen on 127.0.0.1:{port}: address already in use\n"


def test_the_console_script_with_the_key_acqhost_keys_public_prints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The whole command line: the host's key from `acqhost keys public`, `acqhost-bank serve`
    in its own process, an advice over TCP, `control`, SIGTERM, `totals`."""
    db = str(tmp_path / "acqhost.db")
    assert cli(["init", "--db", db]) == 0
    capsys.readouterr()
    assert cli(["keys", "public", "--db", db]) == 0
    (tmp_path / "host.pub").write_text(capsys.readouterr().out)
    keys = HostKeys.load(db + ".keys")
    port, control_port = free_port(), free_port()
    bank = [sys.executable, "-m", "simulators.bank"]
    journal = str(tmp_path / "bank.jsonl")
    proc = subprocess.Popen(
        [*bank, "serve", "--port", str(port), "--control-port", str(control_port),
         "--host-key-file", str(tmp_path / "host.pub"), "--out", journal],
        cwd=ROOT, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_listening(port, proc)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            for request, code in ((settlement("000000000111", 2, 300), "00"),
                                  (settlement("000000000112", 1, 1), "05")):  # fmt: skip
                if code == "05":
                    control = subprocess.run(
                        [*bank, "control", "--port", str(control_port),
                         '{"op": "set", "refuse": "05"}'],
                        cwd=ROOT, capture_output=True, text=True, timeout=30,
                    )  # fmt: skip
                    assert control.returncode == 0 and json.loads(control.stdout)["ok"]
                request = advice(request["t"], request["37"], decode_tlv(unsigned(request)["48"]),
                                 keys=keys)  # fmt: skip
                s.sendall(FrameEncoder("len2").encode(CODEC.encode(request)))
                answer = CODEC.decode(receive_frame(s))
                assert (answer["t"], answer["39"]) == ("0530", code)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        assert proc.stderr is not None
        log = proc.stderr.read().decode()
        proc.stderr.close()
    assert "listening on 127.0.0.1" in log and keys.verify_key.hex() in log
    assert ACCOUNT not in log  # the log shows accounts masked
    totals = subprocess.run(
        [*bank, "totals", journal, "--format", "csv"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert totals.stdout.splitlines()[1:] == [
        f"1,TERM0001,MERCHANT0000001,1,6222***********3446,{HOLDER},{BANK},2,300"
    ]


def receive_frame(s: socket.socket) -> bytes:
    decoder = FrameDecoder("len2")
    while True:
        data = s.recv(65536)
        assert data, "the simulator closed the connection"
        frames = decoder.feed(data)
        if frames:
            return frames[0].message
