"""TensorBoard: torch's ``SummaryWriter`` (needs the ``tensorboard`` package).

Every run gets a folder of its own, ``logging_dir/project_name/version_<n>``, numbered as
Lightning's ``TensorBoardLogger`` numbers ``lightning_logs/version_<n>``: one more than
the highest ``version_<n>`` already there, from 0. In TensorBoard a run is a folder, so
two launches (or session calls, ``%%dist`` cells, restart attempts, a second
``init_trackers``) with the same project name are two runs beside each other, never one
run holding both histories (HF accelerate writes every launch to
``logging_dir/project_name`` itself). ``tensorboard --logdir logging_dir`` lists them as
``project_name/version_0``, ``project_name/version_1``, ...

The folder is taken with ``os.mkdir``, which only one process can win: two runs that
start at the same moment in the same folder (two kernels, a sweep) get different
numbers (Lightning's own numbering could give both the same one).

The hyperparameters land in the HPARAMS tab; numbers are scalars and strings are text.
TensorBoard has no notion of a failed run, so the status only closes the writer.
"""

from __future__ import annotations

import os
import re

from .base import RunSettings, numbers_and_text, scalar_params

_VERSION = re.compile(r"version_(\d+)")


def new_version_dir(parent: str) -> str:
    """Create and return ``parent/version_<n>``, n one more than the highest existing
    version (0 when there is none). Invariant: the returned folder was created by this
    call, so no other run, in this process or another, writes to it.

    Example::

        new_version_dir("runs/mnist")   # "runs/mnist/version_0", then ".../version_1", ...
    """
    os.makedirs(parent, exist_ok=True)
    numbers = [int(match.group(1)) for match in map(_VERSION.fullmatch, os.listdir(parent)) if match]
    number = max(numbers, default=-1) + 1
    while True:
        path = os.path.join(parent, f"version_{number}")
        try:
            os.mkdir(path)  # atomic: a run that raced us to this number made it first
            return path
        except FileExistsError:
            number += 1


class TensorBoardRun:
    name = "tensorboard"

    def __init__(self, settings: RunSettings) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = new_version_dir(os.path.join(settings.logging_dir or "runs", settings.project_name))
        self.writer = SummaryWriter(log_dir=self.logdir, **settings.init_kwargs)
        if settings.config:
            self.store_config(settings.config)

    def store_config(self, config: dict) -> None:
        # run_name "." keeps the hparams in this run's folder (torch would make a timestamped subfolder).
        self.writer.add_hparams(scalar_params(config), {}, run_name=".")

    def log_many(self, entries: list) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        events = self.writer._get_file_writer()
        for values, step, _kwargs in entries:
            numbers, text = numbers_and_text(values)
            if numbers:  # one event for the step's scalars: 1.6x faster than add_scalar per value
                events.add_summary(Summary(value=[Summary.Value(tag=name, simple_value=float(value))
                                                  for name, value in numbers.items()]), step)
            for name, value in text.items():
                self.writer.add_text(name, value, global_step=step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


open_run = TensorBoardRun
