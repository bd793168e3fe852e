"""Turn Jinja2 templates into ready-to-send emails: the bytes for SMTP, or an :class:`~email.message.EmailMessage`.

Three layers, each usable on its own:

* formatting helpers (:func:`format_date`, :func:`format_datetime`, :func:`timezone_label`)
  that write dates the way a reader of each language expects them;
* :class:`Renderer`, which renders one kind of email in one language from the
  built-in templates or the operator's overrides, and reports every problem as a
  :class:`~mailflow.errors.TemplateError` naming the file;
* :func:`build_message_bytes`, which writes the MIME message straight out as the bytes
  to send (CRLF, 7-bit) and refuses any header value that could inject another header;
  :func:`build_message` is the same bytes parsed back into an ``EmailMessage``.

The subject carries a reference such as ``[Ref. responsible-2017/HN]`` so that a
reply can be matched by its subject alone (:func:`parse_subject_reference`).
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import re
import struct
import traceback
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from email import policy as email_policy
from email.errors import HeaderParseError
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import encode_rfc2231
from email.utils import format_datetime as rfc5322_datetime
from itertools import chain
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import jinja2
from babel.dates import format_date as babel_format_date
from babel.dates import get_timezone_location

from mailflow.errors import TemplateError

CAMPAIGN_KINDS = ("request", "reminder", "overdue")
"""Emails the schedule sends on its own: the request, reminders before the deadline, notices after it."""

FOLLOW_UP_KINDS = ("receipt", "missing", "unreadable")
"""Emails sent in answer to a delegation's reply (threaded, ``Re: <their subject>``)."""

DELEGATION_KINDS = CAMPAIGN_KINDS + FOLLOW_UP_KINDS
"""Emails to a delegation: their context is a campaign email's (see :func:`example_context`)."""

SECRETARIAT_KINDS = ("digest",)
"""Emails to the Secretariat itself: the status digest (context from :func:`mailflow.digest.digest_context`)."""

MEETING_KINDS = ("meeting",)
"""Emails about a meeting, outside any campaign, to a delegation or an observer: notice, update, cancellation
or reminder (the context's ``action``; context from :func:`mailflow.meetings.meeting_context`)."""

KINDS_WITH_TEMPLATES = DELEGATION_KINDS + SECRETARIAT_KINDS + MEETING_KINDS
"""Kinds of email that have a subject, text and HTML template in every language."""

FOLLOW_UP_CONTEXT_KEYS = (
    "reply_subject",
    "received_at_text",
    "recorded",
    "changed_outside",
    "unreadable",
    "deadline_passed",
)
"""What a follow-up's context holds on top of a campaign email's (see :func:`example_context`)."""

LANGUAGES = ("es", "en")
TEMPLATE_PARTS = ("subject", "txt", "html")
BUILTIN_TEMPLATES: Path = Path(__file__).resolve().parent.parent / "templates" / "email"

MISSING_LIST_LIMIT = 15
"""How many rows a list in an email shows before it says "and N more" (missing, recorded, changed, files)."""

REPLY_SUBJECT_LIMIT = 200
"""Longest part of a delegation's subject that is quoted in a follow-up's subject (characters)."""

_DATE_PATTERNS = {
    "es": "EEEE d 'de' MMMM 'de' y",
    "en": "EEEE, d MMMM y",
}

# Control characters, C1 controls and the Unicode line/paragraph separators: none may reach a header.
_HEADER_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# A header field name: printable ASCII except the colon (RFC 5322 section 2.2).
_HEADER_NAME_RE = re.compile(r"^[\x21-\x39\x3b-\x7e]+$")
# Headers whose value is structural: the MIME machinery owns them.
_RESERVED_HEADERS = frozenset({"content-type", "content-transfer-encoding", "content-disposition", "mime-version"})
# Headers written from a parameter of build_message (checked there): not to be given again in `headers`.
_PARAMETER_HEADERS = frozenset({"from", "to", "reply-to", "subject", "date", "message-id"})

# "Re:", "RE:", "RV:" (reenviado), "Fwd:", "AW:", "WG:", "TR:", "SV:", "Antw:", "Re[2]:"… at the start of a subject.
_REPLY_PREFIX_RE = re.compile(r"^\s*(?:re|res|rv|fw|fwd|aw|wg|tr|sv|antw)\s*(?:\[\d+\]|\(\d+\))?\s*:\s*", re.IGNORECASE)

_ID_CHARS = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
REFERENCE_RE: re.Pattern[str] = re.compile(
    rf"\[\s*ref\s*[.:]*\s*(?P<campaign>{_ID_CHARS})\s*/\s*(?P<delegation>{_ID_CHARS})\s*\]",
    re.IGNORECASE,
)
"""A subject reference: ``[Ref. campaign/delegation]``, tolerant of case, ``Ref:`` and stray spaces."""


# --------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------


def _date_pattern(language: str) -> str:
    try:
        return _DATE_PATTERNS[language]
    except KeyError:
        raise TemplateError(f"unsupported language {language!r} (expected one of {', '.join(LANGUAGES)})") from None


@functools.lru_cache(maxsize=1024)
def format_date(d: date, language: str) -> str:
    """Write a date out in full: ``lunes 23 de octubre de 2017`` / ``Monday, 23 October 2017``.

    Kept for the dates already written: a campaign writes the same deadline in every email."""
    return str(babel_format_date(d, _date_pattern(language), locale=language))


def format_datetime(dt: datetime, tz: ZoneInfo, language: str) -> str:
    """Write an instant as the reader's wall clock shows it: ``lunes 23 de octubre de 2017, 09:00``.

    ``dt`` must be aware: a naive time has no single meaning across eleven time zones.
    """
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise TemplateError(f"naive datetime {dt.isoformat()} where an aware one is required")
    local = dt.astimezone(tz)
    return f"{format_date(local.date(), language)}, {local:%H:%M}"


def timezone_label(delegation_name: str, language: str) -> str:
    """Name a delegation's local time the way its readers say it: ``hora de Honduras`` / ``Honduras time``."""
    if language == "es":
        return f"hora de {delegation_name}"
    if language == "en":
        return f"{delegation_name} time"
    raise TemplateError(f"unsupported language {language!r} (expected one of {', '.join(LANGUAGES)})")


def zone_label(tz: ZoneInfo, language: str) -> str:
    """Name a time zone the way its readers say it, from the CLDR: ``hora de Costa Rica`` / ``Costa Rica Time``."""
    _date_pattern(language)  # refuses a language mailflow does not write
    return str(get_timezone_location(tz, locale=language))


def _zone(tz: ZoneInfo | str) -> ZoneInfo:
    if isinstance(tz, ZoneInfo):
        return tz
    try:
        return ZoneInfo(str(tz))
    except (ZoneInfoNotFoundError, ValueError):
        raise TemplateError(f"unknown time zone {tz!r}") from None


def _datetime_text_filter(dt: datetime, tz: ZoneInfo | str, language: str) -> str:
    return format_datetime(dt, _zone(tz), language)


def _oneline(value: object) -> str:
    """Collapse any run of whitespace (a cell's line breaks included) to one space."""
    return " ".join(str(value).split())


# --------------------------------------------------------------------------
# Subject references and Message-IDs
# --------------------------------------------------------------------------


def subject_reference(campaign_ref: str, delegation_id: str) -> str:
    """The tag every subject ends with: ``[Ref. responsible-2017/HN]``."""
    return f"[Ref. {campaign_ref}/{delegation_id}]"


def parse_subject_reference(subject: str) -> tuple[str, str] | None:
    """Find a subject reference anywhere in ``subject``: ``(campaign_ref, delegation_id)`` or None.

    Reply prefixes (``RE:``, ``RV:``, ``Fwd:``), extra spaces, ``ref``/``REF`` and
    ``Ref:`` are all tolerated. When a subject holds several references (a forward
    of a forward), the last one wins.
    """
    matches = list(REFERENCE_RE.finditer(subject))
    if not matches:
        return None
    last = matches[-1]
    return last.group("campaign"), last.group("delegation")


def reply_subject_line(subject: object, fallback: object = "") -> str:
    """The subject of our answer to a message whose subject was ``subject``: ``Re: <their subject>``.

    Their subject is cleaned first: every subject reference is taken out (the
    template puts ours back at the end), control characters and line breaks become
    spaces, and it is cut to :data:`REPLY_SUBJECT_LIMIT` characters. ``Re: `` is
    added unless it already starts with a reply or forward prefix (``RE:``,
    ``RV:``, ``Fwd:``…), so prefixes never pile up. When nothing is left (no
    subject, or only a reference), ``Re: <fallback>`` is used; the fallback comes
    from our own configuration and is not cleaned, so the subject check still
    refuses a line break in it. ``None`` counts as no subject.
    """
    # str() first: an undefined template name then raises "'reply_subject' is undefined", not a TypeError.
    text = "" if subject is None else str(subject)
    fallback = "" if fallback is None else str(fallback)
    cleaned = _oneline(_HEADER_CONTROL_RE.sub(" ", REFERENCE_RE.sub(" ", text)))
    if len(cleaned) > REPLY_SUBJECT_LIMIT:
        cleaned = cleaned[: REPLY_SUBJECT_LIMIT - 1].rstrip() + "…"
    rest = cleaned
    while (prefix := _REPLY_PREFIX_RE.match(rest)) is not None and prefix.end() > 0:
        rest = rest[prefix.end() :]
    if not rest.strip(" -—–:"):
        return f"Re: {fallback}" if fallback else "Re:"
    if rest != cleaned:
        return cleaned
    return f"Re: {cleaned}"


def _readable(part: str, limit: int) -> str:
    ascii_text = unicodedata.normalize("NFKD", part).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^A-Za-z0-9_]+", "-", ascii_text).strip("-_")[:limit].strip("-_")


def make_message_id(domain: str, *parts: str) -> str:
    """A deterministic Message-ID: the same parts always give the same id.

    ``<mailflow.<24 hex of sha256>.<readable parts>@<domain>>``. The hash covers the
    parts unambiguously (each is length-prefixed); the readable tail is only for
    people reading logs, reduced to characters that are safe in an RFC 5322 dot-atom.
    """
    digest = hashlib.sha256()
    for part in parts:
        raw = part.encode("utf-8")
        digest.update(f"{len(raw)}:".encode("ascii") + raw)
    readable = ".".join(r for r in (_readable(p, 32) for p in parts) if r)[:80].strip(".-_")
    host = re.sub(r"\.{2,}", ".", re.sub(r"[^a-z0-9.-]+", "-", domain.strip().lower())).strip(".-") or "localhost"
    local = f"mailflow.{digest.hexdigest()[:24]}"
    if readable:
        local = f"{local}.{readable}"
    return f"<{local}@{host}>"


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderedEmail:
    """The three rendered parts of one email, plus the language they are written in.

    ``language`` (optional, set by :meth:`Renderer.render`) becomes the
    ``Content-Language`` header in :func:`build_message`.
    """

    subject: str
    text: str
    html: str
    language: str | None = None


@dataclass(frozen=True)
class Attachment:
    """A file attached to an outgoing email (by default, an .xlsx workbook).

    ``parameters`` are Content-Type parameters written before the file name, each a
    token pair: ``(("method", "REQUEST"), ("charset", "utf-8"))`` for a calendar invitation.
    """

    filename: str
    content: bytes
    mime_type: str = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
    parameters: tuple[tuple[str, str], ...] = ()


class _HeaderValueError(ValueError):
    """A value interpolated into a subject holds a control character."""


def _refuse_control_characters(value: Any) -> Any:
    # `finalize` of the subject environment: runs on every {{ expression }}, never on the template's own text,
    # so a template may wrap its subject over lines while a CR/LF inside a value is refused.
    if isinstance(value, str) and _HEADER_CONTROL_RE.search(value):
        raise _HeaderValueError(f"value {value!r} contains a line break or control character")
    return value


def template_name(language: str, kind: str, part: str) -> str:
    """The loader name of one template file: ``es/request.txt.j2``, ``en/reminder.subject.j2``."""
    suffix = "subject.j2" if part == "subject" else f"{part}.j2"
    return f"{language}/{kind}.{suffix}"


class Renderer:
    """Renders each kind of email in each language from Jinja2 templates.

    Templates are looked up in ``override_dir/{lang}/`` first (the operator's own
    versions, same file names) and then in the built-in directory. Undefined names
    are errors, never blanks; HTML templates (``*.html.j2``) are autoescaped, text
    and subject templates are not.
    """

    def __init__(self, override_dir: Path | None = None, builtin_dir: Path = BUILTIN_TEMPLATES) -> None:
        self.override_dir = override_dir
        self.builtin_dir = builtin_dir
        loaders: list[jinja2.BaseLoader] = []
        if override_dir is not None:
            loaders.append(jinja2.FileSystemLoader(str(override_dir)))
        loaders.append(jinja2.FileSystemLoader(str(builtin_dir)))
        self._env = self._environment(jinja2.ChoiceLoader(loaders), finalize=None)
        self._subject_env = self._environment(jinja2.ChoiceLoader(loaders), finalize=_refuse_control_characters)

    @staticmethod
    def _environment(loader: jinja2.BaseLoader, finalize: Any) -> jinja2.Environment:
        env = jinja2.Environment(
            loader=loader,
            undefined=jinja2.StrictUndefined,
            autoescape=jinja2.select_autoescape(
                enabled_extensions=("html.j2",), disabled_extensions=(), default_for_string=False, default=False
            ),
            trim_blocks=True,
            lstrip_blocks=True,
            finalize=finalize,
            auto_reload=False,  # templates do not change under a running process: skip the per-render stat
        )
        env.filters["date_text"] = format_date
        env.filters["datetime_text"] = _datetime_text_filter
        env.filters["oneline"] = _oneline
        env.filters["re_subject"] = reply_subject_line
        env.globals["missing_limit"] = MISSING_LIST_LIMIT
        return env

    # -- naming files in messages ------------------------------------------------

    def _origin(self, name: str) -> str:
        """``template es/request.txt.j2``, with the full path when it is the operator's override."""
        if self.override_dir is not None:
            path = self.override_dir / name
            if path.is_file():
                return f"template {name} (override {path})"
        return f"template {name}"

    def _name_for_file(self, filename: str) -> str | None:
        path = Path(filename)
        for root in (self.override_dir, self.builtin_dir):
            if root is None:
                continue
            try:
                return path.resolve().relative_to(root.resolve()).as_posix()
            except ValueError:
                continue
        return None

    def _location(self, name: str, exc: BaseException) -> str:
        """Where in the templates ``exc`` happened: `` (line 12)`` or `` (in es/_missing.txt.j2, line 3)``."""
        if isinstance(exc, jinja2.TemplateSyntaxError) and exc.lineno:
            where = exc.name or (self._name_for_file(exc.filename) if exc.filename else None) or name
            return f" (line {exc.lineno})" if where == name else f" (in {where}, line {exc.lineno})"
        found: tuple[str, int] | None = None
        for frame in traceback.extract_tb(exc.__traceback__):
            frame_name = self._name_for_file(frame.filename)
            if frame_name is not None and frame.lineno:
                found = (frame_name, frame.lineno)
        if found is None:
            return ""
        where, line = found
        return f" (line {line})" if where == name else f" (in {where}, line {line})"

    def _error(self, name: str, exc: BaseException) -> TemplateError:
        if isinstance(exc, jinja2.TemplateNotFound):
            missing = exc.name if isinstance(exc.name, str) else name
            searched = [str(d) for d in (self.override_dir, self.builtin_dir) if d is not None]
            if missing == name:
                return TemplateError(f"template {name} not found (searched {', '.join(searched)})")
            return TemplateError(f"{self._origin(name)}: refers to {missing}, which is not found")
        if isinstance(exc, jinja2.TemplateSyntaxError):
            problem = f"syntax error: {exc.message}"
        elif isinstance(exc, _HeaderValueError):
            problem = f"refusing to put it in the Subject header: {exc}"
        elif isinstance(exc, jinja2.TemplateError):
            problem = exc.message or type(exc).__name__
        else:
            problem = f"{type(exc).__name__}: {exc}"
        return TemplateError(f"{self._origin(name)}: {problem}{self._location(name, exc)}")

    # -- rendering ---------------------------------------------------------------

    def _render_one(self, env: jinja2.Environment, name: str, context: Mapping[str, Any]) -> str:
        try:
            return env.get_template(name).render(dict(context))
        except TemplateError:
            raise
        except Exception as exc:  # any fault in an operator's template is reported, never propagated raw
            raise self._error(name, exc) from exc

    def render(self, kind: str, language: str, context: Mapping[str, Any]) -> RenderedEmail:
        """Render the subject, text and HTML parts of one email.

        The subject is collapsed to one line. If an override forgot the subject
        reference that ``context["reference"]`` holds, it is appended: replies are
        matched by it.
        """
        subject_name = template_name(language, kind, "subject")
        subject = _oneline(self._render_one(self._subject_env, subject_name, context))
        if not subject:
            raise TemplateError(f"{self._origin(subject_name)}: renders an empty subject")
        reference = context.get("reference")
        if isinstance(reference, str) and reference and reference not in subject:
            subject = f"{subject} {reference}"
        text = self._render_one(self._env, template_name(language, kind, "txt"), context)
        html = self._render_one(self._env, template_name(language, kind, "html"), context)
        return RenderedEmail(
            subject=subject,
            text=text.strip("\n") + "\n",
            html=html.strip("\n") + "\n",
            language=language,
        )

    # -- checking ----------------------------------------------------------------

    def check(self) -> list[str]:
        """Every template of every kind and language exists and compiles; returns one line per problem.

        Shared pieces (``_base.html.j2``…) and every other ``*.j2`` file are
        compiled too, and every kind is test-rendered with sample contexts (the
        follow-ups with several, so that each of their branches runs: lists empty,
        single and over the limit, deadline passed or not), so a misspelt name in an
        override is found before it is needed.
        """
        problems: list[str] = []
        if self.override_dir is not None and not self.override_dir.is_dir():
            problems.append(f"template override directory {self.override_dir} does not exist")
        required = [
            template_name(lang, kind, part)
            for lang in LANGUAGES
            for kind in KINDS_WITH_TEMPLATES
            for part in TEMPLATE_PARTS
        ]
        broken: set[str] = set()
        for name in required:
            try:
                self._env.get_template(name)
            except Exception as exc:
                problems.append(str(self._error(name, exc)))
                broken.add(name)
        try:
            others = sorted(set(self._env.list_templates(extensions=["j2"])) - set(required))
        except (OSError, TypeError) as exc:  # a loader that cannot list (unreadable directory)
            problems.append(f"cannot list templates: {exc}")
            others = []
        known = {f"{kind}.{suffix}" for kind in KINDS_WITH_TEMPLATES for suffix in ("subject.j2", "txt.j2", "html.j2")}
        for name in others:
            try:
                self._env.get_template(name)
            except Exception as exc:
                problems.append(str(self._error(name, exc)))
                continue
            lang, _, filename = name.partition("/")
            if (
                self.override_dir is not None
                and (self.override_dir / name).is_file()
                and lang in LANGUAGES
                and not filename.startswith("_")
                and "/" not in filename
                and filename not in known
                and filename.split(".", 1)[0] not in KINDS_WITH_TEMPLATES
            ):
                problems.append(
                    f"template {name} (override {self.override_dir / name}): not a known template name; "
                    f"expected one of {', '.join(sorted(known))} or a shared piece starting with '_'"
                )
        for lang in LANGUAGES:
            for kind in KINDS_WITH_TEMPLATES:
                if any(template_name(lang, kind, part) in broken for part in TEMPLATE_PARTS):
                    continue
                for context in _check_contexts(kind, lang):
                    try:
                        self.render(kind, lang, context)
                    except TemplateError as exc:
                        if str(exc) not in problems:
                            problems.append(str(exc))
        return problems


def _example_recorded(count: int) -> list[dict[str, str]]:
    return [
        {
            "key": f"{1 + i // 5}.{1 + i % 5}",
            "label": f"Action {1 + i // 5}.{1 + i % 5}",
            "value": f"Institution {i + 1}",
        }
        for i in range(count)
    ]


_EXAMPLE_CHANGED = [
    {"key": "1.2", "column": "Indicator", "before": "Number of protocols adopted", "after": "Protocols adopted"},
    {"key": "3.1", "column": "Timeframe", "before": "2018", "after": ""},
]
_EXAMPLE_UNREADABLE = [
    {"filename": "Strategic Plan - Honduras.xlsx", "reason": "the file is password-protected"},
    {"filename": "Plan (2).xlsx", "reason": "the file is damaged and cannot be opened"},
]


def example_context(kind: str, language: str) -> dict[str, Any]:
    """A plausible context for ``kind``: used by :meth:`Renderer.check` to test-render templates.

    Every kind gets the campaign keys; the follow-ups (:data:`FOLLOW_UP_KINDS`)
    also get :data:`FOLLOW_UP_CONTEXT_KEYS`:

    * ``reply_subject`` (str): the subject of the delegation's message;
    * ``received_at_text`` (str): when it arrived, in their language and time zone;
    * ``recorded`` (list of ``{key, label, value}``): the answers recorded from it
      (for a ``receipt``, every recorded answer);
    * ``changed_outside`` (list of ``{key, column, before, after}``): cells changed
      outside the fill column, not applied;
    * ``unreadable`` (list of ``{filename, reason}``): attachments that could not
      be read, with a reason already written for the reader;
    * ``deadline_passed`` (bool).

    The digest (:data:`SECRETARIAT_KINDS`) gets its own context instead, the
    shape :func:`mailflow.digest.digest_context` documents (see :func:`_example_digest`);
    so does a meeting email (:data:`MEETING_KINDS`, see :func:`_example_meeting`).
    """
    if kind in SECRETARIAT_KINDS:
        return _example_digest(language)
    if kind in MEETING_KINDS:
        return _example_meeting(language)
    name = "Honduras"
    deadline = date(2017, 10, 23)
    missing = [{"key": f"{line}.{n}", "label": f"Action {line}.{n}"} for line in range(1, 5) for n in range(1, 6)]
    total = 40
    if kind == "receipt":
        missing = []
    context: dict[str, Any] = {
        "kind": kind,
        "language": language,
        "secretariat": {"name": "Technical Secretariat of the RCM", "address": "ts@example.org"},
        "delegation": {"id": "HN", "name": name},
        "campaign": {"id": "responsible-2017", "title": "Strategic Plan 2017-2022", "ref": "responsible-2017"},
        "reference": subject_reference("responsible-2017", "HN"),
        "fill_column": "Responsible",
        "deadline": deadline,
        "deadline_text": format_date(deadline, language),
        "timezone_label": timezone_label(name, language),
        "attachment_name": "Strategic Plan - Honduras.xlsx",
        "total": total,
        "filled": total - len(missing),
        "missing": missing,
        "days_left": 1 if kind == "reminder" else 0,
        "days_overdue": 2 if kind == "overdue" else 0,
    }
    if kind in FOLLOW_UP_KINDS:
        # A receipt lists every answer; a partial return recorded a few (not among the missing ones);
        # an unreadable attachment recorded nothing.
        answers = _example_recorded(total)
        recorded = {"receipt": answers, "missing": answers[20:25]}.get(kind, [])
        unreadable = {"missing": _EXAMPLE_UNREADABLE[:1], "unreadable": _EXAMPLE_UNREADABLE}.get(kind, [])
        context.update(
            {
                "reply_subject": f"RE: Strategic Plan 2017-2022 — {name} {context['reference']}",
                "received_at_text": format_datetime(
                    datetime(2017, 10, 21, 16, 15, tzinfo=UTC), ZoneInfo("America/Tegucigalpa"), language
                ),
                "recorded": recorded,
                "changed_outside": [] if kind == "unreadable" else _EXAMPLE_CHANGED[:1],
                "unreadable": unreadable,
                "deadline_passed": False,
            }
        )
    return context


_EXAMPLE_DIGEST_WORDS = {
    "es": {
        "complete": "completo",
        "partial": "parcial",
        "awaiting": "en espera",
        "not_sent": "no enviado",
        "title": "Columna «Responsable» del Plan Estratégico 2017-2022",
        "warning": (
            "La bandeja de entrada no se ha leído desde el {last} (hace 1 día; se espera al menos cada 2 h). "
            "Es posible que el servicio que vigila la bandeja se haya detenido: las respuestas de las "
            "delegaciones no se están leyendo ni registrando. Revise el servicio mailflow."
        ),
        "held": "Respuesta retenida: remitente no verificado",
        "unreadable": "Archivo ilegible",
        "bounce": "Rebote: el correo no llegó",
        "row_changes": "1 cambio fuera de la columna «Responsible»",
        "note": "1 respuesta retenida para revisión",
    },
    "en": {
        "complete": "complete",
        "partial": "partial",
        "awaiting": "awaiting reply",
        "not_sent": "not sent",
        "title": "Responsible column of the Strategic Plan 2017-2022",
        "warning": (
            "The inbox has not been read since {last} (1 day ago; expected at least every 2 h). "
            "The service that watches the inbox may have stopped: replies from delegations are not being "
            "read or recorded. Check the mailflow service."
        ),
        "held": "Reply held: sender not verified",
        "unreadable": "Unreadable file",
        "bounce": "Bounce: the email was not delivered",
        "row_changes": "1 change outside the “Responsible” column",
        "note": "1 reply held for review",
    },
}
_EXAMPLE_DIGEST_DELEGATIONS = (
    ("BZ", "Belize", 0),
    ("CA", "Canada", 40),
    ("CR", "Costa Rica", 40),
    ("DO", "República Dominicana", 12),
    ("SV", "El Salvador", 0),
    ("GT", "Guatemala", 25),
    ("HN", "Honduras", 40),
    ("MX", "México", 40),
    ("NI", "Nicaragua", 39),
    ("PA", "Panamá", 1),
    ("US", "United States", 40),
)


def _example_digest(language: str) -> dict[str, Any]:
    """A digest of a campaign a day after its deadline, with the inbox unread for a day: every section filled."""
    words = _EXAMPLE_DIGEST_WORDS.get(language, _EXAMPLE_DIGEST_WORDS["en"])
    tz = ZoneInfo("America/Costa_Rica")
    now = datetime(2017, 10, 24, 14, 0, tzinfo=UTC)
    read = datetime(2017, 10, 23, 14, 0, tzinfo=UTC)
    total = 40
    rows: list[dict[str, Any]] = []
    for index, (code, name, filled) in enumerate(_EXAMPLE_DIGEST_DELEGATIONS):
        state = "complete" if filled == total else "partial" if filled else "awaiting" if index else "not_sent"
        percent = 100 if filled == total else min(max(filled * 100 // total, 1 if filled else 0), 99)
        color = "#2e7d32" if state == "complete" else "#c2410c"
        rows.append(
            {
                "id": code,
                "name": name,
                "state": state,
                "state_text": words[state],
                "overdue": state != "complete",
                "overdue_days": 0 if state == "complete" else 1,
                "filled": filled,
                "total": total,
                "percent": percent,
                "bar": [
                    c
                    for c in ({"width": percent, "color": color}, {"width": 100 - percent, "color": "#e5e7eb"})
                    if c["width"]
                ],
                "bar_text": "[" + "#" * (percent // 10) + "-" * (10 - percent // 10) + "]",
                "last_reply_text": format_datetime(read, tz, language) if filled else None,
                "next_reminder_text": None if state == "complete" else format_datetime(now, tz, language),
                "notes": [words["note"]] if code == "DO" else [],
            }
        )
    counts = {
        "complete": sum(1 for row in rows if row["state"] == "complete"),
        "partial": sum(1 for row in rows if row["state"] == "partial"),
        "awaiting": sum(1 for row in rows if row["state"] == "awaiting"),
        "not_sent": sum(1 for row in rows if row["state"] == "not_sent"),
        "overdue": sum(1 for row in rows if row["overdue"]),
    }
    when = format_datetime(read, tz, language)
    attention_item = {
        "delegation": "República Dominicana",
        "delegation_id": "DO",
        "campaign_id": "responsible-2017",
        "detail": "asistente@otra.example.do: “Plan”. asistente@otra.example.do is not a listed contact",
        "lines": [],
        "when_text": when,
        "new": True,
    }
    return {
        "kind": "digest",
        "secretariat": {"name": "Technical Secretariat of the RCM", "address": "ts@example.org"},
        "language": language,
        "timezone": tz.key,
        "timezone_label": zone_label(tz, language),
        "generated_at_text": format_datetime(now, tz, language),
        "generated_on_text": format_date(now.astimezone(tz).date(), language),
        "since_text": format_datetime(now - timedelta(days=1), tz, language),
        "first_digest": False,
        "health": {
            "last_inbox_read_at_text": when,
            "read_ago_text": "1 día" if language == "es" else "1 day",
            "inbox_stale": True,
            "stale_for_text": "1 día" if language == "es" else "1 day",
            "stale_after_text": "2 h",
            "last_sent_at_text": when,
            "last_send_pass_at_text": when,
            "service_stopped_at_text": None,
            "warning": words["warning"].format(last=when),
        },
        "campaigns": [
            {
                "id": "responsible-2017",
                "title": words["title"],
                "deadline_text": format_date(date(2017, 10, 23), language),
                "complete_count": counts["complete"],
                "total_delegations": len(rows),
                "counts": counts,
                "rows": rows,
            }
        ],
        "changes": [
            {
                "id": "responsible-2017",
                "title": words["title"],
                "delegations": [
                    {
                        "id": "GT",
                        "name": "Guatemala",
                        "state_text": words["partial"],
                        "replies": [
                            {
                                "at_text": when,
                                "from_address": "enlace@minex.example.gt",
                                "subject": "RE: Plan",
                                "recorded": 2,
                            }
                        ],
                        "more_replies": 0,
                        "answers": [
                            {"key": "1.1", "value": "Ministerio de Relaciones Exteriores", "previous": None},
                            {"key": "1.2", "value": "Secretaría de Bienestar Social", "previous": "PGN"},
                        ],
                        "more_answers": 0,
                    }
                ],
            }
        ],
        "attention": [
            {**attention_item, "kind": "held", "what": words["held"]},
            {
                **attention_item,
                "kind": "unreadable",
                "delegation": "El Salvador",
                "delegation_id": "SV",
                "what": words["unreadable"],
                "detail": "Plan.xlsx: the file is damaged and cannot be opened",
            },
            {
                **attention_item,
                "kind": "bounce",
                "delegation": "Belize",
                "delegation_id": "BZ",
                "campaign_id": "",
                "what": words["bounce"],
                "detail": "liaison@immigration.example.bz: 5.1.1 User unknown",
            },
            {
                **attention_item,
                "kind": "row_changes",
                "delegation": "Honduras",
                "delegation_id": "HN",
                "what": words["row_changes"],
                "detail": f"{when}: not applied.",
                "lines": ["1.2, Action: «Ensure…» → «Guarantee…»"],
            },
        ],
        "attention_more": 0,
        "totals": {"delegations": len(rows), **counts},
    }


_EXAMPLE_MEETING_WORDS = {
    "es": {
        "title": "Sesión virtual de la Red de Funcionarios de Enlace",
        "agenda": "1. Columna «Responsable» del Plan Estratégico\n2. Próximos pasos",
        "duration": "1 hora y 30 minutos",
        "places": [
            ["Belize", "Costa Rica", "El Salvador", "Guatemala", "Honduras", "México (Ciudad de México)", "Nicaragua"],
            ["Canada (Toronto)", "Panamá", "United States (Nueva York)"],
            ["República Dominicana"],
        ],
        "calendar": {"REQUEST": "invitacion.ics", "CANCEL": "cancelacion.ics"},
        "observer_zone": "hora de Costa Rica",
    },
    "en": {
        "title": "Virtual session of the Liaison Officers Network",
        "agenda": "1. Responsible column of the Strategic Plan\n2. Next steps",
        "duration": "1 hour 30 minutes",
        "places": [
            ["Belize", "Costa Rica", "El Salvador", "Guatemala", "Honduras", "México (Mexico City)", "Nicaragua"],
            ["Canada (Toronto)", "Panamá", "United States (New York)"],
            ["República Dominicana"],
        ],
        "calendar": {"REQUEST": "invitation.ics", "CANCEL": "cancellation.ics"},
        "observer_zone": "Costa Rica Time",
    },
}


def _example_meeting(language: str) -> dict[str, Any]:
    """The notice of the seed's session (15 November 2017, 8:30 in San José) to Honduras.

    The shape :func:`mailflow.meetings.meeting_context` builds: ``action`` (``notice``,
    ``update``, ``cancel`` or ``reminder``), ``recipient`` (``id``, ``name``,
    ``is_delegation``: false for an observer), ``meeting`` (title, link, agenda and its
    lines, the start written in the reader's time zone and language, the name of the
    attached calendar file, empty for a reminder), ``times`` (the start in every invited
    delegation's zone, grouped by identical local time), ``changes`` (an update's
    ``{what: title|time|link, before, after}``) and ``reminder`` (``{offset}`` or None).
    """
    words = _EXAMPLE_MEETING_WORDS.get(language, _EXAMPLE_MEETING_WORDS["en"])
    day = format_date(date(2017, 11, 15), language)
    agenda = words["agenda"]
    assert isinstance(agenda, str)
    places = words["places"]
    assert isinstance(places, list)
    calendar = words["calendar"]
    assert isinstance(calendar, dict)
    return {
        "kind": "meeting",
        "action": "notice",
        "language": language,
        "secretariat": {"name": "Technical Secretariat of the RCM", "address": "ts@example.org"},
        "recipient": {"id": "HN", "name": "Honduras", "is_delegation": True},
        "meeting": {
            "id": "network-2017-11-15",
            "title": words["title"],
            "link": "https://meet.example.org/rcm?session=2017-11-15&lang=es",
            "agenda": agenda,
            "agenda_lines": agenda.split("\n"),
            "date_text": day,
            "time_text": "8:30",
            "end_time_text": "10:00",
            "when_text": f"{day}, 8:30–10:00",
            "duration_text": words["duration"],
            "timezone_label": timezone_label("Honduras", language),
            "sequence": 0,
            "calendar_file": calendar["REQUEST"],
        },
        "times": [
            {"time_text": time, "date_text": None, "places": names, "places_text": ", ".join(names)}
            for time, names in zip(("8:30", "9:30", "10:30"), places, strict=True)
        ],
        "changes": [],
        "reminder": None,
    }


def _meeting_variants(base: dict[str, Any]) -> list[dict[str, Any]]:
    """The notice; an update of every field; a cancellation; a reminder; an observer's notice without link or agenda."""
    language = base["language"]
    words = _EXAMPLE_MEETING_WORDS.get(language, _EXAMPLE_MEETING_WORDS["en"])
    calendar = words["calendar"]
    assert isinstance(calendar, dict)
    meeting = base["meeting"]
    later = format_date(date(2017, 11, 16), language)
    update = {
        **base,
        "action": "update",
        "meeting": {**meeting, "sequence": 1, "date_text": later, "when_text": f"{later}, 8:30–10:00"},
        "changes": [
            {"what": "title", "before": "Sesión virtual", "after": meeting["title"]},
            {"what": "time", "before": meeting["when_text"], "after": f"{later}, 8:30–10:00"},
            {"what": "link", "before": "https://meet.example.org/old", "after": meeting["link"]},
            {"what": "link", "before": "", "after": meeting["link"]},
            {"what": "link", "before": meeting["link"], "after": ""},
        ],
    }
    cancel = {
        **base,
        "action": "cancel",
        "meeting": {**meeting, "sequence": 2, "calendar_file": calendar["CANCEL"]},
    }
    reminder = {
        **base,
        "action": "reminder",
        "meeting": {**meeting, "calendar_file": ""},
        "reminder": {"offset": "-1h"},
    }
    observer = {
        **base,
        "recipient": {
            "id": "extra:observer@iom.example.org",
            "name": "observer@iom.example.org",
            "is_delegation": False,
        },
        "meeting": {**meeting, "link": "", "agenda": "", "agenda_lines": [], "timezone_label": words["observer_zone"]},
        "times": [*base["times"][:2], {**base["times"][2], "date_text": later}],
    }
    return [base, update, cancel, reminder, observer]


def _digest_variants(base: dict[str, Any]) -> list[dict[str, Any]]:
    """The example digest, the first one with nothing to report and the inbox never read, and one cut short."""
    health = base["health"]
    never = {
        **base,
        "since_text": None,
        "first_digest": True,
        "health": {
            **health,
            "last_inbox_read_at_text": None,
            "read_ago_text": None,
            "stale_for_text": None,
            "last_sent_at_text": None,
            "last_send_pass_at_text": None,
            "service_stopped_at_text": health["last_sent_at_text"],
        },
        "changes": [],
        "attention": [],
        "totals": {**base["totals"], "complete": 0},
    }
    fresh_health = {**health, "inbox_stale": False, "stale_for_text": None, "warning": None}
    [campaign] = base["campaigns"]
    [changed] = base["changes"]
    [delegation] = changed["delegations"]
    cut = {
        **base,
        "health": fresh_health,
        "campaigns": [
            {
                **campaign,
                "rows": [
                    {**row, "notes": ["bouncing contact: enlace@example.org", "no contact receives email"]}
                    for row in campaign["rows"]
                ],
            }
        ],
        "changes": [
            {
                **changed,
                "delegations": [
                    {
                        **delegation,
                        "replies": [{**delegation["replies"][0], "recorded": 0}],
                        "more_replies": 3,
                        "answers": delegation["answers"][:1],
                        "more_answers": 12,
                    }
                ],
            }
        ],
        "attention": [{**item, "new": False} for item in base["attention"]],
        "attention_more": 7,
    }
    return [base, never, cut]


def _check_contexts(kind: str, language: str) -> list[dict[str, Any]]:
    """The contexts :meth:`Renderer.check` renders ``kind`` with.

    The example, and for a follow-up three variants that between them take every
    branch of the built-in templates: lists over the limit, single items with the
    deadline passed, and everything empty (no subject, nothing recorded yet). A
    digest is also rendered as the first one with the inbox never read and
    nothing to report, and with every list cut short ("and N more").
    """
    base = example_context(kind, language)
    if kind in SECRETARIAT_KINDS:
        return _digest_variants(base)
    if kind in MEETING_KINDS:
        return _meeting_variants(base)
    if kind not in FOLLOW_UP_KINDS:
        return [base]
    over = MISSING_LIST_LIMIT + 2
    full = _example_recorded(base["total"])
    missing = [{"key": item["key"], "label": item["label"]} for item in full]
    many = {
        **base,
        "recorded": full[:over],
        "changed_outside": (_EXAMPLE_CHANGED * over)[:over],
        "unreadable": (_EXAMPLE_UNREADABLE * over)[:over],
    }
    single = {
        **base,
        "recorded": full[:1],
        "changed_outside": _EXAMPLE_CHANGED[:1],
        "unreadable": _EXAMPLE_UNREADABLE[:1],
        "missing": [] if kind == "receipt" else missing[:1],
        "filled": base["total"] if kind == "receipt" else base["total"] - 1,
        "deadline_passed": True,
        "days_overdue": 2,
    }
    empty = {
        **base,
        "reply_subject": "",
        "recorded": [],
        "changed_outside": [],
        "unreadable": [],
        "missing": [] if kind == "receipt" else missing,
        "filled": base["total"] if kind == "receipt" else 0,
    }
    return [base, many, single, empty]


# --------------------------------------------------------------------------
# The MIME message
# --------------------------------------------------------------------------
#
# build_message_bytes writes the message out directly: the email package's object model costs
# milliseconds per message (building it, then refolding every header in as_bytes), which is
# most of the time it takes to send a campaign. build_message parses those very bytes back, so
# there is one writer and one set of checks behind both.

_CRLF = "\r\n"
_SOFT_LINE_LIMIT = 78  # RFC 5322 section 2.1.1: a line SHOULD be at most 78 characters…
_LINE_LIMIT = 998  # …and MUST be at most 998.

# A plain address that the header parser would accept unchanged: dot-atom@dot-atom, ASCII, no encoded word.
# Anything else (quoted local parts, comments, domain literals, mistakes) goes through the full parser.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_SIMPLE_ADDRESS_RE = re.compile(rf"(?!.*=\?){_ATEXT}+(?:\.{_ATEXT}+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")
# A Message-ID as RFC 5322 writes it: <left@right>, printable ASCII, no space, no second angle bracket or @.
_MESSAGE_ID_CHAR = r"[\x21-\x3b\x3d\x3f\x41-\x7e]"  # printable ASCII but "<", ">" and "@"
_MESSAGE_ID_RE = re.compile(rf"<{_MESSAGE_ID_CHAR}+@{_MESSAGE_ID_CHAR}+>")
# A MIME type made of two RFC 2045 tokens.
_MIME_TOKEN = r"[A-Za-z0-9!#$%&'*+.^_`|~-]+"
_MIME_TYPE_RE = re.compile(rf"{_MIME_TOKEN}/{_MIME_TOKEN}")
_MIME_TOKEN_RE = re.compile(_MIME_TOKEN)
# Characters that may not stand unquoted in a display name (RFC 5322 "specials").
_PHRASE_SPECIALS_RE = re.compile(r'[][\\()<>@,:;".]')

# RFC 2047 "Q" encoded words, with the restricted character set of section 5 (3), so that the same
# words are valid in a Subject, in a display name and in a quoted parameter value.
_EW_PREFIX = "=?utf-8?q?"
_EW_SUFFIX = "?="
_EW_PAYLOAD_LIMIT = 75 - len(_EW_PREFIX) - len(_EW_SUFFIX)  # an encoded word is at most 75 characters
_EW_CHAR_MAX = 12  # the longest encoding of one code point: four UTF-8 bytes, each =XX
_Q_BYTE = tuple(
    "_"
    if byte == 0x20
    else chr(byte)
    if chr(byte).isascii() and (chr(byte).isalnum() or chr(byte) in "!*+-/")
    else f"={byte:02X}"
    for byte in range(256)
)
_Q_CHARS: dict[str, str] = {}
# A quoted-printable line whose encoded white space at the end took it past 76 characters.
_QP_LONG_WHITESPACE_END_RE = re.compile(rb"^([^\r\n]{74,})(=20|=09)\r$", re.MULTILINE)
# 64 base64 lines of 76 characters, unpacked in one call (see _base64).
_BASE64_BLOCK = struct.Struct("76s" * 64)

_TEXT_PART_HEADERS = 'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n'


def _safe(header: str, value: str) -> str:
    if _HEADER_CONTROL_RE.search(value):
        raise TemplateError(
            f"header {header}: value {value!r} contains a line break or control character; refusing to send it"
        )
    return value


def _addr_spec(header: str, address: str) -> str:
    """``address`` as it is written in ``header``: one plain addr-spec, or a TemplateError naming the header."""
    address = _safe(header, address).strip()
    if _SIMPLE_ADDRESS_RE.fullmatch(address):
        return address
    try:
        spec = Address(addr_spec=address).addr_spec
    except (ValueError, IndexError, HeaderParseError) as exc:
        raise TemplateError(f"header {header}: {address!r} is not a valid email address ({exc})") from None
    if not spec.isascii():
        # Without SMTPUTF8 the address would go out as an encoded word, which is not an address at all.
        raise TemplateError(
            f"header {header}: {address!r} is not a valid email address (non-ASCII; write the domain in its xn-- form)"
        )
    return spec


def _q_char(char: str) -> str:
    encoded = _Q_CHARS.get(char)
    if encoded is None:
        encoded = "".join([_Q_BYTE[byte] for byte in char.encode("utf-8")])
        if len(_Q_CHARS) < 4096:
            _Q_CHARS[char] = encoded
    return encoded


def _q_payloads(text: str, first: int) -> list[str]:
    """``text`` Q-encoded in pieces of at most ``first``, then :data:`_EW_PAYLOAD_LIMIT`, characters.

    A piece is never cut inside a character (each encoded word must decode on its own), and
    where it can it ends just after a space (``_``): a reader that wrongly keeps the white
    space between two encoded words then shows a double space rather than a word cut in two.
    """
    payloads: list[str] = []
    current = ""
    limit = first
    for char in text:
        encoded = _q_char(char)
        if current and len(current) + len(encoded) > limit:
            cut = current.rfind("_") + 1  # "_" is only ever an encoded space: a literal "_" is "=5F"
            if cut * 2 < len(current) or cut == len(current):
                cut = len(current)
            payloads.append(current[:cut])
            current = current[cut:]
            limit = _EW_PAYLOAD_LIMIT
        current += encoded
    payloads.append(current)
    return payloads


def _words(value: str, needs_encoding: Callable[[str], bool]) -> list[tuple[bool, str]]:
    """``value`` cut at its spaces into ``(encode, text)`` tokens that are written one space apart.

    A word that ``needs_encoding`` is encoded together with the encoded words that follow it
    (and the empty words of a run of spaces between them): a decoder drops the white space
    between two encoded words, so the spaces between them must be inside the encoding.
    """
    words = value.split(" ")
    tokens: list[tuple[bool, str]] = []
    i = 0
    while i < len(words):
        if not needs_encoding(words[i]):
            tokens.append((False, words[i]))
            i += 1
            continue
        last = i
        for j in range(i + 1, len(words)):
            if words[j] and not needs_encoding(words[j]):
                break
            if words[j]:
                last = j
        tokens.append((True, " ".join(words[i : last + 1])))
        i = last + 1
    return tokens


def _field(name: str, tokens: Sequence[tuple[bool, str]]) -> str:
    """One header field, CRLF-terminated, folded at the spaces between tokens to lines of 78 where possible.

    Encoded tokens become as many RFC 2047 encoded words as they need, each cut to fit the
    line it starts on (and never inside a character). A line is only folded after a word, so
    no continuation line is white space alone. A line longer than 998 (one word that long)
    is refused.
    """
    lines: list[str] = []
    line = f"{name}:"
    has_word = False
    for encode, text in tokens:
        if not encode:
            if text and has_word and len(line) + 1 + len(text) > _SOFT_LINE_LIMIT:
                lines.append(line)
                line = ""
            line += f" {text}"
            has_word = has_word or bool(text)
            continue
        room = min(_EW_PAYLOAD_LIMIT, _SOFT_LINE_LIMIT - len(line) - 1 - len(_EW_PREFIX) - len(_EW_SUFFIX))
        if room < _EW_CHAR_MAX and has_word:
            lines.append(line)
            line = ""
            room = _EW_PAYLOAD_LIMIT
        try:
            payloads = _q_payloads(text, max(room, _EW_CHAR_MAX))
        except UnicodeEncodeError:
            raise TemplateError(f"header {name}: value {text!r} is not valid Unicode") from None
        for payload in payloads[:-1]:
            lines.append(f"{line} {_EW_PREFIX}{payload}{_EW_SUFFIX}")
            line = ""
        line += f" {_EW_PREFIX}{payloads[-1]}{_EW_SUFFIX}"
        has_word = True
    lines.append(line if has_word else f"{name}:")
    for written in lines:
        if len(written) > _LINE_LIMIT:
            raise TemplateError(
                f"header {name}: a line of {len(written)} characters cannot be folded to the {_LINE_LIMIT} limit"
            )
    return _CRLF.join(lines) + _CRLF


def _unstructured(name: str, value: str) -> str:
    """A header whose value is text (Subject, X-…, References…): non-ASCII words RFC 2047 encoded.

    A word that looks like an encoded word is encoded too, so that a reader does not decode
    what was plain text; so is a word too long for any line, which encoding can split.
    """
    longest = _LINE_LIMIT - len(name) - 2

    def needs_encoding(word: str) -> bool:
        return not word.isascii() or "=?" in word or len(word) > longest

    return _field(name, _words(_safe(name, value), needs_encoding))


def _mailbox(header: str, display_name: str, address: str) -> str:
    """``Name <address>``: an ASCII name as atoms or one quoted string, any other one RFC 2047 encoded."""
    spec = _addr_spec(header, address)
    _safe(header, display_name)
    if not display_name:
        return _field(header, [(False, spec)])
    if display_name.isascii() and "=?" not in display_name:
        if _PHRASE_SPECIALS_RE.search(display_name):
            display_name = '"{}"'.format(display_name.replace("\\", "\\\\").replace('"', '\\"'))
        tokens = [(False, word) for word in display_name.split(" ")]
    else:
        # Words with specials are encoded too: RFC 2047 allows encoded words, not quoted strings, next to atoms.
        tokens = _words(
            display_name,
            lambda word: not word.isascii() or "=?" in word or _PHRASE_SPECIALS_RE.search(word) is not None,
        )
    return _field(header, [*tokens, (False, f"<{spec}>")])


def _extra_headers(language: str | None, headers: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """Auto-Submitted, Content-Language and the caller's ``headers`` by lower-case name (values checked when written).

    A given header replaces a default of the same name (and moves to the end, where the given
    ones go); a malformed name, the structure headers and those with their own parameter are refused.
    """
    fields = {"auto-submitted": ("Auto-Submitted", "auto-generated")}
    if language:
        fields["content-language"] = ("Content-Language", language)
    for name, value in headers.items():
        if not _HEADER_NAME_RE.match(name):
            raise TemplateError(f"header {name!r}: not a valid header name")
        key = name.lower()
        if key in _RESERVED_HEADERS:
            raise TemplateError(f"header {name}: set by the MIME structure, cannot be given")
        if key in _PARAMETER_HEADERS:
            raise TemplateError(f"header {name}: set from its own parameter, cannot be given in headers")
        fields.pop(key, None)
        fields[key] = (name, value)
    return fields


def _quoted_printable(text: str) -> bytes:
    """``text`` in UTF-8, quoted-printable (RFC 2045 section 6.7), CRLF line ends, lines of at most 76.

    Every line break (LF, CR or CRLF) becomes CRLF and the text ends with one, as the email
    package does. In text mode with CRLF input ``b2a_qp`` encodes ``=`` (``=3D``), controls
    and 8-bit bytes, breaks lines with a soft ``=`` at 76, and encodes white space at the end
    of a line and a line that is a lone ``.`` (``=2E``, which a relay could take for the end
    of the data). Two corners it misses are put right here: the encoded trailing space makes
    a 77-character line (it is moved to a line of its own), and a lone ``.`` after a soft
    line break is not encoded.
    """
    lines = text.encode("utf-8").splitlines()
    encoded = binascii.b2a_qp(b"\r\n".join(lines) + b"\r\n", istext=True)
    if b"=20\r\n" in encoded or b"=09\r\n" in encoded:
        encoded = _QP_LONG_WHITESPACE_END_RE.sub(b"\\1=\r\n\\2\r", encoded)
    return encoded.replace(b"=\r\n.\r\n", b"=\r\n=2E\r\n")


def _base64(data: bytes) -> bytes:
    """``data`` in base64, lines of 76 characters (57 bytes) each ended by CRLF.

    One ``b2a_base64`` call, then the lines are cut out 64 at a time by ``struct`` (in C):
    a 50 KB workbook has ~900 lines, and a Python loop over them costs more than the encoding.
    """
    encoded = binascii.b2a_base64(data, newline=False)
    cut = len(encoded) - len(encoded) % _BASE64_BLOCK.size
    lines = list(chain.from_iterable(_BASE64_BLOCK.iter_unpack(memoryview(encoded)[:cut])))
    lines += [encoded[start : start + 76] for start in range(cut, len(encoded), 76)]
    return b"\r\n".join(lines) + b"\r\n" if lines else b""


def _filename_parameters(filename: str) -> tuple[str, str]:
    """The Content-Type ``name=`` and Content-Disposition ``filename`` parameters for an attachment.

    An ASCII name is the same quoted string in both. A non-ASCII one (``Plan estratégico -
    Honduras.xlsx``) is written the way MimeKit, Nodemailer and Thunderbird settled on, for
    readers of both kinds:

    * Content-Disposition ``filename*=utf-8''Plan%20estrat%C3%A9gico%20-%20Honduras.xlsx``:
      RFC 2231, the standard form (what Python's email package writes), read by Gmail, Apple
      Mail, Thunderbird and Python, which all take the Content-Disposition filename first;
    * Content-Type ``name="=?utf-8?q?Plan_estrat=C3=A9gico...?="``: RFC 2047 inside quotes,
      folded between its encoded words. RFC 2047 does not allow encoded words in parameters
      (Python's parser notes it as a header defect, and decodes it), but it is the form that
      Outlook/Exchange and other readers without RFC 2231 support look for, and what Outlook
      and Gmail write themselves; without it they show "ATT00001.bin" or "Untitled attachment".

    No plain ASCII ``filename="Plan estrategico…"`` beside ``filename*``: RFC 2231 says nothing
    of which wins, and Python (among others) takes the first of the two and flags a duplicate
    parameter, so a transliterated fallback would be what some readers show.
    """
    if filename.isascii() and "=?" not in filename:
        quoted = '"{}"'.format(filename.replace("\\", "\\\\").replace('"', '\\"'))
        return f"name={quoted}", f"filename={quoted}"
    try:
        # The first word shares its line with ' name="' (7) and perhaps the closing quote: 78 at most.
        payloads = _q_payloads(filename, _SOFT_LINE_LIMIT - 8 - len(_EW_PREFIX) - len(_EW_SUFFIX) - 1)
    except UnicodeEncodeError:
        raise TemplateError(f"attachment {filename!r}: the file name is not valid Unicode") from None
    encoded_words = f"{_CRLF} ".join(f"{_EW_PREFIX}{payload}{_EW_SUFFIX}" for payload in payloads)
    return f'name="{encoded_words}"', f"filename*={encode_rfc2231(filename, 'utf-8')}"


def _attachment_part(attachment: Attachment) -> bytes:
    _safe("Content-Disposition (attachment filename)", attachment.filename)
    if not _MIME_TYPE_RE.fullmatch(attachment.mime_type) or attachment.mime_type.lower().startswith(
        ("multipart/", "message/")
    ):
        raise TemplateError(f"attachment {attachment.filename!r}: {attachment.mime_type!r} is not a MIME type")
    name, filename = _filename_parameters(attachment.filename)
    extra = _type_parameters(attachment)
    head = (
        f"Content-Type: {attachment.mime_type};{extra}{_CRLF} {name}{_CRLF}"
        f"Content-Transfer-Encoding: base64{_CRLF}"
        f"Content-Disposition: attachment;{_CRLF} {filename}{_CRLF}{_CRLF}"
    )
    for line in head.split(_CRLF):
        if len(line) > _LINE_LIMIT:
            raise TemplateError(f"attachment {attachment.filename!r}: the file name is too long for a header line")
    return head.encode("ascii") + _base64(attachment.content)


def _type_parameters(attachment: Attachment) -> str:
    """``attachment.parameters`` as Content-Type parameters (`` method=REQUEST; charset=utf-8;``), checked."""
    extra = ""
    for key, value in attachment.parameters:
        if not _MIME_TOKEN_RE.fullmatch(key) or not _MIME_TOKEN_RE.fullmatch(value):
            raise TemplateError(f"attachment {attachment.filename!r}: {key}={value!r} is not a Content-Type parameter")
        extra += f" {key}={value};"
    return extra


def _calendar_part(calendar: Attachment) -> bytes:
    """A calendar object as the last part of ``multipart/alternative``: inline, no file name (RFC 6047)."""
    if calendar.mime_type != "text/calendar":
        raise TemplateError(f"calendar {calendar.filename!r}: {calendar.mime_type!r} is not text/calendar")
    extra = _type_parameters(calendar).rstrip(";")
    head = f"Content-Type: text/calendar;{extra}{_CRLF}Content-Transfer-Encoding: base64{_CRLF}{_CRLF}"
    return head.encode("ascii") + _base64(calendar.content)


def _boundaries(message_id: str) -> tuple[str, str]:
    """The multipart/mixed and multipart/alternative boundaries: ``=_mf_<24 hex of the Message-ID's hash>_<n>``.

    They can never occur in the parts, so they need no search through the content:
    quoted-printable writes ``=`` only as ``=XX`` (two hex digits) or as a soft line break at
    the very end of a line, so never ``=_``; base64 has no ``-`` or ``_`` and ``=`` only as
    final padding; the part headers are ours and start with a letter or a space. So no line
    of the content starts ``--=_``. The two differ only in their last character and have
    the same length, so neither is a prefix of the other (some readers match delimiters by
    prefix). Derived from the Message-ID, they are distinct for every message and the same
    inputs always give the same bytes.
    """
    digest = hashlib.sha256(message_id.encode("ascii")).hexdigest()[:24]
    return f"=_mf_{digest}_0", f"=_mf_{digest}_1"


def build_message_bytes(
    *,
    rendered: RenderedEmail,
    from_name: str,
    from_address: str,
    to: Sequence[str],
    reply_to: str,
    message_id: str,
    date: datetime,
    headers: Mapping[str, str],
    attachments: Sequence[Attachment] = (),
    calendar: Attachment | None = None,
) -> bytes:
    """Assemble one email as the bytes to send over SMTP: 7-bit, CRLF line endings.

    The body is ``multipart/alternative`` (text, then HTML, both UTF-8 quoted-printable,
    then ``calendar``, a text/calendar object, when given); with attachments (base64) it is
    wrapped in ``multipart/mixed``. Non-ASCII in the
    display name, the subject and other text headers is RFC 2047 encoded; header lines are
    folded to 78 characters where their words allow, and never exceed 998. ``headers`` are
    added last and may replace a default (``Auto-Submitted``: a receipt is
    ``auto-replied``; ``Content-Language``), but not the MIME structure headers nor those
    with their own parameter (From, To, Reply-To, Subject, Date, Message-ID). Any value
    with a line break or control character, or any invalid address, date, Message-ID or
    MIME type, raises :class:`TemplateError` naming the header: nothing is sent half-checked.
    """
    if not to:
        raise TemplateError("header To: no recipients")
    if date.tzinfo is None or date.utcoffset() is None:
        raise TemplateError(f"header Date: naive datetime {date.isoformat()} where an aware one is required")
    if not _MESSAGE_ID_RE.fullmatch(_safe("Message-ID", message_id)) or len(message_id) > _LINE_LIMIT - 12:
        raise TemplateError(f"header Message-ID: {message_id!r} is not a valid message id")
    recipients = [_addr_spec("To", address) for address in to]
    top = [
        _mailbox("From", from_name, from_address),
        _field("To", [(False, f"{spec},") for spec in recipients[:-1]] + [(False, recipients[-1])]),
        _field("Reply-To", [(False, _addr_spec("Reply-To", reply_to))]),
        _unstructured("Subject", rendered.subject),
        f"Date: {rfc5322_datetime(date)}{_CRLF}",
        f"Message-ID: {message_id}{_CRLF}",
        f"MIME-Version: 1.0{_CRLF}",
    ]
    top.extend(_unstructured(name, value) for name, value in _extra_headers(rendered.language, headers).values())
    parts = [_attachment_part(attachment) for attachment in attachments]
    try:
        text = _quoted_printable(rendered.text)
        html = _quoted_printable(rendered.html)
    except UnicodeEncodeError:
        raise TemplateError("the message body is not valid Unicode (a lone surrogate)") from None
    mixed, alternative = _boundaries(message_id)
    calendar_part = (
        (f"{_CRLF}--{alternative}{_CRLF}".encode("ascii"), _calendar_part(calendar)) if calendar is not None else ()
    )
    alternative_body = b"".join(
        (
            f"--{alternative}{_CRLF}{_TEXT_PART_HEADERS.format(subtype='plain')}{_CRLF}".encode("ascii"),
            text,
            f"{_CRLF}--{alternative}{_CRLF}{_TEXT_PART_HEADERS.format(subtype='html')}{_CRLF}".encode("ascii"),
            html,
            *calendar_part,
            f"{_CRLF}--{alternative}--{_CRLF}".encode("ascii"),
        )
    )
    alternative_type = f'Content-Type: multipart/alternative;{_CRLF} boundary="{alternative}"{_CRLF}{_CRLF}'
    if not parts:
        return b"".join(("".join(top).encode("ascii"), alternative_type.encode("ascii"), alternative_body))
    chunks = [
        "".join(top).encode("ascii"),
        f'Content-Type: multipart/mixed; boundary="{mixed}"{_CRLF}{_CRLF}--{mixed}{_CRLF}'.encode("ascii"),
        alternative_type.encode("ascii"),
        alternative_body,
    ]
    delimiter = f"{_CRLF}--{mixed}{_CRLF}".encode("ascii")
    for part in parts:
        chunks += (delimiter, part)
    chunks.append(f"{_CRLF}--{mixed}--{_CRLF}".encode("ascii"))
    return b"".join(chunks)


# The SMTP policy, but header lines are written back as they were parsed: they are folded already, and
# Python's refolding of a long line breaks tokens (a long MIME type came out as "…sp readsheetml.sheet").
_PARSE_POLICY = email_policy.SMTP.clone(refold_source="none")


def build_message(
    *,
    rendered: RenderedEmail,
    from_name: str,
    from_address: str,
    to: Sequence[str],
    reply_to: str,
    message_id: str,
    date: datetime,
    headers: Mapping[str, str],
    attachments: Sequence[Attachment] = (),
    calendar: Attachment | None = None,
) -> EmailMessage:
    """The email of :func:`build_message_bytes` as an :class:`~email.message.EmailMessage` (SMTP policy).

    It is those very bytes parsed back, so both take the same checks and ``as_bytes()``
    gives the same bytes back; for the preview and for tests. Sending uses the bytes.
    """
    raw = build_message_bytes(
        rendered=rendered,
        from_name=from_name,
        from_address=from_address,
        to=to,
        reply_to=reply_to,
        message_id=message_id,
        date=date,
        headers=headers,
        attachments=attachments,
        calendar=calendar,
    )
    message = BytesParser(policy=_PARSE_POLICY).parsebytes(raw)
    if not isinstance(message, EmailMessage):  # pragma: no cover - an EmailPolicy always makes one
        raise TypeError(f"expected an EmailMessage, got {type(message).__name__}")
    return message
