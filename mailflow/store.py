"""The tracking store: SQLite, the only module with SQL.

WAL journal and a busy timeout so a reader (``status``) never blocks the
service; a versioned schema migrated forward on open; an audit trail
(``events``) recording every email sent and every change of a delegation's
state with its time and reason. Every time is stored as aware UTC ISO 8601
text, so text order is time order.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

from mailflow import reasons
from mailflow.errors import StoreError

BUSY_TIMEOUT_SECONDS = 15.0


class DelegationState(StrEnum):
    """Where a delegation stands in a campaign."""

    NOT_SENT = "not_sent"
    AWAITING = "awaiting"
    PARTIAL = "partial"
    COMPLETE = "complete"


class OutboxStatus(StrEnum):
    """Life of one outgoing email."""

    PENDING = "pending"  # to be composed and/or sent (retried with backoff)
    SENT = "sent"  # accepted by the server (or written to the local outbox)
    FAILED = "failed"  # refused for good: every recipient permanently refused
    SKIPPED = "skipped"  # never to be sent: superseded, or no longer needed


MIGRATIONS: tuple[str, ...] = (
    # 1: outbox, audit trail, delegation state, contact refusals, settings.
    """
    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY,
        campaign TEXT NOT NULL,          -- '' for emails that belong to no campaign
        delegation TEXT NOT NULL,        -- '' for emails to the secretariat
        kind TEXT NOT NULL,
        slot TEXT NOT NULL,
        message_id TEXT NOT NULL UNIQUE,
        status TEXT NOT NULL,
        scheduled_at TEXT,
        created_at TEXT NOT NULL,
        recipients TEXT NOT NULL DEFAULT '[]',
        subject TEXT NOT NULL DEFAULT '',
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at TEXT,
        last_error TEXT,
        sent_at TEXT,
        refused TEXT NOT NULL DEFAULT '{}',
        UNIQUE (campaign, delegation, kind, slot)
    );
    CREATE INDEX outbox_pending ON outbox (status, next_attempt_at);
    CREATE TABLE outbox_body (
        outbox_id INTEGER PRIMARY KEY REFERENCES outbox (id) ON DELETE CASCADE,
        raw BLOB NOT NULL
    );
    CREATE TABLE delegation_state (
        campaign TEXT NOT NULL,
        delegation TEXT NOT NULL,
        state TEXT NOT NULL,
        filled INTEGER NOT NULL DEFAULT 0,
        total INTEGER NOT NULL DEFAULT 0,
        missing TEXT NOT NULL DEFAULT '[]',
        last_reply_at TEXT,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (campaign, delegation)
    );
    CREATE TABLE contact_refusal (
        address TEXT PRIMARY KEY,        -- lower case
        delegation TEXT NOT NULL,
        code INTEGER,
        reason TEXT NOT NULL,
        at TEXT NOT NULL,
        outbox_id INTEGER
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        at TEXT NOT NULL,
        campaign TEXT NOT NULL DEFAULT '',
        delegation TEXT NOT NULL DEFAULT '',
        kind TEXT NOT NULL,
        reason TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '{}',
        outbox_id INTEGER
    );
    CREATE INDEX events_by_delegation ON events (campaign, delegation, at);
    """,
    # 2: received mail, its attachments, the answers taken from it, and where each mailbox was read up to.
    """
    CREATE TABLE inbound (
        id INTEGER PRIMARY KEY,
        folder TEXT NOT NULL,
        uidvalidity INTEGER NOT NULL,
        uid INTEGER NOT NULL,
        message_id TEXT,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        received_at TEXT NOT NULL,
        from_address TEXT,
        subject TEXT NOT NULL DEFAULT '',
        kind TEXT NOT NULL,
        campaign TEXT NOT NULL DEFAULT '',
        delegation TEXT NOT NULL DEFAULT '',
        evidence TEXT NOT NULL DEFAULT '',
        trusted INTEGER,
        outcome TEXT NOT NULL,
        reason TEXT,
        moved INTEGER NOT NULL DEFAULT 0,
        duplicate_of INTEGER REFERENCES inbound (id),
        raw BLOB,
        UNIQUE (folder, uidvalidity, uid)
    );
    CREATE INDEX inbound_by_message_id ON inbound (message_id);
    CREATE INDEX inbound_by_hash ON inbound (sha256);
    CREATE INDEX inbound_by_delegation ON inbound (campaign, delegation, received_at);
    CREATE TABLE attachment (
        id INTEGER PRIMARY KEY,
        inbound_id INTEGER NOT NULL REFERENCES inbound (id),
        filename TEXT NOT NULL,
        content_type TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        status TEXT NOT NULL,
        reason TEXT,
        filled INTEGER NOT NULL DEFAULT 0,
        duplicate_of INTEGER
    );
    CREATE INDEX attachment_by_hash ON attachment (sha256);
    CREATE TABLE answer (
        id INTEGER PRIMARY KEY,
        campaign TEXT NOT NULL,
        delegation TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        source TEXT NOT NULL,
        inbound_id INTEGER NOT NULL REFERENCES inbound (id),
        attachment_id INTEGER,
        recorded_at TEXT NOT NULL,
        current INTEGER NOT NULL DEFAULT 1
    );
    CREATE INDEX answer_current ON answer (campaign, delegation, current, key);
    CREATE TABLE row_change (
        id INTEGER PRIMARY KEY,
        campaign TEXT NOT NULL,
        delegation TEXT NOT NULL,
        inbound_id INTEGER NOT NULL REFERENCES inbound (id),
        key TEXT NOT NULL,
        change TEXT NOT NULL,
        column_name TEXT NOT NULL DEFAULT '',
        before TEXT NOT NULL DEFAULT '',
        after TEXT NOT NULL DEFAULT '',
        recorded_at TEXT NOT NULL
    );
    CREATE TABLE mailbox_state (
        folder TEXT PRIMARY KEY,
        uidvalidity INTEGER NOT NULL,
        last_read_at TEXT
    );
    ALTER TABLE outbox ADD COLUMN inbound_id INTEGER;
    ALTER TABLE contact_refusal ADD COLUMN source TEXT NOT NULL DEFAULT 'smtp';
    """,
    # 3: look-ups by received message (follow-ups read what a message brought).
    """
    CREATE INDEX answer_by_inbound ON answer (inbound_id);
    CREATE INDEX attachment_by_inbound ON attachment (inbound_id);
    CREATE INDEX row_change_by_inbound ON row_change (inbound_id);
    """,
    # 4: the daily cap of answers counts a delegation's recent emails at every received message.
    """
    CREATE INDEX outbox_by_delegation ON outbox (delegation, kind, created_at);
    """,
    # 5: why a file could not be read, as a code and its parameters, so a follow-up says it in the
    # delegation's language (``reason`` keeps the English sentence).
    """
    ALTER TABLE attachment ADD COLUMN reason_code TEXT;
    ALTER TABLE attachment ADD COLUMN reason_params TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE inbound ADD COLUMN reason_code TEXT;
    ALTER TABLE inbound ADD COLUMN reason_params TEXT NOT NULL DEFAULT '{}';
    """,
)


def to_text(moment: datetime) -> str:
    """An aware datetime as UTC ISO 8601 text (naive ones are refused)."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"naive datetime {moment!r} cannot be stored")
    return moment.astimezone(UTC).isoformat()


def from_text(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


@dataclass(frozen=True)
class OutboxRow:
    """One outgoing email as recorded."""

    id: int
    campaign: str
    delegation: str
    kind: str
    slot: str
    message_id: str
    status: OutboxStatus
    scheduled_at: datetime | None
    created_at: datetime
    recipients: tuple[str, ...]
    subject: str
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    sent_at: datetime | None
    refused: dict[str, str]
    has_body: bool
    inbound_id: int | None = None


@dataclass(frozen=True)
class StateRow:
    """A delegation's standing in one campaign."""

    campaign: str
    delegation: str
    state: DelegationState
    filled: int
    total: int
    missing: tuple[str, ...]
    last_reply_at: datetime | None
    updated_at: datetime


@dataclass(frozen=True)
class Refusal:
    """A contact address the mail server refused for good."""

    address: str
    delegation: str
    code: int | None
    reason: str
    at: datetime
    source: str = "smtp"  # smtp: refused when sending; bounce: a delivery-status notification came back


@dataclass(frozen=True)
class InboundRow:
    """One received message as recorded (its raw bytes are fetched separately)."""

    id: int
    folder: str
    uidvalidity: int
    uid: int
    message_id: str | None
    sha256: str
    size: int
    received_at: datetime
    from_address: str | None
    subject: str
    kind: str
    campaign: str
    delegation: str
    evidence: str
    trusted: bool | None
    outcome: str
    reason: str | None
    moved: bool
    duplicate_of: int | None
    reason_code: str | None = None
    reason_params: Mapping[str, str] = field(default_factory=dict)

    def reason_in(self, language: str) -> str:
        """What became of the message and why, in ``language`` when the reason has a code."""
        return reasons.written(self.reason, self.reason_code, self.reason_params, language)


@dataclass(frozen=True)
class AttachmentRow:
    """One file received, and what became of it."""

    id: int
    inbound_id: int
    filename: str
    content_type: str
    sha256: str
    size: int
    status: str
    reason: str | None
    filled: int
    duplicate_of: int | None
    reason_code: str | None = None
    reason_params: Mapping[str, str] = field(default_factory=dict)

    def reason_in(self, language: str) -> str:
        """Why the file could not be read, written in ``language`` when the reason has a code."""
        return reasons.written(self.reason, self.reason_code, self.reason_params, language)


class KnownUid(NamedTuple):
    """A message of a watched folder already accounted for: its row, what became of it, whether it was moved."""

    id: int
    outcome: str
    moved: bool


@dataclass(frozen=True)
class AnswerRow:
    """One answer recorded for a key (the current one, or history)."""

    key: str
    value: str
    source: str
    inbound_id: int
    recorded_at: datetime
    current: bool


@dataclass(frozen=True)
class RowChangeRow:
    """A row a delegation added, deleted, or changed outside the fill column."""

    key: str
    change: str  # added | deleted | changed
    column: str
    before: str
    after: str
    inbound_id: int
    recorded_at: datetime


@dataclass(frozen=True)
class Event:
    """One line of the audit trail."""

    id: int
    at: datetime
    campaign: str
    delegation: str
    kind: str
    reason: str
    detail: dict[str, Any]
    outbox_id: int | None


_OUTBOX_COLUMNS = (
    "o.id, o.campaign, o.delegation, o.kind, o.slot, o.message_id, o.status, o.scheduled_at, o.created_at, "
    "o.recipients, o.subject, o.attempts, o.next_attempt_at, o.last_error, o.sent_at, o.refused, "
    "EXISTS (SELECT 1 FROM outbox_body b WHERE b.outbox_id = o.id), o.inbound_id"
)


def _outbox_row(row: Sequence[Any]) -> OutboxRow:
    created = from_text(row[8])
    assert created is not None
    return OutboxRow(
        id=row[0],
        campaign=row[1],
        delegation=row[2],
        kind=row[3],
        slot=row[4],
        message_id=row[5],
        status=OutboxStatus(row[6]),
        scheduled_at=from_text(row[7]),
        created_at=created,
        recipients=tuple(json.loads(row[9])),
        subject=row[10],
        attempts=row[11],
        next_attempt_at=from_text(row[12]),
        last_error=row[13],
        sent_at=from_text(row[14]),
        refused=json.loads(row[15]),
        has_body=bool(row[16]),
        inbound_id=row[17],
    )


class Store:
    """The SQLite tracking store. Open with :meth:`open`; close when done."""

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._db = connection
        self.path = path
        self._depth = 0
        self._last_missing: tuple[Sequence[str], str] | None = None

    # -- lifecycle ---------------------------------------------------------

    @classmethod
    def open(cls, path: Path) -> Store:
        """Open (creating if needed) the store at ``path`` and migrate it to the current schema."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Every reply received and the fingerprint key live here: owner-only from the start
            # (SQLite gives the -wal and -shm files the database's mode).
            os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
            connection = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False
            )
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute("PRAGMA foreign_keys=ON")
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the store {path}: {exc}; check the path and its permissions") from exc
        store = cls(connection, path)
        store.migrate()
        return store

    @classmethod
    def snapshot(cls, path: Path) -> Store:
        """An in-memory copy of the store at ``path`` (or an empty one): for dry runs that must change nothing."""
        memory = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        if path.exists():
            try:
                source = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_SECONDS)
                source.backup(memory)
                source.close()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read the store {path}: {exc}") from exc
        store = cls(memory, path)
        store.migrate()
        return store

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> None:
        """Apply every migration newer than the file's version, each in its own transaction."""
        current = self.schema_version
        if current > len(MIGRATIONS):
            raise StoreError(
                f"the store {self.path} has schema version {current}, newer than this mailflow "
                f"({len(MIGRATIONS)}); upgrade mailflow"
            )
        for version in range(current + 1, len(MIGRATIONS) + 1):
            try:
                self._db.execute("BEGIN IMMEDIATE")
                for statement in _statements(MIGRATIONS[version - 1]):
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {version}")
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._db.execute("ROLLBACK")
                raise StoreError(f"cannot migrate the store {self.path} to version {version}: {exc}") from exc

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic unit of work.

        A nested call is a savepoint of the outer transaction: if it fails, its own writes are undone
        and the outer work goes on (the intake records many messages in one transaction, each in its
        own savepoint, so one failing message never takes the others with it)."""
        if self._depth:
            savepoint = f"unit_{self._depth}"
            self._execute(f"SAVEPOINT {savepoint}")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                # SQLite may have rolled the whole transaction back by itself (a full disk): then there
                # is no savepoint left to return to, and the outer transaction reports it.
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute(f"ROLLBACK TO {savepoint}")
                        self._db.execute(f"RELEASE {savepoint}")
                raise
            self._depth -= 1
            self._execute(f"RELEASE {savepoint}")
            return
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreError(f"the store {self.path} is busy or unwritable: {exc}") from exc
        self._depth = 1
        try:
            yield
        except BaseException:
            self._depth = 0
            self._rollback()
            raise
        self._depth = 0
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            hint = "; free some disk space" if "full" in str(exc).lower() else ""
            raise StoreError(f"cannot write to the store {self.path}: {exc}{hint}; nothing of it was recorded") from exc

    def _rollback(self) -> None:
        # SQLite may already have rolled back by itself (a full disk, an I/O error).
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, params)
        except sqlite3.OperationalError as exc:
            raise StoreError(f"store {self.path}: {exc}") from exc

    # -- settings ----------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self._execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = ?", (key, value, value)
        )

    def secret(self) -> bytes:
        """The key of the workbook fingerprints, made once per store."""
        with self.transaction():
            value = self.get_meta("fingerprint_secret")
            if value is None:
                value = secrets.token_hex(32)
                self.set_meta("fingerprint_secret", value)
        return bytes.fromhex(value)

    # -- audit trail -------------------------------------------------------

    def record_event(
        self,
        at: datetime,
        kind: str,
        reason: str,
        *,
        campaign: str = "",
        delegation: str = "",
        detail: dict[str, Any] | None = None,
        outbox_id: int | None = None,
    ) -> None:
        self._execute(
            "INSERT INTO events (at, campaign, delegation, kind, reason, detail, outbox_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (to_text(at), campaign, delegation, kind, reason, json.dumps(detail or {}, ensure_ascii=False), outbox_id),
        )

    def events(self, campaign: str | None = None, delegation: str | None = None) -> list[Event]:
        sql = "SELECT id, at, campaign, delegation, kind, reason, detail, outbox_id FROM events WHERE 1=1"
        params: list[Any] = []
        if campaign is not None:
            sql += " AND campaign = ?"
            params.append(campaign)
        if delegation is not None:
            sql += " AND delegation = ?"
            params.append(delegation)
        rows = self._execute(sql + " ORDER BY at, id", params).fetchall()
        return [Event(r[0], datetime.fromisoformat(r[1]), r[2], r[3], r[4], r[5], json.loads(r[6]), r[7]) for r in rows]

    # -- outbox ------------------------------------------------------------

    def add_outbox(
        self,
        *,
        campaign: str,
        delegation: str,
        kind: str,
        slot: str,
        message_id: str,
        status: OutboxStatus,
        scheduled_at: datetime | None,
        created_at: datetime,
        reason: str | None = None,
        inbound_id: int | None = None,
    ) -> int | None:
        """Record an email to send (or a slot skipped). Returns its id, or None if that slot was recorded before."""
        cursor = self._execute(
            "INSERT INTO outbox (campaign, delegation, kind, slot, message_id, status, scheduled_at, created_at, "
            "next_attempt_at, last_error, inbound_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (
                campaign,
                delegation,
                kind,
                slot,
                message_id,
                status.value,
                to_text(scheduled_at) if scheduled_at else None,
                to_text(created_at),
                to_text(created_at) if status is OutboxStatus.PENDING else None,
                reason,
                inbound_id,
            ),
        )
        return cursor.lastrowid if cursor.rowcount else None

    def outbox_slots(self, campaign: str) -> dict[str, dict[str, OutboxStatus]]:
        """For each delegation of a campaign, the slots recorded and their status."""
        out: dict[str, dict[str, OutboxStatus]] = {}
        for delegation, slot, status in self._execute(
            "SELECT delegation, slot, status FROM outbox WHERE campaign = ?", (campaign,)
        ):
            out.setdefault(delegation, {})[slot] = OutboxStatus(status)
        return out

    def request_sent_at(self, campaign: str) -> dict[str, datetime]:
        """When each delegation's request actually went out."""
        rows = self._execute(
            "SELECT delegation, sent_at FROM outbox WHERE campaign = ? AND kind = 'request' AND sent_at IS NOT NULL",
            (campaign,),
        )
        return {delegation: datetime.fromisoformat(sent) for delegation, sent in rows}

    def outbox(self, *, campaign: str | None = None, delegation: str | None = None) -> list[OutboxRow]:
        sql = f"SELECT {_OUTBOX_COLUMNS} FROM outbox o WHERE 1=1"
        params: list[Any] = []
        if campaign is not None:
            sql += " AND o.campaign = ?"
            params.append(campaign)
        if delegation is not None:
            sql += " AND o.delegation = ?"
            params.append(delegation)
        return [_outbox_row(r) for r in self._execute(sql + " ORDER BY o.id", params)]

    def outbox_row(self, outbox_id: int) -> OutboxRow:
        row = self._execute(f"SELECT {_OUTBOX_COLUMNS} FROM outbox o WHERE o.id = ?", (outbox_id,)).fetchone()
        if row is None:
            raise StoreError(f"no outgoing email with id {outbox_id}")
        return _outbox_row(row)

    def pending(self, now: datetime) -> list[OutboxRow]:
        """Emails waiting to be composed or sent whose next attempt is due."""
        rows = self._execute(
            f"SELECT {_OUTBOX_COLUMNS} FROM outbox o WHERE o.status = 'pending' AND o.next_attempt_at <= ? "
            "ORDER BY o.scheduled_at, o.id",
            (to_text(now),),
        )
        return [_outbox_row(r) for r in rows]

    def set_body(self, outbox_id: int, raw: bytes, *, subject: str, recipients: Sequence[str]) -> None:
        self._execute("INSERT OR REPLACE INTO outbox_body (outbox_id, raw) VALUES (?, ?)", (outbox_id, raw))
        self._execute(
            "UPDATE outbox SET subject = ?, recipients = ? WHERE id = ?",
            (subject, json.dumps(list(recipients)), outbox_id),
        )

    def body(self, outbox_id: int) -> bytes:
        row = self._execute("SELECT raw FROM outbox_body WHERE outbox_id = ?", (outbox_id,)).fetchone()
        if row is None:
            raise StoreError(f"the email {outbox_id} has no body yet")
        return bytes(row[0])

    def mark_sent(self, outbox_id: int, at: datetime, refused: dict[str, str] | None = None) -> None:
        self._execute(
            "UPDATE outbox SET status = 'sent', sent_at = ?, attempts = attempts + 1, next_attempt_at = NULL, "
            "last_error = NULL, refused = ? WHERE id = ?",
            (to_text(at), json.dumps(refused or {}, ensure_ascii=False), outbox_id),
        )

    def mark_retry(self, outbox_id: int, error: str, next_attempt_at: datetime) -> None:
        self._execute(
            "UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_attempt_at = ? WHERE id = ?",
            (error, to_text(next_attempt_at), outbox_id),
        )

    def mark_failed(self, outbox_id: int, error: str, refused: dict[str, str] | None = None) -> None:
        self._execute(
            "UPDATE outbox SET status = 'failed', attempts = attempts + 1, last_error = ?, next_attempt_at = NULL, "
            "refused = ? WHERE id = ?",
            (error, json.dumps(refused or {}, ensure_ascii=False), outbox_id),
        )

    def mark_skipped(self, outbox_id: int, reason: str) -> None:
        self._execute(
            "UPDATE outbox SET status = 'skipped', last_error = ?, next_attempt_at = NULL WHERE id = ?",
            (reason, outbox_id),
        )

    def send_problems(self, campaign: str) -> dict[str, str]:
        """The latest sending problem per delegation: a pending retry or a permanent failure."""
        rows = self._execute(
            "SELECT delegation, kind, last_error FROM outbox WHERE campaign = ? AND last_error IS NOT NULL "
            "AND (status = 'failed' OR status = 'pending') ORDER BY id",
            (campaign,),
        )
        return {delegation: f"{kind}: {error}" for delegation, kind, error in rows}

    def count_outbox(self, delegation: str, kinds: Sequence[str], *, since: datetime) -> int:
        """Emails of these kinds planned for a delegation since an instant (skipped ones not counted)."""
        marks = ", ".join("?" for _ in kinds)
        row = self._execute(
            f"SELECT COUNT(*) FROM outbox WHERE delegation = ? AND kind IN ({marks}) AND created_at >= ? "
            "AND status != 'skipped'",
            (delegation, *kinds, to_text(since)),
        ).fetchone()
        return int(row[0])

    def last_slot_of_kind(self, kind: str) -> datetime | None:
        """The latest slot planned for emails of a kind that belong to no campaign (the digest)."""
        row = self._execute("SELECT MAX(scheduled_at) FROM outbox WHERE kind = ? AND campaign = ''", (kind,)).fetchone()
        return from_text(row[0]) if row else None

    def last_sent_of_kind(self, kind: str) -> datetime | None:
        row = self._execute(
            "SELECT MAX(sent_at) FROM outbox WHERE kind = ? AND campaign = '' AND status = 'sent'", (kind,)
        ).fetchone()
        return from_text(row[0]) if row else None

    def last_sent_at(self) -> datetime | None:
        row = self._execute("SELECT MAX(sent_at) FROM outbox").fetchone()
        return from_text(row[0]) if row else None

    # -- contacts ----------------------------------------------------------

    def record_refusal(
        self,
        address: str,
        delegation: str,
        code: int | None,
        reason: str,
        at: datetime,
        outbox_id: int | None,
        source: str = "smtp",
    ) -> None:
        """A contact refused for good: by the SMTP server at sending (``smtp``) or by a bounce (``bounce``)."""
        self._execute(
            "INSERT INTO contact_refusal (address, delegation, code, reason, at, outbox_id, source) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (address) DO UPDATE SET code = excluded.code, reason = excluded.reason, at = excluded.at, "
            "outbox_id = excluded.outbox_id, delegation = excluded.delegation, source = excluded.source",
            (address.lower(), delegation, code, reason, to_text(at), outbox_id, source),
        )

    def refusals(self) -> dict[str, list[Refusal]]:
        """Permanently refused or bouncing contacts, by delegation."""
        out: dict[str, list[Refusal]] = {}
        for address, delegation, code, reason, at, source in self._execute(
            "SELECT address, delegation, code, reason, at, source FROM contact_refusal ORDER BY address"
        ):
            out.setdefault(delegation, []).append(
                Refusal(address, delegation, code, reason, datetime.fromisoformat(at), source)
            )
        return out

    # -- received mail -----------------------------------------------------

    def mailbox_state(self, folder: str) -> tuple[int, datetime | None] | None:
        """The UIDVALIDITY last seen for a folder and when it was last read successfully."""
        row = self._execute(
            "SELECT uidvalidity, last_read_at FROM mailbox_state WHERE folder = ?", (folder,)
        ).fetchone()
        return None if row is None else (int(row[0]), from_text(row[1]))

    def set_mailbox_state(self, folder: str, uidvalidity: int, read_at: datetime) -> None:
        self._execute(
            "INSERT INTO mailbox_state (folder, uidvalidity, last_read_at) VALUES (?, ?, ?) ON CONFLICT (folder) "
            "DO UPDATE SET uidvalidity = excluded.uidvalidity, last_read_at = excluded.last_read_at",
            (folder, uidvalidity, to_text(read_at)),
        )

    def last_inbox_read_at(self) -> datetime | None:
        row = self._execute("SELECT MAX(last_read_at) FROM mailbox_state").fetchone()
        return from_text(row[0]) if row else None

    def known_uids(self, folder: str, uidvalidity: int) -> dict[int, KnownUid]:
        """Messages of a folder already accounted for, by UID (read at every pass: only what a pass needs)."""
        rows = self._execute(
            "SELECT uid, id, outcome, moved FROM inbound WHERE folder = ? AND uidvalidity = ?", (folder, uidvalidity)
        )
        return {uid: KnownUid(inbound_id, outcome, bool(moved)) for uid, inbound_id, outcome, moved in rows}

    def find_inbound(self, message_id: str | None, sha256: str) -> InboundRow | None:
        """A message recorded before under another UID (after a UIDVALIDITY change): same Message-ID and bytes."""
        row = self._execute(
            f"SELECT {_INBOUND_COLUMNS} FROM inbound WHERE sha256 = ? AND (message_id IS ? OR message_id = ?) "
            "AND duplicate_of IS NULL ORDER BY id LIMIT 1",
            (sha256, message_id, message_id),
        ).fetchone()
        return None if row is None else _inbound_row(row)

    def add_inbound(
        self,
        *,
        folder: str,
        uidvalidity: int,
        uid: int,
        message_id: str | None,
        sha256: str,
        size: int,
        received_at: datetime,
        from_address: str | None,
        subject: str,
        kind: str,
        campaign: str,
        delegation: str,
        evidence: str,
        trusted: bool | None,
        outcome: str,
        reason: str | None,
        raw: bytes | None,
        duplicate_of: int | None = None,
        reason_code: str | None = None,
        reason_params: Mapping[str, str] | None = None,
    ) -> int:
        cursor = self._execute(
            "INSERT INTO inbound (folder, uidvalidity, uid, message_id, sha256, size, received_at, from_address, "
            "subject, kind, campaign, delegation, evidence, trusted, outcome, reason, duplicate_of, raw, "
            "reason_code, reason_params) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                folder,
                uidvalidity,
                uid,
                message_id,
                sha256,
                size,
                to_text(received_at),
                from_address,
                subject,
                kind,
                campaign,
                delegation,
                evidence,
                None if trusted is None else int(trusted),
                outcome,
                reason,
                duplicate_of,
                raw,
                reason_code,
                json.dumps(dict(reason_params or {}), ensure_ascii=False),
            ),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def mark_moved(self, inbound_id: int) -> None:
        self._execute("UPDATE inbound SET moved = 1 WHERE id = ?", (inbound_id,))

    def inbound(self, inbound_id: int) -> InboundRow:
        row = self._execute(f"SELECT {_INBOUND_COLUMNS} FROM inbound WHERE id = ?", (inbound_id,)).fetchone()
        if row is None:
            raise StoreError(f"no received message with id {inbound_id}")
        return _inbound_row(row)

    def inbound_raw(self, inbound_id: int) -> bytes:
        row = self._execute("SELECT raw, duplicate_of FROM inbound WHERE id = ?", (inbound_id,)).fetchone()
        if row is None:
            raise StoreError(f"no received message with id {inbound_id}")
        if row[0] is None and row[1] is not None:
            return self.inbound_raw(int(row[1]))
        return bytes(row[0] or b"")

    def inbound_rows(
        self, *, campaign: str | None = None, delegation: str | None = None, outcome: str | None = None
    ) -> list[InboundRow]:
        sql = f"SELECT {_INBOUND_COLUMNS} FROM inbound WHERE 1=1"
        params: list[Any] = []
        for column, value in (("campaign", campaign), ("delegation", delegation), ("outcome", outcome)):
            if value is not None:
                sql += f" AND {column} = ?"
                params.append(value)
        return [_inbound_row(r) for r in self._execute(sql + " ORDER BY received_at, id", params)]

    def add_attachment(
        self,
        inbound_id: int,
        *,
        filename: str,
        content_type: str,
        sha256: str,
        size: int,
        status: str,
        reason: str | None,
        filled: int,
        duplicate_of: int | None,
        reason_code: str | None = None,
        reason_params: Mapping[str, str] | None = None,
    ) -> int:
        cursor = self._execute(
            "INSERT INTO attachment (inbound_id, filename, content_type, sha256, size, status, reason, filled, "
            "duplicate_of, reason_code, reason_params) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                inbound_id,
                filename,
                content_type,
                sha256,
                size,
                status,
                reason,
                filled,
                duplicate_of,
                reason_code,
                json.dumps(dict(reason_params or {}), ensure_ascii=False),
            ),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def attachments(self, inbound_id: int) -> list[AttachmentRow]:
        rows = self._execute(
            "SELECT id, inbound_id, filename, content_type, sha256, size, status, reason, filled, duplicate_of, "
            "reason_code, reason_params FROM attachment WHERE inbound_id = ? ORDER BY id",
            (inbound_id,),
        )
        return [
            AttachmentRow(
                id=r[0],
                inbound_id=r[1],
                filename=r[2],
                content_type=r[3],
                sha256=r[4],
                size=r[5],
                status=r[6],
                reason=r[7],
                filled=r[8],
                duplicate_of=r[9],
                reason_code=r[10],
                reason_params=json.loads(r[11]),
            )
            for r in rows
        ]

    def attachment_seen(self, campaign: str, delegation: str, sha256: str) -> int | None:
        """A byte-identical file this delegation sent before (counted once)."""
        row = self._execute(
            "SELECT a.id FROM attachment a JOIN inbound i ON i.id = a.inbound_id WHERE a.sha256 = ? "
            "AND i.campaign = ? AND i.delegation = ? AND a.duplicate_of IS NULL ORDER BY a.id LIMIT 1",
            (sha256, campaign, delegation),
        ).fetchone()
        return None if row is None else int(row[0])

    def current_answers(self, campaign: str, delegation: str | None = None) -> dict[str, dict[str, str]]:
        """The current answer per key, by delegation."""
        sql = "SELECT delegation, key, value FROM answer WHERE campaign = ? AND current = 1"
        params: list[Any] = [campaign]
        if delegation is not None:
            sql += " AND delegation = ?"
            params.append(delegation)
        out: dict[str, dict[str, str]] = {}
        for who, key, value in self._execute(sql, params):
            out.setdefault(who, {})[key] = value
        return out

    def set_answers(
        self,
        campaign: str,
        delegation: str,
        answers: Mapping[str, str],
        *,
        source: str,
        inbound_id: int,
        attachment_id: int | None,
        at: datetime,
    ) -> int:
        """Record answers; for each key the latest non-empty answer wins and the earlier stay as history.

        One read and batched writes. Returns how many current answers changed."""
        current = {
            key: (answer_id, value)
            for answer_id, key, value in self._execute(
                "SELECT id, key, value FROM answer WHERE campaign = ? AND delegation = ? AND current = 1",
                (campaign, delegation),
            )
        }
        changed = [(key, value) for key, value in answers.items() if current.get(key, (0, None))[1] != value]
        if not changed:
            return 0
        stamp = to_text(at)
        try:
            self._db.executemany(
                "UPDATE answer SET current = 0 WHERE id = ?",
                [(current[key][0],) for key, _ in changed if key in current],
            )
            self._db.executemany(
                "INSERT INTO answer (campaign, delegation, key, value, source, inbound_id, attachment_id, "
                "recorded_at, current) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1)",
                [
                    (campaign, delegation, key, value, source, inbound_id, attachment_id, stamp)
                    for key, value in changed
                ],
            )
        except sqlite3.OperationalError as exc:
            raise StoreError(f"store {self.path}: {exc}") from exc
        return len(changed)

    def answers_from(self, inbound_id: int) -> list[AnswerRow]:
        """The answers a message brought (whether or not still current)."""
        rows = self._execute(
            "SELECT key, value, source, inbound_id, recorded_at, current FROM answer WHERE inbound_id = ? ORDER BY id",
            (inbound_id,),
        )
        return [AnswerRow(r[0], r[1], r[2], r[3], datetime.fromisoformat(r[4]), bool(r[5])) for r in rows]

    def answer_history(self, campaign: str, delegation: str) -> list[AnswerRow]:
        rows = self._execute(
            "SELECT key, value, source, inbound_id, recorded_at, current FROM answer WHERE campaign = ? "
            "AND delegation = ? ORDER BY id",
            (campaign, delegation),
        )
        return [AnswerRow(r[0], r[1], r[2], r[3], datetime.fromisoformat(r[4]), bool(r[5])) for r in rows]

    def add_row_change(
        self,
        campaign: str,
        delegation: str,
        inbound_id: int,
        *,
        key: str,
        change: str,
        column: str,
        before: str,
        after: str,
        at: datetime,
    ) -> None:
        self._execute(
            "INSERT INTO row_change (campaign, delegation, inbound_id, key, change, column_name, before, after, "
            "recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (campaign, delegation, inbound_id, key, change, column, before, after, to_text(at)),
        )

    def row_changes(
        self, campaign: str, delegation: str | None = None, inbound_id: int | None = None
    ) -> list[RowChangeRow]:
        sql = (
            "SELECT key, change, column_name, before, after, inbound_id, recorded_at FROM row_change WHERE campaign = ?"
        )
        params: list[Any] = [campaign]
        if delegation is not None:
            sql += " AND delegation = ?"
            params.append(delegation)
        if inbound_id is not None:
            sql += " AND inbound_id = ?"
            params.append(inbound_id)
        rows = self._execute(sql + " ORDER BY id", params)
        return [RowChangeRow(r[0], r[1], r[2], r[3], r[4], r[5], datetime.fromisoformat(r[6])) for r in rows]

    def sent_message_ids(self, message_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """Which of these Message-IDs we sent, and to which campaign and delegation."""
        out: dict[str, tuple[str, str]] = {}
        wanted = [m for m in message_ids if m]
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = ", ".join("?" for _ in chunk)
            for message_id, campaign, delegation in self._execute(
                f"SELECT message_id, campaign, delegation FROM outbox WHERE message_id IN ({marks})", chunk
            ):
                out[message_id] = (campaign, delegation)
        return out

    def latest_request_campaign(self, delegation: str) -> str | None:
        """The campaign whose request most recently went to this delegation."""
        row = self._execute(
            "SELECT campaign FROM outbox WHERE delegation = ? AND kind = 'request' AND sent_at IS NOT NULL "
            "ORDER BY sent_at DESC LIMIT 1",
            (delegation,),
        ).fetchone()
        return None if row is None else str(row[0])

    # -- delegation state --------------------------------------------------

    def states(self, campaign: str, delegation: str | None = None) -> dict[str, StateRow]:
        """Every delegation's standing in a campaign (or just one delegation's)."""
        sql = (
            "SELECT campaign, delegation, state, filled, total, missing, last_reply_at, updated_at "
            "FROM delegation_state WHERE campaign = ?"
        )
        params: tuple[str, ...] = (campaign,)
        if delegation is not None:
            sql += " AND delegation = ?"
            params = (campaign, delegation)
        out: dict[str, StateRow] = {}
        # Many delegations miss the same actions (all of them, before any reply): each distinct list is
        # read once and shared, so thousands of states of a plan of thousands of actions stay small.
        lists: dict[str, tuple[str, ...]] = {}
        for r in self._execute(sql, params):
            missing = lists.get(r[5])
            if missing is None:
                missing = lists[r[5]] = tuple(json.loads(r[5]))
            updated = datetime.fromisoformat(r[7])
            out[r[1]] = StateRow(r[0], r[1], DelegationState(r[2]), r[3], r[4], missing, from_text(r[6]), updated)
        return out

    def state(self, campaign: str, delegation: str) -> StateRow | None:
        return self.states(campaign, delegation).get(delegation)

    def advance_state(
        self, campaign: str, delegation: str, old: DelegationState, new: DelegationState, at: datetime, reason: str
    ) -> bool:
        """Move a delegation from ``old`` to ``new`` (only if it is in ``old``), recording the change."""
        cursor = self._execute(
            "UPDATE delegation_state SET state = ?, updated_at = ? WHERE campaign = ? AND delegation = ? AND state = ?",
            (new.value, to_text(at), campaign, delegation, old.value),
        )
        if cursor.rowcount:
            self.record_event(
                at,
                "state_changed",
                reason,
                campaign=campaign,
                delegation=delegation,
                detail={"from": old.value, "to": new.value},
            )
        return bool(cursor.rowcount)

    def _missing_json(self, missing: Sequence[str]) -> str:
        """JSON of a missing list; planning a campaign writes the same full list for every delegation."""
        if self._last_missing is not None and self._last_missing[0] is missing:
            return self._last_missing[1]
        text = json.dumps(list(missing))
        self._last_missing = (missing, text)
        return text

    def set_state(
        self,
        campaign: str,
        delegation: str,
        *,
        state: DelegationState,
        filled: int,
        total: int,
        missing: Sequence[str],
        at: datetime,
        reason: str,
        last_reply_at: datetime | None = None,
    ) -> None:
        """Write a delegation's standing; a change of state is recorded in the audit trail with ``reason``."""
        previous = self._execute(
            "SELECT state, last_reply_at FROM delegation_state WHERE campaign = ? AND delegation = ?",
            (campaign, delegation),
        ).fetchone()
        reply = to_text(last_reply_at) if last_reply_at else (previous[1] if previous else None)
        self._execute(
            "INSERT INTO delegation_state (campaign, delegation, state, filled, total, missing, last_reply_at, "
            "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (campaign, delegation) DO UPDATE SET "
            "state = excluded.state, filled = excluded.filled, total = excluded.total, missing = excluded.missing, "
            "last_reply_at = excluded.last_reply_at, updated_at = excluded.updated_at",
            (campaign, delegation, state.value, filled, total, self._missing_json(missing), reply, to_text(at)),
        )
        old = previous[0] if previous else None
        if old != state.value:
            self.record_event(
                at,
                "state_changed",
                reason,
                campaign=campaign,
                delegation=delegation,
                detail={"from": old, "to": state.value, "filled": filled, "total": total},
            )


_INBOUND_COLUMNS = (
    "id, folder, uidvalidity, uid, message_id, sha256, size, received_at, from_address, subject, kind, campaign, "
    "delegation, evidence, trusted, outcome, reason, moved, duplicate_of, reason_code, reason_params"
)


def _inbound_row(r: Sequence[Any]) -> InboundRow:
    return InboundRow(
        id=r[0],
        folder=r[1],
        uidvalidity=r[2],
        uid=r[3],
        message_id=r[4],
        sha256=r[5],
        size=r[6],
        received_at=datetime.fromisoformat(r[7]),
        from_address=r[8],
        subject=r[9],
        kind=r[10],
        campaign=r[11],
        delegation=r[12],
        evidence=r[13],
        trusted=None if r[14] is None else bool(r[14]),
        outcome=r[15],
        reason=r[16],
        moved=bool(r[17]),
        duplicate_of=r[18],
        reason_code=r[19],
        reason_params=json.loads(r[20]) if r[20] != "{}" else {},
    )


def _statements(script: str) -> list[str]:
    """Split a migration script into statements (no semicolons inside our SQL strings)."""
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [part.strip() for part in "\n".join(lines).split(";") if part.strip()]
