"""Helpers for starting a host (or any TCP target) as a separate process on loopback."""

from __future__ import annotations

import signal
import socket
import subprocess
import time

__all__ = ("free_port", "stop", "wait_listening")


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_listening(port: int, proc: subprocess.Popen[bytes], seconds: float = 15) -> None:
    """Return once 127.0.0.1:``port`` accepts connections; RuntimeError if ``proc`` exits
    first or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{proc.args!r} exited (status {proc.returncode}) before it listened"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{proc.args!r} did not listen on port {port} within {seconds:g} s")


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, seconds: float = 20) -> None:
    """Send ``sig`` (when it still runs), wait up to ``seconds``, then kill."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
