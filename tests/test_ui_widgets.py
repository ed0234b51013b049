"""The widgets dashboard driven by a real RunState and a simulated clock (no kernel:
widget traits are what a browser would receive). The comm messages a real kernel
sends are counted in test_ui_kernel.py."""

import ipywidgets
import pytest

from notebook_launcher.errors import Failure
from notebook_launcher.state import (Finished, Output, RunState, Started)
from events import ready, metrics, progress
from notebook_launcher.ui.widgets import LOG_PANEL_LINES, PLOT_INTERVAL, WidgetsView

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Clock:
    def __init__(self, t=100.0):
        self.t = t

    def __call__(self):
        return self.t


def started(clock, title="2 CPU processes (gloo, fork)"):
    host = ipywidgets.VBox()
    view = WidgetsView(title=title, host=host, clock=clock)
    view.open()
    state = RunState(world_size=2, local_ranks=[0, 1], backend="gloo", device="cpu", start_method="fork")
    state.apply(Started(clock.t, {0: 11, 1: 12}))
    view.start(state)
    for rank in (0, 1):
        state.apply(ready(rank, clock.t))
    return host, view, state


def train(view, state, clock, epochs=3, batches=100, tick=0.1):
    """Simulated training: one batch per tick, a report per batch, refresh per tick."""
    step = 0
    for epoch in range(epochs):
        state.apply(progress(0, epoch, epochs, "epoch", 0, clock.t))
        for batch in range(batches + 1):
            state.apply(progress(0, batch, batches, "batch", 1, clock.t))
            if batch < batches:
                state.apply(metrics(0, step, {"loss": 2.0 / (step + 1), "lr": 0.01}, clock.t))
                state.apply(metrics(1, step, {}, clock.t))
                step += 1
            clock.t += tick
            view.refresh(state)
    return step


def widget_changes(widget, name):
    seen = []
    widget.observe(lambda change: seen.append(change["new"]), names=name)
    return seen


def test_bars_plot_and_tables_follow_the_state():
    clock = Clock()
    host, view, state = started(clock)
    assert host.children == (view.box,)
    pngs = widget_changes(view.image, "value")
    train(view, state, clock, epochs=3, batches=100)    # ~30 simulated seconds
    (_, _, outer, outer_stats), (_, _, inner, inner_stats) = [(r, l, b, s) for r, l, b, s in view.bars[:2]]
    assert (outer.value, outer.max) == (2, 3)
    assert (inner.value, inner.max) == (100, 100)
    assert "it/s" in inner_stats.value and "ETA" in outer_stats.value
    assert view.bars[2][0].layout.display == "none"     # no third level
    assert bytes(view.image.value).startswith(PNG_MAGIC) and view.image.layout.display == "block"
    assert 3 <= len(pngs) <= 31                          # about one PNG per simulated second, at most
    assert "loss" in view.tables.value and "<td" in view.tables.value
    assert "✔ " not in view.header.value and "running" in view.header.value
    assert "2 CPU processes (gloo, fork)" in view.header.value
    assert view.metric_select.options == ("loss", "lr") and view.metric_select.value == ("loss", "lr")


def test_success_ends_with_green_bars_and_a_static_summary():
    clock = Clock()
    host, view, state = started(clock)
    train(view, state, clock, epochs=1, batches=20)
    state.apply(Output(0, "stdout", ("done training",), clock.t))
    state.apply(Finished("succeeded", clock.t))
    view.finish(state)
    assert all(bar.bar_style == "success" for _, _, bar, _ in view.bars)
    snap = view.snapshot
    assert "succeeded" in snap.summary_html and "loss" in snap.summary_html
    assert snap.png.startswith(PNG_MAGIC)
    assert "[rank0]: done training" in snap.log_text
    kinds = [type(child).__name__ for child in view.box.children]
    assert kinds == ["HTML", "Image", "HTML"]             # the live parts are gone
    assert bytes(view.box.children[1].value) == snap.png


def test_failure_shows_the_rank_in_red():
    clock = Clock()
    host, view, state = started(clock)
    train(view, state, clock, epochs=1, batches=5)
    failure = Failure(rank=1, pid=12, exitcode=1, message="ValueError: bad batch 3",
                      traceback='Traceback (most recent call last):\n  File "<cell>", line 4\nValueError: bad batch 3\n')
    state.apply(Finished("failed", clock.t, failure))
    view.finish(state)
    assert all(bar.bar_style == "danger" for _, _, bar, _ in view.bars)
    assert "rank 1 failed" in view.snapshot.summary_html
    assert "ValueError: bad batch 3" in view.snapshot.summary_html
    assert "rank 1: ValueError: bad batch 3" in view.snapshot.summary_text


def test_interrupt_ends_with_warning_bars():
    clock = Clock()
    host, view, state = started(clock)
    train(view, state, clock, epochs=1, batches=5)
    state.apply(Finished("interrupted", clock.t))
    view.finish(state)
    assert all(bar.bar_style == "warning" for _, _, bar, _ in view.bars)
    assert "interrupted" in view.snapshot.summary_html


def test_a_burst_of_reports_does_not_burst_widget_updates():
    clock = Clock()
    host, view, state = started(clock)
    pngs = widget_changes(view.image, "value")
    tables = widget_changes(view.tables, "value")
    bar_values = widget_changes(view.bars[0][2], "value")
    for tick in range(20):                               # 2 s: 10,000 reports arrive per tick
        for i in range(10_000):
            step = tick * 10_000 + i
            state.apply(metrics(0, step, {"loss": 1.0 / (step + 1)}, clock.t))
            if i % 100 == 0:
                state.apply(progress(0, step // 100, 2_000, None, 0, clock.t))
        clock.t += 0.1
        view.refresh(state)
    assert len(pngs) <= 3                                # at most one a second (plus the first)
    assert len(tables) <= 5                              # at most two a second
    assert len(bar_values) <= 20                         # at most ten a second
    assert state.series["loss"].count == 200_000


def test_log_panel_stays_small_with_100k_lines():
    clock = Clock()
    host, view, state = started(clock)
    for chunk in range(100):
        state.apply(Output(chunk % 2, "stdout", tuple(f"line {chunk * 1000 + j} " + "x" * 60 for j in range(1000)),
                           clock.t))
        clock.t += 0.1
        view.refresh(state)
    clock.t += 1.0
    view.refresh(state)                                  # the panel catches up within its interval
    html = view.log.value
    assert "line 99999" in html and "earlier lines not shown" in html
    assert html.count("\n") <= LOG_PANEL_LINES + 2
    assert len(html) < 20_000


def test_controls_redraw_the_plot():
    clock = Clock()
    host, view, state = started(clock)
    for step in range(50):
        state.apply(metrics(0, step, {"loss": 1.0 / (step + 1)}, clock.t))
    clock.t += 5.0
    view.refresh(state)
    renders = view.plot_renders
    first = bytes(view.image.value)
    clock.t += 5.0
    view.refresh(state)                                  # nothing new: no redraw
    assert view.plot_renders == renders
    view.log_scale.value = True                          # as if clicked in the browser
    clock.t += 5.0
    view.refresh(state)
    assert view.plot_renders == renders + 1 and bytes(view.image.value) != first
    view.metric_select.value = ()                        # choosing nothing shows everything
    assert view._user_selected


@pytest.mark.parametrize("status", ["succeeded", "failed"])
def test_finish_without_any_metric(status):
    clock = Clock()
    host, view, state = started(clock)
    state.apply(Finished(status, clock.t + 1))
    view.finish(state)
    assert view.snapshot.png is None
    assert status in view.snapshot.summary_html


def test_a_run_shorter_than_the_plot_interval_still_shows_a_live_frame():
    """The quickstart trains in about 0.6 s: its first frame must not wait for the 1 s throttle."""
    clock = Clock()
    host, view, state = started(clock)
    pngs = widget_changes(view.image, "value")
    hints = widget_changes(view.plot_hint.layout, "display")
    for step in range(30):                               # 0.3 s: a report every 10 ms, a refresh after each
        clock.t += 0.01
        state.apply(metrics(0, step, {"loss": 1.0 / (step + 1)}, clock.t))
        view.refresh(state)
        if step == 0:                                    # the first metric's refresh draws the first frame
            assert len(pngs) == 1 and bytes(pngs[0]).startswith(PNG_MAGIC)
            assert view.image.layout.display == "block" and hints == ["none"]
    assert len(pngs) == 1                                # later frames keep the throttle
    state.apply(Finished("succeeded", clock.t))
    view.finish(state)
    assert len(pngs) == 2                                # the final frame, drawn at the end


def test_the_first_frames_one_off_cost_does_not_delay_the_second():
    """A new figure's first frame loads fonts and lays out (0.3 s on a busy core); the duty
    cycle would make that a 15 s wait. The second frame comes at the usual pace."""
    clock = Clock()
    host, view, state = started(clock)
    pngs = widget_changes(view.image, "value")
    for step in range(2):
        state.apply(metrics(0, step, {"loss": 1.0 / (step + 1)}, clock.t))
        view.refresh(state)
        clock.t += PLOT_INTERVAL
    assert len(pngs) == 2


def test_the_hint_goes_before_the_table_lists_a_metric():
    """Each trait change is a message to the browser, and a first frame can take 0.3 s to
    draw: JupyterLab showed "No metrics yet" beside a table listing the loss meanwhile."""
    clock = Clock()
    host, view, state = started(clock)
    sent = []
    view.tables.observe(lambda change: sent.append(("table lists loss", "loss" in change["new"])), names="value")
    view.plot_hint.layout.observe(lambda change: sent.append(("hint", change["new"])), names="display")
    view.image.observe(lambda change: sent.append(("frame", len(change["new"]) > 0)), names="value")
    clock.t += 1.0                                       # the table's throttle lets it through
    state.apply(metrics(0, 0, {"loss": 1.0}, clock.t))
    view.refresh(state)
    assert sent == [("hint", "none"), ("table lists loss", True), ("frame", True)]


def test_gpu_rows_rank_memory_and_the_fp16_scaler_in_the_tables():
    """The widgets view feeds NVML's figures (here a stand-in sampler: no GPU) into the state
    and shows them with each rank's memory and the lead rank's loss scale."""
    from notebook_launcher import channel as ch
    from notebook_launcher.gpu import GpuFeed
    from notebook_launcher.state import GpuUsage, Received

    class Sampler:
        def sample(self, count=None):
            return (GpuUsage(0, "Tesla T4", 5 * 2**30, 15 * 2**30, 87),)

    clock = Clock()
    host, view, state = started(clock)
    view.gpu_feed = GpuFeed(source=Sampler, clock=clock)
    state.apply(Received(0, ch.DeviceStats(0, 2**30, 3 * 2**30, 4 * 2**30, clock.t, 512.0, 1), clock.t))
    train(view, state, clock, epochs=1, batches=20)
    tables = view.tables.value
    assert "<b>GPU 0</b>" in tables and "5.0 GiB / 15.0 GiB" in tables and "87 %" in tables
    assert "cuda:0 · 1.0 GiB (peak 3.0 GiB)" in tables
    assert "fp16 loss scale <b>512</b> · 1 step skipped" in tables
    state.apply(Finished("succeeded", clock.t))
    view.finish(state)
    assert "<b>GPU 0</b>" in view.snapshot.summary_html and "fp16 loss scale" in view.snapshot.summary_html
