"""Command line for operators: run one collection now, or list mailboxes with their status.

    python -m collectors collect [--settings local.settings.json] [--mailbox ADDRESS]
    python -m collectors list    [--settings local.settings.json]
    python -m collectors pause|resume|diagnose --mailbox ADDRESS
    python -m collectors replay --mailbox ADDRESS (--since ISO [--until ISO] | --id ID ...) [--queue NAME]

Settings come from the environment; ``--settings`` adds the Values of a local.settings.json (the environment wins,
as with the Functions host).
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.errors import CollectorError, NotFoundError
from shared.logging_setup import configure_logging

if TYPE_CHECKING:
    from collectors.services import Services


def _load_settings_file(path: Path) -> None:
    values = json.loads(path.read_text()).get("Values", {})
    for name, value in values.items():
        os.environ.setdefault(name, str(value))


def _operate(services: Services, args: argparse.Namespace) -> int:
    """pause, resume, diagnose or replay of one mailbox; prints JSON. Raises NotFoundError, ValueError or
    CollectorError."""
    from collectors.diagnose import diagnose  # imported on use, as the services are: --help stays fast
    from collectors.replay import replay

    if not args.mailbox:
        raise ValueError(f"{args.command} needs --mailbox ADDRESS")
    address = args.mailbox.strip().lower()
    who = f"command line ({getpass.getuser()})"
    answer: dict[str, Any]
    if args.command == "pause":
        answer = services.operations.pause(address, admin=who).to_public()
    elif args.command == "resume":
        answer = services.operations.resume(address, admin=who).to_public()
    elif args.command == "diagnose":
        answer = diagnose(services.settings, services.registry, services.collector.token_for, address).to_public()
    else:
        if not args.ids and not args.since:
            raise ValueError("replay needs --since (and optionally --until) or --id")
        answer = replay(
            services.registry.get(address),
            container=services.mail_container(),
            queue=services.mail_queue(args.queue),
            since=args.since,
            until=args.until,
            ids=args.ids,
        ).to_public()
    print(json.dumps(answer, indent=2, default=str))
    return 0 if answer.get("ok", True) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m collectors", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["collect", "list", "pause", "resume", "diagnose", "replay"])
    parser.add_argument("--settings", type=Path, help="a local.settings.json whose Values to use")
    parser.add_argument("--mailbox", help="collect only this mailbox")
    parser.add_argument("--since", type=datetime.fromisoformat, help="replay: archived at or after (ISO, with zone)")
    parser.add_argument("--until", type=datetime.fromisoformat, help="replay: archived before (ISO, with zone)")
    parser.add_argument("--id", action="append", dest="ids", help="replay: an envelope id (repeat for more)")
    parser.add_argument("--queue", default="", help="replay: another queue than the mail queue (a new consumer)")
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
        if args.command in ("pause", "resume", "diagnose", "replay"):
            return _operate(services, args)
        if args.mailbox:
            mailbox = services.registry.get(args.mailbox.strip().lower())
            deadline = time.monotonic() + services.settings.time_budget_seconds
            results = [services.collector.collect_mailbox(mailbox, deadline=deadline)]
        else:
            results = services.collector.run()
    except NotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CollectorError as e:
        print(f"error: {e.describe()}", file=sys.stderr)
        return 1
    for r in results:
        print(f"{r.address}: {r.outcome}, {r.messages} messages, {r.bytes} bytes{' -- ' + r.error if r.error else ''}")
    return 1 if any(r.outcome.failed for r in results) else 0
