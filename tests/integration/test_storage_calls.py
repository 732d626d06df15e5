"""Storage calls per empty mailbox, counted on the wire against Azurite: at 2,000 mailboxes every call on the empty
path is 2,000 calls a run, and each one a round trip to the storage account.

An empty run from the timer's listing costs the lease and its release, and no registry call while its last success
recorded is recent; a work item's run reads its row once under the lease and writes once (the success, which ends
the item). These counts may shrink; a change that makes them grow fails here. A merge whose connection drops before
the answer is retried by the SDK (it writes the same values again), so a kept-alive connection closed by the
service costs a retry, not a failed run.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import pytest
from azure.core.exceptions import ServiceResponseError
from azure.core.pipeline.transport import RequestsTransport

from collectors.collect import SUCCESS_RECORD_EVERY
from collectors.scheduled import run_scheduled
from collectors.services import build_services
from shared.registry import Mailbox, MailboxStatus, utcnow
from shared.settings import load_settings

pytestmark = pytest.mark.integration


class Calls:
    """Requests sent to each storage service (by the port of its endpoint), and which."""

    def __init__(self, ports: dict[int, str]) -> None:
        self._ports = ports
        self._lock = threading.Lock()
        self.sent: list[tuple[str, str, str]] = []

    def record(self, method: str, url: str) -> None:
        parts = urlsplit(url)
        service = self._ports.get(parts.port or 0, "other")
        with self._lock:
            self.sent.append((service, method, parts.path))

    def by_service(self) -> Counter[str]:
        return Counter(service for service, _, _ in self.sent)


@pytest.fixture
def calls(services: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Calls]:
    storage = services.settings.storage.connection_string
    ports = {}
    for part in storage.split(";"):
        name, _, value = part.partition("=")
        if name.endswith("Endpoint") and value:
            ports[urlsplit(value).port or 0] = name.removesuffix("Endpoint").lower()
    counter = Calls(ports)
    send = RequestsTransport.send

    def counted(transport: Any, request: Any, **kwargs: Any) -> Any:
        counter.record(request.method, request.url)
        return send(transport, request, **kwargs)

    monkeypatch.setattr(RequestsTransport, "send", counted)
    yield counter


def _empty_mailbox(services: Any, consent: Any, new_address: Any) -> str:
    address = new_address()
    consent(address)
    # The first run: the lease blob is created, the token read from Key Vault and kept, the first success written.
    (first,) = services.collector.run(services.collector.due_mailboxes())
    assert first.outcome == "ok" and first.messages == 0
    return address


def test_an_empty_run_from_the_listing_costs_the_lease_only(
    services: Any, consent: Any, new_address: Any, calls: Calls
) -> None:
    _empty_mailbox(services, consent, new_address)
    listed = services.collector.due_mailboxes()
    calls.sent.clear()

    (result,) = services.collector.run(listed)

    assert result.outcome == "ok"
    assert calls.by_service() == {"blob": 2}, calls.sent  # lease acquire and release


def test_an_empty_run_writes_its_success_once_the_last_one_recorded_is_old(
    services: Any, consent: Any, new_address: Any, calls: Calls
) -> None:
    address = _empty_mailbox(services, consent, new_address)
    old = utcnow() - SUCCESS_RECORD_EVERY - timedelta(seconds=1)
    services.registry._merge(address, last_success_at=old)
    listed = services.collector.due_mailboxes()
    calls.sent.clear()

    services.collector.run(listed)

    assert calls.by_service() == {"blob": 2, "table": 1}, calls.sent
    assert services.registry.get(address).last_success_at > old


def test_an_empty_work_item_reads_its_row_under_the_lease_and_writes_once(
    services: Any, consent: Any, new_address: Any, calls: Calls
) -> None:
    address = _empty_mailbox(services, consent, new_address)
    row = services.registry.get(address)
    assert row.status is MailboxStatus.ACTIVE
    item = json.dumps({"mailbox": address, "enqueued_at": utcnow().isoformat()})
    calls.sent.clear()

    result = services.collector.collect_work_item(item)

    assert result is not None and result.outcome == "ok"
    methods = sorted(method for service, method, _ in calls.sent if service == "table")
    assert calls.by_service() == {"blob": 2, "table": 2}, calls.sent
    assert methods == ["GET", "PATCH"] or methods == ["GET", "MERGE"], calls.sent


@pytest.mark.parametrize("method", ["PATCH", "POST"])
def test_a_registry_merge_whose_connection_drops_before_the_answer_is_retried(
    services: Any, new_address: Any, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    address = new_address()
    services.registry.put(Mailbox(address))
    dropped: list[str] = []
    send = RequestsTransport.send

    def drops_once(transport: Any, request: Any, **kwargs: Any) -> Any:
        if request.method in (method, "MERGE" if method == "PATCH" else method) and not dropped:
            dropped.append(request.method)
            raise ServiceResponseError("the connection closed before the answer (a test)")
        return send(transport, request, **kwargs)

    monkeypatch.setattr(RequestsTransport, "send", drops_once)
    if method == "PATCH":
        services.registry.record_oversize(address, "a note")
    else:
        services.registry.record_work_items([(address, "item", utcnow() + timedelta(minutes=10))])

    assert dropped, "no merge was sent"
    row = services.registry.get(address)
    assert row.last_oversize == "a note" if method == "PATCH" else row.work_item == "item"


def test_the_timer_s_fan_out_lists_once_and_notes_a_hundred_items_per_call(
    app_env: dict[str, str], services: Any, calls: Calls
) -> None:
    narrow = build_services(load_settings({**app_env, "COLLECT_MAX_CONCURRENCY": "1"}))  # fans out above 4
    addresses = [f"fan-{i:03d}@example.test" for i in range(150)]
    for address in addresses:
        services.registry.put(Mailbox(address))
    table = services.settings.mailbox_table
    calls.sent.clear()

    run_scheduled(narrow, past_due=False)

    registry = Counter(
        method for service, method, path in calls.sent if service == "table" and (table in path or "$batch" in path)
    )
    sends = [path for service, method, path in calls.sent if service == "queue" and method == "POST"]
    # One listing serves the plan and the reports; 150 items noted in two transactions, not 150 writes.
    assert registry == {"GET": 1, "POST": 2}, calls.sent
    assert len(sends) == len(addresses)
    assert all(m.work_item for m in services.registry.list())
