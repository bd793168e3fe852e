"""TLS and OAuth2 logins, for SMTP and IMAP, against real servers.

A throwaway CA signs a certificate for 127.0.0.1 and localhost (made once per
run with the ``openssl`` command). aiosmtpd offers STARTTLS or implicit TLS
with it, and a private Dovecot offers both on its two ports. The clients
must trust it through ``ca_file`` and refuse it otherwise. XOAUTH2 takes its
token from a command, as mail clients do with ``passwordeval``: aiosmtpd
checks the bearer token itself, Dovecot asks a loopback token-introspection
endpoint (its ``oauth2`` passdb), as it would ask Microsoft or Google.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest

from mailflow.auth import OAuth2TokenError, oauth2_token, xoauth2_string
from mailflow.config import ImapSettings, SmtpSettings
from mailflow.errors import PermanentSendError, ServerUnavailable, TemporarySendError
from mailflow.mailbox import ImapMailbox, MailboxError
from mailflow.sender import Batch, SmtpTransport
from tests.servers import DovecotServer, OAuth2IntrospectionServer, SmtpServer

USER = "ts@example.org"
PASSWORD = "secret"
TOKEN = "ya29.rig-token-0123456789"
SENDER = "mailflow@example.org"
RECIPIENT = "delegation@example.net"


# --------------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class Certs:
    ca: Path  # the CA certificate clients are told to trust
    cert: Path  # the server certificate (127.0.0.1, localhost), signed by the CA
    key: Path


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{done.stderr}")


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make test certificates: apt-get install openssl")
    folder = tmp_path_factory.mktemp("certs")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=mailflow rig CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip
    _openssl("req", "-new", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost", cwd=folder)
    (folder / "server.ext").write_text(
        "subjectAltName = DNS:localhost, IP:127.0.0.1\n"
        "basicConstraints = CA:FALSE\n"
        "keyUsage = critical, digitalSignature\n"
        "extendedKeyUsage = serverAuth\n"
        "subjectKeyIdentifier = hash\n"
        "authorityKeyIdentifier = keyid:always\n"
    )
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-set_serial", "2",
        "-days", "2", "-extfile", "server.ext", "-out", "server.pem",
        cwd=folder,
    )  # fmt: skip
    return Certs(ca=folder / "ca.pem", cert=folder / "server.pem", key=folder / "server.key")


@pytest.fixture(scope="module")
def introspection() -> Iterator[OAuth2IntrospectionServer]:
    with OAuth2IntrospectionServer({TOKEN: USER}) as server:
        yield server


@pytest.fixture(scope="module")
def tls_dovecot(certs: Certs, introspection: OAuth2IntrospectionServer) -> Iterator[DovecotServer]:
    """A private Dovecot with STARTTLS on `port`, implicit TLS on `tls_port`, and OAuth2 logins."""
    root = Path(tempfile.mkdtemp(prefix="mailflow-dovecot-"))
    try:
        with DovecotServer(
            root, {USER: PASSWORD}, tls=(certs.cert, certs.key), oauth2_introspection_url=introspection.url
        ) as server:
            yield server
    finally:
        shutil.rmtree(root, ignore_errors=True)


def token_command(tmp_path: Path, body: str) -> str:
    """A command line running a small Python script, as mail.*.oauth2_token_command."""
    script = tmp_path / f"token-{abs(hash(body))}.py"
    script.write_text(body)
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}"


def printing(token: str) -> str:
    return f"print({token!r})\n"


def message() -> bytes:
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = RECIPIENT
    msg["Subject"] = "Request"
    msg["Message-ID"] = "<request-1@example.org>"
    msg.set_content("Please fill in the workbook.\n")
    return msg.as_bytes()


def send_one(settings: SmtpSettings) -> None:
    connection = SmtpTransport(settings, local_hostname="localhost").connect()
    try:
        assert connection.send(SENDER, [RECIPIENT], message()) == {}
    finally:
        connection.close()


# --------------------------------------------------------------------------- the token command


def test_token_is_the_stripped_first_line(tmp_path: Path) -> None:
    command = token_command(tmp_path, "print('  ' + 'tok-1  ')\nprint('second line')\n")
    assert oauth2_token(command) == "tok-1"


def test_failing_token_command_says_why_and_which_setting(tmp_path: Path) -> None:
    command = token_command(tmp_path, "import sys\nsys.stderr.write('refresh token expired\\nmore\\n')\nsys.exit(1)\n")

    with pytest.raises(OAuth2TokenError) as caught:
        oauth2_token(command, setting="mail.smtp.oauth2_token_command")

    assert str(caught.value) == (
        "oauth2_token_command failed (exit 1): refresh token expired; "
        "check the command in mail.smtp.oauth2_token_command"
    )


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("", "is empty"),
        ("'unbalanced", "is not a valid command line"),
        ("/nonexistent/token-helper --account ts", "cannot be run (/nonexistent/token-helper: No such file"),
    ],
)
def test_unusable_token_commands(command: str, message: str) -> None:
    with pytest.raises(OAuth2TokenError, match=r"check the command in mail\.imap\.oauth2_token_command") as caught:
        oauth2_token(command)
    assert message in str(caught.value)


def test_token_command_printing_nothing_or_hanging(tmp_path: Path) -> None:
    with pytest.raises(OAuth2TokenError, match="printed no token"):
        oauth2_token(token_command(tmp_path, "print()\n"))
    with pytest.raises(OAuth2TokenError, match=r"did not finish within 0\.3 s"):
        oauth2_token(token_command(tmp_path, "import time\ntime.sleep(10)\n"), timeout=0.3)


def test_xoauth2_string() -> None:
    assert xoauth2_string("ts@example.org", "abc") == "user=ts@example.org\x01auth=Bearer abc\x01\x01"


# --------------------------------------------------------------------------- SMTP


@pytest.mark.servers
@pytest.mark.parametrize("security", ["starttls", "ssl"])
def test_smtp_tls_trusted_through_ca_file(certs: Certs, security: str) -> None:
    with SmtpServer(tls=(certs.cert, certs.key), implicit_tls=security == "ssl") as server:
        send_one(SmtpSettings("127.0.0.1", server.port, security=security, timeout=5, ca_file=certs.ca))
        [received] = server.wait_for(1)
    assert received.message["Subject"] == "Request"


@pytest.mark.servers
@pytest.mark.parametrize("security", ["starttls", "ssl"])
def test_smtp_untrusted_certificate_is_a_clear_temporary_error(certs: Certs, security: str) -> None:
    with SmtpServer(tls=(certs.cert, certs.key), implicit_tls=security == "ssl") as server:
        settings = SmtpSettings("127.0.0.1", server.port, security=security, timeout=5)
        with pytest.raises(TemporarySendError) as caught:
            SmtpTransport(settings, local_hostname="localhost").connect()
        with Batch(SmtpTransport(settings, local_hostname="localhost")) as batch, pytest.raises(ServerUnavailable):
            batch.send(SENDER, [RECIPIENT], message())
        assert server.messages == []

    text = str(caught.value)
    assert f"the TLS certificate of SMTP server 127.0.0.1:{server.port} is not trusted" in text
    assert "unable to get local issuer certificate" in text
    assert "set mail.smtp.ca_file" in text


@pytest.mark.servers
def test_smtp_unreadable_ca_file(tmp_path: Path) -> None:
    settings = SmtpSettings("127.0.0.1", 1, security="starttls", ca_file=tmp_path / "missing.pem")
    with pytest.raises(PermanentSendError, match=r"cannot read the CA file .*missing\.pem.*check mail\.smtp\.ca_file"):
        SmtpTransport(settings).connect()


@pytest.mark.servers
def test_smtp_xoauth2_with_a_token_from_the_command(certs: Certs, tmp_path: Path) -> None:
    with SmtpServer(tls=(certs.cert, certs.key), oauth2_tokens={USER: TOKEN}) as server:
        settings = SmtpSettings(
            "127.0.0.1",
            server.port,
            security="starttls",
            username=USER,
            timeout=5,
            ca_file=certs.ca,
            oauth2_token_command=token_command(tmp_path, printing(TOKEN)),
        )
        send_one(settings)
        [received] = server.wait_for(1)
    assert received.auth_login == USER


@pytest.mark.servers
def test_smtp_xoauth2_rejected_token_names_the_user_and_the_setting(tmp_path: Path) -> None:
    with SmtpServer(oauth2_tokens={USER: TOKEN}) as server:
        settings = SmtpSettings(
            "127.0.0.1",
            server.port,
            security="none",
            username=USER,
            timeout=5,
            oauth2_token_command=token_command(tmp_path, printing("expired-token")),
        )
        with pytest.raises(PermanentSendError) as caught:
            SmtpTransport(settings, local_hostname="localhost").connect()
    message = str(caught.value)
    assert f"rejected the XOAUTH2 login of {USER}: 535" in message
    assert "mail.smtp.oauth2_token_command" in message
    assert "expired-token" not in message
    assert caught.value.code == 535


@pytest.mark.servers
def test_smtp_failing_token_command_is_temporary(tmp_path: Path) -> None:
    command = token_command(tmp_path, "import sys\nsys.stderr.write('no network\\n')\nsys.exit(2)\n")
    with SmtpServer(oauth2_tokens={USER: TOKEN}) as server:
        settings = SmtpSettings(
            "127.0.0.1", server.port, security="none", username=USER, timeout=5, oauth2_token_command=command
        )
        with pytest.raises(TemporarySendError, match=r"failed \(exit 2\): no network; check the command in mail\.smtp"):
            SmtpTransport(settings, local_hostname="localhost").connect()


# --------------------------------------------------------------------------- IMAP


def imap_settings(server: DovecotServer, security: str, **changes: object) -> ImapSettings:
    port = server.tls_port if security == "ssl" else server.port
    fields: dict[str, object] = {"username": USER, "password": PASSWORD, "timeout": 5.0, **changes}
    return ImapSettings("127.0.0.1", port, security, **fields)  # type: ignore[arg-type]


@pytest.mark.servers
@pytest.mark.parametrize("security", ["ssl", "starttls"])
def test_imap_tls_trusted_through_ca_file(tls_dovecot: DovecotServer, certs: Certs, security: str) -> None:
    uid = tls_dovecot.append(USER, "INBOX", b"Subject: over TLS\r\n\r\nhello\r\n")

    session = ImapMailbox(imap_settings(tls_dovecot, security, ca_file=certs.ca)).open()
    try:
        assert uid in session.uids()
        assert "STARTTLS" not in session.capabilities  # logged in, over TLS
    finally:
        session.close()


@pytest.mark.servers
@pytest.mark.parametrize("security", ["ssl", "starttls"])
def test_imap_idle_over_tls_sees_news_at_once(tls_dovecot: DovecotServer, certs: Certs, security: str) -> None:
    """Over TLS too: news that came with "+ idling" (decrypted into the TLS layer or imaplib's
    buffer) ends the wait at once, as news after it does, and an empty wait times out."""
    session = ImapMailbox(imap_settings(tls_dovecot, security, ca_file=certs.ca)).open()
    try:
        before = len(session.uids())  # the server is shared by this module's tests
        assert session.wait_for_change(0.3) is False
        client = session._client  # type: ignore[attr-defined]
        start_idle = client.idle

        def append_then_idle() -> None:
            tls_dovecot.append(USER, "INBOX", b"Subject: between NOOP and IDLE\r\n\r\nhello\r\n")
            time.sleep(0.8)  # past Dovecot's 500 ms notification delay
            start_idle()

        client.idle = append_then_idle
        started = time.monotonic()
        assert session.wait_for_change(5) is True
        assert time.monotonic() - started < 2.5
        client.idle = start_idle
        timer = threading.Timer(0.3, tls_dovecot.append, args=(USER, "INBOX", b"Subject: later\r\n\r\nhi\r\n"))
        timer.start()
        try:
            started = time.monotonic()
            assert session.wait_for_change(5) is True
            assert time.monotonic() - started < 3
        finally:
            timer.join()
        assert len(session.uids()) == before + 2
    finally:
        session.close()


@pytest.mark.servers
@pytest.mark.parametrize("security", ["ssl", "starttls"])
def test_imap_untrusted_certificate_is_a_clear_error(tls_dovecot: DovecotServer, security: str) -> None:
    settings = imap_settings(tls_dovecot, security)

    with pytest.raises(MailboxError) as caught:
        ImapMailbox(settings).open()

    message = str(caught.value)
    assert f"the TLS certificate of IMAP server 127.0.0.1:{settings.port} is not trusted" in message
    assert "set mail.imap.ca_file" in message


@pytest.mark.servers
def test_imap_starttls_on_a_server_without_tls(dovecot: DovecotServer, certs: Certs) -> None:
    account = dovecot.new_account()
    settings = ImapSettings(
        "127.0.0.1", dovecot.port, "starttls", username=account.user, password=account.password, ca_file=certs.ca
    )
    with pytest.raises(MailboxError, match=r"does not offer STARTTLS; set mail\.imap\.security to ssl"):
        ImapMailbox(settings).open()


@pytest.mark.servers
def test_imap_unreadable_ca_file(tls_dovecot: DovecotServer, tmp_path: Path) -> None:
    settings = imap_settings(tls_dovecot, "ssl", ca_file=tmp_path / "missing.pem")
    with pytest.raises(MailboxError, match=r"cannot read the CA file .*check mail\.imap\.ca_file"):
        ImapMailbox(settings).open()


@pytest.mark.servers
def test_imap_xoauth2_checked_by_token_introspection(
    tls_dovecot: DovecotServer, certs: Certs, introspection: OAuth2IntrospectionServer, tmp_path: Path
) -> None:
    uid = tls_dovecot.append(USER, "INBOX", b"Subject: for an OAuth2 login\r\n\r\nhello\r\n")
    settings = imap_settings(
        tls_dovecot,
        "ssl",
        password=None,
        ca_file=certs.ca,
        oauth2_token_command=token_command(tmp_path, printing(TOKEN)),
    )

    session = ImapMailbox(settings).open()
    try:
        assert uid in session.uids()
    finally:
        session.close()
    assert TOKEN in introspection.requests  # Dovecot really asked the token's issuer


@pytest.mark.servers
def test_imap_xoauth2_rejected_token(tls_dovecot: DovecotServer, certs: Certs, tmp_path: Path) -> None:
    settings = imap_settings(
        tls_dovecot,
        "starttls",
        password=None,
        ca_file=certs.ca,
        oauth2_token_command=token_command(tmp_path, printing("revoked-token")),
    )

    with pytest.raises(MailboxError) as caught:
        ImapMailbox(settings).open()

    message = str(caught.value)
    assert f"rejected the login of {USER}" in message
    assert "mail.imap.oauth2_token_command" in message
    assert "revoked-token" not in message


@pytest.mark.servers
def test_imap_failing_token_command(tls_dovecot: DovecotServer, certs: Certs, tmp_path: Path) -> None:
    command = token_command(tmp_path, "import sys\nsys.stderr.write('consent required\\n')\nsys.exit(3)\n")
    settings = imap_settings(tls_dovecot, "ssl", password=None, ca_file=certs.ca, oauth2_token_command=command)

    with pytest.raises(MailboxError) as caught:
        ImapMailbox(settings).open()

    assert str(caught.value) == (
        "oauth2_token_command failed (exit 3): consent required; check the command in mail.imap.oauth2_token_command"
    )
