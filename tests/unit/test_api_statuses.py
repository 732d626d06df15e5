"""The HTTP layer's one mapping from domain errors to statuses: every consent failure kind has its status, and
storage or configuration failures never come out as a 200 or a client error."""

from __future__ import annotations

import pytest

from api.statuses import CONSENT_STATUS, consent_failure, service_failure
from collectors.consent import ConsentFailure, ConsentProblem
from shared.errors import ConfigurationError, TransientError


def test_every_consent_failure_kind_has_a_status() -> None:
    assert len(ConsentFailure) == 3
    assert set(CONSENT_STATUS) == set(ConsentFailure)


@pytest.mark.parametrize(
    ("kind", "status"),
    [(ConsentFailure.INVALID, 400), (ConsentFailure.REFUSED, 403), (ConsentFailure.PROVIDER, 502)],
)
def test_a_consent_problem_becomes_its_page(kind: ConsentFailure, status: int) -> None:
    answer = consent_failure(ConsentProblem(kind, "A <title>", "Some detail.", "Do this next."))
    assert answer.status_code == status
    page = answer.get_body().decode()
    assert "A &lt;title&gt;" in page and "Some detail." in page and "Do this next." in page
    assert answer.headers["Content-Security-Policy"].startswith("default-src 'none'")


def test_service_and_configuration_failures_are_server_side() -> None:
    assert consent_failure(TransientError("Table storage down")).status_code == 503
    assert consent_failure(ConfigurationError("ENTRA_CLIENT_ID is not set")).status_code == 500
    assert consent_failure(RuntimeError("a defect")).status_code == 500
    answer = service_failure(TransientError("Key Vault down"))
    assert answer.status_code == 503
    assert answer.mimetype == "application/json"
