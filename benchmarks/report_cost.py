"""Row 4 (part): the cost of one ``report()`` call inside a launched worker.

Measured on rank 0 of a real launch (the channel, its flusher thread and the parent
reading the pipe all run), with float and 0-d tensor values, and for comparison the
cost of ``report()`` outside any worker (a no-op there).
"""

from __future__ import annotations

import time
from typing import Callable

from . import contenders
from ._timing import scratch, settle


def measure(fn: Callable, nproc: int, calls: int, tensor_values: bool, display: str = "none") -> dict:
    """Microseconds per ``report()`` call on rank 0 of an ``ours-fork`` launch.

    Example::

        measure(workloads.report_cost, 2, 20000, False)  # {"us_per_call": 3.1}
    """
    settle()
    with scratch() as out_dir:
        seconds = contenders.launch("ours-fork", fn, out_dir, (calls, tensor_values), nproc, display=display)
    return {"us_per_call": seconds * 1e6}


def outside_worker(calls: int = 100_000) -> dict:
    """Microseconds per ``report()`` call in a process that is not a worker (a no-op)."""
    from notebook_launcher import report

    start = time.perf_counter()
    for i in range(calls):
        report(i, loss=0.5)
    return {"us_per_call": (time.perf_counter() - start) / calls * 1e6}
