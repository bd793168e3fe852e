"""Crash safety, tested by killing ``mailflow tick`` in a subprocess against the real Dovecot and aiosmtpd.

The state every run starts from: campaign ``plan-a`` sent its requests to REPLIES delegations two days ago and each
delegation's reply now waits in the INBOX of a private Dovecot (each one to be recorded, moved and answered by a
follow-up), with a few auto-replies (moved, never answered) and unrelated messages (left for a person) among them;
campaign ``plan-b`` opens now, so DUE requests fall due in the same tick. Each run gets a fresh copy of that store and
a fresh IMAP account, runs ``mailflow tick`` and signals it:

- SIGKILL at a random moment, one per seed;
- SIGKILL exactly in the windows where a crash could lose or double something: just after a received message was
  recorded (in the middle of a batch, before its commit), when everything is committed but nothing moved yet
  (``tests/crashrunner.py`` wraps mailflow's methods in the child; mailflow is not
  changed), just after the MOVE but before the store records it, and just after the SMTP server accepted an email but
  before the store recorded it (the test server itself kills the tick while it waits for the "250");
- SIGTERM in that last window, which must send nothing twice;
- a full disk under the store (a small tmpfs; an injected SQLITE_FULL where mounting is not allowed).

Then a final, uninterrupted tick runs, and everything is checked against what the delegations sent, what the store
holds and what the SMTP server received: every reply recorded exactly once (answers, state, follow-up), every due
email sent, at most one copy too many per kill and only of the email in flight, nothing left in the INBOX but the
unrelated messages and nothing twice in the processed folder.

The default suite runs a reduced campaign (40 replies, 20 requests due, 3 random seeds). The full one (200 replies,
100 requests due, one random SIGKILL per seed and every window at several positions), figures printed::

    MAILFLOW_CRASH_SEEDS=20 .venv/bin/pytest -m crash -s tests/test_crash.py
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from mailflow.clock import FixedClock
from mailflow.config import load_config
from mailflow.engine import Engine
from mailflow.store import Store
from tests.helpers import ROOT, example_data, fill_workbook, reply_to, workbook_of, write_config
from tests.servers import DovecotServer, ImapAccount, SmtpServer

pytestmark = [pytest.mark.crash, pytest.mark.servers]

#: ``MAILFLOW_CRASH_SEEDS=N`` runs the full campaign with N random kills; without it, a reduced one.
FULL_SEEDS = int(os.environ.get("MAILFLOW_CRASH_SEEDS") or 0)
SEEDS = FULL_SEEDS or 3
REPLIES = 200 if FULL_SEEDS else 40
DUE = 100 if FULL_SEEDS else 20
AUTO_REPLIES = 2
UNRELATED = 3

ALL_KEYS = [f"{line}.{action}" for line in range(1, 6) for action in range(1, 9)]
OPENS_A = datetime(2017, 10, 2, 16, 0, tzinfo=UTC)  # Monday 10:00 in San José
KILL_AT = datetime(2017, 10, 4, 16, 0, tzinfo=UTC)  # Wednesday 10:00: plan-b opens, the replies are read
FINAL_AT = KILL_AT + timedelta(minutes=10)
#: How long any one tick may take before the test gives up on it.
TICK_TIMEOUT = 300.0


class RigFailure(Exception):
    """The harness could not do what a test asked (a signal not delivered, the disk not filled, the final tick
    refused to run): not a finding about mailflow, and never to be mistaken for one (an ``xfail`` of a known defect
    is written with ``raises=AssertionError``)."""


# --------------------------------------------------------------------------- the state every run starts from


def delegation(index: int) -> dict[str, Any]:
    ident = f"D{index:03d}"
    return {
        "id": ident,
        "name": f"Delegación {index:03d}",
        "language": "es" if index % 2 else "en",
        "timezone": "America/Costa_Rica",
        "contacts": [f"enlace{index}@d{index:03d}.example.org"],
    }


def rig_config(directory: Path, smtp: SmtpServer, account: ImapAccount | None, store: Path | None = None) -> Path:
    """Both campaigns over the rig's servers, the store in ``directory`` (or at ``store``)."""
    data = example_data()
    data["secretariat"].pop("digest", None)  # its cron would add an email whenever a test runs at 08:00
    data["mail"] = {
        "transport": "smtp",
        "smtp": {"host": smtp.host, "port": smtp.port, "security": "none", "timeout": 10},
        "imap": {
            "host": account.host if account else "127.0.0.1",
            "port": account.port if account else 143,
            "security": "none",
            "username": account.user if account else "nobody",
            "password": account.password if account else "none",
            "processed_folder": "Processed",
            "timeout": 10,
        },
    }
    data["store"] = str(store or directory / "mailflow.db")
    data["delegations"] = [delegation(i) for i in range(REPLIES)]
    base = data["campaigns"][0]
    common = {**base, "deadline": "2017-10-31", "reminders": ["-3d"]}
    data["campaigns"] = [
        {**common, "id": "plan-a", "ref": "plan-a", "opens": "2017-10-02T10:00", "delegations": "all"},
        {
            **common,
            "id": "plan-b",
            "ref": "plan-b",
            "opens": "2017-10-04T10:00",
            "delegations": [f"D{i:03d}" for i in range(DUE)],
        },
    ]
    directory.mkdir(parents=True, exist_ok=True)
    return write_config(directory, data)


class _Accepting:
    """A transport that accepts everything: the setup's requests need not travel."""

    name = "setup"

    def connect(self) -> _Accepting:
        return self

    def send(self, sender: str, recipients: Any, raw: bytes) -> dict[str, tuple[int, str]]:
        return {}

    def begin(self, sender: str, recipients: Any, raw: bytes) -> _Accepting:
        return self

    def finish(self) -> dict[str, tuple[int, str]]:
        return {}

    def close(self) -> None:
        return None


@dataclass(frozen=True)
class Reply:
    """A delegation's reply as put in the INBOX, and what mailflow must make of it."""

    delegation: str
    message_id: str
    raw: bytes
    answers: dict[str, str]
    follow_up: str  # receipt | missing


@dataclass(frozen=True)
class Played:
    """One run: how it ended, what the kill left, and what the server received in all."""

    name: str
    signal: str
    killed: bool
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    phase: str
    in_flight: str | None
    received_before_final: int
    final_stderr: str
    account: ImapAccount
    database: Path


@dataclass
class Rig:
    root: Path
    dovecot: DovecotServer
    smtp: SmtpServer
    template: Path
    replies: list[Reply]
    auto_replies: list[tuple[str, bytes]]
    unrelated: list[tuple[str, bytes]]
    reference_seconds: float = 0.0
    reference_growth: int = 0
    figures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def messages(self) -> list[bytes]:
        mixed = [r.raw for r in self.replies]
        # Spread the others among the replies, as they would arrive.
        for offset, (_, raw) in enumerate(self.auto_replies + self.unrelated):
            mixed.insert(min(len(mixed), (offset + 1) * len(self.replies) // 6), raw)
        return mixed

    @property
    def expected_emails(self) -> int:
        return len(self.replies) + DUE


def _message_id(raw: bytes) -> str:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    return str(parsed["Message-ID"]).strip()


def build_replies(store: Store) -> tuple[list[Reply], list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    """One reply per delegation of plan-a: most answer in the body (all 40, or 30 of 40), every tenth sends the
    workbook back filled in; plus auto-replies and unrelated messages."""
    requests = {row.delegation: row for row in store.outbox(campaign="plan-a") if row.kind == "request"}
    replies: list[Reply] = []
    for index in range(REPLIES):
        ident = f"D{index:03d}"
        row = requests[ident]
        original = {"Subject": row.subject, "Message-ID": row.message_id}
        sender = delegation(index)["contacts"][0]
        complete = index % 5 != 3
        keys = ALL_KEYS if complete else ALL_KEYS[:30]
        answers = {key: f"Institución {ident}-{key}" for key in keys}
        if index % 10 == 0:
            request = email.message_from_bytes(store.body(row.id), policy=email.policy.default)
            assert isinstance(request, EmailMessage)
            name, data = workbook_of(request)
            raw = reply_to(original, sender=sender, attachments=[(name, fill_workbook(data, answers))])
        else:
            body = "Estimados:\n\n" + "\n".join(f"{key}: {value}" for key, value in answers.items()) + "\n\nSaludos\n"
            raw = reply_to(original, sender=sender, body=body)
        replies.append(Reply(ident, _message_id(raw), raw, answers, "receipt" if complete else "missing"))
    auto = []
    for index in range(AUTO_REPLIES):
        row = requests[f"D{index:03d}"]
        raw = reply_to(
            {"Subject": row.subject, "Message-ID": row.message_id},
            sender=delegation(index)["contacts"][0],
            subject=f"Respuesta automática: {row.subject}",
            body="Estaré fuera de la oficina hasta el lunes.\n",
            headers={"Auto-Submitted": "auto-replied"},
        )
        auto.append((_message_id(raw), raw))
    unrelated = []
    for index in range(UNRELATED):
        raw = reply_to(
            {"Subject": "", "Message-ID": ""},
            sender=f"boletin{index}@news.example.com",
            subject=f"Boletín mensual n.º {index}",
            body="Novedades del mes.\n",
            thread=False,
        )
        unrelated.append((_message_id(raw), raw))
    return replies, auto, unrelated


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    root = Path(tempfile.mkdtemp(prefix="mailflow-crash-"))
    root.chmod(0o755)
    dovecot: DovecotServer | None = None
    smtp = SmtpServer()
    try:
        dovecot = DovecotServer(root / "dovecot", {"ts@example.org": "secret"})
        dovecot.start()
        smtp.start()
        setup = root / "template"
        config = load_config(rig_config(setup, smtp, None))
        with Store.open(config.store) as store:
            report = Engine(config, store, _Accepting(), FixedClock(OPENS_A)).tick()
            assert len(report.sent) == REPLIES
            replies, auto, unrelated = build_replies(store)
        made = Rig(root, dovecot, smtp, config.store, replies, auto, unrelated)
        yield made
        if made.figures:
            print_figures(made)
    finally:
        smtp.stop()
        if dovecot is not None:
            dovecot.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(rig: Rig) -> Rig:
    """An uninterrupted tick: the control, and the time scale of the random kills."""
    played = play(rig, "reference")
    verify(rig, played)
    rig.reference_seconds = played.seconds
    rig.reference_growth = (rig.root / "reference" / "mailflow.db").stat().st_size - rig.template.stat().st_size
    return rig


# --------------------------------------------------------------------------- one run


def load_inbox(account: ImapAccount, messages: list[bytes]) -> None:
    with account.client() as client:
        for raw in messages:
            client.append("INBOX", raw)


@contextmanager
def kill_on_accept(smtp: SmtpServer, nth: int | None, signum: int) -> Iterator[dict[str, int]]:
    """Have the SMTP server signal the tick once it has recorded the ``nth`` email, before it answers "250".

    The tick is then waiting for that "250": the email was delivered but mailflow cannot know it yet. (This wraps the
    rig's recorder for the duration; aiosmtpd looks its hooks up per connection.)"""
    target: dict[str, int] = {}
    if nth is None:
        yield target
        return
    recorder = smtp._recorder
    original = recorder.handle_DATA
    accepted = 0

    async def handle_data(server: Any, session: Any, envelope: Any) -> str:
        nonlocal accepted
        reply = await original(server, session, envelope)
        if reply.startswith("250"):
            accepted += 1
            if accepted == nth and "pid" in target:
                os.kill(target["pid"], signum)
                target["fired"] = accepted
        return reply

    recorder.handle_DATA = handle_data  # type: ignore[method-assign]
    try:
        yield target  # the caller puts the tick's pid in it; "fired" tells that the signal went
    finally:
        del recorder.handle_DATA


def tick(config: Path, now: datetime, *, hook: str = "none", signame: str = "KILL") -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "tests.crashrunner", hook, signame] if hook != "none" else [sys.executable]
    if hook == "none":
        command += ["-m", "mailflow.cli"]
    command += ["--config", str(config), "tick", "--now", now.isoformat()]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def play(
    rig: Rig,
    name: str,
    *,
    signame: str = "KILL",
    after: float | None = None,
    hook: str = "none",
    on_accept: int | None = None,
    store: Path | None = None,
    before_final: Callable[[], None] | None = None,
) -> Played:
    """Run the tick on a fresh copy of the state, signal it as asked, then run the final tick."""
    directory = rig.root / name
    directory.mkdir(parents=True)
    database = store or directory / "mailflow.db"
    shutil.copy(rig.template, database)
    account = rig.dovecot.new_account()
    load_inbox(account, rig.messages)
    config = rig_config(directory, rig.smtp, account, store=database)
    rig.smtp.clear()
    signum = getattr(signal, f"SIG{signame}")
    started = time.monotonic()
    with kill_on_accept(rig.smtp, on_accept, signum) as target:
        process = tick(config, KILL_AT, hook=hook, signame=signame)
        target["pid"] = process.pid
        if after is not None:
            try:
                process.wait(after)
            except subprocess.TimeoutExpired:
                process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=TICK_TIMEOUT)
    seconds = time.monotonic() - started
    if on_accept is not None and "fired" not in target:
        raise RigFailure(f"{name}: the tick ended before the server accepted email {on_accept}:\n{stderr}")
    received = [str(m.message["Message-ID"]).strip() for m in rig.smtp.messages]
    killed = process.returncode == -signum
    phase, in_flight = where_it_stopped(rig, database, received)
    if before_final is not None:
        before_final()
    final = tick(config, FINAL_AT)
    _, final_stderr = final.communicate(timeout=TICK_TIMEOUT)
    if final.returncode != 0:
        raise RigFailure(f"{name}: the final tick failed ({final.returncode}):\n{final_stderr}")
    rig.figures.append(
        {
            "run": name,
            "signal": signame if killed else "-",
            "at_s": round(seconds, 2),
            "where": phase,
            "duplicates": "?",
        }
    )
    played = Played(
        name=name,
        signal=signame,
        killed=killed,
        returncode=process.returncode,
        stdout=stdout,
        stderr=stderr,
        seconds=seconds,
        phase=phase,
        in_flight=in_flight,
        received_before_final=len(received),
        final_stderr=final_stderr,
        account=account,
        database=database,
    )
    return played


def where_it_stopped(rig: Rig, database: Path, received: list[str]) -> tuple[str, str | None]:
    """Where the tick was when it died, from what it left in the store; and the email in flight, if any:
    the last one the server accepted, when the store does not have it as sent."""
    with closing(sqlite3.connect(database)) as db:
        recorded = db.execute("SELECT COUNT(*) FROM inbound").fetchone()[0]
        movable = db.execute("SELECT COUNT(*) FROM inbound WHERE outcome IN ('applied', 'auto_reply')").fetchone()[0]
        moved = db.execute("SELECT COUNT(*) FROM inbound WHERE moved = 1").fetchone()[0]
        sent = set(
            m
            for (m,) in db.execute(
                "SELECT message_id FROM outbox WHERE status = 'sent' AND sent_at > ?", ("2017-10-03",)
            )
        )
    total = len(rig.replies) + len(rig.auto_replies) + len(rig.unrelated)
    in_flight = received[-1] if received and received[-1] not in sent else None
    if recorded == 0:
        phase = "starting (nothing recorded)"
    elif recorded < total:
        phase = f"reading the inbox ({recorded}/{total} recorded)"
    elif moved < movable:
        phase = f"recorded, {moved}/{movable} moved"
    elif not received:
        phase = "planning and composing"
    elif len(sent) < rig.expected_emails:
        phase = f"sending ({len(sent)}/{rig.expected_emails} recorded as sent)"
    else:
        phase = "done"
    return phase, in_flight


# --------------------------------------------------------------------------- what must hold afterwards


def verify(rig: Rig, played: Played, *, kills: int = 0) -> Counter[str]:
    """Everything recorded once, sent, moved; at most ``kills`` extra copies, only of the email in flight."""
    with Store.open(played.database) as store:
        inbound = store.inbound_rows()
        by_id: dict[str | None, list[Any]] = {}
        for row in inbound:
            by_id.setdefault(row.message_id, []).append(row)
        # Every reply recorded exactly once, applied and moved; its answers and state as the delegation sent them.
        for reply in rig.replies:
            rows = by_id.get(reply.message_id, [])
            assert len(rows) == 1, f"{played.name}: reply of {reply.delegation} recorded {len(rows)} times"
            [row] = rows
            assert (row.outcome, row.delegation, row.moved) == ("applied", reply.delegation, True), row
        answers = store.current_answers("plan-a")
        states = store.states("plan-a")
        for reply in rig.replies:
            assert answers.get(reply.delegation) == reply.answers, f"{played.name}: answers of {reply.delegation}"
            expected_state = "complete" if reply.follow_up == "receipt" else "partial"
            assert states[reply.delegation].state.value == expected_state
        for message_id, _ in rig.auto_replies:
            [row] = by_id[message_id]
            assert (row.outcome, row.moved) == ("auto_reply", True)
        for message_id, _ in rig.unrelated:
            [row] = by_id[message_id]
            assert (row.outcome, row.moved) == ("unrelated", False)
        assert len(inbound) == len(rig.replies) + len(rig.auto_replies) + len(rig.unrelated)
        # Every email sent: one follow-up per reply, every request of plan-b; nothing pending or failed.
        outbox = store.outbox()
        assert {row.status.value for row in outbox} == {"sent"}, Counter(row.status.value for row in outbox)
        follow_ups = [row for row in outbox if row.inbound_id is not None]
        expected_kinds = {r.delegation: r.follow_up for r in rig.replies}
        assert sorted((row.delegation, row.kind) for row in follow_ups) == sorted(expected_kinds.items())
        wanted = {row.message_id for row in follow_ups} | {
            row.message_id for row in outbox if row.campaign == "plan-b" and row.kind == "request"
        }
        assert len(wanted) == rig.expected_emails
    received = Counter(str(m.message["Message-ID"]).strip() for m in rig.smtp.messages)
    assert set(received) == wanted, (
        f"{played.name}: missing {len(wanted - set(received))}, extra {set(received) - wanted}"
    )
    duplicates = Counter({m: n - 1 for m, n in received.items() if n > 1})
    assert sum(duplicates.values()) <= kills, f"{played.name}: {dict(duplicates)} sent twice after {kills} kill(s)"
    assert set(duplicates) <= {played.in_flight}, f"{played.name}: {dict(duplicates)} but in flight: {played.in_flight}"
    # Nothing left in the INBOX that should have gone, nothing twice in the processed folder.
    with played.account.client() as client:
        client.select_folder("INBOX", readonly=True)
        left = client.fetch(client.search(["ALL"]), [b"BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"])
        client.select_folder("Processed", readonly=True)
        moved = client.fetch(client.search(["ALL"]), [b"BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"])
    assert sorted(_header_id(item) for item in left.values()) == sorted(m for m, _ in rig.unrelated)
    moved_ids = Counter(_header_id(item) for item in moved.values())
    assert max(moved_ids.values()) == 1
    assert set(moved_ids) == {r.message_id for r in rig.replies} | {m for m, _ in rig.auto_replies}
    figure = next(f for f in rig.figures if f["run"] == played.name)
    figure["duplicates"] = sum(duplicates.values())
    return duplicates


def _header_id(item: dict[bytes, Any]) -> str:
    data = next(v for k, v in item.items() if k.startswith(b"BODY"))
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    return str(parsed["Message-ID"]).strip()


def print_figures(rig: Rig) -> None:
    kills = [f for f in rig.figures if f["signal"] != "-"]
    duplicates = sum(f["duplicates"] for f in rig.figures if isinstance(f["duplicates"], int))
    print(
        f"\ncrash campaign: {len(rig.replies)} replies + {len(rig.auto_replies) + len(rig.unrelated)} other messages, "
        f"{rig.expected_emails} emails due; reference tick {rig.reference_seconds:.2f} s; "
        f"{len(kills)} kills, {duplicates} duplicate(s) ('?': the checks stopped at a known defect)"
    )
    for figure in rig.figures:
        print("  " + json.dumps(figure, ensure_ascii=False))


# --------------------------------------------------------------------------- the tests


def test_an_uninterrupted_tick_records_sends_and_moves_everything_once(reference: Rig) -> None:
    assert reference.reference_seconds > 0  # the checks ran in the fixture: this is the control


@pytest.mark.parametrize("seed", range(SEEDS))
def test_sigkill_at_a_random_moment_loses_nothing_and_doubles_at_most_the_email_in_flight(
    reference: Rig, seed: int
) -> None:
    after = random.Random(seed).uniform(0.05, 0.95) * reference.reference_seconds
    played = play(reference, f"random-{seed}", after=after)
    verify(reference, played, kills=1 if played.killed else 0)


RECORD_POSITIONS = [1, REPLIES // 2, REPLIES + AUTO_REPLIES + UNRELATED] if FULL_SEEDS else [REPLIES // 2]


@pytest.mark.parametrize("nth", RECORD_POSITIONS)
def test_sigkill_after_a_message_is_recorded_in_the_middle_of_a_batch(reference: Rig, nth: int) -> None:
    played = play(reference, f"record-{nth}", hook=f"record:{nth}")
    assert played.killed, played.stderr
    assert verify(reference, played, kills=1) == Counter()


def test_sigkill_when_about_to_move(reference: Rig) -> None:
    played = play(reference, "move", hook="move")
    assert played.killed and played.phase.startswith("recorded, 0/"), played.phase
    assert verify(reference, played, kills=1) == Counter()


def test_sigkill_after_the_move_before_the_store_records_it(reference: Rig) -> None:
    played = play(reference, "moved", hook="moved")
    assert played.killed and played.phase.startswith("recorded, 0/"), played.phase
    assert verify(reference, played, kills=1) == Counter()


ACCEPT_POSITIONS = [1, (REPLIES + DUE) // 2, REPLIES + DUE] if FULL_SEEDS else [(REPLIES + DUE) // 2]


@pytest.mark.parametrize("nth", ACCEPT_POSITIONS)
def test_sigkill_after_smtp_accepted_before_the_store_commit_doubles_only_that_email(reference: Rig, nth: int) -> None:
    played = play(reference, f"accept-{nth}", on_accept=nth)
    assert played.killed and played.in_flight is not None, played.phase
    assert played.received_before_final == nth
    duplicates = verify(reference, played, kills=1)
    assert duplicates == Counter({played.in_flight: 1})  # at least once, at most twice: the one in flight


@pytest.mark.parametrize("nth", ACCEPT_POSITIONS)
def test_sigkill_in_the_send_window_from_inside_the_tick(reference: Rig, nth: int) -> None:
    played = play(reference, f"sent-{nth}", hook=f"sent:{nth}")
    assert played.killed and played.in_flight is not None, played.phase
    assert verify(reference, played, kills=1) == Counter({played.in_flight: 1})


SIGTERM_SEEDS = range(SEEDS) if FULL_SEEDS else range(1)


@pytest.mark.parametrize("seed", SIGTERM_SEEDS)
def test_sigterm_while_sending_finishes_the_email_in_hand_and_sends_nothing_twice(reference: Rig, seed: int) -> None:
    nth = random.Random(1000 + seed).randint(1, reference.expected_emails)
    played = play(reference, f"sigterm-{seed}", signame="TERM", on_accept=nth)
    assert not played.killed and "stopped by a signal" in played.stdout, played.stderr
    assert verify(reference, played, kills=1) == Counter()


def test_sigterm_while_reading_the_inbox_sends_nothing_twice(reference: Rig) -> None:
    played = play(reference, "sigterm-inbox", signame="TERM", hook=f"record:{REPLIES // 3}")
    assert not played.killed and "stopped by a signal" in played.stdout, played.stderr
    assert verify(reference, played, kills=1) == Counter()


# --------------------------------------------------------------------------- a full disk


def mount_small_filesystem(path: Path, size: int) -> bool:
    """A tmpfs of ``size`` bytes at ``path``; False where mounting is not allowed (no root, no CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "mailflow-crash", str(path)],
        capture_output=True,
        text=True,
    )
    return done.returncode == 0


def resize_filesystem(path: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True, capture_output=True)


def unmount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], check=False, capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)  # busy: detach it anyway


def assert_nothing_recorded_by_half(rig: Rig, database: Path) -> dict[str, int]:
    """What a failed tick left: a sound database in which every received message is recorded with everything it
    brought (answers, state, follow-up), every email recorded as sent was received, and every stored body is whole."""
    received = {str(m.message["Message-ID"]).strip() for m in rig.smtp.messages}
    expected = {r.message_id: r for r in rig.replies}
    with closing(sqlite3.connect(database)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with Store.open(database) as store:
        rows = store.inbound_rows()
        assert [r for r in rows if r.outcome == "failed"] == [], "a message was recorded as failed for want of space"
        follow_ups = {row.inbound_id: row for row in store.outbox() if row.inbound_id is not None}
        for row in rows:
            reply = expected.get(row.message_id or "")
            if reply is None:
                continue
            assert row.outcome == "applied"
            assert {a.key: a.value for a in store.answers_from(row.id)} == reply.answers
            assert follow_ups[row.id].kind == reply.follow_up
        sent = [row for row in store.outbox() if row.status.value == "sent" and row.sent_at and row.sent_at > KILL_AT]
        assert {row.message_id for row in sent} <= received
        for email_row in store.outbox():
            if email_row.has_body:
                body = email.message_from_bytes(store.body(email_row.id), policy=email.policy.default)
                assert str(body["Message-ID"]).strip() == email_row.message_id
        return {"recorded": len(rows), "sent": len(sent)}


#: The small file system holds the store and this fraction of what an uninterrupted tick adds to it.
FILL_FRACTIONS = [0.1, 0.3, 0.5, 0.7, 0.9] if FULL_SEEDS else [0.4, 0.9]


@pytest.mark.parametrize("fraction", FILL_FRACTIONS)
def test_a_full_disk_is_a_clear_error_records_nothing_by_half_and_recovers(reference: Rig, fraction: float) -> None:
    name = f"disk-full-{fraction}"
    small = reference.root / f"small-fs-{fraction}"
    size = reference.template.stat().st_size + int(reference.reference_growth * fraction)
    mounted = mount_small_filesystem(small, size)
    database = small / "mailflow.db" if mounted else reference.root / name / "mailflow.db"
    left: dict[str, int] = {}

    def check_then_free_space() -> None:
        left.update(assert_nothing_recorded_by_half(reference, database))
        if mounted:
            resize_filesystem(small, 512 * 1024 * 1024)

    try:
        if mounted:
            played = play(reference, name, store=database, before_final=check_then_free_space)
        else:  # pragma: no cover - where the tests may not mount a file system: SQLITE_FULL injected
            hook = f"diskfull:{int(REPLIES * fraction / 2) + 1}"
            played = play(reference, name, hook=hook, before_final=check_then_free_space)
        if played.returncode != 1:
            raise RigFailure(f"{name}: the disk did not fill up ({played.returncode}):\n{played.stderr}")
        lines = played.stderr.strip().splitlines()
        assert lines[-1].startswith("mailflow: error: ") and "disk is full" in lines[-1], lines[-1]
        assert "Traceback" not in played.stderr, played.stderr
        verify(reference, played, kills=1)
    finally:
        if mounted:
            unmount(small)


def test_a_disk_full_for_a_moment_loses_no_reply(reference: Rig) -> None:
    played = play(reference, "full-once", hook="fullonce:5")
    verify(reference, played, kills=1)
