"""TrackerHub with the real tracker packages, fed the messages a worker's Accelerator sends,
from a thread, as the supervisor feeds it. Each tracker's own reader checks what was written:
TensorBoard's EventAccumulator, MLflow's client, wandb's offline run file, trackio's storage.
"""

import glob
import json
import multiprocessing
import os
import socket
import struct
import sys
import threading
import time

import psutil
import pytest

from notebook_launcher.channel import Report
from notebook_launcher.errors import LaunchConfigError
from notebook_launcher.trackers import TrackerConfig, TrackerEnd, TrackerHub, TrackerInit, TrackerLog, check_installed

STEPS = 20
LOSSES = [1.0 / (step + 1) for step in range(STEPS)]
CONFIG = {"lr": 0.1, "optimizer": {"name": "sgd", "momentum": 0.9}, "epochs": 3}


def losses_at(scale: float = 1.0) -> list:
    return [TrackerLog({"train/loss": loss * scale, "note": f"step {step}"}, step=step)
            for step, loss in enumerate(LOSSES)]


def feed(hub: TrackerHub, messages: list, rank: int = 0) -> float:
    """Hand ``messages`` to the hub from another thread (the supervisor's); the longest call, in seconds."""
    longest = []

    def supervisor():
        worst = 0.0
        for message in messages:
            start = time.perf_counter()
            hub.on_message(rank, message)
            worst = max(worst, time.perf_counter() - start)
        longest.append(worst)

    thread = threading.Thread(target=supervisor)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    return longest[0]


def run_messages(names: tuple, project: str, logging_dir: str, init_kwargs=None) -> list:
    init = TrackerInit(names, project, CONFIG, init_kwargs or {}, logging_dir)
    return [init, *losses_at(), TrackerEnd()]


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """One sqlite store for the module (MLflow takes seconds to create its tables)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        from mlflow import MlflowClient

        yield MlflowClient(uri)


def mlflow_runs(client, experiment: str) -> list:
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return sorted(client.search_runs([experiment_id]), key=lambda run: run.info.start_time)


def tensorboard_runs(folder, tag: str) -> dict:
    """{run: [(step, value), ...]} for every run under ``folder`` that has ``tag``, as
    TensorBoard itself lists them for ``tensorboard --logdir folder`` (its multiplexer:
    a run is a folder, named by its path below ``folder``)."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    runs = EventMultiplexer().AddRunsFromDirectory(str(folder))
    runs.Reload()
    return {name: [(event.step, pytest.approx(event.value)) for event in runs.Scalars(name, tag)]
            for name in sorted(runs.Runs()) if tag in runs.GetAccumulator(name).Tags()["scalars"]}


def steps_of(runs: dict) -> dict:
    """{run: [step, ...]} of `tensorboard_runs`."""
    return {name: [step for step, _ in points] for name, points in runs.items()}


# ----------------------------------------------------------------- the run is recorded
def test_tensorboard_and_mlflow_record_rank0s_run(tmp_path, mlflow_store):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    hub = TrackerHub()
    *messages, end = run_messages(("tensorboard", "mlflow"), "recorded", str(tmp_path))
    longest = feed(hub, messages)
    # Only rank 0 is recorded.
    feed(hub, [TrackerInit(("tensorboard",), "rank1", {}, {}, str(tmp_path)), TrackerLog({"train/loss": 99.0}, step=3)],
         rank=1)
    feed(hub, [end])
    assert hub.close("succeeded")
    assert longest < 0.05  # a queue append, whatever the trackers do

    expected = [(step, pytest.approx(loss)) for step, loss in enumerate(LOSSES)]
    assert sorted(os.listdir(tmp_path)) == ["recorded"]  # rank 1's init opened nothing
    assert tensorboard_runs(tmp_path, "train/loss") == {"recorded/version_0": expected}
    accumulator = EventAccumulator(str(tmp_path / "recorded" / "version_0"))
    accumulator.Reload()
    hparams = accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    assert b"optimizer/momentum" in hparams and b"lr" in hparams
    assert "note/text_summary" in accumulator.Tags()["tensors"]

    (run,) = mlflow_runs(mlflow_store, "recorded")
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.1", "optimizer/name": "sgd", "optimizer/momentum": "0.9", "epochs": "3"}
    history = mlflow_store.get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(step, pytest.approx(loss)) for step, loss in enumerate(LOSSES)]


def test_a_failed_attempt_ends_failed_and_the_next_opens_a_fresh_run(tmp_path, mlflow_store):
    first = TrackerHub(attempt=0)
    feed(first, [TrackerInit(("tensorboard", "mlflow"), "restarts", CONFIG, {}, str(tmp_path)), *losses_at()[:5]])
    first.close("failed")
    second = TrackerHub(attempt=1)
    feed(second, run_messages(("tensorboard", "mlflow"), "restarts", str(tmp_path)))
    second.close("succeeded")
    third = TrackerHub(attempt=0)
    feed(third, [TrackerInit(("mlflow",), "restarts", {}, {}, str(tmp_path)), *losses_at()[:2]])
    third.close("interrupted")

    failed, fresh, interrupted = mlflow_runs(mlflow_store, "restarts")
    assert (failed.info.status, fresh.info.status, interrupted.info.status) == ("FAILED", "FINISHED", "KILLED")
    assert failed.data.tags["notebook_launcher.attempt"] == "0" and fresh.data.tags["notebook_launcher.attempt"] == "1"
    assert len(mlflow_store.get_metric_history(failed.info.run_id, "train/loss")) == 5
    assert len(mlflow_store.get_metric_history(fresh.info.run_id, "train/loss")) == STEPS
    # TensorBoard: the restart is a run of its own, beside the failed one.
    assert steps_of(tensorboard_runs(tmp_path, "train/loss")) == {
        "restarts/version_0": [0, 1, 2, 3, 4], "restarts/version_1": list(range(STEPS))}


def take_versions(parent: str, barrier, count: int, results) -> None:
    """In a forked process: wait for the others, then take ``count`` run folders."""
    from notebook_launcher.trackers.tensorboard_run import new_version_dir

    barrier.wait(timeout=30)
    results.put([new_version_dir(parent) for _ in range(count)])


def test_runs_starting_together_in_one_folder_each_get_their_own(tmp_path):
    """Four processes take 50 TensorBoard run folders each in one project folder, all at once
    (two kernels, a sweep): each folder is taken once, numbered 0..199 without a gap."""
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(4), context.Queue()
    processes = [context.Process(target=take_versions, args=(str(tmp_path / "p"), barrier, 50, results))
                 for _ in range(4)]
    for process in processes:
        process.start()
    try:
        taken = [path for _ in processes for path in results.get(timeout=60)]
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
    assert len(set(taken)) == len(taken) == 200
    assert sorted(os.listdir(tmp_path / "p")) == sorted(f"version_{n}" for n in range(200))


# ----------------------------------------------------------------- wandb and trackio
def wandb_records(path: str):
    """The records of an offline run file (LevelDB log format: 32 KiB blocks of chunks)."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    position, block, pieces = 7, 32 * 1024, b""  # 7: the ":W&B" header
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        length, kind = struct.unpack("<HB", data[position + 4:position + 7])
        if kind == 0:
            break
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        pieces = chunk if kind in (1, 2) else pieces + chunk  # FULL, FIRST / MIDDLE, LAST
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            yield record


@pytest.fixture
def wandb_offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield
    import wandb

    wandb.teardown()  # a test that failed may leave wandb's service process running


def wandb_processes() -> list:
    """wandb's service processes under this one (wandb-core and its system monitor)."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if process.name().startswith("wandb") and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found


def wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return bool(condition())


def offline_run(path: str) -> tuple:
    """(history rows as (step, {key: value}), config, exit code) of an offline run file,
    once wandb's service wrote its exit record (finish() returns before that)."""
    wait_for(lambda: "exit" in [r.WhichOneof("record_type") for r in wandb_records(path)], timeout=30)
    history, config, exit_code = [], {}, None
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.append((row.pop("_step"), row))
        elif kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key: json.loads(item.value_json) for item in updates})
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return history, config, exit_code


def test_wandb_offline_writes_the_history_and_the_exit_code(tmp_path, wandb_offline):
    said = []
    hub = TrackerHub(warn=said.append)
    feed(hub, [*run_messages(("wandb",), "offline-demo", str(tmp_path))[:-1],
               TrackerConfig({"batch_size": 8}, tracker="wandb")])
    assert wait_for(wandb_processes, timeout=60), "wandb's service never started"
    hub.close("failed")
    assert said == []
    # The notebook had no wandb run of its own: wandb's service is stopped with ours (a later
    # fork of the notebook would inherit its threads and sockets otherwise).
    assert wait_for(lambda: not wandb_processes(), timeout=10), wandb_processes()

    (path,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    history, config, exit_code = offline_run(path)
    assert [(step, row["train/loss"], row["note"]) for step, row in history] == [
        (step, pytest.approx(loss), f"step {step}") for step, loss in enumerate(LOSSES)]
    assert config["lr"] == 0.1 and config["optimizer"] == {"name": "sgd", "momentum": 0.9}
    assert config["batch_size"] == 8
    assert exit_code == 1


def test_a_wandb_run_of_the_notebooks_own_keeps_wandbs_service(tmp_path, wandb_offline):
    import wandb

    mine = wandb.init(project="mine", dir=str(tmp_path / "mine"), settings=wandb.Settings(console="off"))
    hub = TrackerHub()
    feed(hub, run_messages(("wandb",), "ours", str(tmp_path / "ours")))
    assert hub.close("succeeded")
    assert wandb.run is mine and wandb_processes()  # ours is closed, the service serves the person's run
    mine.log({"after": 1.0})
    mine.finish()
    (path,) = glob.glob(str(tmp_path / "mine" / "wandb" / "offline-run-*" / "run-*.wandb"))
    history, _, exit_code = offline_run(path)
    assert [(step, row["after"]) for step, row in history] == [(0, 1.0)] and exit_code == 0


def test_trackio_records_the_metrics_and_config(tmp_path, monkeypatch):
    import trackio.utils
    from trackio.sqlite_storage import SQLiteStorage

    project = f"nl-test-{os.getpid()}-{time.time_ns()}"
    hub = TrackerHub()
    feed(hub, run_messages(("trackio",), project, str(tmp_path), init_kwargs={"trackio": {"name": "r1"}}))
    hub.close("succeeded")
    try:
        logs = SQLiteStorage.get_logs(project, "r1")
        assert [(row["step"], row["train/loss"]) for row in logs] == [
            (step, pytest.approx(loss)) for step, loss in enumerate(LOSSES)]
        assert SQLiteStorage.get_run_config(project, "r1")["lr"] == 0.1
    finally:
        for path in glob.glob(str(trackio.utils.TRACKIO_DIR / f"{project}*")):
            os.remove(path)


# ----------------------------------------------------------------- report() mode
def test_report_mode_logs_every_rank0_report_once(tmp_path):
    hub = TrackerHub(log_with="tensorboard", project_name="reports", logging_dir=str(tmp_path))
    messages = []
    for step, loss in enumerate(LOSSES):
        messages.append(Report(step, {"loss": loss}, 0.0))
        # What Accelerator.log sends besides: its numbers are the report's, so only the text is new.
        messages.append(TrackerLog({"loss": loss, "phase": "train"}, step=step, reported=True))
    feed(hub, [TrackerInit(("tensorboard",), "reports", {"lr": 0.1}, {}, str(tmp_path)), *messages])
    feed(hub, [Report(0, {"loss": 5.0}, 0.0)], rank=1)
    hub.close("succeeded")
    # One run: the report mode wrote to the run init_trackers opened, each step once.
    assert tensorboard_runs(tmp_path, "loss") == {
        "reports/version_0": [(step, pytest.approx(loss)) for step, loss in enumerate(LOSSES)]}


def test_reports_are_ignored_without_log_with(tmp_path):
    # No run open: reports start nothing (no writer thread; close has nothing to wait for).
    hub = TrackerHub()
    feed(hub, [Report(step, {"loss": 1.0}, 0.0) for step in range(5)])
    assert "notebook_launcher-trackers" not in [t.name for t in threading.enumerate()]
    assert hub.close("succeeded")
    # A run that init_trackers opened gets what log() sends, and no report (those are the dashboard's).
    hub = TrackerHub()
    feed(hub, [TrackerInit(("tensorboard",), "logged", {}, {}, str(tmp_path)),
               *[Report(step, {"loss": 5.0, "reported": 1.0}, 0.0) for step in range(5)],
               TrackerLog({"loss": 1.0}, step=0)])
    assert hub.close("succeeded")
    assert tensorboard_runs(tmp_path, "loss") == {"logged/version_0": [(0, pytest.approx(1.0))]}
    assert tensorboard_runs(tmp_path, "reported") == {}


# ----------------------------------------------------------------- trackers that fail or hang
def test_a_failing_tracker_is_reported_once_and_the_others_go_on(tmp_path, mlflow_store):
    said = []
    hub = TrackerHub(warn=said.append)
    init = TrackerInit(("mlflow", "tensorboard"), "failing", CONFIG, {"mlflow": {"no_such_option": 1}}, str(tmp_path))
    feed(hub, [init, *losses_at(), TrackerEnd()])
    hub.close("succeeded")
    assert len(said) == 1 and "MLflow tracker failed to open a run" in said[0] and "no_such_option" in said[0]
    assert steps_of(tensorboard_runs(tmp_path, "train/loss")) == {"failing/version_0": list(range(STEPS))}

    said.clear()
    hub = TrackerHub(warn=said.append)
    bad_names = [TrackerLog({"bad name?!": 1.0}, step=step) for step in range(3)]
    feed(hub, [TrackerInit(("mlflow",), "failing", {}, {}, None), *bad_names, *losses_at()])
    hub.close("succeeded")
    assert "MLflow tracker failed to log" in said[0] and "bad name?!" in said[0]
    # Once, however the writer batched them (then a count), and a note about the text it could not store.
    assert all("more time" in line or "did not record 'note'" in line for line in said[1:])
    run = mlflow_runs(mlflow_store, "failing")[-1]
    assert len(mlflow_store.get_metric_history(run.info.run_id, "train/loss")) == STEPS


@pytest.fixture
def silent_server(monkeypatch):
    """An MLflow "server" that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept)
    thread.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    yield accepted
    stop.set()
    thread.join(timeout=5)
    for connection in accepted:
        connection.close()
    listener.close()
    deadline = time.monotonic() + 30  # the writer gets its error, reports it, and ends
    while "notebook_launcher-trackers" in [t.name for t in threading.enumerate()] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "notebook_launcher-trackers" not in [t.name for t in threading.enumerate()]


def test_a_hanging_tracker_never_blocks_the_caller(silent_server):
    said = []
    hub = TrackerHub(warn=said.append, queue_limit=10)
    feed(hub, [TrackerInit(("mlflow",), "hangs", CONFIG, {}, None)])
    deadline = time.monotonic() + 30
    while not silent_server and time.monotonic() < deadline:  # the writer is now waiting for an answer
        time.sleep(0.01)
    logs = [TrackerLog({"loss": float(step)}, step=step) for step in range(100)]
    start = time.perf_counter()
    longest = feed(hub, logs)
    assert time.perf_counter() - start < 5 and longest < 0.05
    assert hub.dropped == 90  # 10 queued behind the hanging open, the rest dropped
    start = time.perf_counter()
    assert hub.close("failed", timeout=0.5) is False
    assert time.perf_counter() - start < 5
    assert "still writing after 0.5s" in said[-1]


# ----------------------------------------------------------------- before any process starts
def test_check_installed_names_the_pip_package(monkeypatch):
    assert check_installed(["tensorboard", "mlflow", "tensorboard"]) == ("tensorboard", "mlflow")
    assert set(check_installed("all")) == {"tensorboard", "mlflow", "wandb", "trackio"}
    with pytest.raises(LaunchConfigError, match="not supported by notebook_launcher"):
        check_installed("comet_ml")
    with pytest.raises(LaunchConfigError, match="Unknown tracker 'tensorbord'"):
        check_installed("tensorbord")
    monkeypatch.setitem(sys.modules, "wandb", None)  # Python's own "cannot be imported"
    with pytest.raises(LaunchConfigError, match=r"Weights & Biases \('wandb'\), not installed here: pip install wandb"):
        check_installed(["tensorboard", "wandb"])
    assert "wandb" not in check_installed("all")


def test_mlflows_sqlite_store_without_sqlalchemy_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    monkeypatch.delitem(sys.modules, "mlflow", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///somewhere.db")
    with pytest.raises(LaunchConfigError, match="needs SQLAlchemy.*pip install mlflow"):
        check_installed("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://localhost:5000")
    assert check_installed("mlflow") == ("mlflow",)


def test_close_takes_a_known_status():
    with pytest.raises(ValueError, match="succeeded, failed, interrupted, stopped"):
        TrackerHub().close("crashed")
