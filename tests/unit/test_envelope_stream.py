"""The streamed envelope: fed in any chunking, it must equal ``build_envelope`` on the whole bytes, and hold no
more than a bounded skeleton of the message whatever its size or shape."""

from __future__ import annotations

import base64
import hashlib
import random
import tracemalloc
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from collectors.envelope import build_envelope
from collectors.envelope.stream import SKELETON_BYTES, EnvelopeStream
from tests.mail_corpus import CRLF, hostile_messages, multipart, part, plain, real_world_messages

MB = 1024 * 1024
OPTIONS: dict[str, Any] = {
    "mailbox": "support@example.test",
    "folder": "INBOX",
    "uidvalidity": 7,
    "uid": 42,
    "blob_url": "https://storage.example.test/raw-mail/support%40example.test/7/42.eml",
    "blob_name": "support@example.test/7/42.eml",
    "blob_container": "raw-mail",
    "collected_at": datetime(2024, 5, 14, 8, 0, tzinfo=UTC),
}


def streamed(chunks: Iterable[bytes]) -> EnvelopeStream:
    stream = EnvelopeStream()
    for chunk in chunks:
        stream.feed(chunk)
    return stream


def pieces(raw: bytes, size: int) -> Iterator[bytes]:
    return (raw[start : start + size] for start in range(0, len(raw), size))


def random_pieces(raw: bytes, seed: str) -> Iterator[bytes]:
    rng = random.Random(seed)
    start = 0
    while start < len(raw):
        size = rng.choice([1, 2, 3, 5, 17, 1000, 65536, rng.randint(1, 300_000)])
        yield raw[start : start + size]
        start += size


def b64_lines(size: int, seed: int, eol: bytes = CRLF) -> bytes:
    return base64.encodebytes(random.Random(seed).randbytes(size)).replace(b"\n", eol)


# --- the equivalence corpus: every test mail the repository has, and the shapes it lacked --------------------


def _attachment(content_type: str, body: bytes, disposition: str, *extra: tuple[str, str]) -> bytes:
    return part(
        content_type, body, ("Content-Transfer-Encoding", "base64"), ("Content-Disposition", disposition), *extra
    )


def own_messages() -> Iterator[tuple[str, bytes]]:
    hebrew = "שלום, המדפסת לא עובדת".encode("iso-8859-8")
    yield "charset-iso-8859-8-i", plain(("Content-Type", 'text/plain; charset="iso-8859-8-i"'), body=hebrew)
    yield (
        "charset-windows-1255-qp-html",
        plain(
            ("Content-Type", "text/html; charset=windows-1255"),
            ("Content-Transfer-Encoding", "quoted-printable"),
            body=b"<p>=F9=EC=E5=ED</p>",
        ),
    )
    yield (
        "charset-koi8-r-base64",
        plain(
            ("Content-Type", "text/plain; charset=koi8-r"),
            ("Content-Transfer-Encoding", "base64"),
            body=base64.encodebytes("Привет, принтер сломался".encode("koi8-r")),
        ),
    )
    yield (
        "charset-shift-jis",
        plain(("Content-Type", "text/plain; charset=shift_jis"), body="日本語のメール".encode("shift_jis")),
    )
    yield "charset-none-latin1-bytes", plain(body=b"caf\xe9 cr\xe8me\r\n")
    yield (
        "8bit-headers",
        plain(
            ("Subject", "Caf\u00e9 \u2013 d\u00e9j\u00e0 vu".encode()),
            ("From", b"J\xe9r\xf4me <j@example.org>"),
            ("To", "\u00c9quipe <equipe@example.test>".encode()),
        ),
    )
    yield "no-mime-at-all", b"From: a@example.org\r\nTo: b@example.test\r\nSubject: old mail\r\n\r\nJust text.\r\n"
    yield "no-headers-at-all", b"just a line of text\r\nand another\r\n"
    image = base64.encodebytes(bytes(range(256)) * 40).replace(b"\n", CRLF)
    related = multipart(
        [
            part("text/html; charset=utf-8", b'<p>See <img src="cid:logo@x"></p>'),
            part(
                "image/png",
                image,
                ("Content-Transfer-Encoding", "base64"),
                ("Content-ID", "<logo@x>"),
                ("Content-Disposition", "inline"),
            ),
        ],
        subtype="related",
        boundary="rel",
    ).split(CRLF + CRLF, 1)
    yield "inline-image-related", plain(("Content-Type", 'multipart/related; boundary="rel"'), body=related[1])
    alternative = (
        b'Content-Type: multipart/alternative; boundary="alt"\r\n\r\n'
        b"--alt\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nplain text\r\n"
        b'--alt\r\nContent-Type: multipart/related; boundary="rel2"\r\n\r\n'
        b"--rel2\r\nContent-Type: text/html\r\n\r\n<b>html</b>\r\n"
        b"--rel2\r\nContent-Type: image/gif; name=a.gif\r\nContent-Transfer-Encoding: base64\r\n\r\nR0lGODlh\r\n"
        b"--rel2--\r\n--alt--"
    )
    rfc2231 = _attachment(
        "application/pdf",
        base64.encodebytes(b"%PDF-1.4 " * 300).replace(b"\n", CRLF),
        "attachment; filename*=utf-8''R%C3%A9sum%C3%A9%20%E2%80%93%20Q3.pdf",
    )
    continued = _attachment(
        "application/octet-stream",
        b"AAAA\r\n",
        "attachment; filename*0*=iso-8859-1''caf%E9; filename*1*=_cr%E8me; filename*2=.txt",
    )
    encoded_word = _attachment('text/csv; name="=?utf-8?B?0LTQsNC90L3Ri9C1LmNzdg==?="', b"YSxi\r\n", "attachment")
    yield "nested-multipart-rfc2231-names", multipart([alternative, rfc2231, continued, encoded_word], boundary="top")
    forwarded_inner = multipart([part("text/plain", "inner text"), rfc2231], boundary="fwd")
    yield (
        "forwarded-with-attachment",
        multipart([part("text/plain", "see below"), part("message/rfc822", forwarded_inner)], boundary="out"),
    )
    digest = (
        b'Content-Type: multipart/digest; boundary="dig"\r\n\r\n'
        b"--dig\r\n\r\nFrom: one@example.org\r\nSubject: one\r\n\r\nbody one\r\n"
        b"--dig\r\nContent-Type: text/plain\r\n\r\nnot a message\r\n--dig--\r\n"
    )
    yield "digest", multipart([part("text/plain", "list digest"), digest], boundary="d0")
    dsn = multipart(
        [
            part("text/plain", "Delivery has failed."),
            part(
                "message/delivery-status",
                b"Reporting-MTA: dns; mx.example.test\r\n\r\nFinal-Recipient: rfc822; x@y\r\n"
                b"Action: failed\r\nStatus: 5.1.1\r\n",
            ),
            part("text/rfc822-headers", b"From: a@example.org\r\nSubject: lost\r\n"),
        ],
        subtype='report; report-type="delivery-status"',
        boundary="dsn",
    )
    yield "delivery-status-notification", dsn
    yield (
        "preamble-and-epilogue",
        plain(
            ("Content-Type", 'multipart/mixed; boundary="pe"'),
            body=b"This is a preamble.\r\n--not the boundary\r\n--pe\r\nContent-Type: text/plain\r\n\r\n"
            b"body\r\n--pe--\r\nepilogue\r\n--pe\r\nstill epilogue\r\n",
        ),
    )
    yield (
        "dash-lines-in-body",
        multipart(
            [
                part("text/plain", b"-- \r\nsignature\r\n--b\r\n--b1x\r\n---\r\n"),
                part("text/plain", b"--b1 \r\ntrailing"),
            ],
            boundary="b1",
        ),
    )
    # Large: runs that the stream cuts and sizes it counts, next to the same message whole.
    big_text = b"".join(b"line %d of a long log, no colon here\r\n" % i for i in range(8_000))
    yield (
        "large-mixed-crlf",
        multipart(
            [
                part("text/plain; charset=utf-8", big_text),
                _attachment("application/zip", b64_lines(1_500_000, 1), "attachment; filename=logs.zip"),
                part("application/octet-stream; name=raw.bin", bytes(range(256)) * 2000),
                part(
                    "text/csv; name=c.csv",
                    b"".join(b"row %d;value=3D%d\r\n" % (i, i) for i in range(20_000)),
                    ("Content-Transfer-Encoding", "quoted-printable"),
                ),
            ],
            boundary="L",
        ),
    )
    lf = b64_lines(700_000, 2, b"\n")
    yield (
        "large-bare-lf",
        (
            b"From: a@example.org\nSubject: lf\nContent-Type: multipart/mixed; boundary=LF\n\n--LF\n"
            b"Content-Type: text/html\n\n" + b"<p>" + b"word " * 60_000 + b"</p>\n--LF\n"
            b"Content-Type: image/jpeg; name=a.jpg\nContent-Transfer-Encoding: base64\n\n" + lf + b"--LF--\n"
        ),
    )
    yield "large-no-close", multipart([part("text/plain", "x"), part("application/pdf", b64_lines(600_000, 3))])[:-9]
    yield (
        "large-line-less",
        plain(("Content-Type", "application/octet-stream"), body=base64.b64encode(random.Random(4).randbytes(900_000))),
    )
    yield "large-text-single-part", plain(body=("é" * 100 + "\r\n").encode() * 3000)


HOSTILE = [case for case in hostile_messages()]
REAL_WORLD = [(f"real-{name}", raw) for name, raw in real_world_messages()]
CORPUS = [*HOSTILE, *REAL_WORLD, *own_messages()]

# Deliberate differences, each only on input built to hurt (none on ordinary mail):
# - attachments-10000: the stream reads MAX_STREAM_PARTS header sections, then stops. The parts after it are
#   never read, so the open multipart lacks its close delimiter (CloseBoundaryNotFoundDefect) and the stream
#   names its own cap; the list of attachments is the same (the walk lists 1,000 either way).
# - nesting-rfc822-1000: the whole message's parser follows 1,000 forwarded messages into each other until it
#   runs out of stack, and falls back to the headers alone (the forwarded part then gets the size of the whole
#   rest). The stream never parses inside a message/* part (the walk does not descend into one), so it has no
#   recursion to run out of and lists the forwarded message as it lists any other: size null, no problem.
DIFFERENCES: dict[str, dict[str, Any]] = {
    "attachments-10000": {
        "mime_problems": [
            "more than 1001 MIME parts; the rest not read",
            "CloseBoundaryNotFoundDefect",
            "more than 1000 MIME parts; the rest not listed",
        ]
    },
    "nesting-rfc822-1000": {
        "attachments": [{"filename": None, "content_type": "message/rfc822", "size": None, "disposition": None}],
        "mime_problems": [],
    },
}


def chunkings(name: str, raw: bytes) -> Iterator[tuple[str, Iterable[bytes]]]:
    yield "whole", [raw]
    if len(raw) <= 32 * 1024:
        yield "1-byte", pieces(raw, 1)
    if len(raw) <= 512 * 1024:
        yield "7-byte", pieces(raw, 7)
    yield "64-KiB", pieces(raw, 64 * 1024)
    yield "random", random_pieces(raw, name)


def test_the_corpus_covers_what_it_claims() -> None:
    names = {name for name, _ in CORPUS}
    assert len(HOSTILE) >= 200 and len(names) == len(CORPUS)
    assert set(DIFFERENCES) <= names
    assert sum(len(raw) > 1 * MB for _, raw in CORPUS) >= 2, "no message large enough to be cut"


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("name", "raw"), CORPUS, ids=[name for name, _ in CORPUS])
def test_the_streamed_envelope_equals_the_whole_message_one(name: str, raw: bytes) -> None:
    whole = build_envelope(raw, **OPTIONS)
    expected = {**whole, **DIFFERENCES.get(name, {})}
    for chunking, chunks in chunkings(name, raw):
        got = streamed(chunks).envelope(**OPTIONS)
        different = {key: (expected[key], got[key]) for key in expected if got[key] != expected[key]}
        assert not different, f"{chunking}: {different}"
        assert got.keys() == whole.keys()


def test_a_difference_listed_is_a_difference_still() -> None:
    # A listed difference that no longer differs should leave the list: the stream then matches the whole parse.
    for name, raw in CORPUS:
        if name in DIFFERENCES:
            whole = build_envelope(raw, **OPTIONS)
            assert any(whole[key] != value for key, value in DIFFERENCES[name].items()), name


# --- size and hash ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 7, 65_536, 3 * MB + 5])
def test_size_and_sha256_are_those_of_every_byte_fed(size: int) -> None:
    raw = random.Random(size).randbytes(size)
    for chunks in ([raw], pieces(raw, 7) if size < MB else pieces(raw, 1000), random_pieces(raw, "h")):
        stream = streamed(chunks)
        assert (stream.size, stream.sha256) == (len(raw), hashlib.sha256(raw).hexdigest())
        envelope = stream.envelope(**OPTIONS)
        assert (envelope["size"], envelope["sha256"]) == (len(raw), hashlib.sha256(raw).hexdigest())


def test_the_envelope_can_be_asked_twice_and_closes_the_stream() -> None:
    raw = multipart([part("text/plain", "hello"), part("application/pdf", b"JVBERi0=")])
    stream = streamed(pieces(raw, 5))
    first = stream.envelope(**OPTIONS)
    assert stream.envelope(**OPTIONS) == first == build_envelope(raw, **OPTIONS)
    assert stream.envelope(**{**OPTIONS, "uid": 43})["id"] == "support@example.test/7/43"
    with pytest.raises(ValueError, match="feed every byte"):
        stream.feed(b"more")


# --- hostile input: memory stays bounded ----------------------------------------------------------------------

# Chunks are made on the fly, so that the test holds no copy either: the peak is what the stream keeps.
PEAK_LIMIT = 2 * SKELETON_BYTES  # bytes: far below any of the messages, which run to 50 MB and more


BLOCK = 57 * 1024  # bytes of data per generated chunk: 76 KiB of base64


def b64_stream(blocks: int, *, lines: bool) -> Iterator[bytes]:
    blob = random.Random(blocks).randbytes(BLOCK)
    encoded = base64.encodebytes(blob).replace(b"\n", CRLF) if lines else base64.b64encode(blob)
    for _ in range(blocks):
        yield encoded


HEAD = (
    b"From: a@example.org\r\nSubject: big\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
    b"--B\r\nContent-Type: text/plain\r\n\r\nsee the attachment\r\n"
    b"--B\r\nContent-Type: image/png; name=x.png\r\nContent-Transfer-Encoding: base64\r\n\r\n"
)


def attachment_50_mb() -> Iterator[bytes]:
    yield HEAD
    yield from b64_stream(700, lines=True)
    yield b"--B--\r\n"


def line_less_150_mb_attachment() -> Iterator[bytes]:
    yield HEAD
    yield from b64_stream(2025, lines=False)
    yield b"\r\n--B--\r\n"


def line_less_50_mb_without_headers() -> Iterator[bytes]:
    yield from b64_stream(700, lines=False)


def no_boundaries_50_mb() -> Iterator[bytes]:
    yield b"From: a@example.org\r\nSubject: a long text\r\n\r\n"
    paragraph = (b"A line of text in a very long message.\r\n" * 6 + b"\r\n") * 200
    for _ in range(50 * MB // len(paragraph)):
        yield paragraph


def parts_100k() -> Iterator[bytes]:
    yield b"From: a@example.org\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
    for _ in range(100):
        yield (b"--B\r\nContent-Type: text/plain; name=t.txt\r\n\r\n" + b"x" * 300 + b"\r\n") * 1000
    yield b"--B--\r\n"


def boundary_never_closed() -> Iterator[bytes]:
    yield HEAD
    yield from b64_stream(700, lines=True)
    yield b"--B\r\nContent-Type: text/plain\r\n\r\n"
    yield from b64_stream(100, lines=True)


def header_of_50_mb() -> Iterator[bytes]:
    yield b"From: a@example.org\r\nSubject: "
    for _ in range(50):
        yield b"x" * MB
    yield b"\r\n\r\nbody\r\n"


def lines_that_look_like_boundaries() -> Iterator[bytes]:
    # Signature dashes, rules and near-boundaries on every line: each one could end the part, none does.
    yield b"From: a@example.org\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n\r\n"
    for _ in range(25):
        yield b"-- \r\n--\r\n--Bx\r\n--B-\r\n" * 50_000
    yield b"--B--\r\n"


HOSTILE_STREAMS: list[tuple[Callable[[], Iterator[bytes]], Callable[[dict[str, Any]], bool]]] = [
    (attachment_50_mb, lambda e: e["attachments"][0]["size"] == 700 * BLOCK and e["preview"] == "see the attachment"),
    (line_less_150_mb_attachment, lambda e: e["attachments"][0]["size"] == 2025 * BLOCK and e["mime_problems"] == []),
    (line_less_50_mb_without_headers, lambda e: e["mime_problems"] == ["MissingHeaderBodySeparatorDefect"]),
    (no_boundaries_50_mb, lambda e: (e["preview"] or "").startswith("A line of text") and not e["mime_problems"]),
    (
        parts_100k,
        lambda e: (
            e["counts"]["attachments"] == 999 and "more than 1001 MIME parts; the rest not read" in e["mime_problems"]
        ),
    ),
    (
        boundary_never_closed,
        lambda e: (
            [a["size"] for a in e["attachments"]] == [700 * BLOCK]
            and "CloseBoundaryNotFoundDefect" in e["mime_problems"]
        ),
    ),
    (
        lines_that_look_like_boundaries,
        lambda e: e["content_type"] == "multipart/mixed" and e["counts"]["attachments"] == 0 and not e["mime_problems"],
    ),
    (
        header_of_50_mb,
        lambda e: (
            e["subject"] is None
            and e["from"][0]["address"] == "a@example.org"
            and any(p.startswith("MIME structure longer than") for p in e["mime_problems"])
        ),
    ),
]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(("make", "check"), HOSTILE_STREAMS, ids=[make.__name__ for make, _ in HOSTILE_STREAMS])
def test_hostile_streams_are_walked_in_bounded_memory(
    make: Callable[[], Iterator[bytes]], check: Callable[[dict[str, Any]], bool]
) -> None:
    stream = EnvelopeStream()
    tracemalloc.start()
    try:
        for chunk in make():
            stream.feed(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert stream.size >= 3 * PEAK_LIMIT, "the message is too small to prove anything"
    assert peak < PEAK_LIMIT, f"feeding held {peak / MB:.1f} MB of a {stream.size / MB:.0f} MB message"
    envelope = stream.envelope(**OPTIONS)
    assert check(envelope), {key: envelope[key] for key in ("attachments", "preview", "mime_problems", "subject")}


def test_a_50_mb_message_fed_in_one_chunk_is_walked_in_pieces() -> None:
    raw = b"".join(attachment_50_mb())
    stream = EnvelopeStream()
    tracemalloc.start()
    try:
        stream.feed(raw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < PEAK_LIMIT, f"one large chunk cost {peak / MB:.1f} MB beyond the chunk itself"
    assert stream.envelope(**OPTIONS)["attachments"][0]["size"] == 700 * BLOCK


@pytest.mark.parametrize("eol", [b"\r\n", b"\n", b"\r"], ids=["crlf", "lf", "cr"])
def test_a_boundary_after_long_base64_is_found_whatever_the_line_end(eol: bytes) -> None:
    # The content walk skips to the first place the boundary's text appears and lets the pattern decide from the
    # line end before it: the boundary text in the middle of a line ends nothing, the one after the line end does.
    body = eol.join(base64.b64encode(random.Random(3).randbytes(57)) for _ in range(40_000))
    raw = eol.join([
        b"From: a@example.org", b"Content-Type: multipart/mixed; boundary=B", b"", b"--B",
        b"Content-Type: text/plain", b"", b"see x--B and x--B-- here, not boundaries", b"--B",
        b"Content-Type: application/octet-stream; name=a.bin", b"Content-Transfer-Encoding: base64", b"",
        body, b"--B", b"Content-Type: application/octet-stream; name=b.bin", b"", b"tail", b"--B--", b"",
    ])  # fmt: skip
    whole = build_envelope(raw, **OPTIONS)
    assert [a["filename"] for a in whole["attachments"]] == ["a.bin", "b.bin"]
    for chunks in ([raw], pieces(raw, 64 * 1024), pieces(raw, 4093)):
        assert streamed(chunks).envelope(**OPTIONS) == whole
