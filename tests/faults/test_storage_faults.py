"""Storage faults: Azurite stopped before, during and after a run (a private instance, restarted with its data), a
blob write failing while the queue works and the reverse, and the lease of a run that crashed.

The rule under test: a message leaves the mailbox only after its blob and its envelope are written, so a storage
failure costs a retry, never a message; and a failing storage call gives up within seconds, not minutes, so that a
run stays inside its time budget.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import BlobClient, ContainerClient
from azure.storage.queue import QueueClient

import shared.lease
from devstack import dovecot
from shared import azure_clients
from shared.errors import TransientError
from shared.registry import MailboxRegistry
from shared.settings import StorageSettings
from tests.conftest import simple_message
from tests.support.azurite import Azurite
from tests.support.faults import LEDGER, check_delivery, collect
from tests.support.net import free_port
from tests.support.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.faults]

# A run against dead storage must give up quickly: retries are for blips, the next run is for outages.
GIVE_UP_SECONDS = 45


def mailbox_with_mail(consent: Any, deliver: Any, address: str, count: int, **options: str) -> list[bytes]:
    consent(address, **options)
    sent = [simple_message(f"{address} #{i}", f"body {i}") for i in range(count)]
    for raw in sent:
        deliver(address, raw)
    return sent


def inbox(stack: Stack, address: str, folder: str = "INBOX") -> list[int]:
    config = Path(stack.dovecot_config)
    if folder not in dovecot.list_folders(config, address):
        return []
    return dovecot.list_uids(config, address, folder)


def after_checkpoint(monkeypatch: pytest.MonkeyPatch, action: Callable[[], None], *, nth: int = 1) -> list[int]:
    """Run ``action`` right after the ``nth`` checkpoint a collection writes (in the collecting thread)."""
    real_record = MailboxRegistry.record_checkpoint
    checkpoints: list[int] = []

    def record_checkpoint(self: MailboxRegistry, address: str, checkpoint: Mapping[str, int | str], **kw: Any) -> None:
        real_record(self, address, checkpoint, **kw)
        checkpoints.append(int(checkpoint["last_uid"]))
        if len(checkpoints) == nth:
            action()

    monkeypatch.setattr(MailboxRegistry, "record_checkpoint", record_checkpoint)
    return checkpoints


# ------------------------------------------------------------------------------------ Azurite stopped and restarted


@pytest.fixture
def azurite(tmp_path: Path) -> Iterator[Azurite]:
    with Azurite(tmp_path / "azurite") as azurite:
        yield azurite


@pytest.fixture
def app_env(app_env: dict[str, str], request: pytest.FixtureRequest) -> dict[str, str]:
    """Tests that stop storage use their own Azurite; the others the stack's."""
    if "azurite" not in request.fixturenames:
        return app_env
    own: Azurite = request.getfixturevalue("azurite")
    return {**app_env, "AzureWebJobsStorage": own.connection_string}


def test_storage_down_before_a_run_moves_nothing_and_the_run_after_the_restart_collects_all(
    stack: Stack, azurite: Azurite, services: Any, consent: Any, new_address: Any, deliver: Any,
    queue_messages: Any,
) -> None:  # fmt: skip
    address = new_address()
    sent = mailbox_with_mail(consent, deliver, address, 5, after_action="move", move_to="Collected")
    mailbox = services.registry.get(address)
    azurite.stop()

    started = time.monotonic()
    with pytest.raises(TransientError, match="registry"):
        services.collector.run()  # the timer's run cannot list the mailboxes
    failed = services.collector.collect_mailbox(mailbox, deadline=time.monotonic() + 120)  # a work item's run
    elapsed = time.monotonic() - started

    assert failed.outcome == "transient" and "lease" in failed.error
    assert elapsed < GIVE_UP_SECONDS, f"storage calls took {elapsed:.0f} s to give up"
    assert len(inbox(stack, address)) == 5 and inbox(stack, address, "Collected") == []

    azurite.start()
    results = services.collector.run()

    assert [(r.outcome, r.messages) for r in results] == [("ok", 5)]
    assert inbox(stack, address) == []
    check_delivery(services, sent, queue_messages(), case="Storage: Azurite stopped before a run")


def test_storage_down_during_a_run_loses_nothing(
    stack: Stack, azurite: Azurite, services: Any, consent: Any, new_address: Any, deliver: Any,
    queue_messages: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    address = new_address()
    sent = mailbox_with_mail(consent, deliver, address, 130, after_action="move", move_to="Collected")
    checkpoints = after_checkpoint(monkeypatch, azurite.stop)

    started = time.monotonic()
    failed = collect(services, address)

    assert checkpoints == [50], "storage went down after the first batch"
    assert failed.outcome == "transient"
    assert time.monotonic() - started < GIVE_UP_SECONDS
    assert len(inbox(stack, address, "Collected")) == 50 and len(inbox(stack, address)) == 80

    monkeypatch.undo()
    azurite.start()
    done = collect(services, address)

    assert done.outcome == "ok" and inbox(stack, address) == []
    assert len(inbox(stack, address, "Collected")) == 130
    check_delivery(services, sent, queue_messages(), case="Storage: Azurite stopped during a run")


def test_storage_restarted_after_a_run_keeps_the_mail_and_the_checkpoint(
    stack: Stack, azurite: Azurite, services: Any, consent: Any, new_address: Any, deliver: Any,
    queue_messages: Any,
) -> None:  # fmt: skip
    address = new_address()
    first = mailbox_with_mail(consent, deliver, address, 4)
    assert collect(services, address).messages == 4
    azurite.stop()
    azurite.start()
    later = simple_message("after the restart")
    deliver(address, later)

    again = collect(services, address)

    assert (again.outcome, again.messages) == ("ok", 1), "the checkpoint did not survive the restart"
    check_delivery(services, [*first, later], queue_messages(), case="Storage: Azurite restarted after a run")


# ------------------------------------------------------------------------------- one sink failing, the other fine


def dead_sink(settings: Any, sink: str) -> ContainerClient | QueueClient:
    """The app's own client for the sink (same retry policy), pointed at a port where nothing listens."""
    parts = dict(p.split("=", 1) for p in settings.storage.connection_string.split(";") if p)
    kind = "Blob" if sink == "container" else "Queue"
    parts[f"{kind}Endpoint"] = f"http://127.0.0.1:{free_port()}/{parts['AccountName']}"
    dead = dataclasses.replace(
        settings, storage=StorageSettings(connection_string=";".join(f"{k}={v}" for k, v in parts.items()))
    )
    if sink == "container":
        return azure_clients.blob_service(dead).get_container_client(settings.mail_container)
    return azure_clients._queue_client(dead, settings.mail_queue)


@pytest.mark.parametrize("sink", ["container", "queue"])
def test_one_sink_deleted_before_the_run_moves_nothing(
    stack: Stack, services: Any, consent: Any, new_address: Any, deliver: Any, queue_messages: Any,
    sink: str,
) -> None:  # fmt: skip
    address = new_address()
    sent = mailbox_with_mail(consent, deliver, address, 60, after_action="move", move_to="Collected")
    settings = services.settings
    container = azure_clients.container(settings, settings.mail_container)
    queue = azure_clients.queue(settings, settings.mail_queue)
    (container.delete_container if sink == "container" else queue.delete_queue)()

    failed = collect(services, address)

    assert failed.outcome == "transient" and "storage write failed" in failed.error
    assert len(inbox(stack, address)) == 60, "mail left the mailbox without its blob and envelope"
    assert services.registry.get(address).last_uid == 0
    if sink == "queue":
        assert list(container.list_blobs()), "blobs are written before envelopes"

    # The operator (or a redeploy) creates it again; the next run collects everything.
    time.sleep(1 if sink == "container" else 0)  # Azurite refuses to recreate a container in the same second
    (container.create_container if sink == "container" else queue.create_queue)()
    done = collect(services, address)

    assert done.outcome == "ok" and inbox(stack, address) == []
    check_delivery(services, sent, queue_messages(), case=f"Storage: {sink} deleted before the run")


@pytest.mark.parametrize("sink", ["container", "queue"])
def test_one_sink_unreachable_in_the_middle_of_a_run_loses_nothing(
    stack: Stack, services: Any, consent: Any, new_address: Any, deliver: Any, queue_messages: Any,
    monkeypatch: pytest.MonkeyPatch, sink: str,
) -> None:  # fmt: skip
    address = new_address()
    sent = mailbox_with_mail(consent, deliver, address, 130, after_action="move", move_to="Collected")
    sinks = services.collector._sinks
    # The Azure client behind the raw store or the envelope queue.
    target, client = (sinks.raw, "_container") if sink == "container" else (sinks.envelopes, "_queue")
    working = getattr(target, client)
    dead = dead_sink(services.settings, sink)

    def break_sink() -> None:
        monkeypatch.setattr(target, client, dead)

    after_checkpoint(monkeypatch, break_sink)

    started = time.monotonic()
    failed = collect(services, address)

    assert failed.outcome == "transient" and "storage write failed" in failed.error
    assert time.monotonic() - started < GIVE_UP_SECONDS
    assert len(inbox(stack, address, "Collected")) == 50 and len(inbox(stack, address)) == 80

    monkeypatch.undo()
    assert getattr(target, client) is working
    started = time.monotonic()
    done = collect(services, address)

    assert done.outcome == "ok" and inbox(stack, address) == []
    # The failed batch's remaining uploads were dropped, not left retrying in the pool ahead of this run.
    assert time.monotonic() - started < GIVE_UP_SECONDS / 2
    check_delivery(services, sent, queue_messages(), case=f"Storage: {sink} unreachable during a run")


# ------------------------------------------------------------------------------------------------------- the lease


def test_the_lease_of_a_crashed_run_blocks_the_mailbox_until_it_expires(
    stack: Stack, services: Any, consent: Any, new_address: Any, deliver: Any, queue_messages: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(shared.lease, "LEASE_SECONDS", 15)  # the shortest lease Azure grants
    address = new_address()
    sent = mailbox_with_mail(consent, deliver, address, 3)
    row = services.registry.get(address)
    leases = azure_clients.container(services.settings, services.settings.lease_container)
    blob: BlobClient = leases.get_blob_client(f"{row.key}.lease")
    blob.upload_blob(b"", overwrite=True)
    blob.acquire_lease(lease_duration=shared.lease.LEASE_SECONDS)  # taken by a run that then crashed
    taken = time.monotonic()

    busy = {r.address: r for r in services.collector.run()}

    assert busy[address].outcome == "busy" and busy[address].messages == 0
    row = services.registry.get(address)
    assert row.consecutive_failures == 0 and row.last_error_class == "", "a busy mailbox is not a failure"
    assert len(inbox(stack, address)) == 3 and queue_messages() == []

    time.sleep(max(0.0, taken + shared.lease.LEASE_SECONDS + 1 - time.monotonic()))
    after = {r.address: r for r in services.collector.run()}

    assert after[address].outcome == "ok" and after[address].messages == 3
    check_delivery(services, sent, queue_messages(), case="Storage: lease held by a crashed run")
    LEDGER.note("Storage: a held lease makes the run say busy without counting a failure")
