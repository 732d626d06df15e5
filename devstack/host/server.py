"""The HTTP front end: a threading server on loopback, request bodies read within limits (chunked included), the
app's routes matched and called with keys checked, and the admin endpoints (ping, status, fire a function)."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

import azure.functions as func

from devstack.host.indexing import FunctionEntry
from devstack.host.invocation import log_invocation
from devstack.host.keys import AUTH_ADMIN, KEY_HEADER, KEY_QUERY_PARAMETER
from devstack.host.routes import strip_route_prefix

if TYPE_CHECKING:
    from devstack.host.local_host import LocalHost

logger = logging.getLogger(__name__)

MAX_REQUEST_BODY_BYTES = 1024 * 1024  # 1 MiB: the app takes consent callbacks and small admin calls, never uploads
MAX_CHUNK_LINE_BYTES = 1024  # a chunk-size line is a hex number and optional extensions
MAX_DISCARDED_BODY_BYTES = 8 * MAX_REQUEST_BODY_BYTES  # a refused body up to this size is read and dropped
REQUEST_SOCKET_TIMEOUT_SECONDS = 60  # a client that stalls mid-request loses its connection, not a thread forever
# A request (line, headers and body) must arrive within this, however it trickles: a per-read timeout alone let 300
# clients sending a byte at a time hold 244 threads. Kestrel, which the Functions host runs on, allows 30 s for
# the headers (RequestHeadersTimeout) and drops bodies slower than 240 bytes/s (MinRequestBodyDataRate).
REQUEST_DEADLINE_SECONDS = 30.0
LISTEN_BACKLOG = socket.SOMAXCONN  # socketserver's default of 5 refuses connections under a burst
# The host's own answers (404, 401, 405, 413, 500) are plain text; nothing in them may be sniffed, framed or cached.
HOST_PAGE_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("Cache-Control", "no-store"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'"),
)
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
# Framing is the server's business: a function cannot set these without corrupting the connection.
_HOP_BY_HOP_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})


def http_answer(result: Any) -> tuple[int, list[tuple[str, str]], bytes]:
    """Turn what an HTTP function returned into status, headers (repeated names kept) and body.

    Raises TypeError for a return value the Functions worker would refuse as well.
    """
    if isinstance(result, func.HttpResponse):
        headers = [(name, value) for name, value in result.headers.items() if name.lower() not in _HOP_BY_HOP_HEADERS]
        if not any(name.lower() == "content-type" for name, _ in headers):
            headers.append(("Content-Type", f"{result.mimetype}; charset={result.charset}"))
        return int(result.status_code), headers, result.get_body()
    if result is None:
        return HTTPStatus.NO_CONTENT, [], b""
    if isinstance(result, str | bytes):
        body = result.encode("utf-8") if isinstance(result, str) else result
        return HTTPStatus.OK, [("Content-Type", "text/plain; charset=utf-8")], body
    raise TypeError(f"an HTTP function must return azure.functions.HttpResponse, got {type(result).__name__}")


class _RequestRejectedError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], host: LocalHost) -> None:
        self.local_host = host
        super().__init__(address, _HttpHandler)


class _HttpHandler(BaseHTTPRequestHandler):
    server: HttpServer
    protocol_version = "HTTP/1.1"
    timeout = REQUEST_SOCKET_TIMEOUT_SECONDS
    body_state = "unread"  # "unread", "consumed", or "broken" when the stream is no longer at a request boundary

    def version_string(self) -> str:
        return "LocalFunctionsHost"

    def log_message(self, format: str, *args: Any) -> None:
        # The stdlib writes the request line, query string included, and the query carries function keys.
        return

    def handle_one_request(self) -> None:
        # The deadline covers waiting for the request and reading it; once the body is in, the function may take
        # its time (read_body cancels the timer).
        self._deadline = threading.Timer(REQUEST_DEADLINE_SECONDS, self._cut)
        self._deadline.daemon = True
        self._deadline.start()
        try:
            super().handle_one_request()
        finally:
            self._deadline.cancel()

    def _cut(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def request_received(self) -> None:
        self._deadline.cancel()

    def _dispatch(self) -> None:
        self.body_state = "unread"
        try:
            with self.server.local_host.invoker.busy():
                handle_http(self.server.local_host, self)
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _dispatch  # noqa: N815

    def presented_key(self, query: Sequence[tuple[str, str]]) -> str | None:
        header = self.headers.get(KEY_HEADER)
        if header:
            return header
        for name, value in query:
            if name == KEY_QUERY_PARAMETER:
                return value
        return None

    def read_body(self) -> bytes:
        """Read the request body within MAX_REQUEST_BODY_BYTES; raises _RequestRejectedError otherwise."""
        transfer_encoding = (self.headers.get("Transfer-Encoding") or "").strip().lower()
        if transfer_encoding and transfer_encoding != "identity":
            if transfer_encoding != "chunked":
                self.body_state = "broken"
                raise _RequestRejectedError(HTTPStatus.NOT_IMPLEMENTED)
            return self._read_chunked()
        length_header = self.headers.get("Content-Length")
        if not length_header:
            self.body_state = "consumed"
            return b""
        try:
            length = int(length_header)
        except ValueError:
            length = -1
        if length < 0:
            self.body_state = "broken"
            raise _RequestRejectedError(HTTPStatus.BAD_REQUEST)
        if length > MAX_REQUEST_BODY_BYTES:
            raise _RequestRejectedError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        body = self.rfile.read(length)
        if len(body) != length:
            self.body_state = "broken"
            raise _RequestRejectedError(HTTPStatus.BAD_REQUEST)
        self.body_state = "consumed"
        return body

    def _read_chunked(self) -> bytes:
        # A body over the limit is still read (and dropped) up to MAX_DISCARDED_BODY_BYTES, so that the client
        # gets the 413 instead of a connection reset while it is still sending.
        self.body_state = "broken"
        chunks: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(MAX_CHUNK_LINE_BYTES + 1)
            if len(line) > MAX_CHUNK_LINE_BYTES or not line.endswith(b"\n"):
                raise _RequestRejectedError(HTTPStatus.BAD_REQUEST)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _RequestRejectedError(HTTPStatus.BAD_REQUEST) from None
            if size == 0:
                break
            total += size
            if total > MAX_DISCARDED_BODY_BYTES:
                raise _RequestRejectedError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            chunk = self.rfile.read(size)
            if len(chunk) != size or self.rfile.readline(3) not in (b"\r\n", b"\n"):
                raise _RequestRejectedError(HTTPStatus.BAD_REQUEST)
            if total <= MAX_REQUEST_BODY_BYTES:
                chunks.append(chunk)
        while True:
            trailer = self.rfile.readline(MAX_CHUNK_LINE_BYTES + 1)
            if trailer in (b"\r\n", b"\n", b""):
                break
        self.body_state = "consumed"
        if total > MAX_REQUEST_BODY_BYTES:
            raise _RequestRejectedError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        return b"".join(chunks)

    def _discard_body(self) -> bool:
        """Drop a request body nobody will read, so the client sees the answer; False when that is not possible."""
        if (self.headers.get("Transfer-Encoding") or "").strip().lower() not in ("", "identity"):
            try:
                self._read_chunked()
            except _RequestRejectedError:
                pass
            return self.body_state == "consumed"
        try:
            remaining = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return False
        if remaining < 0 or remaining > MAX_DISCARDED_BODY_BYTES:
            return False
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 64 * 1024))
            if not chunk:
                return False
            remaining -= len(chunk)
        return True

    def answer(self, status: int, body: bytes = b"", headers: Sequence[tuple[str, str]] = ()) -> None:
        """Send a complete answer; the connection stays open only when it is at a request boundary."""
        reusable = self.body_state == "consumed" or (self.body_state == "unread" and self._discard_body())
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        if status >= 200 and status not in (HTTPStatus.NO_CONTENT, HTTPStatus.NOT_MODIFIED):
            self.send_header("Content-Length", str(len(body)))
        if not reusable:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def body_or_refusal(self, function: str) -> bytes | None:
        """The request body, read whole (the request deadline ends then); None when it was refused, after the
        refusal (413, 400 or 501) was answered and logged."""
        try:
            body = self.read_body()
            self.request_received()
        except _RequestRejectedError as rejected:
            logger.info("http rejected function=%s status=%d reason=body", function, rejected.status)
            self.answer_status(rejected.status)
            return None
        return body

    def answer_status(self, status: int, *, headers: Sequence[tuple[str, str]] = ()) -> None:
        phrase = HTTPStatus(status).phrase.encode("ascii")
        self.answer(status, phrase, [*headers, ("Content-Type", "text/plain; charset=utf-8"), *HOST_PAGE_HEADERS])


def handle_http(host: LocalHost, handler: _HttpHandler) -> None:
    """Answer one request: the admin endpoints, else the matching HTTP function."""
    if host.stopping.is_set():
        # A kept-alive connection can outlive the listener; its next request must not start new work.
        handler.answer_status(HTTPStatus.SERVICE_UNAVAILABLE)
        return
    split = urlsplit(handler.path)
    query = parse_qsl(split.query, keep_blank_values=True)
    if split.path.lower().startswith("/admin/"):
        _handle_admin(host, handler, split.path, query)
        return
    below_prefix = strip_route_prefix(split.path, host.options.route_prefix)
    candidates: list[tuple[FunctionEntry, dict[str, str]]] = []
    if below_prefix is not None:
        for entry in host.functions:
            if entry.route is None:
                continue
            params = entry.route.match(below_prefix)
            if params is not None:
                candidates.append((entry, params))
    if not candidates:
        handler.answer_status(HTTPStatus.NOT_FOUND)
        return
    candidates.sort(key=lambda item: item[0].route.specificity if item[0].route else (0, 0, 0, 0), reverse=True)
    method = handler.command.upper()
    allowed = [item for item in candidates if item[0].methods is None or method in item[0].methods]
    if not allowed:
        methods = sorted({m for entry, _ in candidates for m in (entry.methods or HTTP_METHODS)})
        handler.answer_status(HTTPStatus.METHOD_NOT_ALLOWED, headers=[("Allow", ", ".join(methods))])
        return
    entry, route_params = allowed[0]
    if not host.keys.allows(handler.presented_key(query), entry.auth_level):
        logger.info("http rejected function=%s status=401 reason=key", entry.name)
        handler.answer_status(HTTPStatus.UNAUTHORIZED)
        return
    body = handler.body_or_refusal(entry.name)
    if body is None:
        return
    request = func.HttpRequest(
        method=method,
        url=f"http://{handler.headers.get('Host') or urlsplit(host.base_url).netloc}{handler.path}",
        headers=_request_headers(handler),
        params=_first_values(query),
        route_params=route_params,
        body=body,
    )
    invocation = host.invoker.call(entry, request)
    error = invocation.error
    if error is None:
        try:
            status, headers, payload = http_answer(invocation.result)
        except TypeError as bad_result:
            error = bad_result
    if error is not None:
        log_invocation(entry, invocation, status="500", error=error)
        handler.answer_status(HTTPStatus.INTERNAL_SERVER_ERROR)
        return
    log_invocation(entry, invocation, status=str(status), error=None)
    handler.answer(status, payload, headers)


def _request_headers(handler: _HttpHandler) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in handler.headers.items():
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


def _first_values(query: Sequence[tuple[str, str]]) -> dict[str, str]:
    params: dict[str, str] = {}
    for name, value in query:
        params.setdefault(name, value)
    return params


def _handle_admin(host: LocalHost, handler: _HttpHandler, path: str, query: Sequence[tuple[str, str]]) -> None:
    parts = [unquote(part) for part in path.strip("/").split("/")]
    if parts[1:] == ["host", "ping"]:
        handler.answer_status(HTTPStatus.OK)
        return
    is_status = parts[1:] == ["host", "status"]
    is_function = len(parts) == 3 and parts[1] == "functions"
    if not (is_status or is_function):
        handler.answer_status(HTTPStatus.NOT_FOUND)
        return
    if not host.keys.allows(handler.presented_key(query), AUTH_ADMIN):
        logger.info("admin rejected status=401 reason=key")
        handler.answer_status(HTTPStatus.UNAUTHORIZED)
        return
    if is_status:
        payload = json.dumps({"state": "Running", "functions": sorted(e.name for e in host.functions)})
        handler.answer(HTTPStatus.OK, payload.encode(), [("Content-Type", "application/json")])
        return
    if handler.command != "POST":
        handler.answer_status(HTTPStatus.METHOD_NOT_ALLOWED, headers=[("Allow", "POST")])
        return
    try:
        entry = host.entry(parts[2])
    except KeyError:
        handler.answer_status(HTTPStatus.NOT_FOUND)
        return
    body = handler.body_or_refusal(f"admin/{entry.name}")
    if body is None:
        return
    try:
        document = json.loads(body) if body.strip() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        handler.answer_status(HTTPStatus.BAD_REQUEST)
        return
    input_text = document.get("input") if isinstance(document, dict) else None
    if input_text is not None and not isinstance(input_text, str):
        handler.answer_status(HTTPStatus.BAD_REQUEST)
        return
    logger.info("admin invoke function=%s trigger=%s", entry.name, entry.trigger_type)
    host.start_background(host.invoke_on_demand, entry, input_text, name=f"admin-{entry.name}")
    handler.answer(HTTPStatus.ACCEPTED)
