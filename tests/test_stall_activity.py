"""Stall detection looks for signs of life, not for reports (README, "When things go wrong").

A rank that prints, or computes, for several times ``stall_timeout`` without one
`report()` or progress step is not stalled and must never be reported; a rank blocked
in ``time.sleep`` or in a collective its peer never joins is, and these controls show
that the same launch does report a stall. Every launch here uses ``on_stall="raise"``,
so a stall report is a `WorkerError` naming it: real workers, a real gloo group.
"""

from __future__ import annotations

import re
import time

import pytest
import torch
import torch.distributed as dist

from notebook_launcher import WorkerError, notebook_launcher

STALL = 1.5                # seconds: the stall_timeout of every launch here
BUSY = 4 * STALL + 1.0     # how long the busy ranks keep busy: several whole stall windows

def launch(function, *args):
    """Two CPU ranks, a short stall_timeout, and a stall raises; every rank's value."""
    return notebook_launcher(function, args=args, num_processes=2, device="cpu", display="none",
                             stall_timeout=STALL, on_stall="raise", return_all=True)


# ----------------------------------------------------------------- busy ranks: never stalled
def prints_without_reporting(seconds: float) -> int:
    """A line every 0.3 s, asleep in between: only its output says it is alive."""
    lines, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        print(f"working on it ({lines})", flush=True)
        lines += 1
        time.sleep(0.3)
    return lines


def python_loop(seconds: float) -> int:
    """Pure Python arithmetic, no call in the inner loop, no output, no report. Its stack
    sits on one instruction whenever another thread can look (where it lets the GIL go):
    only its CPU time, spent holding the GIL, shows it works."""
    total, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        for i in range(100_000):
            total += i
    return total


def loop_over_one_c_call(seconds: float) -> int:
    """A loop whose time is all in one torch call, the GIL released inside it (CPU time
    alone would not tell it from a rank spinning in C): its stack moves between calls."""
    a, steps, end = torch.randn(400, 400), 0, time.monotonic() + seconds
    while time.monotonic() < end:
        a = torch.tanh(a @ a)
        steps += 1
    return steps


def test_a_rank_that_prints_but_never_reports_is_not_stalled():
    lines = launch(prints_without_reporting, BUSY)   # a stall report would raise WorkerError here
    assert all(n >= BUSY / 0.3 / 2 for n in lines), lines



def test_a_rank_computing_in_a_long_python_loop_is_not_stalled():
    assert all(total > 0 for total in launch(python_loop, BUSY))



def test_a_rank_looping_over_a_torch_call_is_not_stalled():
    assert all(steps > 0 for steps in launch(loop_over_one_c_call, BUSY))


# ----------------------------------------------------------------- controls: stuck ranks are reported
def rank_1_sleeps():
    if dist.get_rank() == 1:
        time.sleep(40)      # quiet and still: no output, no report, no CPU


def rank_1_never_joins():
    if dist.get_rank() == 0:
        dist.all_reduce(torch.ones(1))    # waits for rank 1, blocked in C
    else:
        time.sleep(40)


def stall_raised(function) -> tuple:
    """(the WorkerError of a launch that must stall, seconds from the call to it)."""
    started = time.monotonic()
    with pytest.raises(WorkerError) as info:
        launch(function)
    return info.value, time.monotonic() - started


def test_a_rank_blocked_in_sleep_is_reported_stalled():
    error, seconds = stall_raised(rank_1_sleeps)
    # Rank 0 returned and waits in the launcher's closing barrier: it is quiet too, and may
    # be listed; the rank named as failed is the sleeping one.
    assert re.match(rf"rank 1 failed: no progress for {STALL:g}s \(stall_timeout\) on (rank 0, )?rank 1;", str(error)), error
    assert "time.sleep(40)" in error.remote_traceback
    assert seconds < STALL + 20        # generous: start-up on a loaded 2-core machine


def test_ranks_blocked_in_a_collective_are_reported_with_the_one_that_never_joined():
    error, seconds = stall_raised(rank_1_never_joins)
    assert str(error).startswith(f"rank 1 failed: no progress for {STALL:g}s (stall_timeout) on rank 0, rank 1;"), error
    assert "in all_reduce" in error.remote_traceback and "time.sleep(40)" in error.remote_traceback
    assert seconds < STALL + 20
