"""Bad mail through the real server: every hostile, broken or real-world message that Dovecot stores is collected,
once, byte for byte as Dovecot serves it, with an envelope that the schema accepts.

The oracle for "byte-exact" is Dovecot itself: an independent IMAP connection (imaplib, not the app's client)
fetches BODY.PEEK[] of every message. Dovecot normalises some input when it stores it (a bare LF becomes CRLF, NUL
becomes 0x80, stray CRs before CRLF are dropped), so what the collector must preserve is what the server serves,
and the test reports how many messages the server changed and which ones it refused.
"""

from __future__ import annotations

import hashlib
import imaplib
import json
import re
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from devstack import dovecot
from shared import azure_clients
from tests.conftest import ROOT
from tests.mail_corpus import hostile_messages, real_world_messages
from tests.support.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow]

SCHEMA = json.loads((ROOT / "schemas" / "envelope.v1.json").read_text())
FETCH_CHUNK = 50  # UIDs per oracle FETCH
MAX_RUNS = 5  # collection runs allowed to drain the mailbox (the per-run caps may leave mail for the next run)
_UID = re.compile(rb"\bUID (\d+)\b")
_BARE_LF = re.compile(rb"(?<!\r)\n")


@dataclass
class Delivered:
    name: str
    raw: bytes
    uid: int = 0


def served_by_dovecot(stack: Stack, address: str, token: str, uids: list[int]) -> Iterator[tuple[int, bytes]]:
    """What Dovecot answers to UID FETCH BODY.PEEK[] for ``uids``, over its own connection."""
    context = ssl.create_default_context(cafile=stack.ca)
    with imaplib.IMAP4_SSL(stack.imap_host, stack.imap_port, ssl_context=context, timeout=120) as imap:
        imap.authenticate("XOAUTH2", dovecot.sasl_answer(dovecot.xoauth2(address, token)))
        imap.select("INBOX", readonly=True)
        for i in range(0, len(uids), FETCH_CHUNK):
            chunk = uids[i : i + FETCH_CHUNK]
            status, data = imap.uid("FETCH", ",".join(map(str, chunk)), "(BODY.PEEK[])")
            assert status == "OK", data
            answered = 0
            for item in data:
                if isinstance(item, tuple):
                    found = _UID.search(item[0])
                    assert found, item[0][:200]
                    answered += 1
                    yield int(found.group(1)), item[1]
            if answered < len(chunk):
                # A zero-length body may come back as a quoted "" instead of a literal: no tuple then.
                for item in data:
                    if isinstance(item, bytes) and b'BODY[] ""' in item:
                        found = _UID.search(item)
                        assert found, item[:200]
                        yield int(found.group(1)), b""


def imap_normal_form(raw: bytes) -> bytes:
    """The bytes an IMAP server may serve for ``raw`` under RFC 3501's rules: CRLF line ends and no NUL."""
    return _BARE_LF.sub(b"\r\n", raw.replace(b"\x00", b"\x80"))


def test_every_hostile_and_real_world_message_is_collected_once_and_byte_exact(
    stack: Stack, services: Any, consent: Any, new_address: Any, queue_messages: Any
) -> None:
    address = new_address()
    consent(address)
    config = Path(stack.dovecot_config)
    corpus = [*hostile_messages(include_huge=True), *real_world_messages()]
    assert len(corpus) >= 300 and "huge-30mb-attachment" in dict(corpus)
    delivered: list[Delivered] = []
    refused: dict[str, str] = {}
    for name, raw in corpus:
        try:
            dovecot.deliver(config, address, raw)
        except dovecot.DovecotError as e:
            refused[name] = str(e)[:200]
        else:
            delivered.append(Delivered(name, raw))
    uids = dovecot.list_uids(config, address)
    assert len(uids) == len(delivered), "Dovecot's UID count differs from the messages it accepted"
    for message, uid in zip(delivered, uids, strict=True):
        message.uid = uid
    print(f"\ncorpus={len(corpus)} stored={len(delivered)} refused_by_dovecot={len(refused)} {sorted(refused)}")
    assert refused == {}, f"Dovecot refused to store: {refused}"

    started = time.monotonic()
    runs = []
    for _ in range(MAX_RUNS):
        result = services.collector.collect_mailbox(services.registry.get(address), deadline=time.monotonic() + 600)
        runs.append((result.outcome, result.messages, result.more))
        assert result.outcome == "ok", f"{result.outcome}: {result.error}"
        if not result.more:
            break
    collect_seconds = time.monotonic() - started
    assert not runs[-1][2], f"mail left after {MAX_RUNS} runs: {runs}"
    envelopes = queue_messages()

    # Nothing lost, nothing doubled: one envelope per stored message, each with its own id.
    by_uid = {e["uid"]: e for e in envelopes}
    assert len(envelopes) == len(delivered) == sum(n for _, n, _ in runs)
    assert sorted(by_uid) == uids
    assert len({e["id"] for e in envelopes}) == len(envelopes)

    token = services.tokens.access_token(address, signed_in_as=address).token
    served = dict(served_by_dovecot(stack, address, token, uids))
    assert sorted(served) == uids
    container = azure_clients.container(services.settings, services.settings.mail_container)
    schema_errors: dict[str, str] = {}
    not_exact: list[str] = []
    identical = normalised = otherwise_changed = 0
    changed_by_dovecot: list[str] = []
    for message in delivered:
        envelope = by_uid[message.uid]
        try:
            jsonschema.validate(envelope, SCHEMA)
        except jsonschema.ValidationError as e:
            schema_errors[message.name] = e.message[:200]
        blob = bytes(container.download_blob(envelope["blob"]["name"]).readall())
        if blob != served[message.uid]:
            not_exact.append(message.name)
        assert envelope["sha256"] == hashlib.sha256(blob).hexdigest(), message.name
        assert envelope["size"] == len(blob), message.name
        assert envelope["mailbox"] == address and envelope["folder"] == "INBOX", message.name
        if served[message.uid] == message.raw:
            identical += 1
        elif served[message.uid] == imap_normal_form(message.raw):
            normalised += 1
        else:
            otherwise_changed += 1
            changed_by_dovecot.append(message.name)
        if b"\r" not in message.raw.replace(b"\r\n", b"") and b"\x00" not in message.raw:
            # Clean line ends and no NUL: the server must serve back exactly what was delivered, or the oracle lies.
            assert served[message.uid] == imap_normal_form(message.raw), message.name
    assert schema_errors == {}
    assert not_exact == [], f"blobs that differ from what Dovecot serves: {not_exact}"
    huge = next(m for m in delivered if m.name == "huge-30mb-attachment")
    assert by_uid[huge.uid]["size"] == len(served[huge.uid]) > 30 * 1024 * 1024
    print(
        f"collected={len(envelopes)} runs={len(runs)} seconds={collect_seconds:.1f} lost=0 duplicated=0 "
        f"served_identical={identical} served_normalised={normalised} otherwise_changed_by_dovecot="
        f"{otherwise_changed} {changed_by_dovecot}"
    )
