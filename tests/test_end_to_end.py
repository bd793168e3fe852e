"""Whole campaigns through the real SMTP server of the test rig, driven by ticks at chosen instants."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, date, datetime, time, timedelta
from email.utils import getaddresses
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from mailflow.clock import FixedClock
from mailflow.config import Config, load_config
from mailflow.engine import Engine
from mailflow.sender import SmtpTransport
from mailflow.store import OutboxStatus, Store
from tests.helpers import example_data, request_template_broken_for, server_mail, smtp_config, write_config
from tests.servers import SmtpServer

pytestmark = pytest.mark.servers

OPENS = datetime(2017, 10, 18, 16, 0, tzinfo=UTC)  # 10:00 in San José


def engine_for(config: Config, store: Store, clock: FixedClock) -> Engine:
    assert config.mail.smtp is not None
    return Engine(config, store, SmtpTransport(config.mail.smtp), clock)


def expected_calendar(config: Config) -> set[tuple[str, str, datetime]]:
    """Written out by hand from the example's dates, independently of mailflow.schedule:
    deadline Monday 23 October 2017; -1d (Sunday) moves to Friday 20 and -3d (also Friday 20) is merged into it;
    overdue Tuesday 24, Thursday 26 and Saturday 28 -> Monday 30; all at 09:00 local time."""
    out: set[tuple[str, str, datetime]] = set()
    local_days = {
        "reminder": [date(2017, 10, 20), date(2017, 10, 23)],
        "overdue": [date(2017, 10, 24), date(2017, 10, 26), date(2017, 10, 30)],
    }
    for d in config.delegations:
        out.add((d.id, "request", OPENS))
        for kind, days in local_days.items():
            for day in days:
                out.add((d.id, kind, datetime.combine(day, time(9, 0), tzinfo=ZoneInfo(d.timezone)).astimezone(UTC)))
    return out


def test_a_whole_campaign_sends_exactly_the_expected_emails_at_the_expected_instants(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    config = smtp_config(tmp_path, smtp_server.host, smtp_server.port, rate_per_minute=None)
    clock = FixedClock(OPENS - timedelta(hours=2))
    seen: set[tuple[str, str, datetime]] = set()
    digests: list[datetime] = []
    contacts = {d.id: set(d.contacts) for d in config.delegations}
    with Store.open(config.store) as store:
        engine = engine_for(config, store, clock)
        now = OPENS - timedelta(hours=2)
        end = datetime(2017, 11, 3, tzinfo=UTC)
        while now <= end:
            clock.set(now)
            before = len(smtp_server.messages)
            engine.tick()
            for received in smtp_server.messages[before:]:
                message = received.message
                if message["X-Mailflow-Kind"] == "digest":
                    assert received.rcpt_tos == ["coordinator@example.org"]
                    assert message["X-Mailflow-Delegation"] is None
                    digests.append(now)
                    continue
                delegation = str(message["X-Mailflow-Delegation"])
                kind = str(message["X-Mailflow-Kind"])
                assert message["X-Mailflow-Campaign"] == "responsible-2017"
                assert message["Auto-Submitted"] == "auto-generated"
                assert set(received.rcpt_tos) == contacts[delegation]
                assert {a for _, a in getaddresses(message.get_all("To", []))} == contacts[delegation]
                assert message["Reply-To"] is not None and "ts@example.org" in str(message["Reply-To"])
                assert f"[Ref. responsible-2017/{delegation}]" in str(message["Subject"])
                attachments = list(message.iter_attachments())
                assert len(attachments) == 1 and str(attachments[0].get_filename()).endswith(".xlsx")
                key = (delegation, kind, now)
                assert key not in seen, f"sent twice: {key}"
                seen.add(key)
            # A second tick at the same instant sends nothing new.
            again = engine.tick()
            assert again.sent == [] and again.planned == 0
            assert len(smtp_server.messages) == len(seen) + len(digests)
            now += timedelta(hours=1)
    assert seen == expected_calendar(config)
    # The digest: every weekday at 08:00 in San José (14:00 UTC), from the day after the campaign opened.
    weekdays = [OPENS.date() + timedelta(days=n) for n in range(1, 17)]
    expected_digests = [datetime.combine(d, time(14, 0), tzinfo=UTC) for d in weekdays if d.weekday() < 5]
    assert digests == [d for d in expected_digests if d <= end]
    message_ids = Counter(str(r.message["Message-ID"]).strip() for r in smtp_server.messages)
    assert len(message_ids) == 11 * 6 + len(digests) and max(message_ids.values()) == 1


def test_smtp_down_then_up_each_email_goes_out_once(tmp_path: Path, smtp_server: SmtpServer) -> None:
    config = smtp_config(tmp_path, smtp_server.host, smtp_server.port, retry={"base": "5m", "max": "1h"})
    clock = FixedClock(OPENS)
    with Store.open(config.store) as store:
        engine = engine_for(config, store, clock)
        smtp_server.stop()
        report = engine.tick()
        assert report.sent == [] and len(report.retried) == 11
        status = engine.status(OPENS)[0]
        assert all(d.state.value == "not_sent" and d.send_problem for d in status.delegations)
        smtp_server.start()
        clock.set(OPENS + timedelta(minutes=1))
        assert engine.tick().sent == []  # not before the backoff is over
        clock.set(OPENS + timedelta(minutes=6))
        report = engine.tick()
        assert len(report.sent) == 11
        clock.set(OPENS + timedelta(minutes=30))
        assert engine.tick().sent == []
        assert {d.state.value for d in engine.status(OPENS + timedelta(minutes=30))[0].delegations} == {"awaiting"}
        rows = store.outbox(campaign="responsible-2017")
        assert all(row.status is OutboxStatus.SENT and row.attempts == 2 for row in rows)
    received = smtp_server.wait_for(11)
    assert len({str(r.message["Message-ID"]).strip() for r in received}) == 11
    assert sorted(str(r.message["X-Mailflow-Delegation"]) for r in received) == sorted(d.id for d in config.delegations)


def test_a_permanently_refused_contact_is_recorded_and_the_others_still_receive(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    data_contacts = ["enlace@sre.example.hn", "gone@sre.example.hn"]
    config = smtp_config(tmp_path, smtp_server.host, smtp_server.port)
    config = _with_contacts(tmp_path, config, "HN", data_contacts)
    clock = FixedClock(OPENS)
    smtp_server.fail_next(
        550, "5.1.1 <gone@sre.example.hn>: user unknown", stage="rcpt", recipient="gone@sre.example.hn"
    )
    with Store.open(config.store) as store:
        engine = engine_for(config, store, clock)
        assert len(engine.tick().sent) == 11
        honduras = next(d for d in engine.status(OPENS)[0].delegations if d.id == "HN")
        assert honduras.refused_contacts == ("gone@sre.example.hn",)
        assert honduras.state.value == "awaiting"
        refusals = [e for e in store.events("responsible-2017", "HN") if e.kind == "contact_refused"]
        assert len(refusals) == 1 and "550" in refusals[0].reason
        # The next reminder is not addressed to the refused contact again.
        friday = datetime(2017, 10, 20, 15, 0, tzinfo=UTC)
        clock.set(friday)
        engine.tick()
    to_honduras = [r for r in smtp_server.messages if r.message["X-Mailflow-Delegation"] == "HN"]
    assert [r.rcpt_tos for r in to_honduras] == [["enlace@sre.example.hn"], ["enlace@sre.example.hn"]]


def test_a_temporary_refusal_is_retried_with_the_same_message_id(tmp_path: Path, smtp_server: SmtpServer) -> None:
    config = smtp_config(tmp_path, smtp_server.host, smtp_server.port)
    clock = FixedClock(OPENS)
    smtp_server.fail_next(451, "4.3.0 Try again later", stage="data", count=2)
    with Store.open(config.store) as store:
        engine = engine_for(config, store, clock)
        report = engine.tick()
        assert len(report.sent) == 9 and len(report.retried) == 2
        retried = [store.outbox_row(i) for i in report.retried]
        assert all("451" in (row.last_error or "") for row in retried)
        clock.set(OPENS + timedelta(minutes=10))
        assert len(engine.tick().sent) == 2
    ids = [str(r.message["Message-ID"]).strip() for r in smtp_server.messages]
    assert len(ids) == 11 == len(set(ids))
    assert {row.message_id for row in retried} <= set(ids)


def test_login_and_a_rejected_login(tmp_path: Path) -> None:
    with SmtpServer(auth={"ts@example.org": "right"}) as server:
        good = smtp_config(tmp_path / "good", server.host, server.port)
        good = _with_smtp_login(tmp_path / "good", good, "ts@example.org", "right")
        with Store.open(good.store) as store:
            assert len(engine_for(good, store, FixedClock(OPENS)).tick().sent) == 11
        bad = smtp_config(tmp_path / "bad", server.host, server.port)
        bad = _with_smtp_login(tmp_path / "bad", bad, "ts@example.org", "wrong")
        with Store.open(bad.store) as store:
            engine = engine_for(bad, store, FixedClock(OPENS))
            report = engine.tick()
            assert report.sent == [] and len(report.retried) == 11
            problem = engine.status(OPENS)[0].delegations[0].send_problem
            assert problem is not None and "rejected the login of ts@example.org" in problem
        assert len(server.messages) == 11


def test_the_cli_tick_sends_through_the_real_server(tmp_path: Path, smtp_server: SmtpServer) -> None:
    import subprocess
    import sys

    config = smtp_config(tmp_path, smtp_server.host, smtp_server.port)
    exe = Path(sys.executable).parent / "mailflow"
    for _ in range(2):
        done = subprocess.run(
            [exe, "--config", str(config.path), "tick", "--now", "2017-10-18T10:00:00-06:00"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
    assert len(smtp_server.messages) == 11
    assert "0 sent" in done.stdout


def _with_contacts(tmp_path: Path, config: Config, delegation: str, contacts: list[str]) -> Config:
    import yaml

    from mailflow.config import load_config

    data = yaml.safe_load(config.path.read_text(encoding="utf-8"))
    for entry in data["delegations"]:
        if entry["id"] == delegation:
            entry["contacts"] = contacts
    config.path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return load_config(config.path)


def _with_smtp_login(tmp_path: Path, config: Config, username: str, password: str) -> Config:
    import yaml

    from mailflow.config import load_config

    data = yaml.safe_load(config.path.read_text(encoding="utf-8"))
    data["mail"]["smtp"].update(username=username, password=password)
    config.path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return load_config(config.path)


def test_each_email_composed_while_the_server_takes_in_the_last_keeps_every_outcome_apart(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    """An email is composed while the server still reads the previous one, whose answer is read afterwards.

    A template error for Guatemala and a refusal at the end of DATA for the first email sent stay with those
    two; every other email arrives once, byte for byte what the store kept before handing it over."""
    data = example_data()
    data["mail"] = server_mail(smtp_server)
    data["store"] = str(tmp_path / "mailflow.db")
    data["templates"] = str(request_template_broken_for(tmp_path, "GT"))
    config = load_config(write_config(tmp_path, data))
    smtp_server.fail_next(554, "5.6.0 message refused", stage="data")
    with Store.open(config.store) as store:
        report = engine_for(config, store, FixedClock(OPENS)).tick()
        assert (len(report.sent), len(report.failed), len(report.compose_errors)) == (9, 1, 1)
        rows = {row.id: row for row in store.outbox(campaign="responsible-2017")}
        [refused] = [rows[i] for i in report.failed]
        assert refused.status is OutboxStatus.FAILED and "554" in (refused.last_error or "")
        assert rows[report.compose_errors[0]].delegation == "GT" and not rows[report.compose_errors[0]].has_body
        stored = {rows[i].message_id: store.body(i) for i in report.sent}
    received = smtp_server.wait_for(9)
    assert len(received) == 9
    for message in received:
        message_id = str(message.message["Message-ID"]).strip()
        assert message.data.rstrip(b"\r\n") == stored.pop(message_id).rstrip(b"\r\n")
    assert stored == {}
