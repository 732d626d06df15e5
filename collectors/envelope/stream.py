"""The envelope of a message that streams past: fed in chunks of any size, held in bounded memory.

The collector streams each message from IMAP into blob blocks; this module sees the same chunks on the way and
never holds the message. It keeps a skeleton of it instead and hands that to the same stdlib parser and the same
part walk as ``build_envelope`` (``mime.read_body``): every header section (the message's and each part's),
every line that is a boundary of an open multipart, the first ``BODY_TEXT_KEEP`` bytes of the parts that may
feed the preview, the first ``CONTENT_KEEP`` bytes of any other content, and the last line end before each
boundary (the parser gives it to the boundary). What it leaves out of a run of content becomes one marker line
(``mime.cut_marker``) with the characters and base64 letters cut, so that attachment sizes come out as exact as
from the whole message.

To know which lines are structure, a small walker follows the parser's own grammar (``email.feedparser``):
header sections end at a blank line or at a line that cannot be a header; a multipart's boundary is looked for
in its preamble and its parts, the enclosing multiparts' boundaries everywhere below them, and the outermost
match wins; a ``message/*`` part's content is opaque to the envelope (the part walk does not descend into it),
so it is cut like any content. Lines are told apart across chunk edges (CRLF, bare LF, lone CR).

Caps keep memory bounded whatever the message: ``SKELETON_BYTES`` for everything handed to the parser,
``MAX_STREAM_PARTS`` header sections, ``DASH_LINE_BYTES`` for a line that could be a boundary, and
``UNDECIDED_LINE_BYTES`` for a line that could still be a header. What stops at a cap is named in
``mime_problems``; the envelope describes what was read before it.
"""

from __future__ import annotations

import hashlib
import re
from email import policy as email_policy
from email.feedparser import BytesFeedParser
from email.message import Message
from email.parser import BytesParser
from typing import Any, Unpack

from collectors.envelope import MessageMeta, describe_message
from collectors.envelope.mime import (
    MAX_DEPTH,
    MAX_PARTS,
    THIN_KEEP,
    body_text_type,
    cut_marker,
    headers_only,
    letters_in,
    new_marker,
    note_parse_failure,
)
from collectors.envelope.notes import Notes

SKELETON_BYTES = 4 * 1024 * 1024  # bytes handed to the parser per message: header sections, part heads, boundaries
BODY_TEXT_KEEP = THIN_KEEP  # bytes kept from the start of a part that may feed the preview (it reads half of it)
BODY_TEXT_SLOTS = 3  # parts of each text type kept that long: the preview takes the first plain, else html
CONTENT_KEEP = 256  # bytes kept from the start of any other content run: enough to read the skeleton by eye
MAX_STREAM_PARTS = MAX_PARTS + 1  # header sections read: one past the walk's cap, so that it notes its own
DASH_LINE_BYTES = 16 * 1024  # a line starting "--" longer than this is content: no real boundary is that long
UNDECIDED_LINE_BYTES = 16 * 1024  # a line in a header section with no colon by then is body, not a header
PIECE_BYTES = 1024 * 1024  # a large chunk is walked in pieces of this size, so that no copy of it is made

_HEADERS, _CONTENT, _AFTER_SEPARATOR, _STOPPED = range(4)
_NOTHING = re.compile(b"(?!)")
_EOL = re.compile(rb"\r\n?|\n")
# email.feedparser.headerRE on bytes: its string pattern sees 8-bit bytes as surrogates, outside these ranges.
_HEADER_LINE = re.compile(rb"From |[\x21-\x39\x3b-\x7e]*:|[\t ]")
_FIELD_NAME_SO_FAR = re.compile(rb"[\x21-\x39\x3b-\x7e]*")


class _Level:
    """An open multipart with a boundary: what the parser matches its lines against."""

    def __init__(self, boundary: str, digest: bool) -> None:
        separator = "--" + boundary
        # The parser's own pattern (email.feedparser), matched on the line as the parser decodes it.
        self.match = re.compile(
            "(?P<sep>" + re.escape(separator) + r")(?P<end>--)?(?P<ws>[ \t]*)(?P<linesep>\r\n|\r|\n)?$"
        ).match
        self.digest = digest
        try:  # the line as bytes starts with this; a boundary the parser decoded from RFC 2231 matches no line
            self.prefix: bytes | None = separator.encode("ascii", "surrogateescape")
        except UnicodeEncodeError:
            self.prefix = None


class EnvelopeStream:
    """Build a message's envelope from its bytes as they stream past, in memory bounded whatever its size.

    ``feed`` the bytes in order, in chunks of any size, then call ``envelope``. For ordinary mail the envelope is
    the one ``build_envelope`` gives for the whole bytes; what differs is where a cap stopped the reading (see the
    module notes), and that is named in ``mime_problems``. Never raises because of the message's content.
    """

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._size = 0
        self._notes = Notes(thin_marker=new_marker())
        self._parser = BytesFeedParser(policy=email_policy.compat32)
        self._message: Message | None = None
        self._failed = False  # the parser raised: the envelope is built from the top headers alone
        self._buf = bytearray()  # bytes not walked yet: a partial line, never more than a cap
        self._scanned = 0  # bytes at the start of _buf known to hold no line end (a long header line)
        self._out: list[bytes] = []  # skeleton bytes not yet handed to the parser
        self._out_bytes = 0
        self._fed = 0  # skeleton bytes so far, handed over or waiting
        self._state = _HEADERS
        self._levels: list[_Level] = []
        self._parts = 1
        self._block = bytearray()  # the header section being read
        self._top_block: bytes | None = None
        self._text_slots = {"text/plain": 0, "text/html": 0}
        # The content run being read: how much more to keep, what was cut, and the last 2 bytes not yet counted.
        self._relevant = 0  # open multiparts whose boundaries end the run (outermost first)
        self._keep = 0
        self._cut_chars = 0
        self._cut_letters = 0
        self._held = b""
        self._line_start = True
        self._next_boundary = self._at_boundary = _NOTHING  # see _start_run
        self._common = b"--"  # what every boundary of the open multiparts starts with (see _search_boundary)
        self._edge = 0

    @property
    def size(self) -> int:
        """Bytes fed so far."""
        return self._size

    @property
    def sha256(self) -> str:
        """SHA-256 of the bytes fed so far, lower-case hex."""
        return self._hash.hexdigest()

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes of the message.

        Raises:
            ValueError: ``envelope`` was called already (the walk is closed).
        """
        if self._message is not None:
            raise ValueError("the envelope is built: feed every byte before calling envelope()")
        self._hash.update(chunk)
        self._size += len(chunk)
        if self._state == _STOPPED:
            return
        view = memoryview(chunk)
        for start in range(0, len(view), PIECE_BYTES):
            self._buf += view[start : start + PIECE_BYTES]
            self._walk(final=False)
            if self._state == _STOPPED:
                break
        self._flush()

    def envelope(self, **meta: Unpack[MessageMeta]) -> dict[str, Any]:
        """The envelope of the bytes fed, as ``build_envelope`` describes it (same guarantees, same errors).

        May be called more than once (with other metadata); no bytes may be fed after the first call.
        """
        message = self._close()
        notes = Notes(
            header_problems=list(self._notes.header_problems),
            mime_problems=list(self._notes.mime_problems),
            truncated=list(self._notes.truncated),
            thin_marker=self._notes.thin_marker,
        )
        return describe_message(
            message,
            notes,
            size=self._size,
            sha256=self.sha256,
            **meta,
        )

    # -- closing ---------------------------------------------------------------------------------------------

    def _close(self) -> Message:
        if self._message is not None:
            return self._message
        if self._state != _STOPPED:
            self._walk(final=True)
            if self._state == _HEADERS and self._block:
                self._end_headers()
            if self._state == _CONTENT:
                self._end_run()
            self._flush()
        if not self._failed:
            try:
                self._message = self._parser.close()
            except Exception as exc:  # see mime.parse_message: an envelope with headers beats a lost message
                note_parse_failure(exc, self._notes)
                self._failed = True
        if self._failed:
            # As mime.parse_message: the headers, with the rest of the message as the payload; here a marker
            # that counts its characters, as the rest is long gone.
            top = self._top_block if self._top_block is not None else bytes(self._block)
            rest = cut_marker(self._notes, max(self._size - len(top), 0), 0)
            self._message = headers_only(top + rest, self._notes)
        self._buf = bytearray()
        self._block = bytearray()
        assert self._message is not None
        return self._message

    # -- handing the skeleton to the parser ------------------------------------------------------------------

    def _emit(self, data: bytes) -> bool:
        """Queue skeleton bytes for the parser; False (and the walk stopped) when they pass the budget."""
        if self._fed + len(data) > SKELETON_BYTES:
            self._stop(f"MIME structure longer than {SKELETON_BYTES} bytes after thinning; the rest not read")
            return False
        self._fed += len(data)
        self._out.append(data)
        self._out_bytes += len(data)
        if self._out_bytes >= 64 * 1024:
            self._flush()
        return self._state != _STOPPED

    def _flush(self) -> None:
        if not self._out or self._failed:
            self._out, self._out_bytes = [], 0
            return
        data = b"".join(self._out)
        self._out, self._out_bytes = [], 0
        try:
            self._parser.feed(data)
        except Exception as exc:  # RecursionError on deep nesting, as in mime.parse_message
            note_parse_failure(exc, self._notes)
            self._failed = True
            self._halt()

    def _stop(self, problem: str) -> None:
        self._flush()  # what came before the cap may fail to parse first: that is then the problem to name
        if self._state != _STOPPED:
            self._notes.mime(problem)
            self._halt()

    def _halt(self) -> None:
        if self._state == _HEADERS and self._top_block is None:
            self._top_block = bytes(self._block)
        self._state = _STOPPED
        self._buf = bytearray()
        self._block = bytearray()
        self._levels = []

    # -- the walk --------------------------------------------------------------------------------------------

    def _walk(self, *, final: bool) -> None:
        """Walk what _buf holds; leave in it only a partial line that the next bytes complete."""
        buf = self._buf
        pos = 0
        while self._state != _STOPPED:
            state = self._state
            if state == _HEADERS:
                moved = self._header_line(buf, pos, final)
            elif state == _CONTENT:
                moved = self._content(buf, pos, final)
            else:
                moved = self._after_separator(buf, pos, final)
            if moved == pos and self._state == state:
                break  # the rest is a partial line: the next bytes complete it
            pos = moved
        if self._state != _STOPPED:
            del buf[:pos]

    def _line_end(self, buf: bytearray, pos: int, final: bool) -> int:
        """End of the line starting at pos (after its line end), or -1 when the line is not complete yet."""
        match = _EOL.search(buf, max(pos, pos + self._scanned - 1))
        if match is None or (match.group() == b"\r" and match.end() == len(buf) and not final):
            self._scanned = max(len(buf) - pos - 1, 0)
            return len(buf) if final and len(buf) > pos else -1
        self._scanned = 0
        return match.end()

    def _boundary_level(self, line: bytes, levels: int) -> int | None:
        """The outermost of the first ``levels`` open multiparts whose boundary this line is (the parser checks
        the enclosing boundaries before a multipart's own, so the outermost match ends all inside it)."""
        text = line.decode("ascii", "surrogateescape")
        for index in range(levels):
            if self._levels[index].match(text):
                return index
        return None

    def _dash_line(self, buf: bytearray, pos: int, final: bool, levels: int) -> tuple[int, int | None] | None:
        """At a line start with "--": (end of the line, the level whose boundary it is or None), or None when
        more bytes are needed to tell. A line too long to be a boundary is (-1, None)."""
        end = self._line_end(buf, pos, final)
        if end < 0:
            if len(buf) - pos > DASH_LINE_BYTES:
                self._scanned = 0
                return -1, None
            return None
        if end - pos > DASH_LINE_BYTES:
            return end, None
        return end, self._boundary_level(bytes(buf[pos:end]), levels)

    # header sections

    def _header_line(self, buf: bytearray, pos: int, final: bool) -> int:
        if pos >= len(buf) or (len(buf) - pos < 2 and not final and buf[pos:] == b"-"):
            return pos
        if buf.startswith(b"--", pos) and self._levels:
            told = self._dash_line(buf, pos, final, len(self._levels))
            if told is None:
                return pos
            if told[1] is not None:  # a boundary ends the section (and the part, with an empty body)
                self._end_headers()
                return pos
        end = self._line_end(buf, pos, final)
        if end < 0:
            so_far = len(buf) - pos
            name = _FIELD_NAME_SO_FAR.match(buf, pos)
            undecided = buf[pos] in b"\r\n" or (name is not None and name.end() == len(buf))
            if _HEADER_LINE.match(buf, pos) is None and (not undecided or so_far > UNDECIDED_LINE_BYTES):
                self._end_headers()  # a body line, already: the content walk reads it as it comes
                return pos
            if self._fed + len(self._block) + so_far > SKELETON_BYTES:
                self._block_over_budget()
            return pos
        line = bytes(buf[pos:end])
        if line[:1] in (b"\r", b"\n"):  # the blank line that ends the section
            self._block += line
            self._end_headers()
            return end
        if _HEADER_LINE.match(line) is None:  # not a header: the parser takes it as the first body line
            self._end_headers()
            return pos
        if self._fed + len(self._block) + len(line) > SKELETON_BYTES:
            self._block_over_budget()
            return pos
        self._block += line
        return end

    def _block_over_budget(self) -> None:
        # The lines read so far still reach the parser: the message keeps the headers that fit.
        block = bytes(self._block)
        self._block = bytearray()
        if self._top_block is None:
            self._top_block = block
        self._fed += len(block)
        self._out.append(block)
        self._stop(f"MIME structure longer than {SKELETON_BYTES} bytes after thinning; the rest not read")

    def _end_headers(self) -> None:
        block = bytes(self._block)
        self._block = bytearray()
        if self._top_block is None:
            self._top_block = block
        if not self._emit(block):
            return
        part = _headers_of(block)
        if self._levels and self._levels[-1].digest:  # the parser's default type for a digest's parts
            part.set_default_type("message/rfc822")
        keep = CONTENT_KEEP
        try:
            content_type = part.get_content_type()
            boundary = part.get_boundary() if part.get_content_maintype() == "multipart" else None
        except Exception:  # the parser would have failed on the same headers: stop here, as it did
            self._stop("MIME structure could not be walked; the rest not read")
            return
        if boundary is not None:
            self._levels.append(_Level(boundary, content_type == "multipart/digest"))
        elif not content_type.startswith("message/") and not content_type.startswith("multipart/"):
            kind = body_text_type(part) if len(self._levels) <= MAX_DEPTH else None
            if kind is not None and self._text_slots[kind] < BODY_TEXT_SLOTS:
                self._text_slots[kind] += 1
                keep = BODY_TEXT_KEEP
        self._start_run(len(self._levels), keep)

    # content: bodies, preambles, epilogues, message/* parts

    def _start_run(self, relevant: int, keep: int) -> None:
        self._state = _CONTENT
        self._relevant = relevant
        self._keep = keep
        self._cut_chars = self._cut_letters = 0
        self._held = b""
        self._line_start = True
        self._scanned = 0
        self._edge = 0
        # Content is searched in C for a line that is a boundary of the open multiparts, or may still become one
        # at the end of the bytes so far: lines that only look like one ("-- " signatures, "--" rules, "--B-x")
        # cost no Python, however many there are.
        prefixes = sorted({level.prefix for level in self._levels[:relevant] if level.prefix is not None})
        if prefixes:
            either = b"(?:" + b"|".join(re.escape(prefix) for prefix in prefixes) + b")"
            line = either + rb"(?:-?\Z|(?:--)?[ \t]*(?:\r\n|\r|\n|\Z))"
            self._next_boundary = re.compile(rb"(?:\r\n|\r|\n)(?=" + line + b")")
            self._at_boundary = re.compile(line)
            self._edge = 2 + max(len(prefix) for prefix in prefixes)
            self._common = _common_start(prefixes[0], prefixes[-1])  # sorted: these two differ first
        else:
            self._relevant = 0

    def _search_boundary(self, buf: bytearray, pos: int) -> re.Match[bytes] | None:
        """``_next_boundary.search(buf, pos)``, started just before the first place a boundary's text appears.

        The pattern starts with a line end, so the regular expression engine tries it at every byte: about 14 ms
        a megabyte, with the GIL held, which starved the thread reading the socket. ``find`` skips to the first
        occurrence of the boundary text at memory speed (in base64 there is none, as "-" is not a base64 letter);
        no match can start more than a CRLF before it, and from there the pattern decides as before. What is
        found is the text the open multiparts' boundaries start with (at least "--"): one call, however many.
        """
        first = buf.find(self._common, pos + 1)
        if first < 0:
            return None
        return self._next_boundary.search(buf, max(pos, first - 2))

    def _content(self, buf: bytearray, pos: int, final: bool) -> int:
        size = len(buf)
        if pos >= size:
            return pos
        if self._relevant == 0:  # nothing can end this run but the end of the message
            self._take(buf, pos, size)
            return size
        if self._line_start:
            if size - pos < self._edge and not final:
                return pos
            if self._at_boundary.match(buf, pos):
                told = self._dash_line(buf, pos, final, self._relevant)
                if told is None:
                    return pos
                end, level = told
                if level is not None:
                    self._end_run()
                    return self._boundary(buf, pos, end, level)
                if end >= 0:  # a dash line of content
                    self._take(buf, pos, end)
                    self._line_start = True
                    return end
        match = self._search_boundary(buf, pos)
        if match is not None:
            upto = match.end()
            self._take(buf, pos, upto)
            self._line_start = True
            return upto
        if final:
            self._take(buf, pos, size)
            return size
        upto = size - self._edge  # a line end and a boundary may still straddle the edge of the next chunk
        if upto <= pos:
            return pos
        self._take(buf, pos, upto)
        last = buf[upto - 1]
        self._line_start = last == 0x0A or (last == 0x0D and buf[upto] != 0x0A)
        return upto

    def _take(self, buf: bytearray, start: int, end: int) -> None:
        """Content bytes: kept while the run's keep lasts, then counted, all but the last two."""
        if self._keep > 0:
            kept = min(self._keep, end - start)
            self._keep -= kept
            if not self._emit(bytes(buf[start : start + kept])):
                return
            start += kept
        if end - start >= 2:
            self._count(self._held, 0, len(self._held))
            self._count(buf, start, end - 2)
            self._held = bytes(buf[end - 2 : end])
        elif end > start:
            held = self._held + bytes(buf[start:end])
            self._count(held, 0, len(held) - 2)
            self._held = held[-2:]

    def _count(self, data: bytes | bytearray, start: int, end: int) -> None:
        if end > start:
            self._cut_chars += end - start
            self._cut_letters += letters_in(data, start, end)

    def _end_run(self) -> None:
        """Close the content run: a marker for what was cut, then its last line end (the parser strips it)."""
        self._state = _HEADERS  # until the caller says what comes next
        held = self._held
        tail = held if held.endswith(b"\r\n") else held[-1:]
        self._count(held, 0, len(held) - len(tail))
        if self._cut_chars:
            self._emit(cut_marker(self._notes, self._cut_chars, self._cut_letters) + tail)
        elif tail:
            self._emit(tail)
        self._held = b""
        self._cut_chars = self._cut_letters = 0

    # boundaries

    def _boundary(self, buf: bytearray, pos: int, end: int, level: int) -> int:
        """A boundary of the open multipart at ``level``: the multiparts inside it end, and its next part starts
        (a separator) or its epilogue (the close delimiter; also read as the rest when no part was seen)."""
        del self._levels[level + 1 :]
        line = bytes(buf[pos:end])
        if not self._emit(line):
            return end
        multipart = self._levels[level]
        match = multipart.match(line.decode("ascii", "surrogateescape"))
        if match is not None and match.group("end"):
            self._start_run(level, CONTENT_KEEP)
            return end
        self._state = _AFTER_SEPARATOR
        return end

    def _after_separator(self, buf: bytearray, pos: int, final: bool) -> int:
        """After a separator the parser skips any further boundary lines of the same multipart, then reads the
        next part's headers (an enclosing boundary there gives an empty part)."""
        size = len(buf)
        if pos >= size or (size - pos < 2 and not final and buf[pos:] == b"-"):
            return pos
        if buf.startswith(b"--", pos):
            told = self._dash_line(buf, pos, final, len(self._levels))
            if told is None:
                return pos
            end, level = told
            if level is not None and level == len(self._levels) - 1:
                self._emit(bytes(buf[pos:end]))
                return end
            if level is not None:
                if not self._new_part():
                    return pos
                self._state = _CONTENT
                self._relevant = len(self._levels)
                return self._boundary(buf, pos, end, level)
        if not self._new_part():
            return pos
        self._state = _HEADERS
        self._scanned = 0
        return pos

    def _new_part(self) -> bool:
        self._parts += 1
        if self._parts > MAX_STREAM_PARTS:
            self._stop(f"more than {MAX_STREAM_PARTS} MIME parts; the rest not read")
            return False
        return True


def _common_start(a: bytes, b: bytes) -> bytes:
    """The longest start that ``a`` and ``b`` share."""
    same = 0
    while same < min(len(a), len(b)) and a[same] == b[same]:
        same += 1
    return a[:same]


def _headers_of(block: bytes) -> Message:
    """The headers of one section, parsed as the parser parses them."""
    try:
        return BytesParser(policy=email_policy.compat32).parsebytes(block, headersonly=True)
    except Exception:  # never seen; the parser proper meets the same bytes and notes what it makes of them
        return Message(policy=email_policy.compat32)
