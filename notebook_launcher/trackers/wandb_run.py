"""Weights & Biases: ``wandb.init`` in the notebook process, one run per attempt.

Everything wandb reads from the environment applies, ``WANDB_MODE=offline`` (files
under ``logging_dir/wandb``, upload later with ``wandb sync``) and ``WANDB_API_KEY``
included; ``wandb.login()`` in a cell works too, since this is the notebook's process.
Defaults that differ from a plain ``wandb.init()``, each overridable in
``init_kwargs={"wandb": {...}}``: ``dir=logging_dir``; ``reinit="create_new"`` (a run
the notebook opened itself stays untouched); console capture off (in a kernel it would
capture every cell's output, not the training's). Status: ``finish(exit_code=...)``,
0 when the launch succeeded, 1 when it failed, 130 when interrupted or stopped.
"""

from __future__ import annotations

import os

from .base import RunSettings

_EXIT_CODE = {"succeeded": 0, "failed": 1, "interrupted": 130, "stopped": 130}


class WandbRun:
    name = "wandb"

    def __init__(self, settings: RunSettings) -> None:
        import wandb

        kwargs = dict(settings.init_kwargs)
        kwargs.setdefault("project", settings.project_name)
        kwargs.setdefault("config", settings.config or None)
        if settings.logging_dir:
            os.makedirs(settings.logging_dir, exist_ok=True)
            kwargs.setdefault("dir", settings.logging_dir)
        kwargs.setdefault("reinit", "create_new")
        kwargs.setdefault("settings", wandb.Settings(console="off"))
        self.run = wandb.init(**kwargs)

    def store_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_many(self, entries: list) -> None:
        for values, step, kwargs in entries:
            self.run.log(values, step=step, **kwargs)

    def flush(self) -> None:
        pass  # wandb's own service process writes and uploads

    def close(self, status: str) -> None:
        import wandb

        self.run.finish(exit_code=_EXIT_CODE[status])
        if wandb.run is None:  # no run of the person's own: stop wandb's service process and threads,
            wandb.teardown()   # which a later fork of the notebook would otherwise inherit


open_run = WandbRun
