"""Received mail: attribute each message, read what it brings, record it, plan the follow-up.

:meth:`Intake.analyse` decides (no writes: ``inspect`` uses it as a dry run);
:meth:`Intake.record` writes one message's outcome in one transaction (the
message row, its attachments, the answers, the state change, the follow-up
email), which is what makes a message processed; :meth:`Intake.read_inbox`
walks a mailbox, recording one message at a time in the order received, each
in its own savepoint of a batch transaction so one bad message never stops the
others, and moves what was processed once the store has committed it. With
many messages, the next ones' workbooks are read meanwhile in a reader process
(:mod:`mailflow.reader`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from mailflow import inbound, reasons
from mailflow.config import Campaign, Config, Delegation
from mailflow.errors import MailflowError, StoreError
from mailflow.mailbox import Fetched, Mailbox, MailboxError
from mailflow.reader import InlineReader, Job, Pending, ProcessReader, Reader, process_reader_available
from mailflow.render import make_message_id, parse_subject_reference
from mailflow.returns import (
    STATUS_IGNORED,
    STATUS_PARSED,
    STATUS_REJECTED,
    STATUS_UNREADABLE,
    ReturnLimits,
    ReturnReading,
    read_return,
    sniff_format,
)
from mailflow.store import DelegationState, InboundRow, OutboxStatus, Store
from mailflow.workbook import MasterLayout, read_fingerprint, verify_fingerprint

if TYPE_CHECKING:
    from mailflow.engine import Engine

log = logging.getLogger("mailflow")

RECEIPT = "receipt"
MISSING = "missing"
UNREADABLE = "unreadable"
FOLLOW_UP_KINDS = (RECEIPT, MISSING, UNREADABLE)

# What became of a received message.
APPLIED = "applied"  # a reply whose answers (if any) were recorded and answered
HELD = "held"  # a reply from an untrusted sender, kept for the Secretariat's review
AUTO_REPLY = "auto_reply"
BOUNCE = "bounce"
UNRELATED = "unrelated"  # not about any campaign: left in the inbox, remembered
DUPLICATE = "duplicate"  # the same message seen again (e.g. after a UIDVALIDITY change)
TOO_LARGE = "too_large"
FAILED = "failed"  # processing raised: kept with the reason, for an operator to re-run
MOVABLE = frozenset({APPLIED, HELD, AUTO_REPLY, BOUNCE})
MAX_ROW_CHANGES = 200  # rows added, deleted or changed outside the fill column recorded per reply, of each kind
COMMIT_EVERY = 50  # received messages recorded in one store transaction (each in its own savepoint)
COMMIT_SECONDS = 2.0  # ... or as many as were recorded in this time, whichever comes first
LOOKAHEAD = 16  # messages started (parsed, workbooks handed to the reader process) before they are recorded
LOOKAHEAD_BYTES = 32 * 1024 * 1024  # ... and at most this many bytes of them
PROCESS_READER_FROM = 8  # a pass with fewer new messages reads its workbooks in this process
INTAKE_PASS_KEY = "intake_pass"  # meta: "" (no pass running), "running", or the message being read after a crash
PASS_RUNNING = "running"

NO_WORKBOOK_REASON = {
    "es": "no encontramos un libro de Excel adjunto ni respuestas en el texto del mensaje",
    "en": "we found no workbook attached and no answers in the text of the message",
}


@dataclass(frozen=True)
class AttachmentResult:
    """One attachment and what reading it gave."""

    attachment: inbound.Attachment
    status: str
    reason: str | None
    sha256: str
    reading: ReturnReading | None = None
    duplicate_of: int | None = None
    reason_code: str | None = None
    """The :mod:`mailflow.reasons` code of ``reason`` (the reading's, or the intake's own)."""
    reason_params: Mapping[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        reading = self.reading
        return {
            "filename": self.attachment.filename,
            "status": self.status,
            "reason": self.reason,
            "reason_code": self.reason_code,
            "filled": dict(reading.answers) if reading else {},
            "missing": list(reading.missing) if reading else [],
            "added": [c.key for c in reading.added] if reading else [],
            "deleted": [c.key for c in reading.deleted] if reading else [],
            "changed": [
                {"key": c.key, "column": c.column, "before": c.before, "after": c.after} for c in reading.changed
            ]
            if reading
            else [],
            "sha256": self.sha256,
            "duplicate": self.duplicate_of is not None,
        }


@dataclass(frozen=True)
class Analysis:
    """Everything mailflow concludes about one received message, before writing anything."""

    raw_sha256: str
    message: inbound.Message
    kind: str
    campaign: Campaign | None
    delegation: Delegation | None
    evidence: str
    trusted: bool | None
    outcome: str
    reason: str | None
    attachments: tuple[AttachmentResult, ...] = ()
    body_answers: Mapping[str, str] = field(default_factory=dict)
    answers: Mapping[str, str] = field(default_factory=dict)  # what this message would record
    follow_up: str | None = None
    follow_up_reason: str | None = None
    reason_code: str | None = None
    """The :mod:`mailflow.reasons` code of ``reason``, when it has one."""
    reason_params: Mapping[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The contract's ``inspect --json`` shape, with a few extra keys."""
        return {
            "kind": self.kind,
            "delegation": self.delegation.id if self.delegation else None,
            "campaign": self.campaign.id if self.campaign else None,
            "sender_trusted": self.trusted,
            "attachments": [a.as_json() for a in self.attachments],
            "evidence": self.evidence or None,
            "outcome": self.outcome,
            "reason": self.reason,
            "reason_code": self.reason_code,
            "from": self.message.from_address,
            "subject": self.message.subject,
            "message_id": self.message.message_id,
            "authentication": self.message.auth.summary or None,
            "body_answers": dict(self.body_answers),
            "answers": dict(self.answers),
            "failures": [
                {"recipient": f.recipient, "status": f.status, "permanent": f.permanent, "diagnostic": f.diagnostic}
                for f in self.message.failures
            ],
            "follow_up": self.follow_up,
            "problems": list(self.message.problems),
        }


@dataclass
class IntakeReport:
    """What one read of the inbox did."""

    read: int = 0
    recorded: list[int] = field(default_factory=list)
    by_outcome: dict[str, int] = field(default_factory=dict)
    moved: int = 0
    failed: int = 0
    error: str | None = None


@dataclass(frozen=True)
class _File:
    """An attachment on its way: what it is already known to be, or its reading to come."""

    attachment: inbound.Attachment
    digest: str
    outcome: AttachmentResult | Pending


@dataclass(frozen=True)
class _Reply:
    """A reply attributed to a delegation, its workbooks being read."""

    digest: str
    message: inbound.Message
    campaign: Campaign
    delegation: Delegation
    evidence: str
    trusted: bool
    layout: MasterLayout
    files: list[_File]


@dataclass(frozen=True)
class _Prepared:
    """:meth:`Intake._prepare`'s result: a finished analysis, or a reply to conclude."""

    done: Analysis | None
    reply: _Reply | None = None


WORKBOOK_SUFFIXES = (".xlsx", ".xlsm", ".xls", ".ods")


def looks_like_workbook(data: bytes, filename: str) -> bool:
    """For ``inspect``: a bare workbook rather than an email."""
    name = filename.lower()
    if name.endswith((".eml", ".msg", ".txt", ".mbox")):
        return False
    return name.endswith(WORKBOOK_SUFFIXES) or sniff_format(data, filename) != "unknown"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class _Started:
    """A fetched message on its way to the store: parsed and prepared, or what stopped that."""

    fetched: Fetched
    message: inbound.Message | None = None
    prepared: _Prepared | None = None
    error: Exception | None = None
    quarantine: bool = False
    """The message an interrupted pass was reading: set aside, not read again."""


class _Ahead:
    """The fetched messages, each started up to ``depth`` messages before it is recorded.

    Starting a message (:meth:`Intake._start`) hands its workbooks to the
    reader, which reads them while the messages before it are recorded. At
    most :data:`LOOKAHEAD_BYTES` of messages wait, started, at a time (one at least). A
    mailbox failure is raised once the messages fetched before it are taken."""

    def __init__(self, messages: Iterator[Fetched], start: Callable[[Fetched], _Started], depth: int) -> None:
        self.messages = messages
        self.start = start
        self.depth = max(depth, 1)
        self.waiting: deque[_Started] = deque()
        self.bytes = 0
        self.failure: MailboxError | None = None
        self.exhausted = False

    def next(self) -> _Started | None:
        self._fill()
        if self.waiting:
            begun = self.waiting.popleft()
            self.bytes -= len(begun.fetched.raw)
            return begun
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure
        return None

    def _fill(self) -> None:
        while (
            not self.exhausted and len(self.waiting) < self.depth and (not self.waiting or self.bytes < LOOKAHEAD_BYTES)
        ):
            try:
                fetched = next(self.messages, None)
            except MailboxError as exc:
                self.failure, self.exhausted = exc, True
                return
            if fetched is None:
                self.exhausted = True
                return
            self.waiting.append(self.start(fetched))
            self.bytes += len(fetched.raw)


class Intake:
    """Turns received messages into records and follow-ups for one engine (config, store, clock)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.config: Config = engine.config
        self.store: Store = engine.store
        limits = self.config.inbound
        self.message_limits = inbound.Limits(
            max_message_bytes=limits.max_message_bytes, max_attachment_bytes=limits.max_attachment_bytes
        )
        self.return_limits = ReturnLimits(
            max_file_bytes=limits.max_attachment_bytes,
            max_uncompressed_bytes=limits.max_uncompressed_bytes,
            max_compression_ratio=limits.max_compression_ratio,
        )
        self.process_reader_from = PROCESS_READER_FROM
        """Fewest new messages for which a pass reads workbooks in a reader process."""
        self.make_process_reader: Callable[[], ProcessReader] = ProcessReader
        """Makes the reader process of a pass with many messages (tests give one that fails)."""
        self._contacts: dict[str, str] = {
            address.lower(): d.id for d in self.config.delegations for address in d.contacts
        }

    # -- deciding -----------------------------------------------------------

    def analyse(
        self, raw: bytes, *, campaign_hint: str | None = None, message: inbound.Message | None = None
    ) -> Analysis:
        """What this message is, who sent it about what, and what it would record. Writes nothing.

        ``message`` is ``raw`` already parsed, when the caller has it."""
        return self._conclude(self._prepare(raw, message, campaign_hint, InlineReader()))

    def _prepare(
        self, raw: bytes, message: inbound.Message | None, campaign_hint: str | None, reader: Reader
    ) -> _Prepared:
        """The part of :meth:`analyse` that depends on no other message: kind, attribution, trust, and each
        workbook handed to ``reader``. :meth:`_conclude` finishes it, in the order messages are recorded."""
        message = message or inbound.parse_message(raw, self.message_limits)
        digest = sha256(raw)
        campaign, delegation, evidence = self._attribute(message, campaign_hint)
        if campaign is None or delegation is None:
            return _Prepared(
                Analysis(
                    digest,
                    message,
                    inbound.KIND_UNRELATED,
                    None,
                    None,
                    evidence,
                    None,
                    UNRELATED,
                    "not about any campaign: left in the inbox for a person",
                )
            )
        trusted = self._trusted(message, delegation)
        if message.kind == inbound.KIND_BOUNCE:
            failed = ", ".join(f"{f.recipient} {f.status}" for f in message.failures) or "no recipient named"
            # Anyone can write a delivery report: only one that returns an email we sent marks a contact.
            verified = evidence.startswith("in reply to")
            code, params = (None, {}) if verified else (reasons.HELD_FORGED_BOUNCE, {"failed": failed})
            return _Prepared(
                Analysis(
                    digest,
                    message,
                    inbound.KIND_BOUNCE,
                    campaign,
                    delegation,
                    evidence,
                    trusted,
                    BOUNCE if verified else HELD,
                    f"delivery failure: {failed}" if code is None else reasons.explain(code, params),
                    reason_code=code,
                    reason_params=params,
                )
            )
        if message.kind == inbound.KIND_AUTO_REPLY:
            return _Prepared(
                Analysis(
                    digest,
                    message,
                    inbound.KIND_AUTO_REPLY,
                    campaign,
                    delegation,
                    evidence,
                    trusted,
                    AUTO_REPLY,
                    message.kind_reason,
                )
            )
        layout = self.engine.layout(campaign)
        files = [self._hand_over(attachment, campaign, layout, reader) for attachment in message.attachments]
        return _Prepared(None, _Reply(digest, message, campaign, delegation, evidence, trusted, layout, files))

    def _conclude(self, prepared: _Prepared) -> Analysis:
        """:meth:`analyse`'s conclusion: the readings, the answers and the follow-up (which reads the store)."""
        if prepared.done is not None:
            return prepared.done
        reply = prepared.reply
        assert reply is not None
        message, campaign, delegation, layout = reply.message, reply.campaign, reply.delegation, reply.layout
        results = tuple(self._attachment_result(file, campaign, delegation) for file in reply.files)
        parsed = [r.reading for r in results if r.reading is not None and r.status == STATUS_PARSED]
        answers: dict[str, str] = {}
        for reading in parsed:
            answers.update(reading.answers)
        # Answers in the body count only when no workbook could be read.
        body = {} if parsed else inbound.body_answers(message.body_text, layout.keys)
        answers.update(body)
        follow_up: str | None = None
        follow_reason: str | None = None
        code: str | None = None  # why the message is held, if it is (a mailflow.reasons code)
        params: dict[str, str] = {}
        if not reply.trusted and not self.config.inbound.accept_untrusted:
            code, params = self._distrust_reason(message, delegation)
        else:
            follow_up, follow_reason = self._follow_up(campaign, delegation, results, answers, layout)
        return Analysis(
            reply.digest,
            message,
            inbound.KIND_REPLY,
            campaign,
            delegation,
            reply.evidence,
            reply.trusted,
            APPLIED if code is None else HELD,
            None if code is None else reasons.explain(code, params),
            results,
            body,
            answers,
            follow_up,
            follow_reason,
            reason_code=code,
            reason_params=params,
        )

    def analyse_workbook(self, data: bytes, filename: str, campaign_hint: str | None = None) -> dict[str, Any]:
        """``inspect`` of a bare workbook: whose it is (by its fingerprint) and what it answers."""
        fingerprint = read_fingerprint(data)
        campaign: Campaign | None = None
        delegation: Delegation | None = None
        evidence = ""
        if fingerprint is not None and verify_fingerprint(fingerprint, self.engine.secret):
            found = self._pair(fingerprint.campaign, fingerprint.delegation)
            if found:
                campaign, delegation = found
                evidence = "workbook fingerprint"
        if campaign is None:
            candidates = [c for c in self.config.campaigns if campaign_hint in (None, c.id)]
            if len(candidates) != 1:
                known = ", ".join(c.id for c in self.config.campaigns)
                raise MailflowError(
                    f"{filename} carries no fingerprint of ours: name the campaign with --campaign ({known})"
                )
            campaign = candidates[0]
        layout = self.engine.layout(campaign)
        reading = read_return(data, filename, layout, campaign.key_column, campaign.fill_column, self.return_limits)
        attachment = inbound.Attachment(
            filename=filename,
            content_type="application/octet-stream",
            data=data,
            size=len(data),
            too_large=False,
            path="1",
            is_workbook=True,
        )
        result = AttachmentResult(attachment, reading.status, reading.reason, sha256(data), reading)
        return {
            "kind": inbound.KIND_REPLY,
            "delegation": delegation.id if delegation else None,
            "campaign": campaign.id,
            "sender_trusted": None,
            "attachments": [result.as_json()],
            "evidence": evidence or None,
        }

    def _attribute(
        self, message: inbound.Message, campaign_hint: str | None
    ) -> tuple[Campaign | None, Delegation | None, str]:
        """Campaign and delegation, in the order of evidence of the issue: thread, subject, fingerprint, sender."""
        if message.kind == inbound.KIND_BOUNCE:
            thread = [m for m in (message.original_message_id, *message.original_references) if m]
        else:
            thread = [*message.in_reply_to, *message.references]
        if thread:
            sent = self.store.sent_message_ids(thread)
            for message_id in thread:
                if message_id in sent:
                    if not sent[message_id][0]:
                        # An answer to a meeting notice or a digest: not a return for any campaign.
                        return None, None, f"in reply to {message_id}, which belongs to no campaign"
                    found = self._pair(*sent[message_id])
                    if found:
                        return found[0], found[1], f"in reply to {message_id}"
        if any(a.content_type.startswith("text/calendar") for a in message.attachments):
            return None, None, "a calendar answer (accepted, declined), not a return"
        reference = parse_subject_reference(message.subject)
        if reference is not None:
            ref, delegation_id = reference
            for campaign in self.config.campaigns:
                if campaign.ref == ref and delegation_id in campaign.delegations:
                    return campaign, self.config.delegation(delegation_id), "reference in the subject"
        for attachment in message.attachments:
            if not attachment.is_workbook or not attachment.data:
                continue
            fingerprint = read_fingerprint(attachment.data)
            if fingerprint is not None and verify_fingerprint(fingerprint, self.engine.secret):
                found = self._pair(fingerprint.campaign, fingerprint.delegation)
                if found:
                    return found[0], found[1], f"workbook fingerprint in {attachment.filename}"
        addresses: list[str] = []
        if message.kind == inbound.KIND_BOUNCE:
            addresses = [f.recipient for f in message.failures] + list(message.original_recipients)
        elif message.from_address:
            addresses = [message.from_address]
        for address in addresses:
            owner = self._contacts.get(address.lower())
            if owner is None:
                continue
            chosen = self._campaign_for(owner, campaign_hint)
            if chosen is not None:
                return chosen, self.config.delegation(owner), f"sender address {address}"
        return None, None, ""

    def _pair(self, campaign_id: str, delegation_id: str) -> tuple[Campaign, Delegation] | None:
        try:
            campaign = self.config.campaign(campaign_id)
            delegation = self.config.delegation(delegation_id)
        except KeyError:
            return None
        return (campaign, delegation) if delegation_id in campaign.delegations else None

    def _campaign_for(self, delegation_id: str, hint: str | None) -> Campaign | None:
        candidates = [c for c in self.config.campaigns if delegation_id in c.delegations]
        if hint:
            candidates = [c for c in candidates if c.id == hint] or candidates
        if len(candidates) == 1:
            return candidates[0]
        latest = self.store.latest_request_campaign(delegation_id)
        return next((c for c in candidates if c.id == latest), None)

    def _trusted(self, message: inbound.Message, delegation: Delegation) -> bool:
        listed = {a.lower() for a in delegation.contacts}
        return bool(message.from_address) and message.from_address in listed and not message.auth.failing

    def _distrust_reason(self, message: inbound.Message, delegation: Delegation) -> tuple[str, dict[str, str]]:
        """Why a reply is held: a :mod:`mailflow.reasons` code and its parameters."""
        if not message.from_address:
            return reasons.HELD_NO_SENDER, {}
        if message.from_address not in {a.lower() for a in delegation.contacts}:
            return reasons.HELD_NOT_LISTED, {"sender": message.from_address, "delegation": delegation.name}
        return reasons.HELD_AUTHENTICATION, {"checks": ", ".join(message.auth.failing)}

    def _hand_over(
        self, attachment: inbound.Attachment, campaign: Campaign, layout: MasterLayout, reader: Reader
    ) -> _File:
        """One attachment: what it is at once (not a workbook, too large), or its workbook handed to ``reader``."""
        digest = sha256(attachment.data)
        if not attachment.is_workbook:
            return _File(attachment, digest, AttachmentResult(attachment, STATUS_IGNORED, "not a workbook", digest))
        if attachment.too_large:
            limit = {"limit": str(self.config.inbound.max_attachment_bytes // (1024 * 1024))}
            refused = AttachmentResult(
                attachment,
                STATUS_REJECTED,
                reasons.explain(reasons.ATTACHMENT_TOO_LARGE, limit),
                digest,
                reason_code=reasons.ATTACHMENT_TOO_LARGE,
                reason_params=limit,
            )
            return _File(attachment, digest, refused)
        job = Job(
            attachment.data, attachment.filename, layout, campaign.key_column, campaign.fill_column, self.return_limits
        )
        return _File(attachment, digest, reader.submit(job))

    def _attachment_result(self, file: _File, campaign: Campaign, delegation: Delegation) -> AttachmentResult:
        if isinstance(file.outcome, AttachmentResult):
            return file.outcome
        reading = file.outcome.result()
        duplicate = self.store.attachment_seen(campaign.id, delegation.id, file.digest)
        return AttachmentResult(
            file.attachment,
            reading.status,
            reading.reason,
            file.digest,
            reading,
            duplicate,
            reason_code=reading.reason_code,
            reason_params=reading.reason_params,
        )

    def _follow_up(
        self,
        campaign: Campaign,
        delegation: Delegation,
        results: Sequence[AttachmentResult],
        answers: Mapping[str, str],
        layout: MasterLayout,
    ) -> tuple[str, str | None]:
        current = dict(self.store.current_answers(campaign.id, delegation.id).get(delegation.id, {}))
        current.update(answers)
        if all(current.get(key) for key in layout.keys):
            return RECEIPT, None
        if answers or any(r.status == STATUS_PARSED for r in results):
            return MISSING, None
        failed = [r for r in results if r.status in (STATUS_UNREADABLE, STATUS_REJECTED)]
        if failed:
            return UNREADABLE, "; ".join(f"{r.attachment.filename}: {r.reason}" for r in failed)
        return UNREADABLE, NO_WORKBOOK_REASON[delegation.language]

    # -- recording ----------------------------------------------------------

    def record(self, analysis: Analysis, *, folder: str, uidvalidity: int, uid: int, raw: bytes, now: datetime) -> int:
        """Write one message's outcome, its answers, the state change and the follow-up, in one transaction."""
        message = analysis.message
        campaign, delegation = analysis.campaign, analysis.delegation
        with self.store.transaction():
            inbound_id = self.store.add_inbound(
                folder=folder,
                uidvalidity=uidvalidity,
                uid=uid,
                message_id=message.message_id,
                sha256=analysis.raw_sha256,
                size=len(raw),
                received_at=now,
                from_address=message.from_address,
                subject=message.subject,
                kind=analysis.kind,
                campaign=campaign.id if campaign else "",
                delegation=delegation.id if delegation else "",
                evidence=analysis.evidence,
                trusted=analysis.trusted,
                outcome=analysis.outcome,
                reason=analysis.reason,
                raw=raw,
                reason_code=analysis.reason_code,
                reason_params=analysis.reason_params,
            )
            self.store.record_event(
                now,
                f"received_{analysis.outcome}",
                f"{analysis.kind} from {message.from_address or 'unknown sender'}: {message.subject[:120]}"
                + (f" ({analysis.reason})" if analysis.reason else ""),
                campaign=campaign.id if campaign else "",
                delegation=delegation.id if delegation else "",
                detail={"inbound_id": inbound_id, "evidence": analysis.evidence},
            )
            if campaign is None or delegation is None:
                return inbound_id
            attachment_ids = self._record_attachments(analysis, inbound_id)
            if analysis.outcome == BOUNCE:
                self._record_bounce(analysis, delegation, inbound_id, now)
            elif analysis.outcome == APPLIED:
                self._apply(analysis, campaign, delegation, inbound_id, attachment_ids, now)
        return inbound_id

    def _record_attachments(self, analysis: Analysis, inbound_id: int) -> dict[int, int]:
        ids: dict[int, int] = {}
        for index, result in enumerate(analysis.attachments):
            ids[index] = self.store.add_attachment(
                inbound_id,
                filename=result.attachment.filename,
                content_type=result.attachment.content_type,
                sha256=result.sha256,
                size=result.attachment.size,
                status=result.status,
                reason=result.reason,
                filled=len(result.reading.answers) if result.reading else 0,
                duplicate_of=result.duplicate_of,
                reason_code=result.reason_code,
                reason_params=result.reason_params,
            )
        return ids

    def _record_bounce(self, analysis: Analysis, delegation: Delegation, inbound_id: int, now: datetime) -> None:
        for failure in analysis.message.failures:
            owner = self._contacts.get(failure.recipient, delegation.id)
            if failure.permanent:
                self.store.record_refusal(
                    failure.recipient, owner, None, f"{failure.status} {failure.diagnostic}", now, None, source="bounce"
                )
                self.store.record_event(
                    now,
                    "contact_bouncing",
                    f"{failure.recipient} bounced: {failure.status} {failure.diagnostic}",
                    campaign=analysis.campaign.id if analysis.campaign else "",
                    delegation=owner,
                    detail={"address": failure.recipient, "status": failure.status, "inbound_id": inbound_id},
                )
            else:
                self.store.record_event(
                    now,
                    "delivery_delayed",
                    f"{failure.recipient} delayed: {failure.status} {failure.diagnostic}",
                    campaign=analysis.campaign.id if analysis.campaign else "",
                    delegation=owner,
                    detail={"address": failure.recipient, "status": failure.status, "inbound_id": inbound_id},
                )

    def _apply(
        self,
        analysis: Analysis,
        campaign: Campaign,
        delegation: Delegation,
        inbound_id: int,
        attachment_ids: Mapping[int, int],
        now: datetime,
    ) -> None:
        changed = 0
        for index, result in enumerate(analysis.attachments):
            reading = result.reading
            if reading is None or result.status != STATUS_PARSED or result.duplicate_of is not None:
                continue
            changed += self.store.set_answers(
                campaign.id,
                delegation.id,
                reading.answers,
                source="workbook",
                inbound_id=inbound_id,
                attachment_id=attachment_ids[index],
                at=now,
            )
            for kind, changes in (("added", reading.added), ("deleted", reading.deleted), ("changed", reading.changed)):
                if len(changes) > MAX_ROW_CHANGES:
                    # A sheet rebuilt by the delegation: the first ones tell enough, and the digest stays small.
                    self.store.add_row_change(
                        campaign.id,
                        delegation.id,
                        inbound_id,
                        key="…",
                        change=kind,
                        column="",
                        before="",
                        after=f"and {len(changes) - MAX_ROW_CHANGES} more rows {kind}",
                        at=now,
                    )
                for change in changes[:MAX_ROW_CHANGES]:
                    self.store.add_row_change(
                        campaign.id,
                        delegation.id,
                        inbound_id,
                        key=change.key,
                        change=kind,
                        column=change.column,
                        before=change.before,
                        after=change.after,
                        at=now,
                    )
        changed += self.store.set_answers(
            campaign.id,
            delegation.id,
            analysis.body_answers,
            source="body",
            inbound_id=inbound_id,
            attachment_id=None,
            at=now,
        )
        layout = self.engine.layout(campaign)
        current = self.store.current_answers(campaign.id, delegation.id).get(delegation.id, {})
        missing = [key for key in layout.keys if not current.get(key)]
        filled = len(layout.keys) - len(missing)
        state = (
            DelegationState.COMPLETE if not missing else DelegationState.PARTIAL if filled else DelegationState.AWAITING
        )
        self.store.set_state(
            campaign.id,
            delegation.id,
            state=state,
            filled=filled,
            total=len(layout.keys),
            missing=missing,
            at=now,
            reason=f"reply received: {filled}/{len(layout.keys)} answered ({changed} recorded from it)",
            last_reply_at=now,
        )
        if analysis.follow_up is not None and self._follow_up_capped(campaign, delegation, inbound_id, now):
            return
        if analysis.follow_up is not None:
            slot = f"reply:{inbound_id}"
            self.store.add_outbox(
                campaign=campaign.id,
                delegation=delegation.id,
                kind=analysis.follow_up,
                slot=slot,
                message_id=make_message_id(self.config.secretariat.domain, campaign.id, delegation.id, slot),
                status=OutboxStatus.PENDING,
                scheduled_at=now,
                created_at=now,
                inbound_id=inbound_id,
                reason=None,
            )

    def _follow_up_capped(self, campaign: Campaign, delegation: Delegation, inbound_id: int, now: datetime) -> bool:
        """At most ``inbound.max_follow_ups_per_day`` answers a day to one delegation: no mail loop with a
        responder that marks nothing as automatic."""
        cap = self.config.inbound.max_follow_ups_per_day
        sent = self.store.count_outbox(delegation.id, FOLLOW_UP_KINDS, since=now - timedelta(days=1))
        if sent < cap:
            return False
        self.store.record_event(
            now,
            "follow_up_capped",
            f"no answer sent: {sent} already in the last 24 hours (inbound.max_follow_ups_per_day: {cap})",
            campaign=campaign.id,
            delegation=delegation.id,
            detail={"inbound_id": inbound_id},
        )
        log.warning("no follow-up to %s: %s already sent in 24 hours", delegation.id, sent)
        return True

    # -- the mailbox ------------------------------------------------------------

    def read_inbox(self, mailbox: Mailbox, now: datetime) -> IntakeReport:
        """Process every message of the watched folder not yet accounted for; move what was processed."""
        report = IntakeReport()
        try:
            session = mailbox.open()
        except (MailboxError, MailflowError) as exc:
            report.error = str(exc)
            log.error("cannot read the inbox: %s", exc)
            return report
        try:
            folder, validity = session.folder, session.uidvalidity
            previous = self.store.mailbox_state(folder)
            if previous is not None and previous[0] != validity:
                log.warning(
                    "UIDVALIDITY of %s changed (%s -> %s): messages are recognised again by Message-ID and content",
                    folder,
                    previous[0],
                    validity,
                )
                with self.store.transaction():
                    self.store.record_event(now, "uidvalidity_changed", f"{folder}: {previous[0]} -> {validity}")
            known = self.store.known_uids(folder, validity)
            # Recorded before but not moved (a crash, or the folder was missing): move them now.
            to_move = {uid: row.id for uid, row in known.items() if not row.moved and row.outcome in MOVABLE}
            new = [uid for uid in session.uids() if uid not in known]
            if new:
                self._take_all(
                    session.fetch(new, self.config.inbound.max_message_bytes), len(new), now, report, to_move
                )
            if to_move:
                report.moved = self._move(session, to_move)
            with self.store.transaction():
                self.store.set_mailbox_state(folder, validity, now)
        except (MailboxError, StoreError) as exc:
            report.error = str(exc)
            log.error("reading the inbox failed: %s", exc)
        finally:
            session.close()
        return report

    def _take_all(
        self, messages: Iterator[Fetched], count: int, now: datetime, report: IntakeReport, to_move: dict[int, int]
    ) -> None:
        """Record every fetched message (``count`` of them), many in one store transaction, each in its own
        savepoint.

        A batch is committed before anything of it is moved or reported. If the process dies in the
        middle of a batch, what the batch recorded is undone, and the next pass records one message
        per transaction, having first committed which message it is reading: a message that ends the
        process again is then recorded as failed and left for a person, instead of stopping every pass.

        When there are many, the workbooks of the next messages are read in a reader process
        (:mod:`mailflow.reader`) while this one records: each message is parsed, attributed and its
        workbooks handed over up to :data:`LOOKAHEAD` messages ahead, and recorded in order."""
        interrupted = self.store.get_meta(INTAKE_PASS_KEY) or ""
        if interrupted:
            log.warning("the last read of the inbox was interrupted: reading one message at a time")
        else:
            with self.store.transaction():
                self.store.set_meta(INTAKE_PASS_KEY, PASS_RUNNING)
        reader = self._reader(count, careful=bool(interrupted))
        if interrupted:
            ahead = _Ahead(messages, lambda fetched: self._start_carefully(fetched, interrupted, reader), 1)
        else:
            depth = LOOKAHEAD if isinstance(reader, ProcessReader) else 1
            ahead = _Ahead(messages, lambda fetched: self._start(fetched, reader), depth)
        failure: MailboxError | None = None
        more = True
        try:
            while more and failure is None:
                taken: list[tuple[int, str, int]] = []
                if interrupted:
                    more, failure = self._take_batch(ahead, 1, now, taken)
                else:
                    with self.store.transaction():
                        more, failure = self._take_batch(ahead, COMMIT_EVERY, now, taken)
                for uid, outcome, inbound_id in taken:
                    report.read += 1
                    report.recorded.append(inbound_id)
                    report.by_outcome[outcome] = report.by_outcome.get(outcome, 0) + 1
                    if outcome == FAILED:
                        report.failed += 1
                    if outcome in MOVABLE or (outcome == DUPLICATE and self._original_moved(inbound_id)):
                        to_move[uid] = inbound_id
        except StoreError:
            # The store failed, the process did not die: the message in hand is not to blame.
            with contextlib.suppress(StoreError), self.store.transaction():
                self.store.set_meta(INTAKE_PASS_KEY, PASS_RUNNING)
            raise
        finally:
            reader.close()
        with self.store.transaction():
            self.store.set_meta(INTAKE_PASS_KEY, "")
        if failure is not None:
            raise failure

    def _reader(self, count: int, *, careful: bool) -> Reader:
        """Where this pass reads workbooks: beside it when it has many messages, else (and after a crash) here."""
        if careful or count < self.process_reader_from or not process_reader_available():
            return InlineReader()
        log.info("%s new messages: their workbooks are read in a reader process", count)
        reader = self.make_process_reader()
        reader.start()  # it imports while this process fetches and parses (and reads) the first messages
        return reader

    def _take_batch(
        self, ahead: _Ahead, size: int, now: datetime, taken: list[tuple[int, str, int]]
    ) -> tuple[bool, MailboxError | None]:
        """Record up to ``size`` messages: (more may follow, the mailbox's failure if it failed)."""
        started = time.monotonic()
        while len(taken) < size and time.monotonic() - started < COMMIT_SECONDS:
            if self.engine.stop_requested():
                log.info("stopping: the rest of the inbox is read on the next pass")
                return False, None
            try:
                begun = ahead.next()
            except MailboxError as exc:
                return False, exc  # what was recorded is committed; the rest waits for the next pass
            if begun is None:
                return False, None
            outcome, inbound_id = self._finish(begun, now)
            taken.append((begun.fetched.uid, outcome, inbound_id))
        return True, None

    def _start_carefully(self, fetched: Fetched, interrupted: str, reader: Reader) -> _Started:
        """After a crash: commit which message is read before reading it, and set aside the one that was."""
        mark = f"{fetched.folder}/{fetched.uidvalidity}/{fetched.uid}"
        if mark == interrupted:
            return _Started(fetched, quarantine=True)
        with self.store.transaction():  # committed before the message is read
            self.store.set_meta(INTAKE_PASS_KEY, mark)
        return self._start(fetched, reader)

    def _start(self, fetched: Fetched, reader: Reader) -> _Started:
        """Parse a fetched message and prepare its analysis (its workbooks handed to ``reader``); never raises
        for the message's own faults (they are kept for :meth:`_finish`)."""
        if fetched.too_large:
            return _Started(fetched)  # nothing to read
        message: inbound.Message | None = None
        try:
            message = inbound.parse_message(fetched.raw, self.message_limits)
            return _Started(fetched, message, self._prepare(fetched.raw, message, None, reader))
        except StoreError:
            raise
        except Exception as exc:
            return _Started(fetched, message, error=exc)

    def _quarantine(self, fetched: Fetched, now: datetime) -> int:
        log.error("message uid %s of %s: %s", fetched.uid, fetched.folder, reasons.explain(reasons.STOPPED_TWICE, {}))
        return self._record_plain(fetched, now, outcome=FAILED, code=reasons.STOPPED_TWICE, keep_raw=True)

    def _original_moved(self, inbound_id: int) -> bool:
        row = self.store.inbound(inbound_id)
        if row.duplicate_of is None:
            return False
        original = self.store.inbound(row.duplicate_of)
        return original.outcome in MOVABLE

    def _finish(self, begun: _Started, now: datetime) -> tuple[str, int]:
        """Account for one started message, in the order received; never raises for the message's own faults."""
        fetched = begun.fetched
        if begun.quarantine:
            return FAILED, self._quarantine(fetched, now)
        raw = fetched.raw
        if fetched.too_large:
            limit = str(self.config.inbound.max_message_bytes // (1024 * 1024))
            return TOO_LARGE, self._record_plain(
                fetched,
                now,
                outcome=TOO_LARGE,
                code=reasons.MESSAGE_TOO_LARGE,
                params={"size": str(fetched.size), "limit": limit},
                keep_raw=False,
            )
        try:
            message = begun.message
            if message is None:
                raise begun.error or MailflowError("the message was not parsed")
            message_id = message.message_id
            seen = self.store.find_inbound(message_id, sha256(raw))
            if seen is not None:  # its readings, if any, are passed over as the next ones are received
                return DUPLICATE, self._record_plain(
                    fetched,
                    now,
                    outcome=DUPLICATE,
                    reason=f"already processed as message {seen.id}",
                    keep_raw=False,
                    message_id=message_id,
                    seen=seen,
                )
            if begun.error is not None or begun.prepared is None:
                raise begun.error or MailflowError("the message was not analysed")
            analysis = self._conclude(begun.prepared)
            inbound_id = self.record(
                analysis, folder=fetched.folder, uidvalidity=fetched.uidvalidity, uid=fetched.uid, raw=raw, now=now
            )
            log.info(
                "received %s from %s (%s%s): %s",
                analysis.kind,
                analysis.message.from_address,
                analysis.delegation.id if analysis.delegation else "no delegation",
                f", {analysis.evidence}" if analysis.evidence else "",
                analysis.outcome,
            )
            return analysis.outcome, inbound_id
        except StoreError:
            raise  # the store, not the message: stop the pass; the message stays unrecorded and is read again
        except Exception as exc:
            log.error("cannot process message uid %s of %s", fetched.uid, fetched.folder, exc_info=exc)
            return FAILED, self._record_plain(
                fetched,
                now,
                outcome=FAILED,
                code=reasons.PROCESSING_FAILED,
                params={"error": f"{type(exc).__name__}: {exc}"},
                keep_raw=True,
            )

    def _record_plain(
        self,
        fetched: Fetched,
        now: datetime,
        *,
        outcome: str,
        keep_raw: bool,
        reason: str = "",
        code: str | None = None,
        params: Mapping[str, str] | None = None,
        message_id: str | None = None,
        seen: InboundRow | None = None,
    ) -> int:
        """Account for a message that is not analysed: too large, seen before, or failing.

        The reason is ``reason``, or the :mod:`mailflow.reasons` sentence of ``code`` and ``params``."""
        if code is not None:
            reason = reasons.explain(code, params or {})
        with self.store.transaction():
            inbound_id = self.store.add_inbound(
                folder=fetched.folder,
                uidvalidity=fetched.uidvalidity,
                uid=fetched.uid,
                message_id=message_id,
                sha256=sha256(fetched.raw) if fetched.raw else "",
                size=fetched.size or len(fetched.raw),
                received_at=now,
                from_address=seen.from_address if seen else None,
                subject=seen.subject if seen else "",
                kind=seen.kind if seen else inbound.KIND_UNRELATED,
                campaign=seen.campaign if seen else "",
                delegation=seen.delegation if seen else "",
                evidence=seen.evidence if seen else "",
                trusted=seen.trusted if seen else None,
                outcome=outcome,
                reason=reason,
                raw=fetched.raw if keep_raw else None,
                duplicate_of=seen.id if seen else None,
                reason_code=code,
                reason_params=params,
            )
            self.store.record_event(now, f"received_{outcome}", reason, detail={"inbound_id": inbound_id})
        return inbound_id

    def _move(self, session: Any, to_move: Mapping[int, int]) -> int:
        """Move the messages ``to_move`` ({uid: its row}) to the processed folder, and record them as moved."""
        target = self.config.mail.imap.processed_folder if self.config.mail.imap else "mailflow-processed"
        try:
            session.move(sorted(to_move), target)
        except MailboxError as exc:
            log.error("cannot move processed messages to %s (they stay recorded; retried next pass): %s", target, exc)
            return 0
        with self.store.transaction():
            for inbound_id in to_move.values():
                self.store.mark_moved(inbound_id)
        return len(to_move)
