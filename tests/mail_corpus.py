"""Hostile and broken mail, made by code, plus real-world samples from a public corpus that Python ships.

``hostile_messages()`` yields (name, raw bytes) pairs: deterministic, uniquely named, each a way in which mail
seen in the wild (or built to hurt) breaks a parser. The 30 MB message comes last and only on request, so that
fast suites can skip it. ``real_world_messages()`` yields CPython's own email test corpus (``test.test_email``
data files) where the interpreter ships its test package.
"""

from __future__ import annotations

import base64
import importlib.util
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

CRLF = b"\r\n"
HUGE_ATTACHMENT_BYTES = 30 * 1024 * 1024  # the design's large-message case, past Exchange's 25 MB default

Header = tuple[str | bytes, str | bytes]

_PLAIN_HEADERS: list[Header] = [
    ("From", "Alice Example <alice@example.org>"),
    ("To", "Support <support@example.test>"),
    ("Subject", "Printer on floor 3 is out of toner"),
    ("Date", "Tue, 14 May 2024 09:30:00 +0200"),
    ("Message-ID", "<corpus-1@example.org>"),
    ("MIME-Version", "1.0"),
]


def _b(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8")


def message(headers: Iterable[Header], body: bytes | str = b"Hello.\r\n", *, eol: bytes = CRLF) -> bytes:
    """Raw message from (name, value) pairs and a body; values may be bytes to carry 8-bit or NUL."""
    lines = [_b(name) + b": " + _b(value) for name, value in headers]
    return eol.join(lines) + eol + eol + _b(body)


def plain(*extra: Header, body: bytes | str = b"Hello.\r\n", replace: Iterable[str] = ()) -> bytes:
    """A clean text message with extra headers; names in ``replace`` drop the default header of that name."""
    dropped = {name.lower() for name in replace} | {str(name).lower() for name, _ in extra}
    headers = [h for h in _PLAIN_HEADERS if str(h[0]).lower() not in dropped]
    return message([*headers, *extra], body)


def multipart(
    parts: Iterable[bytes], *, subtype: str = "mixed", boundary: str = "b1", head: Iterable[Header] = ()
) -> bytes:
    body = b"".join(b"--" + _b(boundary) + CRLF + part + CRLF for part in parts) + b"--" + _b(boundary) + b"--" + CRLF
    headers = [*head, ("Content-Type", f'multipart/{subtype}; boundary="{boundary}"')]
    return plain(*headers, body=body, replace=("Content-Type",))


def part(content_type: str | bytes, body: bytes | str, *extra: Header) -> bytes:
    return message([("Content-Type", content_type), *extra], body)


def _reference() -> bytes:
    """A message with every common structure: alternative bodies, an attachment and a forwarded message."""
    forwarded = message([("From", "bob@example.org"), ("Subject", "fwd"), ("Content-Type", "text/plain")], b"inner\r\n")
    alternative = (
        b'Content-Type: multipart/alternative; boundary="alt"\r\n\r\n'
        b"--alt\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nplain caf\xc3\xa9\r\n"
        b"--alt\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>html caf&eacute;</p>\r\n--alt--"
    )
    attachment = part(
        'application/pdf; name="report.pdf"',
        base64.encodebytes(bytes(range(256)) * 8).replace(b"\n", CRLF),
        ("Content-Transfer-Encoding", "base64"),
        ("Content-Disposition", 'attachment; filename="report.pdf"'),
    )
    return multipart([alternative, attachment, part("message/rfc822", forwarded)], boundary="outer")


def _baseline() -> Iterator[tuple[str, bytes]]:
    yield "baseline-plain", plain()
    yield "baseline-reference", _reference()
    yield "baseline-html-only", plain(("Content-Type", "text/html; charset=utf-8"), body=b"<p>Hi <b>there</b></p>")


def _line_endings() -> Iterator[tuple[str, bytes]]:
    reference = _reference()
    yield "eol-bare-lf", reference.replace(CRLF, b"\n")
    yield "eol-bare-cr", reference.replace(CRLF, b"\r")
    mixed = b"".join(line + (b"\n", b"\r\n", b"\r")[i % 3] for i, line in enumerate(reference.split(CRLF)))
    yield "eol-mixed", mixed
    yield "eol-no-final-newline", reference.rstrip(CRLF)
    yield "eol-cr-cr-lf", reference.replace(CRLF, b"\r\r\n")
    yield "eol-lf-cr", reference.replace(CRLF, b"\n\r")


def _truncated() -> Iterator[tuple[str, bytes]]:
    reference = _reference()
    for i in range(1, 25):
        cut = len(reference) * i // 25
        yield f"truncated-at-{cut}", reference[:cut]


def _boundaries() -> Iterator[tuple[str, bytes]]:
    text = part("text/plain", "hello")
    yield "boundary-missing-param", plain(("Content-Type", "multipart/mixed"), body=b"--b1\r\n" + text + b"\r\n--b1--")
    yield "boundary-never-appears", plain(("Content-Type", 'multipart/mixed; boundary="zz"'), body=b"no parts\r\n")
    yield "boundary-no-close", plain(("Content-Type", 'multipart/mixed; boundary="b1"'), body=b"--b1\r\n" + text)
    yield "boundary-close-only", plain(("Content-Type", 'multipart/mixed; boundary="b1"'), body=b"--b1--\r\n")
    yield "boundary-empty", plain(("Content-Type", 'multipart/mixed; boundary=""'), body=b"--\r\n" + text + b"\r\n----")
    yield "boundary-unquoted-space", plain(("Content-Type", "multipart/mixed; boundary=a b"), body=b"--a b\r\n" + text)
    long_boundary = "x" * 200
    yield "boundary-200-chars", multipart([text], boundary=long_boundary)
    yield "boundary-odd-chars", multipart([text], boundary="()<>@,;:\\/[]?=")
    nested = multipart([text], boundary="b1").split(CRLF + CRLF, 1)[1]
    yield "boundary-nested-same", multipart([b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n' + nested])
    yield (
        "boundary-in-preamble",
        plain(
            ("Content-Type", 'multipart/mixed; boundary="b1"'),
            body=b"preamble --b1 inline\r\n--b1\r\n" + text + b"\r\n--b1--",
        ),
    )
    yield (
        "boundary-trailing-garbage",
        plain(
            ("Content-Type", 'multipart/mixed; boundary="b1"'), body=b"--b1 garbage\r\n" + text + b"\r\n--b1--garbage"
        ),
    )
    yield "boundary-parts-after-close", multipart([text]) + b"--b1\r\n" + text + b"\r\n--b1--\r\n"
    yield "boundary-zero-parts", plain(("Content-Type", 'multipart/mixed; boundary="b1"'), body=b"--b1--")
    yield "boundary-no-subtype", plain(("Content-Type", 'multipart/; boundary="b1"'), body=b"--b1\r\n" + text)
    yield "boundary-no-slash", plain(("Content-Type", 'multipart; boundary="b1"'), body=b"--b1\r\n" + text)
    yield "boundary-huge-epilogue", multipart([text]) + b"epilogue line\r\n" * 5000


_CHARSETS = [
    "x-unknown",
    "unknown-8bit",
    "utf-8\x00",
    "base64",
    "rot13",
    "zlib",
    "idna",
    "utf-7",
    "utf-16",
    "utf-32",
    "iso-8859-99",
    "cp65001",
    "charset-" + "x" * 300,
    "../../etc/passwd",
    "gb18030",
    "iso-2022-jp",
    "hex",
    "punycode",
]


def _charsets() -> Iterator[tuple[str, bytes]]:
    for index, charset in enumerate(_CHARSETS):
        label = f"{index:02d}"
        yield f"charset-{label}-subject", plain(("Subject", f"=?{charset}?Q?caf=E9_=1B$B?=".encode("latin-1")))
        body = "caf\u00e9 \u00fcber \u4e2d\u6587".encode("utf-8") + b"\xff\xfe\x1b$B"
        yield f"charset-{label}-body", plain(("Content-Type", f'text/plain; charset="{charset}"'), body=body)
        disposition = f"attachment; filename*={charset}''caf%E9%FF.txt"
        attachment = part("application/octet-stream", "data", ("Content-Disposition", disposition))
        yield f"charset-{label}-filename", multipart([part("text/plain", "see file"), attachment])


def _eight_bit() -> Iterator[tuple[str, bytes]]:
    yield "8bit-subject-utf8", plain(("Subject", "Caf\u00e9 \u2013 na\u00efve \U0001f600".encode()))
    yield "8bit-subject-latin1", plain(("Subject", b"Caf\xe9 cr\xe8me br\xfbl\xe9e"))
    yield "8bit-subject-cp1252-quotes", plain(("Subject", b"\x93quoted\x94 \x96 dash"))
    yield "8bit-subject-shift-jis", plain(("Subject", "\u65e5\u672c\u8a9e".encode("shift_jis")))
    yield "8bit-subject-overlong-utf8", plain(("Subject", b"\xc0\xaf\xe0\x80\xaf overlong"))
    yield "8bit-from-utf8", plain(("From", "J\u00e9r\u00f4me <j@example.org>".encode()))
    yield "8bit-from-latin1", plain(("From", b"J\xe9r\xf4me <j@example.org>"))
    yield "8bit-header-name", plain((b"X-Caf\xe9", "value"))
    yield "8bit-content-type", plain(("Content-Type", b"text/pl\xe9in; charset=utf-8"))
    yield (
        "8bit-boundary",
        plain(("Content-Type", b'multipart/mixed; boundary="\xe9"'), body=b"--\xe9\r\n\r\nx\r\n--\xe9--"),
    )
    yield (
        "8bit-filename-utf8",
        multipart(
            [
                part(
                    "application/pdf",
                    "x",
                    ("Content-Disposition", 'attachment; filename="r\u00e9sum\u00e9.pdf"'.encode()),
                )
            ]
        ),
    )
    yield (
        "8bit-filename-latin1",
        multipart([part("application/pdf", "x", ("Content-Disposition", b'attachment; filename="r\xe9sum\xe9.pdf"'))]),
    )
    yield "8bit-message-id", plain(("Message-ID", b"<caf\xe9@example.org>"))
    yield "8bit-date", plain(("Date", b"Tue, 14 May 2024 09:30:00 +0200 \xe9t\xe9"))


_BROKEN_WORDS = [
    "=?utf-8?B?!!!?=",
    "=?utf-8?B?Y2Fmw6k?=",
    "=?utf-8?B?Y2Fmw6k====?=",
    "=?utf-8?Q?caf=C3?=",
    "=?utf-8?Q?caf=ZZ?=",
    "=?utf-8?X?abc?=",
    "=?utf-8?Q?unterminated",
    "=?utf-8?B?Y2Fmww==?= =?utf-8?B?qQ==?=",
    "=?utf-8?Q?=3D=3Futf-8=3FQ=3Fx=3F=3D?=",
    "=?utf-8?Q??=",
    "=??Q?abc?=",
    "=?utf-8*en?Q?hi?=",
    "=?utf-8*?Q?hi?=",
    "=?utf-8?Q?a b?=",
    "=?utf-8?Q?" + "a" * 1000 + "?=",
    "=?utf-8?Q?a?==?utf-8?Q?b?=",
    "=?utf-8?Q?caf=C3=A9?= =?iso-8859-1?Q?caf=E9?=",
    "=?utf-8?Q?=FF=FE?=",
    "=?UTF-8?q?caf=C3=A9?=",
    "=?utf-8?Q?a=00b?=",
    "=?utf-8?Q?a=0D=0ABcc:_evil@example.org?=",
    "=?utf-16?B?AND/3w==?=",
    "=?utf-7?Q?+AGkAbwB0-?=",
    "=?utf-8?Q?what=3F?= =?utf-8?B?",
    "=?=?utf-8?Q?x?=?=",
    "=?us-ascii?Q?=E9?=",
]


def _rfc2047() -> Iterator[tuple[str, bytes]]:
    for index, word in enumerate(_BROKEN_WORDS):
        yield f"rfc2047-{index:02d}-subject", plain(("Subject", f"Re: {word} end"))
    yield "rfc2047-8bit-inside-word", plain(("Subject", b"=?utf-8?Q?caf\xe9?="))
    yield "rfc2047-in-quoted-display-name", plain(("From", '"=?utf-8?Q?J=C3=A9?=" <j@example.org>'))
    yield "rfc2047-as-local-part", plain(("From", "=?utf-8?Q?j=C3=A9?=@example.org"))
    yield "rfc2047-unknown-charset-display-name", plain(("From", "=?x-unknown?Q?J=E9?= <j@example.org>"))
    yield "rfc2047-bad-base64-display-name", plain(("To", "=?utf-8?B?@@@?= <t@example.org>"))
    yield "rfc2047-in-message-id", plain(("Message-ID", "=?utf-8?Q?<id@example.org>?="))
    yield "rfc2047-in-date", plain(("Date", "=?utf-8?Q?Tue,_14_May_2024_09:30:00_+0200?="))


def _enormous() -> Iterator[tuple[str, bytes]]:
    many = ", ".join(f'"Recipient {i}" <r{i}@example.org>' for i in range(2000))
    encoded = ", ".join(f"=?utf-8?Q?R=C3=A9cipient_{i}?= <r{i}@example.org>" for i in range(2000))
    yield "enormous-subject-10kb", plain(("Subject", "S" * 10240))
    yield "enormous-subject-100kb-words", plain(("Subject", " ".join(["word"] * 20000)))
    yield "enormous-subject-1mb", plain(("Subject", "x" * (1024 * 1024)))
    yield "enormous-to-2000", plain(("To", many))
    yield "enormous-cc-2000-encoded", plain(("Cc", encoded))
    yield "enormous-subject-10kb-to-2000", plain(("To", many), ("Subject", "\u00e9" * 10240))
    yield "enormous-everything", plain(
        ("To", many), ("Cc", encoded), ("Reply-To", many), ("Subject", "\u4e2d" * 20000),
        ("References", " ".join(f"<ref{i}@example.org>" for i in range(10000))),
        body="word " * 100000,
    )  # fmt: skip
    yield "enormous-commas", plain(("To", "," * 100000))
    yield "enormous-encoded-words", plain(("Subject", "=?utf-8?q?a?= " * 20000), ("To", "=?utf-8?q?a?= " * 20000))
    yield "enormous-references-10000", plain(("References", " ".join(f"<ref{i}@example.org>" for i in range(10000))))
    yield "enormous-100000-headers", plain(*((f"X-H{i}", "v") for i in range(100000)))
    yield "enormous-folded-10000-lines", plain(("Subject", "\r\n ".join(["fold"] * 10000)))
    params = "; ".join(f'p{i}="v;{i}"' for i in range(20000))
    yield "enormous-content-type-params", plain(("Content-Type", f"text/plain; {params}; charset=utf-8"))
    yield "enormous-duplicate-subjects", plain(*(("Subject", f"dup {i}") for i in range(500)))
    yield "enormous-display-name", plain(("From", '"' + "n" * 300000 + '" <n@example.org>'))
    yield "enormous-nested-comments", plain(("From", "(" * 50000 + "a@example.org"))
    yield "enormous-nested-comments-short", plain(("To", "(" * 1500 + "a@example.org" + ")" * 1500))
    yield "enormous-quoted-escapes", plain(("To", '"' + '\\"' * 50000 + '" <q@example.org>'))
    yield "enormous-angle-nesting", plain(("To", "<" * 50000 + "a@example.org" + ">" * 50000))
    yield "enormous-group-colons", plain(("To", "g:" * 50000 + "a@example.org;"))


def nested_multipart(depth: int, *, close: bool = True) -> bytes:
    head = b"".join(f'Content-Type: multipart/mixed; boundary="n{i}"\r\n\r\n--n{i}\r\n'.encode() for i in range(depth))
    tail = b"".join(f"\r\n--n{i}--".encode() for i in reversed(range(depth))) if close else b""
    return (
        _b("Subject: deep\r\nFrom: a@example.org\r\nMIME-Version: 1.0\r\n") + head + part("text/plain", "leaf") + tail
    )


def nested_rfc822(depth: int) -> bytes:
    raw = plain(body=b"innermost")
    for _ in range(depth):
        raw = plain(("Content-Type", "message/rfc822"), body=raw)
    return raw


def _nesting() -> Iterator[tuple[str, bytes]]:
    for depth in (50, 200, 1000, 5000):
        yield f"nesting-multipart-{depth}", nested_multipart(depth)
    yield "nesting-multipart-200-unclosed", nested_multipart(200, close=False)
    for depth in (200, 1000):
        yield f"nesting-rfc822-{depth}", nested_rfc822(depth)
    alternating = plain(body=b"leaf")
    for i in range(150):
        if i % 2:
            alternating = plain(("Content-Type", "message/rfc822"), body=alternating)
        else:
            alternating = multipart([alternating], boundary=f"alt{i}")
    yield "nesting-alternating-150", alternating


def _garbage() -> Iterator[tuple[str, bytes]]:
    yield "zero-bytes", b""
    yield "only-crlf", CRLF
    yield "only-newlines", b"\n\n\n"
    yield "single-byte", b"x"
    yield "headers-only-no-separator", b"From: a@example.org\r\nSubject: no body"
    yield "body-only", b"\r\nThis message has no headers at all.\r\n"
    yield "nul-only", b"\x00" * 1000
    yield "nul-in-subject", plain(("Subject", b"before\x00after"))
    yield "nul-in-header-name", plain((b"X-\x00Evil", "v"))
    yield "nul-in-body", plain(body=b"text\x00more\x00" * 100)
    yield "nul-in-boundary", plain(("Content-Type", b'multipart/mixed; boundary="a\x00b"'), body=b"--a\x00b\r\n\r\nx")
    yield "nul-in-address", plain(("To", b"evil\x00@example.org, ok@example.org"))
    yield "all-byte-values", plain(("Subject", bytes(range(32, 256))), body=bytes(range(256)) * 4)
    yield "one-megabyte-line", plain(body=b"y" * (1024 * 1024))
    rng = random.Random(7)
    for size in (1, 10, 100, 1000, 10000, 100000):
        yield f"random-bytes-{size}", rng.randbytes(size)
    yield "random-after-headers", plain(body=rng.randbytes(50000))
    yield "control-chars-subject", plain(("Subject", "".join(chr(c) for c in range(1, 32) if c not in (10, 13))))
    yield "header-injection-crlf-in-value", plain(("Subject", b"a\rBcc: evil@example.org\r"))


def _addresses() -> Iterator[tuple[str, bytes]]:
    yield "address-utf8-everything", plain(("From", "J\u00e9r\u00f4me <j\u00e9r\u00f4me@ex\u00e4mple.com>".encode()))
    yield "address-punycode", plain(("From", "a@xn--exmple-cua.com"))
    yield "address-latin1-local", plain(("From", b"j\xe9@example.org"))
    yield "address-quoted-unicode", plain(("To", '"j\u00e9 r\u00f4"@example.org'.encode()))
    yield "address-route", plain(("To", "<@relay1,@relay2:user@example.org>"))
    yield "address-domain-literal", plain(("To", "user@[192.0.2.1]"))
    yield "address-no-domain", plain(("To", "user@"))
    yield "address-no-local", plain(("To", "@example.org"))
    yield "address-400-chars", plain(("To", "l" * 400 + "@example.org"))
    yield "address-emoji", plain(("From", "\U0001f600 <\U0001f600@example.org>".encode()))
    yield "address-rtl-override", plain(("From", "\u202etxt.exe <evil@example.org>".encode()))
    yield "address-unclosed-angle", plain(("To", "Name <a@example.org, b@example.org"))
    yield "address-unclosed-quote", plain(("To", '"Name <a@example.org>, b@example.org'))
    yield (
        "address-groups",
        plain(("To", "undisclosed-recipients:;"), ("Cc", "team: a@example.org, b@example.org;, c@x.org")),
    )
    yield "address-garbage", plain(("From", "this is not an address at all"), ("To", "<<>>, ;;;, ::"))


_DATES = [
    "",
    "garbage",
    "Mon, 32 Nov 1995 19:12:08 -0500",
    "Mon, 20 Nov 0 19:12:08 -0500",
    "Mon, 20 Nov 99999 19:12:08 -0500",
    "20 Nov 1995 25:61:61 +9999",
    "Mon, 20 Nov 1995",
    "19:12:08",
    "20 Nov 95 19:12 EST",
    "Sun, 31 Feb 2021 10:00:00 +0000",
    "2021-02-28T10:00:00Z",
    "Tue, 19 Jan 2038 03:14:08 +0000",
    "Fri, 31 Dec 9999 23:59:59 -1200",
    "Mon, 01 Jan 0001 00:00:00 +0100",
    "1700000000",
    "Mon, 20 Nov 1995 19:12:08 -0500 (EST) " + "x" * 300,
    "Mon, 20 Nov 1995 19:12:08 +2400",
    "Mon, 20 Nov 1995 19:12:08.123 -0500",
    "Mon, 20 Nov 1995 19:12:08 -0000",
    "\u0661\u0669\u0669\u0665",
]


def _dates() -> Iterator[tuple[str, bytes]]:
    for index, date in enumerate(_DATES):
        yield f"date-{index:02d}", plain(("Date", date.encode()))
    yield "date-nul", plain(("Date", b"Tue, 14 May\x00 2024 09:30:00 +0200"))


def _duplicates() -> Iterator[tuple[str, bytes]]:
    for name, first, second in (
        ("Subject", "first", "second"),
        ("From", "a@example.org", "b@example.org"),
        ("Message-ID", "<one@example.org>", "<two@example.org>"),
        ("Date", "Tue, 14 May 2024 09:30:00 +0200", "garbage"),
        ("Content-Type", "text/plain", "text/html"),
        ("To", "a@example.org", "b@example.org"),
        ("In-Reply-To", "<p1@example.org>", "<p2@example.org>"),
    ):
        yield f"duplicate-{name.lower()}", plain((name, first), (name, second))
    yield "duplicate-to-three", plain(("To", "a@example.org"), ("To", "b@example.org"), ("To", "c@example.org"))


def _message_ids() -> Iterator[tuple[str, bytes]]:
    yield "message-id-missing", plain(replace=("Message-ID",))
    yield "message-id-empty", plain(("Message-ID", ""))
    yield "message-id-no-brackets", plain(("Message-ID", "bare@example.org"))
    yield "message-id-huge", plain(("Message-ID", "<" + "i" * 5000 + "@example.org>"))
    yield "message-id-spaces", plain(("Message-ID", "<a b c@example.org>"))
    yield "message-id-several", plain(("Message-ID", "<a@example.org> <b@example.org>"))
    yield "in-reply-to-junk", plain(("In-Reply-To", "Your message of Tuesday <p@example.org> (sent)"))
    yield "references-no-brackets", plain(("References", "a@x b@y c@z"))


def _transfer_encodings() -> Iterator[tuple[str, bytes]]:
    def encoded(cte: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
        return plain(("Content-Type", content_type), ("Content-Transfer-Encoding", cte), body=body)

    yield "cte-base64-invalid-chars", encoded("base64", b"SGVsbG8*&^%$ d29ybGQ=")
    yield "cte-base64-truncated", encoded("base64", b"SGVsbG8gd29yb")
    yield "cte-base64-no-padding", encoded("base64", b"SGVsbG8gd29ybGQ")
    yield "cte-base64-padding-middle", encoded("base64", b"SGVs=bG8gd29y==bGQ=")
    yield "cte-qp-bad-escapes", encoded("quoted-printable", b"caf=E9 =ZZ =\r\n=3")
    yield "cte-qp-soft-break-at-end", encoded("quoted-printable", b"line=")
    yield "cte-uuencode", encoded("x-uuencode", b"begin 644 f\r\n#86)C\r\n`\r\nend\r\n")
    yield "cte-8bit-binary", encoded("8bit", bytes(range(256)))
    yield (
        "cte-on-multipart",
        plain(
            ("Content-Type", 'multipart/mixed; boundary="b1"'),
            ("Content-Transfer-Encoding", "base64"),
            body=base64.encodebytes(b"--b1\r\n\r\nx\r\n--b1--"),
        ),
    )
    yield (
        "cte-duplicated",
        plain(("Content-Transfer-Encoding", "base64"), ("Content-Transfer-Encoding", "7bit"), body=b"SGk="),
    )
    yield "cte-binary-nul", encoded("binary", b"\x00\x01\x02" * 1000)
    yield "cte-spaces-uppercase", encoded("  BASE64  ", b"SGVsbG8=")
    yield (
        "cte-base64-utf16-html",
        encoded("base64", base64.encodebytes("<p>\u00e9t\u00e9</p>".encode("utf-16")), "text/html; charset=utf-16"),
    )


def _header_syntax() -> Iterator[tuple[str, bytes]]:
    yield "syntax-line-without-colon", b"From: a@example.org\r\nthis line has no colon\r\nSubject: s\r\n\r\nbody"
    yield "syntax-continuation-first", b" continued\r\nFrom: a@example.org\r\n\r\nbody"
    yield "syntax-long-name", plain(("X-" + "N" * 1000, "v"))
    yield "syntax-name-with-space", b"From: a@example.org\r\nX Bad Name: v\r\nSubject: s\r\n\r\nbody"
    yield "syntax-space-before-colon", b"From: a@example.org\r\nSubject : spaced\r\n\r\nbody"
    yield "syntax-empty-values", plain(("Subject", ""), ("From", ""), ("To", ""), ("Date", ""))
    yield "syntax-whitespace-continuations", plain(("Subject", "a" + "\r\n \t" * 10000 + "b"))
    yield "syntax-mbox-from-line", b"From someone@example.org Mon Jan  1 00:00:00 2024\r\n" + plain()
    yield "syntax-bare-cr-folding", plain(("Subject", "one\r two\r three"))
    yield "syntax-unterminated-word-at-end", plain(("Subject", "ends with =?utf-8?Q?"))
    yield "syntax-tab-in-name", plain(("X-Ta\tb", "v"))
    yield "syntax-colon-only", b":\r\n:\r\n: :\r\n\r\nbody"


def _attachments() -> Iterator[tuple[str, bytes]]:
    def attached(disposition: str | bytes, content_type: str | bytes = "application/octet-stream") -> bytes:
        return multipart(
            [part("text/plain", "see file"), part(content_type, "data", ("Content-Disposition", disposition))]
        )

    yield "filename-rfc2231-unknown-charset", attached("attachment; filename*=x-unknown''caf%E9.txt")
    yield "filename-rfc2231-missing-zero", attached("attachment; filename*1=part2.txt; filename*2=x")
    yield "filename-rfc2231-out-of-order", attached("attachment; filename*2=c.txt; filename*0=a; filename*1=b")
    yield "filename-rfc2231-bad-percent", attached("attachment; filename*=utf-8''%ZZ%C3%.txt")
    yield "filename-encoded-word", attached('attachment; filename="=?utf-8?Q?r=C3=A9sum=C3=A9?=.pdf"')
    yield "filename-path-traversal", attached('attachment; filename="../../../etc/passwd"')
    yield "filename-10kb", attached(f'attachment; filename="{"f" * 10240}.txt"')
    yield "filename-nul", attached(b'attachment; filename="a\x00b.exe"')
    yield (
        "filename-name-and-filename-differ",
        multipart(
            [part('application/pdf; name="one.pdf"', "x", ("Content-Disposition", 'attachment; filename="two.pdf"'))]
        ),
    )
    yield "attachments-10000", multipart([part("application/octet-stream", str(i)) for i in range(10000)])
    yield "attachment-no-content-type", multipart([b"Content-Disposition: attachment\r\n\r\ndata"])
    yield "attachment-type-no-subtype", attached("attachment", "application/")
    yield "attachment-type-semicolons", attached("attachment", ";;;;")
    yield "attachment-disposition-garbage", attached(';;;=;=""')


def _html() -> Iterator[tuple[str, bytes]]:
    def page(markup: bytes | str, charset: str = "utf-8") -> bytes:
        return plain(("Content-Type", f"text/html; charset={charset}"), body=markup)

    yield "html-script-style-only", page("<script>alert(1)</script><style>p{}</style>")
    yield "html-marked-section", page("<![if !supportLists]>x<![endif]><p>after</p>")
    yield "html-entity-bombs", page("&#99999999; &#x110000; &#0; &#xD800; &" + "amp;" * 10000)
    yield "html-unclosed-tags", page("<p><b><i><table><tr><td>cell" * 1000)
    yield "html-one-megabyte", page("<div>" + "word " * 200000 + "</div>")
    yield "html-nul", page(b"<p>a\x00b</p>")
    yield "html-unclosed-comment", page("<p>visible</p><!-- never closed " + "x" * 1000)
    yield "html-declaration-junk", page("<!DOCTYPE <<<>>> <? php ?> <![CDATA[ x ]]> <p>ok</p>")


def _classification_edges() -> Iterator[tuple[str, bytes]]:
    yield "class-auto-submitted-8bit", plain(("Auto-Submitted", b"auto-repli\xe9d"))
    yield "class-return-path-100", plain(*(("Return-Path", "<>") for _ in range(100)))
    yield "class-precedence-huge", plain(("Precedence", "bulk" * 10000))
    yield "class-list-id-encoded", plain(("List-Id", "=?utf-8?Q?L=C3=AFst?= <list.example.org>"))
    yield "class-loop-header-nul", plain(("X-Mail-Collector-Loop", b"a\x00b"))
    yield "class-report-without-type", multipart([part("text/plain", "x")], subtype="report")


def huge_message() -> bytes:
    """A message with a 30 MB base64 attachment (the design's large-message case), deterministic."""
    data = random.Random(30).randbytes(HUGE_ATTACHMENT_BYTES * 3 // 4)
    attachment = part(
        'application/octet-stream; name="big.bin"',
        base64.encodebytes(data).replace(b"\n", CRLF),
        ("Content-Transfer-Encoding", "base64"),
        ("Content-Disposition", 'attachment; filename="big.bin"'),
    )
    return multipart([part("text/plain; charset=utf-8", "The file is attached."), attachment])


def hostile_messages(*, include_huge: bool = False) -> Iterator[tuple[str, bytes]]:
    """Yield (name, raw) for every hostile or broken message; names are unique and stable across runs.

    The 30 MB message is yielded last, and only with ``include_huge``.
    """
    for family in (
        _baseline,
        _line_endings,
        _truncated,
        _boundaries,
        _charsets,
        _eight_bit,
        _rfc2047,
        _enormous,
        _nesting,
        _garbage,
        _addresses,
        _dates,
        _duplicates,
        _message_ids,
        _transfer_encodings,
        _header_syntax,
        _attachments,
        _html,
        _classification_edges,
    ):
        yield from family()
    if include_huge:
        yield "huge-30mb-attachment", huge_message()


def real_world_data_dir() -> Path | None:
    """Where CPython's email test suite keeps its sample messages, or None when the test package is absent."""
    try:
        spec = importlib.util.find_spec("test.test_email")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    data = Path(spec.origin).parent / "data"
    return data if data.is_dir() else None


def real_world_messages() -> Iterator[tuple[str, bytes]]:
    """Yield (name, raw) for the sample messages of CPython's email test suite (real mail, some deliberately
    broken by the suite's authors); nothing when the interpreter ships without its test package."""
    data = real_world_data_dir()
    if data is None:
        return
    for path in sorted(data.glob("msg_*.txt")):
        yield f"cpython-{path.stem}", path.read_bytes()
