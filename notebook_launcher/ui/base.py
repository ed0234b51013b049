"""What every view of a run does. Views only read the `RunState`; one thread (the
supervisor's) calls them, except `open`, which runs in the thread of the cell that
launched the run (for ``block=False`` that differs from the supervisor's thread)."""

from __future__ import annotations

import string
import sys
import time
from typing import Any, Callable, TextIO

from ..state import RunState

DEFAULT_PREFIX = "[rank${rank}]: "


class View:
    """Base view: prints worker output lines, rank-prefixed, and nothing else.

    This is what ``display="none"`` shows: the workers' own prints still reach the cell.
    ``prefix`` is a `string.Template` with ``${rank}``, ``${local_rank}``, ``${role_name}``
    (torchrun's ``log_line_prefix_template``). ``title`` says what was launched, e.g.
    "2 CPU processes (gloo, fork)"; views that have a header show it there.

    Call order: ``open()`` (optional, from the launching cell's thread), ``start``,
    then ``output``/``refresh`` many times, then ``finish`` exactly once.
    """

    def __init__(self, prefix: str = DEFAULT_PREFIX, title: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._template = string.Template(prefix)
        self._prefixes: dict = {}
        self.title = title
        self.clock = clock

    def prefix(self, rank: int) -> str:
        if rank not in self._prefixes:
            self._prefixes[rank] = self._template.safe_substitute(rank=rank, local_rank=rank, role_name="default")
        return self._prefixes[rank]

    def open(self) -> None:
        """Show the view's live parts in the current cell (before the workers start)."""

    def start(self, state: RunState) -> None:
        """The workers were started."""

    def output(self, rank: int, stream: str, lines: list) -> None:
        """Whole lines a worker wrote to its stdout or stderr."""
        self.write(stream, "".join(f"{self.prefix(rank)}{line}\n" for line in lines))

    def stalled(self, rank: int, seconds: float, stacks: str) -> None:
        """A rank showed no sign of life for ``seconds``: show where it is (its stacks are
        also in ``state.stalls`` and the log)."""
        header = f"no progress for {seconds:g}s (stall_timeout); its stacks, most recent call first:"
        self.output(rank, "stderr", [header, *stacks.splitlines()])

    def refresh(self, state: RunState) -> None:
        """Called often (every event batch and every tick); throttle in the view."""

    def finish(self, state: RunState) -> None:
        """The run ended (succeeded, failed, interrupted or stopped); replace live parts with a summary."""

    def _guarded(self, method, *args) -> Any:
        """``method(*args)``; an error in it marks the view broken (it stops updating) and
        is said once, on stderr."""
        try:
            return method(*args)
        except Exception as exc:  # a drawing bug must not stop the training run
            self._broken = True
            print(f"notebook_launcher: the dashboard stopped updating ({type(exc).__name__}: {exc})",
                  file=sys.stderr)
            return None

    @staticmethod
    def write(stream: str, text: str) -> None:
        target: TextIO = sys.stderr if stream == "stderr" else sys.stdout
        target.write(text)
        target.flush()


class Throttle:
    """True at most once per ``interval`` seconds (the first call is always True).

    Example::

        every_second = Throttle(1.0)
        if every_second.ready(now):
            redraw()
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: float | None = None

    def ready(self, now: float) -> bool:
        if self._last is not None and now - self._last < self.interval:
            return False
        self._last = now
        return True
