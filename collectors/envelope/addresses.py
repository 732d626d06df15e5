"""Address headers (From, Reply-To, To, Cc): split linearly, parsed strictly where that is safe, leniently where
it is not, bounded in count and length.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from email import policy as email_policy
from email.utils import parseaddr

from collectors.envelope.headers import decode_words, escape_latin1_bytes, from_8bit, one_line, unfold
from collectors.envelope.notes import UNSAFE_CHARS, Notes, clip, scrub

MAX_ADDRESSES = 500  # entries parsed per address header; the rest are only counted
ADDRESS_HEADER_CHARS = 256 * 1024  # characters of one address header scanned at all
ADDRESS_ENTRY_CHARS = 2000  # longer entries skip the strict parser, which is quadratic on some inputs
NAME_CHARS = 256  # characters of a display name
ADDRESS_CHARS = 320  # characters of an address (RFC 5321 allows 254; leave room for odd forms)

ADDRESS_FIELDS = ("from", "reply_to", "to", "cc")
HEADER_NAMES = {"from": "from", "reply_to": "reply-to", "to": "to", "cc": "cc"}
# Defects that describe valid or merely old-fashioned syntax, not text that failed to decode.
_BENIGN_DEFECTS = frozenset({"NonASCIILocalPartDefect", "ObsoleteHeaderDefect"})
_ADDRESS_SPECIALS = re.compile(r'[\\"()<>,:;]')


def _split_addresses(text: str) -> Iterator[str]:
    """Split an address list at top-level commas (and group syntax), linear in the header's length.

    The strict parser of the standard library is quadratic on some hostile lists; splitting first keeps each
    piece small.
    """
    start = 0
    quoted = False
    comment_depth = 0
    angle = False
    skip_at = -1
    for match in _ADDRESS_SPECIALS.finditer(text):
        at = match.start()
        if at == skip_at:
            continue
        char = match.group()
        if char == "\\":
            if quoted or comment_depth:
                skip_at = at + 1
        elif quoted:
            quoted = char != '"'
        elif comment_depth:
            comment_depth += {"(": 1, ")": -1}.get(char, 0)
        elif char == '"':
            quoted = True
        elif char == "(":
            comment_depth = 1
        elif char == "<":
            angle = True
        elif char == ">":
            angle = False
        elif angle:
            continue
        elif char == ":":
            start = at + 1  # a group's display name carries no address
        elif char in ",;":
            entry = text[start:at].strip()
            if entry:
                yield entry
            start = at + 1
    entry = text[start:].strip()
    if entry:
        yield entry


def _address(name: str, address: str, notes: Notes, field_name: str) -> dict[str, str]:
    if address == "<>":
        address = ""
    return {
        "name": clip(scrub(name.strip()), NAME_CHARS, field_name, notes),
        "address": clip(scrub(address.strip()), ADDRESS_CHARS, field_name, notes),
    }


def _parse_entry(field_name: str, entry: str, notes: Notes) -> list[dict[str, str]]:
    header_name = HEADER_NAMES[field_name]
    if len(entry) <= ADDRESS_ENTRY_CHARS:
        try:
            parsed = email_policy.default.header_factory(header_name, entry)
            found = [(a.display_name, a.addr_spec) for a in parsed.addresses]
            defects = [d for d in parsed.defects if type(d).__name__ not in _BENIGN_DEFECTS]
        except Exception as exc:  # the strict parser has crashed on hostile input before: never lose the mail
            notes.header(header_name, f"entry could not be parsed ({type(exc).__name__}), parsed leniently")
        else:
            for defect in defects:
                notes.header(header_name, f"{type(defect).__name__}: {defect}")
            replaced = any("\ufffd" in display or UNSAFE_CHARS.search(display) for display, _ in found)
            if replaced and "\ufffd" not in entry:
                notes.header(header_name, "display name not decodable, replacement characters used")
            if found:
                return [
                    _address(
                        one_line(header_name, display, notes), one_line(header_name, spec, notes), notes, field_name
                    )
                    for display, spec in found
                ]
    else:
        notes.header(header_name, f"entry longer than {ADDRESS_ENTRY_CHARS} characters, parsed leniently")
    try:
        display, spec = parseaddr(entry)
    except Exception:  # the lenient parser recurses on nested comments (RecursionError): keep the entry raw
        notes.header(header_name, "entry could not be parsed, kept raw")
        display, spec = "", ""
    if not display and not spec:
        return [_address(entry, "", notes, field_name)]
    return [_address(decode_words(display, header_name, notes), spec, notes, field_name)]


def parse_addresses(field_name: str, values: list[str], notes: Notes) -> tuple[list[dict[str, str]], int]:
    """Parse an address header; returns at most MAX_ADDRESSES entries and the number of entries it holds."""
    header_name = HEADER_NAMES[field_name]
    if not values:
        return [], 0
    if len(values) > 1:
        notes.header(header_name, f"header appears {len(values)} times, lists merged")
    texts: list[str] = []
    escaped = False
    for value in values:
        text, undecodable = from_8bit(unfold(value))
        if undecodable:
            # Backslash escapes would break the address syntax: parse one character per byte instead, and
            # escape the results afterwards (an encoded-word that decodes to Latin-1 letters in the same header
            # is escaped too: rare, and flagged).
            text = unfold(value).encode("utf-8", "surrogateescape").decode("latin-1")
            escaped = True
            notes.header(header_name, "8-bit bytes that are not UTF-8, kept backslash-escaped")
        if "\x00" in text:
            notes.header(header_name, "NUL byte, kept escaped")
        texts.append(text)
    text = ", ".join(texts)
    if len(text) > ADDRESS_HEADER_CHARS:
        notes.header(header_name, f"longer than {ADDRESS_HEADER_CHARS} characters, the rest not read")
        notes.cut(field_name)
        text = text[:ADDRESS_HEADER_CHARS]
    result: list[dict[str, str]] = []
    total = 0
    for entry in _split_addresses(text):
        total += 1
        if total <= MAX_ADDRESSES:
            result.extend(_parse_entry(field_name, entry, notes))
    if escaped:
        result = [
            {
                "name": clip(escape_latin1_bytes(entry["name"]), NAME_CHARS, field_name, notes),
                "address": clip(escape_latin1_bytes(entry["address"]), ADDRESS_CHARS, field_name, notes),
            }
            for entry in result
        ]
    if total > MAX_ADDRESSES:
        notes.cut(field_name)
    return result, max(total, len(result))
