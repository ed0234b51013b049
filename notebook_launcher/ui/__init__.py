"""Views of a run: widgets in a notebook, text in a terminal, or just the output lines.

- ``"widgets"``: a live ipywidgets dashboard (`ui.widgets.WidgetsView`), replaced at the
  end by a static HTML summary and PNG that a saved notebook keeps.
- ``"text"``: a progress line at a bounded rate and a plot saved to a file (`ui.text.TextView`).
- ``"none"``: only the workers' own output lines, rank-prefixed (`ui.base.View`).
- ``"auto"``: widgets inside a Jupyter kernel where ipywidgets is installed, text otherwise.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from .base import DEFAULT_PREFIX, View

DISPLAYS = ("auto", "widgets", "text", "none")


def resolve_display(display: str) -> str:
    """The concrete display for ``display`` here: "widgets", "text" or "none".

    Example::

        resolve_display("auto")   # "widgets" in a Jupyter kernel, "text" in a script
    """
    if display != "auto":
        return display
    from ..environment import in_jupyter_kernel

    if in_jupyter_kernel() and _widgets_installed():
        return "widgets"
    return "text"


def make_view(display: str, prefix: str = DEFAULT_PREFIX, title: str = "", host: Optional[Any] = None,
              show_log: bool = True) -> View:
    """The view for ``display`` ("auto" | "widgets" | "text" | "none").

    ``host``: an ipywidgets container already shown in a cell; the widgets view puts
    itself inside it instead of displaying a new output (used by ``block=False`` runs).
    ``show_log``: False prints output lines in the cell as they come instead of keeping
    them in the dashboard's log panel and summary (a session's cell: as its own prints).

    Example::

        view = make_view("text", title="2 CPU processes (gloo, fork)")
    """
    display = resolve_display(display)
    if display == "widgets":
        from ..environment import in_jupyter_kernel

        if host is not None or in_jupyter_kernel():
            from .widgets import WidgetsView

            return WidgetsView(prefix, title, host=host, show_log=show_log)
        print("notebook_launcher: display='widgets' needs a Jupyter kernel; showing text instead.",
              file=sys.stderr)
        display = "text"
    if display == "text":
        from .text import TextView

        return TextView(prefix, title)
    return View(prefix, title)


def _widgets_installed() -> bool:
    """Whether ipywidgets is installed, found without importing it: its import takes
    0.05-0.2 s of a kernel's first call, which a call that ends before its dashboard is
    due never needs (`ui.on_demand.dashboard_due`). Should the import fail later, the
    widgets view falls back to the static summary (`WidgetsView.finish`)."""
    import importlib.util

    try:
        return importlib.util.find_spec("ipywidgets") is not None
    except (ImportError, ValueError):   # a broken parent package, or a module with no spec
        return False
