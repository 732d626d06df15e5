"""The app's long-lived objects, built once per worker from the settings and shared by every invocation.

Sharing matters: the token service keeps each mailbox's token cache warm, so a run in which no token expires
does not touch Key Vault at all.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from azure.storage.queue import QueueClient

from collectors.app_mailboxes import AppMailboxes
from collectors.app_tokens import AppTokenProvider
from collectors.collect import Collector, Sinks
from collectors.consent import ConsentService
from collectors.credential_check import CredentialExpiryCheck
from collectors.tokens import TokenService
from shared import azure_clients
from shared.registry import MailboxRegistry
from shared.settings import Settings, get_settings
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

    def work_queue(self) -> QueueClient:
        return azure_clients.queue(self.settings, self.settings.work_queue)


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
        sinks=Sinks(
            container=azure_clients.container(settings, settings.mail_container),
            queue=azure_clients.queue(settings, settings.mail_queue),
        ),
        leases=azure_clients.container(settings, settings.lease_container),
        app_tokens=app_tokens,
    )
    credential_check = CredentialExpiryCheck(azure_clients.secret_client(settings), settings.client_secret_name)
    app_mailboxes = AppMailboxes(settings, registry=registry, tokens=app_tokens)
    return Services(settings, registry, tokens, consent, collector, credential_check, app_tokens, app_mailboxes)


@functools.cache
def get_services() -> Services:
    """The worker's services, built on first use (never at import: importing the app stays cheap and offline)."""
    return build_services(get_settings())
