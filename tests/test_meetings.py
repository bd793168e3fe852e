"""Meetings: the seed's virtual session of 15 November 2017, its notices, updates, cancellations and reminders.

The minutes (`shared/seed/meeting-minutes.txt`) convene it "on Wednesday, November 15, at
8:30 am (Central America and Mexico) at 9:30 am (Dominican Republic, Washington DC and
Ottawa)"; the time-zone database says the Dominican Republic was at 10:30 and Panama at
9:30. Every email goes through the real aiosmtpd server of the test rig and is parsed back.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml
from icalendar import Calendar

from mailflow import meetings
from mailflow.cli import main
from mailflow.clock import FixedClock
from mailflow.config import Config, load_config, parse_config, parse_meeting_duration
from mailflow.engine import Engine
from mailflow.errors import ConfigError
from mailflow.render import Renderer, example_context, make_message_id
from mailflow.sender import SmtpTransport
from mailflow.store import OutboxStatus, Store
from tests.helpers import EXAMPLE, example_data, write_config
from tests.servers import ReceivedMessage, SmtpServer

pytestmark = pytest.mark.servers

COSTA_RICA = ZoneInfo("America/Costa_Rica")
START_UTC = datetime(2017, 11, 15, 14, 30, tzinfo=UTC)  # 8:30 in San José (UTC-6)
ANNOUNCED = datetime(2017, 11, 1, 16, 0, tzinfo=UTC)  # 10:00 in San José, two weeks before
OBSERVER = "observer@iom.example.org"
ID = "network-2017-11-15"

# Written out by hand from the time-zone database of 15 November 2017, not computed by mailflow:
# Central America, Belize and Mexico at UTC-6; Panama UTC-5; Washington and Ottawa back on EST (UTC-5);
# the Dominican Republic at UTC-4 all year.
LOCAL_START = {
    "CR": "8:30",
    "SV": "8:30",
    "HN": "8:30",
    "GT": "8:30",
    "NI": "8:30",
    "BZ": "8:30",
    "MX": "8:30",
    "PA": "9:30",
    "US": "9:30",
    "CA": "9:30",
    "DO": "10:30",
}
ENGLISH = {"BZ", "CA", "US"}


def seed_meeting(**changes: Any) -> dict[str, Any]:
    meeting: dict[str, Any] = {
        "id": ID,
        "title": {
            "es": "Sesión virtual de la Red de Funcionarios de Enlace",
            "en": "Virtual session of the Liaison Officers Network",
        },
        "start": "2017-11-15T08:30",
        "timezone": "America/Costa_Rica",
        "duration": "90m",
        "link": "https://meet.example.org/rcm",
        "agenda": "1. Columna «Responsable» del Plan Estratégico\n2. Próximos pasos",
        "invite": "all",
        "extra": [OBSERVER],
        "reminders": ["-1d", "-1h"],
    }
    meeting.update(changes)
    return meeting


def meeting_data(tmp_path: Path, server: SmtpServer, *meeting_list: dict[str, Any]) -> dict[str, Any]:
    """The example configuration without its campaign (only meeting emails go out), sending to ``server``."""
    data = example_data()
    data["campaigns"] = []
    data["meetings"] = list(meeting_list)
    data["mail"] = {"transport": "smtp", "smtp": {"host": server.host, "port": server.port, "security": "none"}}
    data["store"] = str(tmp_path / "mailflow.db")
    return data


def load(tmp_path: Path, data: dict[str, Any]) -> Config:
    return load_config(write_config(tmp_path, data))


class Rig:
    """Ticks at chosen instants against one store, with the configuration of the moment."""

    def __init__(self, tmp_path: Path, server: SmtpServer, data: dict[str, Any]) -> None:
        self.tmp_path = tmp_path
        self.server = server
        self.data = data
        self.config = load(tmp_path, data)
        self.store = Store.open(self.config.store)
        self.clock = FixedClock(ANNOUNCED)

    def reconfigure(self, **changes: Any) -> None:
        self.data["meetings"] = [seed_meeting(**changes)]
        self.config = load(self.tmp_path, self.data)

    def remove_meetings(self) -> None:
        self.data["meetings"] = []
        self.config = load(self.tmp_path, self.data)

    @property
    def engine(self) -> Engine:
        assert self.config.mail.smtp is not None
        return Engine(self.config, self.store, SmtpTransport(self.config.mail.smtp), self.clock)

    def tick(self, at: datetime) -> list[ReceivedMessage]:
        """One pass at ``at``; the messages it sent. A second pass at the same instant must send nothing."""
        self.clock.set(at)
        before = len(self.server.messages)
        report = self.engine.tick()
        assert not report.failed and not report.compose_errors, report
        sent = self.server.messages[before:]
        again = self.engine.tick()
        assert again.sent == [] and again.planned == 0 and again.skipped == 0
        assert len(self.server.messages) == before + len(sent)
        return sent

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def rig(tmp_path: Path, smtp_server: SmtpServer) -> Any:
    made = Rig(tmp_path, smtp_server, meeting_data(tmp_path, smtp_server, seed_meeting()))
    yield made
    made.close()


def by_recipient(received: list[ReceivedMessage]) -> dict[str, EmailMessage]:
    out: dict[str, EmailMessage] = {}
    for item in received:
        message = item.message
        key = message["X-Mailflow-Delegation"]
        name = str(key) if key is not None else f"extra:{item.rcpt_tos[0]}"
        assert name not in out, f"two emails to {name}"
        out[name] = message
    return out


def text_of(message: EmailMessage) -> str:
    body = message.get_body(preferencelist=("plain",))
    assert body is not None
    return str(body.get_content())


def html_of(message: EmailMessage) -> str:
    body = message.get_body(preferencelist=("html",))
    assert body is not None
    return str(body.get_content())


def calendar_of(message: EmailMessage) -> tuple[Calendar, Any, EmailMessage]:
    """The text/calendar part parsed with icalendar: the calendar, its one event, and the part.

    The part is the last alternative of the body, inline (what Outlook, Gmail and Thunderbird answer with
    Accept / Decline); the same calendar is attached as an .ics file for the other programs."""
    parts = [p for p in message.walk() if p.get_content_type() == "text/calendar"]
    assert len(parts) == 1, [p.get_content_type() for p in message.walk()]
    part = parts[0]
    assert isinstance(part, EmailMessage)
    [body] = [p for p in message.walk() if p.get_content_type() == "multipart/alternative"]
    assert [p.get_content_type() for p in body.iter_parts()] == ["text/plain", "text/html", "text/calendar"]
    assert part.get_content_disposition() is None and part.get_filename() is None
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    [attached] = [p for p in message.walk() if p.get_content_type() == "application/ics"]
    assert attached.get_content_disposition() == "attachment" and attached.get_payload(decode=True) == payload
    calendar = Calendar.from_ical(payload)
    [event] = calendar.walk("VEVENT")
    return calendar, event, part


def ics_name(message: EmailMessage) -> str | None:
    """The file name of the attached copy of the calendar."""
    [attached] = [p for p in message.walk() if p.get_content_type() == "application/ics"]
    return attached.get_filename()


def attendees(event: Any) -> list[str]:
    value = event.get("attendee")
    values = value if isinstance(value, list) else [value]
    return [str(v).removeprefix("mailto:") for v in values]


# --------------------------------------------------------------------------
# The notice: every delegation reads its own local time, in its own language
# --------------------------------------------------------------------------


def test_every_delegation_reads_the_start_in_its_own_time_and_language(rig: Rig) -> None:
    sent = by_recipient(rig.tick(ANNOUNCED))
    assert set(sent) == {*LOCAL_START, f"extra:{OBSERVER}"}
    for delegation in rig.config.delegations:
        message = sent[delegation.id]
        local = LOCAL_START[delegation.id]
        text = text_of(message)
        if delegation.id in ENGLISH:
            assert f"to be held on Wednesday, 15 November 2017 at {local} ({delegation.name} time)" in text
            assert str(message["Subject"]).startswith("Invitation: Virtual session of the Liaison Officers Network")
            assert message["Content-Language"] == "en"
        else:
            assert (
                f"se celebrará el miércoles 15 de noviembre de 2017 a las {local} (hora de {delegation.name})" in text
            )
            assert str(message["Subject"]).startswith("Convocatoria: Sesión virtual de la Red de Funcionarios")
            assert message["Content-Language"] == "es"
        assert f", {local} (" in str(message["Subject"])
        assert message["X-Mailflow-Kind"] == "meeting"
        assert message["X-Mailflow-Meeting"] == ID
        assert message["X-Mailflow-Campaign"] is None
        assert message["Auto-Submitted"] == "auto-generated"
        assert "https://meet.example.org/rcm" in text and "Próximos pasos" in text
    # The observer reads it in the secretariat's language, at the time of the zone it was given in.
    observer = text_of(sent[f"extra:{OBSERVER}"])
    assert "Estimados/as colegas" in observer
    assert "miércoles 15 de noviembre de 2017 a las 8:30 (hora de Costa Rica)" in observer


def test_the_table_groups_the_delegations_by_identical_local_time(rig: Rig) -> None:
    sent = by_recipient(rig.tick(ANNOUNCED))
    spanish = text_of(sent["HN"])
    table = spanish.split("Hora de inicio en cada país:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert [line.split(" — ")[0].strip() for line in table] == ["8:30", "9:30", "10:30"]
    groups = {line.split(" — ")[0].strip(): line.split(" — ")[1] for line in table}
    assert (
        groups["8:30"] == "Belize, Costa Rica, El Salvador, Guatemala, Honduras, México (Ciudad de México), Nicaragua"
    )
    assert groups["9:30"] == "Canada (Toronto), Panamá, United States (Nueva York)"
    assert groups["10:30"] == "República Dominicana"
    english = text_of(sent["CA"])
    assert "Start time in each country:\n  8:30 — Belize, Costa Rica" in english
    assert "  9:30 — Canada (Toronto), Panamá, United States (New York)\n  10:30 — República Dominicana" in english
    # Every delegation of each group is in the group of its own start time.
    names = {d.id: d.name for d in rig.config.delegations}
    for ident, local in LOCAL_START.items():
        assert names[ident] in groups[local]


def test_the_invitation_parses_and_its_instant_is_14_30_utc(rig: Rig) -> None:
    sent = by_recipient(rig.tick(ANNOUNCED))
    uids = set()
    for key, message in sent.items():
        calendar, event, part = calendar_of(message)
        assert part.get_param("method") == "REQUEST" and part.get_param("charset") == "utf-8"
        assert ics_name(message) in ("invitacion.ics", "invitation.ics")
        assert str(calendar["method"]) == "REQUEST"
        assert event.decoded("dtstart") == START_UTC
        assert event.decoded("dtend") == START_UTC + timedelta(minutes=90)
        assert event.decoded("dtstamp") == ANNOUNCED
        assert int(event["sequence"]) == 0
        assert str(event["status"]) == "CONFIRMED"
        assert str(event["location"]) == "https://meet.example.org/rcm"
        assert str(event["organizer"]) == "mailto:ts@example.org"
        recipient = key if key.startswith("extra:") else None
        contacts = [OBSERVER] if recipient else list(rig.config.delegation(key).contacts)
        assert attendees(event) == contacts
        attendee = event["attendee"]
        assert attendee.params["RSVP"] == "TRUE" and attendee.params["PARTSTAT"] == "NEEDS-ACTION"
        uids.add(str(event["uid"]))
        language = "en" if key in ENGLISH else "es"
        assert str(event["summary"]) == seed_meeting()["title"][language]
        assert LOCAL_START.get(key, "8:30") in str(event["description"])
    assert uids == {f"{ID}@example.org"}


def test_message_ids_are_deterministic_and_a_second_tick_sends_nothing(rig: Rig) -> None:
    received = rig.tick(ANNOUNCED)
    assert len(received) == 12
    for item in received:
        message = item.message
        key = str(message["X-Mailflow-Delegation"] or f"extra:{item.rcpt_tos[0]}")
        expected = make_message_id("example.org", "meeting", key, f"{ID}/notice:0")
        assert str(message["Message-ID"]).strip() == expected
    assert rig.tick(ANNOUNCED + timedelta(minutes=5)) == []


def test_a_meeting_that_appears_after_it_started_is_not_announced(rig: Rig) -> None:
    assert rig.tick(START_UTC + timedelta(minutes=1)) == []
    assert rig.store.get_meta(meetings.state_key(ID)) is None


# --------------------------------------------------------------------------
# Daylight saving in one zone and not another
# --------------------------------------------------------------------------


def test_a_meeting_across_a_daylight_saving_change_in_one_zone_only(tmp_path: Path, smtp_server: SmtpServer) -> None:
    # Canada and the United States moved their clocks forward on Sunday 11 March 2018; Costa Rica,
    # Panama and (until April) Mexico did not. 8:30 in San José is 9:30 in Ottawa on Friday 9 March,
    # 10:30 on Monday 12 March.
    before = seed_meeting(id="before-dst", start="2018-03-09T08:30", invite=["CR", "CA", "US", "PA", "MX"], extra=[])
    after = seed_meeting(id="after-dst", start="2018-03-12T08:30", invite=["CR", "CA", "US", "PA", "MX"], extra=[])
    rig = Rig(tmp_path, smtp_server, meeting_data(tmp_path, smtp_server, before, after))
    try:
        received = rig.tick(datetime(2018, 3, 1, 16, 0, tzinfo=UTC))
    finally:
        rig.close()
    assert len(received) == 10
    mails = {
        (str(r.message["X-Mailflow-Meeting"]), str(r.message["X-Mailflow-Delegation"])): r.message for r in received
    }
    expected = {
        ("before-dst", "CA"): "Friday, 9 March 2018 at 9:30",
        ("before-dst", "US"): "Friday, 9 March 2018 at 9:30",
        ("after-dst", "CA"): "Monday, 12 March 2018 at 10:30",
        ("after-dst", "US"): "Monday, 12 March 2018 at 10:30",
        ("before-dst", "CR"): "viernes 9 de marzo de 2018 a las 8:30",
        ("after-dst", "CR"): "lunes 12 de marzo de 2018 a las 8:30",
        ("before-dst", "PA"): "viernes 9 de marzo de 2018 a las 9:30",
        ("after-dst", "PA"): "lunes 12 de marzo de 2018 a las 9:30",
        ("before-dst", "MX"): "viernes 9 de marzo de 2018 a las 8:30",
        ("after-dst", "MX"): "lunes 12 de marzo de 2018 a las 8:30",
    }
    for key, phrase in expected.items():
        assert phrase in text_of(mails[key]), key
    # The same instant in UTC both times: Costa Rica has no daylight saving.
    assert calendar_of(mails["before-dst", "CA"])[1].decoded("dtstart") == datetime(2018, 3, 9, 14, 30, tzinfo=UTC)
    assert calendar_of(mails["after-dst", "CA"])[1].decoded("dtstart") == datetime(2018, 3, 12, 14, 30, tzinfo=UTC)
    # After the change Panama shares its 9:30 with nobody; Ottawa and Washington are at 10:30.
    table = text_of(mails["after-dst", "CR"]).split("Hora de inicio en cada país:\n", 1)[1].split("\n\n", 1)[0]
    assert table.splitlines() == [
        "  8:30 — Costa Rica, México (Ciudad de México)",
        "  9:30 — Panamá",
        "  10:30 — Canada (Toronto), United States (Nueva York)",
    ]


def test_a_start_the_clocks_skip_is_refused(tmp_path: Path) -> None:
    text = meeting_yaml(start="2018-03-11T02:30", timezone="America/Toronto")
    [problem] = problems_of(text, tmp_path)
    assert f"mailflow.yaml:{line_of(text, 'start:')}: meetings[0].start:" in problem
    assert "does not exist in America/Toronto" in problem


# --------------------------------------------------------------------------
# Updates and cancellations
# --------------------------------------------------------------------------


def test_a_change_of_time_and_link_sends_an_update_with_the_same_uid_and_sequence_1(rig: Rig) -> None:
    rig.tick(ANNOUNCED)
    rig.reconfigure(start="2017-11-15T09:30", link="https://meet.example.org/rcm-2")
    changed = ANNOUNCED + timedelta(days=2)
    sent = by_recipient(rig.tick(changed))
    assert set(sent) == {*LOCAL_START, f"extra:{OBSERVER}"}
    for key, message in sent.items():
        calendar, event, part = calendar_of(message)
        assert str(calendar["method"]) == "REQUEST" and part.get_param("method") == "REQUEST"
        assert str(event["uid"]) == f"{ID}@example.org"
        assert int(event["sequence"]) == 1
        assert event.decoded("dtstart") == START_UTC + timedelta(hours=1)
        assert str(event["location"]) == "https://meet.example.org/rcm-2"
        assert str(message["Message-ID"]).strip() == make_message_id("example.org", "meeting", key, f"{ID}/update:1:0")
    honduras = text_of(sent["HN"])
    assert str(sent["HN"]["Subject"]).startswith("Cambios en la reunión:")
    assert (
        "Fecha y hora (hora de Honduras): antes miércoles 15 de noviembre de 2017, 8:30–10:00; "
        "ahora miércoles 15 de noviembre de 2017, 9:30–11:00." in honduras
    )
    assert "Enlace: antes https://meet.example.org/rcm; ahora https://meet.example.org/rcm-2." in honduras
    dominican = text_of(sent["DO"])
    assert (
        "antes miércoles 15 de noviembre de 2017, 10:30–12:00; ahora miércoles 15 de noviembre de 2017, 11:30"
        in dominican
    )
    canada = text_of(sent["CA"])
    assert str(sent["CA"]["Subject"]).startswith("Updated:")
    assert (
        "Date and time (Canada time): was Wednesday, 15 November 2017, 9:30–11:00; "
        "now Wednesday, 15 November 2017, 10:30–12:00." in canada
    )
    assert "Link: was https://meet.example.org/rcm; now https://meet.example.org/rcm-2." in canada
    # The agenda alone changing is not worth an update.
    rig.reconfigure(start="2017-11-15T09:30", link="https://meet.example.org/rcm-2", agenda="1. Otro punto")
    assert rig.tick(changed + timedelta(hours=1)) == []


def test_cancelled_true_sends_a_cancellation_to_everyone_invited(rig: Rig) -> None:
    rig.tick(ANNOUNCED)
    rig.reconfigure(start="2017-11-15T09:00")
    rig.tick(ANNOUNCED + timedelta(days=1))
    rig.reconfigure(start="2017-11-15T09:00", cancelled=True)
    sent = by_recipient(rig.tick(ANNOUNCED + timedelta(days=2)))
    assert set(sent) == {*LOCAL_START, f"extra:{OBSERVER}"}
    for message in sent.values():
        calendar, event, part = calendar_of(message)
        assert str(calendar["method"]) == "CANCEL" and part.get_param("method") == "CANCEL"
        assert str(event["status"]) == "CANCELLED"
        assert str(event["uid"]) == f"{ID}@example.org"
        assert int(event["sequence"]) == 2
        assert ics_name(message) in ("cancelacion.ics", "cancellation.ics")
    assert "ha sido cancelada" in text_of(sent["HN"]) and "9:00–10:30 (hora de Honduras)" in text_of(sent["HN"])
    assert "has been cancelled" in text_of(sent["US"]) and "10:00–11:30 (United States time)" in text_of(sent["US"])
    assert str(sent["US"]["Subject"]).startswith("Cancelled:")
    # Nothing more about it: no reminders either.
    assert rig.tick(START_UTC - timedelta(days=1)) == []
    assert rig.tick(START_UTC - timedelta(minutes=30)) == []


def test_a_meeting_removed_from_the_configuration_is_cancelled_from_what_was_remembered(rig: Rig) -> None:
    rig.tick(ANNOUNCED)
    rig.remove_meetings()
    sent = by_recipient(rig.tick(ANNOUNCED + timedelta(days=3)))
    assert set(sent) == {*LOCAL_START, f"extra:{OBSERVER}"}
    for message in sent.values():
        calendar, event, _ = calendar_of(message)
        assert str(calendar["method"]) == "CANCEL" and str(event["status"]) == "CANCELLED"
        assert int(event["sequence"]) == 1 and event.decoded("dtstart") == START_UTC
    assert "Sesión virtual de la Red de Funcionarios de Enlace" in text_of(sent["PA"])
    assert "9:30–11:00 (hora de Panamá)" in text_of(sent["PA"])
    state = json.loads(rig.store.get_meta(meetings.state_key(ID)) or "null")
    assert state["closed"] is True
    assert meetings.load_index(rig.store.get_meta(meetings.INDEX_KEY)) == [ID]
    # Once its time has passed it is forgotten.
    assert rig.tick(START_UTC + timedelta(hours=1)) == []
    assert rig.store.get_meta(meetings.state_key(ID)) == "null"
    assert meetings.load_index(rig.store.get_meta(meetings.INDEX_KEY)) == []


def test_a_meeting_removed_after_it_took_place_sends_nothing(rig: Rig) -> None:
    rig.tick(ANNOUNCED)
    rig.remove_meetings()
    assert rig.tick(START_UTC + timedelta(hours=2)) == []
    assert meetings.load_index(rig.store.get_meta(meetings.INDEX_KEY)) == []


def test_a_delegation_added_gets_the_notice_and_one_dropped_a_cancellation(rig: Rig) -> None:
    rig.reconfigure(invite=["HN", "SV"], extra=[])
    assert set(by_recipient(rig.tick(ANNOUNCED))) == {"HN", "SV"}
    rig.reconfigure(invite=["HN", "GT"], extra=[])
    sent = by_recipient(rig.tick(ANNOUNCED + timedelta(hours=1)))
    assert set(sent) == {"GT", "SV"}
    assert str(calendar_of(sent["GT"])[0]["method"]) == "REQUEST"
    assert str(calendar_of(sent["SV"])[0]["method"]) == "CANCEL"
    assert int(calendar_of(sent["SV"])[1]["sequence"]) == 0
    # The grouped table follows who is invited now.
    table = text_of(sent["GT"]).split("Hora de inicio en cada país:\n", 1)[1].split("\n\n", 1)[0]
    assert table.strip() == "8:30 — Honduras, Guatemala"  # in the order of `invite`


def test_a_notice_still_waiting_when_the_meeting_changes_is_replaced_by_the_new_one(rig: Rig) -> None:
    rig.server.stop()
    assert rig.tick(ANNOUNCED) == []  # the server is down: every notice waits for a retry
    rig.server.start()
    rig.reconfigure(start="2017-11-15T09:30")
    sent = by_recipient(rig.tick(ANNOUNCED + timedelta(hours=1)))
    assert len(sent) == 12
    # Nobody saw version 0: they get the notice of version 1, not an update of a notice they never had.
    for message in sent.values():
        assert str(message["Subject"]).startswith(("Convocatoria:", "Invitation:"))
        assert int(calendar_of(message)[1]["sequence"]) == 1
    rows = rig.store.outbox(campaign="", delegation="HN")
    assert [(r.slot, r.status) for r in rows] == [
        (f"{ID}/notice:0", OutboxStatus.SKIPPED),
        (f"{ID}/notice:1", OutboxStatus.SENT),
    ]
    assert "version 1" in (rows[0].last_error or "")


def test_a_meeting_cancelled_before_its_notice_could_go_out_sends_nothing(rig: Rig) -> None:
    rig.server.stop()
    assert rig.tick(ANNOUNCED) == []
    rig.server.start()
    rig.reconfigure(cancelled=True)
    assert rig.tick(ANNOUNCED + timedelta(hours=1)) == []
    assert {row.status for row in rig.store.outbox()} == {OutboxStatus.SKIPPED}


def test_a_cancelled_meeting_announced_again_gets_a_new_notice_with_a_higher_sequence(rig: Rig) -> None:
    rig.tick(ANNOUNCED)
    rig.reconfigure(cancelled=True)
    assert {int(calendar_of(r.message)[1]["sequence"]) for r in rig.tick(ANNOUNCED + timedelta(days=1))} == {1}
    rig.reconfigure(cancelled=False)
    sent = rig.tick(ANNOUNCED + timedelta(days=2))
    assert len(sent) == 12
    for item in sent:
        calendar, event, _ = calendar_of(item.message)
        assert str(calendar["method"]) == "REQUEST" and int(event["sequence"]) == 2
        assert str(event["uid"]) == f"{ID}@example.org"


def test_a_delegation_dropped_and_invited_again_gets_the_notice_again(rig: Rig) -> None:
    rig.reconfigure(invite=["HN", "SV"], extra=[])
    rig.tick(ANNOUNCED)
    rig.reconfigure(invite=["HN"], extra=[])
    assert [str(r.message["X-Mailflow-Delegation"]) for r in rig.tick(ANNOUNCED + timedelta(hours=1))] == ["SV"]
    rig.reconfigure(invite=["HN", "SV"], extra=[])
    [again] = rig.tick(ANNOUNCED + timedelta(hours=2))
    assert again.message["X-Mailflow-Delegation"] == "SV"
    assert str(calendar_of(again.message)[0]["method"]) == "REQUEST"
    slots = [r.slot for r in rig.store.outbox(campaign="", delegation="SV")]
    assert slots == [f"{ID}/notice:0", f"{ID}/cancel:0", f"{ID}/notice:0#2"]


# --------------------------------------------------------------------------
# Reminders
# --------------------------------------------------------------------------


def test_reminders_at_minus_1d_and_minus_1h_each_once(rig: Rig) -> None:
    rig.tick(ANNOUNCED)
    reminders: Counter[tuple[str, datetime]] = Counter()
    now = ANNOUNCED + timedelta(minutes=30)
    while now < START_UTC + timedelta(hours=3):
        for item in rig.tick(now):
            message = item.message
            assert message["X-Mailflow-Kind"] == "meeting"
            assert str(message["Subject"]).startswith(("Recordatorio:", "Reminder:"))
            assert not [p for p in message.walk() if p.get_content_type() in ("text/calendar", "application/ics")]
            key = str(message["X-Mailflow-Delegation"] or f"extra:{item.rcpt_tos[0]}")
            reminders[key, now] += 1
        now += timedelta(minutes=30)
    day_before, hour_before = START_UTC - timedelta(days=1), START_UTC - timedelta(hours=1)
    assert reminders == Counter(
        {(k, t): 1 for k in [*LOCAL_START, f"extra:{OBSERVER}"] for t in (day_before, hour_before)}
    )


def test_the_reminder_says_when_in_the_readers_time(rig: Rig) -> None:
    rig.tick(ANNOUNCED)
    sent = by_recipient(rig.tick(START_UTC - timedelta(hours=1)))
    assert "Les recordamos que la reunión «Sesión virtual de la Red de Funcionarios de Enlace» comienza el " in text_of(
        sent["DO"]
    )
    assert "miércoles 15 de noviembre de 2017 a las 10:30 (hora de República Dominicana)" in text_of(sent["DO"])
    assert "starts on Wednesday, 15 November 2017 at 9:30 (United States time)" in text_of(sent["US"])


def test_after_downtime_only_the_latest_reminder_goes_and_only_before_the_start(rig: Rig) -> None:
    rig.tick(ANNOUNCED)
    # Down from the notice until 30 minutes before the start: the -1d reminder is superseded by the -1h one.
    sent = rig.tick(START_UTC - timedelta(minutes=30))
    assert len(sent) == 12
    rows = [r for r in rig.store.outbox(campaign="", delegation="HN") if "/reminder:" in r.slot]
    assert {(r.slot.split("/")[1], r.status) for r in rows} == {
        ("reminder:-1d@20171115T1430Z", OutboxStatus.SKIPPED),
        ("reminder:-1h@20171115T1430Z", OutboxStatus.SENT),
    }
    assert rig.tick(START_UTC + timedelta(minutes=5)) == []


def test_a_meeting_announced_late_skips_the_reminders_already_due(rig: Rig) -> None:
    sent = rig.tick(START_UTC - timedelta(hours=2))
    assert {str(r.message["Subject"]).split(":")[0] for r in sent} == {"Convocatoria", "Invitation"}
    later = rig.tick(START_UTC - timedelta(minutes=59))
    assert len(later) == 12 and all(str(r.message["Subject"]).startswith(("Recordatorio", "Reminder")) for r in later)


def test_moving_the_meeting_arms_its_reminders_again(rig: Rig) -> None:
    rig.tick(ANNOUNCED)
    assert len(rig.tick(START_UTC - timedelta(hours=1))) == 12  # -1h reminders
    rig.reconfigure(start="2017-11-16T08:30")
    assert len(rig.tick(START_UTC - timedelta(minutes=50))) == 12  # updates
    assert len(rig.tick(START_UTC + timedelta(days=1, hours=-1))) == 12  # -1h of the new start
    assert rig.tick(START_UTC + timedelta(days=1, minutes=30)) == []


# --------------------------------------------------------------------------
# Escaping and header safety
# --------------------------------------------------------------------------


def test_titles_agenda_and_links_are_escaped_in_html(tmp_path: Path, smtp_server: SmtpServer) -> None:
    meeting = seed_meeting(
        title='Reunión <b>urgente</b> & "RCM"',
        agenda="<script>alert(1)</script>\nPunto 2 & más",
        link='https://meet.example.org/rcm?a=1&b="x"',
        invite=["HN"],
        extra=[],
    )
    rig = Rig(tmp_path, smtp_server, meeting_data(tmp_path, smtp_server, meeting))
    try:
        [received] = rig.tick(ANNOUNCED)
    finally:
        rig.close()
    html = html_of(received.message)
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<b>urgente</b>" not in html and "&lt;b&gt;urgente&lt;/b&gt;" in html
    assert 'href="https://meet.example.org/rcm?a=1&amp;b=&#34;x&#34;"' in html
    assert str(received.message["Subject"]).startswith('Convocatoria: Reunión <b>urgente</b> & "RCM"')
    assert "<script>alert(1)</script>" in text_of(received.message)


# --------------------------------------------------------------------------
# Status and preview
# --------------------------------------------------------------------------


def test_status_lists_the_upcoming_meeting_and_who_was_invited(rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    rig.tick(ANNOUNCED)
    path = str(rig.config.path)
    assert main(["--config", path, "status", "--json", "--now", "2017-11-02T10:00"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["campaigns"] == []
    [meeting] = data["meetings"]
    assert meeting["id"] == ID and meeting["start"] == "2017-11-15T14:30:00+00:00"
    assert meeting["sequence"] == 0 and meeting["announced"] is True and meeting["cancelled"] is False
    assert meeting["next_reminder_at"] == "2017-11-14T14:30:00+00:00"
    invited = {i["id"]: i for i in meeting["invited"]}
    assert set(invited) == {*LOCAL_START, f"extra:{OBSERVER}"}
    assert invited["HN"]["status"] == "sent" and invited["HN"]["email"] == "notice"
    assert invited["HN"]["sent_at"] == ANNOUNCED.isoformat()
    assert main(["--config", path, "status", "--now", "2017-11-02T10:00"]) == 0
    table = capsys.readouterr().out
    assert f"Meeting: Sesión virtual de la Red de Funcionarios de Enlace [{ID}] — Wed 15 Nov 08:30–10:00" in table
    assert "Honduras (HN)" in table and OBSERVER in table and "12 of 12 invited reached" in table
    # Once it has ended it is no longer listed.
    assert main(["--config", path, "status", "--json", "--now", "2017-11-15T10:30"]) == 0
    assert json.loads(capsys.readouterr().out)["meetings"] == []


def test_preview_shows_a_delegations_notice_without_sending(rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(rig.config.path)
    code = main(["--config", path, "preview", "meeting", "--delegation", "DO", "--now", "2017-11-01T10:00"])
    out = capsys.readouterr().out
    assert code == 0
    assert "X-Mailflow-Kind: meeting" in out and "X-Mailflow-Meeting: network-2017-11-15" in out
    assert "miércoles 15 de noviembre de 2017 a las 10:30 (hora de República Dominicana)" in out
    assert "[attachment: invitacion.ics (application/ics" in out
    code = main(["--config", path, "preview", "meeting", "--delegation", OBSERVER, "--meeting", ID])
    assert code == 0 and "Estimados/as colegas" in capsys.readouterr().out
    assert main(["--config", path, "preview", "meeting", "--delegation", "XX"]) == 2
    assert "'XX' is not invited to meeting" in capsys.readouterr().err
    assert rig.server.messages == [] and rig.store.outbox() == []


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


def meeting_yaml(**fields: str) -> str:
    """A whole configuration (two delegations) with one meeting whose keys are given as YAML text."""
    entries = {"id": ID, "title": "Virtual session", "start": "2017-11-15T08:30", "duration": "90m", **fields}
    body = "".join(f"    {key}: {value}\n" for key, value in entries.items())
    return f"""\
secretariat:
  name: TS
  address: ts@example.org
  timezone: America/Costa_Rica
mail:
  transport: local
delegations:
  - id: HN
    name: Honduras
    language: es
    timezone: America/Tegucigalpa
    contacts: [enlace@sre.example.hn]
  - id: US
    name: United States
    language: en
    timezone: America/New_York
    contacts: [liaison@state.example.gov]
campaigns: []
meetings:
  - {body.lstrip()}"""


def problems_of(text: str, tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, tmp_path / "mailflow.yaml", {})
    return caught.value.problems


def line_of(text: str, needle: str) -> int:
    """The line of ``needle`` in the meetings section."""
    lines = text.splitlines()
    first = lines.index("meetings:")
    return next(n for n, line in enumerate(lines, 1) if n > first and needle in line)


def test_the_seed_meeting_is_read_into_a_frozen_dataclass(tmp_path: Path) -> None:
    text = meeting_yaml(invite="all", extra=f"[{OBSERVER}]", reminders='["-1h", "-1d"]', link="https://m.example.org")
    config = parse_config(text, tmp_path / "mailflow.yaml", {})
    [meeting] = config.meetings
    assert meeting.start == datetime(2017, 11, 15, 8, 30, tzinfo=COSTA_RICA)
    assert meeting.start.astimezone(UTC) == START_UTC
    assert meeting.timezone == "America/Costa_Rica"  # the secretariat's, by default
    assert meeting.duration == timedelta(minutes=90)
    assert meeting.invite == ("HN", "US") and meeting.extra == (OBSERVER,)
    assert meeting.reminders == (timedelta(days=-1), timedelta(hours=-1))
    assert meeting.cancelled is False and meeting.agenda == "" and meeting.link == "https://m.example.org"
    with pytest.raises(AttributeError):
        meeting.title = "other"  # type: ignore[misc]
    assert config.find_meeting(ID) is meeting and config.find_meeting("nope") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90m", timedelta(minutes=90)),
        ("1h30m", timedelta(minutes=90)),
        ("1h 30m", timedelta(minutes=90)),
        ("2h", timedelta(hours=2)),
    ],
)
def test_durations(text: str, expected: timedelta) -> None:
    assert parse_meeting_duration(text) == expected


@pytest.mark.parametrize("text", ["90", "1x", "-1h", "h", "1h30", ""])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_meeting_duration(text)


@pytest.mark.parametrize(
    ("fields", "key", "needle", "message"),
    [
        ({"invite": "[HN, XX]"}, "meetings[0].invite[1]", "invite:", "unknown delegation 'XX'"),
        ({"duration": "ninety"}, "meetings[0].duration", "duration:", "'ninety' is not a duration"),
        ({"duration": "90"}, "meetings[0].duration", "duration:", "give a unit"),
        ({"reminders": '["-1d", "soon"]'}, "meetings[0].reminders[1]", "reminders:", "'soon' is not an offset"),
        ({"reminders": '["+1h"]'}, "meetings[0].reminders[0]", "reminders:", "is not before the start"),
        ({"timezone": "America/San_Jose"}, "meetings[0].timezone", "timezone:", "unknown IANA time zone"),
        ({"start": "2017-11-15"}, "meetings[0].start", "start:", "has no time of day"),
        ({"start": "tomorrow"}, "meetings[0].start", "start:", "is not a date and time"),
        ({"link": "meet.example.org/rcm"}, "meetings[0].link", "link:", "is not a web address"),
        ({"link": "javascript:alert(1)"}, "meetings[0].link", "link:", "is not a web address"),
        ({"title": '"Line one\\nline two"'}, "meetings[0].title", "title:", "line breaks"),
        ({"title": '"Line one\\u2028line two"'}, "meetings[0].title", "title:", "line breaks"),
        ({"title": '{es: "uno\\ndos", en: One}'}, "meetings[0].title.es", "title:", "one line of text"),
        ({"agenda": "agenda.txt"}, "meetings[0].agenda", "agenda:", "agenda.txt not found"),
        ({"invite": "[]"}, "meetings[0].invite", "invite:", "invites nobody"),
        ({"extra": "[not-an-address]"}, "meetings[0].extra[0]", "extra:", "is not an email address"),
        ({"cancelled": "perhaps"}, "meetings[0].cancelled", "cancelled:", "expected true or false"),
        ({"where": "San José"}, "meetings[0].where", "where:", "unknown key"),
    ],
)
def test_configuration_errors_name_the_key_and_line(
    tmp_path: Path, fields: dict[str, str], key: str, needle: str, message: str
) -> None:
    text = meeting_yaml(**fields)
    problems = problems_of(text, tmp_path)
    assert len(problems) == 1, problems
    [problem] = problems
    assert problem.startswith(f"mailflow.yaml:{line_of(text, needle)}: {key}: "), problem
    assert message in problem


def test_a_duplicate_meeting_id_is_reported(tmp_path: Path) -> None:
    text = meeting_yaml() + f"  - id: {ID}\n    title: Again\n    start: 2017-11-16T08:30\n"
    [problem] = problems_of(text, tmp_path)
    assert "meetings[1].id: duplicate id" in problem


def test_the_agenda_may_be_a_file_beside_the_configuration(tmp_path: Path) -> None:
    (tmp_path / "agenda.md").write_text("1. Responsible column\r\n2. Next steps\n", encoding="utf-8")
    config = parse_config(meeting_yaml(agenda="agenda.md"), tmp_path / "mailflow.yaml", {})
    assert config.meetings[0].agenda == "1. Responsible column\n2. Next steps"
    assert config.meetings[0].agenda_file == tmp_path / "agenda.md"
    inline = parse_config(meeting_yaml(agenda='"1. Responsible column  2. Next steps"'), tmp_path / "m.yaml", {})
    assert inline.meetings[0].agenda == "1. Responsible column  2. Next steps"
    assert inline.meetings[0].agenda_file is None


def test_the_documented_example_meeting_is_valid() -> None:
    """config.example.yaml documents the seed's session, commented out so the example sends only its campaign."""
    text = EXAMPLE.read_text(encoding="utf-8")
    block = text.split("# meetings:", 1)[1]
    lines = ["meetings:"] + [line[2:] if line.startswith("# ") else line[1:] for line in block.splitlines()]
    lines = [line for line in lines if line.strip() and not line.startswith(("#", " #"))]
    data = yaml.safe_load(text)
    data["meetings"] = yaml.safe_load("\n".join(lines))["meetings"]
    data["campaigns"][0]["workbook"] = str(EXAMPLE.parent / data["campaigns"][0]["workbook"])
    config = parse_config(yaml.safe_dump(data, allow_unicode=True), EXAMPLE, {})
    [meeting] = config.meetings
    assert meeting.start.astimezone(UTC) == START_UTC and meeting.duration == timedelta(minutes=90)
    assert meeting.invite == tuple(d.id for d in config.delegations)


# --------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------


def test_the_example_context_has_the_shape_of_a_real_one(tmp_path: Path, smtp_server: SmtpServer) -> None:
    config = load(tmp_path, meeting_data(tmp_path, smtp_server, seed_meeting()))
    meeting = config.meeting(ID)
    state, slot = meetings.preview_state(meeting, None)
    real = meetings.meeting_email(config, state, "HN", slot, ANNOUNCED).context

    def shape(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: shape(v) for k, v in value.items()}
        if isinstance(value, list):
            return [shape(value[0])] if value else []
        return type(value).__name__

    for language in ("es", "en"):
        example = example_context("meeting", language)
        assert shape({**example, "reminder": None}) == shape({**real, "reminder": None})
        assert "reference" not in example
        rendered = Renderer().render("meeting", language, example)
        assert "[Ref." not in rendered.subject
    assert Renderer().check() == []


def test_slots_round_trip() -> None:
    start = START_UTC
    assert meetings.parse_slot(meetings.notice_slot(ID, 3)) == meetings.SlotInfo(ID, "notice", 3)
    assert meetings.parse_slot(meetings.update_slot(ID, 2, 0)) == meetings.SlotInfo(ID, "update", 2, 0)
    assert meetings.parse_slot(meetings.cancel_slot(ID, 1) + "#2") == meetings.SlotInfo(ID, "cancel", 1)
    slot = meetings.reminder_slot(ID, timedelta(minutes=-90), start)
    assert slot == f"{ID}/reminder:-90m@20171115T1430Z"
    assert meetings.parse_slot(slot).offset == timedelta(minutes=-90)
    assert re.fullmatch(r"[^/]+/reminder:-1d@\d{8}T\d{4}Z", meetings.reminder_slot(ID, timedelta(days=-1), start))


def test_planning_is_pure_and_decides_from_state_and_records(tmp_path: Path, smtp_server: SmtpServer) -> None:
    config = load(tmp_path, meeting_data(tmp_path, smtp_server, seed_meeting(invite=["HN"], extra=[])))
    meeting = config.meeting(ID)
    recipients = meetings.recipients_of(meeting, config)
    # Not announced once it has started.
    late = meetings.plan_meeting(ID, meeting, recipients, None, {}, START_UTC)
    assert late.state is None and late.emails == ()
    # The notice, then nothing new while the records say it is pending.
    first = meetings.plan_meeting(ID, meeting, recipients, None, {}, ANNOUNCED)
    assert [(e.recipient, e.slot, e.skipped) for e in first.emails] == [("HN", f"{ID}/notice:0", None)]
    assert first.state is not None and first.save
    recorded = {"HN": {f"{ID}/notice:0": "sent"}}
    again = meetings.plan_meeting(ID, meeting, recipients, first.state, recorded, ANNOUNCED)
    assert again.emails == () and not again.save
    # Ten minutes before the start, after downtime: the -1h reminder; the -1d one is recorded as superseded.
    due = meetings.plan_meeting(ID, meeting, recipients, first.state, recorded, START_UTC - timedelta(minutes=10))
    assert [(e.slot.split("/")[1], e.skipped is None) for e in due.emails] == [
        ("reminder:-1d@20171115T1430Z", False),
        ("reminder:-1h@20171115T1430Z", True),
    ]
    # The state survives the store as JSON.
    assert meetings.MeetingState.from_text(first.state.to_text()) == first.state
