"""Turn Jinja2 templates into ready-to-send :class:`~email.message.EmailMessage` objects.

Three layers, each usable on its own:

* formatting helpers (:func:`format_date`, :func:`format_datetime`, :func:`timezone_label`)
  that write dates the way a reader of each language expects them;
* :class:`Renderer`, which renders one kind of email in one language from the
  built-in templates or the operator's overrides, and reports every problem as a
  :class:`~mailflow.errors.TemplateError` naming the file;
* :func:`build_message`, which assembles the MIME message and refuses any header
  value that could inject another header.

The subject carries a reference such as ``[Ref. responsible-2017/HN]`` so that a
reply can be matched by its subject alone (:func:`parse_subject_reference`).
"""

from __future__ import annotations

import hashlib
import re
import traceback
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from email import policy as email_policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime as rfc5322_datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import jinja2
from babel.dates import format_date as babel_format_date

from mailflow.errors import TemplateError

CAMPAIGN_KINDS = ("request", "reminder", "overdue")
"""Emails the schedule sends on its own: the request, reminders before the deadline, notices after it."""

FOLLOW_UP_KINDS = ("receipt", "missing", "unreadable")
"""Emails sent in answer to a delegation's reply (threaded, ``Re: <their subject>``)."""

KINDS_WITH_TEMPLATES = CAMPAIGN_KINDS + FOLLOW_UP_KINDS
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
_RESERVED_HEADERS = frozenset({"content-type", "content-transfer-encoding", "mime-version"})

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


def format_date(d: date, language: str) -> str:
    """Write a date out in full: ``lunes 23 de octubre de 2017`` / ``Monday, 23 October 2017``."""
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
    """A file attached to an outgoing email (by default, an .xlsx workbook)."""

    filename: str
    content: bytes
    mime_type: str = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"


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
    """
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


def _check_contexts(kind: str, language: str) -> list[dict[str, Any]]:
    """The contexts :meth:`Renderer.check` renders ``kind`` with.

    The example, and for a follow-up three variants that between them take every
    branch of the built-in templates: lists over the limit, single items with the
    deadline passed, and everything empty (no subject, nothing recorded yet).
    """
    base = example_context(kind, language)
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


def _safe(header: str, value: str) -> str:
    if _HEADER_CONTROL_RE.search(value):
        raise TemplateError(
            f"header {header}: value {value!r} contains a line break or control character; refusing to send it"
        )
    return value


def _address(header: str, addr_spec: str, display_name: str = "") -> Address:
    _safe(header, addr_spec)
    _safe(header, display_name)
    try:
        return Address(display_name=display_name, addr_spec=addr_spec.strip())
    except (ValueError, IndexError) as exc:
        raise TemplateError(f"header {header}: {addr_spec!r} is not a valid email address ({exc})") from None


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
) -> EmailMessage:
    """Assemble one email, ready for SMTP (CRLF line endings).

    The body is ``multipart/alternative`` (text, then HTML); with attachments it is
    wrapped in ``multipart/mixed``. ``headers`` are added last and may replace a
    default such as ``Auto-Submitted`` (a receipt is ``auto-replied``), but not the
    MIME structure headers. Any value with a line break or control character raises
    :class:`TemplateError` naming the header: nothing is sent half-checked.
    """
    if not to:
        raise TemplateError("header To: no recipients")
    if date.tzinfo is None or date.utcoffset() is None:
        raise TemplateError(f"header Date: naive datetime {date.isoformat()} where an aware one is required")
    msg = EmailMessage(policy=email_policy.SMTP)
    msg["From"] = _address("From", from_address, from_name)
    msg["To"] = tuple(_address("To", addr) for addr in to)
    msg["Reply-To"] = _address("Reply-To", reply_to)
    msg["Subject"] = _safe("Subject", rendered.subject)
    msg["Date"] = rfc5322_datetime(date)
    msg["Message-ID"] = _safe("Message-ID", message_id)
    msg["MIME-Version"] = "1.0"
    msg["Auto-Submitted"] = "auto-generated"
    extra: dict[str, str] = {}
    if rendered.language:
        extra["Content-Language"] = _safe("Content-Language", rendered.language)
    for name, value in headers.items():
        if not _HEADER_NAME_RE.match(name):
            raise TemplateError(f"header {name!r}: not a valid header name")
        if name.lower() in _RESERVED_HEADERS:
            raise TemplateError(f"header {name}: set by the MIME structure, cannot be given")
        extra[name] = _safe(name, value)
    for attachment in attachments:
        _safe("Content-Disposition (attachment filename)", attachment.filename)
    msg.set_content(rendered.text, subtype="plain", charset="utf-8", cte="quoted-printable")
    msg.add_alternative(rendered.html, subtype="html", charset="utf-8", cte="quoted-printable")
    for attachment in attachments:
        maintype, _, subtype = attachment.mime_type.partition("/")
        if not maintype or not subtype:
            raise TemplateError(f"attachment {attachment.filename!r}: {attachment.mime_type!r} is not a MIME type")
        msg.add_attachment(attachment.content, maintype=maintype, subtype=subtype, filename=attachment.filename)
    # Added last: turning the message multipart moves every Content-* header down into the first part.
    for name, value in extra.items():
        del msg[name]
        msg[name] = value
    if msg["Message-ID"] != message_id:
        raise TemplateError(f"header Message-ID: {message_id!r} is not a valid message id")
    return msg
