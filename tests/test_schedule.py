"""The schedule is pure: every case is a campaign, a delegation and an instant."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, time
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from mailflow.config import Campaign, Delegation, OverduePolicy
from mailflow.schedule import Slot, deadline_end, decide, next_nudge, slots

CR = ZoneInfo("America/Costa_Rica")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def campaign(**changes: object) -> Campaign:
    base = Campaign(
        id="responsible-2017",
        title="Responsible column",
        workbook=Path("plan.xlsx"),
        key_column="Code",
        fill_column="Responsible",
        opens=datetime(2017, 10, 18, 10, 0, tzinfo=CR),
        deadline=date(2017, 10, 23),
        delegations=("HN",),
        ref="responsible-2017",
        send_time=time(9, 0),
        reminders=(-3, -1, 0),
        overdue=OverduePolicy(every_days=2, max=3),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def delegation(zone: str = "America/Tegucigalpa", ident: str = "HN") -> Delegation:
    return Delegation(ident, ident, "es", zone, (f"{ident.lower()}@example.org",))


def by_key(calendar: list[Slot]) -> dict[str, datetime]:
    return {slot.key: slot.at for slot in calendar}


def test_calendar_of_honduras_with_weekend_shifts() -> None:
    calendar = by_key(slots(campaign(), delegation()))
    assert calendar == {
        "request": utc(2017, 10, 18, 16, 0),
        # -1d is Sunday 22: moved to Friday 20, where it takes the place of -3d.
        "reminder:-1d": utc(2017, 10, 20, 15, 0),
        "reminder:0d": utc(2017, 10, 23, 15, 0),
        "overdue:1": utc(2017, 10, 24, 15, 0),
        "overdue:2": utc(2017, 10, 26, 15, 0),
        # Saturday 28 moves to the Monday after.
        "overdue:3": utc(2017, 10, 30, 15, 0),
    }


def test_without_weekend_skipping_every_reminder_keeps_its_day() -> None:
    calendar = by_key(slots(campaign(skip_weekends=False), delegation()))
    assert calendar["reminder:-3d"] == utc(2017, 10, 20, 15, 0)
    assert calendar["reminder:-1d"] == utc(2017, 10, 22, 15, 0)
    assert calendar["overdue:3"] == utc(2017, 10, 28, 15, 0)


def test_no_reminder_ever_lands_on_a_weekend_in_the_delegation_zone() -> None:
    for zone in ("America/Tegucigalpa", "America/Santo_Domingo", "America/New_York", "Asia/Tokyo"):
        for deadline_day in range(1, 29):
            c = campaign(
                deadline=date(2018, 2, deadline_day),
                reminders=(-7, -3, -2, -1, 0),
                opens=datetime(2018, 1, 1, 10, 0, tzinfo=CR),
            )
            d = delegation(zone)
            for slot in slots(c, d):
                if slot.is_nudge:
                    assert slot.at.astimezone(d.tz).weekday() < 5, (zone, slot)
                    assert slot.at.astimezone(d.tz).time() == time(9, 0)


def test_deadline_is_the_end_of_the_day_in_each_delegation_zone() -> None:
    assert deadline_end(campaign(), delegation("America/Tegucigalpa")) == utc(2017, 10, 24, 6, 0)
    assert deadline_end(campaign(), delegation("America/Santo_Domingo", "DO")) == utc(2017, 10, 24, 4, 0)
    assert deadline_end(campaign(), delegation("America/Panama", "PA")) == utc(2017, 10, 24, 5, 0)


def test_reminders_follow_daylight_saving_on_both_sides_of_the_change() -> None:
    # New York left daylight-saving time on Sunday 5 November 2017.
    c = campaign(opens=datetime(2017, 10, 30, 10, 0, tzinfo=CR), deadline=date(2017, 11, 6))
    calendar = by_key(slots(c, delegation("America/New_York", "US")))
    # -1d (Sunday 5) moves to Friday 3 and takes the place of -3d.
    assert calendar["reminder:-1d"] == utc(2017, 11, 3, 13, 0)  # Friday 09:00 EDT (UTC-4)
    assert calendar["reminder:0d"] == utc(2017, 11, 6, 14, 0)  # Monday 09:00 EST (UTC-5)
    assert deadline_end(c, delegation("America/New_York", "US")) == utc(2017, 11, 7, 5, 0)
    # Ottawa entered daylight-saving time on Sunday 11 March 2018.
    spring = campaign(opens=datetime(2018, 3, 1, 10, 0, tzinfo=CR), deadline=date(2018, 3, 12))
    calendar = by_key(slots(spring, delegation("America/Toronto", "CA")))
    assert calendar["reminder:-1d"] == utc(2018, 3, 9, 14, 0)  # Friday 09:00 EST
    assert calendar["reminder:0d"] == utc(2018, 3, 12, 13, 0)  # Monday 09:00 EDT
    # Mexico City kept DST until 2022; in 2017 it changed on 29 October.
    c = campaign(opens=datetime(2017, 10, 20, 10, 0, tzinfo=CR), deadline=date(2017, 10, 30))
    calendar = by_key(slots(c, delegation("America/Mexico_City", "MX")))
    assert calendar["reminder:-1d"] == utc(2017, 10, 27, 14, 0)  # Friday 09:00 CDT (UTC-5)
    assert calendar["reminder:0d"] == utc(2017, 10, 30, 15, 0)  # CST (UTC-6)


def test_request_goes_out_at_opens_and_nothing_before() -> None:
    calendar = slots(campaign(), delegation())
    assert decide(calendar, now=utc(2017, 10, 18, 15, 59), done=set(), complete=False).due == ()
    decision = decide(calendar, now=utc(2017, 10, 18, 16, 0), done=set(), complete=False)
    assert [slot.key for slot in decision.due] == ["request"]
    assert decision.superseded == ()


def test_each_slot_is_due_once() -> None:
    calendar = slots(campaign(), delegation())
    now = utc(2017, 10, 20, 15, 0)
    decision = decide(calendar, now=now, done={"request"}, complete=False, request_sent_at=utc(2017, 10, 18, 16))
    assert [slot.key for slot in decision.due] == ["reminder:-1d"]
    again = decide(calendar, now=now, done={"request", "reminder:-1d"}, complete=False)
    assert again.due == () and again.superseded == ()


def test_after_downtime_only_the_latest_missed_reminder_goes_out() -> None:
    calendar = slots(campaign(), delegation())
    now = utc(2017, 10, 26, 20, 0)  # down from Thursday 19 to Thursday 26 afternoon
    decision = decide(calendar, now=now, done={"request"}, complete=False, request_sent_at=utc(2017, 10, 18, 16))
    assert [slot.key for slot in decision.due] == ["overdue:2"]
    assert sorted(slot.key for slot in decision.superseded) == ["overdue:1", "reminder:-1d", "reminder:0d"]


def test_a_late_request_supersedes_what_fell_due_before_it() -> None:
    calendar = slots(campaign(), delegation())
    decision = decide(calendar, now=utc(2017, 10, 21, 12, 0), done=set(), complete=False)
    assert [slot.key for slot in decision.due] == ["request"]
    assert [slot.key for slot in decision.superseded] == ["reminder:-1d"]
    # A request planned on time but sent late (server down): reminders due before it are stale.
    later = decide(
        calendar,
        now=utc(2017, 10, 21, 12, 0),
        done={"request"},
        complete=False,
        request_sent_at=utc(2017, 10, 21, 11, 0),
    )
    assert later.due == ()
    assert [slot.key for slot in later.superseded] == ["reminder:-1d"]


def test_a_complete_delegation_receives_nothing() -> None:
    calendar = slots(campaign(), delegation())
    decision = decide(calendar, now=utc(2017, 10, 26, 20, 0), done={"request"}, complete=True)
    assert decision.due == () and decision.superseded == ()
    assert next_nudge(calendar, now=utc(2017, 10, 19), done={"request"}, complete=True) is None


def test_overdue_notices_stop_at_max() -> None:
    calendar = slots(campaign(overdue=OverduePolicy(every_days=1, max=2)), delegation())
    assert [slot.key for slot in calendar if slot.kind == "overdue"] == ["overdue:1", "overdue:2"]
    done = {slot.key for slot in calendar}
    assert decide(calendar, now=utc(2018, 1, 1), done=done, complete=False).due == ()


def test_next_nudge() -> None:
    calendar = slots(campaign(), delegation())
    sent = utc(2017, 10, 18, 16)
    upcoming = next_nudge(calendar, now=utc(2017, 10, 19), done={"request"}, complete=False, request_sent_at=sent)
    assert upcoming is not None and upcoming.key == "reminder:-1d"
    # Due but not yet sent: it is the next one.
    upcoming = next_nudge(calendar, now=utc(2017, 10, 20, 16), done={"request"}, complete=False, request_sent_at=sent)
    assert upcoming is not None and upcoming.key == "reminder:-1d"
    everything = {slot.key for slot in calendar}
    assert next_nudge(calendar, now=utc(2017, 11, 1), done=everything, complete=False) is None


@pytest.mark.parametrize("offsets", [(-3, -1, 0), (0,), (-10, -5), ()])
def test_reminders_stay_between_request_and_deadline(offsets: tuple[int, ...]) -> None:
    c = campaign(reminders=offsets, opens=datetime(2017, 10, 16, 10, 0, tzinfo=CR))
    d = delegation()
    for slot in slots(c, d):
        if slot.kind == "reminder":
            assert c.opens < slot.at < deadline_end(c, d)


def test_latest_cron_slot_gives_only_the_latest_missed_digest() -> None:
    from mailflow.schedule import latest_cron_slot

    now = datetime(2017, 10, 26, 20, 0, tzinfo=UTC)  # Thursday 14:00 in San José
    # Every weekday at 08:00 San José (14:00 UTC): the latest is today's.
    assert latest_cron_slot("0 8 * * 1-5", CR, now, None) == utc(2017, 10, 26, 14, 0)
    # Already sent for today's slot: nothing new.
    assert latest_cron_slot("0 8 * * 1-5", CR, now, utc(2017, 10, 26, 14, 0)) is None
    # Down since Monday's digest: only today's, once.
    assert latest_cron_slot("0 8 * * 1-5", CR, now, utc(2017, 10, 23, 14, 0)) == utc(2017, 10, 26, 14, 0)
    # On Sunday the latest weekday slot is Friday's.
    sunday = datetime(2017, 10, 29, 18, 0, tzinfo=UTC)
    assert latest_cron_slot("0 8 * * 1-5", CR, sunday, None) == utc(2017, 10, 27, 14, 0)


def test_a_campaign_is_open_from_opens_until_the_end_of_its_closes_day() -> None:
    from mailflow.schedule import is_open

    c = campaign(closes=date(2017, 11, 10))
    assert not is_open(c, CR, utc(2017, 10, 18, 15, 59))
    assert is_open(c, CR, utc(2017, 10, 18, 16, 0))
    assert is_open(c, CR, utc(2017, 11, 11, 5, 59))  # 23:59 on the 10th in San José
    assert not is_open(c, CR, utc(2017, 11, 11, 6, 0))
    assert is_open(campaign(), CR, utc(2030, 1, 1))
