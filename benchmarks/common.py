"""What every benchmark shares: progress and timing, generated configurations, a counting SMTP server.

Nothing here reaches beyond the loopback interface: the only server is the
local aiosmtpd sink on 127.0.0.1, and the generated delegations' addresses are
under ``example.org``, which is never contacted (the sink accepts everything).
"""

from __future__ import annotations

import multiprocessing
import resource
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import yaml

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"

CAMPAIGN_ID = "responsible-2017"
SECRETARIAT_ADDRESS = "ts@example.org"
SECRETARIAT_TIMEZONE = "America/Costa_Rica"
OPENS = "2017-10-18T10:00"  # a Wednesday, secretariat time
DEADLINE = "2017-10-23"  # the Monday after
# The time zones of the RCM delegations, plus a few more, cycled through the generated delegations.
TIMEZONES = (
    "America/Belize",
    "America/Toronto",
    "America/Costa_Rica",
    "America/Santo_Domingo",
    "America/El_Salvador",
    "America/Guatemala",
    "America/Tegucigalpa",
    "America/Mexico_City",
    "America/Managua",
    "America/Panama",
    "America/New_York",
    "America/Bogota",
    "America/Lima",
    "Europe/Madrid",
)

ServerMode = Literal["process", "thread"]
SERVER_MODES: tuple[ServerMode, ...] = ("process", "thread")


# --------------------------------------------------------------------------
# Progress, timing, memory, verdicts
# --------------------------------------------------------------------------


def say(message: str) -> None:
    """A progress line on stderr (stdout is kept for the results)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Stopwatch:
    """``with Stopwatch() as watch: ...`` then ``watch.seconds`` (wall clock, perf_counter)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.seconds = time.perf_counter() - self._start


@dataclass(frozen=True)
class Timings:
    """Wall times of repeated runs of one thing."""

    runs: tuple[float, ...]

    @property
    def best(self) -> float:
        return min(self.runs)

    @property
    def median(self) -> float:
        return statistics.median(self.runs)


def repeat(function: Callable[[], object], times: int, budget: float = float("inf")) -> Timings:
    """Time ``function`` up to ``times`` times; stop early once ``budget`` seconds are spent (one run at least)."""
    runs: list[float] = []
    for _ in range(times):
        with Stopwatch() as watch:
            function()
        runs.append(watch.seconds)
        if sum(runs) >= budget:
            break
    return Timings(tuple(runs))


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def verdict(met: bool) -> str:
    return "OK" if met else "MISSED"


def kb(size: float) -> str:
    return f"{size / 1024:.1f} KB"


def seconds(value: float) -> str:
    """A duration for the result lines: milliseconds under a second, else seconds."""
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


# --------------------------------------------------------------------------
# Generated configurations
# --------------------------------------------------------------------------


def delegation_id(number: int, width: int) -> str:
    return f"D{number:0{width}d}"


def make_delegations(count: int, *, second_contact_every: int = 0) -> list[dict[str, Any]]:
    """``count`` delegations D0001… (width grows with count), in both languages and many time zones.

    Spanish names carry accents (as "México" or "Panamá" do), so attachment
    names exercise the RFC 2231 encoding. Every ``second_contact_every``-th
    delegation has two contacts."""
    width = max(4, len(str(count)))
    out: list[dict[str, Any]] = []
    for number in range(1, count + 1):
        ident = delegation_id(number, width)
        english = number % 3 == 0
        contacts = [f"liaison@{ident.lower()}.example.org" if english else f"enlace@{ident.lower()}.example.org"]
        if second_contact_every and number % second_contact_every == 0:
            contacts.append(f"alterno@{ident.lower()}.example.org")
        out.append(
            {
                "id": ident,
                "name": f"Delegation {number}" if english else f"Delegación {number}",
                "language": "en" if english else "es",
                "timezone": TIMEZONES[number % len(TIMEZONES)],
                "contacts": contacts,
            }
        )
    return out


def config_data(
    *, delegations: Sequence[dict[str, Any]], workbook: Path, store: Path, mail: dict[str, Any]
) -> dict[str, Any]:
    """A complete configuration: one campaign over every delegation, like config.example.yaml."""
    return {
        "secretariat": {
            "name": "Secretaría Técnica de la CRM / RCM Technical Secretariat",
            "address": SECRETARIAT_ADDRESS,
            "timezone": SECRETARIAT_TIMEZONE,
            "language": "es",
        },
        "mail": mail,
        "store": str(store),
        "log_level": "INFO",
        "delegations": list(delegations),
        "campaigns": [
            {
                "id": CAMPAIGN_ID,
                "title": {
                    "es": "Columna «Responsable» del Plan Estratégico 2017-2022 de la Red de Funcionarios de Enlace",
                    "en": "Responsible column of the Strategic Plan 2017-2022 of the Liaison Officers Network",
                },
                "ref": CAMPAIGN_ID,
                "workbook": str(workbook),
                "key_column": "Code",
                "fill_column": "Responsible",
                "opens": OPENS,
                "deadline": DEADLINE,
                "send_time": "09:00",
                "reminders": ["-3d", "-1d", "0d"],
                "overdue": {"every": "2d", "max": 3},
                "skip_weekends": True,
                "delegations": "all",
                "attachment_name": {
                    "es": "Plan estratégico - {delegation}.xlsx",
                    "en": "Strategic Plan - {delegation}.xlsx",
                },
            }
        ],
    }


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as YAML (libyaml's emitter when present: this is set-up, not what is measured)."""
    dumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.dump(data, Dumper=dumper, allow_unicode=True, sort_keys=False, width=200)
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------
# The SMTP sink: aiosmtpd that accepts and counts
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    messages: int
    recipients: int
    bytes: int


class _CountingHandler:
    """An aiosmtpd handler that accepts every message and counts it; nothing is kept."""

    def __init__(self) -> None:
        self.messages = 0
        self.recipients = 0
        self.bytes = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content = envelope.original_content or envelope.content or b""
        self.messages += 1
        self.recipients += len(envelope.rcpt_tos)
        self.bytes += len(content)
        return "250 Message accepted for delivery"

    def received(self) -> Received:
        return Received(self.messages, self.recipients, self.bytes)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _start_controller(handler: _CountingHandler) -> tuple[Any, int]:
    from aiosmtpd.controller import Controller

    last_error: Exception | None = None
    for _ in range(5):  # the free port may be taken between probe and bind
        port = _free_port()
        controller = Controller(handler, hostname=LOOPBACK, port=port, ready_timeout=10.0)
        try:
            controller.start()
        except Exception as exc:  # aiosmtpd raises several types when it cannot bind
            last_error = exc
            continue
        return controller, port
    raise RuntimeError(f"cannot start aiosmtpd on {LOOPBACK}: {last_error}")


def _serve(conn: Connection) -> None:
    """The server process: start aiosmtpd, report its port, answer count/stop requests."""
    handler = _CountingHandler()
    controller, port = _start_controller(handler)
    conn.send(port)
    try:
        while True:
            command = conn.recv()
            if command == "count":
                conn.send(handler.received())
            elif command == "stop":
                break
    finally:
        controller.stop()
        conn.send("stopped")


class SmtpSink:
    """aiosmtpd on a free loopback port that accepts and counts every message.

    ``mode="process"`` (the default of the benchmarks) runs it in a separate
    process, so the server's asyncio loop does not compete with the client for
    this process's GIL; ``mode="thread"`` runs it in a thread of this process,
    as the test rig does."""

    def __init__(self, mode: ServerMode = "process") -> None:
        self.mode = mode
        self.port = 0
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._controller: Any = None
        self._handler: _CountingHandler | None = None

    @property
    def description(self) -> str:
        return "aiosmtpd in a separate process" if self.mode == "process" else "aiosmtpd in a thread of this process"

    def __enter__(self) -> SmtpSink:
        if self.mode == "process":
            context = multiprocessing.get_context("spawn")  # a clean child: no inherited store or threads
            parent, child = context.Pipe()
            self._process = context.Process(target=_serve, args=(child,), name="bench-smtp-sink", daemon=True)
            self._process.start()
            child.close()
            if not parent.poll(30):
                self._process.kill()
                raise RuntimeError("the SMTP sink process did not start within 30 s")
            self.port = int(parent.recv())
            self._conn = parent
        else:
            self._handler = _CountingHandler()
            self._controller, self.port = _start_controller(self._handler)
        return self

    def received(self) -> Received:
        if self._conn is not None:
            self._conn.send("count")
            answer = self._conn.recv()
            assert isinstance(answer, Received)
            return answer
        assert self._handler is not None
        return self._handler.received()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._conn is not None and self._process is not None:
            try:
                self._conn.send("stop")
                if self._conn.poll(15):
                    self._conn.recv()
            except (OSError, EOFError):
                pass
            self._process.join(15)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(5)
            self._conn.close()
            self._conn = None
        if self._controller is not None:
            self._controller.stop()
            self._controller = None
