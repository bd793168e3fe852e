"""``mailflow run``: the always-on service, in a subprocess against the real Dovecot and aiosmtpd of the rig.

The campaign opens two minutes before the real clock, so the service sends
every request on its first pass, as it would on a real server; replies are
then APPENDed to the IMAP inbox and the follow-ups awaited at the SMTP server.
"""

from __future__ import annotations

import mailbox
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from mailflow.config import load_config
from mailflow.digest import HEARTBEAT_SEND_PASS, HEARTBEAT_SERVICE
from mailflow.lock import AlreadyRunning, InstanceLock, lock_path
from mailflow.mailbox import MaildirMailbox
from mailflow.sender import LocalTransport
from mailflow.service import Backoff, due_instants, next_send_pass, run_service
from mailflow.store import Store
from tests.helpers import ROOT, example_data, fill_workbook, reply_to, server_mail, workbook_of, write_config
from tests.servers import DovecotServer, ImapAccount, SmtpServer

ALL_KEYS = [f"{line}.{action}" for line in range(1, 6) for action in range(1, 9)]
IDLE_LINE = "inbox watcher: waiting for new mail in INBOX with IDLE"
#: How long a follow-up may take to reach the SMTP server after its reply was APPENDed.
REPLY_TIMEOUT = 15.0


def campaign_data(tmp_path: Path) -> dict[str, Any]:
    """The example campaign, opened two minutes ago by the real clock, its deadline ten days ahead.

    Without the digest: its cron could fire during a test and add an email."""
    data = example_data()
    data["secretariat"].pop("digest", None)
    now = datetime.now(UTC)
    data["campaigns"][0]["opens"] = (now - timedelta(minutes=2)).isoformat(timespec="seconds")
    data["campaigns"][0]["deadline"] = (now + timedelta(days=10)).date().isoformat()
    data["store"] = str(tmp_path / "mailflow.db")
    return data


def server_config(tmp_path: Path, smtp: SmtpServer, account: ImapAccount, **imap: Any) -> Path:
    data = campaign_data(tmp_path)
    data["mail"] = server_mail(smtp, account, **imap)
    return write_config(tmp_path, data)


class RunProcess:
    """``mailflow run`` in a subprocess, its log lines collected as they come."""

    def __init__(self, config: Path, *args: str) -> None:
        self.config = config
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mailflow.cli", "--config", str(config), *args, "run"],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    @property
    def log(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for_line(self, text: str, count: int = 1, timeout: float = 15.0) -> None:
        """Wait until ``text`` appeared in ``count`` log lines."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while sum(text in line for line in self.lines) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.process.poll() is not None:
                    raise AssertionError(f"{text!r} not logged {count} time(s); the log:\n" + "\n".join(self.lines))
                self._changed.wait(min(remaining, 0.1))

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 10.0) -> tuple[int, float]:
        """Send ``signum``; the exit code and how long the service took to exit."""
        started = time.monotonic()
        self.process.send_signal(signum)
        code = self.process.wait(timeout)
        self._reader.join(5)
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def start_run() -> Iterator[Callable[..., RunProcess]]:
    """Start ``mailflow run`` subprocesses; any still running at the end is killed."""
    started: list[RunProcess] = []

    def start(config: Path, *args: str) -> RunProcess:
        process = RunProcess(config, *args)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


def mailflow(config: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailflow.cli", "--config", str(config), *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


def complete_reply(request: EmailMessage, sender: str) -> bytes:
    name, data = workbook_of(request)
    answers = {key: f"Institución {key}" for key in ALL_KEYS}
    return reply_to(request, sender=sender, attachments=[(name, fill_workbook(data, answers))])


def requests_of(smtp: SmtpServer, run: RunProcess) -> dict[str, EmailMessage]:
    """The 11 requests the service sends on its first pass, by delegation."""
    try:
        sent = [m.message for m in smtp.wait_for(11, timeout=15)]
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; the log of run:\n{run.log}") from None
    return {str(m["X-Mailflow-Delegation"]): m for m in sent if m["X-Mailflow-Kind"] == "request"}


def wait_for_follow_up(smtp: SmtpServer, delegation: str, kind: str = "receipt") -> float:
    """Wait for the follow-up to ``delegation``; the time.time() it arrived."""
    deadline = time.monotonic() + REPLY_TIMEOUT
    while time.monotonic() < deadline:
        for received in smtp.messages:
            message = received.message
            if message["X-Mailflow-Kind"] == kind and message["X-Mailflow-Delegation"] == delegation:
                return received.received_at
        time.sleep(0.01)
    raise AssertionError(f"no {kind} to {delegation} within {REPLY_TIMEOUT:g} s")


def follow_ups(smtp: SmtpServer) -> list[tuple[str, str]]:
    return sorted(
        (str(m.message["X-Mailflow-Delegation"]), str(m.message["X-Mailflow-Kind"]))
        for m in smtp.messages
        if m.message["X-Mailflow-Kind"] != "request"
    )


# --------------------------------------------------------------------------
# Against the real servers, in a subprocess
# --------------------------------------------------------------------------


@pytest.mark.servers
def test_run_answers_an_appended_reply_within_seconds(
    tmp_path: Path, smtp_server: SmtpServer, imap_account: ImapAccount, start_run: Callable[..., RunProcess]
) -> None:
    config = server_config(tmp_path, smtp_server, imap_account)
    run = start_run(config)
    requests = requests_of(smtp_server, run)
    assert sorted(requests) == sorted(d.id for d in load_config(config).delegations)
    run.wait_for_line(IDLE_LINE)

    appended_at = time.time()
    imap_account.append("INBOX", complete_reply(requests["HN"], "enlace@sre.example.hn"))
    latency = wait_for_follow_up(smtp_server, "HN") - appended_at
    print(f"\nAPPEND -> receipt at the SMTP server: {latency:.2f} s")
    assert latency < 5.0, run.log

    code, took = run.stop()
    assert code == 0 and took < 10, run.log
    assert follow_ups(smtp_server) == [("HN", "receipt")]
    assert "received reply from enlace@sre.example.hn (HN" in run.log


@pytest.mark.servers
def test_run_reads_many_replies_at_once_in_a_reader_process_and_leaves_none_behind(
    tmp_path: Path, smtp_server: SmtpServer, imap_account: ImapAccount, start_run: Callable[..., RunProcess]
) -> None:
    """Every delegation answers at once: the service's pass reads the workbooks in a reader process (from its
    scheduler's thread), answers each, and stops cleanly on SIGTERM with no reader process left."""
    config = server_config(tmp_path, smtp_server, imap_account)
    run = start_run(config)
    requests = requests_of(smtp_server, run)
    run.wait_for_line(IDLE_LINE)
    contacts = {d.id: d.contacts[0] for d in load_config(config).delegations}
    with imap_account.client() as client:  # all within Dovecot's 500 ms before it tells the IDLE session
        for delegation, request in requests.items():
            client.append("INBOX", complete_reply(request, contacts[delegation]))
    for delegation in requests:
        wait_for_follow_up(smtp_server, delegation)
    run.wait_for_line("workbooks are read in a reader process")
    code, _ = run.stop()
    assert code == 0, run.log
    assert follow_ups(smtp_server) == sorted((delegation, "receipt") for delegation in requests)
    assert "Traceback" not in run.log and "reader process stopped" not in run.log, run.log
    assert _reader_processes_of(run.process.pid) == []


def _reader_processes_of(parent: int) -> list[int]:
    """Running reader processes started by ``parent`` (its process id is their last argument)."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"from mailflow.reader import serve" in arg for arg in argv) and argv[-2:-1] == [str(parent).encode()]:
            found.append(int(entry.name))
    return found


@pytest.mark.servers
def test_run_reconnects_after_dovecot_restarts_and_processes_what_arrived_meanwhile(
    tmp_path: Path,
    smtp_server: SmtpServer,
    make_dovecot: Callable[..., DovecotServer],
    start_run: Callable[..., RunProcess],
) -> None:
    dovecot = make_dovecot()
    account = dovecot.account("ts@example.org")
    config = server_config(tmp_path, smtp_server, account)
    run = start_run(config)
    requests = requests_of(smtp_server, run)
    run.wait_for_line(IDLE_LINE)

    dovecot.stop()
    run.wait_for_line("reconnecting in")  # the lost connection is noticed
    time.sleep(2)
    dovecot.start()
    # Appended as soon as the server is back, before the watcher reconnects (its backoff is >= 1 s).
    account.append("INBOX", complete_reply(requests["HN"], "enlace@sre.example.hn"))
    wait_for_follow_up(smtp_server, "HN")
    run.wait_for_line("inbox watcher: reconnected to")
    run.wait_for_line(IDLE_LINE, count=2)

    # And back in IDLE, a new reply is answered as before.
    account.append("INBOX", complete_reply(requests["GT"], "enlace@minex.example.gt"))
    wait_for_follow_up(smtp_server, "GT")
    time.sleep(1)  # a duplicate, if there were one, would have come by now

    code, _ = run.stop()
    assert code == 0, run.log
    assert follow_ups(smtp_server) == [("GT", "receipt"), ("HN", "receipt")]
    with Store.snapshot(load_config(config).store) as store:
        received = store.inbound_rows(campaign="responsible-2017")
    assert sorted((row.delegation, row.outcome) for row in received) == [("GT", "applied"), ("HN", "applied")]


@pytest.mark.servers
def test_run_polls_a_server_without_idle_at_the_poll_interval(
    tmp_path: Path, smtp_server: SmtpServer, start_run: Callable[..., RunProcess]
) -> None:
    root = Path(tempfile.mkdtemp(prefix="mailflow-dovecot-"))
    try:
        with DovecotServer(
            root, {}, extra_config="imap_capability = IMAP4rev1 LITERAL+ NAMESPACE UIDPLUS UNSELECT MOVE"
        ) as dovecot:
            account = dovecot.new_account()
            config = server_config(tmp_path, smtp_server, account, poll_interval=5)
            run = start_run(config)
            requests = requests_of(smtp_server, run)
            run.wait_for_line("inbox watcher: the server has no IDLE; looking at INBOX every 5 s")
            appended_at = time.time()
            account.append("INBOX", complete_reply(requests["SV"], "enlace@rree.example.sv"))
            latency = wait_for_follow_up(smtp_server, "SV") - appended_at
            print(f"\npolling every 5 s: APPEND -> receipt at the SMTP server: {latency:.2f} s")
            assert latency < 7.0
            code, _ = run.stop()
            assert code == 0, run.log
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.servers
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_run_cleanly_while_it_waits_in_idle(
    tmp_path: Path,
    smtp_server: SmtpServer,
    imap_account: ImapAccount,
    start_run: Callable[..., RunProcess],
    signum: int,
) -> None:
    config = server_config(tmp_path, smtp_server, imap_account)
    run = start_run(config)
    requests_of(smtp_server, run)
    run.wait_for_line(IDLE_LINE)

    code, took = run.stop(signum)
    assert code == 0, run.log
    assert took < 10
    name = signal.Signals(signum).name
    assert f"stopping on {name}: finishing the job in hand" in run.log
    assert run.lines[-1].endswith("mailflow run stopped")
    store_path = load_config(config).store
    with InstanceLock(store_path, "test"):  # released
        pass
    with Store.snapshot(store_path) as store:
        heartbeat = store.get_meta(HEARTBEAT_SERVICE)
        assert store.get_meta(HEARTBEAT_SEND_PASS) is not None
    assert heartbeat is not None and f'"pid": {run.process.pid}' in heartbeat and '"stopped_at": "' in heartbeat


@pytest.mark.servers
def test_a_second_run_and_a_tick_are_refused_while_run_runs(
    tmp_path: Path, smtp_server: SmtpServer, imap_account: ImapAccount, start_run: Callable[..., RunProcess]
) -> None:
    config = server_config(tmp_path, smtp_server, imap_account)
    run = start_run(config)
    requests_of(smtp_server, run)
    run.wait_for_line(IDLE_LINE)
    store = load_config(config).store
    holder = f"another mailflow (run, pid {run.process.pid}) is using {store}"

    second = mailflow(config, "run")
    assert second.returncode == 1
    assert second.stderr.strip().splitlines() == [
        f"mailflow: error: {holder}; stop it first: one mailflow at a time per store"
    ]

    tick = mailflow(config, "tick")
    assert tick.returncode == 1
    assert tick.stderr.strip() == (
        f"mailflow: error: {holder}; a tick is refused while run is running (run already does what tick does)"
    )
    assert tick.stdout == ""

    code, _ = run.stop()
    assert code == 0
    assert len(smtp_server.messages) == 11  # neither refused process sent anything
    assert mailflow(config, "tick").returncode == 0  # and once run has stopped, a tick may go


# --------------------------------------------------------------------------
# In-process, on the local transport: the embedded mode, stopped by an event
# --------------------------------------------------------------------------


def test_run_service_on_the_local_transport_answers_a_reply_and_stops_on_its_event(tmp_path: Path) -> None:
    data = campaign_data(tmp_path)
    data["mail"] = {"transport": "local", "local": {"outbox": str(tmp_path / "out"), "inbox": str(tmp_path / "in")}}
    config = load_config(write_config(tmp_path, data))
    stop = threading.Event()
    result: list[int] = []
    service = threading.Thread(
        target=lambda: result.append(
            run_service(
                config,
                transport=LocalTransport(config.mail.local.outbox),
                mailbox=MaildirMailbox(config.mail.local.inbox),
                stop=stop,
            )
        )
    )
    service.start()
    try:
        outbox = mailbox.Maildir(tmp_path / "out", create=True)
        requests = wait_for_maildir(outbox, lambda kinds: kinds.count("request") == 11)
        honduras = next(m for m in requests if m["X-Mailflow-Delegation"] == "HN")
        with pytest.raises(AlreadyRunning, match=r"another mailflow \(run, pid \d+\)"):
            InstanceLock(config.store, "tick").acquire()
        mailbox.Maildir(tmp_path / "in", create=True).add(complete_reply(honduras, "enlace@sre.example.hn"))
        wait_for_maildir(outbox, lambda kinds: "receipt" in kinds)
    finally:
        stop.set()
        service.join(10)
    assert not service.is_alive() and result == [0]
    assert not lock_path(config.store).read_text()  # released, and no stale holder left in it


def wait_for_maildir(folder: mailbox.Maildir, done: Callable[[list[str]], bool]) -> list[EmailMessage]:
    import email
    from email.policy import default

    deadline = time.monotonic() + REPLY_TIMEOUT
    while time.monotonic() < deadline:
        messages = [email.message_from_bytes(folder.get_bytes(key), policy=default) for key in folder.iterkeys()]
        typed = [m for m in messages if isinstance(m, EmailMessage)]
        if done([str(m["X-Mailflow-Kind"]) for m in typed]):
            return typed
        time.sleep(0.05)
    raise AssertionError("the expected emails did not reach the local outbox")


# --------------------------------------------------------------------------
# The lock and the pure pieces
# --------------------------------------------------------------------------


def test_the_lock_refuses_a_second_holder_and_names_the_first(tmp_path: Path) -> None:
    store = tmp_path / "var" / "mailflow.db"
    with InstanceLock(store, "run") as held:
        assert held.path == tmp_path / "var" / "mailflow.db.lock"
        with pytest.raises(AlreadyRunning) as refused:
            InstanceLock(store, "run").acquire()
        assert str(refused.value) == (
            f"another mailflow (run, pid {os.getpid()}) is using {store}; "
            "stop it first: one mailflow at a time per store"
        )
    with (
        InstanceLock(store, "tick"),  # free again
        pytest.raises(AlreadyRunning, match=r"\(tick, pid \d+\) .*; wait for it to finish"),
    ):
        InstanceLock(store, "run").acquire()


def test_the_lock_is_released_by_the_os_when_its_holder_dies(tmp_path: Path) -> None:
    store = tmp_path / "mailflow.db"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from mailflow.lock import InstanceLock; "
            "InstanceLock(Path(sys.argv[1]), 'run').acquire(); print('locked', flush=True); time.sleep(60)",
            str(store),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(AlreadyRunning, match=rf"\(run, pid {holder.pid}\)"):
            InstanceLock(store, "tick").acquire()
    finally:
        holder.kill()
        holder.wait(10)
    with InstanceLock(store, "tick"):
        pass


def test_reconnection_delays_double_up_to_five_minutes_with_jitter() -> None:
    import random

    backoff = Backoff(rng=random.Random(7))
    delays = [backoff.next() for _ in range(12)]
    for delay, base in zip(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300], strict=True):
        assert base * 0.8 <= delay <= base * 1.2
    assert len({round(d / b, 6) for d, b in zip(delays[-3:], [300] * 3, strict=True)}) > 1  # jittered
    backoff.reset()
    assert 0.8 <= backoff.next() <= 1.2
    for _ in range(2000):  # weeks of outage never overflow
        assert backoff.next() <= 360


def test_the_send_pass_runs_every_minute_and_at_each_due_instant() -> None:
    start = datetime(2017, 10, 20, 14, 58, 30, tzinfo=UTC)
    minute = timedelta(minutes=1)
    due = [datetime(2017, 10, 20, 15, 0, tzinfo=UTC), datetime(2017, 10, 20, 15, 0, 10, tzinfo=UTC)]
    assert next_send_pass(start, due, minute) == start + minute
    assert next_send_pass(start + minute, due, minute) == due[0]
    assert next_send_pass(due[0], due, minute) == due[1]
    assert next_send_pass(due[1], due, minute) == due[1] + minute
    assert next_send_pass(start, [], minute) == start + minute


def test_meeting_reminders_are_due_instants_of_the_send_pass(tmp_path: Path) -> None:
    """Under ``run``, a meeting reminder goes out at its instant, not on the next minute's pass."""
    data = example_data()
    data["store"] = str(tmp_path / "store.db")
    start = datetime(2017, 11, 7, 14, 30, tzinfo=UTC)
    data["meetings"] = [
        {
            "id": "virtual-session",
            "title": "Sesión virtual",
            "start": "2017-11-07T08:30",
            "timezone": "America/Tegucigalpa",
            "duration": "2h",
            "invite": ["HN", "CR"],
            "reminders": ["-1d", "-1h"],
        },
        {
            "id": "called-off",
            "title": "Sesión cancelada",
            "start": "2017-11-08T08:30",
            "timezone": "America/Tegucigalpa",
            "duration": "1h",
            "invite": ["HN"],
            "reminders": ["-1h"],
            "cancelled": True,
        },
    ]
    config = load_config(write_config(tmp_path, data))
    instants = due_instants(config)
    assert start - timedelta(days=1) in instants and start - timedelta(hours=1) in instants
    assert datetime(2017, 11, 8, 13, 30, tzinfo=UTC) not in instants  # the cancelled meeting's reminder
    campaign = config.campaigns[0]
    assert campaign.opens in instants  # the campaign's own instants are still there
    assert instants == sorted(instants)
