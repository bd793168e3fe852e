"""consolidate: the consolidated workbook for 11 delegations x 40 actions and 1,000 delegations x 200 actions.

Set-up, not measured: for each size, a master plan built with
:func:`mailflow.sample.build_sample_plan` (5 strategic lines), a generated
configuration (YAML in a temporary folder, one campaign over every
delegation) and a store filled through the :class:`~mailflow.store.Store` API
as a campaign's replies would have filled it: 60% of the delegations answered
every action, 25% half of them, the rest nothing yet; one in 20 also added a
row and rewrote an Action text (the "changes" sheet). Answers are institution
names with accents, and one in 50 starts with "+" (a phone number), which
must be written as text.

Measured: a child process per run, started through :mod:`benchmarks.processes`
so that its peak RSS is its own. The child imports mailflow, loads the
configuration, reads the master's layout, opens the store, then calls
:func:`mailflow.consolidate.consolidated_workbook` and
:func:`~mailflow.consolidate.write_consolidated`, timing each step with
``time.perf_counter``. Printed per size (best run by consolidation time):

* the consolidation alone (gather from the store, load the master with
  openpyxl, add the columns and sheets, save to bytes) and the atomic write;
  importing openpyxl (which the consolidation does on first use) is timed
  apart, beside the other imports;
* the whole process, spawn to exit, and its peak RSS, next to its RSS just
  before the consolidation (imports, configuration, store open): the
  difference is what the consolidation itself adds;
* the peak of Python allocations during the consolidation alone
  (``tracemalloc``, in one extra run whose times are not reported, as
  tracing slows the allocator down).

The output of one run is read back with python-calamine and checked: a
column per delegation, every answer of a sample of delegations in its place.
"""

from __future__ import annotations

import io
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import python_calamine

from benchmarks.common import (
    CAMPAIGN_ID,
    Stopwatch,
    config_data,
    make_delegations,
    say,
    seconds,
    write_yaml,
)
from benchmarks.processes import ProcessRun, child_env, run_measured
from mailflow.config import load_config
from mailflow.sample import build_sample_plan
from mailflow.store import DelegationState, Store
from mailflow.workbook import MasterLayout, read_master

INSTITUTIONS = (
    "Ministerio de Relaciones Exteriores",
    "Dirección General de Migración y Extranjería",
    "Procuraduría General de la Nación",
    "Instituto Nacional de la Niñez y la Familia",
    "Ministerio de Salud Pública",
    "Secretaría de Desarrollo e Inclusión Social",
    "Patronato Nacional de la Infancia",
)
PHONE_EVERY = 50  # one answer in 50 is a phone number: "+506 …", written as text
CHANGES_EVERY = 20  # one delegation in 20 added a row and rewrote an Action text
NOW = "2017-10-25T12:00:00+00:00"  # after the deadline: the overdue column says yes for the incomplete

CHILD_SCRIPT = """\
import time
_start = time.perf_counter()
import json
import resource
import sys
import tracemalloc
from datetime import datetime
from pathlib import Path

from mailflow.config import load_config
from mailflow.consolidate import consolidated_workbook, write_consolidated
from mailflow.store import Store
from mailflow.workbook import read_master

_imported = time.perf_counter()
import openpyxl  # imported by the consolidation itself: timed apart, as the other imports

_openpyxl = time.perf_counter()
config = load_config(Path(sys.argv[1]))
campaign = config.campaigns[0]
layout = read_master(campaign.workbook, campaign.key_column, campaign.fill_column, campaign.sheet)
store = Store.open(config.store)
now = datetime.fromisoformat(sys.argv[3])
trace = sys.argv[4] == "trace"
_ready = time.perf_counter()
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if trace:
    tracemalloc.start()
data = consolidated_workbook(config, store, campaign, layout, now=now)
_built = time.perf_counter()
heap_peak = tracemalloc.get_traced_memory()[1] if trace else 0
if trace:
    tracemalloc.stop()
write_consolidated(Path(sys.argv[2]), data, config=config)
_written = time.perf_counter()
store.close()
print(json.dumps({
    "imports": _imported - _start,
    "openpyxl": _openpyxl - _imported,
    "setup": _ready - _openpyxl,
    "consolidate": _built - _ready,
    "write": _written - _built,
    "rss_before_kb": rss_before,
    "heap_peak": heap_peak,
    "bytes": len(data),
}))
"""


@dataclass(frozen=True)
class Case:
    delegations: int
    actions: int  # a multiple of 5: the sample plan's five strategic lines


FULL = (Case(11, 40), Case(1000, 200))
QUICK = (Case(11, 40), Case(200, 100))
RUNS = {True: 1, False: 3}  # per case: quick, full


@dataclass(frozen=True)
class Prepared:
    config: Path
    output: Path
    layout: MasterLayout
    seconds: float
    answers: int
    changes: int


def _prepare(base: Path, case: Case) -> Prepared:
    """Master, configuration and a store holding the campaign's replies (through the Store API)."""
    with Stopwatch() as watch:
        plan = base / "plan.xlsx"
        plan.write_bytes(build_sample_plan(actions_per_line=(case.actions // 5,) * 5))
        data = config_data(
            delegations=make_delegations(case.delegations),
            workbook=plan,
            store=base / "mailflow.db",
            mail={"transport": "local", "local": {"outbox": str(base / "outbox"), "inbox": str(base / "inbox")}},
        )
        config = load_config(write_yaml(base / "mailflow.yaml", data))
        campaign = config.campaign(CAMPAIGN_ID)
        layout = read_master(plan, campaign.key_column, campaign.fill_column)
        keys = layout.keys
        answers = changes = 0
        with Store.open(config.store) as store, store.transaction():
            for number, delegation in enumerate(config.campaign_delegations(campaign), start=1):
                at = campaign.opens + timedelta(hours=2 + number % 48)
                share = number % 20
                count = len(keys) if share < 12 else len(keys) // 2 if share < 17 else 0
                if not count:
                    store.set_state(
                        campaign.id,
                        delegation.id,
                        state=DelegationState.AWAITING,
                        filled=0,
                        total=len(keys),
                        missing=keys,
                        at=campaign.opens,
                        reason="request sent",
                    )
                    continue
                inbound = store.add_inbound(
                    folder="INBOX",
                    uidvalidity=1,
                    uid=number,
                    message_id=f"<reply-{number}@{delegation.id.lower()}.example.org>",
                    sha256=f"{number:064x}",
                    size=0,
                    received_at=at,
                    from_address=delegation.contacts[0],
                    subject="RE: plan",
                    kind="reply",
                    campaign=campaign.id,
                    delegation=delegation.id,
                    evidence="benchmark",
                    trusted=True,
                    outcome="applied",
                    reason=None,
                    raw=None,
                )
                given = {
                    key: _answer(number, index, delegation.name) for index, key in enumerate(keys[:count], start=1)
                }
                answers += store.set_answers(
                    campaign.id, delegation.id, given, source="workbook", inbound_id=inbound, attachment_id=None, at=at
                )
                store.set_state(
                    campaign.id,
                    delegation.id,
                    state=DelegationState.COMPLETE if count == len(keys) else DelegationState.PARTIAL,
                    filled=count,
                    total=len(keys),
                    missing=keys[count:],
                    at=at,
                    reason="reply received",
                    last_reply_at=at,
                )
                if number % CHANGES_EVERY == 5:
                    row = layout.rows[number % len(layout.rows)]
                    store.add_row_change(
                        campaign.id,
                        delegation.id,
                        inbound,
                        key="9.9",
                        change="added",
                        column="",
                        before="",
                        after="9.9 · Acción añadida por la delegación",
                        at=at,
                    )
                    store.add_row_change(
                        campaign.id,
                        delegation.id,
                        inbound,
                        key=row.key,
                        change="changed",
                        column="Action",
                        before=row.values[3],
                        after=f"{row.values[3]} (revisada)",
                        at=at,
                    )
                    changes += 2
    return Prepared(base / "mailflow.yaml", base / "consolidado.xlsx", layout, watch.seconds, answers, changes)


def _answer(number: int, index: int, name: str) -> str:
    if (number * 7 + index) % PHONE_EVERY == 0:
        return f"+506 2222 {number % 10_000:04d} ({name})"
    return f"{INSTITUTIONS[(number + index) % len(INSTITUTIONS)]} — {name}"


def _check(prepared: Prepared, case: Case) -> None:
    """Read the output back: one column per delegation, and every answer of a sample of them in its place."""
    config = load_config(prepared.config)
    campaign = config.campaign(CAMPAIGN_ID)
    layout = prepared.layout
    delegations = config.campaign_delegations(campaign)
    with python_calamine.CalamineWorkbook.from_filelike(io.BytesIO(prepared.output.read_bytes())) as book:
        grid = book.get_sheet_by_name(layout.sheet).to_python(skip_empty_area=False)
        summary = book.get_sheet_by_name(book.sheet_names[1]).to_python()
    first = len(layout.headers)  # 0-based index of the first delegation column
    header = grid[layout.header_row - 1]
    assert header[first : first + case.delegations] == [d.name for d in delegations], "delegation headers"
    assert len(summary) == case.delegations + 1, "summary rows"
    with Store.open(config.store) as store:
        current = store.current_answers(campaign.id)
    for index in range(0, case.delegations, max(1, case.delegations // 25)):
        answers = current.get(delegations[index].id, {})
        for row in layout.rows:
            assert grid[row.row - 1][first + index] == answers.get(row.key, ""), (delegations[index].id, row.key)


def _runs(prepared: Prepared, env: dict[str, str], runs: int) -> tuple[list[ProcessRun], list[dict[str, Any]]]:
    argv = [sys.executable, "-c", CHILD_SCRIPT, str(prepared.config), str(prepared.output), NOW]
    # One run first, not counted: the children cache their bytecode in a fresh folder, and the
    # run that compiles it (200 ms more of imports) could otherwise be the one shown.
    run_measured([*argv, "time"], env=env, timeout=600)
    results = [run_measured([*argv, "time"], env=env, timeout=600) for _ in range(runs)]
    return results, [result.json() for result in results]


def run(*, quick: bool = False) -> list[str]:
    cases = QUICK if quick else FULL
    runs = RUNS[quick]
    lines = [
        "consolidate: master + one column per delegation + summary + changes, written to disk "
        f"(a child process per run via benchmarks/processes.py; best of {runs} by consolidation time)"
    ]
    with tempfile.TemporaryDirectory(prefix="mailflow-bench-consolidate-") as tmp:
        env = child_env(Path(tmp) / "pycache")
        for case in cases:
            base = Path(tmp) / f"{case.delegations}x{case.actions}"
            base.mkdir()
            say(f"consolidate: {case.delegations} delegations x {case.actions} actions: filling the store")
            prepared = _prepare(base, case)
            say(f"consolidate: set-up {prepared.seconds:.1f} s; timing {runs} run(s) and one traced run")
            results, marks = _runs(prepared, env, runs)
            _check(prepared, case)
            traced: dict[str, Any] = run_measured(
                [sys.executable, "-c", CHILD_SCRIPT, str(prepared.config), str(prepared.output), NOW, "trace"],
                env=env,
                timeout=600,
            ).json()
            best = min(range(len(results)), key=lambda i: float(marks[i]["consolidate"]))
            result, mark = results[best], marks[best]
            before_mb = int(mark["rss_before_kb"]) / 1024
            cells = case.delegations * case.actions
            megabytes = f"{int(mark['bytes']) / 2**20:.2f}"
            lines += [
                f"  {case.delegations} delegations x {case.actions} actions ({cells:,} answer cells, "
                f"{prepared.answers:,} answers, {prepared.changes} changes; output {megabytes} MB)",
                f"    consolidation {seconds(float(mark['consolidate']))}   write {seconds(float(mark['write']))}   "
                f"whole process {seconds(result.seconds)} (imports {seconds(float(mark['imports']))} "
                f"+ openpyxl {seconds(float(mark['openpyxl']))}, "
                f"config + layout + store {seconds(float(mark['setup']))})",
                f"    peak RSS {result.peak_rss_mb:.0f} MB (before the consolidation {before_mb:.0f} MB: "
                f"+{result.peak_rss_mb - before_mb:.0f} MB)   Python heap peak of the consolidation "
                f"{int(traced['heap_peak']) / 2**20:.0f} MB (tracemalloc)",
            ]
    return lines


if __name__ == "__main__":
    print("\n".join(run(quick="--quick" in sys.argv)))
