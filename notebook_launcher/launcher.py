"""Starting and stopping ranks, and the one-shot launch with its restart loop.

`start_ranks` is the only place that starts workers and `teardown` the only place that
stops them. A `Ranks` group (rendezvous, worker processes, their pipes, stack-dump
files) belongs to one owner: a one-shot launch attempt, which tears it down in
`supervise`'s ``finally`` on every path (success, failure, Interrupt, a stop request or a
bug of ours), or a `session.Session`, which tears it down when it is closed or broken.
No worker and no store outlives its owner.

A one-shot launch is one task on ranks that exit after it: `start_attempt` (from the
cell's thread: the parent-death signal is tied to the thread that forks) then
`supervise` (any thread). `launch` is the one restart loop around them, used by
``notebook_launcher`` and by ``block=False`` runs alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import linecache
import os
import selectors
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from . import channel as ch
from . import rendezvous
from .config import LaunchConfig
from .errors import WorkerError
from .monitor import RankIO, StallWatch, Supervisor
from .serialization import dumps_task, loads_result
from .state import Finished, RunState, RunStatus
from .trackers import TrackerHub
from .ui.base import View
from .workers.bootstrap import InheritedFds, WorkerSpec
from .workers.processes import (keep_from_children, release, resource_tracker_running, start_workers,
                                stop_resource_tracker, stop_workers)
from .workers.stacks import StackDumps
from .workers.tasks import Call

TEARDOWN_GRACE = 1.0   # seconds between SIGTERM and SIGKILL
ROOT_EXIT_WAIT = 0.5   # let a rank that reported an error exit by itself, for its real exit code
EXIT_GRACE = 10.0      # after every rank returned, how long they may take to exit (NCCL teardown)
FIRST_TASK = 1         # task id of a one-shot launch's task


class RunStopped(Exception):
    """A stop request (``Run.stop``) ended the call."""


@dataclass
class Ranks:
    """One generation of ranks on this machine and what they own."""

    config: LaunchConfig
    rdzv: Optional[rendezvous.Rendezvous]
    stacks: StackDumps
    tracker_was_running: bool
    io: list = field(default_factory=list)   # RankIO per local rank
    store_fd: Optional[int] = None           # the store's listening socket, while it lives

    @property
    def handles(self) -> list:
        return [io.handle for io in self.io]

    def send(self, ranks: list, message: Any, task_id: int = 0) -> None:
        """Write a control message to the given ranks."""
        frame = ch.encode(ch.Envelope(task_id, message))
        for io in self.io:
            if io.rank in ranks:
                ch.write_all(io.handle.fds.control, frame)

    def stall_watch(self) -> Optional[StallWatch]:
        if self.config.stall_timeout is None:
            return None
        return StallWatch(self.config.stall_timeout, self.config.on_stall,
                          lambda rank, pid: self.stacks.dump(rank, pid))


def start_ranks(config: LaunchConfig, attempt: int, *, persistent: bool,
                first_task: Optional[Call] = None) -> Ranks:
    """Rendezvous and workers, started from the calling thread. On any error everything
    started is torn down.

    Example::

        ranks = start_ranks(config, 0, persistent=True)    # a session's ranks, waiting for tasks
        teardown(ranks, graceful=False)
    """
    config, rdzv = _meet(config, attempt)
    ranks = Ranks(config, rdzv, StackDumps(), config.start_method != "spawn" or resource_tracker_running())
    try:
        specs = _spec_factory(config, rdzv, ranks.stacks, persistent, first_task)
        ranks.io = [RankIO(h) for h in start_workers(config.start_method, specs, config.nproc)]
        if rdzv.listener is not None:
            ranks.store_fd = rdzv.listener.fileno()
            keep_from_children(ranks.store_fd)
        rdzv.serve()  # only now: no store thread may be running while workers fork
    except BaseException:
        teardown(ranks, graceful=False)
        raise
    return ranks


def teardown(ranks: Ranks, graceful: bool, term_grace: float = TEARDOWN_GRACE) -> None:
    """Stop every rank and free what they own. Every step runs even if an earlier one
    fails; Interrupts wait until the end. ``graceful``: ranks that are ending by
    themselves (they returned, or were told to shut down) get `EXIT_GRACE` first;
    ``term_grace``: seconds between SIGTERM and SIGKILL (0: kill at once)."""
    steps = [
        lambda: graceful and _wait_for_exits(ranks, EXIT_GRACE),
        lambda: stop_workers(ranks.handles, grace=term_grace),
        lambda: [handle.close_all() for handle in ranks.handles],
        lambda: ranks.rdzv is not None and ranks.rdzv.close(),
        lambda: ranks.store_fd is not None and release(ranks.store_fd),
        lambda: ranks.tracker_was_running or stop_resource_tracker(),
        ranks.stacks.close,
    ]
    with interrupts_deferred():
        for step in steps:
            try:
                step()
            except Exception as exc:  # report, but never hide the run's own outcome
                print(f"notebook_launcher: teardown step failed: {exc!r}", file=sys.stderr)


# ----------------------------------------------------------------- one-shot launches
@dataclass
class Attempt:
    """One attempt whose workers are running: what `supervise` watches and tears down."""

    ranks: Ranks
    view: View
    state: RunState


def start_attempt(config: LaunchConfig, view: View, attempt: int) -> Attempt:
    ranks = start_ranks(config, attempt, persistent=False,
                        first_task=Call(config.function, config.args, config.kwargs))
    return Attempt(ranks, view, new_state(ranks.config, attempt=attempt))


def new_state(config: LaunchConfig, ranks: Optional[list] = None, attempt: int = 0) -> RunState:
    """The state of a call on ``ranks`` (default: every rank of this node).

    Example::

        state = new_state(config)          # ranks 0 and 1 of a 2-process launch
    """
    if ranks is None:
        ranks = list(range(config.first_rank, config.first_rank + config.nproc))
    return RunState(world_size=config.world_size, local_ranks=list(ranks), backend=config.backend,
                    device=config.device_type, start_method=config.start_method, attempt=attempt)


def supervise(run: Attempt, stop: Optional[threading.Event] = None) -> Any:
    """Watch a started attempt to its end (any thread); always tears it down."""
    config, state = run.ranks.config, run.state
    status, failure, hub = RunStatus.FAILED, None, None
    try:
        hub = TrackerHub(config.log_with or None, config.project_name, config.logging_dir, attempt=state.attempt)
        supervisor = Supervisor(run.ranks.io, state, run.view, FIRST_TASK, tick=config.tick,
                                stall=run.ranks.stall_watch(), stop=stop, sinks=(hub,))
        try:
            outcome = supervisor.run()
        finally:
            supervisor.close()
        if outcome.stopped:
            status = RunStatus.STOPPED
            raise RunStopped()
        if outcome.root is not None:
            failure = outcome.root
            _fill_exitcodes(run.ranks, outcome.failures)
            raise outcome.error(attempt=state.attempt)
        status = RunStatus.SUCCEEDED
        return collect(config, outcome.results, state.local_ranks, config.return_all)
    except KeyboardInterrupt:
        status = RunStatus.INTERRUPTED
        raise
    finally:
        teardown(run.ranks, graceful=status == RunStatus.SUCCEEDED)
        finish_view(run.view, state, status, failure, hub)


def launch(config: LaunchConfig, make_view: Callable[[int], View], *, first: Optional[Attempt] = None,
           stop: Optional[threading.Event] = None, on_attempt: Callable[[Attempt], None] = lambda a: None) -> Any:
    """Run attempts until one succeeds or ``config.max_restarts`` restarts are used up
    (then the last `WorkerError` is raised). ``first``: an attempt already started.

    Example::

        config = resolve(train, (10,), num_processes=2, max_restarts=1)
        launch(config, lambda attempt: make_view("text"))   # rank 0's value
    """
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


def finish_view(view: View, state: RunState, status: RunStatus, failure, hub=None) -> None:
    """The call's end: its trackers closed as ``status``, the state and the view told
    (never hiding the call's own outcome)."""
    with interrupts_deferred():
        for step in (lambda: hub is not None and hub.close(status),
                     lambda: state.apply(Finished(status, time.monotonic(), failure)),
                     lambda: view.finish(state)):
            try:
                step()
            except Exception as exc:
                print(f"notebook_launcher: the view failed at the end: {exc!r}", file=sys.stderr)


def collect(config: LaunchConfig, results: dict, ranks: list, return_all: bool) -> Any:
    """Rank 0's value (None on other nodes), or every rank's in rank order."""
    def value(rank: int) -> Any:
        entry = results.get(rank)
        return None if entry is None else loads_result(*entry)

    if return_all:
        return [value(rank) for rank in ranks]
    return value(0) if 0 in ranks else None


# ----------------------------------------------------------------- helpers
def _meet(config: LaunchConfig, attempt: int) -> tuple:
    """(config with this node's rank, the rendezvous its workers will use)."""
    if config.rdzv_backend == "c10d" and config.num_nodes > 1:
        rdzv = rendezvous.negotiate_c10d(
            f"{config.master_addr}:{config.port}", config.rdzv_id, config.num_nodes, config.nproc,
            config.rdzv_timeout, config.rdzv_conf, restart_count=attempt, max_restarts=config.max_restarts)
        return dataclasses.replace(config, node_rank=rdzv.node_rank), rdzv
    if config.node_rank == 0:
        return config, rendezvous.host_store(
            config.master_addr, config.world_size, port=config.port, bind_all=config.num_nodes > 1,
            restart_count=attempt, max_restarts=config.max_restarts)
    # Nodes other than 0 host nothing: their workers connect to node 0's store.
    return config, rendezvous.Rendezvous(config.master_addr, config.port, config.world_size, run_id="static",
                                         restart_count=attempt, max_restarts=config.max_restarts)


def _spec_factory(config: LaunchConfig, rdzv: rendezvous.Rendezvous, stacks: StackDumps, persistent: bool,
                  first_task: Optional[Call]):
    spawn = config.start_method == "spawn"
    first_request = None
    if spawn and first_task is not None:
        first_request = ch.TaskRequest(dumps_task(first_task), send_value=True, sources=notebook_sources())
    common_env = {
        "OMP_NUM_THREADS": str(config.num_threads),
        "ACCELERATE_MIXED_PRECISION": config.mixed_precision,
        "NOTEBOOK_LAUNCHER_MIXED_PRECISION": config.mixed_precision,
        **config.extra_env,
    }
    if config.device_type == "cpu":
        common_env["ACCELERATE_USE_CPU"] = "true"  # HF accelerate then sees MULTI_CPU, not one process

    def make_spec(local_rank: int, fds: InheritedFds, close_fds: tuple) -> WorkerSpec:
        rank = config.first_rank + local_rank
        env = dict(common_env)
        env.update(rdzv.worker_env(rank, local_rank, config.nproc, config.node_rank))
        return WorkerSpec(
            rank=rank, local_rank=local_rank, world_size=config.world_size,
            local_world_size=config.nproc, backend=config.backend,
            device=f"cuda:{local_rank}" if config.device_type == "cuda" else "cpu",
            mixed_precision=config.mixed_precision, restart_count=rdzv.restart_count,
            num_threads=config.num_threads, env=env, fds=fds, parent_pid=os.getpid(),
            persistent=persistent, close_fds=() if spawn else close_fds,
            first_task=None if spawn else first_task, first_request=first_request, first_task_id=FIRST_TASK,
            send_result=config.return_all or rank == 0,
            stack_file=stacks.path(rank), rdzv_timeout=config.rdzv_timeout if config.num_nodes > 1 else None,
        )

    return make_spec


def notebook_sources(skip: frozenset = frozenset()) -> dict:
    """Notebook cells known to linecache (they have no file: mtime None), except ``skip``.
    A rank that did not fork from this state needs them to show the notebook's own lines
    in its tracebacks."""
    return {name: entry for name, entry in list(linecache.cache.items())
            if len(entry) == 4 and entry[1] is None and name not in skip}


def _wait_for_exits(ranks: Ranks, timeout: float) -> None:
    """Let ranks that are ending by themselves exit, reading their pipes meanwhile: a rank
    whose output nobody reads blocks in its last flush (64 KiB fill a pipe). What they
    print on the way out is shown, rank-prefixed."""
    view = View(ranks.config.line_prefix)
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        for io in ranks.io:
            if io.handle.poll() is None:
                for what, fd in io.fds().items():
                    if fd not in io.handle.closed:
                        selector.register(fd, selectors.EVENT_READ, (io, what))
        while any(h.poll() is None for h in ranks.handles) and time.monotonic() < deadline:
            for key, _ in selector.select(min(0.05, max(0.0, deadline - time.monotonic()))):
                _show_last_words(selector, key, view)
            for handle in ranks.handles:
                handle.process.join(timeout=0)
    for handle in ranks.handles:
        if handle.poll() is None:
            print(f"notebook_launcher: rank {handle.rank} did not exit within {timeout:g}s: stopping it",
                  file=sys.stderr)


def _show_last_words(selector, key, view: View) -> None:
    io, what = key.data
    data = io.read(key.fd)
    if data is None:
        return
    if not data:
        selector.unregister(key.fd)
    elif what != "events":  # a closing rank's messages belong to no call any more
        lines = io.splitters[what].feed(data)
        if lines:
            view.output(io.rank, what, lines)


def _fill_exitcodes(ranks: Ranks, failures: list) -> None:
    """A rank that reported its error exits by itself: wait briefly for its real exit code."""
    waiting = {f.rank for f in failures if f.exitcode is None}
    handles = [h for h in ranks.handles if h.rank in waiting]
    deadline = time.monotonic() + ROOT_EXIT_WAIT
    for handle in handles:
        handle.process.join(timeout=max(0.0, deadline - time.monotonic()))
        handle.poll()
    codes = {h.rank: h.exitcode for h in handles}
    for failure in failures:
        if failure.exitcode is None:
            failure.exitcode = codes.get(failure.rank)


@contextlib.contextmanager
def interrupts_deferred():
    """Hold a second Interrupt until the block is done, then deliver it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pressed:
            raise KeyboardInterrupt
