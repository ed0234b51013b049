"""`TrackerHub`: experiment trackers in the notebook process, fed by rank 0's messages.

The supervisor hands it every message of the call (`on_message`, as one of its
``sinks``): it keeps rank 0's tracker messages and, when the launch was given
``log_with``, rank 0's ``report()`` values; teardown calls `close` on every path. Those calls only append to a bounded queue: a writer thread of its own
opens the runs, writes and closes them, so a slow tracker (a remote MLflow server, a
wandb upload) never slows the training loop nor the dashboard. When the writer falls
more than `QUEUE_LIMIT` items behind, newly logged steps are dropped (counted, said at
close); opening, config and closing are never dropped. (TensorBoard costs this process
about 60 us of CPU per step: a loop logging over ~15,000 steps a second outruns it.)

Runs belong to one hub: make one per launch attempt, session call or ``%%dist`` cell
(``attempt=`` the restart number) and close it in that call's teardown. Every run is
new, also when the project name was used before: TensorBoard writes a folder of its
own (``project/version_<n>``, the next free n), MLflow creates a run (tagged
``notebook_launcher.attempt``), wandb a run with a new id (``reinit="create_new"``),
trackio a run (its ``resume="never"``). So a failed attempt's run is closed as failed,
and the restarted function's ``init_trackers`` opens a fresh one beside it. Continuing
one run instead would mix two histories that both start at step 0 (TensorBoard shows
both on one line, wandb drops steps that go backwards). Likewise a second
``init_trackers`` in one call closes the first runs (as succeeded) and opens new ones,
and ``end_training`` closes them early.

A tracker that raises is reported once (stderr, or ``warn``) with what failed; the
others go on, and so does the training. Steps: a value logged without a step gets the
step after the previous one.

Example::

    hub = TrackerHub()                                   # one per attempt
    hub.on_message(0, TrackerInit(("tensorboard",), "demo", {"lr": 0.1}, {}, "/tmp/runs"))
    hub.on_message(0, TrackerLog({"loss": 0.5}, step=0))
    hub.close("succeeded")                               # waits for the writes (bounded)
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..channel import Report
from .base import STATUSES, RunSettings, open_run
from .messages import MESSAGES, TrackerConfig, TrackerEnd, TrackerInit, TrackerLog
from .names import KINDS, check_installed

QUEUE_LIMIT = 10_000    # queued log items before new ones are dropped (opening/closing never are)
IDLE_FLUSH = 0.5        # seconds without new items before the trackers are told to flush
CLOSE_TIMEOUT = 30.0    # seconds close() waits for the writer (a wandb upload may take longer)
INTERRUPTED_CLOSE_TIMEOUT = 1.0  # ...after an Interrupt or a stop: the rest finishes in the background


@dataclass(frozen=True)
class _Report:
    step: Optional[int]
    values: dict


@dataclass(frozen=True)
class _Close:
    status: str


class _WorkQueue:
    """FIFO between the supervisor (put) and the writer thread (take everything)."""

    def __init__(self, limit: int) -> None:
        self._items: collections.deque = collections.deque()
        self._ready = threading.Condition()
        self.limit = limit
        self.dropped = 0

    def put(self, item: Any, droppable: bool) -> None:
        with self._ready:
            if droppable and len(self._items) >= self.limit:
                self.dropped += 1
                return
            self._items.append(item)
            self._ready.notify()

    def take(self, timeout: float) -> list:
        with self._ready:
            if not self._items:
                self._ready.wait(timeout)
            items = list(self._items)
            self._items.clear()
        return items


class TrackerHub:
    """Opens, writes and closes tracker runs for one launch attempt, off the caller's thread.

    Args:
        log_with, project_name, logging_dir, config, init_kwargs: only for
            ``notebook_launcher(..., log_with=..., project_name=...)``: the trackers that
            `on_report` writes every rank-0 ``report()`` to (opened at the first report,
            unless an ``init_trackers`` opened them first). Without ``log_with``,
            `on_report` does nothing and only ``Accelerator.init_trackers`` opens runs.
        attempt: this attempt's number (0, then 1, 2... for restarts).
        warn: where the one-line reports of a failing tracker go (default: stderr).

    Example::

        hub = TrackerHub(log_with="mlflow", project_name="sweep-3")
        hub.on_report(0, {"loss": 0.9})
        hub.close("failed")      # the MLflow run ends FAILED
    """

    def __init__(self, log_with: Any = None, project_name: Optional[str] = None, logging_dir: Optional[str] = None,
                 config: Optional[dict] = None, init_kwargs: Optional[dict] = None, attempt: int = 0,
                 warn: Optional[Callable[[str], None]] = None, queue_limit: int = QUEUE_LIMIT) -> None:
        names = check_installed(log_with) if log_with is not None else ()
        self._report_init = TrackerInit(
            names, project_name or "notebook_launcher", dict(config or {}), dict(init_kwargs or {}),
            os.path.abspath(logging_dir or "runs")) if names else None
        self.attempt = attempt
        self._warn = warn or _to_stderr
        self._queue = _WorkQueue(queue_limit)
        self._start_lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._closing = False
        # Writer-thread state (only the writer thread touches it).
        self._runs: dict = {}             # tracker name -> open adapter
        self._init_seen = False           # an init_trackers opened runs
        self._report_opened = False       # report mode opened its trackers
        self._next_step = 0
        self._errors: dict = {}           # tracker name -> errors after the first (reported) one
        self._unflushed = False
        self._said_not_recorded = False

    # ------------------------------------------------------------- supervisor side (never blocks)
    def on_message(self, rank: int, message: Any) -> None:
        """Any message from ``rank`` (a supervisor sink gets them all): rank 0's tracker
        messages are written, and so are its reports when the hub was made with
        ``log_with``; everything else is ignored."""
        if rank != 0:
            return
        if isinstance(message, MESSAGES):
            self._put(message, droppable=isinstance(message, TrackerLog))
        elif isinstance(message, Report):
            self.on_report(message.step, message.values)

    def on_report(self, step: Optional[int], values: dict) -> None:
        """A rank-0 ``report()``: written when the hub was made with ``log_with``."""
        if self._report_init is not None and values:
            self._put(_Report(step, values), droppable=True)

    def close(self, status: str = "succeeded", timeout: Optional[float] = None) -> bool:
        """Close every open run as ``status`` (succeeded | failed | interrupted | stopped)
        after what was queued is written; wait at most ``timeout`` seconds. Returns whether
        the writer finished in time (if not, it finishes in the background)."""
        status = str(status)  # a RunStatus is its string
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        if timeout is None:  # an interrupted call must give the cell back fast (the 2 s promise)
            timeout = CLOSE_TIMEOUT if status in ("succeeded", "failed") else INTERRUPTED_CLOSE_TIMEOUT
        with self._start_lock:
            if self._closing:
                return True
            self._closing = True
            thread = self._thread
        if thread is None:
            return True  # nothing was ever logged: nothing to close
        self._queue.put(_Close(status), droppable=False)
        thread.join(timeout)
        if thread.is_alive():
            self._warn(f"notebook_launcher: the trackers are still writing after {timeout:g}s; "
                       "they finish in the background.")
            return False
        return True

    @property
    def dropped(self) -> int:
        """Log items dropped because the writer fell `QUEUE_LIMIT` items behind."""
        return self._queue.dropped

    def _put(self, item: Any, droppable: bool) -> None:
        if self._closing:
            return
        if self._thread is None:
            with self._start_lock:
                if self._thread is None and not self._closing:
                    self._thread = threading.Thread(target=self._write_loop, name="notebook_launcher-trackers",
                                                    daemon=True)
                    self._thread.start()
        self._queue.put(item, droppable)

    # ------------------------------------------------------------- writer thread
    def _write_loop(self) -> None:
        try:
            while True:
                items = self._queue.take(IDLE_FLUSH)
                if not items:
                    self._flush_idle()
                    continue
                if self._handle(items):
                    return
        except BaseException as exc:  # a bug of ours: say so, never take the notebook down
            self._warn(f"notebook_launcher: the tracker writer stopped: {exc!r}\n{traceback.format_exc()}")
            try:
                self._close_runs("failed")  # no run stays open (an MLflow run RUNNING forever)
            except BaseException:
                pass

    def _handle(self, items: list) -> bool:
        """Process items in order, batching consecutive logs; True once closed."""
        pending: dict = {}  # tracker name -> [(values, step, kwargs), ...]
        for item in items:
            if isinstance(item, (TrackerLog, _Report)):
                self._collect(item, pending)
                continue
            self._write(pending)
            pending = {}
            if isinstance(item, _Close):
                self._close_runs(item.status)
                self._final_notes()
                return True
            if isinstance(item, TrackerInit):
                self._on_init(item)
            elif isinstance(item, TrackerConfig):
                for name, run in self._selected(item.tracker):
                    self._call(name, "record the config", lambda run=run: run.store_config(item.config))
            elif isinstance(item, TrackerEnd):
                self._close_runs("succeeded", only=item.tracker)
        self._write(pending)
        return False

    def _collect(self, item: Any, pending: dict) -> None:
        if isinstance(item, _Report):
            if not self._report_opened:
                self._report_opened = True
                self._open(self._report_init)
            values, kwargs, only = item.values, {}, None
        else:
            values, kwargs, only = item.values, item.log_kwargs, item.tracker
            if item.reported and self._report_init is not None:  # its numbers arrive as a report too
                values = {k: v for k, v in values.items() if isinstance(v, str)}
        if not values or not self._runs:
            self._say_not_recorded(item)
            return
        step = self._next_step if item.step is None else item.step
        self._next_step = step + 1
        for name, _run in self._selected(only):
            pending.setdefault(name, []).append((values, step, kwargs.get(name, {})))

    def _say_not_recorded(self, item: Any) -> None:
        """Once per call: values logged in a call that never opened a run (in a session, an
        Accelerator whose init_trackers ran in an earlier cell, whose run ended with it)."""
        if isinstance(item, TrackerLog) and not self._init_seen and self._report_init is None \
                and not self._said_not_recorded:
            self._said_not_recorded = True
            self._warn("notebook_launcher: values logged without init_trackers in this call were not recorded: "
                       "every session call or %%dist cell that calls init_trackers is a tracker run of its own, "
                       "which ends with it. Call init_trackers in the call that logs.")

    def _write(self, pending: dict) -> None:
        for name, entries in pending.items():
            run = self._runs.get(name)
            if run is not None:
                self._call(name, "log", lambda: run.log_many(entries))
                self._unflushed = True

    def _on_init(self, init: TrackerInit) -> None:
        if self._init_seen:  # a second init_trackers: new runs (report mode reopens its own at the next report)
            self._close_runs("succeeded")
            self._report_opened = False
        self._init_seen = True
        self._open(init)

    def _open(self, init: TrackerInit) -> None:
        """Open init's trackers that are not open yet; those already open record its config."""
        for name in init.log_with:
            run = self._runs.get(name)
            if run is not None:
                if init.config:
                    self._call(name, "record the config", lambda: run.store_config(init.config))
                continue
            settings = RunSettings(init.project_name, init.config, init.init_kwargs.get(name, {}),
                                   init.logging_dir, self.attempt)
            run = self._call(name, "open a run", lambda: open_run(name, settings))
            if run is not None:
                self._runs[name] = run

    def _close_runs(self, status: str, only: Optional[str] = None) -> None:
        for name, run in self._selected(only):
            self._call(name, f"close its run ({status})", lambda run=run: run.close(status))
            for note in list(getattr(run, "skipped", ()))[:5]:
                self._warn(f"notebook_launcher: {KINDS[name].title} did not record {note}.")
            del self._runs[name]

    def _selected(self, only: Optional[str]) -> list:
        return [(name, run) for name, run in self._runs.items() if only is None or name == only]

    def _flush_idle(self) -> None:
        if self._unflushed:
            self._unflushed = False
            for name, run in self._runs.items():
                self._call(name, "flush", run.flush)

    def _call(self, name: str, what: str, action: Callable) -> Any:
        try:
            return action()
        except Exception as exc:
            if name in self._errors:
                self._errors[name] += 1
            else:
                self._errors[name] = 0
                self._warn(f"notebook_launcher: the {KINDS[name].title} tracker failed to {what}: "
                           f"{type(exc).__name__}: {exc}. The training goes on; this tracker may miss data.")
            return None

    def _final_notes(self) -> None:
        for name, more in self._errors.items():
            if more:
                self._warn(f"notebook_launcher: {KINDS[name].title} failed {more} more time(s) after that.")
        if self._queue.dropped:
            self._warn(f"notebook_launcher: {self._queue.dropped} logged steps were not written: "
                       "the trackers fell behind the training loop.")


def _to_stderr(text: str) -> None:
    print(text, file=sys.stderr)
