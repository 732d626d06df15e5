"""Run one collection (the operator's command line) and kill the process at a chosen step of the per-message order.

    python -m tests.support.kill_at POINT N collect --settings FILE --mailbox ADDRESS

POINT is where the process dies, right after the Nth time the collection reaches it:
``after_blob`` (a mail blob is written), ``after_enqueue`` (an envelope is on the queue), ``after_action`` (a
batch was marked, moved or deleted on the server), ``before_checkpoint`` (just before a batch's checkpoint is
written). The process ends with ``os._exit(137)``, as SIGKILL would: no finally blocks, no lease release, no
flush. If the collection never reaches the point, the command line's own exit code is returned.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Any

KILLED = 137
POINTS = ("after_blob", "after_enqueue", "after_action", "before_checkpoint")


class _Counter:
    def __init__(self, nth: int) -> None:
        self._nth = nth
        self._seen = 0
        self._lock = threading.Lock()

    def reached(self) -> bool:
        with self._lock:
            self._seen += 1
            return self._seen == self._nth


def _die() -> None:
    sys.stderr.flush()
    os._exit(KILLED)


def _after(real: Callable[..., Any], counter: _Counter, applies: Callable[..., bool]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        answer = real(*args, **kwargs)
        if applies(*args, **kwargs) and counter.reached():
            _die()
        return answer

    return wrapper


def install(point: str, nth: int) -> None:
    """Patch the boundary named by ``point`` in this process."""
    counter = _Counter(nth)
    if point == "after_blob":
        from azure.storage.blob import BlobClient

        def mail_blob(blob: BlobClient, *args: Any, **kwargs: Any) -> bool:
            return str(blob.blob_name).endswith(".eml")  # not the lease blobs

        BlobClient.upload_blob = _after(BlobClient.upload_blob, counter, mail_blob)  # type: ignore[method-assign]
    elif point == "after_enqueue":
        from azure.storage.queue import QueueClient

        QueueClient.send_message = _after(QueueClient.send_message, counter, lambda *a, **k: True)  # type: ignore[method-assign]
    elif point == "after_action":
        from collectors.imap_session import ImapSession

        def some_mail(session: Any, step: Any, *args: Any, **kwargs: Any) -> bool:
            return bool(step.uids)

        ImapSession.apply = _after(ImapSession.apply, counter, some_mail)  # type: ignore[method-assign]
    elif point == "before_checkpoint":
        from shared.registry import MailboxRegistry

        def before(real: Callable[..., None]) -> Callable[..., None]:
            def checkpoint(*args: Any, **kwargs: Any) -> None:
                if counter.reached():
                    _die()
                real(*args, **kwargs)

            return checkpoint

        # Both write the checkpoint: after each batch, and the final one with the run's success.
        MailboxRegistry.record_checkpoint = before(MailboxRegistry.record_checkpoint)  # type: ignore[method-assign]
        MailboxRegistry.record_success = before(MailboxRegistry.record_success)  # type: ignore[method-assign]
    else:
        raise ValueError(f"point must be one of {', '.join(POINTS)}")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3 or args[0] not in POINTS or not args[1].isdigit():
        print(__doc__, file=sys.stderr)
        return 2
    install(args[0], int(args[1]))
    from collectors.cli import main as collectors_main

    return collectors_main(args[2:])


if __name__ == "__main__":
    sys.exit(main())
