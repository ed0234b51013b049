"""Every notebook in notebooks/, executed top to bottom by nbclient in a real kernel, on CPU.

Cells are found by their ids (set in the notebooks), and each test checks what a reader
must see in that cell: the dashboard's final summary, the loss plot, the numbers coming
back, the failing rank and its traceback, the stop button's effect.
"""

from __future__ import annotations

import ast
import os
import re
import time

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "notebooks")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
CELL_TIMEOUT = 120       # seconds for one cell; a whole notebook takes 10-60 s on 2 cores
SAVED_SIZE_LIMIT = 400_000  # bytes of an executed notebook: summaries and PNGs, no widget state


def execute(name: str, workdir) -> tuple:
    """Run ``notebooks/<name>`` in a fresh kernel (cwd: ``workdir``); return (notebook, seconds)."""
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, startup_timeout=60, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}})
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}   # the CPU path, on every machine
    env.pop("PYTEST_CURRENT_TEST", None)
    started = time.monotonic()
    client.execute(env=env)   # starts, and always shuts down and reaps, its own kernel
    return nb, time.monotonic() - started


def cell(nb, cell_id: str):
    return next(c for c in nb.cells if c.get("id") == cell_id)


def text(c, stream: str = None) -> str:
    return "".join(o.text for o in c.outputs if o.output_type == "stream" and stream in (None, o.name))


def displays(c) -> list:
    return [o.data for o in c.outputs if o.output_type in ("display_data", "execute_result")]


def error(c):
    return next((o for o in c.outputs if o.output_type == "error"), None)


def final_summary(c) -> dict:
    """The dashboard's static summary (it replaced the live widgets when the run ended)."""
    summaries = [d for d in displays(c) if "text/html" in d and "elapsed" in d["text/html"]]
    assert summaries, f"no static summary among {[list(d) for d in displays(c)]}"
    return summaries[0]


def assert_saved_notebook_is_static(nb, tmp_path) -> None:
    """A saved run keeps summaries and PNGs, not widget views that need a live kernel."""
    for c in nb.cells:
        for data in displays(c) if c.cell_type == "code" else []:
            assert WIDGET_VIEW not in data, f"cell {c.id} kept a live widget view"
    path = tmp_path / "saved.ipynb"
    nbformat.write(nb, str(path))
    assert path.stat().st_size < SAVED_SIZE_LIMIT, f"executed notebook is {path.stat().st_size:,} bytes"


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb")))
def test_notebooks_are_committed_without_outputs(name):
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    nbformat.validate(nb)
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None, f"{name}: cell {c.id} has outputs"
    assert os.path.getsize(os.path.join(NOTEBOOKS, name)) < 30_000


def test_01_quickstart(tmp_path):
    nb, seconds = execute("01-quickstart.ipynb", tmp_path)
    assert "1400 training and 397 test images" in text(cell(nb, "data"))

    launch = cell(nb, "launch")
    assert error(launch) is None
    assert text(launch).startswith("Launching on 2 CPU processes (gloo, fork)")
    summary = final_summary(launch)
    assert "succeeded" in summary["text/html"] and "succeeded" in summary["text/plain"]
    assert "12/12" in summary["text/html"]                     # the epoch bar ended full
    assert any("image/png" in d for d in displays(launch)), "no loss plot in the summary"
    log = [d for d in displays(launch) if "[rank0]: epoch 12/12" in d.get("text/plain", "")]
    assert log, "rank 0's output lines are not in the summary"

    accuracy = float(re.search(r"2 workers, 252 steps each, test accuracy ([\d.]+)", text(cell(nb, "result"))).group(1))
    assert accuracy > 0.9
    back = float(re.search(r"computed in the notebook: ([\d.]+)", text(cell(nb, "weights-back"))).group(1))
    assert back == pytest.approx(accuracy, abs=1e-3)           # the weights came back intact
    assert any("image/png" in d for d in displays(cell(nb, "digits-plot")))
    assert_saved_notebook_is_static(nb, tmp_path)
    assert seconds < 90


def test_02_mixed_precision(tmp_path):
    nb, seconds = execute("02-mixed-precision.ipynb", tmp_path)
    assert "will compare: ['no', 'fp16', 'bf16']" in text(cell(nb, "precisions"))

    runs = [ast.literal_eval(line) for line in text(cell(nb, "compare")).splitlines() if line.startswith("{")]
    assert [run["precision"] for run in runs] == ["no", "fp16", "bf16"]
    for run, dtype in zip(runs, ("torch.float32", "torch.float16", "torch.bfloat16")):
        assert run["hidden_dtype"] == dtype              # autocast really ran the layer in that dtype
        assert run["evaluated"] == 397                   # gather_for_metrics: no duplicates, none missing
        assert run["test_accuracy"] > 0.9 and run["workers"] == 2 and run["device"] == "cpu"

    interrupted = cell(nb, "interrupted")
    assert "checkpoints: ['epoch_0', 'epoch_1', 'epoch_2']" in text(interrupted)
    for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl"):
        assert name in text(interrupted)
    assert "step 66" in final_summary(interrupted)["text/html"]   # 3 of 6 epochs of 22 steps

    resumed_cell = cell(nb, "resumed")
    assert "succeeded" in final_summary(resumed_cell)["text/html"]
    assert any("resumed from checkpoints/digits/epoch_2: continuing at epoch 4" in d.get("text/plain", "")
               for d in displays(resumed_cell))
    resumed = ast.literal_eval(text(resumed_cell).strip().splitlines()[-1])
    straight = runs[0]
    assert (resumed["test_accuracy"], resumed["final_loss"]) == (straight["test_accuracy"], straight["final_loss"])
    back = float(re.search(r"computed in the notebook: ([\d.]+)", text(cell(nb, "load-weights"))).group(1))
    assert back == pytest.approx(resumed["test_accuracy"], abs=1e-4)
    assert (tmp_path / "checkpoints" / "digits" / "epoch_5" / "model.safetensors").exists()
    assert_saved_notebook_is_static(nb, tmp_path)
    assert seconds < 90


def test_03_when_things_go_wrong(tmp_path):
    nb, seconds = execute("03-when-things-go-wrong.ipynb", tmp_path)

    shown = cell(nb, "error-shown")
    err = error(shown)
    assert err is not None and err.ename == "WorkerError"
    assert err.evalue.startswith("rank 1 failed: ValueError: bad batch at step 5")
    assert "--- traceback from rank 1 ---" in err.evalue
    assert 'raise ValueError(f"bad batch at step {step}' in err.evalue   # the notebook's own line
    assert "failed" in final_summary(shown)["text/html"] and "rank 1 failed" in final_summary(shown)["text/html"]

    caught = text(cell(nb, "error-caught"))
    assert "failed rank:        1" in caught
    assert "original exception: ValueError('bad batch at step 5: labels out of range')" in caught
    assert "workers left:       []" in caught

    killed = text(cell(nb, "killed"))
    assert killed.startswith("rank 1 failed: killed by SIGKILL")
    assert "signal: 9 | workers left: []" in killed

    hang = text(cell(nb, "hang"))
    stopped = float(re.search(r"stopped after ([\d.]+) s", hang).group(1))
    assert 3 <= stopped < 20
    assert "no progress for 3s (stall_timeout)" in hang and "in all_reduce" in hang
    # The roll-call blames rank 1, which skipped one all_reduce and finished, not rank 0 waiting in the next one.
    assert "blamed: rank 1" in hang
    assert ("all_reduce #10 (cell line 4) is waiting for rank 1: rank 0 waiting; rank 1 missing, finished the function "
            "(its last: all_reduce #9, cell line 4)") in hang, hang
    assert "journal.py" not in hang

    interrupt = cell(nb, "interrupt")
    after = re.search(r"KeyboardInterrupt after ([\d.]+) s; workers left: \[\]", text(interrupt))
    assert after, text(interrupt)
    assert 2 <= float(after.group(1)) < 4          # the timer fires at 2 s; every worker gone within 2 s of it
    assert "interrupted" in final_summary(interrupt)["text/html"]

    next_launch = cell(nb, "next-launch")
    assert displays(next_launch) == [{"text/plain": "3.0"}]

    assert "CUDA initialized in this kernel: False | start_method: spawn" in text(cell(nb, "cuda-init"))
    spawn = text(cell(nb, "spawn"))
    fork_line = next(line for line in spawn.splitlines() if line.lstrip().startswith("fork:"))
    spawn_line = next(line for line in spawn.splitlines() if line.startswith("spawn:"))
    for line in (fork_line, spawn_line):
        assert "'value': 100.0" in line and "'value': 101.0" in line   # the notebook global travelled
    assert_saved_notebook_is_static(nb, tmp_path)
    assert seconds < 90


def test_04_kaggle_colab_multi_gpu(tmp_path):
    nb, seconds = execute("04-kaggle-colab-multi-gpu.ipynb", tmp_path)
    report = text(cell(nb, "env-report"))
    assert re.search(r"running in:\s+jupyter", report)
    assert re.search(r"CUDA initialized here:\s+no", report)
    assert re.search(r"widgets dashboard:\s+yes", report)
    choice = text(cell(nb, "dashboard-choice"))
    markers = ("VSCODE_PID", "JPY_SESSION_NAME", "COLAB_RELEASE_TAG", "KAGGLE_KERNEL_RUN_TYPE")
    if not any(marker in os.environ for marker in markers):   # nbclient: a kernel no known front end started
        assert "front end: kernel -> display='auto' shows html" in choice, choice
    assert "CUDA driver initialized here: False" in choice
    assert re.search(r"^/dev/shm: \d+\.\d GiB$", choice, re.MULTILINE), choice

    check = text(cell(nb, "cli-test"))
    assert "rank 0 (cpu, gloo): ok" in check and "rank 1 (cpu, gloo): ok" in check
    assert "PASS: 2 processes (gloo)" in check

    assert ("notebook_launcher(train, **{'num_processes': None, 'mixed_precision': 'no'}) starts 2 CPU processes"
            in text(cell(nb, "settings")))
    training = cell(nb, "training")
    assert "succeeded" in final_summary(training)["text/html"]
    result = ast.literal_eval(text(training).strip().splitlines()[-1])
    assert result["workers"] == 2 and result["device"] == "cpu" and result["mixed_precision"] == "no"
    assert result["final_loss"] < 0.5
    assert_saved_notebook_is_static(nb, tmp_path)
    assert seconds < 90


def rank_values(c) -> dict:
    """{rank: value} of a ``%%dist`` cell's last expression, shown as ``Out[rank R]: repr``."""
    shown = re.findall(r"^Out\[rank (\d+)\]: (.*)$", text(c, "stdout"), re.MULTILINE)
    return {int(rank): ast.literal_eval(value) for rank, value in shown}


def test_05_interactive_session(tmp_path):
    nb, seconds = execute("05-interactive-session.ipynb", tmp_path)
    assert text(cell(nb, "start")).startswith("Session started: 2 CPU processes (gloo, fork)")
    assert "Out[rank 0]: torch.Size([700, 64])\nOut[rank 1]: torch.Size([700, 64])" in text(cell(nb, "model"))

    train = cell(nb, "train")
    assert error(train) is None
    assert "succeeded" in final_summary(train)["text/html"] and "3/3" in final_summary(train)["text/html"]
    assert any("image/png" in d for d in displays(train)), "no loss plot in the cell's summary"
    assert "[rank0]: step 63: loss" in text(train)

    inspected = rank_values(cell(nb, "inspect"))
    assert sorted(inspected) == [0, 1]
    assert inspected[0]["weight sum"] == inspected[1]["weight sum"]    # DDP kept the ranks in step
    assert inspected[0]["last loss"] != inspected[1]["last loss"]      # each rank trained on its own shard
    assert inspected[0]["steps"] == inspected[1]["steps"] == 63

    mistake = error(cell(nb, "mistake"))
    assert mistake is not None and mistake.ename == "WorkerError"
    assert mistake.evalue.startswith("rank 1 failed: IndexError: index 700 is out of bounds")
    assert "probe = xs[len(xs) - 1 + rank]" in mistake.evalue           # the cell's own line
    shown = "\n".join(mistake.traceback)
    assert "session.py" not in shown and "magics.py" not in shown      # the rank's traceback, not ours
    assert rank_values(cell(nb, "after-mistake")) == {0: {"steps": 63, "probe defined": True},
                                                      1: {"steps": 63, "probe defined": False}}

    more = cell(nb, "train-more")
    assert "succeeded" in final_summary(more)["text/html"]
    last_reported = float(re.search(r"\[rank0\]: step 105: loss [\d.]+, test accuracy ([\d.]+)", text(more)).group(1))
    pulled = float(re.search(r"computed in the notebook: ([\d.]+)", text(cell(nb, "evaluate"))).group(1))
    assert pulled > 0.9
    assert pulled == pytest.approx(last_reported, abs=1e-3)           # the weights came back intact

    stuck = error(cell(nb, "stuck"))
    assert stuck is not None and stuck.evalue.startswith("rank 1 failed: RuntimeError: rank 1 never joins")
    assert "rank 0: released: rank 1 failed" in stuck.evalue                 # rank 0 was waiting in the all_reduce
    kept = cell(nb, "kept")
    assert error(kept) is None and not text(kept, "stderr").strip()           # no restart: the same ranks
    assert rank_values(kept) == {r: {"model still here": True, "sum": 2.0} for r in (0, 1)}

    lost = error(cell(nb, "lost"))
    assert lost is not None and lost.evalue.startswith("rank 1 failed: ") and "signal 9" in lost.evalue.replace("SIGKILL", "signal 9")
    restarted = cell(nb, "restarted")
    notice = text(restarted, "stderr").strip().splitlines()
    assert len(notice) == 1 and "session was broken" in notice[0] and "starting fresh ranks" in notice[0]
    assert rank_values(restarted) == {r: {"model still here": False, "world size": 2} for r in (0, 1)}

    assert "Session stopped: 2 ranks ended.\nprocesses left: []" in text(cell(nb, "stop"))
    assert_saved_notebook_is_static(nb, tmp_path)
    assert seconds < 60


def test_07_ray_cluster(tmp_path):
    pytest.importorskip("ray")
    nb, seconds = execute("07-ray-cluster.ipynb", tmp_path)
    assert "2 Ray nodes:" in text(cell(nb, "cluster"))

    train = cell(nb, "train")
    assert error(train) is None, error(train)
    assert "Launching on 1 CPU process on each of 2 Ray nodes (gloo, spawn)" in text(train)
    found = re.search(r"ranks ran on (\d) nodes; accuracy ([\d.]+)", text(train))
    assert found and found.group(1) == "2" and float(found.group(2)) > 0.85, text(train)
    assert "succeeded" in final_summary(train)["text/html"]
    assert any("image/png" in d for d in displays(train)), "no loss plot in the cell's summary"

    failed = error(cell(nb, "error"))
    assert failed is not None and failed.ename == "WorkerError"
    assert re.match(r"rank 1 on node 1 \(.+\) failed: ValueError: a bad batch on rank 1", failed.evalue), failed.evalue
    assert 'raise ValueError("a bad batch on rank 1")' in failed.evalue          # the cell's own line

    assert "Session started: 1 CPU process on each of 2 Ray nodes (gloo, spawn)" in text(cell(nb, "session-start"))
    values = re.findall(r"^Out\[rank (\d)\]: \(\[3.0, 3.0, 3.0\], '(\w+)'\)$", text(cell(nb, "session-cell")), re.MULTILINE)
    assert sorted(r for r, _ in values) == ["0", "1"] and len({n for _, n in values}) == 2, text(cell(nb, "session-cell"))
    assert "Session stopped: 2 ranks ended." in text(cell(nb, "session-stop"))
    assert "live agent actors: 0 | placement groups not removed: 0" in text(cell(nb, "left"))
    assert error(cell(nb, "shutdown")) is None
    assert_saved_notebook_is_static(nb, tmp_path)
