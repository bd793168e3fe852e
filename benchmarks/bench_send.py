"""send: 1,000 requests, each with its own ~50 KB workbook, through mailflow and through a bare smtplib loop.

Two measurements, each run twice (once with --quick), interleaved, each run
against a fresh counting aiosmtpd on a loopback port:

* mailflow: ``Engine.tick`` at the campaign's ``opens`` instant on a fresh
  store: plan, then compose (templates, each delegation's fingerprinted
  workbook copy, MIME), record, and send every request over one SMTP
  connection, each email composed while the server takes in the previous
  one. ``plan``, ``send_pending`` and ``compose_bytes`` are wrapped on that
  instance, so the split is the split of the measured tick itself (the
  composing is inside the send phase);
* the baseline: a bare ``smtplib`` loop sending the very bytes mailflow
  stored in its first run (``Store.body``), to the same recipients, over one
  connection (connect and QUIT included, as in mailflow's batch).

The server runs in a separate process by default, so that its asyncio loop
does not take the GIL from the client being measured (``--server thread``
runs it in this process instead, as the test rig does).

Each run checks that the server received every message.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import functools
import smtplib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    CAMPAIGN_ID,
    LOOPBACK,
    ServerMode,
    SmtpSink,
    Stopwatch,
    config_data,
    kb,
    make_delegations,
    peak_rss_mb,
    say,
    seconds,
    verdict,
    write_yaml,
)
from mailflow.checks import load_checked_config
from mailflow.cli import make_transport
from mailflow.clock import FixedClock
from mailflow.config import Config
from mailflow.engine import Engine, TickReport
from mailflow.sample import write_sample_plan
from mailflow.store import Store

TARGET_RATIO = 1.5
# 5 strategic lines of 240 actions: a master of about 50 KB (the copies add the highlight and fingerprint).
ACTIONS_PER_LINE = (240, 240, 240, 240, 240)


@dataclass(frozen=True)
class Sizes:
    requests: int
    actions_per_line: tuple[int, ...]
    runs: int  # each of mailflow and the bare loop, interleaved; the best counts


FULL = Sizes(requests=1000, actions_per_line=ACTIONS_PER_LINE, runs=2)
QUICK = Sizes(requests=50, actions_per_line=ACTIONS_PER_LINE, runs=1)


def _config(folder: Path, workbook: Path, port: int, requests: int) -> tuple[Config, float]:
    """Write and load (as the command line does: with the resource checks) a config sending to ``port``."""
    data = config_data(
        delegations=make_delegations(requests),
        workbook=workbook,
        store=folder / "mailflow.db",
        mail={"transport": "smtp", "smtp": {"host": LOOPBACK, "port": port, "security": "none", "timeout": 60}},
    )
    path = write_yaml(folder / "mailflow.yaml", data)
    with Stopwatch() as watch:
        config = load_checked_config(path)
    return config, watch.seconds


def _check_report(report: TickReport, expected: int, what: str) -> None:
    problems = (report.failed, report.retried, report.compose_errors)
    assert len(report.sent) == expected and not any(problems), (
        f"{what}: {len(report.sent)} sent of {expected}; failed {len(report.failed)}, "
        f"retried {len(report.retried)}, not composed {len(report.compose_errors)}"
    )


def _check_received(sink: SmtpSink, expected: int, what: str) -> int:
    received = sink.received()
    assert received.messages == expected, f"{what}: the server received {received.messages} of {expected} messages"
    return received.bytes


def _attachment_size(raw: bytes) -> int:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    for part in message.iter_attachments():
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            return len(payload)
    raise AssertionError("the stored request has no attachment")


@dataclass
class MailflowRun:
    """One measured ``tick`` on a fresh store, with the time of each phase inside that very tick."""

    seconds: float
    phases: dict[str, float]
    load_seconds: float
    rss_before: float
    rss_after: float
    sender: str


# compose_bytes runs inside send_pending: each email is composed while the server takes in the previous one.
PHASES = ("plan", "compose_bytes", "send_pending")


def _time_phases(engine: Engine) -> dict[str, float]:
    """Wrap the engine's phase methods (on this instance only) so ``tick`` reports the time of each."""
    spent: dict[str, float] = {}
    for name in PHASES:
        method: Callable[..., Any] = getattr(engine, name)

        def timed(*args: Any, _method: Callable[..., Any] = method, _name: str = name, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                spent[_name] = spent.get(_name, 0.0) + time.perf_counter() - start

        setattr(engine, name, functools.wraps(method)(timed))
    return spent


def _mailflow_tick(
    folder: Path, workbook: Path, n: int, server: ServerMode, keep: list[tuple[list[str], bytes]] | None
) -> MailflowRun:
    """A tick at `opens` on a fresh store against a fresh server; ``keep`` receives the stored messages."""
    with SmtpSink(server) as sink:
        config, load_seconds = _config(folder, workbook, sink.port, n)
        opens = config.campaign(CAMPAIGN_ID).opens
        say(f"send: mailflow tick, {n} requests to {sink.description} on port {sink.port}")
        with Store.open(config.store) as store:
            engine = Engine(config, store, make_transport(config), FixedClock(opens))
            phases = _time_phases(engine)
            rss_before = peak_rss_mb()
            with Stopwatch() as tick:
                report = engine.tick()
            rss_after = peak_rss_mb()
            _check_report(report, n, "mailflow tick")
            _check_received(sink, n, "mailflow tick")
            if keep is not None:
                sent = set(report.sent)
                rows = store.outbox(campaign=CAMPAIGN_ID)
                keep.extend((list(row.recipients), store.body(row.id)) for row in rows if row.id in sent)
    say(f"send: mailflow tick took {tick.seconds:.2f} s")
    return MailflowRun(tick.seconds, phases, load_seconds, rss_before, rss_after, config.secretariat.address)


def _bare_loop(sender: str, prepared: list[tuple[list[str], bytes]], server: ServerMode) -> tuple[float, int]:
    """The baseline: the prepared messages through smtplib over one connection (connect and QUIT included)."""
    with SmtpSink(server) as sink:
        say(f"send: bare smtplib loop, {len(prepared)} prepared messages")
        with Stopwatch() as bare:
            client = smtplib.SMTP(LOOPBACK, sink.port, timeout=60)
            for recipients, raw in prepared:
                client.sendmail(sender, recipients, raw)
            client.quit()
        received_bytes = _check_received(sink, len(prepared), "bare smtplib loop")
    say(f"send: bare smtplib loop took {bare.seconds:.2f} s")
    return bare.seconds, received_bytes


def run(*, quick: bool = False, server: ServerMode = "process") -> list[str]:
    sizes = QUICK if quick else FULL
    n = sizes.requests
    mailflow_runs: list[MailflowRun] = []
    bare_runs: list[float] = []
    prepared: list[tuple[list[str], bytes]] = []
    with tempfile.TemporaryDirectory(prefix="mailflow-bench-send-") as tmp:
        base = Path(tmp)
        workbook = base / "plan.xlsx"
        say(f"send: building the sample workbook ({sum(sizes.actions_per_line)} actions)")
        write_sample_plan(workbook, actions_per_line=sizes.actions_per_line)
        master_size = workbook.stat().st_size
        # Interleaved, each on a fresh server (and mailflow on a fresh store): mailflow, bare, mailflow, bare.
        for index in range(sizes.runs):
            keep = prepared if index == 0 else None
            mailflow_runs.append(_mailflow_tick(base / f"tick-{index}", workbook, n, server, keep))
            assert len(prepared) == n, f"{len(prepared)} stored messages for {n} requests"
            bare_seconds, received_bytes = _bare_loop(mailflow_runs[0].sender, prepared, server)
            bare_runs.append(bare_seconds)
    message_bytes = sum(len(raw) for _, raw in prepared)
    copy_size = _attachment_size(prepared[0][1])
    del prepared

    first = mailflow_runs[0]
    best = min(mailflow_runs, key=lambda r: r.seconds)
    bare = min(bare_runs)
    ratio = best.seconds / bare
    send_phase = best.phases.get("send_pending")
    composing = best.phases.get("compose_bytes")
    phases = (
        f"plan {seconds(best.phases['plan']) if 'plan' in best.phases else 'n/a'} / "
        f"send {seconds(send_phase) if send_phase is not None else 'n/a'}"
        + (
            f" (of which composing {seconds(composing)}, each email while the server takes in the previous one)"
            if composing is not None
            else ""
        )
    )
    other = best.seconds - best.phases.get("plan", 0.0) - (send_phase or 0.0)
    if other > 0.01 * best.seconds:
        phases += f" / rest of the tick {seconds(other)}"
    description = SmtpSink(server).description
    runs = sizes.runs
    return [
        f"send: {n} requests, workbook {kb(master_size)} each (copy {kb(copy_size)}, "
        f"message {kb(message_bytes / n)}), {description}; best of {runs}",
        f"  bare smtplib loop     {bare:7.2f} s  {n / bare:6.0f} msg/s   runs {_runs(bare_runs)}",
        f"  mailflow tick         {best.seconds:7.2f} s  {n / best.seconds:6.0f} msg/s   runs "
        f"{_runs([r.seconds for r in mailflow_runs])}   ratio {ratio:.2f}x (target <= {TARGET_RATIO}x)  "
        f"{verdict(ratio <= TARGET_RATIO)}",
        f"    {phases}   (inside that tick"
        + (f"; send phase vs bare loop {send_phase / bare:.2f}x)" if send_phase else ")"),
        f"    per message: mailflow {best.seconds / n * 1000:.2f} ms, bare loop {bare / n * 1000:.2f} ms",
        f"  config load + checks ({n} delegations)  {seconds(first.load_seconds)} (not in the tick)",
        f"  peak RSS {first.rss_after:.0f} MB after the first tick ({first.rss_before:.0f} MB before it); "
        f"server received {kb(received_bytes / n)} per message",
    ]


def _runs(values: list[float]) -> str:
    return ", ".join(f"{value:.2f}" for value in values)
