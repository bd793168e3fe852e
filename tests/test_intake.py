"""Intake over the local maildir twin: one bad message never stops the others, and everything is accounted for."""

from __future__ import annotations

import email
import mailbox
from datetime import UTC, datetime, timedelta
from email.policy import default
from pathlib import Path
from typing import Any

import pytest

from mailflow import intake, reader
from tests.helpers import ROOT, fill_workbook, local_engine, reply_to, workbook_of

OPENS = datetime(2017, 10, 18, 16, 0, tzinfo=UTC)


@pytest.fixture
def local(tmp_path: Path) -> Any:
    engine, clock = local_engine(tmp_path, OPENS)
    store = engine.store
    outbox = mailbox.Maildir(tmp_path / "out", factory=lambda f: email.message_from_binary_file(f, policy=default))
    requests = {str(m["X-Mailflow-Delegation"]): m for m in outbox}
    yield engine, clock, requests, mailbox.Maildir(tmp_path / "in", create=True)
    store.close()


def _three_replies(requests: dict[str, Any], inbox: mailbox.Maildir) -> None:
    """Replies from Honduras, Costa Rica and El Salvador, added in that order (so read in that order)."""
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


def test_one_bad_message_never_stops_the_others(local: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    engine, clock, requests, inbox = local
    _three_replies(requests, inbox)
    real = reader.read_return

    def explode_for_costa_rica(data: bytes, filename: str, *args: Any, **kwargs: Any) -> Any:
        if "Costa Rica" in filename:
            raise RuntimeError("a bug in the reader")
        return real(data, filename, *args, **kwargs)

    monkeypatch.setattr(reader, "read_return", explode_for_costa_rica)
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


def test_a_message_failing_half_way_through_its_record_leaves_nothing_of_it_but_the_failure(
    local: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The messages of a pass share one transaction, each in its own savepoint: Costa Rica's message
    fails after its row, its attachment and its answers were written, and only the failure remains."""
    engine, clock, requests, inbox = local
    _three_replies(requests, inbox)
    store = engine.store
    real = store.set_state

    def fail_for_costa_rica(campaign: str, delegation: str, **kwargs: Any) -> Any:
        if delegation == "CR":
            raise RuntimeError("a bug after the answers were written")
        return real(campaign, delegation, **kwargs)

    monkeypatch.setattr(store, "set_state", fail_for_costa_rica)
    clock.set(OPENS + timedelta(hours=1))
    report = engine.tick()
    assert report.inbox.by_outcome == {"applied": 2, "failed": 1}
    rows = store.inbound_rows()
    assert sorted(row.outcome for row in rows) == ["applied", "applied", "failed"]
    [failed] = [row for row in rows if row.outcome == "failed"]
    assert "a bug after the answers were written" in (failed.reason or "") and store.attachments(failed.id) == []
    assert "CR" not in store.current_answers("responsible-2017")
    assert set(store.current_answers("responsible-2017")) == {"HN", "SV"}
    assert [row.delegation for row in store.outbox() if row.inbound_id is not None] == ["HN", "SV"]
    assert store.get_meta(intake.INTAKE_PASS_KEY) == ""


class _Died(BaseException):
    """What the process dying in the middle of a message looks like from inside: nothing after it runs."""


def test_a_message_that_ends_the_process_twice_is_set_aside_and_the_others_are_read(
    local: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, clock, requests, inbox = local
    _three_replies(requests, inbox)
    store = engine.store
    real = reader.read_return

    def die_on_costa_rica(data: bytes, filename: str, *args: Any, **kwargs: Any) -> Any:
        if "Costa Rica" in filename:
            raise _Died
        return real(data, filename, *args, **kwargs)

    monkeypatch.setattr(reader, "read_return", die_on_costa_rica)
    clock.set(OPENS + timedelta(hours=1))
    # First pass: all three in one transaction, which dies with the process: nothing of it stays.
    with pytest.raises(_Died):
        engine.tick()
    assert store.inbound_rows() == [] and store.get_meta(intake.INTAKE_PASS_KEY) == intake.PASS_RUNNING
    # Second pass: one message per transaction, each named before it is read; Honduras is recorded.
    with pytest.raises(_Died):
        engine.tick()
    [honduras] = store.inbound_rows()
    assert (honduras.delegation, honduras.outcome, honduras.uid) == ("HN", "applied", 1)
    cr_uid = 2  # the local inbox numbers messages in the order they were delivered
    assert store.get_meta(intake.INTAKE_PASS_KEY) == f"INBOX/{honduras.uidvalidity}/{cr_uid}"
    # Third pass: the message that stopped mailflow twice is kept and set aside, the rest is read.
    report = engine.tick()
    assert report.inbox.by_outcome == {"failed": 1, "applied": 1}
    outcomes = {row.delegation or row.uid: row.outcome for row in store.inbound_rows()}
    assert outcomes == {"HN": "applied", cr_uid: "failed", "SV": "applied"}
    [failed] = store.inbound_rows(outcome="failed")
    assert "stopped while reading this message, twice" in (failed.reason or "")
    assert store.get_meta(intake.INTAKE_PASS_KEY) == ""
    [left] = list(inbox.keys())  # left in the inbox for a person, and kept whole in the store
    assert store.inbound_raw(failed.id) == inbox.get_bytes(left)
    # The next pass is an ordinary one: nothing new, nothing read twice.
    assert engine.tick().inbox.read == 0


def test_why_a_file_could_not_be_read_is_written_in_the_delegation_s_language(local: Any) -> None:
    """The reader's reason reaches Honduras in Spanish and Belize in English; the store keeps the English one."""
    engine, clock, requests, inbox = local
    encrypted = (ROOT / "tests" / "fixtures" / "hostile" / "encrypted-ole.xlsx").read_bytes()
    for delegation, sender in (("HN", "enlace@sre.example.hn"), ("BZ", "liaison@immigration.example.bz")):
        name, _ = workbook_of(requests[delegation])
        inbox.add(reply_to(requests[delegation], sender=sender, attachments=[(name, encrypted)]))
    clock.set(OPENS + timedelta(hours=1))
    report = engine.tick()
    assert report.inbox.by_outcome == {"applied": 2}
    follow_ups = {row.delegation: row for row in engine.store.outbox() if row.inbound_id is not None}
    assert {row.kind for row in follow_ups.values()} == {"unreadable"}
    honduras = email.message_from_bytes(engine.store.body(follow_ups["HN"].id), policy=default)
    belize = email.message_from_bytes(engine.store.body(follow_ups["BZ"].id), policy=default)
    honduras_text = honduras.get_body(("plain",)).get_content()
    belize_text = belize.get_body(("plain",)).get_content()
    assert "el archivo está protegido con contraseña; por favor envíenlo sin contraseña" in honduras_text
    assert "password" not in honduras_text
    assert "the file is password-protected; please send it without a password" in belize_text
    [row] = engine.store.inbound_rows(delegation="HN")
    [attachment] = engine.store.attachments(row.id)
    assert attachment.reason == "the file is password-protected; please send it without a password"
    assert attachment.reason_code == "password" and attachment.reason_in("es").startswith("el archivo está")


# Run first in the reader process (named: it is another process): Costa Rica's workbook ends the process as a native
# crash of the spreadsheet library would.
def crash_on_costa_rica() -> None:
    import os
    import signal

    real = reader.read_return

    def read_return(data: bytes, filename: str, *args: Any, **kwargs: Any) -> Any:
        if "Costa Rica" in filename:
            os.kill(os.getpid(), signal.SIGSEGV)
        return real(data, filename, *args, **kwargs)

    reader.read_return = read_return  # type: ignore[assignment]


def test_workbooks_read_in_the_reader_process_and_one_that_crashes_it_is_answered_as_unreadable(local: Any) -> None:
    """A pass reading in the reader process: a workbook that crashes it makes only that file unreadable (the reply is
    still applied and answered, in Spanish); the replies before and after it are read as in this process."""
    engine, clock, requests, inbox = local
    engine.intake.process_reader_from = 1
    engine.intake.make_process_reader = lambda: reader.ProcessReader(
        initializer="tests.test_intake:crash_on_costa_rica", inline_while_starting=False
    )
    _three_replies(requests, inbox)
    clock.set(OPENS + timedelta(hours=1))
    report = engine.tick()
    assert report.inbox.by_outcome == {"applied": 3} and report.inbox.moved == 3
    rows = {row.delegation: row for row in engine.store.inbound_rows()}
    [costa_rica] = engine.store.attachments(rows["CR"].id)
    assert (costa_rica.status, costa_rica.reason_code) == ("unreadable", "reader_stopped")
    for delegation in ("HN", "SV"):
        [attachment] = engine.store.attachments(rows[delegation].id)
        assert (attachment.status, attachment.filled) == ("parsed", 1)
    states = {d.id: d.state.value for d in engine.status(clock.now())[0].delegations}
    assert states["HN"] == "partial" and states["SV"] == "partial" and states["CR"] == "awaiting"
    follow_ups = {row.delegation: row for row in engine.store.outbox() if row.inbound_id is not None}
    assert {d: row.kind for d, row in follow_ups.items()} == {"HN": "missing", "CR": "unreadable", "SV": "missing"}
    answer = email.message_from_bytes(engine.store.body(follow_ups["CR"].id), policy=default)
    assert "el archivo detuvo el programa que lo lee" in answer.get_body(("plain",)).get_content()
    assert engine.tick().inbox.read == 0


def test_the_same_reply_twice_in_one_pass_read_in_the_reader_process_is_recorded_once(local: Any) -> None:
    """The second copy is started (its workbook handed to the reader) before the first is recorded; it is still
    found to be the same message when its turn comes, and its reading is dropped."""
    engine, clock, requests, inbox = local
    engine.intake.process_reader_from = 1
    engine.intake.make_process_reader = lambda: reader.ProcessReader(inline_while_starting=False)
    name, data = workbook_of(requests["HN"])
    raw = reply_to(
        requests["HN"], sender="enlace@sre.example.hn", attachments=[(name, fill_workbook(data, {"1.1": "DGME"}))]
    )
    inbox.add(raw)
    inbox.add(raw)
    clock.set(OPENS + timedelta(hours=1))
    report = engine.tick()
    assert report.inbox.by_outcome == {"applied": 1, "duplicate": 1}
    [applied] = engine.store.inbound_rows(outcome="applied")
    [duplicate] = engine.store.inbound_rows(outcome="duplicate")
    assert duplicate.duplicate_of == applied.id
    assert [row.kind for row in engine.store.outbox() if row.inbound_id is not None] == ["missing"]
