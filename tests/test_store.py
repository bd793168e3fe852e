"""The tracking store: migrations, WAL, the audit trail, aware UTC times."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from mailflow.errors import StoreError
from mailflow.store import MIGRATIONS, DelegationState, OutboxStatus, Store

NOW = datetime(2017, 10, 18, 16, 0, tzinfo=UTC)


def test_a_new_store_is_migrated_to_the_latest_schema_in_wal_mode(tmp_path: Path) -> None:
    with Store.open(tmp_path / "sub" / "m.db") as store:
        assert store.schema_version == len(MIGRATIONS)
    db = sqlite3.connect(tmp_path / "sub" / "m.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"meta", "outbox", "outbox_body", "delegation_state", "contact_refusal", "events"} <= tables
    db.close()
    # Reopening applies nothing twice.
    with Store.open(tmp_path / "sub" / "m.db") as store:
        assert store.schema_version == len(MIGRATIONS)


def test_a_store_from_a_newer_mailflow_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    Store.open(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.close()
    with pytest.raises(StoreError, match="newer than this mailflow"):
        Store.open(path)


def test_state_changes_are_audited_with_time_and_reason(tmp_path: Path) -> None:
    with Store.open(tmp_path / "m.db") as store, store.transaction():
        store.set_state(
            "c",
            "HN",
            state=DelegationState.NOT_SENT,
            filled=0,
            total=40,
            missing=["1.1"],
            at=NOW,
            reason="campaign opened",
        )
        store.set_state(
            "c", "HN", state=DelegationState.NOT_SENT, filled=0, total=40, missing=["1.1"], at=NOW, reason="no change"
        )
        store.set_state(
            "c",
            "HN",
            state=DelegationState.AWAITING,
            filled=0,
            total=40,
            missing=["1.1"],
            at=NOW + timedelta(minutes=1),
            reason="request sent",
        )
    with Store.open(tmp_path / "m.db") as store:
        events = store.events("c", "HN")
        assert [(e.kind, e.reason, e.detail["to"]) for e in events] == [
            ("state_changed", "campaign opened", "not_sent"),
            ("state_changed", "request sent", "awaiting"),
        ]
        assert all(e.at.tzinfo is not None and e.at.utcoffset() == timedelta(0) for e in events)
        state = store.state("c", "HN")
        assert state is not None and state.state is DelegationState.AWAITING and state.missing == ("1.1",)


def test_times_are_stored_as_utc_and_naive_ones_refused(tmp_path: Path) -> None:
    with Store.open(tmp_path / "m.db") as store:
        local = datetime(2017, 10, 18, 10, 0, tzinfo=timezone(timedelta(hours=-6)))
        store.record_event(local, "note", "x")
        assert store.events()[0].at == NOW and store.events()[0].at.tzinfo == UTC
        with pytest.raises(ValueError, match="naive"):
            store.record_event(datetime(2017, 10, 18), "note", "x")


def test_an_outbox_slot_is_recorded_once_and_a_failed_transaction_leaves_nothing(tmp_path: Path) -> None:
    with Store.open(tmp_path / "m.db") as store:
        first = store.add_outbox(
            campaign="c",
            delegation="HN",
            kind="request",
            slot="request",
            message_id="<a@x>",
            status=OutboxStatus.PENDING,
            scheduled_at=NOW,
            created_at=NOW,
        )
        again = store.add_outbox(
            campaign="c",
            delegation="HN",
            kind="request",
            slot="request",
            message_id="<a@x>",
            status=OutboxStatus.PENDING,
            scheduled_at=NOW,
            created_at=NOW,
        )
        assert first is not None and again is None
        with pytest.raises(RuntimeError), store.transaction():
            store.add_outbox(
                campaign="c",
                delegation="GT",
                kind="request",
                slot="request",
                message_id="<b@x>",
                status=OutboxStatus.PENDING,
                scheduled_at=NOW,
                created_at=NOW,
            )
            raise RuntimeError("crash in the middle")
        assert [row.delegation for row in store.outbox()] == ["HN"]
        assert [row.id for row in store.pending(NOW)] == [first]
        assert store.pending(NOW - timedelta(seconds=1)) == []


def test_the_fingerprint_secret_is_made_once(tmp_path: Path) -> None:
    with Store.open(tmp_path / "m.db") as store:
        secret = store.secret()
        assert len(secret) == 32 and store.secret() == secret
    with Store.open(tmp_path / "m.db") as store:
        assert store.secret() == secret


def test_an_unwritable_location_gives_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError, match="cannot open the store"):
        Store.open(blocker / "m.db")


def test_an_older_store_is_migrated_in_place_keeping_its_data(tmp_path: Path) -> None:
    from mailflow.store import _statements

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    for statement in _statements(MIGRATIONS[0]):
        db.execute(statement)
    db.execute("PRAGMA user_version = 1")
    db.execute(
        "INSERT INTO outbox (campaign, delegation, kind, slot, message_id, status, created_at) "
        "VALUES ('c', 'HN', 'request', 'request', '<a@x>', 'sent', '2017-10-18T16:00:00+00:00')"
    )
    db.execute(
        "INSERT INTO contact_refusal (address, delegation, code, reason, at) "
        "VALUES ('gone@x.hn', 'HN', 550, 'user unknown', '2017-10-18T16:00:00+00:00')"
    )
    db.commit()
    db.close()
    with Store.open(path) as store:
        assert store.schema_version == len(MIGRATIONS)
        [row] = store.outbox()
        assert (row.message_id, row.status, row.inbound_id) == ("<a@x>", OutboxStatus.SENT, None)
        [refusal] = store.refusals()["HN"]
        assert refusal.source == "smtp" and refusal.code == 550
        assert store.inbound_rows() == []
