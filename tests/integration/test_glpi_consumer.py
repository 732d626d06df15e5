"""The GLPI consumer against the real local parts: Azurite (queue, blobs, state table) and the GLPI stand-in, and
the whole path from Dovecot through the collector. The test mails are written here, one per case GLPI's own
collector tests cover: character sets, inline images, follow-ups by tag and by GLPI's old and new Message-IDs,
auto-replies, empty and invalid senders, long subjects, many attachments.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from consumers.glpi import state as state_module
from consumers.glpi.__main__ import run
from consumers.glpi.handler import marker_for
from consumers.glpi.service import build_consumer
from consumers.glpi.state import message_key
from shared import azure_clients
from tests.support.glpi import glpi_control, glpi_state, post_mail, tickets_with
from tests.support.stack import Stack

pytestmark = pytest.mark.integration

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


def _id() -> str:
    return uuid.uuid4().hex[:10]


def mail(
    subject: str,
    body: bytes | str = "hello",
    *,
    sender: str = "Customer <customer@example.org>",
    headers: str = "",
    content_type: str = "text/plain; charset=utf-8",
    transfer: str = "8bit",
    message_id: str | None = None,
) -> bytes:
    head = (
        f"From: {sender}\r\nTo: support@example.test\r\nSubject: {subject}\r\n"
        f"Message-ID: {message_id or f'<{uuid.uuid4().hex}@example.org>'}\r\n"
        f"Date: Sun, 29 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n{headers}"
        f"Content-Type: {content_type}\r\nContent-Transfer-Encoding: {transfer}\r\n\r\n"
    ).encode()
    return head + (body.encode() if isinstance(body, str) else body) + b"\r\n"


def multipart(subject: str, parts: list[tuple[str, bytes]], *, kind: str = "mixed", headers: str = "") -> bytes:
    boundary = f"b{_id()}"
    body = b""
    for part_headers, payload in parts:
        body += f"--{boundary}\r\n{part_headers}\r\n\r\n".encode() + payload + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return mail(subject, body, content_type=f'multipart/{kind}; boundary="{boundary}"', headers=headers)


@pytest.fixture
def glpi_settings(app_env: dict[str, str]) -> Any:
    from shared.settings import load_settings

    return load_settings(app_env)


@pytest.fixture
def drain(glpi_settings: Any, monkeypatch: pytest.MonkeyPatch) -> Callable[[], dict[str, int]]:
    """Run the consumer over this test's mail queue until it is empty (a failed message is retried at once)."""
    monkeypatch.setattr(state_module, "CLAIM_SECONDS", 1)

    def go() -> dict[str, int]:
        return run(glpi_settings, retry_visibility=0)

    return go


@pytest.fixture
def consumer(glpi_settings: Any) -> Iterator[Any]:
    made = build_consumer(glpi_settings)
    yield made
    made.close()


def one_ticket(stack: Stack, word: str) -> dict[str, Any]:
    found = tickets_with(stack, word)
    assert len(found) == 1, f"{len(found)} tickets hold {word!r}"
    return found[0]


# --- new tickets: title, requester, content ----------------------------------------------------------------


def test_a_new_mail_becomes_one_ticket_with_requester_title_and_text(
    stack: Stack, glpi_settings: Any, drain: Any
) -> None:
    word = _id()
    envelope = post_mail(
        glpi_settings, mail(f"Printer jammed {word}", "It jams on page 2.\n\nThanks"), mailbox="s@x.test", uid=1
    )

    assert drain() == {"ticket": 1}

    ticket = one_ticket(stack, word)
    assert ticket["name"] == f"Printer jammed {word}"
    assert "It jams on page 2." in ticket["content"] and "<p>Thanks</p>" in ticket["content"]
    key = message_key(envelope["sha256"], envelope["message_id"])
    assert marker_for(key) in ticket["content"]
    requesters = [a for a in ticket["actors"] if a["type"] == 1]
    assert requesters == [
        {**requesters[0], "users_id": 0, "alternative_email": "customer@example.org", "use_notification": 1}
    ]
    assert (ticket["requesttypes_id"], ticket["urgency"], ticket["entities_id"]) == (2, 3, 0)


def test_a_known_user_is_the_requester_and_cc_become_observers_when_asked(
    stack: Stack, app_env: dict[str, str], drain: Any
) -> None:
    from shared.settings import load_settings

    word = _id()
    user = glpi_control(stack, "users", {"name": f"ann{word}", "emails": [f"ann{word}@example.org"]})["id"]
    colleague = glpi_control(stack, "users", {"emails": [f"bob{word}@example.org"]})["id"]
    options = '{"*": {"entities_id": 3, "itilcategories_id": 7}, "s@x.test": {"cc_as_observers": true}}'
    settings = load_settings({**app_env, "GLPI_MAILBOX_OPTIONS": options})
    raw = mail(
        f"VPN {word}",
        sender=f"Ann <ann{word}@example.org>",
        headers=f"Cc: Bob <bob{word}@example.org>, carol{word}@example.org, support@example.test\r\n",
    )
    post_mail(settings, raw, mailbox="s@x.test", uid=1)
    assert run(settings, retry_visibility=0) == {"ticket": 1}

    ticket = one_ticket(stack, word)
    actors = {(a["type"], a["users_id"], a["alternative_email"]) for a in ticket["actors"]}
    assert actors == {
        (1, user, ""),
        (3, colleague, ""),
        (3, 0, f"carol{word}@example.org"),
        (3, 0, "support@example.test"),
    }
    assert (ticket["entities_id"], ticket["itilcategories_id"]) == (3, 7)


def test_reply_to_can_be_the_requester(stack: Stack, app_env: dict[str, str]) -> None:
    from shared.settings import load_settings

    word = _id()
    settings = load_settings({**app_env, "GLPI_MAILBOX_OPTIONS": '{"*": {"requester_field": "reply-to"}}'})
    post_mail(settings, mail(f"RT {word}", headers="Reply-To: desk@example.net\r\n"), mailbox="s@x.test", uid=1)
    run(settings, retry_visibility=0)
    ticket = one_ticket(stack, word)
    assert [a["alternative_email"] for a in ticket["actors"] if a["type"] == 1] == ["desk@example.net"]


@pytest.mark.parametrize(
    ("label", "charset", "text"),
    [
        ("hebrew-outlook", "iso-8859-8-i", "שלום, המדפסת לא עובדת"),
        ("hebrew-windows", "windows-1255", "תודה רבה"),
        ("french-latin1", "iso-8859-1", "Le réseau est coupé à l'étage"),
        ("cyrillic-koi8", "koi8-r", "Принтер не печатает"),
        ("cyrillic-1251", "windows-1251", "Сервер недоступен"),
        ("korean-outlook", "ks_c_5601-1987", "프린터가 고장났어요"),
        ("japanese", "iso-2022-jp", "プリンターが壊れました"),
    ],
)
def test_every_charset_reaches_the_ticket_without_replacement_characters(
    stack: Stack, glpi_settings: Any, drain: Any, label: str, charset: str, text: str
) -> None:
    word = _id()
    codec = {"iso-8859-8-i": "iso-8859-8", "ks_c_5601-1987": "cp949"}.get(charset, charset)
    body = base64.encodebytes(text.encode(codec))
    raw = mail(f"{label} {word}", body, content_type=f"text/plain; charset={charset}", transfer="base64")
    post_mail(glpi_settings, raw, mailbox="s@x.test", uid=1)
    drain()
    ticket = one_ticket(stack, word)
    assert text.replace("'", "&#x27;") in ticket["content"] or text in ticket["content"]
    assert "\ufffd" not in ticket["content"]


def test_a_part_without_charset_falls_back_as_glpi_does_and_a_bom_wins(
    stack: Stack, glpi_settings: Any, drain: Any
) -> None:
    word = _id()
    latin = mail(f"nocharset {word}", "Problème réglé".encode("latin-1"), content_type="text/plain")
    utf8 = mail(f"nocharset-utf8 {word}", "Grüße aus Köln".encode(), content_type="text/plain")
    bom = mail(
        f"bom {word}",
        "\ufeffСпасибо".encode("utf-16"),
        content_type="text/plain; charset=iso-8859-1",
        transfer="binary",
    )
    invalid = mail(f"invalid {word}", b"caf\xc3\xa9 and \xff\xfe broken", content_type="text/plain; charset=utf-8")
    for uid, raw in enumerate((latin, utf8, bom, invalid), 1):
        post_mail(glpi_settings, raw, mailbox="s@x.test", uid=uid)
    assert drain() == {"ticket": 4}
    assert "Problème réglé" in one_ticket(stack, f"nocharset {word}")["content"]
    assert "Grüße aus Köln" in one_ticket(stack, f"nocharset-utf8 {word}")["content"]
    assert "Спасибо" in one_ticket(stack, f"bom {word}")["content"]
    assert "café and" in one_ticket(stack, f"invalid {word}")["content"]


def test_html_is_sanitized_and_inline_images_point_at_their_documents(
    stack: Stack, glpi_settings: Any, drain: Any
) -> None:
    word = _id()
    markup = (
        f"<html><head><style>p{{color:red}}</style></head><body><p onclick='x()'>Screen {word}:</p>"
        '<img src="cid:shot1@example.org" alt="shot"><script>alert(1)</script>'
        '<a href="javascript:alert(1)">bad</a><a href="https://example.org/kb">kb</a></body></html>'
    ).encode()
    related = multipart(
        f"Inline {word}",
        [
            ("Content-Type: text/html; charset=utf-8", markup),
            (
                'Content-Type: image/png; name="shot.png"\r\nContent-Transfer-Encoding: base64\r\n'
                'Content-ID: <shot1@example.org>\r\nContent-Disposition: inline; filename="shot.png"',
                base64.encodebytes(PNG),
            ),
        ],
        kind="related",
    )
    post_mail(glpi_settings, related, mailbox="s@x.test", uid=1)
    drain()
    ticket = one_ticket(stack, word)
    (document,) = ticket["documents"]
    assert (document["filename"], document["mime"], document["size"]) == ("shot.png", "image/png", len(PNG))
    assert f'src="/front/document.send.php?docid={document["id"]}"' in ticket["content"]
    for gone in ("cid:", "<script", "onclick", "javascript:", "color:red"):
        assert gone not in ticket["content"]
    assert 'href="https://example.org/kb"' in ticket["content"]


def test_many_attachments_and_one_too_large_for_the_cap(stack: Stack, app_env: dict[str, str]) -> None:
    from shared.settings import load_settings

    word = _id()
    settings = load_settings({**app_env, "GLPI_MAILBOX_OPTIONS": '{"*": {"max_attachment_bytes": 50000}}'})
    parts = [("Content-Type: text/plain; charset=utf-8", f"See attached {word}".encode())]
    for i in range(12):
        parts.append(
            (
                f'Content-Type: application/octet-stream\r\nContent-Disposition: attachment; filename="log{i}.bin"'
                "\r\nContent-Transfer-Encoding: base64",
                base64.encodebytes(bytes([i]) * (1000 + i)),
            )
        )
    parts.append(
        (
            'Content-Type: application/zip\r\nContent-Disposition: attachment; filename="huge.zip"\r\n'
            "Content-Transfer-Encoding: base64",
            base64.encodebytes(b"z" * 60000),
        )
    )
    post_mail(settings, multipart(f"Logs {word}", parts), mailbox="s@x.test", uid=1)
    run(settings, retry_visibility=0)
    ticket = one_ticket(stack, word)
    assert sorted(d["filename"] for d in ticket["documents"]) == sorted(f"log{i}.bin" for i in range(12))
    assert all(d["size"] == 1000 + int(d["filename"][3:-4]) for d in ticket["documents"])
    assert "Too large attached file: huge.zip" in ticket["content"]


def test_long_empty_and_encoded_subjects(stack: Stack, glpi_settings: Any, drain: Any) -> None:
    word = _id()
    long_subject = f"{word} " + "very long subject " * 40
    post_mail(glpi_settings, mail(long_subject), mailbox="s@x.test", uid=1)
    post_mail(glpi_settings, mail("", f"body {word}-empty"), mailbox="s@x.test", uid=2)
    post_mail(
        glpi_settings,
        mail(f"=?utf-8?b?{base64.b64encode(f'Ça marche {word}-enc'.encode()).decode()}?="),
        mailbox="s@x.test",
        uid=3,
    )
    drain()
    long_ticket = one_ticket(stack, word + " very")
    assert len(long_ticket["name"]) <= 250 and long_ticket["name"].endswith("…")
    assert one_ticket(stack, f"{word}-empty")["name"] == "(no subject)"
    assert one_ticket(stack, f"{word}-enc")["name"] == f"Ça marche {word}-enc"


@pytest.mark.parametrize("sender", ["", "undisclosed-recipients:;", "not an address", "<@>", "a@b"])
def test_an_empty_or_invalid_sender_makes_a_ticket_without_requester_and_says_so(
    stack: Stack, glpi_settings: Any, drain: Any, sender: str
) -> None:
    word = _id()
    post_mail(glpi_settings, mail(f"Sender {word}", sender=sender), mailbox="s@x.test", uid=1)
    assert drain() == {"ticket": 1}
    ticket = one_ticket(stack, word)
    assert [a for a in ticket["actors"] if a["type"] == 1] == []  # not the API user either
    assert "The sender address is missing or invalid" in ticket["content"]


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ("Auto-Submitted: auto-replied\r\n", "auto_reply"),
        ("X-Auto-Response-Suppress: All\r\n", "auto_reply"),
        ("Return-Path: <>\r\nX-Failed-Recipients: gone@example.org\r\n", "bounce"),
        ("X-Loop: helpdesk\r\n", "loop"),
    ],
)
def test_auto_replies_bounces_and_loops_are_refused_and_logged(
    stack: Stack, glpi_settings: Any, drain: Any, headers: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    word = _id()
    envelope = post_mail(glpi_settings, mail(f"Out of office {word}", headers=headers), mailbox="s@x.test", uid=1)
    with caplog.at_level("INFO", logger="consumers.glpi.handler"):
        assert drain() == {"refused": 1}
    assert tickets_with(stack, word) == []
    assert any("refused" in r.getMessage() and reason in r.getMessage() for r in caplog.records)
    consumer = build_consumer(glpi_settings)
    try:
        row = consumer.state.envelope(envelope["id"])
    finally:
        consumer.close()
    assert row is not None and row["status"] == "refused" and row["reason"].startswith(reason)


def test_exchanges_placeholder_is_never_a_ticket_whatever_the_refuse_option(
    stack: Stack, app_env: dict[str, str]
) -> None:
    from shared.settings import load_settings

    settings = load_settings({**app_env, "GLPI_MAILBOX_OPTIONS": '{"*": {"refuse": []}}'})
    word = _id()
    body = "Retrieval using the IMAP4 protocol failed for the following message: 7"
    envelope = post_mail(settings, mail(f"Placeholder {word}", body), mailbox="s@x.test", uid=1)
    assert envelope["classification"]["placeholder"] is True
    assert run(settings, retry_visibility=0) == {"refused": 1}
    assert tickets_with(stack, word) == []
    consumer = build_consumer(settings)
    try:
        row = consumer.state.envelope(envelope["id"])
    finally:
        consumer.close()
    assert row is not None and row["status"] == "refused" and row["reason"].startswith("placeholder")


def test_glpis_own_notification_is_refused_as_a_loop(stack: Stack, glpi_settings: Any, drain: Any) -> None:
    word = _id()
    raw = mail(f"[GLPI #0000001] New ticket {word}", message_id="<GLPI_3c2a1b-Ticket-1/new@glpi.example>")
    post_mail(glpi_settings, raw, mailbox="s@x.test", uid=1)
    assert drain() == {"refused": 1}
    assert tickets_with(stack, word) == []


# --- follow-ups ----------------------------------------------------------------------------------------------


def _new_ticket(stack: Stack, settings: Any, word: str, message_id: str | None = None) -> dict[str, Any]:
    post_mail(
        settings, mail(f"Original {word}", f"first text {word}", message_id=message_id), mailbox="s@x.test", uid=1
    )
    run(settings, retry_visibility=0)
    return one_ticket(stack, f"Original {word}")


@pytest.mark.parametrize(
    "how",
    [
        "tag",
        "new-format-in-reply-to",
        "middle-format-references",
        "old-format-references",
        "old-typed-format",
        "own-map",
    ],
)
def test_a_reply_becomes_a_followup_without_its_quoted_history(
    stack: Stack, glpi_settings: Any, drain: Any, how: str
) -> None:
    word = _id()
    original_id = f"<{uuid.uuid4().hex}@example.org>"
    ticket = _new_ticket(stack, glpi_settings, word, original_id)
    tid = ticket["id"]
    subject, headers = f"Re: Original {word}", ""
    if how == "tag":
        subject = f"Re: [GLPI #{tid:07d}] Original {word}"
    elif how == "new-format-in-reply-to":
        headers = f"In-Reply-To: <GLPI_9f8e7d6c5b4a-Ticket-{tid}/new@glpi.example>\r\n"
    elif how == "middle-format-references":
        headers = f"References: <x@y> <GLPI_9f8e7d6c5b4a-Ticket-{tid}.1700000000.12345@glpi.example>\r\n"
    elif how == "old-format-references":
        headers = f"References: <GLPI-{tid}.1500000000.987@glpi.example>\r\n"
    elif how == "old-typed-format":
        headers = f"In-Reply-To: <GLPI-Ticket-{tid}.1500000000.987@glpi.example>\r\n"
    else:
        headers = f"In-Reply-To: {original_id}\r\nReferences: {original_id}\r\n"
    reply = mail(
        subject,
        f"Still broken {word}-reply.\n\nOn Sun, 29 Nov 2026 at 10:00, Support wrote:\n> first text {word}\n> more",
        headers=headers,
    )
    post_mail(glpi_settings, reply, mailbox="s@x.test", uid=2)
    assert drain() == {"followup": 1}

    after = one_ticket(stack, f"Original {word}")
    (followup,) = after["followups"]
    assert f"Still broken {word}-reply." in followup["content"]
    assert "first text" not in followup["content"] and "wrote:" not in followup["content"]
    assert (followup["itemtype"], followup["items_id"], followup["requesttypes_id"]) == ("Ticket", tid, 2)
    assert tickets_with(stack, f"{word}-reply") == []


def _set_status(settings: Any, ticket_id: int, status: int) -> None:
    consumer = build_consumer(settings)
    try:
        consumer.client.call("PUT", f"Ticket/{ticket_id}", json={"input": {"status": status}})
    finally:
        consumer.close()


def _ticket_in_status(
    stack: Stack, app_env: dict[str, str], status: int, **option: Any
) -> tuple[Any, dict[str, Any], str]:
    """Settings with the mailbox option given (None: GLPI's default), and a ticket of theirs set to ``status``
    (5 SOLVED, 6 CLOSED)."""
    from shared.settings import load_settings

    chosen = {k: v for k, v in option.items() if v is not None}
    settings = load_settings({**app_env, "GLPI_MAILBOX_OPTIONS": json.dumps({"*": chosen})})
    word = _id()
    ticket = _new_ticket(stack, settings, word)
    _set_status(settings, ticket["id"], status)
    return settings, ticket, word


@pytest.mark.parametrize("closed_ticket_replies", [None, "link", "new"])
def test_a_reply_to_a_closed_ticket_opens_a_new_one_linked_to_it_and_an_unknown_one_a_plain_one(
    stack: Stack, app_env: dict[str, str], closed_ticket_replies: str | None
) -> None:
    settings, ticket, word = _ticket_in_status(stack, app_env, 6, closed_ticket_replies=closed_ticket_replies)
    post_mail(settings, mail(f"Re: [GLPI #{ticket['id']}] again {word}-closed"), mailbox="s@x.test", uid=2)
    post_mail(settings, mail(f"Re: [GLPI #99999999] {word}-unknown"), mailbox="s@x.test", uid=3)
    assert run(settings, retry_visibility=0) == {"ticket": 2}
    new = one_ticket(stack, f"{word}-closed")
    assert new["id"] != ticket["id"] and new["followups"] == []
    if closed_ticket_replies == "new":
        assert new["links"] == []
    else:  # GLPI's default: the new ticket is "linked to" the closed one (Ticket_Ticket::LINK_TO)
        assert [(k["tickets_id_1"], k["tickets_id_2"], k["link"]) for k in new["links"]] == [
            (new["id"], ticket["id"], 1)
        ]
    assert one_ticket(stack, f"{word}-unknown")["links"] == []
    closed = next(t for t in glpi_state(stack)["tickets"] if t["id"] == ticket["id"])
    assert closed["status"] == 6 and closed["followups"] == []


@pytest.mark.parametrize("reopen_on_reply", [None, False])
def test_a_reply_to_a_solved_ticket_is_a_followup_that_reopens_it_unless_told_not_to(
    stack: Stack, app_env: dict[str, str], reopen_on_reply: bool | None
) -> None:
    settings, ticket, word = _ticket_in_status(stack, app_env, 5, reopen_on_reply=reopen_on_reply)
    post_mail(settings, mail(f"Re: [GLPI #{ticket['id']}] not fixed {word}-solved"), mailbox="s@x.test", uid=2)
    assert run(settings, retry_visibility=0) == {"followup": 1}
    after = next(t for t in glpi_state(stack)["tickets"] if t["id"] == ticket["id"])
    assert len(after["followups"]) == 1 and after["links"] == []
    assert after["status"] == (5 if reopen_on_reply is False else 1)  # back to New: nobody is assigned


def test_a_reply_to_another_glpi_is_not_threaded_when_our_uuid_is_known(stack: Stack, app_env: dict[str, str]) -> None:
    from shared.settings import load_settings

    word = _id()
    settings = load_settings({**app_env, "GLPI_MAILBOX_OPTIONS": '{"*": {"glpi_uuid": "aaaa1111"}}'})
    ticket = _new_ticket(stack, settings, word)
    foreign = mail(
        f"Re: other {word}-foreign", headers=f"In-Reply-To: <GLPI_bbbb2222-Ticket-{ticket['id']}/new@other>\r\n"
    )
    post_mail(settings, foreign, mailbox="s@x.test", uid=2)
    assert run(settings, retry_visibility=0) == {"ticket": 1}
    assert one_ticket(stack, f"{word}-foreign")["id"] != ticket["id"]


# --- once, whatever happens ------------------------------------------------------------------------------------


def test_the_same_envelope_twice_and_the_same_mail_under_a_new_id_make_one_ticket(
    stack: Stack, glpi_settings: Any, drain: Any
) -> None:
    word = _id()
    raw = mail(f"Twice {word}")
    post_mail(glpi_settings, raw, mailbox="s@x.test", uid=4)
    post_mail(glpi_settings, raw, mailbox="s@x.test", uid=4)
    post_mail(glpi_settings, raw, mailbox="s@x.test", uid=1, uidvalidity=99)  # collected again after a new UIDVALIDITY
    counts = drain()
    assert counts.get("ticket") == 1 and counts.get("duplicate") == 2
    assert len(tickets_with(stack, word)) == 1


def test_a_lost_answer_after_glpi_created_the_ticket_is_found_by_its_marker(
    stack: Stack, glpi_settings: Any, drain: Any
) -> None:
    word = _id()
    parts = [
        ("Content-Type: text/plain; charset=utf-8", f"lost {word}".encode()),
        ('Content-Type: text/plain\r\nContent-Disposition: attachment; filename="a.txt"', b"attached"),
    ]
    post_mail(glpi_settings, multipart(f"Lost {word}", parts), mailbox="s@x.test", uid=1)
    glpi_control(stack, "faults", {"method": "POST", "path": "/apirest.php/Ticket", "after": True})
    counts = drain()
    assert counts == {"failed": 1, "ticket": 1}
    ticket = one_ticket(stack, word)
    assert [d["filename"] for d in ticket["documents"]] == ["a.txt"]
    assert glpi_state(stack)["documents"] >= 1


@pytest.mark.parametrize("status", [500, 503, 429])
def test_glpi_failing_sends_the_message_back_and_it_is_handled_later(
    stack: Stack, glpi_settings: Any, drain: Any, status: int
) -> None:
    word = _id()
    post_mail(glpi_settings, mail(f"Flaky {word}"), mailbox="s@x.test", uid=1)
    glpi_control(stack, "faults", {"status": status, "count": 2, "method": "POST", "path": "/apirest.php/Ticket"})
    assert drain() == {"failed": 2, "ticket": 1}
    assert len(tickets_with(stack, word)) == 1


def test_a_read_that_blips_is_repeated_in_place_and_an_outage_is_not(
    stack: Any, glpi_settings: Any, drain: Any
) -> None:
    word = _id()
    post_mail(glpi_settings, mail(f"Blip {word}", sender=f"blip{word}@example.org"), mailbox="s@x.test", uid=1)
    glpi_control(stack, "faults", {"status": 502, "count": 2, "method": "GET", "path": "/search/User"})
    assert drain() == {"ticket": 1}  # two failed searches, repeated after 0.5 and 1.5 s, no trip through the queue
    post_mail(glpi_settings, mail(f"Outage {word}", sender=f"out{word}@example.org"), mailbox="s@x.test", uid=2)
    # Three failed tries for the early look-up that runs beside the claim; the message waits for that look-up
    # instead of sending a second one, so it fails once and its retry finds GLPI back.
    glpi_control(stack, "faults", {"status": 502, "count": 3, "method": "GET", "path": "/search/User"})
    assert drain() == {"failed": 1, "ticket": 1}
    assert len(tickets_with(stack, word)) == 2


def test_an_expired_session_is_renewed_without_failing_the_message(
    stack: Stack, glpi_settings: Any, consumer: Any
) -> None:
    word = _id()
    consumer.client.search("User", [(5, "equals", "warm@example.org")])  # a session is open
    opened = consumer.client.sessions_opened
    glpi_control(stack, "expire_sessions")
    envelope = post_mail(glpi_settings, mail(f"Session {word}"), mailbox="s@x.test", uid=1)
    import json

    outcome = consumer.handle(json.dumps(envelope))
    assert outcome.status == "ticket" and consumer.client.sessions_opened == opened + 1
    assert glpi_state(stack)["active_entities"] == [["all", True]]  # the new session sees every entity
    assert len(tickets_with(stack, word)) == 1


def test_a_slow_glpi_is_a_retry_not_a_duplicate(
    stack: Stack, glpi_settings: Any, consumer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from consumers.glpi.client import GlpiUnavailable

    word = _id()
    monkeypatch.setattr(state_module, "CLAIM_SECONDS", 0)
    consumer.client._timeout = (2, 1)
    envelope = post_mail(glpi_settings, mail(f"Slow {word}"), mailbox="s@x.test", uid=1)
    glpi_control(stack, "faults", {"method": "POST", "path": "/apirest.php/Ticket", "after": True, "delay_ms": 1500})
    with pytest.raises(GlpiUnavailable):
        consumer.handle(json.dumps(envelope))
    time.sleep(0.6)  # GLPI finishes the slow create meanwhile
    consumer.client._timeout = (2, 10)
    assert consumer.handle(json.dumps(envelope), dequeue_count=2).status == "ticket"
    assert len(tickets_with(stack, word)) == 1


def test_after_the_last_attempt_the_message_is_poisoned_with_its_reason_and_replay_brings_it_back(
    stack: Stack, glpi_settings: Any, drain: Any
) -> None:
    from consumers.glpi.__main__ import replay

    word = _id()
    envelope = post_mail(glpi_settings, mail(f"Poison {word}"), mailbox="s@x.test", uid=1)
    glpi_control(stack, "faults", {"status": 503, "count": -1, "path": "/apirest.php/"})
    try:
        assert drain() == {"failed": 4, "poisoned": 1}
    finally:
        glpi_control(stack, "faults", method="DELETE")
    poison = azure_clients.queue(glpi_settings, glpi_settings.mail_queue + "-poison")
    assert len(list(poison.peek_messages(max_messages=32))) == 1
    consumer = build_consumer(glpi_settings)
    try:
        row = consumer.state.envelope(envelope["id"])
    finally:
        consumer.close()
    assert row is not None and row["status"] == "failed" and "GLPI answered 503" in row["reason"]

    assert replay(glpi_settings) == 1
    assert drain() == {"ticket": 1}
    assert len(tickets_with(stack, word)) == 1


@pytest.mark.parametrize("point", ["after_upload", "after_create", "after_save", "after_links", "after_done"])
def test_a_consumer_killed_at_each_step_never_makes_a_second_ticket(
    stack: Stack, glpi_settings: Any, app_env: dict[str, str], drain: Any, tmp_path: Any, point: str
) -> None:
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    word = _id()
    parts = [("Content-Type: text/plain; charset=utf-8", f"kill {word}".encode())]
    for i in range(3):
        parts.append(
            (f'Content-Type: text/plain\r\nContent-Disposition: attachment; filename="f{i}.txt"', b"x" * (i + 1))
        )
    post_mail(glpi_settings, multipart(f"Kill {word}", parts), mailbox="s@x.test", uid=1)
    settings_file = tmp_path / "settings.json"
    settings_file.write_text(json.dumps({"Values": app_env}))
    result = subprocess.run(
        [sys.executable, "-m", "tests.support.glpi", point, "1", "--settings", str(settings_file)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 137, result.stderr[-2000:]
    time.sleep(2.5)  # the killed attempt's message becomes visible again, its claim lapses
    counts = drain()
    assert set(counts) <= {"ticket", "duplicate"}, counts
    ticket = one_ticket(stack, word)
    assert sorted(d["filename"] for d in ticket["documents"]) == ["f0.txt", "f1.txt", "f2.txt"]
    assert ticket["followups"] == []


@pytest.mark.parametrize("damage", ["blob-missing", "blob-changed"])
def test_an_envelope_whose_blob_is_gone_or_changed_is_poisoned_with_its_reason(
    stack: Any, glpi_settings: Any, drain: Any, damage: str
) -> None:
    word = _id()
    envelope = post_mail(glpi_settings, mail(f"Damaged {word}"), mailbox="s@x.test", uid=1)
    blob = azure_clients.container(glpi_settings, glpi_settings.mail_container).get_blob_client(
        envelope["blob"]["name"]
    )
    if damage == "blob-missing":
        blob.delete_blob()
    else:
        blob.upload_blob(b"Subject: other\r\n\r\nother", overwrite=True)
    assert drain() == {"failed": 4, "poisoned": 1}
    assert tickets_with(stack, word) == []
    consumer = build_consumer(glpi_settings)
    try:
        row = consumer.state.envelope(envelope["id"])
    finally:
        consumer.close()
    assert row is not None and row["status"] == "failed"
    assert ("does not exist" if damage == "blob-missing" else "do not match") in row["reason"]


def test_a_strangers_reply_to_a_guessed_tag_opens_a_new_ticket_unless_anonymous_followups(
    stack: Any, glpi_settings: Any, app_env: dict[str, str], drain: Any
) -> None:
    from shared.settings import load_settings

    word = _id()
    ticket = _new_ticket(stack, glpi_settings, word)
    known = glpi_control(stack, "users", {"emails": [f"agent{word}@example.org"]})["id"]
    tag = f"Re: [GLPI #{ticket['id']}]"
    post_mail(glpi_settings, mail(f"{tag} {word}-stranger", sender=f"eve{word}@example.net"), mailbox="s@x.test", uid=2)
    post_mail(glpi_settings, mail(f"{tag} {word}-agent", sender=f"agent{word}@example.org"), mailbox="s@x.test", uid=3)
    assert drain() == {"ticket": 1, "followup": 1}
    assert one_ticket(stack, f"{word}-stranger")["id"] != ticket["id"]
    followups = one_ticket(stack, f"Original {word}")["followups"]
    assert [f["items_id"] for f in followups] == [ticket["id"]] and known

    open_settings = load_settings({**app_env, "GLPI_MAILBOX_OPTIONS": '{"*": {"anonymous_followups": true}}'})
    post_mail(open_settings, mail(f"{tag} {word}-open", sender=f"eve{word}@example.net"), mailbox="s@x.test", uid=4)
    assert run(open_settings, retry_visibility=0) == {"followup": 1}


@pytest.mark.parametrize("point", ["after_create", "after_links"])
def test_a_consumer_killed_while_adding_a_followup_never_adds_it_twice(
    stack: Any, glpi_settings: Any, app_env: dict[str, str], drain: Any, tmp_path: Any, point: str
) -> None:
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    word = _id()
    ticket = _new_ticket(stack, glpi_settings, word)
    parts = [
        ("Content-Type: text/plain; charset=utf-8", f"more {word}".encode()),
        ('Content-Type: text/plain\r\nContent-Disposition: attachment; filename="r.txt"', b"r"),
    ]
    reply = multipart(f"Re: [GLPI #{ticket['id']}] Original {word}", parts)
    post_mail(glpi_settings, reply, mailbox="s@x.test", uid=2)
    settings_file = tmp_path / "settings.json"
    settings_file.write_text(json.dumps({"Values": app_env}))
    result = subprocess.run(
        [sys.executable, "-m", "tests.support.glpi", point, "1", "--settings", str(settings_file)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 137, result.stderr[-2000:]
    time.sleep(2.5)
    drain()
    (followup,) = one_ticket(stack, f"Original {word}")["followups"]
    assert [d["filename"] for d in followup["documents"]] == ["r.txt"]


# --- retries: later each time -------------------------------------------------------------------------------


def _visible_again(queue: Any, since: float, limit: float) -> tuple[float, int]:
    """Seconds from ``since`` until the message shows on the queue again (peek: no dequeue), and its count."""
    while time.monotonic() - since < limit:
        shown = list(queue.peek_messages())
        if shown:
            return time.monotonic() - since, int(shown[0].dequeue_count)
        time.sleep(0.1)
    raise AssertionError(f"the message did not come back within {limit} s")


def test_glpi_down_brings_a_message_back_later_each_time_then_poisons_it(
    stack: Stack, glpi_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from consumers.glpi import retries

    # The schedule, shortened: 1, 3, 4, 4 s (production: 1, 5, 25, 120 min); host.json would say 30 s each time.
    monkeypatch.setattr(retries, "BASE_SECONDS", 1)
    monkeypatch.setattr(retries, "FACTOR", 3)
    monkeypatch.setattr(retries, "MAX_SECONDS", 4)
    monkeypatch.setattr(state_module, "CLAIM_SECONDS", 1)
    word = _id()
    post_mail(glpi_settings, mail(f"Down {word}"), mailbox="s@x.test", uid=1)
    queue = azure_clients.queue(glpi_settings, glpi_settings.mail_queue)
    poison = azure_clients.queue(glpi_settings, glpi_settings.mail_queue + "-poison")
    glpi_control(stack, "faults", {"status": 503, "count": -1, "path": "/apirest.php/"})
    try:
        gaps: list[tuple[float, int]] = []
        for attempt in range(1, 5):
            assert run(glpi_settings) == {"failed": 1}
            failed_at = time.monotonic()
            assert list(queue.peek_messages()) == []  # hidden for its delay, not handed out again
            gaps.append(_visible_again(queue, failed_at, limit=25))
        assert run(glpi_settings) == {"poisoned": 1}
    finally:
        glpi_control(stack, "faults", method="DELETE")
    assert [count for _, count in gaps] == [1, 2, 3, 4]  # each attempt counted by the queue
    # Azurite keeps visibility to the second: a delay may end up to a second early, never 30 s late.
    for (seconds, _), expected in zip(gaps, [1, 3, 4, 4], strict=True):
        assert expected - 1 <= seconds < 25, gaps
    assert gaps[1][0] > gaps[0][0]
    assert len(list(poison.peek_messages())) == 1
    assert list(queue.peek_messages()) == []


# --- the stand-in's ticket links, as GLPI answers -----------------------------------------------------------


def test_the_standin_links_tickets_as_glpi_and_refuses_bad_links(stack: Stack, glpi_settings: Any) -> None:
    from consumers.glpi.client import GlpiRefused

    word = _id()
    consumer = build_consumer(glpi_settings)
    try:
        first = consumer.client.create("Ticket", {"name": f"one {word}", "content": "x"}).id
        # "_linkedto" naming no ticket: the ticket is made, without a link (Ticket_Ticket refuses the input).
        second = consumer.client.create("Ticket", {"name": f"two {word}", "content": "x", "_linkedto": 99999999}).id
        for hostile in (
            {"tickets_id_1": first, "tickets_id_2": first, "link": 1},  # a ticket and itself
            {"tickets_id_1": first, "tickets_id_2": 99999999, "link": 1},  # no such ticket
            {"tickets_id_1": first, "tickets_id_2": second, "link": 9},  # no such link type
            {"tickets_id_1": "x", "tickets_id_2": second, "link": 1},
        ):
            with pytest.raises(GlpiRefused) as refused:
                consumer.client.create("Ticket_Ticket", hostile)
            assert refused.value.code == "ERROR_GLPI_ADD"
        link = consumer.client.create("Ticket_Ticket", {"tickets_id_1": second, "tickets_id_2": first, "link": 1}).id
        with pytest.raises(GlpiRefused):  # the same two tickets again, either way round
            consumer.client.create("Ticket_Ticket", {"tickets_id_1": first, "tickets_id_2": second, "link": 2})
        assert [r["id"] for r in consumer.client.sub_items("Ticket", first, "Ticket_Ticket")] == [link]
    finally:
        consumer.close()
    assert next(t["links"] for t in tickets_with(stack, word) if t["id"] == second)[0]["link"] == 1


# --- a message too large to read whole ---------------------------------------------------------------------


def test_a_message_above_the_read_limit_becomes_a_ticket_from_its_beginning_with_a_note(
    stack: Stack, glpi_settings: Any, drain: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from consumers.glpi import handler as handler_module

    monkeypatch.setattr(handler_module, "MAX_MESSAGE_BYTES", 64 * 1024)  # 40 MiB in production
    monkeypatch.setattr(handler_module, "HEAD_BYTES", 16 * 1024)  # 1 MiB
    read: list[int] = []
    real = handler_module.TicketConsumer.__init__

    def counting_init(self: Any, *args: Any, **kwargs: Any) -> None:
        real(self, *args, **kwargs)
        inner = self.read_blob

        def read_blob(container: str | None, name: str, limit: int) -> bytes:
            data: bytes = inner(container, name, limit)
            read.append(len(data))
            return data

        self.read_blob = read_blob

    monkeypatch.setattr(handler_module.TicketConsumer, "__init__", counting_init)
    word = _id()
    parts = [
        ("Content-Type: text/plain; charset=utf-8", f"the printer {word} is on fire".encode()),
        (
            'Content-Type: application/octet-stream\r\nContent-Disposition: attachment; filename="big.bin"\r\n'
            "Content-Transfer-Encoding: base64",
            base64.encodebytes(b"\x00" * 200_000),
        ),
    ]
    raw = multipart(f"Huge {word}", parts)
    envelope = post_mail(glpi_settings, raw, mailbox="s@x.test", uid=1)
    assert envelope["size"] == len(raw) > 64 * 1024
    assert drain() == {"ticket": 1}
    ticket = one_ticket(stack, word)
    assert f"the printer {word} is on fire" in ticket["content"]
    assert ticket["documents"] == []
    assert "above the 64 KiB the ticket consumer reads" in ticket["content"]
    assert envelope["blob"]["name"] in ticket["content"]
    assert read == [16 * 1024 + 1]  # only the beginning was downloaded, never the whole blob

    # A blob larger than its envelope says is read no further than the limit, and refused.
    small = post_mail(glpi_settings, mail(f"Small {word}"), mailbox="s@x.test", uid=2)
    blob = azure_clients.container(glpi_settings, glpi_settings.mail_container).get_blob_client(small["blob"]["name"])
    blob.upload_blob(raw, overwrite=True)
    read.clear()
    assert drain() == {"failed": 4, "poisoned": 1}
    assert read and max(read) == 64 * 1024 + 1
    assert tickets_with(stack, f"Small {word}") == []
