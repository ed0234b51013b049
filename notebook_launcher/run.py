"""Non-blocking runs: ``notebook_launcher(..., block=False)`` returns a `Run`.

The workers are started in the calling thread, as for a blocking run: Linux delivers
the parent-death signal when the *thread* that forked a worker ends, and the cell's
thread is the kernel's main thread, which lives as long as the kernel. The supervisor
loop then runs in a background thread that owns the view until the run ends, while the
person keeps using the notebook.

Output from that thread must land in the launching cell, not in whatever cell runs at
the time. ipykernel 7 ties output to a per-thread parent message (ipykernel #1450/#1451),
so the thread sets the launching cell's message as its parent, for its prints, its
displays and its widgets' comm messages alike; and because a frontend may forget a cell
once it finishes executing, the dashboard lives in what the launching cell displayed:
a widget box (widgets), a display updated in place by its id (html), or an ``Output``
widget that captures the text view's lines.

Every process is reaped on every path: the run ends by itself, fails, is stopped
(`Run.stop`), or the kernel shuts down (an ``atexit`` hook stops live runs; a killed
kernel takes its workers with it through the parent-death signal and the control pipe).
"""

from __future__ import annotations

import atexit
import contextvars
import threading
import time
import weakref
from typing import Any, Optional

from . import environment
from .launcher import Attempt, RunStopped, launch, start_attempt
from .state import RunState, RunStatus, format_duration, summary_line
from .ui import make_view, resolve_display
from .ui.base import View

STOP_TIMEOUT = 30.0     # seconds `stop` waits for the teardown by default
POLL = 0.2              # seconds between checks while waiting (keeps the wait interruptible)


class Run:
    """A launch running in the background.

    Attributes:
        status: a `RunStatus`: "starting", "running", then "succeeded", "failed",
            "interrupted" or "stopped" (read from the current attempt's state).
        state: the live `RunState` (steps, metrics, ranks) of the current attempt.

    Example::

        run = notebook_launcher(train, args=(model,), num_processes=2, block=False)
        # ... the dashboard updates; other cells run meanwhile ...
        run.wait(timeout=60)   # True once finished
        model_state = run.result()
        run.stop()             # or end it early; every worker is reaped
    """

    def __init__(self, config, title: str = "") -> None:
        self.config = config
        self.title = title
        self.state: Optional[RunState] = None
        self.view: Optional[View] = None
        self._display = resolve_display(config.display)
        self._stop = threading.Event()
        self._done = threading.Event()
        self._value: Any = None
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        self._parent = _cell_parent()
        self._frame = None

    # ------------------------------------------------------------- start (cell's thread)
    @classmethod
    def launch(cls, config, title: str = "") -> "Run":
        """Start the workers here and supervise them in a background thread."""
        run = cls(config, title)
        run._frame = _make_frame(run._display, run._parent)
        attempt = start_attempt(config, run._new_view(0), 0)
        run.state = attempt.state
        run._thread = threading.Thread(target=run._main, args=(attempt,), name="notebook_launcher-run", daemon=True)
        _live.add(run)
        try:
            run._thread.start()
        except BaseException:
            run._stop.set()
            run._main(attempt)  # stops at its first tick, tearing everything down
            raise
        return run

    def _new_view(self, attempt: int) -> View:
        self.view = make_view(self._display, self.config.line_prefix, self.title,
                              host=self._frame if self._display in ("widgets", "html") else None)
        self.view.open()
        return self.view

    # ------------------------------------------------------------- the background thread
    def _main(self, attempt: Attempt) -> None:
        tokens = _set_thread_parent(self._parent)
        try:
            # Restarts start workers from this thread, which outlives them (it reaps them).
            self._value = launch(self.config, self._new_view, first=attempt, stop=self._stop,
                                 on_attempt=self._follow)
        except (RunStopped, KeyboardInterrupt):
            pass  # the state says how it ended
        except BaseException as exc:  # WorkerError, or a bug of ours: still a clear end, still reaped
            self._error = exc
        finally:
            _live.discard(self)
            self._done.set()
            _reset_thread_parent(tokens)

    def _follow(self, attempt: Attempt) -> None:
        self.state = attempt.state

    # ------------------------------------------------------------- the handle
    @property
    def status(self) -> RunStatus:
        if self.state is None:
            return RunStatus.STARTING
        if self._done.is_set() and not self.state.finished:
            return RunStatus.FAILED  # ended by a bug of ours before its state did
        return self.state.status

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for the end (at most ``timeout`` seconds); True if the run has ended.

        Interrupting the kernel while waiting stops the run, as it would a blocking one.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self._done.is_set():
                left = POLL if deadline is None else min(POLL, deadline - time.monotonic())
                if left <= 0:
                    break
                self._done.wait(left)
        except KeyboardInterrupt:
            self.stop()
            raise
        if self._done.is_set() and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)  # it is only leaving its finally clause
        return self._done.is_set()

    def result(self, timeout: Optional[float] = None) -> Any:
        """Rank 0's return value (or every rank's with ``return_all``), once the run ends.

        Raises:
            WorkerError: a worker failed (the same error a blocking run raises).
            RuntimeError: the run was stopped before it finished.
            TimeoutError: still running after ``timeout`` seconds.
        """
        if not self.wait(timeout):
            raise TimeoutError(f"the run is still {self.status} after {timeout} s")
        if self._error is not None:
            raise self._error
        if self.status != RunStatus.SUCCEEDED:
            raise RuntimeError(f"the run was {self.status} before it finished; it has no result")
        return self._value

    @property
    def error(self) -> Optional[BaseException]:
        """The `WorkerError` of a failed run (None otherwise)."""
        return self._error

    def stop(self, timeout: float = STOP_TIMEOUT) -> bool:
        """End the run now: workers get SIGTERM, then SIGKILL, and are reaped. True once ended."""
        self._stop.set()
        if self._thread is None or threading.current_thread() is self._thread:
            return self._done.is_set()
        return self.wait(timeout)

    # ------------------------------------------------------------- display
    def __repr__(self) -> str:
        parts = [self.status]
        if self.title:
            parts.append(self.title)
        if self.state is not None and self.state.started_at is not None:
            parts.append(format_duration(self.state.elapsed))
            if self.state.last_step is not None:
                parts.append(f"step {self.state.last_step:,}")
        return f"<Run {', '.join(parts)}>"

    def _ipython_display_(self) -> None:
        """In a cell: the static summary (with the plot) once ended, one line before."""
        from IPython.display import display

        if not self.done() or self.state is None:
            display({"text/plain": repr(self)}, raw=True)
            return
        for bundle in self.summary().bundles():
            display(bundle, raw=True)

    def summary(self):
        """The end-of-run `ui.snapshot.Snapshot` (HTML, PNG, log tail), built now."""
        from .ui import snapshot

        png = None
        if self.state.series:
            from .ui.plot import MetricsPlot

            png = MetricsPlot().render(self.state.series, final=True)
        prefix = (self.view or View(self.config.line_prefix)).prefix
        return snapshot.build(self.state, self.title, prefix, png)

    def summary_line(self) -> str:
        return summary_line(self.state) if self.state is not None else repr(self)


# ----------------------------------------------------------------- the kernel side
def _cell_parent() -> Optional[dict]:
    """The message of the cell running now (ipykernel), or None outside a kernel."""
    shell = environment.ipython_shell()
    kernel = getattr(shell, "kernel", None)
    if kernel is None:
        return None
    try:
        return kernel.get_parent()
    except Exception:
        return getattr(shell, "parent_header", None)


def _set_thread_parent(parent: Optional[dict]):
    """Route this thread's output to ``parent``'s cell (ipykernel >= 7 keeps it per thread):
    prints and displays through the shell's ``set_thread_parent``; widgets' comm messages
    take their parent from the kernel's own context variable, which a thread started later
    reads from the most recent cell unless it sets its own (this thread's context only)."""
    shell = environment.ipython_shell()
    if not parent or not hasattr(shell, "set_thread_parent"):
        return None
    tokens = []
    try:
        tokens.append((shell.reset_thread_parent, shell.set_thread_parent(parent)))
    except Exception:
        return None
    variable = getattr(getattr(shell, "kernel", None), "_shell_parent", None)
    if isinstance(variable, contextvars.ContextVar):
        tokens.append((variable.reset, variable.set(parent)))
    return tokens


def _reset_thread_parent(tokens) -> None:
    for reset, token in reversed(tokens or ()):
        try:
            reset(token)
        except Exception:
            pass


def _make_frame(display: str, parent: Optional[dict]):
    """The container shown in the launching cell, which the background thread fills.

    widgets: an empty box the dashboard goes into. html: a display the dashboard updates
    in place (by its display id: no widget manager needed). text/none in a kernel: an
    ``Output`` widget that captures what the thread prints (its ``msg_id`` is the
    launching cell's, which is the parent the thread's output carries).
    """
    if not environment.in_jupyter_kernel():
        return None
    if display == "html":
        from IPython.display import display as show

        return show({"text/html": "<div>◌ starting</div>", "text/plain": "starting"}, raw=True, display_id=True)
    try:
        import ipywidgets as widgets
        from IPython.display import display as show
    except Exception:
        return None
    if display == "widgets":
        frame = widgets.VBox()
    else:
        frame = widgets.Output()
        msg_id = (parent or {}).get("header", {}).get("msg_id")
        if msg_id:
            frame.msg_id = msg_id
    show(frame)
    return frame


_live: "weakref.WeakSet[Run]" = weakref.WeakSet()


@atexit.register
def _stop_live_runs() -> None:
    """Kernel or interpreter shutdown: stop what still runs, so workers are reaped, not orphaned."""
    for run in list(_live):
        run.stop(timeout=10)
