"""What an experiment tracker costs the training loop: ``report()`` and ``Accelerator.log()``
per call on rank 0, with trackers attached and without, side by side in one run.

Trackers run in the notebook process (`notebook_launcher.trackers.TrackerHub`, on its own
thread), so a call in the worker should cost the same with or without them. Configurations
(rows) alternate in a shuffled order each round, after one warm-up round that is not
counted (imports, MLflow creating its database); the table shows medians. "written" says
how many of rank 0's values the tracker recorded (TensorBoard's own reader counts them):
100 % means the notebook process kept up. The loop here does nothing but log (tens of
thousands of calls a second); when the notebook process cannot keep up (a TensorBoard
value costs it about 40 us of CPU, and on 2 cores it shares them with the workers), values
are dropped (oldest first in the worker's channel, newest in the hub), the loop is never
blocked. A real loop logs hundreds of steps a second.

- ``report()``: ``benchmarks/workloads.report_cost`` (the figure of ``report_cost.py``),
  launched plain, then with ``notebook_launcher(..., log_with=..., project_name=...)``.
- ``Accelerator.log()``: the same loop through ``accelerator.log``, without and with
  ``Accelerator(log_with=...)`` + ``init_trackers`` (one more message per call).

Usage::

    python benchmarks/tracker_cost.py [--calls 20000] [--rounds 3] [--trackers tensorboard,mlflow]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import workloads  # noqa: E402
from benchmarks._timing import scratch, settle  # noqa: E402

WARMUP_CALLS = 1000   # workloads.report_cost's warm-up, before the timed calls


def accelerator_log_cost(out_dir, init, calls, log_with):
    """Seconds per ``accelerator.log()`` call on this rank (trackers initialized when ``log_with``)."""
    import time

    from notebook_launcher import Accelerator

    accelerator = Accelerator(log_with=log_with, project_dir=out_dir)
    if log_with:
        accelerator.init_trackers("bench-log", config={"calls": calls})
    for i in range(WARMUP_CALLS):
        accelerator.log({"loss": 0.5}, step=i)
    start = time.perf_counter()
    for i in range(calls):
        accelerator.log({"loss": 0.5, "lr": 0.001}, step=i)
    elapsed = (time.perf_counter() - start) / calls
    accelerator.end_training()
    return elapsed


def cases(trackers: list) -> dict:
    """Row name -> (function, extra args, launcher keyword arguments)."""
    rows = {"report(), no tracker": (workloads.report_cost, (False,), {})}
    for name in trackers:
        rows[f"report(), log_with={name}"] = (workloads.report_cost, (False,),
                                              {"log_with": name, "project_name": f"bench-{name}"})
    rows["Accelerator.log(), no tracker"] = (accelerator_log_cost, (None,), {})
    for name in trackers:
        rows[f"Accelerator.log(), log_with={name}"] = (accelerator_log_cost, (name,), {})
    return rows


def run_case(fn, extra: tuple, kwargs: dict, calls: int, workdir: str) -> tuple:
    """(microseconds per call on rank 0, fraction of rank 0's reports TensorBoard wrote or None)."""
    from notebook_launcher import notebook_launcher

    settle()
    with scratch() as out_dir:
        seconds = notebook_launcher(fn, (out_dir, False, calls, *extra), num_processes=2, display="none",
                                    device="cpu", **kwargs)
        written = None
        if kwargs.get("log_with") == "tensorboard":
            written = _scalars(os.path.join(workdir, "runs", kwargs["project_name"]), "loss") / (WARMUP_CALLS + calls)
        elif extra == ("tensorboard",):
            written = _scalars(os.path.join(out_dir, "bench-log"), "loss") / (WARMUP_CALLS + calls)
    return seconds * 1e6, written


def _scalars(logdir: str, tag: str) -> int:
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Each run is a version_<n> folder; the project folder is removed after every round.
    events = EventAccumulator(os.path.join(logdir, "version_0"), size_guidance={"scalars": 0})  # 0: keep every event
    events.Reload()
    count = len(events.Scalars(tag))
    shutil.rmtree(logdir)  # the next round starts from an empty run
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trackers", default="tensorboard,mlflow")
    options = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="nl-trackers-")
    os.chdir(workdir)  # report mode writes TensorBoard files under ./runs
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{workdir}/mlflow.db")
    rows = cases([name for name in options.trackers.split(",") if name])
    samples: dict = {name: [] for name in rows}
    written: dict = {name: [] for name in rows}
    for round_number in range(options.rounds + 1):
        order = list(rows)
        random.shuffle(order)
        for name in order:
            fn, extra, kwargs = rows[name]
            us, fraction = run_case(fn, extra, kwargs, options.calls, workdir)
            if round_number:  # round 0 is the warm-up
                samples[name].append(us)
                if fraction is not None:
                    written[name].append(fraction)
    print(f"\nCost per call on rank 0 of 2 CPU workers ({options.calls} calls, 2 values each; "
          f"median of {options.rounds} rounds; trackers written from the notebook process)")
    print(f"{'':40s} {'us/call':>8s}   rounds                     {'written':>8s}")
    for name, values in samples.items():
        rounds = " ".join(f"{v:5.2f}" for v in values)
        kept = f"{min(written[name]):8.0%}" if written[name] else f"{'':8s}"
        print(f"{name:40s} {statistics.median(values):8.2f}   {rounds:26s} {kept}")
    print(f"(files under {workdir})")


if __name__ == "__main__":
    main()
