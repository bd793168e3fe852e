"""Crontab weekday numbering (Sunday = 0 or 7), not APScheduler's (Monday = 0)."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from mailflow.cron import _weekdays, cron_trigger

CR = ZoneInfo("America/Costa_Rica")


@pytest.mark.parametrize(
    ("field", "names"),
    [
        ("1-5", "mon,tue,wed,thu,fri"),
        ("0", "sun"),
        ("7", "sun"),
        ("0,6", "sun,sat"),
        ("5-7", "fri,sat,sun"),
        ("*/2", "sun,tue,thu,sat"),
        ("1/2", "mon,wed,fri,sun"),
        ("*", "*"),
        ("mon-fri", "mon-fri"),
    ],
)
def test_weekday_numbers_become_names(field: str, names: str) -> None:
    assert _weekdays(field) == names


def test_the_usual_weekday_digest_fires_monday_to_friday() -> None:
    trigger = cron_trigger("0 8 * * 1-5", CR)
    fire = trigger.get_next_fire_time(None, datetime(2017, 10, 21, tzinfo=UTC))  # a Saturday
    days = []
    for _ in range(7):
        assert fire is not None
        days.append(fire.strftime("%a %H:%M"))
        fire = trigger.get_next_fire_time(fire, fire.replace(second=1))
    assert days == ["Mon 08:00", "Tue 08:00", "Wed 08:00", "Thu 08:00", "Fri 08:00", "Mon 08:00", "Tue 08:00"]


@pytest.mark.parametrize("bad", ["0 8 * *", "0 25 * * *", "0 8 * * 8", "0 8 * * 5-1", "x 8 * * *"])
def test_bad_expressions_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        cron_trigger(bad, CR)
