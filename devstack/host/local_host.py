"""The host itself: load settings and the app, start the HTTP server, timers and queue pollers, stop them, and
fire a function on demand."""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import azure.functions as func

from devstack.host.errors import HostError
from devstack.host.indexing import (
    HTTP_TRIGGER,
    QUEUE_TRIGGER,
    TIMER_TRIGGER,
    FunctionEntry,
    import_function_app,
    index_functions,
)
from devstack.host.invocation import Invocation, Invoker, log_invocation
from devstack.host.keys import KEYS_FILE_NAME, HostKeys, load_host_keys
from devstack.host.queues import QueueRunner, on_demand_message
from devstack.host.server import HttpServer, http_answer
from devstack.host.settings import (
    HostOptions,
    apply_settings,
    function_disabled,
    read_host_options,
    read_local_settings,
    resolve_setting_references,
    storage_connection_string,
)
from devstack.host.timers import NcrontabSchedule, TimerRunner, timer_request

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
SHUTDOWN_GRACE_SECONDS = 10.0  # how long stop() lets running invocations finish before giving up on them


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
        self.invoker = Invoker(str(self.app_dir))
        self._entries: dict[str, FunctionEntry] = {}
        self._keys: HostKeys | None = None
        self._server: HttpServer | None = None
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
            if function_disabled(entry.name, os.environ):
                # As the Functions runtime does: a disabled function's trigger does not run (it may still be fired).
                logger.info("function disabled by setting function=%s", entry.name)
                continue
            if entry.trigger_type == TIMER_TRIGGER:
                expression = resolve_setting_references(str(entry.binding["schedule"]), os.environ)
                runners.append(TimerRunner(self, entry, NcrontabSchedule(expression)))
            elif entry.trigger_type == QUEUE_TRIGGER:
                connection = storage_connection_string(entry.binding, os.environ)
                queue_name = resolve_setting_references(str(entry.binding["queueName"]), os.environ)
                runners.append(QueueRunner(self, entry, connection, queue_name))
        self._server = HttpServer(self._bind, self)
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

    def invoke_on_demand(self, entry: FunctionEntry, input_text: str | None, *, past_due: bool = False) -> Invocation:
        if entry.trigger_type == TIMER_TRIGGER:
            with entry.single_flight:
                return self.run_timer(entry, timer_request(entry, past_due=past_due))
        if entry.trigger_type == QUEUE_TRIGGER:
            message = on_demand_message(input_text or "")
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
        invocation = self.invoke_on_demand(self.entry(function_name), input, past_due=past_due)
        if invocation.error is not None:
            raise invocation.error
        return invocation.result
