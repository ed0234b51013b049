"""One-shot launches: an attempt is one call on ranks that exit after it; `launch` is the
one restart loop around attempts.

An attempt owns its rank group (`ranks.start_group`) for exactly one call (`calls.run_call`)
and releases it at that call's end on every path (success, failure, Interrupt, a stop
request or a bug of ours): no worker, store, actor or placement group outlives it.

`start_attempt` runs in the cell's thread (a local rank's parent-death signal is tied to
the thread that starts it), `supervise` in any thread. `launch` is used by
``notebook_launcher`` and by ``block=False`` runs alike.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .calls import Call, run_call
from .config import LaunchConfig
from .monitor import Outcome, StallWatch
from .ranks import start_group
from .ranks.base import Lines, RankGroup
from .ranks.plan import FIRST_TASK
from .serialization import loads_result
from .state import RunState, RunStatus
from .trackers import TrackerHub
from .ui.base import View
from .workers.tasks import Call as CallTask

TEARDOWN_GRACE = 1.0   # seconds between SIGTERM and SIGKILL
ROOT_EXIT_WAIT = 0.5   # let a rank that reported an error exit by itself, for its real exit code


class RunStopped(Exception):
    """A stop request (``Run.stop``) ended the call."""


@dataclass
class Attempt:
    """One attempt whose ranks are running: what `supervise` watches and releases."""

    config: LaunchConfig
    group: RankGroup
    view: View
    state: RunState

    # ------------------------------------------------------------- `calls.CallOwner`
    def send(self) -> None:
        """Nothing to send: the ranks got the task when they started."""

    def interrupted(self, supervisor) -> None:
        """Nothing to forward: `ended` stops every rank."""

    def ended(self, outcome: Optional[Outcome], status: RunStatus) -> None:
        if outcome is not None and outcome.root is not None:
            _fill_exitcodes(self.group, outcome.failures)
        self.group.close(graceful=status == RunStatus.SUCCEEDED, term_grace=TEARDOWN_GRACE)


def start_attempt(config: LaunchConfig, view: View, attempt: int) -> Attempt:
    """Start the ranks of one attempt, each with the task already given."""
    group = start_group(config, attempt, persistent=False, first_task=CallTask(config.function, config.args, config.kwargs),
                        last_words=show_lines(View(config.line_prefix)))
    return Attempt(config, group, view, new_state(config, group.ranks, attempt=attempt))


def new_state(config: LaunchConfig, ranks: Optional[list] = None, attempt: int = 0) -> RunState:
    """The state of a call on ``ranks`` (default: every rank of this node).

    Example::

        state = new_state(config)          # ranks 0 and 1 of a 2-process launch
    """
    if ranks is None:
        ranks = list(range(config.first_rank, config.first_rank + config.nproc))
    return RunState(world_size=config.world_size, local_ranks=list(ranks), backend=config.backend,
                    device=config.device_type, start_method=config.start_method, attempt=attempt)


def stall_watch(config: LaunchConfig) -> Optional[StallWatch]:
    return None if config.stall_timeout is None else StallWatch(config.stall_timeout, config.on_stall)


def supervise(run: Attempt, stop: Optional[threading.Event] = None) -> Any:
    """Watch a started attempt to its end (any thread); its ranks are always released.
    Returns the value (`collect`), or raises `WorkerError`, `RunStopped` or KeyboardInterrupt."""
    config, state = run.config, run.state
    hub = TrackerHub(config.log_with or None, config.project_name, config.logging_dir, attempt=state.attempt)
    outcome = run_call(Call(run.group, run.group.ranks, FIRST_TASK, state, run.view, tick=config.tick,
                            stall=stall_watch(config), stop=stop, hub=hub), run)
    if outcome.stopped:
        raise RunStopped()
    if outcome.root is not None:
        raise outcome.error(attempt=state.attempt)
    return collect(outcome.results, state.local_ranks, config.return_all)


def launch(config: LaunchConfig, make_view: Callable[[int], View], *, first: Optional[Attempt] = None,
           stop: Optional[threading.Event] = None, on_attempt: Callable[[Attempt], None] = lambda a: None) -> Any:
    """Run attempts until one succeeds or ``config.max_restarts`` restarts are used up
    (then the last `WorkerError` is raised). ``first``: an attempt already started.

    Example::

        config = resolve(train, (10,), num_processes=2, max_restarts=1)
        launch(config, lambda attempt: make_view("text"))   # rank 0's value
    """
    from .errors import WorkerError

    attempt = first or start_attempt(config, make_view(0), 0)
    while True:
        on_attempt(attempt)
        try:
            return supervise(attempt, stop)
        except WorkerError as error:
            number = attempt.state.attempt + 1
            if number > config.max_restarts or (stop is not None and stop.is_set()):
                raise
            print(f"rank {error.rank} failed ({error.root.summary()}); restart {number} of "
                  f"{config.max_restarts}", file=sys.stderr)
            attempt = start_attempt(config, make_view(number), number)


def collect(results: dict, ranks: list, return_all: bool) -> Any:
    """Rank 0's value (None on other nodes), or every rank's in rank order."""
    def value(rank: int) -> Any:
        entry = results.get(rank)
        return None if entry is None else loads_result(*entry)

    if return_all:
        return [value(rank) for rank in ranks]
    return value(0) if 0 in ranks else None


def _fill_exitcodes(group: RankGroup, failures: list) -> None:
    """A rank that reported its error exits by itself: wait briefly for its real exit code."""
    waiting = [f.rank for f in failures if f.exitcode is None]
    codes = group.wait_for_exits(waiting, ROOT_EXIT_WAIT) if waiting else {}
    for failure in failures:
        if failure.exitcode is None:
            failure.exitcode = codes.get(failure.rank)


def show_lines(view: View) -> Callable[[Lines], None]:
    """Where lines printed after a call go (ranks shutting down): rank-prefixed, as they come."""
    return lambda lines: view.output(lines.rank, lines.stream, list(lines.lines))
