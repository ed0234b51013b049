"""Views of a run: widgets or an in-place HTML display in a notebook, text in a terminal,
or just the output lines.

- ``"widgets"``: a live ipywidgets dashboard (`ui.widgets.WidgetsView`), replaced at the
  end by a static HTML summary and PNG that a saved notebook keeps.
- ``"html"``: the same dashboard as one display updated in place (`ui.html_view.HtmlView`):
  no widget manager, no JavaScript, so it renders in every front end; same summary at the end.
- ``"text"``: a progress line at a bounded rate and a plot saved to a file (`ui.text.TextView`).
- ``"none"``: only the workers' own output lines, rank-prefixed (`ui.base.View`).
- ``"auto"``: chosen by front end (`auto_display`): widgets in JupyterLab and Notebook 7,
  html in Colab, Kaggle, VS Code and any other kernel, text outside a kernel.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from .base import DEFAULT_PREFIX, View

DISPLAYS = ("auto", "widgets", "html", "text", "none")

# Where widgets are known to work from the kernel side: a Jupyter server's JupyterLab or
# Notebook 7, with the widget manager that ships with ipywidgets 8. Everywhere else the
# one thing every front end renders is a display updated in place: Colab drops widget
# updates sent from a thread (colabtools #3373) and needs a custom widget manager for
# ipywidgets 8; Kaggle's tqdm widget bars show "Loading widget..." (docker-python #1443);
# VS Code renders nothing with ipywidgets 8.1.9 (vscode-jupyter #17504) and leaves an
# Output filled from a thread empty (#16739). An unknown front end (nbclient, papermill,
# the classic Notebook 6, Spyder, qtconsole, ...) gets html too: it needs no widget
# manager, an executed notebook keeps no widget state, and where HTML is not rendered its
# text/plain is a progress line.
WIDGET_FRONTENDS = ("jupyter-server",)


def auto_display(frontend: str, widgets_installed: bool = True) -> str:
    """The display ``"auto"`` means for a front end (`environment.frontend`).

    Example::

        auto_display("colab")             # "html"
        auto_display("jupyter-server")    # "widgets"
        auto_display("script")            # "text"
    """
    if frontend in ("script", "ipython"):
        return "text"
    if frontend in WIDGET_FRONTENDS and widgets_installed:
        return "widgets"
    return "html"


def resolve_display(display: str) -> str:
    """The concrete display for ``display`` here: "widgets", "html", "text" or "none".

    Example::

        resolve_display("auto")   # "widgets" in JupyterLab, "html" on Colab, "text" in a script
    """
    if display != "auto":
        return display
    from ..environment import frontend

    where = frontend()
    return auto_display(where, where not in WIDGET_FRONTENDS or _widgets_installed())


def make_view(display: str, prefix: str = DEFAULT_PREFIX, title: str = "", host: Optional[Any] = None,
              show_log: bool = True) -> View:
    """The view for ``display`` ("auto" | "widgets" | "html" | "text" | "none").

    ``host``: what a ``block=False`` run displayed in its launching cell: an ipywidgets
    container the widgets view puts itself into, or a display handle the html view
    updates in place.
    ``show_log``: False prints output lines in the cell as they come instead of keeping
    them in the dashboard's log panel and summary (a session's cell: as its own prints).

    Example::

        view = make_view("text", title="2 CPU processes (gloo, fork)")
    """
    display = resolve_display(display)
    if display in ("widgets", "html"):
        from ..environment import in_jupyter_kernel

        if host is not None or in_jupyter_kernel():
            if display == "html":
                from .html_view import HtmlView

                return HtmlView(prefix, title, host=host, show_log=show_log)
            from .widgets import WidgetsView

            return WidgetsView(prefix, title, host=host, show_log=show_log)
        print(f"notebook_launcher: display={display!r} needs a Jupyter kernel; showing text instead.",
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
