"""A GLPI stand-in for the local stack: the part of GLPI 10's REST API (``apirest.php``) the ticket consumer uses.
One module, over 500 lines, on purpose: one REST surface read beside GLPI's ``API`` class, in marked sections (the
data, the server, starting it) that no other module uses.

GLPI is a PHP application with a database and cannot be installed from the registries here, so this serves the
legacy REST API over HTTPS the way GLPI's own ``Glpi\\Api\\API`` and ``APIRest`` classes answer (docs/fidelity.md
names the source of each behaviour): ``initSession`` / ``killSession`` with ``App-Token`` and
``Authorization: user_token``, ``Session-Token`` on every other call, error arrays ``["ERROR_...", "message"]``
with GLPI's status codes, ``Ticket`` (its status, and ``_linkedto`` as the mail collector passes it),
``ITILFollowup`` (``add_reopen``), ``Document`` (multipart with an ``uploadManifest``), ``Document_Item``,
``Ticket_User``, ``Ticket_Ticket`` and ``User``, sub-items (``Ticket/1/ITILFollowup``) and ``search``.

Awkward parts kept on purpose: input keys that are not columns are dropped silently (GLPI 10 has no
``externalid``); a ticket without a requester gets the API user; text comes back HTML-encoded unless the client
sends ``X-GLPI-Sanitized-Content: false``; a search with no result has no ``data`` key; the App-Token is checked
before anything else and answers 400, not 401.

Test hooks under ``/_control/`` (loopback only, JSON): ``POST faults`` (``status``, ``delay_ms``, ``count``,
``path`` substring, ``method``, ``after``: serve the request, then drop the connection so the answer is lost),
``DELETE faults``, ``POST expire_sessions``, ``POST users`` (a known user with e-mail addresses), ``GET state``
(every ticket with its actors, links, follow-ups and documents), ``GET stats``, ``POST reset``, ``GET health``.

Run: ``python -m devstack.glpi --port 10680 --cert server.pem --key server.key --tokens glpi-tokens.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import email.parser
import email.policy
import hashlib
import ipaddress
import json
import logging
import re
import secrets
import signal
import ssl
import sys
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn
from urllib.parse import parse_qs, unquote, urlsplit

from devstack.faults import FaultQueue
from devstack.tls_http import DispatchingHandler, TlsServer

logger = logging.getLogger("devstack.glpi")

API_PATH = "/apirest.php"
DEFAULT_PORT = 10680
API_USER_ID = 2  # GLPI's "glpi" super-admin: the user whose API token the consumer logs in with
MAX_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_DOCUMENT_MAX_BYTES = 2 * 1024 * 1024  # GLPI's document_max_size default (2 MiB), PHP's upload_max_filesize too
STATUS_INCOMING, STATUS_ASSIGNED, STATUS_WAITING, STATUS_SOLVED, STATUS_CLOSED = 1, 2, 4, 5, 6
REOPENABLE = frozenset({STATUS_WAITING, STATUS_SOLVED, STATUS_CLOSED})  # CommonITILObject::getReopenableStatusArray
LINK_TYPES = frozenset({1, 2, 3, 4})  # Ticket_Ticket::LINK_TO, DUPLICATE_WITH, SON_OF, PARENT_OF
ACTOR_TYPES = {"requester": 1, "assign": 2, "observer": 3}
DOC_BASE = "view documentation in your browser at"

# Columns of GLPI 10's tables (a subset that covers what a mail consumer sets); any other key is dropped silently.
TICKET_COLUMNS = frozenset(
    {
        "entities_id", "name", "date", "closedate", "solvedate", "status", "users_id_recipient", "requesttypes_id",
        "content", "urgency", "impact", "priority", "itilcategories_id", "type", "locations_id", "time_to_resolve",
        "is_deleted", "global_validation",
    }
)  # fmt: skip
FOLLOWUP_COLUMNS = frozenset({"itemtype", "items_id", "content", "is_private", "requesttypes_id", "users_id", "date"})
DOCUMENT_COLUMNS = frozenset({"entities_id", "name", "comment", "mime", "documentcategories_id", "is_recursive"})
DOCUMENT_ITEM_COLUMNS = frozenset({"documents_id", "itemtype", "items_id", "entities_id", "users_id"})
TICKET_TICKET_COLUMNS = frozenset({"tickets_id_1", "tickets_id_2", "link"})

Json = dict[str, Any]


class GlpiError(Exception):
    """An error answer in GLPI's shape: a JSON array of the status code name and a message."""

    def __init__(self, status: int, code: str, message: str, *, doc: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        # API::returnError appends a pointer to the inline documentation when $docmessage is true.
        self.message = f"{message}; {DOC_BASE} {API_PATH}/#{code}" if doc else message


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _sanitized(value: Any) -> Any:
    """GLPI 10 stores and returns text HTML-encoded (Glpi\\Toolbox\\Sanitizer) unless asked not to."""
    if isinstance(value, str):
        return value.replace("&", "&#38;").replace("<", "&#60;").replace(">", "&#62;")
    return value


# --------------------------------------------------------------------------------------------------- the data


class Store:
    """Everything GLPI would keep in its database, behind one lock."""

    def __init__(self, *, app_token: str, user_token: str) -> None:
        self.lock = threading.Lock()
        self.app_token = app_token
        self.user_tokens = {user_token: API_USER_ID}
        self.document_max_bytes = DEFAULT_DOCUMENT_MAX_BYTES
        self.reset()

    def reset(self) -> None:
        self.sessions: dict[str, int] = {}
        self.active_entities: dict[str, tuple[str, bool]] = {}
        self.tables: dict[str, dict[int, Json]] = {
            t: {}
            for t in ("Ticket", "ITILFollowup", "Document", "Document_Item", "Ticket_User", "Ticket_Ticket", "User")
        }
        self.blobs: dict[int, bytes] = {}
        self.next_id: Counter[str] = Counter()
        self.next_id["User"] = API_USER_ID - 1  # GLPI installs its "glpi" super-admin as user 2
        self.add_row("User", {"name": "glpi", "emails": ["glpi@glpi.example"], "is_active": 1})

    def add_row(self, table: str, row: Json) -> int:
        self.next_id[table] += 1
        new_id = self.next_id[table]
        row = {"id": new_id, **row}
        row.setdefault("date_creation", _now())
        row.setdefault("date_mod", row["date_creation"])
        self.tables[table][new_id] = row
        return new_id

    def user_by_email(self, address: str) -> int | None:
        for user in self.tables["User"].values():
            if address.lower() in (e.lower() for e in user.get("emails", [])):
                return int(user["id"])
        return None


@dataclass
class Fault:
    id: str
    status: int | None
    count: int
    delay_ms: int = 0
    path: str | None = None
    method: str | None = None
    after: bool = False
    served: int = 0

    @classmethod
    def parse(cls, raw: object) -> Fault:
        if not isinstance(raw, dict):
            raise ValueError("a fault is a JSON object")
        unknown = set(raw) - {"status", "count", "delay_ms", "path", "method", "after"}
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        status, count, delay = raw.get("status"), raw.get("count", 1), raw.get("delay_ms", 0)
        if status is not None and (not isinstance(status, int) or not 400 <= status <= 599):
            raise ValueError("status must be an HTTP error status (400-599)")
        if not isinstance(count, int) or count == 0 or count < -1:
            raise ValueError("count must be a positive number, or -1 for every request until cleared")
        if not isinstance(delay, int) or not 0 <= delay <= 600_000:
            raise ValueError("delay_ms must be between 0 and 600000")
        after = raw.get("after", False)
        if not isinstance(after, bool):
            raise ValueError("after must be true or false")
        if status is None and not delay and not after:
            raise ValueError("a fault needs a status, a delay_ms or after")
        for name in ("path", "method"):
            if raw.get(name) is not None and not isinstance(raw.get(name), str):
                raise ValueError(f"{name} must be a string")
        return cls(
            id=secrets.token_hex(6),
            status=status,
            count=count,
            delay_ms=delay,
            path=raw.get("path"),
            method=(raw.get("method") or "").upper() or None,
            after=after,
        )

    def matches(self, method: str, path: str | None) -> bool:
        if self.method and self.method != method:
            return False
        return not self.path or (path is not None and self.path in path)


# ------------------------------------------------------------------------------------------------ the server


class GlpiServer(TlsServer):
    log_name = "glpi"

    def __init__(self, address: tuple[str, int], ssl_context: ssl.SSLContext, store: Store) -> None:
        super().__init__(address, _Handler, ssl_context)
        self.store = store
        self.faults: FaultQueue[Fault] = FaultQueue()
        self.stats: Counter[str] = Counter()
        self.stats_lock = threading.Lock()
        port = self.server_address[1]
        self.url = f"https://localhost:{port}{API_PATH}"

    def count(self, key: str) -> None:
        with self.stats_lock:
            self.stats[key] += 1


class _Dropped(Exception):
    """The answer is withheld and the connection closed (an injected fault)."""


class _Handler(DispatchingHandler):
    server: GlpiServer
    server_version = "Apache"

    # --- plumbing

    log = logger
    log_name = "glpi"

    def _answer_error(self, error: Exception) -> int | None:
        if isinstance(error, GlpiError):
            return self._send(error.status, [error.code, error.message])
        if isinstance(error, _Dropped):
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(2)
            return 0
        return None

    def _answer_failure(self) -> int:
        return self._send(500, ["ERROR", "stand-in failure"])

    def _send(
        self, status: int, payload: Any, headers: dict[str, str] | None = None, *, raw: bytes | None = None
    ) -> int:
        data = raw if raw is not None else json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "text/html" if raw is not None else "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        return status

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise GlpiError(411, "ERROR", "chunked request bodies are not accepted")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise GlpiError(400, "ERROR", "invalid Content-Length") from None
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            # PHP drops a body above post_max_size: GLPI then sees no file at all.
            raise GlpiError(400, "ERROR_UPLOAD_FILE_TOO_BIG_POST_MAX_SIZE", "The file seems too big")
        return self.rfile.read(length) if length > 0 else b""

    def _handle(self, path: str) -> int:
        body = self._body()
        if path.startswith("/_control/"):
            return self._control(path, body)
        if not (path == API_PATH or path.startswith(API_PATH + "/")):
            return self._send(404, None, raw=b"<html><body><h1>Not Found</h1></body></html>")
        fault = self.server.faults.take(self.command, path)
        if fault is not None and not fault.after:
            if fault.delay_ms:
                time.sleep(fault.delay_ms / 1000)
            if fault.status is not None:
                self.server.count("faults")
                # A PHP fatal error or a proxy in front of GLPI answers with an HTML page, not GLPI's JSON.
                return self._send(fault.status, None, raw=b"<html><body><h1>Internal Server Error</h1></body></html>")
        elements = [unquote(p) for p in path[len(API_PATH) :].strip("/").split("/")]
        status, payload, headers = self._api(elements, body)
        if fault is not None and fault.after:
            if fault.delay_ms:
                time.sleep(fault.delay_ms / 1000)
            self.server.count("faults")
            raise _Dropped
        return self._send(status, payload, headers)

    # --- the API

    def _params(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.path).query, keep_blank_values=True)

    def _check_app_token(self) -> None:
        # API::checkAppToken: a missing or wrong App-Token is a 400, before the session or login is looked at.
        store = self.server.store
        given = self.headers.get("App-Token") or self._params().get("app_token", [""])[0]
        if store.app_token == "":
            if given:
                raise GlpiError(400, "ERROR_WRONG_APP_TOKEN_PARAMETER", "parameter app_token seems wrong", doc=True)
            return
        if not given:
            raise GlpiError(400, "ERROR_APP_TOKEN_PARAMETERS_MISSING", "missing parameter app_token", doc=True)
        if not secrets.compare_digest(given.encode(), store.app_token.encode()):
            raise GlpiError(400, "ERROR_WRONG_APP_TOKEN_PARAMETER", "parameter app_token seems wrong", doc=True)

    def _session_user(self) -> int:
        token = self.headers.get("Session-Token") or self._params().get("session_token", [""])[0]
        if not token:
            raise GlpiError(400, "ERROR_SESSION_TOKEN_MISSING", "parameter session_token is missing or empty", doc=True)
        with self.server.store.lock:
            user = self.server.store.sessions.get(token)
        if user is None:
            raise GlpiError(401, "ERROR_SESSION_TOKEN_INVALID", "session_token seems invalid")
        return user

    def _api(self, elements: list[str], body: bytes) -> tuple[int, Any, dict[str, str]]:
        resource = elements[0] if elements else ""
        if self.command == "GET" and body:
            raise GlpiError(400, "ERROR_JSON_PAYLOAD_FORBIDDEN", "GET Request should not have json payload (http body)")
        if resource == "initSession":
            return self._init_session()
        self._check_app_token()
        user = self._session_user()
        self.server.count(f"{self.command} {resource}")
        if resource == "changeActiveEntities":
            return self._change_active_entities(body)
        if resource == "killSession":
            with self.server.store.lock:
                self.server.store.sessions.pop(self.headers.get("Session-Token", ""), None)
            return 200, True, {}
        if resource == "search":
            return self._search(elements[1] if len(elements) > 1 else "")
        itemtype = resource
        if itemtype not in self.server.store.tables:
            raise GlpiError(
                400, "ERROR_RESOURCE_NOT_FOUND_NOR_COMMONDBTM", "resource not found or not an instance of CommonDBTM"
            )
        item_id = int(elements[1]) if len(elements) > 1 and elements[1].isdigit() else None
        if self.command == "GET":
            if len(elements) > 2 and elements[2]:
                return self._sub_items(itemtype, item_id, elements[2])
            if item_id is not None:
                return 200, self._get(itemtype, item_id), {}
            raise GlpiError(405, "ERROR_METHOD_NOT_ALLOWED", "Method Not Allowed", doc=True)
        if self.command == "POST":
            return self._create(itemtype, body, user)
        if self.command == "PUT" and item_id is not None:
            return self._update(itemtype, item_id, body)
        raise GlpiError(405, "ERROR_METHOD_NOT_ALLOWED", "Method Not Allowed", doc=True)

    def _change_active_entities(self, body: bytes) -> tuple[int, Any, dict[str, str]]:
        """API::changeActiveEntities: ``entities_id`` ("all" or a number) and a boolean ``is_recursive``; anything
        else is a plain 400 ``ERROR``. The stand-in keeps one entity tree and records the choice per session."""
        if self.command != "POST":
            raise GlpiError(400, "ERROR", "Bad Request", doc=True)
        try:
            params = json.loads(body or b"{}")
        except ValueError:
            raise GlpiError(400, "ERROR_JSON_PAYLOAD_INVALID", "JSON payload seems not valid") from None
        if not isinstance(params, dict) or not isinstance(params.get("is_recursive", False), bool):
            raise GlpiError(400, "ERROR", "Bad Request", doc=True)
        with self.server.store.lock:
            self.server.store.active_entities[self.headers.get("Session-Token", "")] = (
                str(params.get("entities_id", "all")),
                bool(params.get("is_recursive", False)),
            )
        return 200, True, {}

    def _init_session(self) -> tuple[int, Any, dict[str, str]]:
        self._check_app_token()
        header = self.headers.get("Authorization", "")
        token = header.split(" ", 1)[1].strip() if "user_token" in header and " " in header else ""
        if not token:
            raise GlpiError(
                400,
                "ERROR_LOGIN_PARAMETERS_MISSING",
                "parameter(s) login, password or user_token are missing",
                doc=True,
            )
        store = self.server.store
        with store.lock:
            user = next(
                (u for t, u in store.user_tokens.items() if secrets.compare_digest(t.encode(), token.encode())), None
            )
            if user is None:
                raise GlpiError(401, "ERROR_GLPI_LOGIN_USER_TOKEN", "parameter user_token seems invalid")
            session = secrets.token_hex(13)  # PHP session ids: 26 lower-case characters
            store.sessions[session] = user
        self.server.count("initSession")
        return 200, {"session_token": session}, {}

    def _view(self, row: Json) -> Json:
        sanitize = self.headers.get("X-GLPI-Sanitized-Content", "true").lower() not in ("false", "0", "no")
        hidden = {"emails", "filepath"}
        return {k: (_sanitized(v) if sanitize else v) for k, v in row.items() if k not in hidden}

    def _get(self, itemtype: str, item_id: int) -> Json:
        with self.server.store.lock:
            row = self.server.store.tables[itemtype].get(item_id)
            if row is None:
                raise GlpiError(404, "ERROR_ITEM_NOT_FOUND", "Item not found")
            return self._view(dict(row))

    def _sub_items(self, itemtype: str, item_id: int | None, sub: str) -> tuple[int, Any, dict[str, str]]:
        store = self.server.store
        if sub not in store.tables:
            raise GlpiError(
                400, "ERROR_RESOURCE_NOT_FOUND_NOR_COMMONDBTM", "resource not found or not an instance of CommonDBTM"
            )
        with store.lock:
            if item_id is None or item_id not in store.tables[itemtype]:
                raise GlpiError(404, "ERROR_ITEM_NOT_FOUND", "Item not found")
            if sub in ("ITILFollowup", "Document_Item"):
                rows = [r for r in store.tables[sub].values() if r["itemtype"] == itemtype and r["items_id"] == item_id]
            elif sub == "Ticket_Ticket":  # a link belongs to both of its tickets
                rows = [r for r in store.tables[sub].values() if item_id in (r["tickets_id_1"], r["tickets_id_2"])]
            else:
                key = f"{itemtype.lower()}s_id"
                rows = [r for r in store.tables[sub].values() if r.get(key) == item_id]
            return 200, [self._view(dict(r)) for r in rows], {}

    def _input(self, body: bytes) -> tuple[Any, list[tuple[str, bytes, str]]]:
        """The ``input`` of a JSON body, or of a multipart body's ``uploadManifest`` with the uploaded files."""
        content_type = self.headers.get("Content-Type", "application/json")
        files: list[tuple[str, bytes, str]] = []
        if "multipart/form-data" in content_type:
            message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
            )
            manifest: bytes | None = None
            for part in message.iter_parts():
                name = part.get_param("name", header="content-disposition")
                decoded = part.get_payload(decode=True)
                payload = decoded if isinstance(decoded, bytes) else b""
                if name == "uploadManifest":
                    manifest = payload
                elif part.get_filename() is not None:
                    files.append((str(part.get_filename()), payload, part.get_content_type()))
            if not files:
                raise GlpiError(400, "ERROR_UPLOAD_FILE_TOO_BIG_POST_MAX_SIZE", "The file seems too big")
            try:
                parsed = json.loads(manifest or b"")
            except ValueError:
                raise GlpiError(400, "ERROR_JSON_PAYLOAD_INVALID", "JSON payload seems not valid") from None
        else:
            try:
                parsed = json.loads(body or b"{}")
            except ValueError:
                raise GlpiError(400, "ERROR_JSON_PAYLOAD_INVALID", "JSON payload seems not valid") from None
        if not isinstance(parsed, dict) or not isinstance(parsed.get("input"), dict | list):
            raise GlpiError(400, "ERROR_BAD_ARRAY", "input parameter must be an array of objects", doc=True)
        return parsed["input"], files

    def _create(self, itemtype: str, body: bytes, user: int) -> tuple[int, Any, dict[str, str]]:
        given, files = self._input(body)
        inputs = given if isinstance(given, list) else [given]
        results: list[Json] = []
        failed = 0
        for index, entry in enumerate(inputs):
            if not isinstance(entry, dict):
                raise GlpiError(400, "ERROR_BAD_ARRAY", "input parameter must be an array of objects", doc=True)
            try:
                with self.server.store.lock:
                    new_id, message = self._add(itemtype, entry, user, files if index == 0 else [])
                results.append({"id": new_id, "message": message})
            except GlpiError as e:
                failed += 1
                results.append({"id": False, "message": e.message})
        if isinstance(given, dict):
            if failed:
                raise GlpiError(400, "ERROR_GLPI_ADD", str(results[0]["message"]))
            return 201, results[0], {"Location": f"{self.server.url}/{itemtype}/{results[0]['id']}"}
        if failed == len(inputs):
            return 400, ["ERROR_GLPI_ADD", results], {}
        if failed:
            return 207, ["ERROR_GLPI_PARTIAL_ADD", results], {}
        links = ",".join(f"{self.server.url}/{itemtype}/{r['id']}" for r in results)
        return 201, results, {"Link": links}

    def _add(self, itemtype: str, entry: Json, user: int, files: list[tuple[str, bytes, str]]) -> tuple[int, str]:
        store = self.server.store
        if itemtype == "Ticket":
            row = {k: v for k, v in entry.items() if k in TICKET_COLUMNS}
            content = str(row.get("content") or "")
            name = str(row.get("name") or "").strip()
            if not name:
                # CommonITILObject::prepareInputForAdd: no title -> the start of the description.
                name = re.sub(r"<[^>]*>", " ", content).strip()[:70]
            if not name and not content:
                raise GlpiError(400, "ERROR_GLPI_ADD", "Title and description are mandatory")
            if len(name) > 255:
                raise GlpiError(400, "ERROR_GLPI_ADD", "Data too long for column 'name'")
            row.update(name=name, content=content)
            row.setdefault("entities_id", 0)
            row.setdefault("status", 1)
            row.setdefault("date", _now())
            row.setdefault("users_id_recipient", user)
            new_id = store.add_row("Ticket", row)
            self._actors(new_id, entry, user)
            linked = entry.get("_linkedto")
            if isinstance(linked, int | str) and str(linked).isdigit() and int(linked) in store.tables["Ticket"]:
                # Ticket::post_addItem: the mail collector's "_linkedto" becomes a Ticket_Ticket link (LINK_TO);
                # a ticket that does not exist is no link, and the new ticket stays.
                self._link_tickets(new_id, int(linked), 1)
            return new_id, f"Item successfully added: {name} (ID {new_id})"
        if itemtype == "ITILFollowup":
            row = {k: v for k, v in entry.items() if k in FOLLOWUP_COLUMNS}
            parent = store.tables.get(str(row.get("itemtype")), {}).get(int(row.get("items_id") or 0))
            if row.get("itemtype") != "Ticket" or parent is None:
                raise GlpiError(400, "ERROR_GLPI_ADD", "Invalid parent item")
            if not str(row.get("content") or "").strip():
                raise GlpiError(400, "ERROR_GLPI_ADD", "Description is mandatory")
            row.setdefault("users_id", user)
            row.setdefault("is_private", 0)
            new_id = store.add_row("ITILFollowup", row)
            parent["date_mod"] = _now()
            if entry.get("add_reopen") and parent.get("status") in REOPENABLE:
                # ITILFollowup::post_addItem with "_reopen": back to Assigned when someone is assigned, else New.
                assigned = any(
                    a["tickets_id"] == parent["id"] and a["type"] == ACTOR_TYPES["assign"]
                    for a in store.tables["Ticket_User"].values()
                )
                parent["status"] = STATUS_ASSIGNED if assigned else STATUS_INCOMING
            return new_id, "Item successfully added"
        if itemtype == "Document":
            if not files:
                raise GlpiError(400, "ERROR_GLPI_ADD", "No file uploaded")
            filename, data, mime = files[0]
            if len(data) > store.document_max_bytes:
                raise GlpiError(400, "ERROR_GLPI_ADD", f"File too big ({filename})")
            row = {k: v for k, v in entry.items() if k in DOCUMENT_COLUMNS}
            row.update(
                filename=filename,
                mime=mime or "application/octet-stream",
                sha1sum=hashlib.sha1(data).hexdigest(),  # noqa: S324 - GLPI's own column, not a security use
                size=len(data),
                users_id=user,
            )
            row.setdefault("name", filename)
            row.setdefault("entities_id", 0)
            new_id = store.add_row("Document", row)
            store.blobs[new_id] = data
            if entry.get("itemtype") and entry.get("items_id"):
                # Document::post_addItem links the new document to the item named in the input.
                self._link(new_id, str(entry["itemtype"]), int(entry["items_id"]), user)
            return new_id, f"Document move succeeded. Item successfully added: {row['name']}"
        if itemtype == "Document_Item":
            row = {k: v for k, v in entry.items() if k in DOCUMENT_ITEM_COLUMNS}
            return self._link(
                int(row.get("documents_id") or 0), str(row.get("itemtype")), int(row.get("items_id") or 0), user
            ), ""
        if itemtype == "Ticket_Ticket":
            row = {k: v for k, v in entry.items() if k in TICKET_TICKET_COLUMNS}
            try:
                first, second, link = (int(row.get(k) or 0) for k in ("tickets_id_1", "tickets_id_2", "link"))
            except (TypeError, ValueError):
                raise GlpiError(400, "ERROR_GLPI_ADD", "Invalid input") from None
            return self._link_tickets(first, second, link or 1), "Item successfully added"
        if itemtype == "User":
            raise GlpiError(403, "ERROR_RIGHT_MISSING", "You don't have permission to perform this action.")
        raise GlpiError(400, "ERROR_GLPI_ADD", f"{itemtype} cannot be added through this stand-in")

    def _link(self, documents_id: int, itemtype: str, items_id: int, user: int) -> int:
        store = self.server.store
        if documents_id not in store.tables["Document"] or items_id not in store.tables.get(itemtype, {}):
            raise GlpiError(400, "ERROR_GLPI_ADD", "Invalid item")
        for row in store.tables["Document_Item"].values():
            if (row["documents_id"], row["itemtype"], row["items_id"]) == (documents_id, itemtype, items_id):
                raise GlpiError(400, "ERROR_GLPI_ADD", "This item is already linked")
        return store.add_row(
            "Document_Item",
            {"documents_id": documents_id, "itemtype": itemtype, "items_id": items_id, "users_id": user},
        )

    def _link_tickets(self, first: int, second: int, link: int) -> int:
        """Ticket_Ticket::prepareInputForAdd: two different existing tickets, a known link type, no second link
        between the same two tickets (either way round)."""
        store = self.server.store
        tickets = store.tables["Ticket"]
        if first == second or first not in tickets or second not in tickets or link not in LINK_TYPES:
            raise GlpiError(400, "ERROR_GLPI_ADD", "Invalid input")
        for row in store.tables["Ticket_Ticket"].values():
            if {row["tickets_id_1"], row["tickets_id_2"]} == {first, second}:
                raise GlpiError(400, "ERROR_GLPI_ADD", "Item already linked")
        return store.add_row("Ticket_Ticket", {"tickets_id_1": first, "tickets_id_2": second, "link": link})

    def _actors(self, ticket_id: int, entry: Json, user: int) -> None:
        """Ticket_User rows from the ``_users_id_<role>`` and ``_users_id_<role>_notif`` inputs, as GLPI's
        CommonITILObject::post_addItem makes them; without a requester input the session's user is the requester."""
        store = self.server.store
        for role, kind in ACTOR_TYPES.items():
            ids = entry.get(f"_users_id_{role}")
            notif = entry.get(f"_users_id_{role}_notif") or {}
            if ids is None and role == "requester":
                ids = user
            if ids is None:
                continue
            id_list = ids if isinstance(ids, list) else [ids]
            emails = notif.get("alternative_email", []) if isinstance(notif, dict) else []
            uses = notif.get("use_notification", []) if isinstance(notif, dict) else []
            for index, given in enumerate(id_list):
                try:
                    users_id = int(given)
                except (TypeError, ValueError):
                    continue
                alternative = str(emails[index]) if index < len(emails) and emails[index] else ""
                if users_id == 0 and not alternative:
                    continue
                store.add_row(
                    "Ticket_User",
                    {
                        "tickets_id": ticket_id,
                        "users_id": users_id,
                        "type": kind,
                        "use_notification": int(bool(uses[index])) if index < len(uses) else 1,
                        "alternative_email": alternative if users_id == 0 else "",
                    },
                )

    def _update(self, itemtype: str, item_id: int, body: bytes) -> tuple[int, Any, dict[str, str]]:
        given, _ = self._input(body)
        if not isinstance(given, dict):
            raise GlpiError(400, "ERROR_BAD_ARRAY", "input parameter must be an array of objects", doc=True)
        columns = {"Ticket": TICKET_COLUMNS, "ITILFollowup": FOLLOWUP_COLUMNS}.get(itemtype, frozenset())
        with self.server.store.lock:
            row = self.server.store.tables[itemtype].get(item_id)
            if row is None:
                return 400, ["ERROR_GLPI_UPDATE", "Item not found"], {}
            row.update({k: v for k, v in given.items() if k in columns})
            row["date_mod"] = _now()
        return 200, [{str(item_id): True, "message": ""}], {}

    # --- search

    SEARCH_FIELDS: dict[str, dict[int, str]] = {  # noqa: RUF012 - a constant table
        "Ticket": {1: "name", 2: "id", 12: "status", 21: "content", 80: "entities_id"},
        "User": {1: "name", 2: "id", 5: "emails", 8: "is_active"},
    }

    def _search(self, itemtype: str) -> tuple[int, Any, dict[str, str]]:
        fields = self.SEARCH_FIELDS.get(itemtype)
        if fields is None:
            raise GlpiError(
                400, "ERROR_RESOURCE_NOT_FOUND_NOR_COMMONDBTM", "resource not found or not an instance of CommonDBTM"
            )
        criteria: dict[int, dict[str, str]] = {}
        for key, values in self._params().items():
            match = re.fullmatch(r"criteria\[(\d+)\]\[(\w+)\]", key)
            if match:
                criteria.setdefault(int(match.group(1)), {})[match.group(2)] = values[0]
        for criterion in criteria.values():
            if not {"field", "searchtype", "value"} <= set(criterion):
                raise GlpiError(400, "ERROR", "Malformed search criteria", doc=True)
            if not criterion["field"].isdigit() or int(criterion["field"]) not in fields:
                raise GlpiError(400, "ERROR", "Bad field ID in search criteria", doc=True)
        with self.server.store.lock:
            rows = [dict(r) for r in self.server.store.tables[itemtype].values() if not r.get("is_deleted")]
        for criterion in criteria.values():
            column = fields[int(criterion["field"])]
            wanted = criterion["value"].lower()
            kind = criterion["searchtype"]

            def hit(row: Json, column: str = column, wanted: str = wanted, kind: str = kind) -> bool:
                value = row.get(column)
                texts = [str(v).lower() for v in value] if isinstance(value, list) else [str(value).lower()]
                if kind == "equals":
                    return wanted in texts
                if kind == "contains":
                    return any(wanted in t for t in texts)
                return False

            rows = [r for r in rows if hit(r)]
        total = len(rows)
        result: Json = {"totalcount": total, "count": total, "sort": [1], "order": ["ASC"]}
        if rows:
            shown = sorted({1, 2, 80} & set(fields) | {int(c["field"]) for c in criteria.values()})
            result["data"] = []
            for row in rows:
                line = {}
                for number in shown:
                    value = row.get(fields[number])
                    line[str(number)] = value[0] if isinstance(value, list) and len(value) == 1 else value
                result["data"].append(line)
        # APIRest::call: the Content-Range header only when something was found; the body's range is "0--1/0" then.
        result["content-range"] = f"0-{total - 1}/{total}"
        headers = {"Accept-Range": f"{itemtype} 1000"}
        if total:
            headers["Content-Range"] = result["content-range"]
        return 200, result, headers

    # --- /_control/

    def _control(self, path: str, body: bytes) -> int:
        if not ipaddress.ip_address(self.client_address[0]).is_loopback:
            return self._send(403, {"error": "control endpoints answer loopback clients only"})
        try:
            options = json.loads(body) if body else {}
        except ValueError:
            return self._send(400, {"error": "the body is not JSON"})
        server, store = self.server, self.server.store
        match (self.command, path.rstrip("/")):
            case ("GET", "/_control/health"):
                return self._send(200, {"status": "ok"})
            case ("GET", "/_control/stats"):
                with server.stats_lock:
                    return self._send(200, dict(server.stats))
            case ("POST", "/_control/faults"):
                try:
                    fault = Fault.parse(options)
                except ValueError as e:
                    return self._send(400, {"error": str(e)})
                server.faults.add(fault)
                return self._send(201, asdict(fault))
            case ("DELETE", "/_control/faults"):
                return self._send(200, {"cleared": server.faults.clear()})
            case ("POST", "/_control/expire_sessions"):
                with store.lock:
                    expired = len(store.sessions)
                    store.sessions.clear()
                return self._send(200, {"expired": expired})
            case ("POST", "/_control/users"):
                emails = options.get("emails")
                if not isinstance(emails, list) or not all(isinstance(e, str) for e in emails):
                    return self._send(400, {"error": "emails must be a list of addresses"})
                with store.lock:
                    new_id = store.add_row("User", {"name": str(options.get("name") or emails[0]), "emails": emails})
                return self._send(201, {"id": new_id})
            case ("POST", "/_control/config"):
                if "document_max_bytes" in options:
                    store.document_max_bytes = int(options["document_max_bytes"])
                return self._send(200, {"document_max_bytes": store.document_max_bytes})
            case ("GET", "/_control/state"):
                return self._send(200, self._state())
            case ("POST", "/_control/reset"):
                with store.lock:
                    store.reset()
                with server.stats_lock:
                    server.stats.clear()
                server.faults.clear()
                return self._send(200, {"reset": True})
        return self._send(404, {"error": f"no control endpoint {self.command} {path}"})

    def _state(self) -> Json:
        """Every ticket with its actors, follow-ups and documents (rows indexed once: linear in the tables)."""
        store = self.server.store
        with store.lock:
            linked: dict[tuple[str, int], list[int]] = defaultdict(list)
            for link in store.tables["Document_Item"].values():
                linked[(link["itemtype"], link["items_id"])].append(link["documents_id"])
            followups: dict[int, list[Json]] = defaultdict(list)
            for followup in store.tables["ITILFollowup"].values():
                followups[followup["items_id"]].append(dict(followup))
            actors: dict[int, list[Json]] = defaultdict(list)
            for actor in store.tables["Ticket_User"].values():
                actors[actor["tickets_id"]].append(dict(actor))
            links: dict[int, list[Json]] = defaultdict(list)
            for link in store.tables["Ticket_Ticket"].values():
                links[link["tickets_id_1"]].append(dict(link))
                links[link["tickets_id_2"]].append(dict(link))

            def documents(kind: str, item: int) -> list[Json]:
                return [
                    dict(store.tables["Document"][d]) | {"sha256": hashlib.sha256(store.blobs[d]).hexdigest()}
                    for d in linked.get((kind, item), [])
                ]

            tickets = []
            for ticket in store.tables["Ticket"].values():
                tid = ticket["id"]
                for followup in followups[tid]:
                    followup["documents"] = documents("ITILFollowup", followup["id"])
                tickets.append(
                    {
                        **ticket,
                        "actors": actors[tid],
                        "links": links[tid],
                        "followups": followups[tid],
                        "documents": documents("Ticket", tid),
                    }
                )
            scopes = [list(scope) for token, scope in store.active_entities.items() if token in store.sessions]
            return {
                "tickets": tickets,
                "documents": len(store.tables["Document"]),
                "sessions": len(store.sessions),
                "active_entities": scopes,
            }


# ------------------------------------------------------------------------------------------- starting it


def make_server(host: str, port: int, cert: str, key: str, *, app_token: str, user_token: str) -> GlpiServer:
    """A bound, not yet serving server on loopback. Raises ValueError for another host, OSError for a taken port."""
    if host not in ("127.0.0.1", "localhost"):
        raise ValueError(f"the GLPI stand-in listens on loopback only, not on {host!r}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return GlpiServer(("127.0.0.1", port), context, Store(app_token=app_token, user_token=user_token))


def control(url: str, method: str, path: str, body: Json | None = None, *, cafile: str | None = None) -> Any:
    """Call a ``/_control/`` endpoint of the stand-in whose API URL (``https://.../apirest.php``) is ``url``."""
    origin = url.split(API_PATH, 1)[0]
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(  # noqa: S310 - the stand-in's own https URL
        f"{origin}/_control/{path.lstrip('/')}", data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10, context=ssl.create_default_context(cafile=cafile)) as r:  # noqa: S310
        raw = r.read()
    return json.loads(raw) if raw else None


def _stop_on_signal(signum: int, _frame: object) -> NoReturn:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.glpi", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    # Tokens come in a file, not on the command line, where any local user could read them.
    parser.add_argument("--tokens", required=True, help='JSON file {"app_token": ..., "user_token": ...}')
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr, level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        with open(args.tokens, encoding="utf-8") as f:
            tokens = json.load(f)
        server = make_server(
            args.host, args.port, args.cert, args.key, app_token=tokens["app_token"], user_token=tokens["user_token"]
        )
    except (ValueError, OSError, KeyError) as e:
        logger.error("glpi cannot start: %s", e)
        return 2
    signal.signal(signal.SIGTERM, _stop_on_signal)
    logger.info("glpi listening url=%s", server.url)
    try:
        server.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
