"""The after-action policy: what happens in the mailbox to mail that is safely stored and queued.

One place decides it: the action kinds, the rules on their options (checked when an admin sets them), and a pure
function from (stored messages, refused messages, options) to the steps a mail source carries out. The collector
runs the steps only after the messages' blobs and envelopes are written (DESIGN.md, "Nothing lost").
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from enum import StrEnum

from shared.folders import check_stored_folder


class AfterAction(StrEnum):
    LEAVE = "leave"  # nothing: the checkpoint alone keeps the mail from being collected twice
    SEEN = "seen"  # flag \Seen
    MOVE = "move"  # to move_to; with refuse_to, auto-replies, bounces and loops go there instead
    DELETE = "delete"


@dataclass(frozen=True)
class Step:
    """One after-action on some messages: flag them seen, move them to ``folder``, or delete them."""

    action: AfterAction
    uids: tuple[int, ...]
    folder: str = ""


def validate(action: str, *, move_to: str, refuse_to: str) -> AfterAction:
    """The action as an AfterAction; raises ValueError naming the field that is wrong."""
    try:
        kind = AfterAction(action)
    except ValueError:
        raise ValueError(f"after_action must be one of {', '.join(AfterAction)}") from None
    if kind is AfterAction.MOVE and not move_to:
        raise ValueError("after_action 'move' needs move_to (the folder to move collected mail to)")
    check_stored_folder(move_to, "move_to")
    check_stored_folder(refuse_to, "refuse_to")
    if refuse_to and kind is not AfterAction.MOVE:
        raise ValueError("refuse_to works with after_action 'move'")
    return kind


def plan(
    stored: Sequence[int], refused: Collection[int], *, action: AfterAction, move_to: str = "", refuse_to: str = ""
) -> list[Step]:
    """The steps for messages whose blob and envelope are written, in ``stored`` order; no step without messages.

    ``refused`` are the messages the refuse rule applies to (see ``collectors.envelope.classification``); they go
    to ``refuse_to`` when it is set, and are treated like the others otherwise.
    """
    if action is AfterAction.LEAVE or not stored:
        return []
    if action is AfterAction.MOVE:
        if not refuse_to:
            return [Step(action, tuple(stored), move_to)]
        steps = [
            Step(action, tuple(u for u in stored if u not in refused), move_to),
            Step(action, tuple(u for u in stored if u in refused), refuse_to),
        ]
        return [s for s in steps if s.uids]
    return [Step(action, tuple(stored))]
