"""Helpers for the GLPI consumer's tests: put a message where the collector would (blob + envelope on the queue),
drain the queue through the consumer, read what the GLPI stand-in holds, and kill a consumer process at a step.

    python -m tests.support.glpi POINT N --settings FILE

runs ``python -m consumers.glpi run`` in this process and dies with ``os._exit(137)`` (as SIGKILL would) right
after the Nth time it reaches POINT: ``after_upload`` (a document is in GLPI), ``after_create`` (a ticket or
follow-up is in GLPI, its id not yet saved), ``after_save`` (a progress row is written), ``after_links``
(documents are linked), ``after_done`` (the message row says done, the envelope row not yet).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from tests.support.stack import Stack
from tests.support.standins import ControlClient

KILLED = 137
POINTS = ("after_upload", "after_create", "after_save", "after_links", "after_done")


def post_mail(settings: Any, raw: bytes, *, mailbox: str, uid: int, uidvalidity: int = 7) -> dict[str, Any]:
    """Store ``raw`` as the collector does and put its envelope on the mail queue; returns the envelope."""
    from collectors.envelope import build_envelope
    from shared import azure_clients

    container = azure_clients.container(settings, settings.mail_container)
    name = f"{mailbox}/{uidvalidity}/{uid}.eml"
    blob = container.get_blob_client(name)
    blob.upload_blob(raw, overwrite=True)
    envelope = build_envelope(
        raw,
        mailbox=mailbox,
        folder="INBOX",
        uidvalidity=uidvalidity,
        uid=uid,
        blob_url=blob.url,
        blob_name=name,
        blob_container=settings.mail_container,
        collected_at=datetime.now(UTC),
    )
    azure_clients.queue(settings, settings.mail_queue).send_message(json.dumps(envelope))
    return envelope


def _control(stack: Stack) -> ControlClient:
    return ControlClient(stack.glpi_url.split("/apirest.php", 1)[0], stack.ca_bundle)


def glpi_state(stack: Stack) -> dict[str, Any]:
    """Every ticket in the stand-in with its actors, follow-ups and documents."""
    result: dict[str, Any] = _control(stack)("state", method="GET")
    return result


def glpi_control(stack: Stack, path: str, body: dict[str, Any] | None = None, method: str = "POST") -> Any:
    return _control(stack)(path, body, method)


def tickets_with(stack: Stack, needle: str) -> list[dict[str, Any]]:
    """The tickets whose title or text contains ``needle`` (tests use a unique word per test)."""
    return [t for t in glpi_state(stack)["tickets"] if needle in t["name"] or needle in t["content"]]


class _Counter:
    def __init__(self, nth: int) -> None:
        self._nth, self._seen, self._lock = nth, 0, threading.Lock()

    def reached(self) -> bool:
        with self._lock:
            self._seen += 1
            return self._seen == self._nth


def _after(real: Callable[..., Any], counter: _Counter, applies: Callable[..., bool]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        answer = real(*args, **kwargs)
        if applies(*args, **kwargs) and counter.reached():
            sys.stderr.flush()
            os._exit(KILLED)
        return answer

    return wrapper


def install(point: str, nth: int) -> None:
    import consumers.glpi.__main__ as cli
    from consumers.glpi import state
    from consumers.glpi.client import GlpiClient
    from consumers.glpi.state import StateStore

    state.CLAIM_SECONDS = 1  # the next attempt may take over at once
    cli.PROCESSING_VISIBILITY_SECONDS = 2  # and the killed attempt's message is back on the queue in 2 s
    counter = _Counter(nth)
    always: Callable[..., bool] = lambda *a, **k: True  # noqa: E731
    if point == "after_upload":
        GlpiClient.upload_document = _after(GlpiClient.upload_document, counter, always)  # type: ignore[method-assign]
    elif point == "after_create":
        GlpiClient.create = _after(  # type: ignore[method-assign]
            GlpiClient.create, counter, lambda _self, itemtype, *a, **k: itemtype in ("Ticket", "ITILFollowup")
        )
    elif point == "after_save":
        StateStore.save = _after(StateStore.save, counter, always)  # type: ignore[method-assign]
    elif point == "after_links":
        GlpiClient.create_many = _after(GlpiClient.create_many, counter, always)  # type: ignore[method-assign]
    elif point == "after_done":
        StateStore.finish = _after(  # type: ignore[method-assign]
            StateStore.finish, counter, lambda _self, _state, status, **k: status == "done"
        )
    else:
        raise SystemExit(f"unknown point {point}; known: {', '.join(POINTS)}")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    point, nth, rest = args[0], int(args[1]), args[2:]
    install(point, nth)
    from consumers.glpi.__main__ import main as consumer_main

    return consumer_main(["run", *rest])


if __name__ == "__main__":
    sys.exit(main())
