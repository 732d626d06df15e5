"""The app's long-lived objects, built once per worker from the settings and shared by every invocation.

Sharing matters: the token service keeps each mailbox's token cache warm, so a run in which no token expires
does not touch Key Vault at all.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from azure.storage.blob import ContainerClient
from azure.storage.queue import QueueClient

from collectors.app_mailboxes import AppMailboxes
from collectors.app_tokens import AppTokenProvider
from collectors.collect import Collector, Sinks
from collectors.consent import ConsentService
from collectors.credential_check import CredentialExpiryCheck
from collectors.mail_source import ImapSource
from collectors.operations import Operations
from collectors.sinks import BlobRawStore, StorageQueueEnvelopes
from collectors.tokens import TokenService
from shared import azure_clients
from shared.lease import BlobLeases
from shared.registry import MailboxRegistry
from shared.settings import Settings, get_settings
from shared.signed_links import LinkSigner
from shared.token_store import TokenCacheStore


@dataclass(frozen=True)
class Services:
    settings: Settings
    registry: MailboxRegistry
    tokens: TokenService
    consent: ConsentService
    collector: Collector
    credential_check: CredentialExpiryCheck
    app_tokens: AppTokenProvider
    app_mailboxes: AppMailboxes
    signer: LinkSigner
    operations: Operations

    def work_queue(self) -> QueueClient:
        return azure_clients.queue(self.settings, self.settings.work_queue)

    def mail_queue(self, name: str = "") -> QueueClient:
        """The envelope queue, or another queue of the account (a replay for a new consumer)."""
        return azure_clients.queue(self.settings, name or self.settings.mail_queue)

    def mail_container(self) -> ContainerClient:
        return azure_clients.container(self.settings, self.settings.mail_container)


def build_services(settings: Settings) -> Services:
    """Wire the services for ``settings``. Creates missing queues, containers and tables on first use."""
    registry = MailboxRegistry(azure_clients.table(settings, settings.mailbox_table))
    store = TokenCacheStore(azure_clients.secret_client(settings))
    tokens = TokenService(settings, store)
    app_tokens = AppTokenProvider(settings)  # one per worker: its per-tenant app tokens serve every app-mode mailbox
    consent = ConsentService(
        settings,
        flows=azure_clients.table(settings, settings.consent_table),
        registry=registry,
        store=store,
        tokens=tokens,
    )
    collector = Collector(
        settings,
        registry=registry,
        tokens=tokens,
        source=ImapSource(settings),
        sinks=Sinks(
            raw=BlobRawStore(azure_clients.container(settings, settings.mail_container)),
            envelopes=StorageQueueEnvelopes(azure_clients.queue(settings, settings.mail_queue)),
        ),
        leases=BlobLeases(azure_clients.container(settings, settings.lease_container)),
        app_tokens=app_tokens,
    )
    credential_check = CredentialExpiryCheck(azure_clients.secret_client(settings), settings.client_secret_name)
    app_mailboxes = AppMailboxes(settings, registry=registry, tokens=app_tokens)
    # Used links are kept beside the consent flows, in their own partition.
    signer = LinkSigner(azure_clients.secret_client(settings), azure_clients.table(settings, settings.consent_table))
    operations = Operations(registry=registry, tokens=tokens, consent=consent, signer=signer)
    return Services(
        settings, registry, tokens, consent, collector, credential_check, app_tokens, app_mailboxes, signer, operations
    )


@functools.cache
def get_services() -> Services:
    """The worker's services, built on first use (never at import: importing the app stays cheap and offline)."""
    return build_services(get_settings())
