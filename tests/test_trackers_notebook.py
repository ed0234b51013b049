"""notebooks/06-trackers.ipynb, executed top to bottom by nbclient in a real kernel, on CPU."""

import ast
import os

from test_notebooks import assert_saved_notebook_is_static, cell, displays, error, execute, final_summary, text


def test_06_trackers(tmp_path):
    nb, seconds = execute("06-trackers.ipynb", tmp_path)
    for c in nb.cells:
        assert c.cell_type != "code" or error(c) is None, f"cell {c.id} raised: {error(c)}"

    launch = cell(nb, "launch")
    assert "succeeded" in final_summary(launch)["text/html"]
    returned = ast.literal_eval(next(d["text/plain"] for d in displays(launch) if "steps" in d.get("text/plain", "")))
    assert returned["steps"] == 40  # 5 epochs of 8 batches (128 samples per worker)
    assert returned["tracker modules in the worker"] == []
    assert "in the notebook process, never in a worker" in returned["get_tracker(...).writer"]

    events = text(cell(nb, "events"))
    assert "run: runs/regression/version_0" in events
    assert "train/loss: 40 steps, 0..39" in events and "'final/loss'" in events and "'epoch'" in events
    assert "hyperparameters recorded: True" in events
    assert os.listdir(tmp_path / "runs" / "regression") == ["version_0"]  # one launch, one run

    assert "remaining: [30, 29, 28, 27, 26] ... 30 steps" in text(cell(nb, "report-mode"))
    assert_saved_notebook_is_static(nb, tmp_path)
    assert seconds < 90
