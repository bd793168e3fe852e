"""Network faults against the real servers of the rig: nothing lost, nothing sent twice, no crash.

SMTP: the aiosmtpd server of the rig answers 421 at MAIL, RCPT and DATA (smtplib then hangs up, as a server closing
the channel makes it), 451 at MAIL, 452 at RCPT (for the only contact, and for one of two) and after DATA, 550 for
the only contact, 554 for the message, or records a message and hangs up before its "250". What
``tests/test_end_to_end.py`` already proves is not repeated here: 451 after DATA retried with the same Message-ID,
550 for one of two contacts, the server down for a whole pass.

IMAP: Dovecot stopped while the intake is fetching a long run of large replies, the processed folder deleted by a
person between two ticks and in the middle of one, a message expunged by a person between SEARCH and FETCH and
between the record and the MOVE, and replies recorded but not moved when the folder's UIDVALIDITY changes. IDLE
with the server going away is covered by ``test_mailbox.py`` (the wait raises) and ``test_service.py`` (``run``
reconnects and reads what arrived meanwhile); a plain UIDVALIDITY change by ``test_replies.py``.
"""

from __future__ import annotations

import email
import email.policy
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import yaml
from imapclient import IMAPClient

from mailflow.clock import FixedClock
from mailflow.config import Config, load_config
from mailflow.engine import Engine, TickReport
from mailflow.intake import LOOKAHEAD
from mailflow.mailbox import Fetched, ImapMailbox, ImapSession, MailboxError
from mailflow.sender import SmtpTransport
from mailflow.store import OutboxStatus, Store
from tests.helpers import example_data, reply_to, server_mail, smtp_config, write_config
from tests.servers import DovecotServer, ImapAccount, SmtpServer

pytestmark = pytest.mark.servers

OPENS = datetime(2017, 10, 18, 16, 0, tzinfo=UTC)  # 10:00 in San José: the 11 requests fall due
ALL_KEYS = [f"{line}.{action}" for line in range(1, 6) for action in range(1, 9)]
#: The example's retry policy after a temporary failure: first retry 5 minutes later.
AFTER_BACKOFF = OPENS + timedelta(minutes=6)


def message_ids(smtp: SmtpServer) -> Counter[str]:
    return Counter(str(m.message["Message-ID"]).strip() for m in smtp.messages)


# --------------------------------------------------------------------------- SMTP


def smtp_engine(tmp_path: Path, smtp: SmtpServer, contacts: dict[str, list[str]] | None = None) -> tuple[Engine, Store]:
    config = smtp_config(tmp_path, smtp.host, smtp.port, retry={"base": "5m", "max": "1h"})
    data = yaml.safe_load(config.path.read_text(encoding="utf-8"))
    data["secretariat"].pop("digest", None)  # only the campaign's emails: no digest at 08:00
    for entry in data["delegations"]:
        entry["contacts"] = (contacts or {}).get(entry["id"], entry["contacts"])
    config = load_config(write_config(tmp_path, data))
    assert config.mail.smtp is not None
    store = Store.open(config.store)
    return Engine(config, store, SmtpTransport(config.mail.smtp), FixedClock(OPENS)), store


@pytest.fixture
def sending(tmp_path: Path, smtp_server: SmtpServer) -> Iterator[Callable[..., tuple[Engine, Store]]]:
    stores: list[Store] = []

    def make(contacts: dict[str, list[str]] | None = None) -> tuple[Engine, Store]:
        engine, store = smtp_engine(tmp_path, smtp_server, contacts)
        stores.append(store)
        return engine, store

    yield make
    for store in stores:
        store.close()


def tick_at(engine: Engine, moment: datetime) -> TickReport:
    assert isinstance(engine.clock, FixedClock)
    engine.clock.set(moment)
    return engine.tick()


@pytest.mark.parametrize(
    ("code", "text", "stage"),
    [
        (421, "4.3.2 Service shutting down, closing transmission channel", "mail"),
        (421, "4.7.0 Too many connections, closing transmission channel", "rcpt"),
        (421, "4.3.2 Shutting down, closing transmission channel", "data"),
        (451, "4.3.0 Local error in processing", "mail"),
        (452, "4.2.2 Mailbox full", "rcpt"),
        (452, "4.3.1 Insufficient system storage", "data"),
    ],
)
def test_a_temporary_refusal_is_retried_later_with_the_same_message_id_and_the_others_go_on(
    sending: Callable[..., tuple[Engine, Store]], smtp_server: SmtpServer, code: int, text: str, stage: str
) -> None:
    engine, store = sending()
    smtp_server.fail_next(code, text, stage=stage)  # type: ignore[arg-type]

    first = engine.tick()

    assert len(first.sent) == 10 and len(first.retried) == 1, first
    [refused] = [store.outbox_row(i) for i in first.retried]
    assert refused.status is OutboxStatus.PENDING and str(code) in (refused.last_error or "")
    assert refused.message_id not in message_ids(smtp_server)
    assert tick_at(engine, OPENS + timedelta(minutes=1)).sent == []  # not before the backoff
    assert tick_at(engine, AFTER_BACKOFF).sent == [refused.id]
    assert tick_at(engine, AFTER_BACKOFF + timedelta(hours=1)).sent == []
    received = message_ids(smtp_server)
    assert len(received) == 11 and set(received.values()) == {1}
    assert store.outbox_row(refused.id).status is OutboxStatus.SENT and store.outbox_row(refused.id).attempts == 2
    assert store.refusals() == {}  # a temporary refusal never marks a contact as refused


def test_a_temporary_refusal_of_one_of_two_contacts_is_retried_for_that_contact_only(
    sending: Callable[..., tuple[Engine, Store]], smtp_server: SmtpServer
) -> None:
    contacts = ["enlace@sre.example.hn", "full@sre.example.hn"]
    engine, store = sending({"HN": contacts})
    smtp_server.fail_next(452, "4.2.2 Mailbox full, try again later", stage="rcpt", recipient="full@sre.example.hn")

    engine.tick()
    tick_at(engine, AFTER_BACKOFF)
    tick_at(engine, AFTER_BACKOFF + timedelta(hours=2))

    honduras = next(d for d in engine.status(AFTER_BACKOFF)[0].delegations if d.id == "HN")
    assert honduras.refused_contacts == ()
    assert [e for e in store.events("responsible-2017", "HN") if e.kind == "contact_refused"] == []
    deliveries = [r for r in smtp_server.messages if r.message["X-Mailflow-Delegation"] == "HN"]
    by_recipient = Counter(address for r in deliveries for address in r.rcpt_tos)
    assert by_recipient == {"enlace@sre.example.hn": 1, "full@sre.example.hn": 1}
    assert len({str(r.message["Message-ID"]) for r in deliveries}) == 1  # the same email, retried


def test_550_for_the_only_contact_fails_that_email_for_good_and_the_others_go_on(
    sending: Callable[..., tuple[Engine, Store]], smtp_server: SmtpServer
) -> None:
    engine, store = sending()
    smtp_server.fail_next(
        550, "5.1.1 <enlace@sre.example.hn>: user unknown", stage="rcpt", recipient="enlace@sre.example.hn"
    )

    report = engine.tick()

    assert len(report.sent) == 10 and len(report.failed) == 1
    [failed] = [store.outbox_row(i) for i in report.failed]
    assert (failed.delegation, failed.status) == ("HN", OutboxStatus.FAILED)
    honduras = next(d for d in engine.status(OPENS)[0].delegations if d.id == "HN")
    assert honduras.refused_contacts == ("enlace@sre.example.hn",) and honduras.all_contacts_failing
    assert tick_at(engine, AFTER_BACKOFF + timedelta(hours=2)).sent == []  # never retried
    assert "HN" not in {str(m.message["X-Mailflow-Delegation"]) for m in smtp_server.messages}


def test_554_for_the_message_fails_it_for_good_without_blaming_a_contact(
    sending: Callable[..., tuple[Engine, Store]], smtp_server: SmtpServer
) -> None:
    engine, store = sending()
    smtp_server.fail_next(554, "5.6.0 Message content rejected", stage="data")

    report = engine.tick()

    assert len(report.sent) == 10 and len(report.failed) == 1
    [failed] = [store.outbox_row(i) for i in report.failed]
    assert failed.status is OutboxStatus.FAILED and "554" in (failed.last_error or "")
    assert store.refusals() == {}
    assert tick_at(engine, AFTER_BACKOFF + timedelta(hours=2)).sent == []
    assert len(message_ids(smtp_server)) == 10


def test_a_connection_dropped_after_data_resends_that_email_once_and_only_that_one(
    sending: Callable[..., tuple[Engine, Store]], smtp_server: SmtpServer
) -> None:
    engine, store = sending()
    smtp_server.drop_after_data()  # the server keeps the first email but hangs up before its "250"

    first = engine.tick()

    assert len(first.sent) == 10 and len(first.retried) == 1  # the batch reconnected and went on
    [dropped] = [store.outbox_row(i) for i in first.retried]
    assert message_ids(smtp_server)[dropped.message_id] == 1  # delivered, but mailflow cannot know it
    assert tick_at(engine, AFTER_BACKOFF).sent == [dropped.id]
    for hours in (1, 5, 30):
        assert tick_at(engine, AFTER_BACKOFF + timedelta(hours=hours)).sent == []
    received = message_ids(smtp_server)
    assert received[dropped.message_id] == 2  # at most one resend
    assert len(received) == 11 and sum(received.values()) == 12
    assert store.outbox_row(dropped.id).status is OutboxStatus.SENT


# --------------------------------------------------------------------------- IMAP


def imap_config(tmp_path: Path, smtp: SmtpServer, account: ImapAccount, folder: str = "INBOX") -> Config:
    data = example_data()
    data["secretariat"].pop("digest", None)
    data["mail"] = server_mail(smtp, account, folder=folder)
    data["store"] = str(tmp_path / "mailflow.db")
    data["inbound"] = {"max_follow_ups_per_day": 1000}  # some tests have one delegation reply many times
    return load_config(write_config(tmp_path, data))


class Inbox:
    """The example campaign opened through the rig: its 11 requests sent, replies to come through IMAP."""

    def __init__(self, tmp_path: Path, smtp: SmtpServer, account: ImapAccount, folder: str = "INBOX") -> None:
        self.config = imap_config(tmp_path, smtp, account, folder)
        assert self.config.mail.smtp is not None and self.config.mail.imap is not None
        self.account = account
        self.folder = folder
        self.smtp = smtp
        self.clock = FixedClock(OPENS)
        self.store = Store.open(self.config.store)
        self.engine = Engine(
            self.config,
            self.store,
            SmtpTransport(self.config.mail.smtp),
            self.clock,
            mailbox=ImapMailbox(self.config.mail.imap),
        )
        assert len(self.engine.tick().sent) == 11
        self.requests = {str(r.message["X-Mailflow-Delegation"]): r.message for r in smtp.messages}
        self.contacts = {d.id: d.contacts[0] for d in self.config.delegations}
        smtp.clear()
        self.hours = 0.0

    def reply(self, delegation: str, *, note: str = "", attachment: int = 0) -> bytes:
        """A reply answering every row in its body, with a ``attachment``-byte PDF when asked."""
        body = "Estimados:\n\n" + "\n".join(f"{k}: Institución {delegation} {note}".strip() for k in ALL_KEYS) + "\n"
        raw = reply_to(self.requests[delegation], sender=self.contacts[delegation], body=body)
        if not attachment:
            return raw
        message = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        message.add_attachment(
            b"%PDF-1.4\n" + b"0" * attachment, maintype="application", subtype="pdf", filename="anexo.pdf"
        )
        return message.as_bytes()

    def append(self, messages: Sequence[bytes]) -> None:
        with self.account.client() as client:
            for raw in messages:
                client.append(self.folder, raw)

    def tick(self) -> TickReport:
        self.hours += 1
        self.clock.set(OPENS + timedelta(hours=self.hours))
        return self.engine.tick()

    def folder_ids(self, folder: str) -> Counter[str]:
        with self.account.client() as client:
            if not client.folder_exists(folder):
                return Counter()
            client.select_folder(folder, readonly=True)
            fetched = client.fetch(client.search(["ALL"]), [b"BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"])
        ids: Counter[str] = Counter()
        for item in fetched.values():
            data = next(v for k, v in item.items() if k.startswith(b"BODY"))
            ids[str(email.message_from_bytes(data, policy=email.policy.default)["Message-ID"]).strip()] += 1
        return ids

    def assert_each_once(self, raws: Sequence[bytes], *, moved: bool = True) -> None:
        """Each of these replies recorded once, applied, answered once; in the processed folder once."""
        wanted = [str(email.message_from_bytes(r, policy=email.policy.default)["Message-ID"]).strip() for r in raws]
        rows = Counter(row.message_id for row in self.store.inbound_rows() if row.outcome == "applied")
        assert {m: rows[m] for m in wanted} == dict.fromkeys(wanted, 1)
        follow_ups = [row for row in self.store.outbox() if row.inbound_id is not None]
        assert len(follow_ups) == len(rows) and {row.status for row in follow_ups} == {OutboxStatus.SENT}
        sent = message_ids(self.smtp)
        assert {row.message_id: sent[row.message_id] for row in follow_ups} == {r.message_id: 1 for r in follow_ups}
        if moved:
            processed = self.folder_ids("Processed")
            assert {m: processed[m] for m in wanted} == dict.fromkeys(wanted, 1)
            assert not set(wanted) & set(self.folder_ids(self.folder))

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def inbox(tmp_path: Path, smtp_server: SmtpServer, imap_account: ImapAccount) -> Iterator[Inbox]:
    opened = Inbox(tmp_path, smtp_server, imap_account)
    yield opened
    opened.close()


@pytest.mark.parametrize("when", ["after record 1", "after record 35", "during a FETCH"])
def test_dovecot_stopped_during_a_fetch_loses_nothing_and_processes_nothing_twice(
    tmp_path: Path,
    smtp_server: SmtpServer,
    make_dovecot: Callable[..., DovecotServer],
    monkeypatch: pytest.MonkeyPatch,
    when: str,
) -> None:
    """60 replies of 150 KB each, fetched in two batches (50 and 10). Dovecot is stopped from another thread: once the
    intake has recorded the n-th reply (the intake waits until it is down, so the next FETCH finds it gone), or as
    the first 7.5 MB FETCH of bodies begins (the transfer is cut: "socket error: EOF" or the server's BYE).

    The intake starts each message LOOKAHEAD (16) messages before recording it, so the second FETCH is made right
    after record 35 (it brings message 51): stopping there, every message of the first FETCH is still recorded."""
    assert LOOKAHEAD == 16
    dovecot = make_dovecot()
    opened = Inbox(tmp_path, smtp_server, dovecot.account("ts@example.org"))
    try:
        ids = sorted(opened.requests)
        raws = [opened.reply(ids[n % len(ids)], note=f"n.º {n}", attachment=150_000) for n in range(60)]
        opened.append(raws)
        stopper = threading.Thread(target=dovecot.stop)
        if when.startswith("after record"):
            stop_after = int(when.rsplit(" ", 1)[1])
            record = opened.engine.intake.record
            recorded = 0

            def record_then_stop(*args: Any, **kwargs: Any) -> int:
                nonlocal recorded
                inbound_id = record(*args, **kwargs)
                recorded += 1
                if recorded == stop_after:
                    stopper.start()
                    stopper.join()
                return inbound_id

            monkeypatch.setattr(opened.engine.intake, "record", record_then_stop)
        else:
            fetch = IMAPClient.fetch
            bodies = 0

            def stop_during_fetch(client: IMAPClient, messages: Any, data: Any, *args: Any, **kwargs: Any) -> Any:
                nonlocal bodies
                if b"BODY.PEEK[]" in data:
                    bodies += 1
                    if bodies == 1:
                        stopper.start()
                return fetch(client, messages, data, *args, **kwargs)

            monkeypatch.setattr(IMAPClient, "fetch", stop_during_fetch)
        first = opened.tick()
        stopper.join()
        monkeypatch.undo()
        assert first.inbox is not None
        if when.startswith("after record"):
            assert first.inbox.error and "lost" in first.inbox.error, first.inbox
            assert len(first.inbox.recorded) == 50 * (1 + (stop_after - 1) // 50)  # the batch in hand is finished
        dovecot.start()
        second = opened.tick()
        assert second.inbox is not None and second.inbox.error is None
        assert opened.tick().inbox.read == 0  # type: ignore[union-attr]
        opened.assert_each_once(raws)
        assert opened.folder_ids("INBOX") == Counter()
    finally:
        opened.close()


def test_the_processed_folder_deleted_by_a_person_between_ticks_is_made_again(inbox: Inbox) -> None:
    before = [inbox.reply("HN"), inbox.reply("GT")]
    inbox.append(before)
    assert inbox.tick().inbox.moved == 2  # type: ignore[union-attr]
    with inbox.account.client() as client:
        client.delete_folder("Processed")  # and the two replies in it: the store still has their bytes
    after = [inbox.reply("PA"), inbox.reply("CR")]
    inbox.append(after)

    report = inbox.tick()

    assert report.inbox is not None and report.inbox.error is None and report.inbox.moved == 2
    inbox.assert_each_once(after)
    inbox.assert_each_once(before + after, moved=False)
    kept = inbox.store.inbound_raw(inbox.store.inbound_rows()[0].id)
    assert kept.replace(b"\r\n", b"\n") == before[0]  # the bytes as the server gave them (CRLF)


def test_the_processed_folder_deleted_by_a_person_during_a_tick_is_made_again(
    inbox: Inbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox.append([inbox.reply("HN")])
    inbox.tick()  # Processed exists now
    raws = [inbox.reply("GT"), inbox.reply("MX"), inbox.reply("SV")]
    inbox.append(raws)
    move = ImapSession.move

    def delete_then_move(session: ImapSession, uids: Sequence[int], target: str) -> None:
        with inbox.account.client() as client:  # the person deletes it after the records, before the MOVE
            client.delete_folder("Processed")
        move(session, uids, target)

    monkeypatch.setattr(ImapSession, "move", delete_then_move)
    report = inbox.tick()

    assert report.inbox is not None and report.inbox.error is None and report.inbox.moved == 3
    inbox.assert_each_once(raws)


def test_a_message_expunged_between_search_and_fetch_is_skipped_and_the_others_go_on(
    inbox: Inbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    raws = [inbox.reply(d) for d in ("HN", "GT", "MX", "PA")]
    inbox.append(raws)
    fetch = ImapSession.fetch
    gone: list[int] = []

    def expunge_then_fetch(session: ImapSession, uids: Sequence[int], max_bytes: int) -> Iterator[Fetched]:
        if not gone:
            gone.append(sorted(uids)[1])  # GT's reply: a person deletes it after our SEARCH
            with inbox.account.client() as client:
                client.select_folder("INBOX")
                client.delete_messages(gone)
                client.uid_expunge(gone)
        return fetch(session, uids, max_bytes)

    monkeypatch.setattr(ImapSession, "fetch", expunge_then_fetch)
    report = inbox.tick()

    assert report.inbox is not None and report.inbox.error is None and report.inbox.read == 3
    kept = [raws[0], *raws[2:]]
    inbox.assert_each_once(kept)
    assert [row.delegation for row in inbox.store.inbound_rows()] == ["HN", "MX", "PA"]
    assert inbox.tick().inbox.read == 0  # type: ignore[union-attr]


def test_a_message_expunged_between_the_record_and_the_move_is_no_error(
    inbox: Inbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dovecot refuses the whole MOVE with NO [EXPUNGEISSUED] when one of its messages was expunged meanwhile: the
    session catches up (NOOP) and moves the others at once; nothing is processed twice."""
    raws = [inbox.reply(d) for d in ("HN", "GT", "MX")]
    inbox.append(raws)
    move = ImapSession.move

    def expunge_then_move(session: ImapSession, uids: Sequence[int], target: str) -> None:
        with inbox.account.client() as client:  # a person deletes GT's reply after we recorded it
            client.select_folder("INBOX")
            client.delete_messages([sorted(uids)[1]])
            client.uid_expunge([sorted(uids)[1]])
        move(session, uids, target)

    monkeypatch.setattr(ImapSession, "move", expunge_then_move)
    report = inbox.tick()
    monkeypatch.undo()

    assert report.inbox is not None and report.inbox.error is None and report.inbox.moved == 3
    inbox.assert_each_once([raws[0], raws[2]])  # recorded, answered and moved once, in this very pass
    assert all(row.moved for row in inbox.store.inbound_rows())  # nothing left to move again
    again = inbox.tick()
    assert again.inbox is not None and again.inbox.read == 0 and again.inbox.error is None
    assert again.inbox.moved == 0


def test_replies_recorded_but_not_moved_when_the_uidvalidity_changes_are_moved_and_not_processed_again(
    tmp_path: Path, smtp_server: SmtpServer, imap_account: ImapAccount, monkeypatch: pytest.MonkeyPatch
) -> None:
    with imap_account.client() as client:
        client.create_folder("Replies")
    opened = Inbox(tmp_path, smtp_server, imap_account, folder="Replies")
    try:
        raws = [opened.reply(d) for d in ("HN", "GT", "NI")]
        opened.append(raws)

        def lost(session: ImapSession, uids: Sequence[int], target: str) -> None:
            raise MailboxError("connection to IMAP server lost while moving messages to Processed")

        monkeypatch.setattr(ImapSession, "move", lost)
        first = opened.tick()  # recorded and answered, but the MOVE failed: they stay in Replies
        monkeypatch.undo()
        assert first.inbox is not None and first.inbox.by_outcome == {"applied": 3} and first.inbox.moved == 0
        with imap_account.client() as client:  # a person rebuilds the folder: same messages, new UIDVALIDITY
            client.delete_folder("Replies")
            client.create_folder("Replies")
        opened.append(raws)

        second = opened.tick()

        assert second.inbox is not None and second.inbox.by_outcome == {"duplicate": 3} and second.inbox.moved == 3
        opened.assert_each_once(raws)
        assert opened.folder_ids("Replies") == Counter()
    finally:
        opened.close()
