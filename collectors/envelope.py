"""The queue envelope: what consumers learn about one collected message without fetching its raw bytes.

The collector stores the raw bytes in a blob and puts this envelope (JSON, base64 on the wire) on a Storage
queue. Everything here is pure: no I/O, no Azure imports, so it runs the same in the collector and the tests.

Mail is hostile input. Nothing in this module raises because of what a message holds: a header that cannot be
decoded is kept as it came (8-bit bytes backslash-escaped) and named in ``header_problems``; a broken MIME
structure is named in ``mime_problems``; and the encoded envelope always fits the queue's message limit, shrunk
in a fixed order that ``truncated`` records. ``schemas/envelope.v1.json`` is the published contract.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import html
import json
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy as email_policy
from email.feedparser import BytesFeedParser
from email.message import Message
from email.parser import BytesParser
from email.utils import parseaddr, parsedate_to_datetime
from html.parser import HTMLParser
from typing import Any

__all__ = [
    "LOOP_HEADER",
    "QUEUE_MARGIN",
    "QUEUE_MESSAGE_LIMIT",
    "SCHEMA",
    "build_envelope",
    "encode_for_queue",
    "encoded_size",
    "envelope_id",
]

SCHEMA = "mail-envelope/1"
# Downstream systems put this header on mail they send, so that a reply of ours coming back is seen as a loop.
LOOP_HEADER = "X-Mail-Collector-Loop"

QUEUE_MESSAGE_LIMIT = 64 * 1024  # bytes: an Azure Storage queue message, measured after base64
QUEUE_MARGIN = 1024  # bytes kept free below the limit for the service's own wrapping of the message text

PREVIEW_CHARS = 2000  # characters of plain text: enough to triage, small next to the queue limit
PREVIEW_SOURCE_CHARS = 64 * 1024  # encoded characters read from the body part: a preview never decodes 30 MB
FEED_CHUNK = 1024 * 1024  # bytes per parser feed: avoids one more full-size decoded copy of a large message
# The email parser keeps every body line as its own string, then joins them: about three times a part's size.
# Above THIN_ABOVE, long runs of plain content lines (an attachment's base64) are cut before parsing, keeping
# THIN_KEEP bytes of each run (well past what a preview reads) and a marker line with what was cut.
THIN_ABOVE = 1024 * 1024  # bytes
THIN_KEEP = 2 * PREVIEW_SOURCE_CHARS  # bytes
MAX_DEPTH = 64  # MIME nesting levels walked; real mail rarely passes 10
MAX_PARTS = 1000  # MIME parts walked per message
MAX_ADDRESSES = 500  # entries parsed per address header; the rest are only counted
ADDRESS_HEADER_CHARS = 256 * 1024  # characters of one address header scanned at all
ADDRESS_ENTRY_CHARS = 2000  # longer entries skip the strict parser, which is quadratic on some inputs
NAME_CHARS = 256  # characters of a display name
ADDRESS_CHARS = 320  # characters of an address (RFC 5321 allows 254; leave room for odd forms)
SUBJECT_CHARS = 16 * 1024  # characters of subject kept before any size-driven shortening
ID_CHARS = 998  # characters of a Message-ID or In-Reply-To (the RFC 5322 line limit)
MAX_REFERENCES = 200  # entries of References kept before any size-driven shortening
FILENAME_CHARS = 255  # characters of an attachment file name (the usual file system limit)
DATE_CHARS = 256  # characters of a Date header worth parsing
REASON_VALUE_CHARS = 100  # characters of a header value quoted in a classification reason
MAX_PROBLEMS = 50  # entries in header_problems and in mime_problems
PROBLEM_CHARS = 200  # characters of one problem entry

_ADDRESS_FIELDS = ("from", "reply_to", "to", "cc")
_HEADER_NAMES = {"from": "from", "reply_to": "reply-to", "to": "to", "cc": "cc"}
# Defects that describe valid or merely old-fashioned syntax, not text that failed to decode.
_BENIGN_DEFECTS = frozenset({"NonASCIILocalPartDefect", "ObsoleteHeaderDefect"})

_FOLD = re.compile(r"\r?\n(?=[ \t])")
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([^?\s]+)\?([^?\s]*)\?=")
_ANGLE_ID = re.compile(r"<[^<>\s]*>")
_ADDRESS_SPECIALS = re.compile(r'[\\"()<>,:;]')
_UNSAFE_CHARS = re.compile("[\x00\ud800-\udfff]")
_CONTROL_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_BLANK_RUN = re.compile(r"[ \t\u00a0]+")
_NEWLINE_RUN = re.compile(r"\n[ \t]*(?:\n[ \t]*)+")
_BASE64_NOISE = re.compile(r"[^A-Za-z0-9+/=]")
# Lines the MIME parser can only take as content: not blank, not a boundary ("--"), not folded (leading blank),
# no colon (never a header), no lone CR (which the parser also reads as a line end). Runs of them are cut.
# Anchored at line starts, so that a long line is scanned once, not once per character; possessive, because a
# plain repeat keeps a backtracking entry per line (about two bytes for every byte it spans).
_CONTENT_RUN = re.compile(rb"(?m)^(?:[^\s:\-][^:\r\n]*+\r?\n)++")
_TAG = re.compile(r"<[^>]*>")


@dataclass
class _Notes:
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
    text = _scrub(text)[:PROBLEM_CHARS]
    if text not in entries and len(entries) < MAX_PROBLEMS:
        entries.append(text)


def _scrub(text: str) -> str:
    """Escape what JSON consumers choke on: NUL and lone surrogates (never valid in UTF-8)."""
    if not _UNSAFE_CHARS.search(text):
        return text
    return _UNSAFE_CHARS.sub(lambda m: "\\x00" if m.group() == "\x00" else f"\\u{ord(m.group()):04x}", text)


def _clip(text: str, limit: int, name: str, notes: _Notes) -> str:
    if len(text) <= limit:
        return text
    notes.cut(name)
    return text[:limit]


def _short(text: str, limit: int = REASON_VALUE_CHARS) -> str:
    text = _scrub(text.strip())
    return text if len(text) <= limit else text[:limit] + "..."


# --- header text -------------------------------------------------------------------------------------------


def _unfold(value: str) -> str:
    # Stray CR or LF left inside a value by a broken message would break consumers' line-based logs.
    return _FOLD.sub("", value).replace("\r", " ").replace("\n", " ")


def _from_8bit(value: str) -> tuple[str, bool]:
    """Turn the parser's surrogate-escaped bytes into text: UTF-8 when valid (RFC 6532), else escaped bytes.

    Returns the text and whether undecodable bytes had to be escaped.
    """
    if value.isascii():
        return value, False
    try:
        data = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return _scrub(value), True
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", "backslashreplace"), True


_LATIN1_RUN = re.compile("[\x80-\xff]+")


def _escape_latin1_bytes(text: str) -> str:
    """Undo a one-character-per-byte reading: valid UTF-8 runs become text again, other bytes escapes."""
    return _LATIN1_RUN.sub(lambda m: m.group().encode("latin-1").decode("utf-8", "backslashreplace"), text)


def _header_text(name: str, value: str, notes: _Notes) -> str:
    text, escaped = _from_8bit(_unfold(value))
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


def _decode_words(text: str, name: str, notes: _Notes) -> str:
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


def _one_line(name: str, text: str, notes: _Notes) -> str:
    """Replace line breaks that decoding produced: a consumer that copies the value into a reply's headers
    must not be open to header injection."""
    if "\r" not in text and "\n" not in text:
        return text
    notes.header(name, "line break inside an encoded-word, replaced with a space")
    return text.replace("\r\n", " ").replace("\r", " ").replace("\n", " ")


def _unstructured(name: str, value: str, notes: _Notes) -> str:
    return _scrub(_one_line(name, _decode_words(_header_text(name, value, notes), name, notes), notes).strip())


# --- addresses ---------------------------------------------------------------------------------------------


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


def _address(name: str, address: str, notes: _Notes, field_name: str) -> dict[str, str]:
    if address == "<>":
        address = ""
    return {
        "name": _clip(_scrub(name.strip()), NAME_CHARS, field_name, notes),
        "address": _clip(_scrub(address.strip()), ADDRESS_CHARS, field_name, notes),
    }


def _parse_entry(field_name: str, entry: str, notes: _Notes) -> list[dict[str, str]]:
    header_name = _HEADER_NAMES[field_name]
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
            replaced = any("\ufffd" in display or _UNSAFE_CHARS.search(display) for display, _ in found)
            if replaced and "\ufffd" not in entry:
                notes.header(header_name, "display name not decodable, replacement characters used")
            if found:
                return [
                    _address(
                        _one_line(header_name, display, notes), _one_line(header_name, spec, notes), notes, field_name
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
    return [_address(_decode_words(display, header_name, notes), spec, notes, field_name)]


def _addresses(field_name: str, values: list[str], notes: _Notes) -> tuple[list[dict[str, str]], int]:
    """Parse an address header; returns at most MAX_ADDRESSES entries and the number of entries it holds."""
    header_name = _HEADER_NAMES[field_name]
    if not values:
        return [], 0
    if len(values) > 1:
        notes.header(header_name, f"header appears {len(values)} times, lists merged")
    texts: list[str] = []
    escaped = False
    for value in values:
        text, undecodable = _from_8bit(_unfold(value))
        if undecodable:
            # Backslash escapes would break the address syntax: parse one character per byte instead, and
            # escape the results afterwards (an encoded-word that decodes to Latin-1 letters in the same header
            # is escaped too: rare, and flagged).
            text = _unfold(value).encode("utf-8", "surrogateescape").decode("latin-1")
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
                "name": _clip(_escape_latin1_bytes(entry["name"]), NAME_CHARS, field_name, notes),
                "address": _clip(_escape_latin1_bytes(entry["address"]), ADDRESS_CHARS, field_name, notes),
            }
            for entry in result
        ]
    if total > MAX_ADDRESSES:
        notes.cut(field_name)
    return result, max(total, len(result))


# --- other headers -----------------------------------------------------------------------------------------


def _first(headers: dict[str, list[str]], name: str, notes: _Notes) -> str | None:
    values = headers.get(name)
    if not values:
        return None
    if len(values) > 1:
        notes.header(name, f"header appears {len(values)} times, the first is used")
    return values[0]


def _message_id(name: str, value: str | None, notes: _Notes, field_name: str) -> str | None:
    if value is None:
        return None
    text = _scrub(_header_text(name, value, notes).strip())
    match = _ANGLE_ID.search(text)
    if match:
        text = match.group()
    elif text:
        notes.header(name, "no <id> form, kept raw")
    return _clip(text, ID_CHARS, field_name, notes) or None


def _references(value: str | None, notes: _Notes) -> tuple[list[str], int]:
    if value is None:
        return [], 0
    text = _scrub(_header_text("references", value, notes))
    ids = _ANGLE_ID.findall(text) or text.split()
    total = len(ids)
    if total > MAX_REFERENCES:
        # The thread's root comes first and the parent last: keep both ends.
        ids = ids[:1] + ids[-(MAX_REFERENCES - 1) :]
        notes.cut("references")
    clipped = [_clip(i, ID_CHARS, "references", notes) for i in ids]
    return clipped, total


def _date(value: str | None, notes: _Notes) -> tuple[str | None, str | None]:
    if value is None:
        return None, None
    text = _header_text("date", value, notes).strip()
    raw = _scrub(text[:DATE_CHARS])
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


# --- MIME structure ----------------------------------------------------------------------------------------


def _thin(raw: bytes, notes: _Notes) -> bytes:
    """``raw`` with long runs of content lines cut short; each cut leaves a marker line with the characters and
    the base64 letters it removed, so that attachment sizes stay exact (see ``_approx_size``).

    Only whole content lines go, never the first THIN_KEEP bytes of a run nor its last line: what the parser
    sees as headers, boundaries and part structure is the same as in ``raw``.
    """
    if len(raw) <= THIN_ABOVE:
        return raw
    keep = THIN_KEEP
    pieces: list[bytes | memoryview] = []
    view = memoryview(raw)
    done = 0
    for run in _CONTENT_RUN.finditer(raw):
        if run.end() - run.start() <= 2 * keep:
            continue
        cut = raw.find(b"\n", run.start() + keep, run.end()) + 1
        last = raw.rfind(b"\n", cut, run.end() - 1) + 1
        if cut <= 0 or last <= cut:  # a few very long lines: nothing worth cutting between them
            continue
        if not notes.thin_marker:
            notes.thin_marker = f"\x00cut-{secrets.token_hex(8)}"
        chars = last - cut
        letters = chars - sum(raw.count(c, cut, last) for c in (b"\r", b"\n", b" ", b"\t", b"="))
        pieces += [view[done:cut], f"{notes.thin_marker} {chars} {letters}\x00\n".encode()]
        done = last
    if not pieces:
        return raw
    pieces.append(view[done:])
    return b"".join(pieces)


def _parse(raw: bytes, notes: _Notes) -> Message:
    parser = BytesFeedParser(policy=email_policy.compat32)
    try:
        thinned = _thin(raw, notes)
    except Exception:  # thinning only saves memory: never let it cost the message its structure
        thinned, notes.thin_marker = raw, ""
    try:
        view = memoryview(thinned)
        for start in range(0, len(thinned), FEED_CHUNK):
            parser.feed(bytes(view[start : start + FEED_CHUNK]))
        return parser.close()
    except RecursionError:
        notes.mime("MIME nesting too deep to parse; headers only")
    except Exception as exc:  # compat32 parsing is lenient; this guards against stdlib bugs on hostile input
        notes.mime(f"MIME structure could not be parsed ({type(exc).__name__}); headers only")
    try:
        return BytesParser(policy=email_policy.compat32).parsebytes(raw, headersonly=True)
    except Exception as exc:  # same reason: an envelope with no headers beats a lost message
        notes.mime(f"headers could not be parsed ({type(exc).__name__})")
        return Message(policy=email_policy.compat32)


def _raw_headers(message: Message) -> dict[str, list[str]]:
    headers: dict[str, list[str]] = {}
    for name, value in message.raw_items():
        headers.setdefault(str(name).strip().lower(), []).append(str(value))
    return headers


def _walk(message: Message, notes: _Notes) -> Iterator[tuple[Message, str]]:
    """Yield (part, content type) depth first, bounded in depth and count, without recursion."""
    stack: list[tuple[Message, int]] = [(message, 0)]
    seen = 0
    while stack:
        part, depth = stack.pop()
        seen += 1
        if seen > MAX_PARTS:
            notes.mime(f"more than {MAX_PARTS} MIME parts; the rest not listed")
            return
        content_type = _content_type(part, notes)
        yield part, content_type
        if content_type.startswith("message/") or not part.is_multipart():
            continue
        if depth >= MAX_DEPTH:
            notes.mime(f"MIME nesting deeper than {MAX_DEPTH} levels; deeper parts not listed")
            continue
        children = part.get_payload()
        if isinstance(children, list):
            stack.extend((child, depth + 1) for child in reversed(children) if isinstance(child, Message))


def _content_type(part: Message, notes: _Notes) -> str:
    try:
        value = part.get_content_type()
    except Exception:  # a hostile Content-Type must not cost the message
        notes.mime("Content-Type could not be parsed; treated as application/octet-stream")
        return "application/octet-stream"
    text, _ = _from_8bit(value)
    if not text.isascii() or "\ufffd" in text:
        notes.mime("Content-Type is not ASCII")
    return _scrub(text)[:255]


def _param(part: Message, name: str, header: str = "content-type") -> str | None:
    try:
        value = part.get_param(name, header=header)
    except Exception:  # parameters are parsed lazily by the stdlib: same hostile-input guard
        return None
    if isinstance(value, tuple):
        return None
    return None if value is None else str(value)


def _disposition(part: Message) -> str | None:
    try:
        value = part.get_content_disposition()
    except Exception:  # see _param
        return None
    return None if value is None else _scrub(str(value))[:50]


def _filename(part: Message, notes: _Notes) -> str | None:
    try:
        value = part.get_filename()
    except Exception as exc:  # see _param
        notes.header("attachments", f"file name could not be parsed ({type(exc).__name__})")
        return None
    if value is None:
        return None
    text = _unstructured("attachments", str(value), notes)
    return _clip(text, FILENAME_CHARS, "attachments", notes)


def _transfer_encoding(part: Message) -> str:
    return str(part.get("content-transfer-encoding", "")).strip().lower()


def _stored_payload(part: Message) -> str | None:
    """The part's payload exactly as parsed (8-bit bytes surrogate-escaped), or None for a container.

    ``get_payload()`` re-decodes 8-bit payloads with the part's declared charset: a full copy of a large part,
    and an exception for hostile charsets (``idna``, ``punycode``, a NUL in the name). The stored text avoids both.
    """
    payload = getattr(part, "_payload", None)
    return payload if isinstance(payload, str) else None


def _approx_size(part: Message, notes: _Notes) -> int | None:
    """Decoded size estimated from the encoded payload, without decoding it."""
    payload = _stored_payload(part)
    if not isinstance(payload, str):
        return None
    cut_chars = cut_letters = 0
    if notes.thin_marker and notes.thin_marker in payload:
        marks = re.compile(re.escape(notes.thin_marker) + r" (\d+) (\d+)\x00\n")
        for mark in marks.finditer(payload):
            cut_chars += int(mark.group(1))
            cut_letters += int(mark.group(2))
        payload = marks.sub("", payload)
    if _transfer_encoding(part) == "base64":
        spaces = payload.count("\n") + payload.count("\r") + payload.count(" ") + payload.count("\t")
        return (max(len(payload) - spaces - payload.count("="), 0) + cut_letters) * 3 // 4
    return len(payload) + cut_chars


def _decode_head(part: Message, notes: _Notes) -> str | None:
    """Decode only the start of a text part: enough for a preview, bounded whatever the part's size."""
    payload = _stored_payload(part)
    if payload is None:
        return None
    head = payload[:PREVIEW_SOURCE_CHARS]
    encoding = _transfer_encoding(part)
    if encoding == "base64":
        letters = _BASE64_NOISE.sub("", head).split("=", 1)[0]
        letters = letters[: len(letters) - len(letters) % 4] if len(letters) % 4 == 1 else letters
        data = base64.b64decode(letters + "=" * (-len(letters) % 4))
    elif encoding == "quoted-printable":
        data = binascii.a2b_qp(head.encode("utf-8", "surrogateescape"))
    else:
        data = head.encode("utf-8", "surrogateescape")
    charset = "utf-8"
    try:
        charset = part.get_content_charset() or "us-ascii"
    except Exception:  # see _param
        notes.mime("text part charset could not be parsed; read as UTF-8")
    try:
        return data.decode(charset, "replace")
    except Exception:  # unknown or non-text charsets (LookupError) and codecs that ignore `errors`
        notes.mime(f"text part in unknown charset {_short(charset, 40)!r}; read as UTF-8")
        return data.decode("utf-8", "replace")


class _TextOfHtml(HTMLParser):
    _BREAKS = frozenset({"br", "p", "div", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table", "blockquote"})
    _HIDDEN = frozenset({"script", "style", "head", "title"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self.length = 0
        self.hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._HIDDEN:
            self.hidden += 1
        elif tag in self._BREAKS:
            self.chunks.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._HIDDEN:
            self.hidden = max(self.hidden - 1, 0)
        elif tag in self._BREAKS:
            self.chunks.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.hidden and self.length < PREVIEW_CHARS * 2:
            self.chunks.append(data)
            self.length += len(data)


def _html_to_text(markup: str) -> str:
    extractor = _TextOfHtml()
    try:
        # No close(): the markup is a prefix of the part, and close() would emit its unfinished tail as text.
        extractor.feed(markup)
    except Exception:  # HTMLParser has raised on malformed markup in some versions: fall back to a crude strip
        return html.unescape(_TAG.sub(" ", markup))
    return "".join(extractor.chunks)


def _tidy(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL_CHARS.sub("", text)
    text = _BLANK_RUN.sub(" ", text)
    text = _NEWLINE_RUN.sub("\n\n", text)
    return _scrub(text.strip())[:PREVIEW_CHARS]


@dataclass
class _Body:
    content_type: str = "text/plain"
    attachments: list[dict[str, Any]] = field(default_factory=list)
    preview: str | None = None
    delivery_report: bool = False
    disposition_report: bool = False


def _body(message: Message, notes: _Notes) -> _Body:
    body = _Body()
    plain: Message | None = None
    markup: Message | None = None
    for index, (part, content_type) in enumerate(_walk(message, notes)):
        if index == 0:
            body.content_type = content_type
        for defect in part.defects:
            notes.mime(type(defect).__name__)
        if content_type == "multipart/report":
            report_type = (_param(part, "report-type") or "").strip().lower()
            body.delivery_report |= report_type in ("delivery-status", "global-delivery-status")
            body.disposition_report |= report_type in ("disposition-notification", "global-disposition-notification")
        if content_type in ("message/delivery-status", "message/global-delivery-status"):
            body.delivery_report = True
        if content_type.startswith("multipart/") and part.is_multipart():
            continue
        disposition = _disposition(part)
        filename = _filename(part, notes)
        if content_type in ("text/plain", "text/html") and disposition != "attachment" and filename is None:
            # Body text, not a file: the first of each kind feeds the preview, later ones (list footers,
            # alternative versions) are text of the same message.
            if content_type == "text/plain":
                plain = plain or part
            else:
                markup = markup or part
            continue
        body.attachments.append(
            {
                "filename": filename,
                "content_type": content_type,
                "size": _approx_size(part, notes),
                "disposition": disposition,
            }
        )
    source = plain or markup
    if source is not None:
        text = _decode_head(source, notes)
        if text is not None and source is markup:
            text = _html_to_text(text)
        body.preview = _tidy(text) if text else None
        if body.preview == "":
            body.preview = None
    return body


# --- classification ----------------------------------------------------------------------------------------


def _classify(headers: dict[str, list[str]], body: _Body, from_: list[dict[str, str]]) -> dict[str, Any]:
    """Flag what consumers must not answer or must treat apart; each flag names the header behind it."""
    reasons: list[str] = []
    flags = {"auto_reply": False, "bounce": False, "bulk": False, "list": False, "loop": False}

    def value(name: str) -> str | None:
        values = headers.get(name)
        return _from_8bit(_unfold(values[0]))[0].strip() if values else None

    def flag(name: str, reason: str) -> None:
        flags[name] = True
        if reason not in reasons:
            reasons.append(reason)

    auto_submitted = value("auto-submitted")
    if auto_submitted is not None and auto_submitted.split(";", 1)[0].strip().lower() != "no":
        flag("auto_reply", f"auto-submitted: {_short(auto_submitted)}")
    suppress = value("x-auto-response-suppress")
    if suppress is not None and {"all", "oof", "autoreply"} & set(re.split(r"[\s,]+", suppress.lower())):
        flag("auto_reply", f"x-auto-response-suppress: {_short(suppress)}")
    for name in ("x-autoreply", "x-autorespond"):
        if value(name) is not None:
            flag("auto_reply", f"{name} present")
    if body.disposition_report:
        flag("auto_reply", "multipart/report: disposition-notification")

    precedence = value("precedence")
    if precedence is not None:
        kind = re.split(r"[\s;(]", precedence.lower(), maxsplit=1)[0]
        if kind in ("bulk", "junk", "list"):
            flag("bulk", f"precedence: {_short(precedence)}")
        if kind == "list":
            flag("list", f"precedence: {_short(precedence)}")
        if kind == "auto_reply":
            flag("auto_reply", f"precedence: {_short(precedence)}")
    for name in ("list-id", "list-unsubscribe", "list-post"):
        if value(name) is not None:
            flag("list", f"{name} present")

    if body.delivery_report:
        flag("bounce", "multipart/report: delivery-status")
    if value("x-failed-recipients") is not None:
        flag("bounce", "x-failed-recipients present")
    null_sender = any(v.strip() == "<>" for v in (_unfold(raw) for raw in headers.get("return-path", [])))
    if null_sender:
        reasons.append("return-path: <> (null sender)")
        mailer = any(a["address"].split("@", 1)[0].lower() in ("mailer-daemon", "postmaster") for a in from_)
        # RFC 3834 auto-replies use the null sender too: without another sign, a null sender is a bounce.
        if mailer or not flags["auto_reply"]:
            flag("bounce", "return-path: <> (null sender)")

    loop_header = LOOP_HEADER.lower()
    for name in (loop_header, "x-loop"):
        loop = value(name)
        if loop is not None:
            flag("loop", f"{name}: {_short(loop)}")
    return {**flags, "reasons": reasons}


# --- size --------------------------------------------------------------------------------------------------


def _dumps(envelope: dict[str, Any]) -> str:
    return json.dumps(envelope, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def encoded_size(envelope: dict[str, Any]) -> int:
    """Bytes the envelope takes on the queue: its compact UTF-8 JSON, base64-encoded."""
    return 4 * -(-len(_dumps(envelope).encode("utf-8")) // 3)


def _budget(max_encoded_bytes: int) -> int:
    """Largest JSON size (bytes) whose base64 stays under the limit less the margin."""
    return max((max_encoded_bytes - QUEUE_MARGIN) // 4 * 3, 0)


# Size-driven shortening, in rounds: each round walks the published order (preview, address lists,
# references, subject, attachments) with a harsher bound than the round before, so that one huge field does not
# cost every field before it in the order its full content.
_SHRINK_ROUNDS: tuple[tuple[tuple[str, int], ...], ...] = (
    (("preview", 500), ("addresses", 100), ("references", 10), ("subject", 1000), ("attachments", 50)),
    (("preview", 0), ("addresses", 20), ("references", 2), ("subject", 200), ("attachments", 10)),
    (("addresses", 5), ("attachments", 0)),
    (("addresses", 1),),
)


def _shorten(envelope: dict[str, Any], name: str, size: int, notes: _Notes) -> bool:
    """Bound one field to ``size`` entries or characters (0 empties it); True when something was cut."""
    value = envelope[name]
    if value is None or len(value) <= size:
        return False
    if name == "references" and size > 1:
        # The thread's root comes first and the parent last: keep both ends.
        envelope[name] = value[:1] + value[-(size - 1) :]
    elif name == "preview" and size == 0:
        envelope[name] = None
    else:
        envelope[name] = value[:size]
    notes.cut(name)
    return True


def _shrink_steps(envelope: dict[str, Any], notes: _Notes) -> Iterator[None]:
    """Shorten fields one step per iteration, until the caller stops asking."""
    for bounds in _SHRINK_ROUNDS:
        for name, size in bounds:
            names = _ADDRESS_FIELDS if name == "addresses" else (name,)
            if any([_shorten(envelope, each, size, notes) for each in names]):
                yield
    # Last resort, for headers built to hurt: bound every remaining free-text field.
    for name in ("header_problems", "mime_problems"):
        _shorten(envelope, name, 5, notes)
    classification = envelope["classification"]
    if len(classification["reasons"]) > 5:
        classification["reasons"] = classification["reasons"][:5]
        notes.cut("classification")
    for name in _ADDRESS_FIELDS:
        for entry in envelope[name]:
            entry["name"] = _clip(entry["name"], 64, name, notes)
    for name, size in (("message_id", 128), ("in_reply_to", 128), ("date_raw", 64), ("references", 0)):
        _shorten(envelope, name, size, notes)
    _shorten(envelope, "subject", 50, notes)
    yield
    _shorten(envelope, "folder", 256, notes)
    yield


_DONE = object()


def _fit(envelope: dict[str, Any], notes: _Notes, max_encoded_bytes: int) -> None:
    budget = _budget(max_encoded_bytes)
    steps = _shrink_steps(envelope, notes)
    while len(_dumps(envelope).encode("utf-8")) > budget:
        if next(steps, _DONE) is _DONE:
            raise ValueError(
                f"envelope cannot fit in {max_encoded_bytes} bytes: the mailbox, folder or blob given is too large"
            )


# --- public API --------------------------------------------------------------------------------------------


def envelope_id(mailbox: str, uidvalidity: int, uid: int) -> str:
    """The stable id of a collected message: the same mailbox, UIDVALIDITY and UID always give the same id.

    Consumers drop duplicates by it (delivery is at least once). The mailbox is lower-cased, as Exchange
    treats addresses case-insensitively.

    Raises:
        ValueError: an empty mailbox, or a UIDVALIDITY or UID outside the IMAP range (unsigned 32 bits).
    """
    mailbox = mailbox.strip().lower()
    if not mailbox:
        raise ValueError("mailbox is empty")
    for name, number in (("uidvalidity", uidvalidity), ("uid", uid)):
        if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number < 2**32:
            raise ValueError(f"{name} must be an integer in 0..2**32-1, not {number!r}")
    return f"{mailbox}/{uidvalidity}/{uid}"


def build_envelope(
    raw: bytes,
    *,
    mailbox: str,
    folder: str,
    uidvalidity: int,
    uid: int,
    blob_url: str,
    blob_name: str,
    collected_at: datetime,
    blob_container: str | None = None,
    max_encoded_bytes: int = QUEUE_MESSAGE_LIMIT,
) -> dict[str, Any]:
    """Describe one message for the queue; the result matches ``schemas/envelope.v1.json``.

    Never raises because of the message's content: undecodable headers are kept raw and listed in
    ``header_problems``, MIME damage in ``mime_problems``. The encoded envelope (see ``encode_for_queue``)
    stays under ``max_encoded_bytes`` less a margin; fields shortened to get there are listed in ``truncated``,
    and ``id``, ``uid``, ``sha256`` and ``blob`` are never shortened. A naive ``collected_at`` is taken as UTC.

    Raises:
        ValueError: invalid ids (see ``envelope_id``), or caller-supplied metadata too large to ever fit.
    """
    notes = _Notes()
    message = _parse(raw, notes)
    headers = _raw_headers(message)

    lists: dict[str, list[dict[str, str]]] = {}
    counts: dict[str, int] = {}
    for name in _ADDRESS_FIELDS:
        lists[name], counts[name] = _addresses(name, headers.get(_HEADER_NAMES[name], []), notes)
    references, counts["references"] = _references(_first(headers, "references", notes), notes)
    subject_raw = _first(headers, "subject", notes)
    subject = None if subject_raw is None else _unstructured("subject", subject_raw, notes)
    date, date_raw = _date(_first(headers, "date", notes), notes)
    body = _body(message, notes)
    counts["attachments"] = len(body.attachments)

    if collected_at.tzinfo is None:
        collected_at = collected_at.replace(tzinfo=UTC)
    envelope: dict[str, Any] = {
        "schema": SCHEMA,
        "id": envelope_id(mailbox, uidvalidity, uid),
        "mailbox": mailbox,
        "folder": folder,
        "uidvalidity": uidvalidity,
        "uid": uid,
        "message_id": _message_id("message-id", _first(headers, "message-id", notes), notes, "message_id"),
        "in_reply_to": _message_id("in-reply-to", _first(headers, "in-reply-to", notes), notes, "in_reply_to"),
        "references": references,
        "from": lists["from"],
        "reply_to": lists["reply_to"],
        "to": lists["to"],
        "cc": lists["cc"],
        "subject": None if subject is None else _clip(subject, SUBJECT_CHARS, "subject", notes),
        "date": date,
        "date_raw": date_raw,
        "size": len(raw),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "blob": {"container": blob_container, "name": blob_name, "url": blob_url},
        "content_type": body.content_type,
        "attachments": body.attachments,
        "classification": _classify(headers, body, lists["from"]),
        "preview": body.preview,
        "collected_at": collected_at.isoformat(),
        "counts": counts,
        "truncated": notes.truncated,
        "header_problems": notes.header_problems,
        "mime_problems": notes.mime_problems,
    }
    _fit(envelope, notes, max_encoded_bytes)
    return envelope


def encode_for_queue(envelope: dict[str, Any], *, max_encoded_bytes: int = QUEUE_MESSAGE_LIMIT) -> str:
    """The envelope as compact JSON text, ready for a queue client that base64-encodes it.

    Raises:
        ValueError: the base64 of the text would exceed ``max_encoded_bytes`` (only an envelope altered after
            ``build_envelope`` can).
    """
    text = _dumps(envelope)
    size = 4 * -(-len(text.encode("utf-8")) // 3)
    if size > max_encoded_bytes:
        raise ValueError(f"envelope takes {size} bytes after base64, over the {max_encoded_bytes}-byte limit")
    return text
