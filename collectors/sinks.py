"""Where collected mail goes: the raw bytes to a store, the envelopes to a queue. Each seam is a small Protocol with
its Azure Storage implementation beside it; a consumer of the queue never sees which store holds the bytes.

Both implementations turn every storage failure into TransientError: nothing is lost (the message stays in the
mailbox, the checkpoint does not move) and the next run writes it again.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from azure.core.exceptions import AzureError
from azure.storage.blob import BlobBlock, ContainerClient, ContentSettings
from azure.storage.queue import QueueClient

from shared.errors import TransientError

UPLOAD_CONCURRENCY = 4  # block uploads in flight for one large message
RAW_CONTENT_TYPE = "message/rfc822"
# A streamed message goes up in blocks of BLOCK_BYTES, at most BLOCKS_IN_FLIGHT of them staged at once: its working
# set is about (BLOCKS_IN_FLIGHT + 1) x BLOCK_BYTES whatever its size (150 MB is 38 blocks, Azure allows 50,000).
# 4 MiB blocks keep the requests few (one round trip per 4 MiB). Six in flight let the socket reader run ahead of
# a storage endpoint that takes a block at a time unevenly: with three, the reader of a 25 MB message spent about half
# its time waiting for a staged block (benchmark 2), and the message took about a fifth longer to store.
BLOCK_BYTES = 4 * 1024 * 1024
BLOCKS_IN_FLIGHT = 6
STAGE_THREADS = 8  # block uploads in flight for all the streamed messages of a worker together


class RawWriter(Protocol):
    """One message's bytes written as they arrive. Nothing is visible under the name before ``commit``."""

    def write(self, chunk: bytes) -> None:
        """Append ``chunk``; may wait for earlier parts to be stored. Raises TransientError."""
        ...

    def commit(self) -> None:
        """Make the bytes written so far the content under the name, replacing what is there. Raises TransientError."""
        ...

    def abort(self) -> None:
        """Give up: nothing written is committed (what was under the name stays). Never raises."""
        ...


class RawStore(Protocol):
    """Keeps each message's exact bytes under a name derived from its identity (a retry overwrites the same)."""

    def url(self, name: str) -> str:
        """Where consumers read the bytes named ``name``."""
        ...

    def put(self, name: str, raw: bytes) -> None:
        """Store ``raw`` under ``name``, replacing what is there. Raises TransientError."""
        ...

    def open(self, name: str) -> RawWriter:
        """A writer for a message too large to hold whole: the same result as ``put`` once committed."""
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
        self._stage_pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def url(self, name: str) -> str:
        return str(self._container.get_blob_client(name).url)

    def put(self, name: str, raw: bytes) -> None:
        with _storage_errors(name):
            self._container.get_blob_client(name).upload_blob(
                raw,
                overwrite=True,
                content_settings=ContentSettings(content_type=RAW_CONTENT_TYPE),
                max_concurrency=UPLOAD_CONCURRENCY,
            )

    def open(self, name: str) -> RawWriter:
        with self._lock:  # the pool's threads start with the first large message, not at import or start-up
            if self._stage_pool is None:
                self._stage_pool = ThreadPoolExecutor(STAGE_THREADS, thread_name_prefix="stage")
        return BlockWriter(self._container.get_blob_client(name), self._stage_pool, name=name)


class BlockWriter:
    """Stages blocks of BLOCK_BYTES as the bytes come, at most BLOCKS_IN_FLIGHT at once, then commits the block list.

    Until the commit the blob's content is whatever it was (uncommitted blocks are invisible, and Azure discards
    them after a week), so a writer abandoned half-way never leaves a partial message under the name.
    """

    def __init__(
        self,
        blob: Any,
        pool: ThreadPoolExecutor,
        *,
        name: str,
        block_bytes: int = BLOCK_BYTES,
        in_flight: int = BLOCKS_IN_FLIGHT,
    ) -> None:
        self._blob = blob
        self._pool = pool
        self._name = name
        self._block_bytes = block_bytes
        self._in_flight = in_flight
        self._parts: list[bytes] = []  # the block being filled, as the chunks came (joined once, when full)
        self._filled = 0
        self._ids: list[str] = []
        self._staging: deque[Future[None]] = deque()

    def write(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            room = self._block_bytes - self._filled
            part, view = view[:room], view[room:]
            self._parts.append(bytes(part) if len(part) != len(chunk) else chunk)
            self._filled += len(part)
            if self._filled == self._block_bytes:
                self._stage()

    def _stage(self) -> None:
        data = b"".join(self._parts)
        self._parts, self._filled = [], 0
        while len(self._staging) >= self._in_flight:
            self._wait(self._staging.popleft())
        block_id = f"{len(self._ids):08d}"  # equal lengths, as Azure requires within one blob
        self._ids.append(block_id)
        self._staging.append(self._pool.submit(self._blob.stage_block, block_id, data))

    def _wait(self, staged: Future[None]) -> None:
        with _storage_errors(self._name):
            staged.result()

    def commit(self) -> None:
        if self._filled:
            self._stage()
        while self._staging:
            self._wait(self._staging.popleft())
        with _storage_errors(self._name):
            self._blob.commit_block_list(
                [BlobBlock(block_id) for block_id in self._ids],
                content_settings=ContentSettings(content_type=RAW_CONTENT_TYPE),
            )

    def abort(self) -> None:
        self._parts, self._filled = [], 0
        for staged in self._staging:
            staged.cancel()
        for staged in self._staging:
            with contextlib.suppress(Exception):
                staged.result()  # a block still uploading finishes first: the writer's memory is free on return
        self._staging.clear()


class StorageQueueEnvelopes:
    """Envelopes on an Azure Storage queue (the client base64-encodes them, as the Functions trigger expects)."""

    def __init__(self, queue: QueueClient) -> None:
        self._queue = queue

    def send(self, text: str) -> None:
        with _storage_errors(f"an envelope on {self._queue.queue_name}"):
            self._queue.send_message(text)
