"""Pausing Python's cyclic garbage collector while a step makes many objects that form no cycles.

Reference counting frees what mailflow makes as soon as it is no longer used;
the cyclic collector is only needed for reference cycles. It runs whenever
700 more container objects have been made than freed, so a step that builds
tens of thousands of them (the rows of a returned sheet, an unpickled cache
entry) sets off dozens of passes, some over every object of the process, that
cost more than the step itself and find nothing. :func:`paused` switches the
collector off for such a step and back on afterwards (if it was on), however
the step ends; collection then goes on as usual.

Only for steps whose objects form no cycles and that finish: the pause is
process-wide, so it must stay short.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["paused"]


@contextmanager
def paused() -> Iterator[None]:
    """Run the ``with`` block with the cyclic garbage collector off, then restore its state."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
