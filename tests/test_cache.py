"""The persistent cache of slow results (mailflow.cache): when it stores, when it gives back, when it recomputes."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest

import mailflow.cache as cache_module
from mailflow.cache import cache_folder, cached, file_stamps


class Counter:
    """A computation that counts its calls and returns ``value``."""

    def __init__(self, value: object = "result") -> None:
        self.value = value
        self.calls = 0

    def __call__(self) -> object:
        self.calls += 1
        return self.value


@pytest.fixture
def environ(tmp_path: Path) -> dict[str, str]:
    return {"MAILFLOW_CACHE": str(tmp_path / "cache")}


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "source.txt"
    path.write_text("one", encoding="utf-8")
    return path


def entries(environ: dict[str, str]) -> list[Path]:
    folder = Path(environ["MAILFLOW_CACHE"])
    return sorted(folder.iterdir()) if folder.exists() else []


def run(
    compute: Callable[[], object], environ: dict[str, str], source: Path, *, key: object = "key", **options: object
) -> object:
    return cached("test", key, [source], compute, environ=environ, min_seconds=0.0, **options)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Where
# --------------------------------------------------------------------------


def test_the_folder_is_chosen_by_mailflow_cache_then_xdg_then_home(tmp_path: Path) -> None:
    assert cache_folder({"MAILFLOW_CACHE": str(tmp_path)}) == tmp_path
    for off in ("off", "OFF", " 0 ", "no", ""):
        assert cache_folder({"MAILFLOW_CACHE": off, "XDG_CACHE_HOME": str(tmp_path)}) is None
    assert cache_folder({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "mailflow"
    assert cache_folder({}) == Path.home() / ".cache" / "mailflow"


# --------------------------------------------------------------------------
# Storing and giving back
# --------------------------------------------------------------------------


def test_a_slow_result_is_stored_and_given_back_without_computing(environ: dict[str, str], source: Path) -> None:
    compute = Counter({"rows": (1, 2, 3)})
    assert run(compute, environ, source) == {"rows": (1, 2, 3)}
    [entry] = entries(environ)
    assert entry.name.startswith("test-") and entry.suffix == ".pickle"
    assert entry.stat().st_mode & 0o077 == 0  # private to this user
    assert run(compute, environ, source) == {"rows": (1, 2, 3)}
    assert compute.calls == 1


def test_a_fast_result_never_writes_a_file(environ: dict[str, str], source: Path) -> None:
    compute = Counter()
    for _ in range(3):
        assert cached("test", "key", [source], compute, environ=environ) == "result"  # default: 0.05 s
    assert compute.calls == 3
    assert not Path(environ["MAILFLOW_CACHE"]).exists()


def test_off_disables_the_cache(tmp_path: Path, source: Path) -> None:
    compute = Counter()
    for _ in range(2):
        cached("test", "key", [source], compute, environ={"MAILFLOW_CACHE": "off"}, min_seconds=0.0)
    assert compute.calls == 2


def test_another_key_kind_or_version_computes_again(
    environ: dict[str, str], source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compute = Counter()
    run(compute, environ, source, key=("a", 1))
    run(compute, environ, source, key=("a", 1))
    assert compute.calls == 1
    run(compute, environ, source, key=("a", 2))
    assert compute.calls == 2
    cached("other", ("a", 1), [source], compute, environ=environ, min_seconds=0.0)
    assert compute.calls == 3
    monkeypatch.setattr(cache_module, "__version__", "99.0")
    run(compute, environ, source, key=("a", 1))
    assert compute.calls == 4


def test_a_changed_file_computes_again(environ: dict[str, str], source: Path) -> None:
    compute = Counter()
    run(compute, environ, source)
    source.write_text("two", encoding="utf-8")  # same size: the modification time tells
    os.utime(source, ns=(1, 1))
    run(compute, environ, source)
    assert compute.calls == 2
    run(compute, environ, source)
    assert compute.calls == 2
    source.unlink()
    run(compute, environ, source)
    assert compute.calls == 3


def test_stamps_can_come_from_the_result(environ: dict[str, str], tmp_path: Path) -> None:
    named = tmp_path / "named.txt"
    named.write_text("x", encoding="utf-8")
    compute = Counter({"files": [str(named)]})

    def files(result: object) -> list[Path]:
        assert isinstance(result, dict)
        return [Path(name) for name in result["files"]]

    for _ in range(2):
        cached("test", "key", files, compute, environ=environ, min_seconds=0.0)
    assert compute.calls == 1
    named.write_text("xy", encoding="utf-8")
    cached("test", "key", files, compute, environ=environ, min_seconds=0.0)
    assert compute.calls == 2


def test_a_slot_keeps_one_entry_that_new_keys_replace(environ: dict[str, str], source: Path) -> None:
    compute = Counter()
    for key in ("a", "b", "c"):
        run(compute, environ, source, key=key, slot="config.yaml")
    assert len(entries(environ)) == 1
    run(compute, environ, source, key="c", slot="config.yaml")
    run(compute, environ, source, key="a", slot="config.yaml")
    assert compute.calls == 4


def test_old_entries_are_pruned(environ: dict[str, str], source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_module, "MAX_ENTRIES_PER_KIND", 3)
    compute = Counter()
    for number in range(6):
        run(compute, environ, source, key=number)
    assert len(entries(environ)) == 3
    cached("test-other", 0, [source], compute, environ=environ, min_seconds=0.0)
    assert len(entries(environ)) == 4  # other kinds are not counted, even with a name that starts alike
    run(compute, environ, source, key=6)
    assert len(entries(environ)) == 4
    run(compute, environ, source, key=6)  # the newest entry was kept
    assert compute.calls == 8


# --------------------------------------------------------------------------
# Any cache error: computed as if there were no cache
# --------------------------------------------------------------------------


def test_a_damaged_entry_is_computed_again_and_replaced(environ: dict[str, str], source: Path) -> None:
    compute = Counter()
    run(compute, environ, source)
    [entry] = entries(environ)
    for damage in (b"garbage", b"", pickle.dumps("not a tuple"), pickle.dumps(("key", "stamps"))):
        entry.write_bytes(damage)
        assert run(compute, environ, source) == "result"
    assert compute.calls == 5
    assert run(compute, environ, source) == "result"
    assert compute.calls == 5


def test_a_result_of_the_wrong_type_is_not_given_back(environ: dict[str, str], source: Path) -> None:
    run(Counter("text"), environ, source, expect=str)
    compute = Counter(42)
    assert run(compute, environ, source, expect=int) == 42
    assert compute.calls == 1


def test_an_entry_others_may_write_is_not_loaded(environ: dict[str, str], source: Path) -> None:
    compute = Counter()
    run(compute, environ, source)
    [entry] = entries(environ)
    entry.chmod(0o664)
    run(compute, environ, source)
    assert compute.calls == 2


def test_an_unusable_folder_or_result_is_never_an_error(tmp_path: Path, source: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("", encoding="utf-8")
    compute = Counter()
    assert cached("test", "key", [source], compute, environ={"MAILFLOW_CACHE": str(blocked / "x")}, min_seconds=0.0)
    unpicklable = Counter(lambda: None)
    environ = {"MAILFLOW_CACHE": str(tmp_path / "cache")}
    assert callable(cached("test", "key", [source], unpicklable, environ=environ, min_seconds=0.0))
    assert entries(environ) == []  # nothing stored, no temporary file left


def test_an_error_of_the_computation_propagates_and_stores_nothing(environ: dict[str, str], source: Path) -> None:
    def fail() -> object:
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        run(fail, environ, source)
    assert entries(environ) == []


def test_a_file_changed_while_computing_is_not_stored(environ: dict[str, str], source: Path) -> None:
    def edit_meanwhile() -> str:
        source.write_text("changed while read", encoding="utf-8")
        return "old content's result"

    run(edit_meanwhile, environ, source)
    assert entries(environ) == []


def test_file_stamps_of_a_missing_file() -> None:
    assert file_stamps([Path("/nonexistent/mailflow/file")]) == [("/nonexistent/mailflow/file", -1, -1)]
