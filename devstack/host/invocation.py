"""Invocations: the ``context`` argument, calling a function (sync or async) while counting work in progress, and
the one log line each invocation gets."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import azure.functions as func

from devstack.host import worker_logs
from devstack.host.indexing import FunctionEntry

logger = logging.getLogger(__name__)


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
        # The worker's one thread-local, as in Azure: setting its invocation_id on a thread the app started
        # carries the invocation's logs from that thread (see worker_logs).
        return worker_logs.INVOCATION_LOCAL

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


class Invoker:
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
        with self.busy(), worker_logs.running(context.invocation_id):
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
