"""The `Accelerator`'s experiment trackers, worker side: messages, never tracker code.

In a launched worker, rank 0 turns ``init_trackers`` / ``log`` / ``get_tracker(...).log``
/ ``end_training`` into the small messages of `notebook_launcher.trackers.messages` and
sends them to the notebook process, whose `TrackerHub` owns the real runs. Nothing
here imports tensorboard, mlflow, wandb or trackio. In a plain process (no launcher),
the same messages go to a `TrackerHub` in this process, so a script behaves the same.

Values are made plain data here (numbers, strings, dicts), so nothing that could fail to
pickle (or would need CUDA in the parent) reaches the channel's background thread.
"""

from __future__ import annotations

import atexit
import numbers
import os
import pickle
import warnings
from typing import Any, Optional

import torch

from ..trackers import names as tracker_names
from ..trackers.messages import TrackerConfig, TrackerEnd, TrackerInit, TrackerLog, flatten
from ..workers import context


def _send(message: Any, now: bool = False) -> None:
    """To the notebook process: ``now`` writes at once (after what was posted before),
    otherwise it is queued for the channel's flusher and never blocks."""
    channel = context.current().channel
    (channel.send if now else channel.post)(message)


class TrackerNotInWorkerError(AttributeError):
    """Something that needs the real tracker object, asked for inside a worker."""


class TrackerClient:
    """One Accelerator's trackers: which ones, whether ``init_trackers`` ran, where
    messages go. Only the main process sends; the others' calls do nothing.

    Example::

        client = TrackerClient(("tensorboard",), is_main=True)
        client.init("demo", {"lr": 0.1}, None, "/tmp/runs")
        client.log({"loss": 0.5}, step=0)
        client.end()
    """

    def __init__(self, names: tuple, is_main: bool) -> None:
        self.names = names
        self.is_main = is_main
        self.initialized = False
        self._pid: Optional[int] = None      # the process that ran init_trackers
        self._local_hub = None               # plain process only
        self._unsupported: set = set()

    def init(self, project_name: str, config: Optional[dict], init_kwargs: Optional[dict],
             logging_dir: Optional[str]) -> None:
        if not self.names:
            return
        tracker_names.check_logging_dir(self.names, logging_dir)
        kwargs = _picklable(dict(init_kwargs or {}), "init_kwargs")
        unknown = [key for key in kwargs if key not in self.names]
        if unknown:
            raise ValueError(f"init_kwargs has {', '.join(map(repr, unknown))}, not among log_with "
                             f"{list(self.names)}; give each tracker's options under its name, "
                             "e.g. init_kwargs={'wandb': {'entity': 'me'}}.")
        message = TrackerInit(self.names, str(project_name), plain_config(config or {}), kwargs,
                              os.path.abspath(logging_dir) if logging_dir else None)
        self.initialized = True
        self._pid = os.getpid()
        if self.is_main:
            if context.current() is None:
                self._open_local_hub()
            self._deliver(message, now=True)

    def log(self, values: dict, step: Optional[int], log_kwargs: Optional[dict] = None,
            tracker: Optional[str] = None, reported: bool = False, plain: bool = False) -> None:
        """``plain``: ``values`` is already flat numbers and strings (Accelerator.log made it so)."""
        if not (self.initialized and self.is_main):
            return
        values = values if plain else self.loggable(values)
        if values:
            self._deliver(TrackerLog(values, step, plain_config(log_kwargs) if log_kwargs else {}, tracker, reported))

    def store_config(self, config: dict, tracker: Optional[str] = None) -> None:
        if self.initialized and self.is_main:
            self._deliver(TrackerConfig(plain_config(config), tracker), now=True)

    def end(self, tracker: Optional[str] = None) -> None:
        if not (self.initialized and self.is_main):
            return
        if tracker is None:
            self.initialized = False
        self._deliver(TrackerEnd(tracker), now=True)
        if tracker is None and self._local_hub is not None:
            self._close_local_hub()

    def loggable(self, values: dict) -> dict:
        """Flat {name: number | str}; other values are left out (with a warning, once per name)."""
        plain = {}
        for name, value in flatten(values):
            if isinstance(value, str):
                plain[name] = value
                continue
            number = as_number(value)
            if number is None:
                if name not in self._unsupported:
                    self._unsupported.add(name)
                    warnings.warn(f"Accelerator.log: {name!r} is a {type(value).__name__}; trackers are fed numbers "
                                  "and strings from a worker, so it is left out.", stacklevel=4)
                continue
            plain[name] = number
        return plain

    def _deliver(self, message: Any, now: bool = False) -> None:
        if os.getpid() != self._pid:  # a process forked from this one (a DataLoader worker): not ours
            return
        if self._local_hub is not None:
            self._local_hub.on_message(0, message)
        elif context.current() is not None:
            _send(message, now)

    def _open_local_hub(self) -> None:
        from ..trackers.hub import TrackerHub

        self._local_hub = TrackerHub()
        atexit.register(self._local_hub.close)

    def _close_local_hub(self) -> None:
        hub, self._local_hub = self._local_hub, None
        atexit.unregister(hub.close)
        hub.close("succeeded")


class WorkerTracker:
    """What ``get_tracker(name)`` returns: HF accelerate's tracker API, sent to the notebook.

    ``log`` and ``store_init_configuration`` work from any rank (rank 0's are recorded);
    anything that needs the real tracker object (``.writer``, ``.run``, ``.tracker``)
    raises `TrackerNotInWorkerError`, since that object lives in the notebook process.

    Example::

        tracker = accelerator.get_tracker("wandb")
        tracker.log({"val/acc": 0.91}, step=100, commit=True)
    """

    main_process_only = True

    def __init__(self, name: str, client: TrackerClient) -> None:
        self.name = name
        self._client = client

    @property
    def requires_logging_directory(self) -> bool:
        return tracker_names.KINDS[self.name].needs_logging_dir

    def log(self, values: dict, step: Optional[int] = None, **kwargs) -> None:
        self._client.log(values, step, {self.name: kwargs} if kwargs else None, tracker=self.name)

    def store_init_configuration(self, values: dict) -> None:
        self._client.store_config(values, tracker=self.name)

    def finish(self) -> None:
        self._client.end(tracker=self.name)

    def __getattr__(self, attr: str):
        if attr.startswith("_"):
            raise AttributeError(attr)
        title = tracker_names.KINDS[self.name].title
        raise TrackerNotInWorkerError(
            f"get_tracker({self.name!r}).{attr} is not available here: notebook_launcher runs the {title} tracker "
            f"itself (in the notebook process, never in a worker). Log with accelerator.log(...) or "
            f"get_tracker({self.name!r}).log(...); for anything else (images, artifacts), write a file on rank 0 "
            "and log it from the notebook after the launch.")

    def __repr__(self) -> str:
        return f"WorkerTracker({self.name!r}, in the notebook process)"


def plain_config(value: Any) -> Any:
    """Config-like data as plain Python (dicts, lists, numbers, strings, None); 0-d tensors
    and numpy scalars become numbers, anything else its ``str``."""
    if isinstance(value, dict):
        return {str(key): plain_config(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_config(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    number = as_number(value)
    return number if number is not None else str(value)


def as_number(value: Any) -> Optional[float]:
    """A float for Python/numpy numbers and one-element tensors; None otherwise."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Number):
        return float(value) if not isinstance(value, complex) else None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.detach().float().item())
    if hasattr(value, "item") and getattr(value, "size", 2) == 1:  # a numpy scalar or 1-element array
        try:
            return float(value.item())
        except (TypeError, ValueError):
            return None
    return None


def _picklable(value: dict, what: str) -> dict:
    try:
        pickle.dumps(value)
    except Exception as exc:
        raise ValueError(f"{what} must be plain data (it is passed to the tracker in the notebook process): "
                         f"{exc}") from None
    return value
