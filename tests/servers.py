"""Real mail servers for the test rig, each on a free loopback port.

`SmtpServer` runs aiosmtpd in a thread of the test process and records every
message it accepts; it can also misbehave on request (temporary and permanent
refusals, a connection dropped after DATA) so the sender's fault handling is
tested against a real SMTP conversation.

`DovecotServer` runs a private Dovecot (Debian's ``dovecot-imapd``) from its
own folder: configuration, users, mail and logs all live under one root, so
several instances can run side by side and one can be stopped and restarted
on the same port with its mail intact. It needs root, because Dovecot refuses
to run mail as uid 0 and switches to the ``mail`` user, which only root can do.

Nothing here imports mailflow: the rig tests mailflow, never the reverse.
"""

from __future__ import annotations

import atexit
import base64
import binascii
import contextlib
import ctypes
import email.policy
import grp
import json
import os
import pwd
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, LoginPassword, Session
from imapclient import IMAPClient

__all__ = [
    "DOVECOT_MISSING",
    "DovecotNotInstalledError",
    "DovecotServer",
    "ImapAccount",
    "OAuth2IntrospectionServer",
    "ReceivedMessage",
    "RigError",
    "SmtpServer",
    "free_port",
]

LOOPBACK = "127.0.0.1"

#: How long a server may take to come up or go down before the rig gives up.
DEFAULT_TIMEOUT = 10.0

DOVECOT_MISSING = (
    "Dovecot is not installed: run ./make.sh test (it installs dovecot-imapd) or apt-get install dovecot-imapd"
)


class RigError(RuntimeError):
    """A test server could not be prepared, started or stopped."""


class DovecotNotInstalledError(RigError):
    """The ``dovecot`` binary is missing; the message says how to install it."""


# --------------------------------------------------------------------------- ports

_handed_out: set[int] = set()
_ports_lock = threading.Lock()


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on `host` that is free now and not handed out before.

    The kernel picks the port (bind to port 0). Remembering what this process
    already handed out keeps two servers created back to back in one test run
    from being given the same port before the first one has bound it.
    """
    with _ports_lock:
        for _ in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((host, 0))
                port: int = sock.getsockname()[1]
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RigError(f"no free TCP port found on {host}")


def _port_accepts(host: str, port: int) -> bool:
    """Tell whether something listens on host:port right now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- SMTP

SmtpStage = Literal["mail", "rcpt", "data"]


@dataclass(frozen=True)
class ReceivedMessage:
    """One message accepted by `SmtpServer`, as the client sent it."""

    mail_from: str
    rcpt_tos: list[str]
    #: The DATA payload exactly as received (dot-unstuffed, CRLF line ends).
    data: bytes
    #: `data` parsed with `email.policy.default`, line ends turned to LF
    #: first, so text parts compare equal to the str they were made from.
    message: EmailMessage
    #: `time.time()` when DATA ended.
    received_at: float
    #: The login the client authenticated with, or None without AUTH.
    auth_login: str | None = None


@dataclass
class _Fault:
    """A reply the server gives instead of the normal one, `remaining` more times."""

    stage: SmtpStage
    reply: str
    remaining: int
    recipient: str | None

    def matches(self, stage: SmtpStage, recipient: str | None) -> bool:
        if self.stage != stage or self.remaining <= 0:
            return False
        return self.recipient is None or (recipient or "").lower() == self.recipient.lower()


@dataclass
class _Recorder:
    """The aiosmtpd handler: records messages and plays the scheduled faults.

    Its hooks run on the server's event-loop thread while tests read from the
    main thread, hence the lock around every piece of shared state.
    """

    require_auth: bool = False
    #: XOAUTH2 logins and the one bearer token each is accepted with.
    oauth2_tokens: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    messages: list[ReceivedMessage] = field(default_factory=list)
    faults: list[_Fault] = field(default_factory=list)
    drops: int = 0

    def _take_fault(self, stage: SmtpStage, recipient: str | None = None) -> str | None:
        with self.lock:
            for fault in self.faults:
                if fault.matches(stage, recipient):
                    fault.remaining -= 1
                    reply = fault.reply
                    self.faults = [f for f in self.faults if f.remaining > 0]
                    return reply
        return None

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if self.require_auth and not session.authenticated:
            return "530 5.7.0 Authentication required"
        reply = self._take_fault("mail")
        if reply is not None:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        reply = self._take_fault("rcpt", address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply = self._take_fault("data")
        if reply is not None:
            return reply
        data = envelope.original_content or b""
        login = getattr(session.auth_data, "login", None)  # LoginPassword or _BearerLogin
        received = ReceivedMessage(
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            data=data,
            message=_parse(data),
            received_at=time.time(),
            auth_login=login.decode("utf-8", "replace") if isinstance(login, bytes) else None,
        )
        with self.lock:
            self.messages.append(received)
            drop = self.drops > 0
            if drop:
                self.drops -= 1
        if drop and server.transport is not None:
            # Close before the reply is written: aiosmtpd then writes the
            # "250" into a closing transport, which discards it, and the
            # client reads end-of-file where it expected the reply.
            server.transport.close()
        return "250 OK"

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        """SASL XOAUTH2 as Gmail and Microsoft 365 speak it (aiosmtpd calls ``auth_<MECHANISM>`` hooks)."""
        if len(args) > 1:
            try:
                blob = base64.b64decode(args[1], validate=True)
            except binascii.Error:
                await server.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        else:
            answer = await server.challenge_auth("")
            if answer is MISSING:
                return AuthResult(success=False, handled=True)
            assert isinstance(answer, bytes)
            blob = answer
        user, token = _parse_xoauth2(blob)
        with self.lock:
            expected = self.oauth2_tokens.get(user)
        if user and token and expected == token:
            return AuthResult(success=True, auth_data=_BearerLogin(user.encode()))
        # Like Gmail: the error as a JSON challenge, answered by an empty line, then 535.
        error = json.dumps({"status": "401", "schemes": "bearer", "scope": "https://mail.rig.test/"})
        if await server.challenge_auth(error) is MISSING:
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False)


@dataclass(frozen=True)
class _BearerLogin:
    """What an XOAUTH2 login leaves in ``session.auth_data``."""

    login: bytes


def _parse_xoauth2(blob: bytes) -> tuple[str, str]:
    """``user=U^Aauth=Bearer T^A^A`` -> (U, T); empty strings for what is missing."""
    user = token = ""
    for part in blob.decode("utf-8", "replace").split("\x01"):
        if part.startswith("user="):
            user = part[len("user=") :]
        elif part.lower().startswith("auth=bearer "):
            token = part[len("auth=bearer ") :].strip()
    return user, token


def server_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server-side TLS context presenting `cert` (PEM, with its chain) and `key`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def _parse(data: bytes) -> EmailMessage:
    message = BytesParser(policy=email.policy.default).parsebytes(data.replace(b"\r\n", b"\n"))
    assert isinstance(message, EmailMessage)
    return message


class SmtpServer:
    """An aiosmtpd server on loopback that records what it receives.

    `auth` maps logins to passwords; when given, the server offers AUTH PLAIN
    and LOGIN without TLS (loopback only) and requires a login before MAIL,
    like a submission server. `oauth2_tokens` maps logins to the bearer token
    each may log in with by AUTH XOAUTH2 (and also requires a login).

    `tls` is a (certificate, key) pair of PEM files: the server then offers
    STARTTLS, or, with `implicit_tls`, speaks TLS from the first byte (port
    465 style). Use as a context manager or call `start()` and `stop()`;
    `restart()` comes back on the same port.
    """

    def __init__(
        self,
        *,
        auth: Mapping[str, str] | None = None,
        host: str = LOOPBACK,
        port: int | None = None,
        tls: tuple[Path, Path] | None = None,
        implicit_tls: bool = False,
        oauth2_tokens: Mapping[str, str] | None = None,
    ):
        if implicit_tls and tls is None:
            raise ValueError("implicit_tls needs tls=(certificate, key)")
        self.host = host
        self.port = port if port is not None else free_port(host)
        self._auth = dict(auth) if auth is not None else None
        self._tls = tls
        self._implicit_tls = implicit_tls
        self._recorder = _Recorder(
            require_auth=auth is not None or oauth2_tokens is not None, oauth2_tokens=dict(oauth2_tokens or {})
        )
        self._controller: Controller | None = None

    # lifecycle

    def start(self) -> None:
        """Listen on `host`:`port` and return once the server answers."""
        if self._controller is not None:
            raise RigError(f"SMTP server on port {self.port} is already running")
        options: dict[str, Any] = {}
        if self._auth is not None:
            options.update(authenticator=self._authenticate)
        if self._recorder.require_auth:
            # Not auth_required=True: without TLS, aiosmtpd warns on every
            # connection; the recorder refuses MAIL before AUTH instead.
            options.update(auth_require_tls=False)
        if self._tls is not None:
            context = server_tls_context(*self._tls)
            options.update(ssl_context=context) if self._implicit_tls else options.update(tls_context=context)
        # A controller's event loop is closed by stop(), so every start needs a new one.
        controller = Controller(
            self._recorder,
            hostname=self.host,
            port=self.port,
            server_hostname="smtp.rig.test",  # the default, socket.getfqdn(), can stall on DNS
            enable_SMTPUTF8=True,
            ready_timeout=DEFAULT_TIMEOUT,
            **options,
        )
        controller.start()
        self._controller = controller

    def stop(self) -> None:
        """Close the listener and every open connection; a no-op when stopped."""
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    def restart(self) -> None:
        """Stop and start again on the same port; recorded messages are kept."""
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self._controller is not None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # what was received

    @property
    def messages(self) -> list[ReceivedMessage]:
        """A snapshot of the messages received so far, oldest first."""
        with self._recorder.lock:
            return list(self._recorder.messages)

    def clear(self) -> None:
        """Forget the received messages and any fault not yet played."""
        with self._recorder.lock:
            self._recorder.messages.clear()
            self._recorder.faults.clear()
            self._recorder.drops = 0

    def wait_for(self, count: int, timeout: float = DEFAULT_TIMEOUT) -> list[ReceivedMessage]:
        """Wait until at least `count` messages were received and return them all."""
        deadline = time.monotonic() + timeout
        while True:
            messages = self.messages
            if len(messages) >= count:
                return messages
            if time.monotonic() >= deadline:
                raise TimeoutError(f"SMTP server received {len(messages)} message(s), expected {count}")
            time.sleep(0.01)

    # faults

    def fail_next(
        self,
        code: int,
        message: str,
        *,
        stage: SmtpStage = "data",
        count: int = 1,
        recipient: str | None = None,
    ) -> None:
        """Answer the next `count` MAIL, RCPT or DATA commands with `code message`.

        With `recipient`, only RCPT commands for that address (compared
        case-insensitively) count; other recipients are accepted. A refused
        DATA is not recorded. Faults queue up in the order they were set.
        """
        if stage not in ("mail", "rcpt", "data"):
            raise ValueError(f"stage must be 'mail', 'rcpt' or 'data', not {stage!r}")
        if recipient is not None and stage != "rcpt":
            raise ValueError("recipient only applies to stage='rcpt'")
        if not 400 <= code <= 599:
            raise ValueError(f"a failure reply code is 4xx or 5xx, not {code}")
        if count < 1:
            raise ValueError("count must be at least 1")
        with self._recorder.lock:
            self._recorder.faults.append(_Fault(stage, f"{code} {message}", count, recipient))

    def drop_after_data(self, count: int = 1) -> None:
        """For the next `count` messages, record the DATA then hang up without replying.

        This is the nasty case for a sender: the message did arrive, but the
        client cannot know it (smtplib raises SMTPServerDisconnected).
        """
        if count < 1:
            raise ValueError("count must be at least 1")
        with self._recorder.lock:
            self._recorder.drops += count

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        assert self._auth is not None
        if isinstance(auth_data, LoginPassword):
            login = auth_data.login.decode("utf-8", "replace")
            if self._auth.get(login) == auth_data.password.decode("utf-8", "replace"):
                return AuthResult(success=True, auth_data=auth_data)
        # handled=False: aiosmtpd sends its standard "535 5.7.8" reply.
        return AuthResult(success=False, handled=False)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<SmtpServer {self.host}:{self.port} {state}, {len(self.messages)} message(s)>"


# --------------------------------------------------------------------------- OAuth2


class OAuth2IntrospectionServer:
    """A loopback OAuth2 token-introspection endpoint (RFC 7662) for Dovecot's oauth2 passdb.

    `tokens` maps each valid bearer token to the login it belongs to. Dovecot
    POSTs ``token=...``; the answer is ``{"active": true, "username": ...}``
    for a known token and ``{"active": false}`` otherwise. The token is also
    read from the query string or an ``Authorization: Bearer`` header, so the
    other introspection modes work too. `requests` lists the tokens asked about.
    """

    def __init__(self, tokens: Mapping[str, str], *, host: str = LOOPBACK):
        self.host = host
        self.tokens = dict(tokens)
        self._lock = threading.Lock()
        self._requests: list[str] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RigError("the introspection server is not running")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/introspect"

    @property
    def requests(self) -> list[str]:
        with self._lock:
            return list(self._requests)

    def _answer(self, token: str) -> dict[str, Any]:
        with self._lock:
            self._requests.append(token)
            user = self.tokens.get(token)
        return {"active": True, "username": user} if user else {"active": False}

    def start(self) -> None:
        if self._server is not None:
            raise RigError("the introspection server is already running")
        rig = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, body: bytes) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                form = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
                bearer = self.headers.get("Authorization", "")
                token = (form.get("token") or query.get("token") or [""])[0]
                if not token and bearer.lower().startswith("bearer "):
                    token = bearer[len("bearer ") :].strip()
                payload = json.dumps(rig._answer(token)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self) -> None:
                self._reply(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

            def do_GET(self) -> None:
                self._reply(b"")

            def log_message(self, format: str, *args: Any) -> None:
                return None  # keep pytest's output clean

        server = ThreadingHTTPServer((self.host, 0), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name="oauth2-introspection", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(DEFAULT_TIMEOUT)
            self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------- Dovecot

#: The configuration of /work/shared/reference/dovecot-loopback.conf, plus
#: three lines for tests: no delay after a failed login (Dovecot's default
#: is 2 s), a greeting naming the instance (so start() knows it reached
#: its own server), and a second passdb admitting "fresh-*" users.
_DOVECOT_CONF = """\
# Written by tests/servers.py: a private Dovecot for the mailflow test rig.
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
protocols = imap
listen = {host}
{ssl}
disable_plaintext_auth = no
auth_mechanisms = plain login{oauth2_mechanisms}
auth_failure_delay = 0
login_greeting = {greeting}
default_login_user = dovenull
default_internal_user = dovecot
default_internal_group = dovecot
mail_location = maildir:{root}/mail/%u
mail_uid = mail
mail_gid = mail
first_valid_uid = 8
{oauth2_passdb}passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/users
}}
# Any "fresh-*" user logs in with FRESH_PASSWORD and starts with an empty
# mailbox: a new account per test without touching the users file, which
# Dovecot re-reads at most once a second.
passdb {{
  driver = static
  args = password={fresh_password}
  username_filter = {fresh_prefix}*
}}
userdb {{
  driver = static
  args = uid=mail gid=mail home={root}/home/%u
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = {host}
    port = {port}
  }}
  inet_listener imaps {{
    address = {host}
    port = {tls_port}
  }}
}}
{extra}"""

#: With `tls`: TLS on the imap port (STARTTLS) and on the imaps port.
_DOVECOT_SSL = """\
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}"""

#: With `oauth2_introspection_url`: XOAUTH2 and OAUTHBEARER logins, the
#: token checked by POSTing it to the URL (RFC 7662 token introspection).
#: First, so a token is never tried as a password of the passdbs below.
_DOVECOT_OAUTH2_PASSDB = """\
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {root}/dovecot-oauth2.conf.ext
}}
"""

_DOVECOT_OAUTH2_CONF = """\
introspection_mode = post
introspection_url = {url}
username_attribute = username
active_attribute = active
active_value = true
"""

#: How long stop() lets the master exit by itself once its children are gone.
_MASTER_GRACE = 0.05

FRESH_PREFIX = "fresh-"
FRESH_PASSWORD = "secret"
MAIL_USER = "mail"

_running: set[DovecotServer] = set()


def _stop_leftovers() -> None:
    for server in list(_running):
        with contextlib.suppress(Exception):
            server.stop()


atexit.register(_stop_leftovers)


# Resolved here, not in the child: only the call itself happens after fork.
_prctl = getattr(ctypes.CDLL(None), "prctl", None)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Have the kernel send SIGTERM to Dovecot if the test process dies.

    Runs in the child between fork and exec. It covers what atexit cannot: a
    test run killed with SIGKILL (a CI timeout) would otherwise leave Dovecot
    running. prctl() exists on Linux only, like Dovecot's part of the rig.
    """
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def find_dovecot() -> str:
    """Return the path of the ``dovecot`` binary or raise `DovecotNotInstalledError`."""
    found = shutil.which("dovecot") or shutil.which("dovecot", path="/usr/sbin:/usr/local/sbin:/sbin")
    if found is None:
        raise DovecotNotInstalledError(DOVECOT_MISSING)
    return found


@dataclass(frozen=True)
class ImapAccount:
    """A user of a `DovecotServer`, with what a client needs to log in."""

    server: DovecotServer
    user: str
    password: str

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def port(self) -> int:
        return self.server.port

    def client(self) -> IMAPClient:
        """A new IMAPClient, logged in as this user; log out when done."""
        return self.server.client(self.user)

    def append(self, folder: str, raw: bytes, flags: Iterable[str | bytes] = ()) -> int | None:
        """Put `raw` into `folder`; see `DovecotServer.append`."""
        return self.server.append(self.user, folder, raw, flags)


class DovecotServer:
    """A private Dovecot IMAP server whose files all live under `root`.

    `users` maps logins to plain-text passwords. Besides them, any login
    starting with ``fresh-`` is accepted with the password "secret" and gets
    a new empty mailbox: `new_account()` hands out such logins.

    The constructor prepares `root` (it must be reachable by the ``mail``
    user: not under pytest's 0700 ``tmp_path``) and picks the port; `start()`
    launches Dovecot in the foreground as a child of the test process, so it
    is always reaped, and `stop()` terminates it. `restart()` keeps the port
    and the mail.

    `tls` is a (certificate, key) pair of PEM files: Dovecot then offers
    STARTTLS on `port` and implicit TLS on `tls_port`. With
    `oauth2_introspection_url` (see `OAuth2IntrospectionServer`), logins by
    XOAUTH2 and OAUTHBEARER are checked against that endpoint. `extra_config`
    is appended to dovecot.conf as is (e.g. ``imap_capability = ...``).
    """

    def __init__(
        self,
        root: Path,
        users: Mapping[str, str],
        *,
        host: str = LOOPBACK,
        port: int | None = None,
        tls: tuple[Path, Path] | None = None,
        oauth2_introspection_url: str | None = None,
        extra_config: str = "",
    ):
        self.binary = find_dovecot()
        if os.geteuid() != 0:
            raise RigError("the Dovecot test server must run as root (it switches to the 'mail' user)")
        self.root = Path(root).resolve()
        self.host = host
        self._explicit_port = port is not None
        self.port = port if port is not None else free_port(host)
        self._passwords = dict(users)
        self.tls = (Path(tls[0]).resolve(), Path(tls[1]).resolve()) if tls is not None else None
        self._tls_port = free_port(host) if tls is not None else None
        self.oauth2_introspection_url = oauth2_introspection_url
        self.extra_config = extra_config
        self._token = uuid.uuid4().hex[:12]
        self._process: subprocess.Popen[bytes] | None = None
        self._prepare()

    # files

    @property
    def config_path(self) -> Path:
        return self.root / "dovecot.conf"

    @property
    def log_path(self) -> Path:
        return self.root / "dovecot.log"

    @property
    def tls_port(self) -> int:
        """The implicit-TLS (imaps) port; only with `tls`."""
        if self._tls_port is None:
            raise RigError("this Dovecot was made without tls=(cert, key): it has no imaps port")
        return self._tls_port

    def _prepare(self) -> None:
        for user, password in self._passwords.items():
            if not user or any(c in user + password for c in ":\n\r") or user.startswith(FRESH_PREFIX):
                raise ValueError(f"unusable Dovecot user {user!r}")
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # the auth worker, not root, reads ROOT/users
        self._check_reachable()
        mail_uid = pwd.getpwnam(MAIL_USER).pw_uid
        mail_gid = grp.getgrnam(MAIL_USER).gr_gid
        for name in ("run", "state", "mail", "home"):
            (self.root / name).mkdir(exist_ok=True)
        for name in ("mail", "home"):
            for path in _walk(self.root / name):
                os.chown(path, mail_uid, mail_gid, follow_symlinks=False)
        users = self.root / "users"
        users.write_text("".join(f"{u}:{{PLAIN}}{p}\n" for u, p in self._passwords.items()))
        users.chmod(0o644)
        self._write_config()

    def _write_config(self) -> None:
        ssl = _DOVECOT_SSL.format(cert=self.tls[0], key=self.tls[1]) if self.tls is not None else "ssl = no"
        oauth2 = self.oauth2_introspection_url is not None
        if oauth2:
            (self.root / "dovecot-oauth2.conf.ext").write_text(
                _DOVECOT_OAUTH2_CONF.format(url=self.oauth2_introspection_url)
            )
        self.config_path.write_text(
            _DOVECOT_CONF.format(
                root=self.root,
                host=self.host,
                port=self.port,
                tls_port=self._tls_port or 0,
                ssl=ssl,
                oauth2_mechanisms=" xoauth2 oauthbearer" if oauth2 else "",
                oauth2_passdb=_DOVECOT_OAUTH2_PASSDB.format(root=self.root) if oauth2 else "",
                extra=self.extra_config + "\n" if self.extra_config else "",
                greeting=self._greeting,
                fresh_prefix=FRESH_PREFIX,
                fresh_password=FRESH_PASSWORD,
            )
        )

    @property
    def _greeting(self) -> str:
        return f"mailflow-rig-{self._token}"

    def _check_reachable(self) -> None:
        for folder in self.root.parents:
            if not folder.stat().st_mode & stat.S_IXOTH:
                raise RigError(
                    f"Dovecot's processes run as other users and cannot enter {folder} (mode "
                    f"{stat.filemode(folder.stat().st_mode)}); put the root elsewhere, e.g. tempfile.mkdtemp()"
                )

    # lifecycle

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Launch Dovecot and return once it greets on `port`."""
        if self._process is not None:
            raise RigError(f"Dovecot on port {self.port} is already running")
        self._kill_stale()
        # A freshly picked port can be taken by another process before Dovecot
        # binds it; then pick another, but only before the port was ever used.
        attempts = 1 if self._explicit_port or self.log_path.exists() else 3
        for attempt in range(attempts):
            try:
                self._launch(timeout)
                return
            except RigError:
                if attempt + 1 == attempts or "Address already in use" not in self._log_tail():
                    raise
                self.port = free_port(self.host)
                if self._tls_port is not None:
                    self._tls_port = free_port(self.host)
                self._write_config()

    def _launch(self, timeout: float) -> None:
        on_main_thread = threading.current_thread() is threading.main_thread()
        with open(self.root / "dovecot.stderr", "ab") as stderr:
            self._process = subprocess.Popen(
                [self.binary, "-F", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                cwd=self.root,
                # A parent-death signal fires when the *thread* that started
                # the child ends, so only ask for it from the main thread.
                preexec_fn=_die_with_parent if on_main_thread else None,
                start_new_session=True,  # a Ctrl-C is for pytest, which then stops us
            )
        _running.add(self)
        deadline = time.monotonic() + timeout
        while True:
            code = self._process.poll()
            if code is not None:
                self._forget_process()
                raise RigError(f"Dovecot exited with status {code} while starting\n{self._log_tail()}")
            if self._greets():
                return
            if time.monotonic() >= deadline:
                self.stop()
                raise RigError(
                    f"Dovecot did not greet on {self.host}:{self.port} within {timeout:g} s\n{self._log_tail()}"
                )
            time.sleep(0.01)

    def _greets(self) -> bool:
        """Tell whether *this* instance answers with its IMAP greeting."""
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                greeting = sock.makefile("rb").readline()
                with contextlib.suppress(OSError):
                    sock.sendall(b"a LOGOUT\r\n")
        except OSError:
            return False
        return greeting.startswith(b"* OK") and self._greeting.encode() in greeting

    def stop(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Terminate Dovecot and wait until its processes are gone and the port is closed.

        A no-op when not running. The master (the pid in ``run/master.pid``)
        leads its own process group, and the whole group gets SIGTERM, the
        signal every Dovecot process shuts down cleanly on: connected clients
        get "* BYE". Once the master is the only process left, it only sits
        out a fixed one-second pause before exiting (its shutdown sleeps in
        case a child still holds a listener), so it is killed instead.
        """
        process = self._process
        if process is None:
            return
        try:
            group = process.pid
            _signal_group(group, signal.SIGTERM)
            started = time.monotonic()
            deadline = started + timeout
            while process.poll() is None:
                now = time.monotonic()
                if now >= deadline:
                    _signal_group(group, signal.SIGKILL)
                elif now - started > _MASTER_GRACE and not _group_alive(group, besides=group):
                    process.kill()
                time.sleep(0.005)
            while _group_alive(group) or _port_accepts(self.host, self.port):
                if time.monotonic() >= deadline:
                    _signal_group(group, signal.SIGKILL)
                    raise RigError(f"Dovecot processes still run, or port {self.port} still accepts, after stop()")
                time.sleep(0.005)
        finally:
            self._forget_process()

    def _forget_process(self) -> None:
        self._process = None
        _running.discard(self)

    def restart(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Stop and start again on the same port; mail and UIDVALIDITY survive."""
        self.stop(timeout)
        self.start(timeout)

    def _kill_stale(self) -> None:
        """Stop a Dovecot left running on this root by a test run that died."""
        pid_file = self.root / "run" / "master.pid"
        try:
            pid = int(pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return
        if str(self.config_path).encode() not in cmdline:
            return  # the pid was reused by something else
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + DEFAULT_TIMEOUT
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.01)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _log_tail(self, lines: int = 20) -> str:
        parts = []
        for path in (self.root / "dovecot.stderr", self.log_path):
            with contextlib.suppress(OSError):
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                if tail:
                    parts.append(f"--- tail of {path}\n" + "\n".join(tail))
        return "\n".join(parts) or f"(nothing logged in {self.root})"

    # accounts and mail

    @property
    def users(self) -> dict[str, str]:
        """Every login known so far and its password."""
        return dict(self._passwords)

    def account(self, user: str) -> ImapAccount:
        """The account of a known `user`."""
        return ImapAccount(self, user, self._password(user))

    def new_account(self, domain: str = "example.org") -> ImapAccount:
        """A login never used before: its mailbox is empty, with only INBOX."""
        user = f"{FRESH_PREFIX}{uuid.uuid4().hex[:10]}@{domain}"
        self._passwords[user] = FRESH_PASSWORD
        return ImapAccount(self, user, FRESH_PASSWORD)

    def _password(self, user: str) -> str:
        try:
            return self._passwords[user]
        except KeyError:
            raise KeyError(f"{user!r} is not a user of this Dovecot") from None

    def client(self, user: str, timeout: float = DEFAULT_TIMEOUT) -> IMAPClient:
        """A new IMAPClient logged in as `user`; the caller logs out."""
        client = IMAPClient(self.host, port=self.port, ssl=False, timeout=timeout)
        try:
            client.login(user, self._password(user))
        except BaseException:
            with contextlib.suppress(Exception):
                client.shutdown()
            raise
        return client

    def append(self, user: str, folder: str, raw: bytes, flags: Iterable[str | bytes] = ()) -> int | None:
        """Append `raw` to `folder` of `user` (creating the folder if needed).

        Returns the new message's UID from Dovecot's APPENDUID reply.
        """
        with self.client(user) as client:
            if not client.folder_exists(folder):
                client.create_folder(folder)
            reply = client.append(folder, raw, flags=tuple(flags))
        return _appended_uid(reply)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<DovecotServer {self.host}:{self.port} {state} root={self.root}>"


def _appended_uid(reply: bytes | str) -> int | None:
    """The UID of an ``[APPENDUID <validity> <uid>]`` reply, if there is one."""
    text = reply.decode("ascii", "replace") if isinstance(reply, bytes) else reply
    if not text.startswith("[APPENDUID "):
        return None
    words = text[1:].split("]", 1)[0].split()
    return int(words[2]) if len(words) == 3 and words[2].isdigit() else None


def _signal_group(group: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signum)


def _group_alive(group: int, besides: int | None = None) -> bool:
    """Tell whether a process of `group`, other than `besides`, still runs.

    Zombies do not count: a child the master did not reap is left to pid 1,
    which in some containers never reaps anything.
    """
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        if stat_file.parent.name == str(besides):
            continue
        try:
            # pid (comm) state ppid pgrp ...; comm may contain spaces and parentheses.
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(group) and fields[0] != "Z":
            return True
    return False


def _walk(top: Path) -> Iterator[Path]:
    """`top` and everything below it, without following symbolic links."""
    yield top
    for folder, dirs, files in os.walk(top):
        for name in dirs + files:
            yield Path(folder) / name
