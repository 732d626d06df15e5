"""The ticket consumer built from the settings, once per process (the function app and the command line)."""

from __future__ import annotations

import functools
import logging
from datetime import datetime
from typing import Any

from azure.core.exceptions import AzureError, ResourceNotFoundError

from consumers.glpi import retries
from consumers.glpi.client import GlpiClient
from consumers.glpi.handler import BadEnvelope, Outcome, TicketConsumer
from consumers.glpi.options import parse_options
from consumers.glpi.state import StateStore
from shared import azure_clients
from shared.errors import ConfigurationError, TransientError
from shared.settings import Settings, get_settings

logger = logging.getLogger(__name__)

MAX_DEQUEUE_COUNT = 5  # host.json extensions.queues.maxDequeueCount: the last attempt records its reason


def build_consumer(settings: Settings) -> TicketConsumer:
    """A consumer for these settings. Raises ConfigurationError when GLPI is not configured."""
    glpi = settings.glpi
    if glpi is None:
        raise ConfigurationError(
            "the GLPI consumer runs but GLPI_URL is not set",
            remedy="set GLPI_URL, GLPI_APP_TOKEN and GLPI_USER_TOKEN, or set AzureWebJobs.glpi_tickets.Disabled=true",
        )
    options = parse_options(glpi.mailbox_options)
    client = GlpiClient(glpi.url, user_token=glpi.user_token, app_token=glpi.app_token, ca_bundle=settings.ca_bundle)
    state = StateStore(azure_clients.table(settings, glpi.state_table))

    def read_blob(container: str | None, name: str, limit: int) -> bytes:
        """The blob's first ``limit`` + 1 bytes at most: one byte more than allowed tells a larger blob."""
        blob = azure_clients.blob_service(settings).get_blob_client(container or settings.mail_container, name)
        try:
            data: bytes = blob.download_blob(offset=0, length=limit + 1).readall()
        except ResourceNotFoundError:
            raise BadEnvelope(f"the envelope's blob {name[:200]} does not exist") from None
        except AzureError as e:
            raise TransientError(f"reading the mail blob failed: {type(e).__name__}") from e
        return data

    return TicketConsumer(client, state, options, read_blob)


@functools.cache
def get_consumer() -> TicketConsumer:
    """The process-wide consumer: one GLPI session and one connection pool for every invocation."""
    return build_consumer(get_settings())


def handle_queue_message(
    consumer: TicketConsumer,
    queue: Any,
    text: str,
    *,
    message_id: str,
    pop_receipt: str | None,
    dequeue_count: int,
    expires_on: datetime | None,
) -> Outcome:
    """One delivery of a mail-queue message, as the queue trigger hands it over. When GLPI, storage or the
    configuration fails and attempts are left, the message is first hidden for its growing retry delay
    (consumers/glpi/retries.py); the error is raised either way, so the host counts the attempt."""
    try:
        return consumer.handle(text, dequeue_count=dequeue_count, max_dequeue_count=MAX_DEQUEUE_COUNT)
    except (TransientError, ConfigurationError) as e:
        if dequeue_count < MAX_DEQUEUE_COUNT and pop_receipt:
            seconds = retries.defer(
                queue,
                message_id,
                pop_receipt,
                dequeue_count=dequeue_count,
                expires_on=expires_on,
                retry_after=getattr(e, "retry_after", None),
            )
            if seconds is not None:
                logger.warning(
                    "glpi message deferred message_id=%s attempt=%d seconds=%d", message_id, dequeue_count, seconds
                )
        raise


@functools.cache
def get_mail_queue() -> Any:
    """The mail queue, for setting a failed message's retry delay."""
    settings = get_settings()
    return azure_clients.queue(settings, settings.mail_queue)
