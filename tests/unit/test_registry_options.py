from __future__ import annotations

from datetime import UTC, datetime

import pytest

from shared.registry import Mailbox, MailboxOptions, _from_entity, _to_entity


def test_defaults() -> None:
    o = MailboxOptions()
    assert (o.folder, o.after_action, o.move_to) == ("INBOX", "seen", "")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"after_action": "burn"}, "after_action"),
        ({"after_action": "move"}, "move_to"),
        ({"folder": "IN\r\nBOX"}, "folder"),
        ({"max_messages": "many"}, "whole number"),
        ({"max_messages": "0"}, "max_messages"),
        ({"colour": "red"}, "unknown option"),
        ({"folder": ["INBOX"]}, "text"),
    ],
)
def test_bad_options_are_refused_with_the_field_named(data: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MailboxOptions.from_mapping(data)


def test_options_apply_on_top_of_a_base() -> None:
    base = MailboxOptions(folder="Support", after_action="move", move_to="Done")
    changed = MailboxOptions.from_mapping({"max_messages": "20"}, base)
    assert (changed.folder, changed.move_to, changed.max_messages) == ("Support", "Done", 20)


def test_rows_round_trip_including_large_byte_caps() -> None:
    m = Mailbox(
        address="a@contoso.com",
        options=MailboxOptions(max_bytes=5 * 1024**3),
        uidvalidity=7,
        last_uid=99,
        consented_at=datetime(2026, 1, 2, tzinfo=UTC),
    )
    entity = _to_entity(m)
    entity["opt_max_bytes"] = entity["opt_max_bytes"][0]  # as the table hands it back
    assert _from_entity(entity) == m


def test_refuse_to_needs_the_move_action() -> None:
    with pytest.raises(ValueError, match="refuse_to"):
        MailboxOptions(after_action="seen", refuse_to="Refused")
    assert MailboxOptions(after_action="move", move_to="Done", refuse_to="Refused").refuse_to == "Refused"
