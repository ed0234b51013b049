"""What every tracker adapter is given and must do; the one place that opens one.

An adapter (``tensorboard_run``, ``mlflow_run``, ``wandb_run``, ``trackio_run``) wraps one
open run of one tracker. It is created and used only on `TrackerHub`'s writer thread, so
it needs no locks, and it imports its library only when it is opened.

Interface (duck-typed)::

    run = open_run("mlflow", settings)   # imports mlflow, creates the run, records settings.config
    run.store_config({"lr": 0.1})        # more hyperparameters
    run.log_many([(values, step, log_kwargs), ...])  # in order; values are flat {name: number | str}
    run.flush()                          # make what was logged visible (called when the queue is idle)
    run.close("failed")                  # one of STATUSES
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Optional

from .messages import flatten

# How a launch (or one attempt of it) ended, as `TrackerHub.close` is told.
STATUSES = ("succeeded", "failed", "interrupted", "stopped")

_MODULES = {"tensorboard": "tensorboard_run", "mlflow": "mlflow_run", "wandb": "wandb_run", "trackio": "trackio_run"}


@dataclass(frozen=True)
class RunSettings:
    """What opening one tracker's run needs (plain data)."""

    project_name: str
    config: dict = field(default_factory=dict)      # may be nested
    init_kwargs: dict = field(default_factory=dict)  # this tracker's own, e.g. {"run_name": "a"} for MLflow
    logging_dir: Optional[str] = None
    attempt: int = 0                                 # restarts so far (max_restarts): 0 for the first


def open_run(name: str, settings: RunSettings):
    """Open tracker ``name``'s run (imports its library). Only on the hub's writer thread.

    Example::

        run = open_run("tensorboard", RunSettings("mnist", {"lr": 0.1}, logging_dir="/tmp/runs"))
    """
    module = importlib.import_module(f".{_MODULES[name]}", __package__)
    return module.open_run(settings)


def scalar_params(config: dict) -> dict:
    """A config as flat {name: int | float | str | bool}: what hyperparameter tables take
    (anything else becomes its ``str``)."""
    return {name: value if isinstance(value, (bool, int, float, str)) else str(value)
            for name, value in flatten(config)}


def numbers_and_text(values: dict) -> tuple:
    """(numbers, strings) of a flat values dict (bools count as numbers)."""
    numbers = {k: v for k, v in values.items() if isinstance(v, (int, float))}
    text = {k: v for k, v in values.items() if isinstance(v, str)}
    return numbers, text
