"""Which experiment trackers are supported and installed. Imports no tracker library.

Safe in a worker: it only asks ``importlib`` whether a package could be found
(``find_spec`` reads the file system; nothing is imported).

Example::

    check_installed("all")                 # ("tensorboard", "mlflow") where those two are installed
    check_installed(["wandb", "mlflow"])   # LaunchConfigError naming "pip install wandb" when it is not
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import LaunchConfigError


@dataclass(frozen=True)
class TrackerKind:
    name: str                  # as in HF accelerate's log_with
    title: str                 # for messages
    modules: tuple             # any one of these importable means installed
    pip: str                   # what to install
    needs_logging_dir: bool    # writes files under logging_dir (HF accelerate's requires_logging_directory)


KINDS = {
    "tensorboard": TrackerKind("tensorboard", "TensorBoard", ("tensorboard",), "tensorboard", True),  # the writer needs tensorboard itself (tensorboardX alone is not enough)
    "mlflow": TrackerKind("mlflow", "MLflow", ("mlflow",), "mlflow", False),
    "wandb": TrackerKind("wandb", "Weights & Biases", ("wandb",), "wandb", False),
    "trackio": TrackerKind("trackio", "Trackio", ("trackio",), "trackio", False),
}
SUPPORTED = tuple(KINDS)
# HF accelerate knows these too; here they get a clear "not supported" instead of "unknown".
HF_ONLY = ("aim", "comet_ml", "clearml", "dvclive", "swanlab")


def installed(name: str) -> bool:
    """Whether tracker ``name``'s package can be imported (without importing it)."""
    return any(_findable(module) for module in KINDS[name].modules)


def resolve(log_with: Any) -> tuple:
    """``log_with`` as HF accelerate takes it (a name, a list of names, "all", enum members
    with a ``.value``) -> a tuple of supported names, deduplicated, in order. "all" means
    every supported tracker that is installed. Installation is not checked (see
    `check_installed`)."""
    if log_with is None:
        return ()
    items = list(log_with) if isinstance(log_with, (list, tuple, set, frozenset)) else [log_with]
    names: list = []
    for item in items:
        name = _name_of(item)
        if name == "all":
            names.extend(n for n in SUPPORTED if installed(n))
        elif name in KINDS:
            names.append(name)
        elif name in HF_ONLY:
            raise LaunchConfigError(
                f"log_with={name!r} is not supported by notebook_launcher (its trackers run in the notebook "
                f"process); supported: {', '.join(SUPPORTED)}.")
        else:
            raise LaunchConfigError(f"Unknown tracker {name!r} in log_with; choose from "
                                    f"{', '.join(SUPPORTED)} or 'all'.")
    if any(_name_of(item) == "all" for item in items) and not names:
        raise LaunchConfigError("log_with='all' found no tracker installed: pip install "
                                + " (or ".join(KINDS[n].pip for n in SUPPORTED) + ")" * (len(SUPPORTED) - 1) + ".")
    return tuple(dict.fromkeys(names))


def check_installed(log_with: Any, in_worker: bool = False) -> tuple:
    """`resolve`, then make sure each tracker can run here; raise a `LaunchConfigError`
    naming what to ``pip install`` otherwise. Call it before any process starts.

    With ``in_worker=False`` (the notebook process) it also checks that MLflow's tracking
    store in effect is usable: the default sqlite store needs SQLAlchemy, which the
    ``mlflow-skinny`` package leaves out.

    Example::

        names = check_installed(log_with)   # ("tensorboard",)
    """
    names = resolve(log_with)
    missing = [KINDS[n] for n in names if not installed(n)]
    if missing:
        listed = ", ".join(f"{kind.title} ({kind.name!r})" for kind in missing)
        raise LaunchConfigError(f"log_with asks for {listed}, not installed here: "
                                f"pip install {' '.join(kind.pip for kind in missing)}")
    if "mlflow" in names and not in_worker:
        _check_mlflow_store()
    return names


def check_logging_dir(names: tuple, logging_dir: Optional[str]) -> None:
    """HF accelerate's rule: trackers that write files (TensorBoard) need a logging_dir."""
    needing = [KINDS[n].title for n in names if KINDS[n].needs_logging_dir]
    if needing and not logging_dir:
        raise LaunchConfigError(f"Logging with {', '.join(needing)} needs a folder for its files: "
                                "Accelerator(..., project_dir='runs') or logging_dir='runs'.")


def _name_of(item: Any) -> str:
    value = getattr(item, "value", item)  # HF accelerate's LoggerType enum
    if not isinstance(value, str):
        raise LaunchConfigError(
            f"log_with takes tracker names ({', '.join(SUPPORTED)}, 'all'), not {type(item).__name__} objects: "
            "notebook_launcher runs trackers in the notebook process, so a tracker object made in a worker "
            "cannot be used.")
    return value.lower()


def _findable(module: str) -> bool:
    if module in sys.modules:  # None there means "blocked": Python's own way to refuse an import
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _check_mlflow_store() -> None:
    if _findable("sqlalchemy"):
        return
    uri = _mlflow_uri()
    if uri.startswith(("sqlite:", "postgresql", "mysql", "mssql")):
        raise LaunchConfigError(
            f"MLflow's tracking store {uri} needs SQLAlchemy, which mlflow-skinny leaves out: "
            "pip install mlflow (or pip install sqlalchemy alembic), or set MLFLOW_TRACKING_URI to a "
            "tracking server (http://...).")


def _mlflow_uri() -> str:
    """The tracking URI MLflow will use, without importing it when the notebook has not."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        return str(mlflow.get_tracking_uri())
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    # MLflow 3.7 made sqlite:///mlflow.db the default store (its ./mlruns file store is
    # deprecated), except where ./mlruns already holds experiments.
    if _mlflow_version() < (3, 7) or _has_mlruns_data():
        return "./mlruns"
    return "sqlite:///mlflow.db"


def _has_mlruns_data() -> bool:
    try:
        return any(entry.isdigit() for entry in os.listdir("mlruns"))
    except OSError:
        return False


def _mlflow_version() -> tuple:
    for dist in ("mlflow", "mlflow-skinny"):
        try:
            parts = importlib.metadata.version(dist).split(".")[:2]
            return tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts)
        except importlib.metadata.PackageNotFoundError:
            continue
    return (0, 0)
