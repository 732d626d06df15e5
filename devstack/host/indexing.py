"""Indexing: import ``function_app.py``, read each function's trigger and bindings through the public
``azure.functions`` API, and refuse what this host cannot provide."""

from __future__ import annotations

import importlib.util
import inspect
import json
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import azure.functions as func

from devstack.host.errors import HostError
from devstack.host.keys import AUTH_FUNCTION
from devstack.host.routes import RouteTemplate

HTTP_TRIGGER = "httpTrigger"
TIMER_TRIGGER = "timerTrigger"
QUEUE_TRIGGER = "queueTrigger"
SUPPORTED_TRIGGERS = (HTTP_TRIGGER, TIMER_TRIGGER, QUEUE_TRIGGER)


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
