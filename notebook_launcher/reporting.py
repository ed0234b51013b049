"""Worker-side reporting: `report` (metrics) and `progress` (a progress-bar iterator).

Both post to the worker's channel without blocking the training loop: a post is a
deque append; a background thread ships the queue every 0.1 s and drops the oldest
messages if the parent falls behind. Outside a launched worker, `report` does nothing
and `progress` just iterates, so the same function still runs as a plain script.

Cost (``benchmarks/dashboard_overhead.py`` measures it): a few microseconds per
`report` call with float values. Values are converted where it is cheap: CPU tensors
with ``.item()`` at once, CUDA tensors later, on the channel's thread, so that
`report(loss=loss)` does not force a GPU synchronisation in the training loop.
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
_NO_VALUES: dict = {}      # what ranks that are not plotted send: their step is enough


def report(step: Optional[int] = None, **metrics) -> None:
    """Send metrics to the dashboard (rank 0's are plotted; every rank's step is shown).

    Call it on every rank, as often as every step: it never blocks. Values may be
    Python or numpy numbers or 0-d tensors (``.item()`` is taken for you). Without
    ``step``, each call counts as the step after the previous one.

    Example::

        for step, batch in enumerate(loader):
            loss = train_step(batch)
            report(step, loss=loss, lr=scheduler.get_last_lr()[0])
    """
    ctx = context.current()
    if ctx is None:
        return
    if step is not None and type(step) is not int:
        step = int(step)  # numpy ints, 0-d tensors: the parent gets plain data
    if ctx.local_rank == 0:  # the node's first rank is the one plotted
        values = {name: _number(name, value) for name, value in metrics.items()}
    else:
        values = _NO_VALUES
    ctx.channel.post(ch.Report(step, values, time.monotonic()))


def _number(name: str, value):
    if isinstance(value, float):
        return value
    if isinstance(value, numbers.Real):  # int, bool, numpy scalars
        return float(value)
    if getattr(value, "is_cuda", False) and getattr(value, "numel", lambda: 0)() == 1:
        return _DeviceScalar(value)
    try:
        return float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(
            f"report(): {name} must be a number or a one-element tensor, got {type(value).__name__}"
            f"{tuple(value.shape) if hasattr(value, 'shape') else ''}: {exc}"
        ) from None


class _DeviceScalar:
    """A one-element GPU tensor whose value is read when the message is pickled.

    Pickling happens on the channel's flusher thread, so the host-device sync that
    ``.item()`` implies does not stall the training loop; the parent receives a plain
    float (it must never unpickle a CUDA tensor: that would initialize CUDA there).
    A copy is taken now (an asynchronous device op), so later in-place updates of the
    reported tensor do not change the value.
    """

    __slots__ = ("tensor",)

    def __init__(self, tensor) -> None:
        self.tensor = tensor.detach().clone()

    def __reduce__(self):
        try:
            value = float(self.tensor.item())
        except Exception:  # a broken device must not kill the channel's thread
            value = float("nan")
        return (float, (value,))


def progress(iterable: Iterable[T], total: Optional[int] = None, desc: Optional[str] = None) -> Iterator[T]:
    """Iterate like ``iterable`` while driving the dashboard's progress bar.

    Nested loops (epochs, then batches) each get their own bar; the dashboard shows
    the outer one with the inner one's fraction folded in, and an ETA for the run.
    Messages are rate-limited (about 20 per second per bar), so wrapping a fast
    iterator costs well under a microsecond per item.

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
        post(ch.ProgressUpdate(0, total, desc, depth, time.monotonic()))
        for item in iterable:
            yield item
            n += 1
            now = time.monotonic()
            if now - last >= PROGRESS_INTERVAL or n == total:
                post(ch.ProgressUpdate(n, total, desc, depth, now))
                last = now
    finally:
        _depth = depth
        if n != total:
            post(ch.ProgressUpdate(n, total, desc, depth, time.monotonic()))
