"""A local Azure Functions host for ``function_app.py`` (v2 model): HTTP, timer and queue triggers.

Core Tools cannot be installed here, so this host indexes the app with the public ``azure.functions`` API and
serves it the way the Functions runtime does: ``local.settings.json`` values as environment variables,
``/api/<route>`` with auth levels and keys, NCRONTAB timers that never overlap themselves, queue triggers with
base64 decoding and a poison queue, and the admin endpoint that fires a function on demand.

Run: ``python -m devstack.host [--app-dir DIR] [--settings FILE] [--host 127.0.0.1] [--port 7071]``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hmac
import importlib.util
import inspect
import ipaddress
import json
import logging
import os
import re
import secrets
import signal
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import azure.functions as func
from azure.core.exceptions import AzureError, ResourceExistsError
from azure.functions.queue import QueueMessage as TriggerQueueMessage
from azure.functions.timer import TimerRequest
from azure.storage.queue import QueueServiceClient
from croniter import croniter

# Named explicitly: under ``python -m devstack.host`` the module is ``__main__``.
logger = logging.getLogger("devstack.host")

REPO_ROOT = Path(__file__).resolve().parent.parent

MAX_REQUEST_BODY_BYTES = 1024 * 1024  # 1 MiB: the app takes consent callbacks and small admin calls, never uploads
MAX_CHUNK_LINE_BYTES = 1024  # a chunk-size line is a hex number and optional extensions
MAX_DISCARDED_BODY_BYTES = 8 * MAX_REQUEST_BODY_BYTES  # a refused body up to this size is read and dropped
REQUEST_SOCKET_TIMEOUT_SECONDS = 60  # a client that stalls mid-request loses its connection, not a thread forever
DEFAULT_ROUTE_PREFIX = "api"
KEYS_FILE_NAME = ".host-keys.json"
FUNCTION_KEY_SETTING = "LOCAL_FUNCTION_KEY"
MASTER_KEY_SETTING = "LOCAL_MASTER_KEY"
KEY_HEADER = "x-functions-key"
KEY_QUERY_PARAMETER = "code"
GENERATED_KEY_BYTES = 32
SHUTDOWN_GRACE_SECONDS = 10.0  # how long stop() lets running invocations finish before giving up on them
DEFAULT_STORAGE_CONNECTION = "AzureWebJobsStorage"
DEFAULT_MAX_DEQUEUE_COUNT = 5  # the Functions host default (host.json extensions.queues.maxDequeueCount)
DEFAULT_QUEUE_BATCH_SIZE = 4  # Azure fetches 16; two shared cores and a local stack want fewer
MAX_QUEUE_BATCH_SIZE = 32  # the Storage service returns at most 32 messages per receive
QUEUE_PROCESSING_VISIBILITY_SECONDS = 600  # Azure hides a message for 10 minutes while a function holds it
DEFAULT_QUEUE_RETRY_VISIBILITY = timedelta(0)  # the Functions default: a failed message is visible again at once
DEFAULT_MAX_POLLING_INTERVAL = timedelta(seconds=2)  # Azure backs off to 1 minute; locally we want quick turns
MIN_POLLING_INTERVAL_SECONDS = 0.1
QUEUE_ERROR_BACKOFF_SECONDS = 2.0  # storage unreachable (e.g. Azurite not up yet): retry without spinning
# The poller retries on its own schedule; the SDK's default chain (15 s backoff, growing) would only delay a stop.
QUEUE_CLIENT_OPTIONS: dict[str, Any] = {
    "retry_total": 2,
    "initial_backoff": 0.2,  # seconds
    "increment_base": 1,  # seconds added from the second retry on
    "connection_timeout": 5,  # seconds
    "read_timeout": 30,  # seconds
}
POISON_QUEUE_SUFFIX = "-poison"
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
# Framing is the server's business: a function cannot set these without corrupting the connection.
_HOP_BY_HOP_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})

HTTP_TRIGGER = "httpTrigger"
TIMER_TRIGGER = "timerTrigger"
QUEUE_TRIGGER = "queueTrigger"
SUPPORTED_TRIGGERS = (HTTP_TRIGGER, TIMER_TRIGGER, QUEUE_TRIGGER)

AUTH_ANONYMOUS = "anonymous"
AUTH_FUNCTION = "function"
AUTH_ADMIN = "admin"


class HostError(Exception):
    """The app, its host.json or its settings cannot run under this host; the message names what to fix."""


# --- settings and host.json ---------------------------------------------------------------------------------


def read_local_settings(path: Path) -> dict[str, str]:
    """Return the ``Values`` of a local.settings.json file, or ``{}`` when the file does not exist.

    Raises HostError when the file is not JSON, is encrypted, or holds a value that is not a scalar.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        # The decoder's message names a position only, never the content (which holds secrets).
        raise HostError(f"{path.name} is not valid JSON (line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(document, dict):
        raise HostError(f"{path.name} must hold a JSON object")
    if document.get("IsEncrypted"):
        raise HostError(f"{path.name} is encrypted; this host reads plain values only (set IsEncrypted to false)")
    values = document.get("Values", {})
    if not isinstance(values, dict):
        raise HostError(f"Values in {path.name} must be an object")
    settings: dict[str, str] = {}
    for name, value in values.items():
        if isinstance(value, bool):
            settings[name] = "true" if value else "false"
        elif isinstance(value, str | int | float):
            settings[name] = str(value)
        elif value is not None:
            raise HostError(f"setting {name} in {path.name} must be a string")
    return settings


def apply_settings(values: Mapping[str, str], environ: MutableMapping[str, str]) -> list[str]:
    """Copy settings into the environment without overriding what is already set, as Core Tools does.

    Returns the names that were applied.
    """
    applied = []
    for name, value in values.items():
        if name not in environ:
            environ[name] = value
            applied.append(name)
    return applied


_TIMESPAN = re.compile(r"^(?:(?P<days>\d+)\.)?(?P<h>\d{1,2}):(?P<m>\d{1,2}):(?P<s>\d{1,2})(?:\.(?P<frac>\d{1,7}))?$")


def parse_timespan(text: str, *, setting: str) -> timedelta:
    """Parse a .NET TimeSpan (``[d.]hh:mm:ss[.fffffff]``) as host.json writes durations.

    Raises HostError naming the setting when the text is not a TimeSpan.
    """
    match = _TIMESPAN.fullmatch(text.strip())
    if not match:
        raise HostError(f"host.json {setting} must be a TimeSpan like 00:00:30, got {text!r}")
    fraction = match.group("frac") or "0"
    return timedelta(
        days=int(match.group("days") or 0),
        hours=int(match.group("h")),
        minutes=int(match.group("m")),
        seconds=int(match.group("s")) + int(fraction) / 10 ** len(fraction),
    )


@dataclass(frozen=True)
class HostOptions:
    """The parts of host.json this host honours."""

    route_prefix: str = DEFAULT_ROUTE_PREFIX
    message_encoding: str = "base64"
    max_dequeue_count: int = DEFAULT_MAX_DEQUEUE_COUNT
    batch_size: int = DEFAULT_QUEUE_BATCH_SIZE
    retry_visibility: timedelta = DEFAULT_QUEUE_RETRY_VISIBILITY
    max_polling_interval: timedelta = DEFAULT_MAX_POLLING_INTERVAL

    @classmethod
    def from_host_json(cls, document: Mapping[str, Any]) -> HostOptions:
        """Read options from a parsed host.json (version 2 layout; a top-level ``http`` section is accepted too).

        Raises HostError naming the option that is out of range or of the wrong type.
        """
        extensions = document.get("extensions") or {}
        http = extensions.get("http") or document.get("http") or {}
        queues = extensions.get("queues") or {}
        prefix = http.get("routePrefix", DEFAULT_ROUTE_PREFIX)
        if not isinstance(prefix, str):
            raise HostError("host.json extensions.http.routePrefix must be a string")
        encoding = str(queues.get("messageEncoding", "base64")).lower()
        if encoding not in ("base64", "none"):
            raise HostError("host.json extensions.queues.messageEncoding must be base64 or none")
        max_dequeue = queues.get("maxDequeueCount", DEFAULT_MAX_DEQUEUE_COUNT)
        batch = queues.get("batchSize", DEFAULT_QUEUE_BATCH_SIZE)
        for name, value in (("maxDequeueCount", max_dequeue), ("batchSize", batch)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise HostError(f"host.json extensions.queues.{name} must be a positive integer")
        options = cls(
            route_prefix=prefix.strip("/"),
            message_encoding=encoding,
            max_dequeue_count=max_dequeue,
            batch_size=min(batch, MAX_QUEUE_BATCH_SIZE),
        )
        if "visibilityTimeout" in queues:
            retry = parse_timespan(str(queues["visibilityTimeout"]), setting="extensions.queues.visibilityTimeout")
            options = replace(options, retry_visibility=retry)
        if "maxPollingInterval" in queues:
            polling = parse_timespan(str(queues["maxPollingInterval"]), setting="extensions.queues.maxPollingInterval")
            options = replace(options, max_polling_interval=max(polling, timedelta(seconds=0.1)))
        return options


def read_host_options(app_dir: Path) -> HostOptions:
    """Return the options of ``<app_dir>/host.json``, defaults when it does not exist. Raises HostError."""
    path = app_dir / "host.json"
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return HostOptions()
    except json.JSONDecodeError as exc:
        raise HostError(f"host.json is not valid JSON (line {exc.lineno})") from None
    if not isinstance(document, dict):
        raise HostError("host.json must hold a JSON object")
    return HostOptions.from_host_json(document)


_SETTING_REFERENCE = re.compile(r"%([A-Za-z_][A-Za-z0-9_.:-]*)%")


def resolve_setting_references(text: str, environ: Mapping[str, str]) -> str:
    """Replace each ``%NAME%`` by the setting's value, as the Functions host resolves binding expressions.

    Raises HostError naming a referenced setting that is not set.
    """

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        value = environ.get(name)
        if value is None:
            raise HostError(f"setting {name} is not set (referenced as %{name}%)")
        return value

    return _SETTING_REFERENCE.sub(substitute, text)


# --- routes ----------------------------------------------------------------------------------------------------

_PARAMETER = re.compile(r"\{(?P<body>[^{}]+)\}")
_PARAMETER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NUMBER = r"-?\d+(?:\.\d+)?"
_ROUTE_CONSTRAINTS = {
    "int": r"-?\d+",
    "long": r"-?\d+",
    "decimal": _NUMBER,
    "double": _NUMBER,
    "float": _NUMBER,
    "alpha": r"[A-Za-z]+",
    "bool": r"true|false",
    "guid": r"[0-9A-Fa-f]{8}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{12}",
}


@dataclass(frozen=True)
class _Segment:
    pattern: re.Pattern[str] | None
    names: tuple[str, ...]
    optional: bool = False
    catch_all: str | None = None
    constrained: int = 0

    @property
    def literal(self) -> bool:
        return not self.names and self.catch_all is None


class RouteTemplate:
    """An ASP.NET-style route template as the Functions host matches it: literal segments (case-insensitive),
    ``{name}``, ``{name:int}`` and the other simple constraints, trailing ``{name?}``, and a final ``{*rest}``.
    """

    def __init__(self, template: str) -> None:
        """Compile the template; raises HostError naming what the template gets wrong."""
        self.template = template.strip("/")
        self._segments = tuple(self._compile(self.template))

    def __repr__(self) -> str:
        return f"RouteTemplate({self.template!r})"

    def _compile(self, template: str) -> Iterator[_Segment]:
        seen: set[str] = set()
        texts = template.split("/") if template else []
        seen_optional = False
        for index, text in enumerate(texts):
            segment = self._compile_segment(text)
            names = (*segment.names, *((segment.catch_all,) if segment.catch_all else ()))
            for name in names:
                if name.lower() in seen:
                    raise HostError(f"route {template!r} names the parameter {name!r} twice")
                seen.add(name.lower())
            if segment.catch_all is not None and index != len(texts) - 1:
                raise HostError(f"route {template!r}: a catch-all parameter must be the last segment")
            if seen_optional and not segment.optional and segment.catch_all is None:
                raise HostError(f"route {template!r}: only trailing parameters can be optional")
            seen_optional = seen_optional or segment.optional
            yield segment

    @staticmethod
    def _compile_segment(text: str) -> _Segment:
        if not text:
            raise HostError("a route must not contain an empty segment (//)")
        catch_all = re.fullmatch(r"\{\*{1,2}(?P<name>[^{}:?*]+)\}", text)
        if catch_all:
            name = catch_all.group("name")
            if not _PARAMETER_NAME.match(name):
                raise HostError(f"route parameter name {name!r} is not an identifier")
            return _Segment(pattern=None, names=(), catch_all=name)
        regex: list[str] = []
        names: list[str] = []
        optional = False
        constrained = 0
        position = 0
        for match in _PARAMETER.finditer(text):
            regex.append(re.escape(text[position : match.start()]))
            body = match.group("body")
            if body.endswith("?"):
                if match.group(0) != text:
                    raise HostError(f"route segment {text!r}: an optional parameter must be a whole segment")
                optional = True
                body = body[:-1]
            name, _, constraint = body.partition(":")
            if "=" in name:
                raise HostError(f"route segment {text!r}: default values are not supported by the local host")
            if not _PARAMETER_NAME.match(name):
                raise HostError(f"route parameter name {name!r} is not an identifier")
            if constraint:
                if constraint not in _ROUTE_CONSTRAINTS:
                    raise HostError(f"route constraint {constraint!r} is not supported by the local host")
                constrained += 1
            regex.append(f"(?P<{name}>{_ROUTE_CONSTRAINTS.get(constraint, '.+?')})")
            names.append(name)
            position = match.end()
        regex.append(re.escape(text[position:]))
        if "{" in text[position:] or "}" in text[position:]:
            raise HostError(f"route segment {text!r} has an unbalanced brace")
        return _Segment(
            pattern=re.compile("".join(regex), re.IGNORECASE | re.DOTALL),
            names=tuple(names),
            optional=optional,
            constrained=constrained,
        )

    @property
    def specificity(self) -> tuple[int, int, int, int]:
        """Sort key: a template with more literal segments and constraints wins over a looser one."""
        literal = sum(1 for segment in self._segments if segment.literal)
        constrained = sum(segment.constrained for segment in self._segments)
        catch_all = sum(1 for segment in self._segments if segment.catch_all is not None)
        return (literal, constrained, -catch_all, len(self._segments))

    def match(self, path: str) -> dict[str, str] | None:
        """Match a request path below the route prefix (percent-encoded, no query string).

        Returns the decoded route parameters, or None when the path does not match.
        """
        stripped = path.strip("/")
        parts = [unquote(part) for part in stripped.split("/")] if stripped else []
        params: dict[str, str] = {}
        index = 0
        for segment in self._segments:
            if segment.catch_all is not None:
                params[segment.catch_all] = "/".join(parts[index:])
                index = len(parts)
                break
            if index >= len(parts):
                if segment.optional:
                    continue
                return None
            assert segment.pattern is not None
            found = segment.pattern.fullmatch(parts[index])
            if not found:
                return None
            params.update(found.groupdict())
            index += 1
        if index != len(parts):
            return None
        return params


def strip_route_prefix(path: str, prefix: str) -> str | None:
    """Return the part of ``path`` below the route prefix, or None when the path is outside it."""
    if not prefix:
        return path
    lowered = path.lower()
    head = "/" + prefix.lower()
    if lowered == head:
        return ""
    if lowered.startswith(head + "/"):
        return path[len(head) + 1 :]
    return None


# --- schedules ---------------------------------------------------------------------------------------------------


class NcrontabSchedule:
    """A six-field NCRONTAB schedule (``second minute hour day month day-of-week``) evaluated in UTC, as the
    Functions host does without WEBSITE_TIME_ZONE. NCrontab requires both day fields to match when both are
    restricted, unlike Unix cron's either-or.
    """

    def __init__(self, expression: str) -> None:
        """Validate the expression; raises HostError when it has not six fields or a field is invalid."""
        fields = expression.split()
        if len(fields) != 6:
            raise HostError(
                f"timer schedule {expression!r} must have six fields: second minute hour day month day-of-week"
            )
        self.expression = " ".join(fields)
        if not croniter.is_valid(self.expression, second_at_beginning=True):
            raise HostError(f"timer schedule {expression!r} is not a valid NCRONTAB expression")

    def __repr__(self) -> str:
        return f"NcrontabSchedule({self.expression!r})"

    def next_after(self, moment: datetime) -> datetime:
        """Return the first fire time strictly after ``moment`` (an aware datetime), in UTC."""
        start = moment.astimezone(UTC)
        iterator = croniter(self.expression, start, second_at_beginning=True, day_or=False)
        fire_time: datetime = iterator.get_next(datetime)
        return fire_time.astimezone(UTC)


# --- keys --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostKeys:
    """The function key and the master key this host accepts. ``repr`` never shows them."""

    function_key: str = field(repr=False)
    master_key: str = field(repr=False)

    def allows(self, presented: str | None, auth_level: str) -> bool:
        """Whether a presented key opens a function of ``auth_level`` (anonymous, function or admin).

        Every accepted key is compared with ``hmac.compare_digest``, so timing does not tell how much of a key
        was right, nor which key matched.
        """
        level = auth_level.lower()
        if level == AUTH_ANONYMOUS:
            return True
        if not presented:
            return False
        accepted = [self.master_key] if level == AUTH_ADMIN else [self.function_key, self.master_key]
        candidate = presented.encode("utf-8")
        allowed = False
        for key in accepted:
            allowed |= hmac.compare_digest(candidate, key.encode("utf-8"))
        return allowed


def _read_keys_file(path: Path) -> dict[str, str]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    if not isinstance(document, dict):
        return {}
    return {name: value for name, value in document.items() if isinstance(value, str) and value}


def _write_private_file(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(descriptor, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    os.replace(temporary, path)


def load_host_keys(environ: Mapping[str, str], keys_path: Path) -> tuple[HostKeys, Path | None]:
    """Return the keys from the settings LOCAL_FUNCTION_KEY / LOCAL_MASTER_KEY.

    A key that is not set is taken from ``keys_path`` when an earlier start wrote it there, else generated and
    written there (mode 0600), so that scripts can read it and it stays the same across restarts. Returns the keys
    and the file holding any of them (None when both come from the settings).
    """
    from_settings = {
        "functionKey": environ.get(FUNCTION_KEY_SETTING) or "",
        "masterKey": environ.get(MASTER_KEY_SETTING) or "",
    }
    if all(from_settings.values()):
        return HostKeys(from_settings["functionKey"], from_settings["masterKey"]), None
    stored = _read_keys_file(keys_path)
    kept: dict[str, str] = {}
    for name, value in from_settings.items():
        if not value:
            kept[name] = stored.get(name) or secrets.token_urlsafe(GENERATED_KEY_BYTES)
    if kept != stored:
        _write_private_file(keys_path, json.dumps(kept, indent=2) + "\n")
    elif keys_path.stat().st_mode & 0o077:
        keys_path.chmod(0o600)
    merged = {**from_settings, **kept}
    return HostKeys(merged["functionKey"], merged["masterKey"]), keys_path


# --- indexing ----------------------------------------------------------------------------------------------------


@dataclass
class FunctionEntry:
    """One indexed function: its trigger binding and how to call it."""

    name: str
    trigger_type: str
    binding: dict[str, Any]
    target: Callable[..., Any]
    trigger_parameter: str
    wants_context: bool
    route: RouteTemplate | None = None
    methods: frozenset[str] | None = None
    auth_level: str = AUTH_FUNCTION
    # A timer never overlaps itself: ticks that find this lock taken are skipped and mark the next call past due.
    single_flight: threading.Lock = field(default_factory=threading.Lock, repr=False)
    past_due_pending: bool = False


def _find_app(module: Any) -> func.FunctionRegister:
    apps = [value for value in vars(module).values() if isinstance(value, func.FunctionRegister)]
    if len(apps) != 1:
        raise HostError(f"function_app.py must define exactly one FunctionApp, found {len(apps)}")
    return apps[0]


def import_function_app(app_dir: Path) -> func.FunctionRegister:
    """Import ``<app_dir>/function_app.py`` as the module ``function_app`` and return its FunctionApp.

    Raises HostError when the file or the app is missing; errors raised by the app's own import propagate.
    """
    path = app_dir / "function_app.py"
    if not path.is_file():
        raise HostError(f"no function_app.py in {app_dir}")
    if str(app_dir) not in sys.path:
        sys.path.insert(0, str(app_dir))
    spec = importlib.util.spec_from_file_location("function_app", path)
    if spec is None or spec.loader is None:
        raise HostError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["function_app"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("function_app", None)
        raise
    return _find_app(module)


def index_functions(app: func.FunctionRegister) -> list[FunctionEntry]:
    """Index the app once (``get_functions`` may run only once per app object) into callable entries.

    Raises HostError for a trigger or binding this host cannot provide, or a parameter it cannot fill.
    """
    entries = []
    for function in app.get_functions():
        name = function.get_function_name() or function.get_user_function().__name__
        bindings = json.loads(function.get_function_json())["bindings"]
        triggers = [binding for binding in bindings if str(binding.get("type", "")).endswith("Trigger")]
        if len(triggers) != 1:
            raise HostError(f"function {name} must have exactly one trigger")
        trigger = triggers[0]
        if trigger["type"] not in SUPPORTED_TRIGGERS:
            raise HostError(f"function {name}: trigger {trigger['type']} is not supported by the local host")
        for binding in bindings:
            if binding is trigger or (binding.get("type") == "http" and trigger["type"] == HTTP_TRIGGER):
                continue
            raise HostError(
                f"function {name}: binding {binding.get('name')} of type {binding.get('type')} is not supported "
                "by the local host (use the SDK inside the function)"
            )
        target = function.get_user_function()
        parameters = inspect.signature(target).parameters
        for parameter in parameters.values():
            if parameter.name in (trigger["name"], "context"):
                continue
            if parameter.default is inspect.Parameter.empty and parameter.kind not in (
                inspect.Parameter.VAR_POSITIONAL,
                inspect.Parameter.VAR_KEYWORD,
            ):
                raise HostError(f"function {name}: parameter {parameter.name} has no binding")
        entry = FunctionEntry(
            name=name,
            trigger_type=trigger["type"],
            binding=trigger,
            target=target,
            trigger_parameter=trigger["name"],
            wants_context="context" in parameters,
        )
        if entry.trigger_type == HTTP_TRIGGER:
            entry.route = RouteTemplate(str(trigger.get("route") or name))
            methods = trigger.get("methods")
            entry.methods = frozenset(str(method).upper() for method in methods) if methods else None
            entry.auth_level = str(trigger.get("authLevel") or AUTH_FUNCTION).lower()
        entries.append(entry)
    return entries


# --- invocations -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TraceContext:
    trace_parent: str = ""
    trace_state: str = ""
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _RetryContext:
    retry_count: int = 0
    max_retry_count: int = 0
    exception: Any = None


class InvocationContext(func.Context):
    """The ``context`` argument: the invocation's id and the function's name and directory."""

    def __init__(self, function_name: str, function_directory: str) -> None:
        self._invocation_id = str(uuid.uuid4())
        self._function_name = function_name
        self._function_directory = function_directory
        self._thread_local_storage = threading.local()
        self._thread_local_storage.invocation_id = self._invocation_id

    @property
    def invocation_id(self) -> str:
        return self._invocation_id

    @property
    def function_name(self) -> str:
        return self._function_name

    @property
    def function_directory(self) -> str:
        return self._function_directory

    @property
    def thread_local_storage(self) -> Any:
        return self._thread_local_storage

    @property
    def trace_context(self) -> Any:
        return _TraceContext()

    @property
    def retry_context(self) -> Any:
        return _RetryContext()


@dataclass
class Invocation:
    """What one call of a function produced: its result or the exception it raised."""

    context: InvocationContext
    duration_ms: int
    result: Any = None
    error: BaseException | None = None


async def _await(awaitable: Any) -> Any:
    return await awaitable


def _where(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return "-"
    frame = frames[-1]
    return f"{Path(frame.filename).name}:{frame.lineno}"


class _Invoker:
    """Calls functions and counts work in progress (invocations, HTTP answers), so that a stop can wait for it."""

    def __init__(self, function_directory: str) -> None:
        self._function_directory = function_directory
        self._idle = threading.Condition()
        self._running = 0

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        with self._idle:
            self._running += 1
        try:
            yield
        finally:
            with self._idle:
                self._running -= 1
                self._idle.notify_all()

    def call(self, entry: FunctionEntry, trigger_value: Any) -> Invocation:
        context = InvocationContext(entry.name, self._function_directory)
        arguments = {entry.trigger_parameter: trigger_value}
        if entry.wants_context:
            arguments["context"] = context
        invocation = Invocation(context=context, duration_ms=0)
        started = time.monotonic()
        with self.busy():
            try:
                result = entry.target(**arguments)
                if inspect.isawaitable(result):
                    result = asyncio.run(_await(result))
                invocation.result = result
            except Exception as error:
                invocation.error = error
            finally:
                invocation.duration_ms = int((time.monotonic() - started) * 1000)
        return invocation

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._running == 0, timeout=timeout)


def log_invocation(entry: FunctionEntry, invocation: Invocation, *, status: str, error: BaseException | None) -> None:
    """Log the one line an invocation gets: fields only, never arguments, query strings, headers or bodies.

    A failure names the exception class and the line that raised it, not its message: messages of auth
    libraries can quote tokens.
    """
    if error is None:
        logger.info(
            "invocation function=%s trigger=%s invocation_id=%s duration_ms=%d outcome=succeeded status=%s",
            entry.name,
            entry.trigger_type,
            invocation.context.invocation_id,
            invocation.duration_ms,
            status,
        )
    else:
        logger.warning(
            "invocation function=%s trigger=%s invocation_id=%s duration_ms=%d outcome=failed status=%s "
            "error=%s where=%s",
            entry.name,
            entry.trigger_type,
            invocation.context.invocation_id,
            invocation.duration_ms,
            status,
            type(error).__name__,
            _where(error),
        )


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


# --- HTTP front end ----------------------------------------------------------------------------------------------


class _RequestRejectedError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], host: LocalHost) -> None:
        self.local_host = host
        super().__init__(address, _HttpHandler)


class _HttpHandler(BaseHTTPRequestHandler):
    server: _HttpServer
    protocol_version = "HTTP/1.1"
    timeout = REQUEST_SOCKET_TIMEOUT_SECONDS
    body_state = "unread"  # "unread", "consumed", or "broken" when the stream is no longer at a request boundary

    def version_string(self) -> str:
        return "LocalFunctionsHost"

    def log_message(self, format: str, *args: Any) -> None:
        # The stdlib writes the request line, query string included, and the query carries function keys.
        return

    def _dispatch(self) -> None:
        self.body_state = "unread"
        try:
            with self.server.local_host.invoker.busy():
                self.server.local_host.handle_http(self)
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

    def answer_status(self, status: int, *, headers: Sequence[tuple[str, str]] = ()) -> None:
        phrase = HTTPStatus(status).phrase.encode("ascii")
        self.answer(status, phrase, [*headers, ("Content-Type", "text/plain; charset=utf-8")])


# --- timers and queues -------------------------------------------------------------------------------------------


def _utcnow() -> datetime:
    return datetime.now(UTC)


class _TimerRunner(threading.Thread):
    def __init__(self, host: LocalHost, entry: FunctionEntry, schedule: NcrontabSchedule) -> None:
        super().__init__(name=f"timer-{entry.name}", daemon=True)
        self._host = host
        self._entry = entry
        self._schedule = schedule

    def run(self) -> None:
        stopping = self._host.stopping
        if self._entry.binding.get("runOnStartup"):
            self._tick(_utcnow(), missed=False)
        due = self._schedule.next_after(_utcnow())
        while not stopping.is_set():
            delay = (due - _utcnow()).total_seconds()
            if delay > 0 and stopping.wait(min(delay, 1.0)):
                break
            now = _utcnow()
            if now < due:
                continue
            following = self._schedule.next_after(due)
            # Waking after the following tick was due means ticks were missed (a suspended machine, say).
            missed = following <= now
            self._tick(due, missed=missed)
            due = self._schedule.next_after(now) if missed else following

    def _tick(self, due: datetime, *, missed: bool) -> None:
        entry = self._entry
        if not entry.single_flight.acquire(blocking=False):
            entry.past_due_pending = True
            logger.info("timer tick skipped function=%s reason=still_running due=%s", entry.name, due.isoformat())
            return
        past_due = entry.past_due_pending or missed
        entry.past_due_pending = False
        try:
            request = self._host.timer_request(entry, past_due=past_due, last=due)
            self._host.start_background(self._run_locked, request, name=f"invoke-{entry.name}")
        except BaseException:
            entry.single_flight.release()
            raise

    def _run_locked(self, request: func.TimerRequest) -> None:
        try:
            self._host.run_timer(self._entry, request)
        finally:
            self._entry.single_flight.release()


class _QueueRunner(threading.Thread):
    """Polls one queue like the Functions queue trigger: a small batch at a time, delete on success, the message
    back on the queue on failure, and the poison queue once it has been dequeued ``maxDequeueCount`` times.
    """

    def __init__(self, host: LocalHost, entry: FunctionEntry, connection_string: str, queue_name: str) -> None:
        super().__init__(name=f"queue-{entry.name}", daemon=True)
        self._host = host
        self._entry = entry
        self._connection_string = connection_string
        self.queue_name = queue_name
        self._options = host.options
        self._queue: Any = None
        self._poison: Any = None

    def _connect(self) -> None:
        # No encode/decode policy: the raw text is decoded here and moved to the poison queue unchanged.
        service = QueueServiceClient.from_connection_string(self._connection_string, **QUEUE_CLIENT_OPTIONS)
        queue = service.get_queue_client(self.queue_name)
        with contextlib.suppress(ResourceExistsError):
            queue.create_queue()
        self._poison = service.get_queue_client(self.queue_name + POISON_QUEUE_SUFFIX)
        self._queue = queue

    def run(self) -> None:
        stopping = self._host.stopping
        interval = MIN_POLLING_INTERVAL_SECONDS
        failing = False
        ceiling = max(self._options.max_polling_interval.total_seconds(), MIN_POLLING_INTERVAL_SECONDS)
        with ThreadPoolExecutor(self._options.batch_size, thread_name_prefix=f"queue-{self._entry.name}") as pool:
            while not stopping.is_set():
                try:
                    if self._queue is None:
                        self._connect()
                    messages = list(
                        self._queue.receive_messages(
                            messages_per_page=self._options.batch_size,
                            max_messages=self._options.batch_size,
                            visibility_timeout=QUEUE_PROCESSING_VISIBILITY_SECONDS,
                        )
                    )
                except AzureError as error:
                    # Once per outage, not every few seconds while storage stays away.
                    logger.log(
                        logging.DEBUG if failing else logging.WARNING,
                        "queue poll failed function=%s queue=%s error=%s",
                        self._entry.name,
                        self.queue_name,
                        type(error).__name__,
                    )
                    failing = True
                    stopping.wait(QUEUE_ERROR_BACKOFF_SECONDS)
                    continue
                if failing:
                    logger.info("queue poll recovered function=%s queue=%s", self._entry.name, self.queue_name)
                    failing = False
                if not messages:
                    stopping.wait(interval)
                    interval = min(interval * 2, ceiling)
                    continue
                interval = MIN_POLLING_INTERVAL_SECONDS
                wait_futures([pool.submit(self._process_safely, message) for message in messages])

    def _process_safely(self, message: Any) -> None:
        try:
            self._process(message)
        except Exception as error:
            # Storage failed while settling or poisoning: the message reappears after its visibility timeout.
            logger.warning(
                "queue message not settled function=%s message_id=%s error=%s",
                self._entry.name,
                message.id,
                type(error).__name__,
            )

    def _decode(self, content: Any) -> bytes:
        text = content if isinstance(content, str) else bytes(content).decode("utf-8")
        if self._options.message_encoding == "none":
            return text.encode("utf-8")
        return base64.b64decode(text, validate=True)

    def _process(self, message: Any) -> None:
        entry = self._entry
        dequeue_count = int(message.dequeue_count or 1)
        if dequeue_count > self._options.max_dequeue_count:
            self._move_to_poison(message, reason="max_dequeue_count")
            return
        try:
            body = self._decode(message.content)
        except (binascii.Error, ValueError):
            self._move_to_poison(message, reason="not_base64")
            return
        queue_message = TriggerQueueMessage(  # type: ignore[no-untyped-call]
            id=message.id,
            body=body,
            dequeue_count=dequeue_count,
            expiration_time=message.expires_on,
            insertion_time=message.inserted_on,
            time_next_visible=message.next_visible_on,
            pop_receipt=message.pop_receipt,
        )
        invocation = self._host.invoker.call(entry, queue_message)
        try:
            if invocation.error is None:
                self._queue.delete_message(message.id, message.pop_receipt)
                status = "deleted"
            elif dequeue_count >= self._options.max_dequeue_count:
                self._move_to_poison(message, reason="max_dequeue_count")
                status = "poisoned"
            else:
                self._queue.update_message(
                    message.id,
                    pop_receipt=message.pop_receipt,
                    visibility_timeout=int(self._options.retry_visibility.total_seconds()),
                )
                status = "retry"
        except Exception as error:
            # The message comes back after its visibility timeout; the function must tolerate the repeat.
            logger.warning(
                "queue settle failed function=%s message_id=%s error=%s", entry.name, message.id, type(error).__name__
            )
            status = "unsettled"
        log_invocation(entry, invocation, status=status, error=invocation.error)

    def _move_to_poison(self, message: Any, *, reason: str) -> None:
        with contextlib.suppress(ResourceExistsError):
            self._poison.create_queue()
        self._poison.send_message(message.content)
        self._queue.delete_message(message.id, message.pop_receipt)
        logger.warning(
            "queue message poisoned function=%s queue=%s message_id=%s dequeue_count=%s reason=%s",
            self._entry.name,
            self.queue_name,
            message.id,
            message.dequeue_count,
            reason,
        )


def _storage_connection_string(binding: Mapping[str, Any], environ: Mapping[str, str]) -> str:
    setting = str(binding.get("connection") or DEFAULT_STORAGE_CONNECTION)
    for name in (setting, f"AzureWebJobs{setting}"):
        value = environ.get(name)
        if value:
            return value
    if any(key.startswith(f"{setting}__") for key in environ):
        raise HostError(
            f"setting {setting}: identity-based connections are not supported by the local host; "
            "set it to a connection string (Azurite's, locally)"
        )
    raise HostError(f"setting {setting} is not set (the storage connection of a queue trigger)")


# --- the host ----------------------------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LocalHost:
    """Serves one function app: ``start()`` loads settings, imports and indexes the app, then runs the HTTP
    server, timers and queue pollers; ``stop()`` ends them; ``fire()`` runs one function synchronously.
    """

    def __init__(
        self,
        app_dir: str | os.PathLike[str] | None = None,
        settings_path: str | os.PathLike[str] | None = None,
        port: int = 7071,
        *,
        host: str = "127.0.0.1",
    ) -> None:
        if not _is_loopback(host):
            raise HostError(f"the local host listens on loopback only, not {host}")
        self.app_dir = Path(app_dir) if app_dir is not None else REPO_ROOT
        self.app_dir = self.app_dir.resolve()
        self.settings_path = Path(settings_path) if settings_path else self.app_dir / "local.settings.json"
        self.keys_path = self.settings_path.resolve().parent / KEYS_FILE_NAME
        self._bind = (host, port)
        self.options = HostOptions()
        self.stopping = threading.Event()
        self.invoker = _Invoker(str(self.app_dir))
        self._entries: dict[str, FunctionEntry] = {}
        self._keys: HostKeys | None = None
        self._server: _HttpServer | None = None
        self._threads: list[threading.Thread] = []
        self._background: set[threading.Thread] = set()
        self._background_lock = threading.Lock()
        self._loaded = False
        self._started = False

    # -- setup

    def load(self) -> LocalHost:
        """Load settings into the environment, then import and index the app; idempotent.

        Raises HostError when the settings, host.json or the app cannot be used.
        """
        if self._loaded:
            return self
        applied = apply_settings(read_local_settings(self.settings_path), os.environ)
        logger.info("settings loaded file=%s applied=%d", self.settings_path.name, len(applied))
        self.options = read_host_options(self.app_dir)
        entries = index_functions(import_function_app(self.app_dir))
        self._entries = {entry.name.lower(): entry for entry in entries}
        self._keys, keys_file = load_host_keys(os.environ, self.keys_path)
        if keys_file is not None:
            logger.info("host keys file=%s (functionKey, masterKey)", keys_file)
        self._loaded = True
        return self

    @property
    def keys(self) -> HostKeys:
        """The accepted keys; raises RuntimeError before ``load()``/``start()``."""
        if self._keys is None:
            raise RuntimeError("the host is not loaded yet")
        return self._keys

    @property
    def functions(self) -> list[FunctionEntry]:
        return list(self._entries.values())

    @property
    def port(self) -> int:
        if self._server is None:
            return self._bind[1]
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://{self._bind[0]}:{self.port}"

    def entry(self, function_name: str) -> FunctionEntry:
        """Return the indexed function (names are case-insensitive); raises KeyError when there is none."""
        try:
            return self._entries[function_name.lower()]
        except KeyError:
            raise KeyError(f"no function named {function_name}") from None

    def start(self) -> LocalHost:
        """Start serving. Raises HostError (nothing left running) when a trigger cannot be set up."""
        if self._started:
            return self
        self.load()
        runners: list[threading.Thread] = []
        for entry in self._entries.values():
            if entry.trigger_type == TIMER_TRIGGER:
                expression = resolve_setting_references(str(entry.binding["schedule"]), os.environ)
                runners.append(_TimerRunner(self, entry, NcrontabSchedule(expression)))
            elif entry.trigger_type == QUEUE_TRIGGER:
                connection = _storage_connection_string(entry.binding, os.environ)
                queue_name = resolve_setting_references(str(entry.binding["queueName"]), os.environ)
                runners.append(_QueueRunner(self, entry, connection, queue_name))
        self._server = _HttpServer(self._bind, self)
        self.stopping.clear()
        server_thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)
        server_thread.start()
        self._threads = [server_thread, *runners]
        for runner in runners:
            runner.start()
        self._started = True
        self._announce()
        return self

    def _announce(self) -> None:
        logger.info("host listening url=%s functions=%d", self.base_url, len(self._entries))
        for entry in self._entries.values():
            if entry.trigger_type == HTTP_TRIGGER and entry.route is not None:
                prefix = f"/{self.options.route_prefix}" if self.options.route_prefix else ""
                methods = ",".join(sorted(entry.methods)) if entry.methods else "*"
                logger.info(
                    "function=%s trigger=%s url=%s%s/%s methods=%s auth=%s",
                    entry.name,
                    entry.trigger_type,
                    self.base_url,
                    prefix,
                    entry.route.template,
                    methods,
                    entry.auth_level,
                )
            else:
                logger.info("function=%s trigger=%s", entry.name, entry.trigger_type)

    def stop(self, timeout: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """Stop accepting work, then wait up to ``timeout`` seconds for running invocations to finish."""
        if not self._started:
            return
        deadline = time.monotonic() + timeout
        self.stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for thread in [*self._threads, *self._background_snapshot()]:
            thread.join(max(0.0, deadline - time.monotonic()))
        if not self.invoker.wait_idle(max(0.0, deadline - time.monotonic())):
            logger.warning("host stopped with invocations still running")
        self._server = None
        self._threads = []
        self._started = False
        logger.info("host stopped")

    def __enter__(self) -> LocalHost:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- invoking

    def start_background(self, target: Callable[..., Any], *args: Any, name: str) -> None:
        def run() -> None:
            try:
                target(*args)
            finally:
                with self._background_lock:
                    self._background.discard(threading.current_thread())

        thread = threading.Thread(target=run, name=name, daemon=True)
        with self._background_lock:
            self._background.add(thread)
        thread.start()

    def _background_snapshot(self) -> list[threading.Thread]:
        with self._background_lock:
            return list(self._background)

    def timer_request(self, entry: FunctionEntry, *, past_due: bool, last: datetime | None = None) -> func.TimerRequest:
        now = _utcnow()
        expression = resolve_setting_references(str(entry.binding["schedule"]), os.environ)
        status = {
            "Last": (last or now).isoformat(),
            "Next": NcrontabSchedule(expression).next_after(now).isoformat(),
            "LastUpdated": now.isoformat(),
        }
        return TimerRequest(past_due=past_due, schedule_status=status, schedule={"AdjustForDST": True})

    def run_timer(self, entry: FunctionEntry, request: func.TimerRequest) -> Invocation:
        invocation = self.invoker.call(entry, request)
        log_invocation(entry, invocation, status="-", error=invocation.error)
        return invocation

    def _http_request_for(self, entry: FunctionEntry, input_text: str | None) -> func.HttpRequest:
        methods = sorted(entry.methods or {"POST"})
        method = "POST" if "POST" in methods else methods[0]
        route = entry.route.template if entry.route else entry.name
        prefix = f"/{self.options.route_prefix}" if self.options.route_prefix else ""
        return func.HttpRequest(
            method=method,
            url=f"{self.base_url}{prefix}/{route}",
            headers={},
            params={},
            route_params={},
            body=(input_text or "").encode("utf-8"),
        )

    def _invoke_on_demand(self, entry: FunctionEntry, input_text: str | None, *, past_due: bool = False) -> Invocation:
        if entry.trigger_type == TIMER_TRIGGER:
            with entry.single_flight:
                return self.run_timer(entry, self.timer_request(entry, past_due=past_due))
        if entry.trigger_type == QUEUE_TRIGGER:
            now = _utcnow()
            message = TriggerQueueMessage(  # type: ignore[no-untyped-call]
                id=str(uuid.uuid4()),
                body=(input_text or "").encode("utf-8"),
                dequeue_count=1,
                insertion_time=now,
                expiration_time=now + timedelta(days=7),
                time_next_visible=now,
                pop_receipt=None,
            )
            invocation = self.invoker.call(entry, message)
            log_invocation(entry, invocation, status="on_demand", error=invocation.error)
            return invocation
        invocation = self.invoker.call(entry, self._http_request_for(entry, input_text))
        status = "500"
        error = invocation.error
        if error is None:
            try:
                status = str(http_answer(invocation.result)[0])
            except TypeError as bad_result:
                error = bad_result
        log_invocation(entry, invocation, status=status, error=error)
        return invocation

    def fire(self, function_name: str, *, input: str | None = None, past_due: bool = False) -> Any:
        """Run one function now, on this thread, whatever its trigger, as the admin endpoint would.

        A timer waits for a running invocation of itself to end first. ``input`` is a queue message's text or an
        HTTP request's body. Returns what the function returned; re-raises what it raised. Loads the app if needed.
        """
        self.load()
        invocation = self._invoke_on_demand(self.entry(function_name), input, past_due=past_due)
        if invocation.error is not None:
            raise invocation.error
        return invocation.result

    # -- HTTP

    def handle_http(self, handler: _HttpHandler) -> None:
        """Answer one request: the admin endpoints, else the matching HTTP function."""
        if self.stopping.is_set():
            # A kept-alive connection can outlive the listener; its next request must not start new work.
            handler.answer_status(HTTPStatus.SERVICE_UNAVAILABLE)
            return
        split = urlsplit(handler.path)
        query = parse_qsl(split.query, keep_blank_values=True)
        if split.path.lower().startswith("/admin/"):
            self._handle_admin(handler, split.path, query)
            return
        below_prefix = strip_route_prefix(split.path, self.options.route_prefix)
        candidates: list[tuple[FunctionEntry, dict[str, str]]] = []
        if below_prefix is not None:
            for entry in self._entries.values():
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
        if not self.keys.allows(handler.presented_key(query), entry.auth_level):
            logger.info("http rejected function=%s status=401 reason=key", entry.name)
            handler.answer_status(HTTPStatus.UNAUTHORIZED)
            return
        try:
            body = handler.read_body()
        except _RequestRejectedError as rejected:
            logger.info("http rejected function=%s status=%d reason=body", entry.name, rejected.status)
            handler.answer_status(rejected.status)
            return
        request = func.HttpRequest(
            method=method,
            url=f"http://{handler.headers.get('Host') or f'{self._bind[0]}:{self.port}'}{handler.path}",
            headers=self._request_headers(handler),
            params=self._first_values(query),
            route_params=route_params,
            body=body,
        )
        invocation = self.invoker.call(entry, request)
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

    @staticmethod
    def _request_headers(handler: _HttpHandler) -> dict[str, str]:
        headers: dict[str, str] = {}
        for name, value in handler.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        return headers

    @staticmethod
    def _first_values(query: Sequence[tuple[str, str]]) -> dict[str, str]:
        params: dict[str, str] = {}
        for name, value in query:
            params.setdefault(name, value)
        return params

    def _handle_admin(self, handler: _HttpHandler, path: str, query: Sequence[tuple[str, str]]) -> None:
        parts = [unquote(part) for part in path.strip("/").split("/")]
        if parts[1:] == ["host", "ping"]:
            handler.answer_status(HTTPStatus.OK)
            return
        is_status = parts[1:] == ["host", "status"]
        is_function = len(parts) == 3 and parts[1] == "functions"
        if not (is_status or is_function):
            handler.answer_status(HTTPStatus.NOT_FOUND)
            return
        if not self.keys.allows(handler.presented_key(query), AUTH_ADMIN):
            logger.info("admin rejected status=401 reason=key")
            handler.answer_status(HTTPStatus.UNAUTHORIZED)
            return
        if is_status:
            payload = json.dumps({"state": "Running", "functions": sorted(e.name for e in self._entries.values())})
            handler.answer(HTTPStatus.OK, payload.encode(), [("Content-Type", "application/json")])
            return
        if handler.command != "POST":
            handler.answer_status(HTTPStatus.METHOD_NOT_ALLOWED, headers=[("Allow", "POST")])
            return
        try:
            entry = self.entry(parts[2])
        except KeyError:
            handler.answer_status(HTTPStatus.NOT_FOUND)
            return
        try:
            body = handler.read_body()
        except _RequestRejectedError as rejected:
            handler.answer_status(rejected.status)
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
        self.start_background(self._invoke_on_demand, entry, input_text, name=f"admin-{entry.name}")
        handler.answer(HTTPStatus.ACCEPTED)


# --- command line ------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the host until SIGTERM or SIGINT. Returns 0 after a clean stop, 2 when the app cannot start."""
    parser = argparse.ArgumentParser(prog="python -m devstack.host", description=__doc__.splitlines()[0])
    parser.add_argument("--app-dir", default=str(REPO_ROOT), help="directory holding function_app.py")
    parser.add_argument("--settings", default=None, help="local.settings.json (default: <app-dir>/local.settings.json)")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    parser.add_argument("--port", type=int, default=7071)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # The SDKs log every request at INFO; queue polling would drown the invocation lines.
    logging.getLogger("azure").setLevel(logging.WARNING)

    stop_requested = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        host = LocalHost(args.app_dir, args.settings, args.port, host=args.host)
        host.start()
    except HostError as error:
        logger.error("host cannot start: %s", error)
        return 2
    try:
        while not stop_requested.wait(0.5):
            pass
    finally:
        host.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
