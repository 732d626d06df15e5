"""What went wrong while building one envelope, and the text helpers every part of the envelope shares.

Mail is hostile input: every list kept here is bounded, and text is scrubbed of what JSON consumers choke on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

REASON_VALUE_CHARS = 100  # characters of a header value quoted in a classification reason
MAX_PROBLEMS = 50  # entries in header_problems and in mime_problems
PROBLEM_CHARS = 200  # characters of one problem entry

UNSAFE_CHARS = re.compile("[\x00\ud800-\udfff]")


@dataclass
class Notes:
    """What went wrong while building one envelope: kept bounded so that hostile mail cannot inflate it."""

    header_problems: list[str] = field(default_factory=list)
    mime_problems: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    thin_marker: str = ""  # starts each marker line of a cut run (random per message: mail cannot forge one)

    def header(self, name: str, text: str) -> None:
        _append_bounded(self.header_problems, f"{name}: {text}")

    def mime(self, text: str) -> None:
        _append_bounded(self.mime_problems, text)

    def cut(self, name: str) -> None:
        if name not in self.truncated:
            self.truncated.append(name)


def _append_bounded(entries: list[str], text: str) -> None:
    text = scrub(text)[:PROBLEM_CHARS]
    if text not in entries and len(entries) < MAX_PROBLEMS:
        entries.append(text)


def scrub(text: str) -> str:
    """Escape what JSON consumers choke on: NUL and lone surrogates (never valid in UTF-8)."""
    if not UNSAFE_CHARS.search(text):
        return text
    return UNSAFE_CHARS.sub(lambda m: "\\x00" if m.group() == "\x00" else f"\\u{ord(m.group()):04x}", text)


def clip(text: str, limit: int, name: str, notes: Notes) -> str:
    if len(text) <= limit:
        return text
    notes.cut(name)
    return text[:limit]


def short(text: str, limit: int = REASON_VALUE_CHARS) -> str:
    text = scrub(text.strip())
    return text if len(text) <= limit else text[:limit] + "..."
