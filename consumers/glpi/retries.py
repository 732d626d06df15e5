"""When a message that failed is tried again: later each time, so that a long GLPI outage does not poison the queue.

The Functions queue trigger gives a failed message back with one fixed delay (host.json ``visibilityTimeout``) and
moves it to the poison queue after ``maxDequeueCount`` attempts: with 30 s and 5 attempts, a GLPI down for three
minutes would poison every message in flight. So the consumer sets the delay itself before it fails: it makes the
message invisible for ``retry_delay(dequeue_count)`` with the pop receipt it was given, and the host's own release
that follows finds the pop receipt changed and leaves the message as it is (the queue extension ignores
``PopReceiptMismatch`` and ``MessageNotFound`` when it releases a message).

With 5 attempts the delays are 1, 5, 25 and 120 minutes: the last attempt comes about 2 h 31 min after the first,
and only then does the message go to the poison queue (``python -m consumers.glpi replay`` brings it back).
A ``Retry-After`` from GLPI lengthens a delay, never beyond the cap. A delay never reaches past the message's
expiry (the queue would drop it unseen): it is cut to end a minute before, or left to the host when that is too
close.
"""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime
from typing import Any

from azure.core.exceptions import AzureError

logger = logging.getLogger(__name__)

BASE_SECONDS = 60
FACTOR = 5
MAX_SECONDS = 2 * 3600
MAX_VISIBILITY_SECONDS = 7 * 24 * 3600  # the queue service's limit for a visibility timeout
EXPIRY_MARGIN_SECONDS = 60


def retry_delay(dequeue_count: int, retry_after: float | None = None) -> int:
    """Seconds before attempt ``dequeue_count + 1``: BASE_SECONDS * FACTOR ** (dequeue_count - 1), at most
    MAX_SECONDS, and at least GLPI's ``Retry-After`` (itself capped)."""
    attempt = max(1, min(int(dequeue_count), 64))  # a count past 64 is long past the cap
    delay = min(BASE_SECONDS * int(FACTOR ** (attempt - 1)), MAX_SECONDS)
    if retry_after is not None and math.isfinite(retry_after) and retry_after > delay:
        delay = min(math.ceil(retry_after), MAX_SECONDS)
    return max(1, min(delay, MAX_VISIBILITY_SECONDS))


def total_before_poison(max_dequeue_count: int) -> int:
    """Seconds from the first attempt to the last one, when every attempt fails at once."""
    return sum(retry_delay(n) for n in range(1, max_dequeue_count))


def defer(
    queue: Any,
    message_id: str,
    pop_receipt: str,
    *,
    dequeue_count: int,
    expires_on: datetime | None = None,
    retry_after: float | None = None,
    now: datetime | None = None,
) -> int | None:
    """Hide the message for its retry delay. Returns the seconds set, or None when the host's own delay applies
    (no room before the message expires, or storage refused: the message comes back after the host's delay)."""
    delay = retry_delay(dequeue_count, retry_after)
    if expires_on is not None:
        current = now or datetime.now(UTC)
        room = (expires_on - current).total_seconds() - EXPIRY_MARGIN_SECONDS
        if room < 1:
            logger.warning(
                "glpi retry left to the host message_id=%s reason=the message expires in under %d s",
                message_id,
                EXPIRY_MARGIN_SECONDS,
            )
            return None
        delay = min(delay, int(room))
    try:
        queue.update_message(message_id, pop_receipt, visibility_timeout=delay)
    except AzureError as e:
        logger.warning("glpi retry delay not set message_id=%s error=%s", message_id, type(e).__name__)
        return None
    return delay
