"""What the consumer remembers, in one Azure table: which message became which ticket, and who is handling what.

Three kinds of row, in one partition so that the rows of one step are written in one transaction:

- ``message-…``: keyed by SHA-256 of the raw bytes plus the Message-ID, so a message collected again under a new
  envelope id (after a UIDVALIDITY change) is the same row. It holds the claim (``claim``, ``claimed_until``),
  the status (``pending`` -> ``done`` or ``refused``, or ``failed`` with its ``reason``) and the GLPI ids, and
  is the only row whose writes are conditional (ETag): two invocations never both hold a message.
- ``envelope-…``: keyed by an envelope id whose ``message`` row names another envelope (the same mail collected
  again under a new id, or a failure recorded before any claim): the outcome with the GLPI ids. An envelope whose
  ``message`` row names it needs no row of its own: the operator's look-up finds that row by its ``envelope_id``.
- ``thread-…``: keyed by a Message-ID that became a ticket or follow-up, the ticket id: replies are threaded.

Row keys are hashes: envelope ids hold ``/`` and Message-IDs anything, which table keys may not. One partition
takes a few thousand writes a second, far above a helpdesk's mail. A message costs three single-row writes (four
with files): the claim, its thread row, the finish. No write is a transaction: on Azurite and in the SDK an
entity-group transaction costs about what three single writes cost (a multipart body built and parsed by the
email package), and nothing here needs one: the thread row may be written before the finish (it names a ticket
that exists), and only the ``message`` row carries the claim.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import AzureError, ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableClient, UpdateMode

from shared.errors import TransientError

logger = logging.getLogger(__name__)

CLAIM_SECONDS = 60  # a claim not renewed for this long is taken over: its invocation crashed or was killed
PENDING, DONE, REFUSED, FAILED = "pending", "done", "refused", "failed"
PARTITION = "glpi"


def _key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:48]


def message_key(sha256: str, message_id: str | None) -> str:
    return _key(f"{sha256.lower()}|{(message_id or '').strip()}")


@dataclass
class MessageState:
    """The ``message`` row; ``documents`` maps an attachment's index to its GLPI document id."""

    key: str
    envelope_id: str
    status: str = PENDING
    kind: str = ""
    ticket_id: int | None = None
    followup_id: int | None = None
    documents: dict[str, int] = field(default_factory=dict)
    linked: bool = False
    reason: str = ""
    attempts: int = 0
    resumed: bool = False  # an earlier attempt may have reached GLPI: look before creating
    claim: str = ""
    etag: str | None = None

    def entity(self) -> dict[str, Any]:
        return {
            "PartitionKey": PARTITION,
            "RowKey": f"message-{self.key}",
            "envelope_id": self.envelope_id,
            "status": self.status,
            "kind": self.kind,
            "ticket_id": self.ticket_id or 0,
            "followup_id": self.followup_id or 0,
            "documents": json.dumps(self.documents),
            "linked": self.linked,
            "reason": self.reason[:1000],
            "attempts": self.attempts,
            "claim": self.claim,
            "claimed_until": time.time() + CLAIM_SECONDS if self.claim else 0.0,
        }

    @classmethod
    def from_entity(cls, entity: Any) -> MessageState:
        return cls(
            key=str(entity["RowKey"]).removeprefix("message-"),
            envelope_id=str(entity.get("envelope_id", "")),
            status=str(entity.get("status", PENDING)),
            kind=str(entity.get("kind", "")),
            ticket_id=int(entity.get("ticket_id") or 0) or None,
            followup_id=int(entity.get("followup_id") or 0) or None,
            documents={str(k): int(v) for k, v in json.loads(entity.get("documents") or "{}").items()},
            linked=bool(entity.get("linked", False)),
            reason=str(entity.get("reason", "")),
            attempts=int(entity.get("attempts") or 0),
            claim=str(entity.get("claim", "")),
            etag=entity.metadata.get("etag") if hasattr(entity, "metadata") else None,
        )


class ClaimLost(TransientError):
    """Another invocation holds (or took over) this message: this one steps back and the queue retries later."""


def _transient(action: str, error: AzureError) -> TransientError:
    return TransientError(f"consumer state table unavailable while {action}: {type(error).__name__}")


def _envelope_entity(envelope_id: str, state: MessageState) -> dict[str, Any]:
    return {
        "PartitionKey": PARTITION,
        "RowKey": f"envelope-{_key(envelope_id)}",
        "envelope_id": envelope_id,
        "message_key": state.key,
        "status": state.status,
        "kind": state.kind,
        "ticket_id": state.ticket_id or 0,
        "followup_id": state.followup_id or 0,
        "reason": state.reason[:1000],
    }


def _thread_entity(message_id: str, ticket_id: int) -> dict[str, Any]:
    return {"PartitionKey": PARTITION, "RowKey": f"thread-{_key(message_id.strip().lower())}", "ticket_id": ticket_id}


class StateStore:
    """The table of one consumer. Every method raises TransientError when storage fails, ClaimLost on a race."""

    def __init__(self, table: TableClient) -> None:
        self._table = table

    def read(self, key: str) -> MessageState | None:
        try:
            return MessageState.from_entity(self._table.get_entity(PARTITION, f"message-{key}"))
        except ResourceNotFoundError:
            return None
        except AzureError as e:
            raise _transient("reading a message", e) from e

    def claim(self, key: str, envelope_id: str) -> MessageState:
        """Take the message for this invocation: a new row, or a pending/failed one whose claim has lapsed.

        Returns the state with ``resumed`` set when an earlier attempt existed. Raises ClaimLost while another
        invocation's claim is live; a done or refused message comes back as is (the caller drops it)."""
        token = secrets.token_hex(8)
        state = MessageState(key=key, envelope_id=envelope_id, claim=token, attempts=1)
        try:
            # One insert: the envelope row is written when the message is finished (a pending message is
            # visible in its message row, which names the envelope).
            state.etag = self._table.create_entity(state.entity()).get("etag")
            return state
        except ResourceExistsError:
            pass
        except AzureError as e:
            raise _transient("claiming a message", e) from e
        try:
            entity = self._table.get_entity(PARTITION, f"message-{key}")
        except AzureError as e:
            raise _transient("claiming a message", e) from e
        current = MessageState.from_entity(entity)
        if current.status in (DONE, REFUSED):
            return current
        if current.claim and float(entity.get("claimed_until") or 0) > time.time():
            raise ClaimLost(f"message {key[:12]} is being handled by another invocation")
        current.claim, current.resumed, current.status = token, True, PENDING
        current.attempts += 1
        self._write(current, "taking over a message")
        return current

    def save(self, state: MessageState) -> None:
        """Write the row if this invocation still holds it (renewing the claim). Raises ClaimLost otherwise."""
        self._write(state, "saving progress")

    def finish(self, state: MessageState, status: str, *, reason: str = "") -> None:
        """The message's final status, written if this invocation still holds it. Raises ClaimLost otherwise."""
        state.status = status
        state.reason = reason or (state.reason if status == FAILED else "")
        state.claim = ""
        self._write(state, "finishing a message")

    def record_thread(self, message_id: str, ticket_id: int) -> None:
        """Replies naming ``message_id`` belong to ``ticket_id`` (unconditional: written before the finish, it
        names a ticket that exists whatever happens next)."""
        try:
            self._table.upsert_entity(_thread_entity(message_id, ticket_id), mode=UpdateMode.REPLACE)
        except AzureError as e:
            raise _transient("recording a thread", e) from e

    def release(self, state: MessageState) -> None:
        """Drop this invocation's claim after a failure (best effort: a claim left behind lapses by itself)."""
        state.claim = ""
        try:
            self._write(state, "releasing a message")
        except TransientError as e:
            logger.warning("glpi claim not released message=%s error=%s", state.key[:12], e)

    def _write(self, state: MessageState, action: str) -> None:
        try:
            metadata = self._table.update_entity(
                state.entity(), mode=UpdateMode.REPLACE, etag=state.etag, match_condition=MatchConditions.IfNotModified
            )
        except (ResourceModifiedError, ResourceNotFoundError) as e:
            raise ClaimLost(f"message {state.key[:12]} was taken over by another invocation") from e
        except AzureError as e:
            raise _transient(action, e) from e
        state.etag = metadata.get("etag")

    def record_envelope(self, envelope_id: str, state: MessageState) -> None:
        """The operator's view by envelope id, for a duplicate or a failure (unconditional: a mirror)."""
        try:
            self._table.upsert_entity(_envelope_entity(envelope_id, state), mode=UpdateMode.REPLACE)
        except AzureError as e:
            raise _transient("recording an envelope", e) from e

    def envelope(self, envelope_id: str) -> dict[str, Any] | None:
        """What became of one envelope: its own row, else the ``message`` row that names it (a query over the
        partition: an operator's look-up, never on the message path)."""
        try:
            return dict(self._table.get_entity(PARTITION, f"envelope-{_key(envelope_id)}"))
        except ResourceNotFoundError:
            pass
        except AzureError as e:
            raise _transient("reading an envelope", e) from e
        try:
            rows = self._table.query_entities(
                "PartitionKey eq @partition and envelope_id eq @envelope",
                parameters={"partition": PARTITION, "envelope": envelope_id},
            )
            for row in rows:
                if str(row["RowKey"]).startswith("message-"):
                    return {**dict(row), "message_key": str(row["RowKey"]).removeprefix("message-")}
        except AzureError as e:
            raise _transient("reading an envelope", e) from e
        return None

    def thread_ticket(self, message_ids: list[str]) -> int | None:
        """The ticket of the first of ``message_ids`` that became a ticket or follow-up here."""
        for message_id in message_ids:
            try:
                entity = self._table.get_entity(PARTITION, _thread_entity(message_id, 0)["RowKey"])
            except ResourceNotFoundError:
                continue
            except AzureError as e:
                raise _transient("reading a thread", e) from e
            return int(entity["ticket_id"])
        return None

    def release_failed(self) -> int:
        """Make every failed message claimable again (before a poison-queue replay). Returns how many."""
        count = 0
        query = f"PartitionKey eq '{PARTITION}' and status eq 'failed'"
        try:
            for entity in self._table.query_entities(query):
                if not str(entity["RowKey"]).startswith("message-"):
                    continue
                state = MessageState.from_entity(entity)
                state.status, state.claim, state.attempts = PENDING, "", 0
                self._write(state, "releasing a failed message")
                count += 1
        except AzureError as e:
            raise _transient("releasing failed messages", e) from e
        return count
