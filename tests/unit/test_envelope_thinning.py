"""Large messages are parsed with long content runs cut short: the envelope must be exactly the one a full parse
gives, and the parse must not hold copies of the big parts."""

from __future__ import annotations

import base64
import random
import time
import tracemalloc
from datetime import UTC, datetime
from typing import Any

import pytest

import collectors.envelope.mime as envelope_mime
from collectors.envelope import build_envelope
from collectors.envelope.mime import THIN_ABOVE
from collectors.envelope.notes import Notes

MB = 1024 * 1024


def envelope(raw: bytes) -> dict[str, Any]:
    return build_envelope(
        raw,
        mailbox="support@example.test",
        folder="INBOX",
        uidvalidity=7,
        uid=1,
        blob_url="http://127.0.0.1/raw/x.eml",
        blob_name="x.eml",
        collected_at=datetime(2026, 11, 29, tzinfo=UTC),
    )


def full_parse(raw: bytes, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    with monkeypatch.context() as m:
        m.setattr(envelope_mime, "THIN_ABOVE", 1 << 60)
        return envelope(raw)


def b64_lines(size: int, seed: int, eol: bytes = b"\r\n") -> bytes:
    data = base64.encodebytes(random.Random(seed).randbytes(size))
    return data.replace(b"\n", eol)


def mixed_message() -> bytes:
    head = (
        b"From: Customer <c@example.org>\r\nTo: s@example.test\r\nSubject: logs\r\n"
        b"Message-ID: <m1@example.org>\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="OUTER"\r\n\r\npreamble line\r\n'
    )
    text = b"--OUTER\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + b"".join(
        b"log line %d without any colon\r\n" % i for i in range(60_000)
    )
    inner = (
        b'--OUTER\r\nContent-Type: multipart/alternative; boundary="INNER"\r\n\r\n'
        b"--INNER\r\nContent-Type: text/html\r\n\r\n<p>hello</p>\r\n"
        b"--INNER\r\nContent-Type: application/pdf; name=a.pdf\r\nContent-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment; filename=a.pdf\r\n\r\n" + b64_lines(900_000, 1) + b"--INNER--\r\n"
    )
    # LF-only lines, a lone CR inside a run, and a run that starts right after a colon in a header line.
    odd = (
        b"--OUTER\r\nContent-Type: application/octet-stream; name=b.bin\r\nX-Note:"
        + b64_lines(300_000, 2, b"\n")
        + b"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + b64_lines(400_000, 3, b"\n")[:200_000]
        + b"AAAA\rBBBB\r\n"
        + b64_lines(400_000, 4, b"\n")
    )
    qp = (
        b"--OUTER\r\nContent-Type: text/csv; name=c.csv\r\nContent-Transfer-Encoding: quoted-printable\r\n"
        b"Content-Disposition: attachment; filename=c.csv\r\n\r\n"
        + b"".join(b"row %d;value=3D%d\r\n" % (i, i) for i in range(40_000))
        + b"--OUTER--\r\nepilogue\r\n"
    )
    return head + text + inner + odd + qp


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(mixed_message(), id="mixed"),
        pytest.param(
            b"From: a@example.org\r\nSubject: one part\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + b64_lines(3 * MB, 5),
            id="single-part",
        ),
        pytest.param(
            b"From: a@example.org\r\nSubject: no body separator\r\n" + b64_lines(2 * MB, 6), id="no-separator"
        ),
    ],
)
def test_a_thinned_parse_gives_the_same_envelope(raw: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(raw) > THIN_ABOVE
    notes = Notes()
    assert len(envelope_mime.thin(raw, notes)) < len(raw) // 2, "nothing was cut: the test proves nothing"
    assert envelope(raw) == full_parse(raw, monkeypatch)


def test_a_forged_marker_line_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = (
        b"From: a@example.org\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
        b"Content-Type: application/octet-stream; name=x\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + b"\x00cut-0000000000000000 999999 999999\x00\n"
        + b64_lines(2 * MB, 7)
        + b"--B--\r\n"
    )
    assert envelope(raw) == full_parse(raw, monkeypatch)


def test_the_parse_of_a_large_message_holds_no_copy_of_it() -> None:
    raw = (
        b"From: a@example.org\r\nSubject: big\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
        b"Content-Type: image/png; name=x.png\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + b64_lines(15 * MB, 8)
        + b"--B--\r\n"
    )
    tracemalloc.start()
    try:
        result = envelope(raw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result["attachments"][0]["size"] == 15 * MB
    assert peak < len(raw) // 4, f"parsing took {peak / MB:.1f} MB for a {len(raw) / MB:.1f} MB message"


def test_long_lines_are_scanned_once(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = b"From: a@example.org\r\nSubject: x\r\n\r\n" + b"x" * (3 * MB) + b"\n" + b"y" * (2 * MB) + b"\r\n"
    started = time.perf_counter()
    got = envelope(raw)
    assert time.perf_counter() - started < 10, "thinning rescans long lines"
    assert got == full_parse(raw, monkeypatch)


def test_base64_letters_are_counted_within_the_range_only() -> None:
    # Each excluded byte is counted from its first occurrence in the range on: one before the range, one only in
    # its last line, one absent, must all come out as a plain count says.
    rng = random.Random(5)
    alphabet = b"AZaz09+/=\r\n \t-"
    for _ in range(500):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 120)))
        start = rng.randrange(0, len(data) + 1)
        end = rng.randrange(start, len(data) + 1)
        expected = sum(1 for byte in data[start:end] if byte not in b"\r\n \t=")
        assert envelope_mime.letters_in(data, start, end) == expected, (data, start, end)
    assert envelope_mime.letters_in(bytearray(b"==QUJD\r\nRA==\r\n"), 2, 12) == 6
