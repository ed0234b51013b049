"""The static end-of-run summary: HTML, a PNG and the log tail, as display bundles.

A saved notebook keeps display outputs but not live widgets (their state lives in the
kernel), so when a run ends the dashboard is replaced by these: they reopen and render
on GitHub and nbviewer with nothing running. Each bundle also has a ``text/plain``
form for consoles and for renderers that show no HTML.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Callable, Optional

from ..state import RunState, summary_line
from . import html as fragments

FINAL_LOG_LINES = 40   # output lines kept in the saved summary


@dataclass(frozen=True)
class Snapshot:
    summary_html: str
    summary_text: str
    png: Optional[bytes]
    log_html: str
    log_text: str

    def bundles(self) -> list:
        """Display bundles in order (summary, plot, log), for ``display(..., raw=True)``."""
        out = [{"text/html": self.summary_html, "text/plain": self.summary_text}]
        if self.png:
            out.append({"image/png": base64.b64encode(self.png).decode("ascii"),
                        "text/plain": "<metric curves (PNG)>"})
        if self.log_html:
            out.append({"text/html": self.log_html, "text/plain": self.log_text})
        return out


def build(state: RunState, title: str, prefix: Callable[[int], str], png: Optional[bytes],
          log_lines: int = FINAL_LOG_LINES) -> Snapshot:
    """Everything the saved notebook keeps about one run.

    Example::

        snap = build(state, "2 CPU processes (gloo, fork)", view.prefix, png)
        for bundle in snap.bundles():
            IPython.display.display(bundle, raw=True)
    """
    tables = "".join(part for part in (fragments.metrics_table(state), fragments.ranks_table(state),
                                       fragments.gpu_table(state)) if part)
    summary = (
        f'<div style="{fragments.FONT}">'
        f"{fragments.header(state, title)}"
        f"{fragments.failure_box(state)}"
        f"{fragments.progress_table(state)}"
        f"{fragments.precision_line(state)}"
        f'<div style="display: flex; flex-wrap: wrap; align-items: flex-start;">{tables}</div>'
        f"</div>"
    )
    text = summary_line(state)
    if title:
        text = f"{text} ({title})"
    if state.failure is not None and state.failure.traceback:
        text += "\n" + "\n".join(state.failure.traceback.rstrip().splitlines()[-10:])
    log_html, log_text = "", ""
    if state.log and log_lines > 0:
        shown = min(log_lines, len(state.log))
        caption = (f"last {shown:,} of {state.lines_seen:,} output lines" if state.lines_seen > shown
                   else f"{shown:,} output line{'s' if shown != 1 else ''}")
        log_html = (f'<div style="{fragments.FONT} color: #666;">{caption}</div>'
                    f'<div style="display: flex; flex-direction: column-reverse; max-height: 240px; overflow-y: auto;">'
                    f'<pre style="{fragments.MONO} margin: 0;">{fragments.log_lines(state, prefix, log_lines)}</pre>'
                    f"</div>")
        log_text = "\n".join(prefix(rank) + line for rank, _, line in list(state.log)[-log_lines:])
    return Snapshot(summary, text, png, log_html, log_text)
