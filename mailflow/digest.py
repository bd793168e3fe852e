"""The status digest: what the Secretariat reads to know who has answered what, and what needs a person.

:func:`digest_context` gathers, at a given instant, everything the ``digest``
templates show: the service's health (is anyone still reading the inbox?),
one row per delegation and campaign, what changed since the previous digest,
and the items that need a person. It only reads the store, never the clock
(``now`` is given) and never writes: deciding when a digest is due, rendering
it and sending it belong to the engine.

Every time is written out in the Secretariat's time zone and language, except
the days overdue, which count calendar days in each delegation's own zone (the
deadline ends at midnight there). Texts for people (states, notes, the
attention items, the health warning) are written here in the digest's
language, so the templates stay simple; whatever came from outside (names,
addresses, subjects, reasons, answers) is left as it is, and the HTML template
escapes it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from mailflow.config import Config
from mailflow.errors import TemplateError
from mailflow.render import format_date, format_datetime, zone_label
from mailflow.store import AnswerRow, DelegationState, InboundRow, Refusal, RowChangeRow, Store

if TYPE_CHECKING:  # the engine imports this module to send digests: no import of it at run time
    from mailflow.engine import CampaignStatus, DelegationStatus

STALE_INBOX_DEFAULT = timedelta(hours=2)
"""How long the inbox may go unread before the digest warns (``secretariat.digest.inbox_stale_after``)."""

HEARTBEAT_SEND_PASS = "heartbeat_send_pass_at"
"""Store meta key: when the service last completed a send pass (ISO 8601, written by the service)."""
HEARTBEAT_SERVICE = "heartbeat_service"
"""Store meta key: the service's JSON heartbeat (``started_at``, ``stopped_at``…), written by the service."""

BAR_CELLS_WIDTH = 100
"""Width in pixels of the HTML progress bar: one pixel per percent."""
BAR_FILLED_COMPLETE = "#2e7d32"
BAR_FILLED_OVERDUE = "#c2410c"
BAR_FILLED = "#2563eb"
BAR_EMPTY = "#e5e7eb"
TEXT_BAR_CELLS = 10
"""Width of the text part's bar: ``[######----]``."""

REPLIES_PER_DELEGATION = 10
"""Replies listed per delegation under "changes" before "and N more"."""
ANSWERS_PER_DELEGATION = 30
"""Answers listed per delegation under "changes" before "and N more"."""
ATTENTION_LIMIT = 50
"""Attention items listed before "and N more" (the most urgent kinds come first)."""
ROW_CHANGES_PER_MESSAGE = 10
"""Changes outside the fill column listed per received file before "and N more"."""
VALUE_LIMIT = 120
"""Longest answer, subject or cell text quoted in the digest (characters); longer ones end with "…"."""

# The order of the attention list: what stops answers from arriving at all comes first.
ATTENTION_ORDER = (
    "all_contacts_failing",
    "held",
    "unreadable",
    "rejected",
    "failed",
    "too_large",
    "bounce",
    "refused",
    "row_changes",
)

_STATE_TEXT = {
    "es": {
        DelegationState.COMPLETE: "completo",
        DelegationState.PARTIAL: "parcial",
        DelegationState.AWAITING: "en espera",
        DelegationState.NOT_SENT: "no enviado",
    },
    "en": {
        DelegationState.COMPLETE: "complete",
        DelegationState.PARTIAL: "partial",
        DelegationState.AWAITING: "awaiting reply",
        DelegationState.NOT_SENT: "not sent",
    },
}

# Every sentence the digest writes for people, by language.
_TEXT: dict[str, dict[str, str]] = {
    "es": {
        "day": "día",
        "days": "días",
        "under_a_minute": "menos de 1 min",
        "quoted": "«{text}»",
        "empty_cell": "(celda vacía)",
        "no_subject": "(sin asunto)",
        "unknown_sender": "remitente desconocido",
        "no_name": "(sin nombre)",
        "note_bouncing": "contacto que rebota: {address}",
        "note_refused": "contacto rechazado por el servidor: {address}",
        "note_all_failing": "ningún contacto recibe el correo",
        "note_held_one": "1 respuesta retenida para revisión",
        "note_held_many": "{count} respuestas retenidas para revisión",
        "note_send_problem": "problema de envío: {problem}",
        "what_all_contacts_failing": "Ningún contacto recibe el correo",
        "detail_all_contacts_failing": (
            "Todas las direcciones de {name} rebotan o fueron rechazadas ({addresses}); "
            "corrija sus contactos en la configuración."
        ),
        "what_held": "Respuesta retenida: remitente no verificado",
        "detail_held": "De {sender}: «{subject}». {reason}",
        "what_failed": "Mensaje que no se pudo procesar",
        "what_too_large": "Mensaje demasiado grande (quedó en la bandeja)",
        "what_unreadable": "Archivo ilegible",
        "what_rejected": "Archivo rechazado",
        "detail_file": "{filename}: {reason}",
        "what_bounce": "Rebote: el correo no llegó",
        "what_refused": "Dirección rechazada por el servidor",
        "detail_refusal": "{address}: {reason}",
        "what_row_changes_one": "1 cambio fuera de la columna «{column}»",
        "what_row_changes_many": "{count} cambios fuera de la columna «{column}»",
        "detail_row_changes": "En el archivo recibido el {when}; no se aplicaron.",
        "row_added": "fila {key} añadida: {after}",
        "row_deleted": "fila {key} eliminada: {before}",
        "row_changed": "fila {key}, columna «{column}»: {before} → {after}",
        "more": "… y {count} más",
        "warning_read": (
            "La bandeja de entrada no se ha leído desde el {last} (hace {ago}; se espera al menos cada {limit})."
        ),
        "warning_never": "La bandeja de entrada no se ha leído nunca.",
        "warning_stopped": " El servicio mailflow se detuvo el {stopped}.",
        "warning_tail": (
            " Es posible que el servicio que vigila la bandeja se haya detenido: las respuestas de las "
            "delegaciones no se están leyendo ni registrando. Revise el servicio mailflow y su conexión "
            "con el servidor de correo."
        ),
    },
    "en": {
        "day": "day",
        "days": "days",
        "under_a_minute": "under 1 min",
        "quoted": "“{text}”",
        "empty_cell": "(empty cell)",
        "no_subject": "(no subject)",
        "unknown_sender": "unknown sender",
        "no_name": "(no name)",
        "note_bouncing": "bouncing contact: {address}",
        "note_refused": "contact refused by the server: {address}",
        "note_all_failing": "no contact receives email",
        "note_held_one": "1 reply held for review",
        "note_held_many": "{count} replies held for review",
        "note_send_problem": "sending problem: {problem}",
        "what_all_contacts_failing": "No contact receives email",
        "detail_all_contacts_failing": (
            "Every address of {name} bounces or was refused ({addresses}); correct its contacts in the configuration."
        ),
        "what_held": "Reply held: sender not verified",
        "detail_held": "From {sender}: “{subject}”. {reason}",
        "what_failed": "Message that could not be processed",
        "what_too_large": "Message too large (left in the inbox)",
        "what_unreadable": "Unreadable file",
        "what_rejected": "Rejected file",
        "detail_file": "{filename}: {reason}",
        "what_bounce": "Bounce: the email was not delivered",
        "what_refused": "Address refused by the server",
        "detail_refusal": "{address}: {reason}",
        "what_row_changes_one": "1 change outside the “{column}” column",
        "what_row_changes_many": "{count} changes outside the “{column}” column",
        "detail_row_changes": "In the file received on {when}; not applied.",
        "row_added": "row {key} added: {after}",
        "row_deleted": "row {key} deleted: {before}",
        "row_changed": "row {key}, column “{column}”: {before} → {after}",
        "more": "… and {count} more",
        "warning_read": "The inbox has not been read since {last} ({ago} ago; expected at least every {limit}).",
        "warning_never": "The inbox has never been read.",
        "warning_stopped": " The mailflow service stopped on {stopped}.",
        "warning_tail": (
            " The service that watches the inbox may have stopped: replies from delegations are not being "
            "read or recorded. Check the mailflow service and its connection to the mail server."
        ),
    },
}


def digest_context(
    config: Config,
    store: Store,
    campaigns: Sequence[CampaignStatus],
    *,
    now: datetime,
    since: datetime | None,
    language: str,
    inbox_stale_after: timedelta = STALE_INBOX_DEFAULT,
) -> dict[str, Any]:
    """The context of the ``digest`` templates at ``now``, for the campaigns of ``campaigns`` (``Engine.status``).

    ``since`` is when the previous digest was made (None for the first one):
    "changes" and the one-off attention items are what was recorded strictly
    after it; the first digest lists everything recorded so far (capped).
    Replies held for review and messages that failed are listed in every
    digest for as long as they stay so, flagged ``new`` when they arrived after
    ``since``. Times are written in the Secretariat's zone, in ``language``.

    Keys (every one always present; "text" values are ready to show):

    * ``kind``: ``"digest"``; ``secretariat``: ``{name, address}``; ``language``; ``timezone``: the
      Secretariat's IANA zone, in which every time is written;
    * ``generated_at_text``: ``now`` (``lunes 23 de octubre de 2017, 08:00``);
      ``generated_on_text``: its day alone, for the subject;
    * ``since_text``: when the previous digest was made, or None for the first;
      ``first_digest``: bool;
    * ``health``: ``{last_inbox_read_at_text`` (None: never read),
      ``read_ago_text`` (``3 h 20 min``, None if never read), ``inbox_stale``
      (never read, or read longer ago than ``inbox_stale_after``),
      ``stale_for_text`` (how long unread when stale, else None),
      ``stale_after_text`` (the allowed interval), ``last_sent_at_text``
      (None: nothing sent yet), ``last_send_pass_at_text`` (the service's
      heartbeat, None when absent), ``service_stopped_at_text`` (when the
      service last stopped, if it is not known to have started again, else
      None), ``warning`` (the sentence for the top of the email when stale,
      else None)``}``;
    * ``campaigns``: one per campaign, in order: ``{id, title`` (in
      ``language``), ``deadline_text``, ``complete_count``,
      ``total_delegations``, ``counts`` (``{complete, partial, awaiting,
      not_sent, overdue}``), ``rows``: one per delegation ``{id, name, state``
      (the value: ``complete``…), ``state_text``, ``overdue`` (bool),
      ``overdue_days`` (calendar days since the deadline day in the
      delegation's zone, 0 when not overdue), ``filled``, ``total``,
      ``percent`` (0-100, never 100 before complete nor 0 once something is
      answered), ``bar`` (the HTML bar: cells ``{width, color}`` whose widths
      add up to :data:`BAR_CELLS_WIDTH` pixels; a cell of width 0 is left
      out), ``bar_text`` (``[######----]``), ``last_reply_text`` and
      ``next_reminder_text`` (None when there is none), ``notes`` (list of
      str: bouncing or refused contacts, no contact left, replies held, a
      sending problem)``}}``;
    * ``changes``: campaigns with something new, in order: ``{id, title,
      delegations: [{id, name, state_text, replies`` (``[{at_text,
      from_address, subject, recorded}]``: replies applied, capped at
      :data:`REPLIES_PER_DELEGATION`), ``more_replies``, ``answers``
      (``[{key, value, previous}]``, ``previous`` None for an answer given
      for the first time; one per key with its value before ``since`` and its
      current one; capped at :data:`ANSWERS_PER_DELEGATION`),
      ``more_answers}]}``;
    * ``attention``: items that need a person, most urgent kind first, capped
      at :data:`ATTENTION_LIMIT`: ``{kind`` (one of :data:`ATTENTION_ORDER`),
      ``delegation`` (name, "" when the message could not be attributed),
      ``delegation_id``, ``campaign_id``, ``what``, ``detail``, ``lines`` (a
      sub-list, e.g. each change outside the fill column), ``when_text``,
      ``new`` (bool)``}``; ``attention_more``: how many were left out;
    * ``totals``: over every campaign ``{delegations, complete, partial,
      awaiting, not_sent, overdue}``.
    """
    if language not in _TEXT:
        raise TemplateError(f"unsupported digest language {language!r} (expected one of {', '.join(_TEXT)})")
    for name, moment in (("now", now), ("since", since)):
        if moment is not None and (moment.tzinfo is None or moment.utcoffset() is None):
            raise ValueError(f"digest_context: {name} must be an aware datetime, got {moment!r}")
    secretariat = config.secretariat
    tz = secretariat.tz
    words = _TEXT[language]
    refusals = store.refusals()
    campaign_ids = {c.id for c in campaigns}

    rows_by_campaign = [_campaign(config, c, refusals, now=now, tz=tz, language=language) for c in campaigns]
    totals = {"delegations": 0, "complete": 0, "partial": 0, "awaiting": 0, "not_sent": 0, "overdue": 0}
    for block in rows_by_campaign:
        totals["delegations"] += block["total_delegations"]
        for key, value in block["counts"].items():
            totals[key] += value

    attention = _attention(config, store, campaigns, campaign_ids, refusals, since=since, tz=tz, language=language)
    return {
        "kind": "digest",
        "secretariat": {"name": secretariat.name, "address": secretariat.address},
        "language": language,
        "timezone": tz.key,
        "timezone_label": zone_label(tz, language),
        "generated_at_text": format_datetime(now, tz, language),
        "generated_on_text": format_date(now.astimezone(tz).date(), language),
        "since_text": format_datetime(since, tz, language) if since is not None else None,
        "first_digest": since is None,
        "health": _health(store, now=now, tz=tz, language=language, stale_after=inbox_stale_after, words=words),
        "campaigns": rows_by_campaign,
        "changes": _changes(config, store, campaigns, since=since, tz=tz, language=language),
        "attention": attention[:ATTENTION_LIMIT],
        "attention_more": max(len(attention) - ATTENTION_LIMIT, 0),
        "totals": totals,
    }


# --------------------------------------------------------------------------
# Health
# --------------------------------------------------------------------------


def _health(
    store: Store, *, now: datetime, tz: ZoneInfo, language: str, stale_after: timedelta, words: Mapping[str, str]
) -> dict[str, Any]:
    last_read = store.last_inbox_read_at()
    last_sent = store.last_sent_at()
    send_pass = _meta_time(store.get_meta(HEARTBEAT_SEND_PASS))
    stopped = _service_stopped_at(store.get_meta(HEARTBEAT_SERVICE))
    ago = max(now - last_read, timedelta(0)) if last_read is not None else None
    stale = ago is None or ago > stale_after
    warning = None
    if stale:
        if last_read is None or ago is None:
            warning = words["warning_never"]
        else:
            warning = words["warning_read"].format(
                last=format_datetime(last_read, tz, language),
                ago=duration_text(ago, language),
                limit=duration_text(stale_after, language),
            )
        if stopped is not None:
            warning += words["warning_stopped"].format(stopped=format_datetime(stopped, tz, language))
        warning += words["warning_tail"]
    return {
        "last_inbox_read_at_text": _when(last_read, tz, language),
        "read_ago_text": duration_text(ago, language) if ago is not None else None,
        "inbox_stale": stale,
        "stale_for_text": duration_text(ago, language) if stale and ago is not None else None,
        "stale_after_text": duration_text(stale_after, language),
        "last_sent_at_text": _when(last_sent, tz, language),
        "last_send_pass_at_text": _when(send_pass, tz, language),
        "service_stopped_at_text": _when(stopped, tz, language),
        "warning": warning,
    }


def _meta_time(value: str | None) -> datetime | None:
    """An ISO 8601 instant another part of mailflow wrote in the store's meta table; None if absent or unreadable."""
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _service_stopped_at(value: str | None) -> datetime | None:
    """When the service stopped, from its heartbeat; None when it is running (or it never said)."""
    if not value:
        return None
    try:
        heartbeat = json.loads(value)
    except ValueError:
        return None
    if not isinstance(heartbeat, dict):
        return None
    stopped = _meta_time(heartbeat.get("stopped_at") if isinstance(heartbeat.get("stopped_at"), str) else None)
    started = _meta_time(heartbeat.get("started_at") if isinstance(heartbeat.get("started_at"), str) else None)
    if stopped is None or (started is not None and started > stopped):
        return None
    return stopped


def duration_text(delta: timedelta, language: str) -> str:
    """A length of time as people say it in a status line: ``45 min``, ``3 h 20 min``, ``2 días 4 h``."""
    words = _TEXT[language]
    minutes = int(delta.total_seconds() // 60)
    if minutes < 1:
        return words["under_a_minute"]
    days, rest = divmod(minutes, 24 * 60)
    hours, minutes = divmod(rest, 60)
    if days:
        unit = words["day"] if days == 1 else words["days"]
        return f"{days} {unit} {hours} h" if hours else f"{days} {unit}"
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    return f"{minutes} min"


# --------------------------------------------------------------------------
# One row per delegation
# --------------------------------------------------------------------------


def _campaign(
    config: Config,
    status: CampaignStatus,
    refusals: Mapping[str, Sequence[Refusal]],
    *,
    now: datetime,
    tz: ZoneInfo,
    language: str,
) -> dict[str, Any]:
    try:
        campaign = config.campaign(status.id)
        title, deadline = campaign.title_in(language), campaign.deadline
    except KeyError:  # a status computed from another configuration: show what it knows
        title, deadline = status.title, None
    rows = [_row(config, d, refusals, deadline, now=now, tz=tz, language=language) for d in status.delegations]
    counts = {state.value: 0 for state in DelegationState}
    for d in status.delegations:
        counts[d.state.value] += 1
    return {
        "id": status.id,
        "title": title,
        "deadline_text": format_date(deadline, language) if deadline else "",
        "complete_count": counts[DelegationState.COMPLETE.value],
        "total_delegations": len(status.delegations),
        "counts": {
            "complete": counts[DelegationState.COMPLETE.value],
            "partial": counts[DelegationState.PARTIAL.value],
            "awaiting": counts[DelegationState.AWAITING.value],
            "not_sent": counts[DelegationState.NOT_SENT.value],
            "overdue": sum(1 for d in status.delegations if d.overdue),
        },
        "rows": rows,
    }


def _row(
    config: Config,
    d: DelegationStatus,
    refusals: Mapping[str, Sequence[Refusal]],
    deadline: date | None,
    *,
    now: datetime,
    tz: ZoneInfo,
    language: str,
) -> dict[str, Any]:
    words = _TEXT[language]
    percent = progress_percent(d.filled, d.total, complete=d.state is DelegationState.COMPLETE)
    overdue_days = 0
    if d.overdue:
        try:
            local_today = now.astimezone(config.delegation(d.id).tz).date()
        except KeyError:
            local_today = now.astimezone(tz).date()
        # The deadline ends at midnight after its day: the day after it counts 1, as in the overdue notices.
        last_day = deadline if deadline is not None else (d.deadline_at - timedelta(seconds=1)).date()
        overdue_days = max((local_today - last_day).days, 1)
    color = (
        BAR_FILLED_COMPLETE if d.state is DelegationState.COMPLETE else BAR_FILLED_OVERDUE if d.overdue else BAR_FILLED
    )
    bar = [
        {"width": width, "color": cell_color}
        for width, cell_color in ((percent, color), (BAR_CELLS_WIDTH - percent, BAR_EMPTY))
        if width > 0
    ]
    full = percent * TEXT_BAR_CELLS // 100
    notes: list[str] = []
    sources = {r.address: r.source for r in refusals.get(d.id, ())}
    for address in d.refused_contacts:
        key = "note_bouncing" if sources.get(address) == "bounce" else "note_refused"
        notes.append(words[key].format(address=address))
    if d.all_contacts_failing:
        notes.append(words["note_all_failing"])
    if d.held:
        notes.append(words["note_held_one"] if len(d.held) == 1 else words["note_held_many"].format(count=len(d.held)))
    if d.send_problem:
        notes.append(words["note_send_problem"].format(problem=_clip(d.send_problem, VALUE_LIMIT)))
    return {
        "id": d.id,
        "name": d.name,
        "state": d.state.value,
        "state_text": _STATE_TEXT[language][d.state],
        "overdue": d.overdue,
        "overdue_days": overdue_days,
        "filled": d.filled,
        "total": d.total,
        "percent": percent,
        "bar": bar,
        "bar_text": "[" + "#" * full + "-" * (TEXT_BAR_CELLS - full) + "]",
        "last_reply_text": _when(d.last_reply_at, tz, language),
        "next_reminder_text": _when(d.next_reminder_at, tz, language),
        "notes": notes,
    }


def progress_percent(filled: int, total: int, *, complete: bool = False) -> int:
    """Answered share as a whole percent, rounded down: 100 only when all is answered, 1 once anything is."""
    if total <= 0:
        return 100 if complete else 0
    if filled >= total:
        return 100
    if filled <= 0:
        return 0
    return min(max(filled * 100 // total, 1), 99)


# --------------------------------------------------------------------------
# What changed since the previous digest
# --------------------------------------------------------------------------


def _changes(
    config: Config,
    store: Store,
    campaigns: Sequence[CampaignStatus],
    *,
    since: datetime | None,
    tz: ZoneInfo,
    language: str,
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for status in campaigns:
        replies: dict[str, list[InboundRow]] = {}
        for row in store.inbound_rows(campaign=status.id, outcome="applied"):
            if _after(row.received_at, since) and row.delegation:
                replies.setdefault(row.delegation, []).append(row)
        if not replies:
            continue
        delegations: list[dict[str, Any]] = []
        for d in status.delegations:
            received = replies.get(d.id)
            if not received:
                continue
            history = store.answer_history(status.id, d.id)
            recorded: dict[int, int] = {}
            for answer in history:
                recorded[answer.inbound_id] = recorded.get(answer.inbound_id, 0) + 1
            answers = answer_changes(history, since)
            delegations.append(
                {
                    "id": d.id,
                    "name": d.name,
                    "state_text": _STATE_TEXT[language][d.state],
                    "replies": [
                        {
                            "at_text": format_datetime(row.received_at, tz, language),
                            "from_address": row.from_address or _TEXT[language]["unknown_sender"],
                            "subject": _clip(row.subject, VALUE_LIMIT) or _TEXT[language]["no_subject"],
                            "recorded": recorded.get(row.id, 0),
                        }
                        for row in received[:REPLIES_PER_DELEGATION]
                    ],
                    "more_replies": max(len(received) - REPLIES_PER_DELEGATION, 0),
                    "answers": [
                        {"key": key, "value": _clip(value, VALUE_LIMIT), "previous": _clip_optional(previous)}
                        for key, value, previous in answers[:ANSWERS_PER_DELEGATION]
                    ],
                    "more_answers": max(len(answers) - ANSWERS_PER_DELEGATION, 0),
                }
            )
        if delegations:
            try:
                title = config.campaign(status.id).title_in(language)
            except KeyError:
                title = status.title
            out.append({"id": status.id, "title": title, "delegations": delegations})
    return out


def answer_changes(history: Sequence[AnswerRow], since: datetime | None) -> list[tuple[str, str, str | None]]:
    """``(key, value, previous)`` for each key whose answer changed after ``since``, in the order first changed.

    ``history`` is a delegation's answers in the order recorded (``Store.answer_history``).
    ``value`` is the key's latest answer, ``previous`` its answer just before ``since``
    (None when it had none): several changes in between read as one, and a key that
    came back to the answer it had is left out.
    """
    before: dict[str, str] = {}
    latest: dict[str, str] = {}
    order: list[str] = []
    for answer in history:
        if _after(answer.recorded_at, since):
            if answer.key not in latest:
                order.append(answer.key)
            latest[answer.key] = answer.value
        else:
            before[answer.key] = answer.value
    return [(key, latest[key], before.get(key)) for key in order if latest[key] != before.get(key)]


# --------------------------------------------------------------------------
# What needs a person
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    kind: str
    at: datetime | None
    delegation_id: str
    campaign_id: str
    what: str
    detail: str
    lines: tuple[str, ...] = ()
    new: bool = True


def _attention(
    config: Config,
    store: Store,
    campaigns: Sequence[CampaignStatus],
    campaign_ids: set[str],
    refusals: Mapping[str, Sequence[Refusal]],
    *,
    since: datetime | None,
    tz: ZoneInfo,
    language: str,
) -> list[dict[str, Any]]:
    words = _TEXT[language]
    items: list[_Item] = []
    names = {d.id: d.name for c in campaigns for d in c.delegations}
    fill_columns: dict[str, str] = {}
    for campaign_id in campaign_ids:
        try:
            fill_columns[campaign_id] = config.campaign(campaign_id).fill_column
        except KeyError:
            fill_columns[campaign_id] = ""

    # Delegations that no email reaches: as long as it lasts, once even if in several campaigns.
    failing: dict[str, str] = {}
    for status in campaigns:
        for d in status.delegations:
            if d.all_contacts_failing and d.id not in failing:
                failing[d.id] = status.id
    for delegation_id, campaign_id in failing.items():
        own = refusals.get(delegation_id, ())
        latest = max((r.at for r in own), default=None)
        items.append(
            _Item(
                "all_contacts_failing",
                latest,
                delegation_id,
                campaign_id,
                words["what_all_contacts_failing"],
                words["detail_all_contacts_failing"].format(
                    name=names.get(delegation_id, delegation_id),
                    addresses=", ".join(r.address for r in own) or "—",
                ),
                new=latest is None or _after(latest, since),
            )
        )

    # Received messages: held and failed ones until they are dealt with; the rest when new.
    for row in store.inbound_rows():
        if row.campaign and row.campaign not in campaign_ids:
            continue
        new = _after(row.received_at, since)
        if row.outcome == "held":
            items.append(
                _Item(
                    "held",
                    row.received_at,
                    row.delegation,
                    row.campaign,
                    words["what_held"],
                    _held_detail(row, words, language),
                    new=new,
                )
            )
        elif row.outcome == "failed":
            items.append(
                _Item(
                    "failed",
                    row.received_at,
                    row.delegation,
                    row.campaign,
                    words["what_failed"],
                    _message_detail(row, words, language),
                    new=new,
                )
            )
        elif row.outcome == "too_large" and new:
            items.append(
                _Item(
                    "too_large",
                    row.received_at,
                    row.delegation,
                    row.campaign,
                    words["what_too_large"],
                    _message_detail(row, words, language),
                )
            )
        if new and row.campaign and row.delegation and row.duplicate_of is None:
            for attachment in store.attachments(row.id):
                if attachment.status not in ("unreadable", "rejected"):
                    continue
                items.append(
                    _Item(
                        attachment.status,
                        row.received_at,
                        row.delegation,
                        row.campaign,
                        words[f"what_{attachment.status}"],
                        words["detail_file"].format(
                            filename=attachment.filename or words["no_name"],
                            reason=_clip(attachment.reason_in(language), 2 * VALUE_LIMIT),
                        ),
                    )
                )

    # Contacts that bounce or that the server refused, when new.
    for delegation_id, own in refusals.items():
        if delegation_id not in names:
            continue
        for refusal in own:
            if not _after(refusal.at, since):
                continue
            kind = "bounce" if refusal.source == "bounce" else "refused"
            items.append(
                _Item(
                    kind,
                    refusal.at,
                    delegation_id,
                    "",
                    words[f"what_{kind}"],
                    words["detail_refusal"].format(address=refusal.address, reason=_clip(refusal.reason, VALUE_LIMIT)),
                )
            )

    # Rows added, deleted or changed outside the fill column, one item per received file.
    for status in campaigns:
        grouped: dict[tuple[str, int], list[RowChangeRow]] = {}
        for d in status.delegations:
            for change in store.row_changes(status.id, d.id):
                if _after(change.recorded_at, since):
                    grouped.setdefault((d.id, change.inbound_id), []).append(change)
        for (delegation_id, _), changes in grouped.items():
            column = fill_columns.get(status.id, "")
            count = len(changes)
            what = (
                words["what_row_changes_one"].format(column=column)
                if count == 1
                else words["what_row_changes_many"].format(count=count, column=column)
            )
            lines = [_row_change_line(c, words) for c in changes[:ROW_CHANGES_PER_MESSAGE]]
            if count > ROW_CHANGES_PER_MESSAGE:
                lines.append(words["more"].format(count=count - ROW_CHANGES_PER_MESSAGE))
            at = changes[0].recorded_at
            items.append(
                _Item(
                    "row_changes",
                    at,
                    delegation_id,
                    status.id,
                    what,
                    words["detail_row_changes"].format(when=format_datetime(at, tz, language)),
                    tuple(lines),
                )
            )

    rank = {kind: index for index, kind in enumerate(ATTENTION_ORDER)}
    oldest = datetime.min.replace(tzinfo=UTC)
    items.sort(key=lambda item: (rank[item.kind], item.at or oldest, item.delegation_id))
    return [
        {
            "kind": item.kind,
            "delegation": names.get(item.delegation_id, item.delegation_id),
            "delegation_id": item.delegation_id,
            "campaign_id": item.campaign_id,
            "what": item.what,
            "detail": item.detail,
            "lines": list(item.lines),
            "when_text": _when(item.at, tz, language),
            "new": item.new,
        }
        for item in items
    ]


def _held_detail(row: InboundRow, words: Mapping[str, str], language: str) -> str:
    detail = words["detail_held"].format(
        sender=row.from_address or words["unknown_sender"],
        subject=_clip(row.subject, VALUE_LIMIT) or words["no_subject"],
        reason=_clip(row.reason_in(language), 2 * VALUE_LIMIT),
    )
    return detail.strip()


def _message_detail(row: InboundRow, words: Mapping[str, str], language: str) -> str:
    parts = [_clip(row.reason_in(language), 2 * VALUE_LIMIT)]
    if row.from_address or row.subject:
        subject = words["quoted"].format(text=_clip(row.subject, VALUE_LIMIT)) if row.subject else words["no_subject"]
        parts.append(f"{row.from_address or words['unknown_sender']}: {subject}")
    return " — ".join(p for p in parts if p)


def _row_change_line(change: RowChangeRow, words: Mapping[str, str]) -> str:
    def cell(text: str) -> str:
        clipped = _clip(text, 60)
        return words["quoted"].format(text=clipped) if clipped else words["empty_cell"]

    if change.change == "added":
        return words["row_added"].format(key=change.key, after=cell(change.after))
    if change.change == "deleted":
        return words["row_deleted"].format(key=change.key, before=cell(change.before))
    return words["row_changed"].format(
        key=change.key, column=_clip(change.column, 60), before=cell(change.before), after=cell(change.after)
    )


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def _after(moment: datetime, since: datetime | None) -> bool:
    """Recorded strictly after the previous digest (everything counts for the first one)."""
    return since is None or moment > since


def _when(moment: datetime | None, tz: ZoneInfo, language: str) -> str | None:
    return format_datetime(moment, tz, language) if moment is not None else None


def _clip(text: str, limit: int) -> str:
    """One line of at most ``limit`` characters: line breaks and runs of spaces become one space."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


def _clip_optional(text: str | None) -> str | None:
    return None if text is None else _clip(text, VALUE_LIMIT)
