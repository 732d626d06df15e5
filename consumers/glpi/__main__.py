"""The GLPI consumer's command line, for operators and tests.

    python -m consumers.glpi run     [--settings local.settings.json]   drain the mail queue once, as the function
    python -m consumers.glpi replay  [--settings local.settings.json]   poison queue -> mail queue, failures released
    python -m consumers.glpi status  ENVELOPE_ID [--settings ...]         what became of one envelope

Settings come from the environment; ``--settings`` adds the Values of a local.settings.json (the environment wins).
``run`` follows the function's rules: a message that fails goes back to the queue, visible again after a delay
that grows with its dequeue count (consumers/glpi/retries.py), and after ``maxDequeueCount`` attempts it moves to
``<queue>-poison``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

from consumers.glpi.service import MAX_DEQUEUE_COUNT, build_consumer, handle_queue_message
from shared import azure_clients
from shared.errors import CollectorError, ConfigurationError
from shared.settings import Settings, load_settings

logger = logging.getLogger("consumers.glpi")

POISON_SUFFIX = "-poison"  # the Functions queue trigger's poison queue name
RETRY_VISIBILITY_SECONDS = 30  # host.json extensions.queues.visibilityTimeout
PROCESSING_VISIBILITY_SECONDS = 600


def _load_settings_file(path: Path) -> None:
    values = json.loads(path.read_text(encoding="utf-8")).get("Values", {})
    for name, value in values.items():
        os.environ.setdefault(name, str(value))


def run(settings: Settings, *, retry_visibility: int | None = None) -> dict[str, int]:
    """Handle every message on the mail queue once; returns counts by outcome. A failed message comes back after
    its growing retry delay, as under the function (``retry_visibility`` sets one fixed delay instead)."""
    consumer = build_consumer(settings)
    queue = azure_clients.queue(settings, settings.mail_queue)
    counts: dict[str, int] = {}
    try:
        while True:
            batch = list(queue.receive_messages(max_messages=16, visibility_timeout=PROCESSING_VISIBILITY_SECONDS))
            if not batch:
                return counts
            for message in batch:
                dequeue_count = int(message.dequeue_count or 1)
                try:
                    outcome = handle_queue_message(
                        consumer,
                        queue,
                        message.content,
                        message_id=message.id,
                        pop_receipt=message.pop_receipt if retry_visibility is None else None,
                        dequeue_count=dequeue_count,
                        expires_on=message.expires_on,
                    ).status
                    queue.delete_message(message)
                except Exception as e:  # every failure is settled the same way: back on the queue, or poisoned
                    outcome = "failed"
                    logger.warning("glpi run message failed error=%s", e)
                    if dequeue_count >= MAX_DEQUEUE_COUNT:
                        azure_clients.queue(settings, settings.mail_queue + POISON_SUFFIX).send_message(message.content)
                        queue.delete_message(message)
                        outcome = "poisoned"
                    else:
                        _release(
                            queue, message, RETRY_VISIBILITY_SECONDS if retry_visibility is None else retry_visibility
                        )
                counts[outcome] = counts.get(outcome, 0) + 1
    finally:
        consumer.close()


def _release(queue: Any, message: Any, seconds: int) -> None:
    """The host's release after a failure: a message whose retry delay the consumer set has a new pop receipt,
    and is left as it is (as the queue extension leaves it)."""
    try:
        queue.update_message(message, visibility_timeout=seconds)
    except ResourceNotFoundError:
        pass
    except HttpResponseError as e:
        if e.status_code != 400 or getattr(e, "error_code", None) != "PopReceiptMismatch":
            raise


def replay(settings: Settings) -> int:
    """Put every poison-queue message back on the mail queue, after releasing the failed rows. Returns how many."""
    if settings.glpi is None:
        raise ConfigurationError("GLPI_URL is not set: there is no GLPI consumer to replay for")
    consumer = build_consumer(settings)
    try:
        released = consumer.state.release_failed()
    finally:
        consumer.close()
    poison = azure_clients.queue(settings, settings.mail_queue + POISON_SUFFIX)
    target = azure_clients.queue(settings, settings.mail_queue)
    moved = 0
    while True:
        batch = list(poison.receive_messages(max_messages=32, visibility_timeout=120))
        if not batch:
            break
        for message in batch:
            target.send_message(message.content)  # first the copy, then the delete: never lost, at worst twice
            poison.delete_message(message)
            moved += 1
    logger.info("glpi replay moved=%d released=%d", moved, released)
    return moved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m consumers.glpi", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("command", choices=("run", "replay", "status"))
    parser.add_argument("envelope_id", nargs="?")
    parser.add_argument("--settings", type=Path, help="a local.settings.json whose Values to use")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("azure").setLevel(logging.WARNING)
    if args.settings:
        _load_settings_file(args.settings)
    try:
        settings = load_settings()
        if args.command == "run":
            print(json.dumps(run(settings)))
        elif args.command == "replay":
            print(json.dumps({"replayed": replay(settings)}))
        else:
            if not args.envelope_id:
                parser.error("status needs an ENVELOPE_ID")
            consumer = build_consumer(settings)
            try:
                print(json.dumps(consumer.state.envelope(args.envelope_id), default=str))
            finally:
                consumer.close()
    except CollectorError as e:
        print(f"glpi consumer: {e.describe()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
