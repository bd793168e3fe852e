"""Text presentation of the status for people (pure: data in, text out)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from mailflow.engine import CampaignStatus
from mailflow.meetings import MeetingStatus

BAR_WIDTH = 10


def progress_bar(filled: int, total: int, width: int = BAR_WIDTH) -> str:
    """``███████░░░ 31/40``: readable in any terminal with UTF-8."""
    ratio = filled / total if total else 0.0
    full = min(width, round(ratio * width))
    return "█" * full + "░" * (width - full) + f" {filled}/{total}"


def _when(moment: datetime | None, tz: ZoneInfo) -> str:
    return moment.astimezone(tz).strftime("%a %d %b %H:%M") if moment else "-"


def format_status_table(campaigns: Sequence[CampaignStatus], tz: ZoneInfo) -> str:
    """One table per campaign; times in the secretariat's time zone."""
    blocks: list[str] = []
    for campaign in campaigns:
        header = ("Delegation", "State", "Progress", "Overdue", "Last reply", "Next reminder", "Notes")
        rows: list[tuple[str, ...]] = []
        for d in campaign.delegations:
            notes = []
            if d.all_contacts_failing:
                notes.append("EVERY CONTACT FAILS")
            if d.refused_contacts:
                notes.append("refused: " + ", ".join(d.refused_contacts))
            if d.held:
                notes.append(f"{len(d.held)} reply(ies) held for review: " + ", ".join(f"#{i}" for i in d.held))
            if d.send_problem:
                notes.append(d.send_problem)
            rows.append(
                (
                    f"{d.name} ({d.id})",
                    d.state.value,
                    progress_bar(d.filled, d.total),
                    "yes" if d.overdue else "",
                    _when(d.last_reply_at, tz),
                    _when(d.next_reminder_at, tz),
                    "; ".join(notes),
                )
            )
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        lines = [f"{campaign.title} [{campaign.id}] — times in {tz.key}"]
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
        lines.append("  ".join("-" * w for w in widths))
        lines.extend("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
        complete = sum(1 for d in campaign.delegations if d.state.value == "complete")
        lines.append(f"{complete} of {len(campaign.delegations)} delegations complete")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) if blocks else "no campaigns configured"


def format_meetings_table(meetings: Sequence[MeetingStatus], tz: ZoneInfo) -> str:
    """Upcoming meetings, and for each who is invited and whether their notice went out; secretariat time."""
    blocks: list[str] = []
    for meeting in meetings:
        start, end = meeting.start.astimezone(tz), meeting.end.astimezone(tz)
        facts = [f"{_when(start, tz)}–{end:%H:%M}"]
        if meeting.cancelled:
            facts.append("CANCELLED")
        elif not meeting.announced:
            facts.append("not announced yet")
        else:
            facts.append(f"version {meeting.sequence}")
        if meeting.next_reminder_at:
            facts.append(f"next reminder {_when(meeting.next_reminder_at, tz)}")
        lines = [f"Meeting: {meeting.title} [{meeting.id}] — {'; '.join(facts)} ({tz.key})"]
        header = ("Invited", "Email", "Status", "Sent", "Notes")
        rows = [
            (
                i.name if i.name == i.id or i.id.startswith("extra:") else f"{i.name} ({i.id})",
                i.what or "-",
                i.status,
                _when(i.sent_at, tz),
                i.error or "",
            )
            for i in meeting.invitees
        ]
        widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
        lines.append("  ".join("-" * w for w in widths))
        lines.extend("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
        reached = sum(1 for i in meeting.invitees if i.status == "sent")
        lines.append(f"{reached} of {len(meeting.invitees)} invited reached")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) if blocks else "no upcoming meetings"


def format_inspection(result: Mapping[str, Any]) -> str:
    """``inspect`` for people: what mailflow would record and reply."""
    lines = [
        f"kind:        {result.get('kind')}",
        f"campaign:    {result.get('campaign') or '-'}",
        f"delegation:  {result.get('delegation') or '-'}"
        + (f"  ({result['evidence']})" if result.get("evidence") else ""),
        f"trusted:     {result.get('sender_trusted')}",
    ]
    if result.get("from"):
        lines.append(f"from:        {result['from']}")
    if result.get("outcome"):
        lines.append(f"outcome:     {result['outcome']}" + (f" — {result['reason']}" if result.get("reason") else ""))
    for failure in result.get("failures") or []:
        kind = "permanent" if failure["permanent"] else "delayed"
        lines.append(f"failed:      {failure['recipient']} {failure['status']} ({kind}) {failure['diagnostic']}")
    for attachment in result.get("attachments") or []:
        lines.append(
            f"attachment:  {attachment['filename'] or '(no name)'}: {attachment['status']}"
            + (f" — {attachment['reason']}" if attachment.get("reason") else "")
        )
        if attachment.get("filled") or attachment.get("missing"):
            lines.append(
                f"             {len(attachment['filled'])} answered, missing: "
                + (", ".join(attachment["missing"]) or "none")
            )
    if result.get("body_answers"):
        lines.append(f"body:        {len(result['body_answers'])} answer(s) in the text")
    if "follow_up" in result:
        lines.append(f"would reply: {result.get('follow_up') or 'nothing'}")
    return "\n".join(lines)
