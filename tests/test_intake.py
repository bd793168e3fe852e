"""Intake over the local maildir twin: one bad message never stops the others, and everything is accounted for."""

from __future__ import annotations

import email
import mailbox
from datetime import UTC, datetime, timedelta
from email.policy import default
from pathlib import Path
from typing import Any

import pytest

from mailflow import intake
from mailflow.clock import FixedClock
from mailflow.config import load_config
from mailflow.engine import Engine
from mailflow.mailbox import MaildirMailbox
from mailflow.sender import LocalTransport
from mailflow.store import Store
from tests.helpers import example_data, fill_workbook, reply_to, workbook_of, write_config

OPENS = datetime(2017, 10, 18, 16, 0, tzinfo=UTC)


@pytest.fixture
def local(tmp_path: Path) -> Any:
    data = example_data()
    data["store"] = str(tmp_path / "store.db")
    data["mail"] = {"transport": "local", "local": {"outbox": str(tmp_path / "out"), "inbox": str(tmp_path / "in")}}
    config = load_config(write_config(tmp_path, data))
    clock = FixedClock(OPENS)
    store = Store.open(config.store)
    engine = Engine(
        config, store, LocalTransport(config.mail.local.outbox), clock, mailbox=MaildirMailbox(config.mail.local.inbox)
    )
    engine.tick()
    outbox = mailbox.Maildir(tmp_path / "out", factory=lambda f: email.message_from_binary_file(f, policy=default))
    requests = {str(m["X-Mailflow-Delegation"]): m for m in outbox}
    yield engine, clock, requests, mailbox.Maildir(tmp_path / "in", create=True)
    store.close()


def test_one_bad_message_never_stops_the_others(local: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    engine, clock, requests, inbox = local
    for delegation, sender in (
        ("HN", "enlace@sre.example.hn"),
        ("CR", "enlace@pani.example.cr"),
        ("SV", "enlace@rree.example.sv"),
    ):
        name, data = workbook_of(requests[delegation])
        inbox.add(
            reply_to(
                requests[delegation],
                sender=sender,
                attachments=[(name, fill_workbook(data, {"1.1": f"Institución de {delegation}"}))],
            )
        )
    real = intake.read_return

    def explode_for_costa_rica(data: bytes, filename: str, *args: Any, **kwargs: Any) -> Any:
        if "Costa Rica" in filename:
            raise RuntimeError("a bug in the reader")
        return real(data, filename, *args, **kwargs)

    monkeypatch.setattr(intake, "read_return", explode_for_costa_rica)
    clock.set(OPENS + timedelta(hours=1))
    report = engine.tick()
    assert report.inbox.by_outcome == {"applied": 2, "failed": 1} and report.inbox.failed == 1
    [failed] = engine.store.inbound_rows(outcome="failed")
    assert "a bug in the reader" in (failed.reason or "")
    assert engine.store.inbound_raw(failed.id).startswith(b"From:") or b"Subject:" in engine.store.inbound_raw(
        failed.id
    )
    states = {d.id: d.state.value for d in engine.status(clock.now())[0].delegations}
    assert states["HN"] == "partial" and states["SV"] == "partial" and states["CR"] == "awaiting"
    # Every message is accounted for: three rows, and the failed one stays in the inbox for a person.
    assert len(engine.store.inbound_rows()) == 3
    assert len(list(inbox.keys())) == 1
    events = [e.kind for e in engine.store.events()]
    assert "received_failed" in events


def test_a_reply_matched_only_by_its_workbook_fingerprint_from_an_unknown_address_is_held(local: Any) -> None:
    engine, clock, requests, inbox = local
    _, data = workbook_of(requests["DO"])
    # A new thread, another subject, another sender, the file renamed: only the hidden fingerprint tells.
    inbox.add(
        reply_to(
            requests["DO"],
            sender="asistente@otra.example.do",
            subject="Plan",
            thread=False,
            attachments=[("copia final.xlsx", fill_workbook(data, {"1.1": "Migración"}))],
        )
    )
    clock.set(OPENS + timedelta(hours=1))
    report = engine.tick()
    assert report.inbox.by_outcome == {"held": 1}
    [held] = engine.store.inbound_rows(outcome="held")
    assert held.delegation == "DO" and held.evidence.startswith("workbook fingerprint")
    assert "not a listed contact" in (held.reason or "")
    dominican = next(d for d in engine.status(clock.now())[0].delegations if d.id == "DO")
    assert dominican.held == (held.id,) and dominican.filled == 0


def test_answers_history_latest_wins_and_identical_files_count_once(local: Any) -> None:
    engine, clock, requests, inbox = local
    name, data = workbook_of(requests["NI"])
    first = fill_workbook(data, {"1.1": "Ministerio A", "1.2": "Ministerio B"})
    second = fill_workbook(data, {"1.1": "Ministerio C", "1.2": "  "})
    for payload in (first, first, second):
        inbox.add(reply_to(requests["NI"], sender="enlace@cancilleria.example.ni", attachments=[(name, payload)]))
    clock.set(OPENS + timedelta(hours=1))
    engine.tick()
    answers = engine.store.current_answers("responsible-2017", "NI")["NI"]
    assert answers == {"1.1": "Ministerio C", "1.2": "Ministerio B"}  # an empty answer never erases one
    history = [(a.key, a.value, a.current) for a in engine.store.answer_history("responsible-2017", "NI")]
    assert history == [("1.1", "Ministerio A", False), ("1.2", "Ministerio B", True), ("1.1", "Ministerio C", True)]
    attachments = [a for row in engine.store.inbound_rows(delegation="NI") for a in engine.store.attachments(row.id)]
    assert [a.duplicate_of is not None for a in attachments] == [False, True, False]


def test_answers_to_a_meeting_notice_or_a_calendar_reply_are_not_returns(local: Any) -> None:
    from mailflow.store import OutboxStatus

    engine, clock, requests, inbox = local
    notice_id = "<mailflow.meeting.HN.notice@example.org>"
    with engine.store.transaction():
        engine.store.add_outbox(
            campaign="",
            delegation="HN",
            kind="meeting",
            slot="m/notice:0",
            message_id=notice_id,
            status=OutboxStatus.SENT,
            scheduled_at=OPENS,
            created_at=OPENS,
        )
    answer = reply_to(
        requests["HN"],
        sender="enlace@sre.example.hn",
        subject="Re: Sesión virtual",
        body="Confirmamos nuestra participación.",
        thread=False,
        headers={"In-Reply-To": notice_id, "References": notice_id},
    )
    inbox.add(answer)
    accepted = reply_to(
        requests["CR"], sender="enlace@pani.example.cr", subject="Aceptado: Sesión virtual", body="", thread=False
    )
    message = email.message_from_bytes(accepted, policy=default)
    message.add_attachment(
        b"BEGIN:VCALENDAR\r\nMETHOD:REPLY\r\nEND:VCALENDAR\r\n",
        maintype="text",
        subtype="calendar",
        filename="invite.ics",
    )
    inbox.add(message.as_bytes())
    clock.set(OPENS + timedelta(hours=1))
    report = engine.tick()
    assert report.inbox.by_outcome == {"unrelated": 2}
    assert report.sent == []  # no "no workbook attached" answer to a meeting reply
    reasons = [row.evidence for row in engine.store.inbound_rows(outcome="unrelated")]
    assert any("belongs to no campaign" in r for r in reasons) and any("calendar answer" in r for r in reasons)
