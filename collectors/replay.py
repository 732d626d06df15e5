"""Replay: put a mailbox's envelopes back on a queue, rebuilt from the raw mail kept in the blob archive, for a
consumer that was down or a new consumer that starts with the past.

The envelopes carry the same ``id`` as when they were first collected (mailbox/UIDVALIDITY/UID, read from the blob
name), so a consumer that already handled one drops it as a duplicate. The mailbox itself is not touched.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

from azure.core.exceptions import AzureError, ResourceNotFoundError
from azure.storage.blob import BlobProperties, ContainerClient
from azure.storage.queue import QueueClient

from collectors.collect import blob_name, envelope_of
from collectors.envelope import encode_for_queue, envelope_id
from shared.errors import TransientError
from shared.registry import Mailbox

logger = logging.getLogger(__name__)

MAX_REPLAY = 10_000  # envelopes per request: a larger replay is split by time range
MAX_IDS = 1_000
_BLOB = re.compile(r"^[^/]+/(\d{1,10})/(\d{10})\.eml$")


@dataclass
class ReplayResult:
    mailbox: str
    queued: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # ids asked for whose raw mail is not in the archive
    more: bool = False  # MAX_REPLAY was reached: replay the rest with a later ``since``

    def to_public(self) -> dict[str, object]:
        return {"mailbox": self.mailbox, "queued": len(self.queued), "ids": self.queued, "missing": self.missing,
                "more": self.more}  # fmt: skip


def parse_ids(mailbox: Mailbox, ids: Iterable[str]) -> list[tuple[int, int]]:
    """(UIDVALIDITY, UID) for each envelope id of ``mailbox``. Raises ValueError naming the first bad one."""
    parsed = []
    for text in ids:
        parts = str(text).strip().rsplit("/", 2)
        if len(parts) != 3 or parts[0].lower() != mailbox.address or not all(p.isdigit() for p in parts[1:]):
            raise ValueError(
                f"{str(text)[:200]!r} is not an envelope id of {mailbox.address} (mailbox/UIDVALIDITY/UID)"
            )
        uidvalidity, uid = int(parts[1]), int(parts[2])
        envelope_id(mailbox.address, uidvalidity, uid)  # range check
        parsed.append((uidvalidity, uid))
    if len(parsed) > MAX_IDS:
        raise ValueError(f"at most {MAX_IDS} ids per replay")
    return parsed


def _archived(
    container: ContainerClient, mailbox: Mailbox, since: datetime | None, until: datetime | None
) -> Iterator[BlobProperties]:
    for blob in container.list_blobs(name_starts_with=f"{mailbox.key}/"):
        collected = blob.creation_time or blob.last_modified
        if since is not None and collected < since:
            continue
        if until is not None and collected >= until:
            continue
        yield blob


def replay(
    mailbox: Mailbox,
    *,
    container: ContainerClient,
    queue: QueueClient,
    since: datetime | None = None,
    until: datetime | None = None,
    ids: Iterable[str] | None = None,
) -> ReplayResult:
    """Queue the envelopes of ``mailbox`` whose raw mail was archived in [since, until), or those of ``ids``.

    Raises ValueError for bad ids or a range that ends before it starts, TransientError when storage fails (the
    envelopes queued so far stay queued; replaying again only adds duplicates the consumer drops).
    """
    for name, moment in (("since", since), ("until", until)):
        if moment is not None and moment.tzinfo is None:
            raise ValueError(f"{name} must carry a time zone (e.g. 2026-11-29T10:00:00Z)")
    if since is not None and until is not None and until <= since:
        raise ValueError("until must be after since")
    result = ReplayResult(mailbox.address)
    try:
        if ids is not None:
            wanted = [(u, n, blob_name(mailbox.key, u, n)) for u, n in parse_ids(mailbox, ids)]
        else:
            wanted = []
            for blob in _archived(container, mailbox, since, until):
                match = _BLOB.match(blob.name)
                if match:
                    wanted.append((int(match.group(1)), int(match.group(2)), blob.name))
        wanted.sort()
        if len(wanted) > MAX_REPLAY:
            wanted, result.more = wanted[:MAX_REPLAY], True
        for uidvalidity, uid, name in wanted:
            client = container.get_blob_client(name)
            try:
                download = client.download_blob()
            except ResourceNotFoundError:
                result.missing.append(envelope_id(mailbox.address, uidvalidity, uid))
                continue
            raw = download.readall()
            collected_at = download.properties.creation_time or download.properties.last_modified or datetime.now(UTC)
            envelope = envelope_of(mailbox, uidvalidity, uid, client, raw, collected_at=collected_at)
            queue.send_message(encode_for_queue(envelope))
            result.queued.append(envelope["id"])
    except AzureError as e:
        raise TransientError(
            f"replay of {mailbox.address} stopped after {len(result.queued)} envelopes: {type(e).__name__}",
            remedy="replay again once storage answers: consumers drop the envelopes they already have",
        ) from e
    logger.info(
        "replay mailbox=%s queued=%d missing=%d more=%s queue=%s",
        mailbox.address,
        len(result.queued),
        len(result.missing),
        str(result.more).lower(),
        queue.queue_name,
    )
    return result
