"""What runs inside a worker process, from its first instruction to `os._exit`.

Order matters and each step says why:
1. isolate: own process group (an Interrupt aimed at the kernel's group does not spray
   tracebacks from workers; teardown can kill the worker with everything it forked),
   parent-death signal, and the same signal for anything the worker forks later.
2. own the file descriptors: close the parent's ends, put our pipes on fds 1 and 2 (so
   C-level output from gloo/NCCL is captured), stdin from /dev/null.
3. watch the parent: a thread blocks on the control pipe; EOF means the parent is gone.
4. environment, threads, device, process group; then the task; then the result.
5. `os._exit`: a forked copy of a Jupyter kernel must never run the kernel's atexit hooks.
"""

from __future__ import annotations

import ctypes
import io
import linecache
import os
import re
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .. import channel as ch
from ..serialization import dumps_result, loads_task
from . import context
from .stacks import register_dump_handler

HEARTBEAT_INTERVAL = 1.0  # seconds between looks at the main thread's stack

PR_SET_PDEATHSIG = 1

# Errors that a rank raises because ANOTHER rank died: never the root cause.
_SECONDARY_ERROR = re.compile(
    r"closed by peer|reset by peer|broken pipe|connection refused|communicator was aborted"
    r"|remote process exited|NCCL communicator.*abort|Connection closed|peer.*(?:closed|disconnect)",
    re.IGNORECASE,
)


@dataclass
class Task:
    """One call of the user's function."""

    function: Callable
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


@dataclass
class InheritedFds:
    """The child's ends of its four pipes (same numbers in the child as in the parent)."""

    events: int
    stdout: int
    stderr: int
    control: int

    def __getstate__(self):
        # When multiprocess pickles us for a spawned child, ask it to pass these fds along.
        from multiprocess import context as mp_context

        popen = mp_context.get_spawning_popen()
        if popen is not None:
            for fd in (self.events, self.stdout, self.stderr, self.control):
                popen.duplicate_for_child(fd)
        return self.__dict__


@dataclass
class WorkerSpec:
    """Everything one worker needs to know, as plain data."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    backend: str
    device: str
    mixed_precision: str
    restart_count: int
    num_threads: int
    env: dict
    fds: InheritedFds
    parent_pid: int
    send_result: bool
    close_fds: tuple = ()           # parent-side fds a forked child inherited and must close
    task: Optional[Task] = None     # fork: the task itself, never pickled
    task_blob: Optional[bytes] = None  # spawn: the task pickled with dill
    notebook_sources: dict = field(default_factory=dict)  # spawn: linecache entries of notebook cells
    stack_file: Optional[str] = None       # where faulthandler dumps this worker's stacks on SIGUSR1
    rdzv_timeout: Optional[float] = None   # multi-node: how long to wait for every rank to arrive


def worker_main(spec: WorkerSpec) -> None:
    """Entry point of every worker process. Never returns."""
    code = 1
    try:
        _isolate(spec.parent_pid)
        _own_descriptors(spec)
        channel = ch.WorkerChannel(spec.fds.events)
        _watch_parent(spec.fds.control)
        if spec.stack_file:
            register_dump_handler(spec.stack_file)
        code = _serve(spec, channel)
    finally:
        _flush_std_streams()
        os._exit(code)


# ----------------------------------------------------------------- process setup
def _isolate(parent_pid: int) -> None:
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    _set_parent_death_signal()
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    # Whatever this worker forks (DataLoader workers, ...) dies with it too.
    os.register_at_fork(after_in_child=_set_parent_death_signal)


def _load_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Looked up once: an at-fork hook must not dlopen in a child of a multi-threaded process.
_prctl = _load_prctl()


def _set_parent_death_signal() -> None:
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # else the control-pipe watchdog covers it


def _own_descriptors(spec: WorkerSpec) -> None:
    for fd in spec.close_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(spec.fds.stdout, 1)
    os.dup2(spec.fds.stderr, 2)
    os.close(spec.fds.stdout)
    os.close(spec.fds.stderr)
    # Fresh Python streams on the redirected fds. In a forked kernel the inherited
    # sys.stdout is ipykernel's OutStream, which talks to threads that do not exist here.
    sys.stdin = open(0, "r", closefd=False)
    sys.stdout = sys.__stdout__ = _line_stream(1)
    sys.stderr = sys.__stderr__ = _line_stream(2)


def _line_stream(fd: int) -> io.TextIOWrapper:
    raw = open(fd, "wb", buffering=0, closefd=False)
    return io.TextIOWrapper(io.BufferedWriter(raw), encoding="utf-8", errors="backslashreplace",
                            line_buffering=True, write_through=False)


def _watch_parent(control_fd: int) -> None:
    def watch() -> None:
        while True:
            try:
                data = os.read(control_fd, 4096)
            except InterruptedError:
                continue
            except OSError:
                data = b""
            if not data:  # EOF: the parent is gone; take down this worker and its children
                _flush_std_streams()
                if os.getpgrp() == os.getpid():
                    os.killpg(0, signal.SIGKILL)
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="notebook_launcher-watchdog", daemon=True).start()


def _start_heartbeat(channel: ch.WorkerChannel) -> None:
    """Beat while the main thread's Python stack moves; a rank blocked in one call (a
    collective that a peer never joins) goes quiet, which is what stall detection sees."""
    main = threading.main_thread().ident

    def beat() -> None:
        last = None
        while True:
            time.sleep(HEARTBEAT_INTERVAL)
            frame = sys._current_frames().get(main)
            where = _stack_signature(frame)
            if where != last:
                channel.post(ch.HEARTBEAT, {"t": time.monotonic()})
                last = where

    threading.Thread(target=beat, name="notebook_launcher-heartbeat", daemon=True).start()


def _stack_signature(frame) -> tuple:
    signature = []
    while frame is not None:
        signature.append((id(frame), frame.f_lasti))
        frame = frame.f_back
    return tuple(signature)


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


# ----------------------------------------------------------------- the task
def _serve(spec: WorkerSpec, channel: ch.WorkerChannel) -> int:
    """Set the worker up once, then run tasks; returns the process exit code.

    A one-shot launch has exactly one task. The loop is the seam for a persistent
    session, where later tasks would arrive on the control pipe.
    """
    try:
        _prepare(spec, channel)
        channel.send(ch.READY, {"pid": os.getpid(), "backend": spec.backend, "device": spec.device})
        _start_heartbeat(channel)
    except BaseException as exc:
        _report_error(channel, exc)
        return 1
    for task in _tasks(spec):
        code = _run_task(spec, channel, task)
        if code != 0:
            return code
    _destroy_process_group()
    channel.close()
    return 0


def _tasks(spec: WorkerSpec):
    """Tasks to run: a `Task` (fork) or its dill bytes (spawn), unpickled by `_run_task`."""
    yield spec.task if spec.task is not None else spec.task_blob


def _run_task(spec: WorkerSpec, channel: ch.WorkerChannel, task) -> int:
    """Call the function, then send its value (or its error); returns an exit code."""
    try:
        if isinstance(task, bytes):
            task = loads_task(task)
        value = task.function(*task.args, **task.kwargs)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            _report_error(channel, exc)
            return exc.code if isinstance(exc.code, int) else 1
        value = None  # sys.exit(0) in the function is a normal end
    except BaseException as exc:
        _report_error(channel, exc)
        return 1
    try:
        _finish_together()
        _send_result(spec, channel, value)
    except BaseException as exc:
        _report_error(channel, exc)
        return 1
    return 0


def _prepare(spec: WorkerSpec, channel: ch.WorkerChannel) -> None:
    os.environ.update(spec.env)
    import torch

    torch.set_num_threads(spec.num_threads)
    context.install(context.WorkerContext(
        rank=spec.rank, local_rank=spec.local_rank, world_size=spec.world_size,
        local_world_size=spec.local_world_size, device=spec.device, backend=spec.backend,
        mixed_precision=spec.mixed_precision, restart_count=spec.restart_count,
        pid=os.getpid(), channel=channel,
    ))
    if spec.device.startswith("cuda"):
        _pin_cuda_device(torch, spec.local_rank)
    linecache.cache.update(spec.notebook_sources)
    _init_process_group(spec)


def _pin_cuda_device(torch, local_rank: int) -> None:
    try:
        torch.cuda.set_device(local_rank)
    except RuntimeError as exc:
        if "forked subprocess" in str(exc) or "initialization error" in str(exc):
            raise RuntimeError(
                "CUDA was initialized in the notebook before this forked worker started, so "
                "the worker cannot use the GPU. Relaunch with start_method='spawn' (or leave "
                "start_method='auto'), or restart the kernel and keep CUDA calls inside the "
                "launched function."
            ) from exc
        raise


def _init_process_group(spec: WorkerSpec) -> None:
    import torch.distributed as dist

    from .process_group import init_default_group, wait_for_every_rank

    if spec.rdzv_timeout is not None:
        wait_for_every_rank(spec.world_size, spec.rdzv_timeout)
    init_default_group(dist, spec.backend, spec.rank, spec.world_size, spec.device)
    from ..integrations import prepare_accelerate

    prepare_accelerate(cpu=spec.device == "cpu")


def _finish_together() -> None:
    """Wait for every rank before leaving: a rank that exits while a peer is still
    connecting (a function with no collective returns at once) breaks the peer's setup."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":  # name the device, or NCCL guesses it and warns
            import torch

            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _destroy_process_group() -> None:
    """NCCL communicators are torn down explicitly (the driver frees them cleanly and NCCL
    does not warn). A gloo group holds only sockets and threads, which the exiting process
    releases anyway: its destroy (about 20 ms, a third of a whole launch) is skipped."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "gloo":
        return
    try:
        dist.destroy_process_group()
    except Exception:
        pass


def _send_result(spec: WorkerSpec, channel: ch.WorkerChannel, value: Any) -> None:
    if not spec.send_result:
        channel.send(ch.RESULT, {"value": None, "pickler": None})
        return
    try:
        blob, pickler = dumps_result(value)
    except Exception as exc:
        raise TypeError(
            f"rank {spec.rank}'s return value ({type(value).__name__}) could not be pickled: {exc}. "
            "Return plain data (numbers, lists, dicts, tensors, a state_dict) instead."
        ) from None
    channel.send(ch.RESULT, {"value": blob, "pickler": pickler})


def _report_error(channel: ch.WorkerChannel, exc: BaseException) -> None:
    when = time.monotonic()
    text = "".join(traceback.format_exception(type(exc), exc, _user_frames(exc.__traceback__)))
    message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    payload = {
        "message": message.splitlines()[0] if message else type(exc).__name__,
        "traceback": text,
        "exc_type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "exception": _pickled_exception(exc),
        "secondary": _lost_a_peer(exc),
        "t": when,
    }
    try:
        channel.send(ch.ERROR, payload)
    except OSError:
        pass  # parent gone


def _lost_a_peer(exc: BaseException) -> bool:
    """A collective failing because another rank died (not the user's own socket error)."""
    distributed = type(exc) is RuntimeError or "Dist" in type(exc).__name__
    return distributed and bool(_SECONDARY_ERROR.search(str(exc)))


def _user_frames(tb):
    """Drop this module's frames from the top of a traceback."""
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return tb


def _pickled_exception(exc: BaseException) -> Optional[bytes]:
    import pickle

    from ..serialization import dumps_cpu

    try:
        blob = dumps_cpu(exc)  # a CUDA tensor in the exception must not initialize CUDA in the kernel
        pickle.loads(blob)  # some exceptions pickle but cannot be rebuilt
        return blob
    except Exception:
        return None
