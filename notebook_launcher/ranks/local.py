"""Ranks started from this process: fork (tens of milliseconds) or spawn (after CUDA).

The invariant: this group is the only owner of its ranks, their pipes, the rendezvous
store they meet on (served here, or by the first rank in a node agent), their stack-dump
files and (after a spawn) multiprocess's resource tracker; `close` releases every one of
them on every path, each step on its own. It is used in the notebook for one-machine
jobs, and inside a node agent (`agent.NodeAgent`, spawn only) for the ranks of one node
of a cluster job.

Reading: one selector, kept for the group's life, over every rank's three pipes and its
process sentinel. A rank that exits has its whole process group killed (what it forked
dies with it, while its pid is still reserved), then whatever it wrote before exiting is
read, then its `Exit` is reported: a rank's last words always come before its end.

Example::

    rdzv = rendezvous.host_store("127.0.0.1", world_size=2)
    group = LocalRanks.start(plan, rdzv, "fork")
    group.close(graceful=False, term_grace=0)
"""

from __future__ import annotations

import dataclasses
import os
import selectors
import signal
import sys
import time
from typing import Callable, Optional

from .. import rendezvous
from ..workers.processes import (keep_from_children, release, resource_tracker_running, signal_workers,
                                 start_workers, stop_resource_tracker, stop_workers)
from ..workers.stacks import StackDumps
from .base import STREAMS, Chunk, Exit, Lines, RankGroup, tear_down
from .plan import NodePlan, make_spec

EXIT_GRACE = 10.0      # ranks ending by themselves (returned, or told to shut down): how long they may take (NCCL)
READ_SIZE = 1 << 20


def _print_lines(lines: Lines) -> None:
    target = sys.stderr if lines.stream == "stderr" else sys.stdout
    target.write("".join(f"[rank{lines.rank}]: {line}\n" for line in lines.lines))
    target.flush()


class LocalRanks(RankGroup):
    """Worker processes of this machine; see the module docstring.

    ``last_words``: where lines the ranks print while they shut down go (no call is
    listening then), e.g. a view's rank-prefixed output.
    """

    def __init__(self, plan: NodePlan, rdzv: Optional[rendezvous.Rendezvous], start_method: str,
                 last_words: Callable[[Lines], None] = _print_lines) -> None:
        super().__init__(plan.ranks)
        self.plan = plan
        self.rdzv = rdzv
        self.start_method = start_method
        self.stacks = StackDumps()
        self.last_words = last_words
        self.handles: dict = {}                 # rank -> WorkerHandle
        self._store_fd: Optional[int] = None    # the store's listening socket, while it lives
        self._tracker_was_running = start_method != "spawn" or resource_tracker_running()
        self._selector = selectors.DefaultSelector()
        self._closed = False

    @classmethod
    def start(cls, plan: NodePlan, rdzv: rendezvous.Rendezvous, start_method: str, *, first_task=None,
              last_words: Callable[[Lines], None] = _print_lines,
              store_in_first_rank: bool = False) -> "LocalRanks":
        """Start the node's ranks from the calling thread (a rank's parent-death signal is
        tied to the thread that started it). On any error everything started is released.

        ``first_task``: a one-shot launch's task object, handed to forked ranks as is.
        ``store_in_first_rank``: the node's first rank serves the store on the reserved
        socket (spawn: a node agent, which never imports torch); else this process does."""
        if store_in_first_rank and start_method != "spawn":
            raise ValueError("store_in_first_rank needs start_method='spawn' (forked ranks would all inherit it)")
        group = cls(plan, rdzv, start_method, last_words)
        try:
            store_fd_for_first_rank = (rdzv.listener.fileno()
                                       if store_in_first_rank and rdzv.listener is not None else None)
            group._start_workers(first_task, store_fd=store_fd_for_first_rank)
            if rdzv.listener is not None:
                group._serve_or_let_go(store_in_first_rank)
        except BaseException:
            group.close(graceful=False, term_grace=0.0)
            raise
        return group

    def _serve_or_let_go(self, first_rank_serves: bool) -> None:
        """Once the ranks started: serve the store here, or close this process's copy of its
        socket (the first rank has its own: the port then lives as long as that rank)."""
        if first_rank_serves:
            self.rdzv.listener.close()
            self.rdzv.listener = None
        else:
            self._store_fd = self.rdzv.listener.fileno()
            keep_from_children(self._store_fd)
            self.rdzv.serve()  # only now: no store thread may be running while workers fork

    def _start_workers(self, first_task, store_fd: Optional[int] = None) -> None:
        fork = self.start_method == "fork"
        parent = os.getpid()

        def spec(local_rank: int, fds, close_fds: tuple):
            rank = self.plan.first_rank + local_rank
            if local_rank == 0 and store_fd is not None:
                fds = dataclasses.replace(fds, store=store_fd)
            env = self.rdzv.worker_env(rank, local_rank, self.plan.nproc, self.plan.node_rank)
            return make_spec(self.plan, env, local_rank, fds, parent_pid=parent, stack_file=self.stacks.path(rank),
                             close_fds=close_fds if fork else (), first_task=first_task if fork else None)

        for handle in start_workers(self.start_method, spec, self.plan.nproc):
            self.handles[handle.rank] = handle
            for stream in STREAMS:
                self._selector.register(getattr(handle.fds, stream), selectors.EVENT_READ, (handle.rank, stream))
            self._selector.register(handle.sentinel, selectors.EVENT_READ, (handle.rank, "exit"))

    # ------------------------------------------------------------- reading
    def _wait_raw(self, timeout: float) -> list:
        if not self._selector.get_map():   # nothing left to watch, or closed (the map is None then)
            if timeout > 0:
                time.sleep(min(timeout, 0.05))
            return []
        out: list = []
        exited = []
        for key, _ in self._selector.select(timeout):
            rank, what = key.data
            if what == "exit":
                exited.append((rank, key.fd))
            else:
                self._read(rank, what, key.fd, out)
        for rank, sentinel in exited:
            self._on_exit(rank, sentinel, out)
        return out

    def _read(self, rank: int, stream: str, fd: int, out: list) -> bool:
        """Append what ``fd`` holds now; False at its end (then it is no longer watched)."""
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            self._unregister(fd)
            return False
        out.append(Chunk(rank, stream, data))
        return True

    def _on_exit(self, rank: int, sentinel: int, out: list) -> None:
        handle = self.handles[rank]
        self._unregister(sentinel)
        signal_workers([handle], signal.SIGKILL)  # what it left behind, while its pid is still reserved
        handle.process.join(timeout=1)
        code = handle.poll()
        if code is None:
            return
        for stream in STREAMS:  # its last words are in the pipes
            fd = getattr(handle.fds, stream)
            if fd not in handle.closed:
                while self._read(rank, stream, fd, out):
                    pass
        out.append(Exit(rank, code))

    def _unregister(self, fd: int) -> None:
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def exitcode(self, rank: int) -> Optional[int]:
        handle = self.handles.get(rank)
        return handle.poll() if handle is not None else self.exitcodes.get(rank)

    # ------------------------------------------------------------- control
    def send(self, ranks: list, frame: bytes) -> None:
        from ..channel import write_all

        for rank in ranks:
            write_all(self.handles[rank].fds.control, frame)

    def interrupt(self, ranks: list) -> None:
        for rank in ranks:
            handle = self.handles.get(rank)
            if handle is not None and handle.poll() is None:
                try:
                    os.kill(handle.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass

    def dump_stacks(self, rank: int, timeout: float = 1.0) -> str:
        return self.stacks.dump(rank, self.handles[rank].pid, timeout)

    def journal(self, rank: int) -> bytes:
        return self.stacks.journal(rank) if rank in self.handles else b""

    def kill(self, ranks: list) -> None:
        signal_workers([self.handles[r] for r in ranks if r in self.handles], signal.SIGKILL)

    def label(self, rank: int) -> str:
        return f"pid {self.pid(rank)}"

    def pid(self, rank: int) -> Optional[int]:
        handle = self.handles.get(rank)
        return handle.pid if handle is not None else None

    def cpu_ticks(self, rank: int) -> Optional[int]:
        """CPU time the rank's main thread has used (user + system, in clock ticks), or None
        off Linux. The main thread only: our heartbeat and channel threads tick in any rank."""
        pid = self.pid(rank)
        try:
            with open(f"/proc/{pid}/task/{pid}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
            return int(fields[11]) + int(fields[12])   # utime, stime: fields 14 and 15 of proc(5)
        except (OSError, IndexError, ValueError, TypeError):
            return None

    def wait_for_exits(self, ranks: list, timeout: float) -> dict:
        handles = [self.handles[r] for r in ranks if r in self.handles]
        deadline = time.monotonic() + timeout
        for handle in handles:
            handle.process.join(timeout=max(0.0, deadline - time.monotonic()))
        return {h.rank: h.poll() for h in handles if h.poll() is not None}

    # ------------------------------------------------------------- the end
    def close(self, graceful: bool, term_grace: float) -> None:
        if self._closed:
            return
        self._closed = True
        handles = list(self.handles.values())
        steps = [
            lambda: graceful and self._wait_for_exits(EXIT_GRACE),
            lambda: stop_workers(handles, grace=term_grace),
            lambda: [handle.close_all() for handle in handles],
            self._selector.close,
            lambda: self.rdzv is not None and self.rdzv.close(),
            lambda: self._store_fd is not None and release(self._store_fd),
            lambda: self._tracker_was_running or stop_resource_tracker(),
            self.stacks.close,
        ]
        tear_down(steps)

    def _wait_for_exits(self, timeout: float) -> None:
        """Let ranks that are ending by themselves exit, reading their pipes meanwhile: a rank
        whose output nobody reads blocks in its last flush (64 KiB fill a pipe). What they
        print on the way out goes to ``last_words``; their messages belong to no call now."""
        deadline = time.monotonic() + timeout
        while any(h.poll() is None for h in self.handles.values()) and time.monotonic() < deadline:
            for arrival in self._decoded(self._wait_raw(min(0.05, max(0.0, deadline - time.monotonic())))):
                if isinstance(arrival, Lines):
                    self.last_words(arrival)
            for handle in self.handles.values():
                handle.process.join(timeout=0)
        for handle in self.handles.values():
            if handle.poll() is None:
                print(f"notebook_launcher: rank {handle.rank} did not exit within {timeout:g}s: stopping it",
                      file=sys.stderr)
