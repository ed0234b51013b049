"""Worker-side reporting: `report` (metrics) and `progress` (a progress-bar iterator).

Both post to the worker's channel without blocking the training loop. Outside a
launched worker, `report` does nothing and `progress` just iterates, so the same
function still runs as a plain script.
"""

from __future__ import annotations

import numbers
import time
from typing import Iterable, Iterator, Optional, TypeVar

from . import channel as ch
from .workers import context

T = TypeVar("T")

PROGRESS_INTERVAL = 0.05   # seconds between progress messages from one bar (the last one always goes)

_depth = 0                 # nesting level of active progress() loops in this worker


def report(step: Optional[int] = None, **metrics) -> None:
    """Send metrics to the dashboard (rank 0's are plotted; every rank's step is shown).

    Values may be Python numbers or 0-d tensors (``.item()`` is taken for you).

    Example::

        for step, batch in enumerate(loader):
            loss = train_step(batch)
            report(step, loss=loss, lr=scheduler.get_last_lr()[0])
    """
    ctx = context.current()
    if ctx is None:
        return
    values = {}
    for name, value in metrics.items():
        if not isinstance(value, numbers.Number):
            value = value.item() if hasattr(value, "item") else float(value)
        values[name] = float(value)
    ctx.channel.post(ch.METRICS, {"step": step, "values": values, "t": time.monotonic()})


def progress(iterable: Iterable[T], total: Optional[int] = None, desc: Optional[str] = None) -> Iterator[T]:
    """Iterate like ``iterable`` while driving the dashboard's progress bar.

    Nested loops (epochs, then batches) each get their own bar.

    Example::

        for epoch in progress(range(3), desc="epoch"):
            for batch in progress(loader, desc="batch"):
                ...
    """
    ctx = context.current()
    if ctx is None:
        yield from iterable
        return
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    global _depth
    depth, _depth = _depth, _depth + 1
    post, n, last = ctx.channel.post, 0, 0.0
    try:
        post(ch.PROGRESS, {"n": 0, "total": total, "desc": desc, "depth": depth, "t": time.monotonic()})
        for item in iterable:
            yield item
            n += 1
            now = time.monotonic()
            if now - last >= PROGRESS_INTERVAL or n == total:
                post(ch.PROGRESS, {"n": n, "total": total, "desc": desc, "depth": depth, "t": now})
                last = now
    finally:
        _depth = depth
        if n != total:
            post(ch.PROGRESS, {"n": n, "total": total, "desc": desc, "depth": depth, "t": time.monotonic()})
