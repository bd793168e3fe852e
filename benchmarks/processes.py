"""Whole processes measured from outside: wall time and the child's own peak memory.

``os.wait4`` reports a child's ``ru_maxrss``, but on Linux that figure starts
from the memory of the process the child was exec'd from: a child spawned by
this benchmark process (``subprocess`` uses vfork) reports at least this
process's own peak, which after building the fixtures can be hundreds of MB.
So every measured command is started by a tiny launcher (an interpreter that
imports nothing beyond ``os``, ``sys``, ``json`` and ``time``): its peak
(about 10 MB) is then the floor of what the child can report, well below
anything measured here.

The launcher times the child from spawn to exit (its own start-up is not
counted) and writes the figures to a file; the child's stdout and stderr are
captured as usual.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_LAUNCHER = """\
import json, os, sys, time
result, argv = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
pid = os.posix_spawn(argv[0], argv, os.environ)
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - start
with open(result, "w") as out:
    json.dump({"seconds": seconds, "maxrss_kb": usage.ru_maxrss, "code": os.waitstatus_to_exitcode(status)}, out)
"""


@dataclass(frozen=True)
class ProcessRun:
    """One run of a command: wall time from spawn to exit, its own peak RSS, its exit code and output."""

    seconds: float
    peak_rss_mb: float
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> dict[str, object]:
        """The child's stdout, read as one JSON object (what the benchmark scripts print)."""
        document = json.loads(self.stdout)
        assert isinstance(document, dict), f"expected a JSON object, got {self.stdout[:200]!r}"
        return document


def child_env(pycache: Path | None, **extra: str) -> dict[str, str]:
    """The environment for a measured child.

    With ``pycache``, bytecode is cached under that folder (``PYTHONPYCACHEPREFIX``),
    as an installed package would have it, even when this shell sets
    ``PYTHONDONTWRITEBYTECODE``; nothing is written into the repository. Without
    it, the child inherits this process's setting."""
    env = dict(os.environ)
    if pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    env.update(extra)
    return env


def run_measured(
    argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 300.0, check: bool = True
) -> ProcessRun:
    """Run ``argv`` (``argv[0]`` an absolute path) through the launcher; raise if it fails and ``check``."""
    with tempfile.TemporaryDirectory(prefix="mailflow-bench-proc-") as tmp:
        result = Path(tmp) / "result.json"
        completed = subprocess.run(
            [sys.executable, "-S", "-c", _LAUNCHER, str(result), *argv],
            capture_output=True,
            env=dict(env) if env is not None else None,
            cwd=ROOT,
            timeout=timeout,
            check=False,
        )
        if not result.exists():
            raise RuntimeError(f"the launcher failed ({completed.returncode}): {completed.stderr.decode()[-2000:]}")
        figures = json.loads(result.read_text(encoding="utf-8"))
    run = ProcessRun(
        seconds=float(figures["seconds"]),
        peak_rss_mb=int(figures["maxrss_kb"]) / 1024,
        returncode=int(figures["code"]),
        stdout=completed.stdout.decode("utf-8", "replace"),
        stderr=completed.stderr.decode("utf-8", "replace"),
    )
    if check and run.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} … exited with {run.returncode}: {run.stderr.strip()[-2000:]}")
    return run
