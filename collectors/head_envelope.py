"""An envelope for a message read in chunks, built from its first HEAD_BYTES only (a stand-in with the interface of
the streaming envelope builder): the size and SHA-256 are those of every byte fed, the header fields are exact
whenever the header section fits the head, and the attachments and preview are those of the head alone (a MIME
part cut at the end of the head is named in ``mime_problems``). Its memory is HEAD_BYTES whatever the message size.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

from collectors.envelope import QUEUE_MESSAGE_LIMIT, build_envelope

HEAD_BYTES = 256 * 1024  # enough for the header section of nearly every message, and the text part of most


class HeadEnvelopeStream:
    """Feed the message's bytes in any chunking, then ask for its envelope."""

    def __init__(self) -> None:
        self._head = bytearray()
        self._hash = hashlib.sha256()
        self._size = 0

    def feed(self, chunk: bytes) -> None:
        self._hash.update(chunk)
        self._size += len(chunk)
        room = HEAD_BYTES - len(self._head)
        if room > 0:
            self._head += chunk[:room]

    @property
    def size(self) -> int:
        return self._size

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def envelope(
        self,
        *,
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
        """The envelope of every byte fed so far (see ``collectors.envelope.build_envelope``)."""
        envelope = build_envelope(
            bytes(self._head),
            mailbox=mailbox,
            folder=folder,
            uidvalidity=uidvalidity,
            uid=uid,
            blob_url=blob_url,
            blob_name=blob_name,
            collected_at=collected_at,
            blob_container=blob_container,
            max_encoded_bytes=max_encoded_bytes,
        )
        # The whole message's figures: a longer size adds a few digits to the fitted text, within the queue margin.
        envelope["size"] = self._size
        envelope["sha256"] = self.sha256
        return envelope
