"""A re-consent link is named in logs and audit lines by a digest of its nonce, never by any part of the nonce."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError

from collectors.operations import RECONSENT_PURPOSE, Operations
from shared.registry import Mailbox, MailboxRegistry
from shared.signed_links import LINK_ID_CHARS, LinkSigner, Signed
from tests.support.fakes import FakeTable

ADDRESS = "owner@contoso.example"


class _Secret:
    def __init__(self, value: str) -> None:
        self.value = value


class _Secrets:
    """The two SecretClient calls the signer makes for its key."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def get_secret(self, name: str) -> _Secret:
        if name not in self.values:
            raise ResourceNotFoundError("secret not found")
        return _Secret(self.values[name])

    def set_secret(self, name: str, value: str, **kwargs: Any) -> None:
        self.values[name] = value


class _UsedLinks(FakeTable):
    def create_entity(self, entity: dict[str, Any]) -> None:
        if (entity["PartitionKey"], entity["RowKey"]) in self.rows:
            raise ResourceExistsError("entity exists")
        self.upsert_entity(entity)

    def query_entities(self, query: str, **kwargs: Any) -> list[dict[str, Any]]:
        return []


class _Consent:
    def __init__(self) -> None:
        self.started: list[dict[str, Any]] = []

    def start(self, address: str, **kwargs: Any) -> str:
        self.started.append({"address": address, **kwargs})
        return "https://login.example/authorize"


def _substrings(secret: str, size: int) -> set[str]:
    return {secret[i : i + size] for i in range(len(secret) - size + 1)}


def test_the_link_s_log_and_audit_lines_hold_no_part_of_its_nonce(caplog: pytest.LogCaptureFixture) -> None:
    registry = MailboxRegistry(FakeTable())  # type: ignore[arg-type]
    registry.put(Mailbox(ADDRESS))
    signer = LinkSigner(_Secrets(), _UsedLinks())  # type: ignore[arg-type]
    consent = _Consent()
    operations = Operations(registry=registry, tokens=None, consent=consent, signer=signer)  # type: ignore[arg-type]

    with caplog.at_level(logging.DEBUG):
        link = operations.reconsent_link(ADDRESS, admin="admin@contoso.example")
        signed = signer.check(link.value, RECONSENT_PURPOSE)
        operations.open_reconsent_link(link.value, redirect_uri="https://app.example/api/auth/callback")

    written = [record.getMessage() for record in caplog.records] + [str(call) for call in consent.started]
    assert len(written) >= 3, written  # the audit line, the opened line and the consent start
    assert sum(signed.link_id in line for line in written) >= 3, written
    leaked = [(part, line) for part in _substrings(signed.nonce, 6) for line in written if part in line]
    assert not leaked, leaked


def test_the_link_id_is_a_digest_and_not_a_part_of_the_nonce() -> None:
    nonce = "n" * 8 + "0123456789abcdef"
    first = Signed(RECONSENT_PURPOSE, ADDRESS, "delegated", nonce, expires_at=None)  # type: ignore[arg-type]
    other = Signed(RECONSENT_PURPOSE, ADDRESS, "delegated", nonce[:-1] + "x", expires_at=None)  # type: ignore[arg-type]
    assert len(first.link_id) == LINK_ID_CHARS and int(first.link_id, 16) >= 0
    assert first.link_id != other.link_id  # tells links apart
    assert not _substrings(nonce, 6) & _substrings(first.link_id, 6)
