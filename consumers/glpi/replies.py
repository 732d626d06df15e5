"""Which ticket a message answers, read from its headers as GLPI's own MailCollector reads them.

GLPI finds the ticket of a reply (MailCollector::getItemFromHeaders) in the In-Reply-To, then the References
header, by the Message-IDs it puts on its notifications, in three generations of format
(MailCollector::extractValuesFromRefHeader):

- GLPI >= 10.0.7: ``GLPI_<uuid>-<itemtype>-<id>/<event>[.<time>.<rand>]@<host>``
- GLPI 10.0.0 to 10.0.6: ``GLPI_<uuid>-<itemtype>-<id>.<time>.<rand>@<host>``
- GLPI < 10: ``GLPI-<id>.<time>.<rand>@<host>`` (a ticket) and ``GLPI-<itemtype>-<id>.<time>.<rand>@<host>``

and then by the ticket tag in the subject (``[GLPI #0000123]``, any text before the ``#``). A message whose own
Message-ID is one of GLPI's notification ids for a ticket is GLPI's own notification: taking it in would loop.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

MAX_TICKET_ID = 2**31 - 1

_NEW = re.compile(
    r"GLPI_(?P<uuid>[a-z0-9]+)(?:-(?P<itemtype>[a-z]+)-(?P<id>[0-9]+))?/(?P<event>[a-z_]+)(?:\.[0-9]+\.[0-9]+)?@.+",
    re.I,
)
_MIDDLE = re.compile(r"GLPI_(?P<uuid>[a-z0-9]+)(?:-(?P<itemtype>[a-z]+)-(?P<id>[0-9]+))?\.[0-9]+\.[0-9]+@.+", re.I)
_OLD = re.compile(r"GLPI(?:-(?P<itemtype>[a-z]+))?(?:-(?P<id>[0-9]+))?\.[0-9]+\.[0-9]+@.+", re.I)
SUBJECT_TAG = re.compile(r"\[.+#(\d+)\]")


@dataclass(frozen=True)
class GlpiReference:
    uuid: str | None
    itemtype: str | None
    items_id: int | None


def parse_reference(message_id: str) -> GlpiReference | None:
    """The GLPI item a Message-ID names, or None when it is not in one of GLPI's formats."""
    text = message_id.strip().strip("<>")
    for pattern, has_uuid in ((_NEW, True), (_MIDDLE, True), (_OLD, False)):
        match = pattern.search(text)
        if match is None:
            continue
        raw_id = match.group("id")
        items_id = int(raw_id) if raw_id and len(raw_id) <= 10 and int(raw_id) <= MAX_TICKET_ID else None
        itemtype = match.group("itemtype") or ("Ticket" if items_id and not has_uuid else None)
        return GlpiReference(match.group("uuid").lower() if has_uuid else None, itemtype, items_id)
    return None


def referenced_ticket(ids: Iterable[str], *, glpi_uuid: str | None) -> int | None:
    """The ticket named by the first GLPI notification id among ``ids`` (In-Reply-To first, then References).

    With ``glpi_uuid`` set, a reply that names only another GLPI instance's notifications is not ours
    (MailCollector::isResponseToMessageSentByAnotherGlpi)."""
    references = [r for r in (parse_reference(i) for i in ids) if r is not None]
    if glpi_uuid:
        ours = any(r.uuid == glpi_uuid for r in references)
        foreign = any(r.uuid and r.uuid != glpi_uuid for r in references)
        if foreign and not ours:
            return None
    for reference in references:
        if glpi_uuid and reference.uuid and reference.uuid != glpi_uuid:
            continue
        if reference.items_id and (reference.itemtype or "").lower() == "ticket":
            return reference.items_id
    return None


def tagged_ticket(subject: str | None) -> int | None:
    """The ticket id of a subject's GLPI tag, e.g. ``Re: [GLPI #0000123] Printer`` -> 123."""
    match = SUBJECT_TAG.search(subject or "")
    if match is None or len(match.group(1)) > 10:
        return None
    number = int(match.group(1))
    return number if 0 < number <= MAX_TICKET_ID else None


def is_own_notification(message_id: str | None, *, glpi_uuid: str | None) -> bool:
    """True when the message is a GLPI notification about a ticket (MailCollector::isItilNotificationFromSelf):
    an old-format id is assumed to be ours, a new one must carry our UUID when we know it."""
    reference = parse_reference(message_id or "")
    if reference is None or (reference.itemtype or "").lower() not in ("ticket", "problem", "change"):
        return False
    return reference.uuid is None or glpi_uuid is None or reference.uuid == glpi_uuid
