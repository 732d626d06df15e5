"""IMAP folder names an admin may choose (the collected folder, ``move_to``, ``refuse_to``), and when two names mean
the same folder.

A folder name travels into IMAP commands (SELECT, LIST, CREATE, MOVE) in modified UTF-7 (RFC 3501, 5.1.3), which
imapclient applies. What cannot be sent safely, or would be read by the server as something else, is refused here:
control and format characters (CR, LF, NUL, the bidi overrides), lone surrogates (no UTF-7 form), and the LIST
wildcards ``*`` and ``%`` (``LIST "" "*"`` matches every folder, so an existence check of ``*`` would always say
yes and the folder would never be created).
"""

from __future__ import annotations

import re
import unicodedata

MAX_FOLDER_CHARS = 200  # Exchange allows 255 per path; the rest of a path leaves room for its parents
MAX_FOLDER_DEPTH = 10  # levels below the root: deeper paths are a typo or a crafted value
# Exchange Online separates levels with "/", Dovecot with "." or "/" as configured: both count as a level.
_DELIMITERS = re.compile(r"[/.]")
_REFUSED_CATEGORIES = ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")  # controls, format (bidi), surrogates, unassigned
_WILDCARDS = "*%"
_QUOTE_BREAKERS = '\r\n"\0'


class InvalidFolderError(ValueError):
    """The text is not a folder name this app sends to the server; the message says why in plain words."""


def check_folder(name: str, option: str) -> str:
    """Return ``name`` without surrounding spaces, or raise InvalidFolderError naming ``option``."""
    text = name.strip(" ")
    if not text:
        raise InvalidFolderError(f"{option} must name a folder")
    if len(text) > MAX_FOLDER_CHARS:
        raise InvalidFolderError(f"{option} is longer than {MAX_FOLDER_CHARS} characters")
    for char in text:
        if unicodedata.category(char) in _REFUSED_CATEGORIES:
            raise InvalidFolderError(
                f"{option} holds an invisible or control character (U+{ord(char):04X}); type the folder name again"
            )
        if char in _WILDCARDS:
            raise InvalidFolderError(f"{option} may not hold {char!r}: IMAP reads it as a wildcard")
        if char in '"\\':
            raise InvalidFolderError(f"{option} may not hold quotes or backslashes")
    levels = _DELIMITERS.split(text)
    if any(not level.strip() for level in levels):
        raise InvalidFolderError(f"{option} has an empty level (a leading, trailing or doubled '/' or '.')")
    if len(levels) > MAX_FOLDER_DEPTH:
        raise InvalidFolderError(f"{option} is nested deeper than {MAX_FOLDER_DEPTH} levels")
    return text


def check_stored_folder(name: str, option: str) -> None:
    """The rule every stored option keeps, rows written before ``check_folder``'s stricter rules included: nothing
    that would break out of the quoted folder name in an IMAP command. Raises InvalidFolderError naming ``option``."""
    if any(c in name for c in _QUOTE_BREAKERS) or len(name) > MAX_FOLDER_CHARS:
        raise InvalidFolderError(f"{option} must be a plain folder name")


def folder_identity(name: str) -> str:
    """What a server would take the name to mean, for comparing two names: case and the level delimiter do not
    matter (INBOX is case-insensitive everywhere, Exchange's other names too), nor spaces around a level."""
    levels = _DELIMITERS.split(unicodedata.normalize("NFC", name.strip()))
    return "/".join(level.strip().casefold() for level in levels)


def same_folder(a: str, b: str) -> bool:
    """True when ``a`` and ``b`` may name the same folder on some server."""
    return bool(a and b) and folder_identity(a) == folder_identity(b)
