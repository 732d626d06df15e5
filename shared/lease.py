"""One collector per mailbox at a time, across threads, processes and instances: a blob lease per mailbox.

The lease lasts LEASE_SECONDS and is renewed in the background; a crashed run's lease simply expires. Work that
changes the mailbox or the checkpoint first calls ``check()``, so a run that lost its lease stops before it
could race the next holder.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Protocol

from azure.core.exceptions import AzureError, HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.storage.blob import BlobLeaseClient, ContainerClient

from shared.errors import TransientError
from shared.invocation_logs import carried

logger = logging.getLogger(__name__)

LEASE_SECONDS = 60  # Blob leases last 15-60 s or forever; 60 s bounds how long a crashed run blocks a mailbox
RENEW_EVERY = 15.0  # seconds: three renewals may fail before the lease can lapse
SAFETY_MARGIN = 10.0  # seconds: stop committing work this long before an unrenewed lease would lapse


class Lease(Protocol):
    @property
    def held(self) -> bool:
        """Whether this run took the lease (False: another run is collecting the mailbox)."""
        ...

    def check(self) -> None:
        """Raise TransientError if the lease was lost; called before each change to the mailbox or checkpoint."""
        ...


class Leases(Protocol):
    def hold(self, key: str) -> AbstractContextManager[Lease]:
        """``with leases.hold(key) as lease: if lease.held: ...``; released (or left to expire) on exit."""
        ...


class BlobLeases:
    """``Leases`` as blob leases in one container: one lease blob per mailbox key."""

    def __init__(self, container: ContainerClient) -> None:
        self._container = container

    def hold(self, key: str) -> MailboxLease:
        return MailboxLease(self._container, key)


class MailboxLease:
    """``with MailboxLease(container, key) as lease: if lease.held: ...``"""

    def __init__(self, container: ContainerClient, key: str) -> None:
        self._blob = container.get_blob_client(f"{key}.lease")
        self._lease: BlobLeaseClient | None = None
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._thread: threading.Thread | None = None
        self._renewed_at = 0.0

    @property
    def held(self) -> bool:
        return self._lease is not None

    def __enter__(self) -> MailboxLease:
        try:
            try:
                self._lease = self._blob.acquire_lease(lease_duration=LEASE_SECONDS)
            except ResourceNotFoundError:
                # The mailbox's first run: create its lease blob, then take the lease. Later runs find the blob,
                # so each run costs one storage call here, not two.
                try:
                    self._blob.upload_blob(b"", overwrite=False)
                except ResourceExistsError:
                    pass
                except HttpResponseError as e:
                    if e.status_code != 412:  # 412: the blob exists and is leased: someone is collecting
                        raise
                self._lease = self._blob.acquire_lease(lease_duration=LEASE_SECONDS)
            self._renewed_at = time.monotonic()
        except HttpResponseError as e:
            if e.status_code in (409, 412):
                return self  # held by another run
            raise TransientError(f"cannot take the mailbox lease: HTTP {e.status_code}") from e
        except AzureError as e:
            raise TransientError(f"cannot take the mailbox lease: {type(e).__name__}") from e
        self._thread = threading.Thread(target=carried(self._renew), name=f"lease-{self._blob.blob_name}", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_EVERY):
            try:
                assert self._lease is not None
                self._lease.renew()
                self._renewed_at = time.monotonic()
            except AzureError as e:
                logger.warning("lease renewal failed lease=%s error=%s", self._blob.blob_name, type(e).__name__)
                if isinstance(e, HttpResponseError) and e.status_code in (409, 412):
                    self._lost.set()  # someone else holds it now
                    return

    def check(self) -> None:
        """Raise TransientError if the lease was lost (another run may be collecting this mailbox now)."""
        expired = time.monotonic() - self._renewed_at > LEASE_SECONDS - SAFETY_MARGIN
        if self._lease is None or self._lost.is_set() or expired:
            raise TransientError("the mailbox lease was lost; stopping so that another run can continue")

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._lease is not None and not self._lost.is_set():
            try:
                self._lease.release()
            except AzureError:
                pass  # it expires on its own
        self._lease = None
