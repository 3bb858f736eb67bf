"""``acqhost-load``: load tests and traffic replays against an ISO 8583 host (README, "Load
testing with acqhost-load").

``acqhost-load run``: a synthetic mix of sales, test sales, reversals, inquiries, rebinds and
batch closes, closed loop (connections x depth) or open loop at a rate schedule.
``acqhost-load replay FILE``: a traffic file at its own timing times ``--speed``, at a rate,
or as fast as possible, rewritten so that the host takes it as new traffic.

Exit codes: 0 the run took place and every ``--fail-if`` held; 1 the run could not take place
(target unreachable, a sign-on refused); 2 a usage error (one line naming it); 3 a threshold
failed, or a replay's answers differed from the file's expectations with
``--fail-on-mismatch``.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from simulators.load.messages import KINDS, load_spec
from simulators.load.progress import Progress, Snapshot
from simulators.load.register import RegisterError, register_terminals
from simulators.load.report import render_csv, render_table
from simulators.load.runner import Live, Plan, Result, RunError, run_plan, run_split
from simulators.load.schedule import ScheduleError, parse_schedule
from simulators.load.thresholds import EXIT_FAILED, EXIT_USAGE, argparse_type, evaluate
from simulators.terminal import tls_client_context

__all__ = ("UsageError", "main", "read_scenario")

_SCENARIO_KEYS: dict[str, type | tuple[type, ...]] = {
    "host": str, "port": int, "key_files": list, "keys_dir": str, "spec": str, "framing": str,
    "connections": int, "depth": int, "rate": (str, int, float), "arrivals": str,
    "duration": (int, float), "count": int, "warmup": (int, float), "timeout": (int, float),
    "mix": dict, "amounts": list, "test_amount": int, "rebind": dict, "seed": int,
    "processes": int, "fail_if": list, "tls_ca": str,
}  # fmt: skip
_REBIND_KEYS = ("operator", "password", "holder", "bank_code")


class UsageError(ValueError):
    """An operator mistake: one line, exit 2."""


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0 or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    """An option mistake is one line (``acqhost-load run: error: ...``) and exit 2, not the
    whole usage text: ``--help`` has that."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="acqhost-load", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    register = commands.add_parser("register", help="register load terminals in a store")
    register.add_argument("count", type=_positive(int), help="terminals LD000001 ... N")
    register.add_argument("--db", required=True, help="the host's store")
    register.add_argument("--config", help="the host's config file")
    register.add_argument("--keys-dir", metavar="DIR", help="default: DB.load-keys")
    run = commands.add_parser("run", help="a synthetic mix of requests")
    replay = commands.add_parser("replay", help="replay a traffic file")
    replay.add_argument("file", help="traffic file (JSON Lines, README 'Traffic files')")
    for p in (run, replay):
        t = p.add_argument_group("target")
        t.add_argument("--host", default=None, help="default 127.0.0.1")
        t.add_argument("--port", type=int, help="the host's port")
        t.add_argument("--spec", help="message spec: acq87, cup-pos or a pyiso8583 spec file "
                       "(*.json); default: the key file's, else acq87")  # fmt: skip
        t.add_argument("--framing", choices=("len2", "len4", "len2-tpdu"))
        t.add_argument("--no-mac", action="store_true", help="send no MAC, check none")
        t.add_argument("--tls-ca", metavar="FILE", help="connect with TLS, trusting the CA "
                       "certificates in FILE (PEM): a host with [tls]")  # fmt: skip
        t.add_argument("--no-signon", action="store_true", help="do not sign terminals on "
                       "(with MACs: a fixed key from the key file, answers not checked)",
                       )  # fmt: skip
        k = p.add_argument_group("terminals")
        k.add_argument("--key-file", action="append", default=[], metavar="FILE")
        k.add_argument("--keys-dir", metavar="DIR", help="every *.json key file in DIR")
        k.add_argument("--register", type=_positive(int), metavar="N",
                       help="register N load terminals in the store --db (key files kept in "
                       "--keys-dir, reused next time)")  # fmt: skip
        k.add_argument("--db", help="the host's store, for --register")
        k.add_argument("--config", help="the host's config file, for --register")
        s = p.add_argument_group("load")
        s.add_argument("--connections", type=_positive(int), help="default: one per terminal")
        s.add_argument("--depth", type=_positive(int), help="closed loop: in flight per "
                       "connection (default 1)")  # fmt: skip
        s.add_argument("--rate", help="open loop: RATE, steps:R@S,..., ramp:A-B or file:PATH")
        s.add_argument("--arrivals", choices=("uniform", "poisson"))
        s.add_argument("--duration", type=_positive(float), help="seconds measured")
        s.add_argument("--count", type=_positive(int), help="requests measured")
        s.add_argument("--warmup", type=float, help="seconds sent but not measured")
        s.add_argument("--timeout", type=_positive(float), help="per request (default 10 s)")
        s.add_argument("--max-in-flight", type=_positive(int), default=1024,
                       help="open loop: per connection; more wait (late)")  # fmt: skip
        s.add_argument("--processes", type=_positive(int), help="split across N processes")
        s.add_argument("--seed", type=int)
        s.add_argument("--stan-start", type=int, metavar="N",
                       help="first sequence number (terminal i: N + i x 10,000,000); runs "
                       "against one store with far apart N never repeat a STAN and date",
                       )  # fmt: skip
        r = p.add_argument_group("report")
        r.add_argument("--json", action="store_true", help="the report as JSON on stdout")
        r.add_argument("--csv", metavar="FILE", help="the per-second series as CSV")
        r.add_argument("--plot", metavar="PNG", help="rate and latency over time (matplotlib)")
        r.add_argument("--fail-if", action="append", default=[], type=argparse_type,
                       metavar="EXPR", help="e.g. 'p99>5ms', 'errors>0.1%%' (exit 3)")  # fmt: skip
        r.add_argument("--quiet", action="store_true", help="no progress line")
        r.add_argument("--progress", action="store_true",
                       help="a progress line a second even off a terminal")  # fmt: skip
    run.add_argument("--scenario", help="TOML scenario (simulators/traffic/scenario.toml)")
    run.add_argument("--mix", help="weights, e.g. sale=80,reversal=10,inquiry=10")
    run.add_argument("--prebuilt", type=_positive(int), metavar="N",
                     help="build N sales before the clock starts (speed tests)")  # fmt: skip
    run.add_argument("--repeat", action="store_true",
                     help="send prebuilt frames again once all were (echo targets only)",
                     )  # fmt: skip
    for name in _REBIND_KEYS:
        run.add_argument(f"--rebind-{name.replace('_', '-')}", help="for rebinds in the mix")
    replay.add_argument("--speed", type=_positive(float), default=None,
                        help="the file's timing divided by this (default 1)")  # fmt: skip
    replay.add_argument("--as-fast-as-possible", action="store_true",
                        help="closed loop, --depth per terminal, ignoring the file's timing",
                        )  # fmt: skip
    replay.add_argument("--loops", type=_positive(int), default=1, help="times through the file")
    replay.add_argument("--operator-password", help="put back into rebind submits (48 PW)")
    replay.add_argument("--fail-on-mismatch", action="store_true",
                        help="exit 3 when an answer differs from the file's expectation",
                        )  # fmt: skip
    return parser


def read_scenario(path: str) -> tuple[dict[str, Any], Path]:
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"scenario {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"scenario {path}: {exc}") from None
    for key, value in data.items():
        kind = _SCENARIO_KEYS.get(key)
        if kind is None:
            raise UsageError(f"scenario {path}: unknown setting {key!r}")
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UsageError(f"scenario {path}: {key} = {value!r} has the wrong type")
    return data, Path(path).resolve().parent


def _mix(text: str) -> dict[str, int]:
    out = {}
    for part in text.split(","):
        name, eq, weight = part.partition("=")
        if not eq or not weight.strip().isdigit():
            raise UsageError(
                f"--mix {text!r}: expected KIND=WEIGHT,... (kinds: {', '.join(KINDS)})"
            )
        out[name.strip()] = int(weight)
    return out


def _key_files(
    args: argparse.Namespace, scenario: dict[str, Any], base: Path
) -> list[dict[str, Any]]:
    paths = [Path(p) for p in args.key_file] + [base / p for p in scenario.get("key_files", [])]
    keys_dir = args.keys_dir or (
        str(base / scenario["keys_dir"]) if "keys_dir" in scenario else None
    )
    if args.register:
        if not args.db:
            raise UsageError("--register needs --db, the host's store")
        try:
            paths += register_terminals(args.db, args.register, keys_dir, config=args.config)
        except RegisterError as exc:
            raise UsageError(str(exc)) from None
    elif keys_dir:
        found = sorted(Path(keys_dir).glob("*.json"))
        if not found:
            raise UsageError(f"--keys-dir {keys_dir}: no *.json key file in it")
        paths += found
    out = []
    for p in paths:
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except OSError as exc:
            raise UsageError(f"key file {p}: {exc.strerror or exc}") from None
        except json.JSONDecodeError:
            raise UsageError(f"key file {p}: not JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("tid"), str) or "mid" not in data:
            raise UsageError(f"key file {p}: no tid and mid")
        if not args.no_mac and "terminal_signing_key" not in data:
            raise UsageError(f"key file {p}: no terminal_signing_key (or give --no-mac)")
        out.append(data)
    return out


def _plan(args: argparse.Namespace) -> tuple[Plan, int, list[Any]]:
    scenario, base = (
        read_scenario(args.scenario) if getattr(args, "scenario", None) else ({}, Path.cwd())
    )

    def pick(name: str, default: Any = None) -> Any:
        value = getattr(args, name, None)
        return value if value is not None else scenario.get(name, default)

    key_files = _key_files(args, scenario, base)
    if pick("spec") is not None:
        try:
            load_spec(str(pick("spec")))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    port = pick("port")
    if port is None and key_files:
        port = key_files[0].get("port")
    if not isinstance(port, int) or not 0 < port < 65536:
        raise UsageError("--port: give the host's port (1 to 65535)")
    rate = pick("rate")
    if rate is not None:
        try:
            schedule = parse_schedule(str(rate), base)
        except ScheduleError as exc:
            raise UsageError(str(exc)) from None
        if not any(schedule.rates) and not (schedule.ramp and any(schedule.ramp)):
            raise UsageError(f"--rate {rate}: a rate of 0 sends nothing")
    plan = Plan(
        host=pick("host", "127.0.0.1"), port=port, key_files=key_files, spec=pick("spec"),
        framing=pick("framing"), mac=not args.no_mac, signon=not (args.no_signon or args.no_mac),
        connections=pick("connections"), depth=pick("depth", 1),
        rate=None if rate is None else str(rate), poisson=pick("arrivals") == "poisson",
        seed=pick("seed"), duration=pick("duration"), count=pick("count"),
        warmup=float(pick("warmup", 0.0)), timeout=float(pick("timeout", 10.0)),
        max_in_flight=args.max_in_flight, verify=not args.no_mac, base=str(base),
        stan_start=args.stan_start, tls_ca=pick("tls_ca"),
    )  # fmt: skip
    if plan.warmup < 0:
        raise UsageError("--warmup must be 0 or more seconds")
    try:
        tls_client_context(plan.tls_ca)  # read now: a bad file is a usage error, not a crash
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"--tls-ca {plan.tls_ca}: {exc.strerror or exc}") from None
    if args.command == "run":
        _run_options(args, scenario, plan)
    else:
        plan.replay = args.file
        plan.loops = args.loops
        plan.password = args.operator_password
        plan.speed = None if args.as_fast_as_possible else (args.speed or 1.0)
        if args.as_fast_as_possible and rate is not None:
            raise UsageError("--as-fast-as-possible and --rate do not go together")
    if plan.duration is None and plan.count is None and args.command == "run":
        plan.duration = 10.0
    thresholds = list(args.fail_if)
    for text in scenario.get("fail_if", []):
        thresholds.append(argparse_type(str(text)))
    return plan, int(pick("processes", 1)), thresholds


def _run_options(args: argparse.Namespace, scenario: dict[str, Any], plan: Plan) -> None:
    mix = _mix(args.mix) if args.mix else scenario.get("mix", {"sale": 1})
    unknown = sorted(set(mix) - set(KINDS))
    if unknown:
        raise UsageError(f"unknown kind {unknown[0]!r} in the mix (one of {', '.join(KINDS)})")
    if not all(isinstance(w, int) and w >= 0 for w in mix.values()) or not any(mix.values()):
        raise UsageError("the mix needs whole weights of 0 or more, one at least above 0")
    plan.mix = dict(mix)
    amounts = scenario.get("amounts", [100, 99_999])
    if len(amounts) != 2 or not all(isinstance(a, int) and a > 0 for a in amounts):
        raise UsageError("amounts must be [LOWEST, HIGHEST] in minor units, above 0")
    plan.amounts = (min(amounts), max(amounts))
    plan.test_amount = int(scenario.get("test_amount", 1))
    rebind = dict(scenario.get("rebind", {}))
    for name in _REBIND_KEYS:
        value = getattr(args, f"rebind_{name}")
        if value is not None:
            rebind[name] = value
    if mix.get("rebind"):
        missing = [n for n in _REBIND_KEYS if not rebind.get(n)]
        if missing:
            raise UsageError(f"rebinds in the mix need --rebind-{missing[0].replace('_', '-')}")
        plan.rebind = {n: str(rebind[n]) for n in _REBIND_KEYS}
    if args.prebuilt:
        if set(k for k, w in mix.items() if w) - {"sale"}:
            raise UsageError("--prebuilt builds sales only: leave out --mix")
        plan.prebuilt = args.prebuilt
        plan.repeat = args.repeat
    elif args.repeat:
        raise UsageError("--repeat goes with --prebuilt")


def _report(result: Result, args: argparse.Namespace, thresholds: list[Any]) -> int:
    summary = result.recorder.summary(result.elapsed)
    failures = evaluate(thresholds, summary)
    answered = max(1, summary.sent)
    cpu_us = result.cpu_s / answered * 1e6
    extra = dict(result.counts)
    if args.json:
        data = summary.as_dict()
        data["counts"] = extra
        data["generator_cpu_us_per_request"] = round(cpu_us, 2)
        if args.command == "replay":
            data["expectations"] = {"checked": result.checked, "mismatches": result.mismatches,
                                    "unsendable": result.unsendable}  # fmt: skip
        data["failed"] = [f.reason for f in failures]
        data["prebuilt_exhausted"] = result.prebuilt_exhausted
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        out = render_table(summary)
        out += "\nhow requests left and answers matched\n"
        for name in ("warmup", "late", "unsent", "unmatched", "out_of_order", "bad_mac",
                     "undecodable", "reconnects"):  # fmt: skip
            out += f"  {name.replace('_', ' '):<14}{extra.get(name, 0):>10}\n"
        out += f"  {'max late':<14}{float(extra.get('max_late_s', 0)) * 1000:>10.3f} ms\n"
        out += f"  generator CPU {cpu_us:>9.2f} us a request\n"
        if args.command == "replay":
            out += f"\nexpectations checked {result.checked}, mismatches "
            out += f"{sum(result.mismatches.values())}\n"
            for text, n in sorted(result.mismatches.items()):
                out += f"  {text}: {n}\n"
            for text, n in sorted(result.unsendable.items()):
                out += f"  not sent, {text}: {n}\n"
        for f in failures:
            out += f"FAILED {f.reason}\n"
        sys.stdout.write(out)
    if result.prebuilt_exhausted:
        print("note: the prebuilt frames ran out before the end; raise --prebuilt", file=sys.stderr)
    if args.csv:
        Path(args.csv).write_text(render_csv(summary), encoding="utf-8")
    if args.plot:
        from simulators.load.plot import PlotUnavailable, plot

        try:
            plot(summary, args.plot, title=f"acqhost-load {args.command}")
        except PlotUnavailable as exc:
            print(f"acqhost-load: {exc}", file=sys.stderr)
            return EXIT_USAGE
    if failures:
        return EXIT_FAILED
    if args.command == "replay" and args.fail_on_mismatch and result.mismatches:
        return EXIT_FAILED
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "register":
        try:
            paths = register_terminals(args.db, args.count, args.keys_dir, config=args.config)
        except RegisterError as exc:
            print(f"acqhost-load: {exc}", file=sys.stderr)
            return EXIT_USAGE
        print(f"{len(paths)} load terminals; key files in {paths[0].parent}")
        return 0
    try:
        plan, processes, thresholds = _plan(args)
    except UsageError as exc:
        print(f"acqhost-load: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except argparse.ArgumentTypeError as exc:
        print(f"acqhost-load: {exc}", file=sys.stderr)
        return EXIT_USAGE
    progress = Progress(sys.stderr, enabled=False if args.quiet else (args.progress or None))
    planned = None if plan.duration is None else plan.warmup + plan.duration

    def on_live(m: Live) -> None:
        progress.update(Snapshot(m.elapsed, planned, float(m.answered_last_s), m.in_flight,
                                 m.answered, m.errors, m.timeouts, m.p99_last_us,
                                 "measuring" if m.measuring else "warm-up"))  # fmt: skip

    progress.start()
    try:
        if processes > 1:
            result = run_split(plan, processes, on_live)
        else:
            result = run_plan(plan, on_live=on_live)
    except RunError as exc:
        progress.stop()
        print(f"acqhost-load: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        progress.stop()
        return 130
    progress.stop()
    return _report(result, args, thresholds)


if __name__ == "__main__":
    raise SystemExit(main())
