"""Shared test helpers: build configurations around the example, drive ticks."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from mailflow.clock import FixedClock
from mailflow.config import Config, load_config
from mailflow.engine import Engine
from mailflow.mailbox import MaildirMailbox
from mailflow.sender import LocalTransport
from mailflow.store import Store

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.yaml"
SAMPLE_PLAN = ROOT / "templates" / "workbooks" / "strategic-plan-2017-2022.xlsx"


def example_data() -> dict[str, Any]:
    data = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    data["campaigns"][0]["workbook"] = str(SAMPLE_PLAN)
    return data


def write_config(tmp_path: Path, data: dict[str, Any], name: str = "mailflow.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def server_mail(smtp: Any, account: Any | None = None, **imap: Any) -> dict[str, Any]:
    """The ``mail`` section for the rig's servers: ``smtp`` (anything with host and port) without TLS, and,
    with ``account`` (a :class:`tests.servers.ImapAccount`), its IMAP login; ``imap`` adds or replaces keys."""
    mail: dict[str, Any] = {
        "transport": "smtp",
        "smtp": {"host": smtp.host, "port": smtp.port, "security": "none", "timeout": 5},
    }
    if account is not None:
        mail["imap"] = {
            "host": account.host,
            "port": account.port,
            "security": "none",
            "username": account.user,
            "password": account.password,
            "processed_folder": "Processed",
            "timeout": 5,
            **imap,
        }
    return mail


def local_engine(tmp_path: Path, at: datetime) -> tuple[Engine, FixedClock]:
    """The example campaign on the local transport (maildir ``out`` and ``in`` folders in tmp_path), its
    requests sent by a tick at ``at``; the engine's store stays open for the caller to close."""
    data = example_data()
    data["store"] = str(tmp_path / "store.db")
    data["mail"] = {"transport": "local", "local": {"outbox": str(tmp_path / "out"), "inbox": str(tmp_path / "in")}}
    config = load_config(write_config(tmp_path, data))
    assert config.mail.local is not None
    clock = FixedClock(at)
    engine = Engine(
        config,
        Store.open(config.store),
        LocalTransport(config.mail.local.outbox),
        clock,
        mailbox=MaildirMailbox(config.mail.local.inbox),
    )
    engine.tick()
    return engine, clock


def smtp_config(tmp_path: Path, host: str, port: int, **mail: Any) -> Config:
    """The example configuration, sending through a test SMTP server, with its store in tmp_path."""
    data = example_data()
    data["mail"] = {
        "transport": "smtp",
        "smtp": {"host": host, "port": port, "security": "none", "timeout": 5},
        **mail,
    }
    data["store"] = str(tmp_path / "mailflow.db")
    tmp_path.mkdir(parents=True, exist_ok=True)
    return load_config(write_config(tmp_path, data))


def request_template_broken_for(tmp_path: Path, delegation_id: str) -> Path:
    """A folder of template overrides whose Spanish request fails to render for one delegation only.

    The other delegations render as with the built-in template, so check-config's sample rendering passes."""
    overrides = tmp_path / "overrides"
    (overrides / "es").mkdir(parents=True)
    builtin = ROOT / "templates" / "email" / "es" / "request.txt.j2"
    (overrides / "es" / "request.txt.j2").write_text(
        f'{{% if delegation.id == "{delegation_id}" %}}{{{{ no_such_variable }}}}{{% endif %}}'
        + builtin.read_text(encoding="utf-8"),
        encoding="utf-8",
    )
    return overrides


def fill_workbook(data: bytes, answers: dict[str, str], *, column: str = "Responsible") -> bytes:
    """What a delegation does: open the copy it received, write answers in the fill column, save."""
    import io

    import openpyxl

    from mailflow.workbook import find_column, normalize_header

    book = openpyxl.load_workbook(io.BytesIO(data))
    for sheet in book.worksheets:
        if sheet.sheet_state != "visible":
            continue
        for row in sheet.iter_rows(min_row=1, max_row=30):
            headers = [cell.value for cell in row]
            key_index = find_column(headers, "Code")
            fill_index = find_column(headers, column)
            if key_index is None or fill_index is None:
                continue
            for cells in sheet.iter_rows(min_row=row[0].row + 1):
                key = cells[key_index].value
                if key is not None and normalize_header(key) and str(key) in answers:
                    cells[fill_index].value = answers[str(key)]
            out = io.BytesIO()
            book.save(out)
            return out.getvalue()
    raise AssertionError("no header row found")


def reply_to(
    original: Any,
    *,
    sender: str,
    body: str = "Estimados, adjuntamos el plan completado.\n",
    attachments: list[tuple[str, bytes]] | None = None,
    subject: str | None = None,
    headers: dict[str, str] | None = None,
    thread: bool = True,
) -> bytes:
    """A delegation's reply to one of our emails, as its mail client would send it."""
    import email.policy
    from datetime import UTC, datetime
    from email.message import EmailMessage
    from email.utils import format_datetime, make_msgid

    # Real mail clients fold long headers; Python's default policy would RFC 2047-encode a long id instead.
    message = EmailMessage(policy=email.policy.default.clone(max_line_length=998))
    message["From"] = f"Enlace <{sender}>"
    message["To"] = "ts@example.org"
    message["Subject"] = subject if subject is not None else f"RE: {original['Subject']}"
    message["Date"] = format_datetime(datetime(2017, 10, 20, 16, 0, tzinfo=UTC))
    message["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2])
    if thread:
        original_id = str(original["Message-ID"]).strip()
        message["In-Reply-To"] = original_id
        message["References"] = original_id
    for name, value in (headers or {}).items():
        message[name] = value
    message.set_content(body)
    for filename, data in attachments or []:
        message.add_attachment(
            data,
            maintype="application",
            subtype="vnd.openxmlformats-officedocument.spreadsheetml.sheet",
            filename=filename,
        )
    return message.as_bytes()


def workbook_of(message: Any) -> tuple[str, bytes]:
    """The workbook attached to one of our emails."""
    for part in message.iter_attachments():
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes) and str(part.get_filename()).endswith(".xlsx"):
            return str(part.get_filename()), payload
    raise AssertionError("no workbook attached")


def bounce_of(original: Any, recipient: str, status: str = "5.1.1", action: str = "failed") -> bytes:
    """A Postfix-style delivery status notification (RFC 3464) for one of our emails."""
    original_id = str(original["Message-ID"]).strip()
    boundary = "dsn-boundary-42"
    lines = [
        "Return-Path: <>",
        "From: MAILER-DAEMON@mx.example.org (Mail Delivery System)",
        "To: ts@example.org",
        "Subject: Undelivered Mail Returned to Sender",
        "Date: Fri, 20 Oct 2017 16:00:00 +0000",
        "Message-ID: <20171020160000.DSN@mx.example.org>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        "This is the mail system at host mx.example.org.",
        "I'm sorry to have to inform you that your message could not be delivered.",
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        "Reporting-MTA: dns; mx.example.org",
        "",
        f"Final-Recipient: rfc822; {recipient}",
        f"Original-Recipient: rfc822;{recipient}",
        f"Action: {action}",
        f"Status: {status}",
        f"Diagnostic-Code: smtp; 550 {status} <{recipient}>: Recipient address rejected: User unknown",
        "",
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "",
        "From: ts@example.org",
        f"To: {recipient}",
        f"Subject: {original['Subject']}",
        f"Message-ID: {original_id}",
        "",
        f"--{boundary}--",
        "",
    ]
    return "\r\n".join(lines).encode("utf-8")
