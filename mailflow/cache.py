"""A small persistent cache of slow results, kept between runs.

:func:`cached` keeps what a slow, deterministic computation returned (the
validated configuration, a master workbook's layout) in a pickle file, and
gives it back while nothing it depends on has changed:

* **the key**: the BLAKE2b (256 bits) of the ``repr`` of what the result is computed
  from (``key_material``, e.g. a file's text and the environment variables
  it uses), with the kind of entry and mailflow's version;
* **the stamps**: size and modification time (in nanoseconds) of every file
  the result was read from, checked again at each load.

The folder is ``$MAILFLOW_CACHE`` (``off`` disables the cache), else
``$XDG_CACHE_HOME/mailflow``, else ``~/.cache/mailflow``. Only results that
took at least ``min_seconds`` to compute are written, so small inputs never
leave files behind. A cache that cannot be read or written is never an
error: the result is then computed as if there were no cache.

An entry is read only from a file owned by this user and writable by no one
else (unpickling runs code), is written to a temporary file and renamed into
place, and at most :data:`MAX_ENTRIES_PER_KIND` entries of a kind are kept
(the least recently written go first).
"""

from __future__ import annotations

import os
import pickle
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from time import perf_counter
from typing import Any, TypeVar, cast

from mailflow import __version__, collector

try:
    # CPython's own BLAKE2, the object hashlib.blake2b names: importing
    # hashlib would also load OpenSSL (~2 ms of a short command) for nothing.
    from _blake2 import blake2b
except ImportError:  # another Python
    from hashlib import blake2b

__all__ = ["DEFAULT_MIN_SECONDS", "MAX_ENTRIES_PER_KIND", "cache_folder", "cached", "file_stamps"]

T = TypeVar("T")

DEFAULT_MIN_SECONDS = 0.05
"""Results computed faster than this are not worth a file: reading them again costs about as much as loading."""
MAX_ENTRIES_PER_KIND = 32

Stamp = tuple[str, int, int]
"""(path, size, modification time in ns) of a file a result depends on; (path, -1, -1) when it is missing."""
Stamps = Sequence[Path] | Callable[[Any], Iterable[Path]]

_OFF = frozenset({"", "off", "0", "no"})
_SAME_AS_KEY = object()
_NAME_LENGTH = 32  # hex digits of an entry's file name after "<kind>-"


def cache_folder(environ: Mapping[str, str]) -> Path | None:
    """The cache folder ``environ`` chooses, or None when the cache is off (or there is no home folder)."""
    chosen = environ.get("MAILFLOW_CACHE")
    if chosen is not None:
        return None if chosen.strip().lower() in _OFF else Path(chosen)
    base = environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except RuntimeError:  # no home folder: no cache
            return None
    return Path(base) / "mailflow"


def file_stamps(paths: Iterable[Path]) -> list[Stamp]:
    """Size and modification time of each of ``paths``, in order."""
    out: list[Stamp] = []
    for path in paths:
        try:
            info = os.stat(path)
        except (OSError, ValueError):
            out.append((str(path), -1, -1))
        else:
            out.append((str(path), info.st_size, info.st_mtime_ns))
    return out


def cached(
    kind: str,
    key_material: object,
    stamps: Sequence[Path] | Callable[[T], Iterable[Path]],
    compute: Callable[[], T],
    *,
    environ: Mapping[str, str] = os.environ,
    min_seconds: float = DEFAULT_MIN_SECONDS,
    slot: object = _SAME_AS_KEY,
    expect: type | None = None,
) -> T:
    """Return ``compute()``, or what it returned on an earlier run if nothing it depends on has changed.

    ``kind`` names the sort of entry (letters, digits, ``-``: it starts the
    file name). ``key_material`` is everything the result is computed from
    besides files; its ``repr`` must be stable across runs. ``stamps`` lists
    the files read (checked by size and modification time), or, when they are
    only known from the result, is a function of it. ``slot`` decides the
    file: entries of the same kind and slot replace each other (default: one
    file per key). ``expect``, when given, is the type the loaded result must
    have. Exceptions of ``compute`` propagate; nothing is stored then."""
    entry = _Entry.locate(kind, key_material, slot, environ)
    if entry is None:
        return compute()
    found = entry.load(stamps, expect)
    if found is not _MISSING:
        return cast(T, found)
    before = None if callable(stamps) else file_stamps(stamps)
    started = perf_counter()
    value = compute()
    if perf_counter() - started < min_seconds:
        return value
    try:
        if callable(stamps):
            recorded: list[Stamp] | None = file_stamps(stamps(value))
        else:
            # A file that changed while it was read would be cached with the
            # stamps of its new content: store only if none did.
            recorded = before if file_stamps(stamps) == before else None
    except Exception:
        recorded = None
    if recorded is not None:
        entry.store(value, recorded)
    return value


class _Missing:
    pass


_MISSING = _Missing()


class _Entry:
    """One cache file: where it is and the key it must hold."""

    def __init__(self, folder: Path, kind: str, key: str, name: str) -> None:
        self.folder = folder
        self.kind = kind
        self.key = key
        self.file = folder / f"{kind}-{name}.pickle"

    @classmethod
    def locate(cls, kind: str, key_material: object, slot: object, environ: Mapping[str, str]) -> _Entry | None:
        try:
            folder = cache_folder(environ)
            if folder is None:
                return None
            key = _digest((kind, __version__, key_material))
            name = (key if slot is _SAME_AS_KEY else _digest((kind, slot)))[:_NAME_LENGTH]
            return cls(folder, kind, key, name)
        except Exception:
            return None

    def load(self, stamps: Stamps, expect: type | None) -> object:
        try:
            with open(self.file, "rb") as handle:
                info = os.fstat(handle.fileno())
                if not _trusted(info):
                    return _MISSING
                raw = handle.read()
            # Unpickling makes many objects at once: no collection pass
            # halfway through (it can cost more than the load itself).
            with collector.paused():
                key, recorded, value = pickle.loads(raw)
            if key != self.key or (expect is not None and not isinstance(value, expect)):
                return _MISSING
            paths = [Path(path) for path, _, _ in recorded] if callable(stamps) else stamps
            if file_stamps(paths) != recorded:
                return _MISSING
            return value
        except Exception:
            return _MISSING

    def store(self, value: object, recorded: list[Stamp]) -> None:
        temporary: Path | None = None
        try:
            data = pickle.dumps((self.key, recorded, value), protocol=pickle.HIGHEST_PROTOCOL)
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            temporary = self.folder / f".{self.file.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with open(descriptor, "wb") as handle:
                handle.write(data)
            os.replace(temporary, self.file)
            temporary = None
            self._prune()
        except Exception:
            return
        finally:
            if temporary is not None:
                temporary.unlink(missing_ok=True)

    def _prune(self) -> None:
        """Keep the entry just written and the newest others, :data:`MAX_ENTRIES_PER_KIND` in all."""
        others: list[tuple[int, Path]] = []
        for path in self.folder.glob(f"{self.kind}-{'?' * _NAME_LENGTH}.pickle"):
            if path.name == self.file.name:
                continue
            try:
                others.append((path.stat().st_mtime_ns, path))
            except OSError:
                continue
        others.sort(reverse=True)
        for _, path in others[max(MAX_ENTRIES_PER_KIND - 1, 0) :]:
            path.unlink(missing_ok=True)


def _digest(material: object) -> str:
    return blake2b(repr(material).encode("utf-8", "surrogatepass"), digest_size=32).hexdigest()


def _trusted(info: os.stat_result) -> bool:
    """True for a regular file of this user that no one else may write (where that can be told)."""
    if not stat.S_ISREG(info.st_mode):
        return False
    getuid = getattr(os, "geteuid", None)
    if getuid is None:  # not POSIX: ownership is the folder's business
        return True
    return bool(info.st_uid == getuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))
