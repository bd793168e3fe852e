"""Who may change a delegation's answers, and what is ever answered.

Only a listed contact of the delegation, whose message the receiving server did not find
failing DMARC, SPF or DKIM, changes its answers; nobody else's message (a stranger, a display
name dressed up as the contact, a forged ``Authentication-Results`` below the server's own) is
applied or answered: it is held for review. No automatic message is ever answered, so mailflow
never joins a mail loop, even with an auto-responder that ignores ``Auto-Submitted``; and the
emails a delegation can draw in one day are capped.

Most tests read replies from the local maildir twin (fast); the mail-loop tests go through the
real Dovecot and aiosmtpd, counting the emails the SMTP server received.
"""

from __future__ import annotations

import email
import email.policy
import mailbox
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from mailflow.clock import FixedClock
from mailflow.engine import Engine
from tests.helpers import bounce_of, fill_workbook, local_engine, reply_to, workbook_of
from tests.servers import ImapAccount, SmtpServer

OPENS = datetime(2017, 10, 18, 16, 0, tzinfo=UTC)
CAMPAIGN = "responsible-2017"
ALL_KEYS = [f"{line}.{action}" for line in range(1, 6) for action in range(1, 9)]
HN = "enlace@sre.example.hn"
ATTACKER = "attacker@evil.example"
SERVER_AR = "mx.example.org"  # the authserv-id of "our" receiving server
# What our server writes for a message the attacker sends from his own domain: it all passes, for evil.example.
ATTACKER_PASSES = (
    f"{SERVER_AR}; dkim=pass header.d=evil.example; spf=pass smtp.mailfrom={ATTACKER}; "
    "dmarc=pass (p=reject) header.from=evil.example"
)


@dataclass
class Local:
    """A campaign opened on the local transport: requests sent, replies read from a maildir."""

    engine: Engine
    clock: FixedClock
    requests: dict[str, EmailMessage]
    inbox: mailbox.Maildir
    outbox: Path

    def sent(self) -> list[EmailMessage]:
        box = mailbox.Maildir(
            self.outbox, factory=lambda f: email.message_from_binary_file(f, policy=email.policy.default)
        )
        return [m for m in box if isinstance(m, EmailMessage)]

    def tick(self, hours: float = 1) -> Any:
        self.clock.set(OPENS + timedelta(hours=hours))
        return self.engine.tick()

    def answers(self, delegation: str = "HN") -> dict[str, str]:
        return self.engine.store.current_answers(CAMPAIGN, delegation).get(delegation, {})

    def status(self, delegation: str = "HN") -> Any:
        return next(d for d in self.engine.status(self.clock.now())[0].delegations if d.id == delegation)


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Local]:
    engine, clock = local_engine(tmp_path, OPENS)
    store = engine.store
    opened = Local(engine, clock, {}, mailbox.Maildir(tmp_path / "in", create=True), tmp_path / "out")
    opened.requests = {str(m["X-Mailflow-Delegation"]): m for m in opened.sent()}
    assert len(opened.requests) == 11
    yield opened
    store.close()


def complete_workbook(request: EmailMessage, value: str = "Ministerio falso") -> tuple[str, bytes]:
    name, data = workbook_of(request)
    return name, fill_workbook(data, {key: f"{value} {key}" for key in ALL_KEYS})


def with_headers(raw: bytes, headers: list[tuple[str, str]]) -> bytes:
    """``raw`` with ``headers`` put on top, in order: the first is the topmost, as a server prepends its own."""
    return b"".join(f"{name}: {value}\r\n".encode() for name, value in headers) + raw


def replace_header(raw: bytes, name: str, value: str) -> bytes:
    head, sep, body = raw.partition(b"\n\n")
    lines = [line for line in head.split(b"\n") if not line.lower().startswith(name.lower().encode() + b":")]
    return b"\n".join([*lines, f"{name}: {value}".encode()]) + sep + body


def assert_untouched(opened: Local, before: int, delegation: str = "HN") -> None:
    """Nothing applied to the delegation, and nothing sent in answer to anyone."""
    assert opened.answers(delegation) == {}
    assert opened.status(delegation).state.value == "awaiting"
    assert len(opened.sent()) == before, "nothing is ever sent in answer"
    assert not [o for o in opened.engine.store.outbox() if o.inbound_id is not None]


# ==========================================================================
# Strangers and spoofs
# ==========================================================================


def test_a_non_contact_never_changes_answers_nor_gets_a_reply(local: Local) -> None:
    request = local.requests["HN"]
    # In the thread, with the subject reference and a complete workbook, from someone not listed.
    local.inbox.add(
        with_headers(
            reply_to(
                request, sender=ATTACKER, attachments=[complete_workbook(request)], body="1.1: Ministerio falso\n"
            ),
            [("Authentication-Results", ATTACKER_PASSES)],
        )
    )
    before = len(local.sent())
    report = local.tick()
    assert report.inbox.by_outcome == {"held": 1}
    assert_untouched(local, before)
    [held] = local.engine.store.inbound_rows(outcome="held")
    assert f"{ATTACKER} is not a listed contact of Honduras" in (held.reason or "")
    assert local.status().held == (held.id,)
    # The contact's own reply later is applied; the held one never is, however many ticks pass.
    name, data = workbook_of(request)
    local.inbox.add(reply_to(request, sender=HN, attachments=[(name, fill_workbook(data, {"1.1": "SRE"}))]))
    local.tick(hours=2)
    local.tick(hours=30)
    assert local.answers() == {"1.1": "SRE"}


SPOOFS = {
    "quoted name holding the contact": f'"Honduras Enlace <{HN}>" <{ATTACKER}>',
    "encoded-word name holding the contact": f"=?utf-8?q?Enlace_=3C{HN.replace('@', '=40')}=3E?= <{ATTACKER}>",
    "contact as a comment": f"{ATTACKER} ({HN})",
    "contact as a quoted local part": f'"{HN}"@evil.example',
    "contact in a subdomain of the attacker": "enlace@sre.example.hn.evil.example",
}
# Once accepted as the contact (found by this suite): the address in angle brackets, or several addresses.
SPOOFS_ACCEPTED = {
    "unquoted address as the display name": f"{HN} <{ATTACKER}>",
    "unquoted name and angle address before the real one": f"Honduras Enlace <{HN}> <{ATTACKER}>",
    "two From addresses, the contact first": f"Enlace <{HN}>, {ATTACKER}",
}


@pytest.mark.parametrize(
    "from_header",
    [pytest.param(value, id=label) for label, value in {**SPOOFS, **SPOOFS_ACCEPTED}.items()],
)
def test_a_display_name_spoof_is_held(local: Local, from_header: str) -> None:
    request = local.requests["HN"]
    raw = reply_to(request, sender=ATTACKER, attachments=[complete_workbook(request)], body="1.1: Ministerio falso\n")
    raw = with_headers(replace_header(raw, "From", from_header), [("Authentication-Results", ATTACKER_PASSES)])
    local.inbox.add(raw)
    before = len(local.sent())
    report = local.tick()
    assert report.inbox.by_outcome == {"held": 1}
    assert_untouched(local, before)


def test_a_reply_to_or_sender_naming_the_contact_does_not_make_a_stranger_one(local: Local) -> None:
    request = local.requests["HN"]
    raw = reply_to(request, sender=ATTACKER, attachments=[complete_workbook(request)], headers={"Reply-To": HN})
    local.inbox.add(with_headers(raw, [("Sender", HN), ("Return-Path", f"<{HN}>")]))
    before = len(local.sent())
    assert local.tick().inbox.by_outcome == {"held": 1}
    assert_untouched(local, before)


# ==========================================================================
# Authentication-Results
# ==========================================================================

FAILING = {
    "dmarc fail, a forged pass below": [
        f"{SERVER_AR}; dkim=none; spf=fail smtp.mailfrom={HN}; dmarc=fail (p=reject) header.from=sre.example.hn",
        f"{SERVER_AR}; dkim=pass header.d=sre.example.hn; spf=pass smtp.mailfrom={HN}; "
        "dmarc=pass header.from=sre.example.hn",
    ],
    "dmarc fail alone": [f"{SERVER_AR}; dmarc=fail (p=none dis=none) header.from=sre.example.hn"],
    "spf softfail for the From domain": [f"{SERVER_AR}; spf=softfail smtp.mailfrom={HN}; dkim=none; dmarc=none"],
    "dkim fail for the From domain": [f"{SERVER_AR}; dkim=fail (bad signature) header.d=sre.example.hn; spf=none"],
    "Microsoft 365, a forged Gmail pass below": [
        "spf=fail (sender IP is 198.51.100.23) smtp.mailfrom=sre.example.hn; dkim=none (message not signed) "
        "header.d=none;dmarc=fail action=quarantine header.from=sre.example.hn;compauth=fail reason=000",
        "mx.google.com; dkim=pass header.i=@sre.example.hn; spf=pass smtp.mailfrom=enlace@sre.example.hn; "
        "dmarc=pass (p=REJECT sp=REJECT dis=NONE) header.from=sre.example.hn",
    ],
}


@pytest.mark.parametrize("results", list(FAILING.values()), ids=list(FAILING))
def test_failing_authentication_at_our_server_holds_the_contact_s_own_address(local: Local, results: list[str]) -> None:
    request = local.requests["HN"]
    raw = reply_to(request, sender=HN, attachments=[complete_workbook(request)], body="1.1: Ministerio falso\n")
    # The topmost is our server's; the ones below came with the message (anyone can write them).
    local.inbox.add(with_headers(raw, [("Authentication-Results", value) for value in results]))
    before = len(local.sent())
    report = local.tick()
    assert report.inbox.by_outcome == {"held": 1}
    assert_untouched(local, before)
    [held] = local.engine.store.inbound_rows(outcome="held")
    assert "failing authentication" in (held.reason or "")


def test_an_arc_pass_does_not_outweigh_our_server_s_fail(local: Local) -> None:
    request = local.requests["HN"]
    raw = reply_to(request, sender=HN, attachments=[complete_workbook(request)])
    local.inbox.add(
        with_headers(
            raw,
            [
                ("Authentication-Results", f"{SERVER_AR}; dmarc=fail header.from=sre.example.hn"),
                ("ARC-Authentication-Results", "i=1; relay.example; dmarc=pass header.from=sre.example.hn"),
            ],
        )
    )
    before = len(local.sent())
    assert local.tick().inbox.by_outcome == {"held": 1}
    assert_untouched(local, before)


# ==========================================================================
# Automatic mail is never answered
# ==========================================================================

AUTOMATIC = {
    "Auto-Submitted: auto-replied": {"Auto-Submitted": "auto-replied"},
    "Auto-Submitted: auto-generated": {"Auto-Submitted": "auto-generated"},
    "X-Autoreply": {"X-Autoreply": "yes"},
    "X-Autorespond": {"X-Autorespond": "vacation"},
    "Precedence: bulk": {"Precedence": "bulk"},
    "Precedence: junk": {"Precedence": "junk"},
    "empty Return-Path": {"Return-Path": "<>"},
}
AUTOMATIC_SUBJECTS = [
    "Automatic reply: Plan",
    "Respuesta automática: Plan",
    "Fuera de la oficina: Plan",
    "Out of Office",
]


@pytest.mark.parametrize(
    ("headers", "subject"),
    [pytest.param(h, None, id=label) for label, h in AUTOMATIC.items()]
    + [pytest.param({}, s, id=s) for s in AUTOMATIC_SUBJECTS],
)
def test_an_automatic_message_is_never_applied_nor_answered(
    local: Local, headers: dict[str, str], subject: str | None
) -> None:
    request = local.requests["HN"]
    raw = reply_to(
        request,
        sender=HN,
        subject=f"{subject} [Ref. responsible-2017/HN]" if subject else None,
        headers=headers,
        attachments=[complete_workbook(request)],
        body="1.1: Ministerio\n",
    )
    local.inbox.add(raw)
    before = len(local.sent())
    assert local.tick().inbox.by_outcome == {"auto_reply": 1}
    assert_untouched(local, before)


def test_our_own_email_coming_back_is_not_answered(local: Local) -> None:
    """A forwarding rule (or a list) sends our request back to our inbox: it is automatic, never a reply."""
    request = local.requests["HN"]
    raw = request.as_bytes()
    local.inbox.add(raw.split(b"\n", 2)[2])  # without the local transport's two envelope lines
    before = len(local.sent())
    report = local.tick()
    assert report.inbox.by_outcome == {"auto_reply": 1}
    assert_untouched(local, before)


def test_a_bounce_carrying_a_workbook_applies_nothing_and_is_not_answered(local: Local) -> None:
    request = local.requests["HN"]
    local.inbox.add(bounce_of(request, "someone.else@sre.example.hn"))
    before = len(local.sent())
    assert local.tick().inbox.by_outcome == {"bounce": 1}
    assert_untouched(local, before)


def _forged_bounce() -> bytes:
    """A delivery report a stranger writes: no Message-ID of ours, only the contact's address."""
    lines = [
        "From: MAILER-DAEMON@evil.example (Mail Delivery System)",
        "To: ts@example.org",
        "Subject: Undelivered Mail Returned to Sender",
        "Date: Fri, 20 Oct 2017 16:00:00 +0000",
        "Message-ID: <forged.bounce@evil.example>",
        f"Authentication-Results: {SERVER_AR}; spf=pass smtp.mailfrom=evil.example; dmarc=none",
        "MIME-Version: 1.0",
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b"',
        "",
        "--b",
        "Content-Type: text/plain",
        "",
        "Your message could not be delivered.",
        "--b",
        "Content-Type: message/delivery-status",
        "",
        "Reporting-MTA: dns; mx.evil.example",
        "",
        f"Final-Recipient: rfc822; {HN}",
        "Action: failed",
        "Status: 5.1.1",
        "",
        "--b--",
        "",
    ]
    return "\r\n".join(lines).encode()


def test_a_forged_bounce_naming_no_email_of_ours_does_not_silence_a_delegation(local: Local) -> None:
    local.inbox.add(_forged_bounce())
    local.tick()
    assert local.status().refused_contacts == ()
    # The reminder of Friday 20 October still reaches Honduras.
    local.tick(hours=48)
    reminders = [m for m in local.sent() if m["X-Mailflow-Kind"] == "reminder" and m["X-Mailflow-Delegation"] == "HN"]
    assert len(reminders) == 1


# ==========================================================================
# Mail loops and the daily cap, through the real servers
# ==========================================================================


def _campaign(tmp_path: Path, smtp: SmtpServer, account: ImapAccount) -> Any:
    from tests.test_replies import Campaign

    return Campaign(tmp_path, smtp, account)


def _answer_everything(smtp: SmtpServer, account: ImapAccount, subject: str, body: str, seen: set[str]) -> int:
    """The delegation's auto-responder: one reply to every new email it received, threaded; returns how many."""
    count = 0
    for received in smtp.messages:
        message = received.message
        message_id = str(message["Message-ID"]).strip()
        if HN not in received.rcpt_tos or message_id in seen:
            continue
        seen.add(message_id)
        account.append(
            "INBOX",
            reply_to(message, sender=HN, subject=subject.format(subject=message["Subject"]), body=body),
        )
        count += 1
    return count


@pytest.mark.servers
def test_an_auto_responder_that_ignores_auto_submitted_gets_no_answer_and_the_exchange_stops(
    tmp_path: Path, smtp_server: SmtpServer, imap_account: ImapAccount
) -> None:
    """Honduras answers once by hand; then its out-of-office answers every email of ours, with no Auto-Submitted."""
    opened = _campaign(tmp_path, smtp_server, imap_account)
    try:
        request = opened.requests["HN"]
        name, data = workbook_of(request)
        imap_account.append(
            "INBOX", reply_to(request, sender=HN, attachments=[(name, fill_workbook(data, {"1.1": "SRE"}))])
        )
        seen: set[str] = {str(request["Message-ID"]).strip()}
        auto_replies = 0
        hours = 1.0
        while hours <= 13 * 24:  # to Tuesday 31 October: both reminders and the three overdue notices
            opened.tick(hours=hours)
            auto_replies += _answer_everything(
                smtp_server, imap_account, "Automatic reply: {subject}", "Estoy fuera de la oficina.", seen
            )
            hours += 6
        to_honduras = [m for m in smtp_server.messages if HN in m.rcpt_tos]
        kinds = [str(m.message["X-Mailflow-Kind"]) for m in to_honduras]
        assert kinds == ["missing", "reminder", "reminder", "overdue", "overdue", "overdue"]
        assert auto_replies == len(to_honduras)  # each of them drew an automatic reply ...
        rows = opened.store.inbound_rows(delegation="HN")
        assert [r.outcome for r in rows].count("auto_reply") == auto_replies  # ... recorded, and never answered
        assert [o.kind for o in opened.store.outbox(delegation="HN") if o.inbound_id is not None] == ["missing"]
        # The exchange has stopped: two more days of ticks send nothing, and nothing is waiting.
        for extra in range(8):
            opened.tick(hours=hours + 6 * extra)
        assert len([m for m in smtp_server.messages if HN in m.rcpt_tos]) == len(to_honduras)
        assert opened.store.current_answers(CAMPAIGN, "HN")["HN"] == {"1.1": "SRE"}
    finally:
        opened.close()


MAX_EMAILS_PER_DELEGATION_PER_DAY = 5


@pytest.mark.servers
def test_an_unmarked_auto_responder_draws_at_most_a_few_emails_a_day(
    tmp_path: Path, smtp_server: SmtpServer, imap_account: ImapAccount
) -> None:
    opened = _campaign(tmp_path, smtp_server, imap_account)
    try:
        request = opened.requests["HN"]
        seen: set[str] = {str(request["Message-ID"]).strip()}
        body = "Gracias por su mensaje. Estaré fuera hasta el lunes."
        imap_account.append("INBOX", reply_to(request, sender=HN, body=body))  # it answers our request first
        for round_ in range(12):  # every 10 minutes on Thursday 19 October, Honduras time
            opened.tick(hours=20 + round_ / 6)
            _answer_everything(smtp_server, imap_account, "RE: {subject}", body, seen)
        to_honduras = [m for m in smtp_server.messages if HN in m.rcpt_tos]
        print(f"\nemails to Honduras on 19 October from an unmarked auto-responder's 12 replies: {len(to_honduras)}")
        assert len(to_honduras) <= MAX_EMAILS_PER_DELEGATION_PER_DAY
    finally:
        opened.close()
