"""Who this process is, when it is a launched worker.

The one piece of process-wide state in the library: set once by the worker bootstrap,
read by `report`, `progress` and the toolkit. In the parent (the notebook kernel) it is
None, which is how those functions know to be no-ops there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from ..channel import WorkerChannel


@dataclass(frozen=True)
class WorkerContext:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: str            # "cpu" or "cuda:N"
    backend: str           # "gloo" or "nccl"
    mixed_precision: str   # "no" | "fp16" | "bf16"
    restart_count: int
    pid: int
    channel: WorkerChannel


_current: Optional[WorkerContext] = None


def current() -> Optional[WorkerContext]:
    """This worker's context; None in the parent and in processes a worker forked."""
    ctx = _current
    if ctx is None or ctx.pid != os.getpid():
        return None
    return ctx


def install(ctx: WorkerContext) -> None:
    global _current
    _current = ctx
