"""``mailflow run``: the always-on service.

Three threads, each with one job:

* the **main thread** takes the instance lock, starts the scheduler and then
  watches the inbox (IMAP IDLE, NOOP polling where the server has no IDLE, or
  a look at the local maildir every few seconds). It never touches the store:
  on a change it only asks the worker to read the inbox. It also receives
  SIGTERM and SIGINT, which break its wait at once (the IDLE is ended with
  DONE and the session logged out);
* **APScheduler's thread** decides when jobs are due;
* **one worker thread** (a single-thread executor) runs every job, one at a
  time: the send pass, the inbox read followed at once by a send pass (so a
  reply's follow-up leaves within a second or two), the digest at its cron
  instant. The store's SQLite connection is thus never used by two threads
  at once.

Jobs are rebuilt from the configuration at each start, with fixed ids and no
persistent job store: the store's state decides what is due, so a crash
mid-job loses nothing and whatever fell due while mailflow was down is done
once by the first pass. A job that fails is logged (with its traceback when
the failure is unexpected) and the service goes on. On a stop, the email or message in hand is finished and the
rest is left for the next start.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.interval import IntervalTrigger

from mailflow import __version__, schedule
from mailflow.clock import Clock, SystemClock
from mailflow.config import DEFAULT_POLL_INTERVAL_SECONDS, Config
from mailflow.cron import cron_trigger
from mailflow.digest import HEARTBEAT_SEND_PASS, HEARTBEAT_SERVICE
from mailflow.engine import Engine, TickReport
from mailflow.errors import MailflowError
from mailflow.lock import InstanceLock
from mailflow.mailbox import Fetched, ImapMailbox, ImapSession, Mailbox, MailboxError, MaildirMailbox, Session
from mailflow.sender import Connection, InFlight, Transport
from mailflow.store import Store

log = logging.getLogger("mailflow")

#: The send pass runs at least this often, and also at each email's due instant.
SEND_EVERY_SECONDS = 60
#: The inbox is read this often even when no change was notified: a safety net
#: under IDLE, and what keeps the "last inbox read" heartbeat fresh.
INBOX_SWEEP_SECONDS = 300
#: IDLE is ended and issued again this often. RFC 2177 lets servers drop an
#: IDLE after 30 minutes, and NAT gateways drop a silent TCP flow after about
#: 5 (AWS: 350 s); renewing sooner also exposes a dead connection sooner.
IDLE_RENEW_SECONDS = 300
#: How often the local maildir inbox is looked at.
LOCAL_POLL_SECONDS = 2.0
#: Reconnecting to the IMAP server: first wait, doubling up to the maximum, ±jitter.
RECONNECT_FIRST_SECONDS = 1.0
RECONNECT_MAX_SECONDS = 300.0
RECONNECT_JITTER = 0.2
#: A connection that lasted this long was healthy: the next loss starts the backoff afresh.
HEALTHY_CONNECTION_SECONDS = 60.0
#: Without signal handlers (run_service called outside the main thread), blocking
#: waits are cut into slices this long so that the ``stop`` event is noticed.
EMBEDDED_WAKE_SECONDS = 2.0


def run_service(
    config: Config,
    *,
    transport: Transport,
    mailbox: Mailbox | None,
    clock: Clock | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Run until SIGTERM or SIGINT (or ``stop`` is set); 0 after a clean stop.

    Refused with :class:`~mailflow.lock.AlreadyRunning` when another mailflow
    holds the store. Signal handlers are installed only when called from the
    main thread; elsewhere, set ``stop`` to end it.
    """
    with InstanceLock(config.store, command="run"), Store.open(config.store) as store:
        service = Service(config, store, transport, mailbox, clock or SystemClock(), stop or threading.Event())
        return service.run()


# --------------------------------------------------------------------------
# Pure pieces: reconnection delays, when the next send pass is due
# --------------------------------------------------------------------------


class Backoff:
    """Exponential backoff with jitter: 1 s, 2 s, 4 s … up to 5 minutes, each ±20 %."""

    def __init__(
        self,
        first: float = RECONNECT_FIRST_SECONDS,
        maximum: float = RECONNECT_MAX_SECONDS,
        jitter: float = RECONNECT_JITTER,
        rng: random.Random | None = None,
    ) -> None:
        self.first, self.maximum, self.jitter = first, maximum, jitter
        self._rng = rng or random.Random()
        self._attempts = 0

    def next(self) -> float:
        """The wait before the next attempt; each call doubles the next one."""
        base = min(self.first * 2.0**self._attempts, self.maximum)
        self._attempts = min(self._attempts + 1, 64)  # a week-long outage must not overflow the float
        return base * self._rng.uniform(1 - self.jitter, 1 + self.jitter)

    def reset(self) -> None:
        self._attempts = 0


def next_send_pass(previous: datetime, due: Sequence[datetime], every: timedelta) -> datetime:
    """The pass after ``previous``: ``every`` later, or sooner when an email falls due before.

    ``due`` is sorted; the retries of failed emails are not in it (they are
    caught by the regular passes)."""
    floor = previous + every
    index = bisect.bisect_right(due, previous)
    return min(floor, due[index]) if index < len(due) else floor


def due_instants(config: Config) -> list[datetime]:
    """Every instant an email falls due, sorted: a campaign's requests, reminders and overdue notices,
    and the reminders of each meeting not cancelled (notices, updates and cancellations go out on the
    next pass after the configuration changes)."""
    campaign_emails = {
        slot.at
        for campaign in config.campaigns
        for delegation in config.campaign_delegations(campaign)
        for slot in schedule.slots(campaign, delegation)
    }
    meeting_reminders = {
        meeting.start + offset for meeting in config.meetings if not meeting.cancelled for offset in meeting.reminders
    }
    return sorted(campaign_emails | meeting_reminders)


class SendPassTrigger(BaseTrigger):  # type: ignore[misc]  # apscheduler ships no type hints
    """Fires at once on start, then every minute and at every due instant in between."""

    def __init__(self, due: Sequence[datetime], every: timedelta = timedelta(seconds=SEND_EVERY_SECONDS)) -> None:
        self.due = tuple(sorted(due))
        self.every = every

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime:
        if previous_fire_time is None:
            return now
        return next_send_pass(previous_fire_time, self.due, self.every)

    def __str__(self) -> str:
        return f"every {self.every.total_seconds():g} s and at {len(self.due)} due instants"


@dataclass(frozen=True)
class JobSpec:
    """One scheduled job, as rebuilt from the configuration at each start."""

    id: str
    name: str
    func: Callable[[], None]
    trigger: Any  # an APScheduler trigger


# --------------------------------------------------------------------------
# Stopping between two emails or two messages
# --------------------------------------------------------------------------


class _Stopping(BaseException):
    """Raised in the worker before the next email when the service stops: nothing half-done.

    A BaseException, so that no ``except Exception`` on the way mistakes it
    for a sending failure and records a retry."""


class _Interrupted(BaseException):
    """Raised by the signal handler in the main thread to break a blocking wait."""


class _StopAwareTransport:
    """The transport, refusing to start another email once the service is stopping."""

    def __init__(self, inner: Transport, stop: threading.Event) -> None:
        self.name = inner.name
        self._inner = inner
        self._stop = stop

    def connect(self) -> Connection:
        return _StopAwareConnection(self._inner.connect(), self._stop)


class _StopAwareConnection:
    def __init__(self, inner: Connection, stop: threading.Event) -> None:
        self._inner = inner
        self._stop = stop

    def send(self, sender: str, recipients: Sequence[str], raw: bytes) -> dict[str, tuple[int, str]]:
        return self.begin(sender, recipients, raw).finish()

    def begin(self, sender: str, recipients: Sequence[str], raw: bytes) -> InFlight:
        if self._stop.is_set():
            raise _Stopping
        return self._inner.begin(sender, recipients, raw)

    def close(self) -> None:
        self._inner.close()


class _StopAwareMailbox:
    """The mailbox, whose sessions hand out no further message once the service is stopping.

    The intake then records and moves the messages it already has, and the
    rest stay new for the next start."""

    def __init__(self, inner: Mailbox, stop: threading.Event) -> None:
        self.name = inner.name
        self._inner = inner
        self._stop = stop

    def open(self) -> Session:
        return _StopAwareSession(self._inner.open(), self._stop)


class _StopAwareSession:
    def __init__(self, inner: Session, stop: threading.Event) -> None:
        self.folder = inner.folder
        self.uidvalidity = inner.uidvalidity
        self._inner = inner
        self._stop = stop

    def uids(self) -> list[int]:
        return self._inner.uids()

    def uids_after(self, last_uid: int) -> list[int]:
        return self._inner.uids_after(last_uid)

    def fetch(self, uids: Sequence[int], max_bytes: int) -> Iterator[Fetched]:
        for fetched in self._inner.fetch(uids, max_bytes):
            if self._stop.is_set():
                log.info("stopping: the remaining new messages are read at the next start")
                return
            yield fetched

    def move(self, uids: Sequence[int], target: str) -> None:
        self._inner.move(uids, target)

    def close(self) -> None:
        self._inner.close()


class _StopAwareClock:
    """The clock, whose sleeps (the sending rate limit) end early when the service stops."""

    def __init__(self, inner: Clock, stop: threading.Event) -> None:
        self._inner = inner
        self._stop = stop

    def now(self) -> datetime:
        return self._inner.now()

    def sleep(self, seconds: float) -> None:
        until = self._inner.now() + timedelta(seconds=max(seconds, 0.0))
        while not self._stop.is_set():
            remaining = (until - self._inner.now()).total_seconds()
            if remaining <= 0:
                return
            self._inner.sleep(min(remaining, 0.5))


# --------------------------------------------------------------------------
# The service
# --------------------------------------------------------------------------


class Service:
    """The scheduler, its worker and the inbox watcher around one engine."""

    def __init__(
        self,
        config: Config,
        store: Store,
        transport: Transport,
        mailbox: Mailbox | None,
        clock: Clock,
        stop: threading.Event,
    ) -> None:
        self.config = config
        self.store = store
        self.mailbox = mailbox
        self.stop = stop
        self.clock = _StopAwareClock(clock, stop)
        self.engine = Engine(config, store, _StopAwareTransport(transport, stop), self.clock)
        self._reader = _StopAwareMailbox(mailbox, stop) if mailbox is not None else None
        self._scheduler: BackgroundScheduler | None = None
        self._signal: str | None = None  # the name of the signal that asked to stop
        self._blocked = False  # the main thread is in a wait that a signal may break
        self._handlers = False  # whether SIGTERM/SIGINT handlers are installed

    # -- lifecycle ---------------------------------------------------------

    def run(self) -> int:
        started = self.clock.now()
        self._record_heartbeat(started_at=started)
        scheduler = self._start_scheduler()
        log.info(
            "mailflow run started (pid %d, store %s); inbox: %s; send pass every %d s and at each due time",
            os.getpid(),
            self.config.store,
            self._inbox_description(),
            SEND_EVERY_SECONDS,
        )
        try:
            with self._signal_handlers():
                try:
                    self._watch()
                except _Interrupted:
                    pass
                finally:
                    self.stop.set()
                    log.info("stopping%s: finishing the job in hand", f" on {self._signal}" if self._signal else "")
                    scheduler.shutdown(wait=True)
        finally:
            self._record_heartbeat(started_at=started, stopped_at=self.clock.now())
        log.info("mailflow run stopped")
        return 0

    def _jobs(self) -> list[JobSpec]:
        """The scheduled jobs, rebuilt from the configuration at each start (fixed ids, nothing persisted).

        Every job decides from the store what is still owed, so running one
        late, or twice, never sends anything twice. The digest is planned by
        the send pass (the latest cron slot not yet sent), so its job is a send
        pass at the cron instant, which the minute passes would catch anyway."""
        jobs = [JobSpec("send", "send pass", self._send_job, SendPassTrigger(due_instants(self.config)))]
        if self.mailbox is not None:
            jobs.append(
                JobSpec("inbox-sweep", "inbox sweep", self._inbox_job, IntervalTrigger(seconds=INBOX_SWEEP_SECONDS))
            )
        digest = self.config.secretariat.digest
        if digest is not None:
            trigger = cron_trigger(digest.schedule, self.config.secretariat.tz)
            jobs.append(JobSpec("digest", "digest", self._send_job, trigger))
        return jobs

    def _start_scheduler(self) -> BackgroundScheduler:
        scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(1)},  # one worker: the store is used by one thread
            job_defaults={
                "coalesce": True,  # runs missed back to back (a suspended machine) are done once
                "max_instances": 1,
                "misfire_grace_time": None,  # late is better than never: every pass is idempotent
            },
            timezone=UTC,
        )
        _quiet_library_logs()
        for job in self._jobs():
            scheduler.add_job(job.func, job.trigger, id=job.id, name=job.name, replace_existing=True)
        scheduler.start()
        self._scheduler = scheduler
        return scheduler

    def _request_inbox(self, why: str) -> None:
        """Ask the worker to read the inbox now (then send). Called from the main thread only.

        Up to two instances: one running and one queued behind it, which will
        see everything that arrived meanwhile; a third request is redundant and
        dropped by the scheduler."""
        assert self._scheduler is not None
        log.debug("inbox watcher: %s, reading the inbox", why)
        self._scheduler.add_job(
            self._inbox_job, "date", id="inbox", name="inbox read", replace_existing=True, max_instances=2
        )

    # -- jobs (all in the worker thread) -----------------------------------

    def _send_job(self) -> None:
        self._guarded("send pass", self._send_pass)

    def _inbox_job(self) -> None:
        self._guarded("inbox read", self._read_inbox)

    def _guarded(self, name: str, work: Callable[[], None]) -> None:
        """Run one job; whatever it raises is logged and the service goes on."""
        if self.stop.is_set():
            return  # queued before the stop: the next start does it
        try:
            work()
        except _Stopping:
            log.info("stopping: %s interrupted between two emails; the rest go out at the next start", name)
        except MailflowError as exc:
            log.error("%s failed: %s; the service goes on", name, exc)
        except Exception:
            log.exception("%s failed; the service goes on", name)

    def _read_inbox(self) -> None:
        if self._reader is None:
            return
        now = self.clock.now()
        report = self.engine.intake.read_inbox(self._reader, now)
        if report.read:
            outcomes = ", ".join(f"{count} {name}" for name, count in sorted(report.by_outcome.items()))
            log.info("inbox: %d new message(s): %s", report.read, outcomes)
        if not self.stop.is_set():
            self._send_pass()  # the follow-ups of what was just read go out now

    def _send_pass(self) -> None:
        now = self.clock.now()
        report = TickReport()
        self.engine.plan(now, report)
        self.engine.send_pending(report)
        with self.store.transaction():
            self.store.set_meta(HEARTBEAT_SEND_PASS, now.isoformat())
        summary = (
            f"send pass: {len(report.sent)} sent, {len(report.retried)} to retry, {len(report.failed)} failed, "
            f"{report.skipped} superseded, {len(report.compose_errors)} not composed"
        )
        busy = report.sent or report.retried or report.failed or report.skipped or report.compose_errors
        log.log(logging.INFO if busy else logging.DEBUG, "%s", summary)

    def _record_heartbeat(self, *, started_at: datetime, stopped_at: datetime | None = None) -> None:
        """Who runs on this store since when; ``stopped_at`` after a clean stop. Main thread, no job running."""
        value = {
            "pid": os.getpid(),
            "version": __version__,
            "started_at": started_at.isoformat(),
            "stopped_at": stopped_at.isoformat() if stopped_at else None,
        }
        with self.store.transaction():
            self.store.set_meta(HEARTBEAT_SERVICE, json.dumps(value))

    # -- the inbox watcher (main thread) -----------------------------------

    def _inbox_description(self) -> str:
        if isinstance(self.mailbox, ImapMailbox):
            return f"{self.mailbox.where}, folder {self.mailbox.settings.folder}"
        if isinstance(self.mailbox, MaildirMailbox):
            return f"local maildir {self.mailbox.path}"
        return "none configured (replies are not read)" if self.mailbox is None else self.mailbox.name

    def _watch(self) -> None:
        if isinstance(self.mailbox, ImapMailbox):
            self._watch_imap(self.mailbox)
        elif isinstance(self.mailbox, MaildirMailbox):
            self._watch_maildir(self.mailbox.path)
        elif self.mailbox is not None:
            self._watch_by_polling(DEFAULT_POLL_INTERVAL_SECONDS)
        else:
            while not self._stopping():
                self._sleep(3600)

    def _watch_imap(self, mailbox: ImapMailbox) -> None:
        """Hold one IMAP session open and wait on it; reconnect with backoff and jitter when it is lost."""
        backoff = Backoff()
        lost_at: float | None = None  # when the watcher last lost (or failed to get) its connection
        while not self._stopping():
            connected_at: float | None = None
            try:
                with self._blocking():
                    session = mailbox.open()
                connected_at = time.monotonic()
                if lost_at is not None:
                    log.info("inbox watcher: reconnected to %s after %.1f s", mailbox.where, connected_at - lost_at)
                try:
                    self._request_inbox("connected")  # what arrived while nobody was watching
                    self._wait_on(session, mailbox.settings.poll_interval)
                    return  # stopped
                finally:
                    session.close()
            except MailboxError as exc:
                problem = str(exc)
            except Exception as exc:
                log.exception("inbox watcher failed")
                problem = f"{type(exc).__name__}: {exc}"
            if self._stopping():
                return
            if connected_at is not None:
                lost_at = time.monotonic()
                if lost_at - connected_at >= HEALTHY_CONNECTION_SECONDS:
                    backoff.reset()
            elif lost_at is None:
                lost_at = time.monotonic()
            delay = backoff.next()
            log.warning("inbox watcher: %s; reconnecting in %.1f s", problem, delay)
            self._sleep(delay)

    def _wait_on(self, session: ImapSession, poll_interval: int) -> None:
        """Wait for changes in the selected folder until stopped; raises MailboxError when the connection is lost."""
        if "IDLE" in session.capabilities:
            renew = IDLE_RENEW_SECONDS if self._handlers else EMBEDDED_WAKE_SECONDS
            log.info("inbox watcher: waiting for new mail in %s with IDLE", session.server_folder)
            while not self._stopping():
                with self._blocking():
                    changed = session.wait_for_change(renew)
                if changed:
                    self._request_inbox("the folder changed")
                else:
                    log.debug("inbox watcher: renewing IDLE")
            return
        log.info(
            "inbox watcher: the server has no IDLE; looking at %s every %d s (mail.imap.poll_interval)",
            session.server_folder,
            poll_interval,
        )
        while not self._stopping():
            self._sleep(poll_interval)
            if self._stopping():
                return
            with self._blocking():
                changed = session.wait_for_change(0)  # one NOOP: reports what arrived since the last one
            if changed:
                self._request_inbox("the folder changed")

    def _watch_maildir(self, path: Path) -> None:
        log.info("inbox watcher: looking at the local inbox %s every %g s", path, LOCAL_POLL_SECONDS)
        seen: frozenset[str] | None = None
        while not self._stopping():
            current = _maildir_listing(path)
            if current != seen:
                seen = current
                self._request_inbox("the local inbox changed")
            self._sleep(LOCAL_POLL_SECONDS)

    def _watch_by_polling(self, interval: float) -> None:
        log.info("inbox watcher: reading the inbox every %g s", interval)
        while not self._stopping():
            self._request_inbox("polling")
            self._sleep(interval)

    # -- stopping ----------------------------------------------------------

    def _stopping(self) -> bool:
        return self._signal is not None or self.stop.is_set()

    def _sleep(self, seconds: float) -> None:
        with self._blocking():
            self.stop.wait(seconds)

    @contextmanager
    def _blocking(self) -> Iterator[None]:
        """A wait that SIGTERM/SIGINT may break (with :class:`_Interrupted`): connecting, IDLE, sleeping."""
        self._blocked = True
        try:
            if self._signal is not None:  # arrived just before: do not start waiting
                raise _Interrupted
            yield
        finally:
            self._blocked = False

    @contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {signum: signal.signal(signum, self._on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
        self._handlers = True
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._handlers = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Runs in the main thread between two bytecodes: only flags, and breaks a wait.

        A second signal while stopping is ignored: the job in hand finishes."""
        if self._signal is not None:
            return
        self._signal = signal.Signals(signum).name
        if self._blocked:
            raise _Interrupted


def _quiet_library_logs() -> None:
    """Keep the service's log to one line per event, unless every step was asked for (``-v``).

    APScheduler says "Running job …" every minute and warns when a read is
    requested while one is already queued (expected: the queued one covers
    it); imapclient says "Connection closed" after every inbox read."""
    if log.getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("apscheduler").setLevel(logging.ERROR)
        logging.getLogger("imapclient").setLevel(logging.WARNING)


def _maildir_listing(path: Path) -> frozenset[str]:
    """The names of the messages in a maildir (new/ and cur/); empty when it does not exist yet."""
    names: set[str] = set()
    for sub in ("new", "cur"):
        try:
            names.update(f"{sub}/{name}" for name in os.listdir(path / sub))
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("inbox watcher: cannot list %s: %s", path / sub, exc)
    return frozenset(names)
