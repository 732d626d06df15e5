"""The after-action's folder check, against a scripted server answer (the real server is in the integration tests)."""

from __future__ import annotations

from typing import Any

from collectors.imap_session import ImapSession


class ListingClient:
    """Answers LIST as a server does for a pattern: every folder it matches."""

    def __init__(self, folders: list[str]) -> None:
        self.folders = folders
        self.created: list[str] = []
        self.listed: list[tuple[str, str]] = []

    def list_folders(self, directory: str, pattern: str) -> list[tuple[tuple[bytes, ...], bytes, str]]:
        self.listed.append((directory, pattern))
        if pattern in ("*", "%"):
            return [((), b"/", name) for name in self.folders]
        return [((), b"/", name) for name in self.folders if name == pattern or name.startswith(pattern + "/")]

    def create_folder(self, name: str) -> None:
        self.created.append(name)
        self.folders.append(name)


def session_with(client: Any) -> ImapSession:
    session = ImapSession("imap.invalid", 993, address="a@example.test", access_token="")
    session._client = client
    return session


def test_a_listing_that_names_other_folders_does_not_count_as_the_folder() -> None:
    client = ListingClient(["INBOX", "Done", "Done/2026"])
    session_with(client)._ensure_folder("*")
    assert client.created == ["*"]  # a stored legacy value: LIST "*" matched everything, yet "*" did not exist


def test_an_existing_folder_is_not_created_again() -> None:
    client = ListingClient(["INBOX", "Done", "Done/2026"])
    session = session_with(client)
    session._ensure_folder("Done")
    session._ensure_folder("Done")
    assert client.created == [] and client.listed == [("", "Done")]
