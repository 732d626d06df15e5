"""The mail source seam: where the collector reads mail from. IMAP today; Microsoft Graph fits the same shape.

A source opens one mailbox folder for a run and answers in the collector's terms: the new messages and their
sizes, their bytes in batches, the after-action steps, and a checkpoint. The checkpoint is opaque to the
collector: it only hands it to the registry (``record_checkpoint``) once a batch is stored, queued and its
after-action done. IMAP's checkpoint is the folder's UIDVALIDITY and the last UID finished; a Graph source would
keep a delta link in a column of its own.

To add a source: implement ``MailSource`` and ``MailFolder`` beside this one, add its checkpoint columns to
``shared.registry.CHECKPOINT_COLUMNS``, and wire it in ``collectors.services``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Collection, Generator, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Protocol

from collectors.imap_session import ImapSession, SinkFor
from shared.after_action import Step
from shared.checkpoints import Checkpoint as FolderCheckpoint
from shared.checkpoints import checkpoint_of, with_checkpoint
from shared.errors import MailboxAccessError
from shared.registry import Mailbox
from shared.settings import Settings

logger = logging.getLogger(__name__)

Checkpoint = Mapping[str, int | str]  # registry columns holding the source's position; opaque to the collector


class MailFolder(Protocol):
    """One folder of one mailbox, open for a run. Every method raises TransientError or MailboxAccessError."""

    @property
    def uidvalidity(self) -> int:
        """The folder's generation: message ids are unique within it (part of each envelope's ``id``)."""
        ...

    @property
    def checkpoint(self) -> Checkpoint:
        """The position the run started from (reset when the folder was rebuilt)."""
        ...

    def sizes(self) -> dict[int, int]:
        """Size in bytes of each message after the checkpoint, by message id (ascending ids are arrival order)."""
        ...

    def fetch_batches(
        self, batches: Iterable[list[int]], *, streamed: Collection[int] = (), sink: SinkFor | None = None
    ) -> Generator[tuple[list[int], dict[int, bytes]]]:
        """``(ids, {id: exact bytes})`` per batch, in order; ids deleted meanwhile are absent from the dict.

        An id in ``streamed`` must be alone in its batch: its bytes are never held whole but handed to ``sink(id)``
        (called once, when they start) in chunks as they arrive, before its batch is yielded without it. A failure
        in the middle raises as any fetch does, after only part of the bytes reached the sink.
        """
        ...

    def fetch_headers(self, ids: Iterable[int]) -> dict[int, bytes]:
        """``{id: the header section's exact bytes}``, for messages too large to collect whole; the message is left
        as it is (unread stays unread)."""
        ...

    def apply(self, step: Step) -> None:
        """Carry out one after-action step (see ``shared.after_action``)."""
        ...

    def existing(self, ids: Iterable[int]) -> list[int]:
        """Which of ``ids`` are still in the folder (to stop reporting messages someone has dealt with)."""
        ...

    def checkpoint_after(self, last_id: int) -> Checkpoint:
        """The position once every message up to ``last_id`` is finished."""
        ...


LoginRefused = Callable[[], MailboxAccessError]  # the error for a refused login, when the token mode has its own


class MailSource(Protocol):
    def open(
        self, mailbox: Mailbox, access_token: str, *, login_refused: LoginRefused | None = None
    ) -> AbstractContextManager[MailFolder]:
        """Connect, sign in with ``access_token`` and open the mailbox's folder; always disconnects on exit."""
        ...


class ImapFolder:
    """``MailFolder`` over an authenticated IMAP session with the folder selected."""

    def __init__(self, session: ImapSession, *, uidvalidity: int, last_uid: int, folder: str, folders: str) -> None:
        self._session = session
        self._uidvalidity = uidvalidity
        self._last_uid = last_uid
        self._folder = folder
        self._folders = folders  # every folder's checkpoint as the run found them (shared.checkpoints)

    @property
    def uidvalidity(self) -> int:
        return self._uidvalidity

    @property
    def checkpoint(self) -> Checkpoint:
        return self.checkpoint_after(self._last_uid)

    def sizes(self) -> dict[int, int]:
        return self._session.new_sizes(self._last_uid)

    def fetch_batches(
        self, batches: Iterable[list[int]], *, streamed: Collection[int] = (), sink: SinkFor | None = None
    ) -> Generator[tuple[list[int], dict[int, bytes]]]:
        return self._session.fetch_batches(batches, streamed=streamed, sink=sink)

    def fetch_headers(self, ids: Iterable[int]) -> dict[int, bytes]:
        return self._session.fetch_headers(ids)

    def apply(self, step: Step) -> None:
        self._session.apply(step)

    def existing(self, ids: Iterable[int]) -> list[int]:
        return self._session.existing(ids)

    def checkpoint_after(self, last_id: int) -> Checkpoint:
        # The collected folder's position twice: as the row's columns (the admin view), and in the per-folder map
        # that lets a mailbox switch folders and back without skipping or repeating mail.
        position = FolderCheckpoint(self._uidvalidity, last_id)
        return {
            "uidvalidity": self._uidvalidity,
            "last_uid": last_id,
            "folder_checkpoints": with_checkpoint(self._folders, self._folder, position),
        }


class ImapSource:
    """IMAP with SASL XOAUTH2 (Exchange Online, or Dovecot locally), as the settings name it."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    @contextlib.contextmanager
    def open(
        self, mailbox: Mailbox, access_token: str, *, login_refused: LoginRefused | None = None
    ) -> Iterator[MailFolder]:
        folder = mailbox.options.folder
        with ImapSession(
            self._settings.imap_host,
            self._settings.imap_port,
            address=mailbox.address,
            access_token=access_token,
            ca_bundle=self._settings.ca_bundle,
            signed_in_as=mailbox.signed_in_as,
            refused=login_refused,
        ) as session:
            legacy = FolderCheckpoint(mailbox.uidvalidity, mailbox.last_uid)  # rows from before per-folder ones
            start = checkpoint_of(mailbox.folder_checkpoints, folder, legacy=legacy)
            # The new messages' sizes are asked with SELECT; a changed UIDVALIDITY asks again from the start.
            uidvalidity = session.select(folder, sizes_after=start.last_uid)
            last_uid = start.last_uid
            if uidvalidity != start.uidvalidity:
                if start.uidvalidity:
                    logger.warning(
                        "uidvalidity changed mailbox=%s folder=%s old=%d new=%d: collecting the folder again",
                        mailbox.address, folder, start.uidvalidity, uidvalidity,
                    )  # fmt: skip
                last_uid = 0
            yield ImapFolder(
                session, uidvalidity=uidvalidity, last_uid=last_uid, folder=folder, folders=mailbox.folder_checkpoints
            )
