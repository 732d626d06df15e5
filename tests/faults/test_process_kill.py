"""The collector process killed: at random moments of a 1,000-message run, twenty times in a row, and at each step
of the per-message order (after the blob, after the envelope, after the after-action, before the checkpoint).
After the kills, one clean run: every message is on the queue at least once, every duplicate carries the id of
its first envelope, every blob holds the delivered bytes, and the mailbox holds nothing twice.

The killed process is the operator's command line (``python -m collectors collect``) in a child process. A killed
run leaves its mailbox lease behind for up to a minute; the test breaks it (as its expiry would) so that twenty
kills fit in well under two minutes. The lease's own expiry is covered by the storage faults. Storage is a private
Azurite: thousands of blobs stay out of the shared one, and its speed does not depend on what others stored.
"""

from __future__ import annotations

import json
import os
import random
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError
from azure.storage.blob import BlobClient, BlobLeaseClient
from imapclient import IMAPClient

from devstack import dovecot
from shared import azure_clients
from tests.conftest import ROOT, simple_message
from tests.support.azurite import Azurite
from tests.support.faults import LEDGER, check_delivery, collect
from tests.support.kill_at import KILLED
from tests.support.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow]

KILLS = 20
MESSAGES = 1000
APPEND_CHUNK = 100  # messages per MULTIAPPEND


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    with Azurite(tmp_path_factory.mktemp("azurite")) as azurite:
        yield azurite


@pytest.fixture
def app_env(app_env: dict[str, str], azurite: Azurite) -> dict[str, str]:
    return {**app_env, "AzureWebJobsStorage": azurite.connection_string}


@pytest.fixture
def settings_file(app_env: dict[str, str], tmp_path: Path) -> Path:
    """The test's settings as a local.settings.json for the child process (it holds the stack's client secret)."""
    path = tmp_path / "local.settings.json"
    path.write_text(json.dumps({"IsEncrypted": False, "Values": app_env}))
    path.chmod(0o600)
    return path


def append(stack: Stack, services: Any, address: str, messages: list[bytes]) -> None:
    """Deliver many messages fast: MULTIAPPEND over one IMAP connection, with the mailbox's own token."""
    token = services.tokens.access_token(address, signed_in_as=address).token
    with IMAPClient("localhost", port=int(stack.imap_port), ssl=True, ssl_context=_tls(stack)) as imap:
        imap.oauth2_login(address, token)
        for start in range(0, len(messages), APPEND_CHUNK):
            imap.multiappend("INBOX", messages[start : start + APPEND_CHUNK])


def _tls(stack: Stack) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=stack.ca_bundle)


def lease_blob(services: Any, address: str) -> BlobClient:
    settings = services.settings
    leases = azure_clients.container(settings, settings.lease_container)
    return leases.get_blob_client(f"{services.registry.get(address).key}.lease")


def break_lease(services: Any, address: str) -> None:
    """What the expiry of a killed run's lease does, without waiting for it."""
    try:
        BlobLeaseClient(lease_blob(services, address)).break_lease(lease_break_period=0)
    except HttpResponseError as e:
        if e.status_code not in (404, 409):  # no lease blob yet, or no lease to break
            raise


def child(settings_file: Path, address: str, *prefix: str) -> subprocess.Popen[bytes]:
    """The collection command line for one mailbox; its log goes to child.log beside the settings file."""
    command = [*prefix, "collect"] if prefix else ["-m", "collectors", "collect"]
    with (settings_file.parent / "child.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, *command, "--settings", str(settings_file), "--mailbox", address],
            cwd=ROOT,
            env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST")},
            stdout=log,
            stderr=log,
            start_new_session=True,
        )


def log_tail(settings_file: Path) -> str:
    return (settings_file.parent / "child.log").read_text(errors="replace")[-3000:]


def clean_run(services: Any, address: str, runs: int = 5) -> int:
    """Collect until the mailbox has nothing left (caps may leave mail for another run). Returns messages."""
    total = 0
    for _ in range(runs):
        result = collect(services, address)
        assert result.outcome == "ok", result
        total += result.messages
        if not result.more:
            return total
    raise AssertionError(f"{runs} clean runs did not drain the mailbox")


def folder_counts(stack: Stack, address: str) -> tuple[int, int]:
    config = Path(stack.dovecot_config)
    moved = (
        len(dovecot.list_uids(config, address, "Collected"))
        if "Collected" in dovecot.list_folders(config, address)
        else 0
    )
    return len(dovecot.list_uids(config, address)), moved


def test_twenty_random_sigkills_during_a_1000_message_run_lose_nothing(
    stack: Stack, services: Any, consent: Any, new_address: Any, queue_messages: Any, settings_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    seed = int(os.environ.get("KILL_SEED") or random.SystemRandom().randrange(1, 10**6))
    rng = random.Random(seed)
    with capsys.disabled():
        print(f"\nrandom kills: KILL_SEED={seed}")
    address = new_address()
    consent(address, after_action="move", move_to="Collected", max_messages="1000")
    sent = [simple_message(f"kill test #{i}", f"body {i} " + "y" * rng.randrange(0, 4000)) for i in range(MESSAGES)]
    append(stack, services, address, sent)

    queue = azure_clients.queue(services.settings, services.settings.mail_queue)

    def queued() -> int:
        return int(queue.get_queue_properties().approximate_message_count)

    killed, finished, points = 0, 0, []
    for _ in range(KILLS):
        # Each kill comes after a random number of new envelopes: a random point of the per-message order (blob,
        # envelope, after-action, checkpoint run concurrently across a batch), whatever the machine's load.
        target = rng.randint(1, 120)
        points.append(target)
        start = queued()
        process = child(settings_file, address)
        deadline = time.monotonic() + 30
        while process.poll() is None and queued() < start + target and time.monotonic() < deadline:
            time.sleep(0.01)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            killed += 1
        else:
            finished += 1
        process.wait()
        break_lease(services, address)
    inbox_left, moved = folder_counts(stack, address)

    recollected = clean_run(services, address)

    context = f"KILL_SEED={seed} killed={killed} finished={finished} after_new_envelopes={points}"
    assert killed >= KILLS // 2 and moved, f"most runs must die mid-way, after some progress; {context}"
    assert folder_counts(stack, address) == (0, MESSAGES), f"the mailbox holds a message twice or lost one; {context}"
    tally = check_delivery(services, sent, queue_messages(), case=f"Process: {killed} SIGKILLs at random (seed {seed})")
    assert tally.duplicates == tally.duplicates_same_id
    with capsys.disabled():
        print(
            f"random kills: {context} inbox_before_clean_run={inbox_left} moved_before={moved} "
            f"clean_run={recollected} envelopes={tally.envelopes} duplicates={tally.duplicates}"
        )


@pytest.mark.parametrize(
    ("point", "nth"),
    [("after_blob", 60), ("after_enqueue", 60), ("after_action", 2), ("before_checkpoint", 2)],
)
def test_a_kill_at_each_step_of_the_message_order_loses_nothing(
    stack: Stack, services: Any, consent: Any, new_address: Any, deliver: Any, queue_messages: Any,
    settings_file: Path, point: str, nth: int,
) -> None:  # fmt: skip
    address = new_address()
    consent(address, after_action="move", move_to="Collected")
    sent = [simple_message(f"{point} #{i}") for i in range(120)]
    append(stack, services, address, sent)

    process = child(settings_file, address, "-m", "tests.support.kill_at", point, str(nth))
    process.wait(timeout=120)

    assert process.returncode == KILLED, f"the child was not killed at {point}: {log_tail(settings_file)}"
    before = folder_counts(stack, address)
    break_lease(services, address)
    clean_run(services, address)

    assert folder_counts(stack, address) == (0, 120)
    tally = check_delivery(services, sent, queue_messages(), case=f"Process: killed {point} (#{nth})")
    assert tally.duplicates == tally.duplicates_same_id
    LEDGER.note(f"Process: killed {point}; mailbox before the clean run (inbox, moved) = {before}")


def test_the_command_line_logs_a_line_per_mailbox_not_every_storage_request(
    stack: Stack, services: Any, consent: Any, new_address: Any, settings_file: Path
) -> None:
    address = new_address()
    consent(address)
    append(stack, services, address, [simple_message(f"log #{i}") for i in range(5)])

    process = child(settings_file, address)

    assert process.wait(timeout=60) == 0, log_tail(settings_file)
    log = (settings_file.parent / "child.log").read_text()
    assert f"collect mailbox={address} outcome=ok messages=5" in log
    assert "azure.core.pipeline" not in log, "the SDK's request and header lines drown the operator's log"
