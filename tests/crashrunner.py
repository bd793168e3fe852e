"""``mailflow`` in a child process that signals itself at one chosen point: the crash tests' helper.

    python -m tests.crashrunner HOOK SIGNAL MAILFLOW-ARGUMENTS...

``SIGNAL`` is ``KILL`` or ``TERM``, sent by the process to itself (``os.kill``)
exactly when ``HOOK`` is reached:

``none``
    never: the plain command line.
``record:N``
    just after the N-th received message was recorded, before anything is
    moved. Received messages are committed in batches, so this is usually in
    the middle of one: the kill undoes the batch, and the next pass reads one
    message per transaction.
``move``
    when the intake is about to move what it recorded: everything committed,
    nothing moved yet.
``moved``
    just after the IMAP MOVE returned, before the store records it as moved.
``sent:N``
    when the SMTP server has accepted the N-th email, before its result is
    committed ("after SMTP accepted, before the store commit").
``diskfull:N``
    no signal: from the N-th COMMIT on, SQLite answers ``database or disk is
    full`` (having rolled the transaction back, as it does in WAL mode when
    the disk fills up); reads still work. For systems where the tests cannot
    mount a small file system.
``fullonce:N``
    the same for the N-th COMMIT only: the disk was full for a moment.

Nothing in mailflow is changed: the hooks wrap its methods from outside, in
this process only. A SIGKILL ends the process on the spot; a SIGTERM does too
unless mailflow handles it, in which case the tick goes on from the hook.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
from collections.abc import Callable, Sequence
from typing import Any


def _die(signum: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signum)


def _after_nth(function: Callable[..., Any], n: int, signum: int) -> Callable[..., Any]:
    calls = 0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        result = function(*args, **kwargs)
        calls += 1
        if calls == n:
            _die(signum)
        return result

    return wrapper


def _before_nth(function: Callable[..., Any], n: int, signum: int) -> Callable[..., Any]:
    calls = 0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == n:
            _die(signum)
        return function(*args, **kwargs)

    return wrapper


class FullDisk:
    """A sqlite3 connection on a disk that fills up: from its ``first`` COMMIT on (only that one with ``once``),
    COMMIT fails with SQLITE_FULL after SQLite rolled the transaction back by itself, as it does in WAL mode."""

    def __init__(self, connection: sqlite3.Connection, first: int, once: bool) -> None:
        self._connection = connection
        self._first = first
        self._once = once
        self._commits = 0

    def _full(self, sql: str) -> bool:
        if sql.strip().upper() != "COMMIT":
            return False
        self._commits += 1
        return self._commits == self._first or (not self._once and self._commits > self._first)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        if self._full(sql):
            self._connection.execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full")
        return self._connection.execute(sql, params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)


def install(hook: str, signum: int) -> None:
    """Wrap the mailflow method that ``hook`` names (see the module's docstring)."""
    from mailflow.engine import Engine
    from mailflow.intake import Intake
    from mailflow.mailbox import ImapSession
    from mailflow.store import Store

    name, _, count = hook.partition(":")
    n = int(count or "1")
    if name == "none":
        return
    if name == "record":
        Intake.record = _after_nth(Intake.record, n, signum)  # type: ignore[method-assign]
    elif name == "move":
        Intake._move = _before_nth(Intake._move, n, signum)  # type: ignore[method-assign]
    elif name == "moved":
        ImapSession.move = _after_nth(ImapSession.move, n, signum)  # type: ignore[method-assign]
    elif name == "sent":
        Engine._sent = _before_nth(Engine._sent, n, signum)  # type: ignore[method-assign]
    elif name in ("diskfull", "fullonce"):
        original = Store.__init__

        def init(self: Store, connection: sqlite3.Connection, path: Any) -> None:
            original(self, FullDisk(connection, n, once=name == "fullonce"), path)  # type: ignore[arg-type]

        Store.__init__ = init  # type: ignore[method-assign]
    else:
        raise SystemExit(f"crashrunner: unknown hook {hook!r}")


def main(argv: Sequence[str]) -> int:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    hook, signame, rest = argv[0], argv[1], list(argv[2:])
    install(hook, getattr(signal, f"SIG{signame}"))
    from mailflow.cli import main as mailflow_main

    return mailflow_main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
