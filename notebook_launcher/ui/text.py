"""The plain-text view: for terminal IPython, scripts and CI logs.

- Worker output lines, rank-prefixed, as they come.
- A compact progress line at a bounded rate: on a terminal it is redrawn in place
  (``\\r``) at most 4 times a second; in a log file or CI it is a new line at most every
  `LOG_INTERVAL` seconds, and only when something moved
  (``NOTEBOOK_LAUNCHER_PROGRESS_INTERVAL`` sets either interval, in seconds).
- At the end, a summary line, and the metric curves saved to a PNG file whose path is
  printed (``NOTEBOOK_LAUNCHER_PLOT_DIR`` chooses the folder; default: the temp dir).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Callable, Optional, TextIO

from ..gpu import GpuFeed, format_bytes
from ..state import RunState, format_duration, format_rate, format_value, summary_line
from .base import DEFAULT_PREFIX, Throttle, View

TTY_INTERVAL = 0.25    # seconds between redraws of the in-place line on a terminal
LOG_INTERVAL = 10.0    # seconds between progress lines when the output is not a terminal
LINE_WIDTH = 118       # the in-place line is cut to this (a wrapped line cannot be redrawn)


class TextView(View):
    """Text progress and summary. ``stream``: where the progress line goes (stdout).

    Example::

        view = TextView(title="2 CPU processes (gloo, fork)", interval=1.0)
    """

    def __init__(self, prefix: str = DEFAULT_PREFIX, title: str = "", stream: Optional[TextIO] = None,
                 interval: Optional[float] = None, plot_dir: Optional[str] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(prefix, title, clock)
        self._stream = stream
        self._interval = interval
        # Not "notebook_launcher": a folder of the package's name in the current directory
        # (python started in /tmp) would shadow the package on import.
        self.plot_dir = plot_dir or os.environ.get("NOTEBOOK_LAUNCHER_PLOT_DIR") or os.path.join(
            tempfile.gettempdir(), "notebook-launcher-plots")
        self.plot_path: Optional[str] = None
        self.lines_drawn = 0        # progress lines written (or redrawn)
        self._throttle: Optional[Throttle] = None
        self._shown = ""            # the progress line on screen (tty) or last printed
        self._on_screen = False     # an in-place line is showing and must be cleared first
        self._broken = False
        self._gpu_feed = GpuFeed(clock=clock)

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stdout

    @property
    def tty(self) -> bool:
        try:
            return bool(self.stream.isatty())
        except (AttributeError, ValueError):
            return False

    # ------------------------------------------------------------- View API
    def start(self, state: RunState) -> None:
        interval = self._interval
        if interval is None:
            configured = os.environ.get("NOTEBOOK_LAUNCHER_PROGRESS_INTERVAL", "")
            try:
                interval = max(0.05, float(configured))
            except ValueError:
                interval = TTY_INTERVAL if self.tty else LOG_INTERVAL
        self._throttle = Throttle(interval)
        self._throttle.ready(self.clock())  # the first line waits one interval: nothing to say yet

    def output(self, rank: int, stream: str, lines: list) -> None:
        self._clear()
        text = "".join(f"{self.prefix(rank)}{line}\n" for line in lines)
        if stream == "stdout":
            self.stream.write(text)
            self.stream.flush()
        else:
            self.write(stream, text)

    def refresh(self, state: RunState) -> None:
        self._gpu_feed.poll(state)   # its own pace (once a second): the state has them whatever the line's
        if self._broken or self._throttle is None or not self._throttle.ready(self.clock()):
            return
        try:
            self._draw(progress_line(state))
        except Exception as exc:
            self._broken = True
            print(f"notebook_launcher: the progress line failed ({type(exc).__name__}: {exc})", file=sys.stderr)

    def finish(self, state: RunState) -> None:
        self._clear()
        self._print(summary_line(state))
        if state.series:
            try:
                self.plot_path = self._save_plot(state)
            except Exception as exc:
                self._print(f"(the plot could not be saved: {type(exc).__name__}: {exc})")
            else:
                self._print(f"metric curves: {self.plot_path}")

    # ------------------------------------------------------------- drawing
    def _draw(self, line: str) -> None:
        if not line:
            return
        if self.tty:
            line = line[:LINE_WIDTH]
            pad = " " * max(0, len(self._shown) - len(line))
            self.stream.write(f"\r{line}{pad}")
            self.stream.flush()
            self._on_screen = True
        elif line != self._shown:
            self._print(line)
        else:
            return
        self._shown = line
        self.lines_drawn += 1

    def _clear(self) -> None:
        if self._on_screen:
            self.stream.write("\r" + " " * len(self._shown) + "\r")
            self.stream.flush()
            self._on_screen = False
            self._shown = ""

    def _print(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def _save_plot(self, state: RunState) -> str:
        from .plot import MetricsPlot

        png = MetricsPlot().render(state.series, final=True)
        os.makedirs(self.plot_dir, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = os.path.join(self.plot_dir, f"run-{stamp}-{os.getpid()}-{state.attempt}.png")
        with open(path, "wb") as handle:
            handle.write(png)
        return path


def progress_line(state: RunState) -> str:
    """``[ 42%] epoch 2/3 · batch 40/100 · 12.3 it/s · ETA 0:12 · loss=0.234 · 0:34``

    Example::

        progress_line(state)   # "[ 50%] 50/100 · 10 it/s · ETA 0:05 · loss=0.5 · 0:05"
    """
    parts = []
    fraction, eta = state.overall()
    bars = state.bars()
    for bar in bars:
        count = f"{bar.n:,}/{bar.total:,}" if bar.total is not None else f"{bar.n:,}"
        parts.append(f"{bar.desc} {count}" if bar.desc else count)
    if bars:
        parts.append(format_rate(bars[-1].rate))
        if eta is not None:
            parts.append(f"ETA {format_duration(eta)}")
    elif state.last_step is not None:
        parts.append(f"step {state.last_step:,}")
    if state.latest:
        parts.append(" ".join(f"{k}={format_value(v)}" for k, v in list(state.latest.items())[:4]))
    if not parts:
        return ""
    parts.extend(f"GPU{gpu.index} {format_bytes(gpu.used)}/{format_bytes(gpu.total)}"
                 + ("" if gpu.utilization is None else f" {gpu.utilization}%") for gpu in state.gpus)
    parts.append(format_duration(state.elapsed))
    percent = f"[{int(fraction * 100):3d}%] " if fraction is not None else ""
    return percent + " · ".join(parts)
