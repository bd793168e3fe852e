"""Load the YAML configuration and validate it into frozen dataclasses.

Every problem is collected and reported in one run, each naming its key and,
where the YAML file tells, its line. Resource checks that need other modules
(workbook headers, templates) live in :mod:`mailflow.checks`, which builds on
the :class:`Config` produced here.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from functools import cache, cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from mailflow.cache import cached
from mailflow.errors import ConfigError

LANGUAGES = ("es", "en")
SECURITY_MODES = ("none", "starttls", "ssl")
TRANSPORTS = ("smtp", "local")
DEFAULT_SMTP_PORTS = {"none": 25, "starttls": 587, "ssl": 465}
DEFAULT_IMAP_PORTS = {"none": 143, "starttls": 143, "ssl": 993}
DEFAULT_SEND_TIME = time(9, 0)
DEFAULT_REMINDERS = (-3, -1, 0)
DEFAULT_OVERDUE_EVERY_DAYS = 2
DEFAULT_OVERDUE_MAX = 3
DEFAULT_TIMEOUT_SECONDS = 30.0
DEFAULT_PROCESSED_FOLDER = "mailflow-processed"
DEFAULT_POLL_INTERVAL_SECONDS = 60
DEFAULT_RETRY_BASE_SECONDS = 300
DEFAULT_RETRY_MAX_SECONDS = 6 * 3600
DEFAULT_LOCAL_OUTBOX = "outbox"
DEFAULT_LOCAL_INBOX = "inbox"
DEFAULT_INBOX_STALE_SECONDS = 2 * 3600
DEFAULT_MAX_MESSAGE_BYTES = 40 * 1024 * 1024
DEFAULT_MAX_ATTACHMENT_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_UNCOMPRESSED_BYTES = 200 * 1024 * 1024
DEFAULT_MAX_COMPRESSION_RATIO = 100
DEFAULT_MAX_FOLLOW_UPS_PER_DAY = 5
DEFAULT_MEETING_DURATION = timedelta(hours=1)
MAX_AGENDA_BYTES = 64 * 1024
SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KB|MB|GB)?\s*$", re.IGNORECASE)
SIZE_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
EMAIL_RE = re.compile(r"^[^@\s<>()\[\],;:\"\\]+@[A-Za-z0-9.-]+\.[A-Za-z0-9-]+$")
# Characters that may not reach an email header: C0 and C1 controls and the Unicode line separators.
CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
OFFSET_RE = re.compile(r"^\s*([+-]?)(\d+)\s*([dhm])\s*$")
DURATION_PART_RE = re.compile(r"\s*(\d+\s*[dhm])")
# Agenda text: any character but the C0/C1 controls other than tab and line breaks.
AGENDA_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# What may not reach a header besides CONTROL_RE: C1 controls and the Unicode line and paragraph separators.
HEADER_UNSAFE_RE = re.compile(r"[\x80-\x9f\u2028\u2029]")
AGENDA_FILE_RE = re.compile(r"^\S+\.(?:txt|md|text)$", re.IGNORECASE)
ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

KeyPath = tuple[str | int, ...]

# yaml.safe_load's loader, in C when PyYAML was built with libyaml (5-10x faster on large files).
SAFE_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# --------------------------------------------------------------------------
# The validated configuration
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SmtpSettings:
    """How to reach the SMTP submission server."""

    host: str
    port: int
    security: str = "starttls"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = DEFAULT_TIMEOUT_SECONDS
    oauth2_token_command: str | None = None  # prints an OAuth2 access token: login with XOAUTH2
    ca_file: Path | None = None  # trust this CA bundle (a private server) instead of the system's


@dataclass(frozen=True)
class ImapSettings:
    """How to reach the IMAP inbox the replies come back to."""

    host: str
    port: int
    security: str = "ssl"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    folder: str = "INBOX"
    processed_folder: str = DEFAULT_PROCESSED_FOLDER
    timeout: float = DEFAULT_TIMEOUT_SECONDS
    poll_interval: int = DEFAULT_POLL_INTERVAL_SECONDS
    oauth2_token_command: str | None = None
    ca_file: Path | None = None


@dataclass(frozen=True)
class LocalSettings:
    """The embedded local transport: maildir folders instead of servers."""

    outbox: Path
    inbox: Path


@dataclass(frozen=True)
class MailSettings:
    """Outgoing and incoming mail."""

    transport: str
    local: LocalSettings
    smtp: SmtpSettings | None = None
    imap: ImapSettings | None = None
    rate_per_minute: int | None = None
    retry_base_seconds: int = DEFAULT_RETRY_BASE_SECONDS
    retry_max_seconds: int = DEFAULT_RETRY_MAX_SECONDS


@dataclass(frozen=True)
class InboundSettings:
    """How received mail is judged and how much of it is read."""

    accept_untrusted: bool = False  # apply replies from unlisted or failing-authentication senders
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_attachment_bytes: int = DEFAULT_MAX_ATTACHMENT_BYTES
    max_uncompressed_bytes: int = DEFAULT_MAX_UNCOMPRESSED_BYTES
    max_compression_ratio: int = DEFAULT_MAX_COMPRESSION_RATIO
    max_follow_ups_per_day: int = DEFAULT_MAX_FOLLOW_UPS_PER_DAY  # answers to one delegation in 24 hours


@dataclass(frozen=True)
class DigestSettings:
    """Who receives the status digest and when (cron, secretariat time zone)."""

    to: tuple[str, ...]
    schedule: str
    inbox_stale_after_seconds: int = DEFAULT_INBOX_STALE_SECONDS  # warn when the inbox was not read for longer
    when_closed: bool = False  # also send when no campaign is open (not yet opened, or closed)
    attach_workbook: bool = True  # attach each open campaign's consolidated workbook


@dataclass(frozen=True)
class Secretariat:
    """The operator: sender of every email, receiver of every reply."""

    name: str
    address: str
    timezone: str
    language: str = "es"
    digest: DigestSettings | None = None

    @property
    def tz(self) -> ZoneInfo:
        return zone(self.timezone)

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2]


@dataclass(frozen=True)
class Delegation:
    """A member country's delegation: who is asked, in which language and time zone."""

    id: str
    name: str
    language: str
    timezone: str
    contacts: tuple[str, ...]

    @property
    def tz(self) -> ZoneInfo:
        return zone(self.timezone)


@dataclass(frozen=True)
class OverduePolicy:
    """Overdue notices: the first the day after the deadline, then every `every_days`, at most `max`."""

    every_days: int = DEFAULT_OVERDUE_EVERY_DAYS
    max: int = DEFAULT_OVERDUE_MAX


@dataclass(frozen=True)
class Campaign:
    """One collection: the workbook every delegation returns filled, and its calendar."""

    id: str
    title: str
    workbook: Path
    key_column: str
    fill_column: str
    opens: datetime  # aware, in the secretariat's time zone
    deadline: date  # ends at the end of that day in each delegation's time zone
    delegations: tuple[str, ...]
    ref: str
    send_time: time = DEFAULT_SEND_TIME
    reminders: tuple[int, ...] = DEFAULT_REMINDERS  # days relative to the deadline, <= 0
    overdue: OverduePolicy = field(default_factory=OverduePolicy)
    skip_weekends: bool = True
    sheet: str | None = None
    attachment_name: Mapping[str, str] = field(default_factory=dict)
    titles: Mapping[str, str] = field(default_factory=dict)  # per language, when given as {es: ..., en: ...}
    closes: date | None = None  # after this day (secretariat time) the campaign is closed: no more emails

    def title_in(self, language: str) -> str:
        """The title in a delegation's language, falling back to the main title."""
        return self.titles.get(language, self.title)


@dataclass(frozen=True)
class Meeting:
    """A (virtual) session: its notice reaches every invited delegation in its own language and local time.

    Recipients are the delegations in ``invite`` (each in its language and time zone) and the ``extra``
    addresses (observers, in the secretariat's language, with the time in the meeting's zone).
    """

    id: str
    title: str
    start: datetime  # aware, in `timezone`
    timezone: str
    duration: timedelta
    invite: tuple[str, ...]  # delegation ids
    link: str | None = None
    agenda: str = ""
    agenda_file: Path | None = None  # where the agenda was read from, when it was given as a file
    extra: tuple[str, ...] = ()
    reminders: tuple[timedelta, ...] = ()  # negative offsets from the start, earliest first
    cancelled: bool = False
    titles: Mapping[str, str] = field(default_factory=dict)  # per language, when given as {es: ..., en: ...}

    def title_in(self, language: str) -> str:
        """The title in a reader's language, falling back to the main title."""
        return self.titles.get(language, self.title)

    @property
    def tz(self) -> ZoneInfo:
        return zone(self.timezone)

    @property
    def end(self) -> datetime:
        return self.start + self.duration


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    path: Path
    secretariat: Secretariat
    mail: MailSettings
    store: Path
    delegations: tuple[Delegation, ...]
    campaigns: tuple[Campaign, ...]
    meetings: tuple[Meeting, ...] = ()
    inbound: InboundSettings = field(default_factory=InboundSettings)
    templates: Path | None = None
    fingerprint_secret: str | None = None
    log_level: str = "INFO"
    source_text: str = field(default="", compare=False, repr=False)

    @cached_property
    def lines(self) -> Mapping[str, int]:
        """Key path -> line in the YAML file; computed only when a message needs it."""
        return key_lines(self.source_text)

    @cached_property
    def _delegations_by_id(self) -> dict[str, Delegation]:
        return {d.id: d for d in self.delegations}

    @cached_property
    def _campaigns_by_id(self) -> dict[str, Campaign]:
        return {c.id: c for c in self.campaigns}

    @cached_property
    def _meetings_by_id(self) -> dict[str, Meeting]:
        return {m.id: m for m in self.meetings}

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def delegation(self, delegation_id: str) -> Delegation:
        return self._delegations_by_id[delegation_id]

    def campaign(self, campaign_id: str) -> Campaign:
        return self._campaigns_by_id[campaign_id]

    def meeting(self, meeting_id: str) -> Meeting:
        return self._meetings_by_id[meeting_id]

    def find_meeting(self, meeting_id: str) -> Meeting | None:
        """The meeting of that id, or None when it is not (or no longer) in the configuration."""
        return self._meetings_by_id.get(meeting_id)

    def campaign_delegations(self, campaign: Campaign) -> list[Delegation]:
        by_id = self._delegations_by_id
        return [by_id[d] for d in campaign.delegations]

    def where(self, path: str) -> str:
        """``key`` or ``key (line N)`` for messages about a key of this config."""
        line = self.lines.get(path)
        return f"{path} (line {line})" if line else path


# --------------------------------------------------------------------------
# Parsing helpers (pure)
# --------------------------------------------------------------------------


@cache
def zone(name: str) -> ZoneInfo:
    """A ZoneInfo by name, cached: zoneinfo's own cache keeps only a few zones, and a network has more."""
    return ZoneInfo(name)


def parse_offset(text: str, units: str = "dhm") -> timedelta:
    """Parse an offset such as ``-3d``, ``0d``, ``+1d`` or ``-1h``."""
    match = OFFSET_RE.match(str(text))
    if not match or match.group(3) not in units:
        allowed = ", ".join(f"-1{u}" for u in units)
        raise ValueError(f"{text!r} is not an offset (expected a signed number and a unit, e.g. {allowed})")
    sign = -1 if match.group(1) == "-" else 1
    amount = int(match.group(2)) * sign
    unit = match.group(3)
    if unit == "d":
        return timedelta(days=amount)
    if unit == "h":
        return timedelta(hours=amount)
    return timedelta(minutes=amount)


def parse_duration(text: str, units: str = "dhm") -> timedelta:
    """Parse a positive duration such as ``2d`` or ``90m``."""
    value = parse_offset(text, units)
    if value <= timedelta(0) or str(text).strip().startswith(("-", "+")):
        raise ValueError(f"{text!r} is not a positive duration (e.g. 2d, 90m)")
    return value


def parse_meeting_duration(text: str) -> timedelta:
    """A meeting's length: ``90m``, ``2h``, or parts of :func:`parse_duration` put together (``1h30m``, ``1h 30m``)."""
    value = str(text)
    parts = DURATION_PART_RE.findall(value)
    if not parts or "".join(parts).replace(" ", "") != value.replace(" ", "").strip():
        raise ValueError(f"{text!r} is not a duration (e.g. 90m, 2h or 1h30m)")
    total = timedelta(0)
    for part in parts:
        total += parse_duration(part.replace(" ", ""))
    return total


def validate_cron(expression: str, timezone: str) -> None:
    """Raise ValueError when ``expression`` is not a 5-field crontab line."""
    from mailflow.cron import cron_trigger

    cron_trigger(expression, zone(timezone))


def substitute_env(value: Any, environ: Mapping[str, str], path: KeyPath, missing: list[KeyPath]) -> Any:
    """Replace ``${NAME}`` (and ``${NAME:-default}``) in every string of a loaded YAML tree."""
    if isinstance(value, str):

        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in environ:
                return environ[name]
            if default is not None:
                return default
            missing.append(path + (f"${{{name}}}",))
            return ""

        return ENV_RE.sub(replace, value)
    if isinstance(value, dict):
        return {k: substitute_env(v, environ, path + (str(k),), missing) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_env(v, environ, path + (i,), missing) for i, v in enumerate(value)]
    return value


def key_lines(text: str) -> dict[str, int]:
    """Map every key path (``campaigns[0].deadline``) to its 1-based line in the YAML text."""
    lines: dict[str, int] = {}
    try:
        root = yaml.compose(text, Loader=SAFE_LOADER)
    except yaml.YAMLError:
        return lines

    def walk(node: yaml.Node, path: KeyPath) -> None:
        lines.setdefault(format_path(path), node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                child = path + (str(key_node.value),)
                lines[format_path(child)] = key_node.start_mark.line + 1
                walk(value_node, child)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, path + (index,))

    if root is not None:
        walk(root, ())
    return lines


def format_path(path: KeyPath) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "(top level)"


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


class _Problems:
    """Collects problems, each with the key it concerns and its line."""

    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self.text = text
        self._lines: Mapping[str, int] | None = None
        self.items: list[tuple[int, str]] = []

    @property
    def lines(self) -> Mapping[str, int]:
        if self._lines is None:
            self._lines = key_lines(self.text)
        return self._lines

    def add(self, path: KeyPath, message: str) -> None:
        key = format_path(path)
        line = self._line(path)
        where = f"{self.source}:{line}" if line else self.source
        self.items.append((line or 0, f"{where}: {key}: {message}"))

    def _line(self, path: KeyPath) -> int | None:
        # An absent key has no line: name the line of its nearest parent.
        for end in range(len(path), -1, -1):
            line = self.lines.get(format_path(path[:end]))
            if line:
                return line
        return None

    def sorted(self) -> list[str]:
        return [message for _, message in sorted(self.items, key=lambda item: item[0])]


class _Reader:
    """Typed access to one mapping of the YAML tree, reporting into _Problems."""

    def __init__(self, problems: _Problems, data: Any, path: KeyPath, allowed: tuple[str, ...]) -> None:
        self.problems = problems
        self.path = path
        self.ok = isinstance(data, dict)
        self.data: dict[str, Any] = data if isinstance(data, dict) else {}
        if data is not None and not self.ok:
            problems.add(path, f"expected a mapping of keys ({', '.join(allowed)}), found {_kind(data)}")
        for key in self.data:
            if key not in allowed:
                hint = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
                suggestion = f"; did you mean '{hint[0]}'?" if hint else f"; known keys: {', '.join(allowed)}"
                problems.add(path + (str(key),), f"unknown key{suggestion}")

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def raw(self, key: str) -> Any:
        return self.data.get(key)

    def string(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        value = self.data.get(key)
        if value is None:
            if required:
                self.problems.add(self.path + (key,), "is required")
            return default
        if isinstance(value, (bool, dict, list)):
            self.problems.add(self.path + (key,), f"expected text, found {_kind(value)}")
            return default
        text = str(value).strip()
        if required and not text:
            self.problems.add(self.path + (key,), "is required and may not be empty")
            return default
        return text

    def integer(self, key: str, default: int | None, *, minimum: int | None = None) -> int | None:
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.problems.add(self.path + (key,), f"expected a whole number, found {value!r}")
            return default
        if minimum is not None and value < minimum:
            self.problems.add(self.path + (key,), f"must be at least {minimum}, found {value}")
            return default
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.problems.add(self.path + (key,), f"expected true or false, found {value!r}")
            return default
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.string(key, default)
        if value not in choices:
            self.problems.add(self.path + (key,), f"must be one of {', '.join(choices)}; found {value!r}")
            return default
        return value

    def timezone(self, key: str, default: str | None = None) -> str | None:
        value = self.string(key, default, required=default is None)
        if value is None:
            return None
        if not _zone_exists(value):
            hint = difflib.get_close_matches(value, _zone_names(), n=1)
            suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
            self.problems.add(self.path + (key,), f"unknown IANA time zone {value!r}{suggestion}")
            return None
        return value

    def address(self, key: str, *, required: bool = True) -> str | None:
        value = self.string(key, required=required)
        if value is None:
            return None
        if not is_address(value):
            self.problems.add(self.path + (key,), f"{value!r} is not an email address")
            return None
        return value

    def addresses(self, key: str, *, required: bool) -> tuple[str, ...]:
        value = self.data.get(key)
        if value is None:
            if required:
                self.problems.add(self.path + (key,), "is required: a list of email addresses")
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            self.problems.add(self.path + (key,), f"expected a list of email addresses, found {_kind(value)}")
            return ()
        good: list[str] = []
        for index, item in enumerate(value):
            if not isinstance(item, str) or not is_address(item.strip()):
                self.problems.add(self.path + (key, index), f"{item!r} is not an email address")
            else:
                good.append(item.strip())
        if required and not value:
            self.problems.add(self.path + (key,), "needs at least one email address")
        return tuple(good)

    def text_line(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        """Text that ends up in an email header: no line breaks or control characters."""
        value = self.string(key, default, required=required)
        if value is not None and CONTROL_RE.search(value):
            self.problems.add(self.path + (key,), "may not contain line breaks or control characters")
            return None
        return value


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{value!r}"


def is_address(value: str) -> bool:
    return bool(EMAIL_RE.match(value)) and not CONTROL_RE.search(value)


_ZONES: list[str] = []


def _zone_names() -> list[str]:
    if not _ZONES:
        import zoneinfo

        _ZONES.extend(sorted(zoneinfo.available_timezones()))
    return _ZONES


def _zone_exists(name: str) -> bool:
    if not name or name.startswith(("/", ".")) or ".." in name:
        return False
    try:
        zone(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


def _resolve_path(base: Path, value: str) -> Path:
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else (base / path)


_TOP_KEYS = (
    "secretariat",
    "mail",
    "store",
    "delegations",
    "campaigns",
    "meetings",
    "inbound",
    "templates",
    "fingerprint_secret",
    "log_level",
)
_SECRETARIAT_KEYS = ("name", "address", "timezone", "language", "digest")
_DIGEST_KEYS = ("to", "schedule", "inbox_stale_after", "when_closed", "attach_workbook")
_MAIL_KEYS = ("transport", "smtp", "imap", "local", "rate_per_minute", "retry")
_AUTH_KEYS = ("username", "password", "oauth2_token_command", "ca_file")
_SMTP_KEYS = ("host", "port", "security", "timeout", *_AUTH_KEYS)
_IMAP_KEYS = (
    "host",
    "port",
    "security",
    "username",
    "password",
    "folder",
    "processed_folder",
    "timeout",
    "poll_interval",
    "oauth2_token_command",
    "ca_file",
)
_LOCAL_KEYS = ("outbox", "inbox")
_RETRY_KEYS = ("base", "max")
_DELEGATION_KEYS = ("id", "name", "language", "timezone", "contacts")
_CAMPAIGN_KEYS = (
    "id",
    "title",
    "ref",
    "workbook",
    "sheet",
    "key_column",
    "fill_column",
    "opens",
    "deadline",
    "closes",
    "send_time",
    "reminders",
    "overdue",
    "skip_weekends",
    "delegations",
    "attachment_name",
)
_OVERDUE_KEYS = ("every", "max")
_MEETING_KEYS = (
    "id",
    "title",
    "start",
    "timezone",
    "duration",
    "link",
    "agenda",
    "invite",
    "extra",
    "reminders",
    "cancelled",
)
_INBOUND_KEYS = (
    "accept_untrusted",
    "max_message_size",
    "max_attachment_size",
    "max_uncompressed_size",
    "max_compression_ratio",
    "max_follow_ups_per_day",
)
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, substitute and validate the configuration at ``path``.

    Raises :class:`ConfigError` listing every problem found."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            [f"{path}: configuration file not found; pass --config PATH or set MAILFLOW_CONFIG"]
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read the configuration: {exc}"]) from None
    environ = os.environ if environ is None else environ
    resolved = str(path.resolve())
    used = sorted(set(ENV_RE.findall(text)))
    return cached(
        "config",
        (resolved, text, [(name, environ.get(name)) for name, _ in used]),
        _dependencies,
        lambda: parse_config(text, path, environ),
        environ=environ,
        min_seconds=CACHE_WHEN_SLOWER_THAN_SECONDS,
        slot=resolved,  # one entry per configuration file: an edited file replaces its entry
        expect=Config,
    )


# A validated configuration is kept between runs (mailflow.cache) when it took
# at least this long to validate: keyed by the file's text, the environment
# variables it uses and mailflow's version, and checked against the files it
# names (workbooks, template folder: size and modification time), so any
# change invalidates it. It lives in $MAILFLOW_CACHE ("off" disables it), else
# $XDG_CACHE_HOME/mailflow or ~/.cache/mailflow.
CACHE_WHEN_SLOWER_THAN_SECONDS = 0.15


def _dependencies(config: Config) -> list[Path]:
    """The files a validated configuration depends on besides its own text: workbooks, template folder, this module."""
    paths = [c.workbook for c in config.campaigns] + ([config.templates] if config.templates else [])
    paths += [m.agenda_file for m in config.meetings if m.agenda_file is not None]
    return [*paths, Path(__file__)]


MAX_ALIASED_VALUES = 100_000  # values aliases may add to a configuration (a "billion laughs" adds 10^9)


def _aliased_values(root: yaml.Node) -> int:
    """How many values the aliases of the YAML node graph ``root`` add: all values with every alias expanded,
    less the values written.

    An alias is the node its anchor names, shared: each node's size is counted once and reused, so the count
    costs as many steps as there are distinct nodes, however many times they are repeated."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children: list[yaml.Node] = []
        if isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        if not children_done:
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in sizes)
            continue
        sizes[id(node)] = 1 + sum(sizes[id(child)] for child in children)
    return sizes[id(root)] - len(sizes)


def parse_config(text: str, path: Path, environ: Mapping[str, str]) -> Config:
    """Validate YAML ``text`` as if read from ``path`` (relative paths resolve beside it)."""
    source = path.name
    try:
        loader = SAFE_LOADER(text)
        try:
            root = loader.get_single_node()
            if root is not None and _aliased_values(root) > MAX_ALIASED_VALUES:
                raise ConfigError(
                    [
                        f"{source}: the anchors and aliases (& and *) add more than {MAX_ALIASED_VALUES:,} values; "
                        "write the repeated parts out, or repeat them fewer times"
                    ]
                )
            data = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{where}: not valid YAML: {problem}"]) from None
    except RecursionError:
        raise ConfigError([f"{source}: values are nested too deeply to be a mailflow configuration"]) from None
    problems = _Problems(source, text)
    if not isinstance(data, dict):
        problems.add((), "the configuration must be a mapping with secretariat, mail, delegations, campaigns")
        raise ConfigError(problems.sorted())
    missing_env: list[KeyPath] = []
    try:
        data = substitute_env(data, environ, (), missing_env)
    except RecursionError:
        raise ConfigError([f"{source}: values are nested too deeply to be a mailflow configuration"]) from None
    base = path.resolve().parent

    top = _Reader(problems, data, (), _TOP_KEYS)
    secretariat = _secretariat(problems, top.raw("secretariat"))
    mail = _mail(problems, top.raw("mail"), base)
    for env_path in missing_env:
        # Credentials of a transport that is not in use need not be set.
        in_unused_section = (
            mail is not None
            and mail.transport == "local"
            and len(env_path) > 1
            and env_path[0] == "mail"
            and env_path[1] in ("smtp", "imap")
        )
        if not in_unused_section:
            name = str(env_path[-1])
            problems.add(env_path[:-1], f"environment variable {name[2:-1]} is not set (used as {name})")
    store_value = top.string("store", "mailflow.db")
    delegations = _delegations(problems, top.raw("delegations"))
    campaigns = _campaigns(problems, top.raw("campaigns"), base, delegations, secretariat)
    meetings = _meetings(problems, top.raw("meetings"), base, delegations, secretariat)
    inbound = _inbound(problems, top.raw("inbound"))
    templates_value = top.string("templates")
    templates = _resolve_path(base, templates_value) if templates_value else None
    if templates is not None and not templates.is_dir():
        problems.add(("templates",), f"folder {templates} does not exist (it holds your template overrides)")
    log_level = (top.string("log_level", "INFO") or "INFO").upper()
    if log_level not in _LOG_LEVELS:
        problems.add(("log_level",), f"must be one of {', '.join(_LOG_LEVELS)}")
        log_level = "INFO"
    secret = top.string("fingerprint_secret")

    if problems.items or secretariat is None or mail is None:
        raise ConfigError(problems.sorted())
    return Config(
        path=path.resolve(),
        secretariat=secretariat,
        mail=mail,
        store=_resolve_path(base, store_value or "mailflow.db"),
        delegations=tuple(delegations),
        campaigns=tuple(campaigns),
        meetings=tuple(meetings),
        inbound=inbound,
        templates=templates,
        fingerprint_secret=secret or None,
        log_level=log_level,
        source_text=text,
    )


def _secretariat(problems: _Problems, data: Any) -> Secretariat | None:
    path: KeyPath = ("secretariat",)
    if data is None:
        problems.add(path, "is required (name, address, timezone)")
        return None
    r = _Reader(problems, data, path, _SECRETARIAT_KEYS)
    name = r.text_line("name", required=True)
    address = r.address("address")
    timezone = r.timezone("timezone")
    language = r.choice("language", LANGUAGES, "es")
    digest = None
    if r.has("digest"):
        d = _Reader(problems, r.raw("digest"), path + ("digest",), _DIGEST_KEYS)
        to = d.addresses("to", required=True)
        schedule = d.string("schedule", required=True)
        if schedule and timezone:
            try:
                validate_cron(schedule, timezone)
            except ValueError as exc:
                problems.add(path + ("digest", "schedule"), f"bad cron expression: {exc}")
                schedule = None
        stale = _duration_seconds(problems, d, "inbox_stale_after", DEFAULT_INBOX_STALE_SECONDS)
        if to and schedule:
            digest = DigestSettings(
                to=to,
                schedule=schedule,
                inbox_stale_after_seconds=stale,
                when_closed=d.boolean("when_closed", False),
                attach_workbook=d.boolean("attach_workbook", True),
            )
    if not (name and address and timezone):
        return None
    return Secretariat(name=name, address=address, timezone=timezone, language=language, digest=digest)


def _server(
    problems: _Problems,
    data: Any,
    path: KeyPath,
    keys: tuple[str, ...],
    ports: Mapping[str, int],
    default_security: str,
    required: bool,
) -> tuple[_Reader, str, int, str] | None:
    if data is None:
        if required:
            problems.add(path, "is required when mail.transport is smtp")
        return None
    r = _Reader(problems, data, path, keys)
    host = r.string("host", required=True)
    security = r.choice("security", SECURITY_MODES, default_security)
    port = r.integer("port", ports[security], minimum=1)
    if port is not None and port > 65535:
        problems.add(path + ("port",), f"{port} is not a TCP port (1-65535)")
    secret_given = r.has("password") or r.has("oauth2_token_command")
    if r.has("password") and r.has("oauth2_token_command"):
        problems.add(path, "give either password or oauth2_token_command, not both")
    elif r.has("username") != secret_given:
        problems.add(path, "username goes with a password or an oauth2_token_command: give both, or neither")
    if not host or port is None:
        return None
    return r, host, port, security


def _ca_file(problems: _Problems, r: _Reader, base: Path) -> Path | None:
    value = r.string("ca_file")
    if not value:
        return None
    path = _resolve_path(base, value)
    if not path.is_file():
        problems.add(r.path + ("ca_file",), f"CA file {path} not found")
        return None
    return path


def _mail(problems: _Problems, data: Any, base: Path) -> MailSettings | None:
    path: KeyPath = ("mail",)
    if data is None:
        problems.add(path, "is required (transport: local, or smtp and imap settings)")
        return None
    r = _Reader(problems, data, path, _MAIL_KEYS)
    transport = r.choice("transport", TRANSPORTS, "smtp")
    real = transport == "smtp"
    smtp = None
    parsed = _server(problems, r.raw("smtp"), path + ("smtp",), _SMTP_KEYS, DEFAULT_SMTP_PORTS, "starttls", real)
    if parsed:
        s, host, port, security = parsed
        timeout = s.integer("timeout", int(DEFAULT_TIMEOUT_SECONDS), minimum=1) or DEFAULT_TIMEOUT_SECONDS
        smtp = SmtpSettings(
            host,
            port,
            security,
            s.string("username"),
            s.string("password"),
            float(timeout),
            oauth2_token_command=s.string("oauth2_token_command"),
            ca_file=_ca_file(problems, s, base),
        )
    imap = None
    parsed = _server(problems, r.raw("imap"), path + ("imap",), _IMAP_KEYS, DEFAULT_IMAP_PORTS, "ssl", False)
    if parsed:
        i, host, port, security = parsed
        timeout = i.integer("timeout", int(DEFAULT_TIMEOUT_SECONDS), minimum=1) or DEFAULT_TIMEOUT_SECONDS
        imap = ImapSettings(
            host,
            port,
            security,
            i.string("username"),
            i.string("password"),
            folder=i.string("folder", "INBOX") or "INBOX",
            processed_folder=i.string("processed_folder", DEFAULT_PROCESSED_FOLDER) or DEFAULT_PROCESSED_FOLDER,
            timeout=float(timeout),
            poll_interval=i.integer("poll_interval", DEFAULT_POLL_INTERVAL_SECONDS, minimum=5)
            or DEFAULT_POLL_INTERVAL_SECONDS,
            oauth2_token_command=i.string("oauth2_token_command"),
            ca_file=_ca_file(problems, i, base),
        )
    local_reader = _Reader(problems, r.raw("local"), path + ("local",), _LOCAL_KEYS)
    local = LocalSettings(
        outbox=_resolve_path(base, local_reader.string("outbox", DEFAULT_LOCAL_OUTBOX) or DEFAULT_LOCAL_OUTBOX),
        inbox=_resolve_path(base, local_reader.string("inbox", DEFAULT_LOCAL_INBOX) or DEFAULT_LOCAL_INBOX),
    )
    rate = r.integer("rate_per_minute", None, minimum=1)
    retry = _Reader(problems, r.raw("retry"), path + ("retry",), _RETRY_KEYS)
    retry_base = _duration_seconds(problems, retry, "base", DEFAULT_RETRY_BASE_SECONDS)
    retry_max = _duration_seconds(problems, retry, "max", DEFAULT_RETRY_MAX_SECONDS)
    return MailSettings(
        transport=transport,
        local=local,
        smtp=smtp,
        imap=imap,
        rate_per_minute=rate,
        retry_base_seconds=retry_base,
        retry_max_seconds=max(retry_max, retry_base),
    )


def parse_size(value: object) -> int:
    """A size in bytes: a whole number, or with a unit (``25MB``, ``512 KB``)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = SIZE_RE.match(str(value))
    if not match or int(match.group(1)) <= 0:
        raise ValueError(f"{value!r} is not a size (e.g. 25MB, 512KB or a number of bytes)")
    return int(match.group(1)) * SIZE_UNITS[(match.group(2) or "B").upper()]


def _inbound(problems: _Problems, data: Any) -> InboundSettings:
    r = _Reader(problems, data, ("inbound",), _INBOUND_KEYS)
    defaults = InboundSettings()
    sizes: dict[str, int] = {}
    for key, default in (
        ("max_message_size", defaults.max_message_bytes),
        ("max_attachment_size", defaults.max_attachment_bytes),
        ("max_uncompressed_size", defaults.max_uncompressed_bytes),
    ):
        sizes[key] = default
        if r.has(key):
            try:
                sizes[key] = parse_size(r.raw(key))
            except ValueError as exc:
                problems.add(("inbound", key), str(exc))
    ratio = r.integer("max_compression_ratio", defaults.max_compression_ratio, minimum=2)
    return InboundSettings(
        accept_untrusted=r.boolean("accept_untrusted", False),
        max_message_bytes=sizes["max_message_size"],
        max_attachment_bytes=sizes["max_attachment_size"],
        max_uncompressed_bytes=sizes["max_uncompressed_size"],
        max_compression_ratio=ratio or defaults.max_compression_ratio,
        max_follow_ups_per_day=r.integer("max_follow_ups_per_day", defaults.max_follow_ups_per_day, minimum=1)
        or defaults.max_follow_ups_per_day,
    )


def _duration_seconds(problems: _Problems, r: _Reader, key: str, default: int) -> int:
    value = r.string(key)
    if value is None:
        return default
    try:
        return int(parse_duration(value).total_seconds())
    except ValueError as exc:
        problems.add(r.path + (key,), str(exc))
        return default


def _list_of_mappings(problems: _Problems, data: Any, path: KeyPath, what: str) -> list[Any]:
    if data is None:
        problems.add(path, f"is required: a list of {what}")
        return []
    if not isinstance(data, list):
        problems.add(path, f"expected a list of {what}, found {_kind(data)}")
        return []
    return data


def _check_id(problems: _Problems, r: _Reader, seen: dict[str, int], index: int) -> str | None:
    ident = r.string("id", required=True)
    if ident is None:
        return None
    if not ID_RE.match(ident):
        problems.add(r.path + ("id",), f"{ident!r} is not a valid id (letters, digits, '-', '_', '.'; at most 64)")
        return None
    if ident in seen:
        problems.add(r.path + ("id",), f"duplicate id {ident!r} (also at index {seen[ident]})")
        return None
    seen[ident] = index
    return ident


def _delegations(problems: _Problems, data: Any) -> list[Delegation]:
    out: list[Delegation] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(_list_of_mappings(problems, data, ("delegations",), "delegations")):
        r = _Reader(problems, item, ("delegations", index), _DELEGATION_KEYS)
        if not r.ok:
            continue
        ident = _check_id(problems, r, seen, index)
        name = r.text_line("name", required=True)
        language = r.choice("language", LANGUAGES, "es")
        timezone = r.timezone("timezone")
        contacts = r.addresses("contacts", required=True)
        if ident and name and timezone and contacts:
            out.append(Delegation(ident, name, language, timezone, contacts))
    return out


def _campaigns(
    problems: _Problems,
    data: Any,
    base: Path,
    delegations: list[Delegation],
    secretariat: Secretariat | None,
) -> list[Campaign]:
    out: list[Campaign] = []
    seen: dict[str, int] = {}
    known = [d.id for d in delegations]
    for index, item in enumerate(_list_of_mappings(problems, data, ("campaigns",), "campaigns")):
        path: KeyPath = ("campaigns", index)
        r = _Reader(problems, item, path, _CAMPAIGN_KEYS)
        if not r.ok:
            continue
        ident = _check_id(problems, r, seen, index)
        titles = _per_language(problems, r, "title")
        title = titles.get("es") or titles.get("en") if titles else r.text_line("title", required=True)
        ref = r.string("ref", ident)
        if ref is not None and not ID_RE.match(ref):
            problems.add(path + ("ref",), f"{ref!r} is not a valid reference (letters, digits, '-', '_', '.')")
        workbook_value = r.string("workbook", required=True)
        workbook = _resolve_path(base, workbook_value) if workbook_value else None
        if workbook is not None and not workbook.is_file():
            problems.add(path + ("workbook",), f"workbook file {workbook} not found")
        key_column = r.string("key_column", required=True)
        fill_column = r.string("fill_column", required=True)
        opens = _opens(problems, r, secretariat)
        deadline = _deadline(problems, r)
        if opens is not None and deadline is not None and deadline < opens.date():
            problems.add(
                path + ("deadline",),
                f"deadline {deadline.isoformat()} is before opens {opens.date().isoformat()}; "
                "the deadline must be on or after the day requests go out",
            )
            deadline = None
        closes = _closes(problems, r, deadline)
        send_time = _send_time(problems, r)
        reminders = _reminders(problems, r)
        overdue = _overdue(problems, r)
        skip_weekends = r.boolean("skip_weekends", True)
        chosen = _campaign_delegations(problems, r, known)
        attachment_name = _attachment_name(problems, r)
        if (
            ident
            and title
            and ref
            and workbook
            and key_column
            and fill_column
            and opens
            and deadline
            and send_time is not None
            and reminders is not None
            and overdue
            and chosen is not None
        ):
            out.append(
                Campaign(
                    id=ident,
                    title=title,
                    workbook=workbook,
                    key_column=key_column,
                    fill_column=fill_column,
                    opens=opens,
                    deadline=deadline,
                    delegations=chosen,
                    ref=ref,
                    send_time=send_time,
                    reminders=reminders,
                    overdue=overdue,
                    skip_weekends=skip_weekends,
                    sheet=r.string("sheet"),
                    attachment_name=attachment_name,
                    titles=titles,
                    closes=closes,
                )
            )
    return out


def _opens(problems: _Problems, r: _Reader, secretariat: Secretariat | None) -> datetime | None:
    value = r.raw("opens")
    key = r.path + ("opens",)
    if value is None:
        problems.add(key, "is required: when requests go out, e.g. 2017-10-18T10:00")
        return None
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime.combine(value, time(0, 0))
    else:
        try:
            moment = datetime.fromisoformat(str(value).strip())
        except ValueError:
            problems.add(key, f"{value!r} is not a date and time (e.g. 2017-10-18T10:00)")
            return None
    if moment.tzinfo is None:
        if secretariat is None:
            return None
        moment = moment.replace(tzinfo=secretariat.tz)
    return moment


def _deadline(problems: _Problems, r: _Reader) -> date | None:
    value = r.raw("deadline")
    key = r.path + ("deadline",)
    if value is None:
        problems.add(key, "is required: the last day to answer, e.g. 2017-10-23")
        return None
    if isinstance(value, datetime):
        problems.add(key, "give a date without a time: the deadline is the end of that day in each time zone")
        return None
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value).strip())
    except ValueError:
        problems.add(key, f"{value!r} is not a date (e.g. 2017-10-23)")
        return None


def _closes(problems: _Problems, r: _Reader, deadline: date | None) -> date | None:
    value = r.raw("closes")
    if value is None:
        return None
    key = (*r.path, "closes")
    try:
        day = value if isinstance(value, date) and not isinstance(value, datetime) else date.fromisoformat(str(value))
    except ValueError:
        problems.add(key, f"{value!r} is not a date (e.g. 2017-11-30)")
        return None
    if deadline is not None and day < deadline:
        problems.add(key, f"closes {day.isoformat()} is before the deadline {deadline.isoformat()}")
        return None
    return day


def _send_time(problems: _Problems, r: _Reader) -> time | None:
    value = r.raw("send_time")
    key = r.path + ("send_time",)
    if value is None:
        return DEFAULT_SEND_TIME
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 24 * 60:
        # YAML 1.1 reads an unquoted 9:30 as the sexagesimal number 570.
        return time(value // 60, value % 60)
    try:
        return time.fromisoformat(str(value).strip().zfill(5))
    except ValueError:
        problems.add(key, f'{value!r} is not a time of day (e.g. "09:00")')
        return None


def _reminders(problems: _Problems, r: _Reader) -> tuple[int, ...] | None:
    value = r.raw("reminders")
    key = r.path + ("reminders",)
    if value is None:
        return DEFAULT_REMINDERS
    if not isinstance(value, list):
        problems.add(key, 'expected a list of day offsets relative to the deadline, e.g. ["-3d", "0d"]')
        return None
    days: list[int] = []
    ok = True
    for index, item in enumerate(value):
        try:
            offset = parse_offset(str(item), "d")
        except ValueError as exc:
            problems.add(key + (index,), str(exc))
            ok = False
            continue
        if offset.days > 0:
            problems.add(key + (index,), f"{item!r} is after the deadline; use overdue for notices after it")
            ok = False
            continue
        days.append(offset.days)
    return tuple(sorted(set(days))) if ok else None


def _overdue(problems: _Problems, r: _Reader) -> OverduePolicy | None:
    value = r.raw("overdue")
    if value is None:
        return OverduePolicy()
    o = _Reader(problems, value, r.path + ("overdue",), _OVERDUE_KEYS)
    every = DEFAULT_OVERDUE_EVERY_DAYS
    ok = True
    if o.has("every"):
        try:
            duration = parse_duration(str(o.raw("every")), "d")
            every = duration.days
        except ValueError as exc:
            problems.add(o.path + ("every",), str(exc))
            ok = False
    maximum = o.integer("max", DEFAULT_OVERDUE_MAX, minimum=0)
    return OverduePolicy(every, maximum if maximum is not None else DEFAULT_OVERDUE_MAX) if ok else None


def _campaign_delegations(
    problems: _Problems, r: _Reader, known: list[str], name: str = "delegations"
) -> tuple[str, ...] | None:
    """``all`` (or absent) or a list of known delegation ids, under the key ``name``."""
    value = r.raw(name)
    key = r.path + (name,)
    if value is None or value == "all":
        return tuple(known)
    if not isinstance(value, list):
        problems.add(key, "expected 'all' or a list of delegation ids")
        return None
    chosen: list[str] = []
    ok = True
    for index, item in enumerate(value):
        ident = str(item)
        if ident not in known:
            hint = difflib.get_close_matches(ident, known, n=1)
            suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
            problems.add(key + (index,), f"unknown delegation {ident!r}{suggestion}")
            ok = False
        elif ident in chosen:
            problems.add(key + (index,), f"delegation {ident!r} is listed twice")
        else:
            chosen.append(ident)
    return tuple(chosen) if ok else None


def _per_language(problems: _Problems, r: _Reader, key: str) -> dict[str, str]:
    """A text given once per language ({es: ..., en: ...}); empty when given as plain text."""
    value = r.raw(key)
    if not isinstance(value, dict):
        return {}
    out: dict[str, str] = {}
    for lang, text in value.items():
        if lang not in LANGUAGES:
            problems.add(r.path + (key, str(lang)), f"unknown language; expected {', '.join(LANGUAGES)}")
        elif not isinstance(text, str) or not text.strip() or CONTROL_RE.search(text):
            problems.add(r.path + (key, str(lang)), "expected one line of text")
        else:
            out[lang] = text.strip()
    if not out:
        problems.add(r.path + (key,), "give the text, or one per language ({es: ..., en: ...})")
    return out


def _attachment_name(problems: _Problems, r: _Reader) -> dict[str, str]:
    value = r.raw("attachment_name")
    key = r.path + ("attachment_name",)
    if value is None:
        return {}
    names = {lang: value for lang in LANGUAGES} if isinstance(value, str) else value
    if not isinstance(names, dict) or any(k not in LANGUAGES or not isinstance(v, str) for k, v in names.items()):
        problems.add(key, "expected a file name, or one per language ({es: ..., en: ...})")
        return {}
    out: dict[str, str] = {}
    for lang, pattern in names.items():
        if not pattern.lower().endswith(".xlsx") or CONTROL_RE.search(pattern) or "/" in pattern or "\\" in pattern:
            problems.add(key, f"{pattern!r} must be a plain file name ending in .xlsx")
            continue
        try:
            pattern.format(delegation="x", campaign="x")
        except (KeyError, IndexError, ValueError):
            problems.add(key, f"{pattern!r}: only {{delegation}} and {{campaign}} may be used")
            continue
        out[lang] = pattern
    return out


# --------------------------------------------------------------------------
# Meetings
# --------------------------------------------------------------------------


def _meetings(
    problems: _Problems,
    data: Any,
    base: Path,
    delegations: list[Delegation],
    secretariat: Secretariat | None,
) -> list[Meeting]:
    """The optional ``meetings:`` list: each one checked, every problem named with its key."""
    if data is None:
        return []
    out: list[Meeting] = []
    seen: dict[str, int] = {}
    known = [d.id for d in delegations]
    default_zone = secretariat.timezone if secretariat is not None else None
    for index, item in enumerate(_list_of_mappings(problems, data, ("meetings",), "meetings")):
        path: KeyPath = ("meetings", index)
        r = _Reader(problems, item, path, _MEETING_KEYS)
        if not r.ok:
            continue
        ident = _check_id(problems, r, seen, index)
        titles: dict[str, str] = {}
        if isinstance(r.raw("title"), dict):
            titles = _per_language(problems, r, "title")
            title = titles.get("es") or titles.get("en")
        else:
            title = r.text_line("title", required=True)
        if title and any(HEADER_UNSAFE_RE.search(t) for t in (title, *titles.values())):
            problems.add(path + ("title",), "may not contain line breaks or control characters (it is the Subject)")
            title = None
        # Without a valid secretariat there is no default zone; that problem is reported already.
        timezone = r.timezone("timezone", default_zone) if default_zone or r.has("timezone") else None
        start = _meeting_start(problems, r, timezone)
        duration = _meeting_duration(problems, r)
        link, link_ok = _meeting_link(problems, r)
        agenda, agenda_file, agenda_ok = _meeting_agenda(problems, r, base)
        invite = _campaign_delegations(problems, r, known, "invite")
        extra = tuple(dict.fromkeys(r.addresses("extra", required=False)))
        reminders = _meeting_reminders(problems, r)
        cancelled = r.boolean("cancelled", False)
        if invite is not None and not invite and not extra:
            problems.add(path + ("invite",), "the meeting invites nobody: list delegations, or add extra addresses")
            invite = None
        if (
            ident
            and title
            and timezone
            and start is not None
            and duration is not None
            and link_ok
            and agenda_ok
            and invite is not None
            and reminders is not None
        ):
            out.append(
                Meeting(
                    id=ident,
                    title=title,
                    start=start,
                    timezone=timezone,
                    duration=duration,
                    invite=invite,
                    link=link,
                    agenda=agenda,
                    agenda_file=agenda_file,
                    extra=extra,
                    reminders=reminders,
                    cancelled=cancelled,
                    titles=titles,
                )
            )
    return out


def _meeting_start(problems: _Problems, r: _Reader, timezone: str | None) -> datetime | None:
    """The start: a date and a time, read in the meeting's zone; a time the clocks skip is refused."""
    value = r.raw("start")
    key = r.path + ("start",)
    if value is None:
        problems.add(key, "is required: the date and time the meeting starts, e.g. 2017-11-15T08:30")
        return None
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        problems.add(key, f"{value.isoformat()} has no time of day; give both, e.g. {value.isoformat()}T08:30")
        return None
    else:
        try:
            moment = datetime.fromisoformat(str(value).strip())
        except ValueError:
            problems.add(key, f"{value!r} is not a date and time (e.g. 2017-11-15T08:30)")
            return None
        if len(str(value).strip()) <= len("2017-11-15"):
            problems.add(key, f"{value!r} has no time of day; give both, e.g. 2017-11-15T08:30")
            return None
    if timezone is None:
        return None
    tz = zone(timezone)
    if moment.tzinfo is not None:
        return moment.astimezone(tz)
    local = moment.replace(tzinfo=tz)
    # A wall-clock time skipped by a daylight-saving change does not exist: zoneinfo would shift it silently.
    if local.astimezone(UTC).astimezone(tz).replace(tzinfo=None) != moment:
        problems.add(
            key,
            f"{moment.isoformat(timespec='minutes')} does not exist in {timezone}: "
            "the clocks skip that hour (daylight saving); choose another time",
        )
        return None
    return local


def _meeting_duration(problems: _Problems, r: _Reader) -> timedelta | None:
    value = r.raw("duration")
    if value is None:
        return DEFAULT_MEETING_DURATION
    if isinstance(value, (bool, int, float, list, dict)):
        problems.add(r.path + ("duration",), f"{value!r} is not a duration: give a unit, e.g. 90m, 2h or 1h30m")
        return None
    try:
        return parse_meeting_duration(str(value))
    except ValueError as exc:
        problems.add(r.path + ("duration",), str(exc))
        return None


def _meeting_link(problems: _Problems, r: _Reader) -> tuple[str | None, bool]:
    """The connection link (``None`` when absent) and whether it is acceptable: one line, a web address."""
    link = r.text_line("link")
    if link is None:
        return None, not r.has("link")
    parts = urlsplit(link)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc or any(c.isspace() for c in link):
        problems.add(r.path + ("link",), f"{link!r} is not a web address (e.g. https://meet.example.org/rcm)")
        return None, False
    return link, True


def _meeting_agenda(problems: _Problems, r: _Reader, base: Path) -> tuple[str, Path | None, bool]:
    """The agenda: inline text, or the file a one-line value names (relative to the config): (text, file, ok)."""
    value = r.raw("agenda")
    key = r.path + ("agenda",)
    if value is None:
        return "", None, True
    if isinstance(value, (bool, dict, list)):
        problems.add(key, f"expected the agenda text or a file name, found {_kind(value)}")
        return "", None, False
    text = str(value)
    agenda_file: Path | None = None
    one_line = "\n" not in text.strip()
    candidate = _resolve_path(base, text.strip()) if one_line and text.strip() else None
    if candidate is not None and candidate.is_file():
        try:
            data = candidate.read_bytes()
            if len(data) > MAX_AGENDA_BYTES:
                problems.add(key, f"agenda file {candidate} is larger than {MAX_AGENDA_BYTES // 1024} KB")
                return "", None, False
            text = data.decode("utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            problems.add(key, f"cannot read the agenda file {candidate}: {exc}")
            return "", None, False
        agenda_file = candidate
    elif candidate is not None and AGENDA_FILE_RE.match(text.strip()):
        problems.add(key, f"agenda file {candidate} not found (a one-line agenda ending in .txt or .md names a file)")
        return "", None, False
    text = "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")).strip()
    if AGENDA_CONTROL_RE.search(text):
        problems.add(key, "the agenda may not contain control characters")
        return "", None, False
    return text, agenda_file, True


def _meeting_reminders(problems: _Problems, r: _Reader) -> tuple[timedelta, ...] | None:
    value = r.raw("reminders")
    key = r.path + ("reminders",)
    if value is None:
        return ()
    if not isinstance(value, list):
        problems.add(key, 'expected a list of offsets before the start, e.g. ["-1d", "-1h"]')
        return None
    offsets: list[timedelta] = []
    ok = True
    for index, item in enumerate(value):
        try:
            offset = parse_offset(str(item))
        except ValueError as exc:
            problems.add(key + (index,), str(exc))
            ok = False
            continue
        if offset >= timedelta(0):
            problems.add(key + (index,), f"{item!r} is not before the start; a reminder needs a negative offset (-1h)")
            ok = False
            continue
        offsets.append(offset)
    return tuple(sorted(set(offsets))) if ok else None
