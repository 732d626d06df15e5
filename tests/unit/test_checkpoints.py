from __future__ import annotations

from shared.checkpoints import Checkpoint, PendingAfterAction, checkpoint_of, read_checkpoints, with_checkpoint


def test_a_row_without_a_map_keeps_its_single_checkpoint_for_the_folder_it_was_collecting() -> None:
    legacy = Checkpoint(7, 40)
    assert checkpoint_of("", "INBOX", legacy=legacy) == legacy
    text = with_checkpoint(with_checkpoint("", "INBOX", legacy), "Support", Checkpoint(9, 3))
    assert checkpoint_of(text, "inbox", legacy=Checkpoint(9, 3)) == legacy
    assert checkpoint_of(text, "Support", legacy=Checkpoint()) == Checkpoint(9, 3)
    assert checkpoint_of(text, "Archive", legacy=Checkpoint(9, 3)) == Checkpoint()


def test_folders_are_keyed_by_what_the_server_takes_them_to_mean() -> None:
    text = with_checkpoint("", "INBOX/Support", Checkpoint(1, 2))
    assert checkpoint_of(text, "inbox.support", legacy=Checkpoint()) == Checkpoint(1, 2)


def test_unreadable_maps_and_pending_texts_are_empty() -> None:
    assert read_checkpoints("not json") == {} and read_checkpoints("[1]") == {}
    assert read_checkpoints('{"inbox": [1, "x"]}') == {}
    assert PendingAfterAction.from_text("") is None and PendingAfterAction.from_text("{") is None


def test_a_pending_after_action_round_trips() -> None:
    pending = PendingAfterAction("INBOX", 5, (3, 4, 9), frozenset({4}))
    assert PendingAfterAction.from_text(pending.to_text()) == pending
