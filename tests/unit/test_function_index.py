"""The app as the Functions host indexes it: every function's trigger, route, methods, auth level and schedule."""

from __future__ import annotations

import importlib
import socket
from typing import Any

import pytest

EXPECTED: dict[str, dict[str, Any]] = {
    "authorize_mailbox": {
        "type": "httpTrigger",
        "route": "mailboxes/{address}/authorize",
        "methods": ["GET"],
        "authLevel": "function",
    },
    "auth_callback": {"type": "httpTrigger", "route": "auth/callback", "methods": ["POST"], "authLevel": "anonymous"},
    "list_mailboxes": {"type": "httpTrigger", "route": "mailboxes", "methods": ["GET"], "authLevel": "function"},
    "mailbox": {
        "type": "httpTrigger",
        "route": "mailboxes/{address}",
        "methods": ["GET", "PATCH", "DELETE"],
        "authLevel": "function",
    },
    "collect_work": {"type": "queueTrigger", "queueName": "%WORK_QUEUE_NAME%", "connection": "AzureWebJobsStorage"},
    "collect_mail": {
        "type": "timerTrigger",
        "schedule": "%COLLECT_SCHEDULE%",
        "runOnStartup": False,
        "useMonitor": True,
    },
}


def _plain(value: Any) -> Any:
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return getattr(value, "value", value)


@pytest.fixture(scope="module")
def functions() -> dict[str, dict[str, Any]]:
    import function_app

    app = importlib.reload(function_app).app  # get_functions() may be called once per app object
    found = {}
    for fn in app.get_functions():
        trigger = fn.get_trigger().get_dict_repr()
        found[fn.get_function_name()] = {
            k: _plain(v)
            for k, v in trigger.items()
            if k
            in (
                "type",
                "route",
                "methods",
                "authLevel",
                "schedule",
                "runOnStartup",
                "useMonitor",
                "queueName",
                "connection",
            )
        }
    return found


def test_every_function_is_indexed_as_intended(functions: dict[str, dict[str, Any]]) -> None:
    assert functions == EXPECTED


def test_only_the_oauth_callback_is_anonymous(functions: dict[str, dict[str, Any]]) -> None:
    anonymous = [name for name, f in functions.items() if f.get("authLevel") == "anonymous"]
    assert anonymous == ["auth_callback"]


def test_importing_the_app_opens_no_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    import function_app

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access at import time")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    importlib.reload(function_app)
