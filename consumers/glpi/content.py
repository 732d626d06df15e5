"""What a ticket shows of a message: its title, its text as safe HTML, its attachments and inline images.

Pure functions over the raw ``.eml`` bytes: no I/O. The body is chosen as GLPI's MailCollector::getBody chooses it
(the first HTML part, else the first plain-text part), every text part is decoded with ``shared.text_decoding``,
HTML is reduced to an allow-list of tags and attributes, and quoted history is cut from replies.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email import policy as email_policy
from email.header import decode_header, make_header
from email.message import Message
from html.parser import HTMLParser

from shared.text_decoding import decode_text

TITLE_MAX_CHARS = 250  # glpi_tickets.name is a varchar(255)
NO_SUBJECT = "(no subject)"
MAX_PARTS = 500  # a message with more leaf parts is cut here (each becomes a document or a note)
MAX_DEPTH = 20

# Tags and attributes kept in ticket content; everything else is dropped (its text is kept).
ALLOWED_TAGS = frozenset(
    {
        "a", "abbr", "b", "blockquote", "br", "caption", "code", "col", "colgroup", "dd", "del", "div", "dl", "dt",
        "em", "font", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i", "img", "ins", "li", "ol", "p", "pre", "q", "s",
        "small", "span", "strike", "strong", "sub", "sup", "table", "tbody", "td", "tfoot", "th", "thead", "tr",
        "tt", "u", "ul",
    }
)  # fmt: skip
ALLOWED_ATTRIBUTES = frozenset(
    ["href", "src", "alt", "title", "width", "height", "colspan", "rowspan", "align", "valign", "color", "size", "dir"]
)
VOID_TAGS = frozenset({"br", "hr", "img", "col"})
DROPPED_WITH_CONTENT = frozenset({"script", "style", "head", "title", "object", "embed", "iframe", "noscript", "svg"})
SAFE_URL = re.compile(r"^(https?:|mailto:|cid:|/front/document\.send\.php)", re.IGNORECASE)

# Where quoted history begins in a reply, in the forms the common mailers write.
_HTML_QUOTE_START = re.compile(
    r"<div[^>]*\b(?:class=\"?gmail_quote|id=\"?divRplyFwdMsg|id=\"?appendonsend|class=\"?moz-cite-prefix)"
    r"|<blockquote[^>]*type=\"?cite"
    r"|<hr[^>]*id=\"?stopSpelling"
    r"|<div[^>]*style=\"[^\"]*border-top:\s*solid\s+#E1E1E1",
    re.IGNORECASE,
)
_TEXT_QUOTE_START = re.compile(
    r"^(?:-{2,}\s*(?:Original Message|Message d'origine|Ursprüngliche Nachricht|Mensaje original)\s*-{2,}"
    r"|On .{1,200} wrote:\s*$"
    r"|Le .{1,200} a écrit\s*:\s*$"
    r"|Am .{1,200} schrieb .{1,200}:\s*$"
    r"|El .{1,200} escribió:\s*$"
    r"|From: .{1,300}\n(?:Sent|Date|Envoyé|Gesendet): )",
    re.MULTILINE,
)
# GLPI's notification templates mark where a reply should be written (NotificationTargetTicket HEADERTAG/FOOTERTAG).
GLPI_HEADER_TAG = "=-=-=-="
GLPI_FOOTER_TAG = "=_=_=_="


@dataclass
class Attachment:
    index: int
    filename: str
    data: bytes
    mime: str
    content_id: str | None = None
    inline: bool = False


@dataclass
class MailContent:
    """A message as the ticket consumer sees it. ``notes`` end up in the ticket text (sizes cut, parts refused)."""

    html: str
    is_html: bool
    attachments: list[Attachment] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def title_of(subject: str | None) -> str:
    """The ticket title: the decoded subject on one line, cut to what GLPI stores, or a placeholder."""
    text = re.sub(r"\s+", " ", subject or "").strip()
    text = "".join(ch for ch in text if ch.isprintable())
    if not text:
        return NO_SUBJECT
    return text if len(text) <= TITLE_MAX_CHARS else text[: TITLE_MAX_CHARS - 1].rstrip() + "…"


def _header_text(value: str | None) -> str:
    if not value:
        return ""
    try:
        return str(make_header(decode_header(value)))
    except Exception:  # undecodable encoded-words: keep the raw text
        return value


def _filename(part: Message) -> str | None:
    try:
        name = part.get_filename()
    except Exception:  # a malformed RFC 2231 parameter
        return None
    if not name:
        return None
    name = _header_text(name)
    name = re.sub(r"[\x00-\x1f/\\\\]", "_", name).strip().strip(".") or None
    return name[:200] if name else None


def _leaves(message: Message, depth: int = 0) -> Iterator[Message]:
    if depth > MAX_DEPTH:
        return
    if message.is_multipart() and message.get_content_maintype() == "multipart":
        for child in message.get_payload():
            if isinstance(child, Message):
                yield from _leaves(child, depth + 1)
    else:
        yield message


def _payload(part: Message) -> bytes:
    if part.get_content_type() == "message/rfc822" and part.is_multipart():
        inner = part.get_payload(0)
        return inner.as_bytes() if isinstance(inner, Message) else b""
    data = part.get_payload(decode=True)
    return data if isinstance(data, bytes) else b""


def _charset(part: Message) -> str | None:
    try:
        return part.get_content_charset()
    except Exception:
        return None


def parse_message(raw: bytes, *, max_attachment_bytes: int, reply: bool = False) -> MailContent:
    """Body, attachments and inline images of a raw message; for a ``reply``, without its quoted history.

    Never raises on malformed mail."""
    message = message_from_bytes(raw, policy=email_policy.compat32)
    body_html: str | None = None
    body_text: str | None = None
    problems: list[str] = []
    attachments: list[Attachment] = []
    notes: list[str] = []
    for count, part in enumerate(_leaves(message)):
        if count >= MAX_PARTS:
            notes.append(f"This message has more than {MAX_PARTS} parts; the rest were not imported.")
            break
        content_type = part.get_content_type()
        disposition = (part.get_content_disposition() or "").lower()
        filename = _filename(part)
        is_text_body = content_type in ("text/plain", "text/html") and disposition != "attachment" and not filename
        if is_text_body:
            decoded = decode_text(_payload(part), _charset(part))
            if decoded.problem:
                problems.append(decoded.problem)
            if content_type == "text/html" and body_html is None:
                body_html = decoded.text
            elif content_type == "text/plain" and body_text is None:
                body_text = decoded.text
            continue
        if content_type.startswith("text/") and not disposition and not filename:
            continue  # GLPI ignores text parts without a disposition (alternative bodies, list footers)
        data = _payload(part)
        content_id = (part.get("Content-ID") or "").strip().strip("<>").strip() or None
        index = len(attachments) + 1
        if not filename:
            subtype = content_type.split("/", 1)[1] if "/" in content_type else "bin"
            filename = f"msg_{index}.eml" if content_type == "message/rfc822" else f"doc_{index}.{subtype[:10]}"
        if len(data) > max_attachment_bytes:
            notes.append(f"Too large attached file: {filename} ({_size(len(data))}); it was not imported.")
            continue
        attachments.append(
            Attachment(
                index=index,
                filename=filename,
                data=data,
                mime=content_type,
                content_id=content_id,
                inline=content_id is not None and content_type.startswith("image/"),
            )
        )
    if body_html is not None:
        content, is_html = sanitize_html(extract_body(body_html)), True
        content = strip_quoted_html(content) if reply else content
    else:
        text = (body_text or "").replace("\r\n", "\n")
        content, is_html = text_to_html(strip_quoted_text(text) if reply else text), False
    return MailContent(html=content, is_html=is_html, attachments=attachments, notes=notes, problems=problems)


def _size(n: int) -> str:
    return f"{n / 1048576:.1f} MiB" if n >= 1048576 else f"{n / 1024:.0f} KiB"


def extract_body(markup: str) -> str:
    """What GLPI keeps of an HTML part: the text before the document, the body's inside, and the text after it,
    without style, script and Outlook's conditional comments."""
    parts: list[str] = []
    before = re.match(r"(?is)^(.*?)(?:<!doctype|<html)", markup)
    if before:
        parts.append(before.group(1).strip())
    body = re.search(r"(?is)<body[^>]*>\s*(.+?)\s*</body>", markup)
    if body:
        parts.append(body.group(1))
    after = re.search(r"(?is)</html>(.*?)$", markup)
    if after:
        parts.append(after.group(1).strip())
    content = "".join(parts) or markup
    content = re.sub(r"(?s)<!--\[if\s+[^\]]+\]>.*?<!\[endif\]-->", "", content)
    content = re.sub(r"(?s)<!\[if\s+[^\]]+\]>(.*?)<!\[endif\]>", r"\1", content)
    return re.sub(r"(?s)<\w+:\w+>.*?</\w+:\w+>", "", content)


class _Sanitizer(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.hidden = 0
        self.open: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in DROPPED_WITH_CONTENT:
            if tag not in VOID_TAGS:
                self.hidden += 1
            return
        if self.hidden or tag not in ALLOWED_TAGS:
            return
        kept = []
        for name, value in attrs:
            if name not in ALLOWED_ATTRIBUTES or value is None:
                continue
            if name in ("href", "src") and not SAFE_URL.match(value.strip()):
                continue
            kept.append(f' {name}="{html.escape(value, quote=True)}"')
        self.out.append(f"<{tag}{''.join(kept)}>")
        if tag not in VOID_TAGS:
            self.open.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in VOID_TAGS and self.open and self.open[-1] == tag:
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in DROPPED_WITH_CONTENT:
            self.hidden = max(0, self.hidden - 1)
            return
        if self.hidden or tag not in ALLOWED_TAGS or tag in VOID_TAGS or tag not in self.open:
            return
        while self.open:
            closed = self.open.pop()
            self.out.append(f"</{closed}>")
            if closed == tag:
                break

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.out.append(html.escape(data, quote=False))

    def result(self) -> str:
        return "".join(self.out) + "".join(f"</{t}>" for t in reversed(self.open))


def sanitize_html(markup: str) -> str:
    """Markup reduced to the allow-list: no script, style, event handler, form or foreign URL scheme."""
    sanitizer = _Sanitizer()
    try:
        sanitizer.feed(markup)
        sanitizer.close()
    except Exception:  # the parser gave up: keep the text only
        return text_to_html(re.sub(r"<[^>]*>", " ", markup))
    return sanitizer.result().strip()


def text_to_html(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").rstrip()
    if not text:
        return ""
    paragraphs = re.split(r"\n{2,}", text)
    return "".join(f"<p>{html.escape(p).replace(chr(10), '<br>')}</p>" for p in paragraphs)


def _cut_at_glpi_tags(content: str) -> str:
    for tag in (GLPI_HEADER_TAG, GLPI_FOOTER_TAG):
        position = content.find(tag)
        if position > 0 and _visible(content[:position]):
            return content[:position]
    return content


def strip_quoted_text(text: str) -> str:
    """A plain-text reply without the text it quotes (GLPI's reply markers, then the mailers' quote openers).

    When cutting would leave nothing (the sender wrote below the quote), the text is kept whole."""
    cut = _cut_at_glpi_tags(text)
    match = _TEXT_QUOTE_START.search(cut)
    if match is not None and _visible(cut[: match.start()]):
        cut = cut[: match.start()]
    lines = cut.rstrip().split("\n")
    while lines and lines[-1].lstrip().startswith(">"):
        lines.pop()  # a trailing block of "> " lines is the quote itself
    kept = "\n".join(lines).rstrip()
    return kept if _visible(kept) else text


def strip_quoted_html(markup: str) -> str:
    """An HTML reply without the history it quotes; whole when cutting would leave nothing."""
    cut = _cut_at_glpi_tags(markup)
    match = _HTML_QUOTE_START.search(cut)
    if match is not None and _visible(cut[: match.start()]):
        cut = cut[: match.start()]
    return sanitize_html(cut) if _visible(cut) else markup


def _visible(markup: str) -> bool:
    return bool(re.sub(r"<[^>]*>|\s|&nbsp;", "", markup))


def rewrite_inline_images(markup: str, documents: dict[str, str]) -> str:
    """Point ``cid:`` references at the uploaded documents (``documents`` maps Content-ID to a document URL)."""

    def replace(match: re.Match[str]) -> str:
        url = documents.get(html.unescape(match.group(2)).strip().strip("<>"))
        return f"{match.group(1)}{html.escape(url, quote=True)}" if url else match.group(0)

    return re.sub(r"(src=\")cid:([^\"]+)", replace, markup, flags=re.IGNORECASE)
