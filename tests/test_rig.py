"""The test rig itself: its servers really speak SMTP and IMAP and misbehave on request.

Later tests rely on these behaviours (a recorded message, a refused
recipient, a server down then up on the same port, mail surviving a
Dovecot restart), so each one is proved here against a standard client:
smtplib for SMTP, IMAPClient for IMAP.
"""

from __future__ import annotations

import shutil
import smtplib
import socket
import tempfile
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

import pytest
from imapclient import IMAPClient
from imapclient.exceptions import LoginError

from tests import servers
from tests.servers import (
    DOVECOT_MISSING,
    DovecotNotInstalledError,
    DovecotServer,
    ImapAccount,
    RigError,
    SmtpServer,
    free_port,
)

SENDER = "mailflow@example.org"
ALICE = "alice@example.net"
BOB = "bob@example.net"

RAW = (
    b"From: Delegation <delegation@example.net>\r\n"
    b"To: ts@example.org\r\n"
    b"Subject: Workbook returned\r\n"
    b"Message-ID: <rig-1@example.net>\r\n"
    b"Date: Wed, 18 Oct 2017 10:05:00 -0600\r\n"
    b"\r\n"
    b"Here it is.\r\n"
)


def message(subject: str = "Request", to: str = ALICE) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{subject.lower().replace(' ', '-')}@example.org>"
    msg.set_content("Bonjour, voici la demande.\n")
    return msg


def connect(server: SmtpServer) -> smtplib.SMTP:
    # local_hostname avoids socket.getfqdn(), which can stall on DNS.
    return smtplib.SMTP(server.host, server.port, local_hostname="localhost", timeout=10)


def send(server: SmtpServer, msg: EmailMessage, to: list[str] | None = None) -> dict[str, tuple[int, bytes]]:
    with connect(server) as client:
        return client.send_message(msg, from_addr=SENDER, to_addrs=to or [msg["To"]])


# --------------------------------------------------------------------------- helpers without servers


def test_free_port_hands_out_distinct_bindable_ports() -> None:
    ports = {free_port() for _ in range(20)}
    assert len(ports) == 20
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports.pop()))


def test_missing_dovecot_is_an_error_saying_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    with pytest.raises(DovecotNotInstalledError, match="apt-get install dovecot-imapd") as caught:
        servers.find_dovecot()
    assert str(caught.value) == DOVECOT_MISSING


# --------------------------------------------------------------------------- SMTP


@pytest.mark.servers
def test_smtp_records_envelope_data_and_parsed_headers(smtp_server: SmtpServer) -> None:
    before = time.time()
    refused = send(smtp_server, message("Request 1"), to=[ALICE, BOB])

    assert refused == {}
    [received] = smtp_server.wait_for(1)
    assert received.mail_from == SENDER
    assert received.rcpt_tos == [ALICE, BOB]
    assert received.message["Subject"] == "Request 1"
    assert received.message["To"] == ALICE
    assert received.message.get_content() == "Bonjour, voici la demande.\n"
    assert b"Subject: Request 1\r\n" in received.data
    assert before <= received.received_at <= time.time()
    assert received.auth_login is None


@pytest.mark.servers
def test_smtp_wait_for_times_out_and_clear_forgets(smtp_server: SmtpServer) -> None:
    with pytest.raises(TimeoutError, match="received 0 message"):
        smtp_server.wait_for(1, timeout=0.05)
    send(smtp_server, message())
    assert len(smtp_server.wait_for(1)) == 1
    smtp_server.clear()
    assert smtp_server.messages == []


@pytest.mark.servers
def test_smtp_server_goes_down_and_up_on_the_same_port(smtp_server: SmtpServer) -> None:
    port = smtp_server.port
    send(smtp_server, message("Before"))

    smtp_server.stop()
    with pytest.raises(ConnectionRefusedError):
        send(smtp_server, message("While down"))

    smtp_server.start()
    send(smtp_server, message("After start"))
    smtp_server.restart()
    send(smtp_server, message("After restart"))

    assert smtp_server.port == port
    subjects = [m.message["Subject"] for m in smtp_server.wait_for(3)]
    assert subjects == ["Before", "After start", "After restart"]


@pytest.mark.servers
def test_smtp_fail_next_data_refuses_once_then_accepts(smtp_server: SmtpServer) -> None:
    smtp_server.fail_next(451, "4.3.0 Try again later")

    with pytest.raises(smtplib.SMTPDataError) as caught:
        send(smtp_server, message("First try"))
    assert caught.value.smtp_code == 451
    assert caught.value.smtp_error == b"4.3.0 Try again later"
    assert smtp_server.messages == []

    send(smtp_server, message("Second try"))
    assert [m.message["Subject"] for m in smtp_server.wait_for(1)] == ["Second try"]


@pytest.mark.servers
def test_smtp_fail_next_mail_refuses_the_sender(smtp_server: SmtpServer) -> None:
    smtp_server.fail_next(421, "4.7.0 Too busy", stage="mail", count=2)
    for _ in range(2):
        with pytest.raises(smtplib.SMTPSenderRefused) as caught:
            send(smtp_server, message())
        assert caught.value.smtp_code == 421
    send(smtp_server, message())
    assert len(smtp_server.wait_for(1)) == 1


@pytest.mark.servers
def test_smtp_fail_next_rcpt_refuses_only_that_recipient(smtp_server: SmtpServer) -> None:
    smtp_server.fail_next(550, "5.1.1 No such user", stage="rcpt", recipient=BOB)

    refused = send(smtp_server, message(), to=[ALICE, BOB])

    assert refused == {BOB: (550, b"5.1.1 No such user")}
    [received] = smtp_server.wait_for(1)
    assert received.rcpt_tos == [ALICE]


@pytest.mark.servers
def test_smtp_fail_next_rejects_nonsense() -> None:
    server = SmtpServer()  # never started: the checks need no server
    with pytest.raises(ValueError):
        server.fail_next(250, "OK")
    with pytest.raises(ValueError):
        server.fail_next(550, "No", stage="data", recipient=BOB)


@pytest.mark.servers
def test_smtp_drop_after_data_records_but_never_replies(smtp_server: SmtpServer) -> None:
    smtp_server.drop_after_data()

    with pytest.raises(smtplib.SMTPServerDisconnected):
        send(smtp_server, message("Dropped"))
    [received] = smtp_server.wait_for(1)
    assert received.message["Subject"] == "Dropped"

    send(smtp_server, message("Next"))  # only one connection was dropped
    assert [m.message["Subject"] for m in smtp_server.wait_for(2)] == ["Dropped", "Next"]


@pytest.mark.servers
def test_smtp_auth_accepts_the_right_password_only(make_smtp_server: Callable[..., SmtpServer]) -> None:
    server = make_smtp_server(auth={"mailer": "s3cret"})

    with connect(server) as client:
        client.login("mailer", "s3cret")
        client.send_message(message(), from_addr=SENDER, to_addrs=[ALICE])
    assert server.wait_for(1)[0].auth_login == "mailer"

    with connect(server) as client, pytest.raises(smtplib.SMTPAuthenticationError) as caught:
        client.login("mailer", "wrong")
    assert caught.value.smtp_code == 535

    with connect(server) as client, pytest.raises(smtplib.SMTPSenderRefused) as refused:
        client.send_message(message(), from_addr=SENDER, to_addrs=[ALICE])  # no login
    assert refused.value.smtp_code == 530


@pytest.mark.servers
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_smtp_auth_mechanisms(make_smtp_server: Callable[..., SmtpServer], mechanism: str) -> None:
    server = make_smtp_server(auth={"mailer": "s3cret"})
    with connect(server) as client:
        client.user, client.password = "mailer", "s3cret"
        client.ehlo()
        code, _ = client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"))
    assert code == 235


# --------------------------------------------------------------------------- Dovecot


@pytest.mark.servers
def test_imap_append_select_search_fetch_returns_the_exact_bytes(imap_account: ImapAccount) -> None:
    with imap_account.client() as client:
        client.append("INBOX", RAW, flags=[b"\\Seen"])
        selected = client.select_folder("INBOX")
        uids = client.search(["SUBJECT", "Workbook returned"])
        fetched = client.fetch(uids, ["RFC822", "FLAGS"])

    assert selected[b"EXISTS"] == 1
    assert len(uids) == 1
    assert fetched[uids[0]][b"RFC822"] == RAW
    assert b"\\Seen" in fetched[uids[0]][b"FLAGS"]


@pytest.mark.servers
def test_imap_fresh_account_is_empty_and_append_helper_returns_the_uid(imap_account: ImapAccount) -> None:
    with imap_account.client() as client:
        assert [name for _, _, name in client.list_folders()] == ["INBOX"]
        assert client.select_folder("INBOX")[b"EXISTS"] == 0

    uid = imap_account.append("Archive", RAW)

    with imap_account.client() as client:
        client.select_folder("Archive", readonly=True)
        assert client.search("ALL") == [uid]


@pytest.mark.servers
def test_imap_create_folder_and_move(imap_account: ImapAccount) -> None:
    uid = imap_account.append("INBOX", RAW)
    with imap_account.client() as client:
        assert client.has_capability("MOVE")
        client.create_folder("Processed")
        client.select_folder("INBOX")
        client.move([uid], "Processed")
        assert client.search("ALL") == []
        client.select_folder("Processed")
        [moved] = client.search("ALL")
        assert client.fetch([moved], ["RFC822"])[moved][b"RFC822"] == RAW


@pytest.mark.servers
def test_imap_idle_is_advertised_and_reports_new_mail(imap_account: ImapAccount) -> None:
    with imap_account.client() as client:
        assert client.has_capability("IDLE")
        client.select_folder("INBOX")
        client.idle()
        imap_account.append("INBOX", RAW)
        responses = client.idle_check(timeout=5)
        client.idle_done()
    assert (1, b"EXISTS") in responses


@pytest.mark.servers
def test_imap_shared_users_log_in_and_wrong_password_fails(dovecot: DovecotServer) -> None:
    for user in ("ts@example.org", "other@example.org"):
        with dovecot.client(user) as client:
            assert client.select_folder("INBOX", readonly=True)[b"EXISTS"] >= 0
    client = IMAPClient(dovecot.host, port=dovecot.port, ssl=False, timeout=10)
    with pytest.raises(LoginError):
        client.login("ts@example.org", "wrong")
    client.shutdown()


@pytest.mark.servers
def test_dovecot_restart_keeps_port_mail_and_uidvalidity(make_dovecot: Callable[..., DovecotServer]) -> None:
    server = make_dovecot()
    port = server.port
    uid = server.append("ts@example.org", "INBOX", RAW)
    with server.client("ts@example.org") as client:
        validity = client.select_folder("INBOX")[b"UIDVALIDITY"]

    server.stop()
    assert not server.running
    with pytest.raises(ConnectionRefusedError):
        IMAPClient(server.host, port=port, ssl=False, timeout=5)

    server.start()
    server.restart()

    assert server.port == port
    with server.client("ts@example.org") as client:
        assert client.select_folder("INBOX")[b"UIDVALIDITY"] == validity
        assert client.fetch([uid], ["RFC822"])[uid][b"RFC822"] == RAW


@pytest.mark.servers
def test_dovecot_instances_run_side_by_side(make_dovecot: Callable[..., DovecotServer]) -> None:
    first = make_dovecot({"a@example.org": "pa"})
    second = make_dovecot({"b@example.org": "pb"})
    assert first.port != second.port

    first.append("a@example.org", "INBOX", RAW)
    with first.client("a@example.org") as a, second.client("b@example.org") as b:
        assert a.select_folder("INBOX")[b"EXISTS"] == 1
        assert b.select_folder("INBOX")[b"EXISTS"] == 0
    first.stop()
    with second.client("b@example.org") as b:  # stopping one leaves the other alone
        assert b.noop()


@pytest.mark.servers
def test_dovecot_refuses_a_root_its_processes_cannot_enter() -> None:
    private = Path(tempfile.mkdtemp())  # mode 0700, like pytest's tmp_path
    try:
        with pytest.raises(RigError, match="cannot enter"):
            DovecotServer(private / "dovecot", {"ts@example.org": "secret"})
    finally:
        shutil.rmtree(private)
