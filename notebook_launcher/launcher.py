"""One launch attempt: rendezvous, workers, supervision, teardown.

`start_attempt` is the only place that starts workers and `_teardown` the only place
that stops them: `start_attempt` tears down what it started if it fails, and
`supervise`'s ``finally`` does it on every other path (success, failure, Interrupt, a
stop request or a bug of ours), so no worker and no store outlives an attempt.
`run_attempt` is the two in a row; a ``block=False`` run calls `start_attempt` in the
cell's thread and `supervise` in its own thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import linecache
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from . import rendezvous
from .config import LaunchConfig
from .errors import WorkerError
from .monitor import StallWatch, Supervisor
from .serialization import dumps_task, loads_result
from .state import Finished, RunState
from .ui.base import View
from .workers.bootstrap import InheritedFds, Task, WorkerSpec
from .workers.stacks import StackDumps
from .workers.processes import (WorkerHandle, resource_tracker_running, start_workers, stop_resource_tracker,
                                stop_workers)

TEARDOWN_GRACE = 1.0   # seconds between SIGTERM and SIGKILL
ROOT_EXIT_WAIT = 0.5   # let a rank that reported an error exit by itself, for its real exit code


def run_attempt(config: LaunchConfig, view: View, attempt: int) -> Any:
    """Run the function once on every local rank; return rank 0's value (or all of them)."""
    return supervise(start_attempt(config, view, attempt))


@dataclass
class Attempt:
    """One attempt whose workers are running: what `supervise` needs to watch and tear down."""

    config: LaunchConfig
    view: View
    state: RunState
    stacks: StackDumps
    tracker_was_running: bool
    rdzv: Optional[rendezvous.Rendezvous] = None
    handles: list = field(default_factory=list)


def start_attempt(config: LaunchConfig, view: View, attempt: int) -> Attempt:
    """Rendezvous and workers, started from the calling thread (the parent-death signal
    is tied to the thread that forks). On any error everything started is torn down."""
    config, rdzv = _meet(config, attempt)
    state = RunState(
        world_size=config.world_size,
        local_ranks=list(range(config.first_rank, config.first_rank + config.nproc)),
        backend=config.backend, device=config.device_type, start_method=config.start_method,
        attempt=attempt,
    )
    run = Attempt(config, view, state, StackDumps(),
                  config.start_method != "spawn" or resource_tracker_running(), rdzv=rdzv)
    try:
        run.handles = start_workers(config.start_method, _spec_factory(config, run.rdzv, run.stacks), config.nproc)
        run.rdzv.serve()  # only now: no store thread may be running while workers fork
    except BaseException as exc:
        _teardown(run, "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed", None)
        raise
    return run


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
    return config, _remote_rendezvous(config, attempt)


def supervise(run: Attempt) -> Any:
    """Watch a started attempt to its end (any thread); always tears it down.

    A ``KeyboardInterrupt`` (or a subclass with a ``status``, which is how a ``block=False``
    run is stopped) ends it as interrupted (or that status).
    """
    config, state, handles = run.config, run.state, run.handles
    status, failure = "failed", None
    try:
        expect = set(state.local_ranks) if config.return_all else {0} & set(state.local_ranks)
        stall = None if config.stall_timeout is None else StallWatch(
            config.stall_timeout, config.on_stall, lambda rank, pid: run.stacks.dump(rank, pid))
        outcome = Supervisor(handles, state, run.view, expect, tick=config.tick, stall=stall).run()
        if outcome.root is not None:
            failure = outcome.root
            _wait_for_exit([h for h in handles if h.rank == failure.rank], ROOT_EXIT_WAIT)
            _fill_exitcodes(outcome.failures, handles)
            raise WorkerError(outcome.root, [f for f in outcome.failures if f is not outcome.root],
                              attempt=state.attempt) from outcome.root.exception
        status = "succeeded"
        return _collect(config, state, outcome.results)
    except KeyboardInterrupt as exc:
        status = getattr(exc, "status", "interrupted")
        raise
    finally:
        _teardown(run, status, failure)


def _teardown(run: Attempt, status: str, failure) -> None:
    """Every step runs even if an earlier one fails; Interrupts wait until the end."""
    steps = [
        lambda: stop_workers(run.handles, grace=TEARDOWN_GRACE),
        lambda: [handle.close_all() for handle in run.handles],
        lambda: run.rdzv is not None and run.rdzv.close(),
        lambda: run.tracker_was_running or stop_resource_tracker(),
        run.stacks.close,
        lambda: run.state.apply(Finished(status, time.monotonic(), failure)),
        lambda: run.view.finish(run.state),
    ]
    with _interrupts_deferred():
        for step in steps:
            try:
                step()
            except Exception as exc:  # report, but never hide the run's own outcome
                print(f"notebook_launcher: teardown step failed: {exc!r}", file=sys.stderr)


def _remote_rendezvous(config: LaunchConfig, attempt: int) -> rendezvous.Rendezvous:
    # Nodes other than 0 host nothing: their workers connect to node 0's store.
    return rendezvous.Rendezvous(config.master_addr, config.port, config.world_size, run_id="static",
                                 restart_count=attempt, max_restarts=config.max_restarts)


def _spec_factory(config: LaunchConfig, rdzv: rendezvous.Rendezvous, stacks: StackDumps):
    task = Task(config.function, config.args, config.kwargs)
    spawn = config.start_method == "spawn"
    task_blob = dumps_task(task) if spawn else None
    sources = _notebook_sources() if spawn else {}
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
            send_result=config.return_all or rank == 0, close_fds=() if spawn else close_fds,
            task=None if spawn else task, task_blob=task_blob, notebook_sources=sources,
            stack_file=stacks.path(rank), rdzv_timeout=config.rdzv_timeout if config.num_nodes > 1 else None,
        )

    return make_spec


def _notebook_sources() -> dict:
    # Cells registered by IPython have no file on disk (mtime None); a spawned worker
    # needs them to show the notebook's own lines in its tracebacks.
    return {name: entry for name, entry in list(linecache.cache.items())
            if len(entry) == 4 and entry[1] is None}


def _collect(config: LaunchConfig, state: RunState, results: dict) -> Any:
    def value(rank: int) -> Any:
        entry = results.get(rank)
        return None if entry is None else loads_result(*entry)

    if config.return_all:
        return [value(rank) for rank in state.local_ranks]
    return value(0) if config.node_rank == 0 else None


def _wait_for_exit(handles: list[WorkerHandle], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for handle in handles:
        handle.process.join(timeout=max(0.0, deadline - time.monotonic()))
        handle.poll()


def _fill_exitcodes(failures: list, handles: list[WorkerHandle]) -> None:
    codes = {h.rank: h.exitcode for h in handles}
    for failure in failures:
        if failure.exitcode is None:
            failure.exitcode = codes.get(failure.rank)


@contextlib.contextmanager
def _interrupts_deferred():
    """Hold a second Interrupt until teardown is done, then deliver it."""
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
