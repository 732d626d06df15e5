"""The mailbox registry: one Table storage row per authorized mailbox, with its settings, checkpoint and status.

A row is written only after the mailbox's token cache is in Key Vault, so a row never points to a missing
secret. The checkpoint (UIDVALIDITY, last UID) lives in the same row and only moves forward after the messages up
to it are on the queue and the after-action is done.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from azure.core.exceptions import AzureError, ResourceNotFoundError
from azure.data.tables import TableClient, TableTransactionError, UpdateMode

from shared.after_action import AfterAction, Step
from shared.after_action import plan as plan_after_action
from shared.after_action import validate as validate_after_action
from shared.errors import NotFoundError, TransientError
from shared.folders import check_folder, check_stored_folder, same_folder
from shared.mailboxes import legacy_mailbox_key, mailbox_key

logger = logging.getLogger(__name__)

PARTITION = "mailbox"


class MailboxStatus(StrEnum):
    ACTIVE = "active"  # collected by every run
    NEEDS_RECONSENT = "needs_reconsent"  # the grant is gone: not collected until an admin authorizes it again
    DISABLED = "disabled"  # kept, not collected
    PAUSED = "paused"  # kept, not collected, its refresh token renewed weekly so that a resume needs no re-consent


class MailboxMode(StrEnum):
    """How the collector logs in to a mailbox."""

    DELEGATED = "delegated"  # as the account that signed in at consent, with its refresh token from Key Vault
    APP = "app"  # as the app itself (client credentials, IMAP.AccessAsApp): no sign-in and no token per mailbox


DEFAULT_FOLDER = "INBOX"
DEFAULT_MAX_MESSAGES = 500
DEFAULT_MAX_BYTES = 200 * 1024 * 1024  # per mailbox and run; at least one message is always taken
# max_message_bytes: 0 is no limit; Exchange Online's own ceiling is 150 MB.
NUMERIC_RANGES = {"max_messages": (1, 100_000), "max_bytes": (1, 10 * 1024**3), "max_message_bytes": (0, 2**31 - 1)}
OVERSIZE_POLICIES = ("collect", "headers")  # above max_message_bytes: collect anyway, or queue the headers only
# Plain ASCII digits, no sign: int() would also take "1_000", " 12", Arabic-Indic digits and 5,000-digit numbers
# (with an error about sys.set_int_max_str_digits).
_DIGITS = re.compile(r"[0-9]{1,15}")


def _whole_number(name: str, value: Any) -> int:
    """A JSON integer or text of ASCII digits within the option's range; anything else is refused in plain words."""
    low, high = NUMERIC_RANGES[name]
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _DIGITS.fullmatch(value):
        number = int(value)
    if number is None or not low <= number <= high:
        raise ValueError(f"{name} must be a whole number between {low} and {high} (digits only, no decimals)")
    return number


@dataclass(frozen=True)
class MailboxOptions:
    """What an admin chooses per mailbox: where to read, what to do with collected mail, and per-run caps."""

    folder: str = DEFAULT_FOLDER
    after_action: AfterAction = AfterAction.SEEN
    move_to: str = ""
    refuse_to: str = ""  # with "move": auto-replies, bounces and loops go here instead (GLPI's refused folder)
    max_messages: int = DEFAULT_MAX_MESSAGES
    max_bytes: int = DEFAULT_MAX_BYTES
    max_message_bytes: int = 0  # per message; 0: no limit
    oversize: str = "collect"  # above max_message_bytes: "collect" anyway, or "headers" (an envelope marked oversize)

    def __post_init__(self) -> None:
        # Options come from admins' input and from stored rows: the after-action policy checks its own fields.
        kind = validate_after_action(self.after_action, move_to=self.move_to, refuse_to=self.refuse_to)
        object.__setattr__(self, "after_action", kind)
        if not self.folder:
            raise ValueError("folder must be a plain folder name")
        check_stored_folder(self.folder, "folder")
        if self.oversize not in OVERSIZE_POLICIES:
            raise ValueError(f"oversize must be one of {', '.join(OVERSIZE_POLICIES)}")
        for name, (low, high) in NUMERIC_RANGES.items():
            if not low <= getattr(self, name) <= high:
                raise ValueError(f"{name} must be a whole number between {low} and {high}")

    def check_input(self) -> MailboxOptions:
        """The stricter rules for what an admin sends (rows written before them still load). Raises ValueError."""
        check_folder(self.folder, "folder")
        for name in ("move_to", "refuse_to"):
            value = getattr(self, name)
            if value:
                check_folder(value, name)
                if same_folder(value, self.folder):
                    # Each run would move the mail back into the collected folder under new UIDs and queue it
                    # again: a new ticket per message and run, with nothing failing.
                    raise ValueError(f"{name} {value!r} is the collected folder {self.folder!r}: choose another folder")
        return self

    def after_steps(self, stored: Sequence[int], refused: Collection[int]) -> list[Step]:
        """The after-action steps for messages that are stored and queued (see ``shared.after_action.plan``)."""
        return plan_after_action(
            stored, refused, action=self.after_action, move_to=self.move_to, refuse_to=self.refuse_to
        )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], base: MailboxOptions | None = None) -> MailboxOptions:
        """Options from user input (JSON or query), on top of ``base``. Raises ValueError naming the bad field."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown option(s): {', '.join(unknown)}")
        values = dataclasses.asdict(base or cls())
        for name, value in data.items():
            if name in NUMERIC_RANGES:
                values[name] = _whole_number(name, value)
            elif isinstance(value, str):
                values[name] = value.strip(" ")
            else:
                raise ValueError(f"{name} must be text")
        return cls(**values).check_input()


@dataclass(frozen=True)
class Mailbox:
    address: str
    status: MailboxStatus = MailboxStatus.ACTIVE
    options: MailboxOptions = MailboxOptions()
    signed_in_as: str = ""
    consented_by: str = ""
    consented_at: datetime | None = None
    uidvalidity: int = 0
    last_uid: int = 0
    last_run_at: datetime | None = None
    last_success_at: datetime | None = None
    last_error_class: str = ""
    last_error: str = ""
    consecutive_failures: int = 0
    token_saved_at: datetime | None = None
    token_secret: str = ""  # the Key Vault secret that holds the token cache ("": the mailbox's key)
    retry_after: datetime | None = None
    collected_total: int = 0
    mode: MailboxMode = MailboxMode.DELEGATED
    tenant_id: str = ""  # app mode: the mailbox's Entra tenant; empty is the deployment's (ENTRA_TENANT_ID)
    collected_today: int = 0  # messages collected on collected_day (UTC), for the status page
    collected_day: str = ""
    reconsent_reported_at: datetime | None = None  # the last daily "still needs re-consent" line
    last_oversize: str = ""  # the last message above the mailbox's size limit, and what was done with it
    folder_checkpoints: str = ""  # JSON, see shared.checkpoints
    pending_after_action: str = ""  # JSON, see shared.checkpoints
    # Messages Exchange served as a placeholder (it could not convert them to MIME): left in the mailbox, listed
    # here until they are gone from the folder. Stored as "1,5,9" (a table has no list type).
    placeholder_uids: tuple[int, ...] = ()
    # Fan-out: the last work item sent for this mailbox (its ``enqueued_at`` text), when the queue drops it unless taken
    # (its time to live), and the last item whose collection ended. See ``work_item_outstanding``.
    work_item: str = ""
    work_item_expires_at: datetime | None = None
    work_item_done: str = ""

    def __post_init__(self) -> None:
        # A stored row holds plain text.
        object.__setattr__(self, "status", MailboxStatus(self.status))
        object.__setattr__(self, "mode", MailboxMode(self.mode))
        uids = self.placeholder_uids
        if isinstance(uids, str):
            object.__setattr__(self, "placeholder_uids", tuple(int(u) for u in uids.split(",") if u.strip()))

    @property
    def key(self) -> str:
        return mailbox_key(self.address)

    def work_item_outstanding(self, now: datetime) -> bool:
        """Whether a work item for this mailbox is still waiting on the queue or being collected: sent, its collection
        not ended, and its time to live not over (after that the queue has dropped it, taken or not)."""
        expires = self.work_item_expires_at
        return bool(self.work_item) and self.work_item != self.work_item_done and expires is not None and now < expires

    def to_public(self) -> dict[str, Any]:
        """A JSON-ready view for admins (no secrets are held in the row in the first place)."""
        data = dataclasses.asdict(self)
        for name, value in data.items():
            if isinstance(value, datetime):
                data[name] = value.isoformat()
        return data


_OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(MailboxOptions))
_ROW_FIELDS = tuple(f.name for f in dataclasses.fields(Mailbox) if f.name != "options")
_COLUMNS = frozenset(_ROW_FIELDS) | {f"opt_{name}" for name in _OPTION_FIELDS}
# The columns a mail source keeps its position in (its checkpoint, opaque to the collector). IMAP: the collected
# folder's UIDVALIDITY and last UID finished, and the same per folder (shared.checkpoints). A new source adds its own.
CHECKPOINT_COLUMNS = frozenset({"uidvalidity", "last_uid", "folder_checkpoints"})
MAX_ERROR_CHARS = 1000  # of last_error: the message and its remedy, not a traceback
TRANSACTION_ROWS = 100  # Table storage's limit of operations in one transaction (batch)
# After a connection lost before the answer (ServiceResponseError) azure-core retries only GET, PUT, DELETE and the
# like. The registry's merges, and its transactions of merges (POST), write the same values when repeated: the SDK
# may retry them too. At 2,000 mailboxes a run otherwise failed now and then when Azurite closed a kept-alive
# connection as it was reused.
_RETRY_MERGES: dict[str, Any] = {
    "retry_on_methods": frozenset({"HEAD", "GET", "PUT", "DELETE", "OPTIONS", "TRACE", "PATCH", "MERGE", "POST"})
}


def _uid_list(uids: Sequence[int]) -> str:
    return ",".join(str(int(uid)) for uid in uids)


def _to_entity(mailbox: Mailbox) -> dict[str, Any]:
    entity: dict[str, Any] = {"PartitionKey": PARTITION, "RowKey": mailbox.key}
    for name in _ROW_FIELDS:
        value = getattr(mailbox, name)
        if value is not None:
            entity[name] = value
    entity["placeholder_uids"] = _uid_list(mailbox.placeholder_uids)
    for name in _OPTION_FIELDS:
        entity[f"opt_{name}"] = getattr(mailbox.options, name)
    # Table storage has 64-bit integers only as a typed value; Python ints above 2**31 need it.
    entity["opt_max_bytes"] = (entity["opt_max_bytes"], "Edm.Int64")
    return entity


def _from_entity(entity: Mapping[str, Any]) -> Mailbox:
    options = {name: entity[f"opt_{name}"] for name in _OPTION_FIELDS if f"opt_{name}" in entity}
    if "max_bytes" in options:
        options["max_bytes"] = int(getattr(options["max_bytes"], "value", options["max_bytes"]))
    values = {name: entity[name] for name in _ROW_FIELDS if name in entity}
    for name, value in values.items():
        values[name] = getattr(value, "value", value)  # EntityProperty for Int64
    return Mailbox(options=MailboxOptions(**options), **values)


class MailboxRegistry:
    """CRUD over the registry table. Storage failures become TransientError (nothing was changed or lost)."""

    def __init__(self, table: TableClient) -> None:
        self._table = table

    def get(self, address: str) -> Mailbox:
        """Raises NotFoundError when the mailbox is not registered.

        A row is only ever the mailbox's if its stored address is the one asked for. A row under the key of older
        releases is moved to the current key on first read.
        """
        for key in (mailbox_key(address), legacy_mailbox_key(address)):
            try:
                entity = self._call(self._table.get_entity, PARTITION, key)
            except ResourceNotFoundError:
                continue
            if str(entity.get("address", "")).lower() != address.lower():
                logger.error("registry row holds another address key=%s mailbox=%s", key, address)
                raise NotFoundError(address)
            if key != mailbox_key(address):
                self._migrate(entity)
            return _from_entity(entity)
        raise NotFoundError(address)

    def find(self, address: str) -> Mailbox | None:
        try:
            return self.get(address)
        except NotFoundError:
            return None

    def list(self) -> list[Mailbox]:
        return list(self._iter())

    def _iter(self) -> Iterator[Mailbox]:
        query = f"PartitionKey eq '{PARTITION}'"
        for entity in self._call(lambda: list(self._table.query_entities(query))):
            address = str(entity.get("address", ""))
            if entity["RowKey"] == mailbox_key(address):
                yield _from_entity(entity)
            elif entity["RowKey"] == legacy_mailbox_key(address):
                self._migrate(entity)
                yield _from_entity(entity)
            else:
                logger.error("registry row holds another address key=%s mailbox=%s", entity["RowKey"], address)

    def _migrate(self, entity: Mapping[str, Any]) -> None:
        """Move a row from the key of older releases to the current one (the old key holds the address)."""
        mailbox = _from_entity(entity)
        self._call(self._table.upsert_entity, _to_entity(mailbox), mode=UpdateMode.REPLACE)
        self._call(self._table.delete_entity, PARTITION, str(entity["RowKey"]))
        logger.info("registry row moved to its digest key mailbox=%s", mailbox.address)

    def put(self, mailbox: Mailbox) -> None:
        """Create or fully replace a row."""
        self._call(self._table.upsert_entity, _to_entity(mailbox), mode=UpdateMode.REPLACE)

    # Named updates: each writes the fields of one event and nothing else. All raise NotFoundError when the row is
    # gone (the mailbox was revoked meanwhile) and TransientError when storage fails.

    def record_token_saved(self, address: str, saved_at: datetime, secret: str = "") -> None:
        """A renewed token cache reached Key Vault at ``saved_at`` (the token age an admin watches), in the secret
        named ``secret`` (it changes when the token moves to a new secret before the version cap)."""
        self._merge(address, token_saved_at=saved_at, **({"token_secret": secret} if secret else {}))

    def record_checkpoint(
        self, address: str, checkpoint: Mapping[str, int | str], *, pending_after_action: str | None = None
    ) -> None:
        """The messages before ``checkpoint`` (a mail source's position, see ``CHECKPOINT_COLUMNS``) are stored,
        queued and their after-action done, or owed (``pending_after_action``): they are never collected again."""
        fields: dict[str, Any] = _checkpoint_fields(checkpoint)
        if pending_after_action is not None:
            fields["pending_after_action"] = pending_after_action
        self._merge(address, **fields)

    def record_pending_after_action(self, address: str, pending: str) -> None:
        """The after-action still owed to queued mail (empty text: none)."""
        self._merge(address, pending_after_action=pending)

    def record_success(
        self,
        address: str,
        *,
        checkpoint: Mapping[str, int | str] | None = None,
        collected_total: int | None = None,
        collected_today: int = 0,
        placeholders: Sequence[int] | None = None,
        work_item: str = "",
    ) -> None:
        """A run ended well, in one write: the failure status cleared and the time of the success; with the run's
        outcome where it changed something: the final ``checkpoint``, ``collected_total`` with ``collected_today`` (the
        status page's count for this UTC day), the messages Exchange serves as ``placeholders`` now (empty: none any
        more), and ``work_item``, the work item whose collection this was (the fan-out may send the next one)."""
        now = utcnow()
        fields: dict[str, Any] = {
            "last_run_at": now,
            "last_success_at": now,
            "last_error_class": "",
            "last_error": "",
            "consecutive_failures": 0,
        }
        if checkpoint is not None:
            fields.update(_checkpoint_fields(checkpoint))
        if collected_total is not None:
            fields.update(
                collected_total=collected_total, collected_today=collected_today, collected_day=now.date().isoformat()
            )
        if placeholders is not None:
            fields["placeholder_uids"] = _uid_list(sorted(set(placeholders)))
        if work_item:
            fields["work_item_done"] = work_item
        self._merge(address, **fields)

    def record_work_items(self, sent: Sequence[tuple[str, str, datetime]]) -> int:
        """Work items ``(address, item, expires_at)`` are on the fan-out queue. Written as table transactions of up to
        TRANSACTION_ROWS rows (every row is in one partition), so 2,000 mailboxes cost 20 calls, not 2,000. A row gone
        meanwhile (the mailbox was revoked) is skipped, never created again. Returns how many rows were written."""
        written = 0
        for start in range(0, len(sent), TRANSACTION_ROWS):
            chunk = sent[start : start + TRANSACTION_ROWS]
            entities = [
                {
                    "PartitionKey": PARTITION,
                    "RowKey": mailbox_key(address),
                    "work_item": item,
                    "work_item_expires_at": expires_at,
                }
                for address, item, expires_at in chunk
            ]
            if self._call(self._merge_all, entities):
                written += len(chunk)
                continue
            # A row of the chunk is gone, and a transaction is all or nothing: row by row instead.
            for address, item, expires_at in chunk:
                try:
                    self._merge(address, work_item=item, work_item_expires_at=expires_at)
                    written += 1
                except NotFoundError:
                    logger.info("work item sent for a mailbox revoked meanwhile mailbox=%s", address)
        return written

    def set_status(self, address: str, status: MailboxStatus) -> None:
        """An admin paused or resumed the mailbox; a resume starts its failure count anew."""
        fields: dict[str, Any] = {"status": MailboxStatus(status).value}
        if status is MailboxStatus.ACTIVE:
            fields["consecutive_failures"] = 0
        self._merge(address, **fields)

    def record_reported(self, address: str, reported_at: datetime) -> None:
        """The daily line about this mailbox (re-consent needed, token expiring) was written at ``reported_at``."""
        self._merge(address, reconsent_reported_at=reported_at)

    def record_oversize(self, address: str, note: str) -> None:
        """A message above the mailbox's size limit was met; ``note`` says which and what was done (status page)."""
        self._merge(address, last_oversize=note[:MAX_ERROR_CHARS])

    def record_failure(
        self,
        address: str,
        *,
        error_class: str,
        error: str,
        consecutive_failures: int,
        needs_reconsent: bool = False,
        retry_after: datetime | None = None,
        work_item: str = "",
    ) -> None:
        """A run failed: what and how often; ``needs_reconsent`` stops collection until the next consent;
        ``retry_after`` skips the mailbox until then (throttling); ``work_item``: the work item whose collection
        this was (the fan-out may send the next one)."""
        fields: dict[str, Any] = {
            "last_run_at": utcnow(),
            "last_error_class": str(error_class),
            "last_error": error[:MAX_ERROR_CHARS],
            "consecutive_failures": consecutive_failures,
        }
        if needs_reconsent:
            fields["status"] = MailboxStatus.NEEDS_RECONSENT.value
        if retry_after is not None:
            fields["retry_after"] = retry_after
        if work_item:
            fields["work_item_done"] = work_item
        self._merge(address, **fields)

    def set_options(self, address: str, options: MailboxOptions) -> None:
        """Replace the mailbox's options (folder, after-action, caps)."""
        entity = _to_entity(Mailbox(address=address, options=options))
        self._merge(address, **{k: v for k, v in entity.items() if k.startswith("opt_")})

    def _merge(self, address: str, **fields: Any) -> None:
        unknown = set(fields) - _COLUMNS
        if unknown:  # a misspelled field would be written as a new column, silently
            raise ValueError(f"not registry columns: {', '.join(sorted(unknown))}")
        entity: dict[str, Any] = {"PartitionKey": PARTITION, "RowKey": mailbox_key(address), **fields}
        try:
            self._call(self._table.update_entity, entity, mode=UpdateMode.MERGE, **_RETRY_MERGES)
        except ResourceNotFoundError:
            raise NotFoundError(address) from None

    def _merge_all(self, entities: Sequence[Mapping[str, Any]]) -> bool:
        """Merge ``entities`` in one transaction; False (nothing written) when one of their rows does not exist."""
        try:
            self._table.submit_transaction(
                [("update", e, {"mode": UpdateMode.MERGE}) for e in entities], **_RETRY_MERGES
            )
        except TableTransactionError as e:
            if e.status_code == 404:
                return False
            raise
        return True

    def delete(self, address: str) -> None:
        """Succeeds when the row is already absent (under the current key and that of older releases)."""
        for key in (mailbox_key(address), legacy_mailbox_key(address)):
            self._call(self._table.delete_entity, PARTITION, key)

    @staticmethod
    def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ResourceNotFoundError:
            raise
        except AzureError as e:
            raise TransientError(
                f"mailbox registry (Table storage) unavailable: {type(e).__name__}",
                remedy="check the storage account and the app identity's Storage Table Data Contributor role; "
                "the next run retries",
            ) from e


def _checkpoint_fields(checkpoint: Mapping[str, int | str]) -> dict[str, int | str]:
    unknown = set(checkpoint) - CHECKPOINT_COLUMNS
    if unknown or not checkpoint:  # a checkpoint must never write the status or the options
        raise ValueError(f"not checkpoint columns: {', '.join(sorted(unknown)) or '(none given)'}")
    return dict(checkpoint)


def utcnow() -> datetime:
    return datetime.now(UTC)
