"""The reader process: the same readings as in this process, in order; a worker that dies costs one file; it never
outlives mailflow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mailflow import reader as reader_module
from mailflow import reasons
from mailflow.reader import InlineReader, Job, ProcessReader
from mailflow.returns import STATUS_PARSED, STATUS_REJECTED, STATUS_UNREADABLE, ReturnLimits
from mailflow.sample import build_sample_plan
from mailflow.workbook import MasterLayout, parse_workbook
from tests.helpers import ROOT, fill_workbook

SAMPLE = build_sample_plan()
LAYOUT = parse_workbook(SAMPLE, "Code", "Responsible")
OTHER_LAYOUT = parse_workbook(build_sample_plan(actions_per_line=(3, 2)), "Code", "Responsible")
HOSTILE = ROOT / "tests" / "fixtures" / "hostile"


def _job(data: bytes, name: str, layout: MasterLayout = LAYOUT) -> Job:
    return Job(data, name, layout, "Code", "Responsible", ReturnLimits())


def _filled(count: int, layout: MasterLayout = LAYOUT) -> bytes:
    return fill_workbook(SAMPLE, {row.key: f"Institución {row.key}" for row in layout.rows[:count]})


def _jobs() -> list[Job]:
    """Good files, hostile files and a second campaign's layout, interleaved."""
    return [
        _job(_filled(40), "Plan - complete.xlsx"),
        _job((HOSTILE / "encrypted-ole.xlsx").read_bytes(), "encrypted.xlsx"),
        _job(_filled(7), "Plan - partial.xlsx"),
        _job((HOSTILE / "bomb-ratio.xlsx").read_bytes(), "bomb.xlsx"),
        _job(b"PK\x03\x04 not really a zip", "corrupt.xlsx"),
        _job(fill_workbook(build_sample_plan(actions_per_line=(3, 2)), {"1.1": "DGME"}), "other.xlsx", OTHER_LAYOUT),
        _job(_filled(20), "Plan - half.xlsx"),
    ]


@pytest.mark.parametrize("inline_while_starting", [False, True])
def test_the_reader_process_gives_the_readings_of_this_process_in_the_order_handed_over(
    inline_while_starting: bool,
) -> None:
    jobs = _jobs()
    expected = [InlineReader().submit(job).result() for job in jobs]
    assert [r.status for r in expected] == [
        STATUS_PARSED,
        STATUS_UNREADABLE,
        STATUS_PARSED,
        STATUS_REJECTED,
        STATUS_UNREADABLE,
        STATUS_PARSED,
        STATUS_PARSED,
    ]
    with ProcessReader(inline_while_starting=inline_while_starting) as process:
        pending = [process.submit(job) for job in jobs + jobs]  # many in flight before the first is collected
        # Collected out of order, as a caller may: each waits for the readings before it.
        got = {index: pending[index].result() for index in (3, 0, 13, 1, 2, 4, 5, 6, *range(7, 13))}
        assert process.deaths == 0
    assert [got[i] for i in range(14)] == expected + expected
    assert len(got[0].answers) == 40 and len(got[2].answers) == 7 and got[5].answers == {"1.1": "DGME"}


# Run first in a worker (by name: the worker is another process): a file named "crash ..." ends the worker as a
# native crash of the spreadsheet library would, in the middle of reading it.
def crash_on_marked_files() -> None:
    real = reader_module.read_return

    def read_return(data: bytes, filename: str, *args: object, **kwargs: object) -> object:
        if filename.startswith("crash"):
            os.kill(os.getpid(), signal.SIGSEGV)
        return real(data, filename, *args, **kwargs)  # type: ignore[arg-type]

    reader_module.read_return = read_return  # type: ignore[assignment]


def test_a_file_that_ends_two_workers_is_unreadable_and_a_new_one_reads_the_rest() -> None:
    good = _filled(40)
    names = ["a.xlsx", "b.xlsx", "crash 1.xlsx", "c.xlsx", "d.xlsx"]
    with ProcessReader(initializer="tests.test_reader:crash_on_marked_files", inline_while_starting=False) as process:
        pending = [process.submit(_job(good, name)) for name in names]
        readings = [p.result() for p in pending]
        assert process.deaths == 2  # the file was given to a second worker, which it ended too
    statuses = [r.status for r in readings]
    assert statuses == [STATUS_PARSED, STATUS_PARSED, STATUS_UNREADABLE, STATUS_PARSED, STATUS_PARSED]
    crashed = readings[2]
    assert crashed.reason_code == reasons.READER_STOPPED and crashed.format == "xlsx"
    assert crashed.reason is not None and "stopped the program reading it" in crashed.reason
    assert "detuvo el programa" in reasons.explain(reasons.READER_STOPPED, {}, "es")
    assert all(len(r.answers) == 40 for i, r in enumerate(readings) if i != 2)


def hang_on_marked_files() -> None:
    real = reader_module.read_return

    def read_return(data: bytes, filename: str, *args: object, **kwargs: object) -> object:
        if filename.startswith("hang"):
            time.sleep(3600)
        return real(data, filename, *args, **kwargs)  # type: ignore[arg-type]

    reader_module.read_return = read_return  # type: ignore[assignment]


def test_a_file_that_takes_too_long_is_unreadable_at_once_and_its_worker_is_stopped() -> None:
    good = _filled(40)
    with ProcessReader(
        initializer="tests.test_reader:hang_on_marked_files", read_seconds=1.5, inline_while_starting=False
    ) as process:
        started = time.monotonic()
        # Many files after the one that hangs: the pipe to the worker is full when it is stopped.
        names = ["a.xlsx", "hang.xlsx", *(f"b{n}.xlsx" for n in range(20))]
        readings = [p.result() for p in [process.submit(_job(good, name)) for name in names]]
        waited = time.monotonic() - started
        assert process.deaths == 1
    assert [r.status for r in readings] == [STATUS_PARSED, STATUS_UNREADABLE] + [STATUS_PARSED] * 20
    assert readings[1].reason_code == reasons.READER_TIMEOUT
    assert readings[1].reason is not None and "took more than 1.5 seconds" in readings[1].reason
    assert "tomó más de 1.5 segundos" in reasons.explain(reasons.READER_TIMEOUT, {"seconds": "1.5"}, "es")
    assert waited < 5  # the hung worker was killed, not waited for (nor its feeder, stuck on the full pipe)


# Like crash_on_marked_files, but only the first time a worker reads such a file in this test: the worker died
# for a reason of its own, not the file's (the flag file is named by the test, in the environment it passes on).
def crash_once_on_marked_files() -> None:
    real = reader_module.read_return

    def read_return(data: bytes, filename: str, *args: object, **kwargs: object) -> object:
        flag = Path(os.environ["MAILFLOW_TEST_CRASHED_ONCE"])
        if filename.startswith("crash") and not flag.exists():
            flag.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return real(data, filename, *args, **kwargs)  # type: ignore[arg-type]

    reader_module.read_return = read_return  # type: ignore[assignment]


def test_a_worker_killed_for_a_reason_of_its_own_costs_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILFLOW_TEST_CRASHED_ONCE", str(tmp_path / "crashed"))
    names = ["a.xlsx", "crash 1.xlsx", "b.xlsx"]
    with ProcessReader(
        initializer="tests.test_reader:crash_once_on_marked_files", inline_while_starting=False
    ) as process:
        readings = [p.result() for p in [process.submit(_job(_filled(40), name)) for name in names]]
        assert process.deaths == 1
    assert (tmp_path / "crashed").exists()
    assert [(r.status, len(r.answers)) for r in readings] == [(STATUS_PARSED, 40)] * 3


def test_after_four_workers_died_the_rest_is_read_in_this_process() -> None:
    good = _filled(40)
    names = ["crash 1.xlsx", "a.xlsx", "crash 2.xlsx", "b.xlsx", "crash 3.xlsx", "c.xlsx"]
    with ProcessReader(initializer="tests.test_reader:crash_on_marked_files", inline_while_starting=False) as process:
        readings = [p.result() for p in [process.submit(_job(good, name)) for name in names]]
        assert process.deaths == reader_module.MAX_WORKER_DEATHS == 4  # two for each of the first two files
    # Read here, "crash 3" is just a file: this process's read_return does not crash on it.
    assert [r.status for r in readings] == [STATUS_UNREADABLE, STATUS_PARSED, STATUS_UNREADABLE] + [STATUS_PARSED] * 3


def slow_start() -> None:
    time.sleep(1.0)


def fail_to_start() -> None:
    raise ImportError("no module named python_calamine (say)")


def test_files_are_read_here_while_the_worker_starts_then_by_the_worker() -> None:
    with ProcessReader(initializer="tests.test_reader:slow_start") as process:
        process.start()
        early = [process.submit(_job(_filled(40), f"early {n}.xlsx")) for n in range(3)]
        worker = process._worker
        assert worker is not None and not worker.handed  # read here: the worker is still starting
        assert all(p.result().status == STATUS_PARSED for p in early)
        deadline = time.monotonic() + 30
        while not worker.poll_ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        late = process.submit(_job(_filled(7), "late.xlsx"))
        assert list(worker.handed) == [late]  # handed to the worker, now that it has started
        assert len(late.result().answers) == 7 and process.deaths == 0


def test_a_worker_that_fails_as_it_starts_leaves_the_files_to_this_process() -> None:
    with ProcessReader(initializer="tests.test_reader:fail_to_start") as process:
        process.start()
        assert process._worker is not None
        process._worker.process.wait(timeout=30)  # it has ended; its output says so
        reading = process.submit(_job(_filled(40), "a.xlsx")).result()
        assert reading.status == STATUS_PARSED and len(reading.answers) == 40
        assert process._worker is None and process.deaths == 0


def test_a_reader_that_cannot_start_a_worker_reads_here(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_processes(*_args: object, **_kwargs: object) -> None:
        raise OSError("fork: Resource temporarily unavailable")

    monkeypatch.setattr(subprocess, "Popen", no_processes)
    with ProcessReader() as process:
        reading = process.submit(_job(_filled(40), "a.xlsx")).result()
    assert reading.status == STATUS_PARSED and len(reading.answers) == 40


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "in the middle of a file"])
def test_the_worker_ends_with_mailflow_even_after_a_sigkill(busy: bool) -> None:
    """A process holding a reader is killed. An idle worker notices its input closed and exits; one in the middle
    of a file (here one that would take an hour) is ended by the kernel with its parent. Nothing is left holding
    the killed process's pipes, memory or CPU."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from mailflow.reader import Job, ProcessReader
        from mailflow.returns import ReturnLimits
        from tests.test_reader import LAYOUT, _filled
        reader = ProcessReader(initializer="tests.test_reader:hang_on_marked_files", inline_while_starting=False)
        reader.start()
        job = Job(_filled(40), "a.xlsx", LAYOUT, "Code", "Responsible", ReturnLimits())
        reader.submit(job).result()
        if {busy}:
            reader.submit(Job(_filled(40), "hang.xlsx", LAYOUT, "Code", "Responsible", ReturnLimits()))
            time.sleep(0.5)
        print(reader._worker.process.pid, flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        worker = int(parent.stdout.readline())
        assert _alive(worker)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(worker), f"reader process {worker} outlived its parent"
    finally:
        parent.kill()
        parent.wait()


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, reaped by init soon, counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_worker_limits_its_own_memory() -> None:
    """RLIMIT_AS, set by the worker on itself: a file that would need more is refused in the worker, not here."""
    probe = textwrap.dedent(
        """
        import resource
        from mailflow.reader import _limit_memory
        _limit_memory(256 << 20)
        print(resource.getrlimit(resource.RLIMIT_AS)[0])
        try:
            bytearray(512 << 20)
        except MemoryError:
            print("refused")
        """
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(256 << 20), "refused"]


def test_a_worker_left_before_it_started_ends_quietly() -> None:
    """mailflow stops (a full disk, say) while its worker is still starting: the worker finds nobody listening
    and ends without a word on the standard error they share (communicate() waits for the worker too)."""
    script = textwrap.dedent(
        """
        from mailflow.reader import ProcessReader
        reader = ProcessReader(initializer="tests.test_reader:slow_start")
        reader.start()
        reader.close()
        print("closed", flush=True)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "closed\n"
    assert done.stderr == ""


def test_a_worker_lets_mailflow_handle_sigterm_and_sigint() -> None:
    """A service manager sends SIGTERM to every process of the service, a terminal's Ctrl-C SIGINT to the
    group: the worker goes on, and ends when mailflow, having finished the message in hand, closes its input."""
    with ProcessReader(inline_while_starting=False) as process:
        first = process.submit(_job(_filled(40), "a.xlsx"))
        assert first.result().status == STATUS_PARSED
        worker = process._worker
        assert worker is not None
        for signum in (signal.SIGTERM, signal.SIGINT):
            worker.process.send_signal(signum)
        time.sleep(0.2)
        second = process.submit(_job(_filled(7), "b.xlsx"))
        assert len(second.result().answers) == 7 and process.deaths == 0
        assert worker.process.poll() is None
    assert worker.process.wait(timeout=10) == 0  # its input closed: it ended on its own
