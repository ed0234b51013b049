"""Interrupts (the notebook's stop button) while we hold things that must be released."""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def interrupts_deferred():
    """Hold an Interrupt until the block is done, then deliver it: a teardown or a frame
    being written is never cut in half.

    Example::

        with interrupts_deferred():
            group.close(graceful=False, term_grace=0)   # runs to its end, then KeyboardInterrupt
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pressed:
            raise KeyboardInterrupt
