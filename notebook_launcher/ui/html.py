"""HTML fragments of the run state, shared by the live dashboard and the static summary.

Pure functions: state in, string out. Inline styles only, and the content stays
readable where a renderer strips styles (GitHub's notebook preview does): plain
tables, ``<b>``, ``<pre>``.
"""

from __future__ import annotations

import html
from typing import Callable, Optional

from ..gpu import format_bytes
from ..state import ProgressState, RunState, format_duration, format_rate, format_value

STATUS_LOOK = {   # status -> (symbol, colour)
    "starting": ("◌", "#7f7f7f"),
    "running": ("●", "#1f77b4"),
    "stuck": ("◐", "#e67e00"),
    "succeeded": ("✔", "#2ca02c"),
    "done": ("✔", "#2ca02c"),
    "failed": ("✖", "#d62728"),
    "interrupted": ("■", "#e67e00"),
    "stopped": ("■", "#e67e00"),
}
FONT = "font-family: var(--jp-ui-font-family, system-ui, sans-serif); font-size: 13px; line-height: 1.45;"
MONO = "font-family: var(--jp-code-font-family, monospace); font-size: 12px;"
TABLE = "border-collapse: collapse; margin: 2px 16px 4px 0; font-size: 12px;"
CELL = "padding: 1px 10px 1px 0; text-align: left; border: none;"
HEAD = CELL + " color: #666; font-weight: 600; border-bottom: 1px solid #ddd;"
STALE_AFTER = 5.0   # seconds without news after which a running rank's "last seen" is shown


def status_badge(status: str) -> str:
    symbol, colour = STATUS_LOOK.get(status, ("•", "#444"))
    return f'<b style="color: {colour}">{symbol} {html.escape(status)}</b>'


def header(state: RunState, title: str) -> str:
    """``● running · 2 CPU processes (gloo, fork) · 0:12 · step 1200``"""
    parts = [status_badge(state.status)]
    if title:
        parts.append(html.escape(title))
    if state.attempt:
        parts.append(f"restart {state.attempt}")
    parts.append(f"elapsed {format_duration(state.elapsed)}")
    if state.last_step is not None:
        parts.append(f"step {state.last_step:,}")
    return f'<div style="{FONT}">{" · ".join(parts)}</div>'


def bar_label(bar: ProgressState) -> str:
    """Left of a bar: its description."""
    desc = bar.desc or ("progress" if bar.depth == 0 else f"level {bar.depth + 1}")
    return f'<span style="{FONT}">{html.escape(desc)}</span>'


def bar_stats(bar: ProgressState, eta: Optional[float] = None) -> str:
    """Right of a bar: ``120/500 · 45.2 it/s · ETA 0:08``."""
    count = f"{bar.n:,}/{bar.total:,}" if bar.total is not None else f"{bar.n:,}"
    parts = [count, format_rate(bar.rate)]
    eta = bar.eta if eta is None else eta
    if eta is not None:
        parts.append(f"ETA {format_duration(eta)}")
    return f'<span style="{FONT} white-space: nowrap;">{" · ".join(parts)}</span>'


def text_bar(fraction: Optional[float], width: int = 24) -> str:
    """``█████████░░░░░░░░░░░`` (for places without a progress widget)."""
    if fraction is None:
        return ""
    full = int(round(fraction * width))
    return "█" * full + "░" * (width - full)


def progress_table(state: RunState) -> str:
    """Every bar as a row of text: description, bar, counts, rate, ETA."""
    bars = state.bars()
    if not bars:
        return ""
    fraction, eta = state.overall()
    rows = []
    for index, bar in enumerate(bars):
        stats = bar_stats(bar, eta if index == 0 and len(bars) > 1 else None)
        rows.append(f'<tr><td style="{CELL}">{bar_label(bar)}</td>'
                    f'<td style="{CELL} {MONO} color: #1f77b4;">{text_bar(bar.fraction)}</td>'
                    f'<td style="{CELL}">{stats}</td></tr>')
    return f'<table style="{TABLE}">{"".join(rows)}</table>'


def ranks_table(state: RunState, now: Optional[float] = None) -> str:
    """One row per local rank: state, pid, step, progress, last seen; and its GPU memory
    (allocated now, peak) once any rank has sent it."""
    now = state.now if now is None else now
    memory = any(info.device_stats is not None and info.device_stats.peak is not None
                 for info in state.ranks.values())
    rows = []
    for rank in sorted(state.ranks):
        info = state.ranks[rank]
        position = " · ".join(f"{n:,}/{total:,}" if total is not None else f"{n:,}"
                              for _, (n, total) in sorted(info.position.items()))
        seen = ""
        if info.last_seen is not None and now is not None and info.status == "running":
            quiet = now - info.last_seen
            seen = f"{quiet:.0f} s ago" if quiet >= STALE_AFTER else "now"
        status = status_badge(info.status)
        if info.exitcode not in (None, 0):
            status += f" (exit {info.exitcode})"
        cells = [rank, status, info.pid or "", "" if info.step is None else f"{info.step:,}", position, seen]
        if memory:
            cells.append(rank_memory(info.device_stats))
        rows.append("<tr>" + "".join(f'<td style="{CELL}">{cell}</td>' for cell in cells) + "</tr>")
    names = ["rank", "state", "pid", "step", "progress", "last seen"] + (["GPU memory (peak)"] if memory else [])
    head = "".join(f'<th style="{HEAD}">{name}</th>' for name in names)
    return f'<table style="{TABLE}"><tr>{head}</tr>{"".join(rows)}</table>'


def rank_memory(stats) -> str:
    """``cuda:0 · 3.2 GiB (peak 5.1 GiB)`` from a rank's `channel.DeviceStats`."""
    if stats is None or stats.peak is None:
        return ""
    where = f"cuda:{stats.device} · " if stats.device is not None else ""
    return f"{where}{format_bytes(stats.allocated)} (peak {format_bytes(stats.peak)})"


def gpu_table(state: RunState) -> str:
    """One row per GPU (NVML, sampled in the notebook): memory used/total with a bar, and
    utilization. Empty where there are no GPUs."""
    if not state.gpus:
        return ""
    rows = []
    for gpu in state.gpus:
        fraction = gpu.used / gpu.total if gpu.total else None
        utilization = "?" if gpu.utilization is None else f"{gpu.utilization} %"
        cells = (f"<b>GPU {gpu.index}</b>", html.escape(gpu.name),
                 f'<span style="{MONO} color: #1f77b4;">{text_bar(fraction, 12)}</span>',
                 f"{format_bytes(gpu.used)} / {format_bytes(gpu.total)}", utilization)
        rows.append("<tr>" + "".join(f'<td style="{CELL}">{cell}</td>' for cell in cells) + "</tr>")
    head = "".join(f'<th style="{HEAD}">{name}</th>' for name in ("GPU", "name", "", "memory used", "utilization"))
    return f'<table style="{TABLE}"><tr>{head}</tr>{"".join(rows)}</table>'


def precision_line(state: RunState) -> str:
    """``fp16 loss scale 65,536 · 2 steps skipped`` (the lead rank's GradScaler), or ""."""
    if state.loss_scale is None:
        return ""
    skipped = state.skipped_steps or 0
    return (f'<div style="{FONT}">fp16 loss scale <b>{state.loss_scale:,.6g}</b> · '
            f'{skipped:,} step{"s" if skipped != 1 else ""} skipped (inf/nan gradients)</div>')


def metrics_table(state: RunState) -> str:
    """Latest value, min and max of every metric (rank 0)."""
    if not state.series:
        return ""
    head = "".join(f'<th style="{HEAD}">{name}</th>' for name in ("metric", "last", "min", "max", "reports"))
    rows = []
    for name, series in state.series.items():
        low = format_value(series.low) if series.count and series.low != float("inf") else ""
        high = format_value(series.high) if series.count and series.high != float("-inf") else ""
        cells = (f"<b>{html.escape(name)}</b>", format_value(series.last), low, high, f"{series.count:,}")
        rows.append("<tr>" + "".join(f'<td style="{CELL}">{cell}</td>' for cell in cells) + "</tr>")
    return f'<table style="{TABLE}"><tr>{head}</tr>{"".join(rows)}</table>'


def log_lines(state: RunState, prefix: Callable[[int], str], limit: int) -> str:
    """The last ``limit`` output lines, escaped, stderr in red, one per line."""
    lines = list(state.log)[-limit:]
    out = []
    for rank, stream, line in lines:
        text = html.escape(prefix(rank) + line)
        out.append(f'<span style="color: #b22222">{text}</span>' if stream == "stderr" else text)
    return "\n".join(out)


def log_panel(state: RunState, prefix: Callable[[int], str], limit: int, height: int = 180) -> str:
    """A scrolling box that stays pinned to its newest line (column-reverse does the pinning)."""
    if not state.log:
        return ""
    hidden = state.lines_seen - min(limit, len(state.log))
    note = f'<div style="color: #888">... {hidden:,} earlier lines not shown</div>' if hidden > 0 else ""
    return (f'<div style="display: flex; flex-direction: column-reverse; max-height: {height}px; overflow-y: auto; '
            f'border: 1px solid #e0e0e0; padding: 4px 6px; background: #fafafa;">'
            f'<pre style="{MONO} margin: 0; white-space: pre-wrap;">{note}{log_lines(state, prefix, limit)}</pre></div>')


def failure_box(state: RunState, traceback_lines: int = 25) -> str:
    """Which rank failed, why, and the end of its traceback."""
    failure = state.failure
    if failure is None:
        return ""
    tb = "\n".join(failure.traceback.rstrip().splitlines()[-traceback_lines:]) if failure.traceback else ""
    body = f'<pre style="{MONO} margin: 4px 0 0 0; white-space: pre-wrap;">{html.escape(tb)}</pre>' if tb else ""
    return (f'<div style="{FONT} border-left: 3px solid #d62728; padding: 2px 8px; margin: 4px 0;">'
            f'<b>rank {failure.rank} failed</b>: {html.escape(failure.summary())}{body}</div>')


def no_metrics_hint() -> str:
    return (f'<div style="{FONT} color: #888;">No metrics yet: call '
            f'<code>report(step, loss=loss)</code> inside the function to plot them here.</div>')
