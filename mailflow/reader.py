"""Reading returned workbooks, in this process or in a reader process beside it.

Reading a workbook (:func:`mailflow.returns.read_return`) is the largest part
of taking in a reply, and it needs nothing of the store: while a reader
process reads the next messages' workbooks, the intake parses, records and
answers the ones before, on the machine's second core.

* :class:`InlineReader` reads at once, here. ``inspect``, a pass of a few
  messages and a pass after a crash use it.
* :class:`ProcessReader` hands each file to one worker: a fresh Python
  process (``python -c``, never a fork of this one, which may run threads)
  that reads files from its standard input, one at a time in the order handed
  over, and writes each reading to its standard output. The master's layout
  is sent once per layout, not with every file. Until the worker says it
  has started (its imports take a moment), files are read here rather than
  waited for. The worker ends when its input closes, so it never outlives
  mailflow, even after a ``SIGKILL``.

  A worker that dies (a native crash of the spreadsheet library, more memory
  than :data:`READER_MEMORY_BYTES`) while reading a file hands that file to a
  new worker; a file that ends two workers is ``unreadable``
  (:data:`mailflow.reasons.READER_STOPPED`), as is one that takes longer than
  :data:`READ_SECONDS`, and a new worker reads the files after it. When no
  worker can be started, or :data:`MAX_WORKER_DEATHS` have died in one pass,
  the files are read here, as by :class:`InlineReader`.

Both give a :class:`Pending` reading; :meth:`Pending.result` waits for it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import queue
import select
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from typing import IO, Any, NamedTuple, Protocol

from mailflow import reasons
from mailflow.returns import STATUS_UNREADABLE, ReturnLimits, ReturnReading, read_return, sniff_format
from mailflow.workbook import MasterLayout

log = logging.getLogger("mailflow")

READER_MEMORY_BYTES = 4 << 30
"""Address space a worker may use (``RLIMIT_AS``): a file that needs more is refused, mailflow goes on. (The most
cells :class:`~mailflow.returns.ReturnLimits` lets through need about 1.2 GiB.)"""
READ_SECONDS = 60.0
"""Longest wait for one reading: a worker that takes longer is stopped, and that file is ``unreadable``."""
MAX_WORKER_DEATHS = 4
"""Workers that may die in one pass before the rest of its files are read in this process (a file that ends a
worker is read again once, in a new one: two such files)."""

_HEADER = struct.Struct("!Q")
_READY = "ready"  # the worker's first frame: imported, ready to read
_FRAME_SECONDS = 5.0  # for the rest of a frame whose first bytes have come
_BOOT = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
    "from mailflow.reader import serve; "
    "serve(sys.stdin.buffer, sys.stdout.buffer, sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))"
)


class Job(NamedTuple):
    """One file to read, with what it is compared with.

    (A NamedTuple, like the values of :mod:`mailflow.returns`: the worker never imports dataclasses.)"""

    data: bytes
    filename: str
    layout: MasterLayout
    key_column: str
    fill_column: str
    limits: ReturnLimits

    def read(self) -> ReturnReading:
        return read_return(self.data, self.filename, self.layout, self.key_column, self.fill_column, self.limits)


class Pending(Protocol):
    def result(self) -> ReturnReading:
        """The reading; waits for it when it is read elsewhere. Never raises for the file's faults."""


class Reader(Protocol):
    def submit(self, job: Job) -> Pending:
        """Start reading ``job`` (or read it now)."""

    def close(self) -> None:
        """Stop any worker; readings not yet collected are dropped."""


class _Done(NamedTuple):
    reading: ReturnReading

    def result(self) -> ReturnReading:
        return self.reading


class InlineReader:
    """Reads each file when it is handed over, in this process."""

    def submit(self, job: Job) -> Pending:
        return _Done(job.read())

    def close(self) -> None:
        pass


def _unread(job: Job, code: str, params: dict[str, str]) -> ReturnReading:
    """The reading of a file the reader process could not read: ``unreadable``, for the reason ``code``."""
    return ReturnReading(
        status=STATUS_UNREADABLE,
        reason=reasons.explain(code, params),
        answers={},
        format=sniff_format(job.data, job.filename),
        reason_code=code,
        reason_params=params,
    )


# -- frames: an 8-byte length, then a pickle ----------------------------------


def _write_frame(stream: IO[bytes], value: object) -> None:
    payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(payload)))
    stream.write(payload)
    stream.flush()


def _read_frame(fd: int, deadline: float | None = None) -> Any:
    """The next value read from ``fd``: EOFError when it ends (before or inside a frame), TimeoutError when the
    ``time.monotonic()`` ``deadline`` passes first (None: wait as long as it takes)."""
    (size,) = _HEADER.unpack(_read_exactly(fd, _HEADER.size, deadline))
    return pickle.loads(_read_exactly(fd, size, deadline))


def _read_exactly(fd: int, size: int, deadline: float | None) -> bytes:
    chunks: list[bytes] = []
    while size:
        if deadline is not None:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


# -- the worker's side ----------------------------------------------------------


def serve(
    source: IO[bytes],
    sink: IO[bytes],
    initializer: str = "",
    memory_bytes: int = READER_MEMORY_BYTES,
    parent: int = 0,
) -> None:
    """The worker: read each file sent on ``source``, write its reading to ``sink``, until ``source`` ends.

    ``initializer`` ("module:function", may be empty) runs first (tests use it to make a worker fail);
    ``parent`` is mailflow's process id: the worker ends with it, even in the middle of a file."""
    import signal

    _die_with(parent)
    # Ctrl-C, and a service manager's SIGTERM to every process of the service, are mailflow's to handle: it
    # finishes the message in hand and closes our input, which ends this loop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _limit_memory(memory_bytes)
    if initializer:
        module, _, name = initializer.partition(":")
        getattr(__import__(module, fromlist=[name]), name)()
    _answer(sink, _READY)
    layouts: dict[int, MasterLayout] = {}
    while True:
        try:
            message = _read_frame(source.fileno())
        except EOFError:
            return
        if message[0] == "layout":
            layouts[message[1]] = message[2]
            continue
        _, token, data, filename, key_column, fill_column, limits = message
        try:
            reading: object = read_return(data, filename, layouts[token], key_column, fill_column, limits)
        except Exception as exc:  # read_return never raises for the file: say what did, and go on
            reading = f"{type(exc).__name__}: {exc}"
        _answer(sink, reading)


def _answer(sink: IO[bytes], value: object) -> None:
    try:
        _write_frame(sink, value)
    except OSError:  # mailflow no longer listens (it stopped, or gave up on this worker): nothing left to do
        os._exit(0)


def _die_with(parent: int) -> None:
    """Have the kernel end this process when ``parent`` ends (Linux; elsewhere the end of the input does it, once
    the file in hand is read).

    Strictly, when the thread of ``parent`` that started this process ends: a
    reader is made, used and closed by one thread, within one pass."""
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError, ImportError):
        return
    if os.getppid() != parent:  # it ended before the request was made
        os._exit(0)


def _limit_memory(memory_bytes: int) -> None:
    if memory_bytes <= 0:
        return
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        wanted = memory_bytes if hard == resource.RLIM_INFINITY else min(memory_bytes, hard)
        if soft == resource.RLIM_INFINITY or soft > wanted:
            resource.setrlimit(resource.RLIMIT_AS, (wanted, hard))
    except (ImportError, ValueError, OSError):  # not POSIX, or not allowed: the file limits still hold
        pass


# -- this process's side ------------------------------------------------------


class _InWorker:
    """A file handed to the worker; :meth:`result` asks the reader for its reading."""

    def __init__(self, reader: ProcessReader, job: Job) -> None:
        self.reader = reader
        self.job = job
        self.reading: ReturnReading | None = None
        self.retried = False  # handed to a second worker after the first ended reading it

    def result(self) -> ReturnReading:
        while self.reading is None:
            self.reader._collect_until(self)
        return self.reading


class _Worker:
    """One worker process, and the thread that writes to it (so that this process never blocks on a full pipe)."""

    def __init__(self, initializer: str, memory_bytes: int) -> None:
        self.process = subprocess.Popen(
            # -S: no site initialisation (the paths it adds are in ``sys.path`` already; mailflow's own folder
            # is added, as an editable install finds mailflow through a hook of site's).
            [sys.executable, "-S", "-c", _BOOT, json.dumps(_paths()), initializer, str(memory_bytes), str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
            bufsize=0,  # readings are read from the descriptor, with a time limit; writes go through a buffer
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self.stdin: IO[bytes] = io.BufferedWriter(self.process.stdin)
        self.stdout = self.process.stdout
        self.outbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.layouts: dict[int, MasterLayout] = {}  # token -> layout the worker holds (kept alive here)
        self.handed: deque[_InWorker] = deque()  # sent, reading not yet received, in order
        self.ready = False  # the worker said it is ready (its first frame)
        self.feeder = threading.Thread(target=self._feed, name="mailflow-reader-feed", daemon=True)
        self.feeder.start()

    def send(self, pending: _InWorker) -> None:
        job = pending.job
        token = id(job.layout)
        if self.layouts.get(token) is not job.layout:
            self.layouts[token] = job.layout
            self.outbox.put(("layout", token, job.layout))
        self.outbox.put(("read", token, job.data, job.filename, job.key_column, job.fill_column, job.limits))
        self.handed.append(pending)

    def receive(self, timeout: float) -> object:
        """The next reading the worker wrote: EOFError if it died, TimeoutError if none came in ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            value = _read_frame(self.stdout.fileno(), deadline)
            if value != _READY or self.ready:
                return value
            self.ready = True

    def poll_ready(self) -> bool:
        """True once the worker has said it is ready (asked before anything is handed over; never waits for it).
        EOFError if it ended first."""
        if not self.ready and select.select([self.stdout], [], [], 0)[0]:
            if _read_frame(self.stdout.fileno(), time.monotonic() + _FRAME_SECONDS) != _READY:
                raise EOFError
            self.ready = True
        return self.ready

    def _feed(self) -> None:
        while (item := self.outbox.get()) is not None:
            try:
                _write_frame(self.stdin, item)
            except (OSError, ValueError):  # the worker is gone: the reading side finds out
                return

    def stop(self, *, kill: bool = False) -> int | None:
        """End the worker; its exit status, or None when it is left to exit by itself.

        Its input closes, so an idle worker exits at once: it is not waited
        for (:mod:`subprocess` reaps it later). ``kill`` ends one that is busy
        or hung, and waits for it."""
        if kill:  # first: a feeder blocked on the full pipe of a hung worker then fails at once
            with contextlib.suppress(OSError):
                self.process.kill()
        self.outbox.put(None)
        self.feeder.join(timeout=5)
        for stream in (self.stdin, self.stdout):
            with contextlib.suppress(OSError):
                stream.close()
        return self.process.wait() if kill else self.process.poll()


def _paths() -> list[str]:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return [here, *(path for path in sys.path if path != here)]


class ProcessReader:
    """Reads files in one worker process while this one goes on; see the module's text."""

    def __init__(
        self,
        *,
        memory_bytes: int = READER_MEMORY_BYTES,
        read_seconds: float = READ_SECONDS,
        initializer: str = "",
        inline_while_starting: bool = True,
    ) -> None:
        """``inline_while_starting``: read files here until the worker has started (it takes a moment to import)
        rather than wait for it; tests that need every file read by the worker turn it off."""
        self.memory_bytes = memory_bytes
        self.read_seconds = read_seconds
        self.initializer = initializer
        self.inline_while_starting = inline_while_starting
        self.deaths = 0
        self._worker: _Worker | None = None
        self._inline = False

    def start(self) -> None:
        """Start the worker now (it takes a moment to import), rather than with the first file."""
        self._current()

    def submit(self, job: Job) -> Pending:
        pending = _InWorker(self, job)
        worker = self._current()
        if worker is None or (self.inline_while_starting and not self._started(worker)):
            pending.reading = job.read()
        else:
            worker.send(pending)
        return pending

    def close(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.stop(kill=bool(worker.handed))  # readings still coming are not wanted any more

    def __enter__(self) -> ProcessReader:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _current(self) -> _Worker | None:
        if self._inline:
            return None
        if self._worker is None:
            try:
                self._worker = _Worker(self.initializer, self.memory_bytes)
            except OSError as exc:
                log.warning("cannot start a reader process (%s): reading workbooks in this process", exc)
                self._inline = True
        return self._worker

    def _started(self, worker: _Worker) -> bool:
        """True if ``worker`` is ready to read; one that ended before it was leaves the files to this process."""
        try:
            return worker.poll_ready()
        except (EOFError, OSError, TimeoutError, pickle.UnpicklingError):
            self._worker = None
            status = worker.stop(kill=True)
            log.warning("the reader process ended as it started (exit status %s): reading in this process", status)
            self._inline = True
            return False

    def _collect_until(self, pending: _InWorker) -> None:
        """Receive readings, in the order the files were handed over, until ``pending`` has its own."""
        worker = self._worker
        if worker is None or pending not in worker.handed:
            pending.reading = pending.job.read()  # its worker was stopped before it was read
            return
        while pending.reading is None:
            first = worker.handed[0]
            try:
                received = worker.receive(self.read_seconds)
            except TimeoutError:
                self._worker_died(worker, reasons.READER_TIMEOUT, {"seconds": f"{self.read_seconds:g}"})
                return
            except (EOFError, OSError, pickle.UnpicklingError):
                self._worker_died(worker, reasons.READER_STOPPED, {})
                return
            worker.handed.popleft()
            if isinstance(received, ReturnReading):
                first.reading = received
            else:
                log.error("reading %s in the reader process failed: %s", first.job.filename, received)
                first.reading = _unread(first.job, reasons.UNEXPECTED, {"error": str(received)})

    def _worker_died(self, worker: _Worker, code: str, params: dict[str, str]) -> None:
        """The worker stopped (or was, for taking too long) while reading the first file it had not answered.

        A worker that ended reading a file is given the file once more, in a
        new worker: it may have ended for a reason of its own (the kernel's
        out-of-memory killer, a person). A file that ends a second worker, or
        took too long, is ``unreadable`` for the reason ``code``. A new worker
        reads the files after it (this process, once too many have died)."""
        self._worker = None
        status = worker.stop(kill=True)
        self.deaths += 1
        waiting = list(worker.handed)
        culprit = waiting[0]
        again = code == reasons.READER_STOPPED and not culprit.retried and self.deaths < MAX_WORKER_DEATHS
        if again:
            next_step = "it is read again in a new one"
        elif self.deaths < MAX_WORKER_DEATHS:
            next_step = "a new one reads the rest"
        else:
            next_step = "the rest is read in this process"
        log.error(
            "the reader process stopped (%s; exit status %s) while reading %s: %s",
            code,
            status,
            culprit.job.filename,
            next_step,
        )
        if again:
            culprit.retried = True
        else:
            culprit.reading = _unread(culprit.job, code, params)
            waiting = waiting[1:]
        if self.deaths >= MAX_WORKER_DEATHS:
            self._inline = True
        for other in waiting:
            replacement = self._current()
            if replacement is None:
                other.reading = other.job.read()
            else:
                replacement.send(other)


def process_reader_available() -> bool:
    """True where reader processes can be started (an interpreter to start, pipes to talk through)."""
    return bool(sys.executable)
