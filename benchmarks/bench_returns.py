"""returns: reading a returned 10,000-row workbook, against python-calamine's bare read of the same file.

The returned file is what a delegation sends back: the request copy of a
10,000-action plan (100 strategic lines of 100 actions, built with
:func:`mailflow.sample.build_sample_plan`; the copy carries the highlighted
fill column and the fingerprint), with every "Responsible" cell filled in
with openpyxl.

Two measurements, both printed:

* **whole process against whole process** (the issue's figure), interleaved,
  best of 5 each, every command started the same way (see
  :mod:`benchmarks.processes`):

  - baseline: ``python -c`` importing python_calamine, opening the file and
    iterating every row of its first sheet;
  - mailflow: ``python -c`` importing :mod:`mailflow.returns`, reading the
    master's layout with :func:`mailflow.workbook.read_master` (the engine
    needs it to compare) and calling :func:`mailflow.returns.read_return`.

  Each child prints ``time.perf_counter`` marks, so the wall time splits into
  interpreter start-up and exit, imports, the master read and the read
  itself. Children cache their bytecode in a temporary folder, as an
  installed package would; the imports without a bytecode cache (what a shell
  with ``PYTHONDONTWRITEBYTECODE=1`` gets) are shown on their own line.

* **in this process**: the bare calamine read of the bytes against
  ``read_return`` on the same bytes (and ``preflight`` alone), min of 15.
"""

from __future__ import annotations

import io
import os
import re
import sys
import sysconfig
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import python_calamine

from benchmarks.common import Stopwatch, repeat, say, seconds, verdict
from benchmarks.processes import ProcessRun, child_env, run_measured
from mailflow.returns import STATUS_PARSED, ReturnLimits, preflight, read_return
from mailflow.sample import build_sample_plan
from mailflow.workbook import MasterLayout, RequestWorkbookFactory, make_fingerprint, read_master
from tests.helpers import fill_workbook

TARGET_RATIO = 1.5
KEY_COLUMN = "Code"
FILL_COLUMN = "Responsible"
# What delegations write in the Responsible column (accents and all), cycled through the actions.
INSTITUTIONS = (
    "Ministerio de Relaciones Exteriores",
    "Dirección General de Migración y Extranjería",
    "Procuraduría General de la Nación",
    "Instituto Nacional de la Niñez y la Familia",
    "Ministerio de Salud Pública",
    "Secretaría de Desarrollo e Inclusión Social",
    "Patronato Nacional de la Infancia",
)

# The children print their marks as one JSON object on stdout.
BARE_SCRIPT = """\
import time
_start = time.perf_counter()
import sys
import python_calamine
_imported = time.perf_counter()
book = python_calamine.CalamineWorkbook.from_path(sys.argv[1])
rows = 0
for _row in book.get_sheet_by_index(0).to_python():
    rows += 1
_read = time.perf_counter()
import json
print(json.dumps({"imports": _imported - _start, "read": _read - _imported, "rows": rows}))
"""

MAILFLOW_SCRIPT = """\
import time
_start = time.perf_counter()
import json
import sys
from pathlib import Path

from mailflow.returns import read_return
from mailflow.workbook import read_master

_imported = time.perf_counter()
layout = read_master(Path(sys.argv[1]), "Code", "Responsible")
_master = time.perf_counter()
returned = Path(sys.argv[2])
reading = read_return(returned.read_bytes(), returned.name, layout, "Code", "Responsible")
_read = time.perf_counter()
print(json.dumps({
    "imports": _imported - _start,
    "master": _master - _imported,
    "read": _read - _master,
    "status": reading.status,
    "reason": reading.reason,
    "answers": len(reading.answers),
    "keys": len(layout.keys),
}))
"""


@dataclass(frozen=True)
class Sizes:
    actions_per_line: tuple[int, ...]
    process_runs: int
    inprocess_runs: int


FULL = Sizes(actions_per_line=(100,) * 100, process_runs=5, inprocess_runs=15)
QUICK = Sizes(actions_per_line=(20,) * 10, process_runs=2, inprocess_runs=5)


@dataclass(frozen=True)
class Files:
    master: Path
    returned: Path
    layout: MasterLayout
    build_seconds: float


def _build(base: Path, actions_per_line: tuple[int, ...]) -> Files:
    """The master plan, and the request copy of one delegation with every action answered."""
    with Stopwatch() as watch:
        master = base / "plan.xlsx"
        master.write_bytes(build_sample_plan(actions_per_line=actions_per_line))
        layout = read_master(master, KEY_COLUMN, FILL_COLUMN)
        copy = RequestWorkbookFactory(master, layout).build(
            make_fingerprint(b"benchmark-secret", "responsible-2017", "D0001")
        )
        answers = {row.key: INSTITUTIONS[index % len(INSTITUTIONS)] for index, row in enumerate(layout.rows)}
        returned = base / "Plan estratégico - Delegación 1.xlsx"
        returned.write_bytes(fill_workbook(copy, answers, column=FILL_COLUMN))
    return Files(master, returned, layout, watch.seconds)


def _bare_read(data: bytes) -> int:
    book = python_calamine.CalamineWorkbook.from_filelike(io.BytesIO(data))
    rows = 0
    for _row in book.get_sheet_by_index(0).to_python():
        rows += 1
    return rows


@dataclass
class ProcessFigures:
    runs: list[ProcessRun]
    marks: list[dict[str, Any]]

    def best(self) -> tuple[ProcessRun, dict[str, Any]]:
        index = min(range(len(self.runs)), key=lambda i: self.runs[i].seconds)
        return self.runs[index], self.marks[index]

    def best_mark(self, name: str) -> float:
        return min(float(mark[name]) for mark in self.marks)


def _measure(
    argv: list[str], env: dict[str, str], figures: ProcessFigures, check: Callable[[dict[str, Any]], None]
) -> None:
    run = run_measured(argv, env=env)
    marks = run.json() if run.stdout.strip() else {}
    check(marks)
    figures.runs.append(run)
    figures.marks.append(marks)


_IMPORT_LINE = re.compile(r"^import time:\s+(\d+)\s*\|\s*(\d+)\s*\|( *)(\S+)")


def _import_costs(env: dict[str, str], runs: int = 3) -> tuple[float, list[tuple[str, float]]]:
    """``-X importtime`` of the mailflow child's imports: (mailflow.returns in all, its largest direct imports).

    Cumulative seconds, per module the least of ``runs`` runs. A module's
    imports are printed before it, one level deeper."""
    best: dict[str, float] = {}
    children: set[str] = set()
    for _ in range(runs):
        run = run_measured(
            [sys.executable, "-X", "importtime", "-c", "import mailflow.returns, mailflow.workbook"], env=env
        )
        pending: list[str] = []
        for line in run.stderr.splitlines():
            match = _IMPORT_LINE.match(line)
            if match is None:
                continue
            name, cumulative, depth = match[4], int(match[2]) / 1e6, len(match[3]) // 2
            best[name] = min(best.get(name, cumulative), cumulative)
            if depth == 1:
                pending.append(name)
            elif depth == 0:
                if name == "mailflow.returns":
                    children.update(pending)
                pending = []
    direct = sorted(((name, best[name]) for name in children), key=lambda item: item[1], reverse=True)
    return best.get("mailflow.returns", 0.0), direct[:6]


def _import_roots() -> list[str]:
    """Where this process finds mailflow and its dependencies, for children started without site."""
    roots = [str(Path(__file__).resolve().parent.parent)]
    for key in ("purelib", "platlib"):
        folder = sysconfig.get_paths()[key]
        if folder not in roots:
            roots.append(folder)
    return roots


def run(*, quick: bool = False) -> list[str]:
    sizes = QUICK if quick else FULL
    actions = sum(sizes.actions_per_line)
    with tempfile.TemporaryDirectory(prefix="mailflow-bench-returns-") as tmp:
        base = Path(tmp)
        say(f"returns: building a {actions}-action plan, its request copy and a filled return (openpyxl)")
        files = _build(base, sizes.actions_per_line)
        data = files.returned.read_bytes()
        reading = read_return(data, files.returned.name, files.layout, KEY_COLUMN, FILL_COLUMN)
        assert reading.status == STATUS_PARSED, reading.reason
        assert len(reading.answers) == actions and not reading.missing, (len(reading.answers), len(reading.missing))
        assert reading.fingerprint is not None and not reading.added and not reading.changed
        sheet_rows = _bare_read(data)
        say(f"returns: built in {files.build_seconds:.1f} s; {len(data) / 1024:.0f} KB, {sheet_rows} sheet rows")

        # -- whole processes -------------------------------------------------
        env = child_env(base / "pycache")
        python = [sys.executable]
        empty = ProcessFigures([], [])
        bare = ProcessFigures([], [])
        mailflow = ProcessFigures([], [])

        def bare_ok(marks: dict[str, Any]) -> None:
            assert marks["rows"] == sheet_rows, f"bare read saw {marks['rows']} rows of {sheet_rows}"

        def mailflow_ok(marks: dict[str, Any]) -> None:
            assert marks["status"] == STATUS_PARSED, marks
            assert marks["answers"] == actions == marks["keys"], marks

        bare_argv = [*python, "-c", BARE_SCRIPT, str(files.returned)]
        mailflow_argv = [*python, "-c", MAILFLOW_SCRIPT, str(files.master), str(files.returned)]
        say("returns: warming up (bytecode cache, page cache)")
        _measure(bare_argv, env, ProcessFigures([], []), bare_ok)
        _measure(mailflow_argv, env, ProcessFigures([], []), mailflow_ok)
        say(f"returns: whole processes, {sizes.process_runs} runs each, interleaved")
        for _ in range(sizes.process_runs):
            _measure([*python, "-c", "pass"], env, empty, lambda marks: None)
            _measure(bare_argv, env, bare, bare_ok)
            _measure(mailflow_argv, env, mailflow, mailflow_ok)
        # The same pair without site (python -S, the packages on PYTHONPATH), as mailflow's reader
        # process starts: neither pays site's imports (pathlib among them, for the editable install's
        # finder), so mailflow's own imports of them show.
        no_site_env = child_env(base / "pycache", PYTHONPATH=os.pathsep.join(_import_roots()))
        bare_no_site = ProcessFigures([], [])
        mailflow_no_site = ProcessFigures([], [])
        for _ in range(sizes.process_runs):
            _measure([*python, "-S", *bare_argv[1:]], no_site_env, bare_no_site, bare_ok)
            _measure([*python, "-S", *mailflow_argv[1:]], no_site_env, mailflow_no_site, mailflow_ok)
        say("returns: imports without a bytecode cache, and -X importtime")
        uncached = ProcessFigures([], [])
        for _ in range(min(3, sizes.process_runs)):
            _measure(mailflow_argv, child_env(None, PYTHONDONTWRITEBYTECODE="1"), uncached, mailflow_ok)
        import_total, import_children = _import_costs(env)

        # -- in this process -------------------------------------------------
        say(f"returns: in this process, {sizes.inprocess_runs} runs each, interleaved")
        limits = ReturnLimits()
        bare_in: list[float] = []
        read_in: list[float] = []
        preflight_in: list[float] = []
        for _ in range(sizes.inprocess_runs):
            bare_in += repeat(lambda: _bare_read(data), 1).runs
            read_in += repeat(
                lambda: read_return(data, files.returned.name, files.layout, KEY_COLUMN, FILL_COLUMN, limits), 1
            ).runs
            preflight_in += repeat(lambda: preflight(data, files.returned.name, limits), 1).runs
        master_in = repeat(lambda: read_master(files.master, KEY_COLUMN, FILL_COLUMN), 5).best

    empty_best, _ = empty.best()
    bare_best, bare_marks = bare.best()
    mf_best, mf_marks = mailflow.best()
    ratio = mf_best.seconds / bare_best.seconds
    without_master = mf_best.seconds - float(mf_marks["master"])
    read_ratio = mailflow.best_mark("read") / bare.best_mark("read")
    inproc_ratio = min(read_in) / min(bare_in)
    startup = empty_best.seconds
    mf_rest = mf_best.seconds - float(mf_marks["imports"]) - float(mf_marks["master"]) - float(mf_marks["read"])
    bare_rest = bare_best.seconds - float(bare_marks["imports"]) - float(bare_marks["read"])
    floor = startup + float(mf_marks["imports"]) + float(mf_marks["master"])
    n = sizes.process_runs
    lines = [
        f"returns: a returned workbook of {actions:,} actions ({sheet_rows:,} sheet rows, {len(data) / 1024:.0f} KB, "
        f"every Responsible cell filled); whole processes best of {n}, interleaved",
        f"  python -c pass                        {seconds(startup):>8}   peak RSS {empty_best.peak_rss_mb:5.0f} MB",
        f"  bare calamine read (python -c)        {seconds(bare_best.seconds):>8}   peak RSS "
        f"{bare_best.peak_rss_mb:5.0f} MB   imports {seconds(float(bare_marks['imports']))}, "
        f"read {seconds(float(bare_marks['read']))}, start+exit {seconds(bare_rest)}",
        f"  mailflow read_return (python -c)      {seconds(mf_best.seconds):>8}   peak RSS "
        f"{mf_best.peak_rss_mb:5.0f} MB   ratio {ratio:.2f}x (target <= {TARGET_RATIO}x)  "
        f"{verdict(ratio <= TARGET_RATIO)}",
        f"    inside it: imports {seconds(float(mf_marks['imports']))}, master read (read_master, "
        f"{actions:,} rows) {seconds(float(mf_marks['master']))}, read_return {seconds(float(mf_marks['read']))}, "
        f"start+exit {seconds(mf_rest)}",
        f"    without the master read {seconds(without_master)} ({without_master / bare_best.seconds:.2f}x); "
        f"read_return alone vs the bare read inside the children {read_ratio:.2f}x "
        f"(best marks: {seconds(mailflow.best_mark('read'))} vs {seconds(bare.best_mark('read'))})",
        f"    the floor before reading a byte (start + imports + master) {seconds(floor)} = "
        f"{floor / bare_best.seconds:.2f}x the whole bare process",
        f"    both without site (python -S, as mailflow's reader process starts): bare "
        f"{seconds(bare_no_site.best()[0].seconds)}, mailflow {seconds(mailflow_no_site.best()[0].seconds)}, "
        f"ratio {mailflow_no_site.best()[0].seconds / bare_no_site.best()[0].seconds:.2f}x "
        f"(mailflow imports {seconds(mailflow_no_site.best_mark('imports'))}: what site imported for both "
        "is mailflow's alone)",
        f"    imports without a bytecode cache (PYTHONDONTWRITEBYTECODE=1, as this shell has it): "
        f"{seconds(uncached.best_mark('imports'))} (whole process {seconds(min(r.seconds for r in uncached.runs))})",
        "    -X importtime of mailflow.returns: "
        + f"{seconds(import_total)} in all; "
        + ", ".join(f"{name} {seconds(value)}" for name, value in import_children),
        f"  in this process, min of {sizes.inprocess_runs}:",
        f"    bare calamine read (bytes, first sheet)  {seconds(min(bare_in)):>8}",
        f"    read_return                              {seconds(min(read_in)):>8}   ratio {inproc_ratio:.2f}x",
        f"      of which preflight                     {seconds(min(preflight_in)):>8}"
        f"   (zip scan, streamed decompression, cell count)",
        f"    read_master of the master (best of 5)    {seconds(master_in):>8}   (once per campaign in a tick)",
    ]
    if ratio > TARGET_RATIO:
        lines.append(
            f"  whole-process target missed: the bare process reads the file after "
            f"{seconds(startup + float(bare_marks['imports']))} of start-up; mailflow's must first import "
            f"mailflow ({seconds(float(mf_marks['imports']))}) and read the master "
            f"({seconds(float(mf_marks['master']))}) before it reads a byte of the return"
        )
    return lines
