"""A rank's heartbeat: a `channel.Heartbeat` each second in which its main thread shows a
sign of work. Stall detection and a session's patience with a peer after a failure both
rest on it, in the notebook, whatever carries the messages (a pipe, Ray, a socket).

What counts as work, looked at from a thread of the rank's own (never from the notebook:
the rank may be on another machine):

- **the main thread's Python stack moved**: sampled `SAMPLES` times a second, a frame or
  instruction that changed between two samples. A loop around a C call (``a @ a``,
  with the GIL released inside) returns to Python between calls and is seen at
  different instructions.
- **Python is computing**: the main thread used CPU time in the second *and* it held the
  GIL (this thread, waking from a short sleep, mostly had to wait for it). A tight pure
  Python loop sits on one instruction at every sample, but it keeps the GIL busy.

What does not: a thread blocked in ``time.sleep`` or in a collective its peer never joins
(no CPU, or CPU spent spinning in C with the GIL released, as a CUDA synchronize waiting
for a stuck NCCL kernel does). Such a rank goes quiet, which is what stall detection sees.
"""

from __future__ import annotations

import sys
import threading
import time

INTERVAL = 1.0      # seconds between beats (at most)
SAMPLES = 10        # looks at the main thread's stack per interval
GIL_WAIT = 0.002    # a wake-up this much later than asked means the GIL was held by another thread


def start(post) -> threading.Thread:
    """Start the heartbeat thread; ``post(message)`` sends without blocking.

    Example::

        heartbeat.start(channel.post)
    """
    main = threading.main_thread()
    thread = threading.Thread(target=_beat, args=(post, main.ident, main.native_id),
                              name="notebook_launcher-heartbeat", daemon=True)
    thread.start()
    return thread


def _beat(post, main_ident: int, main_tid: int) -> None:
    from ..channel import Heartbeat

    last_stack, last_cpu = None, _thread_cpu(main_tid)
    nap = INTERVAL / SAMPLES
    while True:
        moved, gil_held = False, 0
        for _ in range(SAMPLES):
            asked = time.perf_counter()
            time.sleep(nap)
            if time.perf_counter() - asked - nap > GIL_WAIT:
                gil_held += 1
            stack = stack_signature(sys._current_frames().get(main_ident))
            moved = moved or (last_stack is not None and stack != last_stack)
            last_stack = stack
        cpu = _thread_cpu(main_tid)
        computing = cpu is not None and last_cpu is not None and cpu > last_cpu and gil_held * 2 > SAMPLES
        last_cpu = cpu
        if moved or computing:
            post(Heartbeat(time.monotonic()))


def stack_signature(frame) -> tuple:
    """Which frames, at which instruction: changes when the thread runs Python."""
    signature = []
    while frame is not None:
        signature.append((id(frame), frame.f_lasti))
        frame = frame.f_back
    return tuple(signature)


def _thread_cpu(tid: int):
    """CPU time one thread of this process has used, in clock ticks (None off Linux)."""
    try:
        with open(f"/proc/self/task/{tid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        return int(fields[11]) + int(fields[12])   # utime, stime: fields 14 and 15 of proc(5)
    except (OSError, IndexError, ValueError):
        return None
