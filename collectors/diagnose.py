"""Diagnose one mailbox without showing any token: what the access token says (who, tenant, scopes or roles,
expiry), whether the IMAP login works and what the server offers, the folder list with the folders the mailbox's
options name marked, and how many messages wait above the checkpoint.

The token itself never leaves ``diagnose``: only the claims listed in CLAIMS_SHOWN are read out of it, and a
token that is not a JWT is reported as opaque.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from collectors.imap_session import ImapSession
from collectors.operations import mode_of, token_expires_at
from collectors.tokens import AccessToken
from shared.errors import CollectorError
from shared.registry import Mailbox, MailboxRegistry
from shared.settings import Settings

logger = logging.getLogger(__name__)

# The claims worth explaining; anything else in the token (signatures, nonces, ids of sessions) is left out.
CLAIMS_SHOWN = ("aud", "iss", "tid", "upn", "preferred_username", "unique_name", "appid", "azp", "scp", "roles")
MAX_FOLDERS = 500  # a report, not a dump: a mailbox with more shows the first ones and says so


@dataclass
class Diagnosis:
    address: str
    mode: str
    status: str
    checkpoint: str
    token: dict[str, Any] = field(default_factory=dict)
    login: str = "not tried"
    capabilities: list[str] = field(default_factory=list)
    folders: list[dict[str, Any]] = field(default_factory=list)
    pending: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_public(self) -> dict[str, Any]:
        return {**self.__dict__, "ok": self.ok}


def token_claims(token: str) -> dict[str, Any]:
    """The explained claims of a JWT access token (unverified: the reader only reports what it carries)."""
    parts = token.split(".")
    try:
        if len(parts) != 3:
            raise ValueError("not three parts")
        data = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        if not isinstance(data, dict):
            raise ValueError("not an object")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return {"format": "opaque (not a JWT): its claims cannot be read here"}
    who = data.get("upn") or data.get("preferred_username") or data.get("unique_name") or ""
    explained: dict[str, Any] = {
        "format": "JWT",
        "who": str(who) if who else f"the application {data.get('appid') or data.get('azp') or '?'}",
        "tenant": str(data.get("tid", "")),
        "audience": str(data.get("aud", "")),
        "scopes": str(data.get("scp", "")).split(),
        "roles": [str(r) for r in data.get("roles", []) if isinstance(r, str)],
    }
    for name, claim in (("issued_at", "iat"), ("expires_at", "exp")):
        if isinstance(data.get(claim), int | float):
            explained[name] = datetime.fromtimestamp(data[claim], UTC).isoformat()
    return explained


def diagnose(
    settings: Settings, registry: MailboxRegistry, token_for: Callable[[Mailbox], AccessToken], address: str
) -> Diagnosis:
    """Diagnose ``address``. Raises NotFoundError when it is not registered; every other failure is in the report."""
    mailbox = registry.get(address)
    options = mailbox.options
    report = Diagnosis(
        mailbox.address,
        mode_of(mailbox),
        mailbox.status,
        checkpoint=f"UIDVALIDITY {mailbox.uidvalidity}, UID {mailbox.last_uid}",
    )
    expires = token_expires_at(mailbox)
    try:
        token = token_for(mailbox)
    except CollectorError as e:
        report.token = {"error": e.error_class, "message": e.describe()}
        report.problems.append(f"no access token: {e.describe()}")
        return report
    report.token = token_claims(token.token)
    if mailbox.token_saved_at is not None:
        report.token["refresh_token_saved_at"] = mailbox.token_saved_at.isoformat()
    if expires is not None:
        report.token["refresh_token_expires_if_unused"] = expires.isoformat()
    try:
        with ImapSession(
            settings.imap_host,
            settings.imap_port,
            address=mailbox.address,
            access_token=token.token,
            ca_bundle=settings.ca_bundle,
            signed_in_as=mailbox.signed_in_as,
        ) as imap:
            report.login = "ok (AUTHENTICATE XOAUTH2 accepted)"
            client = imap.client
            report.capabilities = sorted(c.decode("ascii", "replace") for c in client.capabilities())
            listed = client.list_folders()
            marks = {options.folder: "collected", options.move_to: "move_to", options.refuse_to: "refuse_to"}
            found = set()
            for flags, _delimiter, name in listed[:MAX_FOLDERS]:
                text = name if isinstance(name, str) else name.decode("utf-8", "replace")
                mark = next((m for f, m in marks.items() if f and f.casefold() == text.casefold()), "")
                if mark:
                    found.add(mark)
                report.folders.append(
                    {"name": text, "flags": [f.decode("ascii", "replace") for f in flags], "mark": mark}
                )
            if len(listed) > MAX_FOLDERS:
                report.problems.append(f"{len(listed)} folders: only the first {MAX_FOLDERS} are listed")
            for folder, mark in marks.items():
                if folder and mark not in found:
                    what = "collected folder" if mark == "collected" else mark
                    verb = "is created on first use" if mark != "collected" else "must exist"
                    report.problems.append(f"the {what} {folder!r} is not in the folder list (it {verb})")
            uidvalidity = imap.select(options.folder)
            after = mailbox.last_uid if uidvalidity == mailbox.uidvalidity else 0
            report.pending = len(imap.new_sizes(after))
            if mailbox.uidvalidity and uidvalidity != mailbox.uidvalidity:
                report.problems.append(
                    f"UIDVALIDITY changed ({mailbox.uidvalidity} -> {uidvalidity}): the folder is collected again"
                )
    except CollectorError as e:
        if report.login == "not tried":
            report.login = f"refused: {e.describe()}"
        report.problems.append(e.describe())
    logger.info("diagnose mailbox=%s ok=%s problems=%d", mailbox.address, str(report.ok).lower(), len(report.problems))
    return report
