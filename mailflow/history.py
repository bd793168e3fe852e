"""The history of a delegation, and the audit trail of a campaign, for people and for reports.

Three tables of the store tell what happened: the outbox (every email out and
what became of it), the received mail (every message in, its attachments and
its outcome) and the audit trail (``events``: state changes, refusals, retries,
and one line per email sent or message received). :func:`timeline` merges them
into one list of :class:`TimelineEntry`, one entry per fact: an email out is
shown once, from its outbox row, never again from its ``email_sent`` event, and
likewise a received message from its inbound row rather than its ``received_*``
event. Every other event is kept, so nothing of the audit trail is hidden.

Reading is all this module does with the store; the rest is pure: entries in,
text out. Times stay aware UTC in the entries; local time (the secretariat's
zone) is made only when formatting.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from mailflow.config import Config
from mailflow.store import AttachmentRow, Event, InboundRow, OutboxRow, OutboxStatus, Store

OUT = "out"
IN = "in"
STATE = "state"
NOTE = "note"

STATE_CHANGED = "state_changed"

ARROWS = {OUT: "→", IN: "←", STATE: "•", NOTE: "·"}
SUBJECT_WIDTH = 60

HISTORY_FIELDS: tuple[str, ...] = (
    "at",
    "at_local",
    "campaign",
    "delegation",
    "direction",
    "kind",
    "subject",
    "outcome",
    "detail",
    "ref",
)

# The event that records an outbox row's final status: shown through the row, not again on its own.
_OUTBOX_EVENTS = {
    "email_sent": OutboxStatus.SENT,
    "send_failed": OutboxStatus.FAILED,
    "email_skipped": OutboxStatus.SKIPPED,
}
# A short outcome for the events shown as notes (others have none: their reason says it all).
_NOTE_OUTCOMES = {
    "send_retry": "will retry",
    "compose_failed": "will retry",
    "contact_refused": "refused",
    "contact_bouncing": "bouncing",
    "delivery_delayed": "delayed",
    "email_skipped": "skipped",
    "send_failed": "failed",
}
# Spreadsheet apps read a cell starting with one of these as a formula (OWASP, "CSV Injection").
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
# Characters that would let a received subject rewrite the terminal: bidirectional overrides and isolates.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# Sorts entries that no event placed after every event of the same instant.
_LAST = sys.maxsize


@dataclass(frozen=True)
class TimelineEntry:
    """One fact of a delegation's history: an email out, a message in, a state change, or a note."""

    at: datetime  # aware UTC
    direction: str  # out | in | state | note
    kind: str  # email kind (request, reminder, ..., receipt), received kind (reply, ...), state_changed, event kind
    subject: str
    outcome: str  # out: sent | pending | retrying | failed | skipped; in: applied | held | ...; state: "a -> b"
    detail: str  # the reason, the recipients, the attachments: one line
    campaign: str
    delegation: str
    ref: str  # where it is recorded: "outbox:12", "inbound:7", "event:40"

    def as_row(self, tz: ZoneInfo) -> dict[str, str]:
        """The entry as one row of the export, keyed by :data:`HISTORY_FIELDS`."""
        return {
            "at": self.at.astimezone(UTC).isoformat(),
            "at_local": self.at.astimezone(tz).isoformat(sep=" ", timespec="seconds"),
            "campaign": self.campaign,
            "delegation": self.delegation,
            "direction": self.direction,
            "kind": self.kind,
            "subject": self.subject,
            "outcome": self.outcome,
            "detail": self.detail,
            "ref": self.ref,
        }


# -- reading the store ------------------------------------------------------


def timeline(store: Store, campaign: str | None, delegation: str) -> list[TimelineEntry]:
    """Everything that happened between mailflow and one delegation, oldest first.

    ``campaign`` None means every campaign, and also what belongs to none
    (e.g. a message from one of its contacts that named no campaign)."""
    return _merge(
        store,
        store.outbox(campaign=campaign, delegation=delegation),
        store.inbound_rows(campaign=campaign, delegation=delegation),
        store.events(campaign=campaign, delegation=delegation),
    )


def history_rows(store: Store, config: Config, campaign: str) -> list[dict[str, str]]:
    """The whole audit trail of a campaign as rows of :data:`HISTORY_FIELDS`, oldest first.

    Every delegation's timeline, plus what concerns the campaign as a whole:
    emails to the secretariat (digests) of this campaign or of none, and the
    service's own events (e.g. ``uidvalidity_changed``). Messages that belong
    to no campaign (unrelated mail) are left out: they are not this campaign's.
    """
    received = store.inbound_rows(campaign=campaign)
    shown = {row.id for row in received}
    service_events = [
        event
        for event in store.events(campaign="", delegation="")
        if not event.kind.startswith("received_") or _inbound_id(event) in shown
    ]
    entries = _merge(
        store,
        [*store.outbox(campaign=campaign), *store.outbox(campaign="", delegation="")],
        received,
        [*store.events(campaign=campaign), *service_events],
    )
    tz = config.secretariat.tz
    return [entry.as_row(tz) for entry in entries]


def _merge(
    store: Store, outbox: Sequence[OutboxRow], received: Sequence[InboundRow], events: Iterable[Event]
) -> list[TimelineEntry]:
    """One entry per fact, sorted by time; at the same instant, in the order the store recorded them.

    Rows of different tables have no common id, but nearly every one has an
    event written in the same transaction (``email_sent``, ``received_*``),
    and event ids follow the order of writing: so a reply, the state change it
    caused and the follow-up it planned come out in that order even when the
    clock gave all three the same instant."""
    by_outbox = {row.id: row for row in outbox}
    by_inbound = {row.id: row for row in received}
    final_event: dict[int, Event] = {}
    received_event: dict[int, Event] = {}
    notes: list[Event] = []
    seen: set[int] = set()
    for event in sorted(events, key=lambda e: e.id):
        if event.id in seen:
            continue
        seen.add(event.id)
        row = by_outbox.get(event.outbox_id) if event.outbox_id is not None else None
        if row is not None and _OUTBOX_EVENTS.get(event.kind) is row.status:
            final_event[row.id] = event
            continue
        inbound_id = _inbound_id(event)
        if event.kind.startswith("received_") and inbound_id in by_inbound:
            received_event.setdefault(inbound_id, event)
            continue
        notes.append(event)
    keyed: list[tuple[datetime, int, tuple[str, int], TimelineEntry]] = []
    for row in outbox:
        final = final_event.get(row.id)
        entry = _outbox_entry(row, final)
        keyed.append((entry.at, final.id if final else _LAST, ("outbox", row.id), entry))
    for message in received:
        arrival = received_event.get(message.id)
        entry = _inbound_entry(message, store.attachments(message.id))
        keyed.append((entry.at, arrival.id if arrival else _LAST, ("inbound", message.id), entry))
    for event in notes:
        entry = _event_entry(event, by_outbox)
        keyed.append((entry.at, event.id, ("event", event.id), entry))
    keyed.sort(key=lambda item: item[:3])
    return [item[3] for item in keyed]


def _inbound_id(event: Event) -> int | None:
    value = event.detail.get("inbound_id")
    return value if isinstance(value, int) else None


def _outbox_entry(row: OutboxRow, event: Event | None) -> TimelineEntry:
    """An email out, at the moment it was sent (or failed, or was skipped); still pending: when it was planned."""
    at = row.sent_at or (event.at if event else row.created_at)
    parts: list[str] = []
    if row.status is OutboxStatus.SENT:
        outcome = "sent"
        delivered = [address for address in row.recipients if address not in row.refused]
        if delivered:
            parts.append(f"to {', '.join(delivered)}")
        parts.extend(f"refused {address}: {why}" for address, why in row.refused.items())
    else:
        # A pending row with an error is being retried; failed and skipped rows keep their reason there too.
        outcome = "retrying" if row.status is OutboxStatus.PENDING and row.last_error else row.status.value
        parts.append(row.last_error or "")
    if row.inbound_id is not None:
        parts.append(f"in reply to inbound:{row.inbound_id}")
    detail = "; ".join(p for p in parts if p)
    return TimelineEntry(
        at=at,
        direction=OUT,
        kind=row.kind,
        subject=_one_line(row.subject),
        outcome=outcome,
        detail=_one_line(detail),
        campaign=row.campaign,
        delegation=row.delegation,
        ref=f"outbox:{row.id}",
    )


def _inbound_entry(row: InboundRow, attachments: Sequence[AttachmentRow]) -> TimelineEntry:
    parts = [row.reason or "", *(attachment_summary(a) for a in attachments)]
    if row.from_address:
        parts.append(f"from {row.from_address}")
    return TimelineEntry(
        at=row.received_at,
        direction=IN,
        kind=row.kind,
        subject=_one_line(row.subject),
        outcome=row.outcome,
        detail=_one_line("; ".join(p for p in parts if p)),
        campaign=row.campaign,
        delegation=row.delegation,
        ref=f"inbound:{row.id}",
    )


def _event_entry(event: Event, outbox: Mapping[int, OutboxRow]) -> TimelineEntry:
    if event.kind == STATE_CHANGED:
        before, after = event.detail.get("from"), event.detail.get("to")
        direction, outcome, subject = STATE, f"{before or 'none'} -> {after or 'none'}", ""
    else:
        row = outbox.get(event.outbox_id) if event.outbox_id is not None else None
        direction, outcome, subject = NOTE, _NOTE_OUTCOMES.get(event.kind, ""), row.subject if row else ""
    return TimelineEntry(
        at=event.at,
        direction=direction,
        kind=event.kind,
        subject=_one_line(subject),
        outcome=outcome,
        detail=_one_line(event.reason),
        campaign=event.campaign,
        delegation=event.delegation,
        ref=f"event:{event.id}",
    )


def attachment_summary(attachment: AttachmentRow) -> str:
    """``Plan.xlsx: parsed (38 answers)``: one received file and what became of it."""
    name = attachment.filename or "(no name)"
    if attachment.status == "parsed":
        answers = f"{attachment.filled} answer" + ("" if attachment.filled == 1 else "s")
        if attachment.duplicate_of is not None:
            return f"{name}: parsed ({answers}; the same file as before, counted once)"
        return f"{name}: parsed ({answers})"
    return f"{name}: {attachment.status}" + (f" ({attachment.reason})" if attachment.reason else "")


def _one_line(text: str) -> str:
    """Line breaks, tabs and other control characters of a subject or a reason become single spaces."""
    cleaned = "".join(" " if unicodedata.category(c) == "Cc" else c for c in text)
    return " ".join(cleaned.split())


# -- for people ---------------------------------------------------------------


def format_timeline(entries: Sequence[TimelineEntry], tz: ZoneInfo, *, title: str) -> str:
    """One line per entry, times in ``tz`` (the secretariat's zone), under a header naming ``title`` and the zone.

    ``2017-10-18 10:00  → request   [Ref. …] Plan estratégico  sent — to enlace@pani.example.cr``
    """
    header = f"{title} — times in {tz.key}"
    if not entries:
        return f"{header}\nnothing recorded yet"
    rows: list[tuple[str, str, str, str, str]] = []
    for entry in entries:
        if entry.subject:
            text, rest = entry.subject, " — ".join(p for p in (entry.outcome, entry.detail) if p)
        else:  # a state change or a note: its outcome ("awaiting -> partial") reads in the subject's place
            text, rest = entry.outcome, entry.detail
        rows.append(
            (
                entry.at.astimezone(tz).strftime("%Y-%m-%d %H:%M"),
                ARROWS.get(entry.direction, "?"),
                _terminal(entry.kind),
                _trim(_terminal(text), SUBJECT_WIDTH),
                _terminal(rest),
            )
        )
    kind_width = max(len(r[2]) for r in rows)
    subject_width = max(len(r[3]) for r in rows)
    lines = [header]
    for when, arrow, kind, subject, outcome in rows:
        lines.append(f"{when}  {arrow} {kind.ljust(kind_width)}  {subject.ljust(subject_width)}  {outcome}".rstrip())
    return "\n".join(lines)


def _trim(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def _terminal(text: str) -> str:
    """Text safe to print: no escape sequences or bidirectional overrides taken from a received message."""
    return "".join(c for c in _one_line(text) if c not in _BIDI_CONTROLS)


# -- for reports --------------------------------------------------------------


def spreadsheet_safe(value: str) -> str:
    """A cell a spreadsheet app shows as text, never runs as a formula.

    Excel, LibreOffice and Google Sheets evaluate a CSV cell starting with
    ``=``, ``+``, ``-`` or ``@`` (and, after a leading tab or carriage return,
    what follows) as a formula: a subject chosen by whoever wrote the email
    could then run a command or leak data when the report is opened. As OWASP
    advises ("CSV Injection"), such a cell gets a leading apostrophe, which
    those apps read as "this is text" and do not display. The price: a reader
    of the raw file sees the apostrophe.
    """
    return "'" + value if value.startswith(FORMULA_TRIGGERS) else value


def export_csv(rows: Sequence[Mapping[str, str]]) -> str:
    """The rows as CSV (RFC 4180: CRLF line ends, fields quoted when needed), header first.

    Columns are :data:`HISTORY_FIELDS` (extra keys of a row are ignored); every
    cell goes through :func:`spreadsheet_safe`."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=HISTORY_FIELDS, extrasaction="ignore", lineterminator="\r\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({field: spreadsheet_safe(str(row.get(field, ""))) for field in HISTORY_FIELDS})
    return out.getvalue()


def export_json(rows: Sequence[Mapping[str, str]], *, campaign: str | None = None) -> str:
    """``{"campaign": ..., "events": [...]}``, indented, UTF-8 text as is (no spreadsheet escaping: JSON is data).

    ``campaign`` defaults to the one campaign the rows name (the service's own
    rows name none); null when they name none or several."""
    if campaign is None:
        named = {row.get("campaign", "") for row in rows} - {""}
        campaign = named.pop() if len(named) == 1 else None
    events = [{field: row.get(field, "") for field in HISTORY_FIELDS} for row in rows]
    return json.dumps({"campaign": campaign, "events": events}, ensure_ascii=False, indent=2) + "\n"
