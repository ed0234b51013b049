"""Trackio: ``trackio.init`` in the notebook process, one run per attempt.

Data goes where trackio puts it (its local database under ``TRACKIO_DIR``, or a Space
with ``space_id`` in ``init_kwargs={"trackio": {...}}``). Trackio records the config
with the first logged values, so `store_config` after the first log is not recorded;
it has no run status, so closing only finishes the run.
"""

from __future__ import annotations

import inspect

from .base import RunSettings


class TrackioRun:
    name = "trackio"

    def __init__(self, settings: RunSettings) -> None:
        import trackio

        kwargs = dict(settings.init_kwargs)
        kwargs.setdefault("project", settings.project_name)
        kwargs.setdefault("config", settings.config or None)
        if "embed" in inspect.signature(trackio.init).parameters:
            kwargs.setdefault("embed", False)  # else it starts a dashboard server in the kernel that nothing stops
        self.run = trackio.init(**kwargs)

    def store_config(self, config: dict) -> None:
        self.run.config.update(config)

    def log_many(self, entries: list) -> None:
        for values, step, _kwargs in entries:
            self.run.log(values, step=step)

    def flush(self) -> None:
        pass  # trackio's own sender thread writes

    def close(self, status: str) -> None:
        self.run.finish()


open_run = TrackioRun
