"""The queue envelope: what consumers learn about one collected message without fetching its raw bytes.

The collector stores the raw bytes in a blob and puts this envelope (JSON, base64 on the wire) on a Storage
queue. Everything here is pure: no I/O, no Azure imports, so it runs the same in the collector and the tests.

Mail is hostile input. Nothing in this module raises because of what a message holds: a header that cannot be
decoded is kept as it came (8-bit bytes backslash-escaped) and named in ``header_problems``; a broken MIME
structure is named in ``mime_problems``; and the encoded envelope always fits the queue's message limit, shrunk
in a fixed order that ``truncated`` records. ``schemas/envelope.v1.json`` is the published contract.

The package holds one concern per module: ``headers`` (header text, ids, dates), ``addresses``, ``mime`` (the part
walk, attachments, preview), ``classification`` (the auto-reply, bounce and loop policy) and ``fitting`` (the
64 KiB limit). This module assembles them.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from email.message import Message
from typing import Any, NotRequired, TypedDict, Unpack

from collectors.envelope.addresses import ADDRESS_FIELDS, HEADER_NAMES, parse_addresses
from collectors.envelope.classification import LOOP_HEADER, classify
from collectors.envelope.fitting import QUEUE_MARGIN, QUEUE_MESSAGE_LIMIT, dumps, encoded_size, fit
from collectors.envelope.headers import (
    SUBJECT_CHARS,
    first_header,
    parse_date,
    parse_message_id,
    parse_references,
    raw_headers,
    unstructured,
)
from collectors.envelope.mime import parse_message, read_body
from collectors.envelope.notes import Notes, clip

__all__ = [
    "LOOP_HEADER",
    "QUEUE_MARGIN",
    "QUEUE_MESSAGE_LIMIT",
    "SCHEMA",
    "MessageMeta",
    "build_envelope",
    "describe_message",
    "encode_for_queue",
    "encoded_size",
    "envelope_id",
]

SCHEMA = "mail-envelope/1"


def envelope_id(mailbox: str, uidvalidity: int, uid: int) -> str:
    """The stable id of a collected message: the same mailbox, UIDVALIDITY and UID always give the same id.

    Consumers drop duplicates by it (delivery is at least once). The mailbox is lower-cased, as Exchange
    treats addresses case-insensitively.

    Raises:
        ValueError: an empty mailbox, or a UIDVALIDITY or UID outside the IMAP range (unsigned 32 bits).
    """
    mailbox = mailbox.strip().lower()
    if not mailbox:
        raise ValueError("mailbox is empty")
    for name, number in (("uidvalidity", uidvalidity), ("uid", uid)):
        if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number < 2**32:
            raise ValueError(f"{name} must be an integer in 0..2**32-1, not {number!r}")
    return f"{mailbox}/{uidvalidity}/{uid}"


class MessageMeta(TypedDict):
    """What the caller knows of a message besides its bytes: where it was collected, where its blob is, and the
    queue's size limit. ``build_envelope`` and the streamed envelopes take these keywords and hand them on to
    ``describe_message``, which names each."""

    mailbox: str
    folder: str
    uidvalidity: int
    uid: int
    blob_url: str
    blob_name: str
    collected_at: datetime
    blob_container: NotRequired[str | None]
    max_encoded_bytes: NotRequired[int]


def build_envelope(raw: bytes, **meta: Unpack[MessageMeta]) -> dict[str, Any]:
    """Describe one message for the queue; the result matches ``schemas/envelope.v1.json``.

    Never raises because of the message's content: undecodable headers are kept raw and listed in
    ``header_problems``, MIME damage in ``mime_problems``. The encoded envelope (see ``encode_for_queue``)
    stays under ``max_encoded_bytes`` less a margin; fields shortened to get there are listed in ``truncated``,
    and ``id``, ``uid``, ``sha256`` and ``blob`` are never shortened. A naive ``collected_at`` is taken as UTC.

    Raises:
        ValueError: invalid ids (see ``envelope_id``), or caller-supplied metadata too large to ever fit.
    """
    notes = Notes()
    message = parse_message(raw, notes)
    return describe_message(message, notes, size=len(raw), sha256=hashlib.sha256(raw).hexdigest(), **meta)


def describe_message(
    message: Message,
    notes: Notes,
    *,
    size: int,
    sha256: str,
    mailbox: str,
    folder: str,
    uidvalidity: int,
    uid: int,
    blob_url: str,
    blob_name: str,
    collected_at: datetime,
    blob_container: str | None = None,
    max_encoded_bytes: int = QUEUE_MESSAGE_LIMIT,
) -> dict[str, Any]:
    """The envelope of a parsed message (whole, or the bounded skeleton ``stream.EnvelopeStream`` builds), with
    ``notes`` holding what the parse found so far. Same guarantees and errors as ``build_envelope``."""
    headers = raw_headers(message)

    lists: dict[str, list[dict[str, str]]] = {}
    counts: dict[str, int] = {}
    for name in ADDRESS_FIELDS:
        lists[name], counts[name] = parse_addresses(name, headers.get(HEADER_NAMES[name], []), notes)
    references, counts["references"] = parse_references(first_header(headers, "references", notes), notes)
    subject_raw = first_header(headers, "subject", notes)
    subject = None if subject_raw is None else unstructured("subject", subject_raw, notes)
    date, date_raw = parse_date(first_header(headers, "date", notes), notes)
    body = read_body(message, notes)
    counts["attachments"] = len(body.attachments)
    message_id = parse_message_id("message-id", first_header(headers, "message-id", notes), notes, "message_id")
    in_reply_to = parse_message_id("in-reply-to", first_header(headers, "in-reply-to", notes), notes, "in_reply_to")

    if collected_at.tzinfo is None:
        collected_at = collected_at.replace(tzinfo=UTC)
    envelope: dict[str, Any] = {
        "schema": SCHEMA,
        "id": envelope_id(mailbox, uidvalidity, uid),
        "mailbox": mailbox,
        "folder": folder,
        "uidvalidity": uidvalidity,
        "uid": uid,
        "message_id": message_id,
        "in_reply_to": in_reply_to,
        "references": references,
        "from": lists["from"],
        "reply_to": lists["reply_to"],
        "to": lists["to"],
        "cc": lists["cc"],
        "subject": None if subject is None else clip(subject, SUBJECT_CHARS, "subject", notes),
        "date": date,
        "date_raw": date_raw,
        "size": size,
        "sha256": sha256,
        "blob": {"container": blob_container, "name": blob_name, "url": blob_url},
        "content_type": body.content_type,
        "attachments": body.attachments,
        "classification": classify(headers, body, lists["from"]),
        "preview": body.preview,
        "collected_at": collected_at.isoformat(),
        "counts": counts,
        "truncated": notes.truncated,
        "header_problems": notes.header_problems,
        "mime_problems": notes.mime_problems,
        "oversize": None,  # the collector's: {"size", "limit"} when only the headers of a large message are queued
    }
    fit(envelope, notes, max_encoded_bytes)
    return envelope


def encode_for_queue(envelope: dict[str, Any], *, max_encoded_bytes: int = QUEUE_MESSAGE_LIMIT) -> str:
    """The envelope as compact JSON text, ready for a queue client that base64-encodes it.

    Raises:
        ValueError: the base64 of the text would exceed ``max_encoded_bytes`` (only an envelope altered after
            ``build_envelope`` can).
    """
    text = dumps(envelope)
    size = 4 * -(-len(text.encode("utf-8")) // 3)
    if size > max_encoded_bytes:
        raise ValueError(f"envelope takes {size} bytes after base64, over the {max_encoded_bytes}-byte limit")
    return text
