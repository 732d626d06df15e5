"""Command line for operators: run one collection now, or list mailboxes with their status.

    python -m collectors collect [--settings local.settings.json] [--mailbox ADDRESS]
    python -m collectors list    [--settings local.settings.json]

Settings come from the environment; ``--settings`` adds the Values of a local.settings.json (the environment wins,
as with the Functions host).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from shared.errors import CollectorError, NotFoundError
from shared.logging_setup import configure_logging


def _load_settings_file(path: Path) -> None:
    values = json.loads(path.read_text()).get("Values", {})
    for name, value in values.items():
        os.environ.setdefault(name, str(value))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m collectors", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["collect", "list"])
    parser.add_argument("--settings", type=Path, help="a local.settings.json whose Values to use")
    parser.add_argument("--mailbox", help="collect only this mailbox")
    parser.add_argument(
        "--verbose", action="store_true", help="debug logging, Azure SDK requests too (redacted; never mail content)"
    )
    args = parser.parse_args(argv)
    # --verbose adds the Azure SDK's request lines, never mail content (see configure_logging).
    configure_logging(level=logging.DEBUG if args.verbose else logging.INFO, sdk_requests=args.verbose)
    if args.settings:
        _load_settings_file(args.settings)

    from collectors.services import get_services

    try:
        services = get_services()
        if args.command == "list":
            rows = [m.to_public() for m in services.registry.list()]
            print(json.dumps(rows, indent=2))
            return 0
        if args.mailbox:
            mailbox = services.registry.get(args.mailbox.strip().lower())
            deadline = time.monotonic() + services.settings.time_budget_seconds
            results = [services.collector.collect_mailbox(mailbox, deadline=deadline)]
        else:
            results = services.collector.run()
    except NotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CollectorError as e:
        print(f"error: {e.describe()}", file=sys.stderr)
        return 1
    for r in results:
        print(f"{r.address}: {r.outcome}, {r.messages} messages, {r.bytes} bytes{' -- ' + r.error if r.error else ''}")
    return 1 if any(r.outcome.failed for r in results) else 0
