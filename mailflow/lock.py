"""One mailflow at a time per store: an exclusive lock on a file beside it.

``mailflow run`` and ``mailflow tick`` both read the inbox and send what is
due; two of them on one store would process the same mailbox concurrently. So
each takes :class:`InstanceLock` before opening the store, and a second one is
refused at once with a message naming the holder.

The lock is ``flock(LOCK_EX | LOCK_NB)`` on ``<store>.lock``: the kernel
releases it when the holder exits, even by SIGKILL or a crash, so a stale
lock never needs cleaning up. The file itself is never deleted (deleting it
while another process waits to open it would let two processes each lock a
different file); it only holds the holder's pid and command, for the message.
Like SQLite's own locking, this needs a local file system, not NFS.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from types import TracebackType
from typing import Self

from mailflow.errors import MailflowError, StoreError


class AlreadyRunning(MailflowError):
    """Another mailflow process holds the lock of this store."""


def lock_path(store: Path) -> Path:
    """The lock file of the store at ``store``: ``mailflow.db`` -> ``mailflow.db.lock``."""
    return store.with_name(store.name + ".lock")


class InstanceLock:
    """The exclusive right to work on one store, held by this process until released.

    ``command`` (``run``, ``tick``) is written into the lock file so that the
    process refused can say who holds it. Use as a context manager, or call
    :meth:`acquire` and :meth:`release`.
    """

    def __init__(self, store: Path, command: str) -> None:
        self.store = Path(store)
        self.path = lock_path(self.store)
        self.command = command
        self._fd: int | None = None

    def acquire(self) -> Self:
        """Take the lock or raise :class:`AlreadyRunning` at once (never waits)."""
        if self._fd is not None:
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(
                f"cannot create the lock file {self.path}: {exc.strerror or exc}; check the store's folder"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise AlreadyRunning(_refusal(holder, self.store, self.command)) from None
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"cannot lock {self.path}: {exc.strerror or exc}") from exc
        self._fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps({"pid": os.getpid(), "command": self.command}) + "\n").encode("utf-8"), 0)
        return self

    def release(self) -> None:
        """Give the lock up (the OS does it anyway when the process ends)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # no stale pid for a reader to show
        finally:
            os.close(fd)  # closing the last descriptor releases the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _read(fd: int) -> dict[str, object]:
    """The holder's record, or {} while it is being written or when unreadable."""
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _refusal(holder: dict[str, object], store: Path, command: str) -> str:
    """One line: who holds the store, and what to do about it."""
    held_by, pid = holder.get("command"), holder.get("pid")
    who = f"{held_by}, pid {pid}" if isinstance(held_by, str) and isinstance(pid, int) else "pid unknown"
    if held_by == "run":
        advice = (
            "a tick is refused while run is running (run already does what tick does)"
            if command == "tick"
            else "stop it first: one mailflow at a time per store"
        )
    else:
        advice = "wait for it to finish, or stop it first"
    return f"another mailflow ({who}) is using {store}; {advice}"
