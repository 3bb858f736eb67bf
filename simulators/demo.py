"""The README's demo: a fresh SQLite store with one demo terminal, the host started, the
terminal simulator driven through sign-on, sale, test sale (showing the settlement account)
and reversal, then the host stopped. Run with ``python -m simulators.demo [FOLDER]``."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

from acqhost.cli import main as acqhost
from simulators.processes import free_port, wait_listening

DEMO_TERMINAL = [
    "--tid", "DEMO0001", "--mid", "DEMOMERCHANT001", "--merchant-name", "Demo Noodle Shop",
    "--holder", "张三", "--account", "6222020200112233446", "--bank-code", "102100099996",
    "--branch", "Demo Branch", "--operator-id", "01", "--operator-password", "demo-0000",
    "--fast-hash",
]  # fmt: skip


def main() -> int:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else ".demo")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    db, key_file, port = str(folder / "acqhost.db"), folder / "DEMO0001.json", free_port()
    print(f"== acqhost demo in {folder}/ (SQLite store {db}, port {port})", flush=True)
    if acqhost(["init", "--db", db]) != 0:
        return 1
    if acqhost(["terminal", "add", "--db", db, *DEMO_TERMINAL, "--key-out", str(key_file)]):
        return 1
    log = (folder / "host.log").open("wb")
    host = subprocess.Popen(
        [sys.executable, "-m", "acqhost", "serve", "--db", db, "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        try:
            wait_listening(port, host)
        except RuntimeError as e:
            raise SystemExit(f"the host did not start: {e}") from None
        print(f"== host running (pid {host.pid}, log {folder}/host.log); the terminal:", flush=True)
        terminal = subprocess.run(
            [sys.executable, "-m", "simulators.terminal", "--key-file", str(key_file),
             "--port", str(port), "demo", "--amount", "2500"],
        )  # fmt: skip
    finally:
        host.send_signal(signal.SIGTERM)
        code = host.wait(timeout=15)
        log.close()
    print(f"== host stopped (exit {code})")
    return 0 if terminal.returncode == 0 and code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
