"""Parent side of the worker lifecycle: pipes, start, stop, reap.

Every worker gets four pipes: events (worker -> parent messages), stdout, stderr (its
fds 1 and 2), and control (parent -> worker; the worker treats EOF as "parent died").
Workers run in their own process groups so that one `killpg` takes a worker together
with everything it forked.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from . import noninteractive, preload
from .bootstrap import InheritedFds, WorkerSpec, worker_main

_F_SETPIPE_SZ = 1031  # Linux: a bigger events pipe means fewer wake-ups for big results

# Parent-side fds of every live rank in this process (and the stores' listening sockets).
# A later fork (a second session, a one-shot launch beside a session) closes them in its
# children: a child holding another rank's control pipe would keep that rank from seeing
# EOF, and one holding a store's socket keeps its port taken after the store closed.
_OWNED_FDS: set = set()


def keep_from_children(fd: int) -> None:
    """Have workers forked from now on close ``fd`` (until `release`)."""
    _OWNED_FDS.add(fd)


def release(fd: int) -> None:
    _OWNED_FDS.discard(fd)


@dataclass
class ParentFds:
    events: int
    stdout: int
    stderr: int
    control: int


@dataclass
class WorkerPipes:
    parent: ParentFds
    child: InheritedFds

    @classmethod
    def open(cls) -> "WorkerPipes":
        events_r, events_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        control_r, control_w = os.pipe()
        for fd in (events_r, out_r, err_r):
            os.set_blocking(fd, False)
        try:
            fcntl.fcntl(events_w, _F_SETPIPE_SZ, 1 << 20)
        except OSError:
            pass
        for fd in (events_r, out_r, err_r, control_w):
            keep_from_children(fd)
        return cls(ParentFds(events_r, out_r, err_r, control_w), InheritedFds(events_w, out_w, err_w, control_r))

    def parent_fds(self) -> tuple[int, ...]:
        return (self.parent.events, self.parent.stdout, self.parent.stderr, self.parent.control)

    def child_fds(self) -> tuple[int, ...]:
        return (self.child.events, self.child.stdout, self.child.stderr, self.child.control)


@dataclass
class WorkerHandle:
    """The parent's view of one running worker."""

    rank: int
    process: Any  # multiprocess.Process
    fds: ParentFds
    exitcode: int | None = None
    closed: set = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def sentinel(self) -> int:
        return self.process.sentinel

    def poll(self) -> int | None:
        if self.exitcode is None and self.process.exitcode is not None:
            self.exitcode = self.process.exitcode
        return self.exitcode

    def close_fd(self, fd: int) -> None:
        if fd not in self.closed:
            self.closed.add(fd)
            release(fd)
            try:
                os.close(fd)
            except OSError:
                pass

    def close_all(self) -> None:
        for fd in (self.fds.events, self.fds.stdout, self.fds.stderr, self.fds.control):
            self.close_fd(fd)


def start_workers(start_method: str, make_spec: Callable[[int, InheritedFds, tuple], WorkerSpec],
                  local_count: int) -> list[WorkerHandle]:
    """Start ``local_count`` workers; ``make_spec(local_index, child_fds, close_fds)``."""
    import multiprocess

    context = multiprocess.get_context(start_method)
    pipes = [WorkerPipes.open() for _ in range(local_count)]
    with _without_main_module_rerun():
        return _start_all(context, pipes, make_spec)


def resource_tracker_running() -> bool:
    """Whether multiprocess's resource tracker (started by spawn) is running in this process."""
    from multiprocess import resource_tracker

    return getattr(resource_tracker._resource_tracker, "_fd", None) is not None


def stop_resource_tracker(timeout: float = 2.0) -> None:
    """Stop the resource tracker that a spawn launch started, so no helper process outlives
    the call. (multiprocess would keep it until the kernel exits.)"""
    from multiprocess import resource_tracker

    tracker = resource_tracker._resource_tracker
    fd, pid = getattr(tracker, "_fd", None), getattr(tracker, "_pid", None)
    if fd is None:
        return
    tracker._fd = tracker._pid = None
    os.close(fd)  # EOF tells the tracker to exit
    if pid is None:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:
            return
        time.sleep(0.01)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


@contextlib.contextmanager
def _without_main_module_rerun():
    """A spawned child normally re-imports the parent's ``__main__`` (a notebook kernel,
    a script without a ``__name__`` guard...). Ours get the task by value through dill,
    so they skip that, which also keeps a script's top level from running again."""
    from multiprocess import spawn

    original = spawn.get_preparation_data

    def preparation_data(name):
        data = original(name)
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
        return data

    spawn.get_preparation_data = preparation_data
    try:
        yield
    finally:
        spawn.get_preparation_data = original


def _start_all(context, pipes: list, make_spec) -> list[WorkerHandle]:
    every_fd = tuple({fd for p in pipes for fd in (*p.parent_fds(), *p.child_fds())} | _OWNED_FDS)
    handles: list[WorkerHandle] = []
    try:
        for index, pipe in enumerate(pipes):
            keep = set(pipe.child_fds())
            spec = make_spec(index, pipe.child, tuple(fd for fd in every_fd if fd not in keep))
            if index == 0:
                preload.before_fork(spec.first_task)  # what forked workers would each import: once, here
                noninteractive.before_fork()  # what each would look up in every module: once, here
            process = context.Process(target=worker_main, args=(spec,), name=f"notebook_launcher-rank{spec.rank}")
            process.start()
            _own_group(process.pid)
            handles.append(WorkerHandle(spec.rank, process, pipe.parent))
    except BaseException:
        stop_workers(handles, grace=0)
        for pipe in pipes:
            _close_quietly(pipe.parent_fds())
            for fd in pipe.parent_fds():
                release(fd)
        raise
    finally:
        noninteractive.after_fork()
        for pipe in pipes:
            _close_quietly(pipe.child_fds())
    return handles


def _own_group(pid: int) -> None:
    # The child does this too; doing it on both sides closes the race.
    try:
        os.setpgid(pid, pid)
    except OSError:
        pass


def _close_quietly(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def unreaped(handle: WorkerHandle) -> bool:
    """Started and not yet waited for: its pid (and process group id) cannot have been
    reused, so signalling it is safe even if it has already exited (a zombie)."""
    popen = getattr(handle.process, "_popen", None)
    return popen is not None and popen.returncode is None


def signal_workers(handles: list[WorkerHandle], sig: int) -> None:
    """Send ``sig`` to each unreaped worker and its whole process group (what it forked)."""
    for handle in handles:
        if not unreaped(handle):
            continue
        for send in (os.killpg, os.kill):
            try:
                send(handle.process.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def stop_workers(handles: list[WorkerHandle], grace: float = 1.0) -> None:
    """SIGTERM, up to ``grace`` seconds, SIGKILL (groups included); then reap. Safe to call twice."""
    import multiprocess.connection as mpc

    running = [h for h in handles if unreaped(h)]
    if running and grace > 0:
        signal_workers(running, signal.SIGTERM)
        deadline = time.monotonic() + grace
        waiting = list(running)
        while waiting and time.monotonic() < deadline:
            ready = mpc.wait([h.sentinel for h in waiting], timeout=max(0.0, deadline - time.monotonic()))
            waiting = [h for h in waiting if h.sentinel not in ready]
    signal_workers(running, signal.SIGKILL)  # before reaping: also takes what they left behind
    for handle in running:
        handle.process.join(timeout=5)
        handle.poll()
