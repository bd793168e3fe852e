"""Meetings: notices, updates, cancellations and reminders, each with the start in the reader's own local time.

Pure code: no I/O, no clock. The engine reads the store, calls :func:`plan_meeting`
and :func:`meeting_email`, and writes what they return.

**Who receives what.** Each invited delegation gets its own email, in its language,
with the start in its time zone (addressed to its contacts; outbox ``delegation`` =
its id). Each ``extra`` address (an observer) gets its own email in the
secretariat's language with the time in the meeting's zone; its outbox
``delegation`` is the pseudo-id ``extra:<address>`` (:data:`EXTRA_PREFIX`), so
that the outbox keeps one row per recipient and never mistakes it for a delegation.
Every meeting email is ``X-Mailflow-Kind: meeting`` with campaign ``''``.

**What is remembered** (store meta ``meeting:<id>``, JSON, see :class:`MeetingState`):
every *version* of the meeting that was announced (its SEQUENCE, title, start,
duration, link, agenda, who was invited), who was told which version and when,
enough about each recipient to write to them again after they (or the meeting)
left the configuration, and whether it was cancelled. The meta key ``meetings``
lists the ids that have a state, so that a meeting removed from the configuration
is still found and cancelled. A version changes (SEQUENCE + 1) when the title,
start, duration or link change (:meth:`Version.fingerprint`); the agenda, the
zone it is written in and the invitation list are refreshed in place.

**Outbox slots** (unique per recipient, so a second pass plans nothing twice):
``<id>/notice:<seq>``, ``<id>/update:<seq>:<seq seen before>``, ``<id>/cancel:<seq>``
and ``<id>/reminder:<offset>@<start UTC>`` (a reminder belongs to one start time:
moving the meeting re-arms it, changing only the link does not). ``#2``, ``#3``…
is appended when a recipient is invited again after being dropped.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from babel.dates import get_timezone_location

from mailflow.config import Config, Meeting, Secretariat, zone
from mailflow.errors import MailflowError
from mailflow.render import Attachment, format_date, timezone_label
from mailflow.render import zone_label as cldr_zone_label

MEETING = "meeting"
"""The ``X-Mailflow-Kind`` of every meeting email, and the name of its templates."""

NOTICE = "notice"
UPDATE = "update"
CANCEL = "cancel"
REMINDER = "reminder"
ACTIONS = (NOTICE, UPDATE, CANCEL, REMINDER)

EXTRA_PREFIX = "extra:"
"""The outbox ``delegation`` of an observer's email: ``extra:<address>``."""

INDEX_KEY = "meetings"
"""Store meta key: the JSON list of meeting ids that have a state."""

SENT = "sent"
PENDING = "pending"

CALENDAR_FILES = {
    "es": {"REQUEST": "invitacion.ics", "CANCEL": "cancelacion.ics"},
    "en": {"REQUEST": "invitation.ics", "CANCEL": "cancellation.ics"},
}
PRODID = "-//mailflow//Meeting notices//EN"

_SLOT_RE = re.compile(
    r"^(?P<meeting>[^/]+)/(?P<action>notice|update|cancel|reminder):(?P<rest>[^#]+)(?:#\d+)?$",
)


def state_key(meeting_id: str) -> str:
    """The store meta key of a meeting's state."""
    return f"meeting:{meeting_id}"


# --------------------------------------------------------------------------
# What invitees are told: versions, recipients, state
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Version:
    """The meeting as announced at one SEQUENCE (RFC 5545): what the invitees' calendars hold."""

    sequence: int
    title: str
    start: datetime  # UTC
    duration: timedelta
    timezone: str  # the zone the start was given in (observers read the time in it)
    link: str = ""
    agenda: str = ""
    invite: tuple[str, ...] = ()
    titles: Mapping[str, str] = field(default_factory=dict)
    cancelled: bool = False

    @property
    def end(self) -> datetime:
        return self.start + self.duration

    def title_in(self, language: str) -> str:
        return self.titles.get(language, self.title)

    def fingerprint(self) -> str:
        """What makes a change worth an update: title, start, duration, link."""
        material = json.dumps(
            [self.title, sorted(self.titles.items()), self.start.isoformat(), self.duration.total_seconds(), self.link],
            ensure_ascii=False,
        )
        return hashlib.sha256(material.encode("utf-8")).hexdigest()[:16]

    def details(self) -> tuple[str, str, tuple[str, ...]]:
        """What is refreshed without an update: the agenda, the zone it is written in, who is invited."""
        return self.agenda, self.timezone, self.invite

    def to_json(self) -> dict[str, Any]:
        return {
            "sequence": self.sequence,
            "title": self.title,
            "titles": dict(self.titles),
            "start": self.start.astimezone(UTC).isoformat(),
            "duration_seconds": int(self.duration.total_seconds()),
            "timezone": self.timezone,
            "link": self.link,
            "agenda": self.agenda,
            "invite": list(self.invite),
            "cancelled": self.cancelled,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Version:
        return cls(
            sequence=int(data["sequence"]),
            title=str(data["title"]),
            titles={str(k): str(v) for k, v in dict(data.get("titles") or {}).items()},
            start=datetime.fromisoformat(str(data["start"])).astimezone(UTC),
            duration=timedelta(seconds=int(data["duration_seconds"])),
            timezone=str(data["timezone"]),
            link=str(data.get("link") or ""),
            agenda=str(data.get("agenda") or ""),
            invite=tuple(str(i) for i in data.get("invite") or ()),
            cancelled=bool(data.get("cancelled", False)),
        )


def version_of(meeting: Meeting, sequence: int = 0) -> Version:
    """The meeting as configured now, at ``sequence``."""
    return Version(
        sequence=sequence,
        title=meeting.title,
        start=meeting.start.astimezone(UTC),
        duration=meeting.duration,
        timezone=meeting.timezone,
        link=meeting.link or "",
        agenda=meeting.agenda,
        invite=meeting.invite,
        titles=dict(meeting.titles),
        cancelled=meeting.cancelled,
    )


@dataclass(frozen=True)
class Recipient:
    """One recipient of a meeting's emails: a delegation, or an observer (an ``extra`` address)."""

    key: str  # the outbox `delegation`: a delegation id, or "extra:<address>"
    name: str
    language: str
    timezone: str
    addresses: tuple[str, ...]
    delegation: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "language": self.language,
            "timezone": self.timezone,
            "addresses": list(self.addresses),
            "delegation": self.delegation,
        }

    @classmethod
    def from_json(cls, key: str, data: Mapping[str, Any]) -> Recipient:
        return cls(
            key=key,
            name=str(data["name"]),
            language=str(data["language"]),
            timezone=str(data["timezone"]),
            addresses=tuple(str(a) for a in data["addresses"]),
            delegation=bool(data.get("delegation", True)),
        )


def extra_key(address: str) -> str:
    return f"{EXTRA_PREFIX}{address.lower()}"


def invitee_key(meeting: Meeting, text: str) -> str | None:
    """The recipient key of a delegation id or ``extra`` address (or ``extra:<address>``) invited to the meeting."""
    if text in meeting.invite:
        return text
    address = text[len(EXTRA_PREFIX) :] if text.lower().startswith(EXTRA_PREFIX) else text
    if address.lower() in {a.lower() for a in meeting.extra}:
        return extra_key(address)
    return None


def recipients_of(meeting: Meeting, config: Config) -> list[Recipient]:
    """Who the meeting's emails go to, per the configuration: the invited delegations, then the observers."""
    out: list[Recipient] = []
    for ident in meeting.invite:
        d = config.delegation(ident)
        out.append(Recipient(d.id, d.name, d.language, d.timezone, d.contacts))
    language = config.secretariat.language
    for address in meeting.extra:
        out.append(Recipient(extra_key(address), address, language, meeting.timezone, (address,), delegation=False))
    return out


@dataclass(frozen=True)
class Told:
    """The version a recipient was last sent (planned) and when."""

    sequence: int
    at: datetime


@dataclass(frozen=True)
class MeetingState:
    """What a meeting's invitees were told: kept in the store (meta ``meeting:<id>``) as JSON."""

    id: str
    versions: tuple[Version, ...]
    told: Mapping[str, Told] = field(default_factory=dict)
    recipients: Mapping[str, Recipient] = field(default_factory=dict)
    closed: bool = False  # cancelled: nothing more goes out unless it is announced again

    @property
    def latest(self) -> Version:
        return self.versions[-1]

    def version(self, sequence: int) -> Version:
        for version in self.versions:
            if version.sequence == sequence:
                return version
        raise MailflowError(f"meeting {self.id}: no version {sequence} was recorded")

    def to_text(self) -> str:
        return json.dumps(
            {
                "id": self.id,
                "versions": [v.to_json() for v in self.versions],
                "told": {k: {"sequence": t.sequence, "at": t.at.isoformat()} for k, t in sorted(self.told.items())},
                "recipients": {k: r.to_json() for k, r in sorted(self.recipients.items())},
                "closed": self.closed,
            },
            ensure_ascii=False,
            sort_keys=True,
        )

    @classmethod
    def from_text(cls, text: str | None) -> MeetingState | None:
        """The state stored as ``text``; None when there is none (or it was forgotten: ``null``)."""
        if not text:
            return None
        try:
            data = json.loads(text)
            if not data:
                return None
            return cls(
                id=str(data["id"]),
                versions=tuple(Version.from_json(v) for v in data["versions"]),
                told={
                    str(k): Told(int(t["sequence"]), datetime.fromisoformat(str(t["at"])))
                    for k, t in dict(data.get("told") or {}).items()
                },
                recipients={
                    str(k): Recipient.from_json(str(k), r) for k, r in dict(data.get("recipients") or {}).items()
                },
                closed=bool(data.get("closed", False)),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MailflowError(f"the stored state of a meeting cannot be read ({type(exc).__name__}: {exc})") from exc


def load_index(text: str | None) -> list[str]:
    """The meeting ids that have a state (store meta ``meetings``)."""
    if not text:
        return []
    try:
        data = json.loads(text)
    except ValueError:
        return []
    return [str(i) for i in data] if isinstance(data, list) else []


# --------------------------------------------------------------------------
# Slots
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotInfo:
    """A meeting slot taken apart."""

    meeting: str
    action: str
    sequence: int | None = None  # notice, update, cancel: the version it announces
    previous: int | None = None  # update: the version the recipient had seen
    offset: timedelta | None = None  # reminder


def offset_text(offset: timedelta) -> str:
    """``-1d``, ``-2h``, ``-30m``: the largest whole unit."""
    minutes = int(offset.total_seconds() // 60)
    sign = "-" if minutes < 0 else "+"
    minutes = abs(minutes)
    if minutes % (24 * 60) == 0:
        return f"{sign}{minutes // (24 * 60)}d"
    if minutes % 60 == 0:
        return f"{sign}{minutes // 60}h"
    return f"{sign}{minutes}m"


def _parse_offset(text: str) -> timedelta:
    amount, unit = int(text[:-1]), text[-1]
    return {"d": timedelta(days=amount), "h": timedelta(hours=amount), "m": timedelta(minutes=amount)}[unit]


def notice_slot(meeting_id: str, sequence: int) -> str:
    return f"{meeting_id}/{NOTICE}:{sequence}"


def update_slot(meeting_id: str, sequence: int, previous: int) -> str:
    return f"{meeting_id}/{UPDATE}:{sequence}:{previous}"


def cancel_slot(meeting_id: str, sequence: int) -> str:
    return f"{meeting_id}/{CANCEL}:{sequence}"


def reminder_slot(meeting_id: str, offset: timedelta, start: datetime) -> str:
    return f"{meeting_id}/{REMINDER}:{offset_text(offset)}@{start.astimezone(UTC):%Y%m%dT%H%MZ}"


def parse_slot(slot: str) -> SlotInfo:
    """Take a meeting slot apart; a slot that is not one raises :class:`MailflowError`."""
    match = _SLOT_RE.match(slot)
    if match is None:
        raise MailflowError(f"{slot!r} is not a meeting slot")
    meeting, action, rest = match.group("meeting"), match.group("action"), match.group("rest")
    try:
        if action == REMINDER:
            return SlotInfo(meeting, action, offset=_parse_offset(rest.partition("@")[0]))
        if action == UPDATE:
            sequence, _, previous = rest.partition(":")
            return SlotInfo(meeting, action, int(sequence), int(previous))
        return SlotInfo(meeting, action, int(rest))
    except (ValueError, KeyError):
        raise MailflowError(f"{slot!r} is not a meeting slot") from None


def slot_meeting(slot: str) -> str:
    """The meeting id a slot belongs to."""
    return parse_slot(slot).meeting


def _free(slot: str, taken: Collection[str]) -> str:
    """``slot``, or ``slot#2``, ``slot#3``… when a recipient already has it (invited again after being dropped)."""
    if slot not in taken:
        return slot
    number = 2
    while f"{slot}#{number}" in taken:
        number += 1
    return f"{slot}#{number}"


# --------------------------------------------------------------------------
# Planning: what is due at an instant
# --------------------------------------------------------------------------

Recorded = Mapping[str, Mapping[str, str]]
"""For one meeting: recipient key -> slot -> outbox status (``pending``, ``sent``, ``failed``, ``skipped``)."""


@dataclass(frozen=True)
class Planned:
    """One email for the outbox: to send, or recorded as skipped with its reason."""

    recipient: str
    slot: str
    at: datetime
    skipped: str | None = None


@dataclass(frozen=True)
class MeetingPlan:
    """What one pass does for one meeting."""

    state: MeetingState | None  # the state to keep (None: none, or forget it)
    save: bool = False  # the state changed: write it
    emails: tuple[Planned, ...] = ()
    obsolete: tuple[tuple[str, str], ...] = ()  # (recipient, slot) of pending emails no longer to send
    obsolete_reason: str = ""


def _seen(slots: Mapping[str, str] | None) -> int | None:
    """The latest version a recipient was actually sent (a notice or update accepted by the server)."""
    best: int | None = None
    for slot, status in (slots or {}).items():
        if status != SENT:
            continue
        info = parse_slot(slot)
        if info.action in (NOTICE, UPDATE) and info.sequence is not None:
            best = info.sequence if best is None else max(best, info.sequence)
    return best


def _pending(recorded: Recorded, keys: Collection[str] | None = None) -> list[tuple[str, str]]:
    return [
        (key, slot)
        for key, slots in recorded.items()
        if keys is None or key in keys
        for slot, status in slots.items()
        if status == PENDING
    ]


def plan_meeting(
    meeting_id: str,
    meeting: Meeting | None,
    recipients: Sequence[Recipient],
    state: MeetingState | None,
    recorded: Recorded,
    now: datetime,
) -> MeetingPlan:
    """What to send about one meeting at ``now``, given what was told before (``state``) and recorded.

    * a meeting that appears, not started yet: a notice to every recipient;
    * a change of title, start, duration or link before the start: a new version
      (SEQUENCE + 1), an update to everyone who received an earlier one, a notice to
      those whose earlier email never went out (and that email is skipped);
    * a recipient added: a notice; a recipient dropped: a cancellation, if it was reached;
    * ``cancelled: true``, or the meeting removed from the configuration, before the
      start: a cancellation (SEQUENCE + 1) to everyone reached, and what was still
      pending is skipped; removed after the start: forgotten, nothing sent;
    * reminders at their offsets, each once, only before the start; after downtime
      only the latest due goes out, and none that fell due before the recipient's
      notice or update (the older are recorded as skipped).
    """
    started = state is not None and now >= state.latest.start
    if state is not None and started and (meeting is None or meeting.cancelled or now >= meeting.start):
        return _plan_started(meeting, state, recorded)
    if meeting is None or meeting.cancelled:
        return _plan_cancellation(meeting_id, meeting, state, recorded, now)
    current = version_of(meeting)
    save = False
    new_version = False
    if state is None or state.closed:
        if now >= current.start:
            return MeetingPlan(state)
        # First seen, or announced again after a cancellation: everyone gets a notice (told is empty).
        sequence = 0 if state is None else state.latest.sequence + 1
        earlier = () if state is None else state.versions
        remembered = {} if state is None else state.recipients
        state = MeetingState(meeting_id, (*earlier, replace(current, sequence=sequence)), recipients=remembered)
        save = new_version = True
    elif current.fingerprint() != state.latest.fingerprint():
        if now >= current.start:
            return MeetingPlan(state)  # changed after it started: nothing left to announce
        state = replace(state, versions=(*state.versions, replace(current, sequence=state.latest.sequence + 1)))
        save = new_version = True
    elif current.details() != state.latest.details():
        state = replace(state, versions=(*state.versions[:-1], replace(current, sequence=state.latest.sequence)))
        save = True
    if now >= state.latest.start:
        return MeetingPlan(state, save)
    return _plan_recipients(state, meeting, recipients, recorded, now, new_version=new_version, save=save)


def _plan_recipients(
    state: MeetingState,
    meeting: Meeting,
    recipients: Sequence[Recipient],
    recorded: Recorded,
    now: datetime,
    *,
    new_version: bool,
    save: bool,
) -> MeetingPlan:
    ident = state.id
    latest = state.latest
    told = dict(state.told)
    known = dict(state.recipients)
    emails: list[Planned] = []
    obsolete: list[tuple[str, str]] = _pending(recorded) if new_version else []
    current = {r.key: r for r in recipients}
    for recipient in recipients:
        if known.get(recipient.key) != recipient:
            known[recipient.key] = recipient
        taken = recorded.get(recipient.key, {}).keys()
        if recipient.key in told and not new_version:
            continue
        seen = _seen(recorded.get(recipient.key)) if recipient.key in told else None
        if seen is not None and seen != latest.sequence:
            slot = _free(update_slot(ident, latest.sequence, seen), taken)
        else:
            slot = _free(notice_slot(ident, latest.sequence), taken)
        emails.append(Planned(recipient.key, slot, now))
        told[recipient.key] = Told(latest.sequence, now)
    for key in [k for k in told if k not in current]:
        obsolete += [item for item in _pending(recorded, {key}) if item not in obsolete]
        if _seen(recorded.get(key)) is not None:
            emails.append(Planned(key, _free(cancel_slot(ident, latest.sequence), recorded.get(key, {}).keys()), now))
        del told[key]
    for recipient in recipients:
        emails += _reminders(ident, latest, meeting.reminders, recipient.key, told[recipient.key], recorded, now)
    changed = save or told != dict(state.told) or known != dict(state.recipients)
    state = replace(state, told=told, recipients=known)
    reason = f"superseded by version {latest.sequence} of the meeting" if new_version else "no longer invited"
    return MeetingPlan(state, changed, tuple(emails), tuple(obsolete), reason)


def _reminders(
    ident: str,
    version: Version,
    offsets: Sequence[timedelta],
    key: str,
    told: Told,
    recorded: Recorded,
    now: datetime,
) -> list[Planned]:
    done = recorded.get(key, {})
    due = [
        (version.start + offset, reminder_slot(ident, offset, version.start))
        for offset in offsets
        if version.start + offset <= now
    ]
    due = [(at, slot) for at, slot in due if slot not in done]
    if not due:
        return []
    fresh = [item for item in due if item[0] > told.at]
    chosen = max(fresh) if fresh else None
    out: list[Planned] = []
    for at, slot in due:
        if (at, slot) == chosen:
            out.append(Planned(key, slot, at))
        elif at <= told.at:
            out.append(Planned(key, slot, at, "fell due before the notice or update went out"))
        else:
            assert chosen is not None
            out.append(Planned(key, slot, at, f"superseded by {chosen[1]}: missed while mailflow was not running"))
    return out


def _plan_started(meeting: Meeting | None, state: MeetingState, recorded: Recorded) -> MeetingPlan:
    """The announced start has come: what did not go out by now is moot, and a removed meeting is forgotten.

    A configured meeting is still planned as usual when its start moved to a time to come
    (announced again: an update, or a notice after a cancellation)."""
    pending = tuple(_pending(recorded))
    reason = "the meeting started before this went out"
    if meeting is None:
        return MeetingPlan(None, save=True, obsolete=pending, obsolete_reason=reason)
    return MeetingPlan(state, obsolete=pending, obsolete_reason=reason)


def _plan_cancellation(
    meeting_id: str, meeting: Meeting | None, state: MeetingState | None, recorded: Recorded, now: datetime
) -> MeetingPlan:
    if state is None:
        return MeetingPlan(None)  # never announced: nothing to cancel
    if state.closed:
        return MeetingPlan(state)
    latest = state.latest
    sequence = latest.sequence + 1
    cancelled = replace(latest, sequence=sequence, cancelled=True)
    emails = tuple(
        Planned(key, _free(cancel_slot(meeting_id, sequence), recorded.get(key, {}).keys()), now)
        for key in state.told
        if _seen(recorded.get(key)) is not None
    )
    why = "the meeting was cancelled" if meeting is not None else "the meeting was removed from the configuration"
    return MeetingPlan(
        replace(state, versions=(*state.versions, cancelled), closed=True),
        save=True,
        emails=emails,
        obsolete=tuple(_pending(recorded)),
        obsolete_reason=why,
    )


def preview_state(meeting: Meeting, state: MeetingState | None) -> tuple[MeetingState, str]:
    """The state and slot of the email a pass would send a new invitee now: the current notice (or cancellation)."""
    if state is not None and not state.closed and state.latest.fingerprint() == version_of(meeting).fingerprint():
        sequence = state.latest.sequence
    else:
        sequence = 0 if state is None else state.latest.sequence + 1
    version = version_of(meeting, sequence)
    previous = state.versions if state is not None else ()
    kept = tuple(v for v in previous if v.sequence != sequence)
    preview = MeetingState(meeting.id, (*kept, version), recipients=state.recipients if state else {})
    slot = cancel_slot(meeting.id, sequence) if meeting.cancelled else notice_slot(meeting.id, sequence)
    return preview, slot


def recipient_for(config: Config, state: MeetingState, key: str) -> Recipient:
    """Who ``key`` is: as configured now when it still is, else as remembered. KeyError when unknown."""
    if key.startswith(EXTRA_PREFIX):
        remembered = state.recipients.get(key)
        address = remembered.addresses[0] if remembered else key[len(EXTRA_PREFIX) :]
        name = remembered.name if remembered else address
        return Recipient(key, name, config.secretariat.language, state.latest.timezone, (address,), delegation=False)
    try:
        d = config.delegation(key)
    except KeyError:
        return state.recipients[key]
    return Recipient(d.id, d.name, d.language, d.timezone, d.contacts)


# --------------------------------------------------------------------------
# Writing it: times in every zone, the template context, the calendar
# --------------------------------------------------------------------------


def time_text(moment: datetime) -> str:
    """``8:30``: the wall-clock time, 24-hour, no leading zero."""
    return f"{moment.hour}:{moment.minute:02d}"


def duration_text(duration: timedelta, language: str) -> str:
    """``1 hora y 30 minutos`` / ``1 hour 30 minutes``."""
    minutes = int(duration.total_seconds() // 60)
    hours, minutes = divmod(minutes, 60)
    if language == "es":
        parts = [f"{hours} hora{'s' if hours != 1 else ''}"] if hours else []
        parts += [f"{minutes} minuto{'s' if minutes != 1 else ''}"] if minutes else []
        return " y ".join(parts) or "0 minutos"
    parts = [f"{hours} hour{'s' if hours != 1 else ''}"] if hours else []
    parts += [f"{minutes} minute{'s' if minutes != 1 else ''}"] if minutes else []
    return " ".join(parts) or "0 minutes"


def zone_label(recipient: Recipient) -> str:
    """The reader's local time named in its language: ``hora de Honduras``; an observer's is the zone's."""
    if recipient.delegation:
        return timezone_label(recipient.name, recipient.language)
    return cldr_zone_label(zone(recipient.timezone), recipient.language)


def place_label(name: str, timezone: str, language: str) -> str:
    """A delegation in the table of times, with its zone's city when its country has several zones."""
    location = cldr_zone_label(zone(timezone), language)
    if "(" not in location:
        return name
    city = str(get_timezone_location(zone(timezone), locale=language, return_city=True))
    return f"{name} ({city})"


def when_text(start: datetime, end: datetime, tz: ZoneInfo, language: str) -> str:
    """``miércoles 15 de noviembre de 2017, 8:30–10:00`` in ``tz`` (the end's date too if it is another day)."""
    local_start, local_end = start.astimezone(tz), end.astimezone(tz)
    text = f"{format_date(local_start.date(), language)}, {time_text(local_start)}"
    if local_end.date() != local_start.date():
        return f"{text} – {format_date(local_end.date(), language)}, {time_text(local_end)}"
    return f"{text}–{time_text(local_end)}"


def time_table(
    version: Version, places: Sequence[tuple[str, str]], language: str, reader: ZoneInfo
) -> list[dict[str, Any]]:
    """The start in every invited delegation's zone, grouped by identical local time, earliest first.

    ``places`` are (name, IANA zone). A group on another calendar day than the reader's
    carries that day's date (``date_text``), else None."""
    groups: dict[tuple[date, int, int], list[str]] = {}
    for name, timezone in places:
        local = version.start.astimezone(zone(timezone))
        label = place_label(name, timezone, language)
        group = groups.setdefault((local.date(), local.hour, local.minute), [])
        if label not in group:
            group.append(label)
    reader_day = version.start.astimezone(reader).date()
    out: list[dict[str, Any]] = []
    for (day, hour, minute), names in sorted(groups.items()):
        out.append(
            {
                "time_text": f"{hour}:{minute:02d}",
                "date_text": format_date(day, language) if day != reader_day else None,
                "places": names,
                "places_text": ", ".join(names),
            }
        )
    return out


def _places(config: Config, state: MeetingState, version: Version) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for ident in version.invite:
        try:
            d = config.delegation(ident)
            out.append((d.name, d.timezone))
        except KeyError:
            remembered = state.recipients.get(ident)
            if remembered is not None:
                out.append((remembered.name, remembered.timezone))
    return out


def _changes(previous: Version, version: Version, recipient: Recipient) -> list[dict[str, str]]:
    tz, language = zone(recipient.timezone), recipient.language
    out: list[dict[str, str]] = []
    if previous.title_in(language) != version.title_in(language):
        out.append({"what": "title", "before": previous.title_in(language), "after": version.title_in(language)})
    if previous.start != version.start or previous.duration != version.duration:
        out.append(
            {
                "what": "time",
                "before": when_text(previous.start, previous.end, tz, language),
                "after": when_text(version.start, version.end, tz, language),
            }
        )
    if previous.link != version.link:
        out.append({"what": "link", "before": previous.link, "after": version.link})
    return out


def meeting_context(
    config: Config,
    state: MeetingState,
    recipient: Recipient,
    action: str,
    version: Version,
    previous: Version | None = None,
    offset: timedelta | None = None,
) -> dict[str, Any]:
    """The template context of one meeting email (its shape is :func:`mailflow.render.example_context`'s)."""
    language = recipient.language
    tz = zone(recipient.timezone)
    local_start, local_end = version.start.astimezone(tz), version.end.astimezone(tz)
    method = "CANCEL" if action == CANCEL else "REQUEST"
    secretariat = config.secretariat
    agenda = version.agenda
    return {
        "kind": MEETING,
        "action": action,
        "language": language,
        "secretariat": {"name": secretariat.name, "address": secretariat.address},
        "recipient": {"id": recipient.key, "name": recipient.name, "is_delegation": recipient.delegation},
        "meeting": {
            "id": state.id,
            "title": version.title_in(language),
            "link": version.link,
            "agenda": agenda,
            "agenda_lines": agenda.split("\n") if agenda else [],
            "date_text": format_date(local_start.date(), language),
            "time_text": time_text(local_start),
            "end_time_text": time_text(local_end),
            "when_text": when_text(version.start, version.end, tz, language),
            "duration_text": duration_text(version.duration, language),
            "timezone_label": zone_label(recipient),
            "sequence": version.sequence,
            "calendar_file": "" if action == REMINDER else CALENDAR_FILES[language][method],
        },
        "times": time_table(version, _places(config, state, version), language, tz),
        "changes": _changes(previous, version, recipient) if previous is not None else [],
        "reminder": {"offset": offset_text(offset)} if offset is not None else None,
    }


def calendar_description(context: Mapping[str, Any]) -> str:
    """The DESCRIPTION of the calendar entry: when (reader's time), link and agenda, in the reader's language."""
    meeting = context["meeting"]
    spanish = context["language"] == "es"
    lines = [meeting["title"], "", f"{meeting['when_text']} ({meeting['timezone_label']})"]
    if meeting["link"]:
        lines.append(f"{'Enlace' if spanish else 'Link'}: {meeting['link']}")
    if meeting["agenda"]:
        lines += ["", "Agenda:", meeting["agenda"]]
    return "\n".join(lines)


def calendar_invitation(
    meeting_id: str,
    version: Version,
    recipient: Recipient,
    secretariat: Secretariat,
    now: datetime,
    *,
    method: str,
    description: str,
) -> bytes:
    """The iCalendar object (RFC 5545/5546) of one email: METHOD REQUEST or CANCEL, times in UTC.

    The UID is stable per meeting (``<id>@<secretariat domain>``), so every update and
    the cancellation replace the same calendar entry; SEQUENCE is the version; the
    organiser is the secretariat, the attendees the recipient's addresses (RSVP).
    """
    # Imported here: only an invitation needs it, and it is a good part of every command's start-up.
    from icalendar import Calendar, Event, vCalAddress, vText

    calendar = Calendar()
    calendar.add("prodid", PRODID)
    calendar.add("version", "2.0")
    calendar.add("method", method)
    event = Event()
    event.add("uid", f"{meeting_id}@{secretariat.domain}")
    event.add("dtstamp", now.astimezone(UTC))
    event.add("dtstart", version.start.astimezone(UTC))
    event.add("dtend", version.end.astimezone(UTC))
    event.add("sequence", version.sequence)
    event.add("summary", version.title_in(recipient.language))
    event.add("description", description)
    if version.link:
        event.add("location", version.link)
        event.add("url", version.link)
    event.add("status", "CANCELLED" if method == "CANCEL" else "CONFIRMED")
    event.add("transp", "OPAQUE")
    organizer = vCalAddress(f"mailto:{secretariat.address}")
    organizer.params["cn"] = vText(secretariat.name)
    event.add("organizer", organizer)
    for address in recipient.addresses:
        attendee = vCalAddress(f"mailto:{address}")
        attendee.params["cn"] = vText(recipient.name)
        attendee.params["cutype"] = vText("INDIVIDUAL")
        attendee.params["role"] = vText("REQ-PARTICIPANT" if recipient.delegation else "OPT-PARTICIPANT")
        attendee.params["partstat"] = vText("NEEDS-ACTION")
        attendee.params["rsvp"] = vText("TRUE")
        event.add("attendee", attendee)
    calendar.add_component(event)
    return bytes(calendar.to_ical())


@dataclass(frozen=True)
class MeetingEmail:
    """One meeting email, ready to render and assemble."""

    language: str
    to: tuple[str, ...]
    context: dict[str, Any]
    headers: dict[str, str]
    attachments: tuple[Attachment, ...]
    calendar: Attachment | None = None
    """The invitation or cancellation (text/calendar), written as the last alternative of the body."""


def meeting_email(config: Config, state: MeetingState, recipient_key: str, slot: str, now: datetime) -> MeetingEmail:
    """The email of ``slot`` to one recipient: context, headers and calendar invitation (none for a reminder)."""
    info = parse_slot(slot)
    recipient = recipient_for(config, state, recipient_key)
    previous: Version | None = None
    if info.action == REMINDER:
        version = state.latest
    else:
        assert info.sequence is not None
        version = state.version(info.sequence)
        if info.previous is not None:
            previous = state.version(info.previous)
    context = meeting_context(config, state, recipient, info.action, version, previous, info.offset)
    headers = {"X-Mailflow-Kind": MEETING, "X-Mailflow-Meeting": state.id}
    if recipient.delegation:
        headers["X-Mailflow-Delegation"] = recipient.key
    attachments: tuple[Attachment, ...] = ()
    calendar: Attachment | None = None
    if info.action != REMINDER:
        method = "CANCEL" if info.action == CANCEL else "REQUEST"
        data = calendar_invitation(
            state.id,
            version,
            recipient,
            config.secretariat,
            now,
            method=method,
            description=calendar_description(context),
        )
        # As calendar programs send it: the invitation is the last alternative of the body, which Outlook,
        # Gmail and Thunderbird show with Accept / Decline, and the same file is attached for the others.
        calendar = Attachment(
            context["meeting"]["calendar_file"],
            data,
            "text/calendar",
            parameters=(("method", method), ("charset", "utf-8")),
        )
        attachments = (Attachment(context["meeting"]["calendar_file"], data, "application/ics"),)
    return MeetingEmail(recipient.language, recipient.addresses, context, headers, attachments, calendar)


# --------------------------------------------------------------------------
# Status
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class InviteeStatus:
    """One recipient of a meeting, and what became of its latest notice, update or cancellation."""

    id: str
    name: str
    addresses: tuple[str, ...]
    status: str  # not_sent | pending | sent | failed
    what: str | None  # notice | update | cancel (the latest such email)
    sent_at: datetime | None
    error: str | None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "addresses": list(self.addresses),
            "status": self.status,
            "email": self.what,
            "sent_at": self.sent_at.astimezone(UTC).isoformat() if self.sent_at else None,
            "error": self.error,
        }


@dataclass(frozen=True)
class MeetingStatus:
    """A meeting as ``status`` shows it: when, which version, who was invited and whether it reached them."""

    id: str
    title: str
    start: datetime
    end: datetime
    timezone: str
    cancelled: bool
    announced: bool
    sequence: int | None
    next_reminder_at: datetime | None
    invitees: tuple[InviteeStatus, ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "start": self.start.astimezone(UTC).isoformat(),
            "end": self.end.astimezone(UTC).isoformat(),
            "timezone": self.timezone,
            "cancelled": self.cancelled,
            "announced": self.announced,
            "sequence": self.sequence,
            "next_reminder_at": self.next_reminder_at.astimezone(UTC).isoformat() if self.next_reminder_at else None,
            "invited": [i.as_json() for i in self.invitees],
        }


@dataclass(frozen=True)
class RowView:
    """What status needs of one outbox row of a meeting."""

    recipient: str
    slot: str
    status: str
    sent_at: datetime | None
    error: str | None


def meeting_status(
    meeting: Meeting,
    recipients: Sequence[Recipient],
    state: MeetingState | None,
    rows: Sequence[RowView],
    now: datetime,
) -> MeetingStatus:
    """Where one configured meeting stands at ``now`` (``rows`` in the order they were recorded)."""
    latest: dict[str, RowView] = {}
    for row in rows:
        if parse_slot(row.slot).action != REMINDER and row.status != "skipped":
            latest[row.recipient] = row
    invitees = []
    for recipient in recipients:
        found = latest.get(recipient.key)
        invitees.append(
            InviteeStatus(
                id=recipient.key,
                name=recipient.name,
                addresses=recipient.addresses,
                status=found.status if found else "not_sent",
                what=parse_slot(found.slot).action if found else None,
                sent_at=found.sent_at if found else None,
                error=found.error if found else None,
            )
        )
    closed = state is not None and state.closed
    upcoming = [
        meeting.start + offset
        for offset in meeting.reminders
        if now < meeting.start + offset and not closed and not meeting.cancelled
    ]
    return MeetingStatus(
        id=meeting.id,
        title=meeting.title,
        start=meeting.start,
        end=meeting.end,
        timezone=meeting.timezone,
        cancelled=meeting.cancelled or closed,
        announced=state is not None,
        sequence=state.latest.sequence if state is not None else None,
        next_reminder_at=min(upcoming).astimezone(UTC) if upcoming else None,
        invitees=tuple(invitees),
    )
