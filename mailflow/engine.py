"""The workflow: from configuration, store and "now" to emails recorded and sent.

A pass has three steps, each safe to interrupt:

1. **plan**: ask :mod:`mailflow.schedule` what is due for each delegation and
   record it in the outbox (one row per slot, so nothing is ever planned twice;
   missed reminders that are not the latest are recorded as skipped);
2. **compose**: render every planned email that has no body yet and store its
   bytes (a template error is recorded and retried, the others go on);
3. **send**: hand every composed email to the transport over one connection,
   recording each result in its own transaction. The Message-ID is fixed at
   planning, so a retry after a temporary failure sends the very same email.
"""

from __future__ import annotations

import email
import email.policy
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any

from mailflow import meetings, schedule
from mailflow.clock import Clock
from mailflow.config import Campaign, Config, Delegation, Meeting
from mailflow.errors import (
    MailflowError,
    PermanentSendError,
    ServerUnavailable,
    TemporarySendError,
    UsageError,
)
from mailflow.inbound import parse_message
from mailflow.intake import NO_WORKBOOK_REASON, Intake, IntakeReport
from mailflow.mailbox import Mailbox
from mailflow.render import (
    CAMPAIGN_KINDS,
    FOLLOW_UP_KINDS,
    Attachment,
    Renderer,
    build_message_bytes,
    format_datetime,
    make_message_id,
    subject_reference,
    timezone_label,
)
from mailflow.render import format_date as render_date
from mailflow.sender import Batch, InFlight, Transport
from mailflow.store import DelegationState, InboundRow, OutboxRow, OutboxStatus, StateRow, Store
from mailflow.workbook import MasterLayout, RequestWorkbookFactory, make_fingerprint, read_master

log = logging.getLogger("mailflow")

NO_NAME = {"es": "(sin nombre)", "en": "(no name)"}  # an attachment that came without a file name
ATTACH_WORKBOOK = frozenset({*CAMPAIGN_KINDS, "missing", "unreadable"})
DEFAULT_ATTACHMENT_NAMES = {"es": "{campaign} - {delegation}.xlsx", "en": "{campaign} - {delegation}.xlsx"}


MISSING_CACHE_SIZE = 256
DIGEST = "digest"


@dataclass(frozen=True)
class Composed:
    """An email ready to send: its bytes, and what the outbox records of it."""

    raw: bytes
    subject: str
    recipients: list[str]


@dataclass(frozen=True)
class _Flight:
    """An email handed to the server whose answer is still to be read."""

    row: OutboxRow
    recipients: list[str]
    started: InFlight


@dataclass
class TickReport:
    """What one pass did: counts for people, ids for tests and logs."""

    planned: int = 0
    skipped: int = 0
    sent: list[int] = field(default_factory=list)
    retried: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    compose_errors: list[int] = field(default_factory=list)
    inbox: IntakeReport | None = None


@dataclass(frozen=True)
class DelegationStatus:
    """A delegation's standing in one campaign at one instant."""

    id: str
    name: str
    state: DelegationState
    overdue: bool
    filled: int
    total: int
    missing: tuple[str, ...]
    last_reply_at: datetime | None
    next_reminder_at: datetime | None
    deadline_at: datetime
    refused_contacts: tuple[str, ...]
    send_problem: str | None
    all_contacts_failing: bool = False
    held: tuple[int, ...] = ()  # received messages held for review (untrusted sender)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state.value,
            "overdue": self.overdue,
            "filled": self.filled,
            "total": self.total,
            "missing": list(self.missing),
            "last_reply_at": _iso(self.last_reply_at),
            "next_reminder_at": _iso(self.next_reminder_at),
            "deadline_at": _iso(self.deadline_at),
            "refused_contacts": list(self.refused_contacts),
            "all_contacts_failing": self.all_contacts_failing,
            "held_for_review": list(self.held),
            "send_problem": self.send_problem,
        }


@dataclass(frozen=True)
class CampaignStatus:
    id: str
    title: str
    delegations: tuple[DelegationStatus, ...]

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "delegations": [d.as_json() for d in self.delegations]}


def _iso(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).isoformat() if moment else None


class Engine:
    """Carries out the workflow for one configuration against one store and transport."""

    def __init__(
        self,
        config: Config,
        store: Store,
        transport: Transport,
        clock: Clock,
        renderer: Renderer | None = None,
        mailbox: Mailbox | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.transport = transport
        self.clock = clock
        self.mailbox = mailbox
        self.renderer = renderer or Renderer(config.templates)
        # Asked between two emails and between two received messages: a stop (SIGTERM) finishes the one
        # in hand, records it, and leaves the rest for the next pass.
        self.stop_requested: Callable[[], bool] = lambda: False
        self._layouts: dict[str, MasterLayout] = {}
        self._factories: dict[str, RequestWorkbookFactory] = {}
        self._secret: bytes | None = None
        self._intake: Intake | None = None
        self._label_cache: dict[str, dict[str, str]] = {}
        self._initial: dict[str, tuple[int, tuple[str, ...]]] = {}
        self._missing_cache: dict[tuple[str, tuple[str, ...]], list[dict[str, str]]] = {}

    # -- shared helpers ----------------------------------------------------

    @property
    def secret(self) -> bytes:
        if self._secret is None:
            configured = self.config.fingerprint_secret
            self._secret = configured.encode("utf-8") if configured else self.store.secret()
        return self._secret

    def layout(self, campaign: Campaign) -> MasterLayout:
        if campaign.id not in self._layouts:
            self._layouts[campaign.id] = read_master(
                campaign.workbook, campaign.key_column, campaign.fill_column, campaign.sheet
            )
        return self._layouts[campaign.id]

    def _factory(self, campaign: Campaign) -> RequestWorkbookFactory:
        if campaign.id not in self._factories:
            self._factories[campaign.id] = RequestWorkbookFactory(campaign.workbook, self.layout(campaign))
        return self._factories[campaign.id]

    def _backoff(self, attempts: int) -> timedelta:
        mail = self.config.mail
        seconds = min(mail.retry_base_seconds * 2 ** max(attempts - 1, 0), mail.retry_max_seconds)
        return timedelta(seconds=seconds)

    def _initial_state(self, campaign: Campaign) -> tuple[int, tuple[str, ...]]:
        """Total and missing keys of a delegation that has answered nothing (one tuple per campaign)."""
        if campaign.id not in self._initial:
            keys = self.layout(campaign).keys
            self._initial[campaign.id] = (len(keys), keys)
        return self._initial[campaign.id]

    # -- the pass ----------------------------------------------------------

    @property
    def intake(self) -> Intake:
        if self._intake is None:
            self._intake = Intake(self)
        return self._intake

    def tick(self) -> TickReport:
        """One full pass at the clock's instant: read the inbox once, then plan, compose and send what is due."""
        now = self.clock.now()
        report = TickReport()
        if self.mailbox is not None:
            report.inbox = self.intake.read_inbox(self.mailbox, now)
        self.plan(now, report)
        self.send_pending(report)
        return report

    def plan(self, now: datetime, report: TickReport | None = None) -> TickReport:
        """Record in the outbox every email that is due at ``now`` (and the slots it supersedes)."""
        report = report or TickReport()
        # One transaction for the whole plan: nothing is sent here, so it is all or nothing, and fast.
        tz = self.config.secretariat.tz
        with self.store.transaction():
            for campaign in self.config.campaigns:
                end = schedule.closes_at(campaign, tz)
                if end is not None and now >= end:
                    continue  # closed: no more requests, reminders or overdue notices
                recorded = self.store.outbox_slots(campaign.id)
                states = self.store.states(campaign.id)
                request_sent = self.store.request_sent_at(campaign.id)
                for delegation in self.config.campaign_delegations(campaign):
                    state = states.get(delegation.id)
                    decision = schedule.decide(
                        schedule.slots(campaign, delegation),
                        now=now,
                        done=recorded.get(delegation.id, {}).keys(),
                        complete=state is not None and state.state is DelegationState.COMPLETE,
                        request_sent_at=request_sent.get(delegation.id),
                    )
                    if decision.due or decision.superseded:
                        self._record_decision(campaign, delegation, decision, state, now, report)
            self._plan_digest(now, report)
            self._plan_meetings(now, report)
        return report

    def open_campaigns(self, now: datetime) -> list[Campaign]:
        tz = self.config.secretariat.tz
        return [c for c in self.config.campaigns if schedule.is_open(c, tz, now)]

    def _plan_digest(self, now: datetime, report: TickReport) -> None:
        """The digest of the latest cron slot not yet sent: once, however many slots were missed."""
        digest = self.config.secretariat.digest
        open_now = self.open_campaigns(now)
        if digest is None or (not digest.when_closed and not open_now):
            return
        after = self.store.last_slot_of_kind(DIGEST)
        if open_now and not digest.when_closed:
            # No digest for a slot before the first campaign opened.
            first_open = min(c.opens for c in open_now).astimezone(UTC) - timedelta(seconds=1)
            after = max(after, first_open) if after else first_open
        slot = schedule.latest_cron_slot(digest.schedule, self.config.secretariat.tz, now, after)
        if slot is None:
            return
        key = slot.isoformat()
        outbox_id = self.store.add_outbox(
            campaign="",
            delegation="",
            kind=DIGEST,
            slot=key,
            message_id=make_message_id(self.config.secretariat.domain, DIGEST, key),
            status=OutboxStatus.PENDING,
            scheduled_at=slot,
            created_at=now,
        )
        if outbox_id is not None:
            report.planned += 1

    def _meeting_rows(self) -> dict[str, list[OutboxRow]]:
        """Every outbox row of a meeting email, by meeting id, in the order recorded."""
        out: dict[str, list[OutboxRow]] = {}
        for row in self.store.outbox(campaign=""):
            if row.kind == meetings.MEETING:
                out.setdefault(meetings.slot_meeting(row.slot), []).append(row)
        return out

    def _plan_meetings(self, now: datetime, report: TickReport) -> None:
        """Notices, updates, cancellations and reminders of every meeting, configured or removed (mailflow.meetings)."""
        index = meetings.load_index(self.store.get_meta(meetings.INDEX_KEY))
        rows = self._meeting_rows()
        domain = self.config.secretariat.domain
        kept: list[str] = []
        for ident in dict.fromkeys([*(m.id for m in self.config.meetings), *index]):
            meeting = self.config.find_meeting(ident)
            by_slot = {(row.delegation, row.slot): row for row in rows.get(ident, [])}
            recorded: dict[str, dict[str, str]] = {}
            for row in by_slot.values():
                recorded.setdefault(row.delegation, {})[row.slot] = row.status.value
            try:
                state = meetings.MeetingState.from_text(self.store.get_meta(meetings.state_key(ident)))
                recipients = meetings.recipients_of(meeting, self.config) if meeting else []
                plan = meetings.plan_meeting(ident, meeting, recipients, state, recorded, now)
            except (MailflowError, KeyError, ValueError) as exc:  # one bad meeting never stops the others
                log.error("meeting %s: cannot plan: %s", ident, _describe(exc))
                self.store.record_event(now, "meeting_failed", f"meeting {ident}: {_describe(exc)}")
                kept.append(ident)
                continue
            for key in plan.obsolete:
                self.store.mark_skipped(by_slot[key].id, plan.obsolete_reason)
            for planned in plan.emails:
                outbox_id = self.store.add_outbox(
                    campaign="",
                    delegation=planned.recipient,
                    kind=meetings.MEETING,
                    slot=planned.slot,
                    message_id=make_message_id(domain, meetings.MEETING, planned.recipient, planned.slot),
                    status=OutboxStatus.SKIPPED if planned.skipped else OutboxStatus.PENDING,
                    scheduled_at=planned.at,
                    created_at=now,
                    reason=planned.skipped,
                )
                if outbox_id is not None and planned.skipped:
                    report.skipped += 1
                elif outbox_id is not None:
                    report.planned += 1
            if plan.save:
                self.store.set_meta(meetings.state_key(ident), plan.state.to_text() if plan.state else "null")
            if plan.state is not None:
                kept.append(ident)
        if kept != index:
            self.store.set_meta(meetings.INDEX_KEY, json.dumps(kept))

    def _record_decision(
        self,
        campaign: Campaign,
        delegation: Delegation,
        decision: schedule.Decision,
        state: StateRow | None,
        now: datetime,
        report: TickReport,
    ) -> None:
        with self.store.transaction():
            if state is None:
                total, missing = self._initial_state(campaign)
                self.store.set_state(
                    campaign.id,
                    delegation.id,
                    state=DelegationState.NOT_SENT,
                    filled=0,
                    total=total,
                    missing=missing,
                    at=now,
                    reason="campaign opened",
                )
            due_keys = ", ".join(slot.key for slot in decision.due)
            for slot in decision.superseded:
                reason = (
                    f"superseded by {due_keys}: missed while mailflow was not running"
                    if due_keys
                    else "fell due before the request went out"
                )
                outbox_id = self._add_slot(campaign, delegation, slot, OutboxStatus.SKIPPED, now, reason)
                if outbox_id is not None:
                    report.skipped += 1
                    self.store.record_event(
                        now,
                        "email_skipped",
                        reason,
                        campaign=campaign.id,
                        delegation=delegation.id,
                        detail={"kind": slot.kind, "slot": slot.key},
                        outbox_id=outbox_id,
                    )
            for slot in decision.due:
                if self._add_slot(campaign, delegation, slot, OutboxStatus.PENDING, now) is not None:
                    report.planned += 1
                    log.debug("planned %s %s for %s", slot.kind, slot.key, delegation.id)

    def _add_slot(
        self,
        campaign: Campaign,
        delegation: Delegation,
        slot: schedule.Slot,
        status: OutboxStatus,
        now: datetime,
        reason: str | None = None,
    ) -> int | None:
        return self.store.add_outbox(
            campaign=campaign.id,
            delegation=delegation.id,
            kind=slot.kind,
            slot=slot.key,
            message_id=self._message_id(campaign, delegation, slot.key),
            status=status,
            scheduled_at=slot.at,
            created_at=now,
            reason=reason,
        )

    def _message_id(self, campaign: Campaign, delegation: Delegation, slot: str) -> str:
        return make_message_id(self.config.secretariat.domain, campaign.id, delegation.id, slot)

    def send_pending(self, report: TickReport | None = None) -> TickReport:
        """Compose and send every due email over one connection, at most ``rate_per_minute``.

        An email is composed just before it is sent, while the server is still taking in the previous
        one (whose answer is read afterwards), so the next email never waits for its own rendering.
        Its body is stored, in the transaction that records the previous email's outcome, before it is
        handed to the server; a retry sends those same bytes. A failure to compose is recorded and
        retried later; the other emails go on."""
        report = report or TickReport()
        now = self.clock.now()
        rows = self.store.pending(now)
        if not rows:
            return report
        interval = 60.0 / self.config.mail.rate_per_minute if self.config.mail.rate_per_minute else 0.0
        last_sent: datetime | None = None
        sender = self.config.secretariat.address
        refused_before = {
            delegation: {r.address for r in refusals} for delegation, refusals in self.store.refusals().items()
        }
        states: dict[str, dict[str, StateRow]] = {}  # read once per campaign: sending changes no answer
        flight: _Flight | None = None
        with Batch(self.transport) as batch:
            for index, row in enumerate(rows):
                if self.stop_requested():
                    log.info("stopping: %s email(s) left for the next pass", len(rows) - index)
                    break
                if self._no_longer_needed(row):
                    continue
                composed = None if row.has_body else self._compose_row(row, now, states, report)
                if composed is None and not row.has_body:
                    continue  # recorded as not composed, retried later
                with self.store.transaction():  # one commit: the last email's outcome and this one's body
                    if flight is not None:
                        self._land(flight, report)
                        flight = None
                    if composed is not None:
                        self.store.set_body(
                            row.id, composed.raw, subject=composed.subject, recipients=composed.recipients
                        )
                raw = composed.raw if composed is not None else self.store.body(row.id)
                gone = refused_before.get(row.delegation, set())
                listed = composed.recipients if composed is not None else row.recipients
                recipients = [address for address in listed if address.lower() not in gone]
                if not recipients:
                    self._fail(
                        row,
                        "every contact of this delegation was refused by the mail server; "
                        "correct the contacts in the configuration",
                        {},
                        report,
                    )
                    continue
                if interval and last_sent is not None:
                    wait = interval - (self.clock.now() - last_sent).total_seconds()
                    self.clock.sleep(wait)
                try:
                    flight = _Flight(row, recipients, batch.begin(sender, recipients, raw))
                except ServerUnavailable as exc:
                    # No connection at all: every remaining email waits for the next attempt.
                    for waiting in rows[index:]:
                        self._retry(waiting, str(exc), report)
                    break
                except TemporarySendError as exc:
                    self._retry(row, str(exc), report)
                    continue
                except PermanentSendError as exc:
                    self._fail(row, str(exc), exc.refused, report)
                    continue
                last_sent = self.clock.now()
            if flight is not None:
                self._land(flight, report)
        return report

    def _compose_row(
        self, row: OutboxRow, now: datetime, states: dict[str, dict[str, StateRow]], report: TickReport
    ) -> Composed | None:
        """Render one due outbox row; a failure is recorded, retried later, and gives None."""
        try:
            return self.compose_bytes(
                row.campaign,
                row.delegation,
                row.kind,
                row.scheduled_at or now,
                row.message_id,
                now,
                inbound_id=row.inbound_id,
                slot=row.slot,
                states=states,
            )
        except (MailflowError, KeyError) as exc:
            reason = f"cannot compose the {row.kind} for {row.delegation}: {_describe(exc)}"
            log.error("%s", reason)
            with self.store.transaction():
                self.store.mark_retry(row.id, reason, now + self._backoff(row.attempts + 1))
                self._row_event(row, now, "compose_failed", reason)
            report.compose_errors.append(row.id)
            return None

    def _land(self, flight: _Flight, report: TickReport) -> None:
        """Read the server's answer to an email handed over, and record what became of it."""
        try:
            refused = flight.started.finish()
        except TemporarySendError as exc:
            self._retry(flight.row, str(exc), report)
            return
        except PermanentSendError as exc:
            self._fail(flight.row, str(exc), exc.refused, report)
            return
        self._sent(flight.row, flight.recipients, refused, report)

    def _row_event(self, row: OutboxRow, now: datetime, kind: str, reason: str, **detail: Any) -> None:
        """An audit event about one outbox row: its campaign, delegation, kind and slot, and ``detail``."""
        self.store.record_event(
            now,
            kind,
            reason,
            campaign=row.campaign,
            delegation=row.delegation,
            detail={"kind": row.kind, "slot": row.slot, **detail},
            outbox_id=row.id,
        )

    def _no_longer_needed(self, row: OutboxRow) -> bool:
        if row.kind not in (schedule.REMINDER, schedule.OVERDUE):
            return False
        state = self.store.state(row.campaign, row.delegation)
        if state is None or state.state is not DelegationState.COMPLETE:
            return False
        now = self.clock.now()
        with self.store.transaction():
            self.store.mark_skipped(row.id, "the delegation completed its return before this was sent")
            self._row_event(row, now, "email_skipped", "delegation complete before sending")
        return True

    def _sent(
        self, row: OutboxRow, recipients: list[str], refused: Mapping[str, tuple[int, str]], report: TickReport
    ) -> None:
        now = self.clock.now()
        refused_text = {address: f"{code} {text}" for address, (code, text) in refused.items()}
        with self.store.transaction():
            self.store.mark_sent(row.id, now, refused_text)
            delivered = [a for a in recipients if a not in refused]
            self._row_event(
                row,
                now,
                "email_sent",
                f"{row.kind} sent to {', '.join(delivered)}",
                message_id=row.message_id,
                subject=row.subject,
            )
            for address, (code, text) in refused.items():
                if code >= 500:
                    self._refuse(row, address, code, text, now)
                else:
                    self._retry_for(row, address, f"{code} {text}", now)
            if row.kind == schedule.REQUEST and row.campaign:
                self.store.advance_state(
                    row.campaign,
                    row.delegation,
                    DelegationState.NOT_SENT,
                    DelegationState.AWAITING,
                    now,
                    "request sent",
                )
        report.sent.append(row.id)
        log.info("sent %s to %s (%s)", row.kind, row.delegation or "secretariat", ", ".join(recipients))

    def _retry_for(self, row: OutboxRow, address: str, error: str, now: datetime) -> None:
        """A contact refused for now (4xx at RCPT) while others accepted: the same email, to that contact
        only, later. The copy keeps the original Message-ID header; its outbox key names the contact."""
        slot = f"{row.slot}>{address.lower()}"
        outbox_id = self.store.add_outbox(
            campaign=row.campaign,
            delegation=row.delegation,
            kind=row.kind,
            slot=slot,
            message_id=f"{row.message_id}>{address.lower()}",
            status=OutboxStatus.PENDING,
            scheduled_at=now,
            created_at=now,
            inbound_id=row.inbound_id,
        )
        if outbox_id is None:
            return
        self.store.set_body(outbox_id, self.store.body(row.id), subject=row.subject, recipients=[address])
        self.store.mark_retry(outbox_id, f"{address} refused for now: {error}", now + self._backoff(1))
        self.store.record_event(
            now,
            "send_retry",
            f"{address} refused for now: {error}; retried for that contact only",
            campaign=row.campaign,
            delegation=row.delegation,
            detail={"address": address, "kind": row.kind, "slot": slot},
            outbox_id=outbox_id,
        )

    def _refuse(self, row: OutboxRow, address: str, code: int | None, text: str, now: datetime) -> None:
        self.store.record_refusal(address, row.delegation, code, text, now, row.id)
        self.store.record_event(
            now,
            "contact_refused",
            f"{address} refused for good: {code} {text}",
            campaign=row.campaign,
            delegation=row.delegation,
            detail={"address": address, "code": code},
            outbox_id=row.id,
        )
        log.warning("%s refused %s for good: %s %s", row.delegation, address, code, text)

    def _retry(self, row: OutboxRow, error: str, report: TickReport) -> None:
        now = self.clock.now()
        next_at = now + self._backoff(row.attempts + 1)
        with self.store.transaction():
            self.store.mark_retry(row.id, error, next_at)
            self._row_event(row, now, "send_retry", error, next_attempt_at=next_at.isoformat())
        report.retried.append(row.id)
        log.warning("%s to %s not sent, retry at %s: %s", row.kind, row.delegation, next_at.isoformat(), error)

    def _fail(self, row: OutboxRow, error: str, refused: Mapping[str, tuple[int, str]], report: TickReport) -> None:
        """A permanent failure; only recipients refused at RCPT are marked refused (not a message-level 5xx)."""
        now = self.clock.now()
        with self.store.transaction():
            self.store.mark_failed(row.id, error, {a: f"{code} {text}" for a, (code, text) in refused.items()})
            self._row_event(row, now, "send_failed", error)
            for address, (code, text) in refused.items():
                self._refuse(row, address, code, text, now)
        report.failed.append(row.id)
        log.error("%s to %s failed for good: %s", row.kind, row.delegation, error)

    # -- composing ---------------------------------------------------------

    def compose(
        self,
        campaign_id: str,
        delegation_id: str,
        kind: str,
        scheduled_at: datetime,
        message_id: str,
        now: datetime,
        inbound_id: int | None = None,
        slot: str = "",
    ) -> EmailMessage:
        """:meth:`compose_bytes` as an ``EmailMessage`` (for previews)."""
        raw = self.compose_bytes(
            campaign_id, delegation_id, kind, scheduled_at, message_id, now, inbound_id=inbound_id, slot=slot
        ).raw
        message = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        return message

    def compose_bytes(
        self,
        campaign_id: str,
        delegation_id: str,
        kind: str,
        scheduled_at: datetime,
        message_id: str,
        now: datetime,
        inbound_id: int | None = None,
        slot: str = "",
        states: dict[str, dict[str, StateRow]] | None = None,
    ) -> Composed:
        """Render one email: to a delegation (a campaign email or a follow-up), the Secretariat's digest, or
        a meeting email (``slot`` says which, see :mod:`mailflow.meetings`).

        ``states`` keeps the delegations' states of each campaign read so far, for a caller composing many."""
        if kind == DIGEST:
            return self._compose_digest(message_id, now)
        if kind == meetings.MEETING:
            return self._compose_meeting(delegation_id, slot, message_id, now)
        if kind not in CAMPAIGN_KINDS and kind not in FOLLOW_UP_KINDS:
            known = ", ".join((*CAMPAIGN_KINDS, *FOLLOW_UP_KINDS))
            raise UsageError(f"unknown email kind {kind!r}; expected one of {known}")
        campaign = self.config.campaign(campaign_id)
        delegation = self.config.delegation(delegation_id)
        if states is None:
            state = self.store.state(campaign.id, delegation.id)
        else:
            if campaign.id not in states:
                states[campaign.id] = self.store.states(campaign.id)
            state = states[campaign.id].get(delegation.id)
        if state is None:
            total, missing_keys = self._initial_state(campaign)
            filled = 0
        else:
            total, missing_keys, filled = state.total, state.missing, state.filled
        labels = self._labels(campaign)
        local_day = scheduled_at.astimezone(delegation.tz).date()
        language = delegation.language
        secretariat = self.config.secretariat
        attachment_name = self.attachment_name(campaign, delegation)
        context: dict[str, Any] = {
            "kind": kind,
            "language": language,
            "secretariat": {"name": secretariat.name, "address": secretariat.address},
            "delegation": {"id": delegation.id, "name": delegation.name},
            "campaign": {"id": campaign.id, "title": campaign.title_in(language), "ref": campaign.ref},
            "reference": subject_reference(campaign.ref, delegation.id),
            "fill_column": campaign.fill_column,
            "deadline": campaign.deadline,
            "deadline_text": render_date(campaign.deadline, language),
            "timezone_label": timezone_label(delegation.name, language),
            "attachment_name": attachment_name,
            "total": total,
            "filled": filled,
            "missing": self._missing_items(campaign, missing_keys),
            "days_left": max((campaign.deadline - local_day).days, 0) if kind == schedule.REMINDER else 0,
            "days_overdue": max((local_day - campaign.deadline).days, 0) if kind == schedule.OVERDUE else 0,
        }
        headers = {
            "X-Mailflow-Kind": kind,
            "X-Mailflow-Campaign": campaign.id,
            "X-Mailflow-Delegation": delegation.id,
        }
        if kind in FOLLOW_UP_KINDS:
            if inbound_id is None:
                raise UsageError(f"a {kind} answers a received message: preview it with inspect")
            received = self.store.inbound(inbound_id)
            context.update(self._follow_up_context(received, delegation, labels, now, campaign))
            headers.update(self._thread_headers(received))
        rendered = self.renderer.render(kind, language, context)
        attachments = []
        if kind in ATTACH_WORKBOOK:
            workbook = self._factory(campaign).build(make_fingerprint(self.secret, campaign.id, delegation.id))
            attachments.append(Attachment(attachment_name, workbook))
        recipients = list(delegation.contacts)
        raw = build_message_bytes(
            rendered=rendered,
            from_name=secretariat.name,
            from_address=secretariat.address,
            to=recipients,
            reply_to=secretariat.address,
            message_id=message_id,
            date=now,
            headers=headers,
            attachments=attachments,
        )
        return Composed(raw, rendered.subject, recipients)

    def _compose_meeting(self, recipient: str, slot: str, message_id: str, now: datetime) -> Composed:
        ident = meetings.slot_meeting(slot)
        state = meetings.MeetingState.from_text(self.store.get_meta(meetings.state_key(ident)))
        if state is None:
            raise MailflowError(f"meeting {ident} has no recorded state (removed after it started)")
        return self._meeting_bytes(meetings.meeting_email(self.config, state, recipient, slot, now), message_id, now)

    def _meeting_bytes(self, mail: meetings.MeetingEmail, message_id: str, now: datetime) -> Composed:
        rendered = self.renderer.render(meetings.MEETING, mail.language, mail.context)
        secretariat = self.config.secretariat
        raw = build_message_bytes(
            rendered=rendered,
            from_name=secretariat.name,
            from_address=secretariat.address,
            to=list(mail.to),
            reply_to=secretariat.address,
            message_id=message_id,
            date=now,
            headers=mail.headers,
            attachments=mail.attachments,
            calendar=mail.calendar,
        )
        return Composed(raw, rendered.subject, list(mail.to))

    def _compose_digest(self, message_id: str, now: datetime) -> Composed:
        """The status digest for the Secretariat, with each open campaign's consolidated workbook."""
        from mailflow.consolidate import consolidated_workbook
        from mailflow.digest import digest_context

        digest = self.config.secretariat.digest
        if digest is None:
            raise UsageError("no secretariat.digest is configured")
        secretariat = self.config.secretariat
        campaigns = self.open_campaigns(now) if not digest.when_closed else list(self.config.campaigns)
        statuses = [s for s in self.status(now) if any(c.id == s.id for c in campaigns)]
        context = digest_context(
            self.config,
            self.store,
            statuses,
            now=now,
            since=self.store.last_sent_of_kind(DIGEST),
            language=secretariat.language,
            inbox_stale_after=timedelta(seconds=digest.inbox_stale_after_seconds),
        )
        rendered = self.renderer.render(DIGEST, secretariat.language, context)
        attachments = []
        if digest.attach_workbook:
            for campaign in campaigns:
                data = consolidated_workbook(
                    self.config, self.store, campaign, self.layout(campaign), language=secretariat.language, now=now
                )
                suffix = "consolidado" if secretariat.language == "es" else "consolidated"
                attachments.append(Attachment(f"{campaign.workbook.stem} - {suffix}.xlsx", data))
        recipients = list(digest.to)
        raw = build_message_bytes(
            rendered=rendered,
            from_name=secretariat.name,
            from_address=secretariat.address,
            to=recipients,
            reply_to=secretariat.address,
            message_id=message_id,
            date=now,
            headers={"X-Mailflow-Kind": DIGEST},
            attachments=attachments,
        )
        return Composed(raw, rendered.subject, recipients)

    def _missing_items(self, campaign: Campaign, keys: Sequence[str]) -> list[dict[str, str]]:
        """The template's list of missing rows; most delegations miss the same rows, so it is built once."""
        cache_key = (campaign.id, tuple(keys))
        items = self._missing_cache.get(cache_key)
        if items is None:
            labels = self._labels(campaign)
            items = [{"key": key, "label": labels.get(key, "")} for key in keys]
            if len(self._missing_cache) > MISSING_CACHE_SIZE:
                self._missing_cache.clear()
            self._missing_cache[cache_key] = items
        return items

    def _labels(self, campaign: Campaign) -> Mapping[str, str]:
        """Each row's label (its action text), by key: built once per campaign."""
        if campaign.id not in self._label_cache:
            self._label_cache[campaign.id] = {row.key: row.label for row in self.layout(campaign).rows}
        return self._label_cache[campaign.id]

    def _follow_up_context(
        self,
        received: InboundRow,
        delegation: Delegation,
        labels: Mapping[str, str],
        now: datetime,
        campaign: Campaign,
    ) -> dict[str, Any]:
        inbound_id = received.id
        recorded = [
            {"key": a.key, "label": labels.get(a.key, ""), "value": a.value}
            for a in self.store.answers_from(inbound_id)
        ]
        changed = [
            {"key": c.key, "column": c.column, "before": c.before, "after": c.after}
            for c in self.store.row_changes(campaign.id, delegation.id, inbound_id)
            if c.change == "changed"
        ]
        failed = [
            {"filename": a.filename or NO_NAME[delegation.language], "reason": a.reason_in(delegation.language)}
            for a in self.store.attachments(inbound_id)
            if a.status in ("unreadable", "rejected")
        ]
        if not failed and received.outcome == "applied" and not recorded:
            failed = [{"filename": "", "reason": NO_WORKBOOK_REASON[delegation.language]}]
        return {
            "reply_subject": received.subject,
            "received_at_text": format_datetime(received.received_at, delegation.tz, delegation.language),
            "recorded": recorded,
            "changed_outside": changed,
            "unreadable": failed,
            "deadline_passed": now >= schedule.deadline_end(campaign, delegation),
        }

    def _thread_headers(self, received: InboundRow) -> dict[str, str]:
        """In-Reply-To and References, so the follow-up lands in the delegation's thread."""
        if not received.message_id:
            return {}
        parsed = parse_message(self.store.inbound_raw(received.id))
        chain = list(dict.fromkeys(m for m in (*parsed.references, received.message_id) if m))
        # RFC 5322 advises keeping the first and the latest ids of a long thread.
        kept = chain if len(chain) <= 10 else [chain[0], *chain[-9:]]
        return {"In-Reply-To": received.message_id, "References": " ".join(kept)}

    def attachment_name(self, campaign: Campaign, delegation: Delegation) -> str:
        pattern = campaign.attachment_name.get(delegation.language) or DEFAULT_ATTACHMENT_NAMES[delegation.language]
        name = pattern.format(delegation=delegation.name, campaign=campaign.workbook.stem)
        return name.replace("/", "-").replace("\\", "-")

    def preview(self, kind: str, delegation_id: str, campaign_id: str | None, now: datetime) -> EmailMessage:
        """The email ``kind`` as it would be sent to a delegation at ``now``; nothing is recorded."""
        campaign = self.pick_campaign(campaign_id)
        if delegation_id not in campaign.delegations:
            known = ", ".join(campaign.delegations)
            raise UsageError(f"delegation {delegation_id!r} is not in campaign {campaign.id} (known: {known})")
        delegation = self.config.delegation(delegation_id)
        # The slot of that kind a pass at `now` would send: the latest one due, else the first to come.
        candidates = [slot for slot in schedule.slots(campaign, delegation) if slot.kind == kind]
        past = [slot for slot in candidates if slot.at <= now]
        chosen = past[-1] if past else (candidates[0] if candidates else None)
        slot_key, scheduled_at = (chosen.key, chosen.at) if chosen else (kind, now)
        message_id = self._message_id(campaign, delegation, slot_key)
        return self.compose(campaign.id, delegation_id, kind, scheduled_at, message_id, now)

    def preview_meeting(self, recipient: str, meeting_id: str | None, now: datetime) -> EmailMessage:
        """The notice of a meeting (its cancellation, if cancelled) as a new invitee would get it now."""
        meeting = self.pick_meeting(meeting_id)
        key = meetings.invitee_key(meeting, recipient)
        if key is None:
            known = ", ".join([*meeting.invite, *meeting.extra]) or "nobody"
            raise UsageError(f"{recipient!r} is not invited to meeting {meeting.id} (invited: {known})")
        state = meetings.MeetingState.from_text(self.store.get_meta(meetings.state_key(meeting.id)))
        preview, slot = meetings.preview_state(meeting, state)
        mail = meetings.meeting_email(self.config, preview, key, slot, now)
        domain = self.config.secretariat.domain
        raw = self._meeting_bytes(mail, make_message_id(domain, meetings.MEETING, key, slot), now).raw
        message = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        return message

    def pick_meeting(self, meeting_id: str | None) -> Meeting:
        known = ", ".join(m.id for m in self.config.meetings) or "none configured"
        if meeting_id is None:
            if len(self.config.meetings) == 1:
                return self.config.meetings[0]
            raise UsageError(f"several meetings or none: choose one with --meeting ({known})")
        meeting = self.config.find_meeting(meeting_id)
        if meeting is None:
            raise UsageError(f"unknown meeting {meeting_id!r} (known: {known})")
        return meeting

    def meeting_status(self, now: datetime) -> list[meetings.MeetingStatus]:
        """Every configured meeting that has not ended: who is invited, and what reached them."""
        rows = self._meeting_rows()
        out: list[meetings.MeetingStatus] = []
        for meeting in self.config.meetings:
            if meeting.end <= now:
                continue
            state = meetings.MeetingState.from_text(self.store.get_meta(meetings.state_key(meeting.id)))
            views = [
                meetings.RowView(r.delegation, r.slot, r.status.value, r.sent_at, r.last_error)
                for r in rows.get(meeting.id, [])
            ]
            recipients = meetings.recipients_of(meeting, self.config)
            out.append(meetings.meeting_status(meeting, recipients, state, views, now))
        return out

    def pick_campaign(self, campaign_id: str | None) -> Campaign:
        if campaign_id is None:
            if len(self.config.campaigns) == 1:
                return self.config.campaigns[0]
            known = ", ".join(c.id for c in self.config.campaigns) or "none configured"
            raise UsageError(f"several campaigns: choose one with --campaign ({known})")
        try:
            return self.config.campaign(campaign_id)
        except KeyError:
            known = ", ".join(c.id for c in self.config.campaigns) or "none configured"
            raise UsageError(f"unknown campaign {campaign_id!r} (known: {known})") from None

    # -- status ------------------------------------------------------------

    def status(self, now: datetime, campaign_id: str | None = None) -> list[CampaignStatus]:
        """Where every delegation stands at ``now``."""
        campaigns: Iterable[Campaign] = [self.pick_campaign(campaign_id)] if campaign_id else self.config.campaigns
        refusals = self.store.refusals()
        out: list[CampaignStatus] = []
        for campaign in campaigns:
            recorded = self.store.outbox_slots(campaign.id)
            states = self.store.states(campaign.id)
            request_sent = self.store.request_sent_at(campaign.id)
            problems = self.store.send_problems(campaign.id)
            held: dict[str, list[int]] = {}
            for row in self.store.inbound_rows(campaign=campaign.id, outcome="held"):
                held.setdefault(row.delegation, []).append(row.id)
            total_default: int | None = None
            keys_default: tuple[str, ...] = ()
            rows: list[DelegationStatus] = []
            for delegation in self.config.campaign_delegations(campaign):
                state = states.get(delegation.id)
                if state is None:
                    if total_default is None:
                        total_default, keys_default = self._initial_state(campaign)
                    current, filled, total, missing, last_reply = (
                        DelegationState.NOT_SENT,
                        0,
                        total_default,
                        keys_default,
                        None,
                    )
                else:
                    current, filled, total, missing, last_reply = (
                        state.state,
                        state.filled,
                        state.total,
                        state.missing,
                        state.last_reply_at,
                    )
                complete = current is DelegationState.COMPLETE
                end = schedule.deadline_end(campaign, delegation)
                upcoming = schedule.next_nudge(
                    schedule.slots(campaign, delegation),
                    now=now,
                    done=recorded.get(delegation.id, {}).keys(),
                    complete=complete,
                    request_sent_at=request_sent.get(delegation.id),
                )
                rows.append(
                    DelegationStatus(
                        id=delegation.id,
                        name=delegation.name,
                        state=current,
                        overdue=not complete and now >= end,
                        filled=filled,
                        total=total,
                        missing=missing,
                        last_reply_at=last_reply,
                        next_reminder_at=upcoming.at if upcoming else None,
                        deadline_at=end,
                        refused_contacts=tuple(r.address for r in refusals.get(delegation.id, [])),
                        send_problem=problems.get(delegation.id),
                        all_contacts_failing={a.lower() for a in delegation.contacts}
                        <= {r.address for r in refusals.get(delegation.id, [])},
                        held=tuple(held.get(delegation.id, [])),
                    )
                )
            out.append(CampaignStatus(campaign.id, campaign.title, tuple(rows)))
        return out


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"{exc.args[0]!r} is no longer in the configuration"
    return str(exc)
