"""The collector process killed: at random moments of a 1,000-message run, twenty times in a row, and at each step
of the per-message order (after the blob, after the envelope, after the after-action, before the checkpoint).
After the kills, one clean run: every message is on the queue at least once, every duplicate carries the id of
its first envelope, every blob holds the delivered bytes, and the mailbox holds nothing twice.

The killed process is the operator's command line (``python -m collectors collect``) in a child process. A killed
run leaves its mailbox lease behind for up to a minute; the test breaks it (as its expiry would) so that twenty
kills fit in well under two minutes. The lease's own expiry is covered by the storage faults.
"""

from __future__ import annotations

import json
import os
import random
import signal
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError
from imapclient import IMAPClient

from devstack import dovecot
from shared import azure_clients
from tests.conftest import ROOT, simple_message
from tests.support.faults import LEDGER, check_delivery, collect
from tests.support.kill_at import KILLED

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow]

KILLS = 20
MESSAGES = 1000
APPEND_CHUNK = 100  # messages per MULTIAPPEND


@pytest.fixture
def settings_file(app_env: dict[str, str], tmp_path: Path) -> Path:
    """The test's settings as a local.settings.json for the child process (it holds the stack's client secret)."""
    path = tmp_path / "local.settings.json"
    path.write_text(json.dumps({"IsEncrypted": False, "Values": app_env}))
    path.chmod(0o600)
    return path


def append(stack: dict[str, Any], services: Any, address: str, messages: list[bytes]) -> None:
    """Deliver many messages fast: MULTIAPPEND over one IMAP connection, with the mailbox's own token."""
    token = services.tokens.access_token(address, signed_in_as=address).token
    with IMAPClient("localhost", port=int(stack["imap_port"]), ssl=True, ssl_context=_tls(stack)) as imap:
        imap.oauth2_login(address, token)
        for start in range(0, len(messages), APPEND_CHUNK):
            imap.multiappend("INBOX", messages[start : start + APPEND_CHUNK])


def _tls(stack: dict[str, Any]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=stack["ca_bundle"])


def break_lease(services: Any, address: str) -> None:
    """What the expiry of a killed run's lease does, without waiting for it."""
    settings = services.settings
    blob = azure_clients.container(settings, settings.lease_container).get_blob_client(
        f"{services.registry.get(address).key}.lease"
    )
    try:
        blob.get_blob_properties()
    except HttpResponseError:
        return
    from azure.storage.blob import BlobLeaseClient

    try:
        BlobLeaseClient(blob).break_lease(lease_break_period=0)
    except HttpResponseError as e:
        if e.status_code != 409:  # 409: no lease to break
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


def folder_counts(stack: dict[str, Any], address: str) -> tuple[int, int]:
    config = Path(stack["dovecot_config"])
    moved = (
        len(dovecot.list_uids(config, address, "Collected"))
        if "Collected" in dovecot.list_folders(config, address)
        else 0
    )
    return len(dovecot.list_uids(config, address)), moved


def test_twenty_random_sigkills_during_a_1000_message_run_lose_nothing(
    stack: dict[str, Any], services: Any, consent: Any, new_address: Any, queue_messages: Any, settings_file: Path,
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

    killed, finished, delays = 0, 0, []
    for _ in range(KILLS):
        process = child(settings_file, address)
        # Start-up takes about a second, then a batch of 50 is done every half second or so: most kills land
        # in the middle of a batch, and the twenty together cover the whole mailbox.
        delay = rng.uniform(0.6, 2.4)
        delays.append(round(delay, 2))
        try:
            process.wait(delay)
            finished += 1
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            killed += 1
        break_lease(services, address)
    inbox_left, moved = folder_counts(stack, address)

    recollected = clean_run(services, address)

    context = f"KILL_SEED={seed} killed={killed} finished={finished} delays={delays}"
    assert killed >= KILLS // 2, f"most runs must die mid-way; {context}"
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
    stack: dict[str, Any], services: Any, consent: Any, new_address: Any, deliver: Any, queue_messages: Any,
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
