"""A rank's heartbeat: a `channel.Heartbeat` every `INTERVAL` seconds in which its main thread shows a
sign of work. Stall detection and a session's patience with a peer after a failure both
rest on it, in the notebook, whatever carries the messages (a pipe, Ray, a socket).

What counts as work, looked at from a thread of the rank's own (never from the notebook:
the rank may be on another machine):

- **the main thread's Python stack moved**: sampled `SAMPLES` times an interval, a frame or
  instruction that changed between two samples.
- **it is computing**: the main thread used CPU time in the interval, and either it held
  the GIL (this thread, waking from a short sleep, mostly had to wait for it: a tight
  pure Python loop, which sits on one instruction at every sample) or its stack moved
  within the last `RECENT` seconds (a loop around one long C call, ``a @ a`` or
  ``loss.backward()`` with the GIL released, is mostly sampled inside that call, but
  now and then between two of them).

- **it finished its function and waits for the others** in the launcher's final barrier
  (`waiting_for_peers`): it is not the one that is stuck. It says so at once
  (``Heartbeat(waiting=True)``), so the notebook stops watching it rather than guess from
  the timing of its beats.

What does not: a thread blocked in ``time.sleep`` or in a collective its peer never joins
(no CPU), or spinning in one C call with the GIL released for more than `RECENT`
seconds, as a CUDA synchronize waiting for a stuck NCCL kernel does. Such a rank goes
quiet, which is what stall detection sees (`RECENT` seconds late at most).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time

INTERVAL = 0.5      # seconds between beats (at most): a quiet rank's last beat is this late at most
SAMPLES = 10        # looks at the main thread's stack per interval
RECENT = 10.0       # seconds a stack movement keeps counting a busy CPU as work
GIL_WAIT = 0.002    # a wake-up this much later than asked means the GIL was held by another thread


_WAITING_FOR_PEERS = threading.Event()


@contextlib.contextmanager
def waiting_for_peers():
    """Around the launcher's own wait for the other ranks: this rank beats meanwhile.

    Example::

        with waiting_for_peers():
            dist.barrier()
    """
    _WAITING_FOR_PEERS.set()
    try:
        yield
    finally:
        _WAITING_FOR_PEERS.clear()


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
    """One window of `INTERVAL` seconds (by the clock, however late this thread is woken
    on a busy machine) after another: a beat as soon as the stack moves, else at the
    window's end if the main thread was computing."""
    from ..channel import Heartbeat

    # A rank that just started is moving (its first sample has nothing to compare with).
    last_stack, last_cpu, moved_at = None, _thread_cpu(main_tid), time.monotonic()
    nap, said_waiting = INTERVAL / SAMPLES, False
    while True:
        window_end, beaten, looks, gil_held = time.monotonic() + INTERVAL, False, 0, 0
        while time.monotonic() < window_end:
            asked = time.perf_counter()
            time.sleep(nap)
            looks += 1
            waiting = _WAITING_FOR_PEERS.is_set()
            if waiting and not said_waiting:
                post(Heartbeat(time.monotonic(), waiting=True))
            said_waiting = waiting
            if time.perf_counter() - asked - nap > GIL_WAIT:
                gil_held += 1
            stack = stack_signature(sys._current_frames().get(main_ident))
            if last_stack is not None and stack != last_stack:
                moved_at = time.monotonic()
                if not beaten:
                    post(Heartbeat(moved_at))
                    beaten = True
            last_stack = stack
        cpu = _thread_cpu(main_tid)
        busy = cpu is not None and last_cpu is not None and cpu > last_cpu
        last_cpu = cpu
        computing = busy and (gil_held * 2 > looks or time.monotonic() - moved_at < RECENT)
        if not beaten and (computing or said_waiting):   # a waiting rank is still alive
            post(Heartbeat(time.monotonic(), waiting=said_waiting))


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
