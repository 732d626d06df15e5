"""The HTTPS plumbing the Python stand-ins share: a threading server that runs each TLS handshake in the
connection's own thread, and a request handler that sends every method to one ``_dispatch``."""

from __future__ import annotations

import logging
import ssl
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

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
    """HTTP/1.1 with keep-alive; every method goes to ``_dispatch``, which writes its own log line."""

    protocol_version = "HTTP/1.1"  # clients keep connections alive; every answer carries Content-Length
    sys_version = ""
    # Headers and body go out in two writes; with Nagle on, the client's delayed ACK stalls each answer ~40 ms.
    disable_nagle_algorithm = True

    def _dispatch(self) -> None:
        raise NotImplementedError

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
