from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from collectors.credential_check import CredentialExpiryCheck
from shared import azure_clients

pytestmark = pytest.mark.integration


def test_days_left_are_logged_once_a_day_and_warn_when_close(settings: Any, caplog: pytest.LogCaptureFixture) -> None:
    client = azure_clients.secret_client(settings)
    name = f"entra-client-secret-{uuid.uuid4().hex[:8]}"
    client.set_secret(name, "not-a-real-secret", expires_on=datetime.now(UTC) + timedelta(days=10, hours=1))
    now = [0.0]
    check = CredentialExpiryCheck(client, name, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="collectors.credential_check")

    assert check.run() == 10
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "credential_expires_in_days=10" in caplog.records[0].getMessage()
    assert "not-a-real-secret" not in caplog.text
    now[0] += 3600
    assert check.run() is None  # checked already today
    now[0] += 24 * 3600
    assert check.run() == 10  # a day later (by its clock) it reads the expiry again


def test_a_secret_without_an_expiry_gets_a_warning(settings: Any, caplog: pytest.LogCaptureFixture) -> None:
    client = azure_clients.secret_client(settings)
    name = f"entra-client-secret-{uuid.uuid4().hex[:8]}"
    client.set_secret(name, "value")
    assert CredentialExpiryCheck(client, name).run() is None
    assert "no expiry date" in caplog.text


def test_nothing_to_check_with_the_federated_credential(settings: Any) -> None:
    assert CredentialExpiryCheck(azure_clients.secret_client(settings), None).run() is None
