"""Interrupts (the notebook's stop button) while we hold things that must be released."""

from __future__ import annotations

import contextlib
import signal
import threading

_holding: list = []   # non-empty while the main thread is in a held block


@contextlib.contextmanager
def interrupts_deferred():
    """Hold an Interrupt until the block is done, then deliver it: a teardown or a frame
    being written is never cut in half. Blocks may nest: the press is delivered when the
    outermost ends (an inner one ending first must not cut the outer one's work in half).

    Example::

        with interrupts_deferred():
            group.close(graceful=False, term_grace=0)   # runs to its end, then KeyboardInterrupt
    """
    if threading.current_thread() is not threading.main_thread() or _holding:
        yield    # another thread never gets SIGINT; inside a held block, the outermost delivers it
        return
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.append(True))
    _holding.append(True)
    try:
        yield
    finally:
        _holding.pop()
        signal.signal(signal.SIGINT, previous)
        if pressed:
            raise KeyboardInterrupt
