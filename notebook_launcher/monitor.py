"""The parent's event loop for one call: one selector over every rank's pipes and
process sentinel.

A call is one task on a set of ranks (a launch attempt's function, a ``session.run``,
a ``%%dist`` cell). It ends when every rank sent the result or the error of THAT task
(messages carry a task id; a late message of an earlier task is ignored), or when a
failure decides it: in a one-shot launch a real failure decides at once (after
`PRIMARY_WINDOW`, to catch ranks failing at the same moment); in a session the other
ranks may finish the task too, so that the session survives a user error, as long as
they show signs of life (a rank silent for `PEER_GRACE` is stuck).

The loop decodes messages into `RunState` events, forwards output lines to the view,
notes failures and picks the root cause. It never stops processes; its caller (the
session) does, in one place.
"""

from __future__ import annotations

import os
import selectors
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from . import channel as ch
from .errors import Failure, WorkerError, failure_from
from .state import (Exited, Heartbeat, Metrics, Output, Progress, Ready, RunState, Stalled, Started,
                    TaskEnded)
from .ui.base import View
from .workers.frames import waiting_in_the_launcher
from .workers.processes import WorkerHandle, signal_workers

TICK = 0.1                  # seconds between view refreshes when nothing arrives
FAILURE_WINDOW = 0.25       # after a "lost my peer" failure, how long to listen for the real one
PRIMARY_WINDOW = 0.05       # after a real failure: collect ranks failing at the same moment
PEER_GRACE = 2.5            # session, after a failure: a rank silent this long (heartbeats come every 1 s
#                             while its stack moves) counts as stuck
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


class RankIO:
    """The parent's side of one rank's pipes, kept for the life of the rank: a frame or
    a line cut in two by one call is completed in the next."""

    def __init__(self, handle: WorkerHandle) -> None:
        self.handle = handle
        self.rank = handle.rank
        self.decoder = ch.FrameDecoder()
        self.splitters = {"stdout": LineSplitter(), "stderr": LineSplitter()}
        self.ready = False

    def fds(self) -> dict:
        fds = self.handle.fds
        return {"events": fds.events, "stdout": fds.stdout, "stderr": fds.stderr}

    @staticmethod
    def read(fd: int) -> Optional[bytes]:
        """What one of its pipes holds now: bytes, ``b""`` at the end (or a closed fd),
        None when there is nothing yet."""
        try:
            return os.read(fd, 1 << 20)
        except BlockingIOError:
            return None
        except OSError:
            return b""


@dataclass
class Outcome:
    """How a call ended."""

    results: dict = field(default_factory=dict)   # rank -> (blob, pickler), or None (no value asked)
    root: Optional[Failure] = None
    failures: list = field(default_factory=list)  # every failure seen, root included
    unfinished: list = field(default_factory=list)  # ranks that neither returned nor raised
    died: list = field(default_factory=list)        # ranks whose process ended during the call
    stopped: bool = False                           # a stop request ended it

    def error(self, attempt: int = 0) -> "WorkerError":
        """The `WorkerError` for a call that failed (``root`` is set), chained to the
        rank's own exception when it could be rebuilt.

        Example::

            if outcome.root is not None:
                raise outcome.error()
        """
        error = WorkerError(self.root, [f for f in self.failures if f is not self.root], attempt=attempt)
        error.__cause__ = self.root.exception
        return error


class Supervisor:
    """Watches one call on ``ranks`` until it is decided.

    ``task_id`` 0 is a session's start: a rank has "finished" when it is ready.
    ``persistent``: the ranks are a session's and must outlive the call (so a process
    exit is a failure, and other ranks get `PEER_GRACE` after a failure).
    ``stop``: an Event another thread sets to end the call (``Run.stop``).
    ``sinks``: objects with ``on_message(rank, message)`` fed every message of this task
    that the state does not use (experiment trackers).
    """

    def __init__(self, ranks: list, state: RunState, view: View, task_id: int, *,
                 persistent: bool = False, tick: float = TICK, clock=time.monotonic,
                 stall: Optional["StallWatch"] = None, stop: Optional[threading.Event] = None,
                 sinks: tuple = ()) -> None:
        self.ranks = {io.rank: io for io in ranks}
        self.state = state
        self.view = view
        self.task_id = task_id
        self.persistent = persistent
        self.tick = tick
        self.clock = clock
        self.stall = stall
        self.stop = stop
        self.sinks = sinks
        self.outcome = Outcome()
        self.finished: set = set()
        self._failures: dict[int, Failure] = {}
        self._decide_at: Optional[float] = None      # set by the first failure
        self._heard: dict = {}                       # rank -> when it last showed a sign of life
        self._cpu: dict = {}                         # rank -> (CPU ticks used, when that last grew)
        self._selector = selectors.DefaultSelector()
        self._registered = False
        self._closed = False
        self._give_up_at: Optional[float] = None

    # ------------------------------------------------------------- main loop
    def run(self, timeout: Optional[float] = None) -> Outcome:
        """Block until the call is decided (or ``timeout`` seconds pass: then it ends as
        stopped). KeyboardInterrupt propagates to the caller, who may then `wind_down`
        (the selector stays open until `close`)."""
        self._register()
        now = self.clock()
        self._give_up_at = None if timeout is None else now + timeout
        self.state.apply(Started(now, {r: io.handle.pid for r, io in self.ranks.items()}))
        for io in self.ranks.values():
            if io.ready:
                self.state.apply(Ready(io.rank, now))
                if self.stall is not None:
                    self.stall.active(io.rank, now, ready=True)
        self.view.start(self.state)
        while not self._decided():
            self._pump(self._timeout())
            if self.stall is not None:
                self._check_stalls()
            self.view.refresh(self.state)
        return self.conclude()

    def wind_down(self, timeout: float) -> list:
        """After an Interrupt was forwarded: pump until every rank ended the task or
        ``timeout`` passes; returns the ranks that did not."""
        deadline = self.clock() + timeout
        self._register()
        while self._unfinished() and self.clock() < deadline:
            self._pump(max(0.0, min(self.tick, deadline - self.clock())))
        return sorted(self._unfinished())

    def close(self) -> None:
        """Take what is already in the pipes (last lines), then release the selector. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._drain()
        finally:
            self._selector.close()

    def _register(self) -> None:
        if self._registered:
            return
        self._registered = True
        for io in self.ranks.values():
            if io.handle.exitcode is not None:
                continue
            for what, fd in io.fds().items():
                if fd not in io.handle.closed:
                    self._selector.register(fd, selectors.EVENT_READ, (io, what))
            self._selector.register(io.handle.sentinel, selectors.EVENT_READ, (io, "exit"))

    def _timeout(self) -> float:
        if self._decide_at is None:
            return self.tick
        return max(0.0, min(self.tick, self._decide_at - self.clock()))

    def _pump(self, timeout: float) -> None:
        for key, _ in self._selector.select(timeout):
            io, what = key.data
            if what == "exit":
                self._on_exit(io, key.fd)
            else:
                self._read(io, what, key.fd)

    def _unfinished(self) -> set:
        return {r for r, io in self.ranks.items() if r not in self.finished and io.handle.exitcode is None}

    def _decided(self) -> bool:
        if not self._unfinished():
            return True
        if (self.stop is not None and self.stop.is_set()) or \
                (self._give_up_at is not None and self.clock() >= self._give_up_at):
            self.outcome.stopped = True
            return True
        if self._decide_at is None or self.clock() < self._decide_at:
            return False
        return not (self.persistent and self._others_alive())

    def _others_alive(self) -> bool:
        """Session: after a failure, a rank still working on the task is waited for; only
        ranks silent for `PEER_GRACE` (no message, no output line, no CPU time spent: stuck
        waiting in a collective the failed rank never joined) let the call end without them."""
        now = self.clock()
        for rank in self._unfinished():
            spent = _cpu_ticks(self.ranks[rank].handle.pid)
            if rank not in self._cpu:
                self._cpu[rank] = (spent, -1.0)          # the first look is a baseline, not a sign of life
            elif spent is not None and spent != self._cpu[rank][0]:
                self._cpu[rank] = (spent, now)
            if max(self._heard.get(rank, -1.0), self._cpu.get(rank, (None, -1.0))[1]) >= now - PEER_GRACE:
                return True
        return False

    # ------------------------------------------------------------- reading
    def _read(self, io: RankIO, what: str, fd: int) -> str:
        """Read what is available on ``fd``: returns "data", "empty" or "eof"."""
        data = io.read(fd)
        if data is None:
            return "empty"
        if not data:
            self._unregister(fd)
            if what != "events":
                self._emit_lines(io.rank, what, io.splitters[what].flush())
            return "eof"
        if what == "events":
            for envelope in io.decoder.feed(data):
                self._on_message(io, envelope)
        else:
            self._emit_lines(io.rank, what, io.splitters[what].feed(data))
        return "data"

    def _drain_fd(self, io: RankIO, what: str, fd: int) -> None:
        while self._read(io, what, fd) == "data":
            pass

    def _unregister(self, fd: int) -> None:
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def _emit_lines(self, rank: int, stream: str, lines: list) -> None:
        if not lines:
            return
        self._heard[rank] = self.clock()
        if self.stall is not None:
            self.stall.active(rank, self.clock())
        self.state.apply(Output(rank, stream, tuple(lines), self.clock()))
        self.view.output(rank, stream, lines)

    def _on_message(self, io: RankIO, envelope: ch.Envelope) -> None:
        now, message, rank = self.clock(), envelope.message, io.rank
        if isinstance(message, ch.RankReady):
            io.ready = True
        if envelope.task_id not in (0, self.task_id):
            return  # a late message of a task that already ended (e.g. after an Interrupt)
        self._heard[rank] = now
        if self.stall is not None:
            self.stall.active(rank, now, ready=isinstance(message, ch.RankReady))
        if isinstance(message, ch.Heartbeat):
            self.state.apply(Heartbeat(rank, now))
        elif isinstance(message, ch.RankReady):
            self.state.apply(Ready(rank, now))
            if self.task_id == 0:
                self.finished.add(rank)
        elif isinstance(message, ch.Report):
            self.state.apply(Metrics(rank, message.step, message.values, now))
        elif isinstance(message, ch.ProgressUpdate):
            self.state.apply(Progress(rank, message.n, message.total, message.desc, message.depth, now, sent=message.t))
        elif isinstance(message, ch.TaskDone):
            self.finished.add(rank)
            self.outcome.results[rank] = None if message.value is None else (message.value, message.pickler)
            self.state.apply(TaskEnded(rank, True, now))
        elif isinstance(message, ch.TaskFailed):
            self.finished.add(rank)
            self.state.apply(TaskEnded(rank, False, now))
            self._failure_seen(failure_from(rank, io.handle.pid, message), now)
        for sink in self.sinks:
            sink.on_message(rank, message)

    # ------------------------------------------------------------- exits and failures
    def _on_exit(self, io: RankIO, sentinel: int) -> None:
        self._unregister(sentinel)
        handle = io.handle
        signal_workers([handle], signal.SIGKILL)  # what it left behind, while its pid is still reserved
        handle.process.join(timeout=1)
        code = handle.poll()
        if code is None:
            return
        self._drain_fd(io, "events", handle.fds.events)  # its last words are in the pipe
        self.state.apply(Exited(io.rank, code, self.clock()))
        if self.persistent or io.rank not in self.finished:
            self.outcome.died.append(io.rank)
            self._process_ended(io, code)
        elif code != 0 and io.rank in self._failures:
            self._failures[io.rank].exitcode = code

    def _process_ended(self, io: RankIO, code: int) -> None:
        failure = self._failures.get(io.rank)
        if failure is not None:
            if failure.exitcode is None:
                failure.exitcode = code
            return
        message = ("the worker exited before its function returned (os._exit(0)?)" if code == 0 else "")
        self._failure_seen(Failure(rank=io.rank, pid=io.handle.pid, exitcode=code, message=message,
                                   timestamp=self.clock()), self.clock())

    def _failure_seen(self, failure: Failure, now: float) -> None:
        """A real failure decides a one-shot call almost at once; a "lost my peer" error
        waits a moment longer for the failure that caused it; a session's ranks get
        `PEER_GRACE` to end the task themselves."""
        self._failures.setdefault(failure.rank, failure)
        window = FAILURE_WINDOW if failure.secondary else PRIMARY_WINDOW
        if self.persistent:
            window = max(window, PEER_GRACE)
        decide_at = now + window
        self._decide_at = decide_at if self._decide_at is None else min(self._decide_at, decide_at)

    def _check_stalls(self) -> None:
        live = {r: io.handle for r, io in self.ranks.items() if r not in self.finished and io.handle.exitcode is None}
        stuck = self.stall.stuck(self.clock(), set(live))
        if not stuck or self._decide_at is not None:
            return
        stacks = {rank: self.stall.dump(rank, live[rank].pid) for rank in stuck}
        for rank in stuck:
            self.state.apply(Stalled(rank, self.stall.timeout, stacks[rank], self.clock()))
            self.view.stalled(rank, self.stall.timeout, stacks[rank])
        if self.stall.on_stall == "raise":
            rank = likely_culprit(stuck, stacks)
            failure = Failure(
                rank=rank, pid=live[rank].pid, timestamp=self.clock(), traceback=self.stall.describe(stuck, stacks),
                message=f"no progress for {self.stall.timeout:g}s (stall_timeout) on "
                        + ", ".join(f"rank {r}" for r in stuck) + "; their stacks show where",
            )
            self._failures[rank] = failure
            self._decide_at = self.clock()

    def _drain(self) -> None:
        """Collect what is already in the pipes (the last output lines of the call)."""
        registered = self._selector.get_map()
        for io in self.ranks.values():
            for what, fd in io.fds().items():
                if registered is not None and fd in registered:
                    self._drain_fd(io, what, fd)
            for stream, splitter in io.splitters.items():  # a task's partial last line is its own
                self._emit_lines(io.rank, stream, splitter.flush())

    def conclude(self) -> Outcome:
        failures = list(self._failures.values())
        self.outcome.unfinished = sorted(self._unfinished())
        if failures:
            self.outcome.failures = failures
            self.outcome.root = pick_root_cause(failures)
        return self.outcome


def _cpu_ticks(pid: int) -> Optional[int]:
    """CPU time a process's main thread has used (user + system, in clock ticks), or None
    off Linux. The main thread only: our heartbeat and channel threads tick along in any rank."""
    try:
        with open(f"/proc/{pid}/task/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        return int(fields[11]) + int(fields[12])   # utime, stime: fields 14 and 15 of proc(5)
    except (OSError, IndexError, ValueError):
        return None


def likely_culprit(stuck: list, stacks: dict) -> int:
    """Among stuck ranks, the one NOT waiting (inside a torch.distributed call, or in the
    launcher's own final barrier) is the one the others wait for (it never joined)."""
    for rank in stuck:
        current = stacks[rank].split("Current thread", 1)[-1]
        first_frame = next((line for line in current.splitlines() if 'File "' in line), "")
        if "torch/distributed" not in first_frame and not waiting_in_the_launcher(current):
            return rank
    return stuck[0]


def pick_root_cause(failures: list) -> Failure:
    """The failure that caused the others: real errors before "lost my peer" errors, then earliest."""
    return min(failures, key=lambda f: (f.secondary, f.timestamp, f.rank))


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
