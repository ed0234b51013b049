"""The worker-to-parent message protocol.

Each message is one frame: an 8-byte big-endian length, then a pickled tuple
``(kind, payload)``. Kinds are the constants below; payloads are plain Python data.

Two ways to send, for two kinds of messages:
- `WorkerChannel.send` writes a frame now, blocking until the parent has it: for
  messages that must arrive (ready, result, error).
- `WorkerChannel.post` never blocks the training loop: it appends to a bounded queue
  that a background thread flushes every `FLUSH_INTERVAL` seconds as one batch frame.
  When the parent falls behind, the oldest queued messages are dropped.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
import threading
from typing import Any, Iterator

_HEADER = struct.Struct("!Q")

# Message kinds (worker -> parent).
READY = "ready"          # {"pid", "backend", "device"}: process group ready, user function starting
BATCH = "batch"          # [(kind, payload), ...]: posted messages, flushed together
METRICS = "metrics"      # {"step", "values": {name: float}, "t"}
PROGRESS = "progress"    # {"n", "total", "desc", "depth", "t"}
HEARTBEAT = "heartbeat"  # {"t"}: the worker's main thread moved since the last beat
RESULT = "result"        # {"value": bytes | None, "pickler": "pickle" | "dill" | None}
ERROR = "error"          # {"message", "traceback", "exc_type", "exception": bytes | None, "secondary", "t"}

FLUSH_INTERVAL = 0.1     # seconds between background flushes of posted messages
QUEUE_LIMIT = 10_000     # posted messages kept while the parent is slow (oldest dropped first)


def encode(kind: str, payload: Any) -> bytes:
    body = pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


class FrameDecoder:
    """Parent side: turns a byte stream into messages, whatever the chunking."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._need = _HEADER.size
        self._in_body = False

    def feed(self, data: bytes) -> Iterator[tuple[str, Any]]:
        self._chunks.append(data)
        self._buffered += len(data)
        while self._buffered >= self._need:
            blob = b"".join(self._chunks)
            frame, rest = blob[: self._need], blob[self._need :]
            self._chunks = [rest] if rest else []
            self._buffered = len(rest)
            if self._in_body:
                self._need, self._in_body = _HEADER.size, False
                yield from _unbatch(pickle.loads(frame))
            else:
                (self._need,) = _HEADER.unpack(frame)
                self._in_body = True

    @property
    def pending_bytes(self) -> int:
        return self._buffered


def _unbatch(message: tuple[str, Any]) -> Iterator[tuple[str, Any]]:
    kind, payload = message
    if kind == BATCH:
        yield from payload
    else:
        yield message


class WorkerChannel:
    """Worker side of the channel. Owns the write end of the events pipe."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pid = os.getpid()
        self._queue: collections.deque = collections.deque(maxlen=QUEUE_LIMIT)
        self._wake = threading.Event()
        self._stop = False
        self._lock = threading.Lock()  # one writer at a time on the pipe
        self._flusher: threading.Thread | None = None

    def send(self, kind: str, payload: Any) -> None:
        """Write one message now (after anything posted before it)."""
        self._flush(encode(kind, payload))

    def post(self, kind: str, payload: Any) -> None:
        """Queue a message for the background flusher; never blocks."""
        if os.getpid() != self._pid:  # a process forked from the worker (DataLoader): not ours
            return
        self._queue.append((kind, payload))
        if self._flusher is None:
            self._start_flusher()

    def flush(self) -> None:
        """Send what was posted so far, now."""
        self._flush()

    def close(self) -> None:
        """Flush what was posted and stop the flusher."""
        self._stop = True
        self._wake.set()
        if self._flusher is not None:
            self._flusher.join(timeout=5)
        self._flush()

    def _start_flusher(self) -> None:
        self._flusher = threading.Thread(target=self._flush_loop, name="notebook_launcher-channel", daemon=True)
        self._flusher.start()

    def _flush_loop(self) -> None:
        while not self._stop:
            self._wake.wait(FLUSH_INTERVAL)
            try:
                self._flush()
            except OSError:  # parent gone: the watchdog ends this process
                return

    def _drain_posted(self) -> bytes:
        batch = []
        while True:
            try:
                batch.append(self._queue.popleft())
            except IndexError:
                break
        return encode(BATCH, batch) if batch else b""

    def _flush(self, extra: bytes = b"") -> None:
        # Drain under the lock so posted messages and sent ones keep their order.
        with self._lock:
            for data in (self._drain_posted(), extra):
                view = memoryview(data)
                while view:
                    written = os.write(self._fd, view)
                    view = view[written:]
