"""``acqhost banklink``: what waits for each bank, and sending dead letters again.

``status`` sums the outbox per configured bank (``[[banks]]``): advices queued, the oldest one's
age, those retrying, dead letters, the latest error, and which host process is the bank's
dispatcher. ``retry`` queues a dead (or waiting) advice again, or every dead one.
"""

from __future__ import annotations

import argparse
import json
import time

from acqhost.cli.common import (
    CliError,
    Subparsers,
    add_command,
    add_group,
    config_from,
    opened,
    table,
)
from acqhost.domain import advices

__all__ = ("add_banklink_commands", "cmd_banklink_retry", "cmd_banklink_status")


def cmd_banklink_status(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    with opened(cfg) as store:
        statuses = advices.link_status(store, cfg.banks, time.time())
    if args.json:
        print(json.dumps([s.as_json() for s in statuses], ensure_ascii=False, indent=2))
        return 0
    header = ("BANK", "QUEUED", "OLDEST", "RETRYING", "DEAD", "DISPATCHER", "LAST ERROR")
    rows = [(s.bank, s.queued, f"{s.oldest_age:.1f}s", s.retrying, s.dead, s.dispatcher or "-",
             s.last_error or "-") for s in statuses]  # fmt: skip
    if rows:
        table(header, rows)
    else:
        print("no bank configured and nothing waiting")
    return 0


def cmd_banklink_retry(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    if (args.id is None) == (not args.all_dead):
        raise CliError("give one advice ID or --all-dead")
    now = time.time()
    with opened(cfg) as store:
        if args.all_dead:
            codes = None
            if args.bank is not None:
                bank = next((b for b in cfg.banks if b.name == args.bank), None)
                if bank is None:
                    raise CliError(f"no bank named {args.bank!r} in the configuration")
                codes = bank.bank_codes
            count = store.retry_dead_advices(now, codes)
        else:
            if not store.retry_advice(args.id, now):
                raise CliError(f"advice {args.id} is not waiting or dead (unknown, or delivered)")
            count = 1
    if args.json:
        print(json.dumps({"queued_again": count}))
    else:
        print(f"{count} advice{'' if count == 1 else 's'} queued again")
    return 0


def add_banklink_commands(sub: Subparsers) -> None:
    bsub = add_group(sub, "banklink", "settlement updates to the banks: status and retries")
    p = add_command(bsub, "status", "per bank: queued, oldest, retrying, dead, dispatcher",
                    cmd_banklink_status)  # fmt: skip
    p.add_argument("--json", action="store_true", help="as JSON")
    p = add_command(bsub, "retry", "queue a dead advice again (ID), or every dead one",
                    cmd_banklink_retry)  # fmt: skip
    p.add_argument("id", nargs="?", type=int, help="the advice's id (its field 37)")
    p.add_argument("--all-dead", action="store_true", help="every dead advice")
    p.add_argument("--bank", help="with --all-dead: only this bank's (its [[banks]] name)")
    p.add_argument("--json", action="store_true", help="as JSON")
