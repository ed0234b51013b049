"""Row 1: launch latency of a trivial function.

Two numbers per call, both from ``t0 = time.time()`` just before the launcher is called:
- ``ready``: the last rank to be inside the function with the process group ready
  (max of the entry timestamps the ranks write), i.e. when real work could start;
- ``call``: when the call returned to the caller (workers done, results back).
"""

from __future__ import annotations

import time
from typing import Callable

from . import contenders
from ._timing import scratch, settle, stamps


def measure(name: str, fn: Callable, nproc: int) -> dict:
    """One launch of ``fn`` (``workloads.trivial``) by contender ``name``; seconds.

    Example::

        measure("ours-fork", workloads.trivial, 2)  # {"ready": 0.03, "call": 0.06}
    """
    settle()
    with scratch() as out_dir:
        start = time.time()
        contenders.launch(name, fn, out_dir, (), nproc)
        end = time.time()
        entries = stamps(out_dir, "entry")
    if len(entries) != nproc:
        raise RuntimeError(f"{name}: {len(entries)} of {nproc} ranks reached the function")
    return {"ready": max(entries) - start, "call": end - start}
