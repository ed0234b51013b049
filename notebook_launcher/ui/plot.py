"""Metric curves as PNG bytes: matplotlib off-screen, one reused `Figure`.

No pyplot (no global figure registry, no GUI backend, nothing that leaks between
calls): a `Figure` with an Agg canvas is drawn and encoded in the calling thread. The
figure and its lines are kept between renders and only their data change, which is
what keeps a live plot cheap (tens of milliseconds), and the PNG is palette-encoded,
which keeps it small (about 10-20 KB) in the saved notebook.
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
RELAYOUT_EVERY = 5      # renders between two (costly) tight-layout passes


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
        self._names: tuple = ()
        self._panels: dict = {}   # name -> (axes, raw line, smooth line)
        self._renders = 0

    def render(self, series: dict, names: Optional[Sequence[str]] = None, smoothing: float = 0.6,
               log_scale: bool = False, final: bool = False) -> Optional[bytes]:
        """PNG of ``names`` (default: the first `MAX_PANELS` of ``series``); None when nothing to draw.

        ``final``: a last, carefully laid-out render (for the saved summary).
        """
        names = tuple(n for n in (names if names is not None else series) if n in series)[:MAX_PANELS]
        if not names or not any(series[n].count for n in names):
            return None
        if names != self._names:
            self._build(names)
        for name in names:
            self._update(name, series[name], smoothing, log_scale)
        if final or self._renders % RELAYOUT_EVERY == 0:
            self._layout()
        self._renders += 1
        self.canvas.draw()
        return self._png()

    # ------------------------------------------------------------- drawing
    def _build(self, names: tuple) -> None:
        from matplotlib.ticker import MaxNLocator

        self.figure.clear()
        rows = math.ceil(len(names) / COLUMNS)
        columns = min(len(names), COLUMNS)
        self.figure.set_size_inches(self.width, self.row_height * rows + 0.1)
        self._panels = {}
        for index, name in enumerate(names):
            axes = self.figure.add_subplot(rows, columns, index + 1)
            color = COLORS[index % len(COLORS)]
            raw, = axes.plot([], [], color=color, linewidth=0.8, alpha=0.28)
            smooth_line, = axes.plot([], [], color=color, linewidth=1.7)
            axes.grid(True, color="#e6e6e6", linewidth=0.8)
            axes.set_axisbelow(True)
            for side in ("top", "right"):
                axes.spines[side].set_visible(False)
            for side in ("left", "bottom"):
                axes.spines[side].set_color("#9a9a9a")
            axes.tick_params(labelsize=8, colors="#444444", length=3)
            axes.xaxis.set_major_locator(MaxNLocator(5, integer=True))
            axes.yaxis.set_major_locator(MaxNLocator(5))
            if index >= len(names) - columns:
                axes.set_xlabel("step", fontsize=8, color="#666666", labelpad=1)
            self._panels[name] = (axes, raw, smooth_line)
        self._names = names
        self._renders = 0

    def _update(self, name: str, series: Series, smoothing: float, log_scale: bool) -> None:
        axes, raw, smooth_line = self._panels[name]
        steps, values = series.points()
        smoothed = smooth(values, smoothing)
        xs, ys = thin(steps, values)
        sx, sy = thin(steps, smoothed)
        raw.set_data(xs, ys)
        raw.set_visible(smoothing > 0 and len(xs) > 1)
        smooth_line.set_data(sx, sy)
        smooth_line.set_marker("o" if len(sx) == 1 else "")  # a single point still shows
        positive = series.low > 0 and math.isfinite(series.low)
        axes.set_yscale("log" if log_scale and positive else "linear")
        axes.relim()
        axes.autoscale_view()
        axes.set_title(f"{name}  {format_value(series.last)}", loc="left", fontsize=10,
                       color="#222222", pad=4)

    def _layout(self) -> None:
        try:
            self.figure.tight_layout(pad=0.6, w_pad=1.2, h_pad=0.8)
        except Exception:  # odd sizes or fonts: keep the previous layout
            pass

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
