"""The text view: progress line at a bounded rate, plot saved to a printed path."""

import io
import os
import re
import subprocess
import sys
import textwrap

from notebook_launcher.errors import Failure
from notebook_launcher.state import (Finished, Output, RunState, Started)
from events import ready, metrics, progress
from notebook_launcher.ui.text import TextView, progress_line


class Clock:
    def __init__(self, t=100.0):
        self.t = t

    def __call__(self):
        return self.t


class Terminal(io.StringIO):
    def isatty(self):
        return True


def running(view, clock):
    state = RunState(world_size=2, local_ranks=[0, 1], backend="gloo", device="cpu", start_method="fork")
    state.apply(Started(clock.t, {0: 1, 1: 2}))
    view.start(state)
    state.apply(ready(0, clock.t))
    return state


def burst(view, state, clock, seconds, per_second=2000):
    """``per_second`` progress events and reports a (simulated) second, refreshing after each."""
    n = 0
    for _ in range(int(seconds * per_second)):
        clock.t += 1 / per_second
        n += 1
        state.apply(progress(0, n, 100_000, "batch", 0, clock.t))
        state.apply(metrics(0, n, {"loss": 1.0 / n}, clock.t))
        view.refresh(state)


def test_log_output_gets_a_progress_line_at_most_every_interval(tmp_path):
    clock, out = Clock(), io.StringIO()
    view = TextView(stream=out, interval=2.0, clock=clock, plot_dir=str(tmp_path))
    state = running(view, clock)
    burst(view, state, clock, seconds=10)                 # 20,000 events in 10 s
    lines = [line for line in out.getvalue().splitlines() if "batch" in line]
    assert 4 <= len(lines) <= 5 and view.lines_drawn == len(lines)
    assert "\r" not in out.getvalue()                     # a log file gets plain lines
    assert re.fullmatch(r"\[ (19|20)%\] batch (19|20),\d{3}/100,000 · 2,000 it/s · ETA 4\d\.\ds · loss=5e-05 · 10\.0s",
                        lines[-1]), lines[-1]


def test_terminal_line_is_redrawn_in_place_at_a_bounded_rate(tmp_path):
    clock, out = Clock(), Terminal()
    view = TextView(stream=out, clock=clock, plot_dir=str(tmp_path))   # tty default: 4 a second
    state = running(view, clock)
    burst(view, state, clock, seconds=5)
    assert 18 <= view.lines_drawn <= 21
    assert out.getvalue().count("\r") == view.lines_drawn
    view.output(0, "stdout", ["hello"])                    # a worker line clears the progress line first
    assert out.getvalue().endswith("\r[rank0]: hello\n")


def test_the_end_prints_a_summary_and_the_saved_plot_path(tmp_path):
    clock, out = Clock(), io.StringIO()
    view = TextView(stream=out, interval=1.0, clock=clock, plot_dir=str(tmp_path))
    state = running(view, clock)
    burst(view, state, clock, seconds=1)
    state.apply(Finished("failed", clock.t, Failure(rank=1, pid=2, exitcode=1, message="RuntimeError: boom")))
    view.finish(state)
    text = out.getvalue()
    assert "failed: 2 processes" in text and "rank 1: RuntimeError: boom" in text
    path = text.split("metric curves: ")[1].split()[0]
    assert path == view.plot_path and os.path.dirname(path) == str(tmp_path)
    with open(path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_progress_line_without_bars_shows_the_step():
    state = RunState(world_size=1, local_ranks=[0])
    state.apply(Started(0.0, {0: 1}))
    assert progress_line(state) == ""
    state.apply(metrics(0, 41, {"loss": 0.25}, 3.0))
    assert progress_line(state) == "step 41 · loss=0.25 · 3.0s"
    state.apply(Output(0, "stdout", ("x",), 3.0))


def test_a_real_script_run_prints_progress_lines_and_saves_the_plot(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import time
        from notebook_launcher import notebook_launcher, progress, report

        def train():
            for step in progress(range(150), desc="batch"):
                report(step, loss=1.0 / (step + 1))
                time.sleep(0.01)
            return "ok"

        if __name__ == "__main__":
            print("RESULT", notebook_launcher(train, num_processes=2))
    """))
    env = dict(os.environ, NOTEBOOK_LAUNCHER_PROGRESS_INTERVAL="0.5", NOTEBOOK_LAUNCHER_PLOT_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "Launching on 2 CPU processes (gloo, fork)"
    progress = [line for line in lines if line.startswith("[") and "batch" in line]
    assert 1 <= len(progress) <= 8, out.stdout             # ~1.5 s of training at 2 lines a second
    assert any(line.startswith("succeeded: 2 processes") for line in lines)
    saved = [line.split(": ", 1)[1] for line in lines if line.startswith("metric curves: ")]
    assert saved and os.path.isfile(saved[0]) and os.path.dirname(saved[0]) == str(tmp_path)
    assert "RESULT ok" in lines
