"""The after-action policy: one pure function from (stored, refused, options) to the steps, and its checks."""

from __future__ import annotations

import pytest

from shared.after_action import AfterAction, Step, plan, validate
from shared.registry import MailboxOptions


def test_leave_takes_no_step() -> None:
    assert plan([1, 2], {2}, action=AfterAction.LEAVE) == []


@pytest.mark.parametrize("action", [AfterAction.SEEN, AfterAction.DELETE])
def test_seen_and_delete_act_on_every_stored_message_refused_or_not(action: AfterAction) -> None:
    assert plan([3, 1, 2], {2}, action=action) == [Step(action, (3, 1, 2))]


def test_move_without_refuse_folder_moves_everything_to_move_to() -> None:
    assert plan([1, 2], {2}, action=AfterAction.MOVE, move_to="Done") == [Step(AfterAction.MOVE, (1, 2), "Done")]


def test_move_with_refuse_folder_splits_accepted_and_refused() -> None:
    steps = plan([1, 2, 3, 4], {2, 4, 99}, action=AfterAction.MOVE, move_to="Accepted", refuse_to="Refused")
    assert steps == [Step(AfterAction.MOVE, (1, 3), "Accepted"), Step(AfterAction.MOVE, (2, 4), "Refused")]


def test_no_step_without_messages() -> None:
    assert plan([], set(), action=AfterAction.SEEN) == []
    assert plan([5], {5}, action=AfterAction.MOVE, move_to="A", refuse_to="R") == [Step(AfterAction.MOVE, (5,), "R")]
    assert plan([5], set(), action=AfterAction.MOVE, move_to="A", refuse_to="R") == [Step(AfterAction.MOVE, (5,), "A")]


@pytest.mark.parametrize(
    ("action", "move_to", "refuse_to", "field"),
    [
        ("burn", "", "", "after_action"),
        ("Seen", "", "", "after_action"),
        ("move", "", "", "move_to"),
        ("move", "Done\r\nA001 DELETE INBOX", "", "move_to"),
        ("move", "Done", 'Re"fused', "refuse_to"),
        ("move", "x" * 201, "", "move_to"),
        ("seen", "", "Refused", "refuse_to"),
        ("delete", "", "Refused", "refuse_to"),
    ],
)
def test_bad_options_are_refused_naming_the_field(action: str, move_to: str, refuse_to: str, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        validate(action, move_to=move_to, refuse_to=refuse_to)
    with pytest.raises(ValueError, match=field):
        MailboxOptions(after_action=action, move_to=move_to, refuse_to=refuse_to)  # type: ignore[arg-type]


def test_options_hold_the_enum_and_plan_with_their_own_fields() -> None:
    options = MailboxOptions.from_mapping({"after_action": "move", "move_to": "Done", "refuse_to": "Refused"})
    assert options.after_action is AfterAction.MOVE
    assert options.after_steps([1, 2], {1}) == [
        Step(AfterAction.MOVE, (2,), "Done"),
        Step(AfterAction.MOVE, (1,), "Refused"),
    ]
