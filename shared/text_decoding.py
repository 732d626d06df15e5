"""Turning the bytes of a mail text part into text, whatever its charset label says.

Mail carries every charset, and labels that Python does not know as spelled: Outlook's ``iso-8859-8-i`` (logical
Hebrew), Korean Outlook's ``ks_c_5601-1987``, ``windows-1255``, ``x-mac-cyrillic``; parts with no charset at all;
byte order marks; and bytes that are invalid in the declared charset. GLPI's mail collector (MailCollector::
getDecodedContent) maps the Outlook names and converts with iconv, and hands text without a charset to
``Toolbox::encodeInUtf8``, which reads it as ISO-8859-1 when it is not valid UTF-8. This module does the same, so
that neither a ticket nor the envelope's preview turns French, Hebrew or Cyrillic text into U+FFFD.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

# Labels Python's codec registry does not know, mapped as GLPI and the WHATWG Encoding Standard map them.
CHARSET_ALIASES = {
    "iso-8859-8-i": "iso-8859-8",  # logical order is a display hint: the bytes are ISO-8859-8's
    "iso-8859-6-i": "iso-8859-6",
    "iso-8859-8-e": "iso-8859-8",
    "iso-8859-6-e": "iso-8859-6",
    "ks_c_5601-1987": "cp949",  # GLPI: "UHC (CP949) encoding instead"
    "ks_c_5601-1989": "cp949",
    "x-mac-cyrillic": "mac-cyrillic",
    "x-mac-roman": "mac-roman",
    "macintosh": "mac-roman",
    "x-user-defined": "latin-1",
    "unicode-1-1-utf-7": "utf-7",
    "x-unicode20utf8": "utf-8",
    "unicode": "utf-16",
    "gb2312": "gb18030",  # mailers label GBK and GB18030 text as gb2312; the superset reads all three
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "iso-8859-1": "cp1252",  # as browsers and mailers do: C1 controls in "Latin-1" mail are Windows quotes
    "us-ascii": "cp1252",  # 8-bit bytes in a part declared ASCII are almost always Windows-1252
    "ascii": "cp1252",
}
FALLBACK_CHARSET = "latin-1"  # GLPI's Toolbox::encodeInUtf8 default; every byte is a character, nothing is lost
_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"))
_BOMS16 = ((codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
_LATIN_LABELS = frozenset({"cp1252", "latin-1", "iso8859-1", "ascii"})
_LABEL = re.compile(r"[A-Za-z0-9._:+-]{1,40}")
# Codecs that are not text encodings (base64, zlib, rot13, idna, punycode...) must never be picked by a label.
_TEXT_CODEC = re.compile(r"^(utf|iso8859|cp|mac|koi8|latin|gb|big5|euc|shift|hz|johab|tis|ptcp|kz|ascii|iso2022)")


@dataclass(frozen=True)
class Decoded:
    """The text, the codec that produced it, and what went wrong (empty when the label was right)."""

    text: str
    charset: str
    problem: str | None = None


def codec_for(label: str | None) -> str | None:
    """The Python codec for a MIME charset label, or None when the label names no text encoding we know."""
    if not label:
        return None
    name = label.strip().strip("\"'").lower()
    if not _LABEL.fullmatch(name):
        return None
    name = CHARSET_ALIASES.get(name, name)
    if re.fullmatch(r"windows-\d{3,4}", name):
        name = "cp" + name.split("-", 1)[1]
    try:
        info = codecs.lookup(name)
    except LookupError:
        return None
    return info.name if _TEXT_CODEC.match(info.name.replace("_", "").replace("-", "")) else None


def _strict(data: bytes, codec: str, final: bool) -> str:
    """Decode strictly; with ``final`` False a character cut at the end of ``data`` is left out, not an error."""
    decoder = codecs.getincrementaldecoder(codec)("strict")
    return str(decoder.decode(data, final=final))


def decode_text(data: bytes, charset: str | None, *, final: bool = True) -> Decoded:
    """Decode a text part's bytes. Never raises and never returns U+FFFD for a part that has no charset.

    Order: a byte order mark wins over the label (mailers label UTF-16 parts wrongly); then the declared charset,
    strictly; then UTF-8 when the bytes are valid UTF-8 (the commonest mislabel); then, for a part without a
    usable label, ISO-8859-1 as GLPI does; for a labelled part with invalid bytes, the label with each bad byte
    replaced, so that the rest of the text survives. ``final=False`` says ``data`` is the start of a longer text
    (a preview): a multibyte character cut at its end is dropped instead of spoiling the guess.
    """
    for bom, bom_codec in _BOMS + _BOMS16:
        if data.startswith(bom):
            return Decoded(data.decode(bom_codec, "replace").lstrip("\ufeff"), bom_codec)
    codec = codec_for(charset)
    if codec in _LATIN_LABELS and not data.isascii():
        # UTF-8 text labelled Latin-1 or ASCII is a common mislabel; real Latin-1 text is almost never valid UTF-8.
        try:
            return Decoded(_strict(data, "utf-8", final), "utf-8", f"declared {charset!r} but the bytes are UTF-8")
        except UnicodeDecodeError:
            pass
    if codec is not None:
        try:
            return Decoded(_strict(data, codec, final), codec)
        except UnicodeDecodeError:
            pass
    try:
        text = _strict(data, "utf-8", final)
    except UnicodeDecodeError:
        pass
    else:
        problem: str | None = None if codec is None and not charset else f"declared {charset!r} but the bytes are UTF-8"
        if charset and codec is None:
            problem = f"unknown charset {charset[:40]!r}, read as UTF-8"
        return Decoded(text, "utf-8", problem)
    if codec is not None:
        return Decoded(data.decode(codec, "replace"), codec, f"bytes invalid in {charset!r} were replaced")
    problem = f"unknown charset {charset[:40]!r}, read as ISO-8859-1" if charset else None
    return Decoded(data.decode(FALLBACK_CHARSET), FALLBACK_CHARSET, problem)
