"""The pipelined FETCH path against Dovecot: the next batch is requested before this one is handed over, and
after-actions between batches neither lose nor mix up bodies (Dovecot starts the next command early, so answers
of two FETCHes can interleave)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from collectors.imap_session import ImapSession
from devstack import dovecot
from shared.after_action import AfterAction, Step
from tests.conftest import simple_message
from tests.support.stack import Stack

pytestmark = pytest.mark.integration


def test_batches_arrive_whole_and_in_order_with_after_actions_in_between(
    stack: Stack, services: Any, consent: Any, new_address: Any, deliver: Any
) -> None:
    address = new_address()
    consent(address)
    sent = [simple_message(f"m{i}", "x" * (200 + 37 * i)) for i in range(130)]
    for raw in sent:
        deliver(address, raw)
    token = services.tokens.access_token(address, signed_in_as=address).token

    with ImapSession(
        stack.imap_host, stack.imap_port, address=address, access_token=token, ca_bundle=stack.ca_bundle
    ) as imap:
        imap.select("INBOX")
        uids = list(imap.new_sizes(0))
        batches = [uids[i : i + 50] for i in range(0, len(uids), 50)]
        got: list[bytes] = []
        for index, (batch, messages) in enumerate(imap.fetch_batches(batches)):
            assert batch == batches[index]
            if index == 0:  # 130 small messages are well within the window: every FETCH is on the wire already
                assert len(imap._in_flight) == len(batches) - 1, "the next FETCHes were not sent ahead"
            assert sorted(messages) == batch
            got += [messages[uid] for uid in batch]
            imap.apply(Step(AfterAction.SEEN, tuple(batch)))  # a UID STORE while the next FETCH is on the wire

    assert got == sent
    flags = dovecot.list_flags(Path(stack.dovecot_config), address)
    assert len(flags) == len(sent)
    assert all("\\Seen" in f for f in flags.values())


def test_leaving_early_leaves_the_session_usable(
    stack: Stack, services: Any, consent: Any, new_address: Any, deliver: Any
) -> None:
    address = new_address()
    consent(address)
    sent = [simple_message(f"m{i}") for i in range(12)]
    for raw in sent:
        deliver(address, raw)
    token = services.tokens.access_token(address, signed_in_as=address).token

    with ImapSession(
        stack.imap_host, stack.imap_port, address=address, access_token=token, ca_bundle=stack.ca_bundle
    ) as imap:
        imap.select("INBOX")
        uids = list(imap.new_sizes(0))
        for _batch, _messages in imap.fetch_batches([uids[:4], uids[4:8], uids[8:]]):
            break  # two FETCHes are abandoned on the wire
        assert imap.sizes(uids[:2]) == {uid: len(sent[i]) for i, uid in enumerate(uids[:2])}
        assert imap.fetch(uids[8:]) == dict(zip(uids[8:], sent[8:], strict=True))
        assert not imap._bodies, "abandoned bodies are kept"
