"""Run mailflow's benchmarks and print each figure beside its baseline.

    .venv/bin/python benchmarks/run.py                 # every benchmark, full size
    .venv/bin/python benchmarks/run.py --quick         # smaller sizes: a smoke run
    .venv/bin/python benchmarks/run.py --only status   # one benchmark
    .venv/bin/python benchmarks/run.py --only status --profile   # plus a cProfile of the slow path

Progress goes to stderr, results to stdout. Targets are reported (OK or
MISSED), never enforced: the exit code is 0 whenever the benchmarks ran.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(ROOT))

from benchmarks import (  # noqa: E402
    bench_bomb,
    bench_consolidate,
    bench_ingest,
    bench_latency,
    bench_returns,
    bench_send,
    bench_status,
)
from benchmarks.common import SERVER_MODES, say  # noqa: E402

Benchmark = Callable[[argparse.Namespace], list[str]]

BENCHMARKS: dict[str, Benchmark] = {
    "send": lambda args: bench_send.run(quick=args.quick, server=args.server),
    "status": lambda args: bench_status.run(quick=args.quick, profile=args.profile),
    "returns": lambda args: bench_returns.run(quick=args.quick),
    "ingest": lambda args: bench_ingest.run(quick=args.quick),
    "bomb": lambda args: bench_bomb.run(quick=args.quick),
    "consolidate": lambda args: bench_consolidate.run(quick=args.quick),
    "latency": lambda args: bench_latency.run(quick=args.quick),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/run.py", description="mailflow's speed and memory figures, each beside its baseline."
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument(
        "--only", choices=sorted(BENCHMARKS), metavar="NAME", help="run one benchmark: " + " | ".join(BENCHMARKS)
    )
    parser.add_argument(
        "--server",
        choices=SERVER_MODES,
        default="process",
        help="send: run aiosmtpd in a separate process (default, the fair setup) or in a thread of this one",
    )
    parser.add_argument("--profile", action="store_true", help="status: also print the top cProfile costs (stderr)")
    return parser


@contextlib.contextmanager
def _logging_as_it_was() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    names = [args.only] if args.only else list(BENCHMARKS)
    say(f"benchmarks: {', '.join(names)}{' (quick)' if args.quick else ''}")
    for index, name in enumerate(names):
        with _logging_as_it_was():  # `status` runs the CLI in this process, which sets up logging
            lines = BENCHMARKS[name](args)
        if index:
            print()
        print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
