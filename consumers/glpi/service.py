"""The ticket consumer built from the settings, once per process (the function app and the command line)."""

from __future__ import annotations

import functools

from azure.core.exceptions import AzureError, ResourceNotFoundError

from consumers.glpi.client import GlpiClient
from consumers.glpi.handler import BadEnvelope, TicketConsumer
from consumers.glpi.options import parse_options
from consumers.glpi.state import StateStore
from shared import azure_clients
from shared.errors import ConfigurationError, TransientError
from shared.settings import Settings, get_settings

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

    def read_blob(container: str | None, name: str) -> bytes:
        blob = azure_clients.blob_service(settings).get_blob_client(container or settings.mail_container, name)
        try:
            data: bytes = blob.download_blob().readall()
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
