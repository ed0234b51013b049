"""The rate and ETA of progress bars, driven by hand-made events as the parent gets them.

The parent stamps an event when it reads it, and it reads in batches: when data arrive
while it is free, or after a delay when it is busy (drawing a plot, descheduled on a
loaded machine). An inner loop of 21 batches lasts about 50 ms and starts over every
epoch. `worker_events` writes the message stream of rank 0's nested `progress()` loops
(a message when a loop starts, then one after an item when `PROGRESS_INTERVAL` passed
and one at the end); `received` stamps it as a parent reading every ``every`` seconds
would.
"""

import math

import pytest

from notebook_launcher.reporting import PROGRESS_INTERVAL
from notebook_launcher.state import (RunState, Started)
from events import progress
from notebook_launcher.ui import html as fragments


def new_state():
    state = RunState(world_size=2, local_ranks=[0, 1], backend="gloo", device="cpu", start_method="fork")
    state.apply(Started(0.0, {0: 10, 1: 11}))
    return state


def loop_messages(t, items, item_seconds, desc, depth):
    """(worker time, n, total, desc, depth) of one `progress()` loop; returns them and its end time."""
    messages, last = [(t, 0, items, desc, depth)], 0.0
    for n in range(1, items + 1):
        t += item_seconds
        if t - last >= PROGRESS_INTERVAL or n == items:
            messages.append((t, n, items, desc, depth))
            last = t
    return messages, t


def worker_events(epochs, batches, batch_seconds, pause):
    """Epochs of ``batches`` items each, ``pause`` seconds (an evaluation) after each epoch."""
    messages, t, last = [(0.0, 0, epochs, "epoch", 0)], 0.0, 0.0
    for epoch in range(1, epochs + 1):
        inner, t = loop_messages(t, batches, batch_seconds, "batch", 1)
        messages += inner
        t += pause
        if t - last >= PROGRESS_INTERVAL or epoch == epochs:
            messages.append((t, epoch, epochs, "epoch", 0))
            last = t
    return messages


def received(messages, every):
    """Progress events as a parent that reads every ``every`` seconds (0: at once) gets
    them: received late and in bursts, each stamped by the rank when it stepped."""
    events = []
    for index, (t, n, total, desc, depth) in enumerate(messages):
        read_at = math.ceil(t / every) * every if every else t
        events.append(progress(0, n, total, desc, depth, read_at + 20e-6 + index * 1e-6, sent=t))
    return events


@pytest.mark.parametrize("every", [0.0, 0.1, 0.3])
def test_an_inner_bar_restarting_every_epoch_shows_its_batches_per_second(every):
    """12 epochs of 21 batches at 2.4 ms each (the quickstart's pace): about 400 batches a second."""
    state = new_state()
    true_rate = 21 / (21 * 0.0024 + 0.001)                  # an epoch: its batches and a 1 ms evaluation
    shown = []
    for event in received(worker_events(12, 21, 0.0024, 0.001), every):
        state.apply(event)
        if state.bars()[-1].desc == "batch":
            shown.append(state.bars()[-1].rate)
    rates = [rate for rate in shown if rate is not None]
    # The rank's own timestamps measure the loop, however late and bunched the parent reads:
    # a rate from the second epoch on (0.05 s of steps), and always the right one.
    assert shown.index(rates[0]) <= 2 * 22, shown[:50]
    assert all(abs(rate / true_rate - 1) <= 0.25 for rate in rates), (min(rates), max(rates), true_rate)
    inner = state.bars()[-1]
    assert inner.rate == pytest.approx(true_rate, rel=0.15)   # the whole run
    assert f"{inner.rate:,.0f} it/s" in fragments.bar_stats(inner)


def test_no_rate_from_a_few_microseconds():
    """Three messages of one short epoch read in one go: 21 items in 40 microseconds."""
    state = new_state()
    for n, t in ((0, 5.00000), (1, 5.00002), (21, 5.00004)):
        state.apply(progress(0, n, 21, "batch", 0, t))
    bar = state.bars()[0]
    assert bar.rate is None and bar.eta is None
    assert "? it/s" in fragments.bar_stats(bar)


def test_a_long_evaluation_between_epochs_is_left_out_of_the_rate():
    """2 s of batches at 50 a second, then a 3 s evaluation, five times: the bar shows 50 it/s."""
    state = new_state()
    checked = set()                                         # (epoch, n) of every mid-epoch look
    for event in received(worker_events(5, 100, 0.02, 3.0), 0.1):
        state.apply(event)
        epoch, bar = state.bars()[0].n, state.bars()[-1]
        # Mid-epoch from the third epoch on: the rate's window spans earlier restarts and
        # evaluations. Messages come every 3 batches or so (PROGRESS_INTERVAL), so a range.
        if bar.desc == "batch" and 40 <= bar.n <= 60 and epoch >= 2:
            assert bar.rate == pytest.approx(50.0, rel=0.1), (epoch, bar.n)
            assert bar.eta == pytest.approx((100 - bar.n) / 50.0, rel=0.15), (epoch, bar.n)
            checked.add((epoch, bar.n))
    # Every one of the last three epochs was looked at, several times each.
    assert {epoch for epoch, _ in checked} == {2, 3, 4} and len(checked) >= 15, sorted(checked)
    assert state.bars()[-1].rate == pytest.approx(50.0, rel=0.1)


def test_another_loop_at_the_same_depth_has_a_rate_of_its_own():
    """Training batches (fast), then validation batches (slow) at the same depth: no shared rate."""
    state = new_state()
    for event in received(loop_messages(0.0, 1000, 0.002, "train", 0)[0], 0.0):
        state.apply(event)
    assert state.bars()[0].rate == pytest.approx(500.0, rel=0.05)
    for event in received(loop_messages(2.5, 20, 0.1, "validation", 0)[0], 0.0):
        state.apply(event)
    bar = state.bars()[0]
    assert bar.desc == "validation" and bar.rate == pytest.approx(10.0, rel=0.05)


def test_a_restart_keeps_the_bar_and_drops_the_bars_inside_it():
    state = new_state()
    for event in received(worker_events(3, 10, 0.01, 0.0), 0.0):
        state.apply(event)
    outer, inner = state.bars()
    assert (outer.n, inner.n) == (3, 10)
    state.apply(progress(0, 0, 3, "epoch", 0, 1.0))        # the same outer loop once more
    assert state.bars() == [outer] and outer.n == 0 and outer.started_at == 1.0


def test_the_rate_uses_when_the_rank_stepped_even_if_the_parent_read_everything_at_once():
    # 3 epochs of 21 batches at 10 ms each (100 batches/s), all read by a busy parent in one go
    state = new_state()
    for t, n, total, desc, depth in worker_events(epochs=3, batches=21, batch_seconds=0.01, pause=0.0):
        state.apply(progress(0, n, total, desc, depth, t=5.0, sent=t))
    inner = state.bars()[1]
    assert inner.rate == pytest.approx(100, rel=0.15)
