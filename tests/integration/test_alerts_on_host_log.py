"""The deployed alerts fire on what a real run logs: the timer runs in the local host, which drops what Azure's
host drops (records from the app's own threads that do not carry the invocation id), and the queries of
infra/app/alerts.bicep run over the host's log as Application Insights would run them over ``traces``."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from shared import azure_clients
from tests.support import kql
from tests.support.app_host import LocalApp, serve_app
from tests.support.faults import expire_access_tokens

pytestmark = pytest.mark.integration

ALERTS = Path(__file__).resolve().parents[2] / "infra" / "app" / "alerts.bicep"
THRESHOLD = 3  # consecutiveFailureThreshold's default


@pytest.fixture
def app_env(app_env: dict[str, str]) -> dict[str, str]:
    """Secret mode with the secret's expiry date in Key Vault, so that the credential check logs its line."""
    from shared.settings import load_settings

    name = f"entra-client-secret-{uuid.uuid4().hex[:8]}"
    client = azure_clients.secret_client(load_settings(app_env))
    client.set_secret(name, app_env["ENTRA_CLIENT_SECRET"], expires_on=datetime.now(UTC) + timedelta(days=12, hours=1))
    return {**app_env, "ENTRA_CLIENT_SECRET_NAME": name}


@pytest.fixture
def host(app_env: dict[str, str], tmp_path: Path) -> Iterator[LocalApp]:
    with serve_app(app_env, tmp_path / "host") as app:
        yield app


def fire_timer(app: LocalApp) -> None:
    """Fire collect_mail through the admin endpoint and wait for its invocation line."""
    before = app.log.read_text().count("invocation function=collect_mail")
    http = requests.Session()
    http.trust_env = False
    response = http.post(
        f"{app.origin}/admin/functions/collect_mail", json={}, headers={"x-functions-key": app.master_key}, timeout=10
    )
    assert response.status_code == 202, response.text
    deadline = time.monotonic() + 120
    while app.log.read_text().count("invocation function=collect_mail") == before:
        assert time.monotonic() < deadline, "the timer run did not finish"
        time.sleep(0.2)


def test_each_alert_finds_its_mailbox_in_the_log_of_a_real_run(
    host: LocalApp, services: Any, consent: Any, new_address: Any, entra_control: Any
) -> None:
    revoked, failing, stale = new_address(), new_address(), new_address()
    consent(revoked)
    for address in (failing, stale):  # then a folder the server does not have: mailbox_access at every run
        consent(address)
        services.consent.change_options(address, {"folder": "Missing"}, admin="test")
    row = services.registry.get(stale)  # consented seven hours ago and never collected since
    services.registry.put(dataclasses.replace(row, consented_at=row.consented_at - timedelta(hours=7)))
    expire_access_tokens(services, revoked)
    entra_control("revoke", {"account": revoked, "aadsts": 50173})

    for _ in range(THRESHOLD):
        fire_timer(host)

    queries = kql.alert_queries(ALERTS)
    traces = kql.traces_from_log(host.log.read_text())
    reconsent = kql.run(queries["reconsentQuery"], traces)
    failures = kql.run(queries["failuresQuery"], traces)
    credential = kql.run(queries["credentialQuery"], traces)

    assert revoked in {r["mailbox"] for r in reconsent}, "the re-consent alert would never fire"
    worst = max((r["consecutive_failures"] for r in failures if r["mailbox"] == failing), default=None)
    assert worst is not None and worst >= THRESHOLD, f"the failing-mailbox alert sees {worst}"
    assert [r["credential_expires_in_days"] for r in credential] == [12]

    # The alerts that cannot go quiet: the runs themselves, the daily line of a mailbox still needing re-consent
    # (the collect line said it once; later runs no longer try the mailbox), a mailbox not collected for hours.
    runs = kql.run(queries["heartbeatQuery"], traces)
    assert len(runs) == THRESHOLD and {r["run_mode"] for r in runs} == {"in_process"}
    daily = [t for t in traces if t["message"].startswith(f"mailbox still needs re-consent mailbox={revoked} ")]
    assert len(daily) == 1, "one daily line, not one per run"
    assert kql.run(queries["reconsentQuery"], daily) == [{"timestamp": daily[0]["timestamp"], "mailbox": revoked}]
    not_collected = kql.run(queries["notCollectedQuery"], traces)
    assert {r["hours_since_success"] for r in not_collected if r["mailbox"] == stale} == {7}
    assert failing not in {r["mailbox"] for r in not_collected}  # failing, but for minutes only
