"""Six-field NCRONTAB schedules, %SETTING% references and TimeSpans as the local Functions host reads them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from devstack.host import HostError, NcrontabSchedule, parse_timespan, resolve_setting_references


def _at(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def test_every_second_fires_strictly_after_the_given_moment() -> None:
    schedule = NcrontabSchedule("*/1 * * * * *")
    assert schedule.next_after(_at(2024, 1, 1, 0, 0, 0)) == _at(2024, 1, 1, 0, 0, 1)
    assert schedule.next_after(_at(2024, 1, 1, 0, 0, 0) + timedelta(milliseconds=400)) == _at(2024, 1, 1, 0, 0, 1)


def test_the_collect_schedule_default() -> None:
    schedule = NcrontabSchedule("0 */5 * * * *")
    first = schedule.next_after(_at(2024, 3, 10, 12, 3, 59))
    assert first == _at(2024, 3, 10, 12, 5, 0)
    assert schedule.next_after(first) == _at(2024, 3, 10, 12, 10, 0)


def test_seconds_come_first() -> None:
    # Read as five-field cron with a year this would be "minute 30"; NCRONTAB's first field is the second.
    schedule = NcrontabSchedule("30 0 9 * * 1-5")
    assert schedule.next_after(_at(2024, 1, 5, 9, 0, 30)) == _at(2024, 1, 8, 9, 0, 30)  # Friday -> Monday


def test_both_day_fields_must_match() -> None:
    # NCrontab needs day 13 AND Friday; Unix cron would fire on every 13th and every Friday.
    schedule = NcrontabSchedule("0 0 0 13 * FRI")
    assert schedule.next_after(_at(2024, 1, 1)) == _at(2024, 9, 13)


def test_fire_times_are_utc_whatever_the_input_zone() -> None:
    schedule = NcrontabSchedule("0 0 * * * *")
    local = datetime(2024, 1, 1, 10, 30, tzinfo=timezone(timedelta(hours=2)))
    assert schedule.next_after(local) == _at(2024, 1, 1, 9, 0, 0)
    assert schedule.next_after(local).tzinfo == UTC


@pytest.mark.parametrize("expression", ["*/5 * * * *", "0 0 0 * * * *", "", "61 * * * * *", "* * * * * NOPE"])
def test_invalid_schedules_are_refused(expression: str) -> None:
    with pytest.raises(HostError, match="schedule"):
        NcrontabSchedule(expression)


def test_setting_references_are_resolved() -> None:
    environ = {"COLLECT_SCHEDULE": "0 */5 * * * *", "QUEUE": "collect-work"}
    assert resolve_setting_references("%COLLECT_SCHEDULE%", environ) == "0 */5 * * * *"
    assert resolve_setting_references("%QUEUE%-poison", environ) == "collect-work-poison"
    assert resolve_setting_references("0 */5 * * * *", environ) == "0 */5 * * * *"


def test_a_missing_setting_is_named() -> None:
    with pytest.raises(HostError, match="COLLECT_SCHEDULE is not set"):
        resolve_setting_references("%COLLECT_SCHEDULE%", {})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("00:00:30", timedelta(seconds=30)),
        ("01:02:03", timedelta(hours=1, minutes=2, seconds=3)),
        ("1.00:00:00", timedelta(days=1)),
        ("00:00:00.250", timedelta(milliseconds=250)),
    ],
)
def test_timespans(text: str, expected: timedelta) -> None:
    assert parse_timespan(text, setting="x") == expected


def test_an_invalid_timespan_names_the_setting() -> None:
    with pytest.raises(HostError, match=r"extensions\.queues\.visibilityTimeout"):
        parse_timespan("30", setting="extensions.queues.visibilityTimeout")
