"""Outgoing mail: an SMTP adapter and its local twin (a maildir folder as outbox).

A transport opens one :class:`Connection` for a batch; ``send`` returns the
recipients the server refused for good and raises :class:`TemporarySendError`
or :class:`PermanentSendError` for the message as a whole. Deciding what to do
about a failure (retry later, mark a contact refused) is the engine's job.

``begin`` sends a message and returns before the server's final answer
(:class:`InFlight`; ``finish`` reads it): the engine composes the next
email while the server is still taking in the last one. Nothing is ever
sent before the previous answer was read, so this is plain SMTP, not
pipelining.
"""

from __future__ import annotations

import contextlib
import mailbox
import re
import smtplib
import ssl
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol

from mailflow.auth import oauth2_token, xoauth2_string
from mailflow.config import SmtpSettings
from mailflow.errors import (
    MailflowError,
    PermanentSendError,
    SendError,
    ServerUnavailable,
    TemporarySendError,
)

Refused = dict[str, tuple[int, str]]
"""Recipients refused for good: {address: (code, text)}."""


class InFlight(Protocol):
    """A message handed to the server, its final answer not read yet."""

    def finish(self) -> Refused:
        """The server's answer: the recipients refused for good, or the send errors of ``send``."""


class Connection(Protocol):
    """An open channel to send a batch of messages."""

    def send(self, sender: str, recipients: Sequence[str], raw: bytes) -> Refused:
        """Send one message. Returns the recipients refused for good ({address: (code, text)})."""

    def begin(self, sender: str, recipients: Sequence[str], raw: bytes) -> InFlight:
        """Send one message without waiting for the server's final answer."""

    def close(self) -> None: ...


class _Answered:
    """A message whose answer is already known (sent in one step)."""

    def __init__(self, refused: Refused) -> None:
        self._refused = refused

    def finish(self) -> Refused:
        return self._refused


class Transport(Protocol):
    """Something that can open a :class:`Connection`."""

    name: str

    def connect(self) -> Connection:
        """Open a connection; raises TemporarySendError (or PermanentSendError for bad credentials)."""


def _close(client: smtplib.SMTP | None) -> None:
    """Close a half-open session (after a failed STARTTLS or greeting)."""
    if client is not None:
        client.close()


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


_LEADING_DOT = re.compile(rb"(?m)^\.")


def _data_section(raw: bytes) -> bytes:
    """``raw`` as the DATA section carries it: leading dots doubled, ended by CRLF "." CRLF (RFC 5321 4.5.2)."""
    quoted = _LEADING_DOT.sub(b"..", raw)
    if not quoted.endswith(b"\r\n"):
        quoted += b"\r\n"
    return quoted + b".\r\n"


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """What smtplib raises, as the send errors the engine decides on."""
    try:
        yield
    except smtplib.SMTPRecipientsRefused as exc:
        codes = {addr: (code, _text(text)) for addr, (code, text) in exc.recipients.items()}
        if all(code >= 500 for code, _ in codes.values()):
            summary = "; ".join(f"{a}: {c} {t}" for a, (c, t) in codes.items())
            raise PermanentSendError(
                f"every recipient refused: {summary}", code=min(c for c, _ in codes.values()), refused=codes
            ) from exc
        raise TemporarySendError(
            "recipients temporarily refused: " + "; ".join(f"{a}: {c} {t}" for a, (c, t) in codes.items()),
            code=max(c for c, _ in codes.values() if c < 500),
        ) from exc
    except smtplib.SMTPServerDisconnected as exc:
        raise TemporarySendError(f"connection lost while sending: {exc}") from exc
    except smtplib.SMTPResponseException as exc:
        message = f"{exc.smtp_code} {_text(exc.smtp_error)}"
        if 400 <= exc.smtp_code < 500:
            raise TemporarySendError(f"server said {message}", code=exc.smtp_code) from exc
        raise PermanentSendError(f"server refused: {message}", code=exc.smtp_code) from exc
    except (OSError, smtplib.SMTPException) as exc:
        raise TemporarySendError(f"sending failed: {exc}") from exc


def _abandon(client: smtplib.SMTP, code: int) -> None:
    """After a refusal: drop the session on 421 (the server is closing it), else reset the transaction."""
    if code == 421:
        client.close()
        return
    with contextlib.suppress(smtplib.SMTPServerDisconnected, OSError):
        client.rset()


class _SmtpInFlight:
    """The message body is sent; the server's "250" (or its refusal) is still to be read."""

    def __init__(self, client: smtplib.SMTP, refused: Refused) -> None:
        self._client = client
        self._refused = refused

    def finish(self) -> Refused:
        with _translated():
            code, response = self._client.getreply()
            if code != 250:
                _abandon(self._client, code)
                raise smtplib.SMTPDataError(code, response)
        return self._refused


class SmtpConnection:
    """One SMTP session, reused for a whole batch."""

    def __init__(self, client: smtplib.SMTP) -> None:
        self._client = client

    def send(self, sender: str, recipients: Sequence[str], raw: bytes) -> Refused:
        return self.begin(sender, recipients, raw).finish()

    def begin(self, sender: str, recipients: Sequence[str], raw: bytes) -> InFlight:
        """What ``smtplib.SMTP.sendmail`` does, up to the last line of the message: the answer is read later."""
        with _translated():
            refused = self._start(sender, list(recipients), raw)
        return _SmtpInFlight(self._client, refused)

    def _start(self, sender: str, recipients: list[str], raw: bytes) -> Refused:
        client = self._client
        client.ehlo_or_helo_if_needed()
        options = [f"size={len(raw)}"] if client.does_esmtp and client.has_extn("size") else []
        code, response = client.mail(sender, options)
        if code != 250:
            _abandon(client, code)
            raise smtplib.SMTPSenderRefused(code, response, sender)
        refused: dict[str, tuple[int, bytes]] = {}
        for address in recipients:
            code, response = client.rcpt(address)
            if code not in (250, 251):
                refused[address] = (code, response)
            if code == 421:
                client.close()
                raise smtplib.SMTPRecipientsRefused(refused)
        if len(refused) == len(recipients):
            _abandon(client, 0)
            raise smtplib.SMTPRecipientsRefused(refused)
        code, response = client.docmd("data")
        if code != 354:
            _abandon(client, code)
            raise smtplib.SMTPDataError(code, response)
        client.send(_data_section(raw))
        return {address: (code, _text(text)) for address, (code, text) in refused.items()}

    def close(self) -> None:
        try:
            self._client.quit()
        except (OSError, smtplib.SMTPException):
            self._client.close()


class SmtpTransport:
    """SMTP submission with ``security: none | starttls | ssl`` and optional login."""

    name = "smtp"

    def __init__(self, settings: SmtpSettings, *, local_hostname: str | None = None) -> None:
        self.settings = settings
        self.local_hostname = local_hostname

    def connect(self) -> SmtpConnection:
        s = self.settings
        where = f"SMTP server {s.host}:{s.port}"
        context = self._ssl_context() if s.security in ("ssl", "starttls") else None
        client: smtplib.SMTP | None = None
        try:
            if s.security == "ssl":
                client = smtplib.SMTP_SSL(
                    s.host,
                    s.port,
                    timeout=s.timeout,
                    context=context,
                    local_hostname=self.local_hostname,
                )
            else:
                client = smtplib.SMTP(s.host, s.port, timeout=s.timeout, local_hostname=self.local_hostname)
                if s.security == "starttls":
                    client.ehlo()
                    client.starttls(context=context)
                    client.ehlo()
        except smtplib.SMTPResponseException as exc:
            _close(client)
            raise TemporarySendError(
                f"{where} refused the connection: {exc.smtp_code} {_text(exc.smtp_error)}"
            ) from exc
        except ssl.SSLCertVerificationError as exc:
            _close(client)
            raise TemporarySendError(
                f"the TLS certificate of {where} is not trusted ({exc.verify_message or exc.reason}); "
                "set mail.smtp.ca_file to the CA that signed it, or check mail.smtp.host"
            ) from exc
        except (OSError, smtplib.SMTPException) as exc:
            _close(client)
            raise TemporarySendError(f"cannot connect to {where}: {exc}") from exc
        if s.oauth2_token_command:
            self._login_xoauth2(client, where)
        elif s.username:
            try:
                client.login(s.username, s.password or "")
            except smtplib.SMTPAuthenticationError as exc:
                client.close()
                raise PermanentSendError(
                    f"{where} rejected the login of {s.username}: {exc.smtp_code} {_text(exc.smtp_error)}; "
                    "check mail.smtp.username and password",
                    code=exc.smtp_code,
                ) from exc
            except (OSError, smtplib.SMTPException) as exc:
                client.close()
                raise TemporarySendError(f"login to {where} failed: {exc}") from exc
        return SmtpConnection(client)

    def _ssl_context(self) -> ssl.SSLContext:
        """Verify the server's certificate, against ``ca_file`` when given (a private CA)."""
        ca_file = self.settings.ca_file
        try:
            return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise PermanentSendError(f"cannot read the CA file {ca_file}: {exc}; check mail.smtp.ca_file") from exc

    def _login_xoauth2(self, client: smtplib.SMTP, where: str) -> None:
        """SASL XOAUTH2 with a fresh token from ``oauth2_token_command``."""
        s = self.settings
        assert s.oauth2_token_command
        if not s.username:
            client.close()
            raise PermanentSendError(f"no login for {where}: set mail.smtp.username (OAuth2 needs it)")
        try:
            token = oauth2_token(s.oauth2_token_command, s.timeout, setting="mail.smtp.oauth2_token_command")
        except MailflowError as exc:
            client.close()
            raise TemporarySendError(str(exc)) from exc
        initial = xoauth2_string(s.username, token)

        def respond(challenge: bytes | None = None) -> str:
            # On failure the server sends a JSON error as a challenge; an empty
            # reply then ends the exchange with the final error code.
            return initial if challenge is None else ""

        try:
            client.ehlo_or_helo_if_needed()
            client.auth("XOAUTH2", respond)
        except smtplib.SMTPAuthenticationError as exc:
            client.close()
            raise PermanentSendError(
                f"{where} rejected the XOAUTH2 login of {s.username}: {exc.smtp_code} {_text(exc.smtp_error)}; "
                "check mail.smtp.username and mail.smtp.oauth2_token_command (is the token valid for SMTP?)",
                code=exc.smtp_code,
            ) from exc
        except (OSError, smtplib.SMTPException) as exc:
            client.close()
            raise TemporarySendError(f"XOAUTH2 login to {where} failed: {exc}") from exc


class LocalConnection:
    """Writes each message into a maildir folder, as a server would deliver it."""

    def __init__(self, folder: mailbox.Maildir) -> None:
        self._folder = folder

    def send(self, sender: str, recipients: Sequence[str], raw: bytes) -> Refused:
        envelope = f"X-Mailflow-Envelope-From: {sender}\r\nX-Mailflow-Envelope-To: {', '.join(recipients)}\r\n"
        try:
            self._folder.add(envelope.encode("ascii") + raw)
        except OSError as exc:
            raise TemporarySendError(f"cannot write to the local outbox: {exc}") from exc
        return {}

    def begin(self, sender: str, recipients: Sequence[str], raw: bytes) -> InFlight:
        return _Answered(self.send(sender, recipients, raw))

    def close(self) -> None:
        return None


class LocalTransport:
    """The embedded local transport: no server, a maildir folder as outbox."""

    name = "local"

    def __init__(self, outbox: Path) -> None:
        self.outbox = outbox

    def connect(self) -> LocalConnection:
        try:
            return LocalConnection(mailbox.Maildir(self.outbox, create=True))
        except OSError as exc:
            raise TemporarySendError(f"cannot open the local outbox {self.outbox}: {exc}") from exc


class Batch:
    """A connection opened lazily, reopened once after a drop, closed at the end."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._connection: Connection | None = None

    def __enter__(self) -> Batch:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the current connection (after an error that may have broken it)."""
        if self._connection is not None:
            with contextlib.suppress(OSError, smtplib.SMTPException):
                self._connection.close()
            self._connection = None

    def send(self, sender: str, recipients: Sequence[str], raw: bytes) -> Refused:
        return self.begin(sender, recipients, raw).finish()

    def begin(self, sender: str, recipients: Sequence[str], raw: bytes) -> InFlight:
        """Hand one message to the server; ``finish`` on the result reads its answer.

        Raises :class:`ServerUnavailable` when no connection can be opened; a temporary failure (then,
        or when finishing) also forgets the connection, which the next message opens again."""
        if self._connection is None:
            try:
                self._connection = self._transport.connect()
            except SendError as exc:
                raise ServerUnavailable(str(exc), code=exc.code) from exc
        try:
            return _Watched(self, self._connection.begin(sender, recipients, raw))
        except TemporarySendError:
            self.reset()
            raise


class _Watched:
    """An in-flight message of a :class:`Batch`, which forgets its connection if finishing fails."""

    def __init__(self, batch: Batch, flight: InFlight) -> None:
        self._batch = batch
        self._flight = flight

    def finish(self) -> Refused:
        try:
            return self._flight.finish()
        except TemporarySendError:
            self._batch.reset()
            raise
