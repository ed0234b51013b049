"""The parent's event loop: one selector over every worker pipe and process sentinel.

It decodes worker messages into `RunState` events, forwards output lines to the view,
notices failures, picks the root cause, and decides when the run is over. It never
touches processes itself beyond reading; stopping them is the caller's job (so that
teardown happens in one place, on every exit path).
"""

from __future__ import annotations

import os
import selectors
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from . import channel as ch
from .errors import Failure
from .state import Exited, Metrics, Output, Progress, Ready, RunState, Started
from .ui.base import View
from .workers.processes import WorkerHandle, signal_workers

TICK = 0.1                  # seconds between view refreshes when nothing arrives
FAILURE_WINDOW = 0.25       # after a "lost my peer" failure, how long to listen for the real one
PRIMARY_WINDOW = 0.05       # after a real failure: collect ranks failing at the same moment
EXIT_GRACE = 10.0           # after every rank returned, how long they may take to exit
MAX_LINE = 64 * 1024        # a pending partial line (no newline yet) longer than this is emitted as is


class LineSplitter:
    """Bytes in, whole lines out. A carriage return rewinds the pending line (tqdm bars)."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list:
        data = self._pending + data
        *complete, self._pending = data.split(b"\n")
        lines = [_decode(line) for line in complete]
        if len(self._pending) > MAX_LINE:
            lines.append(_decode(self._pending))
            self._pending = b""
        return lines

    def flush(self) -> list:
        rest, self._pending = self._pending, b""
        return [_decode(rest)] if rest.strip(b"\r") else []


def _decode(raw: bytes) -> str:
    if b"\r" in raw:  # keep what a terminal would show: the text after the last \r
        raw = raw.rstrip(b"\r").rsplit(b"\r", 1)[-1]
    return raw.decode("utf-8", errors="replace")


@dataclass
class Outcome:
    """How the supervised run ended."""

    results: dict = field(default_factory=dict)   # rank -> (blob, pickler)
    root: Optional[Failure] = None
    failures: list = field(default_factory=list)  # every failure seen, root included


class Supervisor:
    """Watches one attempt's workers until they all succeed or one fails."""

    def __init__(self, handles: list[WorkerHandle], state: RunState, view: View,
                 expect_result: set, tick: float = TICK, clock=time.monotonic,
                 stall: Optional["StallWatch"] = None) -> None:
        self.handles = handles
        self.tick = tick
        self.stall = stall
        self.state = state
        self.view = view
        self.expect_result = expect_result
        self.clock = clock
        self.outcome = Outcome()
        self._failures: dict[int, Failure] = {}
        self._errors: dict[int, dict] = {}
        self._decide_at: Optional[float] = None      # set by the first failure
        self._all_returned_at: Optional[float] = None
        self._decoders = {h.rank: ch.FrameDecoder() for h in handles}
        self._splitters = {(h.rank, s): LineSplitter() for h in handles for s in ("stdout", "stderr")}
        self._selector = selectors.DefaultSelector()

    # ------------------------------------------------------------- main loop
    def run(self) -> Outcome:
        """Block until the run is decided. KeyboardInterrupt propagates to the caller."""
        self._register()
        self.state.apply(Started(self.clock(), {h.rank: h.pid for h in self.handles}))
        self.view.start(self.state)
        try:
            while not self._decided():
                self._pump(self._timeout())
                if self.stall is not None:
                    self._check_stalls()
                self.view.refresh(self.state)
            self._drain()
        finally:
            self._selector.close()
        self._conclude()
        return self.outcome

    def _register(self) -> None:
        for h in self.handles:
            self._selector.register(h.fds.events, selectors.EVENT_READ, (h, "events"))
            self._selector.register(h.fds.stdout, selectors.EVENT_READ, (h, "stdout"))
            self._selector.register(h.fds.stderr, selectors.EVENT_READ, (h, "stderr"))
            self._selector.register(h.sentinel, selectors.EVENT_READ, (h, "exit"))

    def _timeout(self) -> float:
        if self._decide_at is None:
            return self.tick
        return max(0.0, min(self.tick, self._decide_at - self.clock()))

    def _pump(self, timeout: float) -> None:
        for key, _ in self._selector.select(timeout):
            handle, what = key.data
            if what == "exit":
                self._on_exit(handle, key.fd)
            else:
                self._read(handle, what, key.fd)

    def _decided(self) -> bool:
        if self._decide_at is not None:
            return self.clock() >= self._decide_at
        if all(h.exitcode is not None for h in self.handles):
            return True
        return self._lingering()

    def _lingering(self) -> bool:
        """Every rank returned its value but some do not exit (e.g. stuck tearing down
        NCCL): after EXIT_GRACE the run is decided anyway and teardown stops them."""
        if len(self.outcome.results) < len(self.handles):
            return False
        if self._all_returned_at is None:
            self._all_returned_at = self.clock()
        if self.clock() < self._all_returned_at + EXIT_GRACE:
            return False
        for h in self.handles:
            if h.exitcode is None:
                self._emit_lines(h.rank, "stderr", [f"returned, but did not exit within {EXIT_GRACE:g}s: stopping it"],
                                 activity=False)
        return True

    # ------------------------------------------------------------- reading
    def _read(self, handle: WorkerHandle, what: str, fd: int) -> str:
        """Read what is available on ``fd``: returns "data", "empty" or "eof"."""
        try:
            data = os.read(fd, 1 << 20)
        except BlockingIOError:
            return "empty"
        except OSError:
            data = b""
        if not data:
            self._unregister(fd)
            if what != "events":
                self._emit_lines(handle.rank, what, self._splitters[(handle.rank, what)].flush())
            return "eof"
        if what == "events":
            for kind, payload in self._decoders[handle.rank].feed(data):
                self._on_message(handle, kind, payload)
        else:
            self._emit_lines(handle.rank, what, self._splitters[(handle.rank, what)].feed(data))
        return "data"

    def _drain_fd(self, handle: WorkerHandle, what: str, fd: int) -> None:
        while self._read(handle, what, fd) == "data":
            pass

    def _unregister(self, fd: int) -> None:
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def _emit_lines(self, rank: int, stream: str, lines: list, activity: bool = True) -> None:
        if lines and activity and self.stall is not None:
            self.stall.active(rank, self.clock())
        if lines:
            self.state.apply(Output(rank, stream, tuple(lines), self.clock()))
            self.view.output(rank, stream, lines)

    def _on_message(self, handle: WorkerHandle, kind: str, payload: Any) -> None:
        now = self.clock()
        if self.stall is not None:
            self.stall.active(handle.rank, now, ready=kind == ch.READY)
        if kind == ch.HEARTBEAT:
            return
        if kind == ch.READY:
            self.state.apply(Ready(handle.rank, now))
        elif kind == ch.METRICS:
            self.state.apply(Metrics(handle.rank, payload.get("step"), payload["values"], now))
        elif kind == ch.PROGRESS:
            self.state.apply(Progress(handle.rank, payload["n"], payload.get("total"),
                                      payload.get("desc"), payload.get("depth", 0), now))
        elif kind == ch.RESULT:
            if payload.get("value") is not None:
                self.outcome.results[handle.rank] = (payload["value"], payload["pickler"])
            else:
                self.outcome.results.setdefault(handle.rank, None)
        elif kind == ch.ERROR:
            self._errors[handle.rank] = payload
            self._record_failure(handle, exitcode=None)

    # ------------------------------------------------------------- exits and failures
    def _on_exit(self, handle: WorkerHandle, sentinel: int) -> None:
        self._unregister(sentinel)
        signal_workers([handle], signal.SIGKILL)  # what it left behind, while its pid is still reserved
        handle.process.join(timeout=1)
        code = handle.poll()
        if code is None:
            return
        self._drain_fd(handle, "events", handle.fds.events)  # its last words are in the pipe
        self.state.apply(Exited(handle.rank, code, self.clock()))
        if code != 0 or handle.rank not in self.outcome.results:
            self._record_failure(handle, exitcode=code)

    def _record_failure(self, handle: WorkerHandle, exitcode: Optional[int]) -> None:
        now = self.clock()
        failure = self._failures.get(handle.rank)
        if failure is None:
            failure = self._failures[handle.rank] = Failure(rank=handle.rank, pid=handle.pid, timestamp=now)
        if exitcode is not None:
            failure.exitcode = exitcode
            if exitcode == 0 and not failure.message:
                failure.message = "the worker exited before its function returned (os._exit(0)?)"
        error = self._errors.get(handle.rank)
        if error is not None:
            failure.message = error["message"]
            failure.traceback = error["traceback"]
            failure.exc_type = error["exc_type"]
            failure.secondary = error["secondary"]
            failure.timestamp = error["t"]
            failure.exception = _unpickle_exception(error.get("exception"))
        self._failure_seen(failure, now)

    def _failure_seen(self, failure: Failure, now: float) -> None:
        """A real failure decides the run almost at once; a "lost my peer" error waits a
        moment longer for the failure that caused it."""
        decide_at = now + (FAILURE_WINDOW if failure.secondary else PRIMARY_WINDOW)
        self._decide_at = decide_at if self._decide_at is None else min(self._decide_at, decide_at)

    def _check_stalls(self) -> None:
        live = {h.rank: h for h in self.handles if h.exitcode is None}
        stuck = self.stall.stuck(self.clock(), set(live))
        if not stuck or self._decide_at is not None:
            return
        stacks = {rank: self.stall.dump(rank, live[rank].pid) for rank in stuck}
        report = self.stall.describe(stuck, stacks)
        if self.stall.on_stall == "raise":
            rank = likely_culprit(stuck, stacks)
            failure = self._failures[rank] = Failure(
                rank=rank, pid=live[rank].pid, timestamp=self.clock(), traceback=report,
                message=f"no progress for {self.stall.timeout:g}s (stall_timeout) on "
                        + ", ".join(f"rank {r}" for r in stuck) + "; their stacks show where",
            )
            self._failure_seen(failure, failure.timestamp)
        else:
            for rank in stuck:
                header = f"no progress for {self.stall.timeout:g}s (stall_timeout); its stacks, most recent call first:"
                self._emit_lines(rank, "stderr", [header, *stacks[rank].splitlines()], activity=False)

    def _drain(self) -> None:
        """Collect what exited workers left in their pipes (their last output lines)."""
        for h in self.handles:
            for what, fd in (("stdout", h.fds.stdout), ("stderr", h.fds.stderr), ("events", h.fds.events)):
                if fd in self._selector.get_map() and h.exitcode is not None:
                    self._drain_fd(h, what, fd)
        for (rank, stream), splitter in self._splitters.items():
            self._emit_lines(rank, stream, splitter.flush())

    def _conclude(self) -> None:
        failures = list(self._failures.values())
        missing = [r for r in self.expect_result if r not in self.outcome.results]
        if not failures and missing:
            handle = next(h for h in self.handles if h.rank == missing[0])
            failures = [Failure(rank=handle.rank, pid=handle.pid, exitcode=handle.exitcode,
                                message="the worker ended without sending its result", timestamp=self.clock())]
        if failures:
            self.outcome.failures = failures
            self.outcome.root = pick_root_cause(failures)


def likely_culprit(stuck: list, stacks: dict) -> int:
    """Among stuck ranks, the one NOT waiting inside a torch.distributed call is the one
    the others wait for (e.g. it never joined the collective)."""
    for rank in stuck:
        current = stacks[rank].split("Current thread", 1)[-1]
        first_frame = next((line for line in current.splitlines() if 'File "' in line), "")
        if "torch/distributed" not in first_frame:
            return rank
    return stuck[0]


def pick_root_cause(failures: list) -> Failure:
    """The failure that caused the others: real errors before "lost my peer" errors, then earliest."""
    return min(failures, key=lambda f: (f.secondary, f.timestamp, f.rank))


def _unpickle_exception(blob: Optional[bytes]) -> Optional[BaseException]:
    if not blob:
        return None
    import pickle

    try:
        exc = pickle.loads(blob)
    except Exception:
        return None
    return exc if isinstance(exc, BaseException) else None


class StallWatch:
    """When did each rank last show signs of life, and which ranks have gone quiet.

    Signs of life: any message (report, progress, heartbeat) or output line. A rank is
    reported once per quiet period; activity re-arms it.
    """

    def __init__(self, timeout: float, on_stall: str, dump) -> None:
        self.timeout = timeout
        self.on_stall = on_stall
        self.dump = dump                  # dump(rank, pid) -> stack text
        self._last: dict[int, float] = {}
        self._reported: set = set()

    def active(self, rank: int, now: float, ready: bool = False) -> None:
        if ready or rank in self._last:
            self._last[rank] = now
            self._reported.discard(rank)

    def stuck(self, now: float, live: set) -> list:
        quiet = [r for r, t in self._last.items()
                 if r in live and r not in self._reported and now - t >= self.timeout]
        self._reported.update(quiet)
        return sorted(quiet)

    @staticmethod
    def describe(stuck: list, stacks: dict) -> str:
        parts = [f"--- rank {rank}: Python stacks (most recent call first) ---\n{stacks[rank]}" for rank in stuck]
        return "\n".join(parts)
