"""Settings and host.json: ``local.settings.json`` values as environment variables (as Core Tools applies them),
the host.json options this host honours, ``%NAME%`` binding expressions and the storage connection of a trigger."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from devstack.host.errors import HostError

DEFAULT_ROUTE_PREFIX = "api"
DEFAULT_STORAGE_CONNECTION = "AzureWebJobsStorage"
DEFAULT_MAX_DEQUEUE_COUNT = 5  # the Functions host default (host.json extensions.queues.maxDequeueCount)
DEFAULT_QUEUE_BATCH_SIZE = 4  # Azure fetches 16; two shared cores and a local stack want fewer
MAX_QUEUE_BATCH_SIZE = 32  # the Storage service returns at most 32 messages per receive
DEFAULT_QUEUE_RETRY_VISIBILITY = timedelta(0)  # the Functions default: a failed message is visible again at once
DEFAULT_MAX_POLLING_INTERVAL = timedelta(seconds=2)  # Azure backs off to 1 minute; locally we want quick turns


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
    # A new batch is fetched once this few messages are still being processed, so up to batch_size plus this many
    # run at once. Azure's default is N * batchSize / 2 for N vCPUs; the local host takes N as 1.
    new_batch_threshold: int = DEFAULT_QUEUE_BATCH_SIZE // 2
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
        batch = min(batch, MAX_QUEUE_BATCH_SIZE)
        threshold = queues.get("newBatchThreshold", batch // 2)
        if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 0:
            raise HostError("host.json extensions.queues.newBatchThreshold must be a whole number, 0 or more")
        options = cls(
            route_prefix=prefix.strip("/"),
            message_encoding=encoding,
            max_dequeue_count=max_dequeue,
            batch_size=batch,
            new_batch_threshold=threshold,
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


def function_disabled(name: str, environ: Mapping[str, str]) -> bool:
    """The runtime's per-function switch: app setting ``AzureWebJobs.<name>.Disabled`` set to true (or 1)."""
    return environ.get(f"AzureWebJobs.{name}.Disabled", "").strip().lower() in ("true", "1")


def storage_connection_string(binding: Mapping[str, Any], environ: Mapping[str, str]) -> str:
    """The connection string a queue trigger names (``connection``, default AzureWebJobsStorage).

    Raises HostError when it is not set or is an identity-based connection, which this host cannot use.
    """
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
