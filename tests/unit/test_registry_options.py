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


@pytest.mark.parametrize(
    ("data", "base"),
    [
        ({"after_action": "move", "move_to": "INBOX"}, None),
        ({"after_action": "move", "move_to": "inbox"}, None),
        ({"after_action": "move", "move_to": " INBOX "}, None),
        ({"after_action": "move", "move_to": "Done", "refuse_to": "Inbox"}, None),
        ({"folder": "Support/Tickets", "after_action": "move", "move_to": "support.tickets"}, None),
        ({"folder": "Done"}, MailboxOptions(after_action="move", move_to="Done")),
        ({"folder": "refused"}, MailboxOptions(after_action="move", move_to="Done", refuse_to="Refused")),
    ],
)
def test_moving_mail_back_into_the_collected_folder_is_refused(
    data: dict[str, object], base: MailboxOptions | None
) -> None:
    # Each run would move the messages back in under new UIDs and collect them again: a new ticket every run.
    with pytest.raises(ValueError, match="collected folder"):
        MailboxOptions.from_mapping(data, base)


@pytest.mark.parametrize(
    "data",
    [
        {"move_to": "Archive/*", "after_action": "move"},
        {"move_to": "%", "after_action": "move"},
        {"refuse_to": "Ref\u202eused", "after_action": "move", "move_to": "Done"},
        {"folder": "IN\ud800BOX"},
        {"folder": "/".join(["a"] * 11)},
    ],
)
def test_unsafe_folder_names_are_refused(data: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"folder|move_to|refuse_to"):
        MailboxOptions.from_mapping(data)


@pytest.mark.parametrize(
    "value",
    [
        True,
        False,
        2.0,
        2.5,
        float("inf"),
        "2.0",
        "1_000",
        "\u0661\u0662",  # Arabic-Indic digits, which int() accepts
        "\uff11\uff12",  # full-width digits
        "+12",
        "-1",
        " 12",
        "0x10",
        "1e3",
        "9" * 5000,  # int() would raise with a message about sys.set_int_max_str_digits
        None,
        [1],
        {"n": 1},
        100_001,
        0,
    ],
    ids=repr,
)
def test_numeric_options_take_whole_numbers_in_range_only(value: object) -> None:
    with pytest.raises(ValueError) as refused:
        MailboxOptions.from_mapping({"max_messages": value})
    text = str(refused.value)
    assert text.startswith("max_messages must be a whole number between 1 and 100000")
    for internal in ("sys.", "int()", "invalid literal", "codec", "base 10", "Exceeds"):
        assert internal not in text


@pytest.mark.parametrize(("value", "expected"), [(25, 25), ("25", 25), ("100000", 100_000), (1, 1)])
def test_numeric_options_accept_json_integers_and_ascii_digit_text(value: object, expected: int) -> None:
    assert MailboxOptions.from_mapping({"max_messages": value}).max_messages == expected


def test_max_bytes_range_is_named_in_the_error() -> None:
    with pytest.raises(ValueError, match="max_bytes must be a whole number between 1 and 10737418240"):
        MailboxOptions.from_mapping({"max_bytes": 10 * 1024**3 + 1})
