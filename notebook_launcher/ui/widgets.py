"""The live ipywidgets dashboard.

Layout, top to bottom: a header (state, what runs where, elapsed, step), one progress
bar per nesting level of rank 0's `progress()` loops (rate and ETA), the metric curves
(a PNG in an `ipywidgets.Image`, with metric choice, smoothing and log scale), the fp16
loss scale, tables of the latest metrics, of the ranks (their GPU memory) and of the GPUs
(NVML, `gpu.GpuFeed`), and a bounded log panel with the output lines.

Every update is throttled (each widget change is one message to the browser): bars at
most 10 times a second, text twice a second, the plot about once a second or less
(the interval grows so that drawing stays under `PLOT_DUTY` of one core), except its
first frame, drawn as soon as the first metric arrives. When the run
ends the dashboard is replaced by the static summary of `ui.snapshot`.

The dashboard appears when there is something to show: a rank reports a metric or a
progress step, or the run has gone on for `APPEAR_AFTER` seconds. A call that ends sooner
never imports ipywidgets nor matplotlib (together about 0.5 s of a kernel's first
call on 2 cores): its summary is static HTML from the start; a blocking call imports
matplotlib only for its first metric. (A ``block=False`` run shows its frame, and so
imports ipywidgets, at launch.) If ipywidgets fails to import when the dashboard is
due, the run goes on, says so once, and ends with the static summary.

Only one thread touches the widgets: the supervisor's. Control changes made in the
browser arrive on the kernel's main thread; their handlers only set a flag.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Optional

from ..gpu import GpuFeed
from ..state import RunState
from . import html as fragments
from . import snapshot
from .base import DEFAULT_PREFIX, Throttle, View
from .on_demand import dashboard_due

BAR_INTERVAL = 0.1        # progress bar values: at most 10 updates a second
TEXT_INTERVAL = 0.5       # bar texts, tables, log: at most 2 updates a second
HEADER_INTERVAL = 1.0     # the elapsed clock ticks once a second
PLOT_INTERVAL = 1.0       # at most one new PNG a second...
PLOT_DUTY = 0.02          # ...and less often if drawing would take more than 2 % of a core
LOG_PANEL_LINES = 100     # lines in the live log panel
MAX_BARS = 3              # nesting levels shown
END_STYLE = {"succeeded": "success", "failed": "danger"}  # bar style at the end (else "warning")


class WidgetsView(View):
    """The dashboard. ``host``: a container already displayed (``block=False`` runs put
    the dashboard there); without one, `open` displays it as a new output of the cell.

    Example::

        view = WidgetsView(title="2 CPU processes (gloo, fork)")
        view.open()              # shows the dashboard in the current cell
    """

    def __init__(self, prefix: str = DEFAULT_PREFIX, title: str = "", host: Optional[Any] = None,
                 clock: Callable[[], float] = time.monotonic, show_log: bool = True) -> None:
        super().__init__(prefix, title, clock)
        self.host = host
        self.show_log = show_log    # False: lines are printed in the cell as they come (a session's cell)
        self.box: Optional[Any] = None
        self.snapshot: Optional[snapshot.Snapshot] = None
        self.png: Optional[bytes] = None            # the last plot sent
        self.plot_renders = 0
        self._handle = None
        self._widgets: list = []
        self._plot = None
        self._plot_at: Optional[float] = None
        self._plot_interval = PLOT_INTERVAL
        self._plot_seen = -1
        self._plot_dirty = False
        self._user_selected = False
        self._setting_options = False
        self._progress_seen = -1
        self._log_seen = -1
        self._status_shown = ""
        self._bar_values = Throttle(BAR_INTERVAL)
        self._texts = Throttle(TEXT_INTERVAL)
        self._clock_tick = Throttle(HEADER_INTERVAL)
        self._broken = False
        self.gpu_feed = GpuFeed(clock=clock)

    # ------------------------------------------------------------- View API
    def open(self) -> None:
        """Show the dashboard now when it goes into a host (a ``block=False`` run's frame,
        already displayed); in a cell of its own it appears on demand (`refresh`)."""
        if self.host is not None:
            self._show()

    def _show(self) -> None:
        if self.box is not None:
            return
        self._build()
        if self.host is not None:
            self.host.children = (*self.host.children, self.box)
        else:
            from IPython.display import display

            self._handle = display(self.box, display_id=True)

    def start(self, state: RunState) -> None:
        if self.box is not None:
            self._guarded(self._render, state, True)
            self._guarded(self._plotter)  # import matplotlib while the workers start


    def output(self, rank: int, stream: str, lines: list) -> None:
        """Lines are already in ``state.log``; the log panel shows them at its own pace.
        Without a log panel they are printed in the cell, once, like a cell's own prints."""
        if not self.show_log:
            super().output(rank, stream, lines)

    def refresh(self, state: RunState) -> None:
        if self._broken:
            return
        self._guarded(self.gpu_feed.poll, state)
        if self.box is None:
            if not dashboard_due(state):
                return
            self._show_or_say_why()
            if not self._broken:
                self._guarded(self._render, state, True)
            return
        self._guarded(self._render, state, False)

    def finish(self, state: RunState) -> None:
        try:
            if self.box is None and dashboard_due(state) and not self._broken:
                self._show_or_say_why()   # due only now: the run's end came after APPEAR_AFTER
            if self.box is None:   # ended before its dashboard was due, or ipywidgets failed
                self._finish_static(state)
                return
            self._finish(state)
        except Exception as exc:  # never let the dashboard hide how the run ended
            print(f"notebook_launcher: the dashboard failed ({type(exc).__name__}: {exc})", file=sys.stderr)

    def _show_or_say_why(self) -> None:
        """Build and show the dashboard; ipywidgets is imported here, so a broken install
        shows up only now (`ui._widgets_installed` finds it without importing it)."""
        try:
            import ipywidgets  # noqa: F401
        except Exception as exc:
            self._broken = True
            print(f"notebook_launcher: ipywidgets failed to import ({type(exc).__name__}: {exc}): no live "
                  "dashboard for this run, its summary comes at the end. Reinstall ipywidgets, or pass "
                  "display='text'.", file=sys.stderr)
            return
        self._guarded(self._show)

    # ------------------------------------------------------------- building
    def _build(self) -> None:
        import ipywidgets as w

        def make(cls, *args, **kwargs):
            widget = cls(*args, **kwargs)
            self._widgets.append(widget)
            return widget

        self.header = make(w.HTML)
        self.bars = []
        for _ in range(MAX_BARS):
            label = make(w.HTML, layout=w.Layout(width="110px", overflow="hidden"))
            bar = make(w.IntProgress, min=0, max=1, value=0, layout=w.Layout(flex="1 1 auto", width="auto"))
            stats = make(w.HTML, layout=w.Layout(min_width="240px"))
            row = make(w.HBox, [label, bar, stats], layout=w.Layout(display="none", align_items="center"))
            self.bars.append((row, label, bar, stats))
        self.image = make(w.Image, format="png", layout=w.Layout(display="none", max_width="100%"))
        self.plot_hint = make(w.HTML, fragments.no_metrics_hint())
        self.metric_select = make(w.SelectMultiple, options=[], rows=3, layout=w.Layout(width="200px"))
        self.smoothing = make(w.FloatSlider, value=0.6, min=0.0, max=0.99, step=0.01, description="smoothing",
                              readout_format=".2f", continuous_update=False)
        self.log_scale = make(w.Checkbox, value=False, description="log scale", indent=False)
        self.metric_select.observe(self._on_select, names="value")
        self.smoothing.observe(self._on_control, names="value")
        self.log_scale.observe(self._on_control, names="value")
        self.controls = make(w.HBox, [self.metric_select, self.smoothing, self.log_scale],
                             layout=w.Layout(display="none", align_items="center"))
        self.tables = make(w.HTML)
        self.log = make(w.HTML)
        bar_rows = make(w.VBox, [row for row, *_ in self.bars])
        self.box = make(w.VBox, [self.header, bar_rows, self.image, self.plot_hint, self.controls,
                                 self.tables, self.log])

    # ------------------------------------------------------------- rendering
    def _render(self, state: RunState, force: bool) -> None:
        now = self.clock()
        if force or state.status != self._status_shown or self._clock_tick.ready(now):
            self.header.value = fragments.header(state, self.title)
            self._status_shown = state.status
        if state.progress_version != self._progress_seen and (force or self._bar_values.ready(now)):
            self._progress_seen = state.progress_version
            self._update_bars(state, texts=force)
        if state.series:
            # The hint goes with the first metric, before the table lists it and before the
            # first frame is drawn (which can take 0.3 s): never the hint beside a metric.
            self.plot_hint.layout.display = "none"
        if force or self._texts.ready(now):
            self._update_bars(state, texts=True)
            self.tables.value = self._tables_html(state)
            if self.show_log and state.log_version != self._log_seen:
                self._log_seen = state.log_version
                self.log.value = fragments.log_panel(state, self.prefix, LOG_PANEL_LINES)
        if state.series and (state.metrics_version != self._plot_seen or self._plot_dirty) \
                and (force or self._plot_due(now)):
            self._update_plot(state, now)

    def _plot_due(self, now: float) -> bool:
        """The first frame as soon as there is a metric (a run can be over in 0.6 s, before
        any throttle lets a frame through); the next ones at the throttled pace."""
        return self.png is None or now - self._plot_at >= self._plot_interval

    def _update_bars(self, state: RunState, texts: bool) -> None:
        bars = state.bars()[:MAX_BARS]
        _, eta = state.overall()
        for index, (row, label, bar, stats) in enumerate(self.bars):
            if index >= len(bars):
                row.layout.display = "none"
                continue
            info = bars[index]
            with bar.hold_sync():
                bar.max = max(1, info.total if info.total is not None else info.n)
                bar.value = min(info.n, bar.max)
            bar.layout.visibility = "visible" if info.total is not None else "hidden"
            row.layout.display = "flex"
            if texts:
                label.value = fragments.bar_label(info)
                stats.value = fragments.bar_stats(info, eta if index == 0 and len(bars) > 1 else None)

    def _tables_html(self, state: RunState) -> str:
        parts = (fragments.metrics_table(state), fragments.ranks_table(state, self.clock()), fragments.gpu_table(state))
        return (f'{fragments.precision_line(state)}'
                f'<div style="display: flex; flex-wrap: wrap; align-items: flex-start;">{"".join(parts)}</div>')

    def _plotter(self):
        if self._plot is None:
            from .plot import MetricsPlot

            self._plot = MetricsPlot()
        return self._plot

    def _selected(self, state: RunState) -> list:
        names = list(state.series)
        if tuple(names) != tuple(self.metric_select.options):
            chosen = [n for n in self.metric_select.value if n in names] if self._user_selected else names[:6]
            self._setting_options = True
            try:
                with self.metric_select.hold_sync():
                    self.metric_select.options = names
                    self.metric_select.value = tuple(chosen)
                    self.metric_select.rows = min(max(len(names), 2), 6)
            finally:
                self._setting_options = False
            self.controls.layout.display = "flex"
        return list(self.metric_select.value) or names[:6]

    def _update_plot(self, state: RunState, now: float, final: bool = False) -> Optional[bytes]:
        self._plot_seen, self._plot_dirty = state.metrics_version, False
        names = self._selected(state)
        plotter = self._plotter()
        started = time.perf_counter()
        png = plotter.render(state.series, names, self.smoothing.value, self.log_scale.value, final=final)
        spent = time.perf_counter() - started
        self._plot_at = now
        if self.png is not None:
            # The first frame's cost is mostly one-off (fonts, layout: 0.4 s on a busy core),
            # so the pace follows what the frames after it cost.
            self._plot_interval = max(PLOT_INTERVAL, spent / PLOT_DUTY)
        if png is not None:
            self.png = png
            self.plot_renders += 1
            self.image.value = png
            self.image.layout.display = "block"
        return png

    # ------------------------------------------------------------- controls (kernel's main thread)
    def _on_select(self, change) -> None:
        if not self._setting_options:
            self._user_selected = True
            self._plot_dirty = True

    def _on_control(self, change) -> None:
        self._plot_dirty = True

    # ------------------------------------------------------------- the end
    def _finish(self, state: RunState) -> None:
        png = None
        if state.series:
            png = self._update_plot(state, self.clock(), final=True)
        self._render(state, True)
        style = END_STYLE.get(state.status, "warning")
        for _, _, bar, _ in self.bars:
            bar.bar_style = style
        self.snapshot = snapshot.build(state, self.title, self.prefix, png, log_lines=self._summary_lines())
        self._plot = None  # the figure's memory goes with the live plot
        if self.host is None and self._handle is not None:
            self._replace_output(self.snapshot)
        else:
            self._freeze(self.snapshot)

    def _finish_static(self, state: RunState) -> None:
        """A run that ended before its dashboard was due: only the static summary."""
        from IPython.display import display

        self.snapshot = snapshot.build(state, self.title, self.prefix, None, log_lines=self._summary_lines())
        for bundle in self.snapshot.bundles():
            display(bundle, raw=True)

    def _summary_lines(self) -> int:
        """Output lines the summary repeats: none when they were printed in the cell already."""
        return snapshot.FINAL_LOG_LINES if self.show_log else 0

    def _replace_output(self, snap: snapshot.Snapshot) -> None:
        """Blocking run: the cell is still executing, so its output can be replaced for good."""
        from IPython.display import display

        first, *rest = snap.bundles()
        self._handle.update(first, raw=True)
        for bundle in rest:
            display(bundle, raw=True)
        # Empty the big values first: tools that save widget state (nbclient, "save widget
        # state" in JupyterLab) keep a closed widget's last state in the notebook's metadata.
        self.image.value, self.log.value, self.tables.value = b"", "", ""
        self.close()  # the widgets' kernel side goes; the notebook keeps the summary

    def _freeze(self, snap: snapshot.Snapshot) -> None:
        """``block=False``: the launching cell is done; show the summary inside the live container."""
        import ipywidgets as w

        parts = [w.HTML(snap.summary_html)]
        if snap.png:
            parts.append(w.Image(value=snap.png, format="png", layout=w.Layout(max_width="100%")))
        if snap.log_html:
            parts.append(w.HTML(snap.log_html))
        old = [widget for widget in self._widgets if widget is not self.box]
        self.box.children = parts
        self._widgets = [self.box, *parts]
        _close(old)

    def close(self) -> None:
        """Close every widget this view made (their comms go; a displayed summary stays)."""
        _close(self._widgets)
        self._widgets = []


def _close(widgets: list) -> None:
    """Close widgets with their layout and style models (each is a comm of its own)."""
    for widget in widgets:
        parts = [getattr(widget, name, None) for name in ("layout", "style")]
        widget.close()
        for part in parts:
            if part is not None and hasattr(part, "close"):
                part.close()
