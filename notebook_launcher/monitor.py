"""The notebook's event loop for one call: what arrives from the ranks, and when the call
is decided.

A call is one task on a set of ranks (a launch attempt's function, a ``session.run``, a
``%%dist`` cell). It ends when every rank sent the result or the error of THAT task
(messages carry a task id; a late message of an earlier task is ignored), or when a
failure decides it: in a one-shot launch a real failure decides at once (after
`PRIMARY_WINDOW`, to catch ranks failing at the same moment); in a session the other
ranks may finish the task too, so that the session survives a user error, as long as
they show signs of life (a rank silent for `PEER_GRACE` is stuck).

`Supervisor.run` is a loop of named steps over one wait (loky's manager thread is the
model): take what the rank group delivers (`ranks.base.RankGroup.wait`), feed it to the
run state, the view and the sinks, let the `Verdict` note finishes and failures, release
ranks stuck in a collective after a failure, look for stalls, refresh the view. It never
starts, signals or stops a process: the group's owner does (`calls`, `session`), and the
group does the I/O.

The ranks' collective journals (`workers.journal`, read through the group) explain what
the stacks alone leave open (`rollcall`): a stall report leads with one line per
collective in flight (who waits, who is missing and where), and a failed call's error
ends with those lines and any mismatch between ranks.

Releasing (a session's call only: the owner's ``release``): after a failure, ranks waiting
in a collective that a rank which left the task can never join (their journal says so),
or ranks silent for `PEER_GRACE`, are released by the owner aborting the process group on
every rank; they get `ABORT_GRACE` to end the task (their error reads "released: rank 1
failed"), and only those that do not are left unfinished (the owner breaks the session).

Clocks: a failure's time orders root causes (`pick_root_cause`). On one machine it is the
rank's own clock (ranks failing within microseconds of each other are told apart); across
machines it is the moment the failure reached the notebook, since the machines' clocks
are not comparable.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from typing import Callable

from . import channel as ch
from . import rollcall
from .errors import Failure, WorkerError, failure_from
from .ranks.base import Exit, Lines, Message, RankGroup
from .state import Exited, Output, Received, RunState, Stalled, Started
from .ui.base import View
from .workers import journal
from .workers.frames import waiting_in_the_launcher, whereabouts

TICK = 0.1                  # seconds between view refreshes when nothing arrives
FAILURE_WINDOW = 0.25       # after a "lost my peer" failure, how long to listen for the real one
PRIMARY_WINDOW = 0.05       # after a real failure: collect ranks failing at the same moment
HEARTBEAT_GRANULARITY = 0.5  # a working rank beats at least this often (`workers.heartbeat.INTERVAL`)
PEER_GRACE = 2.5            # session, after a failure: a rank silent this long (heartbeats come twice a
#                             second while it computes) counts as stuck
ABORT_GRACE = 1.0           # session: after the process group was aborted, how long released ranks may take to
#                             end the task (gloo releases them within milliseconds)
JOURNAL_LOOK = 0.1          # after a failure, seconds between looks at the journals of the ranks still in the task


@dataclass
class Outcome:
    """How a call ended."""

    results: dict = field(default_factory=dict)   # rank -> (blob, pickler), or None (no value asked)
    root: Optional[Failure] = None
    failures: list = field(default_factory=list)  # every failure seen, root included
    unfinished: list = field(default_factory=list)  # ranks that neither returned nor raised
    died: list = field(default_factory=list)        # ranks whose process ended (or was lost) during the call
    stopped: bool = False                           # a stop request ended it
    notes: list = field(default_factory=list)       # lines said after the error: the roll-call, mismatches
    released: str = ""                              # why the process group was aborted to release ranks ("" if not)

    def error(self, attempt: int = 0) -> "WorkerError":
        """The `WorkerError` for a call that failed (``root`` is set), chained to the
        rank's own exception when it could be rebuilt.

        Example::

            if outcome.root is not None:
                raise outcome.error()
        """
        error = WorkerError(self.root, [f for f in self.failures if f is not self.root], attempt=attempt)
        error.__cause__ = self.root.exception
        error.notes.extend(self.notes)
        return error


class Verdict:
    """When a call is decided, and how it ended: pure bookkeeping over a clock.

    ``persistent``: a session's call (ranks must outlive it: an exit is a failure, and
    after a failure the others get `PEER_GRACE` while they show signs of life).
    ``releasable``: ranks stuck after a failure can be released (`released`): the call is
    not decided with ranks unfinished before they were, and `ABORT_GRACE` passed since.
    ``task_id`` 0 is a session's start, where a rank has finished when it is ready.
    """

    def __init__(self, ranks: list, persistent: bool, clock=time.monotonic,
                 secondary_window: float = FAILURE_WINDOW, releasable: bool = False) -> None:
        self.ranks = list(ranks)
        self.persistent = persistent
        self.secondary_window = secondary_window   # a "lost my peer" error waits this long for the real one
        self.clock = clock
        self.finished: set = set()
        self.gone: set = set()                       # exited or lost
        self.failures: dict = {}                     # rank -> Failure (its first)
        self.heard: dict = {}                        # rank -> when it last showed a sign of life
        self.outcome = Outcome()
        self.give_up_at: Optional[float] = None
        self.releasable = releasable
        self.released_at: Optional[float] = None     # when the stuck ranks were released
        self._decide_at: Optional[float] = None      # set by the first failure

    def unfinished(self) -> set:
        return {r for r in self.ranks if r not in self.finished and r not in self.gone}

    def heard_from(self, rank: int, now: float) -> None:
        self.heard[rank] = now

    def done(self, rank: int, value: Optional[tuple]) -> None:
        self.finished.add(rank)
        self.outcome.results[rank] = value

    def failed(self, failure: Failure, now: float) -> None:
        """A real failure decides a one-shot call almost at once; a "lost my peer" error
        waits a moment longer for the failure that caused it; a session's ranks get
        `PEER_GRACE` to end the task themselves."""
        self.failures.setdefault(failure.rank, failure)
        window = self.secondary_window if failure.secondary else PRIMARY_WINDOW
        if self.persistent:
            window = max(window, PEER_GRACE)
        self.decide_now(now + window)

    def decide_now(self, at: float) -> None:
        self._decide_at = at if self._decide_at is None else min(self._decide_at, at)

    def exited(self, rank: int, failure: Failure, now: float) -> None:
        """A rank's process ended (or its node was lost). A rank that already reported its
        error keeps that failure and gains its exit code; one that finished the task
        (one-shot) may exit."""
        self.gone.add(rank)
        if not (self.persistent or rank not in self.finished):
            if failure.exitcode and rank in self.failures:
                self.failures[rank].exitcode = failure.exitcode
            return
        self.outcome.died.append(rank)
        known = self.failures.get(rank)
        if known is not None:
            if known.exitcode is None:
                known.exitcode = failure.exitcode
            return
        self.failed(failure, now)

    def deciding(self) -> bool:
        return self._decide_at is not None

    def released(self, now: float) -> None:
        """The ranks still in the task were released (the process group aborted)."""
        self.released_at = now

    def waiting_for_the_silent(self, now: float) -> bool:
        """A failure's wait is over, and the ranks still in the task have been silent for
        `PEER_GRACE` (a session's): stuck, unless releasing them frees them."""
        return (self._decide_at is not None and now >= self._decide_at and bool(self.unfinished())
                and not (self.persistent and self._others_alive(now)))

    def decided(self, stopped: bool) -> bool:
        now = self.clock()
        if not self.unfinished():
            return True
        if stopped or (self.give_up_at is not None and now >= self.give_up_at):
            self.outcome.stopped = True
            return True
        if not self.waiting_for_the_silent(now):
            return False
        return not self.releasable or (self.released_at is not None and now >= self.released_at + ABORT_GRACE)

    def _others_alive(self, now: float) -> bool:
        """Session: after a failure, a rank still working on the task (any message, output
        line or heartbeat within `PEER_GRACE`) is waited for; ranks silent that long are
        stuck waiting in a collective the failed rank never joined."""
        return any(self.heard.get(rank, -1.0) >= now - PEER_GRACE for rank in self.unfinished())

    def time_left(self, tick: float) -> float:
        """How long to wait for arrivals: a tick, or less up to the next moment the call
        may be decided (past ones do not shorten it: a wait of 0 would spin)."""
        now = self.clock()
        grace_end = None if self.released_at is None else self.released_at + ABORT_GRACE
        for deadline in (self._decide_at, grace_end):
            if deadline is not None and deadline > now:
                return max(0.0, min(tick, deadline - now))
        return tick

    def conclude(self) -> Outcome:
        failures = list(self.failures.values())
        self.outcome.unfinished = sorted(self.unfinished())
        if failures:
            self.outcome.failures = failures
            self.outcome.root = pick_root_cause(failures)
        return self.outcome


class Supervisor:
    """Watches one call on ``targets`` (ranks of ``group``) until it is decided.

    ``task_id`` 0 is a session's start: a rank has "finished" when it is ready.
    ``persistent``: the ranks are a session's and must outlive the call.
    ``stop``: an Event another thread sets to end the call (``Run.stop``).
    ``sinks``: objects with ``on_message(rank, message)`` fed every message of this task
    (experiment trackers).
    ``release``: the owner's ``release(why)``, which aborts the process group on every rank
    (a session's call): ranks stuck in a collective after a failure are released (see the
    module docstring); None: they are not (a one-shot call tears its ranks down).
    """

    def __init__(self, group: RankGroup, targets: list, state: RunState, view: View, task_id: int, *,
                 persistent: bool = False, tick: float = TICK, clock=time.monotonic,
                 stall: Optional["StallWatch"] = None, stop: Optional[threading.Event] = None,
                 sinks: tuple = (), release: Optional[Callable[[str], None]] = None) -> None:
        self.group = group
        self.targets = list(targets)
        self.state = state
        self.view = view
        self.task_id = task_id
        self.tick = tick
        self.clock = clock
        self.stall = stall
        self.stop = stop
        self.sinks = sinks
        self.release = release
        self.verdict = Verdict(self.targets, persistent, clock, max(FAILURE_WINDOW, group.lost_peer_wait),
                               releasable=release is not None)
        self._released: set = set()      # ranks still in the task when the group was aborted
        self._released_because = ""
        self._looked_at = float("-inf")  # when the journals were last read for hopeless waits
        self._left_at: dict = {}         # rank -> when it left the task (time.monotonic of its machine)
        self._stall: Optional[Failure] = None   # the failure a stall made (on_stall="raise")
        self._closed = False

    @property
    def finished(self) -> set:
        return self.verdict.finished

    # ------------------------------------------------------------- the loop
    def run(self, timeout: Optional[float] = None) -> Outcome:
        """Block until the call is decided (or ``timeout`` seconds pass: then it ends as
        stopped). KeyboardInterrupt propagates to the caller, who may then `wind_down`."""
        self._begin(timeout)
        while not self.verdict.decided(self.stop is not None and self.stop.is_set()):
            self._take(self.group.wait(self.verdict.time_left(self.tick)))
            self._release_the_stuck()
            self._look_for_stalls()
            self.view.refresh(self.state)
        return self._explained(self.verdict.conclude())

    def wind_down(self, timeout: float) -> list:
        """After an Interrupt was forwarded: take arrivals until every rank ended the task
        or ``timeout`` passes; returns the ranks that did not."""
        deadline = self.clock() + timeout
        while self.verdict.unfinished() and self.clock() < deadline:
            self._take(self.group.wait(max(0.0, min(self.tick, deadline - self.clock()))))
        return sorted(self.verdict.unfinished())

    def close(self) -> None:
        """Take what already arrived (the call's last lines). Idempotent."""
        if not self._closed:
            self._closed = True
            self._take(self.group.drain())

    # ------------------------------------------------------------- steps
    def _begin(self, timeout: Optional[float]) -> None:
        now = self.clock()
        self.verdict.give_up_at = None if timeout is None else now + timeout
        for rank in self.targets:
            if self.group.exitcode(rank) is not None:
                self.verdict.gone.add(rank)
        self.state.apply(Started(now, {r: self.group.pid(r) for r in self.targets}))
        for rank in self.targets:
            if rank in self.group.ready:
                self.state.apply(Received(rank, ch.RankReady(self.group.pid(rank) or 0, "", ""), now))
                if self.stall is not None:
                    self.stall.active(rank, now, ready=True)
        self.view.start(self.state)

    def _take(self, arrivals: list) -> None:
        for arrival in arrivals:
            if isinstance(arrival, Message):
                self._on_message(arrival.rank, arrival.envelope)
            elif isinstance(arrival, Lines):
                self._on_lines(arrival)
            elif isinstance(arrival, Exit):
                self._on_exit(arrival)

    def _on_lines(self, lines: Lines) -> None:
        if lines.rank not in self.verdict.ranks:
            return
        now = self.clock()
        self._alive(lines.rank, now)
        self.state.apply(Output(lines.rank, lines.stream, lines.lines, now))
        self.view.output(lines.rank, lines.stream, list(lines.lines))

    def _on_message(self, rank: int, envelope: ch.Envelope) -> None:
        now, message = self.clock(), envelope.message
        if envelope.task_id not in (0, self.task_id) or rank not in self.verdict.ranks:
            return  # a late message of a task that already ended (e.g. after an Interrupt)
        if not isinstance(message, ch.DeviceStats):   # memory figures come on change: no sign of work
            self._alive(rank, now, ready=isinstance(message, ch.RankReady))
        if isinstance(message, ch.Heartbeat) and message.waiting and self.stall is not None:
            self.stall.finished(rank)    # it waits for the others: never one of the stuck
        self.state.apply(Received(rank, message, now))
        if isinstance(message, ch.RankReady) and self.task_id == 0:
            self.verdict.done(rank, None)
        elif isinstance(message, ch.TaskDone):
            self._left_at[rank] = time.monotonic()   # the ranks' clock too (one machine: see `_hopeless`)
            self.verdict.done(rank, None if message.value is None else (message.value, message.pickler))
        elif isinstance(message, ch.TaskFailed):
            self._left_at[rank] = message.t
            self.verdict.finished.add(rank)
            failure = self._located(failure_from(rank, self.group.pid(rank) or 0, message), now)
            if rank in self._released:   # its error is the release's doing, never a root cause
                failure.message, failure.secondary = f"released: {self._released_because}", True
            self.verdict.failed(failure, now)
        for sink in self.sinks:
            sink.on_message(rank, message)

    def _on_exit(self, exit: Exit) -> None:
        if exit.rank not in self.verdict.ranks:
            return
        now = self.clock()
        self.state.apply(Exited(exit.rank, exit.code, now))
        message = exit.lost
        if not message and exit.code == 0:
            message = "the worker exited before its function returned (os._exit(0)?)"
        failure = Failure(rank=exit.rank, pid=self.group.pid(exit.rank) or 0, exitcode=exit.code,
                          message=message, timestamp=now)
        self.verdict.exited(exit.rank, self._located(failure, now), now)

    def _located(self, failure: Failure, now: float) -> Failure:
        """Say where the rank ran, and make its time comparable with the others'."""
        failure.where = self.group.where(failure.rank)
        if not self.group.single_host:
            failure.timestamp = now
        return failure

    def _alive(self, rank: int, now: float, ready: bool = False) -> None:
        self.verdict.heard_from(rank, now)
        if self.stall is not None:
            self.stall.active(rank, now, ready=ready)

    def _release_the_stuck(self) -> None:
        """After a failure in a session's call: release the ranks still in the task when
        they wait in a collective a rank that left can never join (their journals say so),
        or when they have been silent for `PEER_GRACE` (blocked somewhere: the abort frees
        those in a collective). Once per call."""
        if self.release is None or self.verdict.released_at is not None or not self.verdict.deciding():
            return
        now = self.clock()
        if not (self.verdict.waiting_for_the_silent(now) or self._hopeless(now)):
            return
        root = pick_root_cause(list(self.verdict.failures.values())) if self.verdict.failures else None
        self._released_because = "the call stalled" if root is None or root is self._stall else f"rank {root.rank} failed"
        self._released = set(self.verdict.unfinished())
        self.verdict.outcome.released = self._released_because
        self.release(self._released_because)
        self.verdict.released(now)

    def _hopeless(self, now: float) -> bool:
        if now - self._looked_at < JOURNAL_LOOK:
            return False
        self._looked_at = now
        unfinished = self.verdict.unfinished()
        left = set(self.group.ranks) - unfinished
        # When ranks of this call left, on their own clock (comparable with their journals' samples on one machine).
        left_at = {rank: self._left_at[rank] for rank in left if rank in self._left_at} if self.group.single_host else {}
        journals = self._journals(unfinished | set(left_at))
        return bool(rollcall.hopeless(journals, left, self.group.ranks, left_at))

    def _journals(self, ranks) -> dict:
        """{rank: journal.Snapshot or None} as the ranks' journals are now."""
        return {rank: journal.decode(self.group.journal(rank)) for rank in sorted(ranks)}

    def _look_for_stalls(self) -> None:
        if self.stall is None or self.verdict.deciding():
            return
        now = self.clock()
        live = self.verdict.unfinished()
        stuck = self.stall.stuck(now, live)
        if not stuck:
            return
        stacks = {rank: self.group.dump_stacks(rank) for rank in stuck}
        journals = self._journals(self.group.ranks)
        where = self._where(stacks, dump=True)
        mismatched = rollcall.mismatches(journals)
        lines = rollcall.roll_call(journals, self.group.ranks, where, stuck=stuck) + mismatched
        for rank in stuck:
            report = "\n".join(lines + ["", stacks[rank]]) if lines and rank == stuck[0] else stacks[rank]
            self.state.apply(Stalled(rank, self.stall.timeout, report, now))
            self.view.stalled(rank, self.stall.timeout, report)
        if self.stall.on_stall == "raise":
            missing = rollcall.missing(journals, self.group.ranks, stuck=stuck)
            rank = missing[0] if missing else likely_culprit(stuck, stacks)
            quiet = f"no progress for {self.stall.timeout:g}s (stall_timeout) on " + ", ".join(f"rank {r}" for r in stuck)
            failure = Failure(
                rank=rank, pid=self.group.pid(rank) or 0, timestamp=now,
                traceback="\n".join(lines + ["", ""] if lines else []) + StallWatch.describe(stuck, stacks),
                message=f"{quiet}: {(mismatched or lines)[0]}" if lines else f"{quiet}; their stacks show where",
            )
            self._stall = self.verdict.failures[rank] = self._located(failure, now)
            self.verdict.decide_now(now)

    def _where(self, stacks: dict, dump: bool) -> Callable[[int], str]:
        """Words for where a rank is (`rollcall`'s ``where``): from what the call knows of it,
        else from its stacks (those given, or, with ``dump``, dumped now); asked once each."""
        said: dict = {}

        def where(rank: int) -> str:
            if rank not in said:
                said[rank] = self._whereabouts(rank, stacks, dump)
            return said[rank]

        return where

    def _whereabouts(self, rank: int, stacks: dict, dump: bool) -> str:
        failure = self.verdict.failures.get(rank)
        if failure is not None and failure is not self._stall:
            summary = failure.summary()
            return f"failed ({summary[:100]}{'...' if len(summary) > 100 else ''})"
        if rank in self.verdict.gone:
            return "gone (its process ended)"
        if rank not in self.verdict.ranks:
            return "between tasks (this call does not run on it)"
        if rank in self.verdict.finished:
            return "between tasks (it finished this call)" if self.verdict.persistent else "finished the function"
        if rank not in stacks and dump:
            stacks[rank] = self.group.dump_stacks(rank)
        return whereabouts(stacks.get(rank, "")) or ("still in the task" if not dump else "")

    def _explained(self, outcome: Outcome) -> Outcome:
        """A failed call's error ends with the collectives that were in flight (who waited
        for whom) and any mismatch, from the journals; nothing is added when no collective
        was involved. A stall's failure says them already."""
        if outcome.root is None or outcome.root is self._stall:
            return outcome
        journals = self._journals(self.group.ranks)
        if not any(snap is not None and snap.entries for snap in journals.values()):
            return outcome
        where = self._where({}, dump=False)
        outcome.notes.extend(rollcall.roll_call(journals, self.group.ranks, where, states=("waiting", "failed"))
                             + rollcall.mismatches(journals))
        return outcome


def likely_culprit(stuck: list, stacks: dict) -> int:
    """Among stuck ranks, the one NOT waiting (inside a torch.distributed call, or in the
    launcher's own final barrier) is the one the others wait for (it never joined). Used
    when the journals name no missing rank (`rollcall.missing`)."""
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

    def __init__(self, timeout: float, on_stall: str) -> None:
        self.timeout = timeout
        self.on_stall = on_stall
        self._last: dict[int, float] = {}
        self._reported: set = set()

    def active(self, rank: int, now: float, ready: bool = False) -> None:
        if ready or rank in self._last:
            self._last[rank] = now
            self._reported.discard(rank)

    def finished(self, rank: int) -> None:
        """The rank's function returned (it waits for its peers): no longer watched."""
        self._last.pop(rank, None)

    def stuck(self, now: float, live: set) -> list:
        """Ranks quiet for the whole timeout; once one is, also those quiet for half of it
        (ranks that went quiet together cross the line up to a heartbeat or two apart: they
        are reported together, so the report shows who waits for whom)."""
        def quiet(limit: float) -> list:
            return [r for r, t in self._last.items() if r in live and r not in self._reported and now - t >= limit]

        if not quiet(self.timeout):
            return []
        stuck = quiet(min(self.timeout - HEARTBEAT_GRANULARITY, self.timeout / 2))
        self._reported.update(stuck)
        return sorted(stuck)

    @staticmethod
    def describe(stuck: list, stacks: dict) -> str:
        parts = [f"--- rank {rank}: Python stacks (most recent call first) ---\n{stacks[rank]}" for rank in stuck]
        return "\n".join(parts)
