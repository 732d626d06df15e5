"""The local Functions host serving small example apps: HTTP routes, keys, limits, timers, the admin endpoint,
queue triggers against a real Azurite, and the command line with its signals.

The example apps record what their functions saw in ``events.jsonl`` next to their ``function_app.py``.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import logging
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.queue import QueueClient, TextBase64DecodePolicy, TextBase64EncodePolicy

from devstack.host import MAX_REQUEST_BODY_BYTES, HostError, LocalHost
from tests.support.azurite import Azurite
from tests.support.net import free_port, wait_until
from tests.support.processes import stop_process

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
HOST_LOGGER = "devstack.host"


# ------------------------------------------------------------------------------------------------ support


def _events(path: Path, function: str | None = None) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [event for event in events if function is None or event.get("function") == function]


def _write_app(
    folder: Path, source: str, values: dict[str, str], host_json: dict[str, Any] | None = None
) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "function_app.py").write_text(textwrap.dedent(source))
    events = folder / "events.jsonl"
    settings = folder / "local.settings.json"
    settings.write_text(json.dumps({"IsEncrypted": False, "Values": values}))
    if host_json is not None:
        (folder / "host.json").write_text(json.dumps(host_json))
    return settings, events


@contextlib.contextmanager
def _preserved() -> Iterator[None]:
    """The host writes settings into os.environ and imports ``function_app``, as it must; undo both afterwards."""
    environ = dict(os.environ)
    path = list(sys.path)
    module = sys.modules.get("function_app")
    yield
    os.environ.clear()
    os.environ.update(environ)
    sys.path[:] = path
    if module is None:
        sys.modules.pop("function_app", None)
    else:
        sys.modules["function_app"] = module


@pytest.fixture(scope="module")
def preserved_process_state() -> Iterator[None]:
    with _preserved():
        yield


@pytest.fixture
def fresh_process_state() -> Iterator[None]:
    with _preserved():
        yield


RECORD = """
    from __future__ import annotations

    import asyncio
    import json
    import os
    import time

    import azure.functions as func


    EVENTS = os.path.join(os.path.dirname(__file__), "events.jsonl")


    def record(**event: object) -> None:
        event["at"] = time.time()
        with open(EVENTS, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(event) + "\\n")
"""

HTTP_APP = (
    RECORD
    + """
    app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)


    @app.route(route="items/{category}/{id:int}", methods=["GET", "POST"], auth_level=func.AuthLevel.ANONYMOUS)
    def item(req: func.HttpRequest) -> func.HttpResponse:
        seen = {
            "method": req.method,
            "url": req.url,
            "route": dict(req.route_params),
            "params": dict(req.params),
            "probe": req.headers.get("x-probe"),
            "body": req.get_body().decode("utf-8"),
        }
        response = func.HttpResponse(
            json.dumps(seen), status_code=201 if req.method == "POST" else 200, mimetype="application/json"
        )
        response.headers.add("Set-Cookie", "a=1")
        response.headers.add("Set-Cookie", "b=2")
        return response


    @app.route(route="things/{name}", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
    def thing(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("param:" + req.route_params["name"])


    @app.route(route="things/export", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
    def export(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("literal")


    @app.route(route="things/{name}", methods=["DELETE"])
    def delete_thing(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("deleted:" + req.route_params["name"])


    @app.route(route="secret")
    def secret(req: func.HttpRequest, context: func.Context) -> func.HttpResponse:
        return func.HttpResponse(json.dumps({"function": context.function_name, "invocation": context.invocation_id}))


    @app.route(route="admin-only", auth_level=func.AuthLevel.ADMIN)
    def admin_only(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("admin")


    @app.route(route="boom", auth_level=func.AuthLevel.ANONYMOUS)
    def boom(req: func.HttpRequest) -> func.HttpResponse:
        raise RuntimeError("refresh_token=" + req.params.get("t", ""))


    @app.route(route="upload", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
    def upload(req: func.HttpRequest) -> func.HttpResponse:
        record(function="upload", size=len(req.get_body()))
        return func.HttpResponse(str(len(req.get_body())))


    @app.route(route="form", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
    def form(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse(json.dumps(dict(req.form)), mimetype="application/json")


    @app.route(route="slow", auth_level=func.AuthLevel.ANONYMOUS)
    async def slow(req: func.HttpRequest) -> func.HttpResponse:
        await asyncio.sleep(float(req.params.get("s", "0.2")))
        return func.HttpResponse("slept")


    @app.function_name("manual")
    @app.timer_trigger(schedule="0 0 0 1 1 *", arg_name="timer")
    def manual(timer: func.TimerRequest) -> None:
        record(function="manual", past_due=timer.past_due)


    @app.timer_trigger(schedule="%STARTUP_SCHEDULE%", arg_name="timer", run_on_startup=True)
    def at_startup(timer: func.TimerRequest) -> None:
        record(function="at_startup", past_due=timer.past_due)
"""
)


class Served:
    def __init__(self, host: LocalHost, events: Path, function_key: str, master_key: str) -> None:
        self.host = host
        self.events = events
        self.function_key = function_key
        self.master_key = master_key
        self.session = requests.Session()
        self.session.trust_env = False

    def url(self, path: str) -> str:
        return f"{self.host.base_url}{path}"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, preserved_process_state: None) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("http-app")
    function_key, master_key = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    settings, events = _write_app(
        folder,
        HTTP_APP,
        {
            "LOCAL_FUNCTION_KEY": function_key,
            "LOCAL_MASTER_KEY": master_key,
            "STARTUP_SCHEDULE": "0 0 0 1 1 *",
        },
    )
    host = LocalHost(folder, settings, 0).start()
    try:
        yield Served(host, events, function_key, master_key)
    finally:
        host.stop()


@pytest.fixture
def host_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger=HOST_LOGGER)
    return caplog


# ------------------------------------------------------------------------------------------------ HTTP


def test_route_parameters_query_headers_and_body_reach_the_function(served: Served) -> None:
    response = served.session.get(
        served.url("/api/items/books/42?x=1&x=2&y="), headers={"X-Probe": "probe-value"}, timeout=10
    )
    assert response.status_code == 200
    seen = response.json()
    assert seen["method"] == "GET"
    assert seen["route"] == {"category": "books", "id": "42"}
    assert seen["params"] == {"x": "1", "y": ""}
    assert seen["probe"] == "probe-value"
    assert seen["url"] == served.url("/api/items/books/42?x=1&x=2&y=")
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert response.raw.headers.getlist("Set-Cookie") == ["a=1", "b=2"]

    posted = served.session.post(served.url("/api/items/books/7"), data=b"hello body", timeout=10)
    assert posted.status_code == 201
    assert posted.json()["body"] == "hello body"


def test_unmatched_paths_are_404(served: Served) -> None:
    for path in ("/api/items/books/not-a-number", "/api/nothing", "/items/books/42", "/"):
        assert served.session.get(served.url(path), timeout=10).status_code == 404, path


def test_a_literal_route_wins_over_a_parameter(served: Served) -> None:
    assert served.session.get(served.url("/api/things/export"), timeout=10).text == "literal"
    assert served.session.get(served.url("/api/things/anything"), timeout=10).text == "param:anything"


def test_methods_select_the_function_and_others_get_405(served: Served) -> None:
    put = served.session.put(served.url("/api/things/x"), timeout=10)
    assert put.status_code == 405
    assert put.headers["Allow"] == "DELETE, GET"
    assert served.session.delete(served.url("/api/things/x"), timeout=10).status_code == 401
    deleted = served.session.delete(served.url("/api/things/x"), headers={"x-functions-key": served.function_key})
    assert deleted.text == "deleted:x"
    assert served.session.patch(served.url("/api/items/books/1"), timeout=10).status_code == 405


def test_function_level_needs_a_key(served: Served, host_logs: pytest.LogCaptureFixture) -> None:
    url = served.url("/api/secret")
    assert served.session.get(url, timeout=10).status_code == 401
    assert served.session.get(url, params={"code": "wrong"}, timeout=10).status_code == 401
    assert served.session.get(url, headers={"x-functions-key": served.function_key[:-1]}).status_code == 401
    by_query = served.session.get(url, params={"code": served.function_key}, timeout=10)
    assert by_query.status_code == 200
    by_header = served.session.get(url, headers={"x-functions-key": served.function_key}, timeout=10)
    assert by_header.status_code == 200
    by_master = served.session.post(url, headers={"x-functions-key": served.master_key}, timeout=10)
    assert by_master.status_code == 200

    seen = by_header.json()
    assert seen["function"] == "secret"
    assert str(uuid.UUID(seen["invocation"])) == seen["invocation"]
    assert seen["invocation"] != by_query.json()["invocation"]
    lines = [r.getMessage() for r in host_logs.records if r.name.startswith(HOST_LOGGER)]
    assert any(f"invocation_id={seen['invocation']}" in line and "status=200" in line for line in lines)
    assert any("function=secret status=401" in line for line in lines)
    assert served.function_key not in host_logs.text
    assert served.master_key not in host_logs.text
    assert "code=" not in host_logs.text


def test_admin_level_needs_the_master_key(served: Served) -> None:
    url = served.url("/api/admin-only")
    assert served.session.get(url, timeout=10).status_code == 401
    assert served.session.get(url, params={"code": served.function_key}, timeout=10).status_code == 401
    assert served.session.get(url, params={"code": served.master_key}, timeout=10).text == "admin"


def test_an_exception_is_a_generic_500_and_its_message_is_not_logged(
    served: Served, host_logs: pytest.LogCaptureFixture
) -> None:
    marker = "tok-" + secrets.token_hex(8)
    response = served.session.get(served.url("/api/boom"), params={"t": marker}, timeout=10)
    assert response.status_code == 500
    assert response.text == "Internal Server Error"
    assert marker not in host_logs.text
    failed = [r.getMessage() for r in host_logs.records if "function=boom" in r.getMessage()]
    assert len(failed) == 1
    assert "outcome=failed status=500 error=RuntimeError where=function_app.py:" in failed[0]
    # The host keeps serving after a failure.
    assert served.session.get(served.url("/api/things/export"), timeout=10).status_code == 200


def test_bodies_over_the_limit_get_413_without_calling_the_function(served: Served) -> None:
    before = len(_events(served.events, "upload"))
    at_limit = served.session.post(served.url("/api/upload"), data=b"x" * MAX_REQUEST_BODY_BYTES, timeout=30)
    assert at_limit.status_code == 200
    assert at_limit.text == str(MAX_REQUEST_BODY_BYTES)
    too_large = served.session.post(served.url("/api/upload"), data=b"x" * (MAX_REQUEST_BODY_BYTES + 1), timeout=30)
    assert too_large.status_code == 413

    def chunks() -> Iterator[bytes]:
        for _ in range(5):
            yield b"y" * (MAX_REQUEST_BODY_BYTES // 4)

    chunked = served.session.post(served.url("/api/upload"), data=chunks(), timeout=30)
    assert chunked.status_code == 413
    small_chunked = served.session.post(served.url("/api/upload"), data=iter([b"ab", b"cde"]), timeout=30)
    assert small_chunked.text == "5"
    assert [e["size"] for e in _events(served.events, "upload")[before:]] == [MAX_REQUEST_BODY_BYTES, 5]


HOST_PAGE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
}


def test_the_hosts_own_error_answers_carry_security_headers(served: Served) -> None:
    answers = [
        served.session.get(served.url("/api/nothing"), timeout=10),  # 404
        served.session.get(served.url("/api/secret"), timeout=10),  # 401
        served.session.put(served.url("/api/things/x"), timeout=10),  # 405
        served.session.post(served.url("/api/upload"), data=b"x" * (MAX_REQUEST_BODY_BYTES + 1), timeout=30),  # 413
        served.session.get(served.url("/api/boom"), timeout=10),  # 500
        served.session.get(served.url("/admin/host/status"), timeout=10),  # 401 of the admin endpoints
    ]
    assert [a.status_code for a in answers] == [404, 401, 405, 413, 500, 401]
    for answer in answers:
        for name, value in HOST_PAGE_HEADERS.items():
            assert answer.headers.get(name) == value, (answer.status_code, name)


def test_the_listen_backlog_is_the_systems_not_five(served: Served) -> None:
    # socketserver's default of 5 refused connections under a burst that a real front end queues.
    assert served.host._server is not None and served.host._server.request_queue_size >= 128


def test_a_client_trickling_its_request_is_cut_at_the_whole_request_deadline(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each byte arrives well within the per-read timeout, so only a deadline for the whole request ends it.
    from devstack.host import server

    monkeypatch.setattr(server, "REQUEST_DEADLINE_SECONDS", 2.0)
    port = int(served.host.base_url.rsplit(":", 1)[1])
    head = f"POST /api/upload HTTP/1.1\r\nHost: localhost:{port}\r\nContent-Length: 100000\r\n\r\n".encode()
    cut = threading.Event()

    def trickle() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            try:
                conn.sendall(head)
                for _ in range(60):  # 30 s at most: far past the deadline, well inside the per-read timeout
                    conn.sendall(b"x")
                    time.sleep(0.5)
                    conn.setblocking(False)
                    try:
                        if conn.recv(4096) == b"":
                            cut.set()
                            return
                    except BlockingIOError:
                        pass
                    finally:
                        conn.setblocking(True)
            except OSError:
                cut.set()

    worker = threading.Thread(target=trickle)
    worker.start()
    worker.join(40)
    assert cut.is_set(), "the host kept a trickling request open past its deadline"
    assert served.session.get(served.url("/api/things/export"), timeout=10).status_code == 200


def test_a_form_post_is_parsed_like_entra_s_callback(served: Served) -> None:
    response = served.session.post(served.url("/api/form"), data={"code": "c", "state": "s"}, timeout=10)
    assert response.json() == {"code": "c", "state": "s"}


def test_async_functions_are_awaited(served: Served) -> None:
    assert served.session.get(served.url("/api/slow"), params={"s": "0.05"}, timeout=10).text == "slept"


# ------------------------------------------------------------------------------------------------ on demand


def test_run_on_startup_fires_once_at_start(served: Served) -> None:
    fired = wait_until(lambda: _events(served.events, "at_startup"), 10, "the startup run")
    assert [event["past_due"] for event in fired] == [False]


def test_admin_endpoint_fires_a_function_in_the_background(served: Served) -> None:
    url = served.url("/admin/functions/manual")
    before = len(_events(served.events, "manual"))
    assert served.session.post(url, json={}, timeout=10).status_code == 401
    assert served.session.post(url, json={}, headers={"x-functions-key": served.function_key}).status_code == 401
    accepted = served.session.post(url, json={}, headers={"x-functions-key": served.master_key}, timeout=10)
    assert accepted.status_code == 202
    fired = wait_until(lambda: _events(served.events, "manual")[before:], 10, "the admin run")
    assert fired[0]["past_due"] is False

    master = {"x-functions-key": served.master_key}
    assert served.session.post(served.url("/admin/functions/nope"), json={}, headers=master).status_code == 404
    assert served.session.get(url, headers=master, timeout=10).status_code == 405
    assert served.session.post(url, data=b"{not json", headers=master, timeout=10).status_code == 400
    assert served.session.post(url, json={"input": 5}, headers=master, timeout=10).status_code == 400
    assert served.session.get(served.url("/admin/host/ping"), timeout=10).status_code == 200
    status = served.session.get(served.url("/admin/host/status"), headers=master, timeout=10)
    assert status.json()["state"] == "Running"
    assert "manual" in status.json()["functions"]


def test_fire_runs_synchronously_and_raises_what_the_function_raised(served: Served) -> None:
    before = len(_events(served.events, "manual"))
    assert served.host.fire("manual", past_due=True) is None
    assert [event["past_due"] for event in _events(served.events, "manual")[before:]] == [True]
    response = served.host.fire("secret")
    assert response.status_code == 200
    assert json.loads(response.get_body())["function"] == "secret"
    with pytest.raises(RuntimeError):
        served.host.fire("boom")
    with pytest.raises(KeyError):
        served.host.fire("missing")


# ------------------------------------------------------------------------------------------------ timers

TIMER_APP = (
    RECORD
    + """
    app = func.FunctionApp()


    @app.timer_trigger(schedule="%TICK_SCHEDULE%", arg_name="timer")
    def overlapping(timer: func.TimerRequest) -> None:
        record(function="overlapping", phase="start", past_due=timer.past_due)
        time.sleep(1.4)
        record(function="overlapping", phase="end")


    @app.timer_trigger(schedule="*/1 * * * * *", arg_name="timer")
    def steady(timer: func.TimerRequest) -> None:
        record(function="steady", past_due=timer.past_due, next=timer.schedule_status["Next"])
"""
)


def test_timers_fire_on_schedule_and_never_overlap(
    tmp_path: Path, fresh_process_state: None, host_logs: pytest.LogCaptureFixture
) -> None:
    settings, events = _write_app(tmp_path / "timer-app", TIMER_APP, {"TICK_SCHEDULE": "*/1 * * * * *"})
    host = LocalHost(settings.parent, settings, 0).start()
    try:
        wait_until(
            lambda: len([e for e in _events(events, "overlapping") if e["phase"] == "start"]) >= 2,
            12,
            "two runs of the overlapping timer",
        )
    finally:
        host.stop()
    runs = _events(events, "overlapping")
    starts = [e for e in runs if e["phase"] == "start"]
    ends = [e for e in runs if e["phase"] == "end"]
    # A tick that finds the previous run still going is skipped; the next run is marked past due.
    assert [e["past_due"] for e in starts[:2]] == [False, True]
    assert ends, "no run of the overlapping timer ended"
    for finished, following in zip(ends, starts[1:], strict=False):
        assert following["at"] >= finished["at"]
    skipped = [r.getMessage() for r in host_logs.records if "tick skipped" in r.getMessage()]
    assert skipped and all("function=overlapping" in line for line in skipped)

    steady = _events(events, "steady")
    assert len(steady) >= 3
    assert not any(e["past_due"] for e in steady)
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(steady)]
    assert all(0.3 < gap < 1.8 for gap in gaps), gaps


def test_an_invalid_schedule_stops_the_start(tmp_path: Path, fresh_process_state: None) -> None:
    settings, _ = _write_app(tmp_path / "bad-timer", TIMER_APP, {"TICK_SCHEDULE": "*/5 * * * *"})
    host = LocalHost(settings.parent, settings, 0)
    with pytest.raises(HostError, match="six fields"):
        host.start()


# ------------------------------------------------------------------------------------------------ queues

QUEUE_APP = (
    RECORD
    + """
    app = func.FunctionApp()


    @app.queue_trigger(arg_name="msg", queue_name="%WORK_QUEUE%", connection="AzureWebJobsStorage")
    def consume(msg: func.QueueMessage) -> None:
        body = msg.get_body().decode("utf-8")
        record(
            function="consume",
            body=body,
            id=msg.id,
            dequeue_count=msg.dequeue_count,
            inserted=msg.insertion_time is not None,
            expires=msg.expiration_time is not None,
            pop_receipt=bool(msg.pop_receipt),
        )
        if body.startswith("fail"):
            raise ValueError("refused on purpose")
"""
)
WORK_QUEUE = "work-items"
MAX_DEQUEUE = 3


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private Azurite on free ports; yields its connection string."""
    with Azurite(tmp_path_factory.mktemp("azurite")) as own:
        yield own.connection_string


@pytest.fixture(scope="module")
def queue_host(
    tmp_path_factory: pytest.TempPathFactory, azurite: str, preserved_process_state: None
) -> Iterator[tuple[LocalHost, Path]]:
    settings, events = _write_app(
        tmp_path_factory.mktemp("queue-app"),
        QUEUE_APP,
        {"AzureWebJobsStorage": azurite, "WORK_QUEUE": WORK_QUEUE},
        {
            "version": "2.0",
            "extensions": {
                "queues": {"maxDequeueCount": MAX_DEQUEUE, "batchSize": 2, "maxPollingInterval": "00:00:00.200"}
            },
        },
    )
    host = LocalHost(settings.parent, settings, 0).start()
    try:
        yield host, events
    finally:
        host.stop()


def _queue(connection: str, name: str, **policies: Any) -> QueueClient:
    return QueueClient.from_connection_string(connection, name, **policies)


def _poisoned(connection: str) -> list[str]:
    poison = _queue(connection, WORK_QUEUE + "-poison")
    try:
        return [str(message.content) for message in poison.peek_messages(max_messages=32)]
    except ResourceNotFoundError:
        return []


def _queue_is_empty(connection: str) -> bool:
    return _queue(connection, WORK_QUEUE).get_queue_properties().approximate_message_count == 0


def test_a_base64_message_reaches_the_function_decoded_and_is_deleted(
    queue_host: tuple[LocalHost, Path], azurite: str
) -> None:
    _, events = queue_host
    text = "héllo queue " + uuid.uuid4().hex
    sender = _queue(azurite, WORK_QUEUE, message_encode_policy=TextBase64EncodePolicy())
    sent = sender.send_message(text)
    seen = wait_until(lambda: [e for e in _events(events, "consume") if e["body"] == text], 15, "the message")
    assert seen == [
        {
            "function": "consume",
            "body": text,
            "id": sent.id,
            "dequeue_count": 1,
            "inserted": True,
            "expires": True,
            "pop_receipt": True,
            "at": seen[0]["at"],
        }
    ]
    wait_until(lambda: _queue_is_empty(azurite), 10, "the message to be deleted")


def test_a_failing_message_is_retried_then_moved_to_the_poison_queue(
    queue_host: tuple[LocalHost, Path], azurite: str
) -> None:
    _, events = queue_host
    text = "fail-" + uuid.uuid4().hex
    _queue(azurite, WORK_QUEUE, message_encode_policy=TextBase64EncodePolicy()).send_message(text)
    encoded = base64.b64encode(text.encode()).decode()
    wait_until(lambda: encoded in _poisoned(azurite), 30, "the poison queue")
    attempts = [e["dequeue_count"] for e in _events(events, "consume") if e["body"] == text]
    assert attempts == list(range(1, MAX_DEQUEUE + 1))
    wait_until(lambda: _queue_is_empty(azurite), 10, "the original to be deleted")
    # The poison copy is still base64, so a consumer of the poison queue decodes it like the original.
    decoder = _queue(azurite, WORK_QUEUE + "-poison", message_decode_policy=TextBase64DecodePolicy())
    assert text in [message.content for message in decoder.peek_messages(max_messages=32)]


def test_a_message_that_is_not_base64_is_poisoned_without_a_call(
    queue_host: tuple[LocalHost, Path], azurite: str
) -> None:
    _, events = queue_host
    text = "plain text, not base64! " + uuid.uuid4().hex
    _queue(azurite, WORK_QUEUE).send_message(text)
    wait_until(lambda: text in _poisoned(azurite), 15, "the poison queue")
    assert not [e for e in _events(events, "consume") if text in e["body"]]


def test_the_admin_endpoint_fires_a_queue_function_with_its_input(queue_host: tuple[LocalHost, Path]) -> None:
    host, events = queue_host
    text = "from-admin-" + uuid.uuid4().hex
    session = requests.Session()
    session.trust_env = False
    response = session.post(
        f"{host.base_url}/admin/functions/consume",
        json={"input": text},
        headers={"x-functions-key": host.keys.master_key},
        timeout=10,
    )
    assert response.status_code == 202
    seen = wait_until(lambda: [e for e in _events(events, "consume") if e["body"] == text], 10, "the admin run")
    assert seen[0]["dequeue_count"] == 1


# ------------------------------------------------------------------------------------------------ command line

CLI_APP = (
    RECORD
    + """
    app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)


    @app.route(route="hello")
    def hello(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("hello")


    @app.route(route="slow", auth_level=func.AuthLevel.ANONYMOUS)
    def slow(req: func.HttpRequest) -> func.HttpResponse:
        record(function="slow", phase="start")
        time.sleep(1.0)
        return func.HttpResponse("finished")
"""
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_command_line_host_generates_keys_and_stops_cleanly_on_a_signal(tmp_path: Path, signum: int) -> None:
    settings, events = _write_app(tmp_path / "cli-app", CLI_APP, {})
    port = free_port()
    environ = {
        name: value for name, value in os.environ.items() if name not in ("LOCAL_FUNCTION_KEY", "LOCAL_MASTER_KEY")
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "devstack.host", "--app-dir", str(settings.parent), "--port", str(port)],
        cwd=REPO,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    session = requests.Session()
    session.trust_env = False
    base = f"http://127.0.0.1:{port}"

    def ping() -> bool:
        if process.poll() is not None:
            raise AssertionError("the host exited early")
        try:
            return session.get(f"{base}/admin/host/ping", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    try:
        wait_until(ping, 30, "the host to listen")
        keys_file = settings.parent / ".host-keys.json"
        assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
        keys = json.loads(keys_file.read_text())
        assert session.get(f"{base}/api/hello", timeout=10).status_code == 401
        assert session.get(f"{base}/api/hello", params={"code": keys["functionKey"]}, timeout=10).text == "hello"

        in_flight: dict[str, Any] = {}

        def call_slow() -> None:
            in_flight["response"] = session.get(f"{base}/api/slow", timeout=20)

        caller = threading.Thread(target=call_slow)
        caller.start()
        wait_until(lambda: _events(events, "slow"), 10, "the slow call to start")
        process.send_signal(signum)
        caller.join(20)
        # The invocation that was running when the signal came still answers.
        assert in_flight["response"].status_code == 200
        assert in_flight["response"].text == "finished"
        assert process.wait(15) == 0
    finally:
        stop_process(process)
    output = process.stdout.read().decode() if process.stdout else ""
    assert "host stopped" in output
    assert "function=hello status=401" in output
    assert "invocation function=hello" in output
    assert str(keys_file) in output
    assert keys["functionKey"] not in output
    assert keys["masterKey"] not in output
    assert "code=" not in output


def test_the_command_line_refuses_a_broken_app(tmp_path: Path) -> None:
    settings, _ = _write_app(tmp_path / "broken", RECORD + "\n    app = 1\n", {})
    result = subprocess.run(
        [sys.executable, "-m", "devstack.host", "--app-dir", str(settings.parent), "--port", str(free_port())],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "exactly one FunctionApp" in result.stderr
