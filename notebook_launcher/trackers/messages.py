"""What a worker's `Accelerator` sends to the notebook process about experiment trackers.

Small frozen dataclasses of plain data (numbers, strings, dicts): they cross the
worker -> parent channel, and unpickling them never imports a tracker library. Only the
main process (rank 0) sends them; `TrackerHub` also ignores other ranks' messages.

- `TrackerInit`: ``init_trackers`` was called: open one run per tracker, recording ``config``.
- `TrackerLog`: ``log`` (or ``get_tracker(name).log``): values at a step.
- `TrackerConfig`: ``get_tracker(name).store_init_configuration``: more hyperparameters.
- `TrackerEnd`: ``end_training`` (or ``get_tracker(name).finish``): the run is over.

Example::

    TrackerInit(log_with=("tensorboard",), project_name="mnist", config={"lr": 0.1},
                init_kwargs={}, logging_dir="/home/me/runs")
    TrackerLog(values={"train/loss": 0.25}, step=3)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

@dataclass(frozen=True)
class TrackerInit:
    log_with: tuple                  # tracker names, e.g. ("tensorboard", "mlflow")
    project_name: str
    config: dict                     # hyperparameters (nested dicts allowed), {} for none
    init_kwargs: dict                # {tracker name: keyword arguments for its init}
    logging_dir: Optional[str]       # absolute, or None


@dataclass(frozen=True)
class TrackerLog:
    values: dict                     # flat {name: float | int | str}
    step: Optional[int] = None       # None: the step after the previous one
    log_kwargs: dict = field(default_factory=dict)  # {tracker name: keyword arguments for its log}
    tracker: Optional[str] = None    # only this tracker (get_tracker(name).log); None: all
    reported: bool = False           # the numbers also went to report(): a report-mode hub has them


@dataclass(frozen=True)
class TrackerConfig:
    config: dict
    tracker: Optional[str] = None    # only this tracker; None: all


@dataclass(frozen=True)
class TrackerEnd:
    tracker: Optional[str] = None    # only this tracker; None: all


MESSAGES = (TrackerInit, TrackerLog, TrackerConfig, TrackerEnd)


def flatten(values: dict, prefix: str = "") -> Iterator[tuple]:
    """Nested dicts as (name, value) pairs, names joined with "/" (how TensorBoard groups).

    Example::

        dict(flatten({"train": {"loss": 0.5}, "lr": 0.1}))   # {"train/loss": 0.5, "lr": 0.1}
    """
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from flatten(value, f"{name}/")
        else:
            yield name, value
