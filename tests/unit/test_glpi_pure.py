"""The GLPI consumer's pure parts: charset decoding, GLPI's reply formats, options, content. No server needed."""

from __future__ import annotations

import codecs

import pytest

from consumers.glpi import content, replies
from consumers.glpi.handler import BadEnvelope, parse_envelope
from consumers.glpi.options import parse_options
from shared.errors import ConfigurationError
from shared.text_decoding import codec_for, decode_text


@pytest.mark.parametrize(
    ("label", "codec"),
    [
        ("iso-8859-8-i", "iso8859-8"),
        ("ISO-8859-8-I", "iso8859-8"),
        ("ks_c_5601-1987", "cp949"),
        ("windows-1255", "cp1255"),
        ('"utf-8"', "utf-8"),
        ("x-mac-cyrillic", "mac-cyrillic"),
        ("base64", None),
        ("rot13", None),
        ("idna", None),
        ("utf-8\x00", None),
        ("x-unknown-charset", None),
        ("", None),
        (None, None),
    ],
)
def test_labels_map_to_text_codecs_only(label: str | None, codec: str | None) -> None:
    assert codec_for(label) == codec


def test_no_charset_is_utf8_when_valid_else_latin1_as_glpi() -> None:
    assert decode_text("Grüße".encode(), None).text == "Grüße"
    decoded = decode_text("Problème".encode("latin-1"), None)
    assert (decoded.text, decoded.charset, decoded.problem) == ("Problème", "latin-1", None)


def test_a_bom_wins_over_the_label_and_is_removed() -> None:
    assert decode_text(codecs.BOM_UTF8 + b"ok", "iso-8859-1").text == "ok"
    assert decode_text("\ufeffПривет".encode("utf-16"), "us-ascii").text == "Привет"


def test_mislabelled_and_invalid_bytes() -> None:
    assert decode_text("été".encode(), "iso-8859-1").text == "été"  # UTF-8 labelled Latin-1 (GLPI shows Ã©tÃ©)
    assert decode_text("été".encode("latin-1"), "iso-8859-1").text == "été"
    utf8_labelled_latin = decode_text("été".encode("latin-1"), "utf-8")
    assert utf8_labelled_latin.text == "\ufffdt\ufffd" and "replaced" in (utf8_labelled_latin.problem or "")
    unknown = decode_text("žluť".encode("cp1250"), "x-nonsense")
    assert unknown.charset == "latin-1" and "unknown charset" in (unknown.problem or "")
    assert decode_text("שלום".encode("iso-8859-8"), "iso-8859-8-i").text == "שלום"


@pytest.mark.parametrize(
    ("header", "ticket"),
    [
        ("<GLPI_ab12cd-Ticket-42/new@glpi.example>", 42),
        ("<GLPI_ab12cd-Ticket-42/update.1700000000.123@glpi.example>", 42),
        ("<GLPI_ab12cd-Ticket-42.1600000000.77@glpi.example>", 42),
        ("<GLPI-42.1500000000.9@glpi.example>", 42),
        ("<GLPI-Ticket-42.1500000000.9@glpi.example>", 42),
        ("<GLPI_ab12cd-Change-42/new@glpi.example>", None),
        ("<GLPI_ab12cd/passwordforget.1.2@glpi.example>", None),
        ("<GLPI-99999999999999999999.1.2@glpi.example>", None),
        ("<random@example.org>", None),
    ],
)
def test_glpi_message_id_formats(header: str, ticket: int | None) -> None:
    assert replies.referenced_ticket([header], glpi_uuid=None) == ticket


def test_another_glpis_notifications_are_not_threaded_when_our_uuid_is_known() -> None:
    foreign = "<GLPI_ffff-Ticket-7/new@other>"
    ours = "<GLPI_abcd-Ticket-8/new@glpi>"
    assert replies.referenced_ticket([foreign], glpi_uuid="abcd") is None
    assert replies.referenced_ticket([foreign, ours], glpi_uuid="abcd") == 8
    assert replies.referenced_ticket([foreign], glpi_uuid=None) == 7


@pytest.mark.parametrize(
    ("subject", "ticket"),
    [
        ("Re: [GLPI #0000123] Printer", 123),
        ("RE: [Helpdesk Paris #77] x", 77),
        ("[GLPI #0] x", None),
        ("[GLPI #123456789012] x", None),
        ("GLPI #12 without brackets", None),
        ("", None),
        (None, None),
    ],
)
def test_subject_tags(subject: str | None, ticket: int | None) -> None:
    assert replies.tagged_ticket(subject) == ticket


def test_own_notifications() -> None:
    assert replies.is_own_notification("<GLPI_abcd-Ticket-1/new@g>", glpi_uuid=None)
    assert replies.is_own_notification("<GLPI-5.1.2@g>", glpi_uuid="abcd")
    assert not replies.is_own_notification("<GLPI_ffff-Ticket-1/new@g>", glpi_uuid="abcd")
    assert not replies.is_own_notification("<x@y>", glpi_uuid=None)
    assert not replies.is_own_notification(None, glpi_uuid=None)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[", "not valid JSON"),
        ("[]", "JSON object"),
        ('{"*": {"entities_id": -1}}', "entities_id"),
        ('{"*": {"entities_id": true}}', "entities_id"),
        ('{"*": {"entitys_id": 1}}', "unknown options"),
        ('{"*": {"requester_field": "sender"}}', "requester_field"),
        ('{"*": {"refuse": ["spam"]}}', "refuse"),
        ('{"*": {"refuse": "auto_reply"}}', "refuse"),
        ('{"*": {"max_attachment_bytes": 1e99}}', "max_attachment_bytes"),
        ('{"*": {"glpi_uuid": "a b"}}', "glpi_uuid"),
        ('{"*": {"closed_ticket_replies": "LINK"}}', "closed_ticket_replies"),
        ('{"*": {"closed_ticket_replies": "followup"}}', "closed_ticket_replies"),
        ('{"*": {"closed_ticket_replies": null}}', "closed_ticket_replies"),
        ('{"*": {"closed_ticket_replies": 1}}', "closed_ticket_replies"),
        ('{"*": {"reopen_on_reply": "yes"}}', "reopen_on_reply"),
        ('{"*": {"reopen_on_reply": 1}}', "reopen_on_reply"),
        ('{"not-an-address": {}}', "not a mailbox address"),
        ('{"a@b.example": 3}', "JSON object of options"),
        ("[" * 100000 + "]" * 100000, "GLPI_MAILBOX_OPTIONS"),
    ],
)
def test_hostile_options_are_refused_with_the_setting_named(text: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match="GLPI_MAILBOX_OPTIONS") as raised:
        parse_options(text)
    assert message in str(raised.value)


def test_options_cascade_from_star_to_the_mailbox() -> None:
    options = parse_options('{"*": {"entities_id": 4, "urgency": 2}, "Support@X.example": {"urgency": 5}}')
    mine = options.for_mailbox("support@x.example")
    assert (mine.entities_id, mine.urgency) == (4, 5)
    assert options.for_mailbox("other@x.example").urgency == 2
    assert parse_options("").default.refuse == frozenset({"auto_reply", "bounce", "loop"})


@pytest.mark.parametrize(
    "text",
    ["", "not json", '{"schema": "mail-envelope/2"}', '{"schema": "mail-envelope/1", "id": 1}', "x" * 300_000],
)
def test_bad_queue_messages_are_refused_clearly(text: str) -> None:
    with pytest.raises(BadEnvelope):
        parse_envelope(text)


def test_sanitizer_keeps_text_and_drops_active_content() -> None:
    dirty = (
        '<p style="x" onmouseover="evil()">Hi <b>there</b></p><script>alert(1)</script><iframe src="https://x"></iframe>'
        '<img src="javascript:alert(1)"><img src="cid:a@b"><a href="data:text/html,x">d</a><form><input></form>'
        "<table><tr><td>cell</td></tr></table><unknown>kept text</unknown>"
    )
    clean = content.sanitize_html(dirty)
    assert clean == (
        '<p>Hi <b>there</b></p><img><img src="cid:a@b"><a>d</a><table><tr><td>cell</td></tr></table>kept text'
    )


def test_quoted_history_is_cut_but_never_everything() -> None:
    text = "Thanks, it works.\n\nOn Mon, 1 Dec 2026, Support <s@x> wrote:\n> old\n> older"
    assert content.strip_quoted_text(text) == "Thanks, it works."
    assert content.strip_quoted_text("> only a quote\n> nothing else") == "> only a quote\n> nothing else"
    outlook = "Fixed.\n\nFrom: Support <s@x>\nSent: Monday\nTo: me\n\nold text"
    assert content.strip_quoted_text(outlook) == "Fixed."
    glpi = "Answer above\n=-=-=-=\nGLPI notification text\n=_=_=_="
    assert content.strip_quoted_text(glpi).strip() == "Answer above"
    html = '<div>New text</div><div class="gmail_quote"><blockquote>old</blockquote></div>'
    assert content.strip_quoted_html(html) == "<div>New text</div>"
    assert content.strip_quoted_html('<blockquote type="cite">all quoted</blockquote>').startswith("<blockquote")


def test_titles() -> None:
    assert content.title_of(None) == content.NO_SUBJECT
    assert content.title_of(" \t\r\n ") == content.NO_SUBJECT
    assert content.title_of("a\r\n b\x00c") == "a bc"
    long = content.title_of("x" * 1000)
    assert len(long) == content.TITLE_MAX_CHARS and long.endswith("…")


def test_inline_image_rewrite_only_touches_known_cids() -> None:
    markup = '<img src="cid:one@x"><img src="CID:two@x"><img src="cid:&lt;three@x&gt;">'
    rewritten = content.rewrite_inline_images(
        markup, {"one@x": "/front/document.send.php?docid=5", "three@x": "/d?x=1&y=2"}
    )
    assert rewritten == ('<img src="/front/document.send.php?docid=5"><img src="CID:two@x"><img src="/d?x=1&amp;y=2">')
