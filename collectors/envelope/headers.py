"""Header text: unfolding, 8-bit bytes, RFC 2047 encoded-words, and the single-valued headers (Message-ID,
In-Reply-To, References, Date). Nothing here raises because of what a header holds: problems become notes.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import UTC
from email.message import Message
from email.utils import parsedate_to_datetime

from collectors.envelope.notes import Notes, clip, scrub

SUBJECT_CHARS = 16 * 1024  # characters of subject kept before any size-driven shortening
ID_CHARS = 998  # characters of a Message-ID or In-Reply-To (the RFC 5322 line limit)
MAX_REFERENCES = 200  # entries of References kept before any size-driven shortening
DATE_CHARS = 256  # characters of a Date header worth parsing

_FOLD = re.compile(r"\r?\n(?=[ \t])")
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([^?\s]+)\?([^?\s]*)\?=")
_ANGLE_ID = re.compile(r"<[^<>\s]*>")


def unfold(value: str) -> str:
    # Stray CR or LF left inside a value by a broken message would break consumers' line-based logs.
    return _FOLD.sub("", value).replace("\r", " ").replace("\n", " ")


def from_8bit(value: str) -> tuple[str, bool]:
    """Turn the parser's surrogate-escaped bytes into text: UTF-8 when valid (RFC 6532), else escaped bytes.

    Returns the text and whether undecodable bytes had to be escaped.
    """
    if value.isascii():
        return value, False
    try:
        data = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return scrub(value), True
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", "backslashreplace"), True


_LATIN1_RUN = re.compile("[\x80-\xff]+")


def escape_latin1_bytes(text: str) -> str:
    """Undo a one-character-per-byte reading: valid UTF-8 runs become text again, other bytes escapes."""
    return _LATIN1_RUN.sub(lambda m: m.group().encode("latin-1").decode("utf-8", "backslashreplace"), text)


def header_text(name: str, value: str, notes: Notes) -> str:
    text, escaped = from_8bit(unfold(value))
    if escaped:
        notes.header(name, "8-bit bytes that are not UTF-8, kept backslash-escaped")
    if "\x00" in text:
        notes.header(name, "NUL byte, kept escaped")
    return text


def _b64_word(payload: str) -> bytes | None:
    try:
        return base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def decode_words(text: str, name: str, notes: Notes) -> str:
    """Decode RFC 2047 encoded-words; a word that cannot be decoded stays verbatim and is flagged.

    Adjacent words in one charset are joined before decoding, because mailers split multibyte characters
    across them.
    """
    if "=?" not in text:
        return text
    out: list[str] = []
    run_charset = ""
    run_bytes: list[bytes] = []
    run_start = run_end = 0
    position = 0
    after_word = False

    def flush() -> None:
        nonlocal run_bytes
        if not run_bytes:
            return
        data = b"".join(run_bytes)
        try:
            out.append(data.decode(run_charset))
        except LookupError:
            notes.header(name, f"unknown charset {run_charset[:40]!r} in encoded-word, kept raw")
            out.append(text[run_start:run_end])
        except (UnicodeError, ValueError):
            notes.header(name, f"bytes invalid in charset {run_charset[:40]!r}, kept raw")
            out.append(text[run_start:run_end])
        run_bytes = []

    for match in _ENCODED_WORD.finditer(text):
        between = text[position : match.start()]
        if between and not (after_word and between.isspace()):
            flush()
            out.append(between)
        charset = match.group(1).split("*", 1)[0].lower()
        encoding = match.group(2).lower()
        payload = match.group(3)
        data: bytes | None
        if encoding == "b":
            data = _b64_word(payload)
            if data is None:
                notes.header(name, "invalid base64 in encoded-word, kept raw")
        elif encoding == "q":
            data = binascii.a2b_qp(payload.encode("utf-8", "surrogateescape"), header=True)
        else:
            notes.header(name, f"unknown encoded-word encoding {encoding[:10]!r}, kept raw")
            data = None
        if data is None:
            flush()
            out.append(match.group())
        else:
            if run_bytes and charset != run_charset:
                flush()
            if not run_bytes:
                run_charset, run_start = charset, match.start()
            run_bytes.append(data)
            run_end = match.end()
        position = match.end()
        after_word = True
    flush()
    out.append(text[position:])
    return "".join(out)


def one_line(name: str, text: str, notes: Notes) -> str:
    """Replace line breaks that decoding produced: a consumer that copies the value into a reply's headers
    must not be open to header injection."""
    if "\r" not in text and "\n" not in text:
        return text
    notes.header(name, "line break inside an encoded-word, replaced with a space")
    return text.replace("\r\n", " ").replace("\r", " ").replace("\n", " ")


def unstructured(name: str, value: str, notes: Notes) -> str:
    return scrub(one_line(name, decode_words(header_text(name, value, notes), name, notes), notes).strip())


def raw_headers(message: Message) -> dict[str, list[str]]:
    headers: dict[str, list[str]] = {}
    for name, value in message.raw_items():
        headers.setdefault(str(name).strip().lower(), []).append(str(value))
    return headers


def first_header(headers: dict[str, list[str]], name: str, notes: Notes) -> str | None:
    values = headers.get(name)
    if not values:
        return None
    if len(values) > 1:
        notes.header(name, f"header appears {len(values)} times, the first is used")
    return values[0]


def parse_message_id(name: str, value: str | None, notes: Notes, field_name: str) -> str | None:
    if value is None:
        return None
    text = scrub(header_text(name, value, notes).strip())
    match = _ANGLE_ID.search(text)
    if match:
        text = match.group()
    elif text:
        notes.header(name, "no <id> form, kept raw")
    return clip(text, ID_CHARS, field_name, notes) or None


def parse_references(value: str | None, notes: Notes) -> tuple[list[str], int]:
    if value is None:
        return [], 0
    text = scrub(header_text("references", value, notes))
    ids = _ANGLE_ID.findall(text) or text.split()
    total = len(ids)
    if total > MAX_REFERENCES:
        # The thread's root comes first and the parent last: keep both ends.
        ids = ids[:1] + ids[-(MAX_REFERENCES - 1) :]
        notes.cut("references")
    clipped = [clip(i, ID_CHARS, "references", notes) for i in ids]
    return clipped, total


def parse_date(value: str | None, notes: Notes) -> tuple[str | None, str | None]:
    if value is None:
        return None, None
    text = header_text("date", value, notes).strip()
    raw = scrub(text[:DATE_CHARS])
    if len(text) > DATE_CHARS:
        notes.header("date", f"longer than {DATE_CHARS} characters")
        notes.cut("date_raw")
    try:
        parsed = parsedate_to_datetime(text[:DATE_CHARS])
    except Exception:  # parsedate has raised TypeError, ValueError, IndexError and OverflowError across versions
        notes.header("date", "not an RFC 5322 date")
        return None, raw
    if parsed.tzinfo is None:
        # "-0000" means UTC with the sender's zone unknown (RFC 5322 3.3).
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.isoformat(), raw
