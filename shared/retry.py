"""One retry policy for the whole app.

- The Azure SDK clients retry their own calls, a few quick times (configured once, in ``shared.azure_clients``).
  The app never wraps an SDK call in a loop of its own: stacked, the two multiply (three app attempts around a
  Key Vault client that retries three times made up to twelve calls, with sleeps in between).
- No call, with the SDK's retries, runs past the run's deadline: ``call_options`` hands the SDK the time that is
  left (azure-core's per-call ``timeout`` covers the attempts and the waits between them), and turns retries off
  when too little is left for one.
- What a run cannot finish is retried by the next run: the registry's ``retry_after`` holds a throttled mailbox
  back for as long as the service asked.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from shared.errors import TransientError

MIN_CALL_SECONDS = 1.0  # less than this left: do not start a call that would only time out
MIN_RETRY_SECONDS = 10.0  # less than this left: one attempt, no retry (a backoff alone may take seconds)


def call_options(deadline: float | None, *, clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    """Keyword options for one SDK call that must end by ``deadline`` (a ``clock`` time; None: no deadline).

    Raises TransientError when the deadline is too close to start the call: the next run makes it.
    """
    if deadline is None:
        return {}
    remaining = deadline - clock()
    if remaining < MIN_CALL_SECONDS:
        raise TransientError(
            "the run's time budget is spent; the call is left to the next run",
            remedy="nothing to do: the next run goes on from here",
        )
    options: dict[str, Any] = {"timeout": int(remaining) or 1}
    if remaining < MIN_RETRY_SECONDS:
        options["retry_total"] = 0
    return options
