"""The message protocol between the notebook process and its ranks.

Every message is a small frozen dataclass below, carried in an `Envelope` that names
the task it belongs to (``task_id``; 0 for messages outside any task, like `RankReady`).
One frame on a pipe is an 8-byte big-endian length, then the pickled envelope (or a
`Batch` of them). The framing does not care what carries the bytes: a pipe today, a
socket when ranks live on other machines.

Worker -> parent (the events pipe):
- `RankReady`: set up, process group formed; waiting for tasks.
- `Report`, `ProgressUpdate`: `report()` and `progress()` from the running task.
- `Heartbeat`: the worker's main thread moved since the last beat; ``waiting=True``: its
  function returned and it waits for its peers in the launcher's final barrier.
- `DeviceStats`: what torch allocated on the rank's GPU (and its peak) and the fp16 loss scale,
  when they change (`workers/device_stats.py`, looked at once a second); never a sign of life.
- `TaskDone`: the task returned (its value pickled, or a `serialization.Parcel` when it has
  tensor or array data; None for ranks that send none).
- `TaskFailed`: the task raised; built into a `errors.Failure` in one place
  (`errors.failure_from`).

Parent -> worker (the control pipe): `TaskRequest` (run one task), `Shutdown`, and
`AbortGroup` (handled at once by the thread that reads the pipe, not queued as a task).
Big tensor data travels beside the frames, not in them, between processes of one machine
(`shared_memory`): a request names the notebook's memory file and its inbox.
EOF closes the control pipe: the worker takes it as "the parent is gone".

Two ways for a worker to send, for two kinds of messages:
- `WorkerChannel.send` writes a frame now, blocking until the parent has it: for
  messages that must arrive (ready, done, failed).
- `WorkerChannel.post` never blocks the training loop: it appends to a bounded queue
  that a background thread (started with the channel) flushes every `FLUSH_INTERVAL`
  seconds as one `Batch` frame.
  When the parent falls behind, the oldest queued messages are dropped.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Union

_HEADER = struct.Struct("!Q")

FLUSH_INTERVAL = 0.1     # seconds between background flushes of posted messages
QUEUE_LIMIT = 10_000     # posted messages kept while the parent is slow (oldest dropped first)


# ----------------------------------------------------------------- worker -> parent
@dataclass(frozen=True)
class RankReady:
    pid: int
    backend: str
    device: str


@dataclass(frozen=True)
class Report:
    step: Optional[int]
    values: dict          # name -> float (empty for ranks that are not plotted)
    t: float


@dataclass(frozen=True)
class ProgressUpdate:
    n: int
    total: Optional[int]
    desc: Optional[str]
    depth: int
    t: float


@dataclass(frozen=True)
class Heartbeat:
    t: float
    waiting: bool = False            # its function returned: it waits in the launcher's final barrier


@dataclass(frozen=True)
class TaskDone:
    value: Any = None                # bytes or a `serialization.Parcel`; None: this rank was not asked for its value
    pickler: Optional[str] = None    # "pickle" | "dill"


@dataclass(frozen=True)
class TaskFailed:
    message: str                     # one line, e.g. "ValueError: bad batch"
    traceback: str                   # the remote traceback, notebook lines included
    exc_type: str                    # qualified name of the exception type
    exception: Optional[bytes]       # the exception pickled, when it could be rebuilt
    secondary: bool                  # looks like a consequence of another rank's failure
    t: float                         # time.monotonic() when it happened
    exitcode: Optional[int] = None   # sys.exit(code) in the task; None for an exception


@dataclass(frozen=True)
class DeviceStats:
    """A rank's own device facts, posted when they change (at most once a second, and
    once more before the task's end): its CUDA memory, and its fp16 grad scaler.
    Fields are None where the rank has no such thing (no CUDA yet, no scaler)."""

    device: Optional[int]            # the CUDA device index this rank uses (its own numbering)
    allocated: Optional[int]         # bytes allocated by torch now
    peak: Optional[int]              # bytes at the peak of torch's allocations (max_memory_allocated)
    reserved: Optional[int]          # bytes held by torch's caching allocator
    t: float
    loss_scale: Optional[float] = None   # the GradScaler's scale (fp16)
    skipped_steps: Optional[int] = None  # optimizer steps it skipped (inf/nan gradients)


# ----------------------------------------------------------------- parent -> worker
@dataclass(frozen=True)
class TaskRequest:
    blob: bytes                      # the task (`workers.tasks`), pickled with dill (plain pickle: not ``by_value``)
    send_value: Union[bool, frozenset]   # return the value, only say it is done, or: the ranks that return it
    sources: dict = field(default_factory=dict)  # notebook cells for tracebacks (linecache entries)
    buffers: Optional[list] = None   # the task's out-of-band buffers, inline
    shared: Any = None               # or a `shared_memory.SharedRef` to them (ranks of the notebook's machine)
    inbox: Optional[bytes] = None    # where a big value goes back (`shared_memory.Inbox`); None: inline
    by_value: bool = True            # pickled with dill; False: a task of plain data, plain pickle


@dataclass(frozen=True)
class Shutdown:
    """Leave the task loop and exit cleanly."""


@dataclass(frozen=True)
class AbortGroup:
    """Abort this rank's process groups now, from the thread that reads the control pipe
    (the main thread may be blocked in a collective): every rank's abort releases its peers
    (`workers.process_group.abort`). The session then runs a `process_group.Regroup` task."""


@dataclass(frozen=True)
class Envelope:
    task_id: int
    message: Any


@dataclass(frozen=True)
class Batch:
    envelopes: list


# ----------------------------------------------------------------- framing
def encode(envelope: Any) -> bytes:
    body = pickle.dumps(envelope, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


class FrameDecoder:
    """Turns a byte stream into envelopes, whatever the chunking."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._need = _HEADER.size
        self._in_body = False

    def feed(self, data: bytes) -> Iterator[Envelope]:
        envelopes: list = []
        if not self._chunks and not self._in_body:   # the usual case: whole frames, decoded in place
            data = _whole_frames(data, envelopes)
        if data:
            self._chunks.append(data)
            self._buffered += len(data)
            self._complete_frames(envelopes)
        yield from envelopes

    def _complete_frames(self, envelopes: list) -> None:
        while self._buffered >= self._need:
            blob = b"".join(self._chunks)
            frame, rest = blob[: self._need], blob[self._need :]
            self._chunks = [rest] if rest else []
            self._buffered = len(rest)
            if self._in_body:
                self._need, self._in_body = _HEADER.size, False
                _unpack(pickle.loads(frame), envelopes)
            else:
                (self._need,) = _HEADER.unpack(frame)
                self._in_body = True

    @property
    def pending_bytes(self) -> int:
        return self._buffered


def _whole_frames(data: bytes, envelopes: list) -> bytes:
    """Decode the frames ``data`` holds whole into ``envelopes``, without copying it;
    returns the rest (the start of a frame)."""
    view, offset, size = memoryview(data), 0, len(data)
    while size - offset >= _HEADER.size:
        (need,) = _HEADER.unpack_from(view, offset)
        end = offset + _HEADER.size + need
        if end > size:
            break
        _unpack(pickle.loads(view[offset + _HEADER.size:end]), envelopes)
        offset = end
    return data[offset:] if offset else data


def _unpack(decoded: Any, envelopes: list) -> None:
    if isinstance(decoded, Batch):
        envelopes.extend(decoded.envelopes)
    else:
        envelopes.append(decoded)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class WorkerChannel:
    """Worker side of the events pipe. ``task_id`` is the task running now; every
    message sent or posted is stamped with it."""

    def __init__(self, fd: int) -> None:
        self.task_id = 0
        self._fd = fd
        self._pid = os.getpid()
        self._queue: collections.deque = collections.deque(maxlen=QUEUE_LIMIT)
        self._wake = threading.Event()
        self._stop = False
        self._lock = threading.Lock()  # one writer at a time on the pipe
        # Started now, not at the first post: a rank's threads are the same from its start
        # (heartbeats post at random moments; a leak check counts threads).
        self._flusher = threading.Thread(target=self._flush_loop, name="notebook_launcher-channel", daemon=True)
        self._flusher.start()

    def send(self, message: Any) -> None:
        """Write one message now (after anything posted before it)."""
        self._flush(encode(Envelope(self.task_id, message)))

    def post(self, message: Any) -> None:
        """Queue a message for the background flusher; never blocks."""
        if os.getpid() != self._pid:  # a process forked from the worker (DataLoader): not ours
            return
        self._queue.append(Envelope(self.task_id, message))

    def flush(self) -> None:
        """Send what was posted so far, now."""
        self._flush()

    def close(self) -> None:
        """Flush what was posted and stop the flusher."""
        self._stop = True
        self._wake.set()
        self._flusher.join(timeout=5)
        self._flush()

    def _flush_loop(self) -> None:
        while not self._stop:
            self._wake.wait(FLUSH_INTERVAL)
            try:
                self._flush()
            except OSError:  # parent gone: the watchdog ends this process
                return

    def _drain_posted(self) -> bytes:
        batch = []
        while self._queue:   # only this thread takes from it (under the lock); others append
            batch.append(self._queue.popleft())
        return encode(Batch(batch)) if batch else b""

    def _flush(self, extra: bytes = b"") -> None:
        # Drain under the lock so posted messages and sent ones keep their order.
        with self._lock:
            posted = self._drain_posted()
            if posted:
                write_all(self._fd, posted)
            if extra:
                write_all(self._fd, extra)
