"""Reproducer: a forked worker can deadlock in glibc's resolver lock.

    python benchmarks/fork_race.py                       # 60 launches of 4 CPU workers
    python benchmarks/fork_race.py --store-after-fork    # experiment: the proposed fix

The parent starts its TCPStore server (a libuv thread) and then forks the workers one
by one. While it forks rank k, ranks < k are already connecting, and the server thread
formats their addresses with getnameinfo(), which takes glibc's resolver lock. A worker
forked at that instant inherits the lock held, and deadlocks as soon as it calls
getnameinfo itself (c10d's TCPStore client does, when it connects): the launch then
hangs for good. Seen here as ~1 hang in tens of 4-worker launches on 2 cores.

Each launch runs with ``block=False`` and a deadline; a launch past it counts as a hang,
the stuck worker's native stack is printed when gdb is available, and the run is stopped.
``--store-after-fork`` monkeypatches the launcher (an experiment, not a change of the
library) to bind the listening socket first, fork every worker, and only then start the
store server on that socket: no other thread runs in the parent while it forks.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def trivial():
    import torch.distributed as dist

    dist.barrier()
    return dist.get_rank()


def store_after_fork() -> None:
    """Experiment: start the TCPStore server after the workers are forked."""
    import datetime
    import uuid

    import torch.distributed as dist

    from notebook_launcher import launcher, rendezvous

    pending = []

    def host_store(master_addr, world_size, port=None, bind_all=False, restart_count=0, max_restarts=0,
                   run_id=None, timeout=300.0):
        listener = rendezvous._listen(master_addr, port or 0, bind_all)  # bound and listening: connects queue
        rdzv = rendezvous.Rendezvous(master_addr=master_addr, master_port=listener.getsockname()[1],
                                     world_size=world_size, run_id=run_id or uuid.uuid4().hex[:12],
                                     restart_count=restart_count, max_restarts=max_restarts)
        pending.append((rdzv, listener, timeout))
        return rdzv

    original_start = launcher.start_workers

    def start_workers(*args, **kwargs):
        try:
            return original_start(*args, **kwargs)
        finally:
            while pending:
                rdzv, listener, timeout = pending.pop()
                rdzv.store = dist.TCPStore(rdzv.master_addr, rdzv.master_port, None, True,
                                           timeout=datetime.timedelta(seconds=timeout), wait_for_workers=False,
                                           master_listen_fd=listener.fileno(), use_libuv=True)
                listener.detach()

    rendezvous.host_store = host_store
    launcher.start_workers = start_workers


def stuck_stacks(pids: list) -> str:
    """The top native frames of each worker's main thread (gdb), to show where it waits."""
    if not shutil.which("gdb"):
        return "(gdb not installed)"
    lines = []
    for pid in pids:
        try:
            out = subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "thread 1", "-ex", "bt 14"],
                                 capture_output=True, text=True, timeout=60).stdout
        except subprocess.TimeoutExpired:
            continue
        frames = [line.split(" in ", 1)[-1][:110] for line in out.splitlines() if line.startswith("#")]
        if any("lll_lock_wait" in f or "futex" in f for f in frames[:3]):
            lines.append(f"  worker {pid}:")
            lines += [f"    {f}" for f in frames]
    return "\n".join(lines) or "(no worker waits on a lock)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--launches", type=int, default=60)
    parser.add_argument("-n", "--nproc", type=int, default=4)
    parser.add_argument("--deadline", type=float, default=20.0, help="seconds before a launch counts as hung")
    parser.add_argument("--store-after-fork", action="store_true", help="experiment: the proposed fix")
    args = parser.parse_args(argv)
    import psutil

    from notebook_launcher import notebook_launcher

    if args.store_after_fork:
        store_after_fork()
    hangs, started = 0, time.monotonic()
    for index in range(args.launches):
        run = notebook_launcher(trivial, num_processes=args.nproc, display="none", block=False)
        if not run.wait(timeout=args.deadline):
            hangs += 1
            workers = [p.pid for p in psutil.Process().children(recursive=True) if "resource_tracker" not in " ".join(p.cmdline())]
            print(f"launch {index}: not done after {args.deadline:g} s\n{stuck_stacks(workers)}", flush=True)
            run.stop()
        else:
            run.result()
    print(f"{'store after fork' if args.store_after_fork else 'store before fork (as shipped)'}: "
          f"{hangs} hung launches of {args.launches} ({args.nproc} workers each), "
          f"{time.monotonic() - started:.0f} s")
    return 1 if hangs else 0


if __name__ == "__main__":
    sys.exit(main())
