"""One call's lifecycle, the same for every owner of ranks.

A call is one task on some ranks of a group: a one-shot launch attempt (`launcher`), a
``session.run`` / ``execute`` / ``pull`` / ``push`` or a ``%%dist`` cell (`session`)::

    send the task (the owner's ``send``; a one-shot's ranks got it at start)
      -> supervise it to its end (`monitor.Supervisor`)
      -> Interrupt: the owner's ``interrupted`` (a session forwards it to the ranks)
      -> the owner's ``ended`` (a one-shot tears its ranks down; a session may break)
      -> the files its ranks handed over for big values claimed by its results, or closed
      -> its trackers closed with the call's status, the state finished, the view finished

`run_call` is that sequence, written once; the owners only fill in their differences
(`CallOwner`). The steps after the call run on every path, Interrupts deferred, and a
failing step is reported without hiding the call's own outcome.

Example::

    outcome = run_call(Call(group, [0, 1], task_id=3, state=state, view=view), owner)
    if outcome.root is not None:
        raise outcome.error()
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

from .interrupts import interrupts_deferred
from .monitor import TICK, Outcome, StallWatch, Supervisor
from .ranks.base import RankGroup
from .state import Finished, RunState, RunStatus
from .ui.base import View


@dataclass
class Call:
    """What one call is: its task id, its ranks and what watches them."""

    group: RankGroup
    targets: list
    task_id: int
    state: RunState
    view: View
    persistent: bool = False
    tick: float = TICK
    stall: Optional[StallWatch] = None
    stop: Optional[threading.Event] = None   # set by another thread to end the call (`Run.stop`)
    hub: object = None                       # the call's `trackers.TrackerHub`, closed at its end
    timeout: Optional[float] = None          # seconds; then the call ends as stopped (a session's start)


class CallOwner(Protocol):
    def send(self) -> None:
        """Write the task to the ranks (whole frames; Interrupts deferred)."""

    def interrupted(self, supervisor: Supervisor) -> None:
        """The person pressed Interrupt during the call (Interrupts are deferred here)."""

    def ended(self, outcome: Optional[Outcome], status: RunStatus) -> None:
        """The call is over (``outcome`` None after an Interrupt): release or keep the ranks."""

    # Optional: ``release(why)`` aborts the process group on every rank, so that ranks stuck in
    # a collective after a failure end the task (`monitor.Supervisor`); a session's owner has it.


def status_of(outcome: Outcome) -> RunStatus:
    if outcome.stopped:
        return RunStatus.STOPPED
    return RunStatus.FAILED if outcome.root is not None else RunStatus.SUCCEEDED


def run_call(call: Call, owner: CallOwner) -> Outcome:
    """Send, supervise, end: see the module docstring. Raises KeyboardInterrupt after the
    owner handled it; returns the outcome otherwise (the owner raises its error)."""
    supervisor = Supervisor(call.group, call.targets, call.state, call.view, call.task_id,
                            persistent=call.persistent, tick=call.tick, stall=call.stall, stop=call.stop,
                            sinks=() if call.hub is None else (call.hub,), release=getattr(owner, "release", None))
    outcome, status = None, RunStatus.FAILED
    try:
        owner.send()
        outcome = supervisor.run(timeout=call.timeout)
        status = status_of(outcome)
    except KeyboardInterrupt:
        status = RunStatus.INTERRUPTED
        with interrupts_deferred():
            owner.interrupted(supervisor)
        raise
    finally:   # one block with Interrupts held (each hold costs two signal calls: a cell is ~1 ms)
        _steps(supervisor.close, lambda: owner.ended(outcome, status), lambda: settle_values(call, outcome, status),
               *_finish_steps(call.view, call.state, status, None if outcome is None else outcome.root, call.hub))
    return outcome


def settle_values(call: Call, outcome: Optional[Outcome], status: RunStatus) -> None:
    """Big values of ranks on this machine arrive as memory files (`shared_memory`): once
    the ranks have left the call, give each to its result when the call succeeded, and
    close whatever else they sent (a failed or interrupted call's values)."""
    if not call.group.single_host:
        return
    from . import shared_memory

    results = outcome.results if outcome is not None and status == RunStatus.SUCCEEDED else {}
    shared_memory.settle(results, {call.group.pid(rank) for rank in call.targets} - {None})


def finish(view: View, state: RunState, status: RunStatus, failure, hub=None) -> None:
    """The call's end: its trackers closed as ``status``, the state and the view told."""
    _steps(*_finish_steps(view, state, status, failure, hub))


def _finish_steps(view: View, state: RunState, status: RunStatus, failure, hub) -> tuple:
    return (lambda: hub is not None and hub.close(status),
            lambda: state.apply(Finished(status, time.monotonic(), failure)),
            lambda: view.finish(state))


def _steps(*steps: Callable) -> None:
    """Run every step, Interrupts held until the end; a failing step is reported."""
    with interrupts_deferred():
        for step in steps:
            try:
                step()
            except Exception as exc:
                print(f"notebook_launcher: a step at the end of the call failed: {exc!r}", file=sys.stderr)
