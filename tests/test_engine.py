"""The engine over the local transport: plan, compose, send, and what it records."""

from __future__ import annotations

import itertools
import mailbox
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mailflow.clock import FixedClock
from mailflow.config import Config, load_config
from mailflow.engine import Engine
from mailflow.sender import LocalTransport
from mailflow.store import DelegationState, OutboxStatus, Store
from tests.helpers import example_data, request_template_broken_for, write_config

OPENS = datetime(2017, 10, 18, 16, 0, tzinfo=UTC)


def local_config(tmp_path: Path, **changes: object) -> Config:
    data = example_data()
    data["store"] = str(tmp_path / "store.db")
    data["mail"] = {"transport": "local", "local": {"outbox": str(tmp_path / "outbox")}, **changes}
    return load_config(write_config(tmp_path, data))


def outbox_kinds(tmp_path: Path) -> list[tuple[str, str]]:
    folder = mailbox.Maildir(tmp_path / "outbox", create=True)
    return sorted((str(m["X-Mailflow-Delegation"]), str(m["X-Mailflow-Kind"])) for m in folder)


def test_a_template_error_is_recorded_and_the_others_still_go_out(tmp_path: Path) -> None:
    overrides = request_template_broken_for(tmp_path, "GT")
    data = example_data()
    data["store"] = str(tmp_path / "store.db")
    data["mail"] = {"transport": "local", "local": {"outbox": str(tmp_path / "outbox")}}
    data["templates"] = str(overrides)
    config = load_config(write_config(tmp_path, data))
    clock = FixedClock(OPENS)
    with Store.open(config.store) as store:
        engine = Engine(config, store, LocalTransport(config.mail.local.outbox), clock)
        report = engine.tick()
        assert len(report.sent) == 10 and len(report.compose_errors) == 1
        status = {d.id: d for d in engine.status(OPENS)[0].delegations}
        assert status["GT"].state is DelegationState.NOT_SENT
        assert status["GT"].send_problem is not None and "no_such_variable" in status["GT"].send_problem
        events = [e for e in store.events("responsible-2017", "GT") if e.kind == "compose_failed"]
        assert len(events) == 1 and "request.txt.j2" in events[0].reason
        # Fixing the template lets the next attempt (after the backoff) through.
        (overrides / "es" / "request.txt.j2").unlink()
        engine.renderer = type(engine.renderer)(config.templates)
        clock.set(OPENS + timedelta(minutes=6))
        assert len(engine.tick().sent) == 1
    assert ("GT", "request") in outbox_kinds(tmp_path) and len(outbox_kinds(tmp_path)) == 11


def test_a_complete_delegation_gets_no_more_reminders(tmp_path: Path) -> None:
    config = local_config(tmp_path)
    clock = FixedClock(OPENS)
    with Store.open(config.store) as store:
        engine = Engine(config, store, LocalTransport(config.mail.local.outbox), clock)
        engine.tick()
        with store.transaction():
            store.set_state(
                "responsible-2017",
                "HN",
                state=DelegationState.COMPLETE,
                filled=40,
                total=40,
                missing=[],
                at=OPENS + timedelta(days=1),
                reason="workbook complete",
                last_reply_at=OPENS + timedelta(days=1),
            )
        moment = OPENS
        while moment < datetime(2017, 11, 2, tzinfo=UTC):
            moment += timedelta(hours=1)
            clock.set(moment)
            engine.tick()
        status = {d.id: d for d in engine.status(moment)[0].delegations}
        assert status["HN"].next_reminder_at is None and status["HN"].overdue is False
        assert status["GT"].overdue is True
    sent = outbox_kinds(tmp_path)
    assert [kind for delegation, kind in sent if delegation == "HN"] == ["request"]
    assert len([kind for delegation, kind in sent if delegation == "GT"]) == 6


def test_downtime_sends_only_the_latest_missed_reminder_and_records_the_others(tmp_path: Path) -> None:
    config = local_config(tmp_path)
    clock = FixedClock(OPENS)
    with Store.open(config.store) as store:
        engine = Engine(config, store, LocalTransport(config.mail.local.outbox), clock)
        engine.tick()
        back = datetime(2017, 10, 25, 18, 0, tzinfo=UTC)  # down from the 18th to Wednesday 25
        clock.set(back)
        report = engine.tick()
        # 11 overdue notices, and one digest: the latest missed slot (Wednesday 08:00 in San José), not seven.
        assert len(report.sent) == 12 and report.skipped == 11 * 2
        [digest] = [row for row in store.outbox() if row.kind == "digest"]
        assert digest.scheduled_at == datetime(2017, 10, 25, 14, 0, tzinfo=UTC)
        rows = store.outbox(campaign="responsible-2017", delegation="HN")
        assert [(r.slot, r.status) for r in rows] == [
            ("request", OutboxStatus.SENT),
            ("reminder:-1d", OutboxStatus.SKIPPED),
            ("reminder:0d", OutboxStatus.SKIPPED),
            ("overdue:1", OutboxStatus.SENT),
        ]
        assert rows[1].last_error is not None and "superseded by overdue:1" in rows[1].last_error
    assert sorted({kind for _, kind in outbox_kinds(tmp_path)}) == ["digest", "overdue", "request"]


def test_the_rate_cap_spaces_the_emails(tmp_path: Path) -> None:
    config = local_config(tmp_path, rate_per_minute=30)
    clock = FixedClock(OPENS)
    with Store.open(config.store) as store:
        engine = Engine(config, store, LocalTransport(config.mail.local.outbox), clock)
        engine.tick()
        times = sorted(row.sent_at for row in store.outbox() if row.sent_at is not None)
    assert len(times) == 11
    gaps = {(b - a).total_seconds() for a, b in itertools.pairwise(times)}
    assert gaps == {2.0}


def test_each_delegation_gets_its_own_fingerprinted_copy(tmp_path: Path) -> None:
    from mailflow.workbook import read_fingerprint, verify_fingerprint

    config = local_config(tmp_path)
    with Store.open(config.store) as store:
        Engine(config, store, LocalTransport(config.mail.local.outbox), FixedClock(OPENS)).tick()
        secret = store.secret()
    seen = {}
    for message in mailbox.Maildir(tmp_path / "outbox", create=False):
        delegation = str(message["X-Mailflow-Delegation"])
        [part] = [p for p in message.walk() if p.get_filename()]
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        fingerprint = read_fingerprint(payload)
        assert fingerprint is not None and verify_fingerprint(fingerprint, secret)
        assert (fingerprint.campaign, fingerprint.delegation) == ("responsible-2017", delegation)
        seen[delegation] = part.get_filename()
    assert seen["HN"] == "Plan estratégico - Honduras.xlsx"
    assert seen["US"] == "Strategic Plan - United States.xlsx"
