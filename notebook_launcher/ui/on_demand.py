"""A view that stays out of the way until there is something to show.

A session's cell (``%%dist``, ``session.run``) often just prints or defines names, and
ends in milliseconds: building a dashboard for it (widgets, matplotlib) would cost more
than the cell. `OnDemandView` prints the ranks' output lines as they come, and builds the
real dashboard only when a rank reports a metric or a progress step, or the cell has run
for `APPEAR_AFTER` seconds (then the ranks table shows who is running or stuck).
"""

from __future__ import annotations

from typing import Callable, Optional

from ..state import RunState
from .base import DEFAULT_PREFIX, View

APPEAR_AFTER = 0.5   # seconds a quiet call runs before its dashboard appears


def dashboard_due(state: RunState) -> bool:
    """Whether a call has something for a dashboard to show: a metric or a progress step,
    or it has run for `APPEAR_AFTER` seconds.

    Example::

        dashboard_due(state)   # False for a cell that only printed, 20 ms in
    """
    return bool(state.reports_seen or state.progress) or state.elapsed >= APPEAR_AFTER


class OnDemandView(View):
    """Output lines printed at once (rank-prefixed); ``make_dashboard()`` built and
    started the first time the state has metrics or progress.

    Example::

        view = OnDemandView(lambda: make_view("widgets", title=title), title=title)
    """

    def __init__(self, make_dashboard: Callable[[], View], prefix: str = DEFAULT_PREFIX, title: str = "") -> None:
        super().__init__(prefix, title)
        self._make = make_dashboard
        self.dashboard: Optional[View] = None

    def output(self, rank: int, stream: str, lines: list) -> None:
        """Printed at once; once the dashboard exists it prints them, so that a text
        dashboard's progress line is cleared first (a widgets one is built without a log
        panel: the lines are the cell's, shown once)."""
        if self.dashboard is not None:
            self.dashboard.output(rank, stream, lines)
        else:
            super().output(rank, stream, lines)

    def refresh(self, state: RunState) -> None:
        if self.dashboard is None and dashboard_due(state):
            self.dashboard = self._make()
            self.dashboard.open()
            self.dashboard.start(state)
        if self.dashboard is not None:
            self.dashboard.refresh(state)

    def finish(self, state: RunState) -> None:
        if self.dashboard is None and (state.reports_seen or state.progress):
            self.refresh(state)  # metrics that arrived with the last message still get their summary
        if self.dashboard is not None:
            self.dashboard.finish(state)
