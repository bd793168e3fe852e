"""Incoming mail: an IMAP adapter and its local twin (a maildir folder).

A :class:`Mailbox` opens a :class:`Session` on the watched folder. A session
lists UIDs, fetches messages without touching their flags (people read this
mailbox too: the store, never ``\\Seen``, says what was processed) and moves
processed messages aside. Everything a message is known by is the triple
(folder, UIDVALIDITY, UID); deciding what is new is the engine's job.

Every failure to talk to the server is a :class:`MailboxError` whose message
says what failed and what to do; a message that vanished between SEARCH and
FETCH is not a failure, it is simply not yielded.
"""

from __future__ import annotations

import json
import logging
import mailbox
import os
import re
import secrets
import ssl
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from imapclient import IMAPClient
from imapclient.exceptions import CapabilityError, IMAPClientAbortError, IMAPClientError, LoginError

from mailflow.auth import OAuth2TokenError, oauth2_token
from mailflow.config import DEFAULT_PROCESSED_FOLDER, ImapSettings
from mailflow.errors import MailflowError

log = logging.getLogger(__name__)

#: Messages per FETCH command: few round trips, bounded memory per reply.
SIZE_BATCH = 1000  # messages whose sizes one FETCH asks for (a command line of a few KB)
FETCH_BATCH = 50
#: Without IDLE, how often ``wait_for_change`` asks the server with NOOP.
NOOP_POLL_SECONDS = 2.0
#: The local twin's files, inside the maildir folder it reads.
UIDVALIDITY_FILE = ".mailflow-uidvalidity"
UIDS_FILE = ".mailflow-uids"
#: How often the local twin looks at its folder while waiting for a change.
MAILDIR_POLL_SECONDS = 0.1

_DELETED = rb"\Deleted"
_KEY_TIME_RE = re.compile(r"^(\d+)(?:\.M(\d+))?")


@dataclass(frozen=True)
class Fetched:
    """One message as read from a folder.

    ``raw`` is empty when the message was larger than the limit given to
    ``fetch``; ``size`` is then the size the server announced, so the caller
    can record the message as too large without downloading it.
    """

    folder: str
    uidvalidity: int
    uid: int
    raw: bytes
    size: int

    @property
    def too_large(self) -> bool:
        """Not downloaded: larger than the limit given to ``fetch``."""
        return not self.raw and bool(self.size)


class MailboxError(MailflowError):
    """The mailbox cannot be reached, refused the login, or failed a command.

    The message says what failed and what to do about it. After one, close
    the session and open a new one: the connection may be gone.
    """


class Session(Protocol):
    """The watched folder, opened: list, fetch and move messages by UID."""

    folder: str
    uidvalidity: int

    def uids(self) -> list[int]:
        """Every UID in the folder now, ascending."""
        ...

    def uids_after(self, last_uid: int) -> list[int]:
        """The UIDs greater than ``last_uid``, ascending."""
        ...

    def fetch(self, uids: Sequence[int], max_bytes: int) -> Iterator[Fetched]:
        """The messages with these UIDs, in ascending UID order, never marking them seen."""
        ...

    def move(self, uids: Sequence[int], target: str) -> None:
        """Move messages to the folder ``target``, created if missing."""
        ...

    def close(self) -> None: ...


class Mailbox(Protocol):
    """Something that can open a :class:`Session` on the watched folder."""

    name: str

    def open(self) -> Session:
        """Connect and select the watched folder; raises :class:`MailboxError`."""
        ...


# --------------------------------------------------------------------------
# Folder names (pure)
# --------------------------------------------------------------------------


def server_folder_name(name: str, separator: str | None, prefix: str = "") -> str:
    """The name of folder ``name`` on a server with this hierarchy separator and personal prefix.

    Configuration writes nested folders with "/" (``Archive/mailflow``); a
    server whose separator is "." (Dovecot with maildir, Courier) gets
    ``Archive.mailflow``. A name mixing "/" and the server's own separator
    is refused rather than guessed. A personal namespace prefix (``INBOX.``
    on Courier and some Cyrus servers) is put in front when missing, since
    such servers create nothing outside it. INBOX is INBOX everywhere.
    """
    name = name.strip()
    if not name:
        raise ValueError("a folder name may not be empty")
    if name.upper() == "INBOX":
        return "INBOX"
    if "/" in name and separator != "/":
        if separator is None:
            raise ValueError(f"folder {name!r}: this server has no folder hierarchy, so '/' cannot nest folders")
        if separator in name:
            raise ValueError(
                f"folder {name!r} uses both '/' and the server's separator {separator!r}; write it with one of them"
            )
        name = name.replace("/", separator)
    if prefix and not name.startswith(prefix) and not name.upper().startswith("INBOX" + (separator or "")):
        name = prefix + name
    return name


# --------------------------------------------------------------------------
# IMAP
# --------------------------------------------------------------------------


class ImapMailbox:
    """The IMAP inbox the replies come back to, over imapclient.

    ``security`` is ``none``, ``starttls`` or ``ssl``; certificates are always
    verified, against ``ca_file`` when given (a private server) or the
    system's trust store. Login is by password, or by XOAUTH2 with the token
    ``oauth2_token_command`` prints.
    """

    name = "imap"

    def __init__(self, settings: ImapSettings) -> None:
        self.settings = settings
        self.processed_folder = settings.processed_folder

    @property
    def where(self) -> str:
        return f"IMAP server {self.settings.host}:{self.settings.port}"

    def open(self) -> ImapSession:
        client = self._connect()
        try:
            self._login(client)
            session = self._select(client)
        except BaseException:
            _shutdown(client)
            raise
        return session

    def _ssl_context(self) -> ssl.SSLContext:
        ca_file = self.settings.ca_file
        try:
            return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise MailboxError(f"cannot read the CA file {ca_file}: {exc}; check mail.imap.ca_file") from exc

    def _connect(self) -> IMAPClient:
        s = self.settings
        context = self._ssl_context() if s.security in ("ssl", "starttls") else None
        try:
            client = IMAPClient(s.host, port=s.port, ssl=s.security == "ssl", ssl_context=context, timeout=s.timeout)
        except ssl.SSLCertVerificationError as exc:
            raise MailboxError(_untrusted(self.where, exc)) from exc
        except (OSError, IMAPClientError) as exc:
            raise MailboxError(
                f"cannot connect to {self.where}: {_reason(exc)}; check mail.imap.host, port and security, "
                "and that the server is running"
            ) from exc
        if s.security == "starttls":
            try:
                client.starttls(context)
            except CapabilityError as exc:
                _shutdown(client)
                raise MailboxError(
                    f"{self.where} does not offer STARTTLS; set mail.imap.security to ssl (port 993) or none"
                ) from exc
            except ssl.SSLCertVerificationError as exc:
                _shutdown(client)
                raise MailboxError(_untrusted(self.where, exc)) from exc
            except (OSError, IMAPClientError) as exc:
                _shutdown(client)
                raise MailboxError(f"STARTTLS with {self.where} failed: {_reason(exc)}") from exc
        return client

    def _login(self, client: IMAPClient) -> None:
        s = self.settings
        if not s.username:
            raise MailboxError(f"no login for {self.where}: set mail.imap.username")
        try:
            if s.oauth2_token_command:
                token = oauth2_token(s.oauth2_token_command, s.timeout, setting="mail.imap.oauth2_token_command")
                client.oauth2_login(s.username, token)
            else:
                client.login(s.username, s.password or "")
        except OAuth2TokenError as exc:
            raise MailboxError(str(exc)) from exc
        except LoginError as exc:
            check = (
                "check mail.imap.username and mail.imap.oauth2_token_command (is the token valid for IMAP?)"
                if s.oauth2_token_command
                else "check mail.imap.username and mail.imap.password"
            )
            raise MailboxError(f"{self.where} rejected the login of {s.username}: {_reason(exc)}; {check}") from exc
        except (OSError, IMAPClientError) as exc:
            raise MailboxError(f"login to {self.where} as {s.username} failed: {_reason(exc)}") from exc

    def _select(self, client: IMAPClient) -> ImapSession:
        s = self.settings
        try:
            capabilities = frozenset(c.decode("ascii", "replace").upper() for c in client.capabilities())
            separator, prefix = _hierarchy(client, capabilities)
        except (OSError, IMAPClientError) as exc:
            raise MailboxError(f"{self.where} failed to list its folders: {_reason(exc)}") from exc
        try:
            folder = server_folder_name(s.folder, separator, prefix)
        except ValueError as exc:
            raise MailboxError(f"{exc}; check mail.imap.folder") from exc
        try:
            selected = client.select_folder(folder)
        except IMAPClientAbortError as exc:
            raise MailboxError(f"connection to {self.where} lost while opening {folder}: {_reason(exc)}") from exc
        except IMAPClientError as exc:
            raise MailboxError(
                f"{self.where} cannot open folder {folder!r} of {s.username}: {_reason(exc)}; check mail.imap.folder"
            ) from exc
        except OSError as exc:
            raise MailboxError(f"connection to {self.where} lost while opening {folder}: {exc}") from exc
        uidvalidity = selected.get(b"UIDVALIDITY")
        if not isinstance(uidvalidity, int):
            raise MailboxError(f"{self.where} gave no UIDVALIDITY for {folder!r}: it cannot be used as an inbox")
        return ImapSession(
            client,
            folder="INBOX" if folder == "INBOX" else s.folder.strip(),
            server_folder=folder,
            uidvalidity=uidvalidity,
            capabilities=capabilities,
            separator=separator,
            prefix=prefix,
            where=self.where,
        )


class ImapSession:
    """The watched folder, selected read-write on one IMAP connection.

    ``folder`` is the name as configured (what the store keys messages by);
    ``server_folder`` is the server's name for it, after translating "/" to
    the server's separator and adding its personal namespace prefix.
    """

    def __init__(
        self,
        client: IMAPClient,
        *,
        folder: str,
        server_folder: str,
        uidvalidity: int,
        capabilities: frozenset[str],
        separator: str | None,
        prefix: str,
        where: str,
    ) -> None:
        self.folder = folder
        self.uidvalidity = uidvalidity
        self.server_folder = server_folder
        self.capabilities = capabilities
        self.separator = separator
        self.prefix = prefix
        self._client = client
        self._where = where
        # SELECT's EXISTS is the folder as it was opened: news only from here on.
        self._told_of_new_messages()

    @contextmanager
    def _command(self, what: str) -> Iterator[None]:
        """Turn what imapclient and the socket raise into one clear MailboxError."""
        try:
            yield
        except (IMAPClientAbortError, OSError) as exc:
            raise MailboxError(
                f"connection to {self._where} lost while {what}: {_reason(exc)}; the next run reconnects"
            ) from exc
        except IMAPClientError as exc:
            raise MailboxError(f"{self._where} failed {what}: {_reason(exc)}") from exc

    def uids(self) -> list[int]:
        with self._command(f"listing the messages of {self.server_folder}"):
            found = self._client.search(["ALL"])
        self._told_of_new_messages()  # what the server told of so far, this SEARCH has found
        return sorted(int(uid) for uid in found)

    def uids_after(self, last_uid: int) -> list[int]:
        # RFC 3501: "n:*" always includes the message with the highest UID,
        # even when that UID is below n, hence the filter.
        with self._command(f"searching {self.server_folder} for new messages"):
            found = self._client.search(["UID", f"{max(last_uid, 0) + 1}:*"])
        self._told_of_new_messages()  # what the server told of so far, this SEARCH has found
        return sorted(uid for uid in (int(u) for u in found) if uid > last_uid)

    def _told_of_new_messages(self) -> bool:
        """True if the server told of new messages (EXISTS) since the last call; forgets that it did.

        A message that arrives while a pass reads the inbox, after its SEARCH, is told in the
        answer to a later command (a FETCH, the MOVE), once: imaplib keeps the EXISTS no command
        asked for, and the next NOOP or IDLE would not tell it again."""
        imap = self._client._imap
        for notice in ("EXPUNGE", "RECENT"):
            imap.response(notice)  # kept by imaplib too, never used: they would pile up for as long as we run
        _, data = imap.response("EXISTS")
        return bool(data != [None])

    def fetch(self, uids: Sequence[int], max_bytes: int) -> Iterator[Fetched]:
        wanted = sorted(set(uids))
        for start in range(0, len(wanted), SIZE_BATCH):
            chunk = wanted[start : start + SIZE_BATCH]
            # The sizes first, many at a time (a few bytes each), so nothing over the limit is downloaded.
            with self._command(f"reading messages of {self.server_folder}"):
                sizes = self._client.fetch(chunk, [b"RFC822.SIZE"])
            for first in range(0, len(chunk), FETCH_BATCH):
                yield from self._fetch_batch(chunk[first : first + FETCH_BATCH], sizes, max_bytes)

    def _fetch_batch(self, batch: list[int], sizes: Mapping[int, Any], max_bytes: int) -> Iterator[Fetched]:
        small = [uid for uid in batch if uid in sizes and _size(sizes[uid]) <= max_bytes]
        bodies: dict[int, Any] = {}
        if small:
            with self._command(f"reading messages of {self.server_folder}"):
                # BODY.PEEK, never BODY or RFC822: reading must not set \Seen.
                bodies = self._client.fetch(small, [b"BODY.PEEK[]"])
        for uid in batch:
            if uid not in sizes:
                continue  # expunged by someone else since the SEARCH
            size = _size(sizes[uid])
            if size > max_bytes:
                yield Fetched(self.folder, self.uidvalidity, uid, b"", size)
                continue
            raw = bodies.get(uid, {}).get(b"BODY[]")
            if not isinstance(raw, bytes):
                continue  # expunged between the two FETCHes (Dovecot answers NIL)
            yield Fetched(self.folder, self.uidvalidity, uid, raw, len(raw))

    def move(self, uids: Sequence[int], target: str) -> None:
        wanted = sorted(set(uids))
        if not wanted:
            return
        try:
            name = server_folder_name(target, self.separator, self.prefix)
        except ValueError as exc:
            raise MailboxError(f"{exc}; check mail.imap.processed_folder") from exc
        if name == self.server_folder:
            raise MailboxError(f"cannot move messages of {name!r} into itself; check mail.imap.processed_folder")
        self._ensure_folder(name)
        try:
            self._transfer(wanted, name)
        except IMAPClientError as exc:
            problem = str(exc).upper()
            if isinstance(exc, IMAPClientAbortError) or not ("TRYCREATE" in problem or "EXPUNGEISSUED" in problem):
                raise MailboxError(f"{self._where} failed moving messages to {name}: {_reason(exc)}") from exc
            if "EXPUNGEISSUED" in problem:
                # A person expunged one of them from another session meanwhile, and the server refused the whole
                # MOVE (RFC 5530): a NOOP brings this session up to date, and a UID no longer there is ignored.
                with self._command("catching up with the folder"):
                    self._client.noop()
            else:
                # Deleted by someone between our LIST and the MOVE: create it again.
                self._ensure_folder(name)
            with self._command(f"moving messages to {name}"):
                self._transfer(wanted, name)
        except OSError as exc:
            raise MailboxError(f"connection to {self._where} lost while moving messages to {name}: {exc}") from exc

    def _ensure_folder(self, name: str) -> None:
        with self._command(f"looking for folder {name}"):
            if self._client.folder_exists(name):
                return
        try:
            self._client.create_folder(name)
        except IMAPClientAbortError as exc:
            raise MailboxError(f"connection to {self._where} lost while creating folder {name}: {exc}") from exc
        except IMAPClientError as exc:
            with self._command(f"looking for folder {name}"):
                if self._client.folder_exists(name):
                    return  # created meanwhile by someone else
            raise MailboxError(
                f"{self._where} cannot create folder {name!r}: {_reason(exc)}; "
                "create it by hand or check mail.imap.processed_folder"
            ) from exc
        except OSError as exc:
            raise MailboxError(f"connection to {self._where} lost while creating folder {name}: {exc}") from exc
        log.info("created folder %s on %s", name, self._where)
        try:
            self._client.subscribe_folder(name)  # so people's mail clients show it
        except IMAPClientError as exc:
            if isinstance(exc, IMAPClientAbortError):
                raise MailboxError(f"connection to {self._where} lost while subscribing {name}: {exc}") from exc
            log.warning("could not subscribe to %s on %s: %s", name, self._where, _reason(exc))

    def _transfer(self, uids: list[int], name: str) -> None:
        """MOVE where the server has it; otherwise COPY, flag \\Deleted and expunge only these UIDs."""
        if "MOVE" in self.capabilities:
            self._client.move(uids, name)
            return
        self._client.copy(uids, name)
        self._client.add_flags(uids, [_DELETED], silent=True)
        if "UIDPLUS" in self.capabilities:
            self._client.uid_expunge(uids)
            return
        # A plain EXPUNGE would also destroy every message someone else marked
        # \Deleted in this folder (a person's "delete" in some mail clients),
        # so without UID EXPUNGE the originals stay, flagged, for a person to purge.
        log.warning(
            "%s has neither MOVE nor UIDPLUS: %d message(s) copied to %s and left in %s flagged \\Deleted, "
            "not expunged; purge the folder from a mail client when convenient",
            self._where,
            len(uids),
            name,
            self.server_folder,
        )

    def wait_for_change(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for new or removed messages; True when there were some.

        Uses IDLE when the server has it, otherwise NOOP every few seconds.
        Raises :class:`MailboxError` when the connection is lost meanwhile.
        """
        deadline = time.monotonic() + max(timeout, 0.0)
        if self._told_of_new_messages():
            return True  # during the last pass, after its SEARCH
        try:
            if "IDLE" not in self.capabilities:
                return self._poll_for_change(deadline)
            return self._idle_for_change(deadline)
        finally:
            self._told_of_new_messages()  # what this wait was told, it reports now: not again next time

    def _idle_for_change(self, deadline: float) -> bool:
        with self._command(f"waiting for new messages in {self.server_folder}"):
            # What arrived since the last command is told on the next one. Were
            # that IDLE, the news would come in the same packet as its "+ idling"
            # and sit unseen in imaplib's read buffer while the socket is polled.
            _, responses = self._client.noop()
            if _mailbox_changed(responses):
                return True
            while True:
                self._client.idle()
                try:
                    if _input_waiting(self._client):
                        # News in the same packet as "+ idling" (a message that arrived
                        # between the NOOP and the IDLE): it is in imaplib's buffer, where
                        # idle_check, which polls the socket, would leave it until the
                        # deadline. idle_done reads it, with the end of IDLE.
                        responses = []
                    else:
                        responses = self._client.idle_check(timeout=max(deadline - time.monotonic(), 0.0))
                finally:
                    # Raises when the connection is gone: idle_check itself
                    # returns [] on end-of-file, just as on a timeout.
                    _, more = self._client.idle_done()
                responses = list(responses) + list(more)
                if _connection_closing(responses):
                    raise IMAPClientAbortError("the server ended the connection (BYE)")
                if _mailbox_changed(responses):
                    return True
                if time.monotonic() >= deadline:
                    return False

    def _poll_for_change(self, deadline: float) -> bool:
        with self._command(f"waiting for new messages in {self.server_folder}"):
            while True:
                _, responses = self._client.noop()
                if _mailbox_changed(responses):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                time.sleep(min(NOOP_POLL_SECONDS, remaining))

    def close(self) -> None:
        try:
            self._client.logout()
        except (OSError, IMAPClientError):
            _shutdown(self._client)


def _input_waiting(client: IMAPClient) -> bool:
    """True when bytes from the server are already there to read: in imaplib's buffer, in the TLS
    layer's or in the socket's. Never blocks."""
    sock = client.socket()
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        # peek returns what is buffered, else what one non-blocking read gets.
        return bool(client._imap.file.peek(1))
    except (BlockingIOError, ssl.SSLWantReadError):
        return False
    finally:
        sock.settimeout(timeout)


def _hierarchy(client: IMAPClient, capabilities: frozenset[str]) -> tuple[str | None, str]:
    """The hierarchy separator and personal namespace prefix of the server."""
    if "NAMESPACE" in capabilities:
        personal = client.namespace().personal
        if personal:
            prefix, separator = personal[0]
            return (str(separator) if separator else None), str(prefix or "")
    # LIST "" "" answers with the separator alone (RFC 3501 6.3.8).
    listed = client.list_folders("", "")
    if listed:
        delimiter = listed[0][1]
        if isinstance(delimiter, bytes):
            delimiter = delimiter.decode("ascii", "replace")
        return (str(delimiter) if delimiter else None), ""
    return None, ""


def _size(item: Any) -> int:
    value = item.get(b"RFC822.SIZE", 0) if isinstance(item, dict) else 0
    return int(value) if isinstance(value, int) else 0


def _mailbox_changed(responses: Sequence[Any]) -> bool:
    for response in responses:
        if isinstance(response, tuple) and len(response) >= 2 and response[1] in (b"EXISTS", b"EXPUNGE", b"RECENT"):
            return True
    return False


def _connection_closing(responses: Sequence[Any]) -> bool:
    return any(isinstance(r, tuple) and r and r[0] == b"BYE" for r in responses)


def _reason(exc: BaseException) -> str:
    """The server's or the system's words, without imapclient's "command failed:" noise."""
    text = str(exc).strip()
    text = re.sub(r"^[a-z]+ failed: ", "", text)  # imapclient's "select failed: "
    quoted = re.fullmatch(r"b(['\"])(.*)\1", text)  # imaplib hands over the server's words as bytes
    if quoted:
        text = quoted.group(2)
    text = re.sub(r"\s*\(\d+\.\d+ \+ \d+\.\d+( \+ \d+\.\d+)? secs\)\.?$", "", text)  # Dovecot's timings
    return text.rstrip(".") or type(exc).__name__


def _untrusted(where: str, exc: ssl.SSLCertVerificationError) -> str:
    return (
        f"the TLS certificate of {where} is not trusted ({exc.verify_message or exc.reason}); "
        "set mail.imap.ca_file to the CA that signed it, or check mail.imap.host"
    )


def _shutdown(client: IMAPClient) -> None:
    with suppress(OSError, IMAPClientError):
        client.shutdown()


# --------------------------------------------------------------------------
# The local twin: a maildir folder
# --------------------------------------------------------------------------


class MaildirMailbox:
    """A maildir folder read like an IMAP inbox, for the embedded local transport.

    A maildir has no UIDs, so the twin keeps them: ``.mailflow-uids`` maps
    each message's maildir key to an integer handed out once, in delivery
    order, never reused; ``.mailflow-uidvalidity`` holds a random number
    made when the folder is first opened. A folder deleted and made again
    gets a new UIDVALIDITY, as on an IMAP server. One mailflow process is
    expected to read a folder at a time.
    """

    name = "local"

    def __init__(self, path: Path, processed_folder: str = DEFAULT_PROCESSED_FOLDER) -> None:
        self.path = Path(path)
        self.processed_folder = processed_folder

    def open(self) -> MaildirSession:
        try:
            for sub in ("tmp", "new", "cur"):
                (self.path / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
            folder = mailbox.Maildir(self.path, create=False)
            uidvalidity = _uidvalidity(self.path / UIDVALIDITY_FILE)
        except OSError as exc:
            raise MailboxError(f"cannot open the local inbox {self.path}: {exc}; check mail.local.inbox") from exc
        return MaildirSession(folder, self.path, uidvalidity)


class MaildirSession:
    """The local inbox, opened."""

    folder = "INBOX"

    def __init__(self, maildir: mailbox.Maildir, path: Path, uidvalidity: int) -> None:
        self.uidvalidity = uidvalidity
        self.path = path
        self._maildir = maildir
        self._seen_keys: frozenset[str] = frozenset()
        self._by_uid: dict[int, str] = {}
        self._refresh()

    def _refresh(self) -> dict[int, str]:
        """Give every message a UID, persist the table, return {uid: key}."""
        try:
            keys = set(self._maildir.keys())
            state = _read_uids(self.path / UIDS_FILE)
            known: dict[str, int] = {k: v for k, v in state["uids"].items() if k in keys}
            next_uid = int(state["next"])
            for key in sorted(keys - known.keys(), key=_delivery_order):
                known[key] = next_uid
                next_uid += 1
            if known != state["uids"] or next_uid != state["next"]:
                _write_json(self.path / UIDS_FILE, {"next": next_uid, "uids": known})
        except OSError as exc:
            raise MailboxError(f"cannot read the local inbox {self.path}: {exc}") from exc
        self._seen_keys = frozenset(keys)
        self._by_uid = {uid: key for key, uid in known.items()}
        return self._by_uid

    def uids(self) -> list[int]:
        return sorted(self._refresh())

    def uids_after(self, last_uid: int) -> list[int]:
        return [uid for uid in self.uids() if uid > last_uid]

    def fetch(self, uids: Sequence[int], max_bytes: int) -> Iterator[Fetched]:
        by_uid = self._refresh()
        for uid in sorted(set(uids)):
            key = by_uid.get(uid)
            if key is None:
                continue
            try:
                raw = self._maildir.get_bytes(key)
            except (KeyError, FileNotFoundError):
                continue  # removed since the listing
            except OSError as exc:
                raise MailboxError(f"cannot read a message of the local inbox {self.path}: {exc}") from exc
            if len(raw) > max_bytes:
                yield Fetched(self.folder, self.uidvalidity, uid, b"", len(raw))
            else:
                yield Fetched(self.folder, self.uidvalidity, uid, raw, len(raw))

    def move(self, uids: Sequence[int], target: str) -> None:
        """Move into the sub-folder ``target`` (Maildir++: ``.target`` inside this folder).

        The bytes are kept exactly; maildir flags are not carried over.
        """
        name = target.strip().replace("/", ".")
        if not name or name.startswith(".") or name.endswith(".") or ".." in name or "\\" in name:
            raise MailboxError(f"{target!r} cannot name a maildir folder; check the processed folder setting")
        by_uid = self._refresh()
        try:
            destination = self._maildir.get_folder(name) if name in self._maildir.list_folders() else None
            if destination is None:
                destination = self._maildir.add_folder(name)
            for uid in sorted(set(uids)):
                key = by_uid.get(uid)
                if key is None:
                    continue
                try:
                    raw = self._maildir.get_bytes(key)
                except (KeyError, FileNotFoundError):
                    continue
                destination.add(raw)
                self._maildir.discard(key)
        except OSError as exc:
            raise MailboxError(f"cannot move messages to {name} in the local inbox {self.path}: {exc}") from exc
        self._refresh()

    def wait_for_change(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for messages added or removed since the last listing."""
        deadline = time.monotonic() + max(timeout, 0.0)
        before = self._seen_keys
        while True:
            try:
                now = frozenset(self._maildir.keys())
            except OSError as exc:
                raise MailboxError(f"cannot read the local inbox {self.path}: {exc}") from exc
            if now != before:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(MAILDIR_POLL_SECONDS, remaining))

    def close(self) -> None:
        return None


def _delivery_order(key: str) -> tuple[int, int, str]:
    """Maildir keys start with the delivery time: ``1700000000.M123P45Q6.host``, M being microseconds."""
    match = _KEY_TIME_RE.match(key)
    if match is None:
        return 2**63, 0, key
    return int(match.group(1)), int(match.group(2) or 0), key


def _uidvalidity(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except FileNotFoundError:
        pass
    except ValueError as exc:
        raise OSError(f"{path} does not hold a number; delete it to start the folder's UIDs afresh") from exc
    value = secrets.randbelow(2**31 - 2) + 1  # IMAP's nz-number range, like a server would pick
    _write_text(path, f"{value}\n")
    return value


def _read_uids(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {"next": 1, "uids": {}}
    except ValueError as exc:
        raise OSError(f"{path} is damaged ({exc}); delete it and {UIDVALIDITY_FILE} together to start afresh") from exc
    uids = data.get("uids") if isinstance(data, dict) else None
    if not isinstance(uids, dict) or not isinstance(data.get("next"), int):
        raise OSError(f"{path} is damaged; delete it and {UIDVALIDITY_FILE} together to start afresh")
    return {"next": data["next"], "uids": {str(k): int(v) for k, v in uids.items()}}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    _write_text(path, json.dumps(data, sort_keys=True) + "\n")


def _write_text(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
