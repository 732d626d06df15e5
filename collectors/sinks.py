"""Where collected mail goes: the raw bytes to a store, the envelopes to a queue. Each seam is a small Protocol with
its Azure Storage implementation beside it; a consumer of the queue never sees which store holds the bytes.

Both implementations turn every storage failure into TransientError: nothing is lost (the message stays in the
mailbox, the checkpoint does not move) and the next run writes it again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

from azure.core.exceptions import AzureError
from azure.storage.blob import ContainerClient, ContentSettings
from azure.storage.queue import QueueClient

from shared.errors import TransientError

UPLOAD_CONCURRENCY = 4  # block uploads in flight for one large message


class RawStore(Protocol):
    """Keeps each message's exact bytes under a name derived from its identity (a retry overwrites the same)."""

    def url(self, name: str) -> str:
        """Where consumers read the bytes named ``name``."""
        ...

    def put(self, name: str, raw: bytes) -> None:
        """Store ``raw`` under ``name``, replacing what is there. Raises TransientError."""
        ...


class EnvelopeQueue(Protocol):
    """The queue that consumers read envelopes from."""

    def send(self, text: str) -> None:
        """Put one envelope (JSON text) on the queue. Raises TransientError."""
        ...


@contextlib.contextmanager
def _storage_errors(what: str) -> Iterator[None]:
    try:
        yield
    except AzureError as e:
        raise TransientError(
            f"storage write failed for {what}: {type(e).__name__}",
            remedy="nothing to do once storage is reachable: the message stays in the mailbox and the next run "
            "collects it",
        ) from e


class BlobRawStore:
    """Raw mail as block blobs of type message/rfc822 in one container."""

    def __init__(self, container: ContainerClient) -> None:
        self._container = container

    def url(self, name: str) -> str:
        return str(self._container.get_blob_client(name).url)

    def put(self, name: str, raw: bytes) -> None:
        with _storage_errors(name):
            self._container.get_blob_client(name).upload_blob(
                raw,
                overwrite=True,
                content_settings=ContentSettings(content_type="message/rfc822"),
                max_concurrency=UPLOAD_CONCURRENCY,
            )


class StorageQueueEnvelopes:
    """Envelopes on an Azure Storage queue (the client base64-encodes them, as the Functions trigger expects)."""

    def __init__(self, queue: QueueClient) -> None:
        self._queue = queue

    def send(self, text: str) -> None:
        with _storage_errors(f"an envelope on {self._queue.queue_name}"):
            self._queue.send_message(text)
