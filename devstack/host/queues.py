"""Queue triggers: a poller per queue with the Functions host's base64 decoding, retries and poison queue."""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import threading
import uuid
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from azure.core.exceptions import AzureError, HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.functions.queue import QueueMessage as TriggerQueueMessage
from azure.storage.queue import QueueServiceClient

from devstack.host.errors import HostError
from devstack.host.indexing import FunctionEntry
from devstack.host.invocation import log_invocation

if TYPE_CHECKING:
    from devstack.host.local_host import LocalHost

logger = logging.getLogger(__name__)

QUEUE_PROCESSING_VISIBILITY_SECONDS = 600  # Azure hides a message for 10 minutes while a function holds it
# A local-only app setting that shortens those 10 minutes, so that a test can watch a killed host's messages come
# back to another host. Azure has no such setting.
VISIBILITY_SETTING = "LOCAL_QUEUE_PROCESSING_VISIBILITY_SECONDS"
MIN_POLLING_INTERVAL_SECONDS = 0.1
QUEUE_ERROR_BACKOFF_SECONDS = 2.0  # storage unreachable (e.g. Azurite not up yet): retry without spinning
# The poller retries on its own schedule; the SDK's default chain (15 s backoff, growing) would only delay a stop.
QUEUE_CLIENT_OPTIONS: dict[str, Any] = {
    "retry_total": 2,
    "initial_backoff": 0.2,  # seconds
    "increment_base": 1,  # seconds added from the second retry on
    "connection_timeout": 5,  # seconds
    "read_timeout": 30,  # seconds
}
POISON_QUEUE_SUFFIX = "-poison"


class QueueRunner(threading.Thread):
    """Polls one queue like the Functions queue trigger: a batch at a time, and the next batch as soon as no more than
    ``newBatchThreshold`` messages are still being processed (so up to ``batchSize + newBatchThreshold`` at once, and
    a slow message never holds back the others); delete on success, the message back on the queue on failure, and
    the poison queue once it has been dequeued ``maxDequeueCount`` times.
    """

    def __init__(self, host: LocalHost, entry: FunctionEntry, connection_string: str, queue_name: str) -> None:
        super().__init__(name=f"queue-{entry.name}", daemon=True)
        self._host = host
        self._entry = entry
        self._connection_string = connection_string
        self.queue_name = queue_name
        self._options = host.options
        self._queue: Any = None
        self._poison: Any = None
        self.processing_visibility = processing_visibility(os.environ)

    def _connect(self) -> None:
        # No encode/decode policy: the raw text is decoded here and moved to the poison queue unchanged.
        service = QueueServiceClient.from_connection_string(self._connection_string, **QUEUE_CLIENT_OPTIONS)
        queue = service.get_queue_client(self.queue_name)
        with contextlib.suppress(ResourceExistsError):
            queue.create_queue()
        self._poison = service.get_queue_client(self.queue_name + POISON_QUEUE_SUFFIX)
        self._queue = queue

    def run(self) -> None:
        stopping = self._host.stopping
        interval = MIN_POLLING_INTERVAL_SECONDS
        failing = False
        ceiling = max(self._options.max_polling_interval.total_seconds(), MIN_POLLING_INTERVAL_SECONDS)
        batch, threshold = self._options.batch_size, self._options.new_batch_threshold
        running: set[Future[None]] = set()
        with ThreadPoolExecutor(batch + threshold, thread_name_prefix=f"queue-{self._entry.name}") as pool:
            while not stopping.is_set():
                if len(running) > threshold:
                    done, _ = wait_futures(running, timeout=1.0, return_when=FIRST_COMPLETED)
                    running -= done
                    continue
                try:
                    if self._queue is None:
                        self._connect()
                    messages = list(
                        self._queue.receive_messages(
                            messages_per_page=batch,
                            max_messages=batch,
                            visibility_timeout=self.processing_visibility,
                        )
                    )
                except AzureError as error:
                    # Once per outage, not every few seconds while storage stays away.
                    logger.log(
                        logging.DEBUG if failing else logging.WARNING,
                        "queue poll failed function=%s queue=%s error=%s",
                        self._entry.name,
                        self.queue_name,
                        type(error).__name__,
                    )
                    failing = True
                    stopping.wait(QUEUE_ERROR_BACKOFF_SECONDS)
                    continue
                if failing:
                    logger.info("queue poll recovered function=%s queue=%s", self._entry.name, self.queue_name)
                    failing = False
                if not messages:
                    stopping.wait(interval)
                    interval = min(interval * 2, ceiling)
                    continue
                interval = MIN_POLLING_INTERVAL_SECONDS
                running |= {pool.submit(self._process_safely, message) for message in messages}
                running = {f for f in running if not f.done()}
            wait_futures(running)

    def _process_safely(self, message: Any) -> None:
        try:
            self._process(message)
        except Exception as error:
            # Storage failed while settling or poisoning: the message reappears after its visibility timeout.
            logger.warning(
                "queue message not settled function=%s message_id=%s error=%s",
                self._entry.name,
                message.id,
                type(error).__name__,
            )

    def _decode(self, content: Any) -> bytes:
        text = content if isinstance(content, str) else bytes(content).decode("utf-8")
        if self._options.message_encoding == "none":
            return text.encode("utf-8")
        return base64.b64decode(text, validate=True)

    def _process(self, message: Any) -> None:
        entry = self._entry
        dequeue_count = int(message.dequeue_count or 1)
        if dequeue_count > self._options.max_dequeue_count:
            self._move_to_poison(message, reason="max_dequeue_count")
            return
        try:
            body = self._decode(message.content)
        except (binascii.Error, ValueError):
            self._move_to_poison(message, reason="not_base64")
            return
        queue_message = TriggerQueueMessage(  # type: ignore[no-untyped-call]
            id=message.id,
            body=body,
            dequeue_count=dequeue_count,
            expiration_time=message.expires_on,
            insertion_time=message.inserted_on,
            time_next_visible=message.next_visible_on,
            pop_receipt=message.pop_receipt,
        )
        invocation = self._host.invoker.call(entry, queue_message)
        try:
            if invocation.error is None:
                self._queue.delete_message(message.id, message.pop_receipt)
                status = "deleted"
            elif dequeue_count >= self._options.max_dequeue_count:
                self._move_to_poison(message, reason="max_dequeue_count")
                status = "poisoned"
            else:
                status = self._release(message)
        except Exception as error:
            # The message comes back after its visibility timeout; the function must tolerate the repeat.
            logger.warning(
                "queue settle failed function=%s message_id=%s error=%s", entry.name, message.id, type(error).__name__
            )
            status = "unsettled"
        log_invocation(entry, invocation, status=status, error=invocation.error)

    def _release(self, message: Any) -> str:
        """Back on the queue after host.json's visibilityTimeout. A function that set the message's visibility
        itself changed its pop receipt: like the queue extension (QueueProcessor.ReleaseMessageAsync), the host
        then leaves the message as it is, and does the same when the message is gone."""
        try:
            self._queue.update_message(
                message.id,
                pop_receipt=message.pop_receipt,
                visibility_timeout=int(self._options.retry_visibility.total_seconds()),
            )
        except ResourceNotFoundError:
            return "retry-gone"
        except HttpResponseError as e:
            if e.status_code == 400 and getattr(e, "error_code", None) == "PopReceiptMismatch":
                return "retry-set-by-function"
            raise
        return "retry"

    def _move_to_poison(self, message: Any, *, reason: str) -> None:
        with contextlib.suppress(ResourceExistsError):
            self._poison.create_queue()
        self._poison.send_message(message.content)
        self._queue.delete_message(message.id, message.pop_receipt)
        logger.warning(
            "queue message poisoned function=%s queue=%s message_id=%s dequeue_count=%s reason=%s",
            self._entry.name,
            self.queue_name,
            message.id,
            message.dequeue_count,
            reason,
        )


def processing_visibility(environ: Mapping[str, str]) -> int:
    """Seconds a received message stays hidden while its function runs: Azure's 10 minutes unless the local setting
    says otherwise. Raises HostError for a value that is not a whole number of seconds from 1 to 600."""
    text = environ.get(VISIBILITY_SETTING, "").strip()
    if not text:
        return QUEUE_PROCESSING_VISIBILITY_SECONDS
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= QUEUE_PROCESSING_VISIBILITY_SECONDS:
        raise HostError(
            f"{VISIBILITY_SETTING} must be a whole number of seconds from 1 to {QUEUE_PROCESSING_VISIBILITY_SECONDS}"
            " (or absent, for Azure's 10 minutes)"
        )
    return int(text)


def on_demand_message(text: str) -> TriggerQueueMessage:
    """The ``QueueMessage`` a queue function gets when it is fired on demand with ``text`` as the body."""
    now = datetime.now(UTC)
    return TriggerQueueMessage(  # type: ignore[no-untyped-call]
        id=str(uuid.uuid4()),
        body=text.encode("utf-8"),
        dequeue_count=1,
        insertion_time=now,
        expiration_time=now + timedelta(days=7),  # the Storage default time to live
        time_next_visible=now,
        pop_receipt=None,
    )
