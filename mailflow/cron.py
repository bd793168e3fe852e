"""Crontab lines with standard meaning, on top of APScheduler.

APScheduler 3 numbers weekdays from Monday = 0, while crontab numbers them from
Sunday = 0 (and 7): taken as is, the usual ``0 8 * * 1-5`` would fire Tuesday to
Saturday. :func:`cron_trigger` translates the weekday field to names first."""

from __future__ import annotations

from zoneinfo import ZoneInfo

from apscheduler.triggers.cron import CronTrigger

# crontab weekday number -> APScheduler weekday name (0 and 7 are both Sunday)
_DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _weekdays(field: str) -> str:
    """The crontab weekday field with every number turned into a name (ranges and steps expanded)."""
    if not any(ch.isdigit() for ch in field):
        return field  # '*', names
    names: list[str] = []
    for part in field.split(","):
        base, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if step < 1:
            raise ValueError(f"bad step in weekday field {field!r}")
        if base == "*":
            first, last = 0, 6
        elif "-" in base:
            low, high = base.split("-", 1)
            first, last = int(low), int(high)
        else:
            first = int(base)
            last = 7 if step_text else first
        if not (0 <= first <= 7 and 0 <= last <= 7) or first > last:
            raise ValueError(f"weekday field {field!r}: days are 0-7 (0 and 7 are Sunday)")
        names.extend(_DAY_NAMES[day] for day in range(first, last + 1, step))
    return ",".join(dict.fromkeys(names))


def cron_trigger(expression: str, tz: ZoneInfo) -> CronTrigger:
    """An APScheduler trigger for a 5-field crontab line, with crontab's weekday numbering."""
    fields = str(expression).split()
    if len(fields) != 5:
        raise ValueError(f"{expression!r} is not a cron expression (5 fields: minute hour day month weekday)")
    minute, hour, day, month, weekday = fields
    return CronTrigger(
        minute=minute, hour=hour, day=day, month=month, day_of_week=_weekdays(weekday.lower()), timezone=tz
    )
