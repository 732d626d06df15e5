from __future__ import annotations

import pytest

from shared.folders import MAX_FOLDER_CHARS, MAX_FOLDER_DEPTH, InvalidFolderError, check_folder, same_folder


@pytest.mark.parametrize(
    "name",
    [
        "INBOX\r\nA1 DELETE INBOX",
        "IN\x00BOX",
        "Done\x1b[31m",
        "Done\u202eenod",  # right-to-left override
        "Done\u200b",  # zero-width space
        "Done\u2028",
        "Done\ud800",  # a lone surrogate has no UTF-7 form
        "*",
        "%",
        "Archive/*",
        'Say "hi"',
        "back\\slash",
        "",
        "   ",
        "a" * (MAX_FOLDER_CHARS + 1),
        "/".join(["a"] * (MAX_FOLDER_DEPTH + 1)),
        "Archive//2026",
        "/Archive",
        "Archive.",
    ],
)
def test_unsafe_folder_names_are_refused_in_plain_words(name: str) -> None:
    with pytest.raises(InvalidFolderError, match="move_to") as refused:
        check_folder(name, "move_to")
    assert "codec" not in str(refused.value) and "surrogate" not in str(refused.value)


@pytest.mark.parametrize(
    "name", ["INBOX", "Archive/2026", "Erledigt/Überprüft", "Завершено", "Tickets & Co", "a" * 200]
)
def test_ordinary_folder_names_are_kept(name: str) -> None:
    assert check_folder(f" {name} ", "folder") == name


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("INBOX", "inbox", True),
        ("INBOX", " INBOX ", True),
        ("INBOX/Support", "INBOX.Support", True),
        ("INBOX/Support", "inbox/support", True),
        ("INBOX / Support", "INBOX/Support", True),
        ("INBOX", "INBOX/Done", False),
        ("Support", "Support2", False),
        ("INBOX", "", False),
    ],
)
def test_same_folder_ignores_case_spaces_and_the_delimiter(a: str, b: str, same: bool) -> None:
    assert same_folder(a, b) is same
