"""ingest: one ``tick`` reading 300 replies from Dovecot, against a bare fetch, parse, read and insert script.

Set-up, not measured: a private Dovecot on loopback (:class:`tests.servers.DovecotServer`),
a counting aiosmtpd in a separate process (:class:`benchmarks.common.SmtpSink`) and a
campaign of 300 delegations opened by a real ``tick`` at ``opens`` that sends the 300
requests over SMTP. Each delegation then answers every action of its own request copy
(the 40-action sample plan, filled with openpyxl) in a reply to that request, as its
mail client would send it (:func:`tests.helpers.reply_to`: threaded, from its listed
contact, the workbook attached). The store after the opening tick is kept, and every
measured run starts from a copy of it.

Measured, interleaved, each on a fresh IMAP account holding the same 300 messages:

* mailflow: :meth:`Engine.tick` two hours after ``opens``, with the engine's real
  :class:`~mailflow.mailbox.ImapMailbox` and :class:`~mailflow.sender.SmtpTransport`.
  It reads the inbox (fetch, attribute, read each workbook, record the return and the
  state change, move the 300 messages to the processed folder) and then composes and
  sends the 300 follow-ups (receipts). With this many messages the workbooks are read
  in mailflow's reader process (:mod:`mailflow.reader`, started by the tick itself)
  while the tick parses and records the messages before them. ``Intake.read_inbox``,
  its steps and the engine's phase methods are wrapped on that instance, so the split
  intake / follow-ups is the split of the measured tick itself.
* the baseline: imapclient fetches the same messages (``BODY.PEEK[]`` in batches of
  50), ``email.message_from_bytes`` parses each, python-calamine reads each attached
  workbook (every row), and each answer becomes a row of an SQLite table (WAL,
  ``synchronous=NORMAL`` as mailflow's store), one commit per message. It neither
  moves nor answers anything.

The target compares mailflow's intake (``read_inbox``) with the baseline; the whole
tick, follow-ups included, is printed beside it.
"""

from __future__ import annotations

import contextlib
import email
import email.message
import email.policy
import functools
import io
import shutil
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import python_calamine
from imapclient import IMAPClient

from benchmarks.common import (
    CAMPAIGN_ID,
    LOOPBACK,
    SmtpSink,
    Stopwatch,
    config_data,
    make_delegations,
    peak_rss_mb,
    say,
    seconds,
    verdict,
    write_yaml,
)
from mailflow.clock import FixedClock
from mailflow.config import Config, load_config
from mailflow.engine import Engine
from mailflow.intake import Intake
from mailflow.mailbox import ImapMailbox
from mailflow.reader import _Worker
from mailflow.sample import write_sample_plan
from mailflow.sender import SmtpTransport
from mailflow.store import Store
from tests.helpers import fill_workbook, reply_to, workbook_of
from tests.servers import DovecotServer, ImapAccount, RigError

TARGET_RATIO = 2.0
FETCH_BATCH = 50
PROCESSED_FOLDER = "Processed"
REPLY_DELAY = timedelta(hours=2)  # the replies are read two hours after the requests went out
FINGERPRINT_SECRET = "benchmark-fingerprint-secret"
INSTITUTIONS = (
    "Ministerio de Relaciones Exteriores",
    "Dirección General de Migración y Extranjería",
    "Procuraduría General de la Nación",
    "Instituto Nacional de la Niñez y la Familia",
    "Ministerio de Salud Pública",
)


@dataclass(frozen=True)
class Sizes:
    replies: int
    runs: int  # each of mailflow and the baseline, interleaved; the best counts


FULL = Sizes(replies=300, runs=3)
QUICK = Sizes(replies=30, runs=1)


@dataclass(frozen=True)
class Corpus:
    config: Config
    opening_store: Path
    replies: list[bytes]
    actions: int
    opening_seconds: float
    build_seconds: float


def _dovecot_root() -> Path:
    # Not under a 0700 TemporaryDirectory: Dovecot's processes run as other users.
    return Path(tempfile.mkdtemp(prefix="mailflow-bench-dovecot-"))


def _config(base: Path, workbook: Path, n: int, smtp_port: int, imap_port: int) -> Config:
    data = config_data(
        delegations=make_delegations(n),
        workbook=workbook,
        store=base / "opening.db",
        mail={
            "transport": "smtp",
            "smtp": {"host": LOOPBACK, "port": smtp_port, "security": "none", "timeout": 60},
            "imap": {
                "host": LOOPBACK,
                "port": imap_port,
                "security": "none",
                "username": "set-per-run",
                "password": "set-per-run",
                "folder": "INBOX",
                "processed_folder": PROCESSED_FOLDER,
                "timeout": 60,
            },
        },
    )
    # Fixed, so every copy of the opening store reads the fingerprints of the same request copies.
    data["fingerprint_secret"] = FINGERPRINT_SECRET
    return load_config(write_yaml(base / "mailflow.yaml", data))


def _corpus(base: Path, n: int, sink: SmtpSink, imap_port: int) -> Corpus:
    """Open the campaign (a real tick sending n requests) and write each delegation's reply to its request."""
    workbook = base / "plan.xlsx"
    write_sample_plan(workbook)  # the 40-action sample, as shipped
    config = _config(base, workbook, n, sink.port, imap_port)
    assert config.mail.smtp is not None
    campaign = config.campaign(CAMPAIGN_ID)
    say(f"ingest: opening the campaign: tick at opens, {n} requests over SMTP")
    with Store.open(config.store) as store, Stopwatch() as opening:
        engine = Engine(config, store, SmtpTransport(config.mail.smtp), FixedClock(campaign.opens))
        report = engine.tick()
        assert len(report.sent) == n and not report.failed and not report.compose_errors, report
        keys = engine.layout(campaign).keys
        sent = set(report.sent)
        requests = [
            (row.delegation, store.body(row.id)) for row in store.outbox(campaign=CAMPAIGN_ID) if row.id in sent
        ]
    assert sink.received().messages == n
    say(f"ingest: writing {n} replies, each with its request copy filled in ({len(keys)} actions, openpyxl)")
    answers = {key: INSTITUTIONS[index % len(INSTITUTIONS)] for index, key in enumerate(keys)}
    replies: list[bytes] = []
    with Stopwatch() as build:
        for delegation_id, raw in requests:
            request = email.message_from_bytes(raw, policy=email.policy.default)
            name, data = workbook_of(request)
            contact = config.delegation(delegation_id).contacts[0]
            replies.append(reply_to(request, sender=contact, attachments=[(name, fill_workbook(data, answers))]))
    return Corpus(config, config.store, replies, len(keys), opening.seconds, build.seconds)


def _copy_store(source: Path, target: Path) -> None:
    with closing(sqlite3.connect(source)) as src, closing(sqlite3.connect(target)) as dst:
        src.backup(dst)


def _append_all(account: ImapAccount, replies: list[bytes]) -> float:
    with Stopwatch() as watch, account.client() as client:
        for raw in replies:
            client.append("INBOX", raw)
    return watch.seconds


def _timed(owner: object, name: str, spent: dict[str, float]) -> None:
    """Replace ``owner.name`` (on that instance only) by a wrapper adding its wall time to ``spent[name]``."""
    method: Callable[..., Any] = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - start

    setattr(owner, name, functools.wraps(method)(timed))


@contextlib.contextmanager
def _reader_peaks() -> Iterator[list[float]]:
    """Peak RSS (MB) of each reader process mailflow stops while this is entered (read from /proc before it ends)."""
    peaks: list[float] = []
    stop = _Worker.stop

    def stop_measured(worker: _Worker, *, kill: bool = False) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            status = Path(f"/proc/{worker.process.pid}/status").read_text()
            line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
            peaks.append(int(line.split()[1]) / 1024)
        return stop(worker, kill=kill)

    _Worker.stop = stop_measured  # type: ignore[method-assign,assignment]
    try:
        yield peaks
    finally:
        _Worker.stop = stop  # type: ignore[method-assign]


@dataclass
class MailflowRun:
    seconds: float
    spent: dict[str, float]
    append_seconds: float
    rss_after: float
    child_rss: float


def _mailflow_run(corpus: Corpus, base: Path, index: int, dovecot: DovecotServer, sink: SmtpSink) -> MailflowRun:
    config = corpus.config
    n = len(corpus.replies)
    assert config.mail.smtp is not None and config.mail.imap is not None
    account = dovecot.new_account()
    appended = _append_all(account, corpus.replies)
    imap = replace(config.mail.imap, username=account.user, password=account.password)
    db = base / f"mailflow-{index}.db"
    _copy_store(corpus.opening_store, db)
    now = config.campaign(CAMPAIGN_ID).opens + REPLY_DELAY
    before = sink.received().messages
    say(f"ingest: mailflow tick, {n} replies in {account.user}'s INBOX")
    with Store.open(db) as store:
        engine = Engine(config, store, SmtpTransport(config.mail.smtp), FixedClock(now), mailbox=ImapMailbox(imap))
        spent: dict[str, float] = {}
        intake: Intake = engine.intake
        for name in ("read_inbox", "_start", "_conclude", "record", "_move"):
            _timed(intake, name, spent)
        for name in ("plan", "compose_bytes", "send_pending"):
            _timed(engine, name, spent)
        with _reader_peaks() as reader_peaks, Stopwatch() as tick:
            report = engine.tick()
        reader_rss = max(reader_peaks, default=0.0)
        rss_after = peak_rss_mb()
        inbox = report.inbox
        assert inbox is not None and inbox.error is None, inbox
        assert inbox.by_outcome == {"applied": n} and inbox.moved == n, inbox
        assert len(report.sent) == n and not report.failed and not report.retried and not report.compose_errors
        sent = set(report.sent)
        kinds = Counter(row.kind for row in store.outbox(campaign=CAMPAIGN_ID) if row.id in sent)
        assert kinds == Counter({"receipt": n}), kinds
        states = Counter(row.state.value for row in store.states(CAMPAIGN_ID).values())
        assert states == Counter({"complete": n}), states
        recorded = sum(len(answers) for answers in store.current_answers(CAMPAIGN_ID).values())
        assert recorded == n * corpus.actions, recorded
    received = sink.received().messages - before
    assert received == n, f"the SMTP server received {received} follow-ups of {n}"
    with account.client() as client:
        client.select_folder("INBOX")
        left = len(client.search(["ALL"]))
        client.select_folder(PROCESSED_FOLDER)
        moved = len(client.search(["ALL"]))
    assert (left, moved) == (0, n), f"{left} left in INBOX, {moved} in {PROCESSED_FOLDER}"
    say(f"ingest: mailflow tick took {tick.seconds:.2f} s (intake {spent.get('read_inbox', 0.0):.2f} s)")
    return MailflowRun(tick.seconds, spent, appended, rss_after, reader_rss)


@dataclass
class BaselineRun:
    seconds: float
    messages: int
    rows: int


def _answers(grid: list[list[Any]], uid: int) -> list[tuple[int, str, str]]:
    """(uid, code, answer) for every answered row below the header row holding "Code" and "Responsible"."""
    for index, cells in enumerate(grid):
        if "Code" in cells and "Responsible" in cells:
            key, fill = cells.index("Code"), cells.index("Responsible")
            return [
                (uid, str(row[key]), str(row[fill]))
                for row in grid[index + 1 :]
                if len(row) > max(key, fill) and row[key] != "" and row[fill] != ""
            ]
    return []


def _baseline_run(corpus: Corpus, base: Path, index: int, dovecot: DovecotServer) -> BaselineRun:
    account = dovecot.new_account()
    _append_all(account, corpus.replies)
    db = base / f"baseline-{index}.db"
    say(f"ingest: baseline, {len(corpus.replies)} replies in {account.user}'s INBOX")
    messages = rows = 0
    with Stopwatch() as watch:
        connection = sqlite3.connect(db, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("CREATE TABLE answer (uid INTEGER, code TEXT, value TEXT)")
        client = IMAPClient(account.host, port=account.port, ssl=False, timeout=60)
        client.login(account.user, account.password)
        client.select_folder("INBOX")
        uids = sorted(client.search(["ALL"]))
        for start in range(0, len(uids), FETCH_BATCH):
            batch = uids[start : start + FETCH_BATCH]
            fetched = client.fetch(batch, [b"BODY.PEEK[]"])
            for uid in batch:
                message = email.message_from_bytes(fetched[uid][b"BODY[]"])
                found: list[tuple[int, str, str]] = []
                for part in message.walk():
                    filename = part.get_filename()
                    payload = part.get_payload(decode=True)
                    if not filename or not filename.lower().endswith(".xlsx") or not isinstance(payload, bytes):
                        continue
                    book = python_calamine.CalamineWorkbook.from_filelike(io.BytesIO(payload))
                    found += _answers(book.get_sheet_by_index(0).to_python(), uid)
                connection.execute("BEGIN")
                connection.executemany("INSERT INTO answer VALUES (?, ?, ?)", found)
                connection.execute("COMMIT")
                messages += 1
                rows += len(found)
        client.logout()
        connection.close()
    say(f"ingest: baseline took {watch.seconds:.2f} s")
    return BaselineRun(watch.seconds, messages, rows)


def run(*, quick: bool = False) -> list[str]:
    sizes = QUICK if quick else FULL
    n = sizes.replies
    mailflow_runs: list[MailflowRun] = []
    baseline_runs: list[BaselineRun] = []
    root = _dovecot_root()
    try:
        try:
            server = DovecotServer(root, {})
        except RigError as exc:  # not installed, or not root: say so instead of a traceback
            return [f"ingest: not run: {exc}"]
        with (
            tempfile.TemporaryDirectory(prefix="mailflow-bench-ingest-") as tmp,
            server as dovecot,
            SmtpSink("process") as sink,
        ):
            base = Path(tmp)
            corpus = _corpus(base, n, sink, dovecot.port)
            reply_bytes = sum(len(raw) for raw in corpus.replies)
            for index in range(sizes.runs):
                mailflow_runs.append(_mailflow_run(corpus, base, index, dovecot, sink))
                baseline_runs.append(_baseline_run(corpus, base, index, dovecot))
                last = baseline_runs[-1]
                assert last.messages == n and last.rows == n * corpus.actions, (last.messages, last.rows)
            sink_description = sink.description
    finally:
        shutil.rmtree(root, ignore_errors=True)

    best = min(mailflow_runs, key=lambda r: r.spent.get("read_inbox", r.seconds))
    baseline = min(r.seconds for r in baseline_runs)
    intake = best.spent["read_inbox"]
    follow_ups = sum(best.spent.get(name, 0.0) for name in ("plan", "send_pending"))  # composing is inside sending
    ratio = intake / baseline
    tick_ratio = best.seconds / baseline
    steps = ("_start", "_conclude", "record", "_move")
    inside = sum(best.spent.get(name, 0.0) for name in steps)
    rest = intake - inside
    runs = sizes.runs
    per = 1000 / n
    return [
        f"ingest: one tick reading {n} replies (each a {corpus.actions}-action workbook, "
        f"{reply_bytes / n / 1024:.1f} KB a message) from a private Dovecot on loopback; follow-ups to "
        f"{sink_description}; best of {runs}, interleaved",
        f"  baseline (imapclient fetch + email parse + calamine + SQLite insert)  {seconds(baseline):>8}"
        f"   {per * baseline:5.1f} ms/msg   runs {_runs([r.seconds for r in baseline_runs])}",
        f"  mailflow intake (Intake.read_inbox)                                  {seconds(intake):>8}"
        f"   {per * intake:5.1f} ms/msg   runs {_runs([r.spent['read_inbox'] for r in mailflow_runs])}"
        f"   ratio {ratio:.2f}x (target <= {TARGET_RATIO}x)  {verdict(ratio <= TARGET_RATIO)}",
        f"    inside it: start {seconds(best.spent.get('_start', 0.0))} (parse, attribute, hand the workbooks to "
        f"the reader process), conclude {seconds(best.spent.get('_conclude', 0.0))} (wait for the readings, "
        f"choose the follow-up), record {seconds(best.spent.get('record', 0.0))} (each message in a savepoint, "
        f"raw kept), move {seconds(best.spent.get('_move', 0.0))}, the rest {seconds(rest)} (connect, search, "
        "fetch, duplicate check, batch commits)",
        f"  mailflow whole tick (intake + {n} follow-ups)                          {seconds(best.seconds):>8}"
        f"   {per * best.seconds:5.1f} ms/msg   ratio {tick_ratio:.2f}x the baseline (no target: the baseline "
        "sends nothing)",
        f"    follow-ups: plan {seconds(best.spent.get('plan', 0.0))}, send "
        f"{seconds(best.spent.get('send_pending', 0.0))} (of which composing "
        f"{seconds(best.spent.get('compose_bytes', 0.0))})  (together {seconds(follow_ups)})",
        f"  checked: {n} applied and moved, {n} receipts received by the SMTP server, {n} delegations complete; "
        f"baseline inserted {n} x {corpus.actions} = {n * corpus.actions:,} rows",
        f"  set-up: opening tick {seconds(corpus.opening_seconds)}, replies written {seconds(corpus.build_seconds)}, "
        f"APPEND of {n} messages {seconds(best.append_seconds)}; peak RSS {best.rss_after:.0f} MB "
        f"(its reader process: {best.child_rss:.0f} MB)",
    ]


def _runs(values: list[float]) -> str:
    return ", ".join(f"{value:.2f}" for value in values)
