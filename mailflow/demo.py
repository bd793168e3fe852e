"""``mailflow demo``: a whole RCM campaign in a few seconds, with no mail server and no setup.

:func:`run_demo` makes a working folder with the example configuration on
the embedded local transport, the sample Strategic Plan and a fresh store,
then plays the campaign on an accelerated clock, from the opening of the
requests to past the last overdue notice. Every 30 simulated minutes, and at
each instant a reply lands (as ``mailflow run`` does, answering at once),
the real :class:`~mailflow.engine.Engine` runs one tick: it reads the local
inbox and sends what is due into the local outbox.

The eleven delegations are played by a :class:`Simulator`. Like a liaison
officer, it only sees what mailflow sent it (the outbox maildir, addressed by
``X-Mailflow-Delegation``) and answers with real emails dropped into the inbox
maildir, in its own office hours: a workbook filled in the copy it received
(fingerprint kept), a reply with the answers in the text, a password-protected
file, an out-of-office auto-reply, or nothing at all.

The timeline printed as it goes is read back from what mailflow recorded (the
tick's report, the store's received messages, attachments, answers, states
and outbox), never from the simulator's intentions: if mailflow misread a
reply, the timeline would show it. At the end come the status table, the
consolidated workbook and the last digest's HTML, written into the folder.

Everything is deterministic: fixed instants, a fixed fingerprint key, replies
with fixed Message-IDs; only the wall time taken varies.
"""

from __future__ import annotations

import hashlib
import io
import mailbox
import shutil
import struct
import sys
import time as wall
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from email import message_from_bytes
from email import policy as email_policy
from email.message import EmailMessage
from email.utils import format_datetime as rfc2822_date
from email.utils import parseaddr
from pathlib import Path
from typing import Any, TextIO
from zoneinfo import ZoneInfo

import yaml

import mailflow
from mailflow import schedule
from mailflow.checks import load_checked_config
from mailflow.clock import FixedClock
from mailflow.config import Campaign, Config, Delegation
from mailflow.consolidate import consolidated_workbook, write_consolidated
from mailflow.engine import DIGEST, CampaignStatus, DelegationStatus, Engine, TickReport
from mailflow.errors import MailflowError, UsageError
from mailflow.intake import APPLIED, AUTO_REPLY, BOUNCE, HELD, MISSING, RECEIPT, UNREADABLE
from mailflow.mailbox import MaildirMailbox
from mailflow.render import format_date
from mailflow.report import format_status_table
from mailflow.sender import LocalTransport
from mailflow.store import DelegationState, Store
from mailflow.workbook import find_column

# -- the working folder -------------------------------------------------------

#: The file that says "this folder was made by mailflow demo": only then is it emptied on a new run.
MARKER = ".mailflow-demo"
CONFIG_NAME = "mailflow.yaml"
STORE_NAME = "mailflow.db"
OUTBOX_NAME = "outbox"
INBOX_NAME = "inbox"
CONSOLIDATED_NAME = "consolidated.xlsx"
DIGEST_NAME = "last-digest.html"
#: The store's companions (SQLite journals, the instance lock of ``mailflow run``).
STORE_SUFFIXES = ("", "-wal", "-shm", "-journal", ".lock")
#: Fixed, so that every run makes the same workbooks (a real deployment keeps a random key in its store).
DEMO_FINGERPRINT_SECRET = "mailflow-demo-not-a-secret"

# -- the simulated calendar ---------------------------------------------------

#: How often the engine ticks between replies.
DEFAULT_TICK = timedelta(minutes=30)
#: The simulation goes on this many days after the last scheduled notice, to show the quiet that follows.
DAYS_AFTER_LAST_NOTICE = 3
#: ... and stops at this hour (secretariat time) of that day.
END_HOUR = time(12, 0)

MARKER_TEXT = (
    "This folder was made by `mailflow demo`.\n"
    "Running the demo again with this folder empties it of what the demo made and makes it anew;\n"
    "anything else you put here is left alone.\n"
)


@dataclass(frozen=True)
class TimelineEntry:
    """One thing that happened, as mailflow recorded it."""

    at: datetime  # aware UTC
    delegation: str  # id, or "" for the Secretariat (the digest)
    who: str  # "Costa Rica (CR)", "Secretariat"
    text: str  # "→ request sent", "← reply: 40/40 answered (complete)"

    def line(self, tz: ZoneInfo, width: int = 0) -> str:
        return f"{short_time(self.at, tz)}  {self.who.ljust(width)}  {self.text}"


@dataclass(frozen=True)
class DemoResult:
    """What a demo run made and what became of every delegation."""

    folder: Path
    config_path: Path
    consolidated_path: Path
    digest_path: Path | None  # None when the configuration has no digest
    timeline: tuple[str, ...]  # the lines printed, one per thing that happened
    entries: tuple[TimelineEntry, ...]
    statuses: tuple[DelegationStatus, ...]  # the campaign's final status, one per delegation
    started_at: datetime  # the simulated span (aware UTC)
    ended_at: datetime
    elapsed_seconds: float  # wall time

    def status_of(self, delegation_id: str) -> DelegationStatus:
        for status in self.statuses:
            if status.id == delegation_id:
                return status
        raise KeyError(delegation_id)


_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def short_time(moment: datetime, tz: ZoneInfo) -> str:
    """``Wed 18 Oct 10:00`` in ``tz``: the same in every locale."""
    local = moment.astimezone(tz)
    return f"{_WEEKDAYS[local.weekday()]} {local.day:02d} {_MONTHS[local.month - 1]} {local:%H:%M}"


# ==========================================================================
# The folder and its configuration
# ==========================================================================


def repository_root() -> Path:
    """Where ``config.example.yaml`` and ``templates/`` live: the folder above the package."""
    return Path(mailflow.__file__).resolve().parent.parent


def _owned_names(workbook_name: str) -> list[str]:
    names = [MARKER, CONFIG_NAME, OUTBOX_NAME, INBOX_NAME, CONSOLIDATED_NAME, DIGEST_NAME, workbook_name]
    names.extend(STORE_NAME + suffix for suffix in STORE_SUFFIXES)
    return names


def prepare_folder(folder: Path, workbook_name: str) -> Path:
    """Make ``folder`` ready for a demo: create it, or empty a previous demo's folder.

    A folder that exists, is not empty and has no :data:`MARKER` is refused
    (nothing in it is touched). In a previous demo's folder only what a demo
    makes is removed."""
    folder = folder.expanduser().absolute()
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} is not a folder; give the demo a new or empty folder")
    if folder.is_dir():
        try:
            entries = list(folder.iterdir())
        except OSError as exc:
            raise MailflowError(f"cannot read the demo folder {folder}: {exc.strerror or exc}") from exc
        if entries and not (folder / MARKER).is_file():
            raise UsageError(
                f"{folder} is not empty and is not a mailflow demo folder (it has no {MARKER} file); "
                "nothing was changed: give the demo a new or empty folder"
            )
        for name in _owned_names(workbook_name):
            _remove(folder / name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MARKER).write_text(MARKER_TEXT, encoding="utf-8")
    except OSError as exc:
        raise MailflowError(f"cannot create the demo folder {folder}: {exc.strerror or exc}") from exc
    return folder


def _remove(path: Path) -> None:
    """Remove a file, a link (never what it points to) or a folder the demo made."""
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
    except OSError as exc:
        raise MailflowError(f"cannot empty the demo folder: {path}: {exc.strerror or exc}") from exc


def _example_data(example: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(example.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise MailflowError(f"cannot read the example configuration {example}: {exc}") from exc
    if not isinstance(data, dict) or not data.get("campaigns"):
        raise MailflowError(f"the example configuration {example} has no campaigns to play")
    return data


def _master_of(data: Mapping[str, Any], example: Path) -> Path:
    """The example's first campaign workbook, as an absolute path."""
    workbook = Path(str(data["campaigns"][0]["workbook"]))
    return workbook if workbook.is_absolute() else example.parent / workbook


def write_demo_config(folder: Path, example: Path, data: dict[str, Any]) -> Path:
    """``mailflow.yaml`` in ``folder``: the example on the local transport, everything inside the folder."""
    master = _master_of(data, example)
    try:
        shutil.copyfile(master, folder / master.name)
    except OSError as exc:
        raise MailflowError(f"cannot copy the sample plan {master} into {folder}: {exc.strerror or exc}") from exc
    data = dict(data)
    data["mail"] = {"transport": "local", "local": {"outbox": OUTBOX_NAME, "inbox": INBOX_NAME}}
    data["store"] = STORE_NAME
    data["fingerprint_secret"] = DEMO_FINGERPRINT_SECRET
    templates = data.get("templates")
    if templates and not Path(str(templates)).is_absolute():
        data["templates"] = str(example.parent / str(templates))
    campaigns = [dict(c) for c in data["campaigns"]]
    for campaign in campaigns:
        workbook = Path(str(campaign.get("workbook", "")))
        campaign["workbook"] = master.name if workbook.name == master.name else str(example.parent / workbook)
    data["campaigns"] = campaigns
    header = (
        f"# Made by `mailflow demo` from {example}\n"
        "# (every option is documented there). The emails mailflow sent are in outbox/new/,\n"
        "# the replies of the simulated delegations in inbox/. The demo's clock stopped at the\n"
        "# end of the campaign: add --now to see the status as of a simulated instant.\n"
        "# fingerprint_secret is fixed so that the demo is reproducible: never do that for real.\n\n"
    )
    path = folder / CONFIG_NAME
    try:
        path.write_text(header + yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    except OSError as exc:
        raise MailflowError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path


# ==========================================================================
# What each delegation answers: plausible institutions (fictional contacts)
# ==========================================================================

CHILD, MIGRATION, FOREIGN, STATISTICS = "child", "migration", "foreign", "statistics"

INSTITUTIONS: Mapping[str, Mapping[str, str]] = {
    "BZ": {
        CHILD: "Department of Human Services",
        MIGRATION: "Immigration and Nationality Department",
        FOREIGN: "Ministry of Foreign Affairs",
        STATISTICS: "Statistical Institute of Belize",
    },
    "CA": {
        CHILD: "Provincial and territorial child welfare authorities",
        MIGRATION: "Immigration, Refugees and Citizenship Canada",
        FOREIGN: "Global Affairs Canada",
        STATISTICS: "Statistics Canada",
    },
    "CR": {
        CHILD: "Patronato Nacional de la Infancia",
        MIGRATION: "Dirección General de Migración y Extranjería",
        FOREIGN: "Ministerio de Relaciones Exteriores y Culto",
        STATISTICS: "Instituto Nacional de Estadística y Censos",
    },
    "DO": {
        CHILD: "Consejo Nacional para la Niñez y la Adolescencia",
        MIGRATION: "Dirección General de Migración",
        FOREIGN: "Ministerio de Relaciones Exteriores",
        STATISTICS: "Oficina Nacional de Estadística",
    },
    "SV": {
        CHILD: "Consejo Nacional de la Niñez y de la Adolescencia",
        MIGRATION: "Dirección General de Migración y Extranjería",
        FOREIGN: "Ministerio de Relaciones Exteriores",
        STATISTICS: "Dirección General de Estadística y Censos",
    },
    "GT": {
        CHILD: "Secretaría de Bienestar Social de la Presidencia",
        MIGRATION: "Dirección General de Migración",
        FOREIGN: "Ministerio de Relaciones Exteriores",
        STATISTICS: "Instituto Nacional de Estadística",
    },
    "HN": {
        CHILD: "Dirección de Niñez, Adolescencia y Familia",
        MIGRATION: "Instituto Nacional de Migración",
        FOREIGN: "Secretaría de Relaciones Exteriores y Cooperación Internacional",
        STATISTICS: "Instituto Nacional de Estadística",
    },
    "MX": {
        CHILD: "Sistema Nacional para el Desarrollo Integral de la Familia",
        MIGRATION: "Instituto Nacional de Migración",
        FOREIGN: "Secretaría de Relaciones Exteriores",
        STATISTICS: "Instituto Nacional de Estadística y Geografía",
    },
    "NI": {
        CHILD: "Ministerio de la Familia, Adolescencia y Niñez",
        MIGRATION: "Dirección General de Migración y Extranjería",
        FOREIGN: "Ministerio de Relaciones Exteriores",
        STATISTICS: "Instituto Nacional de Información de Desarrollo",
    },
    "PA": {
        CHILD: "Secretaría Nacional de Niñez, Adolescencia y Familia",
        MIGRATION: "Servicio Nacional de Migración",
        FOREIGN: "Ministerio de Relaciones Exteriores",
        STATISTICS: "Instituto Nacional de Estadística y Censo",
    },
    "US": {
        CHILD: "Office of Refugee Resettlement (HHS)",
        MIGRATION: "U.S. Citizenship and Immigration Services",
        FOREIGN: "Department of State",
        STATISTICS: "Office of Immigration Statistics (DHS)",
    },
}

#: Which institution answers for an action: by strategic line, then a few actions of their own.
ROLE_BY_LINE = {"1": CHILD, "2": MIGRATION, "3": CHILD, "4": STATISTICS, "5": FOREIGN}
ROLE_BY_KEY = {
    "1.3": FOREIGN,  # consular staff
    "2.4": f"{MIGRATION}+{CHILD}",  # referral routes
    "2.5": CHILD,  # best-interests assessments
    "3.2": FOREIGN,  # consular notification
    "3.7": MIGRATION,  # reception at airports and borders
    "4.3": FOREIGN,  # liaison officers' channel
    "4.4": CHILD,
    "4.7": FOREIGN,
    "4.8": MIGRATION,
    "5.2": f"{CHILD}+{MIGRATION}",  # inter-institutional committees
}


def demo_answers(delegation: Delegation, keys: Sequence[str]) -> dict[str, str]:
    """The institution the simulated ``delegation`` names for each key (the same on every run)."""
    fallback = (
        {role: f"Ministerio de Relaciones Exteriores de {delegation.name}" for role in ROLE_BY_LINE.values()}
        if delegation.language == "es"
        else {role: f"Ministry of Foreign Affairs of {delegation.name}" for role in ROLE_BY_LINE.values()}
    )
    names = INSTITUTIONS.get(delegation.id, fallback)
    answers = {}
    for key in keys:
        roles = ROLE_BY_KEY.get(key) or ROLE_BY_LINE.get(key.partition(".")[0], CHILD)
        answers[key] = " / ".join(names[role] for role in roles.split("+"))
    return answers


def _home_institution(delegation: Delegation) -> str:
    names = INSTITUTIONS.get(delegation.id)
    return names[FOREIGN] if names else delegation.name


# ==========================================================================
# The simulated delegations
# ==========================================================================

# What a delegation sends.
COMPLETE = "complete"  # the workbook it received, every action filled
PARTIAL = "partial"  # the workbook, three actions in four filled
REST = "rest"  # the workbook, only the actions left out of PARTIAL
ENCRYPTED = "encrypted"  # a password-protected file (an OLE2 container with an encrypted package)
OUT_OF_OFFICE = "out_of_office"  # an automatic reply
BODY = "body"  # no file: "1.1: institution" lines in the text


@dataclass(frozen=True)
class Cue:
    """On the ``nth`` email of ``kind`` it receives, the delegation sends ``send``.

    When: after ``delay`` if given (an automatic reply), else at ``at`` (its
    local time) ``working_days`` working days after the day it received it."""

    kind: str
    nth: int
    send: str
    working_days: int = 0
    at: time = time(10, 0)
    delay: timedelta | None = None


#: The cast. A delegation without a script never answers.
SCRIPT: Mapping[str, tuple[Cue, ...]] = {
    # Answers completely at once: the morning after the request.
    "CR": (Cue("request", 1, COMPLETE, working_days=1, at=time(9, 30)),),
    # Partially on the first reminder, the rest after mailflow says what is missing.
    "GT": (
        Cue("reminder", 1, PARTIAL, at=time(11, 0)),
        Cue(MISSING, 1, REST, working_days=1, at=time(10, 15)),
    ),
    # A password-protected file, then a good one once told it cannot be read.
    "SV": (
        Cue("request", 1, ENCRYPTED, working_days=1, at=time(15, 0)),
        Cue(UNREADABLE, 1, COMPLETE, at=time(15, 50)),
    ),
    # Out of the office when the request arrives; answers on the deadline day.
    "MX": (
        Cue("request", 1, OUT_OF_OFFICE, delay=timedelta(minutes=1)),
        Cue("reminder", 2, COMPLETE, at=time(12, 0)),
    ),
    # No file: the answers typed in the email, on the deadline day.
    "HN": (Cue("reminder", 2, BODY, at=time(16, 30)),),
    # Only after the second overdue notice.
    "NI": (Cue("overdue", 2, COMPLETE, working_days=1, at=time(10, 0)),),
    # Belize never answers.
    # The others answer completely before the deadline, in their own office hours.
    "CA": (Cue("request", 1, COMPLETE, working_days=2, at=time(14, 0)),),
    "PA": (Cue("reminder", 1, COMPLETE, at=time(10, 30)),),
    "US": (Cue("reminder", 1, COMPLETE, working_days=1, at=time(11, 0)),),
    "DO": (Cue("reminder", 2, COMPLETE, at=time(11, 45)),),
}

#: What the cast does, for the introduction (the timeline itself only tells what mailflow recorded).
CAST: tuple[tuple[tuple[str, ...], str], ...] = (
    (("CR",), "answers completely the morning after the request"),
    (("GT",), "sends part of the plan, then the rest once mailflow says what is missing"),
    (("SV",), "sends a password-protected file, then a good one"),
    (("MX",), "is out of the office at first (automatic reply), answers on the deadline day"),
    (("HN",), "writes its answers in the text of the email"),
    (("NI",), "answers only after the second overdue notice"),
    (("BZ",), "never answers"),
    (("CA", "DO", "PA", "US"), "answer completely before the deadline, in their own office hours"),
)


@dataclass(frozen=True)
class Received:
    """One email mailflow sent, as the recipient finds it."""

    kind: str
    delegation: str
    nth: int  # 1 for the first email of this kind the delegation received
    message: EmailMessage
    at: datetime


@dataclass(order=True)
class _Outgoing:
    at: datetime
    sequence: int
    delegation: str = field(compare=False)
    raw: bytes = field(compare=False)


class Simulator:
    """The delegations: read what mailflow sent them, answer in their office hours into the inbox."""

    def __init__(self, config: Config, campaign: Campaign, keys: Sequence[str]) -> None:
        self.config = config
        self.campaign = campaign
        self.keys = tuple(keys)
        self._outbox = mailbox.Maildir(config.mail.local.outbox, create=True)
        self._inbox = mailbox.Maildir(config.mail.local.inbox, create=True)
        self._read: set[str] = set()
        self._counts: dict[tuple[str, str], int] = {}
        self._queue: list[_Outgoing] = []
        self._sequence = 0
        self.last_digest: EmailMessage | None = None

    # -- reading what mailflow sent ---------------------------------------------

    def collect(self, now: datetime) -> list[Received]:
        """The emails written to the local outbox since the last look, in the order they were sent."""
        fresh = [key for key in self._outbox.iterkeys() if key not in self._read]
        found: list[tuple[datetime, str, EmailMessage]] = []
        for key in fresh:
            self._read.add(key)
            message = message_from_bytes(self._outbox.get_bytes(key), policy=email_policy.default)
            assert isinstance(message, EmailMessage)
            found.append((_date_of(message, now), key, message))
        received: list[Received] = []
        for _, _, message in sorted(found, key=lambda item: (item[0], item[1])):
            kind = str(message.get("X-Mailflow-Kind", ""))
            if kind == DIGEST:
                self.last_digest = message
                continue
            delegation = str(message.get("X-Mailflow-Delegation", ""))
            if not delegation:
                continue
            count = self._counts.get((delegation, kind), 0) + 1
            self._counts[(delegation, kind)] = count
            received.append(Received(kind, delegation, count, message, now))
        return received

    def react(self, received: Received) -> None:
        """Schedule what the script makes the delegation send in answer to ``received``."""
        delegation = self.config.delegation(received.delegation)
        for cue in SCRIPT.get(received.delegation, ()):
            if cue.kind != received.kind or cue.nth != received.nth:
                continue
            when = _when(received.at, delegation.tz, cue)
            raw = self._compose(cue.send, delegation, received, when)
            self._sequence += 1
            self._queue.append(_Outgoing(when, self._sequence, delegation.id, raw))
        self._queue.sort()

    # -- delivering into the inbox ------------------------------------------------

    def next_delivery(self) -> datetime | None:
        return self._queue[0].at if self._queue else None

    def deliver(self, now: datetime) -> int:
        """Drop into the inbox every reply due by ``now``; how many."""
        count = 0
        while self._queue and self._queue[0].at <= now:
            self._inbox.add(self._queue.pop(0).raw)
            count += 1
        return count

    # -- composing replies ------------------------------------------------------

    def _compose(self, send: str, delegation: Delegation, received: Received, when: datetime) -> bytes:
        message = received.message
        answers = demo_answers(delegation, self.keys)
        left_out = set(self.keys[3::4])
        attachments: list[tuple[str, bytes]] = []
        if send == OUT_OF_OFFICE:
            return _out_of_office(delegation, message, when, self._message_id(delegation, when))
        if send in (COMPLETE, PARTIAL, REST):
            if send == PARTIAL:
                answers = {k: v for k, v in answers.items() if k not in left_out}
            elif send == REST:
                answers = {k: v for k, v in answers.items() if k in left_out}
            name, data = _workbook_of(message)
            attachments.append(
                (name, fill_workbook(data, answers, self.campaign.key_column, self.campaign.fill_column))
            )
        elif send == ENCRYPTED:
            name, _ = _workbook_of(message)
            attachments.append((name, encrypted_workbook(seed=delegation.id)))
        text = _body(send, delegation, answers if send == BODY else {})
        return _reply(delegation, message, when, self._message_id(delegation, when), text, attachments)

    def _message_id(self, delegation: Delegation, when: datetime) -> str:
        domain = delegation.contacts[0].rpartition("@")[2]
        return f"<{when:%Y%m%d%H%M%S}.{delegation.id.lower()}.{self._sequence + 1}@{domain}>"


def _date_of(message: EmailMessage, default: datetime) -> datetime:
    header = message.get("Date")
    moment = getattr(header, "datetime", None) if header is not None else None
    return moment.astimezone(UTC) if isinstance(moment, datetime) and moment.tzinfo else default


def _when(received_at: datetime, tz: ZoneInfo, cue: Cue) -> datetime:
    """When a cue is acted upon: after its delay, or at its local time on a working day."""
    if cue.delay is not None:
        return received_at + cue.delay
    day = received_at.astimezone(tz).date()
    day = _add_working_days(day, cue.working_days)
    moment = datetime.combine(day, cue.at, tzinfo=tz).astimezone(UTC)
    if moment <= received_at:  # that hour has passed: the next working day
        moment = datetime.combine(_add_working_days(day, 1), cue.at, tzinfo=tz).astimezone(UTC)
    return moment


def _add_working_days(day: date, count: int) -> date:
    while count > 0:
        day += timedelta(days=1)
        if day.weekday() < schedule.SATURDAY:
            count -= 1
    while day.weekday() >= schedule.SATURDAY:
        day += timedelta(days=1)
    return day


def _workbook_of(message: EmailMessage) -> tuple[str, bytes]:
    for part in message.iter_attachments():
        payload = part.get_payload(decode=True)
        name = part.get_filename() or ""
        if isinstance(payload, bytes) and name.lower().endswith((".xlsx", ".xlsm")):
            return name, payload
    raise MailflowError(f"the {message.get('X-Mailflow-Kind')} sent to the delegation has no workbook attached")


def fill_workbook(data: bytes, answers: Mapping[str, str], key_column: str, fill_column: str) -> bytes:
    """What a liaison officer does: open the copy received, type each answer in the fill column, save.

    Only cells of the fill column change; the hidden fingerprint and the rest of the workbook are kept."""
    from openpyxl import load_workbook

    book = load_workbook(io.BytesIO(data))
    for sheet in book.worksheets:
        if sheet.sheet_state != "visible":
            continue
        for header in sheet.iter_rows(min_row=1, max_row=min(sheet.max_row, 30)):
            names = [cell.value for cell in header]
            key_index, fill_index = find_column(names, key_column), find_column(names, fill_column)
            if key_index is None or fill_index is None:
                continue
            for row in sheet.iter_rows(min_row=header[0].row + 1):
                if len(row) <= max(key_index, fill_index):
                    continue
                key = row[key_index].value
                if key is not None and str(key).strip() in answers:
                    row[fill_index].value = answers[str(key).strip()]
            out = io.BytesIO()
            book.save(out)
            return out.getvalue()
    raise MailflowError(f"the workbook has no header row with {key_column!r} and {fill_column!r}")


# -- a password-protected file ----------------------------------------------------------

_SECTOR = 512
_END_OF_CHAIN = 0xFFFFFFFE
_FREE = 0xFFFFFFFF
_FAT_SECTOR = 0xFFFFFFFD
_NO_STREAM = 0xFFFFFFFF
_OLE_SIGNATURE = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_MINI_STREAM_CUTOFF = 4096


def encrypted_workbook(seed: str) -> bytes:
    """What Excel saves for a password-protected .xlsx: an OLE2 compound file with an encrypted package.

    A minimal compound file (version 3, 512-byte sectors, one FAT sector, one
    directory sector) holding the ``EncryptionInfo`` and ``EncryptedPackage``
    streams; the package is pseudo-random bytes, so no password opens it."""
    info = b"\x04\x00\x04\x00\x40\x00\x00\x00" + (
        b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\r\n'
        b'<encryption xmlns="http://schemas.microsoft.com/office/2006/encryption">'
        b'<keyData saltSize="16" blockSize="16" keyBits="256" hashSize="64" cipherAlgorithm="AES" '
        b'cipherChaining="ChainingModeCBC" hashAlgorithm="SHA512"/></encryption>'
    )
    package = struct.pack("<Q", 9000) + _noise(seed, 9216)
    # Streams below the mini-stream cutoff would live in the mini stream: keep both above it.
    streams = [
        ("EncryptionInfo", info.ljust(_MINI_STREAM_CUTOFF, b"\0")),
        ("EncryptedPackage", package),
    ]
    fat = [_FAT_SECTOR, _END_OF_CHAIN]  # sector 0: this FAT; sector 1: the directory
    starts: list[int] = []
    body = b""
    for _, data in streams:
        padded = data.ljust(-(-len(data) // _SECTOR) * _SECTOR, b"\0")
        count = len(padded) // _SECTOR
        starts.append(len(fat))
        fat.extend(range(len(fat) + 1, len(fat) + count))
        fat.append(_END_OF_CHAIN)
        body += padded
    fat.extend([_FREE] * (_SECTOR // 4 - len(fat)))
    directory = _dir_entry("Root Entry", 5, _END_OF_CHAIN, 0, child=1)
    # Siblings are ordered by name length: "EncryptionInfo" (14) < "EncryptedPackage" (16).
    directory += _dir_entry(streams[0][0], 2, starts[0], len(streams[0][1]), right=2)
    directory += _dir_entry(streams[1][0], 2, starts[1], len(streams[1][1]))
    directory += _dir_entry("", 0, 0, 0)
    header = (
        _OLE_SIGNATURE
        + bytes(16)  # CLSID
        + struct.pack("<HHHHH", 0x003E, 3, 0xFFFE, 9, 6)  # versions, byte order, sector shifts
        + bytes(6)
        + struct.pack("<IIIIIIIII", 0, 1, 1, 0, _MINI_STREAM_CUTOFF, _END_OF_CHAIN, 0, _END_OF_CHAIN, 0)
        + struct.pack("<109I", 0, *([_FREE] * 108))  # DIFAT: the one FAT sector
    )
    return header + struct.pack(f"<{len(fat)}I", *fat) + directory + body


def _dir_entry(
    name: str, kind: int, start: int, size: int, *, child: int = _NO_STREAM, right: int = _NO_STREAM
) -> bytes:
    encoded = (name + "\0").encode("utf-16-le") if name else b""
    return (
        encoded.ljust(64, b"\0")
        + struct.pack("<HBB", len(encoded), kind, 1)  # name length, type, colour (black)
        + struct.pack("<III", _NO_STREAM, right, child)  # left, right, child
        + bytes(16 + 4 + 8 + 8)  # CLSID, state bits, creation and modification times
        + struct.pack("<IQ", start, size)
    )


def _noise(seed: str, size: int) -> bytes:
    out = b""
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return out[:size]


# -- the emails ----------------------------------------------------------------

_SIGN_OFF = {
    "es": "Atentamente,\n\nPunto focal de la Red de Funcionarios de Enlace\n{institution}\n{country}",
    "en": "Best regards,\n\nLiaison Officers Network focal point\n{institution}\n{country}",
}
_BODIES = {
    "es": {
        COMPLETE: (
            "Estimados/as colegas de la Secretaría Técnica:\n\nReciban un cordial saludo. Adjunto remitimos el "
            "Plan Estratégico 2017-2022 con la columna «Responsable» completada para {country}."
        ),
        PARTIAL: (
            "Estimados/as colegas de la Secretaría Técnica:\n\nAdjunto remitimos un primer avance del Plan con las "
            "instituciones responsables ya confirmadas. Las acciones restantes siguen en consulta interna y las "
            "enviaremos a la brevedad."
        ),
        REST: (
            "Estimados/as colegas:\n\nConcluida la consulta interna, adjunto remitimos las instituciones responsables "
            "de las acciones que faltaban."
        ),
        ENCRYPTED: "Estimados/as colegas:\n\nAdjunto remitimos el Plan con la columna «Responsable» completada.",
        BODY: (
            "Estimados/as colegas de la Secretaría Técnica:\n\nNo logramos editar el archivo en nuestro equipo; les "
            "indicamos a continuación la institución responsable de cada acción:\n\n{lines}"
        ),
        "again": (
            "Estimados/as colegas:\n\nDisculpen el inconveniente: nuestro sistema protege los archivos con contraseña. "
            "Adjunto nuevamente el Plan completado, guardado sin contraseña."
        ),
    },
    "en": {
        COMPLETE: (
            "Dear colleagues of the Technical Secretariat,\n\nPlease find attached the Strategic Plan 2017-2022 with "
            "the Responsible column completed for {country}."
        ),
        PARTIAL: (
            "Dear colleagues,\n\nPlease find attached a first version with the institutions confirmed so far. The "
            "remaining actions are still under internal consultation; we will send them shortly."
        ),
        REST: "Dear colleagues,\n\nPlease find attached the institutions responsible for the remaining actions.",
        ENCRYPTED: "Dear colleagues,\n\nPlease find attached the Plan with the Responsible column completed.",
        BODY: (
            "Dear colleagues,\n\nWe could not edit the file on our side; here is the institution responsible for "
            "each action:\n\n{lines}"
        ),
        "again": (
            "Dear colleagues,\n\nApologies: our system protects attachments with a password. Please find the "
            "completed Plan attached again, saved without a password."
        ),
    },
}


def _body(send: str, delegation: Delegation, answers: Mapping[str, str]) -> str:
    language = delegation.language if delegation.language in _BODIES else "en"
    texts = _BODIES[language]
    lines = "\n".join(f"{key}: {value}" for key, value in answers.items())
    text = texts[send].format(country=delegation.name, lines=lines)
    sign_off = _SIGN_OFF[language].format(institution=_home_institution(delegation), country=delegation.name)
    return f"{text}\n\n{sign_off}\n"


def _quote(message: EmailMessage, delegation: Delegation, received_at: datetime) -> str:
    """The history a mail client puts under a reply: attribution line, then the original, quoted."""
    body = message.get_body(preferencelist=("plain",))
    original = body.get_content() if isinstance(body, EmailMessage) else ""
    moment = _date_of(message, received_at).astimezone(delegation.tz)
    name, address = parseaddr(str(message.get("From", "")))
    who = f"{name} <{address}>" if name else address
    if delegation.language == "es":
        attribution = f"El {moment:%d/%m/%Y} a las {moment:%H:%M}, {who} escribió:"
    else:
        attribution = f"On {moment:%d/%m/%Y} at {moment:%H:%M}, {who} wrote:"
    quoted = "\n".join(f"> {line}" if line else ">" for line in original.splitlines()[:40])
    return f"\n{attribution}\n{quoted}\n"


#: As mail clients write: CRLF, and a long Message-ID kept whole on its line. (Python folds a header
#: token longer than 78 characters into RFC 2047 encoded words, which no client does for a Message-ID.)
_SEND_POLICY = email_policy.SMTP.clone(max_line_length=998)


def _base_reply(delegation: Delegation, original: EmailMessage, when: datetime, message_id: str) -> EmailMessage:
    reply = EmailMessage()
    label = "Enlace CRM" if delegation.language == "es" else "RCM liaison"
    reply["From"] = f"{label} - {delegation.name} <{delegation.contacts[0]}>"
    reply["To"] = str(original.get("Reply-To") or original.get("From"))
    reply["Date"] = rfc2822_date(when.astimezone(delegation.tz))
    reply["Message-ID"] = message_id
    original_id = str(original.get("Message-ID", "")).strip()
    if original_id:
        references = str(original.get("References", "")).split()
        reply["In-Reply-To"] = original_id
        reply["References"] = " ".join([*references, original_id][-10:])
    return reply


def _reply(
    delegation: Delegation,
    original: EmailMessage,
    when: datetime,
    message_id: str,
    text: str,
    attachments: Sequence[tuple[str, bytes]],
) -> bytes:
    reply = _base_reply(delegation, original, when, message_id)
    reply["Subject"] = f"RE: {original.get('Subject', '')}"
    reply.set_content(text + _quote(original, delegation, when))
    for name, data in attachments:
        reply.add_attachment(
            data,
            maintype="application",
            subtype="vnd.openxmlformats-officedocument.spreadsheetml.sheet",
            filename=name,
        )
    return reply.as_bytes(policy=_SEND_POLICY)


def _out_of_office(delegation: Delegation, original: EmailMessage, when: datetime, message_id: str) -> bytes:
    reply = _base_reply(delegation, original, when, message_id)
    reply["Auto-Submitted"] = "auto-replied"
    reply["X-Auto-Response-Suppress"] = "All"
    if delegation.language == "es":
        reply["Subject"] = "Respuesta automática: fuera de la oficina"
        text = (
            "Gracias por su mensaje. Me encuentro fuera de la oficina en comisión de servicio, con acceso limitado "
            "al correo electrónico, hasta la próxima semana. Su mensaje será atendido a mi regreso.\n"
        )
    else:
        reply["Subject"] = "Automatic reply: out of office"
        text = "Thank you for your message. I am out of the office until next week, with limited access to email.\n"
    reply.set_content(text)
    return reply.as_bytes(policy=_SEND_POLICY)


# ==========================================================================
# The timeline: what mailflow recorded, in words
# ==========================================================================


class Narrator:
    """Turns each tick's report into timeline entries, reading what the store recorded."""

    def __init__(self, config: Config, campaign: Campaign, store: Store) -> None:
        self.config = config
        self.campaign = campaign
        self.store = store
        names = {d.id: f"{d.name} ({d.id})" for d in config.campaign_delegations(campaign)}
        self.names = {"": "Secretariat", **names}
        self.width = max(len(name) for name in self.names.values())

    def entries(self, report: TickReport, now: datetime) -> list[TimelineEntry]:
        out: list[TimelineEntry] = []
        if report.inbox is not None:
            if report.inbox.error:
                out.append(self._entry(now, "", f"! the inbox could not be read: {report.inbox.error}"))
            out.extend(self._received(inbound_id) for inbound_id in report.inbox.recorded)
        out.extend(self._sent(outbox_id) for outbox_id in report.sent)
        for ids, what in ((report.retried, "to retry"), (report.failed, "failed"), (report.compose_errors, "not made")):
            for outbox_id in ids:
                row = self.store.outbox_row(outbox_id)
                out.append(self._entry(now, row.delegation, f"! {row.kind} {what}: {row.last_error or ''}".rstrip()))
        return out

    def _entry(self, at: datetime, delegation: str, text: str) -> TimelineEntry:
        return TimelineEntry(at, delegation, self.names.get(delegation, delegation or "Secretariat"), text)

    def _progress(self, delegation: str) -> str:
        state = self.store.state(self.campaign.id, delegation)
        if state is None:
            return "nothing recorded"
        return f"{state.filled}/{state.total} answered ({state.state.value})"

    def _received(self, inbound_id: int) -> TimelineEntry:
        row = self.store.inbound(inbound_id)
        if row.outcome == AUTO_REPLY:
            text = f"← automatic reply «{row.subject}» (no answer sent)"
        elif row.outcome == HELD:
            text = f"← reply held for review: {row.reason or 'untrusted sender'}"
        elif row.outcome == BOUNCE:
            text = f"← bounce: {row.reason or row.subject}"
        elif row.outcome != APPLIED:
            text = f"← {row.kind} «{row.subject}»: {row.outcome}" + (f" ({row.reason})" if row.reason else "")
        else:
            parts = []
            for attachment in self.store.attachments(inbound_id):
                if attachment.status in ("unreadable", "rejected"):
                    parts.append(f"unreadable file «{attachment.filename}»: {attachment.reason}")
            answers = self.store.answers_from(inbound_id)
            state = self.store.state(row.campaign, row.delegation)
            if answers:
                where = " in the email text" if all(a.source == "body" for a in answers) else ""
                progress = self._progress(row.delegation)
                if state is not None and len(answers) != state.filled:
                    progress = f"{len(answers)} answers, now {progress}"
                parts.insert(0, f"reply{where}: {progress}")
            if not parts:
                parts.append("reply with no workbook and no answers")
            text = "← " + "; ".join(parts)
        return self._entry(row.received_at, row.delegation, text)

    def _sent(self, outbox_id: int) -> TimelineEntry:
        row = self.store.outbox_row(outbox_id)
        at = row.sent_at or row.created_at
        if row.kind == DIGEST:
            states = self.store.states(self.campaign.id)
            complete = sum(1 for s in states.values() if s.state is DelegationState.COMPLETE)
            total = len(self.campaign.delegations)
            text = f"→ digest to {', '.join(row.recipients)} ({complete} of {total} complete)"
            return self._entry(at, "", text)
        if row.kind == schedule.REQUEST:
            text = "→ request sent, with the delegation's own copy of the workbook"
        elif row.kind == schedule.REMINDER:
            delegation = self.config.delegation(row.delegation)
            day = (row.scheduled_at or at).astimezone(delegation.tz).date()
            left = (self.campaign.deadline - day).days
            text = "→ reminder: deadline today" if left <= 0 else f"→ reminder: deadline in {left} day(s)"
        elif row.kind == schedule.OVERDUE:
            text = f"→ overdue notice {row.slot.partition(':')[2] or ''}".rstrip()
        elif row.kind == RECEIPT:
            text = "→ receipt: return complete, thank you"
        elif row.kind == MISSING:
            state = self.store.state(row.campaign, row.delegation)
            count = len(state.missing) if state else 0
            text = f"→ missing: {count} action(s) still to fill, listed one by one"
        elif row.kind == UNREADABLE:
            text = "→ unreadable: says why, asks for the file again"
        else:
            text = f"→ {row.kind} sent"
        return self._entry(at, row.delegation, text)


# ==========================================================================
# The run
# ==========================================================================


def _end_of_demo(config: Config, campaign: Campaign) -> datetime:
    """A few days after the last notice any delegation could receive, at noon, secretariat time."""
    tz = config.secretariat.tz
    last = max(slot.at for d in config.campaign_delegations(campaign) for slot in schedule.slots(campaign, d))
    day = last.astimezone(tz).date() + timedelta(days=DAYS_AFTER_LAST_NOTICE)
    return datetime.combine(day, END_HOUR, tzinfo=tz).astimezone(UTC)


def run_demo(
    folder: Path,
    *,
    out: TextIO = sys.stdout,
    tick_every: timedelta = DEFAULT_TICK,
    pause_per_day: float = 0.0,
) -> DemoResult:
    """Play a whole campaign in ``folder`` and print its timeline to ``out``.

    ``tick_every`` is the simulated time between two ticks when no reply
    lands; ``pause_per_day`` the wall seconds to wait at each simulated day
    that had news (0: as fast as possible), to watch the timeline unfold.
    Raises :class:`UsageError` for a folder that is neither new, empty nor a
    previous demo's."""
    if tick_every <= timedelta(0):
        raise UsageError("tick_every must be a positive duration")
    started = wall.monotonic()
    example = repository_root() / "config.example.yaml"
    if not example.is_file():
        raise MailflowError(f"the example configuration {example} is missing: the demo needs a full mailflow checkout")
    data = _example_data(example)
    folder = prepare_folder(folder, _master_of(data, example).name)
    config_path = write_demo_config(folder, example, data)
    config = load_checked_config(config_path)
    campaign = config.campaigns[0]
    tz = config.secretariat.tz
    start = campaign.opens.astimezone(UTC)
    end = _end_of_demo(config, campaign)

    with Store.open(config.store) as store:
        clock = FixedClock(start)
        engine = Engine(
            config,
            store,
            LocalTransport(config.mail.local.outbox),
            clock,
            mailbox=MaildirMailbox(config.mail.local.inbox),
        )
        keys = engine.layout(campaign).keys
        simulator = Simulator(config, campaign, keys)
        narrator = Narrator(config, campaign, store)
        _introduce(out, config, campaign, folder, start, end, narrator)

        entries: list[TimelineEntry] = []
        lines: list[str] = []
        now, grid, shown_day = start, start, None
        while now <= end:
            simulator.deliver(now)
            clock.set(now)
            report = engine.tick()
            for entry in narrator.entries(report, now):
                day = entry.at.astimezone(tz).date()
                if shown_day is not None and day != shown_day:
                    out.write("\n")
                    if pause_per_day > 0:
                        out.flush()
                        wall.sleep(pause_per_day)
                shown_day = day
                line = entry.line(tz, narrator.width)
                out.write(line + "\n")
                entries.append(entry)
                lines.append(line)
            for received in simulator.collect(now):
                simulator.react(received)
            while grid <= now:
                grid += tick_every
            upcoming = simulator.next_delivery()
            now = min(grid, upcoming) if upcoming is not None and upcoming > now else grid

        final = engine.status(end, campaign.id)
        consolidated_path = folder / CONSOLIDATED_NAME
        data_bytes = consolidated_workbook(config, store, campaign, engine.layout(campaign), now=end)
        write_consolidated(consolidated_path, data_bytes, config=config)

    digest_path = _write_digest(folder, simulator.last_digest)
    elapsed = wall.monotonic() - started
    _conclude(out, config, final, folder, config_path, consolidated_path, digest_path, end)
    out.write(f"\n{(end - start).days} simulated days in {elapsed:.1f} s.\n")
    out.flush()
    return DemoResult(
        folder=folder,
        config_path=config_path,
        consolidated_path=consolidated_path,
        digest_path=digest_path,
        timeline=tuple(lines),
        entries=tuple(entries),
        statuses=final[0].delegations,
        started_at=start,
        ended_at=end,
        elapsed_seconds=elapsed,
    )


def _write_digest(folder: Path, digest: EmailMessage | None) -> Path | None:
    if digest is None:
        return None
    part = digest.get_body(preferencelist=("html",))
    if not isinstance(part, EmailMessage):
        return None
    path = folder / DIGEST_NAME
    try:
        path.write_text(str(part.get_content()), encoding="utf-8")
    except OSError as exc:
        raise MailflowError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path


def _introduce(
    out: TextIO,
    config: Config,
    campaign: Campaign,
    folder: Path,
    start: datetime,
    end: datetime,
    narrator: Narrator,
) -> None:
    tz = config.secretariat.tz
    count = len(campaign.delegations)
    out.write(f"mailflow demo: {campaign.title} [{campaign.id}]\n")
    out.write(f"Working folder: {folder}\n")
    out.write(
        f"{count} delegations; requests at {short_time(start, tz)}, deadline {format_date(campaign.deadline, 'en')} "
        f"(the end of that day in each delegation's time zone); simulated until {short_time(end, tz)}.\n"
    )
    out.write("The delegations are played by a simulator that reads what mailflow sends them and answers:\n")
    for ids, role in CAST:
        who = ", ".join(narrator.names[i] for i in ids if i in campaign.delegations)
        if who:
            out.write(f"  {who}: {role}\n")
    out.write(f"Times in {tz.key}; → sent by mailflow, ← received by mailflow.\n\n")


def _conclude(
    out: TextIO,
    config: Config,
    campaigns: Sequence[CampaignStatus],
    folder: Path,
    config_path: Path,
    consolidated_path: Path,
    digest_path: Path | None,
    end: datetime,
) -> None:
    tz = config.secretariat.tz
    statuses = [status for campaign in campaigns for status in campaign.delegations]
    out.write(f"\nWhere every delegation stands at {short_time(end, tz)}:\n\n")
    out.write(format_status_table(campaigns, tz) + "\n\n")
    out.write(f"Written in {folder}:\n")
    out.write(f"  {consolidated_path}   the consolidated plan: every delegation's answers side by side\n")
    if digest_path is not None:
        out.write(f"  {digest_path}   the last status digest sent to the Secretariat (open it in a browser)\n")
    out.write(f"  {config.mail.local.outbox / 'new'}/   every email mailflow sent, one file each\n")
    out.write(f"  {config.mail.local.inbox}/   every reply the simulated delegations sent\n")
    at = end.astimezone(tz).strftime("%Y-%m-%dT%H:%M")
    out.write("Look further:\n")
    out.write(f"  mailflow --config {config_path} status --now {at}\n")
    # One delegation's whole history: the one still missing, and the one that answered late.
    shown = [s.id for s in statuses if s.state is not DelegationState.COMPLETE][:1]
    shown += [i for i in ("NI",) if any(s.id == i for s in statuses) and i not in shown]
    for delegation_id in shown:
        out.write(f"  mailflow --config {config_path} status --delegation {delegation_id}\n")
