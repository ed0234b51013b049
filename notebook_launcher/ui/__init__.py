"""Views of a run: widgets in a notebook, text in a terminal, or just the output lines."""

from __future__ import annotations

from .base import DEFAULT_PREFIX, View

DISPLAYS = ("auto", "widgets", "text", "none")


def make_view(display: str, prefix: str = DEFAULT_PREFIX) -> View:
    """The view for ``display`` ("auto" | "widgets" | "text" | "none")."""
    return View(prefix)
