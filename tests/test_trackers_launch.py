"""Accelerator(log_with=...) in real 2-worker launches: the workers only send messages (no
tracker module is ever imported in a worker), and, once the launcher feeds them to a
TrackerHub, the notebook process writes the runs that each tracker's own reader finds.

Launches run in a fresh interpreter (`in_fresh_python`), so that "not in the worker's
sys.modules" means something: a forked worker inherits its parent's modules, and this
test process imports the trackers in other tests.
"""

import glob
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from notebook_launcher import Accelerator, notebook_launcher as launch, report
from notebook_launcher.errors import LaunchConfigError
from notebook_launcher.trackers import SUPPORTED
from test_trackers_hub import steps_of, tensorboard_runs

STEPS = 20
TRACKER_MODULES = ("tensorboard", "tensorboardX", "mlflow", "wandb", "trackio")


def tracker_modules() -> set:
    return {name for name in sys.modules
            if name.split(".")[0] in TRACKER_MODULES or name.startswith("torch.utils.tensorboard")}


# ----------------------------------------------------------------- what the workers run
def train(project_dir: str, log_with: list, fail_at=None) -> dict:
    """Every rank logs (rank 1 logs values 10x larger: only rank 0's may be recorded)."""
    inherited = tracker_modules()  # from the parent (a second launch, after its hub imported them)
    accelerator = Accelerator(log_with=log_with, project_dir=project_dir)
    rank = accelerator.process_index
    accelerator.init_trackers("e2e", config={"lr": 0.1, "model": {"layers": 2}, "rank": rank})
    for step in range(STEPS):
        if step == fail_at and rank == 0:
            raise RuntimeError(f"failed at step {step}")
        accelerator.log({"train/loss": torch.tensor((rank * 9 + 1) / (step + 1))}, step=step)
    tracker = accelerator.get_tracker(log_with[0])
    tracker.store_init_configuration({"batch_size": 8 + rank})
    tracker.log({"eval/accuracy": 0.5 + rank}, step=STEPS)
    errors = []
    for ask in (lambda: tracker.writer, lambda: accelerator.get_tracker(log_with[0], unwrap=True)):
        try:
            ask()
        except AttributeError as exc:
            errors.append(str(exc))
    accelerator.end_training()
    return {"rank": rank, "imported": sorted(tracker_modules() - inherited), "inherited": sorted(inherited),
            "errors": errors}


def main(project_dir: str, log_with: list, launches: list) -> None:
    """In a fresh interpreter: one launch per entry of ``launches`` (a fail_at or None)."""
    assert not tracker_modules(), "the parent imported a tracker before the launch"
    outcomes = []
    for fail_at in launches:
        try:
            outcomes.append(launch(train, args=(project_dir, log_with, fail_at), num_processes=2, display="none",
                                   return_all=True))
        except Exception as exc:
            outcomes.append(f"{type(exc).__name__}: {exc}")
    print("RESULT " + json.dumps(outcomes))


# Below pytest's own limit for a test (180 s, pyproject.toml), so that a hung launch fails with
# its output rather than pytest's bare timeout. Two launches with all four trackers take about
# 30 s on a busy 2-core machine.
FRESH_PYTHON_TIMEOUT = 120


def in_fresh_python(tmp_path, log_with: list, launches=(None,), env=None) -> list:
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_trackers_launch as t; "
            f"t.main({str(tmp_path)!r}, {log_with!r}, {list(launches)!r})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=FRESH_PYTHON_TIMEOUT,
                          env={**os.environ, **(env or {})}, cwd=str(tmp_path))
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def assert_workers_imported_no_tracker(results: list, first_launch: bool = True) -> None:
    """None imported by the function; and none at all in a first launch (nothing to inherit)."""
    for result in results:
        assert result["imported"] == [], f"rank {result['rank']} imported {result['imported']}"
        if first_launch:
            assert result["inherited"] == []


# ----------------------------------------------------------------- worker side (runs today)
def tracker_env(folder) -> dict:
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
            "TRACKIO_DIR": str(folder / "trackio")}


FAIL_AT = 11  # the second launch's rank 0 raises there, after logging steps 0..10


@pytest.fixture(scope="module")
def all_four(tmp_path_factory):
    """Two launches with one project name, logging to every supported tracker: the first
    succeeds (STEPS steps), the second fails at step FAIL_AT. (the folder, every rank's
    result of the first)."""
    folder = tmp_path_factory.mktemp("all-four")
    results, failed = in_fresh_python(folder, list(SUPPORTED), launches=(None, FAIL_AT), env=tracker_env(folder))
    assert failed.startswith("WorkerError") and f"failed at step {FAIL_AT}" in failed
    return folder, results


def test_workers_send_messages_and_never_import_a_tracker(all_four):
    _, results = all_four
    assert [r["rank"] for r in results] == [0, 1]
    assert_workers_imported_no_tracker(results)
    for result in results:
        assert len(result["errors"]) == 2
        assert all("runs the TensorBoard tracker itself (in the notebook process, never in a worker)" in error
                   for error in result["errors"])
        assert "get_tracker('tensorboard').writer is not available here" in result["errors"][0]


def test_a_tracker_that_is_not_installed_fails_in_the_accelerator(monkeypatch):
    monkeypatch.setitem(sys.modules, "trackio", None)  # Python's own "cannot be imported"
    with pytest.raises(LaunchConfigError, match="Trackio \\('trackio'\\), not installed here: pip install trackio"):
        Accelerator(log_with=["tensorboard", "trackio"], project_dir="runs")
    with pytest.raises(LaunchConfigError, match="needs a folder for its files"):
        Accelerator(log_with="tensorboard")
    with pytest.raises(ValueError, match="'mlflow' is not an available tracker"):
        Accelerator(log_with="tensorboard", project_dir="runs").get_tracker("mlflow")


def test_a_plain_process_writes_through_its_own_hub(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accelerator = Accelerator(log_with="tensorboard", logging_dir=str(tmp_path))
    accelerator.init_trackers("plain", config={"lr": 0.1})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(STEPS):
            accelerator.log({"loss": torch.tensor(1.0 / (step + 1)), "phase": "train", "skip": object()}, step=step)
    accelerator.end_training()
    assert len([w for w in caught if "'skip'" in str(w.message)]) == 1  # said once, not per step
    events = EventAccumulator(str(tmp_path / "plain" / "version_0"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(STEPS))
    assert "phase/text_summary" in events.Tags()["tensors"]


# ----------------------------------------------------------------- through the launcher's hub
def test_each_launch_is_a_tensorboard_and_mlflow_run_of_its_own(all_four):
    """Same project name, two launches: two runs, each with its own points (rank 0's)."""
    from mlflow import MlflowClient

    folder, _ = all_four
    succeeded = [(step, pytest.approx(1.0 / (step + 1))) for step in range(STEPS)]
    failed = succeeded[:FAIL_AT]
    assert tensorboard_runs(folder, "train/loss") == {"e2e/version_0": succeeded, "e2e/version_1": failed}
    assert tensorboard_runs(folder, "eval/accuracy") == {"e2e/version_0": [(STEPS, 0.5)]}  # get_tracker(...).log

    client = MlflowClient(tracker_env(folder)["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("e2e").experiment_id], order_by=["start_time ASC"])
    assert [run.info.status for run in runs] == ["FINISHED", "FAILED"]
    assert runs[0].data.params == {"lr": "0.1", "model/layers": "2", "rank": "0"}
    for run, expected in zip(runs, (succeeded, failed)):
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert sorted((m.step, m.value) for m in history) == expected


def test_a_failed_launch_leaves_a_failed_run_and_the_next_opens_a_fresh_one(tmp_path):
    from mlflow import MlflowClient

    failed, succeeded = in_fresh_python(tmp_path, ["mlflow"], launches=(5, None), env=tracker_env(tmp_path))
    assert failed.startswith("WorkerError") and "failed at step 5" in failed
    assert_workers_imported_no_tracker(succeeded, first_launch=False)
    client = MlflowClient(tracker_env(tmp_path)["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("e2e").experiment_id], order_by=["start_time ASC"])
    assert [run.info.status for run in runs] == ["FAILED", "FINISHED"]
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")] == [0, 1, 2, 3, 4]
    assert len(client.get_metric_history(runs[1].info.run_id, "train/loss")) == STEPS


def test_each_launch_is_a_wandb_and_trackio_run_of_its_own(all_four):
    from test_trackers_hub import offline_run

    folder, _ = all_four
    succeeded = [(step, pytest.approx(1.0 / (step + 1))) for step in range(STEPS)]
    failed = succeeded[:FAIL_AT]
    paths = glob.glob(str(folder / "wandb" / "offline-run-*" / "run-*.wandb"))
    runs = {}
    for path in paths:  # the exit code tells the launches apart
        history, _, exit_code = offline_run(path)
        runs[exit_code] = [(step, row["train/loss"]) for step, row in history if "train/loss" in row]
    assert len(paths) == 2 and runs == {0: succeeded, 1: failed}
    # Two run ids (offline, one id would still be two files, that `wandb sync` uploads into one run).
    assert len({os.path.basename(path) for path in paths}) == 2  # run-<id>.wandb

    read = subprocess.run([sys.executable, "-c", (  # trackio reads TRACKIO_DIR when imported
        "import json; from trackio.sqlite_storage import SQLiteStorage as S\n"
        "print(json.dumps([[(r['step'], r['train/loss']) for r in S.get_logs('e2e', run) if 'train/loss' in r]\n"
        "                  for run in S.get_runs('e2e')]))")],
        capture_output=True, text=True, timeout=60, env={**os.environ, **tracker_env(folder)})
    runs = [[tuple(point) for point in run] for run in json.loads(read.stdout.strip().splitlines()[-1])]
    assert sorted(runs, key=len, reverse=True) == [succeeded, failed]


def report_steps(steps: int) -> None:
    rank = int(os.environ["RANK"])
    for step in range(steps):
        report(step, loss=(rank * 9 + 1) / (step + 1))


def test_launcher_log_with_writes_every_rank0_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # report mode writes TensorBoard files under ./runs
    launch(report_steps, args=(STEPS,), num_processes=2, display="none", log_with="tensorboard", project_name="reports")
    assert tensorboard_runs(tmp_path / "runs", "loss") == {
        "reports/version_0": [(s, pytest.approx(1.0 / (s + 1))) for s in range(STEPS)]}
    launch(report_steps, args=(STEPS,), num_processes=2, display="none", log_with="tensorboard", project_name="here",
           logging_dir=str(tmp_path / "elsewhere"))
    assert steps_of(tensorboard_runs(tmp_path / "elsewhere", "loss")) == {"here/version_0": list(range(STEPS))}
    with pytest.raises(LaunchConfigError, match="Unknown tracker 'tensorbord'"):
        launch(report_steps, args=(STEPS,), num_processes=2, display="none", log_with="tensorbord")


def fail_in_first_attempt(project_dir: str) -> None:
    accelerator = Accelerator(log_with="tensorboard", project_dir=project_dir)
    accelerator.init_trackers("restarts")
    first_attempt = os.environ["TORCHELASTIC_RESTART_COUNT"] == "0"
    for step in range(STEPS):
        if first_attempt and step == 5:
            raise RuntimeError("the first attempt fails")
        accelerator.log({"loss": 1.0 / (step + 1)}, step=step)
    accelerator.end_training()


def test_a_restart_is_a_fresh_run_beside_the_failed_one(tmp_path):
    launch(fail_in_first_attempt, args=(str(tmp_path),), num_processes=2, display="none", max_restarts=1)
    assert steps_of(tensorboard_runs(tmp_path, "loss")) == {"restarts/version_0": [0, 1, 2, 3, 4],
                                                            "restarts/version_1": list(range(STEPS))}
