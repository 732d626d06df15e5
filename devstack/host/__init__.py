"""A local Azure Functions host for ``function_app.py`` (v2 model): HTTP, timer and queue triggers.

Core Tools cannot be installed here, so this host indexes the app with the public ``azure.functions`` API and
serves it the way the Functions runtime does: ``local.settings.json`` values as environment variables,
``/api/<route>`` with auth levels and keys, NCRONTAB timers that never overlap themselves, queue triggers with
base64 decoding and a poison queue, and the admin endpoint that fires a function on demand.

Run: ``python -m devstack.host [--app-dir DIR] [--settings FILE] [--host 127.0.0.1] [--port 7071]``.

One module per concern: ``settings`` (local.settings.json, host.json, ``%NAME%``), ``keys``, ``routes``,
``indexing`` (the app's functions), ``invocation``, ``server`` (HTTP and the admin endpoints), ``timers``,
``queues``, ``local_host`` (start, stop, fire) and ``cli``. The names below are the host's public interface.
"""

from __future__ import annotations

from devstack.host.cli import main
from devstack.host.errors import HostError
from devstack.host.indexing import FunctionEntry, import_function_app, index_functions
from devstack.host.invocation import Invocation, InvocationContext
from devstack.host.keys import FUNCTION_KEY_SETTING, MASTER_KEY_SETTING, HostKeys, load_host_keys
from devstack.host.local_host import LocalHost
from devstack.host.routes import RouteTemplate, strip_route_prefix
from devstack.host.server import MAX_REQUEST_BODY_BYTES, http_answer
from devstack.host.settings import (
    HostOptions,
    apply_settings,
    parse_timespan,
    read_host_options,
    read_local_settings,
    resolve_setting_references,
)
from devstack.host.timers import NcrontabSchedule

__all__ = [
    "FUNCTION_KEY_SETTING",
    "MASTER_KEY_SETTING",
    "MAX_REQUEST_BODY_BYTES",
    "FunctionEntry",
    "HostError",
    "HostKeys",
    "HostOptions",
    "Invocation",
    "InvocationContext",
    "LocalHost",
    "NcrontabSchedule",
    "RouteTemplate",
    "apply_settings",
    "http_answer",
    "import_function_app",
    "index_functions",
    "load_host_keys",
    "main",
    "parse_timespan",
    "read_host_options",
    "read_local_settings",
    "resolve_setting_references",
    "strip_route_prefix",
]
