"""Row 5: returning a big state_dict (100 MB by default) from rank 0 to the caller.

- ``seconds``: from rank 0's ``time.time()`` just before ``return`` to the call having
  returned (serialization, transfer, deserialization, teardown);
- ``peak_mb``: the caller's peak resident memory during the call minus before it
  (Linux's high-water mark, reset just before the call). The returned value itself is
  part of it: the least possible is about the state_dict's size.
"""

from __future__ import annotations

import gc
import time
from typing import Callable

from . import contenders
from ._timing import PeakRSS, scratch, settle, stamps

CONTENDERS = ("ours-fork", "ours-spawn", "lightning", "torch-fork", "os.fork")  # accelerate returns None


def measure(name: str, fn: Callable, nproc: int, megabytes: float) -> dict:
    """One launch of ``fn`` (``workloads.big_state``) returning ``megabytes`` MB.

    Example::

        measure("ours-fork", workloads.big_state, 2, 100)  # {"seconds": 0.2, "peak_mb": 101.0, ...}
    """
    settle()
    with scratch() as out_dir:
        with PeakRSS() as memory:
            start = time.time()
            value = contenders.launch(name, fn, out_dir, (megabytes,), nproc)
            end = time.time()
        returned = stamps(out_dir, "return")
    received = _megabytes(value)
    del value
    gc.collect()
    if len(returned) != 1 or abs(received - megabytes) > 0.01 * megabytes + 0.01:
        raise RuntimeError(f"{name}: expected {megabytes} MB back, got {received:.1f} MB")
    return {"seconds": end - returned[0], "call": end - start,
            "peak_mb": (memory.peak - memory.baseline) / 2**20, "received_mb": received}


def _megabytes(state) -> float:
    if not isinstance(state, dict):
        return 0.0
    return sum(t.numel() * t.element_size() for t in state.values()) / 2**20
