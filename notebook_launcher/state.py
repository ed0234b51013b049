"""The run state: plain data, changed only by `RunState.apply(event)`.

The supervisor turns what arrives from worker pipes into the events below; views read
the state and render it. Tests drive the state with hand-made events: no processes,
no widgets.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .errors import Failure

# ----------------------------------------------------------------- events
@dataclass(frozen=True)
class Started:
    t: float
    pids: dict  # rank -> pid


@dataclass(frozen=True)
class Ready:
    rank: int
    t: float


@dataclass(frozen=True)
class Metrics:
    rank: int
    step: Optional[int]
    values: dict  # name -> float
    t: float


@dataclass(frozen=True)
class Progress:
    rank: int
    n: int
    total: Optional[int]
    desc: Optional[str]
    depth: int
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
class Finished:
    status: str  # "succeeded" | "failed" | "interrupted"
    t: float
    failure: Optional[Failure] = None


Event = Union[Started, Ready, Metrics, Progress, Output, Exited, Finished]

# ----------------------------------------------------------------- state
MAX_POINTS = 2_000    # points kept per metric series; older ones are merged pairwise
LOG_LINES = 200       # output lines kept for the log panel


@dataclass
class Series:
    """One metric's history, bounded: when full, neighbouring points are averaged in pairs."""

    steps: list = field(default_factory=list)
    values: list = field(default_factory=list)
    stride: int = 1        # how many reported points each kept point stands for
    _pending: list = field(default_factory=list)

    def add(self, step: float, value: float) -> None:
        self._pending.append((step, value))
        if len(self._pending) < self.stride:
            return
        steps, values = zip(*self._pending)
        self._pending = []
        self.steps.append(steps[-1])
        self.values.append(_mean(values))
        if len(self.steps) >= MAX_POINTS:
            self._halve()

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
    status: str = "starting"   # starting | running | done | failed | stopped
    pid: Optional[int] = None
    step: Optional[int] = None
    last_seen: Optional[float] = None
    exitcode: Optional[int] = None


@dataclass
class ProgressState:
    n: int = 0
    total: Optional[int] = None
    desc: Optional[str] = None
    started_at: Optional[float] = None
    updated_at: Optional[float] = None
    depth: int = 0

    @property
    def rate(self) -> Optional[float]:
        if self.started_at is None or self.updated_at is None or self.updated_at <= self.started_at:
            return None
        return self.n / (self.updated_at - self.started_at)

    @property
    def eta(self) -> Optional[float]:
        rate = self.rate
        if not rate or self.total is None:
            return None
        return max(0.0, (self.total - self.n) / rate)


@dataclass
class RunState:
    world_size: int
    local_ranks: list
    backend: str = ""
    device: str = ""
    start_method: str = ""
    attempt: int = 0
    status: str = "starting"   # starting | running | succeeded | failed | interrupted
    started_at: Optional[float] = None
    ended_at: Optional[float] = None
    now: Optional[float] = None
    ranks: dict = field(default_factory=dict)
    series: dict = field(default_factory=dict)         # metric name -> Series (rank 0)
    latest: dict = field(default_factory=dict)         # metric name -> last value (rank 0)
    progress: dict = field(default_factory=dict)       # depth -> ProgressState (rank 0)
    log: collections.deque = field(default_factory=lambda: collections.deque(maxlen=LOG_LINES))
    lines_seen: int = 0
    failure: Optional[Failure] = None
    version: int = 0                                   # bumped on every change; views compare it

    def __post_init__(self) -> None:
        for rank in self.local_ranks:
            self.ranks.setdefault(rank, RankState(rank))

    @property
    def elapsed(self) -> float:
        if self.started_at is None:
            return 0.0
        end = self.ended_at if self.ended_at is not None else (self.now or self.started_at)
        return max(0.0, end - self.started_at)

    @property
    def main_progress(self) -> Optional[ProgressState]:
        return self.progress.get(min(self.progress)) if self.progress else None

    def apply(self, event: Event) -> None:
        self.version += 1
        self.now = max(self.now or event.t, event.t)
        handler = getattr(self, "_on_" + type(event).__name__.lower())
        handler(event)

    def _seen(self, rank: int, t: float) -> RankState:
        state = self.ranks.setdefault(rank, RankState(rank))
        state.last_seen = t
        return state

    def _on_started(self, event: Started) -> None:
        self.started_at = event.t
        for rank, pid in event.pids.items():
            self._seen(rank, event.t).pid = pid

    def _on_ready(self, event: Ready) -> None:
        self._seen(event.rank, event.t).status = "running"
        if self.status == "starting":
            self.status = "running"

    def _on_metrics(self, event: Metrics) -> None:
        state = self._seen(event.rank, event.t)
        if event.step is not None:
            state.step = event.step
        if event.rank != 0:
            return
        step = event.step if event.step is not None else self._next_step()
        for name, value in event.values.items():
            self.series.setdefault(name, Series()).add(step, float(value))
            self.latest[name] = float(value)

    def _next_step(self) -> int:
        lengths = [s.steps[-1] + 1 for s in self.series.values() if s.steps]
        return max(lengths, default=0)

    def _on_progress(self, event: Progress) -> None:
        state = self._seen(event.rank, event.t)
        if event.depth == 0:
            state.step = event.n
        if event.rank != 0:
            return
        bar = self.progress.get(event.depth)
        if bar is None or event.n < bar.n or bar.desc != event.desc or bar.total != event.total:
            bar = self.progress[event.depth] = ProgressState(
                total=event.total, desc=event.desc, started_at=event.t, depth=event.depth
            )
        bar.n, bar.updated_at = event.n, event.t

    def _on_output(self, event: Output) -> None:
        self._seen(event.rank, event.t)
        self.lines_seen += len(event.lines)
        for line in event.lines:
            self.log.append((event.rank, event.stream, line))

    def _on_exited(self, event: Exited) -> None:
        state = self.ranks.setdefault(event.rank, RankState(event.rank))
        state.exitcode = event.exitcode
        if state.status not in ("failed",):
            state.status = "done" if event.exitcode == 0 else "failed"

    def _on_finished(self, event: Finished) -> None:
        self.status = event.status
        self.ended_at = event.t
        self.failure = event.failure
        if event.failure is not None:
            self.ranks.setdefault(event.failure.rank, RankState(event.failure.rank)).status = "failed"
        for state in self.ranks.values():
            if state.status in ("starting", "running"):
                state.status = "stopped"


def summary_line(state: RunState) -> str:
    """One line that says how the run ended (or where it is)."""
    text = f"{state.status}: {state.world_size} process{'es' if state.world_size != 1 else ''}"
    if state.elapsed:
        text += f" in {state.elapsed:.1f}s"
    if state.latest:
        text += " | " + ", ".join(f"{k}={_fmt(v)}" for k, v in list(state.latest.items())[:4])
    if state.failure is not None:
        text += f" | rank {state.failure.rank}: {state.failure.summary()}"
    return text


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
