"""A collection run: every active mailbox, concurrently within a bound, each under its lease.

Per mailbox, in this order and never otherwise (DESIGN.md, "Nothing lost"):
raw bytes -> blob; envelope -> queue; after-action on the server; checkpoint in the registry.
A crash anywhere leaves the checkpoint behind the messages not yet finished, so the next run collects them again
(at least once; a duplicate envelope carries the same ``id``).

Messages are fetched in batches; while one batch is written to storage the next one is being fetched, so the
IMAP round trips and the storage writes overlap. A large message is never held whole: its bytes go from the socket
into blob blocks as they arrive (``RawStore.open``), the blob is committed once the last byte is in, and only then
is its envelope queued. Mail in hand is bounded per worker by a memory budget its mailboxes share
(``collectors.memory_budget``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from collectors.app_tokens import AppTokenProvider, exchange_refusal
from collectors.envelope import build_envelope, encode_for_queue
from collectors.envelope.classification import placeholder, refused
from collectors.imap_session import STREAM_CHUNK
from collectors.mail_source import Checkpoint, MailFolder, MailSource
from collectors.memory_budget import MemoryBudget, Reservation
from collectors.sinks import BLOCK_BYTES, BLOCKS_IN_FLIGHT, EnvelopeQueue, RawStore, RawWriter
from collectors.tokens import AccessToken, TokenProvider
from shared.checkpoints import PendingAfterAction
from shared.errors import (
    AfterActionError,
    CollectorError,
    ConfigurationError,
    MailboxAccessError,
    NeedsReconsentError,
    NotFoundError,
    RunOutcome,
    TransientError,
)
from shared.folders import same_folder
from shared.invocation_logs import carried
from shared.lease import Lease, Leases
from shared.mailboxes import mailbox_key
from shared.registry import (
    CHECKPOINT_COLUMNS,
    TRANSACTION_ROWS,
    Mailbox,
    MailboxMode,
    MailboxRegistry,
    MailboxStatus,
    utcnow,
)
from shared.settings import Settings

if TYPE_CHECKING:  # imported with the first streamed message, so that importing the app stays cheap
    from collectors.envelope.stream import EnvelopeStream

logger = logging.getLogger(__name__)

BATCH_MESSAGES = 50  # UIDs per FETCH: a few round trips per hundred messages, modest memory
BATCH_BYTES = 16 * 1024 * 1024  # and at most this much mail per FETCH (one larger message goes alone)
# One instance collects up to this many times COLLECT_MAX_CONCURRENCY mailboxes in a run; above that the timer fans
# out one work item per mailbox and queue-triggered instances collect them in parallel.
FANOUT_FACTOR = 4
# Seconds a work item lives on the queue (its time to live). The queue deletes it then, whether it waits or is hidden
# because an instance took it (Azure Queue Storage: Get Messages may hide a message past its expiry time, and it is
# deleted at its expiry all the same). The Functions host hides a taken item for 10 minutes, renewed while the function
# runs; if the instance dies, the item would come back after those 10 minutes, but its time to live is over by then,
# so it never comes back. The fan-out sends no second item for a mailbox while one is outstanding
# (``Mailbox.work_item_outstanding``): a lost item -- expired untaken, or taken by an instance that died -- is replaced
# at the first tick after this time to live, when the dead run's lease (60 s) has long lapsed.
WORK_ITEM_TTL = 600
# Concurrent work-item sends (2,000 one by one cost 2,000 storage round trips in a row). A send costs about 3-4 ms of
# CPU in the SDK, so a few threads already keep the planner's core busy; more would only add contention.
FANOUT_THREADS = 8
STORE_THREADS = 8  # concurrent blob uploads, shared by the mailboxes of a worker
# A message of this size or more is streamed from the socket into blob blocks, alone in its batch; smaller ones are
# fetched whole in batches. Held whole, a message costs about twice its size (its bytes, and the envelope parser's
# copies) and many share one FETCH round trip (2,000 x 20 KB go 50 at a time); streamed, it costs its working set
# below, whatever its size. The two meet at about 8 MiB: above it streaming holds less, below it batching does.
STREAM_ABOVE = 8 * 1024 * 1024
BATCH_COST = 2  # bytes reserved per byte of a batch held whole: the bytes as read, and the envelope parser's copies
# A streamed message's memory: the block being filled and its joined copy, the blocks being staged, the chunk read
# from the socket, the chunks the envelope walk lags behind, and the envelope's skeleton with the parser's tree of it
# (twice collectors.envelope.stream.SKELETON_BYTES, a unit test keeps them in step: a bound, not a measure).
FEED_AHEAD = 4  # chunks of STREAM_CHUNK
ENVELOPE_WALK_BYTES = 8 * 1024 * 1024
STREAM_WORKING_SET = (BLOCKS_IN_FLIGHT + 2) * BLOCK_BYTES + (FEED_AHEAD + 1) * STREAM_CHUNK + ENVELOPE_WALK_BYTES
# A run that changes nothing (no mail, no error to clear, no work item to mark done) writes its success to the registry
# only when the last one recorded is this old: an empty mailbox costs a registry write every third 5-minute run, not
# every run. The status page's "last success" is this much behind at most; the stale report waits an hour.
SUCCESS_RECORD_EVERY = timedelta(minutes=15)


@dataclass
class MailboxResult:
    address: str
    outcome: RunOutcome = RunOutcome.OK
    messages: int = 0
    bytes: int = 0
    duration: float = 0.0
    error: str = ""
    more: bool = False  # caps or the time budget left mail for the next run
    max_delay: float | None = None  # seconds from a message's Date header to its envelope on the queue, the longest
    placeholders: list[int] = field(default_factory=list)  # UIDs Exchange served as placeholders in this run
    asked: bool = False  # an admin asked for this run (the status page's "collect now")

    def log(self, consecutive_failures: int) -> None:
        level = logging.WARNING if self.outcome.failed else logging.INFO
        logger.log(
            level,
            "collect mailbox=%s outcome=%s messages=%d bytes=%d duration_ms=%d more=%s consecutive_failures=%d%s%s",
            self.address,
            self.outcome.value,
            self.messages,
            self.bytes,
            int(self.duration * 1000),
            str(self.more).lower(),
            consecutive_failures,
            f" max_delay_s={int(self.max_delay)}" if self.max_delay is not None else "",
            f" error={self.error}" if self.error else "",
        )


@dataclass(frozen=True)
class Sinks:
    """Where collected mail goes: raw bytes to a store, envelopes to a queue (see ``collectors.sinks``)."""

    raw: RawStore
    envelopes: EnvelopeQueue


class WorkQueue(Protocol):
    """The fan-out queue of work items (an Azure Storage ``QueueClient``)."""

    @property
    def queue_name(self) -> str: ...

    def send_message(self, content: Any, **kwargs: Any) -> Any: ...


def _sent_at(date: object) -> datetime | None:
    """The envelope's ``date`` (ISO 8601 from the Date header) as an aware datetime, or None when it has none."""
    try:
        sent = datetime.fromisoformat(str(date)) if date else None
    except ValueError:
        return None
    return sent if sent is None or sent.tzinfo is not None else sent.replace(tzinfo=UTC)


def collected_today(mailbox: Mailbox, messages: int) -> int:
    """The status page's "collected today" counter after ``messages`` more, restarted each UTC day."""
    before = mailbox.collected_today if mailbox.collected_day == utcnow().date().isoformat() else 0
    return before + messages


class _Blob(Protocol):
    """Where a message's raw bytes are: a ``BlobClient``, or its name and URL in a raw store."""

    @property
    def url(self) -> str: ...

    @property
    def blob_name(self) -> str: ...


@dataclass(frozen=True)
class StoredBlob:
    url: str
    blob_name: str


def envelope_of(
    mailbox: Mailbox, uidvalidity: int, uid: int, blob: _Blob, raw: bytes | EnvelopeStream, *, collected_at: datetime
) -> dict[str, Any]:
    """The envelope of one stored message: the same for a collection and a replay of its blob. ``raw`` is its
    bytes, or the stream they went through."""
    build = functools.partial(build_envelope, raw) if isinstance(raw, bytes) else raw.envelope
    return build(
        mailbox=mailbox.address,
        folder=mailbox.options.folder,
        uidvalidity=uidvalidity,
        uid=uid,
        blob_url=blob.url,
        blob_name=blob.blob_name,
        collected_at=collected_at,
    )


def blob_name(mailbox_key: str, uidvalidity: int, uid: int) -> str:
    """Derived from the message's identity only, so a retried upload overwrites the same blob with the same bytes."""
    return f"{mailbox_key}/{uidvalidity}/{uid:010d}.eml"


class _Streamed:
    """One message on its way from the socket: each chunk goes to its blob writer, and to its envelope stream on a
    thread of its own, so that the MIME walk (Python, about as slow as the link) does not pace the socket reads and
    the block uploads. The walk lags behind the socket by at most FEED_AHEAD chunks."""

    def __init__(self, writer: RawWriter, pool: ThreadPoolExecutor) -> None:
        self.writer = writer
        from collectors.envelope.stream import EnvelopeStream

        self.envelope = EnvelopeStream()
        self._chunks: queue.Queue[bytes | None] = queue.Queue(FEED_AHEAD)
        self._ended = False
        self._stopped = False
        self._walk = pool.submit(carried(self._feed))

    def _feed(self) -> None:
        error: BaseException | None = None
        while (chunk := self._chunks.get()) is not None:  # always read to the end: the writer must never block
            if error is None and not self._stopped:
                try:
                    self.envelope.feed(chunk)
                except BaseException as e:  # a defect in the walk: reported with the envelope, not as a hang
                    error = e
        if error is not None:
            raise error

    def write(self, chunk: bytes) -> None:
        self.writer.write(chunk)
        self._chunks.put(chunk)

    def end(self) -> None:
        """No more bytes: the walk finishes what it has."""
        if not self._ended:
            self._ended = True
            self._chunks.put(None)

    def walked(self) -> EnvelopeStream:
        """The envelope stream once every byte written has been walked."""
        self.end()
        self._walk.result()
        return self.envelope

    def abort(self) -> None:
        """Give up the message: nothing committed, the walk stopped."""
        self.writer.abort()
        self._stopped = True
        if not self._ended:
            with contextlib.suppress(queue.Empty):
                while True:
                    self._chunks.get_nowait()
            self.end()

    def commit(self) -> None:
        try:
            self.writer.commit()
        except BaseException:
            self.writer.abort()
            raise


@dataclass
class _Batch:
    uids: list[int]
    messages: dict[int, bytes] = field(default_factory=dict)
    reservation: Reservation | None = None  # its share of the worker's memory budget, released once it is stored
    stream: _Streamed | None = None  # the one message of a streamed batch, when the server still had it

    def size_of(self, uid: int) -> int:
        return self.stream.walked().size if self.stream is not None else len(self.messages[uid])

    def release(self) -> None:
        if self.reservation is not None:
            self.reservation.release()


@dataclass(frozen=True)
class Enqueued:
    """A batch's storage outcome: every message in ``stored`` has its blob and its envelope on the queue (in this
    order); ``refused`` are those the refuse rule applies to (auto-replies, bounces, loops)."""

    stored: tuple[int, ...]
    refused: frozenset[int]
    max_delay: float | None = None  # seconds from the Date header to the queue, the longest of the batch
    placeholders: frozenset[int] = frozenset()  # stored, but left in place: no after-action (see _envelope)


class Collector:
    """Collects mailboxes from ``source`` into ``sinks``. Thread-safe; share one per worker so that the token
    providers' warm caches are reused. Every part it talks to is a seam (``collectors.services`` wires the real
    ones; unit tests pass in-memory fakes)."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: MailboxRegistry,
        tokens: TokenProvider,
        source: MailSource,
        sinks: Sinks,
        leases: Leases,
        app_tokens: AppTokenProvider | None = None,
        clock: Callable[[], float] = time.monotonic,
        memory_budget: MemoryBudget | None = None,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._tokens = tokens
        self._app_tokens = app_tokens or AppTokenProvider(settings)
        self._source = source
        self._sinks = sinks
        self._leases = leases
        self._clock = clock
        self._store_pool = ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="store")
        self._enqueue_pool = ThreadPoolExecutor(settings.max_concurrency, thread_name_prefix="enqueue")
        self._budget = memory_budget or MemoryBudget(settings.memory_budget_mb * 1024 * 1024)
        # One MIME walk per mailbox streaming at once (a mailbox streams one message at a time).
        self._walk_pool = ThreadPoolExecutor(settings.max_concurrency, thread_name_prefix="walk")

    # -- the run --------------------------------------------------------------------------------------------

    def due_mailboxes(self, mailboxes: list[Mailbox] | None = None) -> list[Mailbox]:
        """Active mailboxes whose throttling backoff, if any, has passed, of ``mailboxes`` (default: the registry's)."""
        now = utcnow()
        return [
            m
            for m in (self._registry.list() if mailboxes is None else mailboxes)
            if m.status is MailboxStatus.ACTIVE and (m.retry_after is None or m.retry_after <= now)
        ]

    def fan_out_needed(self, count: int) -> bool:
        """More mailboxes than one instance collects well in one run: spread them over instances via the queue."""
        return count > self._settings.max_concurrency * FANOUT_FACTOR

    def fan_out(self, mailboxes: list[Mailbox], work_queue: WorkQueue, *, ttl: int = WORK_ITEM_TTL) -> int:
        """Put one work item per mailbox on the work queue, FANOUT_THREADS at a time, except for a mailbox whose last
        item is still outstanding (waiting, or being collected): a slow backlog or a stuck instance never multiplies
        items. Each item sent is then noted in the mailbox's row with when it expires (``ttl`` seconds), a table
        transaction per TRANSACTION_ROWS items sent, written while the later items are being sent. A failed send
        raises (after the sends already started end): its mailbox waits for the next tick, and the run is reported as
        failed. Returns how many items were sent."""
        now = utcnow()
        due = [m for m in mailboxes if not m.work_item_outstanding(now)]
        item = now.isoformat()
        unnoted: list[tuple[str, str, datetime]] = []
        sent = 0
        lock = threading.Lock()

        def send(mailbox: Mailbox) -> None:
            nonlocal sent
            work_queue.send_message(json.dumps({"mailbox": mailbox.address, "enqueued_at": item}), time_to_live=ttl)
            # Taken from the clock after the send: never before the queue's own expiry of the item.
            with lock:
                sent += 1
                unnoted.append((mailbox.address, item, utcnow() + timedelta(seconds=ttl)))
                if len(unnoted) < TRANSACTION_ROWS:
                    return
                chunk = unnoted[:]
                unnoted.clear()
            # Noted by the thread that filled the transaction, while the other threads go on sending: at 2,000
            # mailboxes the 20 transactions one after the other after the last send took about a quarter of the
            # planning. A note that fails fails this send's future; the items of it are only sent once more.
            self._registry.record_work_items(chunk)

        try:
            with ThreadPoolExecutor(max(1, min(FANOUT_THREADS, len(due))), thread_name_prefix="fan-out") as pool:
                for done in [pool.submit(carried(send), mailbox) for mailbox in due]:
                    done.result()
        finally:
            # Sent items are noted even when another send failed. An item whose note is lost is only sent once more.
            self._registry.record_work_items(unnoted)
        logger.info(
            "collect fan-out mailboxes=%d sent=%d outstanding=%d queue=%s",
            len(mailboxes), sent, len(mailboxes) - len(due), work_queue.queue_name,
        )  # fmt: skip
        return sent

    def collect_work_item(self, text: str) -> MailboxResult | None:
        """Collect the mailbox a work item names. Items for unknown or inactive mailboxes are dropped (None)."""
        try:
            item = json.loads(text)
            address = str(item["mailbox"])
            sent = str(item.get("enqueued_at", ""))
        except (ValueError, KeyError, TypeError, AttributeError):
            logger.warning("work item dropped: not a JSON object with a mailbox")
            return None
        deadline = self._clock() + self._settings.time_budget_seconds
        return self._collect_one(address, None, deadline=deadline, work_item=sent)

    def run(
        self, mailboxes: list[Mailbox] | None = None, *, budget_seconds: float | None = None
    ) -> list[MailboxResult]:
        """Collect ``mailboxes`` (default: every due one) in this process, concurrently within the bound.

        One mailbox's failure never stops the others.
        """
        deadline = self._clock() + (budget_seconds or self._settings.time_budget_seconds)
        if mailboxes is None:
            mailboxes = self.due_mailboxes()
        workers = max(1, min(self._settings.max_concurrency, len(mailboxes)))
        with ThreadPoolExecutor(workers, thread_name_prefix="mailbox") as pool:
            collect = carried(functools.partial(self.collect_mailbox, deadline=deadline))
            return list(pool.map(collect, mailboxes))

    def collect_mailbox(self, mailbox: Mailbox, *, deadline: float, asked: bool = False) -> MailboxResult:
        """Collect one mailbox, as listed, under its lease and record the outcome in the registry. Never raises
        CollectorError. A run an admin ``asked`` for records its success even when it found nothing new, so that the
        status page shows it."""
        result = self._collect_one(mailbox.address, mailbox, deadline=deadline, asked=asked)
        assert result is not None  # only a work item's mailbox can be unknown
        return result

    def _collect_one(
        self, address: str, listed: Mailbox | None, *, deadline: float, work_item: str = "", asked: bool = False
    ) -> MailboxResult | None:
        """Collect ``address`` under its lease: from its ``listed`` row, read again only when the run has something to
        do (see ``_collect``), or from the row read under the lease (None: a work item's mailbox). Returns None for a
        work item whose mailbox is unknown or inactive."""
        started = self._clock()
        result = MailboxResult(address, asked=asked)
        row = listed  # the newest row seen, for the failure count
        try:
            with self._leases.hold(mailbox_key(address)) as lease:
                if not lease.held:
                    result.outcome = RunOutcome.BUSY
                else:
                    if row is None:
                        # Read under the lease, once: no other run can move the checkpoint until it is released.
                        row = self._registry.find(address)
                        if row is None or row.status is not MailboxStatus.ACTIVE:
                            return None
                    newer = self._collect(row, lease, deadline, result, fresh=listed is None, work_item=work_item)
                    if newer is not None:
                        row = newer
                        if newer.status is not MailboxStatus.ACTIVE:
                            result.outcome = RunOutcome.DEFERRED  # revoked or disabled while the run was starting
                        else:
                            self._collect(newer, lease, deadline, result, fresh=True, work_item=work_item)
        except CollectorError as e:
            result.outcome = e.error_class
            result.error = e.describe()
            row = self._record_failure(row, address, e, work_item)
        except NotFoundError:
            # Revoked during the run: what reached the queue stays there (at least once); no row to record into.
            logger.info("mailbox revoked during its run mailbox=%s", address)
            result.outcome = RunOutcome.DEFERRED
        except Exception as e:
            # A defect must cost this mailbox one run, not stop the others: record it and go on.
            logger.exception("collect failed unexpectedly mailbox=%s error=%s", address, type(e).__name__)
            unexpected = CollectorError(
                f"unexpected {type(e).__name__} while collecting {address}",
                remedy="nothing is lost (the checkpoint did not move); if it repeats, report it with the log",
            )
            result.outcome = unexpected.error_class
            result.error = unexpected.describe()
            row = self._record_failure(row, address, unexpected, work_item)
        result.duration = self._clock() - started
        before = row.consecutive_failures if row is not None else 0
        if result.outcome is RunOutcome.OK:
            failures = 0
        elif not result.outcome.failed:
            failures = before
        else:
            failures = before + 1
        result.log(failures)
        return result

    # -- one mailbox ------------------------------------------------------------------------------------------

    def _collect(
        self, mailbox: Mailbox, lease: Lease, deadline: float, result: MailboxResult, *, fresh: bool, work_item: str
    ) -> Mailbox | None:
        """Collect ``mailbox`` under ``lease``. A ``fresh`` row was read under the lease. A listed one may be behind:
        another run may have collected the mailbox between the listing and this lease. When the folder holds nothing
        after the listed checkpoint, the run has nothing to collect whatever the real checkpoint (a checkpoint only
        moves forward), and it writes neither checkpoint nor counters: the listed row serves, with no read. Otherwise
        the row is read again under the lease; if it changed, it is returned (``DEFERRED`` when it is gone) for the
        caller to start again from it. Returns None when the run is done."""
        options = mailbox.options
        token, login_refused = self._token(mailbox, deadline)
        if token.saved_at is not None:
            self._registry.record_token_saved(mailbox.address, token.saved_at, token.secret_name)
        with self._source.open(mailbox, token.token, login_refused=login_refused) as folder:
            sizes = folder.sizes()
            if not fresh and (sizes or not _at_checkpoint(mailbox, folder.checkpoint) or _owes_work(mailbox)):
                current = self._registry.find(mailbox.address)
                if current is None:
                    result.outcome = RunOutcome.DEFERRED  # revoked while the run was starting
                    return None
                if not _collects_the_same(current, mailbox):
                    return current
                # Only bookkeeping moved (this run's own token save, say): go on from the newer row, on this
                # connection and with this token, rather than fetch a token and log in a second time.
                mailbox = current
            self._apply_pending(mailbox, folder)
            checkpoint = folder.checkpoint
            # Placeholders stay listed on the mailbox until someone deals with them in Outlook (they leave the folder).
            same = folder.uidvalidity == mailbox.uidvalidity
            known = folder.existing(mailbox.placeholder_uids) if same and mailbox.placeholder_uids else []
            newest = max(sizes, default=0)
            oversize_handled = self._oversize(mailbox, folder, sizes)
            batches = list(self._plan(sizes, options.max_messages, options.max_bytes))
            result.more = sum(len(b) for b in batches) < len(sizes)
            streamed = {b[0] for b in batches if sizes[b[0]] >= STREAM_ABOVE}
            streams: dict[int, _Streamed] = {}

            def sink(uid: int) -> _Streamed:
                writer = self._sinks.raw.open(blob_name(mailbox.key, folder.uidvalidity, uid))
                streams[uid] = _Streamed(writer, self._walk_pool)
                return streams[uid]

            pending: tuple[_Batch, Future[Enqueued]] | None = None
            # The next batch's FETCH is already on the wire while this one is handled: that hides one round trip
            # to the server per batch. Batches arrive in order; the after-actions in between stay safe.
            fetched = folder.fetch_batches(batches, streamed=streamed, sink=sink)
            try:
                for planned in batches:
                    whole = sum(sizes[uid] for uid in planned)
                    cost = STREAM_WORKING_SET if planned[0] in streamed else BATCH_COST * whole
                    if pending is not None and planned[0] in streamed:
                        # A streamed message starts with nothing pending, so that a cut in its bytes leaves every
                        # earlier message stored, queued, acted on and checkpointed (none is collected twice).
                        checkpoint = self._finish(mailbox, folder, lease, *pending, result)
                        pending = None
                    reservation = self._budget.take(cost, wait=False)
                    if reservation is None:
                        # Wait for memory holding none (a holder that waits could wait for itself): the pending
                        # batch is finished first, which returns its share.
                        if pending is not None:
                            checkpoint = self._finish(mailbox, folder, lease, *pending, result)
                            pending = None
                        reservation = self._budget.take(cost, timeout=max(0.0, deadline - self._clock()))
                        if reservation is None:
                            result.more = True  # the worker's memory stayed taken until the deadline
                            break
                    try:
                        uids, messages = next(fetched)
                    except BaseException:
                        reservation.release()
                        raise
                    batch = _Batch(uids, messages, reservation, streams.pop(uids[0], None))
                    if batch.stream is not None:
                        batch.stream.end()  # its last byte is in
                    if self._clock() > deadline:
                        result.more = True  # this batch is not stored: the next run fetches it again
                        if batch.stream is not None:
                            batch.stream.abort()
                        batch.release()
                        break
                    # The batch was read while the previous one was being stored.
                    if pending is not None:
                        checkpoint = self._finish(mailbox, folder, lease, *pending, result)
                    pending = (batch, self._store(mailbox, folder.uidvalidity, batch))
                if pending is not None:
                    checkpoint = self._finish(mailbox, folder, lease, *pending, result)
                    pending = None
            finally:
                fetched.close()
                for stream in streams.values():  # cut in the middle of its bytes: nothing of it is committed
                    stream.abort()
            if oversize_handled and not result.more:
                # Every message is handled, the oversize ones too: the checkpoint passes them all.
                checkpoint = folder.checkpoint_after(newest)
        placeholders = sorted({*known, *result.placeholders})
        self._record_success(
            mailbox,
            checkpoint,
            result.messages,
            placeholders if tuple(placeholders) != mailbox.placeholder_uids else None,
            work_item,
            always=result.asked,
        )
        return None

    def _record_success(
        self,
        mailbox: Mailbox,
        checkpoint: Checkpoint,
        messages: int,
        placeholders: list[int] | None,
        work_item: str,
        *,
        always: bool = False,
    ) -> None:
        """One registry write for the run's success, with what changed; none when nothing did and the last success
        recorded is younger than SUCCESS_RECORD_EVERY, unless ``always``."""
        moved = bool(messages) or not _at_checkpoint(mailbox, checkpoint)
        healthy = not mailbox.last_error_class and not mailbox.consecutive_failures
        recent = mailbox.last_success_at is not None and utcnow() - mailbox.last_success_at < SUCCESS_RECORD_EVERY
        if not moved and placeholders is None and not work_item and healthy and recent and not always:
            return
        self._registry.record_success(
            mailbox.address,
            checkpoint=checkpoint if moved else None,
            collected_total=mailbox.collected_total + messages if moved else None,
            collected_today=collected_today(mailbox, messages),
            placeholders=placeholders,
            work_item=work_item,
        )

    def _apply_pending(self, mailbox: Mailbox, folder: MailFolder) -> None:
        """Carry out the after-action a previous run could not, with today's options, before collecting more.

        Raises AfterActionError while the server still refuses it: new mail waits until an admin fixes the cause.
        """
        owed = PendingAfterAction.from_text(mailbox.pending_after_action)
        if owed is None:
            if mailbox.pending_after_action:
                self._registry.record_pending_after_action(mailbox.address, "")
            return
        if not same_folder(owed.folder, mailbox.options.folder) or owed.uidvalidity != folder.uidvalidity:
            # The UIDs name messages of another folder, or of this folder before it was rebuilt: not these ones.
            logger.warning(
                "pending after-action dropped mailbox=%s folder=%s messages=%d reason=folder_changed",
                mailbox.address, owed.folder, len(owed.stored),
            )  # fmt: skip
        else:
            try:
                for step in mailbox.options.after_steps(owed.stored, owed.refused):
                    folder.apply(step)
            except AfterActionError as e:
                raise self._owed(e, len(owed.stored)) from e
            logger.info("pending after-action done mailbox=%s messages=%d", mailbox.address, len(owed.stored))
        self._registry.record_pending_after_action(mailbox.address, "")

    @staticmethod
    def _owed(error: AfterActionError, count: int) -> AfterActionError:
        return AfterActionError(
            str(error),
            remedy=f"{error.remedy}. The {count} message(s) are on the queue already and are not queued again: "
            "the next run after the fix applies the after-action to them",
        )

    def token_for(self, mailbox: Mailbox) -> AccessToken:
        """The mailbox's access token by its mode (diagnose reads its claims). Raises as a collection would."""
        return self._token(mailbox, None)[0]

    def _token(
        self, mailbox: Mailbox, deadline: float | None
    ) -> tuple[AccessToken, Callable[[], MailboxAccessError] | None]:
        """The mailbox's access token by its mode, and the error for a refused login when the mode has its own."""
        if mailbox.mode == MailboxMode.APP:
            app_token = self._app_tokens.access_token(mailbox)
            return app_token, lambda: exchange_refusal(mailbox.address, app_token)
        delegated = self._tokens.access_token(
            mailbox.address, signed_in_as=mailbox.signed_in_as, deadline=deadline, secret_name=mailbox.token_secret
        )
        return delegated, None

    def _oversize(self, mailbox: Mailbox, folder: MailFolder, sizes: dict[int, int]) -> bool:
        """Messages above the mailbox's max_message_bytes. Policy "collect": noted, then collected as any other.
        Policy "headers": their header sections are stored and queued as envelopes marked ``oversize``, they are
        taken out of ``sizes`` (not collected whole) and left in the mailbox untouched. Returns whether any was
        so handled: the checkpoint may then pass them, and an oversize message never blocks the mailbox."""
        limit, policy = mailbox.options.max_message_bytes, mailbox.options.oversize
        above = sorted(uid for uid, size in sizes.items() if limit and size > limit)
        if not above:
            return False
        for uid in above:
            logger.warning(
                "oversize message mailbox=%s uid=%d bytes=%d limit=%d policy=%s",
                mailbox.address, uid, sizes[uid], limit, policy,
            )  # fmt: skip
        done = "headers only queued, left in the mailbox" if policy == "headers" else "collected anyway"
        last = above[-1]
        self._registry.record_oversize(
            mailbox.address,
            f"{utcnow():%Y-%m-%d %H:%M} UTC: {len(above)} message(s) above {limit} bytes ({done}); the last is UID "
            f"{last} of {sizes[last]} bytes",
        )
        if policy != "headers":
            return False
        headers = folder.fetch_headers(above)
        for uid in above:
            size = sizes.pop(uid)
            if uid not in headers:
                continue  # deleted meanwhile
            blob = StoredBlob(self._sinks.raw.url(name := blob_name(mailbox.key, folder.uidvalidity, uid)), name)
            self._sinks.raw.put(name, headers[uid])
            envelope = envelope_of(mailbox, folder.uidvalidity, uid, blob, headers[uid], collected_at=datetime.now(UTC))
            envelope["oversize"] = {"size": size, "limit": limit}
            self._sinks.envelopes.send(encode_for_queue(envelope))
        return True

    @staticmethod
    def _plan(sizes: dict[int, int], max_messages: int, max_bytes: int) -> Iterator[list[int]]:
        """Batches in UID order within the per-run caps. The first message is always taken, however big. A message
        of STREAM_ABOVE bytes or more is a batch of its own (it is streamed)."""
        total = 0
        batch: list[int] = []
        batch_bytes = 0
        for taken, uid in enumerate(sorted(sizes)):
            size = sizes[uid]
            if taken >= max_messages or (taken and total + size > max_bytes):
                break
            full = len(batch) >= BATCH_MESSAGES or batch_bytes + size > BATCH_BYTES
            if batch and (full or size >= STREAM_ABOVE or sizes[batch[0]] >= STREAM_ABOVE):
                yield batch
                batch, batch_bytes = [], 0
            batch.append(uid)
            batch_bytes += size
            total += size
        if batch:
            yield batch

    def _store(self, mailbox: Mailbox, uidvalidity: int, batch: _Batch) -> Future[Enqueued]:
        """Upload the batch's blobs and build their envelopes concurrently; send the envelopes one by one in UID
        order as they are ready. The batch's memory is given back once that is done, whatever the outcome."""
        writes = []
        if batch.stream is not None:
            # Its blocks are staged already: commit the block list, and build the envelope from the stream.
            uid, stream = batch.uids[0], batch.stream
            blob = StoredBlob(self._sinks.raw.url(name := blob_name(mailbox.key, uidvalidity, uid)), name)
            commit = self._store_pool.submit(carried(stream.commit))
            build = carried(self._streamed_envelope)
            envelope = self._store_pool.submit(build, mailbox, uidvalidity, uid, blob, stream)
            writes.append((uid, commit, envelope))
        for uid in batch.uids:
            if uid not in batch.messages:
                continue
            raw = batch.messages[uid]
            blob = StoredBlob(self._sinks.raw.url(name := blob_name(mailbox.key, uidvalidity, uid)), name)
            # Two tasks: the envelope (parsing, CPU) is built while the bytes upload (I/O). For a large message
            # each takes a good part of the time, and a batch of one message has nothing else to overlap with.
            upload = self._store_pool.submit(carried(self._sinks.raw.put), name, raw)
            envelope = self._store_pool.submit(carried(self._envelope), mailbox, uidvalidity, uid, blob, raw)
            writes.append((uid, upload, envelope))
        stored = self._enqueue_pool.submit(carried(self._enqueue_in_order), writes)
        stored.add_done_callback(lambda _: batch.release())
        return stored

    @staticmethod
    def _envelope(
        mailbox: Mailbox, uidvalidity: int, uid: int, blob: StoredBlob, raw: bytes
    ) -> tuple[str, bool, datetime | None, bool]:
        """The envelope text for the queue, whether the mailbox's refuse rule applies (an auto-reply, a bounce or a
        mail loop, as GLPI's "refused" folder), the message's Date (for the delivery delay), and whether the server
        served a placeholder instead of the message."""
        return Collector._queued(envelope_of(mailbox, uidvalidity, uid, blob, raw, collected_at=datetime.now(UTC)))

    @staticmethod
    def _streamed_envelope(
        mailbox: Mailbox, uidvalidity: int, uid: int, blob: StoredBlob, stream: _Streamed
    ) -> tuple[str, bool, datetime | None, bool]:
        """As ``_envelope``, for a message whose bytes went through ``stream``."""
        envelope = envelope_of(mailbox, uidvalidity, uid, blob, stream.walked(), collected_at=datetime.now(UTC))
        return Collector._queued(envelope)

    @staticmethod
    def _queued(envelope: dict[str, Any]) -> tuple[str, bool, datetime | None, bool]:
        classification = envelope["classification"]
        return (
            encode_for_queue(envelope),
            refused(classification),
            _sent_at(envelope.get("date")),
            placeholder(classification),
        )

    def _enqueue_in_order(
        self, writes: list[tuple[int, Future[None], Future[tuple[str, bool, datetime | None, bool]]]]
    ) -> Enqueued:
        """Send the envelopes in UID order, each after its raw bytes are stored."""
        stored: list[int] = []
        refused_uids: set[int] = set()
        max_delay: float | None = None
        placeholder_uids: set[int] = set()
        try:
            for uid, upload, envelope in writes:
                upload.result()  # a failed upload stops here: no envelope without its blob
                text, refuse, sent_at, served_placeholder = envelope.result()
                self._sinks.envelopes.send(text)
                stored.append(uid)
                if sent_at is not None:
                    delay = max(0.0, (datetime.now(UTC) - sent_at).total_seconds())  # a sender's clock may run fast
                    max_delay = delay if max_delay is None else max(max_delay, delay)
                if refuse:
                    refused_uids.add(uid)
                if served_placeholder:
                    placeholder_uids.add(uid)
        except BaseException:
            # The run stops at this batch. Its uploads still waiting for a thread would only retry against failing
            # storage, holding the shared pool (and the next run, and the other mailboxes) for a minute or more.
            for _, upload, envelope in writes:
                upload.cancel()
                envelope.cancel()
            raise
        return Enqueued(tuple(stored), frozenset(refused_uids), max_delay, frozenset(placeholder_uids))

    def _finish(
        self,
        mailbox: Mailbox,
        folder: MailFolder,
        lease: Lease,
        batch: _Batch,
        writes: Future[Enqueued],
        result: MailboxResult,
    ) -> Checkpoint:
        """Wait for the batch's blobs and envelopes, then apply the after-action, then move the checkpoint."""
        error = writes.exception()  # waits for the batch's envelopes
        if error is not None:
            raise error  # storage trouble arrives as TransientError; anything else is a defect, reported as such
        enqueued = writes.result()
        lease.check()
        # Missing UIDs were deleted by someone else between SEARCH and FETCH: nothing to collect, move past them.
        checkpoint = folder.checkpoint_after(batch.uids[-1])
        if enqueued.max_delay is not None:
            result.max_delay = max(result.max_delay or 0.0, enqueued.max_delay)
        result.messages += len(enqueued.stored)
        result.bytes += sum(batch.size_of(uid) for uid in enqueued.stored)
        for uid in sorted(enqueued.placeholders):
            logger.warning(
                "collect placeholder mailbox=%s uid=%d: Exchange could not convert this message and served a "
                "placeholder; it stays in the mailbox -- open it in Outlook on the web and forward or export it",
                mailbox.address,
                uid,
            )
            result.placeholders.append(uid)
        # A placeholder is not the message: the real one stays in the mailbox, readable in Outlook. Moving or deleting
        # the placeholder would move or delete that message, which no consumer has received.
        acted_on = tuple(uid for uid in enqueued.stored if uid not in enqueued.placeholders)
        try:
            for step in mailbox.options.after_steps(acted_on, enqueued.refused):
                folder.apply(step)
        except AfterActionError as e:
            # The mail is queued: move the checkpoint past it, so that no later run queues it again, and owe the
            # after-action instead. Every run retries it first and fails, naming the cause, until it is fixed.
            owed = PendingAfterAction(mailbox.options.folder, folder.uidvalidity, acted_on, enqueued.refused)
            self._registry.record_checkpoint(mailbox.address, checkpoint, pending_after_action=owed.to_text())
            raise self._owed(e, len(enqueued.stored)) from e
        lease.check()
        self._registry.record_checkpoint(mailbox.address, checkpoint)
        return checkpoint

    def _record_failure(
        self, mailbox: Mailbox | None, address: str, error: CollectorError, work_item: str
    ) -> Mailbox | None:
        """Record a failed run; ``mailbox`` is the newest row seen (None: not read yet, as when a work item's lease
        could not be taken). Returns the row the failure count was taken from."""
        try:
            if mailbox is None:
                mailbox = self._registry.find(address)
                if mailbox is None:
                    return None
            if isinstance(error, NeedsReconsentError) and mailbox.mode == MailboxMode.APP:
                # No one signs in for an app-mode mailbox: re-consent is never the remedy, whatever raised this.
                error = ConfigurationError(str(error), remedy="check the app's credential and admin consent")
            retry_after = None
            if isinstance(error, TransientError) and error.retry_after:
                retry_after = utcnow() + timedelta(seconds=error.retry_after)
            self._registry.record_failure(
                address,
                error_class=error.error_class,
                error=error.describe(),
                consecutive_failures=mailbox.consecutive_failures + 1,
                needs_reconsent=isinstance(error, NeedsReconsentError),
                retry_after=retry_after,
                work_item=work_item,
            )
        except (CollectorError, NotFoundError) as e:
            logger.warning("cannot record the outcome mailbox=%s error=%s", address, e)
        return mailbox


def _at_checkpoint(mailbox: Mailbox, checkpoint: Checkpoint) -> bool:
    """Whether ``checkpoint`` is the one the row holds."""
    return all(getattr(mailbox, column) == value for column, value in checkpoint.items())


# What a run reads from its row to decide what to fetch, and where. A row that differs from the listed one only
# elsewhere (token age, counters, last run and error texts, work items) does not change what the open folder holds.
_COLLECTION_FIELDS = (
    "status", "mode", "tenant_id", "signed_in_as", "options", *sorted(CHECKPOINT_COLUMNS),
    "pending_after_action", "placeholder_uids",
)  # fmt: skip


def _collects_the_same(a: Mailbox, b: Mailbox) -> bool:
    return all(getattr(a, name) == getattr(b, name) for name in _COLLECTION_FIELDS)


def _owes_work(mailbox: Mailbox) -> bool:
    """The row asks for writes that a row out of date could get wrong: an after-action owed, placeholders listed."""
    return bool(mailbox.pending_after_action or mailbox.placeholder_uids)
