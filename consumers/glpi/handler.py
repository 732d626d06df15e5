"""One envelope from the mail queue becomes one GLPI ticket or follow-up, once, whatever crashes in between.

The order of the steps is what makes it once:

1. The ``message`` row (SHA-256 + Message-ID) is claimed (pending); a done or refused message is dropped.
2. Attachments are uploaded as documents and their ids saved with the claim, so a retry does not upload them again.
3. Before creating the ticket or follow-up, a retry (``resumed``) looks in GLPI for the marker that the first
   attempt wrote into the text: a create whose answer was lost (crash, timeout) is found, not repeated.
4. Documents are linked (a retry links only what is missing).
5. The thread map (this Message-ID -> the ticket) is written, then the message row becomes done (the claim's
   conditional write).

A failure of GLPI or storage raises TransientError: the message goes back to the queue (host.json
``visibilityTimeout``) and after ``maxDequeueCount`` attempts to the poison queue, with the reason kept in the
``message`` row and logged.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import html
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from consumers.glpi import content as mail_content
from consumers.glpi import replies
from consumers.glpi.client import GlpiClient, GlpiRefused
from consumers.glpi.options import MailboxOptions, TicketOptions
from consumers.glpi.state import DONE, FAILED, REFUSED, ClaimLost, MessageState, StateStore, message_key
from shared.errors import ConfigurationError, TransientError
from shared.invocation_logs import carried

logger = logging.getLogger(__name__)

ENVELOPE_SCHEMA = "mail-envelope/1"
MARKER_PREFIX = "mailref"
STATUS_CLOSED = 6  # CommonITILObject::CLOSED
UPLOAD_THREADS = 16  # documents uploaded, and the blob and requester read, side by side (shared by invocations)
USER_CACHE_SECONDS = 300.0
MAX_ENVELOPE_BYTES = 256 * 1024
# A message is read whole only up to this size: raw bytes, the parsed tree and the decoded parts take about three
# times the message, for each of the invocations an instance runs at once (host.json: 4 + 2), within 2 GB. Exchange
# Online accepts messages up to 150 MB; above the limit the ticket gets the message's beginning and a note.
MAX_MESSAGE_BYTES = 40 * 1024 * 1024
HEAD_BYTES = 1024 * 1024
_ADDRESS = re.compile(r"^[^@\s<>()\[\],;:\"]{1,64}@[A-Za-z0-9.-]{1,255}\.[A-Za-z]{2,63}$")


class BadEnvelope(Exception):
    """The queue message is not a mail envelope this consumer can read: it goes to the poison queue as is."""


@dataclass(frozen=True)
class Outcome:
    status: str  # "ticket", "followup", "duplicate", "refused"
    ticket_id: int | None = None
    followup_id: int | None = None
    reason: str = ""


def marker_for(key: str) -> str:
    """A token written into the ticket text that a retry searches for; letters and digits only, so that GLPI's
    HTML encoding and its LIKE search leave it as is."""
    return f"{MARKER_PREFIX}{key[:24]}"


def parse_envelope(text: str) -> dict[str, Any]:
    """The envelope JSON of a queue message (plain JSON, or base64 of it). Raises BadEnvelope."""
    if len(text) > MAX_ENVELOPE_BYTES:
        raise BadEnvelope("the queue message is larger than any envelope")
    candidate = text.strip()
    if not candidate.startswith("{"):
        try:
            candidate = base64.b64decode(candidate, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise BadEnvelope("the queue message is neither JSON nor base64 of JSON") from None
    try:
        envelope = json.loads(candidate)
    except (ValueError, RecursionError):
        raise BadEnvelope("the queue message is not valid JSON") from None
    if not isinstance(envelope, dict) or envelope.get("schema") != ENVELOPE_SCHEMA:
        raise BadEnvelope(f"the queue message is not a {ENVELOPE_SCHEMA} envelope")
    for name, kind in (("id", str), ("mailbox", str), ("sha256", str), ("blob", dict)):
        if not isinstance(envelope.get(name), kind):
            raise BadEnvelope(f"the envelope's {name} is missing or of the wrong type")
    if not re.fullmatch(r"[0-9a-f]{64}", envelope["sha256"]):
        raise BadEnvelope("the envelope's sha256 is not 64 hex digits")
    blob = envelope["blob"]
    if not isinstance(blob.get("name"), str) or not blob["name"]:
        raise BadEnvelope("the envelope's blob has no name")
    return envelope


def _address_list(envelope: dict[str, Any], name: str) -> list[str]:
    entries = envelope.get(name)
    return (
        [str(e.get("address", "")).strip() for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
    )


def _size_of(envelope: dict[str, Any]) -> int:
    size = envelope.get("size")
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else 0


def _mib(n: int) -> str:
    return f"{n / 1048576:.0f} MiB" if n >= 1048576 else f"{n / 1024:.0f} KiB"


def _valid_address(address: str) -> bool:
    return bool(_ADDRESS.fullmatch(address))


class TicketConsumer:
    """Turns envelopes into GLPI tickets. ``read_blob(container, name, limit)`` returns the raw message's first
    ``limit`` + 1 bytes at most."""

    def __init__(
        self,
        client: GlpiClient,
        state: StateStore,
        options: MailboxOptions,
        read_blob: Callable[[str | None, str, int], bytes],
        *,
        upload_threads: int = UPLOAD_THREADS,
    ) -> None:
        self.client = client
        self.state = state
        self.options = options
        self.read_blob = read_blob
        self._uploads = ThreadPoolExecutor(upload_threads, thread_name_prefix="glpi-upload")
        self._users: dict[str, tuple[float, Future[int]]] = {}
        self._users_lock = threading.Lock()

    def close(self) -> None:
        self._uploads.shutdown(wait=True)
        self.client.close()

    # --- the entry point

    def handle(self, message_text: str, *, dequeue_count: int = 1, max_dequeue_count: int = 5) -> Outcome:
        """Handle one queue message. Returns what was done; raises TransientError (retry later), BadEnvelope
        or ConfigurationError. On the last allowed attempt the failure's reason is kept in the state row."""
        envelope = parse_envelope(message_text)
        key = message_key(envelope["sha256"], envelope.get("message_id"))
        log = f"envelope={envelope['id']} attempt={dequeue_count}"
        try:
            return self._handle(envelope, key, log)
        except (TransientError, ConfigurationError, GlpiRefused, BadEnvelope) as e:
            last = dequeue_count >= max_dequeue_count
            level = logging.ERROR if last or isinstance(e, ConfigurationError) else logging.WARNING
            logger.log(level, "glpi message failed %s last_attempt=%s error=%s", log, last, e)
            if last and not isinstance(e, ClaimLost):  # another invocation holds the message and records its end
                self._record_failure(key, envelope["id"], f"{type(e).__name__}: {e}")
            raise

    def _record_failure(self, key: str, envelope_id: str, reason: str) -> None:
        try:
            state = self.state.read(key) or MessageState(key=key, envelope_id=envelope_id)
            if state.status in (DONE, REFUSED):
                return
            state.status, state.reason, state.envelope_id = FAILED, reason, envelope_id
            if state.etag is not None:
                self.state.finish(state, FAILED, reason=reason)
            else:
                self.state.record_envelope(envelope_id, state)
            logger.error(
                "glpi message poisoned envelope=%s reason=%s next=fix the cause, then replay the poison queue "
                "(python -m consumers.glpi replay)",
                envelope_id,
                reason[:300],
            )
        except TransientError as e:
            logger.error("glpi failure not recorded envelope=%s error=%s", envelope_id, e)

    def _handle(self, envelope: dict[str, Any], key: str, log: str) -> Outcome:
        # Reads that do not depend on the claim run while it is taken: the raw mail and the requester's GLPI user.
        options = self.options.for_mailbox(str(envelope["mailbox"]))
        oversized = _size_of(envelope) > MAX_MESSAGE_BYTES
        limit = HEAD_BYTES if oversized else MAX_MESSAGE_BYTES
        blob = self._uploads.submit(self.read_blob, envelope["blob"].get("container"), envelope["blob"]["name"], limit)
        requester = self._requester_address(envelope, options)
        if requester:
            self._uploads.submit(self._user_id, requester)  # fills the cache; its failure shows again when used
        state = self.state.claim(key, envelope["id"])
        if state.status in (DONE, REFUSED):
            logger.info("glpi duplicate dropped %s status=%s ticket=%s", log, state.status, state.ticket_id)
            thread = self._record_thread(envelope, state) if state.status == DONE else None
            if state.envelope_id != envelope["id"]:
                self.state.record_envelope(envelope["id"], state)
            if thread is not None:
                thread.result()
            return Outcome("duplicate", state.ticket_id, state.followup_id, state.reason)
        try:
            return self._process(envelope, state, key, log, blob, oversized)
        except ClaimLost:
            raise
        except Exception:
            # Give the message back at once: the retry must not wait for the claim to lapse. A crash that skips
            # this leaves the claim to lapse after CLAIM_SECONDS.
            self.state.release(state)
            raise

    def _process(
        self,
        envelope: dict[str, Any],
        state: MessageState,
        key: str,
        log: str,
        blob: Future[bytes],
        oversized: bool = False,
    ) -> Outcome:
        state.envelope_id = envelope["id"]
        options = self.options.for_mailbox(str(envelope["mailbox"]))

        refusal = self._refusal(envelope, options)
        if refusal:
            self.state.finish(state, REFUSED, reason=refusal)
            logger.info("glpi message refused %s reason=%s", log, refusal)
            return Outcome("refused", reason=refusal)

        target = state.ticket_id if state.kind == "followup" else None
        closed: int | None = None  # the closed ticket a new one is linked to
        if not state.kind:
            target, closed = self._thread_target(envelope, options)
            state.kind = "followup" if target else "ticket"
            state.ticket_id = target
        elif state.kind == "ticket" and state.ticket_id is None:
            closed = self._thread_target(envelope, options)[1]  # a saved decision; only the link is asked again
        raw = blob.result()
        if oversized:
            # Only the beginning was read (the whole message would not fit in memory beside the other
            # invocations'): its text, as far as it goes, and a note; no attachment, as none is whole.
            mail = mail_content.parse_message(raw[:HEAD_BYTES], max_attachment_bytes=0, reply=state.kind == "followup")
            mail.notes = [n for n in mail.notes if not n.startswith("Too large attached file")]
            mail.attachments = []
            mail.notes.append(
                f"This message is {_mib(_size_of(envelope))}, above the {_mib(MAX_MESSAGE_BYTES)} the ticket "
                f"consumer reads: only its first {_mib(HEAD_BYTES)} became this text, and no attachment was "
                f"imported. The whole message is kept in storage as {str(envelope['blob']['name'])[:300]}."
            )
        else:
            if len(raw) > MAX_MESSAGE_BYTES or hashlib.sha256(raw).hexdigest() != envelope["sha256"]:
                raise BadEnvelope("the blob's bytes do not match the envelope's sha256 and size")
            mail = mail_content.parse_message(
                raw, max_attachment_bytes=options.max_attachment_bytes, reply=state.kind == "followup"
            )
        del raw
        saved = self._upload_documents(state, mail, options)
        text = self._text(envelope, mail, state, key)
        try:
            if state.kind == "ticket":
                outcome = self._ticket(envelope, state, text, options, key, closed)
            else:
                outcome = self._followup(state, text, options, key)
        finally:
            if saved is not None:
                state.etag = saved.result().etag
        # The thread row is written beside the links and the finish: it names a ticket that exists, and a message
        # finished without it (a crash, a failed write) writes it again when its retry is dropped as a duplicate.
        thread = self._record_thread(envelope, state)
        try:
            self._link_documents(state, mail)
            self.state.finish(state, DONE)
        finally:
            if thread is not None:
                thread.result()
        logger.info(
            "glpi message done %s kind=%s ticket=%s followup=%s documents=%d",
            log,
            state.kind,
            state.ticket_id,
            state.followup_id,
            len(state.documents),
        )
        return outcome

    def _record_thread(self, envelope: dict[str, Any], state: MessageState) -> Future[None] | None:
        message_id = envelope.get("message_id")
        if not isinstance(message_id, str) or not message_id.strip() or not state.ticket_id:
            return None
        return self._uploads.submit(carried(self.state.record_thread), message_id, state.ticket_id)

    # --- decisions

    def _refusal(self, envelope: dict[str, Any], options: TicketOptions) -> str:
        classification = envelope.get("classification") if isinstance(envelope.get("classification"), dict) else {}
        assert isinstance(classification, dict)
        if classification.get("placeholder") is True:
            # Not the customer's mail but Exchange's stand-in text for a message it could not convert: never a
            # ticket, whatever the options say; the mailbox's status lists the UID for an admin to open in Outlook.
            return "placeholder: Exchange could not convert the message; open it in Outlook on the web"
        for kind in sorted(options.refuse):
            if classification.get(kind) is True:
                reasons = classification.get("reasons") or []
                return f"{kind}: {'; '.join(str(r) for r in reasons)[:200]}"
        if replies.is_own_notification(envelope.get("message_id"), glpi_uuid=options.glpi_uuid):
            return "loop: the message is one of GLPI's own ticket notifications"
        requester = self._requester_address(envelope, options)
        if options.unknown_senders == "refuse" and (not requester or self._user_id(requester) is None):
            return f"unknown sender: {requester or '(none)'} is not a GLPI user"
        return ""

    def _thread_target(self, envelope: dict[str, Any], options: TicketOptions) -> tuple[int | None, int | None]:
        """The ticket the message follows up, and else the closed ticket it answers (for the new ticket's link)."""
        in_reply_to = [envelope["in_reply_to"]] if isinstance(envelope.get("in_reply_to"), str) else []
        references = [r for r in envelope.get("references") or [] if isinstance(r, str)]
        candidates: list[int] = []
        by_header = replies.referenced_ticket(in_reply_to + references, glpi_uuid=options.glpi_uuid)
        if by_header:
            candidates.append(by_header)
        by_tag = replies.tagged_ticket(envelope.get("subject"))
        if by_tag:
            candidates.append(by_tag)
        own = self.state.thread_ticket(in_reply_to + list(reversed(references)))
        if own:
            candidates.append(own)
        for ticket_id in candidates:
            ticket = self.client.get("Ticket", ticket_id)
            if ticket is None or ticket.get("is_deleted"):
                continue
            if not options.anonymous_followups and not self._may_follow_up(envelope, options, ticket_id):
                logger.info("glpi reply from a stranger to ticket=%d opens a new ticket", ticket_id)
                return None, None
            if int(ticket.get("status") or 0) == STATUS_CLOSED:
                # As GLPI's collector (MailCollector::buildTicket, "_linkedto"): a reply to a closed ticket opens
                # a new one, linked to the closed one unless the mailbox says otherwise.
                link = ticket_id if options.closed_ticket_replies == "link" else None
                logger.info("glpi reply to closed ticket=%d opens a new ticket linked=%s", ticket_id, bool(link))
                return None, link
            return ticket_id, None
        return None, None

    def _may_follow_up(self, envelope: dict[str, Any], options: TicketOptions, ticket_id: int) -> bool:
        """GLPI's rule without anonymous follow-ups: the sender is a GLPI user, or an address on the ticket
        (MailCollector::buildTicket, Ticket_User::isAlternateEmailForITILObject). A guessed tag alone is not enough."""
        requester = self._requester_address(envelope, options)
        if not requester:
            return False
        if self._user_id(requester):
            return True
        actors = self.client.sub_items("Ticket", ticket_id, "Ticket_User")
        return any(str(a.get("alternative_email") or "").lower() == requester for a in actors)

    def _requester_address(self, envelope: dict[str, Any], options: TicketOptions) -> str:
        if options.requester_field == "reply-to":
            for address in _address_list(envelope, "reply_to"):
                if _valid_address(address):
                    return address.lower()
        for address in _address_list(envelope, "from"):
            if _valid_address(address):
                return address.lower()
        return ""

    def _user_id(self, address: str) -> int | None:
        """The GLPI user with this e-mail address (cached for a while). A look-up already under way for the same
        address (the early one that runs beside the claim) is waited for, not sent again."""
        now = time.monotonic()
        with self._users_lock:
            cached = self._users.get(address)
            if cached is not None and now - cached[0] < USER_CACHE_SECONDS:
                pending = cached[1]
                mine = False
            else:
                pending = Future()
                self._users[address] = (now, pending)
                mine = True
        if not mine:
            return pending.result() or None
        try:
            rows = self.client.search("User", [(5, "equals", address)])
        except BaseException as e:
            with self._users_lock:
                if self._users.get(address, (0.0, None))[1] is pending:
                    del self._users[address]  # a failure is not remembered: the next message asks again
            pending.set_exception(e)
            raise
        user_id = 0
        for row in rows:
            if str(row.get("5", "")).lower() == address:
                user_id = int(row.get("2") or 0)
                break
        pending.set_result(user_id)
        return user_id or None

    # --- content

    def _text(self, envelope: dict[str, Any], mail: mail_content.MailContent, state: MessageState, key: str) -> str:
        urls = {
            a.content_id: self.client.document_url(state.documents[str(a.index)])
            for a in mail.attachments
            if a.content_id and str(a.index) in state.documents
        }
        body = mail_content.rewrite_inline_images(mail.html, urls) if urls else mail.html
        notes = list(mail.notes)
        refused = [a.filename for a in mail.attachments if state.documents.get(str(a.index)) == 0]
        if refused and not any(n.startswith("GLPI refused") for n in notes):
            notes.append(f"GLPI refused these attached files: {', '.join(refused)[:300]}.")
        sender = _address_list(envelope, "from")
        if not sender or not _valid_address(sender[0]):
            raw_from = "; ".join(
                f"{e.get('name', '')} {e.get('address', '')}".strip() for e in envelope.get("from") or []
            )
            notes.append(f"The sender address is missing or invalid: {raw_from[:200] or '(none)'}.")
        if not body:
            body = "<p>(no text)</p>"
        footer = "".join(f"<p>{html.escape(n)}</p>" for n in notes)
        return f"{body}{footer}<p>Mail reference: {marker_for(key)}</p>"

    # --- documents

    def _upload_documents(
        self, state: MessageState, mail: mail_content.MailContent, options: TicketOptions
    ) -> Future[MessageState] | None:
        """Upload the attachments not uploaded yet. Their ids are saved (so that a retry does not upload them
        again) while the ticket is created: the returned save is waited for before anything else is written."""
        missing = [a for a in mail.attachments if str(a.index) not in state.documents]
        if not missing:
            return None

        def upload(attachment: mail_content.Attachment) -> tuple[str, int | None, str]:
            try:
                created = self.client.upload_document(
                    attachment.filename, attachment.data, attachment.mime, {"entities_id": options.entities_id}
                )
                return str(attachment.index), created.id, ""
            except GlpiRefused as e:  # GLPI refuses the file (type, size): a note instead of a lost message
                return str(attachment.index), None, f"{attachment.filename}: {e.code}"

        results = list(self._uploads.map(carried(upload), missing))
        refused: list[str] = []
        for index, document_id, problem in results:
            if document_id is not None:
                state.documents[index] = document_id
            else:
                state.documents[index] = 0
                refused.append(problem)
        for problem in refused:
            mail.notes.append(f"GLPI refused an attached file: {problem}.")
        snapshot = dataclasses.replace(state, documents=dict(state.documents))  # the row as it is now

        def save() -> MessageState:
            self.state.save(snapshot)
            return snapshot

        return self._uploads.submit(carried(save))

    def _link_documents(self, state: MessageState, mail: mail_content.MailContent) -> None:
        if state.linked:
            return
        itemtype, items_id = (
            ("ITILFollowup", state.followup_id) if state.kind == "followup" else ("Ticket", state.ticket_id)
        )
        documents = sorted({d for d in state.documents.values() if d})
        if documents and items_id:
            existing: set[int] = set()
            if state.resumed:
                rows = self.client.sub_items(itemtype, items_id, "Document_Item")
                existing = {int(r.get("documents_id") or 0) for r in rows}
            rows = [
                {"documents_id": d, "itemtype": itemtype, "items_id": items_id} for d in documents if d not in existing
            ]
            self.client.create_many("Document_Item", rows)
        state.linked = True

    # --- GLPI items

    def _actors(self, envelope: dict[str, Any], options: TicketOptions) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        requester = self._requester_address(envelope, options)
        if requester:
            user_id = self._user_id(requester)
            fields["_users_id_requester"] = user_id or 0
            fields["_users_id_requester_notif"] = {
                "use_notification": [1],
                "alternative_email": ["" if user_id else requester],
            }
        else:
            # No usable address: nobody to notify; without this GLPI would make the API user the requester.
            fields["_users_id_requester"] = 0
        if options.cc_as_observers:
            mailbox = str(envelope.get("mailbox", "")).lower()
            ids: list[int] = []
            emails: list[str] = []
            for address in dict.fromkeys(a.lower() for a in _address_list(envelope, "cc")):
                if not _valid_address(address) or address in (requester, mailbox):
                    continue
                user_id = self._user_id(address)
                ids.append(user_id or 0)
                emails.append("" if user_id else address)
            if ids:
                fields["_users_id_observer"] = ids
                fields["_users_id_observer_notif"] = {"use_notification": [1] * len(ids), "alternative_email": emails}
        return fields

    def _ticket(
        self,
        envelope: dict[str, Any],
        state: MessageState,
        text: str,
        options: TicketOptions,
        key: str,
        closed: int | None = None,
    ) -> Outcome:
        if state.ticket_id is None and state.resumed:
            found = self.client.search("Ticket", [(21, "contains", marker_for(key))])
            if found:
                state.ticket_id = int(found[0]["2"])
                logger.info("glpi ticket found by marker ticket=%d (an earlier attempt created it)", state.ticket_id)
        if state.ticket_id is None:
            fields = {
                "name": mail_content.title_of(envelope.get("subject")),
                "content": text,
                "entities_id": options.entities_id,
                "requesttypes_id": options.requesttypes_id,
                "itilcategories_id": options.itilcategories_id,
                "urgency": options.urgency,
                "type": 1,  # incident, as GLPI's receiver
                **self._actors(envelope, options),
            }
            if closed is not None:
                # GLPI links the new ticket in the same create (Ticket::post_addItem): no second call to lose.
                fields["_linkedto"] = closed
            # Not saved here: a crash before the message is finished is resumed by the marker search above.
            state.ticket_id = self.client.create("Ticket", fields).id
        return Outcome("ticket", state.ticket_id)

    def _followup(self, state: MessageState, text: str, options: TicketOptions, key: str) -> Outcome:
        assert state.ticket_id is not None
        if state.followup_id is None and state.resumed:
            marker = marker_for(key)
            for row in self.client.sub_items("Ticket", state.ticket_id, "ITILFollowup"):
                if marker in str(row.get("content", "")):
                    state.followup_id = int(row["id"])
                    logger.info("glpi follow-up found by marker followup=%d", state.followup_id)
                    break
        if state.followup_id is None:
            fields = {
                "itemtype": "Ticket",
                "items_id": state.ticket_id,
                "content": text,
                "requesttypes_id": options.followup_requesttypes_id,
            }
            if options.reopen_on_reply:
                fields["add_reopen"] = 1  # a solved or waiting ticket goes back to New (or Assigned), as GLPI does
            state.followup_id = self.client.create("ITILFollowup", fields).id
        return Outcome("followup", state.ticket_id, state.followup_id)
