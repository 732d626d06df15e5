"""Per-mailbox ticket options, from the ``GLPI_MAILBOX_OPTIONS`` setting (JSON), with the GLPI receiver's defaults.

``{"*": {...}, "support@contoso.com": {...}}``: ``*`` applies to every mailbox, a mailbox's own entry overrides
it key by key. Unknown keys and wrong types are refused with the setting's name, so a typo never silently means
"default".
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from shared.errors import ConfigurationError

SETTING = "GLPI_MAILBOX_OPTIONS"
REFUSABLE = frozenset({"auto_reply", "bounce", "loop", "bulk", "list"})
DEFAULT_MAX_ATTACHMENT_BYTES = 2 * 1024 * 1024  # GLPI's document_max_size default; larger files get a note instead
MAX_ATTACHMENT_BYTES_LIMIT = 100 * 1024 * 1024


@dataclass(frozen=True)
class TicketOptions:
    entities_id: int = 0
    requesttypes_id: int = 2  # "E-Mail" in a new GLPI, RequestType::getDefault('mail')
    followup_requesttypes_id: int = 2  # RequestType::getDefault('mailfollowup')
    itilcategories_id: int = 0
    urgency: int = 3  # MailCollector: "Medium"
    requester_field: str = "from"  # or "reply-to" (MailCollector::REQUESTER_FIELD_REPLY_TO)
    cc_as_observers: bool = False  # the receiver's add_cc_to_observer, off by default
    unknown_senders: str = "anonymous"  # "anonymous": the address as alternative e-mail; "refuse": no ticket
    anonymous_followups: bool = False  # GLPI's use_anonymous_followups: off, a stranger's reply opens a new ticket
    # A reply to a closed ticket opens a new one; "link" links it to the closed one as GLPI's collector does
    # (Ticket_Ticket "linked to"), "new" leaves it unlinked.
    closed_ticket_replies: str = "link"
    reopen_on_reply: bool = True  # GLPI's collector adds every follow-up with add_reopen: a solved ticket reopens
    refuse: frozenset[str] = frozenset({"auto_reply", "bounce", "loop"})
    max_attachment_bytes: int = DEFAULT_MAX_ATTACHMENT_BYTES
    glpi_uuid: str | None = None  # GLPI's notification UUID: replies to another GLPI's notifications are not ours


def _integer(where: str, key: str, value: Any, *, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ConfigurationError(f"setting {SETTING}: {where}.{key} must be a whole number in {minimum}..{maximum}")
    return value


def _apply(base: TicketOptions, where: str, raw: object) -> TicketOptions:
    if not isinstance(raw, dict):
        raise ConfigurationError(f"setting {SETTING}: {where} must be a JSON object of options")
    known = {f.name for f in fields(TicketOptions)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigurationError(f"setting {SETTING}: {where} has unknown options {unknown}; known: {sorted(known)}")
    changes: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("entities_id", "itilcategories_id"):
            changes[key] = _integer(where, key, value, minimum=0, maximum=2**31 - 1)
        elif key in ("requesttypes_id", "followup_requesttypes_id"):
            changes[key] = _integer(where, key, value, minimum=1, maximum=2**31 - 1)
        elif key == "urgency":
            changes[key] = _integer(where, key, value, minimum=1, maximum=5)
        elif key == "max_attachment_bytes":
            changes[key] = _integer(where, key, value, minimum=0, maximum=MAX_ATTACHMENT_BYTES_LIMIT)
        elif key == "requester_field":
            if value not in ("from", "reply-to"):
                raise ConfigurationError(f"setting {SETTING}: {where}.requester_field must be 'from' or 'reply-to'")
            changes[key] = value
        elif key == "unknown_senders":
            if value not in ("anonymous", "refuse"):
                raise ConfigurationError(f"setting {SETTING}: {where}.unknown_senders must be 'anonymous' or 'refuse'")
            changes[key] = value
        elif key == "closed_ticket_replies":
            if value not in ("link", "new"):
                raise ConfigurationError(f"setting {SETTING}: {where}.closed_ticket_replies must be 'link' or 'new'")
            changes[key] = value
        elif key in ("cc_as_observers", "anonymous_followups", "reopen_on_reply"):
            if not isinstance(value, bool):
                raise ConfigurationError(f"setting {SETTING}: {where}.{key} must be true or false")
            changes[key] = value
        elif key == "refuse":
            if not isinstance(value, list) or not set(value) <= REFUSABLE or not all(isinstance(v, str) for v in value):
                raise ConfigurationError(
                    f"setting {SETTING}: {where}.refuse must be a list drawn from {sorted(REFUSABLE)}"
                )
            changes[key] = frozenset(value)
        elif key == "glpi_uuid":
            if value is not None and (not isinstance(value, str) or not value.isalnum() or len(value) > 64):
                raise ConfigurationError(f"setting {SETTING}: {where}.glpi_uuid must be GLPI's notification UUID")
            changes[key] = value.lower() if isinstance(value, str) else None
    return replace(base, **changes)


@dataclass(frozen=True)
class MailboxOptions:
    default: TicketOptions
    by_mailbox: Mapping[str, TicketOptions]

    def for_mailbox(self, address: str) -> TicketOptions:
        return self.by_mailbox.get(address.strip().lower(), self.default)


def parse_options(text: str) -> MailboxOptions:
    """Read the setting. Raises ConfigurationError naming the setting and the faulty entry."""
    try:
        raw = json.loads(text or "{}")
    except ValueError as e:
        raise ConfigurationError(f"setting {SETTING} is not valid JSON: {e}") from None
    except RecursionError:
        raise ConfigurationError(f"setting {SETTING} nests too deeply") from None
    if not isinstance(raw, dict):
        raise ConfigurationError(f"setting {SETTING} must be a JSON object keyed by mailbox address (or '*')")
    default = _apply(TicketOptions(), "'*'", raw.get("*", {}))
    by_mailbox: dict[str, TicketOptions] = {}
    for address, entry in raw.items():
        if address == "*":
            continue
        if not isinstance(address, str) or "@" not in address or len(address) > 320:
            raise ConfigurationError(f"setting {SETTING}: {str(address)[:80]!r} is not a mailbox address")
        by_mailbox[address.strip().lower()] = _apply(default, repr(address), entry)
    return MailboxOptions(default=default, by_mailbox=by_mailbox)
