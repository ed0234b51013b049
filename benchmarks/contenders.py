"""How each launcher runs the same user function: ours and the ones people use instead.

Every contender is called the way its documentation shows, from the current process
(a plain Python process or a Jupyter kernel), and returns rank 0's return value when
the launcher can return one (accelerate's returns None).

- ``ours-fork`` / ``ours-spawn``: ``notebook_launcher`` with that start method.
- ``accelerate``: HF accelerate's ``notebook_launcher`` (fork + torch elastic agent).
  Its default port is the fixed 29500; each call gets a fresh free port through
  ``use_port`` so that back-to-back calls do not collide on a socket in TIME_WAIT.
- ``lightning``: Lightning Fabric's ``ddp_notebook`` strategy (fork, then
  ``torch.multiprocessing.start_processes``).
- ``torch-fork`` / ``torch-spawn``: the floor, bare ``torch.multiprocessing.start_processes``
  and ``init_process_group`` inside the function, results through a SimpleQueue.
- ``os.fork``: the absolute floor, ``os.fork`` + ``init_process_group``, nothing else.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable

OURS = ("ours-fork", "ours-spawn")
ALL = ("ours-fork", "ours-spawn", "accelerate", "lightning", "torch-fork", "torch-spawn", "os.fork")
CALL_TIMEOUT = 120.0  # seconds; the bare floors have no timeout of their own


def launch(name: str, fn: Callable, out_dir: str, rest: tuple, nproc: int, display: str = "none") -> Any:
    """Run ``fn(out_dir, init, *rest)`` on ``nproc`` CPU ranks with the contender ``name``.

    ``init`` tells the function whether it must call ``init_process_group`` itself.

    Example::

        launch("ours-fork", workloads.trivial, "/tmp/x", (), 2)
    """
    if name in OURS:
        from notebook_launcher import notebook_launcher

        return notebook_launcher(fn, (out_dir, False, *rest), num_processes=nproc, display=display,
                                 start_method=name.split("-")[1], device="cpu")
    if name == "accelerate":
        from accelerate import notebook_launcher as accelerate_launcher

        return accelerate_launcher(fn, (out_dir, True, *rest), num_processes=nproc, use_port=str(free_port()))
    if name == "lightning":
        from lightning.fabric import Fabric

        os.environ.pop("MASTER_PORT", None)  # a fresh free port per call, like ours
        fabric = Fabric(accelerator="cpu", devices=nproc, strategy="ddp_notebook")
        return fabric.launch(_fabric_entry, fn, out_dir, False, *rest)
    if name in ("torch-fork", "torch-spawn"):
        return _torch_floor(name.split("-")[1], fn, (out_dir, True, *rest), nproc)
    if name == "os.fork":
        return _fork_floor(fn, (out_dir, True, *rest), nproc)
    raise ValueError(f"unknown contender {name!r}; choose from {ALL}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fabric_entry(fabric, fn, *args):
    # Fabric passes itself first; the process group is already set up here.
    return fn(*args)


# ----------------------------------------------------------------- the floors
def _rank_env(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))


def _torch_entry(rank, fn, args, world, port, queue):
    import pickle

    _rank_env(rank, world, port)
    value = fn(*args)
    if rank == 0:
        # Plain pickle bytes: torch's own reductions would pass tensors as shared-memory
        # fds, which the parent can no longer fetch once this process has exited.
        queue.put(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))


def _torch_floor(method: str, fn: Callable, args: tuple, nproc: int) -> Any:
    """start_processes, then wait on rank 0's result and every process at once."""
    import pickle
    import time
    from multiprocessing.connection import wait

    import torch.multiprocessing as mp

    if method == "spawn":
        from . import workloads

        fn = getattr(workloads, fn.__name__)  # spawn pickles by reference: needs the module's copy
    queue = mp.get_context(method).SimpleQueue()
    context = mp.start_processes(_torch_entry, args=(fn, args, nproc, free_port(), queue), nprocs=nproc,
                                 start_method=method, join=False)
    deadline = time.monotonic() + CALL_TIMEOUT
    blob = None
    try:
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError("torch floor: workers did not finish in time")
            ready = wait([queue._reader, *context.sentinels], timeout=1.0)
            if queue._reader in ready and blob is None:
                blob = queue.get()
            elif context.join(timeout=0):  # raises when a process failed
                break
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(5)
        queue.close()
    return pickle.loads(blob) if blob is not None else None


def _fork_floor(fn: Callable, args: tuple, nproc: int) -> Any:
    import pickle
    import time

    port = free_port()
    read_fd, write_fd = os.pipe()
    pids = []
    for rank in range(nproc):
        pid = os.fork()
        if pid == 0:  # child: run, send rank 0's value, never return into the caller
            code = 1
            try:
                os.close(read_fd)
                _rank_env(rank, nproc, port)
                value = fn(*args)
                if rank == 0:
                    with os.fdopen(write_fd, "wb") as out:
                        pickle.dump(value, out, protocol=pickle.HIGHEST_PROTOCOL)
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    os.close(write_fd)
    try:
        blob = _read_until_eof(read_fd, time.monotonic() + CALL_TIMEOUT)
    finally:
        os.close(read_fd)
        failed = [pid for pid in pids if not _reap(pid)]
    if failed:
        raise RuntimeError(f"os.fork floor: worker(s) {failed} failed")
    return pickle.loads(blob) if blob else None


def _read_until_eof(fd: int, deadline: float) -> bytes:
    """Everything written to the pipe, until every child has closed its end."""
    import select
    import time

    chunks = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("os.fork floor: workers did not finish in time")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            data = os.read(fd, 1 << 20)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


def _reap(pid: int) -> bool:
    """Wait for a forked child (killing it after a grace period); True when it exited with 0."""
    import signal
    import time

    deadline = time.monotonic() + 5.0
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) == 0
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(0.001)
