"""The MIME walk: parsing within bounded memory (long content runs thinned first), the part tree walked without
recursion, attachments listed with their sizes, and a plain-text preview decoded from the head of one body part.
"""

from __future__ import annotations

import base64
import binascii
import html
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import policy as email_policy
from email.feedparser import BytesFeedParser
from email.message import Message
from email.parser import BytesParser
from html.parser import HTMLParser
from typing import Any

from collectors.envelope.headers import from_8bit, unstructured
from collectors.envelope.notes import Notes, clip, scrub, short
from shared.text_decoding import decode_text

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
FILENAME_CHARS = 255  # characters of an attachment file name (the usual file system limit)

_CONTROL_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# Blank runs become one space; a lone space is left alone (matching each gap between words cost the most).
_BLANK_RUN = re.compile(r"[ \t\u00a0]{2,}|[\t\u00a0]")
_NEWLINE_RUN = re.compile(r"\n[ \t]*(?:\n[ \t]*)+")
_BASE64_NOISE = re.compile(r"[^A-Za-z0-9+/=]")
# Lines the MIME parser can only take as content: not blank, not a boundary ("--"), not folded (leading blank),
# no colon (never a header), no lone CR (which the parser also reads as a line end). Runs of them are cut.
# Anchored at line starts, so that a long line is scanned once, not once per character; possessive, because a
# plain repeat keeps a backtracking entry per line (about two bytes for every byte it spans).
_CONTENT_RUN = re.compile(rb"(?m)^(?:[^\s:\-][^:\r\n]*+\r?\n)++")
_TAG = re.compile(r"<[^>]*>")


def new_marker() -> str:
    """A marker for the cuts of one message: random, so that mail cannot forge one."""
    return f"\x00cut-{secrets.token_hex(8)}"


def cut_marker(notes: Notes, chars: int, letters: int) -> bytes:
    """The line that stands for a cut: the characters it removed and the base64 letters among them (see
    ``_approx_size``, which removes the line and adds the counts back)."""
    return f"{notes.thin_marker} {chars} {letters}\x00\n".encode()


def letters_in(data: bytes | bytearray, start: int, end: int) -> int:
    """Bytes of ``data[start:end]`` that count as base64 letters: all but line ends, blanks and padding."""
    # Counting is a byte-by-byte loop, finding is memchr: most of these bytes are absent from a run of base64 (or
    # only in its last line, "="), so each is counted only from its first occurrence on.
    others = 0
    for c in (b"\r", b"\n", b" ", b"\t", b"="):
        first = data.find(c, start, end)
        if first >= 0:
            others += data.count(c, first, end)
    return end - start - others


def thin(raw: bytes, notes: Notes) -> bytes:
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
            notes.thin_marker = new_marker()
        pieces += [view[done:cut], cut_marker(notes, last - cut, letters_in(raw, cut, last))]
        done = last
    if not pieces:
        return raw
    pieces.append(view[done:])
    return b"".join(pieces)


def parse_message(raw: bytes, notes: Notes) -> Message:
    parser = BytesFeedParser(policy=email_policy.compat32)
    try:
        thinned = thin(raw, notes)
    except Exception:  # thinning only saves memory: never let it cost the message its structure
        thinned, notes.thin_marker = raw, ""
    try:
        view = memoryview(thinned)
        for start in range(0, len(thinned), FEED_CHUNK):
            parser.feed(bytes(view[start : start + FEED_CHUNK]))
        return parser.close()
    except Exception as exc:  # compat32 parsing is lenient; this guards against stdlib bugs on hostile input
        note_parse_failure(exc, notes)
    return headers_only(raw, notes)


def note_parse_failure(exc: Exception, notes: Notes) -> None:
    if isinstance(exc, RecursionError):
        notes.mime("MIME nesting too deep to parse; headers only")
    else:
        notes.mime(f"MIME structure could not be parsed ({type(exc).__name__}); headers only")


def headers_only(raw: bytes, notes: Notes) -> Message:
    """The message's headers, with everything after them as the payload: what is left when the parse failed."""
    try:
        return BytesParser(policy=email_policy.compat32).parsebytes(raw, headersonly=True)
    except Exception as exc:  # same reason: an envelope with no headers beats a lost message
        notes.mime(f"headers could not be parsed ({type(exc).__name__})")
        return Message(policy=email_policy.compat32)


def _walk(message: Message, notes: Notes) -> Iterator[tuple[Message, str]]:
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


def _content_type(part: Message, notes: Notes) -> str:
    try:
        value = part.get_content_type()
    except Exception:  # a hostile Content-Type must not cost the message
        notes.mime("Content-Type could not be parsed; treated as application/octet-stream")
        return "application/octet-stream"
    text, _ = from_8bit(value)
    if not text.isascii() or "\ufffd" in text:
        notes.mime("Content-Type is not ASCII")
    return scrub(text)[:255]


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
    return None if value is None else scrub(str(value))[:50]


def _filename(part: Message, notes: Notes) -> str | None:
    try:
        value = part.get_filename()
    except Exception as exc:  # see _param
        notes.header("attachments", f"file name could not be parsed ({type(exc).__name__})")
        return None
    if value is None:
        return None
    text = unstructured("attachments", str(value), notes)
    return clip(text, FILENAME_CHARS, "attachments", notes)


def _transfer_encoding(part: Message) -> str:
    return str(part.get("content-transfer-encoding", "")).strip().lower()


def _stored_payload(part: Message) -> str | None:
    """The part's payload exactly as parsed (8-bit bytes surrogate-escaped), or None for a container.

    ``get_payload()`` re-decodes 8-bit payloads with the part's declared charset: a full copy of a large part,
    and an exception for hostile charsets (``idna``, ``punycode``, a NUL in the name). The stored text avoids both.
    """
    payload = getattr(part, "_payload", None)
    return payload if isinstance(payload, str) else None


def _approx_size(part: Message, notes: Notes) -> int | None:
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


def _decode_head(part: Message, notes: Notes) -> str | None:
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
    charset: str | None = None
    try:
        charset = part.get_content_charset()
    except Exception:  # see _param
        notes.mime("text part charset could not be parsed")
    # The same decoding as the GLPI consumer's (shared.text_decoding): Outlook's labels, no-charset fallback, BOMs.
    decoded = decode_text(data, charset, final=len(payload) <= PREVIEW_SOURCE_CHARS)
    if decoded.problem:
        notes.mime(f"text part: {short(decoded.problem, 120)}")
    return decoded.text


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
    """The preview: the text with line ends, control characters and blank runs tidied, its first PREVIEW_CHARS.

    Only a prefix is tidied, longer each time until it gives that many characters: each step keeps or shortens what
    it matches, and a match cut by the prefix's end only leaves blanks at its end, which ``strip`` removes; so the
    tidied prefix is a prefix of the tidied whole. Tidying the whole head (up to 64 KB) took the most CPU of an
    envelope for a message of plain text."""
    size = PREVIEW_CHARS + PREVIEW_CHARS // 4
    while True:
        tidied = _tidy_all(text[:size])
        if len(tidied) >= PREVIEW_CHARS or size >= len(text):
            return tidied[:PREVIEW_CHARS]
        size *= 4


def _tidy_all(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL_CHARS.sub("", text)
    text = _BLANK_RUN.sub(" ", text)
    text = _NEWLINE_RUN.sub("\n\n", text)
    return scrub(text.strip())


def _is_body_text(content_type: str, disposition: str | None, filename: str | None) -> bool:
    return content_type in ("text/plain", "text/html") and disposition != "attachment" and filename is None


def body_text_type(part: Message) -> str | None:
    """``text/plain`` or ``text/html`` when ``read_body`` would take this leaf part for body text (a preview
    source) rather than an attachment, else None. Notes of its own: what matters is found again by ``read_body``."""
    scratch = Notes()
    content_type = _content_type(part, scratch)
    return content_type if _is_body_text(content_type, _disposition(part), _filename(part, scratch)) else None


@dataclass
class Body:
    content_type: str = "text/plain"
    attachments: list[dict[str, Any]] = field(default_factory=list)
    preview: str | None = None
    delivery_report: bool = False
    disposition_report: bool = False


def read_body(message: Message, notes: Notes) -> Body:
    body = Body()
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
        if _is_body_text(content_type, disposition, filename):
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
