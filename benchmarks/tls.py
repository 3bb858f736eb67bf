"""What TLS on the terminals' listener ([tls]) costs: host CPU per sale, throughput and p99 over
TLS beside the same host over plain TCP, in the same run, rounds alternating (plain, TLS,
plain, TLS...) so that a noisy machine weighs on both alike.

One SQLite store of ``--terminals`` terminals, copied fresh for every host; certificates made by
trustme; the load is ``acqhost-load run --prebuilt`` (closed loop, one terminal per connection)
as in benchmarks/e2e.py, whose functions this uses. Host CPU is the host process's user + system
time from /proc over the load run, sign-ons and handshakes included.

Run: ``python benchmarks/tls.py [--backend asyncio|trio] [--rounds 3] [--duration 5]
[--connections 64] [--depth 1]``. Loopback only; every process it starts is stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import trustme

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from e2e import PY, cpu_seconds, load, make_store, stop  # noqa: E402

from simulators.processes import free_port, wait_listening  # noqa: E402


def run_host(base: Path, keys: list[Path], args: argparse.Namespace, tls: bool, n: int) -> Any:
    run = base / f"run-{n}-{'tls' if tls else 'plain'}"
    run.mkdir()
    for file in ("acqhost.db", "acqhost.db.keys"):
        shutil.copy2(base / file, run / file)
    port = free_port()
    config = ["--config", str(base / "tls.toml")] if tls else []
    with (run / "host.log").open("wb") as log:
        proc = subprocess.Popen(
            [PY, "-m", "acqhost", "serve", "--db", str(run / "acqhost.db"), "--port", str(port),
             "--backend", args.backend, *config],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_listening(port, proc, 20)
            before = cpu_seconds(proc.pid)
            extra = ["--tls-ca", str(base / "ca.pem")] if tls else []
            result = load(port, keys, args, *extra)
            after = cpu_seconds(proc.pid)
        finally:
            stop(proc)
    if before is not None and after is not None:
        result["host_cpu_us"] = (after - before) / result["answered"] * 1e6
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--terminals", type=int, default=64)
    parser.add_argument("--frames", type=int, default=0, help="prebuilt sales (default: 60k/s)")
    args = parser.parse_args()
    args.connections = min(args.connections, args.terminals)
    with tempfile.TemporaryDirectory(prefix="acqhost-tls-") as folder:
        base = Path(folder)
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        ca.cert_pem.write_to_path(str(base / "ca.pem"))
        cert.cert_chain_pems[0].write_to_path(str(base / "cert.pem"))
        cert.private_key_pem.write_to_path(str(base / "key.pem"))
        (base / "tls.toml").write_text(
            f'[tls]\ncert = "{base / "cert.pem"}"\nkey = "{base / "key.pem"}"\n'
        )
        with contextlib.redirect_stdout(io.StringIO()):  # a line per terminal added
            keys = make_store(base, args.terminals)
        results: dict[bool, list[Any]] = {False: [], True: []}
        for n in range(args.rounds):
            for tls in (False, True):
                r = run_host(base, keys, args, tls, n)
                results[tls].append(r)
                print(f"round {n} {'TLS  ' if tls else 'plain'}: {r['tps']:8,.0f} sales/s  "
                      f"host CPU {r.get('host_cpu_us', float('nan')):6.1f} us/sale  "
                      f"p99 {r['p99_ms']:6.2f} ms", flush=True)  # fmt: skip
    print(f"\n{args.backend}, {args.connections} x {args.depth}, medians of {args.rounds} rounds:")
    medians = {}
    for tls, rows in results.items():
        medians[tls] = {k: statistics.median(r[k] for r in rows) for k in
                        ("tps", "host_cpu_us", "p99_ms") if all(k in r for r in rows)}  # fmt: skip
    print(f"{'':8}{'sales/s':>10}{'CPU us/sale':>13}{'p99 ms':>9}")
    for tls, m in medians.items():
        print(f"{'TLS' if tls else 'plain':8}{m['tps']:10,.0f}{m.get('host_cpu_us', 0):13.1f}"
              f"{m['p99_ms']:9.2f}")  # fmt: skip
    if medians[False].get("host_cpu_us") and medians[True].get("host_cpu_us"):
        ratio = medians[True]["host_cpu_us"] / medians[False]["host_cpu_us"]
        print(f"TLS / plain host CPU per sale: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
