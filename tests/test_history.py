"""History: a delegation's timeline and a campaign's audit trail, from a campaign driven through the local twins."""

from __future__ import annotations

import csv
import email
import io
import json
import mailbox
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.policy import default
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from mailflow import history
from mailflow.config import Config
from mailflow.store import OutboxStatus, Store
from tests.helpers import fill_workbook, local_engine, reply_to, workbook_of

CAMPAIGN = "responsible-2017"
OPENS = datetime(2017, 10, 18, 16, 0, tzinfo=UTC)  # 10:00 in Costa Rica
COSTA_RICA = ZoneInfo("America/Costa_Rica")
FORMULA_SUBJECT = "=cmd|' /C calc'!A0"


@dataclass
class Scenario:
    config: Config
    store: Store


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    """Requests go out; Costa Rica replies with two answers, then its auto-reply answers our follow-up; Honduras
    replies with a formula for a subject; two days later the reminders go out."""
    tmp_path = tmp_path_factory.mktemp("history")
    engine, clock = local_engine(tmp_path, OPENS)
    config, store = engine.config, engine.store
    sent = [email.message_from_bytes(m.as_bytes(), policy=default) for m in mailbox.Maildir(tmp_path / "out")]
    requests: dict[str, EmailMessage] = {str(m["X-Mailflow-Delegation"]): m for m in sent}
    inbox = mailbox.Maildir(tmp_path / "in", create=True)
    name, workbook = workbook_of(requests["CR"])
    filled = fill_workbook(workbook, {"1.1": "PANI", "1.2": "Dirección General de Migración"})
    inbox.add(reply_to(requests["CR"], sender="enlace@pani.example.cr", attachments=[(name, filled)]))
    inbox.add(reply_to(requests["HN"], sender="enlace@sre.example.hn", subject=FORMULA_SUBJECT))
    clock.set(OPENS + timedelta(hours=1))
    engine.tick()
    inbox.add(
        reply_to(
            requests["CR"],
            sender="enlace@pani.example.cr",
            subject="Respuesta automática: fuera de la oficina",
            body="Estoy fuera de la oficina hasta el lunes.\n",
            headers={"Auto-Submitted": "auto-replied"},
        )
    )
    clock.set(OPENS + timedelta(hours=3))
    engine.tick()
    clock.set(datetime(2017, 10, 20, 15, 30, tzinfo=UTC))  # Friday 09:30 in Costa Rica: reminders are due
    engine.tick()
    yield Scenario(config, store)
    store.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "store.db") as opened:
        yield opened


def test_a_delegation_timeline_tells_what_happened_in_order(scenario: Scenario) -> None:
    entries = history.timeline(scenario.store, CAMPAIGN, "CR")
    story = [(e.direction, e.kind, e.outcome) for e in entries]
    expected = [
        ("out", "request", "sent"),
        ("in", "reply", "applied"),
        ("state", "state_changed", "awaiting -> partial"),
        ("out", "missing", "sent"),
        ("in", "auto_reply", "auto_reply"),
        ("out", "reminder", "sent"),
    ]
    positions = [story.index(step) for step in expected]
    assert positions == sorted(positions), story
    assert [e.at for e in entries] == sorted(e.at for e in entries)
    assert all(e.campaign == CAMPAIGN and e.delegation == "CR" for e in entries)

    by_step = {(e.direction, e.kind, e.outcome): e for e in entries}
    request = by_step["out", "request", "sent"]
    assert request.at == OPENS and "enlace@pani.example.cr" in request.detail and request.ref.startswith("outbox:")
    reply = by_step["in", "reply", "applied"]
    assert reply.subject.startswith("RE: ") and reply.ref.startswith("inbound:")
    assert "Plan estratégico - Costa Rica.xlsx: parsed (2 answers)" in reply.detail
    partial = by_step["state", "state_changed", "awaiting -> partial"]
    assert partial.at == reply.at and "reply received: 2/40 answered" in partial.detail
    follow_up = by_step["out", "missing", "sent"]
    assert f"in reply to {reply.ref}" in follow_up.detail
    assert by_step["in", "auto_reply", "auto_reply"].at == OPENS + timedelta(hours=3)
    # The campaign opening and the request going out are state changes too.
    assert ("state", "state_changed", "none -> not_sent") in story
    assert ("state", "state_changed", "not_sent -> awaiting") in story


def test_every_fact_appears_once(scenario: Scenario) -> None:
    """An email out is its outbox row, never also its email_sent event; a message in, never also its received_*."""
    entries = history.timeline(scenario.store, CAMPAIGN, "CR")
    refs = [e.ref for e in entries]
    assert len(refs) == len(set(refs))
    assert not any(e.kind == "email_sent" or e.kind.startswith("received_") for e in entries)
    assert sorted(f"outbox:{row.id}" for row in scenario.store.outbox(campaign=CAMPAIGN, delegation="CR")) == sorted(
        r for r in refs if r.startswith("outbox:")
    )
    assert sorted(f"inbound:{row.id}" for row in scenario.store.inbound_rows(delegation="CR")) == sorted(
        r for r in refs if r.startswith("inbound:")
    )
    # Without a campaign, the same delegation's history is the same here (one campaign).
    assert history.timeline(scenario.store, None, "CR") == entries


def test_the_timeline_for_the_terminal_is_in_the_secretariat_time_zone(scenario: Scenario) -> None:
    entries = history.timeline(scenario.store, CAMPAIGN, "CR")
    text = history.format_timeline(entries, COSTA_RICA, title="Costa Rica (CR)")
    lines = text.splitlines()
    assert lines[0] == "Costa Rica (CR) — times in America/Costa_Rica"
    assert len(lines) == len(entries) + 1
    request = next(line for line in lines if "→ request" in line)
    assert request.startswith("2017-10-18 10:00  → request") and "sent — to enlace@pani.example.cr" in request
    reply = next(line for line in lines if "← reply" in line)
    assert reply.startswith("2017-10-18 11:00") and "applied — Plan estratégico - Costa Rica.xlsx: parsed" in reply
    assert "…" in reply  # the long subject is trimmed
    state = next(line for line in lines if "awaiting -> partial" in line)
    assert state.startswith("2017-10-18 11:00  • state_changed") and "reply received: 2/40" in state
    assert next(line for line in lines if "→ reminder" in line).startswith("2017-10-20 09:30")
    assert history.format_timeline([], COSTA_RICA, title="Belize (BZ)").endswith("nothing recorded yet")


def test_the_export_holds_every_delegation_and_reads_back(scenario: Scenario) -> None:
    rows = history.history_rows(scenario.store, scenario.config, CAMPAIGN)
    assert all(tuple(row) == history.HISTORY_FIELDS for row in rows)
    assert [row["at"] for row in rows] == sorted(row["at"] for row in rows)
    tz = scenario.config.secretariat.tz
    for delegation in scenario.config.campaign(CAMPAIGN).delegations:
        timeline = [e.as_row(tz) for e in history.timeline(scenario.store, CAMPAIGN, delegation)]
        assert [row for row in rows if row["delegation"] == delegation] == timeline
        assert any(row["kind"] == "reminder" for row in timeline), delegation
    first = rows[0]
    assert first["at"] == "2017-10-18T16:00:00+00:00" and first["at_local"] == "2017-10-18 10:00:00-06:00"

    parsed = list(csv.DictReader(io.StringIO(history.export_csv(rows), newline="")))
    assert len(parsed) == len(rows)
    for back, row in zip(parsed, rows, strict=True):
        assert back == {field: history.spreadsheet_safe(row[field]) for field in history.HISTORY_FIELDS}
    formula = [back for back in parsed if FORMULA_SUBJECT in back["subject"]]
    assert {back["subject"] for back in formula} == {
        "'" + FORMULA_SUBJECT,
        f"Re: {FORMULA_SUBJECT} [Ref. {CAMPAIGN}/HN]",
    }

    document = json.loads(history.export_json(rows))
    assert document == {"campaign": CAMPAIGN, "events": rows}
    assert FORMULA_SUBJECT in {event["subject"] for event in document["events"]}  # JSON is data: left as is


def test_service_events_and_secretariat_emails_belong_to_the_campaign_export(scenario: Scenario, store: Store) -> None:
    rows = history.history_rows(scenario.store, scenario.config, CAMPAIGN)
    # The only lines that belong to no delegation are the Secretariat's digests.
    assert {row["kind"] for row in rows if row["delegation"] == ""} <= {"digest"}
    at = datetime(2017, 10, 21, 14, 0, tzinfo=UTC)
    with store.transaction():
        store.record_event(at, "uidvalidity_changed", "INBOX: 1 -> 2")
        store.record_event(at, "received_unrelated", "newsletter", detail={"inbound_id": 999})
        digest = store.add_outbox(
            campaign="",
            delegation="",
            kind="digest",
            slot="digest:2017-10-21",
            message_id="<digest-2017-10-21@example.org>",
            status=OutboxStatus.PENDING,
            scheduled_at=at,
            created_at=at,
        )
    assert digest is not None
    service = history.history_rows(store, scenario.config, CAMPAIGN)
    assert [(row["direction"], row["kind"], row["outcome"]) for row in service] == [
        ("note", "uidvalidity_changed", ""),
        ("out", "digest", "pending"),
    ]
    assert service[0]["detail"] == "INBOX: 1 -> 2" and service[1]["ref"] == f"outbox:{digest}"


def test_an_email_skipped_failed_or_retried_is_one_entry_at_the_moment_it_happened(store: Store) -> None:
    planned = datetime(2017, 10, 20, 15, 0, tzinfo=UTC)
    later = planned + timedelta(hours=2)
    ids: dict[str, int] = {}
    with store.transaction():
        for kind in ("reminder", "overdue", "receipt"):
            outbox_id = store.add_outbox(
                campaign=CAMPAIGN,
                delegation="MX",
                kind=kind,
                slot=kind,
                message_id=f"<{kind}@example.org>",
                status=OutboxStatus.PENDING,
                scheduled_at=planned,
                created_at=planned,
            )
            assert outbox_id is not None
            ids[kind] = outbox_id
        store.mark_skipped(ids["reminder"], "the delegation completed its return before this was sent")
        store.record_event(
            later, "email_skipped", "delegation complete", campaign=CAMPAIGN, delegation="MX", outbox_id=ids["reminder"]
        )
        store.mark_failed(ids["overdue"], "550 5.1.1 user unknown", {"enlace@sre.example.mx": "550 5.1.1 unknown"})
        store.record_event(
            later, "send_failed", "550 5.1.1 user unknown", campaign=CAMPAIGN, delegation="MX", outbox_id=ids["overdue"]
        )
        store.record_event(
            later,
            "contact_refused",
            "enlace@sre.example.mx refused for good: 550 5.1.1 unknown",
            campaign=CAMPAIGN,
            delegation="MX",
            outbox_id=ids["overdue"],
        )
        store.mark_retry(ids["receipt"], "421 try again later", later + timedelta(minutes=5))
        store.record_event(
            later, "send_retry", "421 try again later", campaign=CAMPAIGN, delegation="MX", outbox_id=ids["receipt"]
        )
    entries = history.timeline(store, CAMPAIGN, "MX")
    summary = [(e.ref, e.direction, e.kind, e.outcome, e.at) for e in entries]
    assert summary == [
        (f"outbox:{ids['receipt']}", "out", "receipt", "retrying", planned),  # still pending: when it was planned
        (f"outbox:{ids['reminder']}", "out", "reminder", "skipped", later),
        (f"outbox:{ids['overdue']}", "out", "overdue", "failed", later),
        (summary[3][0], "note", "contact_refused", "refused", later),
        (summary[4][0], "note", "send_retry", "will retry", later),
    ]
    assert entries[0].detail == "421 try again later"
    assert entries[1].detail == "the delegation completed its return before this was sent"
    assert entries[2].detail == "550 5.1.1 user unknown"


def test_a_hostile_subject_cannot_rewrite_the_terminal_or_the_line() -> None:
    entry = history.TimelineEntry(
        at=OPENS,
        direction="in",
        kind="reply",
        subject="Plan\x1b[2J\u202eevil\r\nBcc: x",
        outcome="applied",
        detail="",
        campaign=CAMPAIGN,
        delegation="CR",
        ref="inbound:1",
    )
    text = history.format_timeline([entry], COSTA_RICA, title="Costa Rica (CR)")
    assert "\x1b" not in text and "\u202e" not in text and len(text.splitlines()) == 2


@pytest.mark.parametrize(
    ("cell", "safe"),
    [
        ('=HYPERLINK("http://x")', '\'=HYPERLINK("http://x")'),
        ("+1", "'+1"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\t=1", "'\t=1"),
        ("\r=1", "'\r=1"),
        ("RE: =1", "RE: =1"),
        ("", ""),
    ],
)
def test_cells_a_spreadsheet_would_run_are_made_text(cell: str, safe: str) -> None:
    assert history.spreadsheet_safe(cell) == safe
    row = dict.fromkeys(history.HISTORY_FIELDS, "") | {"subject": cell}
    [back] = list(csv.DictReader(io.StringIO(history.export_csv([row]), newline="")))
    assert back["subject"] == safe
