"""The metric plot: real matplotlib drawing, PNG bytes checked with PIL."""

import io
import math

import pytest
from PIL import Image

from notebook_launcher.state import Series
from notebook_launcher.ui.plot import DRAWN_POINTS, MAX_PANELS, MetricsPlot, smooth, thin


def filled(values, start=0):
    series = Series()
    for step, value in enumerate(values, start):
        series.add(step, value)
    return series


def decode(png):
    return Image.open(io.BytesIO(png))


def test_smoothing_is_a_debiased_moving_average():
    assert smooth([3.0, 3.0, 3.0], 0.9) == pytest.approx([3.0, 3.0, 3.0])   # no pull towards 0
    assert smooth([1.0, 0.0], 0.5) == pytest.approx([1.0, 1 / 3])
    assert smooth([1.0, 2.0], 0.0) == [1.0, 2.0]
    out = smooth([1.0, math.nan, 1.0], 0.5)
    assert math.isnan(out[1]) and out[2] == pytest.approx(1.0)


def test_thin_caps_the_drawn_points_and_keeps_the_last_step():
    xs, ys = thin(list(range(10_001)), [float(i) for i in range(10_001)])
    assert len(xs) <= DRAWN_POINTS and xs[-1] == 10_000
    assert all(y <= x for x, y in zip(xs, ys))


def test_render_nothing_without_points():
    plot = MetricsPlot()
    assert plot.render({}) is None
    assert plot.render({"loss": Series()}) is None


def test_one_panel_per_metric_reusing_one_figure():
    plot = MetricsPlot()
    series = {name: filled([1.0 / (i + 1) for i in range(500)]) for name in ("loss", "acc", "lr")}
    first = decode(plot.render(series))
    figure = plot.figure
    assert len(figure.axes) == 3 and first.size[0] > 600
    again = decode(plot.render(series, names=["loss"]))
    assert plot.figure is figure and len(figure.axes) == 1        # same Figure, rebuilt panels
    assert again.size[1] < first.size[1] + 5
    many = {f"m{i}": filled([float(i)] * 10) for i in range(MAX_PANELS + 3)}
    plot.render(many)
    assert len(plot.figure.axes) == MAX_PANELS                     # the rest stay in the table


def test_log_scale_only_for_positive_series():
    plot = MetricsPlot()
    positive = {"loss": filled([10.0 ** -(i / 100) for i in range(500)])}
    plot.render(positive, log_scale=True)
    assert plot.figure.axes[0].get_yscale() == "log"
    signed = {"loss": filled([math.sin(i / 10) for i in range(500)])}
    plot.render(signed, log_scale=True)
    assert plot.figure.axes[0].get_yscale() == "linear"


def test_a_long_run_makes_a_small_png(tmp_path):
    plot = MetricsPlot()
    series = {"loss": Series(), "accuracy": Series()}
    for step in range(20_000):
        series["loss"].add(step, 2.3 * math.exp(-step / 4000) + 0.05 * math.sin(step))
        series["accuracy"].add(step, 1 - math.exp(-step / 3000))
    png = plot.render(series, final=True)
    assert png.startswith(b"\x89PNG") and len(png) < 40_000
    (tmp_path / "curves.png").write_bytes(png)
    image = decode(png)
    assert image.size == (plot.canvas.get_width_height())
    colours = image.convert("RGB").getcolors(maxcolors=256)
    assert colours is not None and len(colours) > 8                # lines drawn, not a blank image


def test_live_frames_blit_over_a_kept_background_and_match_a_full_redraw():
    plot = MetricsPlot()
    series = {"loss": Series(), "lr": Series()}
    frames = 0
    for step in range(20_000):
        series["loss"].add(step, 2.0 * math.exp(-step / 5000) + 0.1 * math.sin(step / 7))
        series["lr"].add(step, 1e-3 * (1 - step / 20_000))
        if step % 100 == 99:
            plot.render(series)
            frames += 1
    assert plot.full_draws < frames / 3                      # most frames only blit
    blitted = decode(plot.render(series)).convert("RGB")
    plot._full_draw(relayout=False)                          # same limits, everything redrawn
    redrawn = decode(plot._png()).convert("RGB")
    assert blitted.tobytes() == redrawn.tobytes()


def test_sticky_limits_follow_the_data():
    from notebook_launcher.ui.plot import _x_limits, _y_limits

    assert _x_limits(0, 1234) == (0.0, 2000.0) and _x_limits(0, 2000) == (0.0, 2000.0)
    assert _x_limits(0, 3) == (0.0, 5.0) and _x_limits(0, 0) == (0.0, 1.0)
    current = (0.0, 10.0)
    assert _y_limits([2.0, 8.0], current, "linear", force=False) == current        # fits: kept
    low, high = _y_limits([-1.0, 8.0], current, "linear", force=False)              # crossed below
    assert low < -1.0 and high == 10.0
    low, high = _y_limits([4.0, 4.5], current, "linear", force=False)               # far too wide: refit
    assert 3.5 < low < 4.0 and 4.5 < high < 5.0
    low, high = _y_limits([1e-4, 1.0], (1e-3, 2.0), "log", force=False)
    assert low < 1e-4 and high == 2.0


def line_columns(png, axes, colour):
    """The pixel columns, as fractions of the axes' width, where ``colour`` is drawn inside ``axes``."""
    image = decode(png).convert("RGB")
    box = axes.get_window_extent()
    height = image.size[1]
    left, right = int(box.x0), int(box.x1)
    top, bottom = int(height - box.y1), int(height - box.y0)
    target = tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))
    columns = set()
    for x in range(left, right):
        for y in range(top, bottom):
            pixel = image.getpixel((x, y))
            if sum(abs(a - b) for a, b in zip(pixel, target)) < 60:
                columns.add((x - left) / (right - left))
                break
    return columns


def test_the_final_picture_is_fitted_to_the_data():
    """Live, a 252-step run is drawn on sticky limits rounded up to 500; the final picture
    (kept in the saved notebook) ends where the data end."""
    from notebook_launcher.ui.plot import COLORS, HEADROOM

    plot = MetricsPlot()
    series = {"loss": Series()}
    for step in range(252):
        series["loss"].add(step, 2.4 - step / 500 + 0.05 * math.sin(step))
        if step % 25 == 24:
            plot.render(series, smoothing=0.0)
    live = plot.render(series, smoothing=0.0)
    axes = plot.figure.axes[0]
    assert axes.get_xlim() == (0.0, 500.0)
    assert max(line_columns(live, axes, COLORS[0])) < 0.55         # the curve stops halfway
    final = plot.render(series, smoothing=0.0, final=True)
    low, high = axes.get_xlim()
    assert low == 0.0 and 251 <= high <= 252
    assert max(line_columns(final, axes, COLORS[0])) > 0.97        # the curve reaches the right edge
    bottom, top = axes.get_ylim()                                  # y fitted too: only the headroom
    low, high = series["loss"].low, series["loss"].high
    assert low - 1.5 * HEADROOM * (high - low) < bottom < low
    assert high < top < high + 1.5 * HEADROOM * (high - low)


def test_a_few_points_are_drawn_as_they_are_and_many_are_smoothed():
    """An average of 3 points lags far behind them: a short series is drawn raw, with markers."""
    plot = MetricsPlot()
    plot.render({"acc": filled([0.1, 0.5, 0.9])}, smoothing=0.6)
    _, raw, line, _ = plot._panels["acc"]
    assert list(line.get_ydata()) == pytest.approx([0.1, 0.5, 0.9]) and line.get_marker() == "o"
    assert not raw.get_visible()
    plot.render({"acc": filled([i / 50 for i in range(50)])}, smoothing=0.6)
    _, raw, line, _ = plot._panels["acc"]
    assert line.get_ydata()[-1] < 49 / 50 - 0.01 and raw.get_visible() and line.get_marker() in ("", "None")
