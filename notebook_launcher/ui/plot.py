"""Metric curves as PNG bytes: matplotlib off-screen, one reused `Figure`.

No pyplot (no global figure registry, no GUI backend, nothing that leaks between
calls): a `Figure` with an Agg canvas is drawn and encoded in the calling thread.

A live plot is redrawn often while workers compete for the same cores, so a render
must be cheap. Axes, ticks and grid are drawn once and kept as a background; a
render only restores it and draws the lines and titles over it ("blitting", a few
milliseconds). Live axis limits are sticky, rounded up (x to 1-2-5 steps, y with
headroom), so the full, costly redraw happens only when the data leave them; the final
render is fitted to the data. The PNG is
palette-encoded, which keeps it small (10-20 KB) in the saved notebook.
"""

from __future__ import annotations

import io
import math
from typing import Optional, Sequence

from ..state import Series, format_value

MAX_PANELS = 6          # metrics plotted at once; the rest are in the table
COLUMNS = 3             # panels per row
DRAWN_POINTS = 600      # points drawn per line (a panel is ~250 px wide)
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf")
RELAYOUT_EVERY = 4      # full redraws between two (costly) tight-layout passes
HEADROOM = 0.08         # y limits: this fraction of the data's span is added on each side
SHRINK_BELOW = 0.45     # ...and refitted when a fresh fit would be less than this share of them
REACH = 0.2             # a crossed y limit moves this fraction of the data's span past the data
SMOOTH_FROM = 10        # fewer points than this are drawn as they are (an average of 3 points lags far behind them)
MARKERS_UP_TO = 30      # ...and up to this many points each gets a marker


def smooth(values: Sequence[float], weight: float) -> list:
    """Exponential moving average with the start-up bias removed (as TensorBoard does).

    ``weight`` in [0, 1): 0 returns the values unchanged; 0.9 is heavy smoothing.
    Non-finite values are skipped (they stay NaN, the curve has a gap).

    Example::

        smooth([1.0, 0.0, 0.0], 0.5)   # [1.0, 0.333..., 0.142...]
    """
    if weight <= 0:
        return list(values)
    out, average, count = [], 0.0, 0
    for value in values:
        if not math.isfinite(value):
            out.append(math.nan)
            continue
        average = average * weight + (1 - weight) * value
        count += 1
        out.append(average / (1 - weight ** count))
    return out


def thin(steps: Sequence[float], values: Sequence[float], limit: int = DRAWN_POINTS) -> tuple:
    """At most ``limit`` points: consecutive groups averaged (finite values only)."""
    import numpy as np

    if len(steps) <= limit:
        return list(steps), list(values)
    group = math.ceil(len(steps) / limit)
    count = math.ceil(len(steps) / group)
    padded = np.full(count * group, np.nan)
    padded[: len(values)] = values
    blocks = padded.reshape(count, group)
    finite = np.isfinite(blocks)
    sums = np.where(finite, blocks, 0.0).sum(axis=1)
    counts = finite.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ys = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    last = np.minimum(np.arange(1, count + 1) * group, len(steps)) - 1
    return np.asarray(steps)[last], ys


class MetricsPlot:
    """Draws up to `MAX_PANELS` metrics, one small panel each, to PNG bytes.

    Example::

        plot = MetricsPlot()
        png = plot.render(state.series, smoothing=0.6, log_scale=False)
        open("curves.png", "wb").write(png)
    """

    def __init__(self, width: float = 7.8, row_height: float = 2.3, dpi: int = 96) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.width, self.row_height, self.dpi = width, row_height, dpi
        self.figure = Figure(figsize=(width, row_height), dpi=dpi, facecolor="white")
        self.canvas = FigureCanvasAgg(self.figure)
        self.full_draws = 0       # renders that redrew axes and ticks (the rest only blit)
        self._names: tuple = ()
        self._panels: dict = {}   # name -> (axes, raw line, smooth line, title)
        self._background = None
        self._scales: dict = {}   # name -> "linear" | "log"

    def render(self, series: dict, names: Optional[Sequence[str]] = None, smoothing: float = 0.6,
               log_scale: bool = False, final: bool = False) -> Optional[bytes]:
        """PNG of ``names`` (default: the first `MAX_PANELS` of ``series``); None when nothing to draw.

        ``final``: a last, fully redrawn and carefully laid-out render (for the saved summary).
        """
        names = tuple(n for n in (names if names is not None else series) if n in series)[:MAX_PANELS]
        if not names or not any(series[n].count for n in names):
            return None
        if names != self._names:
            self._build(names)
        moved = [self._update(name, series[name], smoothing, log_scale, final) for name in names]
        if final or self._background is None or any(moved):
            self._full_draw(relayout=final or self.full_draws % RELAYOUT_EVERY == 0)
        else:
            self.canvas.restore_region(self._background)
            self._draw_dynamic()
        return self._png()

    # ------------------------------------------------------------- drawing
    def _build(self, names: tuple) -> None:
        from matplotlib.ticker import FuncFormatter, MaxNLocator

        self.figure.clear()
        rows = math.ceil(len(names) / COLUMNS)
        columns = min(len(names), COLUMNS)
        self.figure.set_size_inches(self.width, self.row_height * rows + 0.1)
        self._panels, self._scales, self._background = {}, {}, None
        for index, name in enumerate(names):
            axes = self.figure.add_subplot(rows, columns, index + 1)
            color = COLORS[index % len(COLORS)]
            raw, = axes.plot([], [], color=color, linewidth=0.8, alpha=0.28)
            smooth_line, = axes.plot([], [], color=color, linewidth=1.7, markersize=3)
            title = axes.set_title(name, loc="left", fontsize=10, color="#222222", pad=4)
            axes.set_autoscale_on(False)
            axes.grid(True, color="#e6e6e6", linewidth=0.8)
            axes.set_axisbelow(True)
            for side in ("top", "right"):
                axes.spines[side].set_visible(False)
            for side in ("left", "bottom"):
                axes.spines[side].set_color("#9a9a9a")
            axes.tick_params(labelsize=8, colors="#444444", length=3)
            axes.xaxis.set_major_locator(MaxNLocator(4, integer=True))
            axes.xaxis.set_major_formatter(FuncFormatter(_step_label))
            axes.yaxis.set_major_locator(MaxNLocator(5))
            if index >= len(names) - columns:
                axes.set_xlabel("step", fontsize=8, color="#666666", labelpad=1)
            self._panels[name] = (axes, raw, smooth_line, title)
        self._names = names
        self.full_draws = 0

    def _update(self, name: str, series: Series, smoothing: float, log_scale: bool, final: bool) -> bool:
        """Set the lines' data; True when the axes must be redrawn (limits, scale or title changed)."""
        axes, raw, smooth_line, title = self._panels[name]
        steps, values = series.points()
        xs, ys = thin(steps, values)
        if len(xs) < SMOOTH_FROM:
            smoothing = 0.0
        sx, sy = xs, smooth(ys, smoothing)  # smoothing the drawn points: cheap, same look
        raw.set_data(xs, ys)
        raw.set_visible(smoothing > 0 and len(xs) > 1)
        smooth_line.set_data(sx, sy)
        smooth_line.set_marker("o" if len(sx) <= MARKERS_UP_TO else "")  # a few points (or one) still show
        # Live, the title is the name (part of the background; the table has the values);
        # the final picture, which may be read on its own, shows the last value too.
        text = f"{name}  {format_value(series.last)}" if final else name
        moved = text != title.get_text()
        title.set_text(text)
        positive = series.low > 0 and math.isfinite(series.low)
        scale = "log" if log_scale and positive else "linear"
        if scale != self._scales.get(name):
            moved = True
        if scale != self._scales.get(name):
            axes.set_yscale(scale)
            self._scales[name] = scale
        drawn = [v for v in (list(ys) if raw.get_visible() else []) + list(sy) if math.isfinite(v)]
        # From 0 when the run started there (the first kept point of a downsampled series
        # stands for a few steps past 0); from its first step for a resumed run.
        first = 0 if 0 <= steps[0] <= 0.2 * steps[-1] else steps[0]
        # Live limits are rounded up and sticky (cheap frames); the final picture, which the
        # saved notebook keeps, is fitted to the data (a 252-step run ends at 252, not 500).
        xlim = (float(first), float(max(steps[-1], first + 1))) if final else _x_limits(first, steps[-1])
        ylim = _y_limits(drawn, axes.get_ylim(), scale, force=moved or final) if drawn else axes.get_ylim()
        if xlim != tuple(axes.get_xlim()):
            axes.set_xlim(*xlim)
            moved = True
        if ylim != tuple(axes.get_ylim()):
            axes.set_ylim(*ylim)
            moved = True
        return moved

    def _dynamic(self) -> list:
        return [artist for axes, raw, smooth_line, _ in self._panels.values() for artist in (raw, smooth_line)]

    def _full_draw(self, relayout: bool) -> None:
        if relayout:
            try:
                self.figure.tight_layout(pad=0.6, w_pad=1.2, h_pad=0.8)
            except Exception:  # odd sizes or fonts: keep the previous layout
                pass
        shown = [(artist, artist.get_visible()) for artist in self._dynamic()]
        for artist, _ in shown:
            artist.set_visible(False)
        self.canvas.draw()  # axes, ticks, grid, labels: the background
        self._background = self.canvas.copy_from_bbox(self.figure.bbox)
        for artist, visible in shown:
            artist.set_visible(visible)
        self._draw_dynamic()
        self.full_draws += 1

    def _draw_dynamic(self) -> None:
        for axes, raw, smooth_line, _ in self._panels.values():
            for artist in (raw, smooth_line):
                if artist.get_visible():
                    axes.draw_artist(artist)

    def _png(self) -> bytes:
        from PIL import Image

        width, height = self.canvas.get_width_height()
        image = Image.frombuffer("RGBA", (width, height), self.canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
        # A palette of 128 colours keeps anti-aliased lines smooth at a third of the size.
        image = image.convert("RGB").quantize(128, method=Image.Quantize.FASTOCTREE)
        palette = image.getpalette()
        for index in range(0, len(palette) - 2, 3):  # the background stays pure white
            if min(palette[index:index + 3]) >= 250:
                palette[index:index + 3] = [255, 255, 255]
        image.putpalette(palette)
        buffer = io.BytesIO()
        image.save(buffer, format="png", optimize=False)
        return buffer.getvalue()


def _step_label(value: float, _position=None) -> str:
    """Compact step numbers: 950, 2k, 12.5k, 1.2M (panels are narrow)."""
    for size, unit in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.0f}"


def _x_limits(first: float, last: float) -> tuple:
    """From the first step to ``last`` rounded up to 1, 2 or 5 times a power of ten."""
    span = max(last - first, 1)
    power = 10 ** math.floor(math.log10(span))
    for factor in (1, 2, 5, 10):
        if factor * power >= span:
            return (float(first), float(first + factor * power))
    return (float(first), float(first + 10 * power))


def _y_limits(values: list, current: tuple, scale: str, force: bool) -> tuple:
    """Keep ``current`` while the data fit it well. When the data cross a limit, that
    limit moves past them by `REACH` of their span (a trending curve then crosses it
    rarely); when they fill too little of it, or ``force``, fit the data afresh."""
    to, back = (math.log10, lambda v: 10 ** v) if scale == "log" else ((lambda v: v), (lambda v: v))
    low, high = to(min(values)), to(max(values))
    cur_low, cur_high = (to(v) if v > 0 or scale != "log" else -math.inf for v in current)
    # The unit of headroom: the data's span, but not less than a small share of their size
    # (a learning rate that barely moves must not cross a hair-thin limit every time).
    unit = max(high - low, 0.02 * max(abs(low), abs(high)), 1e-12)
    fit = (low - unit * HEADROOM, high + unit * HEADROOM)
    if force or not math.isfinite(cur_low) or (fit[1] - fit[0]) < SHRINK_BELOW * (cur_high - cur_low):
        return (back(fit[0]), back(fit[1]))
    if cur_low <= low and high <= cur_high:
        return tuple(current)
    new_low = cur_low if low >= cur_low else low - unit * REACH
    new_high = cur_high if high <= cur_high else high + unit * REACH
    return (back(new_low), back(new_high))
