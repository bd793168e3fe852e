"""The ``mailflow`` command: parse arguments, build adapters, call one function, map errors to exit codes."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path

from mailflow import __version__
from mailflow.checks import load_checked_config
from mailflow.clock import FixedClock, SystemClock
from mailflow.config import Config, Delegation
from mailflow.consolidate import consolidated_workbook, write_consolidated
from mailflow.engine import Engine
from mailflow.errors import ConfigError, MailflowError, UsageError
from mailflow.history import export_csv, export_json, format_timeline, history_rows, timeline
from mailflow.intake import looks_like_workbook
from mailflow.lock import InstanceLock
from mailflow.mailbox import ImapMailbox, Mailbox, MaildirMailbox
from mailflow.report import format_inspection, format_meetings_table, format_status_table
from mailflow.sender import LocalTransport, SmtpTransport, Transport
from mailflow.store import Store

DEFAULT_CONFIG = "mailflow.yaml"
PREVIEW_KINDS = ("request", "reminder", "overdue", "meeting")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailflow",
        description="Collect the same workbook from many delegations by email: requests, reminders, replies.",
    )
    parser.add_argument("--config", help=f"configuration file (default: $MAILFLOW_CONFIG or ./{DEFAULT_CONFIG})")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step (level DEBUG)")
    parser.add_argument("--version", action="version", version=f"mailflow {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("check-config", help="validate the configuration and everything it points to")

    tick = commands.add_parser("tick", help="one full pass: send everything that is due")
    tick.add_argument("--now", help="the instant of the pass, ISO 8601 (default: the system clock)")

    commands.add_parser("run", help="the always-on service: send when due, answer replies at once; stop with SIGTERM")

    status = commands.add_parser("status", help="where every delegation stands")
    status.add_argument("--campaign", help="only this campaign")
    status.add_argument("--json", action="store_true", help="JSON for scripts")
    status.add_argument("--now", help="as of this instant, ISO 8601 (default: the system clock)")
    status.add_argument("--delegation", help="one delegation's timeline: every email in and out, every change")

    history = commands.add_parser("history", help="export the whole audit trail of a campaign")
    history.add_argument("--campaign", help="the campaign (needed when there are several)")
    history.add_argument("--format", choices=("csv", "json"), default="csv", help="csv (default) or json")
    history.add_argument("--output", metavar="PATH", help="write to PATH instead of standard output")

    demo = commands.add_parser(
        "demo", help="the whole workflow on an accelerated clock, with simulated delegations: no server needed"
    )
    demo.add_argument("--dir", default="mailflow-demo", help="working folder (default: ./mailflow-demo)")
    demo.add_argument(
        "--pause", type=float, default=0.0, metavar="SECONDS", help="wall seconds per simulated day, to watch it"
    )

    consolidate = commands.add_parser("consolidate", help="the master workbook with every delegation's answers")
    consolidate.add_argument("--campaign", help="the campaign (needed when there are several)")
    consolidate.add_argument("--output", required=True, metavar="PATH", help="the .xlsx file to write")
    consolidate.add_argument("--now", help="as of this instant, for the overdue column (default: the system clock)")

    inspect = commands.add_parser("inspect", help="dry run for one received .eml (or a bare workbook)")
    inspect.add_argument("file", help="an .eml file, or a workbook (.xlsx, .xlsm, .xls, .ods)")
    inspect.add_argument("--json", action="store_true", help="JSON for scripts")
    inspect.add_argument("--campaign", help="the campaign, for a workbook without our fingerprint")

    preview = commands.add_parser("preview", help="render one email as it would be sent, without sending")
    preview.add_argument("kind", choices=PREVIEW_KINDS)
    preview.add_argument(
        "--delegation", required=True, help="delegation id (for a meeting, also one of its extra addresses)"
    )
    preview.add_argument("--campaign", help="campaign id (needed when there are several)")
    preview.add_argument("--meeting", help="meeting id, for `preview meeting` (needed when there are several)")
    preview.add_argument("--now", help="render as of this instant (default: the system clock)")
    preview.add_argument("--html", action="store_true", help="print the HTML part instead of the text part")
    preview.add_argument("--eml", metavar="PATH", help="also write the whole message to PATH")
    return parser


def parse_now(value: str | None, config: Config) -> datetime | None:
    """``--now``: ISO 8601; without an offset it is read in the secretariat's time zone."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--now {value!r} is not an ISO 8601 instant (e.g. 2017-10-18T10:00:00-06:00)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=config.secretariat.tz)
    return moment


def make_transport(config: Config) -> Transport:
    if config.mail.transport == "local":
        return LocalTransport(config.mail.local.outbox)
    assert config.mail.smtp is not None  # guaranteed by config validation
    return SmtpTransport(config.mail.smtp)


def make_mailbox(config: Config) -> Mailbox | None:
    """The inbox the replies come to: a local maildir, the IMAP server, or none configured."""
    if config.mail.transport == "local":
        return MaildirMailbox(config.mail.local.inbox)
    if config.mail.imap is None:
        logging.getLogger("mailflow").warning("no mail.imap configured: replies are not read")
        return None
    return ImapMailbox(config.mail.imap)


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config or os.environ.get("MAILFLOW_CONFIG") or DEFAULT_CONFIG)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr, force=True)


def run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        # The demo brings its own configuration (the example's, on the local transport) into its folder.
        _setup_logging("DEBUG" if args.verbose or args.debug else "WARNING")
        from mailflow.demo import run_demo

        run_demo(Path(args.dir), pause_per_day=args.pause)
        return 0
    # Commands that send nothing need not render every template to check them.
    config = load_checked_config(
        _config_path(args), templates=args.command in ("check-config", "tick", "run", "preview")
    )
    _setup_logging("DEBUG" if args.verbose or args.debug else config.log_level)
    if args.command == "check-config":
        campaigns = ", ".join(c.id for c in config.campaigns) or "none"
        print(f"{config.path}: OK ({len(config.delegations)} delegations; campaigns: {campaigns})")
        return 0
    if args.command == "inspect":
        return _inspect(config, Path(args.file), as_json=args.json, campaign=args.campaign)
    if args.command == "run":
        from mailflow.service import run_service  # the scheduler and its threads: only `run` needs them

        return run_service(config, transport=make_transport(config), mailbox=make_mailbox(config))
    now_arg = parse_now(getattr(args, "now", None), config)
    clock = FixedClock(now_arg) if now_arg else SystemClock()
    # A tick reads the inbox and sends: never alongside `run` or another tick on the same store.
    tick_lock = InstanceLock(config.store, command="tick") if args.command == "tick" else contextlib.nullcontext()
    with tick_lock, Store.open(config.store) as store:
        mailbox = make_mailbox(config) if args.command == "tick" else None
        engine = Engine(config, store, make_transport(config), clock, mailbox=mailbox)
        now = clock.now()
        if args.command == "tick":
            with _stop_on_signals() as stopping:
                engine.stop_requested = stopping.is_set
                report = engine.tick()
            if stopping.is_set():
                print("tick stopped by a signal after the email or message in hand; the rest waits for the next tick")
            if report.inbox is not None:
                inbox = report.inbox
                outcomes = ", ".join(f"{count} {name}" for name, count in sorted(inbox.by_outcome.items()))
                print(
                    f"inbox: {inbox.read} new message(s){': ' + outcomes if outcomes else ''}"
                    + (f"; NOT READ: {inbox.error}" if inbox.error else "")
                )
            print(
                f"tick {now.isoformat()}: {len(report.sent)} sent, {len(report.retried)} to retry, "
                f"{len(report.failed)} failed, {report.skipped} superseded, {len(report.compose_errors)} not composed"
            )
            inbox_failed = report.inbox is not None and (report.inbox.error or report.inbox.failed)
            return 1 if report.failed or report.compose_errors or inbox_failed else 0
        if args.command == "status" and args.delegation:
            delegation = _delegation(config, args.delegation)
            entries = timeline(store, args.campaign, delegation.id)
            print(format_timeline(entries, config.secretariat.tz, title=f"{delegation.name} ({delegation.id})"))
            return 0
        if args.command == "history":
            campaign = engine.pick_campaign(args.campaign)
            rows = history_rows(store, config, campaign.id)
            text = export_csv(rows) if args.format == "csv" else export_json(rows, campaign=campaign.id)
            _emit(text, args.output)
            return 0
        if args.command == "consolidate":
            campaign = engine.pick_campaign(args.campaign)
            data = consolidated_workbook(config, store, campaign, engine.layout(campaign), now=now)
            write_consolidated(Path(args.output), data, config=config)
            print(f"wrote {Path(args.output).resolve()} ({len(campaign.delegations)} delegations)")
            return 0
        if args.command == "status":
            statuses = engine.status(now, args.campaign)
            upcoming = engine.meeting_status(now)
            if args.json:
                as_json = {"campaigns": [c.as_json() for c in statuses], "meetings": [m.as_json() for m in upcoming]}
                print(json.dumps(as_json, ensure_ascii=False))
            else:
                print(format_status_table(statuses, config.secretariat.tz))
                if upcoming and not args.campaign:
                    print()
                    print(format_meetings_table(upcoming, config.secretariat.tz))
            return 0
        if args.command == "preview":
            if args.kind == "meeting":
                message = engine.preview_meeting(args.delegation, args.meeting, now)
            else:
                message = engine.preview(args.kind, args.delegation, args.campaign, now)
            if args.eml:
                Path(args.eml).write_bytes(message.as_bytes())
            print(_preview_text(message, html=args.html))
            return 0
    raise UsageError(f"unknown command {args.command!r}")


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """SIGTERM and SIGINT ask the pass to stop after the email or message in hand (never in between)."""
    stopping = threading.Event()

    def handler(signum: int, frame: object) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stopping
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _delegation(config: Config, ident: str) -> Delegation:
    try:
        return config.delegation(ident)
    except KeyError:
        known = ", ".join(d.id for d in config.delegations)
        raise UsageError(f"unknown delegation {ident!r} (known: {known})") from None


def _emit(text: str, output: str | None) -> None:
    """Print, or write to a file (CSV line endings kept as written)."""
    if output is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return
    with open(output, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)
    print(f"wrote {Path(output).resolve()}", file=sys.stderr)


def _inspect(config: Config, path: Path, *, as_json: bool, campaign: str | None) -> int:
    """Analyse one file against a snapshot of the store: nothing on disk changes."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    with Store.snapshot(config.store) as store:
        engine = Engine(config, store, make_transport(config), SystemClock())
        if looks_like_workbook(data, path.name):
            result = engine.intake.analyse_workbook(data, path.name, campaign)
        else:
            result = engine.intake.analyse(data, campaign_hint=campaign).as_json()
    if as_json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
    else:
        print(format_inspection(result))
    return 0


def _preview_text(message: object, *, html: bool) -> str:
    from email.message import EmailMessage

    assert isinstance(message, EmailMessage)
    lines = [f"{name}: {value}" for name, value in message.items()]
    body = message.get_body(preferencelist=("html",) if html else ("plain",))
    lines.append("")
    lines.append(body.get_content() if body is not None else "(no body)")
    for part in message.iter_attachments():
        payload = part.get_payload(decode=True)
        size = len(payload) if isinstance(payload, bytes) else 0
        lines.append(f"[attachment: {part.get_filename()} ({part.get_content_type()}, {size} bytes)]")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"mailflow: {len(exc.problems)} configuration problem(s); nothing was done", file=sys.stderr)
        if args.debug:
            raise
        return exc.exit_code
    except MailflowError as exc:
        print(f"mailflow: error: {exc}", file=sys.stderr)
        if args.debug:
            raise
        return exc.exit_code
    except KeyboardInterrupt:
        print("mailflow: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(
            f"mailflow: unexpected error: {type(exc).__name__}: {exc} (run with --debug for details)", file=sys.stderr
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
