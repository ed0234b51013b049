"""The in-place HTML dashboard driven by a real RunState and a simulated clock, and the GPU
facts it shows (a stand-in NVML: no GPU here). What a real kernel sends for it is counted
in test_html_view_kernel.py; what a browser shows, in test_browser.py."""

import importlib
import os
import sys

import pytest

from events import metrics, progress, ready
from notebook_launcher import channel as ch
from notebook_launcher.gpu import SAMPLE_INTERVAL, GpuFeed, NvmlSampler, format_bytes
from notebook_launcher.state import Finished, Output, Received, RunState, Started
from notebook_launcher.ui import auto_display
from notebook_launcher.ui.html_view import BYTES_PER_SECOND, CLOCK_INTERVAL, UPDATE_INTERVAL, HtmlView, frame_html

STANDINS = os.path.join(os.path.dirname(__file__), "standins")


class Clock:
    def __init__(self, t=100.0):
        self.t = t

    def __call__(self):
        return self.t


class Page:
    """What a front end holds: displays by id, each replaced by its updates."""

    def __init__(self, clock=None):
        self.clock = clock
        self.times = []        # when each display or update was sent (the view's clock)
        self.displays = []     # [bundle], in order of display
        self.sent = []         # ("display" | "update", index)
        self.bytes = []        # the HTML's size of each display or update

    def publish(self, bundle, handle):
        self.bytes.append(len(bundle.get("text/html", "")))
        self.times.append(self.clock() if self.clock else None)
        if handle is None:
            self.displays.append(bundle)
            self.sent.append(("display", len(self.displays) - 1))
            return len(self.displays) - 1
        self.displays[handle] = bundle
        self.sent.append(("update", handle))
        return handle

    def html(self, index=0):
        return self.displays[index]["text/html"]


def fresh_state(clock):
    state = RunState(world_size=2, local_ranks=[0, 1], backend="gloo", device="cpu", start_method="fork")
    state.apply(Started(clock.t, {0: 11, 1: 12}))
    return state


@pytest.fixture
def standin_nvml(monkeypatch):
    """nvidia-ml-py's module replaced by the stand-in (two T4s), both GPUs visible."""
    monkeypatch.syspath_prepend(STANDINS)
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    module = importlib.import_module("pynvml")
    assert module.__file__.startswith(STANDINS)
    module.memory_calls.clear()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    return module


def test_frames_follow_the_state_at_a_bounded_rate():
    clock, page = Clock(), Page()
    view = HtmlView(title="2 CPU processes (gloo, fork)", clock=clock, publish=page.publish)
    state = fresh_state(clock)
    view.start(state)
    for rank in (0, 1):
        state.apply(ready(rank, clock.t))
    view.refresh(state)
    assert page.sent == []                                # nothing to show yet: no display at all
    # 10,000 reports and progress steps over 2.5 simulated seconds, refreshed after each
    for step in range(10_000):
        clock.t += 0.00025
        state.apply(metrics(0, step, {"loss": 1.0 / (step + 1)}, clock.t))
        state.apply(progress(0, step + 1, 10_000, "batch", 0, clock.t))
        if step % 100 == 0:
            state.apply(Output(0, "stdout", (f"at step {step}",), clock.t))
        view.refresh(state)
    clock.t += UPDATE_INTERVAL
    view.refresh(state)                                   # the last changes, one interval later
    assert page.sent[0] == ("display", 0) and all(kind == "update" for kind, _ in page.sent[1:])
    assert 3 <= len(page.sent) <= 3.0 / UPDATE_INTERVAL + 2, page.sent
    assert view.plot_renders <= 2.5 + 2
    html = page.html()
    assert "notebook-launcher-dashboard" in html and "● running" in html
    assert "batch" in html and "/10,000" in html and "it/s" in html and "ETA" in html
    assert "<b>loss</b>" in html                           # the metrics table
    assert html.count("<tr>") >= 3                         # ranks table: header + 2 ranks
    assert 'src="data:image/png;base64,iVBOR' in html      # the plot, inline
    assert "[rank0]: at step 9900" in html                 # the last log lines
    assert "[rank0]: at step 0" not in html                # ...only the last ones
    assert page.displays[0]["text/plain"].startswith("[")  # a progress line where HTML is not shown
    # nothing new: the clock still ticks once a second, not more
    before = len(page.sent)
    for _ in range(30):
        clock.t += 0.1
        view.refresh(state)
    assert before + 2 <= len(page.sent) <= before + 3 / CLOCK_INTERVAL + 1


def test_big_frames_come_less_often():
    clock = Clock()
    page = Page(clock)
    view = HtmlView(title="t", clock=clock, publish=page.publish)
    state = fresh_state(clock)
    view.start(state)
    for step in range(2000):                               # 6 plotted metrics for 10 simulated seconds
        clock.t += 0.005
        state.apply(metrics(0, step, {f"metric{i}": (step % (50 + i)) / (i + 1) for i in range(6)}, clock.t))
        view.refresh(state)
    assert len(page.html()) > 30_000                                      # each frame carries a big PNG
    # after a frame of N bytes the next waits N / BYTES_PER_SECOND: about 64 KB a second reach the page
    gaps = [(size, later - at) for size, at, later in zip(page.bytes, page.times, page.times[1:])]
    assert all(gap >= size / BYTES_PER_SECOND - 0.01 for size, gap in gaps), gaps
    assert any(size / BYTES_PER_SECOND > UPDATE_INTERVAL for size, _ in gaps), gaps   # the rule mattered here


def test_a_blocking_run_ends_as_the_static_summary_with_the_plot_and_log_after_it():
    clock, page = Clock(), Page()
    view = HtmlView(title="2 CPU processes (gloo, fork)", clock=clock, publish=page.publish)
    state = fresh_state(clock)
    view.start(state)
    for step in range(50):
        clock.t += 0.05
        state.apply(metrics(0, step, {"loss": 1.0 / (step + 1)}, clock.t))
        state.apply(Output(1, "stderr", (f"warning {step}",), clock.t))
        view.refresh(state)
    state.apply(Finished("succeeded", clock.t))
    view.finish(state)
    assert len(page.displays) == 3                         # the live one, replaced; then PNG and log
    summary, png, log = page.displays
    assert "✔ succeeded" in summary["text/html"] and "notebook-launcher-dashboard" not in summary["text/html"]
    assert "data:image/png" not in summary["text/html"]    # the plot is its own output, as a saved notebook wants
    assert png["image/png"].startswith("iVBOR")
    assert "warning 49" in log["text/html"] and "50 output lines" in log["text/html"]


def test_a_background_run_ends_as_one_display_with_the_plot_inline():
    clock, page = Clock(), Page()
    handle = page.publish({"text/plain": "starting"}, None)   # what the launching cell showed
    view = HtmlView(title="t", clock=clock, host=handle, publish=page.publish)
    state = fresh_state(clock)
    view.open()
    view.start(state)
    assert page.sent == [("display", 0), ("update", 0)]      # shown at once, before any metric
    for step in range(20):
        clock.t += 0.1
        state.apply(metrics(0, step, {"acc": step / 20}, clock.t))
        view.refresh(state)
    state.apply(Finished("failed", clock.t))
    view.finish(state)
    assert len(page.displays) == 1                            # the launching cell is over: no new outputs
    final = page.html()
    assert "✖ failed" in final and 'src="data:image/png;base64,' in final


def test_a_run_that_ends_before_its_dashboard_is_due_shows_only_the_summary():
    clock, page = Clock(), Page()
    view = HtmlView(title="t", clock=clock, publish=page.publish)
    state = fresh_state(clock)
    view.start(state)
    state.apply(Output(0, "stdout", ("hello",), clock.t))
    clock.t += 0.1
    view.refresh(state)
    state.apply(Finished("succeeded", clock.t))
    view.finish(state)
    assert page.sent == [("display", 0), ("display", 1)]    # summary and log, never a live frame
    assert "✔ succeeded" in page.html(0) and "hello" in page.html(1)


@pytest.mark.parametrize("frontend, widgets, expected", [
    ("jupyter-server", True, "widgets"), ("jupyter-server", False, "html"), ("colab", True, "html"),
    ("kaggle", True, "html"), ("vscode", True, "html"), ("kernel", True, "html"),
    ("ipython", True, "text"), ("script", True, "text"),
])
def test_auto_display_by_front_end(frontend, widgets, expected):
    assert auto_display(frontend, widgets) == expected


# ----------------------------------------------------------------- GPU facts
def test_nvml_figures_reach_the_state_at_most_once_a_second(standin_nvml):
    clock = Clock()
    feed = GpuFeed(source=lambda: sampler, clock=clock)
    sampler = NvmlSampler()                          # imports "pynvml": the stand-in
    state = fresh_state(clock)
    for _ in range(50):                              # 5 simulated seconds, polled 10 times a second
        feed.poll(state)
        clock.t += 0.1
    assert 5 <= len(standin_nvml.memory_calls) / 2 <= 5 / SAMPLE_INTERVAL + 1
    first, second = state.gpus
    assert (first.index, first.name, first.total, first.utilization) == (0, "Tesla T4", 15360 * 2**20, 87)
    assert second.index == 1 and second.utilization == 77 and second.used > first.used
    html = frame_html(state, "t", lambda rank: f"[rank{rank}]: ", None)
    assert "<b>GPU 0</b>" in html and "<b>GPU 1</b>" in html and "Tesla T4" in html
    assert f"{format_bytes(first.used)} / 15.0 GiB" in html and "87 %" in html


def test_only_the_visible_gpus_and_for_a_cuda_run_only_those_it_uses(standin_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    clock = Clock()
    state = fresh_state(clock)
    GpuFeed(source=lambda: NvmlSampler(), clock=clock).poll(state)
    assert [gpu.index for gpu in state.gpus] == [1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    cuda = RunState(world_size=1, local_ranks=[0], device="cuda")
    GpuFeed(source=lambda: NvmlSampler(), clock=clock).poll(cuda)
    assert [gpu.index for gpu in cuda.gpus] == [1]    # rank 0 runs on the first visible GPU


def test_no_gpus_no_gpu_table_and_no_more_asking(standin_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    clock, asked = Clock(), []
    sampler = NvmlSampler()

    def source():
        asked.append(clock.t)
        return sampler

    state = fresh_state(clock)
    feed = GpuFeed(source=source, clock=clock)
    for _ in range(30):
        feed.poll(state)
        clock.t += 0.5
    assert state.gpus == () and len(asked) == 1
    assert "GPU" not in frame_html(state, "t", str, None)


def test_without_nvml_nothing_is_shown_and_nothing_raised(monkeypatch, capsys):
    import notebook_launcher.gpu as gpu

    monkeypatch.setitem(sys.modules, "pynvml", None)   # nvidia-ml-py not installed
    monkeypatch.setattr(gpu, "_hinted", [])
    sampler = NvmlSampler()
    assert sampler.sample() == () and "pynvml" in sampler.error and sampler.missing_package
    clock = Clock()
    cpu, cuda = fresh_state(clock), RunState(world_size=1, local_ranks=[0], device="cuda")
    GpuFeed(source=lambda: sampler, clock=clock).poll(cpu)
    assert capsys.readouterr().err == ""                               # a CPU run: nothing to say
    for _ in range(2):
        GpuFeed(source=lambda: sampler, clock=clock).poll(cuda)
    assert capsys.readouterr().err.count("pip install nvidia-ml-py") == 1   # a GPU run: said once
    assert cuda.gpus == ()


def test_each_ranks_memory_and_the_fp16_scaler_show_in_the_tables():
    clock = Clock()
    state = fresh_state(clock)
    for rank, (allocated, peak) in enumerate([(3 * 2**30, 5 * 2**30), (2 * 2**30, 4 * 2**30)]):
        stats = ch.DeviceStats(rank, allocated, peak, peak, clock.t, loss_scale=1024.0 * (rank + 1), skipped_steps=3)
        state.apply(Received(rank, stats, clock.t))
    html = frame_html(state, "t", str, None)
    assert "GPU memory (peak)" in html
    assert "cuda:0 · 3.0 GiB (peak 5.0 GiB)" in html and "cuda:1 · 2.0 GiB (peak 4.0 GiB)" in html
    assert "fp16 loss scale <b>1,024</b> · 3 steps skipped" in html   # the lead rank's scaler
    assert state.ranks[0].last_seen == clock.t                        # from Started: stats are no sign of life
