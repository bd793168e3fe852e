"""Replies come back through the real Dovecot; follow-ups reach the real aiosmtpd server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mailflow.clock import FixedClock
from mailflow.config import Config, load_config
from mailflow.engine import Engine
from mailflow.mailbox import ImapMailbox
from mailflow.sender import SmtpTransport
from mailflow.store import Store
from tests.helpers import bounce_of, example_data, fill_workbook, reply_to, server_mail, workbook_of, write_config
from tests.servers import ImapAccount, SmtpServer

pytestmark = pytest.mark.servers

OPENS = datetime(2017, 10, 18, 16, 0, tzinfo=UTC)
ALL_KEYS = [f"{line}.{action}" for line in range(1, 6) for action in range(1, 9)]


def config_for(tmp_path: Path, smtp: SmtpServer, account: ImapAccount, folder: str = "INBOX", **inbound: Any) -> Config:
    data = example_data()
    data["mail"] = server_mail(smtp, account, folder=folder, timeout=10)
    data["store"] = str(tmp_path / "mailflow.db")
    if inbound:
        data["inbound"] = inbound
    return load_config(write_config(tmp_path, data))


class Campaign:
    """A campaign opened through the real servers, ready to receive replies."""

    def __init__(
        self, tmp_path: Path, smtp: SmtpServer, account: ImapAccount, folder: str = "INBOX", **inbound: Any
    ) -> None:
        self.config = config_for(tmp_path, smtp, account, folder, **inbound)
        assert self.config.mail.smtp is not None and self.config.mail.imap is not None
        self.clock = FixedClock(OPENS)
        self.store = Store.open(self.config.store)
        self.engine = Engine(
            self.config,
            self.store,
            SmtpTransport(self.config.mail.smtp),
            self.clock,
            mailbox=ImapMailbox(self.config.mail.imap),
        )
        self.smtp = smtp
        self.account = account
        assert len(self.engine.tick().sent) == 11
        self.requests = {str(r.message["X-Mailflow-Delegation"]): r.message for r in smtp.messages}
        smtp.clear()

    def tick(self, hours: float = 1) -> Any:
        self.clock.set(OPENS + timedelta(hours=hours))
        return self.engine.tick()

    def status(self, delegation: str) -> Any:
        return next(d for d in self.engine.status(self.clock.now())[0].delegations if d.id == delegation)

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def campaign(tmp_path: Path, smtp_server: SmtpServer, imap_account: ImapAccount) -> Any:
    opened = Campaign(tmp_path, smtp_server, imap_account)
    yield opened
    opened.close()


def test_a_complete_reply_is_recorded_moved_and_receipted_once(campaign: Campaign) -> None:
    request = campaign.requests["HN"]
    name, data = workbook_of(request)
    answers = {key: f"Institución {key}" for key in ALL_KEYS}
    campaign.account.append(
        "INBOX", reply_to(request, sender="enlace@sre.example.hn", attachments=[(name, fill_workbook(data, answers))])
    )
    report = campaign.tick()
    assert report.inbox is not None and report.inbox.by_outcome == {"applied": 1} and report.inbox.moved == 1
    honduras = campaign.status("HN")
    assert honduras.state.value == "complete" and (honduras.filled, honduras.total) == (40, 40)
    assert honduras.next_reminder_at is None
    [receipt] = campaign.smtp.wait_for(1)
    assert receipt.message["X-Mailflow-Kind"] == "receipt"
    assert receipt.rcpt_tos == ["enlace@sre.example.hn"]
    assert str(receipt.message["In-Reply-To"]).strip().startswith("<")
    assert "Re:" in str(receipt.message["Subject"]) or "RE:" in str(receipt.message["Subject"])
    with campaign.account.client() as client:
        client.select_folder("INBOX")
        assert client.search("ALL") == []
        client.select_folder("Processed")
        assert len(client.search("ALL")) == 1
    # A second tick processes nothing again, and no reminder ever goes to Honduras.
    again = campaign.tick(hours=200)
    assert again.inbox is not None and again.inbox.read == 0
    kinds = [
        (str(m.message["X-Mailflow-Delegation"]), str(m.message["X-Mailflow-Kind"])) for m in campaign.smtp.messages
    ]
    assert ("HN", "receipt") in kinds and not [k for k in kinds if k[0] == "HN" and k[1] != "receipt"]
    assert len(campaign.store.current_answers("responsible-2017", "HN")["HN"]) == 40


def test_a_partial_reply_gets_the_missing_list_then_completes(campaign: Campaign) -> None:
    request = campaign.requests["GT"]
    name, data = workbook_of(request)
    first = {key: "Ministerio de Relaciones Exteriores" for key in ALL_KEYS if key not in ("2.3", "4.1")}
    campaign.account.append(
        "INBOX", reply_to(request, sender="enlace@minex.example.gt", attachments=[(name, fill_workbook(data, first))])
    )
    campaign.tick()
    guatemala = campaign.status("GT")
    assert guatemala.state.value == "partial" and guatemala.missing == ("2.3", "4.1")
    [missing] = campaign.smtp.wait_for(1)
    assert missing.message["X-Mailflow-Kind"] == "missing"
    text = missing.message.get_body(preferencelist=("plain",)).get_content()
    assert "2.3" in text and "4.1" in text
    # The rest in the body of a second reply.
    campaign.account.append(
        "INBOX",
        reply_to(
            request,
            sender="enlace@minex.example.gt",
            body="Estimados:\n\n2.3: Procuraduría General de la Nación\n4.1 - Instituto Guatemalteco de Migración\n",
        ),
    )
    campaign.tick(hours=2)
    guatemala = campaign.status("GT")
    assert guatemala.state.value == "complete"
    answers = campaign.store.current_answers("responsible-2017", "GT")["GT"]
    assert answers["2.3"] == "Procuraduría General de la Nación"
    assert answers["4.1"] == "Instituto Guatemalteco de Migración"
    assert [str(m.message["X-Mailflow-Kind"]) for m in campaign.smtp.wait_for(2)] == ["missing", "receipt"]


def test_auto_replies_bounces_and_strangers_get_no_answer(campaign: Campaign) -> None:
    request = campaign.requests["MX"]
    campaign.account.append(
        "INBOX",
        reply_to(
            request,
            sender="enlace@sre.example.mx",
            subject="Respuesta automática: fuera de la oficina",
            body="Estaré fuera de la oficina hasta el lunes.",
            headers={"Auto-Submitted": "auto-replied"},
        ),
    )
    campaign.account.append(
        "INBOX", reply_to(request, sender="spoofer@evil.example", attachments=[workbook_of(request)])
    )
    unrelated = reply_to(request, sender="newsletter@news.example", subject="Boletín mensual", thread=False)
    campaign.account.append("INBOX", unrelated)
    report = campaign.tick()
    assert report.inbox is not None
    assert report.inbox.by_outcome == {"auto_reply": 1, "held": 1, "unrelated": 1}
    assert campaign.smtp.messages == []
    mexico = campaign.status("MX")
    assert mexico.state.value == "awaiting" and len(mexico.held) == 1
    with campaign.account.client() as client:
        client.select_folder("INBOX")
        assert len(client.search("ALL")) == 1  # only the unrelated one is left for a person
    assert campaign.tick(hours=2).inbox.read == 0  # remembered, not processed again


def test_a_uidvalidity_change_processes_nothing_twice(
    tmp_path: Path, smtp_server: SmtpServer, imap_account: ImapAccount
) -> None:
    with imap_account.client() as client:
        client.create_folder("Replies")
    opened = Campaign(tmp_path, smtp_server, imap_account, folder="Replies")
    try:
        request = opened.requests["PA"]
        name, data = workbook_of(request)
        raw = reply_to(
            request,
            sender="enlace@mire.example.pa",
            attachments=[(name, fill_workbook(data, {"1.1": "Ministerio de Gobierno"}))],
        )
        unrelated = reply_to(request, sender="friend@other.example", subject="Hola", thread=False)
        imap_account.append("Replies", unrelated)
        imap_account.append("Replies", raw)
        first = opened.tick()
        assert first.inbox is not None and first.inbox.by_outcome == {"applied": 1, "unrelated": 1}
        with imap_account.client() as client:
            before = client.folder_status("Replies", ["UIDVALIDITY"])[b"UIDVALIDITY"]
            # A person deletes the folder and recreates it with the same messages.
            client.delete_folder("Replies")
            client.create_folder("Replies")
            after = client.folder_status("Replies", ["UIDVALIDITY"])[b"UIDVALIDITY"]
        assert before != after
        imap_account.append("Replies", unrelated)
        imap_account.append("Replies", raw)
        second = opened.tick(hours=2)
        assert second.inbox is not None and second.inbox.by_outcome == {"duplicate": 2}
        assert [str(m.message["X-Mailflow-Kind"]) for m in opened.smtp.messages] == ["missing"]
        assert len(opened.store.answer_history("responsible-2017", "PA")) == 1
        events = [e.kind for e in opened.store.events()]
        assert "uidvalidity_changed" in events
        with imap_account.client() as client:
            client.select_folder("Replies")
            assert len(client.search("ALL")) == 1  # the unrelated one stays; the reply went to Processed again
    finally:
        opened.close()


def test_bounces_mark_contacts_and_flag_a_delegation_whose_every_contact_fails(campaign: Campaign) -> None:
    request = campaign.requests["BZ"]
    campaign.account.append(
        "INBOX", bounce_of(request, "liaison@immigration.example.bz", status="4.4.1", action="delayed")
    )
    report = campaign.tick()
    assert report.inbox is not None and report.inbox.by_outcome == {"bounce": 1}
    belize = campaign.status("BZ")
    assert belize.refused_contacts == () and not belize.all_contacts_failing  # delayed is not a failure
    campaign.account.append("INBOX", bounce_of(request, "liaison@immigration.example.bz"))
    campaign.tick(hours=2)
    belize = campaign.status("BZ")
    assert belize.refused_contacts == ("liaison@immigration.example.bz",)
    assert belize.all_contacts_failing
    assert campaign.smtp.messages == []  # nothing is ever sent in answer to a bounce
    events = [e.kind for e in campaign.store.events("responsible-2017", "BZ")]
    assert "delivery_delayed" in events and "contact_bouncing" in events
    # The next reminder has nobody left to go to: it is recorded as failed, visibly.
    campaign.tick(hours=48)
    belize = campaign.status("BZ")
    assert belize.send_problem is not None and "every contact" in belize.send_problem
    assert not [m for m in campaign.smtp.messages if m.message["X-Mailflow-Delegation"] == "BZ"]


def test_an_unreadable_file_gets_an_explanation(campaign: Campaign) -> None:
    request = campaign.requests["SV"]
    campaign.account.append(
        "INBOX",
        reply_to(
            request,
            sender="enlace@rree.example.sv",
            attachments=[("Plan estratégico - El Salvador.xlsx", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 2000)],
        ),
    )
    campaign.tick()
    [answer] = campaign.smtp.wait_for(1)
    assert answer.message["X-Mailflow-Kind"] == "unreadable"
    text = answer.message.get_body(preferencelist=("plain",)).get_content()
    assert "Plan estratégico - El Salvador.xlsx" in text
    assert campaign.status("SV").state.value == "awaiting"
