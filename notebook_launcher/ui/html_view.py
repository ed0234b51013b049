"""The live dashboard as one display updated in place: renders in every front end.

Widgets need a widget manager in the page, and several front ends lack one or drop what
a thread sends it (Colab, Kaggle, VS Code: see `ui.WIDGET_FRONTENDS`). The one thing
every front end renders is a plain display that is updated in place
(``display(..., display_id=True)``, then ``update_display_data`` messages): this view is
that display, holding the same parts as the widgets dashboard, top to bottom: a header
(state, what runs where, elapsed, step), the progress bars as text with rate and ETA, the
fp16 loss scale, the metric curves as an inline PNG, tables of the latest metrics, of
the ranks (their GPU memory) and of the GPUs, and the last output lines.

Invariants:
- every frame is a function of the run state (`frame_html`); the view only decides when;
- at most one update every `UPDATE_INTERVAL` seconds (fewer for big frames: about
  `BYTES_PER_SECOND` reach the page), and only when the state changed or the elapsed
  clock moved a second; a new PNG at most once a second (less often when
  drawing would take more than `PLOT_DUTY` of a core), the first one as soon as there is
  a metric; so a burst of 10,000 reports costs a handful of messages;
- it never imports ipywidgets; matplotlib only once there is a metric;
- updates come from the thread that renders the run: the cell's own thread where the
  cell blocks; for ``block=False`` the run's thread, whose output parent is the launching
  cell (`run`), updating a display that cell showed (``host``);
- at the end the display becomes the static summary of `ui.snapshot` (summary, PNG and
  log as separate outputs where the cell still runs; as one display for ``block=False``,
  whose cell is over and may take no new outputs).
"""

from __future__ import annotations

import base64
import struct
import sys
import time
from typing import Any, Callable, Optional

from ..gpu import GpuFeed
from ..state import RunState
from . import html as fragments
from . import snapshot
from .base import DEFAULT_PREFIX, Throttle, View
from .on_demand import dashboard_due

UPDATE_INTERVAL = 0.5     # seconds between two updates of the display, at least...
BYTES_PER_SECOND = 64_000  # ...and longer for big frames (each carries the plot): about 1/s with 6 plots
CLOCK_INTERVAL = 1.0      # with nothing new, the elapsed clock still moves once a second
PLOT_INTERVAL = 1.0       # at most one new PNG a second...
PLOT_DUTY = 0.02          # ...and less often if drawing would take more than 2 % of a core
LIVE_LOG_LINES = 12       # output lines shown while the run goes on
PLOTTED = 6               # metrics plotted (the rest are in the table)


class HtmlView(View):
    """The in-place HTML dashboard. ``host``: a display handle already shown in the launching
    cell (``block=False``); without one, the display appears on demand (`dashboard_due`).

    Example::

        view = HtmlView(title="2 CPU processes (gloo, fork)")
        view.refresh(state)      # shows or updates the display, throttled
        view.finish(state)       # the static summary takes its place
    """

    def __init__(self, prefix: str = DEFAULT_PREFIX, title: str = "", host: Optional[Any] = None,
                 clock: Callable[[], float] = time.monotonic, show_log: bool = True,
                 publish: Optional[Callable] = None) -> None:
        super().__init__(prefix, title, clock)
        self.host = host
        self.show_log = show_log        # False: lines are printed in the cell as they come (a session's cell)
        self.handle = host              # the display this view updates
        self.updates = 0                # displays sent or updated while live
        self.plot_renders = 0
        self.png: Optional[bytes] = None
        self.snapshot: Optional[snapshot.Snapshot] = None
        self.gpu_feed = GpuFeed(clock=clock)
        self._publish = publish         # (bundle, handle or None) -> handle; default IPython's display
        self._plot = None
        self._plot_at: Optional[float] = None
        self._plot_interval = PLOT_INTERVAL
        self._plot_seen = -1
        self._sent_version = -1
        self._sent_at: Optional[float] = None
        self._throttle = Throttle(UPDATE_INTERVAL)
        self._broken = False

    # ------------------------------------------------------------- View API
    def start(self, state: RunState) -> None:
        if self.handle is not None:   # block=False: the launching cell shows it from the start
            self._guarded(self._update, state, True)

    def output(self, rank: int, stream: str, lines: list) -> None:
        """Lines are in ``state.log``: the display shows the last ones. Without the log part
        they are printed in the cell, once, like the cell's own prints."""
        if not self.show_log:
            super().output(rank, stream, lines)

    def refresh(self, state: RunState) -> None:
        if self._broken:
            return
        self._guarded(self.gpu_feed.poll, state)
        if self.handle is None and not dashboard_due(state):
            return
        self._guarded(self._update, state, False)

    def finish(self, state: RunState) -> None:
        try:
            png = self._render_plot(state, self.clock(), final=True) if state.series else None
            self.snapshot = snapshot.build(state, self.title, self.prefix, png,
                                           log_lines=snapshot.FINAL_LOG_LINES if self.show_log else 0)
            self._plot = None   # the figure's memory goes with the live view
            if self.host is not None:
                self._show(one_display(self.snapshot), self.handle)
            elif self.handle is not None:
                first, *rest = self.snapshot.bundles()
                self._show(first, self.handle)
                for bundle in rest:
                    self._show(bundle, None)
            else:   # ended before its dashboard was due: only the summary
                for bundle in self.snapshot.bundles():
                    self._show(bundle, None)
        except Exception as exc:  # never let the dashboard hide how the run ended
            print(f"notebook_launcher: the dashboard failed ({type(exc).__name__}: {exc})", file=sys.stderr)

    # ------------------------------------------------------------- updates
    def _update(self, state: RunState, force: bool) -> None:
        now = self.clock()
        if not force and self.handle is not None:
            changed = state.version != self._sent_version
            ticked = self._sent_at is None or now - self._sent_at >= CLOCK_INTERVAL
            if not (changed or ticked) or not self._throttle.ready(now):
                return
        else:
            self._throttle.ready(now)
        if state.series and state.metrics_version != self._plot_seen and self._plot_due(now):
            self._render_plot(state, now)
        bundle = {"text/html": frame_html(state, self.title, self.prefix, self.png, self.show_log, now),
                  "text/plain": plain_line(state, self.title)}
        self.handle = self._show(bundle, self.handle)
        self._throttle.interval = max(UPDATE_INTERVAL, len(bundle["text/html"]) / BYTES_PER_SECOND)
        self._sent_version, self._sent_at = state.version, now
        self.updates += 1

    def _plot_due(self, now: float) -> bool:
        """The first frame as soon as there is a metric; the next ones at the throttled pace."""
        return self.png is None or now - self._plot_at >= self._plot_interval

    def _render_plot(self, state: RunState, now: float, final: bool = False) -> Optional[bytes]:
        if self._plot is None:
            from .plot import MetricsPlot

            self._plot = MetricsPlot()
        self._plot_seen = state.metrics_version
        started = time.perf_counter()
        png = self._plot.render(state.series, list(state.series)[:PLOTTED], final=final)
        spent = time.perf_counter() - started
        if self.png is not None:   # the first frame's cost is mostly one-off (fonts, layout)
            self._plot_interval = max(PLOT_INTERVAL, spent / PLOT_DUTY)
        self._plot_at = now
        if png is not None:
            self.png = png
            self.plot_renders += 1
        return png

    def _show(self, bundle: dict, handle: Optional[Any]) -> Any:
        """Display ``bundle`` (a new display when ``handle`` is None) or update ``handle``."""
        if self._publish is not None:
            return self._publish(bundle, handle)
        if handle is not None:
            handle.update(bundle, raw=True)
            return handle
        from IPython.display import display

        return display(bundle, raw=True, display_id=True)


# ----------------------------------------------------------------- frames (pure)
def frame_html(state: RunState, title: str, prefix: Callable[[int], str], png: Optional[bytes],
               show_log: bool = True, now: Optional[float] = None) -> str:
    """One live frame of the dashboard, as HTML with inline styles (and the plot inline).

    Example::

        frame_html(state, "2 CPU processes (gloo, fork)", view.prefix, png)
    """
    tables = "".join(part for part in (fragments.metrics_table(state), fragments.ranks_table(state, now),
                                       fragments.gpu_table(state)) if part)
    plot = png_img(png) if png else ("" if state.series else fragments.no_metrics_hint())
    log = fragments.log_panel(state, prefix, LIVE_LOG_LINES) if show_log else ""
    return (f'<div class="notebook-launcher-dashboard" style="{fragments.FONT}">'
            f"{fragments.header(state, title)}"
            f"{fragments.failure_box(state)}"
            f"{fragments.progress_table(state)}"
            f"{fragments.precision_line(state)}"
            f"{plot}"
            f'<div style="display: flex; flex-wrap: wrap; align-items: flex-start;">{tables}</div>'
            f"{log}</div>")


def plain_line(state: RunState, title: str) -> str:
    """The same frame for front ends that show no HTML: the text view's progress line."""
    from .text import progress_line

    line = progress_line(state) or f"{state.status} · {title}"
    return line


def png_img(png: bytes) -> str:
    """An ``<img>`` with the PNG inline; its size is given so the page does not jump while
    a new frame decodes."""
    size = ""
    if png[12:16] == b"IHDR":
        width, height = struct.unpack(">II", png[16:24])
        size = f' width="{width}" height="{height}"'
    data = base64.b64encode(png).decode("ascii")
    return (f'<img class="notebook-launcher-plot" src="data:image/png;base64,{data}"{size} '
            f'style="max-width: 100%; height: auto; display: block; margin: 4px 0;" alt="metric curves">')


def one_display(snap: snapshot.Snapshot) -> dict:
    """The static summary as one bundle (summary, plot inline, log), for a display that must
    stay one: a ``block=False`` run's, whose launching cell is over."""
    plot = png_img(snap.png) if snap.png else ""
    return {"text/html": f"{snap.summary_html}{plot}{snap.log_html}",
            "text/plain": snap.summary_text}
