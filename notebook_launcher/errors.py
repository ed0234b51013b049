"""Exceptions raised to the notebook cell.

`WorkerError` subclasses torch's `ChildFailedError` so that notebooks written for
HF accelerate's launcher (which lets `ChildFailedError` escape from torch's elastic
agent) keep catching failures with the same ``except`` clause.
"""

from __future__ import annotations

import signal as _signal
from dataclasses import dataclass
from typing import Optional

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure


class LaunchConfigError(ValueError):
    """Bad arguments to `notebook_launcher`, raised before any process starts."""


@dataclass
class Failure:
    """What the parent knows about one failed rank (plain data, picklable)."""

    rank: int
    pid: int
    exitcode: Optional[int] = None      # process exit status; negative = killed by a signal
    message: str = ""                   # one-line summary, e.g. "ValueError: bad batch"
    traceback: str = ""                 # remote traceback text, notebook lines included
    exc_type: str = ""                  # qualified name of the remote exception type
    exception: Optional[BaseException] = None  # the original exception, when it unpickled
    secondary: bool = False             # looks like a consequence of another rank's failure
    timestamp: float = 0.0              # when it happened: the rank's clock on one host, else when the notebook heard
    where: str = ""                     # the node it ran on, e.g. "node 1 (10.0.0.5)"; "" on this machine

    @property
    def signal(self) -> Optional[int]:
        return -self.exitcode if self.exitcode is not None and self.exitcode < 0 else None

    @property
    def signal_name(self) -> Optional[str]:
        if self.signal is None:
            return None
        try:
            return _signal.Signals(self.signal).name
        except ValueError:
            return f"signal {self.signal}"

    def summary(self) -> str:
        if self.message:
            return self.message
        if self.signal is not None:
            return f"killed by {self.signal_name}"
        return f"exited with code {self.exitcode}"


class WorkerError(ChildFailedError):
    """A launched worker failed.

    Attributes:
        rank: the global rank that failed first (the root cause, not a rank that only
            lost its connection to it).
        exitcode: that worker's exit status (negative: killed by a signal).
        signal: the signal number that killed it, or None.
        remote_traceback: the traceback text from the worker, notebook lines included.
        failures: every failed rank, ``{rank: ProcessFailure}`` (torch's type).
        details: every failed rank as our `Failure` record, ``{rank: Failure}``.

    The original exception (when it could be pickled) is chained as ``__cause__``.

    Example::

        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        try:
            notebook_launcher(train, num_processes=2)
        except ChildFailedError as err:      # also catches WorkerError
            print(err.rank, err.remote_traceback)
    """

    def __init__(self, root: Failure, others: Optional[list[Failure]] = None, attempt: int = 0):
        self.root = root
        self.details = {f.rank: f for f in [root, *(others or [])]}
        self.rank = root.rank
        self.exitcode = root.exitcode
        self.signal = root.signal
        self.remote_traceback = root.traceback
        self.attempt = attempt
        self.notes: list = []            # lines said after the error (e.g. "the session is broken")
        self.name = "notebook_launcher"
        self.failures = {r: _as_process_failure(f) for r, f in self.details.items()}
        Exception.__init__(self, self._format())

    def __reduce__(self):
        others = [f for r, f in self.details.items() if r != self.rank]
        return (type(self), (self.root, others, self.attempt))

    def get_first_failure(self):
        return self.rank, self.failures[self.rank]

    def format_msg(self, *_, **__):  # torch's name for the message builder
        return self._format()

    def __str__(self) -> str:
        return self._format()

    def _format(self) -> str:
        root = self.root
        head = f"rank {root.rank}{f' on {root.where}' if root.where else ''} failed: {root.summary()}"
        if root.exitcode not in (None, 0, 1) and root.signal is None and "exit" not in root.summary():
            head += f" (exit code {root.exitcode})"
        parts = [head]
        if out_of_memory(root):
            parts.append(OUT_OF_MEMORY_ADVICE)
        others = [f for r, f in sorted(self.details.items()) if r != root.rank]
        if others:
            parts.append("other ranks: " + "; ".join(f"rank {f.rank}: {f.summary()}" for f in others))
        if root.traceback:
            parts.append(f"\n--- traceback from rank {root.rank} ---\n{root.traceback.rstrip()}")
        parts.extend(getattr(self, "notes", ()))
        return "\n".join(parts)


OUT_OF_MEMORY_ADVICE = (
    "What to try: a smaller batch per rank (activations grow with it); mixed_precision='fp16' (or 'bf16' "
    "on Ampere and newer) if not used yet, which about halves them; gradient accumulation to keep the "
    "effective batch (Accelerator(gradient_accumulation_steps=N) with accelerator.accumulate(model)); "
    "fewer ranks per GPU (one rank per GPU: num_processes at most the GPUs); and where much more is "
    "reserved than allocated, PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True against fragmentation.")


def out_of_memory(failure: Failure) -> bool:
    """A rank's CUDA out-of-memory error (the rank named its GPU and memory in the message)."""
    return failure.exc_type.endswith("OutOfMemoryError") or "CUDA out of memory" in failure.message


def failure_from(rank: int, pid: int, message) -> Failure:
    """The one place a `channel.TaskFailed` message becomes a `Failure`."""
    return Failure(rank=rank, pid=pid, exitcode=message.exitcode, message=message.message,
                   traceback=message.traceback, exc_type=message.exc_type,
                   exception=_unpickle_exception(message.exception), secondary=message.secondary,
                   timestamp=message.t)


def _unpickle_exception(blob: Optional[bytes]) -> Optional[BaseException]:
    if not blob:
        return None
    import pickle

    try:
        exc = pickle.loads(blob)
    except Exception:
        return None
    return exc if isinstance(exc, BaseException) else None


def _as_process_failure(failure: Failure) -> ProcessFailure:
    # torch's ProcessFailure reads an error file in __post_init__; with none it makes up a message.
    pf = ProcessFailure(
        local_rank=failure.rank,
        pid=failure.pid,
        exitcode=failure.exitcode if failure.exitcode is not None else 1,
        error_file="<N/A>",
    )
    if failure.traceback:
        pf.message = {"message": failure.summary(), "extraInfo": {"py_callstack": failure.traceback}}
    return pf
