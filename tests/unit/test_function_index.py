"""The app as the Functions host indexes it: every function's trigger, route, methods, auth level and schedule."""

from __future__ import annotations

import importlib
import json
import socket
from typing import Any

import pytest


def _http(route: str, methods: list[str], auth: str = "FUNCTION") -> list[dict[str, Any]]:
    return [
        {
            "direction": "IN",
            "type": "httpTrigger",
            "name": "req",
            "methods": methods,
            "authLevel": auth,
            "route": route,
        },
        {"direction": "OUT", "type": "http", "name": "$return"},
    ]


# Every binding of every function, as the Functions host reads it from the app's index (the function.json form).
EXPECTED: dict[str, list[dict[str, Any]]] = {
    "authorize_mailbox": _http("mailboxes/{address}/authorize", ["GET"]),
    "auth_callback": _http("auth/callback", ["POST"], "ANONYMOUS"),
    "list_mailboxes": _http("mailboxes", ["GET"]),
    "add_mailbox": _http("mailboxes", ["POST"]),
    "mailbox": _http("mailboxes/{address}", ["GET", "PATCH", "DELETE"]),
    "status_sign_in": _http("status", ["GET"]),
    "status_page_route": _http("ops", ["GET", "POST"], "ANONYMOUS"),
    "reconsent": _http("reconsent", ["GET", "POST"], "ANONYMOUS"),
    "pause_mailbox": _http("mailboxes/{address}/pause", ["POST"]),
    "resume_mailbox": _http("mailboxes/{address}/resume", ["POST"]),
    "reconsent_link": _http("mailboxes/{address}/reconsent-link", ["POST"]),
    "diagnose_mailbox": _http("mailboxes/{address}/diagnose", ["GET"]),
    "replay_mailbox": _http("mailboxes/{address}/replay", ["POST"]),
    "collect_mail": [
        {
            "direction": "IN",
            "type": "timerTrigger",
            "name": "timer",
            "schedule": "%COLLECT_SCHEDULE%",
            "runOnStartup": False,
            "useMonitor": True,
        }
    ],
    "collect_work": [
        {
            "direction": "IN",
            "type": "queueTrigger",
            "name": "item",
            "queueName": "%WORK_QUEUE_NAME%",
            "connection": "AzureWebJobsStorage",
        }
    ],
    "glpi_tickets": [
        {
            "direction": "IN",
            "type": "queueTrigger",
            "name": "envelope",
            "queueName": "%MAIL_QUEUE_NAME%",
            "connection": "AzureWebJobsStorage",
        }
    ],
}


@pytest.fixture(scope="module")
def functions() -> dict[str, list[dict[str, Any]]]:
    import function_app

    app = importlib.reload(function_app).app  # get_functions() may be called once per app object
    # get_functions() itself refuses two functions of one name (the Blueprints share the app's namespace).
    found = {fn.get_function_name(): json.loads(fn.get_function_json())["bindings"] for fn in app.get_functions()}
    return found


def test_every_function_is_indexed_with_exactly_its_bindings(functions: dict[str, list[dict[str, Any]]]) -> None:
    assert functions == EXPECTED


def test_anonymous_only_where_the_route_checks_its_own_credential(functions: dict[str, list[dict[str, Any]]]) -> None:
    """The OAuth callback (Entra's state), the status page (its signed session cookie and CSRF token) and the
    re-consent link (its signature); every other route needs the function key."""
    http = {name: bindings[0] for name, bindings in functions.items() if bindings[0]["type"] == "httpTrigger"}
    assert len(http) == 13
    anonymous = sorted(name for name, trigger in http.items() if trigger["authLevel"] == "ANONYMOUS")
    assert anonymous == ["auth_callback", "reconsent", "status_page_route"]


def test_importing_the_app_opens_no_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    import function_app

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access at import time")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    importlib.reload(function_app)
