"""A small client for GLPI's legacy REST API (``apirest.php``), with GLPI's answers turned into three outcomes.

One session is opened with ``initSession`` (``App-Token`` and ``Authorization: user_token``) and reused by every
thread and message; on ``ERROR_SESSION_TOKEN_INVALID`` (expired, killed) it is opened again once and the call is
repeated, which is safe because GLPI refused the call before doing anything. Network failures, timeouts and 5xx
answers are ``GlpiUnavailable`` (the message goes back to the queue); GLPI's refusals are ``GlpiRefused`` with
GLPI's code; a wrong token or URL is a ``ConfigurationError``. Tokens and session ids never reach a log line.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests

from shared.errors import ConfigurationError, TransientError

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5  # seconds
READ_TIMEOUT = 30  # seconds: a ticket with a large document takes GLPI a while
POOL_CONNECTIONS = 16  # threads of one worker share one session's connections
# Pauses before repeating a read that failed: a blip is ridden out here, an outage goes back to the queue.
READ_RETRY_PAUSES = (0.5, 1.5)  # seconds
CONFIGURATION_CODES = frozenset(
    {
        "ERROR_APP_TOKEN_PARAMETERS_MISSING",
        "ERROR_WRONG_APP_TOKEN_PARAMETER",
        "ERROR_GLPI_LOGIN_USER_TOKEN",
        "ERROR_GLPI_LOGIN",
        "ERROR_LOGIN_PARAMETERS_MISSING",
        "ERROR_NOT_ALLOWED_IP",
        "ERROR_RIGHT_MISSING",
    }
)


class GlpiUnavailable(TransientError):
    """GLPI did not answer, answered too slowly, or failed (5xx): nothing is lost, the message is retried later."""

    remedy = "nothing to do if it passes: the message goes back to the queue; check GLPI if it persists"


class GlpiRefused(Exception):
    """GLPI refused the call (its ``ERROR_...`` code and message); repeating the same call will not help."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"GLPI answered {status} {code}: {message[:300]}")
        self.status = status
        self.code = code


@dataclass(frozen=True)
class Created:
    id: int
    message: str


def _error_of(response: requests.Response) -> tuple[str, str]:
    """GLPI's ``["ERROR_...", "message"]``; anything else (a proxy's HTML page) as ``ERROR`` with a snippet."""
    try:
        body = response.json()
    except ValueError:
        return "ERROR", response.text[:200]
    if isinstance(body, list) and body and isinstance(body[0], str):
        detail = body[1] if len(body) > 1 else ""
        return body[0], detail if isinstance(detail, str) else json.dumps(detail)[:500]
    return "ERROR", str(body)[:200]


class GlpiClient:
    """Thread-safe. ``base_url`` ends with ``apirest.php``; ``ca_bundle`` is for a private CA (the local stack)."""

    def __init__(
        self,
        base_url: str,
        *,
        user_token: str,
        app_token: str | None = None,
        ca_bundle: str | None = None,
        timeout: tuple[float, float] = (CONNECT_TIMEOUT, READ_TIMEOUT),
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._user_token = user_token
        self._app_token = app_token
        self._timeout = timeout
        self._session_token: str | None = None
        self._lock = threading.Lock()
        self._http = requests.Session()
        self._http.trust_env = False  # REQUESTS_CA_BUNDLE would override the bundle given here
        self._http.verify = ca_bundle or True
        adapter = requests.adapters.HTTPAdapter(pool_connections=POOL_CONNECTIONS, pool_maxsize=POOL_CONNECTIONS)
        self._http.mount("https://", adapter)
        self._http.mount("http://", adapter)
        self.sessions_opened = 0

    def __repr__(self) -> str:
        return f"GlpiClient({self.base_url!r})"

    @property
    def web_root(self) -> str:
        """GLPI's web root (the URL without ``/apirest.php``), for links to documents in ticket text."""
        return self.base_url.rsplit("/apirest.php", 1)[0]

    @property
    def web_path(self) -> str:
        return urlsplit(self.web_root).path.rstrip("/")

    # --- sessions

    def _headers(self, session: str | None = None) -> dict[str, str]:
        # Text back as stored, not HTML-encoded (GLPI 10 encodes it unless told otherwise).
        headers = {"Accept": "application/json", "X-GLPI-Sanitized-Content": "false"}
        if self._app_token:
            headers["App-Token"] = self._app_token
        if session:
            headers["Session-Token"] = session
        return headers

    def _open_session(self, stale: str | None) -> str:
        with self._lock:
            if self._session_token is not None and self._session_token != stale:
                return self._session_token  # another thread renewed it meanwhile
            headers = {**self._headers(), "Authorization": f"user_token {self._user_token}"}
            response = self._send("GET", "initSession", headers=headers)
            if response.status_code != 200:
                code, message = _error_of(response)
                raise ConfigurationError(
                    f"GLPI refused the login ({response.status_code} {code}: {message[:200]})",
                    remedy="check GLPI_URL, GLPI_APP_TOKEN (the API client's App-Token) and GLPI_USER_TOKEN (the "
                    "user's API token), and that the API and login with a token are enabled in GLPI",
                )
            token = response.json().get("session_token")
            if not isinstance(token, str) or not token:
                raise GlpiUnavailable("GLPI's initSession answered without a session token")
            # A new session sees only the user's default entity: the search for a lost ticket's marker must see
            # every entity the mailboxes create tickets in (apirest.md "Change active entities").
            scope = self._send(
                "POST",
                "changeActiveEntities",
                headers=self._headers(token),
                json={"entities_id": "all", "is_recursive": True},
            )
            if scope.status_code != 200:
                code, message = _error_of(scope)
                raise GlpiUnavailable(
                    f"GLPI refused changeActiveEntities ({scope.status_code} {code}: {message[:200]})"
                )
            self._session_token = token
            self.sessions_opened += 1
            logger.info("glpi session opened url=%s", self.base_url)
            return token

    def close(self) -> None:
        """End the session (``killSession``) if one is open; failures are logged, never raised."""
        with self._lock:
            token, self._session_token = self._session_token, None
        if token is not None:
            try:
                self._send("GET", "killSession", headers=self._headers(token))
            except GlpiUnavailable as e:
                logger.info("glpi killSession failed error=%s", e)
        self._http.close()

    # --- transport

    def _send(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        what = f"{method} {path.split('?', maxsplit=1)[0]}"
        try:
            response = self._http.request(
                method, f"{self.base_url}/{path}", timeout=self._timeout, allow_redirects=False, **kwargs
            )
        except requests.Timeout as e:
            raise GlpiUnavailable(f"GLPI did not answer {what} in time") from e
        except requests.RequestException as e:
            raise GlpiUnavailable(f"GLPI unreachable for {what}: {type(e).__name__}") from e
        if response.status_code >= 500 or response.status_code in (408, 429):
            retry_after = response.headers.get("Retry-After", "")
            raise GlpiUnavailable(
                f"GLPI answered {response.status_code} to {what}",
                retry_after=float(retry_after) if retry_after.isdigit() else None,
            )
        if 300 <= response.status_code < 400:
            raise ConfigurationError(
                f"GLPI redirected {what} to {response.headers.get('Location', '?')[:200]}",
                remedy="set GLPI_URL to the final https URL of apirest.php",
            )
        return response

    def _send_with_retry(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """A read is repeated after a short pause when GLPI blips (5xx, timeout, connection reset); a write is not:
        GLPI may have done it, and only the caller can tell (the message's marker)."""
        for pause in (*READ_RETRY_PAUSES, None):
            try:
                return self._send(method, path, **kwargs)
            except GlpiUnavailable as e:
                if method != "GET" or pause is None:
                    raise
                logger.info("glpi read retried after=%.1fs error=%s", pause, e)
                time.sleep(pause)
        raise AssertionError("unreachable")  # pragma: no cover

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One API call in the current session, renewing the session once when GLPI says it is invalid.

        Raises GlpiUnavailable, GlpiRefused (4xx with GLPI's code) or ConfigurationError (login, rights)."""
        token = self._session_token or self._open_session(None)
        for attempt in (1, 2):
            response = self._send_with_retry(method, path, headers=self._headers(token), **kwargs)
            if response.status_code < 400:
                return response
            code, message = _error_of(response)
            if code == "ERROR_SESSION_TOKEN_INVALID" and attempt == 1:
                logger.info("glpi session expired; opening a new one")
                token = self._open_session(token)
                continue
            if code in CONFIGURATION_CODES:
                raise ConfigurationError(
                    f"GLPI refused {method} {path.split('?', maxsplit=1)[0]}: {code} {message[:200]}",
                    remedy="give the GLPI user a profile that may create tickets, follow-ups and documents, "
                    "and check the API client's App-Token",
                )
            raise GlpiRefused(response.status_code, code, message)
        raise AssertionError("unreachable")  # pragma: no cover

    # --- items

    def create(self, itemtype: str, fields: Mapping[str, Any]) -> Created:
        response = self.call("POST", itemtype, json={"input": dict(fields)})
        body = response.json()
        return Created(int(body["id"]), str(body.get("message", "")))

    def create_many(self, itemtype: str, rows: Sequence[Mapping[str, Any]]) -> list[int]:
        """Add several items in one call; raises GlpiRefused when any of them fails (207 or 400)."""
        if not rows:
            return []
        response = self.call("POST", itemtype, json={"input": [dict(r) for r in rows]})
        return [int(entry["id"]) for entry in response.json()]

    def get(self, itemtype: str, item_id: int) -> dict[str, Any] | None:
        """The item's fields; None when GLPI has no such item."""
        try:
            response = self.call("GET", f"{itemtype}/{item_id}", params={"expand_dropdowns": "false"})
        except GlpiRefused as e:
            if e.status == 404:
                return None
            raise
        result: dict[str, Any] = response.json()
        return result

    def sub_items(self, itemtype: str, item_id: int, sub: str) -> list[dict[str, Any]]:
        response = self.call("GET", f"{itemtype}/{item_id}/{sub}", params={"range": "0-999"})
        body = response.json()
        return body if isinstance(body, list) else []

    def search(self, itemtype: str, criteria: Sequence[tuple[int, str, str]]) -> list[dict[str, Any]]:
        """Rows of ``search/<itemtype>`` for (field, searchtype, value) criteria, ANDed.

        GLPI leaves the ``data`` key out when nothing matches: that is an empty list here."""
        params: dict[str, str] = {"range": "0-49"}
        for index, (field_id, searchtype, value) in enumerate(criteria):
            prefix = f"criteria[{index}]"
            params.update(
                {f"{prefix}[link]": "AND", f"{prefix}[field]": str(field_id), f"{prefix}[searchtype]": searchtype}
            )
            params[f"{prefix}[value]"] = value
        response = self.call("GET", f"search/{itemtype}", params=params)
        rows = response.json().get("data") or []
        return rows if isinstance(rows, list) else list(rows.values())

    def upload_document(self, filename: str, data: bytes, mime: str, fields: Mapping[str, Any]) -> Created:
        """A Document from one file: multipart with the ``uploadManifest`` part GLPI reads the input from."""
        manifest = json.dumps({"input": {**fields, "_filename": [filename]}})
        files = {
            "uploadManifest": (None, manifest, "application/json"),
            "filename[0]": (filename, data, mime or "application/octet-stream"),
        }
        response = self.call("POST", "Document", files=files)
        body = response.json()
        return Created(int(body["id"]), str(body.get("message", "")))

    def document_url(self, document_id: int) -> str:
        """The URL GLPI's own rich text uses for an inline image (``/front/document.send.php?docid=N``)."""
        return f"{self.web_path}/front/document.send.php?docid={document_id}"
