"""A scripted campaign through the real Dovecot and aiosmtpd: the digests the Secretariat receives."""

from __future__ import annotations

import html.parser
import io
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import openpyxl
import pytest

from tests.helpers import bounce_of, fill_workbook, reply_to, workbook_of
from tests.servers import DovecotServer, SmtpServer
from tests.test_replies import ALL_KEYS, Campaign

pytestmark = pytest.mark.servers

THURSDAY_DIGEST = datetime(2017, 10, 19, 14, 0, tzinfo=UTC)  # 08:00 in San José
FRIDAY_DIGEST = datetime(2017, 10, 20, 14, 0, tzinfo=UTC)


class _Strict(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes.extend(attrs)


def digests(smtp: SmtpServer) -> list[object]:
    return [m.message for m in smtp.messages if m.message["X-Mailflow-Kind"] == "digest"]


def test_digests_report_rows_changes_attention_and_a_stopped_inbox_watcher(
    tmp_path: Path, smtp_server: SmtpServer, make_dovecot: Callable[..., DovecotServer]
) -> None:
    server = make_dovecot()
    account = server.new_account()
    opened = Campaign(tmp_path, smtp_server, account)
    try:
        honduras = opened.requests["HN"]
        name, data = workbook_of(honduras)
        account.append(
            "INBOX",
            reply_to(
                honduras,
                sender="enlace@sre.example.hn",
                attachments=[(name, fill_workbook(data, {k: "SENAF" for k in ALL_KEYS}))],
            ),
        )
        guatemala = opened.requests["GT"]
        name, data = workbook_of(guatemala)
        account.append(
            "INBOX",
            reply_to(
                guatemala,
                sender="enlace@minex.example.gt",
                attachments=[(name, fill_workbook(data, {"1.1": "<b>IGM</b> & Co"}))],
            ),
        )
        account.append(
            "INBOX",
            reply_to(
                opened.requests["MX"], sender="impostor@evil.example", attachments=[workbook_of(opened.requests["MX"])]
            ),
        )
        account.append("INBOX", bounce_of(opened.requests["BZ"], "liaison@immigration.example.bz"))
        opened.tick(hours=2)
        opened.clock.set(THURSDAY_DIGEST)
        opened.engine.tick()
        [digest] = digests(opened.smtp)
        assert digest["To"] == "coordinator@example.org"
        subject = str(digest["Subject"])
        assert "1 de 11" in subject and "ATENCIÓN" not in subject
        text = digest.get_body(preferencelist=("plain",)).get_content()
        assert "Honduras" in text and "Guatemala" in text and "Belize" in text
        assert "impostor@evil.example" in text  # held for review
        assert "liaison@immigration.example.bz" in text  # bounced
        page = digest.get_body(preferencelist=("html",)).get_content()
        parser = _Strict()
        parser.feed(page)
        parser.close()
        assert "script" not in parser.tags and "style" not in parser.tags and "img" not in parser.tags
        assert not [v for _, v in parser.attributes if v and ("http:" in v or "https:" in v)]
        assert "&lt;b&gt;IGM&lt;/b&gt; &amp; Co" in page and "<b>IGM</b>" not in page
        [attached] = [p for p in digest.iter_attachments() if str(p.get_filename()).endswith(".xlsx")]
        payload = attached.get_payload(decode=True)
        assert isinstance(payload, bytes)
        book = openpyxl.load_workbook(io.BytesIO(payload))
        sheet = book.worksheets[0]
        values = {str(cell.value) for row in sheet.iter_rows() for cell in row if cell.value is not None}
        assert "SENAF" in values and "Honduras" in values
        # The inbox watcher stops (the IMAP server is gone): the next digest warns at the top.
        server.stop()
        opened.clock.set(FRIDAY_DIGEST)
        report = opened.engine.tick()
        assert report.inbox is not None and report.inbox.error
        second = digests(opened.smtp)[-1]
        assert "ATENCIÓN" in str(second["Subject"])
        warning_page = second.get_body(preferencelist=("html",)).get_content()
        assert warning_page.index("bandeja") < warning_page.index("Honduras")
        # Once the service is back, one tick later the same day sends no second digest for that slot.
        server.start()
        opened.clock.set(FRIDAY_DIGEST + timedelta(hours=3))
        opened.engine.tick()
        assert len(digests(opened.smtp)) == 2
    finally:
        opened.close()
