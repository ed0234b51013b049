"""Experiment trackers (TensorBoard, MLflow, Weights & Biases, Trackio) run in the notebook
process, once per launch attempt, fed by rank 0 over the worker channel. No tracker code
runs in a worker: a forked ``wandb.init`` hides its errors and hangs at exit, one run per
rank appears, only one rank logs; here the workers only send small messages.

Worker side (`notebook_launcher.Accelerator`, HF accelerate's API)::

    accelerator = Accelerator(log_with="tensorboard", project_dir="runs")  # a name, a list, or "all"
    accelerator.init_trackers("mnist", config={"lr": 0.1})   # rank 0 -> TrackerInit: the runs open
    accelerator.log({"loss": loss.item()}, step=step)       # rank 0 -> TrackerLog (and the dashboard)
    accelerator.get_tracker("tensorboard").log({"acc": acc}, step=step)
    accelerator.end_training()                               # rank 0 -> TrackerEnd: the runs close

Parent side (the launcher's wiring)::

    names = check_installed(log_with)          # before any process starts: LaunchConfigError naming the pip package
    hub = TrackerHub(attempt=attempt)          # per attempt; with log_with=..., project_name=... report() is logged too
    hub.on_message(rank, message)              # for every TrackerInit / TrackerLog / TrackerConfig / TrackerEnd
    hub.on_report(step, values)                # for every rank-0 report() (used only with log_with)
    hub.close("succeeded" | "failed" | "interrupted" | "stopped")   # in teardown, on every path

Public names: `TrackerHub`, `check_installed`, `SUPPORTED`, `STATUSES`, the messages
(`TrackerInit`, `TrackerLog`, `TrackerConfig`, `TrackerEnd`, and `MESSAGES`, the tuple
of the four for ``isinstance``).
"""

from .base import STATUSES
from .hub import TrackerHub
from .messages import MESSAGES, TrackerConfig, TrackerEnd, TrackerInit, TrackerLog
from .names import SUPPORTED, check_installed

__all__ = ["TrackerHub", "check_installed", "SUPPORTED", "STATUSES", "MESSAGES", "TrackerInit",
           "TrackerLog", "TrackerConfig", "TrackerEnd"]
