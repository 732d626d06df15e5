"""Classification: which collected messages are auto-replies, bounces, bulk or list mail, or mail loops.

This is policy that helpdesks tune (GLPI refuses the same kinds), kept apart from the parsing. Each flag names the
header behind it in ``reasons``, so a consumer or an admin can see why a message was flagged.
"""

from __future__ import annotations

import re
from typing import Any

from collectors.envelope.headers import from_8bit, unfold
from collectors.envelope.mime import Body
from collectors.envelope.notes import short

# Downstream systems put this header on mail they send, so that a reply of ours coming back is seen as a loop.
LOOP_HEADER = "X-Mail-Collector-Loop"
# The kinds a mailbox's refuse_to folder receives, as GLPI refuses them; bulk and list mail is still accepted.
REFUSED_KINDS = ("auto_reply", "bounce", "loop")
# When Exchange Online cannot convert a stored message to MIME, IMAP serves a placeholder in its place: a short
# plain-text message whose body starts with this sentence. The real message stays in the mailbox, readable in
# Outlook; the placeholder is flagged so that no consumer takes it for the customer's mail.
PLACEHOLDER_TEXT = "Retrieval using the IMAP4 protocol failed for the following message"


def classify(headers: dict[str, list[str]], body: Body, from_: list[dict[str, str]]) -> dict[str, Any]:
    """Flag what consumers must not answer or must treat apart; each flag names the header behind it."""
    reasons: list[str] = []
    flags = {"auto_reply": False, "bounce": False, "bulk": False, "list": False, "loop": False, "placeholder": False}

    def value(name: str) -> str | None:
        values = headers.get(name)
        return from_8bit(unfold(values[0]))[0].strip() if values else None

    def flag(name: str, reason: str) -> None:
        flags[name] = True
        if reason not in reasons:
            reasons.append(reason)

    auto_submitted = value("auto-submitted")
    if auto_submitted is not None and auto_submitted.split(";", 1)[0].strip().lower() != "no":
        flag("auto_reply", f"auto-submitted: {short(auto_submitted)}")
    suppress = value("x-auto-response-suppress")
    if suppress is not None and {"all", "oof", "autoreply"} & set(re.split(r"[\s,]+", suppress.lower())):
        flag("auto_reply", f"x-auto-response-suppress: {short(suppress)}")
    for name in ("x-autoreply", "x-autorespond"):
        if value(name) is not None:
            flag("auto_reply", f"{name} present")
    if body.disposition_report:
        flag("auto_reply", "multipart/report: disposition-notification")

    precedence = value("precedence")
    if precedence is not None:
        kind = re.split(r"[\s;(]", precedence.lower(), maxsplit=1)[0]
        if kind in ("bulk", "junk", "list"):
            flag("bulk", f"precedence: {short(precedence)}")
        if kind == "list":
            flag("list", f"precedence: {short(precedence)}")
        if kind == "auto_reply":
            flag("auto_reply", f"precedence: {short(precedence)}")
    for name in ("list-id", "list-unsubscribe", "list-post"):
        if value(name) is not None:
            flag("list", f"{name} present")

    if body.delivery_report:
        flag("bounce", "multipart/report: delivery-status")
    if value("x-failed-recipients") is not None:
        flag("bounce", "x-failed-recipients present")
    null_sender = any(v.strip() == "<>" for v in (unfold(raw) for raw in headers.get("return-path", [])))
    if null_sender:
        reasons.append("return-path: <> (null sender)")
        mailer = any(a["address"].split("@", 1)[0].lower() in ("mailer-daemon", "postmaster") for a in from_)
        # RFC 3834 auto-replies use the null sender too: without another sign, a null sender is a bounce.
        if mailer or not flags["auto_reply"]:
            flag("bounce", "return-path: <> (null sender)")

    if body.content_type == "text/plain" and (body.preview or "").startswith(PLACEHOLDER_TEXT):
        flag("placeholder", "body: Exchange could not convert the message (Retrieval using the IMAP4 protocol failed)")

    loop_header = LOOP_HEADER.lower()
    for name in (loop_header, "x-loop"):
        loop = value(name)
        if loop is not None:
            flag("loop", f"{name}: {short(loop)}")
    return {**flags, "reasons": reasons}


def placeholder(classification: dict[str, Any]) -> bool:
    """Whether the server served a placeholder instead of the message (left in place, never after-actioned)."""
    return bool(classification.get("placeholder"))


def refused(classification: dict[str, Any]) -> bool:
    """Whether a classified message goes to the refuse_to folder (an auto-reply, a bounce or a mail loop)."""
    return any(bool(classification.get(kind)) for kind in REFUSED_KINDS)
