"""Secrets stay secret: passwords and OAuth2 tokens never reach a log, an error, ``status``, a digest or ``--debug``.

The logins fail on purpose, against the real servers: aiosmtpd with AUTH (a wrong password, a
wrong bearer token) and Dovecot (a wrong password; a private Dovecot checking tokens with a
loopback introspection endpoint for XOAUTH2). Everything mailflow then writes down is searched
for the secrets, raw and in the encodings a protocol trace would carry them (SASL PLAIN and
XOAUTH2 base64). The store, which holds the fingerprint key and every message received, must be
created readable by its owner only.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from mailflow.clock import FixedClock
from mailflow.config import Config, load_config
from mailflow.engine import Engine
from mailflow.errors import MailflowError
from mailflow.history import export_json, history_rows
from mailflow.mailbox import ImapMailbox
from mailflow.report import format_status_table
from mailflow.sender import SmtpTransport
from mailflow.store import Store
from tests.helpers import ROOT, example_data, write_config
from tests.servers import DovecotServer, OAuth2IntrospectionServer, SmtpServer

pytestmark = pytest.mark.servers

USER = "ts@example.org"
SMTP_PASSWORD = "Smtp-S3cret-never-logged-7f1c"
IMAP_PASSWORD = "Imap-S3cret-never-logged-2b9d"
TOKEN = "ya29.Token-S3cret-never-logged-5e0a"
GOOD_TOKEN = "ya29.the-one-the-servers-accept"
OPENS = datetime(2017, 10, 18, 16, 0, tzinfo=UTC)
DIGEST_AT = datetime(2017, 10, 19, 14, 0, tzinfo=UTC)  # 08:00 in Costa Rica: a digest is due


def forms(secret: str) -> list[str]:
    """The secret as it could leak: as is, and inside SASL PLAIN, LOGIN and XOAUTH2 exchanges (base64)."""
    encoded = [
        f"\0{USER}\0{secret}",
        secret,
        f"user={USER}\x01auth=Bearer {secret}\x01\x01",
    ]
    return [secret] + [base64.b64encode(text.encode()).decode() for text in encoded]


def assert_no_secret(text: str, where: str, secrets: tuple[str, ...] = (SMTP_PASSWORD, IMAP_PASSWORD, TOKEN)) -> None:
    for secret in secrets:
        for form in forms(secret):
            assert form not in text, f"{where} holds the secret {secret!r} (as {form!r})"


def config_data(
    tmp_path: Path, server: SmtpServer, imap_port: int, *, smtp: dict[str, str], imap: dict[str, str]
) -> dict[str, Any]:
    data = example_data()
    data["store"] = str(tmp_path / "mailflow.db")
    data["mail"] = {
        "transport": "smtp",
        "smtp": {"host": server.host, "port": server.port, "security": "none", "timeout": 5, "username": USER, **smtp},
        "imap": {
            "host": "127.0.0.1",
            "port": imap_port,
            "security": "none",
            "username": USER,
            "timeout": 5,
            "processed_folder": "Processed",
            **imap,
        },
    }
    return data


def token_command(tmp_path: Path, token: str) -> str:
    script = tmp_path / "token.py"
    script.write_text(f"print({token!r})\n")
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}"


@dataclass
class Failed:
    """What mailflow left behind after passes whose logins all failed."""

    config: Config
    store: Store
    log: str
    reports: list[Any]


def run_failing_passes(config: Config, caplog: pytest.LogCaptureFixture) -> Failed:
    """A pass at opening (the requests) and one at the digest's hour, logging everything at DEBUG."""
    caplog.set_level(logging.DEBUG)
    store = Store.open(config.store)
    clock = FixedClock(OPENS)
    assert config.mail.smtp is not None and config.mail.imap is not None
    engine = Engine(config, store, SmtpTransport(config.mail.smtp), clock, mailbox=ImapMailbox(config.mail.imap))
    reports = [engine.tick()]
    clock.set(DIGEST_AT)
    reports.append(engine.tick())
    # Every record, the test servers' own included (aiosmtpd logs in this process too).
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    log = "\n".join(formatter.format(record) for record in caplog.records)
    return Failed(config, store, log, reports)


def everything_written(failed: Failed) -> dict[str, str]:
    """Every text mailflow produced about the failing passes, by where it went."""
    store, config = failed.store, failed.config
    engine = Engine(config, store, SmtpTransport(config.mail.smtp), FixedClock(DIGEST_AT))  # type: ignore[arg-type]
    statuses = engine.status(DIGEST_AT)
    outbox = store.outbox()
    # Emails are composed just before they are sent: with no server, the digest that would go out is
    # composed here, from the store the failing passes left (it reports those failures).
    [digest_row] = [row for row in outbox if row.kind == "digest"]
    digest = engine.compose_bytes("", "", "digest", DIGEST_AT, digest_row.message_id, DIGEST_AT).raw
    return {
        "the log": failed.log,
        "the tick reports": repr(failed.reports),
        "status --json": json.dumps({"campaigns": [c.as_json() for c in statuses]}),
        "status": format_status_table(statuses, config.secretariat.tz),
        "the outbox errors": "\n".join(str(row.last_error) for row in outbox),
        "the audit trail": export_json(history_rows(store, config, "responsible-2017")),
        "the events": "\n".join(f"{e.kind} {e.reason} {e.detail}" for e in store.events()),
        "the digest": digest.decode("utf-8", "replace"),
    }


# ==========================================================================
# Failing logins, in process, logging at DEBUG
# ==========================================================================


def test_a_wrong_password_never_appears_anywhere(
    tmp_path: Path, make_smtp_server: Any, dovecot: DovecotServer, caplog: pytest.LogCaptureFixture
) -> None:
    smtp = make_smtp_server(auth={USER: "the-right-password"})
    data = config_data(
        tmp_path,
        smtp,
        dovecot.port,
        smtp={"password": "${SMTP_PASSWORD}"},
        imap={"password": "${IMAP_PASSWORD}"},
    )
    config = load_config(
        write_config(tmp_path, data), environ={"SMTP_PASSWORD": SMTP_PASSWORD, "IMAP_PASSWORD": IMAP_PASSWORD}
    )
    failed = run_failing_passes(config, caplog)
    try:
        first = failed.reports[0]
        assert first.inbox is not None and first.inbox.error is not None and "rejected the login" in first.inbox.error
        assert first.sent == [] and len(first.retried) == 11
        assert "rejected the login of ts@example.org" in failed.log  # the failure is told, with the login
        assert "LOGIN **REDACTED**" in failed.log  # the IMAP trace was logged at DEBUG, redacted
        for where, text in everything_written(failed).items():
            assert_no_secret(text, where)
        for where, text in raised(config).items():
            assert_no_secret(text, where)
    finally:
        failed.store.close()


def raised(config: Config) -> dict[str, str]:
    """The exceptions the transports raise on the failing logins, with their whole chain, as --debug prints them."""
    assert config.mail.smtp is not None and config.mail.imap is not None
    out: dict[str, str] = {}
    with pytest.raises(MailflowError) as smtp_error:
        SmtpTransport(config.mail.smtp).connect()
    with pytest.raises(MailflowError) as imap_error:
        ImapMailbox(config.mail.imap).open()
    for label, caught in (("the SMTP error", smtp_error), ("the IMAP error", imap_error)):
        out[label] = "".join(traceback.format_exception(caught.value)) + repr(caught.value.args)
    return out


@pytest.fixture
def oauth2_dovecot() -> Iterator[DovecotServer]:
    """A private Dovecot accepting XOAUTH2 with GOOD_TOKEN only, checked at a loopback introspection endpoint."""
    with OAuth2IntrospectionServer({GOOD_TOKEN: USER}) as introspection:
        root = Path(tempfile.mkdtemp(prefix="mailflow-dovecot-"))
        try:
            with DovecotServer(root, {USER: "unused"}, oauth2_introspection_url=introspection.url) as server:
                yield server
        finally:
            shutil.rmtree(root, ignore_errors=True)


def test_a_rejected_oauth2_token_never_appears_anywhere(
    tmp_path: Path, oauth2_dovecot: DovecotServer, caplog: pytest.LogCaptureFixture
) -> None:
    command = token_command(tmp_path, TOKEN)
    with SmtpServer(oauth2_tokens={USER: GOOD_TOKEN}) as smtp:
        data = config_data(
            tmp_path,
            smtp,
            oauth2_dovecot.port,
            smtp={"oauth2_token_command": command},
            imap={"oauth2_token_command": command},
        )
        failed = run_failing_passes(load_config(write_config(tmp_path, data)), caplog)
        try:
            first = failed.reports[0]
            assert first.inbox is not None and first.inbox.error is not None
            assert "XOAUTH2" in " ".join(str(row.last_error) for row in failed.store.outbox())
            assert "AUTHENTICATE **REDACTED**" in failed.log
            for where, text in everything_written(failed).items():
                assert_no_secret(text, where, (TOKEN,))
            for where, text in raised(failed.config).items():
                assert_no_secret(text, where, (TOKEN,))
        finally:
            failed.store.close()


def test_the_settings_never_show_the_password(tmp_path: Path) -> None:
    data = example_data()
    data["mail"] = {
        "transport": "smtp",
        "smtp": {"host": "smtp.example.org", "username": USER, "password": SMTP_PASSWORD},
        "imap": {"host": "imap.example.org", "username": USER, "password": IMAP_PASSWORD},
    }
    data["store"] = str(tmp_path / "mailflow.db")
    config = load_config(write_config(tmp_path, data))
    assert_no_secret(repr(config.mail), "repr of the mail settings")


# ==========================================================================
# The command line, with --debug
# ==========================================================================


def mailflow(config: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailflow.cli", "--config", str(config), *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_command_line_never_shows_a_secret_even_with_debug(
    tmp_path: Path, make_smtp_server: Any, dovecot: DovecotServer
) -> None:
    smtp = make_smtp_server(auth={USER: "the-right-password"})
    data = config_data(
        tmp_path, smtp, dovecot.port, smtp={"password": "${SMTP_PASSWORD}"}, imap={"password": "${IMAP_PASSWORD}"}
    )
    path = write_config(tmp_path, data)
    env = {"SMTP_PASSWORD": SMTP_PASSWORD, "IMAP_PASSWORD": IMAP_PASSWORD, "MAILFLOW_CACHE": "off"}
    runs = {
        "tick --debug": mailflow(path, "--debug", "tick", "--now", OPENS.isoformat(), env=env),
        "tick -v": mailflow(path, "-v", "tick", "--now", DIGEST_AT.isoformat(), env=env),
        "status --json": mailflow(path, "status", "--json", "--now", DIGEST_AT.isoformat(), env=env),
        "status": mailflow(path, "status", "--now", DIGEST_AT.isoformat(), env=env),
        "status --delegation": mailflow(path, "status", "--delegation", "HN", env=env),
        "history": mailflow(path, "history", "--format", "json", env=env),
        "check-config --debug": mailflow(path, "--debug", "check-config", env=env),
    }
    ticked = runs["tick --debug"]
    assert ticked.returncode == 1 and "NOT READ" in ticked.stdout and "LOGIN **REDACTED**" in ticked.stderr
    assert "send_problem" in runs["status --json"].stdout
    for label, done in runs.items():
        assert done.returncode in (0, 1), (label, done.stderr[-2000:])
        assert_no_secret(done.stdout + done.stderr, f"mailflow {label}")


# ==========================================================================
# The store file
# ==========================================================================


def test_tick_creates_the_store_readable_by_its_owner_only(tmp_path: Path) -> None:
    data = example_data()
    data["store"] = str(tmp_path / "var" / "mailflow.db")
    data["mail"] = {"transport": "local", "local": {"outbox": str(tmp_path / "out"), "inbox": str(tmp_path / "in")}}
    path = write_config(tmp_path, data)
    done = subprocess.run(
        [sys.executable, "-m", "mailflow.cli", "--config", str(path), "tick", "--now", OPENS.isoformat()],
        cwd=ROOT,
        env={**os.environ, "MAILFLOW_CACHE": "off"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        preexec_fn=lambda: os.umask(0o022),  # the usual umask of a service account
    )
    assert done.returncode == 0, done.stderr
    store = tmp_path / "var" / "mailflow.db"
    made = [p for p in (store, store.with_name("mailflow.db-wal"), store.with_name("mailflow.db-shm")) if p.exists()]
    assert store in made
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in made}
    assert all(mode & 0o077 == 0 for mode in modes.values()), {name: oct(mode) for name, mode in modes.items()}
