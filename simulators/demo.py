"""The README's demo: a fresh SQLite store with one demo terminal; the bank system simulator
started with the host's public key, and the host started with a ``[[banks]]`` table for it; the
terminal simulator driven through sign-on, sale, test sale (showing the settlement account) and
reversal; then a change of the settlement account: submitted from the terminal, approved by the
acquirer's CLI, in force after the cooling-off (here none beyond the 2-second decision lead),
proven by a test sale that shows the new account, a signed voucher; then the batch closed with
a 0500; then, once the bank has acknowledged every settlement update (the registration's 0320,
the account change's 0320, the batch's 0520s), what the bank received, the bank link's status
and the host's settlement totals compared with the bank's; then both processes stopped (also
when a step fails). Everything on loopback, every wait bounded. Run with ``python -m
simulators.demo [FOLDER]``."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from acqhost.cli import main as acqhost
from acqhost.domain.cards import mask_account
from acqhost.store import open_store
from simulators.bank import main as acqhost_bank
from simulators.bankcore import read_journal
from simulators.processes import free_port, wait_listening

BANK_CODE = "102100099996"
DEMO_TERMINAL = [
    "--tid", "DEMO0001", "--mid", "DEMOMERCHANT001", "--merchant-name", "Demo Noodle Shop",
    "--holder", "张三", "--account", "6222020200112233446", "--bank-code", BANK_CODE,
    "--branch", "Demo Branch", "--operator-id", "01", "--operator-password", "demo-0000",
    "--fast-hash",
]  # fmt: skip
NEW_ACCOUNT = "6222020200112233453"  # the merchant's new card (Luhn-valid)
SALE = 2500  # the demo's sale, reversed; its two test sales are 1 each (one per account)
# The host's policy for the demo: manual review, no cooling-off beyond the decision lead; and
# the demo's bank, taking the advices of the demo terminal's bank code, with short retries.
DEMO_CONFIG = """\
[rebind]
review = "manual"
cooling_off = 0
min_interval = 86400
operator_max_failures = 5

[[banks]]
name = "demo-bank"
host = "127.0.0.1"
port = {bank_port}
bank_codes = ["{bank_code}"]
retry_initial = 0.2
retry_max = 2
ack_timeout = 2
echo_interval = 5
"""
DELIVERY_SECONDS = 15.0  # the longest the demo waits for the bank's acknowledgements
STOP_SECONDS = 15.0  # the longest it waits for a process to stop before killing it
TERMINAL_SECONDS = 60.0  # the longest one run of the terminal simulator may take


def terminal(key_file: Path, port: int, *args: str) -> int:
    """One run of the terminal simulator (prints its exchanges)."""
    command = [sys.executable, "-m", "simulators.terminal", "--key-file", str(key_file),
               "--port", str(port), *args]  # fmt: skip
    try:
        return subprocess.run(command, timeout=TERMINAL_SECONDS).returncode
    except subprocess.TimeoutExpired:  # killed
        print(f"== the terminal simulator took over {TERMINAL_SECONDS:g} s", flush=True)
        return 1


def captured(command: Callable[[Sequence[str]], int], argv: Sequence[str]) -> tuple[int, str]:
    """Run a command line in this process; its exit status and what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = command(argv)
    return status, out.getvalue()


@contextlib.contextmanager
def started(
    what: str, command: Sequence[str], log_file: Path, port: int
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``command`` (its output to ``log_file``) until the block ends, once it listens on
    127.0.0.1:``port``; then SIGTERM, and SIGKILL if it has not stopped within STOP_SECONDS.
    Stopped whatever happens in the block; prints how it ended (its ``returncode``)."""
    with log_file.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            try:
                wait_listening(port, proc)
            except RuntimeError as e:
                raise SystemExit(f"the {what} did not start: {e}") from None
            print(f"== {what} running (pid {proc.pid}, port {port}, log {log_file})", flush=True)
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            print(f"== {what} stopped (exit {code})", flush=True)


def rebind_story(db: str, common: list[str], key_file: Path, port: int) -> bool:
    """Submit, approve, wait for the effective-from, test sale, voucher: True if all went."""
    print("== the merchant changes the settlement card at the terminal:", flush=True)
    if terminal(key_file, port, "rebind", "--operator-id", "01", "--password", "demo-0000",
                "--holder", "张三", "--bank-code", BANK_CODE,
                "--account", NEW_ACCOUNT) != 0:  # fmt: skip
        return False
    store = open_store(db)
    try:
        with store.transaction(write=False) as tx:
            rf = tx.requests(state="PENDING_REVIEW")[-1].rf
    finally:
        store.close()
    print(f"== the acquirer reviews and approves request {rf}:", flush=True)
    if acqhost(["rebind", "approve", rf, "--by", "demo-reviewer", *common]) != 0:
        return False
    store = open_store(db)
    try:
        with store.transaction(write=False) as tx:
            request = tx.request(rf)
            assert request is not None
            ef = tx.versions(request.tid)[request.version - 1].effective_from
    finally:
        store.close()
    time.sleep(max(0.0, ef - time.time()) + 0.3)  # the effective-from: whole seconds
    print("== after the effective-from, a test sale shows the new account:", flush=True)
    if terminal(key_file, port, "sale", "1", "--test") != 0:
        return False
    print("== the signed voucher the merchant keeps:", flush=True)
    voucher = str(Path(db).parent / f"{rf}.voucher.json")
    if acqhost(["rebind", "voucher", rf, "--out", voucher, *common]) != 0:
        return False
    return (
        acqhost(["voucher", "verify", voucher, *common]) == 0
        and acqhost(["account", "history", "DEMO0001", *common]) == 0
    )


def wait_delivered(common: list[str]) -> bool:
    """Poll ``acqhost banklink status --json`` until nothing waits for any bank (queued or
    dead), for at most DELIVERY_SECONDS; True if it came to that."""
    deadline = time.monotonic() + DELIVERY_SECONDS
    started_at = time.monotonic()
    while True:
        status, out = captured(acqhost, ["banklink", "status", "--json", *common])
        banks = json.loads(out) if status == 0 else []
        dead = sum(b["dead"] for b in banks)
        if status == 0 and banks and dead == 0 and sum(b["queued"] for b in banks) == 0:
            waited = time.monotonic() - started_at
            print(f"== the bank acknowledged every advice (waited {waited:.1f} s)", flush=True)
            return True
        if dead or time.monotonic() >= deadline:
            why = f"{dead} dead" if dead else f"not delivered within {DELIVERY_SECONDS:g} s"
            print(f"== settlement updates {why}:", flush=True)
            acqhost(["banklink", "status", *common])
            return False
        time.sleep(0.2)


def show_bank(journal: Path) -> bool:
    """One line per advice the bank recorded (account masked): True if it has the 0320s of
    both account versions and a 0520."""
    print(f"== what the bank recorded ({journal}), one line per advice:", flush=True)
    seen: list[tuple[str, str]] = []
    for record in read_journal(journal):
        mti, e = record["mti"], record["48"]
        line = f"{mti}  37={record['37']}  {record['41']}  v{e.get('SV')}  "
        line += mask_account(e.get("AC", ""))
        if mti.startswith("032"):
            line += f"  effective {e.get('EF')}" + (f"  request {e['RF']}" if "RF" in e else "")
        else:
            line += f"  batch {e.get('BN')}  count {e.get('CT')}  amount {e.get('AM')}"
        print(line, flush=True)
        seen.append((mti[:3], str(e.get("SV"))))
    return {("032", "1"), ("032", "2")} <= set(seen) and any(m == "052" for m, _ in seen)


def compare_totals(common: list[str], journal: Path) -> bool:
    """The host's settlement totals against the bank's: True if they are the same."""
    host_status, host = captured(acqhost, ["settle", "report", "--format", "totals", *common])
    bank_status, bank = captured(acqhost_bank, ["totals", str(journal), "--format", "csv"])
    same = host_status == 0 and bank_status == 0 and host == bank
    print("== acqhost settle report --format totals  vs  "
          f"acqhost-bank totals {journal} --format csv: {'match' if same else 'DIFFER'}",
          flush=True)  # fmt: skip
    if same:
        sys.stdout.write(host)
    else:
        sys.stdout.write(f"-- the host:\n{host}-- the bank:\n{bank}")
    sys.stdout.flush()
    return same


def settlement_story(common: list[str], key_file: Path, port: int, journal: Path) -> bool:
    """Close the batch, wait for the bank's acknowledgements, show what it got: True if all
    went and the totals agree."""
    # The batch: the sale was reversed; the two test sales of 1 (one per account) remain.
    print("== the terminal closes its batch (0500 with its totals: 2 sales, 2):", flush=True)
    if terminal(key_file, port, "settle", "--batch", "1", "--count", "2", "--amount", "2"):
        return False
    if not wait_delivered(common):
        return False
    if not show_bank(journal):
        print("== the bank is missing an advice", flush=True)
        return False
    print(f"== acqhost-bank totals {journal}:", flush=True)
    if acqhost_bank(["totals", str(journal)]) != 0:
        return False
    print("== acqhost banklink status:", flush=True)
    if acqhost(["banklink", "status", *common]) != 0:
        return False
    return compare_totals(common, journal)


def main() -> int:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else ".demo")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    db, key_file = str(folder / "acqhost.db"), folder / "DEMO0001.json"
    port, bank_port = free_port(), free_port()
    config, journal, host_pub = folder / "acqhost.toml", folder / "bank.jsonl", folder / "host.pub"
    config.write_text(DEMO_CONFIG.format(bank_port=bank_port, bank_code=BANK_CODE))
    common = ["--db", db, "--config", str(config)]
    print(f"== acqhost demo in {folder}/ (SQLite store {db}, port {port}; bank port {bank_port})",
          flush=True)  # fmt: skip
    if acqhost(["init", "--db", db]) != 0:
        return 1
    if acqhost(["terminal", "add", "--db", db, *DEMO_TERMINAL, "--key-out", str(key_file)]):
        return 1
    status, public_key = captured(acqhost, ["keys", "public", *common])
    if status != 0:
        return 1
    host_pub.write_text(public_key)
    print(f"== acqhost keys public > {host_pub}; the bank verifies every advice with it",
          flush=True)  # fmt: skip
    bank = [sys.executable, "-m", "simulators.bank", "serve", "--port", str(bank_port),
            "--host-key-file", str(host_pub), "--out", str(journal)]  # fmt: skip
    host = [sys.executable, "-m", "acqhost", "serve", "--port", str(port), *common]
    with contextlib.ExitStack() as running:  # stopped in reverse: the host, then the bank
        processes = [
            running.enter_context(started("bank simulator", bank, folder / "bank.log", bank_port)),
            running.enter_context(started("host", host, folder / "host.log", port)),
        ]
        print("== the terminal:", flush=True)
        ok = (
            terminal(key_file, port, "demo", "--amount", str(SALE)) == 0
            and rebind_story(db, common, key_file, port)
            and settlement_story(common, key_file, port, journal)
        )
    return 0 if ok and all(p.returncode == 0 for p in processes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
