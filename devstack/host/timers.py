"""Timer triggers: six-field NCRONTAB schedules and the thread that fires a timer without overlapping itself."""

from __future__ import annotations

import logging
import os
import threading
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import azure.functions as func
from azure.functions.timer import TimerRequest
from croniter import croniter

from devstack.host.errors import HostError
from devstack.host.indexing import FunctionEntry
from devstack.host.settings import resolve_setting_references

if TYPE_CHECKING:
    from devstack.host.local_host import LocalHost

logger = logging.getLogger(__name__)


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


def utcnow() -> datetime:
    return datetime.now(UTC)


def timer_request(entry: FunctionEntry, *, past_due: bool, last: datetime | None = None) -> func.TimerRequest:
    """The ``timer`` argument of one call: past-due flag and the schedule status the Functions host passes."""
    now = utcnow()
    expression = resolve_setting_references(str(entry.binding["schedule"]), os.environ)
    status = {
        "Last": (last or now).isoformat(),
        "Next": NcrontabSchedule(expression).next_after(now).isoformat(),
        "LastUpdated": now.isoformat(),
    }
    return TimerRequest(past_due=past_due, schedule_status=status, schedule={"AdjustForDST": True})


class TimerRunner(threading.Thread):
    def __init__(self, host: LocalHost, entry: FunctionEntry, schedule: NcrontabSchedule) -> None:
        super().__init__(name=f"timer-{entry.name}", daemon=True)
        self._host = host
        self._entry = entry
        self._schedule = schedule

    def run(self) -> None:
        stopping = self._host.stopping
        if self._entry.binding.get("runOnStartup"):
            self._tick(utcnow(), missed=False)
        due = self._schedule.next_after(utcnow())
        while not stopping.is_set():
            delay = (due - utcnow()).total_seconds()
            if delay > 0 and stopping.wait(min(delay, 1.0)):
                break
            now = utcnow()
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
            request = timer_request(entry, past_due=past_due, last=due)
            self._host.start_background(self._run_locked, request, name=f"invoke-{entry.name}")
        except BaseException:
            entry.single_flight.release()
            raise

    def _run_locked(self, request: func.TimerRequest) -> None:
        try:
            self._host.run_timer(self._entry, request)
        finally:
            self._entry.single_flight.release()
