"""status: ``mailflow status --json`` on a store of 10,000 delegations (target: under 1 s wall time).

The store is filled the way mailflow fills it: a real ``tick`` at the
campaign's ``opens`` instant on the local transport (every request composed
with its workbook copy, recorded and written to a maildir outbox). Then,
through the :class:`~mailflow.store.Store` API, what the following days would
have added: replies (20% complete, 30% partial, the rest still awaiting), the
first reminder (Friday's) to everyone not complete (mostly sent, a few waiting for a
retry, a few refused for good) and some contacts refused by the server.

The command is then timed as a user runs it (a subprocess, best and median of
3), next to its parts measured in this process: interpreter start and
imports, configuration load, resource checks, the store query and status
computation, and the JSON output.
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from benchmarks.common import (
    CAMPAIGN_ID,
    Stopwatch,
    Timings,
    config_data,
    make_delegations,
    repeat,
    say,
    seconds,
    verdict,
    write_yaml,
)
from mailflow import cli, schedule
from mailflow.checks import check_resources
from mailflow.clock import FixedClock
from mailflow.config import Config, load_config
from mailflow.engine import Engine
from mailflow.render import make_message_id
from mailflow.sample import write_sample_plan
from mailflow.sender import LocalTransport
from mailflow.store import DelegationState, OutboxStatus, Store

TARGET_SECONDS = 1.0
RUNS = 3
PART_BUDGET_SECONDS = 8.0  # a slow part is timed fewer than RUNS times, to keep the benchmark within minutes
# Saturday noon, secretariat time: the requests went out on Wednesday, the first reminders on Friday morning
# (delegation time), the 0d reminder is due on Monday.
NOW = "2017-10-21T12:00"
SECOND_CONTACT_EVERY = 50  # these delegations have two contacts; the second one was refused by the server
RETRY_EVERY = 100  # the reminder of 1 delegation in 100 waits for a retry (temporary failure)
FAILED_EVERY = 250  # ... and of 1 in 250 was refused for good


@dataclass(frozen=True)
class Sizes:
    delegations: int


FULL = Sizes(delegations=10_000)
QUICK = Sizes(delegations=500)


@dataclass(frozen=True)
class Filled:
    config_path: Path
    tick_seconds: float
    extra_seconds: float
    states: Counter[str]
    outbox_rows: int
    store_bytes: int


def _fill(base: Path, count: int) -> Filled:
    """Write the configuration and fill the store as a campaign's first days would."""
    workbook = base / "plan.xlsx"
    write_sample_plan(workbook)  # the 40-action sample, as shipped in templates/workbooks
    data = config_data(
        delegations=make_delegations(count, second_contact_every=SECOND_CONTACT_EVERY),
        workbook=workbook,
        store=base / "mailflow.db",
        mail={"transport": "local", "local": {"outbox": str(base / "outbox"), "inbox": str(base / "inbox")}},
    )
    path = write_yaml(base / "mailflow.yaml", data)
    config = load_config(path)
    campaign = config.campaign(CAMPAIGN_ID)
    opens = campaign.opens

    say(f"status: filling the store: tick at opens, {count} requests to a local maildir outbox")
    with Store.open(config.store) as store:
        engine = Engine(config, store, LocalTransport(config.mail.local.outbox), FixedClock(opens))
        with Stopwatch() as tick:
            report = engine.tick()
        assert len(report.sent) == count and not report.failed and not report.compose_errors, report
        say(f"status: tick done in {tick.seconds:.1f} s; adding replies, reminders and refusals")
        with Stopwatch() as extra:
            _after_opening(config, store, engine)
        outbox_rows = len(store.outbox(campaign=CAMPAIGN_ID))
        states = Counter(row.state.value for row in store.states(CAMPAIGN_ID).values())
    return Filled(path, tick.seconds, extra.seconds, states, outbox_rows, config.store.stat().st_size)


def _after_opening(config: Config, store: Store, engine: Engine) -> None:
    """Replies, the first reminders and refusals, recorded as the engine and the reply reader record them."""
    campaign = config.campaign(CAMPAIGN_ID)
    domain = config.secretariat.domain
    keys = tuple(row.key for row in engine.layout(campaign).rows)
    total = len(keys)
    with store.transaction():
        for number, delegation in enumerate(config.campaign_delegations(campaign), start=1):
            reply_at = campaign.opens + timedelta(hours=2 + number % 36)
            if number % 10 in (0, 1):
                store.set_state(
                    campaign.id,
                    delegation.id,
                    state=DelegationState.COMPLETE,
                    filled=total,
                    total=total,
                    missing=(),
                    at=reply_at,
                    reason="return complete",
                    last_reply_at=reply_at,
                )
                continue
            if number % 10 in (2, 3, 4):
                filled = 5 + number % 30
                store.set_state(
                    campaign.id,
                    delegation.id,
                    state=DelegationState.PARTIAL,
                    filled=filled,
                    total=total,
                    missing=keys[filled:],
                    at=reply_at,
                    reason=f"return received: {filled} of {total} rows filled",
                    last_reply_at=reply_at,
                )
            _reminder(store, campaign.id, delegation.id, schedule.slots(campaign, delegation), number, domain)
            if number % SECOND_CONTACT_EVERY == 0:
                address = delegation.contacts[-1]
                at = campaign.opens + timedelta(minutes=1)
                store.record_refusal(address, delegation.id, 550, "5.1.1 mailbox unavailable", at, None)
                store.record_event(
                    at,
                    "contact_refused",
                    f"{address} refused for good: 550 5.1.1 mailbox unavailable",
                    campaign=campaign.id,
                    delegation=delegation.id,
                    detail={"address": address, "code": 550},
                )


def _reminder(
    store: Store, campaign: str, delegation: str, calendar: list[schedule.Slot], number: int, domain: str
) -> None:
    # The first reminder: Friday morning, delegation time (the -1d of Sunday 22, moved back to Friday the 20th).
    slot = next(slot for slot in calendar if slot.kind == schedule.REMINDER)
    outbox_id = store.add_outbox(
        campaign=campaign,
        delegation=delegation,
        kind=slot.kind,
        slot=slot.key,
        message_id=make_message_id(domain, campaign, delegation, slot.key),
        status=OutboxStatus.PENDING,
        scheduled_at=slot.at,
        created_at=slot.at,
    )
    assert outbox_id is not None
    detail = {"kind": slot.kind, "slot": slot.key}
    if number % RETRY_EVERY == 7:
        error = "server said 451 4.3.0 Temporary server error, please try again later"
        store.mark_retry(outbox_id, error, slot.at + timedelta(minutes=5))
        store.record_event(slot.at, "send_retry", error, campaign=campaign, delegation=delegation, detail=detail)
    elif number % FAILED_EVERY == 11:
        error = "server refused: 554 5.7.1 message rejected as spam"
        store.mark_failed(outbox_id, error)
        store.record_event(slot.at, "send_failed", error, campaign=campaign, delegation=delegation, detail=detail)
    else:
        store.mark_sent(outbox_id, slot.at)
        store.record_event(
            slot.at, "email_sent", "reminder sent", campaign=campaign, delegation=delegation, detail=detail
        )


def _mailflow_command() -> list[str]:
    script = Path(sys.executable).parent / "mailflow"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mailflow.cli"]


@dataclass(frozen=True)
class CommandRun:
    seconds: float
    peak_rss_mb: float
    output: Path


def _run_command(argv: list[str], output: Path) -> CommandRun:
    """Run ``argv`` with stdout to ``output``; its wall time and its own peak RSS (from wait4)."""
    with output.open("wb") as out, Stopwatch() as watch:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    errors = process.stderr.read().decode("utf-8", "replace") if process.stderr else ""
    if process.stderr:
        process.stderr.close()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {process.returncode}: {errors.strip()}")
    return CommandRun(watch.seconds, usage.ru_maxrss / 1024, output)


def _check_output(path: Path, filled: Filled, count: int) -> None:
    document = json.loads(path.read_text(encoding="utf-8"))
    delegations = document["campaigns"][0]["delegations"]
    assert len(delegations) == count, f"status --json listed {len(delegations)} delegations of {count}"
    states = Counter(d["state"] for d in delegations)
    assert states == filled.states, f"status --json states {dict(states)} differ from the store's {filled.states}"


def _profile(argv: list[str]) -> str:
    profiler = cProfile.Profile()
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        profiler.runcall(cli.main, argv)
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("cumulative").print_stats(25)
    stats.sort_stats("tottime").print_stats(15)
    return text.getvalue()


def run(*, quick: bool = False, profile: bool = False) -> list[str]:
    sizes = QUICK if quick else FULL
    n = sizes.delegations
    with tempfile.TemporaryDirectory(prefix="mailflow-bench-status-") as tmp:
        base = Path(tmp)
        filled = _fill(base, n)
        config_path = filled.config_path
        argv = ["--config", str(config_path), "status", "--json", "--now", NOW]
        command = [*_mailflow_command(), *argv]

        say(f"status: timing `mailflow {' '.join(argv)}` as a subprocess, {RUNS} runs")
        runs = [_run_command(command, base / f"status-{index}.json") for index in range(RUNS)]
        _check_output(runs[0].output, filled, n)
        output_size = runs[0].output.stat().st_size
        wall = Timings(tuple(r.seconds for r in runs))
        command_rss = max(r.peak_rss_mb for r in runs)

        say("status: timing the parts")
        python = repeat(lambda: _run_command([sys.executable, "-c", "pass"], base / "empty.txt"), RUNS)
        imports = repeat(lambda: _run_command([sys.executable, "-c", "import mailflow.cli"], base / "empty.txt"), RUNS)
        load = repeat(lambda: load_config(config_path), RUNS, PART_BUDGET_SECONDS)
        config = load_config(config_path)
        checks = repeat(lambda: check_resources(config), RUNS, PART_BUDGET_SECONDS)
        now = cli.parse_now(NOW, config)
        assert now is not None

        def status_once() -> None:
            with Store.open(config.store) as store:
                Engine(config, store, LocalTransport(config.mail.local.outbox), FixedClock(now)).status(now)

        status = repeat(status_once, RUNS, PART_BUDGET_SECONDS)
        with Store.open(config.store) as store:
            engine = Engine(config, store, LocalTransport(config.mail.local.outbox), FixedClock(now))
            statuses = engine.status(now)
        dump = repeat(
            lambda: json.dumps({"campaigns": [c.as_json() for c in statuses]}, ensure_ascii=False, indent=2), RUNS
        )

        def main_once() -> None:
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
                assert cli.main(argv) == 0

        in_process = repeat(main_once, RUNS, PART_BUDGET_SECONDS)
        if profile:
            say("status: cProfile of cli.main (in this process), top costs by cumulative and own time:")
            print(_profile(argv), file=sys.stderr, flush=True)

    met = wall.best < TARGET_SECONDS
    states = ", ".join(f"{name} {filled.states[name]}" for name in ("awaiting", "partial", "complete"))
    startup = imports.best
    parts = [
        ("interpreter start", python.best),
        ("imports (mailflow.cli)", imports.best - python.best),
        ("config load (YAML + validation)", load.best),
        ("resource checks (workbook, templates)", checks.best),
        ("store read + Engine.status", status.best),
        ("JSON output (json.dumps indent=2)", dump.best),
    ]
    accounted = startup + load.best + checks.best + status.best + dump.best
    lines = [
        f"status: `mailflow status --json` on {n} delegations ({states}; {filled.outbox_rows} outbox rows; "
        f"store {filled.store_bytes / 2**20:.0f} MB, output {output_size / 2**20:.1f} MB)",
        f"  mailflow status --json (subprocess)  best {seconds(wall.best)}  median {seconds(wall.median)}   "
        f"target < {TARGET_SECONDS:.0f} s  {verdict(met)}",
        f"  the same, cli.main in this process   best {seconds(in_process.best)}  median {seconds(in_process.median)}"
        f"   ({len(in_process.runs)} run{'s' if len(in_process.runs) > 1 else ''})",
        "  where the time goes (best of each; the first two as subprocesses):",
    ]
    lines += [f"    {label:<40} {seconds(value):>8}" for label, value in parts]
    lines += [
        f"    {'sum of the parts':<40} {seconds(accounted):>8}",
        f"  peak RSS of the command {command_rss:.0f} MB",
        f"  set-up: tick at opens with the local transport {filled.tick_seconds:.1f} s "
        f"({n / filled.tick_seconds:.0f} requests/s), replies and reminders {filled.extra_seconds:.1f} s",
    ]
    if not met and not profile:
        lines.append("  (run `benchmarks/run.py --only status --profile` for the cProfile of the command's costs)")
    return lines
