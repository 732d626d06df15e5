"""The queue envelope against hostile mail, real-world samples and its published JSON Schema."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from collectors.envelope import (
    LOOP_HEADER,
    QUEUE_MARGIN,
    QUEUE_MESSAGE_LIMIT,
    SCHEMA,
    build_envelope,
    encode_for_queue,
    encoded_size,
    envelope_id,
)
from tests.mail_corpus import (
    HUGE_ATTACHMENT_BYTES,
    hostile_messages,
    huge_message,
    message,
    multipart,
    nested_multipart,
    part,
    plain,
    real_world_data_dir,
    real_world_messages,
)

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_DOCUMENT = json.loads((ROOT / "schemas" / "envelope.v1.json").read_text(encoding="utf-8"))
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA_DOCUMENT, format_checker=jsonschema.FormatChecker())
COLLECTED_AT = datetime(2024, 5, 14, 8, 0, tzinfo=UTC)
MAILBOX = "Support@Example.test"
BLOB = {
    "container": "raw-mail",
    "name": "support@example.test/7/42.eml",
    "url": "https://storage.example.test/raw-mail/support%40example.test/7/42.eml",
}
# Quadratic parsing of a hostile header takes minutes; a bounded one takes well under a second even on a busy
# shared machine.
SMALL_LIMIT = 8 * 1024  # bytes after base64: forces every shrinking step on ordinary mail

HOSTILE = list(hostile_messages())
REAL_WORLD = list(real_world_messages())


def build(raw: bytes, **overrides: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "mailbox": MAILBOX,
        "folder": "INBOX",
        "uidvalidity": 7,
        "uid": 42,
        "blob_url": BLOB["url"],
        "blob_name": BLOB["name"],
        "blob_container": BLOB["container"],
        "collected_at": COLLECTED_AT,
    }
    options.update(overrides)
    return build_envelope(raw, **options)


def assert_sound(raw: bytes, envelope: dict[str, Any], *, limit: int = QUEUE_MESSAGE_LIMIT) -> None:
    """What every envelope guarantees, whatever the message held."""
    errors = sorted(VALIDATOR.iter_errors(envelope), key=lambda e: list(e.absolute_path))
    assert not errors, [f"{list(e.absolute_path)}: {e.message[:200]}" for e in errors]
    assert envelope["size"] == len(raw)
    assert envelope["sha256"] == hashlib.sha256(raw).hexdigest()
    assert envelope["id"] == envelope_id(MAILBOX, 7, 42) == "support@example.test/7/42"
    assert (envelope["uidvalidity"], envelope["uid"], envelope["blob"]) == (7, 42, BLOB)
    text = encode_for_queue(envelope, max_encoded_bytes=limit)
    wire = base64.b64encode(text.encode("utf-8"))  # strict UTF-8: no lone surrogate got through
    assert len(wire) == encoded_size(envelope) <= limit - QUEUE_MARGIN
    assert json.loads(text) == envelope
    assert "\\u0000" not in text, "NUL must reach consumers escaped, not as a control character"
    flags = envelope["classification"]
    if any(flags[name] for name in ("auto_reply", "bounce", "bulk", "list", "loop")):
        assert flags["reasons"]


# --- the corpus itself -------------------------------------------------------------------------------------


def test_the_hostile_corpus_is_large_named_and_deterministic() -> None:
    names = [name for name, _ in HOSTILE]
    assert len(names) >= 200
    assert len(set(names)) == len(names)
    again = [(name, hashlib.sha256(raw).hexdigest()) for name, raw in hostile_messages()]
    assert again == [(name, hashlib.sha256(raw).hexdigest()) for name, raw in HOSTILE]
    assert {b"", b"\x00" * 1000} <= {raw for _, raw in HOSTILE}


def test_the_real_world_corpus_is_there_when_python_ships_it() -> None:
    if real_world_data_dir() is None:
        pytest.skip("this Python ships without its test package (test.test_email)")
    assert len(REAL_WORLD) >= 40


def test_the_schema_is_valid_draft_2020_12_and_closed() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA_DOCUMENT)
    assert SCHEMA_DOCUMENT["additionalProperties"] is False
    assert set(SCHEMA_DOCUMENT["required"]) == set(SCHEMA_DOCUMENT["properties"])
    assert all("description" in spec for spec in SCHEMA_DOCUMENT["properties"].values())
    assert SCHEMA_DOCUMENT["properties"]["schema"]["const"] == SCHEMA


# --- every message gives a sound envelope ------------------------------------------------------------------


# A pathological (quadratic) parse shows as a hang that pytest-timeout ends; speed itself is the benchmarks' job,
# not an assertion that a loaded machine can fail.
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("name", "raw"), HOSTILE, ids=[name for name, _ in HOSTILE])
def test_hostile_message_gives_a_sound_envelope(name: str, raw: bytes) -> None:
    envelope = build(raw)
    assert_sound(raw, envelope)
    assert build(raw) == envelope, "the same message must give the same envelope"
    assert_sound(raw, build(raw, max_encoded_bytes=SMALL_LIMIT), limit=SMALL_LIMIT)


REAL_WORLD_CASES = REAL_WORLD or [
    pytest.param("none", b"", marks=pytest.mark.skip(reason="this Python ships without its test package"))
]


@pytest.mark.parametrize(("name", "raw"), REAL_WORLD_CASES, ids=[str(case[0]) for case in REAL_WORLD_CASES])
def test_real_world_message_gives_a_sound_envelope(name: str, raw: bytes) -> None:
    assert_sound(raw, build(raw))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_30_mb_message_is_described() -> None:
    raw = huge_message()
    assert len(raw) > HUGE_ATTACHMENT_BYTES
    envelope = build(raw)
    assert_sound(raw, envelope)
    (attachment,) = envelope["attachments"]
    assert attachment["filename"] == "big.bin"
    assert attachment["size"] == pytest.approx(HUGE_ATTACHMENT_BYTES * 3 // 4, rel=0.01)
    assert envelope["preview"] == "The file is attached."


# --- decoding ----------------------------------------------------------------------------------------------


def test_encoded_words_decode_including_a_character_split_across_words() -> None:
    envelope = build(plain(("Subject", "=?utf-8?B?Y2Fmww==?= =?utf-8?B?qQ==?= =?iso-8859-1?Q?cr=E8me?= ok")))
    assert envelope["subject"] == "caf\u00e9cr\u00e8me ok"
    assert envelope["header_problems"] == []


@pytest.mark.parametrize(
    ("subject", "problem"),
    [
        ("=?x-unknown?Q?caf=E9?=", "unknown charset"),
        ("=?utf-8?B?!!!?=", "invalid base64"),
        ("=?utf-8?Q?=FF=FE?=", "bytes invalid"),
        ("=?utf-8?X?abc?=", "unknown encoded-word encoding"),
    ],
)
def test_an_undecodable_encoded_word_is_kept_raw_and_flagged(subject: str, problem: str) -> None:
    envelope = build(plain(("Subject", f"before {subject} after")))
    assert envelope["subject"] == f"before {subject} after"
    assert [p for p in envelope["header_problems"] if p.startswith("subject:") and problem in p]


def test_8_bit_headers_decode_as_utf8_or_stay_escaped() -> None:
    utf8 = build(plain(("Subject", "Caf\u00e9 \U0001f600".encode())))
    assert utf8["subject"] == "Caf\u00e9 \U0001f600"
    assert utf8["header_problems"] == []
    latin1 = build(plain(("Subject", b"Caf\xe9"), ("From", b"J\xe9r\xf4me <j@example.org>")))
    assert latin1["subject"] == "Caf\\xe9"
    assert latin1["from"] == [{"name": "J\\xe9r\\xf4me", "address": "j@example.org"}]
    assert {p.split(":", 1)[0] for p in latin1["header_problems"]} >= {"subject", "from"}


def test_nul_and_decoded_line_breaks_never_reach_consumers() -> None:
    envelope = build(plain(("Subject", "=?utf-8?Q?a=00b=0D=0ABcc:_evil@example.org?=")))
    assert envelope["subject"] == "a\\x00b Bcc: evil@example.org"
    assert any("line break" in p for p in envelope["header_problems"])


def test_non_ascii_addresses_and_display_names() -> None:
    envelope = build(
        plain(
            ("From", "J\u00e9r\u00f4me <j\u00e9r\u00f4me@ex\u00e4mple.com>".encode()),
            ("To", '=?utf-8?Q?Bj=C3=B6rn?= <b@example.org>, "Doe, Jane" <jane@example.org>, team: x@example.org;'),
        )
    )
    assert envelope["from"] == [{"name": "J\u00e9r\u00f4me", "address": "j\u00e9r\u00f4me@ex\u00e4mple.com"}]
    assert envelope["to"] == [
        {"name": "Bj\u00f6rn", "address": "b@example.org"},
        {"name": "Doe, Jane", "address": "jane@example.org"},
        {"name": "", "address": "x@example.org"},
    ]
    assert envelope["header_problems"] == []


def test_an_address_the_parser_chokes_on_is_kept_raw_and_flagged() -> None:
    envelope = build(plain(("To", "user@"), ("Cc", "(" * 50000 + "a@example.org")))
    assert envelope["to"] == [{"name": "user@", "address": ""}]
    assert {p.split(":", 1)[0] for p in envelope["header_problems"]} == {"to", "cc"}


@pytest.mark.parametrize(
    ("header", "iso"),
    [
        ("Tue, 14 May 2024 09:30:00 +0200", "2024-05-14T09:30:00+02:00"),
        ("14 May 2024 09:30 -0000", "2024-05-14T09:30:00+00:00"),
        ("garbage", None),
        ("Mon, 20 Nov 99999 19:12:08 -0500", None),
    ],
)
def test_dates_parse_or_stay_raw(header: str, iso: str | None) -> None:
    envelope = build(plain(("Date", header)))
    assert (envelope["date"], envelope["date_raw"]) == (iso, header)
    assert bool(envelope["header_problems"]) == (iso is None)


def test_ids_threading_and_duplicates() -> None:
    envelope = build(
        plain(
            ("Message-ID", " <m1@example.org> "),
            ("In-Reply-To", "Your message of Tuesday <p@example.org> (sent)"),
            ("References", "<root@example.org>\r\n <p@example.org>"),
            ("Subject", "first"),
            ("Subject", "second"),
        )
    )
    assert envelope["message_id"] == "<m1@example.org>"
    assert envelope["in_reply_to"] == "<p@example.org>"
    assert envelope["references"] == ["<root@example.org>", "<p@example.org>"]
    assert envelope["subject"] == "first"
    assert envelope["header_problems"] == ["subject: header appears 2 times, the first is used"]
    bare = build(plain(replace=("Message-ID", "Subject", "Date")))
    assert (bare["message_id"], bare["subject"], bare["date"], bare["date_raw"]) == (None, None, None, None)


# --- body: preview and attachments -------------------------------------------------------------------------


def test_preview_comes_from_the_first_plain_part_and_attachments_are_listed() -> None:
    forwarded = message([("Subject", "inner"), ("Content-Type", 'application/zip; name="inner.zip"')], "PK")
    raw = multipart(
        [
            b'Content-Type: multipart/alternative; boundary="alt"\r\n\r\n'
            b"--alt\r\nContent-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable"
            b"\r\n\r\nBonjour, caf=E9 au lait.\r\n"
            b"--alt\r\nContent-Type: text/html\r\n\r\n<p>HTML version</p>\r\n--alt--",
            part(
                "application/pdf",
                base64.encodebytes(bytes(1000)),
                ("Content-Transfer-Encoding", "base64"),
                ("Content-Disposition", "attachment; filename*=utf-8''r%C3%A9sum%C3%A9.pdf"),
            ),
            part("image/png", "x", ("Content-Disposition", 'inline; filename="=?utf-8?Q?logo_=C3=A9?=.png"')),
            part("message/rfc822", forwarded),
        ]
    )
    envelope = build(raw)
    assert envelope["preview"] == "Bonjour, caf\u00e9 au lait."
    assert envelope["content_type"] == "multipart/mixed"
    assert envelope["attachments"] == [
        {
            "filename": "r\u00e9sum\u00e9.pdf",
            "content_type": "application/pdf",
            "size": 1000,
            "disposition": "attachment",
        },
        {"filename": "logo \u00e9.png", "content_type": "image/png", "size": 1, "disposition": "inline"},
        {"filename": None, "content_type": "message/rfc822", "size": None, "disposition": None},
    ]
    assert envelope["counts"]["attachments"] == 3


def test_html_preview_is_stripped_text_and_bounded() -> None:
    markup = "<html><head><title>t</title><style>p{color:red}</style></head><body><script>steal()</script>"
    markup += "<p>Hello&nbsp;<b>world</b></p>" + "<div>more text</div>" * 1000 + "</body></html>"
    envelope = build(plain(("Content-Type", "text/html; charset=utf-8"), body=markup))
    preview = envelope["preview"]
    assert preview.startswith("Hello world\n\nmore text")
    assert "<" not in preview and "steal" not in preview and "color" not in preview
    assert len(preview) == 2000


def test_preview_of_a_base64_part_reads_only_its_start() -> None:
    text = ("line of text " * 10 + "\r\n") * 20000  # 2.6 MB of text
    raw = plain(
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Transfer-Encoding", "base64"),
        body=base64.encodebytes(text.encode()),
    )
    envelope = build(raw)
    assert envelope["preview"].startswith("line of text line of text")
    assert len(envelope["preview"]) == 2000


def test_broken_mime_is_flagged_and_headers_survive_deep_nesting() -> None:
    shallow = build(nested_multipart(200))
    assert any("deeper than" in p for p in shallow["mime_problems"])
    deep = build(nested_multipart(5000))
    assert deep["subject"] == "deep" and deep["from"] == [{"name": "", "address": "a@example.org"}]
    assert any("too deep" in p for p in deep["mime_problems"])
    unclosed = build(plain(("Content-Type", 'multipart/mixed; boundary="b1"'), body=b"--b1\r\n\r\nx"))
    assert "CloseBoundaryNotFoundDefect" in unclosed["mime_problems"]
    clean = build(plain())
    assert (clean["mime_problems"], clean["header_problems"], clean["truncated"]) == ([], [], [])


# --- size --------------------------------------------------------------------------------------------------


def test_a_10_kb_subject_and_2000_recipients_fit_with_counts() -> None:
    recipients = ", ".join(f"Recipient {i} <r{i}@example.org>" for i in range(2000))
    raw = plain(("To", recipients), ("Cc", recipients), ("Subject", "S" * 10240))
    envelope = build(raw)
    assert_sound(raw, envelope)
    assert envelope["subject"] == "S" * 10240
    assert envelope["counts"]["to"] == envelope["counts"]["cc"] == 2000
    assert {"to", "cc"} <= set(envelope["truncated"])
    assert envelope["to"][0] == {"name": "Recipient 0", "address": "r0@example.org"}


def test_shrinking_follows_the_published_order() -> None:
    raw = plain(
        ("To", ", ".join(f"<recipient{i}@example.org>" for i in range(60))),
        ("Subject", "s" * 1500),
        body="preview text " * 400,
    )
    whole = build(raw)
    assert whole["truncated"] == [] and len(whole["preview"]) == 2000 and len(whole["to"]) == 60
    # Small enough that the first round (preview to 500, subject to 1,000) is not enough: the second round
    # drops the preview before it touches the recipients, and stops as soon as the envelope fits.
    envelope = build(raw, max_encoded_bytes=5 * 1024)
    assert envelope["truncated"] == ["preview", "subject", "to"]
    assert envelope["preview"] is None
    assert len(envelope["subject"]) == 1000
    assert len(envelope["to"]) == 20 and envelope["counts"]["to"] == 60
    assert_sound(raw, envelope, limit=5 * 1024)


def test_caller_metadata_too_large_to_fit_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot fit"):
        build(plain(), mailbox="m" * 70000 + "@example.org")
    long_folder = build(plain(), folder="F" * 70000)
    assert long_folder["folder"] == "F" * 256 and "folder" in long_folder["truncated"]


def test_encode_for_queue_refuses_an_envelope_grown_past_the_limit() -> None:
    envelope = build(plain())
    envelope["subject"] = "x" * QUEUE_MESSAGE_LIMIT
    with pytest.raises(ValueError, match="over the"):
        encode_for_queue(envelope)


# --- identity ----------------------------------------------------------------------------------------------


def test_the_id_is_stable_and_distinct() -> None:
    assert envelope_id(" Support@Example.TEST ", 7, 42) == envelope_id("support@example.test", 7, 42)
    assert envelope_id("a@example.org", 7, 42) != envelope_id("a@example.org", 8, 42)
    assert envelope_id("a@example.org", 7, 42) != envelope_id("a@example.org", 7, 43)
    raw = plain()
    first, again = build(raw), build(raw, collected_at=COLLECTED_AT + timedelta(hours=1))
    assert first["id"] == again["id"] and first["sha256"] == again["sha256"]
    assert first["collected_at"] != again["collected_at"]


@pytest.mark.parametrize(
    ("mailbox", "uidvalidity", "uid"), [("", 1, 1), ("a@x", -1, 1), ("a@x", 1, 2**32), ("a@x", True, 1)]
)
def test_the_id_refuses_what_imap_cannot_give(mailbox: str, uidvalidity: int, uid: int) -> None:
    with pytest.raises(ValueError):
        envelope_id(mailbox, uidvalidity, uid)


def test_collected_at_is_rfc3339_and_naive_means_utc() -> None:
    assert build(plain(), collected_at=datetime(2024, 1, 2, 3, 4, 5))["collected_at"] == "2024-01-02T03:04:05+00:00"
    paris = timezone(timedelta(hours=1))
    stamp = build(plain(), collected_at=datetime(2024, 1, 2, 3, 4, 5, tzinfo=paris))["collected_at"]
    assert stamp == "2024-01-02T03:04:05+01:00"


# --- classification ----------------------------------------------------------------------------------------

DSN = multipart(
    [
        part("text/plain", "Delivery to the following recipient failed permanently."),
        part("message/delivery-status", "Reporting-MTA: dns; mx.example.org\r\n\r\nFinal-Recipient: rfc822; x@y\r\n"),
    ],
    subtype="report; report-type=delivery-status",
    head=[("From", "Mail Delivery Subsystem <MAILER-DAEMON@example.org>"), ("Return-Path", "<>")],
)
READ_RECEIPT = multipart(
    [part("text/plain", "Read."), part("message/disposition-notification", "Final-Recipient: rfc822; a@b\r\n")],
    subtype="report; report-type=disposition-notification",
)

CLASSIFICATION_CASES = [
    ("plain mail", plain(), set()),
    ("auto-submitted auto-replied", plain(("Auto-Submitted", "auto-replied")), {"auto_reply"}),
    ("auto-submitted no", plain(("Auto-Submitted", "no")), set()),
    ("out of office", plain(("X-Auto-Response-Suppress", "DR, OOF, AutoReply")), {"auto_reply"}),
    ("suppress delivery receipts only", plain(("X-Auto-Response-Suppress", "DR")), set()),
    ("precedence auto_reply", plain(("Precedence", "auto_reply")), {"auto_reply"}),
    ("read receipt", READ_RECEIPT, {"auto_reply"}),
    ("delivery status notification", DSN, {"bounce"}),
    ("report without a type", multipart([part("text/plain", "x")], subtype="report"), set()),
    ("failed recipients", plain(("X-Failed-Recipients", "x@example.org")), {"bounce"}),
    ("null sender alone", plain(("Return-Path", "<>")), {"bounce"}),
    ("null sender auto-reply", plain(("Return-Path", "<>"), ("Auto-Submitted", "auto-replied")), {"auto_reply"}),
    ("ordinary return path", plain(("Return-Path", "<alice@example.org>")), set()),
    ("list id", plain(("List-Id", "Helpdesk <helpdesk.lists.example.org>")), {"list"}),
    ("list unsubscribe", plain(("List-Unsubscribe", "<mailto:leave@example.org>")), {"list"}),
    ("precedence list", plain(("Precedence", "list")), {"list", "bulk"}),
    ("precedence bulk", plain(("Precedence", "bulk")), {"bulk"}),
    ("precedence first-class", plain(("Precedence", "first-class")), set()),
    ("our loop header", plain((LOOP_HEADER, "support@example.test")), {"loop"}),
    ("x-loop", plain(("X-Loop", "helpdesk@example.org")), {"loop"}),
    ("a header that only looks like ours", plain((LOOP_HEADER + "back", "1")), set()),
]


@pytest.mark.parametrize(("case", "raw", "flags"), CLASSIFICATION_CASES, ids=[c[0] for c in CLASSIFICATION_CASES])
def test_classification(case: str, raw: bytes, flags: set[str]) -> None:
    classification = build(raw)["classification"]
    assert {name for name, value in classification.items() if value is True} == flags, case
    assert (
        bool(classification["reasons"]) == bool(flags) or "return-path: <> (null sender)" in classification["reasons"]
    )


def test_classification_reasons_name_the_evidence() -> None:
    reasons = build(DSN)["classification"]["reasons"]
    assert "multipart/report: delivery-status" in reasons
    assert "return-path: <> (null sender)" in reasons
    loop = build(plain((LOOP_HEADER, "support@example.test")))["classification"]["reasons"]
    assert loop == ["x-mail-collector-loop: support@example.test"]


def test_the_preview_tidies_only_the_prefix_it_needs_and_gives_what_tidying_the_whole_gives() -> None:
    import random
    import re

    from collectors.envelope import mime
    from collectors.envelope.notes import scrub

    def whole(text: str) -> str:
        """The tidying rules applied to the whole text at once, with the plainest patterns."""
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        text = re.sub("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "", text)
        text = re.sub(r"[ \t\u00a0]+", " ", text)
        text = re.sub(r"\n[ \t]*(?:\n[ \t]*)+", "\n\n", text)
        return scrub(text.strip())[: mime.PREVIEW_CHARS]

    # Texts heavy in what the tidying removes or collapses, so that many need a longer prefix than the first.
    alphabet = ["word", "x", " ", "  ", "\t", "\u00a0", "\r", "\n", "\r\n", "\n \n", "\x01", "\x00", "\x7f", "\u3000",
                "\ud800", "\u2028", "é"]  # fmt: skip
    weights = [20, 10, 30, 10, 5, 3, 5, 8, 5, 4, 2, 1, 1, 1, 1, 1, 2]
    rng = random.Random(2026)
    longer = 0
    for case in range(600):
        parts = rng.choices(alphabet, weights, k=rng.choice([0, 5, 500, 3000, 12000]))
        if case % 3 == 0:  # long blank stretches: the first prefix tidies to less than a preview
            parts = [" \n" * rng.randrange(4000, 30000), *parts]
        text = "".join(parts)
        expected = whole(text)
        assert mime._tidy(text) == expected, case
        first = mime.PREVIEW_CHARS + mime.PREVIEW_CHARS // 4
        longer += len(whole(text[:first])) < mime.PREVIEW_CHARS == len(expected)
    assert longer > 20  # the cases where the first prefix is not enough were met, not only the easy ones
