"""Fitting under the queue's 64 KiB: the envelope's encoded size, and shortening in a fixed, published order
that ``truncated`` records.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from collectors.envelope.addresses import ADDRESS_FIELDS
from collectors.envelope.notes import Notes, clip

QUEUE_MESSAGE_LIMIT = 64 * 1024  # bytes: an Azure Storage queue message, measured after base64
QUEUE_MARGIN = 1024  # bytes kept free below the limit for the service's own wrapping of the message text


def dumps(envelope: dict[str, Any]) -> str:
    return json.dumps(envelope, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def encoded_size(envelope: dict[str, Any]) -> int:
    """Bytes the envelope takes on the queue: its compact UTF-8 JSON, base64-encoded."""
    return 4 * -(-len(dumps(envelope).encode("utf-8")) // 3)


def _budget(max_encoded_bytes: int) -> int:
    """Largest JSON size (bytes) whose base64 stays under the limit less the margin."""
    return max((max_encoded_bytes - QUEUE_MARGIN) // 4 * 3, 0)


# Size-driven shortening, in rounds: each round walks the published order (preview, address lists,
# references, subject, attachments) with a harsher bound than the round before, so that one huge field does not
# cost every field before it in the order its full content.
_SHRINK_ROUNDS: tuple[tuple[tuple[str, int], ...], ...] = (
    (("preview", 500), ("addresses", 100), ("references", 10), ("subject", 1000), ("attachments", 50)),
    (("preview", 0), ("addresses", 20), ("references", 2), ("subject", 200), ("attachments", 10)),
    (("addresses", 5), ("attachments", 0)),
    (("addresses", 1),),
)


def _shorten(envelope: dict[str, Any], name: str, size: int, notes: Notes) -> bool:
    """Bound one field to ``size`` entries or characters (0 empties it); True when something was cut."""
    value = envelope[name]
    if value is None or len(value) <= size:
        return False
    if name == "references" and size > 1:
        # The thread's root comes first and the parent last: keep both ends.
        envelope[name] = value[:1] + value[-(size - 1) :]
    elif name == "preview" and size == 0:
        envelope[name] = None
    else:
        envelope[name] = value[:size]
    notes.cut(name)
    return True


def _shrink_steps(envelope: dict[str, Any], notes: Notes) -> Iterator[None]:
    """Shorten fields one step per iteration, until the caller stops asking."""
    for bounds in _SHRINK_ROUNDS:
        for name, size in bounds:
            names = ADDRESS_FIELDS if name == "addresses" else (name,)
            if any([_shorten(envelope, each, size, notes) for each in names]):
                yield
    # Last resort, for headers built to hurt: bound every remaining free-text field.
    for name in ("header_problems", "mime_problems"):
        _shorten(envelope, name, 5, notes)
    classification = envelope["classification"]
    if len(classification["reasons"]) > 5:
        classification["reasons"] = classification["reasons"][:5]
        notes.cut("classification")
    for name in ADDRESS_FIELDS:
        for entry in envelope[name]:
            entry["name"] = clip(entry["name"], 64, name, notes)
    for name, size in (("message_id", 128), ("in_reply_to", 128), ("date_raw", 64), ("references", 0)):
        _shorten(envelope, name, size, notes)
    _shorten(envelope, "subject", 50, notes)
    yield
    _shorten(envelope, "folder", 256, notes)
    yield


_DONE = object()


def fit(envelope: dict[str, Any], notes: Notes, max_encoded_bytes: int) -> None:
    budget = _budget(max_encoded_bytes)
    steps = _shrink_steps(envelope, notes)
    while len(dumps(envelope).encode("utf-8")) > budget:
        if next(steps, _DONE) is _DONE:
            raise ValueError(
                f"envelope cannot fit in {max_encoded_bytes} bytes: the mailbox, folder or blob given is too large"
            )
