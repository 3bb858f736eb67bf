"""The README's demo: a fresh SQLite store with one demo terminal, the host started, the
terminal simulator driven through sign-on, sale, test sale (showing the settlement account)
and reversal; then a change of the settlement account: submitted from the terminal, approved
by the acquirer's CLI, in force after the cooling-off (here none beyond the 2-second decision
lead), proven by a test sale that shows the new account, a signed voucher; then the host
stopped. Run with ``python -m simulators.demo [FOLDER]``."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from acqhost.cli import main as acqhost
from acqhost.store import open_store
from simulators.processes import free_port, wait_listening

DEMO_TERMINAL = [
    "--tid", "DEMO0001", "--mid", "DEMOMERCHANT001", "--merchant-name", "Demo Noodle Shop",
    "--holder", "张三", "--account", "6222020200112233446", "--bank-code", "102100099996",
    "--branch", "Demo Branch", "--operator-id", "01", "--operator-password", "demo-0000",
    "--fast-hash",
]  # fmt: skip
NEW_ACCOUNT = "6222020200112233453"  # the merchant's new card (Luhn-valid)
# The host's policy for the demo: manual review, no cooling-off beyond the decision lead.
DEMO_CONFIG = """\
[rebind]
review = "manual"
cooling_off = 0
min_interval = 86400
operator_max_failures = 5
"""


def terminal(key_file: Path, port: int, *args: str) -> int:
    """One run of the terminal simulator (prints its exchanges)."""
    command = [sys.executable, "-m", "simulators.terminal", "--key-file", str(key_file),
               "--port", str(port), *args]  # fmt: skip
    return subprocess.run(command).returncode


def rebind_story(db: str, config: Path, key_file: Path, port: int) -> bool:
    """Submit, approve, wait for the effective-from, test sale, voucher: True if all went."""
    print("== the merchant changes the settlement card at the terminal:", flush=True)
    if terminal(key_file, port, "rebind", "--operator-id", "01", "--password", "demo-0000",
                "--holder", "张三", "--bank-code", "102100099996",
                "--account", NEW_ACCOUNT) != 0:  # fmt: skip
        return False
    store = open_store(db)
    try:
        with store.transaction(write=False) as tx:
            rf = tx.requests(state="PENDING_REVIEW")[-1].rf
    finally:
        store.close()
    common = ["--db", db, "--config", str(config)]
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


def main() -> int:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else ".demo")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    db, key_file, port = str(folder / "acqhost.db"), folder / "DEMO0001.json", free_port()
    config = folder / "acqhost.toml"
    config.write_text(DEMO_CONFIG)
    print(f"== acqhost demo in {folder}/ (SQLite store {db}, port {port})", flush=True)
    if acqhost(["init", "--db", db]) != 0:
        return 1
    if acqhost(["terminal", "add", "--db", db, *DEMO_TERMINAL, "--key-out", str(key_file)]):
        return 1
    log = (folder / "host.log").open("wb")
    host = subprocess.Popen(
        [sys.executable, "-m", "acqhost", "serve", "--db", db, "--port", str(port),
         "--config", str(config)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        try:
            wait_listening(port, host)
        except RuntimeError as e:
            raise SystemExit(f"the host did not start: {e}") from None
        print(f"== host running (pid {host.pid}, log {folder}/host.log); the terminal:", flush=True)
        ok = terminal(key_file, port, "demo", "--amount", "2500") == 0
        ok = ok and rebind_story(db, config, key_file, port)
    finally:
        host.send_signal(signal.SIGTERM)
        code = host.wait(timeout=15)
        log.close()
    print(f"== host stopped (exit {code})")
    return 0 if ok and code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
