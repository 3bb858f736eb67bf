"""``acqhost settle report``: the settlement file of closed batches (PROTOCOL.md 5.4), one line
per terminal, batch and settlement account, in CSV or JSON.

Account numbers are masked unless ``--unmasked``; then they are unsealed with the host data key
and the audit log records who was shown which lines (``report.unmasked``), in the transaction
that reads them. The rules are :mod:`acqhost.domain.settlement`'s; this command parses, writes
and chooses the exit status.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import getpass
import io
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from acqhost.cli.common import (
    CliError,
    Subparsers,
    add_command,
    add_group,
    config_from,
    host_keys,
    opened,
    require,
    write_new,
)
from acqhost.domain import settlement

__all__ = ("COLUMNS", "TOTALS_COLUMNS", "add_settle_commands", "cmd_settle_report", "render")

COLUMNS = (
    "batch",
    "tid",
    "mid",
    "closed_at",
    "account_version",
    "account",
    "holder",
    "bank_code",
    "count",
    "amount",
)
# The bank's view (--format totals): what a bank can know of a closed batch, no close time.
# The bank simulator's totals print these columns, so that one diff compares the two.
TOTALS_COLUMNS = tuple(c for c in COLUMNS if c != "closed_at")


def _utc(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def render(lines: Sequence[settlement.ReportLine], fmt: str) -> str:
    """The report as text: CSV with a header row, or a JSON array of objects (amounts in minor
    units, times in UTC)."""
    rows = [
        (line.batch_no, line.tid, line.mid, _utc(line.closed_at), line.account_version,
         line.account, line.holder, line.bank_code, line.count, line.amount)
        for line in lines
    ]  # fmt: skip
    if fmt == "totals":  # the bank's view: no close time, in the bank simulator's order
        totals = sorted((row[:3] + row[4:] for row in rows), key=lambda r: r[:4])
        return _csv(TOTALS_COLUMNS, totals)
    if fmt == "json":
        objects = [dict(zip(COLUMNS, row, strict=True)) for row in rows]
        return json.dumps(objects, ensure_ascii=False, indent=2) + "\n"
    return _csv(COLUMNS, rows)


def _csv(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return out.getvalue()


def _day(text: str | None) -> datetime.date | None:
    if text is None:
        return None
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise CliError(f"--date must be a day as YYYY-MM-DD: {text!r}") from None


def cmd_settle_report(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    # Only full account numbers need the host data key (to unseal them, and for the audit log).
    key = host_keys(cfg).data_key if args.unmasked else b""
    day = _day(args.date)
    require(args.batch is None or args.batch >= 1, "--batch must be 1 or more")
    by = args.by if args.by is not None else getpass.getuser()
    require(not args.unmasked or bool(by.strip()), "--by must not be empty")
    out = Path(args.out) if args.out else None
    require(out is None or not out.exists(), f"{out} exists: refusing to overwrite it")
    written = False
    try:
        with opened(cfg) as store, store.transaction(write=args.unmasked) as tx:
            lines = settlement.report(
                tx,
                key,
                tid=args.tid,
                batch_no=args.batch,
                day=day,
                unmasked=args.unmasked,
                by=by,
                now=time.time(),
            )
            text = render(lines, args.format)
            if out is not None:
                # Written before the audit entry of an unmasked report commits: a file that
                # cannot be written leaves no entry saying it was. Full account numbers are
                # for the file's owner only.
                try:
                    write_new(out, text, 0o600 if args.unmasked else 0o644)
                except OSError as e:
                    raise CliError(f"--out {out}: {e.strerror or e}; nothing written") from None
                written = True
    except BaseException:
        if written and out is not None:  # the transaction did not commit: no file either
            out.unlink(missing_ok=True)
        raise
    if out is None:
        sys.stdout.write(text)
        return 0
    shown = "full account numbers" if args.unmasked else "accounts masked"
    print(f"{len(lines)} settlement line(s) written to {out} ({shown})", file=sys.stderr)
    return 0


def add_settle_commands(sub: Subparsers) -> None:
    """``acqhost settle ...``: the settlement report."""
    g = add_group(sub, "settle", "batch settlement: the settlement report of closed batches")
    text = "what closed batches settled, per terminal, batch and account"
    p = add_command(g, "report", text, cmd_settle_report)
    p.add_argument("--batch", type=int, metavar="N", help="only batches numbered N")
    p.add_argument("--date", metavar="YYYY-MM-DD", help="only batches closed that day (UTC)")
    p.add_argument("--tid", metavar="TID", help="only this terminal's batches")
    text = "csv (default), json, or totals: CSV without closed_at, as acqhost-bank totals prints"
    p.add_argument("--format", choices=("csv", "json", "totals"), default="csv", help=text)
    text = "full account numbers (recorded in the audit log, with --by)"
    p.add_argument("--unmasked", action="store_true", help=text)
    text = "who asks for full account numbers (default: the login name)"
    p.add_argument("--by", metavar="NAME", help=text)
    p.add_argument("--out", metavar="FILE", help="write to FILE (never overwritten)")
