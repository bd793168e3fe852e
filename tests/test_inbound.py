"""Taking received mail apart: the fixture corpus, hostile input, and each pure helper on its own."""

from __future__ import annotations

import base64
import importlib.util
import io
import random
import time
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType

import pytest

from mailflow.inbound import (
    BODY_ANSWER_RE,
    KIND_AUTO_REPLY,
    KIND_BOUNCE,
    KIND_REPLY,
    Limits,
    Message,
    body_answers,
    html_to_text,
    parse_authentication_results,
    parse_message,
    strip_quoted,
)
from mailflow.render import make_message_id, parse_subject_reference

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mail"
KEYS = [f"{line}.{action}" for line in range(1, 6) for action in range(1, 9)]
CAMPAIGN = "responsible-2017"


def our_id(delegation: str, slot: str = "request") -> str:
    return make_message_id("example.org", CAMPAIGN, delegation, slot)


def load(name: str) -> Message:
    return parse_message((FIXTURES / name).read_bytes())


def mail(headers: str, body: str = "hello\n") -> bytes:
    """A message from header lines and a body written with \\n; sent with CRLF as on the wire."""
    return (headers.strip("\n") + "\n\n" + body).replace("\n", "\r\n").encode("utf-8")


# ==========================================================================
# The fixture corpus
# ==========================================================================


@dataclass(frozen=True)
class Expected:
    kind: str
    from_address: str | None
    in_reply_to: tuple[str, ...] = ()
    references: tuple[str, ...] = ()
    subject_ref: tuple[str, str] | None = None
    attachments: tuple[tuple[str, bool, str], ...] = ()  # (filename, is_workbook, path)
    auth_present: bool = False
    auth_failing: tuple[str, ...] = ()
    failures: tuple[tuple[str, str, bool], ...] = ()  # (recipient, status, permanent)
    original_message_id: str | None = None
    original_references: tuple[str, ...] = ()
    original_recipients: tuple[str, ...] = ()
    answers: dict[str, str] = field(default_factory=dict)
    reason_starts: str = ""


XLSX_WORKBOOK = True
CASES: dict[str, Expected] = {
    "gmail_reply_with_xlsx.eml": Expected(
        kind=KIND_REPLY,
        from_address="enlace@sre.example.hn",
        in_reply_to=(our_id("HN", "reminder:-1d"),),
        references=(our_id("HN"), our_id("HN", "reminder:-1d")),
        subject_ref=(CAMPAIGN, "HN"),
        attachments=(("Plan estratégico - Honduras.xlsx", XLSX_WORKBOOK, "2"),),
        auth_present=True,
    ),
    "outlook_reply_xlsx.eml": Expected(
        kind=KIND_REPLY,
        from_address="enlace@sre.example.hn",
        in_reply_to=(our_id("HN"),),
        references=(our_id("HN"),),
        subject_ref=(CAMPAIGN, "HN"),
        attachments=(("Plan estratégico - Honduras.xlsx", True, "2"),),
        auth_present=True,
    ),
    "apple_mail_reply.eml": Expected(
        kind=KIND_REPLY,
        from_address="liaison@immigration.example.bz",
        in_reply_to=(our_id("BZ"),),
        references=(our_id("BZ"),),
        subject_ref=(CAMPAIGN, "BZ"),
        attachments=(("plan.xlsx", True, "2"),),
    ),
    "forward_with_rfc822.eml": Expected(
        kind=KIND_REPLY,
        from_address="enlace@minex.example.gt",
        subject_ref=(CAMPAIGN, "GT"),
        attachments=(("Plan estrategico - Guatemala.xlsx", True, "2.2"),),
    ),
    "body_answers_es.eml": Expected(
        kind=KIND_REPLY,
        from_address="enlace@cancilleria.example.ni",
        in_reply_to=(our_id("NI"),),
        references=(our_id("NI"),),
        subject_ref=(CAMPAIGN, "NI"),
        answers={
            "1.1": "Dirección General de Migración y Extranjería",
            "1.2": "Ministerio de la Familia, Adolescencia y Niñez",
            "2.1": "Ministerio de Relaciones Exteriores",
            "2.3": "Procuraduría para la Defensa de los Derechos Humanos",
            "3.1": "Ministerio de Salud",
            "4.1": "Ministerio de Educación",
            "4.2": "Policía Nacional",
        },
    ),
    "html_only_answers_en.eml": Expected(
        kind=KIND_REPLY,
        from_address="liaison@cic.example.ca",
        in_reply_to=(our_id("CA"),),
        references=(our_id("CA"),),
        subject_ref=(CAMPAIGN, "CA"),
        answers={
            "1.1": "Immigration, Refugees and Citizenship Canada",
            "1.2": "Canada Border Services Agency",
            "2.1": "Global Affairs Canada & partners",
        },
    ),
    "ooo_en.eml": Expected(
        kind=KIND_AUTO_REPLY,
        from_address="liaison@cic.example.ca",
        in_reply_to=(our_id("CA"),),
        references=(our_id("CA"),),
        subject_ref=(CAMPAIGN, "CA"),
        reason_starts="Auto-Submitted: auto-replied",
    ),
    "ooo_es_subject_only.eml": Expected(
        kind=KIND_AUTO_REPLY,
        from_address="enlace@rree.example.sv",
        in_reply_to=(our_id("SV"),),
        subject_ref=(CAMPAIGN, "SV"),
        reason_starts="subject 'Respuesta automática:",
    ),
    "ooo_exchange.eml": Expected(
        kind=KIND_AUTO_REPLY,
        from_address="liaison@state.example.gov",
        in_reply_to=(our_id("US"),),
        references=(our_id("US"),),
        subject_ref=(CAMPAIGN, "US"),
        reason_starts="subject 'Automatic reply:",
    ),
    "precedence_bulk.eml": Expected(
        kind=KIND_AUTO_REPLY,
        from_address="no-reply@mire.example.pa",
        in_reply_to=(our_id("PA"),),
        subject_ref=(CAMPAIGN, "PA"),
        reason_starts="Precedence: bulk",
    ),
    "dsn_postfix.eml": Expected(
        kind=KIND_BOUNCE,
        from_address="mailer-daemon@mail.example.org",
        failures=(("enlace@mire.example.pa", "5.1.1", True),),
        original_message_id=our_id("PA"),
        original_recipients=("enlace@mire.example.pa",),
        reason_starts="multipart/report delivery-status",
    ),
    "dsn_exchange.eml": Expected(
        kind=KIND_BOUNCE,
        from_address="postmaster@example.org",
        in_reply_to=(our_id("DO", "reminder:-1d"),),
        references=(our_id("DO", "reminder:-1d"),),
        subject_ref=(CAMPAIGN, "DO"),
        failures=(("enlace@mirex.example.do", "5.1.10", True),),
        original_message_id=our_id("DO", "reminder:-1d"),
        original_references=(our_id("DO"),),
        original_recipients=("enlace@mirex.example.do",),
        reason_starts="multipart/report delivery-status",
    ),
    "dsn_delayed.eml": Expected(
        kind=KIND_BOUNCE,
        from_address="mailer-daemon@mail.example.org",
        failures=(("enlace@cancilleria.example.ni", "4.4.1", False),),
        original_message_id=our_id("NI", "reminder:-3d"),
        original_references=(our_id("NI"),),
        original_recipients=("enlace@cancilleria.example.ni",),
    ),
    "bounce_nonstandard.eml": Expected(
        kind=KIND_BOUNCE,
        from_address="mailer-daemon@mx.minex.example.gt",
        failures=(("enlace@minex.example.gt", "5.1.1", True),),
        original_message_id=our_id("GT"),
        original_recipients=("enlace@minex.example.gt",),
        reason_starts="from mailer-daemon@mx.minex.example.gt",
    ),
    "dmarc_fail_m365.eml": Expected(
        kind=KIND_REPLY,
        from_address="enlace@sre.example.hn",
        in_reply_to=(our_id("HN"),),
        subject_ref=(CAMPAIGN, "HN"),
        attachments=(("Plan.xlsx", True, "2"),),
        auth_present=True,
        auth_failing=("dmarc", "spf"),
    ),
    "rfc2047_filename.eml": Expected(
        kind=KIND_REPLY,
        from_address="enlace@mire.example.pa",
        in_reply_to=(our_id("PA"),),
        references=(our_id("PA"),),
        subject_ref=(CAMPAIGN, "PA"),
        attachments=(("Plan estratégico - Panamá.xlsx", True, "2"),),
    ),
    "two_same_name.eml": Expected(
        kind=KIND_REPLY,
        from_address="enlace@sre.example.mx",
        in_reply_to=(our_id("MX"),),
        subject_ref=(CAMPAIGN, "MX"),
        attachments=(("Plan.xlsx", True, "2"), ("Plan.xlsx", True, "3")),
    ),
    "signature_image_pdf.eml": Expected(
        kind=KIND_REPLY,
        from_address="liaison@state.example.gov",
        in_reply_to=(our_id("US"),),
        references=(our_id("US"),),
        subject_ref=(CAMPAIGN, "US"),
        attachments=(
            ("image001.png", False, "1.2"),
            ("Strategic Plan - United States.xlsx", True, "2"),
            ("Cover letter.pdf", False, "3"),
        ),
    ),
}


def test_every_fixture_file_has_a_case() -> None:
    assert sorted(p.name for p in FIXTURES.glob("*.eml")) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fixture(name: str) -> None:
    expected = CASES[name]
    message = load(name)
    assert message.problems == ()
    assert message.kind == expected.kind, message.kind_reason
    assert message.kind_reason.startswith(expected.reason_starts)
    assert message.from_address == expected.from_address
    assert message.in_reply_to == expected.in_reply_to
    assert message.references == expected.references
    assert parse_subject_reference(message.subject) == expected.subject_ref
    assert [(a.filename, a.is_workbook, a.path) for a in message.attachments] == list(expected.attachments)
    assert (message.auth.present, message.auth.failing) == (expected.auth_present, expected.auth_failing)
    assert [(f.recipient, f.status, f.permanent) for f in message.failures] == list(expected.failures)
    assert message.original_message_id == expected.original_message_id
    assert message.original_references == expected.original_references
    assert message.original_recipients == expected.original_recipients
    assert body_answers(message.body_text, KEYS) == expected.answers
    assert message.message_id is None or message.message_id.startswith("<")  # qmail bounces carry none
    assert message.date is not None and message.date.utcoffset() is not None
    assert "\n" not in message.subject


@pytest.mark.parametrize("name", sorted(CASES))
def test_fixture_attachments_decode_to_their_files(name: str) -> None:
    for attachment in load(name).attachments:
        assert not attachment.too_large
        assert attachment.size == len(attachment.data) > 0
        if attachment.is_workbook:
            with zipfile.ZipFile(io.BytesIO(attachment.data)) as archive:
                assert archive.testzip() is None
                assert "xl/workbook.xml" in archive.namelist()
        elif attachment.content_type == "image/png":
            assert attachment.data.startswith(b"\x89PNG\r\n\x1a\n")
        elif attachment.content_type == "application/pdf":
            assert attachment.data.startswith(b"%PDF-")


def test_fixture_details_people_read() -> None:
    gmail = load("gmail_reply_with_xlsx.eml")
    assert gmail.from_name == "María José Rivera"
    assert gmail.subject.startswith("Re: Columna «Responsable» del Plan Estratégico 2017-2022")
    assert gmail.auth.summary == "dmarc=pass spf=pass dkim=pass"
    assert gmail.date == datetime(2017, 10, 23, 16, 14, 2, tzinfo=UTC)
    assert gmail.body_text.splitlines()[-1] == "Dirección de Protección al Migrante"
    assert "escribió" not in gmail.body_text and "Nombre de la institución" not in gmail.body_text

    outlook = load("outlook_reply_xlsx.eml")
    assert outlook.from_name == "Mejía, Carlos Andrés"
    assert outlook.body_text.endswith("Secretaría de Relaciones Exteriores")
    assert "Enviado el" not in outlook.body_text

    apple = load("apple_mail_reply.eml")
    assert apple.body_text.startswith("Dear colleagues,")
    assert apple.body_text.endswith("Immigration and Nationality Department")  # text after the inline attachment
    assert apple.attachments[0].content_type == "application/octet-stream"

    postfix = load("dsn_postfix.eml")
    assert postfix.failures[0].diagnostic == (
        "550 5.1.1 <enlace@mire.example.pa>: Recipient address rejected: User unknown in virtual mailbox table"
    )
    assert load("dsn_exchange.eml").attachments == ()  # the returned original's workbook is ours, not theirs
    delayed = load("dsn_delayed.eml").failures[0]
    assert delayed.diagnostic == "connect to mx.cancilleria.example.ni[203.0.113.90]:25: Connection timed out"

    m365 = load("dmarc_fail_m365.eml")
    assert m365.auth.summary == "dmarc=fail spf=fail dkim=none"


def _make_fixtures_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fixture_files_are_what_the_generator_writes() -> None:
    built = _make_fixtures_module().build_all()
    assert sorted(built) == sorted(CASES)
    for name, data in built.items():
        assert (FIXTURES / name).read_bytes() == data, f"{name}: run tests/fixtures/mail/make_fixtures.py"


# ==========================================================================
# Kinds
# ==========================================================================

BASE = """From: Enlace <enlace@sre.example.hn>
To: ts@example.org
Message-ID: <x1@sre.example.hn>
Date: Mon, 23 Oct 2017 10:00:00 -0600
"""


@pytest.mark.parametrize(
    ("extra", "kind", "reason"),
    [
        ("Subject: Re: Plan\n", KIND_REPLY, "no automatic"),
        ("Subject: Re: Plan\nAuto-Submitted: no\n", KIND_REPLY, "no automatic"),
        ("Subject: Re: Plan\nAuto-Submitted: auto-generated\n", KIND_AUTO_REPLY, "Auto-Submitted: auto-generated"),
        ("Subject: Re: Plan\nAuto-Submitted: Auto-Replied (vacation)\n", KIND_AUTO_REPLY, "Auto-Submitted"),
        ("Subject: Re: Plan\nX-Autoreply: yes\n", KIND_AUTO_REPLY, "X-Autoreply: yes"),
        ("Subject: Re: Plan\nX-Autorespond: vacation\n", KIND_AUTO_REPLY, "X-Autorespond"),
        ("Subject: Re: Plan\nPrecedence: junk\n", KIND_AUTO_REPLY, "Precedence: junk"),
        ("Subject: Re: Plan\nPrecedence: Auto_Reply\n", KIND_AUTO_REPLY, "Precedence: auto_reply"),
        ("Subject: Re: Plan\nPrecedence: list\n", KIND_REPLY, "no automatic"),
        ("Subject: Re: Plan\nReturn-Path: <>\n", KIND_AUTO_REPLY, "Return-Path: <>"),
        ("Subject: Re: Plan\nReturn-Path: < >\n", KIND_AUTO_REPLY, "Return-Path: <>"),
        ("Subject: Re: Plan\nReturn-Path: <enlace@sre.example.hn>\n", KIND_REPLY, "no automatic"),
        ("Subject: Re: Plan\nX-Auto-Response-Suppress: All\n", KIND_REPLY, "no automatic"),
        ("Subject: Automatic reply: Plan\n", KIND_AUTO_REPLY, "subject"),
        ("Subject: RE: Fw: automatic reply: Plan\n", KIND_AUTO_REPLY, "subject"),
        ("Subject: Auto-Reply: Plan\n", KIND_AUTO_REPLY, "subject"),
        ("Subject: Out of Office: Plan\n", KIND_AUTO_REPLY, "subject"),
        ("Subject: =?utf-8?q?Respuesta_autom=C3=A1tica=3A_Plan?=\n", KIND_AUTO_REPLY, "subject"),
        ("Subject: Fuera de la oficina: Plan\n", KIND_AUTO_REPLY, "subject"),
        ("Subject: Ausente: Plan\n", KIND_AUTO_REPLY, "subject"),
        ("Subject: =?utf-8?q?R=C3=A9ponse_automatique=C2=A0:_Plan?=\n", KIND_AUTO_REPLY, "subject"),
        ("Subject: Re: Plan (ausente la próxima semana)\n", KIND_REPLY, "no automatic"),
        ("Subject: Re: Automatic replies are switched off\n", KIND_REPLY, "no automatic"),
        ("Subject: Automatic reply: Plan\nAuto-Submitted: auto-replied\n", KIND_AUTO_REPLY, "Auto-Submitted"),
    ],
)
def test_kinds(extra: str, kind: str, reason: str) -> None:
    message = parse_message(mail(BASE + extra))
    assert (message.kind, message.kind_reason.startswith(reason)) == (kind, True), message.kind_reason


def test_a_delivery_report_with_an_empty_return_path_is_a_bounce_not_an_auto_reply() -> None:
    raw = (FIXTURES / "dsn_postfix.eml").read_bytes()
    assert raw.startswith(b"Return-Path: <>")
    assert parse_message(raw).kind == KIND_BOUNCE


def dsn(blocks: str, report_type: str = "delivery-status", headers: str = "") -> bytes:
    return mail(
        f"""From: MAILER-DAEMON@mail.example.org (Mail Delivery System)
To: ts@example.org
Subject: Delivery Status Notification
Date: Mon, 23 Oct 2017 10:00:00 -0600
{headers}MIME-Version: 1.0
Content-Type: multipart/report; report-type={report_type}; boundary="b"
""",
        f"""--b
Content-Type: text/plain

Could not deliver.
--b
Content-Type: message/delivery-status

Reporting-MTA: dns; mail.example.org

{blocks}
--b--
""",
    )


def test_delivery_status_with_several_recipients_and_actions() -> None:
    message = parse_message(
        dsn(
            """Final-Recipient: rfc822; A@Example.org
Action: failed
Status: 5.2.2 (mailbox full)
Diagnostic-Code: smtp; 552 5.2.2 Mailbox full

Final-Recipient: rfc822; b@example.org
Action: delivered
Status: 2.0.0

Final-Recipient: rfc822; c@example.org
Action: delayed
Status: 4.7.0

Final-Recipient: rfc822; d@example.org
Action: failed

Final-Recipient: rfc822;e@example.org
Action: relayed
Status: 2.0.0
"""
        )
    )
    assert message.kind == KIND_BOUNCE
    assert [(f.recipient, f.status, f.permanent, f.diagnostic) for f in message.failures] == [
        ("a@example.org", "5.2.2", True, "552 5.2.2 Mailbox full"),
        ("c@example.org", "4.7.0", False, ""),
        ("d@example.org", "5.0.0", True, ""),
    ]


def test_a_delivery_report_of_success_only_is_no_bounce() -> None:
    message = parse_message(dsn("Final-Recipient: rfc822; a@example.org\nAction: relayed\nStatus: 2.0.0\n"))
    assert (message.kind, message.failures) == (KIND_AUTO_REPLY, ())
    assert "not a failure" in message.kind_reason


def test_a_delivery_report_without_recipients_falls_back_to_the_text() -> None:
    raw = dsn("").replace(b"Could not deliver.", b"<lost@example.org>: 550 5.1.1 unknown")
    message = parse_message(raw)
    assert message.kind == KIND_BOUNCE
    assert [(f.recipient, f.status) for f in message.failures] == [("lost@example.org", "5.1.1")]


def test_a_read_receipt_is_automatic() -> None:
    message = parse_message(dsn("Final-Recipient: rfc822; a@example.org\n", "disposition-notification"))
    assert message.kind == KIND_AUTO_REPLY
    assert "disposition-notification" in message.kind_reason


def test_a_report_without_report_type_is_recognised_by_its_parts() -> None:
    raw = dsn("Final-Recipient: rfc822; a@example.org\nAction: failed\nStatus: 5.1.1\n")
    raw = raw.replace(b"report-type=delivery-status; ", b"")
    message = parse_message(raw)
    assert message.kind == KIND_BOUNCE
    assert message.failures[0].recipient == "a@example.org"


@pytest.mark.parametrize(
    ("sender", "subject", "body", "expected"),
    [
        (
            "Mail Delivery Subsystem <mailer-daemon@googlemail.com>",
            "Delivery Status Notification (Failure)",
            "Your message wasn't delivered to enlace@sre.example.hn because the address couldn't be found.\n\n"
            "The response was:\n\n550 5.1.1 The email account that you tried to reach does not exist.\n",
            ("enlace@sre.example.hn", "5.1.1", True),
        ),
        (
            "postmaster@mire.example.pa",
            "No se puede entregar: Plan",
            "No se pudo entregar el mensaje a los siguientes destinatarios:\n\nenlace@mire.example.pa\n"
            "El servidor remoto respondió: 550 Buzón no disponible\n",
            ("enlace@mire.example.pa", "5.0.0", True),
        ),
        (
            "MAILER-DAEMON@mail.example.org",
            "Undeliverable: Plan",
            "Delivery to the following recipient has been delayed:\n\n    enlace@minex.example.gt\n\n"
            "Message will be retried for 2 more day(s)\n",
            ("enlace@minex.example.gt", "5.0.0", True),
        ),
        (
            "MAILER-DAEMON@mail.example.org",
            "Warning: could not send message for past 4 hours",
            "The original message was received at Mon, 23 Oct 2017\n\n"
            "----- Transcript of session follows -----\n<enlace@mire.example.pa>... Deferred: Connection timed out\n",
            ("enlace@mire.example.pa", "4.0.0", False),
        ),
    ],
)
def test_non_standard_bounces(sender: str, subject: str, body: str, expected: tuple[str, str, bool]) -> None:
    message = parse_message(
        mail(f"From: {sender}\nTo: ts@example.org\nSubject: {subject}\nDate: Mon, 23 Oct 2017 10:00:00 -0600\n", body)
    )
    assert message.kind == KIND_BOUNCE
    assert [(f.recipient, f.status, f.permanent) for f in message.failures] == [expected]


def test_mail_from_the_mail_system_that_is_no_bounce_is_still_not_a_reply() -> None:
    message = parse_message(mail("From: MAILER-DAEMON@mail.example.org\nSubject: Quota report\n"))
    assert message.kind == KIND_AUTO_REPLY


def test_a_bounce_returning_the_original_as_an_attached_message() -> None:
    original = f"Message-ID: {our_id('HN')}\nTo: Enlace <ENLACE@sre.example.hn>, otro@sre.example.hn\nSubject: x\n"
    raw = mail(
        "From: Mail Delivery System <MAILER-DAEMON@mail.example.org>\nSubject: Mail delivery failed\n"
        'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"\n',
        f"--b\nContent-Type: text/plain\n\n<enlace@sre.example.hn>: 550 5.1.1 unknown user\n--b\n"
        f"Content-Type: message/rfc822\n\n{original}\nbody\n--b--\n",
    )
    message = parse_message(raw)
    assert message.kind == KIND_BOUNCE
    assert message.original_message_id == our_id("HN")
    assert message.original_recipients == ("enlace@sre.example.hn", "otro@sre.example.hn")
    assert [(f.recipient, f.status) for f in message.failures] == [("enlace@sre.example.hn", "5.1.1")]


# ==========================================================================
# Headers: ids, addresses, dates, subjects
# ==========================================================================


def test_message_ids_are_normalised() -> None:
    message = parse_message(
        mail(
            "From: a@example.org\nMessage-ID:\n <abc.def@\n example.org>\nIn-Reply-To: bare.id@example.org\n"
            "References: <one@x>\n\t<two@\n y> (comment) <three@z>\n"
        )
    )
    assert message.message_id == "<abc.def@example.org>"
    assert message.in_reply_to == ("<bare.id@example.org>",)
    assert message.references == ("<one@x>", "<two@y>", "<three@z>")


def test_from_is_the_address_never_the_display_name() -> None:
    message = parse_message(mail('From: "enlace@sre.example.hn" <Intruder@Evil.example.net>\n'))
    assert message.from_address == "intruder@evil.example.net"
    assert message.from_name == "enlace@sre.example.hn"


def test_two_from_headers_leave_no_sender_and_it_is_reported() -> None:
    # Which one a reader (or a DMARC checker) takes cannot be told: such a message is never trusted.
    message = parse_message(mail("From: a@example.org\nFrom: b@example.org\n"))
    assert message.from_address is None
    assert any("From headers" in p for p in message.problems)


def test_raw_utf8_headers_are_read() -> None:
    message = parse_message(mail("From: Enlace México <enlace@sre.example.mx>\nSubject: Re: Plan Estratégico\n"))
    assert (message.from_name, message.subject) == ("Enlace México", "Re: Plan Estratégico")


def test_latin1_raw_header_is_read() -> None:
    raw = b"From: a@example.org\r\nSubject: Plan estrat\xe9gico\r\n\r\nx\r\n"
    assert parse_message(raw).subject == "Plan estratégico"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Mon, 23 Oct 2017 10:00:00 -0600", datetime(2017, 10, 23, 10, tzinfo=timezone(timedelta(hours=-6)))),
        ("23 Oct 2017 16:00:00 -0000", datetime(2017, 10, 23, 16, tzinfo=UTC)),
        ("Mon, 23 Oct 2017 10:00:00 GMT", datetime(2017, 10, 23, 10, tzinfo=UTC)),
        ("yesterday", None),
        ("Mon, 99 Foo 99999 99:99:99 +9999", None),
        ("", None),
    ],
)
def test_dates(value: str, expected: datetime | None) -> None:
    date = parse_message(mail(f"From: a@example.org\nDate: {value}\n")).date
    assert date == expected
    if date is not None:
        assert date.utcoffset() is not None


def test_folded_header_cannot_smuggle_another_header() -> None:
    message = parse_message(
        mail(
            "From: a@example.org\nSubject: x\n Bcc: victim@example.org\n"
            "In-Reply-To: <id@x>\n"
            "Content-Type: text/plain; charset=utf-8\n"
        )
    )
    assert message.subject == "x Bcc: victim@example.org"
    encoded = parse_message(mail("From: a@example.org\nSubject: =?utf-8?q?x=0D=0ABcc:_victim@example.org?=\n"))
    assert encoded.subject == "x Bcc: victim@example.org"
    name = parse_message(mail("From: =?utf-8?q?Eve=0D=0ABcc=3A_x?= <eve@example.org>\n"))
    assert (name.from_name, name.from_address) == ("Eve Bcc: x", "eve@example.org")


def test_encoded_words_split_inside_a_character_are_joined() -> None:
    # "é" is C3 A9 in UTF-8; many encoders cut long subjects between the two bytes.
    message = parse_message(mail("From: a@example.org\nSubject: =?utf-8?q?Plan_estrat=C3?=\n =?utf-8?q?=A9gico?=\n"))
    assert message.subject == "Plan estratégico"


# ==========================================================================
# Attachments
# ==========================================================================


def multipart(*parts: str, outer: str = "From: a@example.org\n") -> bytes:
    body = "".join(f"--b\n{part}\n" for part in parts) + "--b--\n"
    return mail(outer + 'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"\n', body)


def attachment_part(headers: str, data: bytes = b"PK\x03\x04 workbook") -> str:
    return f"{headers.strip()}\nContent-Transfer-Encoding: base64\n\n{base64.b64encode(data).decode()}\n"


@pytest.mark.parametrize(
    ("headers", "filename", "is_workbook"),
    [
        ('Content-Type: application/octet-stream; name="plan.xlsx"', "plan.xlsx", True),
        ("Content-Type: application/octet-stream\nContent-Disposition: inline; filename=PLAN.XLSM", "PLAN.XLSM", True),
        ("Content-Type: application/vnd.ms-excel\nContent-Disposition: attachment", "", True),
        ('Content-Type: application/octet-stream; name="plan.ods"', "plan.ods", True),
        ('Content-Type: application/vnd.ms-excel; name="viejo.xls"', "viejo.xls", True),
        ('Content-Type: application/zip; name="plan.xlsx.zip"', "plan.xlsx.zip", False),
        ("Content-Type: application/pdf", "", False),
        (
            "Content-Type: application/octet-stream\n"
            "Content-Disposition: attachment; filename*=utf-8''Plan%20estrat%C3%A9gico.xlsx",
            "Plan estratégico.xlsx",
            True,
        ),
        (
            'Content-Type: application/octet-stream\nContent-Disposition: attachment; filename="fallback.xlsx";\n'
            " filename*=utf-8''Plan%20bueno.xlsx",
            "Plan bueno.xlsx",
            True,
        ),
        (
            "Content-Type: application/octet-stream\nContent-Disposition: attachment;\n"
            " filename*0*=utf-8''Plan%20;\n filename*1=\"de acci\";\n filename*2*=%C3%B3n.xlsx",
            "Plan de acción.xlsx",
            True,
        ),
        (
            'Content-Type: application/octet-stream\nContent-Disposition: attachment; filename="=?UTF-8?B?'
            + base64.b64encode("Plan estratégico.xlsx".encode()).decode()
            + '?="',
            "Plan estratégico.xlsx",
            True,
        ),
        ('Content-Type: text/csv; name="plan.csv"', "plan.csv", False),
        ('Content-Type: text/plain\nContent-Disposition: attachment; filename="notas.txt"', "notas.txt", False),
        (
            'Content-Type: application/octet-stream\nContent-Disposition: attachment; filename="../../x.xlsx"',
            "x.xlsx",
            True,
        ),
        (
            "Content-Type: application/octet-stream\n"
            'Content-Disposition: attachment; filename="C:\\Users\\x\\Plan.xlsx"',
            "Plan.xlsx",
            True,
        ),
        (
            "Content-Type: application/octet-stream\nContent-Disposition: attachment; "
            "filename*=utf-8''pl%01an%E2%80%AEx%00.xlsx",
            "planx.xlsx",
            True,
        ),
        ('Content-Type: application/octet-stream\nContent-Disposition: attachment; filename=".."', "", False),
    ],
)
def test_attachment_names(headers: str, filename: str, is_workbook: bool) -> None:
    message = parse_message(multipart("Content-Type: text/plain\n\nhola\n", attachment_part(headers)))
    assert [(a.filename, a.is_workbook) for a in message.attachments] == [(filename, is_workbook)]
    assert message.attachments[0].data == b"PK\x03\x04 workbook"
    assert message.body_text == "hola"


def test_body_text_parts_are_not_attachments_and_inline_files_are() -> None:
    message = parse_message(
        multipart(
            "Content-Type: text/plain\n\nplain body\n",
            "Content-Type: text/html\n\n<p>html body</p>\n",
            attachment_part("Content-Type: image/jpeg\nContent-Disposition: inline", b"\xff\xd8\xff"),
        )
    )
    assert [(a.content_type, a.filename, a.path) for a in message.attachments] == [("image/jpeg", "", "3")]
    assert message.body_text == "plain body\nhtml body"


def test_too_large_attachments_are_reported_not_read() -> None:
    data = bytes(range(256)) * 40  # 10,240 bytes
    message = parse_message(
        multipart(attachment_part('Content-Type: application/octet-stream; name="big.xlsx"', data)),
        Limits(max_attachment_bytes=10_000),
    )
    (big,) = message.attachments
    assert (big.too_large, big.data, big.filename, big.is_workbook) == (True, b"", "big.xlsx", True)
    assert 10_000 < big.size <= 10_300
    assert any("larger than 10000 bytes" in p for p in message.problems)
    exact = parse_message(multipart(attachment_part("Content-Type: application/pdf", data)), Limits(10**6, 10_240))
    assert (exact.attachments[0].too_large, exact.attachments[0].size) == (False, 10_240)


def test_quoted_printable_and_unencoded_attachments() -> None:
    message = parse_message(
        multipart(
            'Content-Type: text/csv; name="a.csv"\nContent-Transfer-Encoding: quoted-printable\n\nc=C3=B3digo;x=\n;y\n',
            'Content-Type: application/octet-stream; name="b.bin"\n\nraw bytes\n',
        )
    )
    # the line break before a delimiter belongs to the delimiter; the one before it is content
    assert [a.data for a in message.attachments] == ["código;x;y\r\n".encode(), b"raw bytes\r\n"]


def test_a_message_cut_at_max_message_bytes_marks_the_cut_attachment() -> None:
    raw = multipart(
        "Content-Type: text/plain\n\nhola\n",
        attachment_part('Content-Type: application/octet-stream; name="plan.xlsx"', b"x" * 3000),
    )
    message = parse_message(raw, Limits(max_message_bytes=len(raw) - 2000))
    assert any("cut at" in p for p in message.problems)
    assert [(a.filename, a.too_large, a.data) for a in message.attachments] == [("plan.xlsx", True, b"")]


def test_an_attached_message_in_base64_is_still_walked() -> None:
    inner = mail(
        'From: b@example.org\nContent-Type: multipart/mixed; boundary="c"\n',
        "--c\nContent-Type: text/plain\n\nx\n--c\n"
        + attachment_part('Content-Type: application/octet-stream; name="dentro.xlsx"')
        + "--c--\n",
    )
    raw = multipart(
        "Content-Type: message/rfc822\nContent-Transfer-Encoding: base64\n\n" + base64.encodebytes(inner).decode()
    )
    assert [(a.filename, a.path) for a in parse_message(raw).attachments] == [("dentro.xlsx", "1.2")]


def test_parts_of_a_digest_default_to_messages() -> None:
    raw = mail(
        'From: a@example.org\nContent-Type: multipart/digest; boundary="d"\n',
        '--d\n\nFrom: x@example.org\nContent-Type: application/pdf; name="a.pdf"\n\n%PDF\n--d--\n',
    )
    assert [(a.filename, a.path) for a in parse_message(raw).attachments] == [("a.pdf", "1.1")]


def test_lf_and_crlf_give_the_same_result() -> None:
    crlf_raw = (FIXTURES / "gmail_reply_with_xlsx.eml").read_bytes()
    lf_raw = crlf_raw.replace(b"\r\n", b"\n")
    first, second = parse_message(crlf_raw), parse_message(lf_raw)
    assert first.attachments == second.attachments
    assert (first.subject, first.body_text, first.auth) == (second.subject, second.body_text, second.auth)


# ==========================================================================
# Hostile input
# ==========================================================================


def nested_messages(depth: int) -> bytes:
    raw = b"From: leaf@example.org\r\nSubject: leaf\r\n\r\nhello\r\n"
    for level in range(depth):
        raw = (
            b"From: a@example.org\r\nSubject: level %d\r\nMIME-Version: 1.0\r\nContent-Type: message/rfc822\r\n\r\n"
            % level
        ) + raw
    return raw


def test_a_thousand_nested_messages_are_bounded() -> None:
    started = time.perf_counter()
    message = parse_message(nested_messages(1000))
    assert time.perf_counter() - started < 2
    assert message.subject == "level 999"
    assert any("nested deeper than 20 levels" in p for p in message.problems)


def test_a_thousand_nested_multiparts_are_bounded() -> None:
    raw = b"From: a@example.org\r\nSubject: deep\r\nMIME-Version: 1.0\r\n"
    for level in range(1000):
        raw += b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (level, level)
    raw += b"Content-Type: text/plain\r\n\r\nbottom\r\n"
    started = time.perf_counter()
    message = parse_message(raw)
    assert time.perf_counter() - started < 2
    assert any("nested deeper" in p for p in message.problems)


def test_a_huge_depth_limit_is_capped_to_stay_clear_of_recursion_errors() -> None:
    message = parse_message(nested_messages(3000), Limits(max_depth=100_000, max_parts=100_000))
    assert any("nested deeper than 64 levels" in p for p in message.problems)


def test_five_thousand_attachments_stop_at_max_parts() -> None:
    part = attachment_part('Content-Type: application/pdf; name="a.pdf"', b"%PDF-1.4 tiny")
    raw = multipart(*([part] * 5000))
    started = time.perf_counter()
    message = parse_message(raw)
    assert time.perf_counter() - started < 3
    assert 900 < len(message.attachments) < 1000
    assert any("truncated at 1000 parts" in p for p in message.problems)
    small = parse_message(raw, Limits(max_parts=10))
    assert len(small.attachments) == 9  # the message itself is the first of the 10 parts
    assert [a.path for a in small.attachments][-1] == "9"


def test_a_one_megabyte_header_line() -> None:
    raw = mail(
        "X-Junk: " + "a" * (1024 * 1024) + "\nSubject: " + "b" * (1024 * 1024) + "\nFrom: a@example.org\n"
        'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"\n',
        "--b\n" + attachment_part('Content-Type: application/pdf; name="a.pdf"') + "--b--\n",
    )
    started = time.perf_counter()
    message = parse_message(raw)
    assert time.perf_counter() - started < 2
    assert message.from_address == "a@example.org"
    assert len(message.subject) <= 1000
    assert [a.filename for a in message.attachments] == ["a.pdf"]
    assert any("X-Junk" in p and "bytes long" in p for p in message.problems)


def test_a_one_megabyte_content_type_or_address_line() -> None:
    raw = mail(
        "From: " + "x," * 500_000 + "a@example.org\nTo: " + '"' + ";" * 500_000 + "\n"
        "Content-Type: text/plain; " + 'a="' + ";" * 1_000_000 + '"\n'
    )
    started = time.perf_counter()
    parse_message(raw)
    assert time.perf_counter() - started < 2


def test_nul_bytes_in_headers_and_body() -> None:
    raw = b"From: a\x00b <a@example.org>\r\nSubject: sub\x00ject\r\nMessage-ID: <x\x00y@z>\r\n\r\nbo\x00dy\r\n"
    message = parse_message(raw)
    assert message.subject == "subject"
    assert message.from_address == "a@example.org"
    assert message.message_id == "<xy@z>"
    assert message.body_text == "body"
    assert any("NUL" in p for p in message.problems)


@pytest.mark.parametrize("charset", ["x-unknown", "utf\x00-8", "utf-8", "rot13", "base64", "zlib", "idna", "a" * 60])
def test_invalid_charsets_are_survived(charset: str) -> None:
    raw = (
        b"From: a@example.org\r\nSubject: =?"
        + charset.encode()
        + b'?q?Informaci=F3n?=\r\nContent-Type: text/plain; charset="'
        + charset.encode()
        + b'"\r\n\r\nInformaci\xf3n\r\n'
    )
    message = parse_message(raw)
    assert message.body_text == "Información"
    assert message.subject == "Información"
    assert any(p.startswith("bad charset") and "windows-1252" in p for p in message.problems)


def test_an_undeclared_charset_is_utf8_when_valid() -> None:
    message = parse_message("From: a@example.org\r\n\r\nInformación\r\n".encode())
    assert (message.body_text, message.problems) == ("Información", ())


def test_missing_closing_boundary() -> None:
    raw = multipart(
        "Content-Type: text/plain\n\nhola\n",
        attachment_part('Content-Type: application/octet-stream; name="plan.xlsx"'),
    ).replace(b"--b--\r\n", b"")
    message = parse_message(raw)
    assert [a.filename for a in message.attachments] == ["plan.xlsx"]
    assert message.attachments[0].data == b"PK\x03\x04 workbook"
    assert "missing closing boundary" in message.problems


def test_missing_boundary_parameter() -> None:
    raw = multipart(
        "Content-Type: text/plain\n\nhola\n", attachment_part('Content-Type: application/pdf; name="a.pdf"')
    )
    guessed = parse_message(raw.replace(b'; boundary="b"', b""))
    assert [a.filename for a in guessed.attachments] == ["a.pdf"]
    assert any("missing boundary" in p for p in guessed.problems)
    no_parts = parse_message(mail("From: a@example.org\nContent-Type: multipart/mixed\n", "just text\n"))
    assert no_parts.body_text == "just text"
    assert any("without a boundary" in p for p in no_parts.problems)


def test_a_boundary_that_never_appears() -> None:
    message = parse_message(mail('From: a@example.org\nContent-Type: multipart/mixed; boundary="zz"\n', "text\n"))
    assert message.body_text == "text"
    assert any("no parts found" in p for p in message.problems)


def test_garbage_content_type_and_headerless_parts() -> None:
    raw = multipart("\nno headers at all\n", "Content-Type: ;;;///\n\nbroken type\n")
    message = parse_message(raw)
    assert message.body_text == "no headers at all\nbroken type"
    assert any("invalid Content-Type" in p for p in message.problems)


@pytest.mark.parametrize("raw", [b"", b"\r\n", b"\n\n\n", b"   ", b"\x00" * 10])
def test_empty_input(raw: bytes) -> None:
    message = parse_message(raw)
    assert message.kind == KIND_REPLY
    assert (message.from_address, message.message_id, message.attachments) == (None, None, ())


def test_no_header_block_at_all() -> None:
    message = parse_message(b"just some text\nwithout headers\n")
    assert message.body_text == "just some text\nwithout headers"
    assert message.problems


def _check_invariants(message: Message) -> None:
    assert message.kind in (KIND_REPLY, KIND_AUTO_REPLY, KIND_BOUNCE)
    assert not any(p.startswith("internal error") for p in message.problems), message.problems
    assert "\n" not in message.subject and "\r" not in message.subject
    assert message.from_address is None or message.from_address == message.from_address.lower()
    assert message.date is None or message.date.utcoffset() is not None
    assert "\x00" not in message.body_text
    for attachment in message.attachments:
        assert "/" not in attachment.filename and "\\" not in attachment.filename
        assert attachment.too_large or attachment.size == len(attachment.data)


def test_random_bytes() -> None:
    rng = random.Random(20171023)
    alphabet = b'From:To:Subject:Content-Type: multipart/mixed; boundary=b\r\n--b--=?utf-8?q?=C3?=<>@;"\\\x00\xff '
    for _ in range(300):
        length = rng.randrange(0, 3000)
        if rng.random() < 0.5:
            raw = bytes(rng.randrange(256) for _ in range(length))
        else:
            raw = bytes(rng.choice(alphabet) for _ in range(length))
        _check_invariants(parse_message(raw))


def test_mutated_fixtures() -> None:
    rng = random.Random(3834)
    corpus = [path.read_bytes() for path in sorted(FIXTURES.glob("*.eml"))]
    for _ in range(300):
        raw = bytearray(rng.choice(corpus))
        for _ in range(rng.randrange(1, 20)):
            position = rng.randrange(len(raw))
            action = rng.random()
            if action < 0.4:
                raw[position] = rng.randrange(256)
            elif action < 0.7:
                del raw[position : position + rng.randrange(1, 200)]
            else:
                raw[position:position] = rng.choice([b"\r\n", b"\r\n\r\n", b"--", b"=?", b"\x00", b";", b'"', b"("])
        if rng.random() < 0.2:
            raw = raw[: rng.randrange(len(raw) + 1)]
        _check_invariants(parse_message(bytes(raw)))


# ==========================================================================
# Authentication-Results
# ==========================================================================

GMAIL_PASS = (
    "mx.google.com;\r\n       dkim=pass header.i=@sre.example.hn header.s=google header.b=Xk2b9Qz1;\r\n"
    "       spf=pass (google.com: domain of enlace@sre.example.hn designates 209.85.220.41 as permitted sender) "
    "smtp.mailfrom=enlace@sre.example.hn;\r\n       dmarc=pass (p=NONE sp=NONE dis=NONE) header.from=sre.example.hn"
)
GMAIL_FAIL = (
    "mx.google.com; dkim=fail header.i=@sre.example.hn header.s=google; spf=softfail (google.com: domain of "
    "transitioning enlace@sre.example.hn does not designate 198.51.100.7 as permitted sender; x=y) "
    "smtp.mailfrom=enlace@sre.example.hn; dmarc=fail (p=REJECT sp=REJECT dis=QUARANTINE) header.from=sre.example.hn"
)
M365_FAIL = (
    "spf=fail (sender IP is 198.51.100.23) smtp.mailfrom=sre.example.hn; dkim=none (message not signed) "
    "header.d=none;dmarc=fail action=none header.from=sre.example.hn;compauth=fail reason=001"
)
M365_PASS = (
    "spf=pass (sender IP is 40.107.74.52) smtp.mailfrom=sre.example.hn; dkim=pass (signature was verified) "
    "header.d=sre.example.hn;dmarc=pass action=none header.from=sre.example.hn;compauth=pass reason=100"
)


@pytest.mark.parametrize(
    ("value", "failing", "summary"),
    [
        (GMAIL_PASS, (), "dmarc=pass spf=pass dkim=pass"),
        (GMAIL_FAIL, ("dmarc", "spf", "dkim"), "dmarc=fail spf=softfail dkim=fail"),
        (M365_FAIL, ("dmarc", "spf"), "dmarc=fail spf=fail dkim=none"),
        (M365_PASS, (), "dmarc=pass spf=pass dkim=pass"),
        # SPF of some other envelope domain (a mailing service) says nothing of the sender
        ("mx.example.org; spf=fail smtp.mailfrom=bounces@mailer.example.net; dmarc=pass", (), "dmarc=pass spf=fail"),
        # a DKIM signature of another domain failing is not the sender failing...
        ("mx.example.org; dkim=fail header.d=other.example.net", (), "dkim=fail"),
        # ... but one of the From domain's parent is; and one good signature of the domain is enough
        ("mx.example.org; dkim=fail header.d=example.hn", ("dkim",), "dkim=fail"),
        ("mx.example.org; dkim=fail header.d=sre.example.hn; dkim=pass header.d=sre.example.hn", (), "dkim=fail,pass"),
        ("mx.example.org; dkim=fail header.d=notsre.example.hn", (), "dkim=fail"),
        ("mx.example.org; dkim=fail header.i=user@sre.example.hn", ("dkim",), "dkim=fail"),
        (
            "mx.example.org; dmarc=none; spf=neutral smtp.mailfrom=sre.example.hn;"
            " dkim=temperror header.d=sre.example.hn",
            (),
            "dmarc=none spf=neutral dkim=temperror",
        ),
        ("mx.example.org; spf=permerror smtp.mailfrom=sre.example.hn; dkim=policy header.d=sre.example.hn", (), None),
        ("mx.example.org; none", (), "no dmarc, spf or dkim result"),
        ("mx.example.org 1; DMARC=FAIL header.from=SRE.example.hn", ("dmarc",), "dmarc=fail"),
        ('mx.example.org; spf=softfail smtp.mailfrom="enlace@SRE.example.hn"', ("spf",), "spf=softfail"),
        # a comment may hold ";" "=" and even something that looks like a result
        ("mx.example.org; spf=pass (dmarc=fail; dkim=fail (nested)) smtp.mailfrom=sre.example.hn", (), "spf=pass"),
        ('garbage ((( ;;; === "unclosed', (), "no dmarc, spf or dkim result"),
    ],
)
def test_authentication_results(value: str, failing: tuple[str, ...], summary: str | None) -> None:
    verdict = parse_authentication_results([value], "sre.example.hn")
    assert verdict.present
    assert verdict.failing == failing
    if summary is not None:
        assert verdict.summary == summary


def test_only_the_topmost_authentication_results_counts() -> None:
    assert parse_authentication_results([GMAIL_PASS, GMAIL_FAIL], "sre.example.hn").failing == ()
    assert parse_authentication_results([M365_FAIL, M365_PASS], "sre.example.hn").failing == ("dmarc", "spf")


def test_no_authentication_results() -> None:
    verdict = parse_authentication_results([], "sre.example.hn")
    assert (verdict.present, verdict.failing, verdict.summary) == (False, (), "")


def test_without_a_from_domain_only_dmarc_can_fail() -> None:
    assert parse_authentication_results([GMAIL_FAIL], None).failing == ("dmarc",)


def test_the_message_reads_the_topmost_header_and_not_arc() -> None:
    raw = mail(
        f"Authentication-Results: {M365_PASS}\nARC-Authentication-Results: i=1; {M365_FAIL}\n"
        f"Authentication-Results: {M365_FAIL}\nFrom: Enlace <ENLACE@SRE.example.hn>\n"
    )
    assert parse_message(raw).auth.failing == ()


# ==========================================================================
# Quoted history
# ==========================================================================

NEW = "1.1: Dirección General de Migración\n\nSaludos,\nMaría"


@pytest.mark.parametrize(
    "history",
    [
        "On Mon, Oct 23, 2017 at 9:00 AM RCM Technical Secretariat <ts@example.org> wrote:\n\n> 1.2: example",
        "On Mon, Oct 23, 2017 at 9:00 AM RCM Technical Secretariat <\nts@example.org> wrote:\n> 1.2: example",
        "El lun., 23 oct. 2017 a las 9:00, Secretaría Técnica de la CRM (<ts@example.org>) escribió:\n> 1.2: x",
        "El lun., 23 oct. 2017 a las 9:00, Secretaría Técnica de la CRM (<\nts@example.org>) escribió:\n\n1.2: x",
        "El 20/10/17 a las 09:00, Secretaría Técnica escribió:\n1.2: ejemplo",
        "On 23 Oct 2017, at 10:00, RCM Technical Secretariat <ts@example.org> wrote:\n\n> 1.2: example",
        "-----Original Message-----\nFrom: ts@example.org\n1.2: example",
        "-----Mensaje original-----\nDe: ts@example.org\n1.2: ejemplo",
        "From: RCM Technical Secretariat <ts@example.org>\nSent: Monday, October 23, 2017 9:00 AM\n"
        "To: liaison@cic.example.ca\nSubject: Plan\n\n1.2: example",
        "De: Secretaría Técnica de la CRM <ts@example.org>\nEnviado el: lunes, 23 de octubre de 2017 09:00\n"
        "Para: enlace@sre.example.hn\nAsunto: Plan\n\n1.2: ejemplo",
        "De: Secretaría Técnica <ts@example.org>\nEnviado: lunes, 23 de octubre de 2017 09:00\n1.2: ejemplo",
        "*From:* RCM Technical Secretariat <ts@example.org>\n*Sent:* Monday, October 23, 2017\n1.2: example",
        "________________________________\nFrom: RCM Technical Secretariat <ts@example.org>\n1.2: example",
        "________________________________\n\nDe: Secretaría Técnica\nPara: enlace\n1.2: ejemplo",
        "---------- Forwarded message ---------\nFrom: ts@example.org\n1.2: example",
        "Begin forwarded message:\n\nFrom: ts@example.org\n1.2: example",
    ],
)
def test_strip_quoted(history: str) -> None:
    assert strip_quoted(f"{NEW}\n\n{history}\n") == NEW
    assert strip_quoted(f"{NEW}\r\n\r\n{history}".replace("\n", "\r\n")) == NEW


def test_quoted_lines_are_dropped_wherever_they_are() -> None:
    text = "> 1.2: what you asked\n1.2: our answer\n>> older\n  > indented quote\n1.3: another"
    assert strip_quoted(text) == "1.2: our answer\n1.3: another"


def test_ordinary_lines_that_resemble_history_are_kept() -> None:
    text = (
        "On the other hand, we wrote to the ministry.\nEl ministerio escribirá pronto.\n"
        "From: next week on, we are in charge.\n________________________________\nThanks"
    )
    assert strip_quoted(text) == text


# ==========================================================================
# Answers in the body
# ==========================================================================


@pytest.mark.parametrize(
    ("line", "key", "value"),
    [
        ("1.1: Dirección General de Migración", "1.1", "Dirección General de Migración"),
        ("2.3 - Ministerio de Salud", "2.3", "Ministerio de Salud"),
        ("2.3 – Ministerio", "2.3", "Ministerio"),
        ("2.3—Ministerio", "2.3", "Ministerio"),
        ("- 4.1: X", "4.1", "X"),
        ("* 4.1) X", "4.1", "X"),
        ("• 4.1: X", "4.1", "X"),
        ("Acción 1.2: X", "1.2", "X"),
        ("ACCIÓN 1.2: X", "1.2", "X"),
        ("Accio\u0301n 1.2: X", "1.2", "X"),  # decomposed ó, as some Mac software writes it
        ("Action 1.2: X", "1.2", "X"),
        ("Acción N° 1.2: X", "1.2", "X"),
        ("1.2. X", "1.2", "X"),
        ("   1.2 :   Ministerio de Salud   ", "1.2", "Ministerio de Salud"),
        ("1.2: Ministerio: Dirección 2.1", "1.2", "Ministerio: Dirección 2.1"),
        ("\t5.8\t-\tPolicía", "5.8", "Policía"),
    ],
)
def test_body_answer_lines(line: str, key: str, value: str) -> None:
    assert body_answers(f"Estimados:\n{line}\nSaludos", KEYS) == {key: value}


@pytest.mark.parametrize(
    "line",
    ["1.1 Ministerio", "1.1:", "1.1:   ", "1.1: -", "1.1 - -", "1.1.2: X", "11.1: X", "x1.1: X", "1.1x: X", "9.9: X"],
)
def test_lines_that_are_not_answers(line: str) -> None:
    assert body_answers(line, KEYS) == {}


def test_keys_are_compared_as_written() -> None:
    keys = ["1.1", "1.10"]
    assert body_answers("1.10: Diez\n", keys) == {"1.10": "Diez"}
    assert body_answers("1.10: Diez\n", ["1.1"]) == {}
    assert body_answers("1.1: Uno\n1.10: Diez\n", keys) == {"1.1": "Uno", "1.10": "Diez"}


def test_the_last_answer_for_a_key_wins() -> None:
    assert body_answers("1.1: Primero\n1.1: Segundo\n1.1: -\n", KEYS) == {"1.1": "Segundo"}


def test_body_answer_re_is_public_and_names_its_groups() -> None:
    match = BODY_ANSWER_RE.search("intro\n2.3 - Ministerio\n")
    assert match is not None and (match.group("key"), match.group("value")) == ("2.3", "Ministerio")


# ==========================================================================
# HTML to text
# ==========================================================================


def test_html_to_text() -> None:
    html = (
        "<html><head><title>t</title><style>p {color: red}</style></head><body>"
        "<script>var a = '1.1: no';</script><div>Estimados&nbsp;señores,</div><div><br></div>"
        "<p>1.1: Ministerio de Relaciones Exteriores &amp; Culto</p><ul><li>2.1: A</li><li>2.2: B</li></ul>"
        "<table><tr><td>3.1:</td><td>C</td></tr></table>"
        '<div class="gmail_quote">El lun. escribió:<blockquote>1.2: ejemplo<br>otra</blockquote></div></body></html>'
    )
    text = html_to_text(html)
    assert text == (
        "Estimados señores,\n\n1.1: Ministerio de Relaciones Exteriores & Culto\n\n- 2.1: A\n- 2.2: B\n\n3.1: C\n\n"
        "El lun. escribió:\n\n> 1.2: ejemplo\n> otra"
    )
    assert body_answers(strip_quoted(text), KEYS) == {
        "1.1": "Ministerio de Relaciones Exteriores & Culto",
        "2.1": "A",
        "2.2": "B",
        "3.1": "C",
    }


def test_outlook_html_conditional_comments() -> None:
    html = "<!--[if gte mso 9]><xml><o:x>1.1: no</o:x></xml><![endif]--><p>Hola<o:p></o:p></p><![if !vml]><p>x</p>"
    assert html_to_text(html) == "Hola\n\nx"


@pytest.mark.parametrize(
    "html",
    [
        "<!--" * 100_000,
        "<a" * 100_000,
        "<![CDATA[>" * 50_000,
        "<![" * 100_000,
        "</" * 100_000,
        "<!x>" * 100_000,
        "<a b='>" * 100_000,
        "<script>" + "</scr" * 100_000,
        "&#" * 100_000,
    ],
)
def test_hostile_html_is_fast_and_never_raises(html: str) -> None:
    started = time.perf_counter()
    html_to_text(html)
    assert time.perf_counter() - started < 2


def test_a_long_message_id_encoded_as_rfc2047_words_is_still_read() -> None:
    from email.message import EmailMessage

    message = EmailMessage()  # Python's default policy encodes a long id rather than folding it
    message["From"] = "enlace@sre.example.hn"
    message["Subject"] = "Re: plan"
    long_id = "<mailflow.41da1cdee071a17d3cd782a1.responsible-2017.HN.reminder-1d@example.org>"
    message["In-Reply-To"] = long_id
    message["References"] = f"<first@example.org> {long_id}"
    message.set_content("Adjunto.")
    raw = message.as_bytes()
    assert b"=?utf-8?q?" in raw
    parsed = parse_message(raw)
    assert parsed.in_reply_to == (long_id,)
    assert parsed.references == ("<first@example.org>", long_id)
