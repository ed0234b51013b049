"""The run state driven by hand-made events: no processes, no widgets."""

import math

import pytest

from notebook_launcher.errors import Failure
from notebook_launcher.state import (LOG_LINE_CHARS, LOG_LINES, MAX_POINTS, Exited, Finished, Output, RunState, Series, Started, format_duration, format_rate, summary_line)
from events import ready, metrics, progress


def new_state(ranks=(0, 1)):
    state = RunState(world_size=len(ranks), local_ranks=list(ranks), backend="gloo", device="cpu",
                     start_method="fork")
    state.apply(Started(100.0, {rank: 1000 + rank for rank in ranks}))
    return state


def test_steps_latest_values_and_rank_rows():
    state = new_state()
    assert state.status == "starting" and state.ranks[0].pid == 1000
    state.apply(ready(0, 100.5))
    state.apply(ready(1, 100.6))
    assert state.status == "running" and state.ranks[1].status == "running"
    for step in range(10):
        state.apply(metrics(0, step, {"loss": 1.0 / (step + 1), "lr": 0.1}, 101.0 + step))
        state.apply(metrics(1, step, {}, 101.0 + step))
    assert state.last_step == 9 and state.latest == {"loss": 0.1, "lr": 0.1}
    assert state.series["loss"].steps == list(range(10))
    assert state.ranks[0].step == 9 and state.ranks[1].step == 9 and state.ranks[1].last_seen == 110.0
    assert state.elapsed == pytest.approx(10.0)


def test_only_the_lead_rank_is_plotted_and_reports_without_step_count_on():
    state = new_state()
    state.apply(metrics(1, 5, {"loss": 99.0}, 101.0))       # rank 1's values are not plotted
    assert state.series == {} and state.ranks[1].step == 5
    for i in range(3):
        state.apply(metrics(0, None, {"loss": float(i)}, 102.0 + i))
    assert state.series["loss"].steps == [0, 1, 2] and state.last_step == 2
    state.apply(metrics(0, 10, {"loss": 1.0}, 106.0))
    state.apply(metrics(0, None, {"loss": 1.0}, 107.0))
    assert state.series["loss"].steps[-2:] == [10, 11]
    node1 = new_state(ranks=(2, 3))                         # another node: its first rank leads
    node1.apply(metrics(2, 0, {"loss": 0.5}, 101.0))
    assert node1.lead == 2 and node1.latest == {"loss": 0.5}


def test_downsampling_keeps_memory_bounded_and_the_shape():
    series = Series()
    total = 400_000
    for step in range(total):
        series.add(step, float(step))
    assert len(series.steps) < MAX_POINTS and len(series.values) == len(series.steps)
    assert series.count == total and series.last == total - 1 and series.low == 0 and series.high == total - 1
    assert series.stride >= total // MAX_POINTS
    steps, values = series.points()
    assert steps[-1] == total - 1                            # the curve reaches the last step
    assert steps == sorted(steps)
    # each kept point is the mean of the steps it stands for: on y = x it sits just before its step
    for step, value in zip(steps[:-1], values[:-1]):
        assert step - series.stride < value <= step


def test_downsampling_skips_non_finite_values():
    series = Series()
    for step in range(5 * MAX_POINTS):
        series.add(step, math.nan if step % 2 else 1.0)
    assert all(v == 1.0 for v in series.values)
    assert series.low == 1.0 and series.high == 1.0


def test_rate_and_eta_of_one_bar():
    state = new_state()
    for i in range(101):                                     # 10 items/s for 10 s
        state.apply(progress(0, i, 200, "batch", 0, 100.0 + i * 0.1))
    bar = state.main_progress
    assert bar.rate == pytest.approx(10.0, rel=0.05)
    assert bar.eta == pytest.approx(10.0, rel=0.05)
    assert state.overall() == (pytest.approx(0.5), pytest.approx(10.0, rel=0.05))


def test_rate_follows_a_change_of_speed():
    state = new_state()
    t, n = 100.0, 0
    for _ in range(200):                                     # 20 s at 10 items/s
        t, n = t + 0.1, n + 1
        state.apply(progress(0, n, 10_000, None, 0, t))
    for _ in range(200):                                     # then 20 s at 50 items/s
        t, n = t + 0.1, n + 5
        state.apply(progress(0, n, 10_000, None, 0, t))
    assert state.main_progress.rate == pytest.approx(50.0, rel=0.05)


def test_nested_bars_fold_the_inner_fraction_into_the_eta():
    state = new_state()
    t = 100.0
    for epoch in range(4):
        state.apply(progress(0, epoch, 4, "epoch", 0, t))
        for batch in range(0, 101, 10):
            state.apply(progress(0, batch, 100, "batch", 1, t))
            if epoch == 1 and batch == 50:
                fraction, eta = state.overall()
                assert fraction == pytest.approx(1.5 / 4)
                assert eta == pytest.approx((t - 100.0) * (1 - 1.5 / 4) / (1.5 / 4))
                assert [b.desc for b in state.bars()] == ["epoch", "batch"]
                assert state.ranks[0].position == {0: (1, 4), 1: (50, 100)}
            t += 1.0
    inner = state.progress[1]
    assert inner.n == 100 and inner.started_at > 100.0       # restarted with each epoch
    state.apply(progress(0, 0, 2, "validation", 0, t))      # a new outer loop: the old inner bar goes
    assert list(state.progress) == [0] and state.main_progress.desc == "validation"


def test_per_rank_states_at_the_end():
    state = new_state((0, 1, 2))
    for rank in (0, 1, 2):
        state.apply(ready(rank, 101.0))
    state.apply(Exited(2, 0, 102.0))
    failure = Failure(rank=1, pid=1001, exitcode=1, message="ValueError: bad batch")
    state.apply(Finished("failed", 103.0, failure))
    assert state.finished and state.status == "failed" and state.failure is failure
    assert {r: s.status for r, s in state.ranks.items()} == {0: "stopped", 1: "failed", 2: "done"}
    assert "rank 1: ValueError: bad batch" in summary_line(state)


def test_log_keeps_the_tail_and_counts_every_line():
    state = new_state()
    for i in range(1000):
        state.apply(Output(i % 2, "stdout", tuple(f"line {i} {j}" for j in range(100)), 101.0))
    assert state.lines_seen == 100_000 and len(state.log) == LOG_LINES
    assert state.log[-1] == (1, "stdout", "line 999 99")
    state.apply(Output(0, "stderr", ("x" * (LOG_LINE_CHARS * 10),), 102.0))
    assert len(state.log[-1][2]) < LOG_LINE_CHARS + 100


def test_formatting_helpers():
    assert format_duration(4.24) == "4.2s"
    assert format_duration(67) == "1:07"
    assert format_duration(3723) == "1:02:03"
    assert format_duration(None) == "?"
    assert format_rate(2150.4) == "2,150 it/s" and format_rate(12.34) == "12.3 it/s" and format_rate(0.25) == "4 s/it" and format_rate(None) == "? it/s"


def test_a_quick_loop_has_a_rate_from_the_ranks_own_timestamps():
    """30 steps in 0.3 s, read by the notebook in one burst: the rank's own timestamps
    measure the loop (a session cell's bar ends with a rate); a few microseconds do not."""
    state, instant = new_state(), new_state()
    for n in range(31):
        state.apply(progress(0, n, 30, "batch", 0, t=7.0 + n * 0.001, sent=5.0 + n * 0.01))
        instant.apply(progress(0, n, 30, "batch", 0, t=7.0, sent=5.0 + n * 1e-6))
    assert state.bars()[0].rate == pytest.approx(100, rel=0.05)
    assert instant.bars()[0].rate is None
