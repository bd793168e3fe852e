"""Which emails of a campaign fall due when, per delegation: pure code, no I/O, no clock.

The calendar of one delegation is a list of :class:`Slot`:

* ``request`` at the campaign's ``opens`` (given in the secretariat's time zone);
* ``reminder:-3d`` … at ``send_time`` local time on the deadline-relative days,
  moved to the working day before when it falls on a weekend;
* ``overdue:1`` … the first on the day after the deadline, then every ``every``
  days, at most ``max``, moved to the working day after a weekend.

The deadline is the end of its day in the delegation's own time zone. Local
times are turned into instants by :mod:`zoneinfo`, so daylight-saving changes
are handled by the time-zone database, never by fixed offsets.

:func:`decide` says what to do at an instant given what was already done.
After downtime only the latest missed reminder or overdue notice goes out;
the older ones are *superseded* and never sent.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from mailflow.config import Campaign, Delegation

REQUEST = "request"
REMINDER = "reminder"
OVERDUE = "overdue"
SATURDAY = 5


@dataclass(frozen=True)
class Slot:
    """One scheduled email to one delegation."""

    kind: str  # request | reminder | overdue
    key: str  # unique per delegation and campaign: "request", "reminder:-3d", "overdue:2"
    at: datetime  # aware UTC
    local_day: date  # the day it goes out in the delegation's time zone

    @property
    def is_nudge(self) -> bool:
        """Reminders and overdue notices: the emails that chase an answer."""
        return self.kind != REQUEST


@dataclass(frozen=True)
class Decision:
    """What one delegation needs at one instant."""

    due: tuple[Slot, ...] = ()
    superseded: tuple[Slot, ...] = ()


def local_instant(day: date, at: time, tz: ZoneInfo) -> datetime:
    """The UTC instant of a wall-clock time on a day in a zone (DST by zoneinfo)."""
    return datetime.combine(day, at, tzinfo=tz).astimezone(UTC)


def deadline_end(campaign: Campaign, delegation: Delegation) -> datetime:
    """The instant the deadline ends: midnight after the deadline day, delegation time."""
    return local_instant(campaign.deadline + timedelta(days=1), time(0, 0), delegation.tz)


def _is_weekend(day: date) -> bool:
    return day.weekday() >= SATURDAY


def _working_day(day: date, step: int) -> date:
    while _is_weekend(day):
        day += timedelta(days=step)
    return day


def slots(campaign: Campaign, delegation: Delegation) -> list[Slot]:
    """Every email the campaign would send this delegation if it never answered, in time order."""
    tz = delegation.tz
    opens = campaign.opens.astimezone(UTC)
    end = deadline_end(campaign, delegation)
    out = [Slot(REQUEST, REQUEST, opens, campaign.opens.astimezone(tz).date())]

    taken_days: set[date] = set()
    # Closest to the deadline first, so that when two reminders collide on a
    # working day after the weekend shift, the more urgent one is kept.
    for offset in sorted(campaign.reminders, reverse=True):
        day = campaign.deadline + timedelta(days=offset)
        if campaign.skip_weekends:
            day = _working_day(day, -1)
        at = local_instant(day, campaign.send_time, tz)
        if day in taken_days or at <= opens or at >= end:
            continue
        taken_days.add(day)
        out.append(Slot(REMINDER, f"{REMINDER}:{offset}d", at, day))

    overdue_days: set[date] = set()
    for number in range(1, campaign.overdue.max + 1):
        day = campaign.deadline + timedelta(days=1 + (number - 1) * campaign.overdue.every_days)
        if campaign.skip_weekends:
            day = _working_day(day, +1)
        if day in overdue_days:
            continue
        overdue_days.add(day)
        out.append(Slot(OVERDUE, f"{OVERDUE}:{number}", local_instant(day, campaign.send_time, tz), day))
    return sorted(out, key=lambda slot: slot.at)


def decide(
    calendar: Sequence[Slot],
    *,
    now: datetime,
    done: Collection[str],
    complete: bool,
    request_sent_at: datetime | None = None,
) -> Decision:
    """What to send a delegation at ``now``.

    ``done`` holds the slot keys already recorded (sent, pending or skipped),
    ``request_sent_at`` when the request actually went out. A complete
    delegation gets nothing. Nudges that fell due before the request went out,
    or that were missed and are not the latest, are superseded."""
    if complete:
        return Decision()
    request = next((slot for slot in calendar if slot.kind == REQUEST), None)
    past_nudges = [slot for slot in calendar if slot.is_nudge and slot.key not in done and slot.at <= now]
    if request is not None and request.key not in done:
        if request.at > now:
            return Decision()
        # The request goes out now; whatever chasing fell due before it is moot.
        return Decision(due=(request,), superseded=tuple(past_nudges))
    if not past_nudges:
        return Decision()
    stale = [slot for slot in past_nudges if request_sent_at is not None and slot.at < request_sent_at]
    eligible = [slot for slot in past_nudges if slot not in stale]
    if not eligible:
        return Decision(superseded=tuple(stale))
    latest = max(eligible, key=lambda slot: slot.at)
    return Decision(due=(latest,), superseded=tuple(slot for slot in past_nudges if slot is not latest))


def next_nudge(
    calendar: Sequence[Slot],
    *,
    now: datetime,
    done: Collection[str],
    complete: bool,
    request_sent_at: datetime | None = None,
) -> Slot | None:
    """The next reminder or overdue notice this delegation will receive, if any.

    A nudge already due but not yet recorded (it goes out on the next pass)
    counts, unless :func:`decide` would supersede it."""
    if complete:
        return None
    pending = [slot for slot in calendar if slot.is_nudge and slot.key not in done]
    if REQUEST in done:
        past = [slot for slot in pending if slot.at <= now and (request_sent_at is None or slot.at >= request_sent_at)]
        if past:
            return max(past, key=lambda slot: slot.at)
    future = [slot for slot in pending if slot.at > now]
    return min(future, key=lambda slot: slot.at) if future else None


def days_left(slot: Slot, campaign: Campaign) -> int:
    """Whole days from the slot's local day to the deadline day (0 on the day)."""
    return max((campaign.deadline - slot.local_day).days, 0)


def days_overdue(slot: Slot, campaign: Campaign) -> int:
    """Whole days since the deadline day, as the delegation's calendar reads on the slot's day."""
    return max((slot.local_day - campaign.deadline).days, 0)


def latest_cron_slot(expression: str, tz: ZoneInfo, now: datetime, after: datetime | None) -> datetime | None:
    """The latest instant at or before ``now`` at which a crontab line fires, if later than ``after``.

    Used for the digest: after downtime only the latest missed slot counts, so a digest missed
    while the service was down goes out once, never once per missed slot. Looks back at most a
    week (a digest older than that is not worth sending)."""
    from mailflow.cron import cron_trigger

    trigger = cron_trigger(expression, tz)
    start = now - timedelta(days=7)
    if after is not None and after > start:
        start = after + timedelta(seconds=1)
    latest: datetime | None = None
    fire = trigger.get_next_fire_time(None, start.astimezone(tz))
    while fire is not None and fire <= now:
        latest = fire
        fire = trigger.get_next_fire_time(fire, fire + timedelta(seconds=1))
    return latest.astimezone(UTC) if latest is not None else None


def closes_at(campaign: Campaign, tz: ZoneInfo) -> datetime | None:
    """When a campaign closes: the end of its ``closes`` day in the secretariat's time zone."""
    if campaign.closes is None:
        return None
    return local_instant(campaign.closes + timedelta(days=1), time(0, 0), tz)


def is_open(campaign: Campaign, tz: ZoneInfo, now: datetime) -> bool:
    """Opened, and not yet closed."""
    end = closes_at(campaign, tz)
    return campaign.opens <= now and (end is None or now < end)
