"""Templates, date formatting, subject references and the MIME message of outgoing emails."""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import email.utils
import random
import re
from datetime import UTC, date, datetime
from email.header import decode_header
from email.headerregistry import Address
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from mailflow.errors import TemplateError
from mailflow.render import (
    BUILTIN_TEMPLATES,
    CAMPAIGN_KINDS,
    DELEGATION_KINDS,
    FOLLOW_UP_CONTEXT_KEYS,
    FOLLOW_UP_KINDS,
    KINDS_WITH_TEMPLATES,
    MEETING_KINDS,
    MISSING_LIST_LIMIT,
    REFERENCE_RE,
    SECRETARIAT_KINDS,
    Attachment,
    RenderedEmail,
    Renderer,
    build_message,
    build_message_bytes,
    example_context,
    format_date,
    format_datetime,
    make_message_id,
    parse_subject_reference,
    reply_subject_line,
    subject_reference,
    timezone_label,
)

LANGUAGES = ("es", "en")
TITLES = {"es": "Plan Estratégico 2017-2022: columna Responsable", "en": "Strategic Plan 2017-2022: Responsible column"}


def sample_context(
    kind: str = "request",
    language: str = "es",
    *,
    name: str = "Honduras",
    missing_count: int = 3,
    total: int = 40,
    days_left: int = 0,
    days_overdue: int = 0,
    **overrides: Any,
) -> dict[str, Any]:
    """The context the engine builds for one delegation, with knobs for what tests vary."""
    deadline = date(2017, 10, 23)
    missing = [{"key": f"{1 + i // 5}.{1 + i % 5}", "label": f"Acción número {i + 1}"} for i in range(missing_count)]
    context: dict[str, Any] = {
        "kind": kind,
        "language": language,
        "secretariat": {"name": "Secretaría Técnica de la CRM", "address": "st@crm.example.org"},
        "delegation": {"id": "HN", "name": name},
        "campaign": {"id": "responsible-2017", "title": TITLES[language], "ref": "responsible-2017"},
        "reference": subject_reference("responsible-2017", "HN"),
        "fill_column": "Responsible",
        "deadline": deadline,
        "deadline_text": format_date(deadline, language),
        "timezone_label": timezone_label(name, language),
        "attachment_name": f"Plan estratégico - {name}.xlsx",
        "total": total,
        "filled": total - missing_count,
        "missing": missing,
        "days_left": days_left,
        "days_overdue": days_overdue,
    }
    if kind in FOLLOW_UP_KINDS:  # what the engine adds when it answers a delegation's message
        context.update(
            {
                "reply_subject": f"RE: {TITLES[language]} — {name} {context['reference']}",
                "received_at_text": format_datetime(
                    datetime(2017, 10, 21, 16, 15, tzinfo=UTC), ZoneInfo("America/Tegucigalpa"), language
                ),
                "recorded": recorded_items(2, first_line=5),
                "changed_outside": [],
                "unreadable": [],
                "deadline_passed": False,
            }
        )
    context.update(overrides)
    return context


def recorded_items(count: int, *, first_line: int = 1) -> list[dict[str, str]]:
    """``count`` recorded answers, keys ``{first_line}.1`` onwards, five per line."""
    return [
        {
            "key": f"{first_line + i // 5}.{1 + i % 5}",
            "label": f"Acción número {i + 1}",
            "value": f"Institución {i + 1}",
        }
        for i in range(count)
    ]


@pytest.fixture
def renderer() -> Renderer:
    return Renderer()


# --------------------------------------------------------------------------
# Dates and time zones
# --------------------------------------------------------------------------


def test_format_date_in_both_languages() -> None:
    assert format_date(date(2017, 10, 23), "es") == "lunes 23 de octubre de 2017"
    assert format_date(date(2017, 10, 23), "en") == "Monday, 23 October 2017"


def test_format_date_refuses_an_unknown_language() -> None:
    with pytest.raises(TemplateError, match="fr"):
        format_date(date(2017, 10, 23), "fr")


def test_format_datetime_uses_the_readers_time_zone() -> None:
    instant = datetime(2017, 10, 23, 15, 0, tzinfo=UTC)
    # Honduras is UTC-6 all year; Washington was on daylight time (UTC-4) in October 2017.
    assert format_datetime(instant, ZoneInfo("America/Tegucigalpa"), "es") == "lunes 23 de octubre de 2017, 09:00"
    assert format_datetime(instant, ZoneInfo("America/New_York"), "en") == "Monday, 23 October 2017, 11:00"


def test_format_datetime_crosses_midnight_into_the_local_day() -> None:
    instant = datetime(2017, 10, 23, 3, 30, tzinfo=UTC)
    assert format_datetime(instant, ZoneInfo("America/Tegucigalpa"), "es") == "domingo 22 de octubre de 2017, 21:30"
    assert format_datetime(instant, ZoneInfo("America/New_York"), "en") == "Sunday, 22 October 2017, 23:30"


def test_format_datetime_refuses_a_naive_time() -> None:
    with pytest.raises(TemplateError, match="naive"):
        format_datetime(datetime(2017, 10, 23, 9, 0), ZoneInfo("America/Tegucigalpa"), "es")


def test_timezone_label() -> None:
    assert timezone_label("Honduras", "es") == "hora de Honduras"
    assert timezone_label("Honduras", "en") == "Honduras time"


def test_datetime_filter_in_a_template(tmp_path: Path) -> None:
    (tmp_path / "es").mkdir()
    (tmp_path / "es" / "request.subject.j2").write_text(
        "{{ when|datetime_text('America/Panama', language) }} / {{ deadline|date_text('en') }} {{ reference }}",
        encoding="utf-8",
    )
    context = sample_context(when=datetime(2017, 10, 23, 15, 0, tzinfo=UTC))
    rendered = Renderer(override_dir=tmp_path).render("request", "es", context)
    assert rendered.subject.startswith("lunes 23 de octubre de 2017, 10:00 / Monday, 23 October 2017")


# --------------------------------------------------------------------------
# Rendering the built-in templates
# --------------------------------------------------------------------------


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("kind", DELEGATION_KINDS)
def test_every_kind_renders_in_every_language(renderer: Renderer, kind: str, language: str) -> None:
    context = sample_context(kind, language, days_left=3 if kind == "reminder" else 0, days_overdue=2)
    rendered = renderer.render(kind, language, context)
    assert rendered.language == language
    assert rendered.subject.endswith("[Ref. responsible-2017/HN]")
    assert "Honduras" in rendered.subject
    assert "\n" not in rendered.subject
    assert parse_subject_reference(rendered.subject) == ("responsible-2017", "HN")
    greeting = "Estimados/as funcionarios/as de enlace" if language == "es" else "Dear liaison officers"
    for body in (rendered.text, rendered.html):
        assert greeting in body
        assert "Secretaría Técnica de la CRM" in body
        assert context["deadline_text"] in body
        assert context["timezone_label"] in body
    assert rendered.html.lstrip().startswith("<!DOCTYPE html>")
    assert "<script" not in rendered.html
    assert "http://" not in rendered.html and "https://" not in rendered.html  # no external resources
    assert f'lang="{language}"' in rendered.html


@pytest.mark.parametrize("language", LANGUAGES)
def test_request_explains_the_task(renderer: Renderer, language: str) -> None:
    rendered = renderer.render("request", language, sample_context("request", language))
    for body in (rendered.text, rendered.html):
        assert "Responsible" in body
        assert "Plan estratégico - Honduras.xlsx" in body
        assert "1.1: " in body  # an example of the "code: institution" fallback
    assert ("código: institución" if language == "es" else "code: institution") in rendered.text


@pytest.mark.parametrize(
    ("language", "days_left", "expected"),
    [
        ("es", 3, "vence en 3 días, el lunes 23 de octubre de 2017"),
        ("es", 1, "vence mañana, lunes 23 de octubre de 2017"),
        ("es", 0, "hoy, lunes 23 de octubre de 2017, es el último día del plazo"),
        ("en", 3, "is in 3 days, on Monday, 23 October 2017"),
        ("en", 1, "is tomorrow, Monday, 23 October 2017"),
        ("en", 0, "today, Monday, 23 October 2017, is the deadline"),
    ],
)
def test_reminder_says_how_many_days_are_left(renderer: Renderer, language: str, days_left: int, expected: str) -> None:
    rendered = renderer.render("reminder", language, sample_context("reminder", language, days_left=days_left))
    assert expected in rendered.text
    assert expected in re.sub(r"</?strong>", "", rendered.html)


@pytest.mark.parametrize(("language", "expected"), [("es", "37 de las 40"), ("en", "37 of the 40")])
def test_reminder_counts_what_is_already_received(renderer: Renderer, language: str, expected: str) -> None:
    rendered = renderer.render("reminder", language, sample_context("reminder", language, missing_count=3))
    assert expected in rendered.text
    assert "2.1" not in rendered.text
    for key in ("1.1", "1.2", "1.3"):
        assert f"- {key}: " in rendered.text


@pytest.mark.parametrize(("language", "more"), [("es", "y 7 más"), ("en", "and 7 more")])
def test_missing_list_is_capped(renderer: Renderer, language: str, more: str) -> None:
    count = MISSING_LIST_LIMIT + 7
    context = sample_context("reminder", language, missing_count=count, days_left=1)
    rendered = renderer.render("reminder", language, context)
    listed = re.findall(r"^  - (\S+):", rendered.text, flags=re.MULTILINE)
    assert listed == [item["key"] for item in context["missing"][:MISSING_LIST_LIMIT]]
    assert more in rendered.text
    assert more in rendered.html
    assert str(count) in rendered.text  # the full count is still stated


def test_missing_list_at_the_limit_is_not_capped(renderer: Renderer) -> None:
    rendered = renderer.render("overdue", "en", sample_context("overdue", "en", missing_count=MISSING_LIST_LIMIT))
    assert "more" not in rendered.text
    assert len(re.findall(r"^  - ", rendered.text, flags=re.MULTILINE)) == MISSING_LIST_LIMIT


@pytest.mark.parametrize(
    ("language", "days", "expected"),
    [("es", 1, "hace 1 día"), ("es", 4, "hace 4 días"), ("en", 1, "1 day ago"), ("en", 4, "4 days ago")],
)
def test_overdue_says_how_long_ago_the_deadline_passed(
    renderer: Renderer, language: str, days: int, expected: str
) -> None:
    rendered = renderer.render("overdue", language, sample_context("overdue", language, days_overdue=days))
    assert expected in rendered.text
    assert expected in rendered.html
    assert ("a la mayor brevedad posible" if language == "es" else "as soon as possible") in rendered.text


def test_html_is_escaped_and_text_is_not(renderer: Renderer) -> None:
    name = "<script>alert(1)</script> & Co"
    rendered = renderer.render("reminder", "en", sample_context("reminder", "en", name=name, days_left=1))
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; Co" in rendered.html
    assert "<script>" not in rendered.html
    assert name in rendered.text
    assert name in rendered.subject


def test_missing_labels_are_escaped_in_html(renderer: Renderer) -> None:
    context = sample_context("reminder", "es", missing=[{"key": "1.1", "label": "Niñas <b>y</b> niños"}])
    rendered = renderer.render("reminder", "es", context)
    assert "Niñas &lt;b&gt;y&lt;/b&gt; niños" in rendered.html
    assert "Niñas <b>y</b> niños" in rendered.text


def test_labels_spanning_lines_are_listed_on_one(renderer: Renderer) -> None:
    context = sample_context("reminder", "es", missing=[{"key": "2.3", "label": "Fortalecer\ncapacidades\n  locales"}])
    rendered = renderer.render("reminder", "es", context)
    assert "  - 2.3: Fortalecer capacidades locales\n" in rendered.text


# --------------------------------------------------------------------------
# Errors, overrides and check()
# --------------------------------------------------------------------------


def test_missing_name_raises_naming_the_template(renderer: Renderer) -> None:
    context = sample_context("request", "es")
    del context["missing"]
    with pytest.raises(TemplateError, match=r"template es/request\.txt\.j2: 'missing' is undefined \(line \d+\)"):
        renderer.render("request", "es", context)


def test_missing_name_in_a_shared_piece_names_both_files(renderer: Renderer) -> None:
    context = sample_context("reminder", "en", days_left=1)
    del context["secretariat"]
    with pytest.raises(
        TemplateError,
        match=r"template en/reminder\.txt\.j2: 'secretariat' is undefined \(in en/_signature\.txt\.j2, line \d+\)",
    ):
        renderer.render("reminder", "en", context)


def test_missing_base_is_reported(tmp_path: Path) -> None:
    (tmp_path / "en").mkdir()
    (tmp_path / "en" / "request.html.j2").write_text('{% extends "en/_nobase.html.j2" %}', encoding="utf-8")
    with pytest.raises(TemplateError, match=r"en/request\.html\.j2 .*refers to en/_nobase\.html\.j2"):
        Renderer(override_dir=tmp_path).render("request", "en", sample_context("request", "en"))


def test_unknown_kind_is_a_template_error(renderer: Renderer) -> None:
    with pytest.raises(TemplateError, match=r"template es/nonsense\.subject\.j2 not found"):
        renderer.render("nonsense", "es", sample_context())


def test_override_wins_and_the_rest_stays_builtin(tmp_path: Path) -> None:
    (tmp_path / "es").mkdir()
    (tmp_path / "es" / "request.subject.j2").write_text(
        "Solicitud especial — {{ delegation.name }} {{ reference }}\n", encoding="utf-8"
    )
    renderer = Renderer(override_dir=tmp_path)
    rendered = renderer.render("request", "es", sample_context())
    assert rendered.subject == "Solicitud especial — Honduras [Ref. responsible-2017/HN]"
    assert "Estimados/as funcionarios/as de enlace" in rendered.text  # builtin text
    builtin = Renderer().render("request", "en", sample_context("request", "en"))
    assert renderer.render("request", "en", sample_context("request", "en")) == builtin
    assert renderer.check() == []


def test_override_without_the_reference_gets_it_appended(tmp_path: Path) -> None:
    (tmp_path / "en").mkdir()
    (tmp_path / "en" / "overdue.subject.j2").write_text("Pending: {{ delegation.name }}", encoding="utf-8")
    rendered = Renderer(override_dir=tmp_path).render("overdue", "en", sample_context("overdue", "en"))
    assert rendered.subject == "Pending: Honduras [Ref. responsible-2017/HN]"


def test_multiline_subject_template_is_collapsed(tmp_path: Path) -> None:
    (tmp_path / "en").mkdir()
    (tmp_path / "en" / "request.subject.j2").write_text(
        "{{ campaign.title }}\n   —   {{ delegation.name }}\n{{ reference }}\n", encoding="utf-8"
    )
    rendered = Renderer(override_dir=tmp_path).render("request", "en", sample_context("request", "en"))
    assert rendered.subject == f"{TITLES['en']} — Honduras [Ref. responsible-2017/HN]"


def test_an_override_base_changes_every_html_part(tmp_path: Path) -> None:
    (tmp_path / "en").mkdir()
    (tmp_path / "en" / "_base.html.j2").write_text("<div>{% block content %}{% endblock %}</div>", encoding="utf-8")
    renderer = Renderer(override_dir=tmp_path)
    for kind in DELEGATION_KINDS:
        html = renderer.render(kind, "en", sample_context(kind, "en")).html
        assert html.startswith("<div>") and html.rstrip().endswith("</div>")
        assert "<!DOCTYPE" not in html


def test_builtin_templates_check_clean() -> None:
    assert BUILTIN_TEMPLATES.is_dir()
    assert Renderer().check() == []


def test_check_finds_a_syntax_error_in_an_override(tmp_path: Path) -> None:
    (tmp_path / "en").mkdir()
    broken = tmp_path / "en" / "reminder.txt.j2"
    broken.write_text("Dear {{ delegation.name }},\n\n{% if days_left %}\nno end\n", encoding="utf-8")
    problems = Renderer(override_dir=tmp_path).check()
    assert len(problems) == 1
    assert "en/reminder.txt.j2" in problems[0]
    assert str(broken) in problems[0]
    assert "syntax error" in problems[0]
    assert "line" in problems[0]


def test_check_finds_a_broken_shared_piece_and_an_undefined_name(tmp_path: Path) -> None:
    (tmp_path / "es").mkdir()
    (tmp_path / "es" / "_signature.txt.j2").write_text("{{ secretariat.name ", encoding="utf-8")
    (tmp_path / "es" / "overdue.subject.j2").write_text("{{ delegaton.name }} {{ reference }}", encoding="utf-8")
    problems = Renderer(override_dir=tmp_path).check()
    assert any("es/_signature.txt.j2" in p and "syntax error" in p for p in problems)
    assert any("es/overdue.subject.j2" in p and "'delegaton' is undefined" in p for p in problems)


def test_check_flags_a_misspelt_override_and_a_missing_directory(tmp_path: Path) -> None:
    (tmp_path / "es").mkdir()
    (tmp_path / "es" / "reqest.txt.j2").write_text("hola", encoding="utf-8")
    problems = Renderer(override_dir=tmp_path).check()
    assert len(problems) == 1 and "es/reqest.txt.j2" in problems[0] and "not a known template" in problems[0]
    assert "does not exist" in Renderer(override_dir=tmp_path / "nowhere").check()[0]


def test_check_reports_a_missing_builtin(tmp_path: Path) -> None:
    for language in LANGUAGES:
        (tmp_path / language).mkdir()
        for path in (BUILTIN_TEMPLATES / language).iterdir():
            if path.name != "overdue.html.j2" or language != "en":
                (tmp_path / language / path.name).write_bytes(path.read_bytes())
    problems = Renderer(builtin_dir=tmp_path).check()
    assert problems == [f"template en/overdue.html.j2 not found (searched {tmp_path})"]


# --------------------------------------------------------------------------
# Subject references
# --------------------------------------------------------------------------


def test_subject_reference_round_trips() -> None:
    assert subject_reference("responsible-2017", "HN") == "[Ref. responsible-2017/HN]"
    assert REFERENCE_RE.search("x [Ref. responsible-2017/HN]") is not None


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("RE: RV: Plan Estratégico 2017-2022 — Honduras [Ref. responsible-2017/HN]", ("responsible-2017", "HN")),
        ("[ref: x/y]", ("x", "y")),
        ("Fwd:   Re: [ REF.  responsible-2017 / MX ] adjunto", ("responsible-2017", "MX")),
        ("RE: [Ref. old/HN] RE: [Ref. responsible.2017/CR]", ("responsible.2017", "CR")),
        ("Plan Estratégico 2017-2022 — Honduras", None),
        ("[Ref. responsible-2017]", None),
        ("[Ref. /HN]", None),
        ("", None),
    ],
)
def test_parse_subject_reference(subject: str, expected: tuple[str, str] | None) -> None:
    assert parse_subject_reference(subject) == expected


# --------------------------------------------------------------------------
# Message-IDs
# --------------------------------------------------------------------------

_MSG_ID_RE = re.compile(r"^<[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*@[a-z0-9.-]+>$")


def test_make_message_id_is_deterministic_and_distinct() -> None:
    one = make_message_id("crm.example.org", "responsible-2017", "HN", "reminder", "2017-10-22")
    assert one == make_message_id("crm.example.org", "responsible-2017", "HN", "reminder", "2017-10-22")
    assert one != make_message_id("crm.example.org", "responsible-2017", "HN", "reminder", "2017-10-20")
    # The hash is not fooled by moving a boundary between parts.
    assert make_message_id("d.org", "ab", "c") != make_message_id("d.org", "a", "bc")
    assert one.startswith("<mailflow.")
    assert one.endswith(".responsible-2017.HN.reminder.2017-10-22@crm.example.org>")
    assert _MSG_ID_RE.match(one)


def test_make_message_id_sanitizes_odd_parts() -> None:
    message_id = make_message_id("Example.ORG", "México", "a b..c", "<x>@y", "", "...")
    assert _MSG_ID_RE.match(message_id), message_id
    assert ".Mexico.a-b-c.x-y@example.org>" in message_id


# --------------------------------------------------------------------------
# The MIME message
# --------------------------------------------------------------------------


def _message(**overrides: Any) -> EmailMessage:
    rendered = Renderer().render("request", "es", sample_context())
    arguments: dict[str, Any] = {
        "rendered": rendered,
        "from_name": "Secretaría Técnica de la CRM",
        "from_address": "st@crm.example.org",
        "to": ["enlace@sre.example.hn", "migracion@example.hn"],
        "reply_to": "st@crm.example.org",
        "message_id": make_message_id("crm.example.org", "responsible-2017", "HN", "request"),
        "date": datetime(2017, 10, 18, 16, 0, tzinfo=UTC),
        "headers": {
            "X-Mailflow-Kind": "request",
            "X-Mailflow-Campaign": "responsible-2017",
            "X-Mailflow-Delegation": "HN",
        },
        "attachments": [Attachment("Plan estratégico - Honduras.xlsx", b"PK\x03\x04 fake workbook")],
    }
    arguments.update(overrides)
    return build_message(**arguments)


def test_build_message_round_trips() -> None:
    message_id = make_message_id("crm.example.org", "responsible-2017", "HN", "request")
    raw = _message().as_bytes()
    assert b"\r\n" in raw
    assert re.search(rb"(?<!\r)\n", raw) is None  # CRLF everywhere, no bare LF

    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    assert parsed["Message-ID"] == message_id
    assert parsed["Auto-Submitted"] == "auto-generated"
    assert parsed["X-Mailflow-Kind"] == "request"
    assert parsed["X-Mailflow-Campaign"] == "responsible-2017"
    assert parsed["X-Mailflow-Delegation"] == "HN"
    assert parsed["Content-Language"] == "es"
    assert parsed["Reply-To"] == "st@crm.example.org"
    assert parsed["Date"].datetime == datetime(2017, 10, 18, 16, 0, tzinfo=UTC)
    assert parse_subject_reference(str(parsed["Subject"])) == ("responsible-2017", "HN")
    assert "Plan Estratégico" in str(parsed["Subject"])

    sender = parsed["From"].addresses[0]
    assert sender.display_name == "Secretaría Técnica de la CRM"
    assert sender.addr_spec == "st@crm.example.org"
    assert b"=?utf-8?" in raw.split(b"\r\n\r\n", 1)[0]  # the non-ASCII name is RFC 2047 encoded
    assert [a.addr_spec for a in parsed["To"].addresses] == ["enlace@sre.example.hn", "migracion@example.hn"]

    assert parsed.get_content_type() == "multipart/mixed"
    alternative, attachment = parsed.get_payload()
    assert alternative.get_content_type() == "multipart/alternative"
    text, html = alternative.get_payload()
    assert text.get_content_type() == "text/plain" and text.get_content_charset() == "utf-8"
    assert html.get_content_type() == "text/html" and html.get_content_charset() == "utf-8"
    assert "Estimados/as funcionarios/as de enlace" in text.get_content()
    assert "<!DOCTYPE html>" in html.get_content()

    assert attachment.get_filename() == "Plan estratégico - Honduras.xlsx"
    assert attachment.get_content_type() == "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
    assert attachment.get_content() == b"PK\x03\x04 fake workbook"
    assert attachment.get_content_disposition() == "attachment"


def test_build_message_without_attachments_is_alternative() -> None:
    parsed = email.message_from_bytes(_message(attachments=()).as_bytes(), policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/alternative"


def test_a_calendar_is_the_last_alternative_of_the_body_inline() -> None:
    ics = b"BEGIN:VCALENDAR\r\nMETHOD:REQUEST\r\nX-NAME:Sesi\xc3\xb3n\r\nEND:VCALENDAR\r\n"
    calendar = Attachment("invitacion.ics", ics, "text/calendar", (("method", "REQUEST"), ("charset", "utf-8")))
    parsed = email.message_from_bytes(
        _message(attachments=(), calendar=calendar).as_bytes(), policy=email.policy.default
    )
    assert parsed.get_content_type() == "multipart/alternative"
    text, html, part = parsed.iter_parts()
    assert (text.get_content_type(), html.get_content_type()) == ("text/plain", "text/html")
    assert part.get_content_type() == "text/calendar"
    assert part.get_param("method") == "REQUEST" and part.get_param("charset") == "utf-8"
    assert part.get_content_disposition() is None and part.get_filename() is None
    assert part.get_payload(decode=True) == ics
    with pytest.raises(TemplateError, match="is not text/calendar"):
        _message(calendar=Attachment("x.ics", ics, "application/ics"))


def test_headers_may_replace_a_default() -> None:
    message = _message(headers={"Auto-Submitted": "auto-replied", "In-Reply-To": "<abc@example.hn>"})
    assert message.get_all("Auto-Submitted") == ["auto-replied"]
    assert message["In-Reply-To"] == "<abc@example.hn>"


def test_header_injection_through_the_delegation_name_is_refused() -> None:
    context = sample_context(name="Honduras\r\nBcc: x@evil")
    with pytest.raises(TemplateError, match=r"es/request\.subject\.j2.*Subject"):
        Renderer().render("request", "es", context)


@pytest.mark.parametrize(
    ("overrides", "header"),
    [
        ({"rendered": RenderedEmail("Plan\r\nBcc: x@evil [Ref. a/b]", "t", "<p>h</p>")}, "Subject"),
        ({"headers": {"X-Mailflow-Delegation": "HN\nBcc: x@evil"}}, "X-Mailflow-Delegation"),
        ({"from_name": "Secretaría\rBcc: x@evil"}, "From"),
        ({"to": ["a@example.org\n"]}, "To"),
        ({"reply_to": "st@crm.example.org\x00"}, "Reply-To"),
        ({"message_id": "<a@b>\r\nBcc: x@evil"}, "Message-ID"),
        ({"headers": {"Bad Name": "x"}}, "Bad Name"),
        ({"headers": {"Content-Type": "text/plain"}}, "Content-Type"),
    ],
)
def test_build_message_refuses_bad_headers(overrides: dict[str, Any], header: str) -> None:
    with pytest.raises(TemplateError, match=re.escape(header)):
        _message(**overrides)


def test_build_message_refuses_a_naive_date_and_no_recipients() -> None:
    with pytest.raises(TemplateError, match="Date"):
        _message(date=datetime(2017, 10, 18, 10, 0))
    with pytest.raises(TemplateError, match="To"):
        _message(to=[])


# --------------------------------------------------------------------------
# Follow-ups: receipt, missing, unreadable
# --------------------------------------------------------------------------

FOLLOW_UP_TEXT = {
    "es": {
        "more": "y {n} más",
        "changed": "fuera de la columna «Responsible»",
        "not_applied": "no se ha aplicado",
        "review": "Secretaría Técnica",
        "asap": "a la mayor brevedad posible",
        "body_lines": "código: institución",
        "no_reminders": "no les enviaremos más recordatorios",
        "xlsx": "formato Excel (.xlsx)",
        "no_password": "sin contraseña",
    },
    "en": {
        "more": "and {n} more",
        "changed": 'outside the "Responsible" column',
        "not_applied": "has not been applied",
        "review": "Technical Secretariat",
        "asap": "as soon as possible",
        "body_lines": "code: institution",
        "no_reminders": "no further reminders",
        "xlsx": "Excel format (.xlsx)",
        "no_password": "without a password",
    },
}


def _plain(html: str) -> str:
    """The HTML part with tags dropped and typographic quotes made straight, for phrase checks."""
    return re.sub(r"<[^>]+>", "", html).replace("“", '"').replace("”", '"')


def test_follow_up_kinds_are_registered() -> None:
    assert FOLLOW_UP_KINDS == ("receipt", "missing", "unreadable")
    assert DELEGATION_KINDS == CAMPAIGN_KINDS + FOLLOW_UP_KINDS
    assert set(KINDS_WITH_TEMPLATES) == set(DELEGATION_KINDS) | set(SECRETARIAT_KINDS) | set(MEETING_KINDS)
    for language in LANGUAGES:
        for kind in FOLLOW_UP_KINDS:
            context = example_context(kind, language)
            assert set(FOLLOW_UP_CONTEXT_KEYS) <= context.keys()
            for part in ("subject", "txt", "html"):
                suffix = "subject.j2" if part == "subject" else f"{part}.j2"
                assert (BUILTIN_TEMPLATES / language / f"{kind}.{suffix}").is_file()
        assert not set(FOLLOW_UP_CONTEXT_KEYS) & example_context("request", language).keys()


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("kind", FOLLOW_UP_KINDS)
def test_follow_up_renders_from_the_example_context(renderer: Renderer, kind: str, language: str) -> None:
    context = example_context(kind, language)
    rendered = renderer.render(kind, language, context)
    assert rendered.language == language
    assert rendered.subject == "RE: Strategic Plan 2017-2022 — Honduras [Ref. responsible-2017/HN]"
    assert parse_subject_reference(rendered.subject) == ("responsible-2017", "HN")
    greeting = "Estimados/as funcionarios/as de enlace de Honduras" if language == "es" else "Dear liaison officers"
    for body in (rendered.text, rendered.html):
        assert greeting in body
        assert context["received_at_text"] in body
        assert context["timezone_label"] in body
        assert "Technical Secretariat of the RCM" in body
        assert f"{context['filled']} " in body
        assert str(context["total"]) in body
    if kind != "receipt":
        for body in (rendered.text, rendered.html):
            assert context["deadline_text"] in body  # by when, written out
            assert context["attachment_name"] in body
        assert FOLLOW_UP_TEXT[language]["body_lines"] in rendered.text
    assert rendered.html.lstrip().startswith("<!DOCTYPE html>")
    assert f'lang="{language}"' in rendered.html
    assert "http://" not in rendered.html and "https://" not in rendered.html


def test_received_at_is_written_in_the_readers_time_zone() -> None:
    assert example_context("receipt", "es")["received_at_text"] == "sábado 21 de octubre de 2017, 10:15"
    assert example_context("missing", "en")["received_at_text"] == "Saturday, 21 October 2017, 10:15"


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("Plan Estratégico — Honduras", "Re: Plan Estratégico — Honduras"),
        ("RE: Plan Estratégico — Honduras [Ref. responsible-2017/HN]", "RE: Plan Estratégico — Honduras"),
        ("Re: Plan", "Re: Plan"),
        ("RV: Plan", "RV: Plan"),
        ("Fwd: Plan", "Fwd: Plan"),
        ("FW: RE: Plan", "FW: RE: Plan"),
        ("Re[2]: Plan", "Re[2]: Plan"),
        ("AW: Plan", "AW: Plan"),
        ("Respuesta del Ministerio", "Re: Respuesta del Ministerio"),  # a word starting like a prefix
        ("[Ref. responsible-2017/HN] adjunto el archivo", "Re: adjunto el archivo"),
        ("RE: [Ref. responsible-2017/GT] Plan [ref: responsible-2017/HN]", "RE: Plan"),
        ("Plan\r\nBcc: x@evil\x00", "Re: Plan Bcc: x@evil"),
        ("  Plan   con\tespacios ", "Re: Plan con espacios"),
        ("", "Re: Plan — Honduras"),
        ("RE: [Ref. responsible-2017/HN]", "Re: Plan — Honduras"),
        ("RE: FW:  ", "Re: Plan — Honduras"),
    ],
)
def test_reply_subject_line(subject: str, expected: str) -> None:
    assert reply_subject_line(subject, "Plan — Honduras") == expected


def test_reply_subject_line_cuts_a_very_long_subject() -> None:
    line = reply_subject_line("x" * 5000)
    assert line.startswith("Re: xxx") and line.endswith("…")
    assert len(line) < 220
    assert reply_subject_line(None, "Plan") == "Re: Plan"


@pytest.mark.parametrize("kind", FOLLOW_UP_KINDS)
@pytest.mark.parametrize(
    ("reply_subject", "expected"),
    [
        ("Plan Estratégico — Honduras", "Re: Plan Estratégico — Honduras [Ref. responsible-2017/HN]"),
        ("RE: RV: Plan [Ref. responsible-2017/HN] adjunto", "RE: RV: Plan adjunto [Ref. responsible-2017/HN]"),
        ("Fwd: Plan [Ref. responsible-2017/GT]", "Fwd: Plan [Ref. responsible-2017/HN]"),
        ("Plan\r\nBcc: x@evil", "Re: Plan Bcc: x@evil [Ref. responsible-2017/HN]"),
        ("", f"Re: {TITLES['es']} — Honduras [Ref. responsible-2017/HN]"),
    ],
)
def test_follow_up_subject_answers_their_subject(
    renderer: Renderer, kind: str, reply_subject: str, expected: str
) -> None:
    rendered = renderer.render(kind, "es", sample_context(kind, "es", reply_subject=reply_subject))
    assert rendered.subject == expected
    assert rendered.subject.count("[Ref.") == 1
    assert parse_subject_reference(rendered.subject) == ("responsible-2017", "HN")


def test_follow_up_subject_still_refuses_a_line_break_from_the_config(renderer: Renderer) -> None:
    context = sample_context("receipt", "en", name="Honduras\r\nBcc: x@evil", reply_subject="")
    with pytest.raises(TemplateError, match=r"en/receipt\.subject\.j2.*Subject"):
        renderer.render("receipt", "en", context)


def test_an_override_subject_without_the_reference_gets_it_appended(tmp_path: Path) -> None:
    (tmp_path / "en").mkdir()
    (tmp_path / "en" / "missing.subject.j2").write_text("{{ reply_subject|re_subject }}", encoding="utf-8")
    rendered = Renderer(override_dir=tmp_path).render(
        "missing", "en", sample_context("missing", "en", reply_subject="Plan")
    )
    assert rendered.subject == "Re: Plan [Ref. responsible-2017/HN]"


@pytest.mark.parametrize("language", LANGUAGES)
def test_receipt_confirms_and_lists_what_was_recorded(renderer: Renderer, language: str) -> None:
    recorded = recorded_items(MISSING_LIST_LIMIT + 25)
    context = sample_context("receipt", language, missing_count=0, recorded=recorded)
    rendered = renderer.render("receipt", language, context)
    listed = re.findall(r"^  - (\S+): (.*)$", rendered.text, flags=re.MULTILINE)
    assert listed == [(item["key"], item["value"]) for item in recorded[:MISSING_LIST_LIMIT]]
    more = FOLLOW_UP_TEXT[language]["more"].format(n=25)
    assert more in rendered.text and more in rendered.html
    assert str(len(recorded)) in rendered.text  # the full count is still stated
    assert ("40 de 40" if language == "es" else "40 of 40") in rendered.text
    assert FOLLOW_UP_TEXT[language]["no_reminders"] in rendered.text
    assert FOLLOW_UP_TEXT[language]["no_reminders"] in rendered.html
    assert "Institución 15" in rendered.html and "Institución 16" not in rendered.html
    assert context["deadline_text"] in rendered.text  # received within the deadline


def test_receipt_after_the_deadline_does_not_dwell_on_it(renderer: Renderer) -> None:
    context = sample_context("receipt", "en", missing_count=0, deadline_passed=True, days_overdue=3)
    rendered = renderer.render("receipt", "en", context)
    assert context["deadline_text"] not in rendered.text
    assert "deadline" not in rendered.text and "late" not in rendered.text


@pytest.mark.parametrize("language", LANGUAGES)
def test_missing_lists_what_is_still_needed_with_the_action_text(renderer: Renderer, language: str) -> None:
    count = MISSING_LIST_LIMIT + 7
    context = sample_context("missing", language, missing_count=count, recorded=recorded_items(3, first_line=7))
    rendered = renderer.render("missing", language, context)
    listed = re.findall(r"^  - (\S+): (.*)$", rendered.text, flags=re.MULTILINE)
    assert listed == [(item["key"], item["label"]) for item in context["missing"][:MISSING_LIST_LIMIT]]
    more = FOLLOW_UP_TEXT[language]["more"].format(n=7)
    assert more in rendered.text and more in rendered.html
    assert str(count) in rendered.text
    assert ("18 de las 40" if language == "es" else "18 of the 40") in rendered.text
    # What this message brought, briefly: its keys, not a second list.
    assert "(7.1, 7.2, 7.3)" in rendered.text and "(7.1, 7.2, 7.3)" in rendered.html
    assert "Institución 1" not in rendered.text
    # By when, and how to send the rest.
    deadline = f"{'a más tardar el' if language == 'es' else 'by'} {context['deadline_text']}"
    assert deadline in rendered.text
    assert deadline in re.sub(r"</?strong>", "", rendered.html)
    assert context["timezone_label"] in rendered.text
    assert FOLLOW_UP_TEXT[language]["body_lines"] in rendered.text
    assert context["attachment_name"] in rendered.text
    assert "  1.1: " in rendered.text  # an example line in the "code: institution" form


@pytest.mark.parametrize("language", LANGUAGES)
def test_missing_after_the_deadline_asks_for_it_as_soon_as_possible(renderer: Renderer, language: str) -> None:
    context = sample_context("missing", language, deadline_passed=True, days_overdue=2)
    rendered = renderer.render("missing", language, context)
    assert FOLLOW_UP_TEXT[language]["asap"] in rendered.text
    assert FOLLOW_UP_TEXT[language]["asap"] in rendered.html
    assert context["deadline_text"] not in rendered.text


def test_missing_with_many_recorded_keys_caps_them(renderer: Renderer) -> None:
    context = sample_context("missing", "en", recorded=recorded_items(MISSING_LIST_LIMIT + 4, first_line=10))
    rendered = renderer.render("missing", "en", context)
    assert "(10.1, 10.2, 10.3, 10.4, 10.5, 11.1" in rendered.text
    assert "12.5 and 4 more)" in rendered.text
    assert "13.1" not in rendered.text


def test_missing_says_one_action_in_the_singular(renderer: Renderer) -> None:
    context = sample_context("missing", "es", missing_count=1, recorded=recorded_items(1, first_line=9))
    rendered = renderer.render("missing", "es", context)
    assert "la respuesta de 1 acción (9.1)" in rendered.text
    assert "de la siguiente acción:" in rendered.text


@pytest.mark.parametrize("language", LANGUAGES)
def test_unreadable_lists_each_file_with_its_reason_and_what_to_send(renderer: Renderer, language: str) -> None:
    files = [
        {"filename": "Plan estratégico - Honduras.xlsx", "reason": "el archivo está protegido con contraseña"},
        {"filename": "respuesta.xlsx", "reason": "the file is damaged and cannot be opened"},
    ]
    context = sample_context("unreadable", language, unreadable=files, recorded=[])
    rendered = renderer.render("unreadable", language, context)
    for item in files:
        for body in (rendered.text, rendered.html):
            assert item["filename"] in body
            assert item["reason"] in body  # written by the code, kept as is whatever the language
    open_quote, close_quote = ("«", "»") if language == "es" else ('"', '"')
    assert f"  - {open_quote}respuesta.xlsx{close_quote}: the file is damaged and cannot be opened\n" in rendered.text
    for body in (rendered.text, _plain(rendered.html)):
        assert FOLLOW_UP_TEXT[language]["xlsx"] in body
        assert FOLLOW_UP_TEXT[language]["no_password"] in body
        assert FOLLOW_UP_TEXT[language]["body_lines"] in body
        assert context["deadline_text"] in body
        assert context["timezone_label"] in body
    # What is still needed: the 37 already recorded are acknowledged, the 3 missing listed.
    assert ("37 de las 40" if language == "es" else "37 of the 40") in rendered.text
    for key in ("1.1", "1.2", "1.3"):
        assert f"  - {key}: " in rendered.text


@pytest.mark.parametrize("language", LANGUAGES)
def test_unreadable_with_nothing_recorded_yet_and_no_file(renderer: Renderer, language: str) -> None:
    context = sample_context(
        "unreadable", language, missing_count=40, recorded=[], unreadable=[], deadline_passed=True, days_overdue=1
    )
    rendered = renderer.render("unreadable", language, context)
    assert ("ninguna de las 40" if language == "es" else "any of the 40") in rendered.text
    assert "  - 1.1: " not in rendered.text  # "each of them", not 40 lines
    assert FOLLOW_UP_TEXT[language]["asap"] in rendered.text
    assert ("no encontramos" if language == "es" else "could not find") in rendered.text


@pytest.mark.parametrize("kind", ("receipt", "missing"))
def test_a_failed_attachment_beside_a_good_one_is_mentioned(renderer: Renderer, kind: str) -> None:
    files = [{"filename": "copia.xlsx", "reason": "the file is password-protected"}]
    context = sample_context(kind, "en", missing_count=0 if kind == "receipt" else 3, unreadable=files)
    rendered = renderer.render(kind, "en", context)
    assert '  - "copia.xlsx": the file is password-protected' in rendered.text
    assert "<strong>copia.xlsx</strong>: the file is password-protected" in rendered.html
    without = renderer.render(kind, "en", sample_context(kind, "en", missing_count=0 if kind == "receipt" else 3))
    assert "unable to read" not in without.text and "unable to read" not in without.html


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("kind", FOLLOW_UP_KINDS)
def test_changes_outside_the_column_are_mentioned_only_when_there_are_some(
    renderer: Renderer, kind: str, language: str
) -> None:
    phrases = FOLLOW_UP_TEXT[language]
    quiet = renderer.render(kind, language, sample_context(kind, language, changed_outside=[]))
    for body in (quiet.text, _plain(quiet.html)):
        assert phrases["changed"] not in body
        assert phrases["not_applied"] not in body
    changes = [
        {"key": "2.3", "column": "Indicador", "before": "Número de protocolos", "after": "Protocolos adoptados"},
        {"key": "4.1", "column": "Plazo", "before": "2018", "after": ""},
    ]
    noted = renderer.render(kind, language, sample_context(kind, language, changed_outside=changes))
    for body in (noted.text, _plain(noted.html)):
        assert phrases["changed"] in body
        assert phrases["review"] in body
        assert "Indicador" in body and "Número de protocolos" in body and "Protocolos adoptados" in body
    not_applied = "no se han aplicado" if language == "es" else "have not been applied"
    assert not_applied in noted.text
    single = renderer.render(kind, language, sample_context(kind, language, changed_outside=changes[:1]))
    assert phrases["not_applied"] in single.text


def test_changed_outside_list_is_capped(renderer: Renderer) -> None:
    changes = [
        {"key": f"{n}.1", "column": "Plazo", "before": "2018", "after": "2019"} for n in range(MISSING_LIST_LIMIT + 3)
    ]
    rendered = renderer.render(
        "receipt", "es", sample_context("receipt", "es", missing_count=0, changed_outside=changes)
    )
    assert len(re.findall(r"^  - \d+\.1, columna «Plazo»", rendered.text, flags=re.MULTILINE)) == MISSING_LIST_LIMIT
    assert "y 3 más" in rendered.text and "y 3 más" in rendered.html


@pytest.mark.parametrize("kind", FOLLOW_UP_KINDS)
def test_follow_up_values_are_escaped_in_html_and_raw_in_text(renderer: Renderer, kind: str) -> None:
    institution = "Dirección <b>General</b> de Migración & Extranjería"
    escaped = "Dirección &lt;b&gt;General&lt;/b&gt; de Migración &amp; Extranjería"
    context = sample_context(
        kind,
        "es",
        missing_count=0 if kind == "receipt" else 2,
        recorded=[{"key": "1.1", "label": "Niñas <i>y</i> niños", "value": institution}],
        changed_outside=[{"key": "1.2", "column": "Indicador <x>", "before": "a & b", "after": "<b>c</b>"}],
        unreadable=[{"filename": "<plan>.xlsx", "reason": "el archivo <no> se abre & falla"}],
    )
    rendered = renderer.render(kind, "es", context)
    assert "<b>" not in rendered.html and "<i>" not in rendered.html and "<x>" not in rendered.html
    assert "Indicador &lt;x&gt;" in rendered.html and "«a &amp; b»" in rendered.html
    assert "&lt;plan&gt;.xlsx" in rendered.html and "el archivo &lt;no&gt; se abre &amp; falla" in rendered.html
    assert "«<b>c</b>»" in rendered.text and "<plan>.xlsx" in rendered.text
    if kind == "receipt":
        assert escaped in rendered.html
        assert "Niñas &lt;i&gt;y&lt;/i&gt; niños" in rendered.html
        assert f"  - 1.1: {institution}\n" in rendered.text


def test_follow_up_values_spanning_lines_are_listed_on_one(renderer: Renderer) -> None:
    context = sample_context(
        "receipt",
        "en",
        missing_count=0,
        recorded=[{"key": "1.1", "label": "Action", "value": "Ministry of\nForeign   Affairs"}],
        unreadable=[{"filename": "a\nb.xlsx", "reason": "the file is\npassword-protected"}],
    )
    rendered = renderer.render("receipt", "en", context)
    assert "  - 1.1: Ministry of Foreign Affairs\n" in rendered.text
    assert '  - "a b.xlsx": the file is password-protected\n' in rendered.text


def test_follow_up_missing_a_key_names_it(renderer: Renderer) -> None:
    context = sample_context("missing", "en")
    del context["received_at_text"]
    with pytest.raises(TemplateError, match=r"en/missing\.txt\.j2: 'received_at_text' is undefined"):
        renderer.render("missing", "en", context)
    context = sample_context("receipt", "es")
    del context["reply_subject"]
    with pytest.raises(TemplateError, match=r"es/receipt\.subject\.j2: 'reply_subject' is undefined"):
        renderer.render("receipt", "es", context)


def test_check_finds_a_broken_follow_up_override(tmp_path: Path) -> None:
    (tmp_path / "es").mkdir()
    broken = tmp_path / "es" / "receipt.txt.j2"
    broken.write_text("Estimados/as {{ delegation.name }}:\n{% for item in recorded %}\n", encoding="utf-8")
    problems = Renderer(override_dir=tmp_path).check()
    assert len(problems) == 1
    assert "es/receipt.txt.j2" in problems[0] and str(broken) in problems[0]
    assert "syntax error" in problems[0]


def test_check_renders_every_branch_of_a_follow_up(tmp_path: Path) -> None:
    (tmp_path / "en").mkdir()
    # The misspelt name is only reached when the deadline has passed: the example alone would not find it.
    (tmp_path / "en" / "missing.txt.j2").write_text(
        "{% if deadline_passed %}{{ deadline_txt }}{% else %}{{ deadline_text }}{% endif %}\n", encoding="utf-8"
    )
    (tmp_path / "en" / "unreadable.html.j2").write_text(
        "{% for item in unreadable %}{{ item.filename }} {{ item.reasons }}{% endfor %}", encoding="utf-8"
    )
    problems = Renderer(override_dir=tmp_path).check()
    assert len(problems) == 2, problems
    assert any("en/missing.txt.j2" in p and "'deadline_txt' is undefined" in p for p in problems)
    assert any("en/unreadable.html.j2" in p and "reasons" in p for p in problems)


def test_check_knows_the_follow_up_names(tmp_path: Path) -> None:
    (tmp_path / "es").mkdir()
    (tmp_path / "es" / "receipt.subject.j2").write_text("Acuse de recibo {{ reference }}", encoding="utf-8")
    (tmp_path / "es" / "reciept.txt.j2").write_text("hola", encoding="utf-8")
    problems = Renderer(override_dir=tmp_path).check()
    assert len(problems) == 1
    assert "es/reciept.txt.j2" in problems[0] and "not a known template" in problems[0]
    assert "receipt.txt.j2" in problems[0]  # listed among the expected names


# --------------------------------------------------------------------------
# The message as bytes (build_message_bytes)
# --------------------------------------------------------------------------

_BOUNDARY_LINE = b"--=_mf_"


def _reference_message(
    *,
    rendered: RenderedEmail,
    from_name: str,
    from_address: str,
    to: list[str],
    reply_to: str,
    message_id: str,
    date: datetime,
    headers: dict[str, str],
    attachments: list[Attachment],
) -> EmailMessage:
    """The same email built by the email package's object model, the way build_message used to: the reference."""
    message = EmailMessage(policy=email.policy.SMTP)
    message["From"] = Address(display_name=from_name, addr_spec=from_address)
    message["To"] = tuple(Address(addr_spec=address) for address in to)
    message["Reply-To"] = Address(addr_spec=reply_to)
    message["Subject"] = rendered.subject
    message["Date"] = email.utils.format_datetime(date)
    message["Message-ID"] = message_id
    message["MIME-Version"] = "1.0"
    message["Auto-Submitted"] = "auto-generated"
    extra = {"Content-Language": rendered.language} if rendered.language else {}
    extra.update(headers)
    message.set_content(rendered.text, subtype="plain", charset="utf-8", cte="quoted-printable")
    message.add_alternative(rendered.html, subtype="html", charset="utf-8", cte="quoted-printable")
    for attachment in attachments:
        maintype, _, subtype = attachment.mime_type.partition("/")
        message.add_attachment(attachment.content, maintype=maintype, subtype=subtype, filename=attachment.filename)
    for name, value in extra.items():
        del message[name]
        message[name] = value
    return message


def _arguments(
    kind: str = "request", language: str = "es", *, name: str = "Honduras", attach: bool = True, **overrides: Any
) -> dict[str, Any]:
    """build_message's arguments for one email the engine sends (a follow-up threaded under a reply)."""
    context = sample_context(kind, language, name=name, days_left=1 if kind == "reminder" else 0, days_overdue=2)
    headers = {"X-Mailflow-Kind": kind, "X-Mailflow-Campaign": "responsible-2017", "X-Mailflow-Delegation": "HN"}
    if kind in FOLLOW_UP_KINDS:
        headers.update(
            {
                "Auto-Submitted": "auto-replied",
                "In-Reply-To": "<reply.1@sre.example.hn>",
                "References": "<mailflow.1@crm.example.org> <reply.1@sre.example.hn>",
            }
        )
    workbook = random.Random(f"{kind}/{language}").randbytes(5000 + 57 * 3 + 7)  # not a whole number of lines
    attachments = [
        Attachment(context["attachment_name"], workbook),
        Attachment("notes.txt", b"plain\r\n", "text/plain"),
    ]
    arguments: dict[str, Any] = {
        "rendered": Renderer().render(kind, language, context),
        "from_name": "Secretaría Técnica de la CRM",
        "from_address": "st@crm.example.org",
        "to": ["enlace@sre.example.hn", "migracion@example.hn"],
        "reply_to": "st@crm.example.org",
        "message_id": make_message_id("crm.example.org", "responsible-2017", "HN", kind),
        "date": datetime(2017, 10, 18, 16, 0, tzinfo=UTC),
        "headers": headers,
        "attachments": attachments if attach else [],
    }
    arguments.update(overrides)
    return arguments


def _parse(raw: bytes, policy: Any = email.policy.default) -> EmailMessage:
    parsed = email.message_from_bytes(raw, policy=policy)
    assert isinstance(parsed, EmailMessage)
    return parsed


def _header_block(raw: bytes) -> list[str]:
    return raw.split(b"\r\n\r\n", 1)[0].decode("ascii").split("\r\n")


def _field_lines(raw: bytes, name: str) -> list[str]:
    """The lines of one top-level header field, its continuation lines included."""
    lines = _header_block(raw)
    start = next(i for i, line in enumerate(lines) if line.lower().startswith(f"{name.lower()}:"))
    end = start + 1
    while end < len(lines) and lines[end].startswith(" "):
        end += 1
    return lines[start:end]


def _content_lines(raw: bytes) -> list[bytes]:
    """Every line of quoted-printable or base64 content, in every part."""
    lines: list[bytes] = []
    in_head, encoded, in_content = True, False, False
    for line in raw.split(b"\r\n"):
        if line.startswith(_BOUNDARY_LINE):
            in_head, encoded, in_content = True, False, False
        elif in_head:
            encoded = encoded or line.lower().startswith(b"content-transfer-encoding:")
            if not line:
                in_head, in_content = False, encoded
        elif in_content:
            lines.append(line)
    return lines


def _assert_well_formed(raw: bytes) -> None:
    """7-bit, CRLF only, lines within RFC 5322 and RFC 2045 limits, and no defect found by a strict parser."""
    assert raw.isascii()
    assert re.search(rb"(?<!\r)\n|\r(?!\n)", raw) is None  # CRLF only: no bare LF, no bare CR
    lines = raw.split(b"\r\n")
    assert lines[-1] == b""
    assert max(len(line) for line in lines) <= 998
    content = _content_lines(raw)
    assert content and max(len(line) for line in content) <= 76
    assert not any(line.endswith((b" ", b"\t")) for line in content)
    # Header lines (the message's and its parts') fold at 78 unless a single word is longer (a Message-ID,
    # a long MIME type): then it stands alone on its line.
    content_set = set(content)
    for line in lines:
        if len(line) > 78 and line not in content_set:
            assert b" " not in line.strip().partition(b": ")[2].strip(), line
    parsed = _parse(raw, email.policy.strict)  # raises on any defect of the message structure
    for part in parsed.walk():
        assert part.defects == []
        for name, value in part.items():
            defects = {str(defect) for defect in getattr(value, "defects", ())}
            if name == "Content-Type" and part.get_content_disposition() == "attachment":
                # The RFC 2047 name= fallback for readers without RFC 2231 (see _filename_parameters).
                defects -= {"encoded word inside quoted string", "missing trailing whitespace after encoded-word"}
            assert not defects, (name, defects)


def _assert_same_message(raw: bytes, reference: EmailMessage) -> None:
    """``raw`` reads back as the same email as ``reference``: headers, text, HTML, attachments."""
    got, expected = _parse(raw), _parse(reference.as_bytes())
    assert sorted(k.lower() for k in got) == sorted(k.lower() for k in expected)
    for name in expected:
        if name.lower() != "content-type":
            assert str(got[name]) == str(expected[name]), name
    got_parts, expected_parts = list(got.walk()), list(expected.walk())
    assert [p.get_content_type() for p in got_parts] == [p.get_content_type() for p in expected_parts]
    for part, expected_part in zip(got_parts, expected_parts, strict=True):
        if part.is_multipart():
            continue
        assert part.get_content_charset() == expected_part.get_content_charset()
        assert part["Content-Transfer-Encoding"] == expected_part["Content-Transfer-Encoding"]
        assert part.get_content_disposition() == expected_part.get_content_disposition()
        assert part.get_filename() == expected_part.get_filename()
        assert part.get_content() == expected_part.get_content()


@pytest.mark.parametrize("attach", [True, False], ids=["attachments", "no-attachments"])
@pytest.mark.parametrize("name", ["Honduras", "República Dominicana"])
@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("kind", DELEGATION_KINDS)
def test_message_bytes_read_back_as_the_email_packages_message(
    kind: str, language: str, name: str, attach: bool
) -> None:
    arguments = _arguments(kind, language, name=name, attach=attach)
    raw = build_message_bytes(**arguments)
    _assert_well_formed(raw)
    _assert_same_message(raw, _reference_message(**arguments))

    parsed = _parse(raw)
    assert parsed.get_content_type() == ("multipart/mixed" if attach else "multipart/alternative")
    assert str(parsed["Subject"]) == arguments["rendered"].subject
    assert parsed["Content-Language"] == language
    attachments = list(parsed.iter_attachments())
    assert [a.get_filename() for a in attachments] == [a.filename for a in arguments["attachments"]]
    assert [a.get_payload(decode=True) for a in attachments] == [a.content for a in arguments["attachments"]]
    if attach:  # the Outlook fallback names the file too
        assert attachments[0].get_param("name") == f"Plan estratégico - {name}.xlsx"
        assert "filename*=utf-8''Plan%20estrat%C3%A9gico%20-%20" in raw.decode("ascii")
    # The boundaries appear only as delimiters: alternative 3, mixed 2 + one per attachment.
    delimiters = [line for line in raw.split(b"\r\n") if line.startswith(_BOUNDARY_LINE)]
    assert len(delimiters) == 3 + (2 + len(attachments) if attach else 0)


def test_build_message_is_the_bytes_parsed_back() -> None:
    arguments = _arguments("receipt", "en")
    raw = build_message_bytes(**arguments)
    message = build_message(**arguments)
    assert message.as_bytes() == raw
    assert message.get_all("Auto-Submitted") == ["auto-replied"]
    assert build_message_bytes(**arguments) == raw  # the same inputs always give the same bytes
    other = build_message_bytes(**{**arguments, "message_id": "<other@crm.example.org>"})
    assert other.split(b"\r\n\r\n", 1)[1] != raw.split(b"\r\n\r\n", 1)[1]  # boundaries follow the Message-ID


@pytest.mark.parametrize(
    "subject",
    [
        "Plan Estratégico 2017-2022: columna Responsable — República Dominicana y otros países [Ref. a/DO]",
        "Re:  Plan  é  [Ref. a/b]",  # runs of spaces, inside and around encoded words
        "é é",
        "a =?utf-8?q?x?= b",  # looks like an encoded word: must not be decoded by the reader
        "[Ref. responsible-2017/HN] — ñ",
        "日本語の件名はとても長いです。" * 6,  # one long word, no spaces: cut between characters
        "x" * 1200,  # longer than any line: encoded so that it can be cut
        ("plain ascii subject " * 8).strip(),
    ],
)
def test_subjects_are_encoded_and_folded(subject: str) -> None:
    raw = build_message_bytes(**_arguments(rendered=RenderedEmail(subject, "t\n", "<p>h</p>\n", "es")))
    _assert_well_formed(raw)
    assert str(_parse(raw)["Subject"]) == subject
    lines = _field_lines(raw, "Subject")
    assert max(len(line) for line in lines) <= 78
    assert all(line.startswith(" ") and line.strip() for line in lines[1:])  # continuation lines, none blank
    if subject.isascii() and "=?" not in subject and len(subject) < 900:
        assert "=?" not in "".join(lines)  # plain ASCII stays readable
    if "Ref." in subject:
        assert "[Ref." in "".join(lines)  # the reference is never encoded


@pytest.mark.parametrize(
    "display_name",
    [
        "Secretaría Técnica de la CRM",
        "Smith, John",
        'Say "hi" \\ there',
        "Sec. Técnica (CRM), Perú",
        "",
        "A" * 30 + " " + "B" * 30 + " " + "C" * 30,
        "=?utf-8?q?x?=",
    ],
)
def test_from_display_names(display_name: str) -> None:
    raw = build_message_bytes(**_arguments(from_name=display_name))
    _assert_well_formed(raw)
    sender = _parse(raw)["From"].addresses[0]
    assert (sender.display_name, sender.addr_spec) == (display_name, "st@crm.example.org")
    assert max(len(line) for line in _field_lines(raw, "From")) <= 78


def test_a_long_non_ascii_display_name_is_split_into_encoded_words() -> None:
    display_name = "Secretaría Técnica — Conferência Regional sobre Migração e Refúgio (São Tomé)"
    raw = build_message_bytes(**_arguments(from_name=display_name))
    _assert_well_formed(raw)
    lines = _field_lines(raw, "From")
    assert len(lines) > 1 and max(len(line) for line in lines) <= 78
    phrase = " ".join(line.strip() for line in lines).removeprefix("From:").rpartition(" <")[0]
    # RFC 2047 decoding (white space between encoded words dropped). Python's own address parser keeps it
    # and would show a double space where the words were split: a limit of its phrase decoding.
    decoded = "".join(
        part.decode(charset or "ascii") if isinstance(part, bytes) else part for part, charset in decode_header(phrase)
    )
    assert decoded == display_name


@pytest.mark.parametrize(
    "filename",
    [
        "Plan estratégico - Honduras.xlsx",
        "plain.xlsx",
        'we"ird\\name.xlsx',
        "=?utf-8?q?x?=.xlsx",
        "日本語のファイル名がとても長い場合の添付ファイル名の例です" * 2 + ".xlsx",
        "",
    ],
)
def test_attachment_file_names(filename: str) -> None:
    content = bytes(range(256)) * 3
    arguments = _arguments(attachments=[Attachment(filename, content)])
    raw = build_message_bytes(**arguments)
    _assert_well_formed(raw)
    if "=?" not in filename:  # the email package writes that one as is, and reads it back decoded: "x.xlsx"
        _assert_same_message(raw, _reference_message(**arguments))
    (attachment,) = _parse(raw).iter_attachments()
    assert attachment.get_filename() == filename
    assert attachment.get_param("name") == filename
    assert attachment.get_content() == content
    head = raw.split(b"Content-Transfer-Encoding: base64", 1)[0].rsplit(_BOUNDARY_LINE, 1)[1]
    name_lines = head.split(b"\r\n")[2:]  # after the boundary and "Content-Type: <MIME type>;"
    assert name_lines[0].startswith(b" name=") and max(len(line) for line in name_lines) <= 78
    if filename.isascii() and "=?" not in filename:
        assert b"filename*" not in raw and b"=?utf-8?" not in head
    else:  # RFC 2231 in Content-Disposition, RFC 2047 in Content-Type's name= (the Outlook fallback)
        assert b"filename*=utf-8''" in raw and b'name="=?utf-8?q?' in head
        assert b"filename=" not in raw  # no ASCII fallback beside filename*


def test_a_long_references_header_folds_at_spaces() -> None:
    ids = [make_message_id("sre.example.hn", "reply", str(i)) for i in range(25)]
    ids.append("<" + "x" * 120 + "@example.org>")  # longer than a line: alone on its own
    references = " ".join(ids)
    assert len(references) > 998
    raw = build_message_bytes(**_arguments(headers={"References": references, "In-Reply-To": ids[-1]}))
    _assert_well_formed(raw)
    lines = _field_lines(raw, "References")
    assert len(lines) > 10
    assert all(line.startswith(" ") for line in lines[1:])
    assert [line.strip() for line in lines if len(line) > 78] == [ids[-1]]
    assert " ".join(line.strip() for line in lines).removeprefix("References: ") == references
    assert "=?" not in "".join(lines)
    parsed = _parse(raw)
    assert str(parsed["References"]) == references
    assert str(parsed["In-Reply-To"]) == ids[-1]


def test_non_ascii_extra_headers_are_encoded() -> None:
    arguments = _arguments(headers={"X-Mailflow-Delegation": "Perú", "X-Empty": ""})
    raw = build_message_bytes(**arguments)
    _assert_well_formed(raw)
    _assert_same_message(raw, _reference_message(**arguments))
    assert "X-Empty:" in _header_block(raw)


@pytest.mark.parametrize(
    ("overrides", "header"),
    [
        ({"rendered": RenderedEmail("Plan\r\nBcc: x@evil [Ref. a/b]", "t", "<p>h</p>")}, "Subject"),
        ({"rendered": RenderedEmail("Plan\u2028Bcc: x@evil", "t", "<p>h</p>")}, "Subject"),
        ({"rendered": RenderedEmail("Plan", "t", "<p>h</p>", "es\nBcc: x@evil")}, "Content-Language"),
        ({"headers": {"X-Mailflow-Delegation": "HN\nBcc: x@evil"}}, "X-Mailflow-Delegation"),
        ({"headers": {"References": "<a@b>\r\n <c@d>"}}, "References"),
        ({"headers": {"In-Reply-To": "<a@b>\x85"}}, "In-Reply-To"),
        ({"from_name": "Secretaría\rBcc: x@evil"}, "From"),
        ({"from_address": "st@crm.example.org\r\nBcc: x@evil"}, "From"),
        ({"to": ["a@example.org\n"]}, "To"),
        ({"to": ["a@example.org, b@example.org"]}, "To"),
        ({"to": ["Name <a@example.org>"]}, "To"),
        ({"to": ["<a@example.org>"]}, "To"),
        ({"to": ["@example.org"]}, "To"),
        ({"to": ["josé@example.org"]}, "To"),
        ({"to": ["a@méxico.example"]}, "To"),
        ({"reply_to": "st@crm.example.org\x00"}, "Reply-To"),
        ({"message_id": "<a@b>\r\nBcc: x@evil"}, "Message-ID"),
        ({"message_id": "no-angle-brackets@b"}, "Message-ID"),
        ({"message_id": "<a b@c>"}, "Message-ID"),
        ({"message_id": "<a@b@c>"}, "Message-ID"),
        ({"message_id": "<é@b>"}, "Message-ID"),
        ({"message_id": "<" + "a" * 990 + "@b>"}, "Message-ID"),
        ({"headers": {"Bad Name": "x"}}, "Bad Name"),
        ({"headers": {"X-" + "a" * 1000: "x"}}, "X-aaa"),
        ({"headers": {"Content-Type": "text/plain"}}, "Content-Type"),
        ({"headers": {"content-transfer-encoding": "8bit"}}, "content-transfer-encoding"),
        ({"headers": {"Content-Disposition": "inline"}}, "Content-Disposition"),
        ({"headers": {"MIME-Version": "2.0"}}, "MIME-Version"),
        ({"headers": {"Subject": "other"}}, "Subject"),
        ({"headers": {"To": "x@evil"}}, "To"),
        ({"headers": {"message-id": "<x@y>"}}, "message-id"),
        ({"attachments": [Attachment("a\r\nb.xlsx", b"x")]}, "Content-Disposition"),
        ({"attachments": [Attachment("a.xlsx", b"x", "xlsx")]}, "'xlsx' is not a MIME type"),
        ({"attachments": [Attachment("a.xlsx", b"x", "text/plain; charset=utf-8")]}, "is not a MIME type"),
        ({"attachments": [Attachment("a.xlsx", b"x", "multipart/mixed")]}, "is not a MIME type"),
        ({"date": datetime(2017, 10, 18, 10, 0)}, "Date"),
        ({"to": []}, "To"),
    ],
)
def test_message_bytes_refuse_bad_headers(overrides: dict[str, Any], header: str) -> None:
    with pytest.raises(TemplateError, match=re.escape(header)):
        build_message_bytes(**_arguments(**overrides))
    with pytest.raises(TemplateError, match=re.escape(header)):  # the same checks: build_message is the bytes parsed
        build_message(**_arguments(**overrides))


def test_text_that_is_not_unicode_is_refused() -> None:
    with pytest.raises(TemplateError, match="Subject"):
        build_message_bytes(**_arguments(rendered=RenderedEmail("Plan \udce9", "t", "h")))
    with pytest.raises(TemplateError, match="body"):
        build_message_bytes(**_arguments(rendered=RenderedEmail("Plan", "t \udce9", "h")))


def test_addresses_the_parser_accepts_are_written_plainly() -> None:
    raw = build_message_bytes(**_arguments(to=[" a@example.org ", '"a b"@example.org', "a@[192.0.2.1]", "a(c)@b.org"]))
    assert _field_lines(raw, "To") == ['To: a@example.org, "a b"@example.org, a@[192.0.2.1], a@b.org']
    assert [a.addr_spec for a in _parse(raw)["To"].addresses] == [
        "a@example.org",
        '"a b"@example.org',
        "a@[192.0.2.1]",
        "a@b.org",
    ]


@pytest.mark.parametrize("size", [0, 1, 2, 3, 56, 57, 58, 57 * 64 - 1, 57 * 64, 57 * 64 + 1, 57 * 129 + 5, 50_000])
def test_attachments_are_base64_in_lines_of_76(size: int) -> None:
    content = random.Random(size).randbytes(size)
    raw = build_message_bytes(**_arguments(attachments=[Attachment("a.bin", content, "application/octet-stream")]))
    body = raw.split(b'filename="a.bin"\r\n\r\n', 1)[1].rsplit(b"\r\n" + _BOUNDARY_LINE, 1)[0]
    assert body == base64.encodebytes(content).replace(b"\n", b"\r\n")
    (attachment,) = _parse(raw).iter_attachments()
    assert attachment.get_content() == content


def test_quoted_printable_bodies_keep_every_character_within_the_limits() -> None:
    pieces = ["a", " ", "\t", ".", "=", "é", "\n", "\r", "\r\n", "-", "_", "From ", "x" * 70, "y" * 74, "日", "\x0c"]
    rng = random.Random(2045)
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        html = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        raw = build_message_bytes(**_arguments(rendered=RenderedEmail("s", text, html), attachments=[]))
        for line in _content_lines(raw):
            assert len(line) <= 76
            assert line != b"."  # a lone dot could end the SMTP data on a relay that does not stuff it
            assert not line.endswith((b" ", b"\t"))  # trailing white space may be stripped in transit
        text_part, html_part = _parse(raw).get_payload()
        for part, original in ((text_part, text), (html_part, html)):
            expected = b"\r\n".join(original.encode("utf-8").splitlines()) + b"\r\n"
            assert binascii.a2b_qp(part.get_payload().encode("ascii")) == expected


# --------------------------------------------------------------------------
# The digest: an email to the Secretariat, with a context of its own
# --------------------------------------------------------------------------


def test_the_digest_is_registered_with_its_own_example() -> None:
    assert SECRETARIAT_KINDS == ("digest",)
    assert "digest" in KINDS_WITH_TEMPLATES and "digest" not in DELEGATION_KINDS
    for language in LANGUAGES:
        for suffix in ("subject.j2", "txt.j2", "html.j2"):
            assert (BUILTIN_TEMPLATES / language / f"digest.{suffix}").is_file()
        context = example_context("digest", language)
        assert "reference" not in context and "delegation" not in context  # it is written to the Secretariat
        rendered = Renderer().render("digest", language, context)
        assert "\n" not in rendered.subject and "[Ref." not in rendered.subject
        assert rendered.html.lstrip().startswith("<!DOCTYPE html>") and f'lang="{language}"' in rendered.html


def test_check_renders_every_branch_of_the_digest(tmp_path: Path) -> None:
    (tmp_path / "es").mkdir()
    # The misspelt name is only reached when the inbox was never read: check() renders that variant too.
    (tmp_path / "es" / "digest.txt.j2").write_text(
        "{% if health.last_inbox_read_at_text %}{{ health.last_inbox_read_at_text }}{% else %}{{ health.nevr }}"
        "{% endif %}\n",
        encoding="utf-8",
    )
    problems = Renderer(override_dir=tmp_path).check()
    assert len(problems) == 1, problems
    assert "es/digest.txt.j2" in problems[0] and "nevr" in problems[0]
