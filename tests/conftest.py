"""Fixtures of the test rig: real SMTP and IMAP servers on loopback.

- `smtp_server`: a started `SmtpServer`, new for each test.
- `make_smtp_server(auth=...)`: more SMTP servers, e.g. one requiring AUTH.
- `dovecot`: the Dovecot shared by the whole session, with the users
  ts@example.org and other@example.org (password "secret"). Their mail
  accumulates across tests; do not stop this server (use `make_dovecot`).
- `imap_account`: an account of `dovecot` created for this test only, so its
  mailbox starts empty (just INBOX). Each test gets a new login rather than
  a cleaned-up shared one: nothing a previous test did (folders, flags,
  UIDs, a client left logged in) can leak in, and nothing needs deleting.
- `make_dovecot(users=...)`: a private Dovecot for tests that stop, restart or
  break it; stopped and deleted at teardown.

After each test, handlers it added to the root logger are removed (`_restore_logging`).

The Dovecot fixtures fail, rather than skip, when Dovecot is not installed:
a test run that silently skipped the IMAP tests would prove nothing.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from tests.servers import DovecotServer, ImapAccount, SmtpServer

DOVECOT_USERS = {"ts@example.org": "secret", "other@example.org": "secret"}


@pytest.fixture(autouse=True)
def _no_shared_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never read or write the user's real cache folder (tests of the cache name their own)."""
    monkeypatch.setenv("MAILFLOW_CACHE", "off")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Remove the root-logger handlers a test added and restore its level.

    A test that runs the CLI in-process leaves a handler writing to pytest's
    captured stderr, which is closed after the test; the SMTP server's thread
    keeps logging, and each later record would print "--- Logging error ---".
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    with SmtpServer() as server:
        yield server


@pytest.fixture
def make_smtp_server() -> Iterator[Callable[..., SmtpServer]]:
    """A factory of started SMTP servers; its arguments are `SmtpServer`'s."""
    servers: list[SmtpServer] = []

    def make(*, auth: Mapping[str, str] | None = None) -> SmtpServer:
        server = SmtpServer(auth=auth)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()


def _dovecot_root() -> Path:
    # Not under pytest's tmp_path: that tree is mode 0700 and Dovecot's
    # processes, which run as other users, must be able to enter the root.
    return Path(tempfile.mkdtemp(prefix="mailflow-dovecot-"))


@pytest.fixture(scope="session")
def dovecot() -> Iterator[DovecotServer]:
    root = _dovecot_root()
    try:
        with DovecotServer(root, DOVECOT_USERS) as server:
            yield server
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def imap_account(dovecot: DovecotServer) -> ImapAccount:
    if not dovecot.running:  # a test stopped the shared server despite the advice
        dovecot.start()
    return dovecot.new_account()


@pytest.fixture
def make_dovecot() -> Iterator[Callable[..., DovecotServer]]:
    """A factory of started private Dovecot servers (default users: `DOVECOT_USERS`)."""
    made: list[DovecotServer] = []

    def make(users: Mapping[str, str] | None = None) -> DovecotServer:
        root = _dovecot_root()
        try:
            server = DovecotServer(root, DOVECOT_USERS if users is None else users)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        made.append(server)
        server.start()
        return server

    yield make
    for server in made:
        try:
            server.stop()
        finally:
            shutil.rmtree(server.root, ignore_errors=True)
