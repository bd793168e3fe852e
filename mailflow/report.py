"""Text presentation of the status for people (pure: data in, text out)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from zoneinfo import ZoneInfo

from mailflow.engine import CampaignStatus

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
            if d.refused_contacts:
                notes.append("refused: " + ", ".join(d.refused_contacts))
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
