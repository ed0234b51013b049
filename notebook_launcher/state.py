"""The run state: plain data, changed only by `RunState.apply(event)`.

The supervisor turns what arrives from worker pipes into the events below; views read
the state and render it. Tests drive the state with hand-made events: no processes,
no widgets.

Memory is bounded whatever the run's length: metric series are downsampled in place
(`Series`), the log keeps the last `LOG_LINES` lines, and progress keeps a short window
of samples for its rate.
"""

from __future__ import annotations

import collections
import enum
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from . import channel as ch
from .errors import Failure


# ----------------------------------------------------------------- statuses
class Status(str, enum.Enum):
    """A status that is also its plain string ("running" == RunStatus.RUNNING), so views
    and messages can print it as is."""

    __str__ = str.__str__
    __format__ = str.__format__


class RunStatus(Status):
    """Where one call (a launch attempt, a ``session.run``, a ``%%dist`` cell) is::

        STARTING --first rank ready--> RUNNING --+--> SUCCEEDED    every rank finished the task
                                                 +--> FAILED       a rank raised, died or stalled (on_stall="raise")
                                                 +--> INTERRUPTED  the person pressed Interrupt
                                                 +--> STOPPED      `Run.stop` / a stop request
    The last four are final.
    """

    STARTING = "starting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    STOPPED = "stopped"

    @property
    def final(self) -> bool:
        return self not in (RunStatus.STARTING, RunStatus.RUNNING)


class RankStatus(Status):
    """One rank during a call::

        STARTING --ready--> RUNNING --task returned--> DONE
                              |  ^---any sign of life---+
                              +--no sign of life for stall_timeout--> STUCK
        any live state --task raised or process died--> FAILED
        any live state --the call ended without it--> STOPPED
    """

    STARTING = "starting"
    RUNNING = "running"
    STUCK = "stuck"
    DONE = "done"
    FAILED = "failed"
    STOPPED = "stopped"


_LIVE_RANK = (RankStatus.STARTING, RankStatus.RUNNING, RankStatus.STUCK)


# ----------------------------------------------------------------- events
@dataclass(frozen=True)
class Started:
    t: float
    pids: dict  # rank -> pid


@dataclass(frozen=True)
class Received:
    """A message from a rank (`channel`'s worker-to-parent messages: `RankReady`,
    `Report`, `ProgressUpdate`, `Heartbeat`, `TaskDone`, `TaskFailed`), as the notebook
    received it at ``t`` (its own clock). The messages are the one hierarchy of what ranks
    say; the other events here are what the notebook itself observes."""

    rank: int
    message: Any
    t: float


@dataclass(frozen=True)
class Stalled:
    """No sign of life from the rank for ``seconds``; ``stacks`` show where it is."""

    rank: int
    seconds: float
    stacks: str
    t: float


@dataclass(frozen=True)
class Output:
    rank: int
    stream: str  # "stdout" | "stderr"
    lines: tuple
    t: float


@dataclass(frozen=True)
class Exited:
    rank: int
    exitcode: int
    t: float


@dataclass(frozen=True)
class GpuUsage:
    """One GPU as NVML saw it (`gpu.GpuFeed`, in the notebook process)."""

    index: int              # NVML's index (the machine's numbering)
    name: str
    used: int               # bytes of its memory in use, by every process
    total: int              # bytes
    utilization: Optional[int]  # percent of the last sample period a kernel ran; None: unknown


@dataclass(frozen=True)
class GpuSampled:
    """What NVML said about the GPUs of this machine at ``t``: a `GpuUsage` each."""

    gpus: tuple
    t: float


@dataclass(frozen=True)
class Finished:
    status: RunStatus  # a final one
    t: float
    failure: Optional[Failure] = None


Event = Union[Started, Received, Stalled, Output, Exited, Finished, GpuSampled]

# ----------------------------------------------------------------- limits
MAX_POINTS = 2_000    # points kept per metric series; older ones are merged pairwise
LOG_LINES = 200       # output lines kept for the log panel
LOG_LINE_CHARS = 2_000  # a longer line is cut in the log (the worker's own output is untouched)
RATE_WINDOW = 10.0    # seconds of progress samples the rate is measured over
RATE_SAMPLE = 0.2     # at most one rate sample per this many seconds



# ----------------------------------------------------------------- parts
@dataclass
class Series:
    """One metric's history, bounded: when full, neighbouring points are averaged in pairs.

    ``steps[i]`` is the last step that point ``i`` stands for; ``stride`` reported values
    make one kept point. ``last``, ``low``, ``high`` and ``count`` cover every reported
    value, downsampled or not.

    Example::

        s = Series()
        for step in range(10_000):
            s.add(step, 1 / (step + 1))
        len(s.steps) <= MAX_POINTS, s.count, s.last   # True, 10000, 0.0001
    """

    steps: list = field(default_factory=list)
    values: list = field(default_factory=list)
    stride: int = 1        # how many reported points each kept point stands for
    count: int = 0
    last: float = math.nan
    low: float = math.inf
    high: float = -math.inf
    _pending: list = field(default_factory=list)

    def add(self, step: float, value: float) -> None:
        self.count += 1
        self.last = value
        if math.isfinite(value):
            self.low = min(self.low, value)
            self.high = max(self.high, value)
        self._pending.append((step, value))
        if len(self._pending) < self.stride:
            return
        steps, values = zip(*self._pending)
        self._pending = []
        self.steps.append(steps[-1])
        self.values.append(_mean(values))
        if len(self.steps) >= MAX_POINTS:
            self._halve()

    def points(self) -> tuple[list, list]:
        """Kept points plus the partial one still being merged (so the curve reaches the last step)."""
        if not self._pending:
            return self.steps, self.values
        steps, values = zip(*self._pending)
        return self.steps + [steps[-1]], self.values + [_mean(values)]

    def _halve(self) -> None:
        self.steps = self.steps[1::2]
        self.values = [_mean(pair) for pair in zip(self.values[0::2], self.values[1::2])]
        self.stride *= 2


def _mean(values) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


@dataclass
class RankState:
    rank: int
    status: RankStatus = RankStatus.STARTING
    pid: Optional[int] = None
    step: Optional[int] = None  # last step it reported (or its outer progress position)
    last_seen: Optional[float] = None
    exitcode: Optional[int] = None
    position: dict = field(default_factory=dict)  # progress depth -> (n, total)
    device_stats: Optional[Any] = None           # its last `channel.DeviceStats` (CUDA memory, fp16 scaler)


@dataclass
class ProgressState:
    """One progress bar (one nesting level of rank 0's `progress()` loops).

    The rate is the items done per second over at least the last `RATE_WINDOW` seconds,
    so it follows a loop that speeds up or slows down; ETA is what is left at that rate.
    An inner loop starts over every epoch (21 batches may take 50 ms): each start is a
    `restart` of the same bar, which keeps its samples, so the rate is measured across
    epochs instead of over the few milliseconds of one of them.

    Example::

        bar = ProgressState(total=21, desc="batch", started_at=0.0)
        for epoch in range(10):          # 21 batches in 0.05 s, 0.01 s between epochs
            t = epoch * 0.06
            if epoch:
                bar.restart(t)
            bar.update(0, t)
            bar.update(21, t + 0.05)
        round(bar.rate)                  # 356: 210 batches in 0.59 s
    """

    # Times are the rank's own (when it stepped), so a quick loop (30 steps in 0.3 s)
    # still gets its rate; none from a span of a few microseconds, though.
    MIN_SPAN = 0.05
    # A pause between two runs of a bar longer than this (an evaluation between epochs)
    # is left out of the rate.
    LONG_PAUSE = 0.5

    n: int = 0
    total: Optional[int] = None
    desc: Optional[str] = None
    started_at: Optional[float] = None   # when this run of the bar started
    updated_at: Optional[float] = None
    depth: int = 0
    done_before: int = 0                 # items done in earlier runs
    paused: float = 0.0                  # seconds of pauses between runs left out of the rate
    samples: collections.deque = field(default_factory=lambda: collections.deque(maxlen=64))

    def update(self, n: int, t: float) -> None:
        self.n, self.updated_at = n, t
        point = self._point()
        if not self.samples or point[0] - self.samples[-1][0] >= RATE_SAMPLE:
            self.samples.append(point)  # the rate runs from an old sample to the newest point

    def restart(self, t: float) -> None:
        """The same loop starts over (the next epoch's batches): the rate's samples stay."""
        if self.updated_at is not None and t - self.updated_at > self.LONG_PAUSE:
            self.paused += t - self.updated_at
        self.done_before += self.n
        self.n, self.started_at, self.updated_at = 0, t, t

    def _point(self) -> tuple:
        """(the bar's own clock, items done in every run so far)."""
        return (self.updated_at - self.paused, self.done_before + self.n)

    @property
    def fraction(self) -> Optional[float]:
        if not self.total:
            return None
        return min(1.0, self.n / self.total)

    @property
    def rate(self) -> Optional[float]:
        """Items per second since the newest sample at least `RATE_WINDOW` old (or the
        oldest one); None over less than `MIN_SPAN` seconds or when nothing moved."""
        if self.updated_at is None or not self.samples:
            return None
        samples = tuple(self.samples)  # one atomic copy: views read the state from other threads
        now, done = self._point()
        then, done_then = samples[0]
        for t, n in samples:
            if t > now - RATE_WINDOW:
                break
            then, done_then = t, n
        if now - then < self.MIN_SPAN or done <= done_then:
            return None
        return (done - done_then) / (now - then)

    @property
    def eta(self) -> Optional[float]:
        rate = self.rate
        if not rate or self.total is None:
            return None
        return max(0.0, (self.total - self.n) / rate)


# ----------------------------------------------------------------- the state
@dataclass
class RunState:
    world_size: int
    local_ranks: list
    backend: str = ""
    device: str = ""
    start_method: str = ""
    attempt: int = 0
    status: RunStatus = RunStatus.STARTING
    started_at: Optional[float] = None
    ended_at: Optional[float] = None
    now: Optional[float] = None
    ranks: dict = field(default_factory=dict)
    series: dict = field(default_factory=dict)         # metric name -> Series (lead rank)
    latest: dict = field(default_factory=dict)         # metric name -> last value (lead rank)
    progress: dict = field(default_factory=dict)       # depth -> ProgressState (lead rank)
    log: collections.deque = field(default_factory=lambda: collections.deque(maxlen=LOG_LINES))
    lines_seen: int = 0
    reports_seen: int = 0
    last_step: Optional[int] = None                    # lead rank's last metric step
    failure: Optional[Failure] = None
    stalls: dict = field(default_factory=dict)         # rank -> stacks of its last stall
    version: int = 0                                   # bumped on every change; views compare it
    metrics_version: int = 0                           # bumped when a series changes
    log_version: int = 0                               # bumped when lines arrive
    progress_version: int = 0                          # bumped when a bar moves
    gpus: tuple = ()                                   # GpuUsage of the GPUs shown, last NVML sample
    loss_scale: Optional[float] = None                 # lead rank's fp16 GradScaler scale
    skipped_steps: Optional[int] = None                # ...and the optimizer steps it skipped
    devices_version: int = 0                           # bumped when GPU or device facts change

    def __post_init__(self) -> None:
        for rank in self.local_ranks:
            self.ranks.setdefault(rank, RankState(rank))

    @property
    def lead(self) -> int:
        """The rank whose metrics and progress are shown: rank 0, or this node's first rank."""
        return min(self.local_ranks) if self.local_ranks else 0

    @property
    def finished(self) -> bool:
        return RunStatus(self.status).final

    @property
    def elapsed(self) -> float:
        if self.started_at is None:
            return 0.0
        end = self.ended_at if self.ended_at is not None else (self.now or self.started_at)
        return max(0.0, end - self.started_at)

    @property
    def main_progress(self) -> Optional[ProgressState]:
        return self.progress.get(min(self.progress)) if self.progress else None

    def bars(self) -> list:
        """Progress bars, outermost first."""
        progress = dict(self.progress)  # one atomic copy: a Run's state is read from other threads
        return [progress[depth] for depth in sorted(progress)]

    def overall(self) -> tuple[Optional[float], Optional[float]]:
        """(fraction done, seconds left) of the whole run, from the nested bars.

        With epochs outside and batches inside, 2 of 3 epochs done plus half of the third
        is 5/6; the ETA scales the time the outer loop has taken by what is left (both on
        the lead rank's clock, as the bars are).
        """
        bars = self.bars()
        if not bars or not bars[0].total:
            return None, None
        outer = bars[0]
        done = float(outer.n)
        if len(bars) > 1 and bars[1].fraction is not None and outer.n < outer.total:
            done += bars[1].fraction
        fraction = min(1.0, done / outer.total)
        if len(bars) == 1:
            return fraction, outer.eta
        spent = max(bar.updated_at or 0.0 for bar in bars) - (outer.started_at or 0.0)
        if fraction <= 0 or spent <= 0:
            return fraction, None
        return fraction, spent * (1 - fraction) / fraction

    # ------------------------------------------------------------- events
    def apply(self, event: Event) -> None:
        self.version += 1
        self.now = max(self.now or event.t, event.t)
        handler = getattr(self, "_on_" + type(event).__name__.lower())
        handler(event)

    def _seen(self, rank: int, t: float) -> RankState:
        """Any sign of life: "last seen" moves, and a rank marked stuck is running again."""
        state = self.ranks.setdefault(rank, RankState(rank))
        state.last_seen = t
        if state.status == RankStatus.STUCK:
            state.status = RankStatus.RUNNING
        return state

    def _on_started(self, event: Started) -> None:
        self.started_at = event.t
        for rank, pid in event.pids.items():
            self._seen(rank, event.t).pid = pid

    def _on_received(self, event: Received) -> None:
        message = event.message
        if isinstance(message, ch.RankReady):
            self._ready(event.rank, event.t)
        elif isinstance(message, ch.Heartbeat):
            self._seen(event.rank, event.t)
        elif isinstance(message, ch.Report):
            self._metrics(event.rank, message, event.t)
        elif isinstance(message, ch.ProgressUpdate):
            self._progress(event.rank, message, event.t)
        elif isinstance(message, (ch.TaskDone, ch.TaskFailed)):
            self._task_ended(event.rank, isinstance(message, ch.TaskDone), event.t)
        elif isinstance(message, ch.DeviceStats):
            self._device_stats(event.rank, message)

    def _device_stats(self, rank: int, stats: ch.DeviceStats) -> None:
        """Not a sign of life: the rank's own thread posts these, whatever its main thread does."""
        self.ranks.setdefault(rank, RankState(rank)).device_stats = stats
        if rank == self.lead and stats.loss_scale is not None:
            self.loss_scale, self.skipped_steps = stats.loss_scale, stats.skipped_steps
        self.devices_version += 1

    def _on_gpusampled(self, event: GpuSampled) -> None:
        self.gpus = tuple(event.gpus)
        self.devices_version += 1

    def _ready(self, rank: int, t: float) -> None:
        state = self._seen(rank, t)
        if state.status == RankStatus.STARTING:
            state.status = RankStatus.RUNNING
        if self.status == RunStatus.STARTING:
            self.status = RunStatus.RUNNING

    def _on_stalled(self, event: Stalled) -> None:
        state = self.ranks.setdefault(event.rank, RankState(event.rank))
        if state.status in _LIVE_RANK:
            state.status = RankStatus.STUCK
        self.stalls[event.rank] = event.stacks
        header = f"no progress for {event.seconds:g}s (stall_timeout); its stacks, most recent call first:"
        for line in [header, *event.stacks.splitlines()][-LOG_LINES:]:
            self.log.append((event.rank, "stderr", line))
        self.log_version += 1

    def _task_ended(self, rank: int, ok: bool, t: float) -> None:
        state = self.ranks.setdefault(rank, RankState(rank))
        state.last_seen = t
        state.status = RankStatus.DONE if ok else RankStatus.FAILED

    def _metrics(self, rank: int, report: ch.Report, t: float) -> None:
        state = self._seen(rank, t)
        if report.step is not None:
            state.step = report.step
        if rank != self.lead or not report.values:
            return
        # A report without a step comes one after the previous one.
        step = report.step if report.step is not None else (-1 if self.last_step is None else self.last_step) + 1
        self.last_step = step
        self.reports_seen += 1
        for name, value in report.values.items():
            value = float(value)
            self.series.setdefault(name, Series()).add(step, value)
            self.latest[name] = value
        self.metrics_version += 1

    def _progress(self, rank: int, update: ch.ProgressUpdate, t: float) -> None:
        state = self._seen(rank, t)
        state.position[update.depth] = (update.n, update.total)
        for depth in [d for d in state.position if d > update.depth]:
            if update.n == 0:  # an outer loop restarted: inner positions are stale
                del state.position[depth]
        if rank != self.lead:
            return
        # Bars run on the lead rank's own clock (when it stepped): a busy notebook may read
        # a second's worth of steps at once, and other machines' clocks are never mixed in.
        when = update.t
        bar = self.progress.get(update.depth)
        if bar is None or update.n < bar.n or bar.desc != update.desc or bar.total != update.total:
            if bar is not None and bar.desc == update.desc and bar.total == update.total:
                bar.restart(when)  # the same loop again (the next epoch's batches): its rate goes on
            else:
                bar = self.progress[update.depth] = ProgressState(
                    total=update.total, desc=update.desc, started_at=when, depth=update.depth
                )
            for depth in [d for d in self.progress if d > update.depth]:
                del self.progress[depth]  # bars nested in a restarted one start over
        bar.update(update.n, when)
        self.progress_version += 1

    def _on_output(self, event: Output) -> None:
        self._seen(event.rank, event.t)
        self.lines_seen += len(event.lines)
        for line in event.lines[-LOG_LINES:]:
            if len(line) > LOG_LINE_CHARS:
                line = line[:LOG_LINE_CHARS] + f" ... [{len(line) - LOG_LINE_CHARS} more characters]"
            self.log.append((event.rank, event.stream, line))
        self.log_version += 1

    def _on_exited(self, event: Exited) -> None:
        state = self.ranks.setdefault(event.rank, RankState(event.rank))
        state.exitcode = event.exitcode
        if event.exitcode != 0:
            state.status = RankStatus.FAILED
        elif state.status in _LIVE_RANK:
            state.status = RankStatus.DONE

    def _on_finished(self, event: Finished) -> None:
        self.status = RunStatus(event.status)
        self.ended_at = event.t
        self.failure = event.failure
        if event.failure is not None:
            self.ranks.setdefault(event.failure.rank, RankState(event.failure.rank)).status = RankStatus.FAILED
        for state in self.ranks.values():
            if state.status in _LIVE_RANK:
                state.status = RankStatus.STOPPED


# ----------------------------------------------------------------- text helpers
def summary_line(state: RunState) -> str:
    """One line that says how the run ended (or where it is)."""
    text = f"{state.status}: {state.world_size} process{'es' if state.world_size != 1 else ''}"
    if state.elapsed:
        text += f" in {format_duration(state.elapsed)}"
    if state.latest:
        text += " | " + ", ".join(f"{k}={format_value(v)}" for k, v in list(state.latest.items())[:4])
    if state.failure is not None:
        text += f" | rank {state.failure.rank}: {state.failure.summary()}"
    return text


def format_value(value: Any) -> str:
    """Compact number: 4 significant digits, ints as they are."""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    return str(value)


def format_duration(seconds: Optional[float]) -> str:
    """``4.2s``, ``1:07``, ``12:34``, ``1:02:03``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    if seconds < 59.95:
        return f"{seconds:.1f}s"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_rate(rate: Optional[float]) -> str:
    """``2,150 it/s``, ``12.3 it/s`` or ``4.2 s/it`` for slow loops."""
    if not rate:
        return "? it/s"
    if rate >= 100:
        return f"{rate:,.0f} it/s"
    if rate >= 1:
        return f"{rate:.3g} it/s"
    return f"{1 / rate:.3g} s/it"
