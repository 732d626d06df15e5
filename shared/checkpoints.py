"""Where a mailbox's collection stands, per folder, and the after-action that is still owed.

Both live in the mailbox's registry row as JSON text, written only by the run that holds the mailbox's lease:

- ``folder_checkpoints``: {folder identity: [UIDVALIDITY, last UID]} for every folder collected so far, so that
  switching the collected folder and back neither skips mail nor collects it twice;
- ``pending_after_action``: the messages of a batch that are stored and queued but whose after-action the server
  refused (a folder it cannot create, a permission). The checkpoint moves past them, so they are not queued again;
  the next run applies the after-action first, with the options of that time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from shared.folders import folder_identity


@dataclass(frozen=True)
class Checkpoint:
    uidvalidity: int = 0
    last_uid: int = 0


def read_checkpoints(text: str) -> dict[str, Checkpoint]:
    """The stored map; an empty or unreadable text is an empty map (rows written before it existed)."""
    try:
        data = json.loads(text or "{}")
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    found: dict[str, Checkpoint] = {}
    for folder, pair in data.items():
        if isinstance(pair, list) and len(pair) == 2 and all(isinstance(n, int) for n in pair):
            found[str(folder)] = Checkpoint(pair[0], pair[1])
    return found


def checkpoint_of(text: str, folder: str, *, legacy: Checkpoint) -> Checkpoint:
    """The checkpoint of ``folder``. A row without any map (written before per-folder checkpoints) has only one
    checkpoint, ``legacy``, which belonged to the folder it was collecting."""
    stored = read_checkpoints(text)
    if not stored:
        return legacy
    return stored.get(folder_identity(folder), Checkpoint())


def with_checkpoint(text: str, folder: str, checkpoint: Checkpoint) -> str:
    """The map with ``folder`` at ``checkpoint``, the other folders' checkpoints kept."""
    stored = read_checkpoints(text)
    stored[folder_identity(folder)] = checkpoint
    return json.dumps({k: [v.uidvalidity, v.last_uid] for k, v in sorted(stored.items())}, separators=(",", ":"))


@dataclass(frozen=True)
class PendingAfterAction:
    """Messages stored and queued whose after-action is still to be done."""

    folder: str
    uidvalidity: int
    stored: tuple[int, ...]
    refused: frozenset[int] = frozenset()

    def to_text(self) -> str:
        return json.dumps(
            {
                "folder": self.folder,
                "uidvalidity": self.uidvalidity,
                "stored": list(self.stored),
                "refused": sorted(self.refused),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_text(cls, text: str) -> PendingAfterAction | None:
        """None for an empty text (nothing pending) or one that cannot be read."""
        if not text:
            return None
        try:
            data = json.loads(text)
            return cls(
                folder=str(data["folder"]),
                uidvalidity=int(data["uidvalidity"]),
                stored=tuple(int(u) for u in data["stored"]),
                refused=frozenset(int(u) for u in data.get("refused", [])),
            )
        except (ValueError, KeyError, TypeError):
            return None
