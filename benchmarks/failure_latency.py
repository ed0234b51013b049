"""Row 2: from a rank raising to the call returning with the error.

The last rank raises (after the others are waiting in a barrier, as in real training);
the latency is from its ``time.time()`` just before ``raise`` to the moment the caller
has the exception in hand. The whole call is reported too.
"""

from __future__ import annotations

import time
from typing import Callable

from . import contenders
from ._timing import scratch, settle, stamps


def measure(name: str, fn: Callable, nproc: int) -> dict:
    """One failing launch of ``fn`` (``workloads.failing``); seconds.

    Example::

        measure("ours-fork", workloads.failing, 2)  # {"error": 0.3, "call": 0.6, "raised": "WorkerError"}
    """
    settle()
    with scratch() as out_dir:
        start = time.time()
        try:
            contenders.launch(name, fn, out_dir, (), nproc)
        except Exception as exc:  # what the caller would see
            caught, raised = time.time(), type(exc).__name__
        else:
            raise RuntimeError(f"{name}: the failing function did not make the call raise")
        raises = stamps(out_dir, "raise")
    if len(raises) != 1:
        raise RuntimeError(f"{name}: expected one raising rank, found {len(raises)}")
    return {"error": caught - raises[0], "call": caught - start, "raised": raised}
