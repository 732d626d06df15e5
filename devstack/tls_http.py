"""The HTTPS plumbing the Python stand-ins share: a threading server that runs each TLS handshake in the
connection's own thread, and a request handler that sends every method to one ``_dispatch``, which answers with
the stand-in's ``_handle`` and its error hooks and writes one log line a request."""

from __future__ import annotations

import logging
import ssl
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

CONNECTION_TIMEOUT = 30  # seconds: drops idle keep-alive connections and stalled TLS handshakes


class TlsServer(ThreadingHTTPServer):
    """Serves ``handler_class`` over TLS with ``ssl_context``; ``stop()`` ends serving and closes the socket."""

    daemon_threads = True
    block_on_close = False
    log_name = "tls"

    def __init__(
        self, address: tuple[str, int], handler_class: type[BaseHTTPRequestHandler], ssl_context: ssl.SSLContext
    ) -> None:
        super().__init__(address, handler_class)
        self.ssl_context = ssl_context

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The handshake runs here, in the connection's own thread, so a stalled client cannot block accept().
        request.settimeout(CONNECTION_TIMEOUT)
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            logger.debug("%s tls handshake failed client=%s error=%s", self.log_name, client_address[0], e)
            return
        try:
            self.RequestHandlerClass(tls, client_address, self)  # type: ignore[arg-type]
        finally:
            tls.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("%s connection error client=%s", self.log_name, client_address[0], exc_info=True)

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class DispatchingHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive; every method goes to ``_dispatch``. A stand-in supplies ``_handle`` (answer the
    request, return the status sent), ``_answer_error`` (its answer to an error of its own, such as its service's
    error document) and ``_answer_failure`` (its 500 for anything else), and names its logger and log prefix."""

    protocol_version = "HTTP/1.1"  # clients keep connections alive; every answer carries Content-Length
    sys_version = ""
    # Headers and body go out in two writes; with Nagle on, the client's delayed ACK stalls each answer ~40 ms.
    disable_nagle_algorithm = True
    log: ClassVar[logging.Logger] = logger
    log_name: ClassVar[str] = "http"  # the first word of each request's log line

    def _handle(self, path: str) -> int:
        raise NotImplementedError

    def _answer_error(self, error: Exception) -> int | None:
        """Answer ``error``, raised by ``_handle``, and return the status sent (0: the connection was closed
        unanswered); None when it is not one of the stand-in's own, which ``_answer_failure`` answers."""
        return None

    def _answer_failure(self) -> int:
        raise NotImplementedError

    def _dispatch(self) -> None:
        started = time.monotonic()
        path = urlsplit(self.path).path
        status = 500
        try:
            status = self._handle(path)
        except (ConnectionError, TimeoutError):
            status = 0  # the client went away; nothing was answered
            self.close_connection = True
        except Exception as e:
            answered = self._answer_error(e)
            if answered is None:
                self.log.exception("%s request failed method=%s path=%s", self.log_name, self.command, path)
                answered = self._answer_failure()
            status = answered
        finally:
            ms = int((time.monotonic() - started) * 1000)
            self.log.info("%s method=%s path=%s status=%d ms=%d", self.log_name, self.command, path, status, ms)

    def do_GET(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # http.server's own line would repeat the one _dispatch writes
