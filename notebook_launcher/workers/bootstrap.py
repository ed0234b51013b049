"""What runs inside a worker process, from its first instruction to `os._exit`.

Order matters and each step says why:
1. isolate: own process group (an Interrupt aimed at the kernel's group does not spray
   tracebacks from workers; teardown can kill the worker with everything it forked),
   parent-death signal, and the same signal for anything the worker forks later.
2. own the file descriptors: close the parent's ends, put our pipes on fds 1 and 2 (so
   C-level output from gloo/NCCL is captured), stdin from /dev/null.
3. watch the parent: a thread reads the control pipe (task requests); EOF means the
   parent is gone.
4. environment, threads, device, process group; then tasks, each with its value or its
   error: one task for a one-shot launch, tasks until `Shutdown` for a session. A task's
   exception is that task's error; the worker lives on (loky's worker loop is the model).
5. `os._exit`: a forked copy of a Jupyter kernel must never run the kernel's atexit hooks.
"""

from __future__ import annotations

import ctypes
import io
import linecache
import os
import queue
import re
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Optional

from .. import channel as ch
from ..reporting import progress, report   # here, not in the rank: a forked rank finds it imported
from ..shared_memory import inherited_inbox
from . import context, device_stats, heartbeat
from .frames import user_traceback
from .process_group import abort, init_default_group, wait_for_every_rank   # light: torch only when called
from .stacks import register_dump_handler

PR_SET_PDEATHSIG = 1

# Errors that a rank raises because ANOTHER rank died: never the root cause.
_SECONDARY_ERROR = re.compile(
    r"closed by peer|reset by peer|broken pipe|connection refused|communicator was aborted"
    r"|remote process exited|NCCL communicator.*abort|Connection closed|peer.*(?:closed|disconnect)"
    r"|connection was likely closed|server has shut down",   # the store, served by rank 0 on a cluster
    re.IGNORECASE,
)


@dataclass
class InheritedFds:
    """The child's ends of its four pipes (same numbers in the child as in the parent),
    and for the one rank that serves the rendezvous store (a node agent's first rank),
    the store's listening socket."""

    events: int
    stdout: int
    stderr: int
    control: int
    store: Optional[int] = None

    def __getstate__(self):
        # When multiprocess pickles us for a spawned child, ask it to pass these fds along.
        from multiprocess import context as mp_context

        popen = mp_context.get_spawning_popen()
        if popen is not None:
            for fd in (self.events, self.stdout, self.stderr, self.control, self.store):
                if fd is not None:
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
    persistent: bool = False        # a session: keep taking tasks; else exit after the first
    close_fds: tuple = ()           # parent-side fds a forked child inherited and must close
    first_task: Optional[Any] = None   # fork: a `tasks.Call` inherited as is, never pickled
    first_request: Optional[ch.TaskRequest] = None  # spawn: the first task, pickled
    first_task_id: int = 1
    send_result: bool = False       # the first task's value is wanted from this rank
    stack_file: Optional[str] = None       # where faulthandler dumps this worker's stacks on SIGUSR1
    rdzv_timeout: Optional[float] = None   # multi-node: how long to wait for every rank to arrive


def worker_main(spec: WorkerSpec) -> None:
    """Entry point of every worker process. Never returns."""
    code = 1
    try:
        _isolate(spec.parent_pid)
        try:
            _own_descriptors(spec)
        except BaseException:  # no channel yet: fd 2 is where the parent can still see why
            os.write(2, f"[rank{spec.rank}] worker setup failed:\n{traceback.format_exc()}".encode(errors="replace"))
            raise
        channel = ch.WorkerChannel(spec.fds.events)
        requests = _read_control(spec.fds.control)
        if spec.stack_file:
            register_dump_handler(spec.stack_file)
        code = _serve(spec, channel, requests)
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
    kernel_streams = {id(sys.stdout): "stdout", id(sys.stderr): "stderr"}
    sys.stdout = sys.__stdout__ = _line_stream(1)
    sys.stderr = sys.__stderr__ = _line_stream(2)
    _reattach_log_handlers(kernel_streams)


def _reattach_log_handlers(kernel_streams: dict) -> None:
    """Logging handlers set up in the notebook before the launch (``basicConfig``,
    transformers', Lightning's) write to the kernel's streams, which bypass our capture:
    their lines would lack the rank prefix and miss the dashboard's log. Point them at this
    worker's own stdout/stderr. (The stream is swapped without flushing the old one, which
    belongs to threads a forked worker does not have.)

    The handlers come from logging's own weak list of every live handler (each adds itself
    in ``Handler.__init__``, for `logging.shutdown`), a few dozen, attached to a logger or
    not; walking every logger
    instead (hundreds with lightning and accelerate imported) copied a page per logger in
    a forked worker, 2-10 ms. Where that list is missing, every logger is walked."""
    logging = sys.modules.get("logging")
    if logging is None:
        return
    refs = getattr(logging, "_handlerList", None)
    if isinstance(refs, list):
        handlers = [handler for handler in (ref() for ref in list(refs)) if handler is not None]
    else:
        loggers = [logging.getLogger(), *(logger for logger in list(logging.Logger.manager.loggerDict.values())
                                          if isinstance(logger, logging.Logger))]
        handlers = [handler for logger in loggers for handler in logger.handlers]
    for handler in handlers:
        if not isinstance(handler, logging.StreamHandler) or isinstance(type(handler).__dict__.get("stream"), property):
            continue  # e.g. logging's _StderrHandler (dill has one): its stream follows sys.stderr already
        name = kernel_streams.get(id(handler.__dict__.get("stream")))
        if name is not None:
            handler.stream = getattr(sys, name)


def _line_stream(fd: int) -> io.TextIOWrapper:
    raw = open(fd, "wb", buffering=0, closefd=False)
    return io.TextIOWrapper(io.BufferedWriter(raw), encoding="utf-8", errors="backslashreplace",
                            line_buffering=True, write_through=False)


def _read_control(control_fd: int) -> "queue.SimpleQueue":
    """A thread reads task requests from the control pipe into a queue; EOF means the
    parent is gone, and takes down this worker and everything it forked."""
    requests: queue.SimpleQueue = queue.SimpleQueue()

    def read() -> None:
        decoder = ch.FrameDecoder()
        while True:
            try:
                data = os.read(control_fd, 1 << 16)
            except InterruptedError:
                continue
            except OSError:
                data = b""
            if not data:
                _flush_std_streams()
                if os.getpgrp() == os.getpid():
                    os.killpg(0, signal.SIGKILL)
                os.kill(os.getpid(), signal.SIGKILL)
            for envelope in decoder.feed(data):
                if isinstance(envelope.message, ch.AbortGroup):  # the main thread may be blocked in a collective
                    try:
                        abort()
                    except BaseException as exc:   # this thread must live on: it reads Regroup, Shutdown and EOF
                        print(f"notebook_launcher: aborting the process group failed: {exc!r}", file=sys.stderr)
                else:
                    requests.put(envelope)

    threading.Thread(target=read, name="notebook_launcher-watchdog", daemon=True).start()
    return requests


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


# ----------------------------------------------------------------- the tasks
def _serve(spec: WorkerSpec, channel: ch.WorkerChannel, requests) -> int:
    """Set the worker up once, then run tasks; returns the process exit code."""
    try:
        _prepare(spec, channel)
        channel.send(ch.RankReady(os.getpid(), spec.backend, spec.device))
        heartbeat.start(channel.post)
        global _device_poster
        _device_poster = device_stats.start(channel.post)
    except BaseException as exc:
        _report_error(channel, exc)
        return 1
    namespace = _rank_namespace(spec)
    for task_id, task, send_value in _tasks(spec, requests):
        channel.task_id = task_id
        code = _run_task(spec, channel, task, send_value, namespace)
        channel.task_id = 0
        if not spec.persistent:
            if code == 0:
                _destroy_process_group()
                channel.close()
            return code
    _destroy_process_group()
    channel.close()
    return 0


def _tasks(spec: WorkerSpec, requests):
    """(task_id, task or TaskRequest, send_value): the first task, then requests until
    `Shutdown`."""
    if spec.first_task is not None or spec.first_request is not None:
        yield spec.first_task_id, spec.first_task or spec.first_request, spec.send_result
    while spec.persistent:
        envelope = requests.get()
        if isinstance(envelope.message, ch.Shutdown):
            return
        yield envelope.task_id, envelope.message, _sends_value(envelope.message.send_value, spec.rank)


def _sends_value(send_value, rank: int) -> bool:
    """A request's ``send_value``: for every rank (a bool), or the ranks that return their value."""
    return send_value if isinstance(send_value, bool) else rank in send_value


def _rank_namespace(spec: WorkerSpec) -> dict:
    """The names a ``%%dist`` cell starts with (nbdistributed and ipyparallel users expect
    these): who this rank is, torch and its distributed module, and our reporting."""
    import torch
    import torch.distributed as dist

    return {"__name__": "__main__", "__builtins__": __builtins__, "rank": spec.rank,
            "local_rank": spec.local_rank, "world_size": spec.world_size,
            "device": torch.device(spec.device), "torch": torch, "dist": dist,
            "report": report, "progress": progress}


def _run_task(spec: WorkerSpec, channel: ch.WorkerChannel, task, send_value: bool, namespace: dict) -> int:
    """Run one task, then send its value (or its error); returns an exit code for a
    one-shot worker.

    The parent forwards an Interrupt as SIGINT, and it raises KeyboardInterrupt only
    while the task itself runs: once its end is being sent, an Interrupt is too late (a
    frame cut by it would garble the channel), and an idle worker ignores it.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
    inbox = None
    try:
        try:
            if isinstance(task, ch.TaskRequest):
                linecache.cache.update(task.sources)
                inbox = task.inbox
                from ..serialization import load_request  # torch: once a task comes (an agent never imports it)

                task = load_request(task)      # its buffers inline, or mapped from the notebook's memory file
            else:
                inbox = inherited_inbox()      # a forked one-shot rank: the notebook's, if it is our parent
            value = task.run(namespace)
            if not spec.persistent:
                _finish_together()
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            code = exc.code if isinstance(exc.code, int) else 1
            _report_error(channel, exc, exitcode=code)
            return code
        value = None  # sys.exit(0) in the function is a normal end
    except BaseException as exc:
        _report_error(channel, exc)
        return 1
    try:
        _flush_std_streams()  # the task's last partial line belongs to this call, before its end
        _post_device_stats()
        _send_result(spec, channel, value, send_value, inbox)
    except BaseException as exc:
        _report_error(channel, exc)
        return 1
    return 0


def _prepare(spec: WorkerSpec, channel: ch.WorkerChannel) -> None:
    # An Interrupt reaches a rank only as the parent's SIGINT, and only a running task
    # takes it (`_run_task`); whatever ipykernel left installed is not ours to keep.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.update(spec.env)
    from .noninteractive import behave_as_a_script
    behave_as_a_script()  # a forked kernel's sys.ps1 would make Lightning refuse ddp
    import torch

    if spec.fds.store is not None:
        _serve_store(spec)   # first: the node's other ranks, and every other node's, wait for it
    torch.set_num_threads(spec.num_threads)
    context.install(context.WorkerContext(
        rank=spec.rank, local_rank=spec.local_rank, world_size=spec.world_size,
        local_world_size=spec.local_world_size, device=spec.device, backend=spec.backend,
        mixed_precision=spec.mixed_precision, restart_count=spec.restart_count,
        pid=os.getpid(), channel=channel,
    ))
    if spec.device.startswith("cuda"):
        _pin_cuda_device(torch, spec.local_rank)
    _init_process_group(spec)


_served_store: list = []   # the rendezvous store this rank serves, alive as long as the rank


def _serve_store(spec: WorkerSpec) -> None:
    """Serve the rendezvous store on the socket the node agent reserved: the agent itself
    never imports torch (seconds of CPU beside its ranks' own imports, and its memory)."""
    from ..rendezvous import serve_on

    os.set_inheritable(spec.fds.store, False)   # what the rank starts must not keep the port open after it
    _served_store.append(serve_on(spec.fds.store, spec.env["MASTER_ADDR"], int(spec.env["MASTER_PORT"])))


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

    if spec.rdzv_timeout is not None:
        wait_for_every_rank(spec.world_size, spec.rdzv_timeout)
    init_default_group(dist, spec.backend, spec.rank, spec.world_size, spec.device)
    if spec.stack_file:
        from . import journal
        journal.install(journal.path_for(spec.stack_file))
    from ..integrations import prepare_accelerate

    prepare_accelerate(cpu=spec.device == "cpu")


def _finish_together() -> None:
    """Wait for every rank before leaving: a rank that exits while a peer is still
    connecting (a function with no collective returns at once) breaks the peer's setup."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from .journal import original
        barrier = original(dist.barrier)     # ours, not the person's: the journal leaves it out
        with heartbeat.waiting_for_peers():  # done: never the rank a stall report blames
            if dist.get_backend() == "nccl":  # name the device, or NCCL guesses it and warns
                import torch

                barrier(device_ids=[torch.cuda.current_device()])
            else:
                barrier()


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


def _send_result(spec: WorkerSpec, channel: ch.WorkerChannel, value: Any, send_value: bool,
                 inbox: Optional[bytes] = None) -> None:
    """``inbox``: the notebook's, when it runs on this machine (big values go through
    shared memory, `shared_memory`); None: the value travels inline."""
    if not send_value:
        channel.send(ch.TaskDone())
        return
    try:
        from ..serialization import dumps_result

        blob, pickler = dumps_result(value, inbox)
    except Exception as exc:
        raise TypeError(
            f"rank {spec.rank}'s return value ({type(value).__name__}) could not be pickled: {exc}. "
            "Return plain data (numbers, lists, dicts, tensors, a state_dict) instead."
        ) from None
    channel.send(ch.TaskDone(blob, pickler))


_device_poster = None   # posts this rank's device figures (`device_stats.start`), once set up


def _post_device_stats() -> None:
    """The task's last device figures (its final peak), before its result or error."""
    if _device_poster is not None:
        try:
            _device_poster()
        except Exception:
            pass


def _report_error(channel: ch.WorkerChannel, exc: BaseException, exitcode: Optional[int] = None) -> None:
    when = time.monotonic()
    _flush_std_streams()
    _post_device_stats()
    text = "".join(traceback.format_exception(type(exc), exc, user_traceback(exc.__traceback__)))
    message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if device_stats.is_out_of_memory(exc):   # name the rank, its GPU and its memory (errors.py adds what to try)
        ctx = context.current()
        message = f"{type(exc).__name__}: " + device_stats.explain_out_of_memory(
            exc, ctx.rank if ctx else -1, ctx.mixed_precision if ctx else "no")
    failed = ch.TaskFailed(
        message=message.splitlines()[0] if message else type(exc).__name__, traceback=text,
        exc_type=f"{type(exc).__module__}.{type(exc).__qualname__}", exception=_pickled_exception(exc),
        secondary=_lost_a_peer(exc), t=when, exitcode=exitcode,
    )
    try:
        channel.send(failed)
    except OSError:
        pass  # parent gone


def _lost_a_peer(exc: BaseException) -> bool:
    """A collective failing because another rank died (not the user's own socket error)."""
    distributed = type(exc) is RuntimeError or "Dist" in type(exc).__name__
    return distributed and bool(_SECONDARY_ERROR.search(str(exc)))


def _pickled_exception(exc: BaseException) -> Optional[bytes]:
    import pickle

    from ..serialization import dumps_cpu

    try:
        blob = dumps_cpu(exc)  # a CUDA tensor in the exception must not initialize CUDA in the kernel
        pickle.loads(blob)  # some exceptions pickle but cannot be rebuilt
        return blob
    except Exception:
        return None
