"""The envelope's preview decodes every text part as the GLPI consumer does (shared.text_decoding): Outlook's
labels, parts without a charset, byte order marks, and a multibyte character cut where the preview stops."""

from __future__ import annotations

import base64

import pytest

from collectors.envelope.mime import PREVIEW_SOURCE_CHARS
from tests.unit.test_envelope import build


def _mail(body: bytes, content_type: str, transfer: str = "8bit") -> bytes:
    return (
        b"From: a@example.org\r\nTo: b@example.org\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
        + f"Content-Type: {content_type}\r\nContent-Transfer-Encoding: {transfer}\r\n\r\n".encode()
        + body
        + b"\r\n"
    )


@pytest.mark.parametrize(
    ("text", "codec", "content_type"),
    [
        ("שלום, המדפסת לא עובדת", "iso-8859-8", "text/plain; charset=iso-8859-8-i"),
        ("תודה רבה", "cp1255", "text/plain; charset=windows-1255"),
        ("Принтер не печатает", "koi8-r", "text/plain; charset=koi8-r"),
        ("Сервер недоступен", "cp1251", "text/plain; charset=windows-1251"),
        ("Le réseau est coupé à l'étage", "latin-1", "text/plain"),
        ("프린터가 고장났어요", "cp949", "text/plain; charset=ks_c_5601-1987"),
        ("Grüße aus Köln", "utf-8", "text/plain"),
    ],
)
def test_previews_of_hebrew_french_and_cyrillic_mail_are_text_not_replacement_characters(
    text: str, codec: str, content_type: str
) -> None:
    envelope = build(_mail(base64.encodebytes(text.encode(codec)), content_type, "base64"))
    assert envelope["preview"] == text


def test_a_byte_order_mark_wins_over_a_wrong_label() -> None:
    raw = _mail("\ufeffСпасибо\r\n".encode("utf-16"), "text/plain; charset=us-ascii", "binary")[:-2]
    envelope = build(raw)
    assert envelope["preview"] == "Спасибо"


def test_a_character_cut_where_the_preview_stops_does_not_spoil_the_rest() -> None:
    text = ("é" * (PREVIEW_SOURCE_CHARS // 2)) + "tail"  # two bytes each: the preview's window cuts one in half
    envelope = build(_mail(base64.encodebytes(text.encode()), "text/plain", "base64"))
    assert envelope["preview"] is not None and set(envelope["preview"]) == {"é"}
