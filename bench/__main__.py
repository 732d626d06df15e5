"""Run the benchmarks against the local stack and print one table: figure, baseline, ratio, goal, verdict.

    python -m bench [--only latency,memory] [--scale 0.5] [--mailboxes 500] [--repeat 3] [--json out.json]

Every figure is a ratio measured in the same run (these machines are shared), never an absolute promise. The
stack must be running (``python -m devstack start``); each benchmark works on its own queue, containers, tables
and mailboxes, and uses a private Key Vault endpoint so that its counters are its own.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from bench import (
    cold_start,
    empty_before_wire,
    end_to_end,
    glpi_tickets,
    keyvault_economy,
    latency,
    many_fanout,
    many_mailboxes,
    memory,
    round_trips,
)
from bench.common import OUT, OwnKeyVault, Row, say, stack_info, table

ORDER = (
    "latency",
    "end_to_end",
    "memory",
    "cold_start",
    "keyvault",
    "many_mailboxes",
    "many_fanout",
    "glpi",
    "round_trips",
    "empty_before_wire",
)


def _benchmarks(args: argparse.Namespace) -> dict[str, Callable[[dict[str, Any]], list[Row]]]:
    return {
        "latency": lambda info: latency.run(info, messages=max(1, int(2000 * args.scale)), repeat=args.repeat),
        "end_to_end": lambda info: end_to_end.run(info, scale=args.scale, repeat=args.repeat),
        "memory": memory.run,
        "cold_start": lambda info: cold_start.run(info, repeat=max(args.repeat, 5)),
        "keyvault": lambda info: keyvault_economy.run(info, hours=args.hours),
        "many_mailboxes": lambda info: many_mailboxes.run(info, mailboxes=args.mailboxes),
        "many_fanout": lambda info: many_fanout.run(
            info,
            mailboxes=args.fanout_mailboxes,
            per_mailbox=args.fanout_messages,
            consents=args.fanout_consents,
        ),
        "round_trips": round_trips.run,
        "empty_before_wire": lambda info: empty_before_wire.run(
            info, mailboxes=args.before_wire_mailboxes, rounds=args.repeat
        ),
        "glpi": lambda info: glpi_tickets.run(info, messages=max(8, int(200 * args.scale)), repeat=args.repeat),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(ORDER)}")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the 2,000-message sets (default 1)")
    parser.add_argument("--mailboxes", type=int, default=500, help="mailboxes of benchmark 6 (default 500)")
    parser.add_argument(
        "--fanout-mailboxes", type=int, default=2000, help="mailboxes of benchmark 6b, fanned out (default 2000)"
    )
    parser.add_argument(
        "--fanout-consents",
        choices=("seeded", "real"),
        default="seeded",
        help="benchmark 6b's mailboxes: one real consent and shared mailboxes of it written to the registry "
        "(default), or a real consent each (about a second per mailbox)",
    )
    parser.add_argument(
        "--fanout-messages",
        type=int,
        default=5,
        help="new messages per mailbox of benchmark 6b (default 5; 0 measures only the empty run, 6c)",
    )
    parser.add_argument(
        "--before-wire-mailboxes",
        type=int,
        default=500,
        help="mailboxes of benchmark 6d against the commit before the wire work (default 500)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs per comparison (default 3)")
    parser.add_argument(
        "--hours", type=int, default=keyvault_economy.HOURS, help="simulated hours of benchmark 5 (default 26)"
    )
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    parser.add_argument("--verbose", action="store_true", help="show the app's INFO logs")
    args = parser.parse_args(argv)

    from shared import redaction

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    redaction.install()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()] or list(ORDER)
    unknown = sorted(set(chosen) - set(ORDER))
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")

    started = time.monotonic()
    benchmarks = _benchmarks(args)
    rows: list[Row] = []
    failed: list[str] = []
    with OwnKeyVault(stack_info()) as info:
        for name in ORDER:
            if name not in chosen:
                continue
            say(f"{name} ...")
            timer = time.monotonic()
            try:
                rows += benchmarks[name](info)
            except Exception:  # one broken benchmark must not hide the others' figures
                failed.append(name)
                traceback.print_exc()
            say(f"{name} took {time.monotonic() - timer:.0f} s")
    print()
    print(table(rows))
    print()
    met = sum(r.met for r in rows)
    print(f"{met} of {len(rows)} goals met in {time.monotonic() - started:.0f} s" + (
        f"; FAILED to run: {', '.join(failed)}" if failed else ""))  # fmt: skip
    OUT.mkdir(exist_ok=True)
    target = args.json or str(OUT / "last-run.json")
    with open(target, "w") as f:
        json.dump([r.__dict__ | {"verdict": r.verdict} for r in rows], f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
