"""A notebook executed end to end by nbclient, saved, and read back like GitHub would.

A 20,000-step training with 100,000 output lines runs with the live dashboard; the saved
file must hold the static summary and the PNG (no live widget left to render) and stay
under 300 KB. A failing run's saved summary names the rank that failed.
"""

import base64
import json
import textwrap

import nbformat
from nbclient import NotebookClient

SETUP = """
import time
import torch
import torch.distributed as dist
from notebook_launcher import notebook_launcher, report, progress
"""

TRAIN = """
def train(epochs, steps):
    rank = dist.get_rank()
    w = torch.zeros(1)
    for epoch in progress(range(epochs), desc="epoch"):
        for i in progress(range(steps), desc="batch"):
            step = epoch * steps + i
            w += 0.001
            report(step, loss=2.0 / (1 + step / 500) + 0.01 * (step % 7), lr=1e-3 * (1 - step / (epochs * steps)))
            print(f"rank {rank} step {step}")
        for j in range(15_000):                 # a chatty evaluation: 100,000 lines in all
            print(f"rank {rank} eval {epoch} {j}")
    dist.all_reduce(w)
    return round(w.item(), 3)

result = notebook_launcher(train, args=(2, 10_000), num_processes=2)
print("RESULT", result)
"""

FAIL = """
def fails_on_rank_1():
    for step in range(50):
        report(step, loss=1.0)
        if dist.get_rank() == 1 and step == 20:
            raise ValueError("bad batch 20")
    time.sleep(20)

notebook_launcher(fails_on_rank_1, num_processes=2)
"""

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def test_saved_notebook_holds_the_summary_and_png_and_stays_small(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(textwrap.dedent(SETUP)),
                nbformat.v4.new_code_cell(textwrap.dedent(TRAIN)),
                nbformat.v4.new_code_cell(textwrap.dedent(FAIL), metadata={"tags": ["raises-exception"]})]
    NotebookClient(nb, timeout=150, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    path = tmp_path / "dashboard.ipynb"
    nbformat.write(nb, str(path))
    size = path.stat().st_size
    print(f"saved notebook: {size:,} bytes")
    assert size < 300_000, f"saved notebook is {size:,} bytes"

    saved = nbformat.read(str(path), as_version=4)
    train_outputs = saved.cells[1].outputs
    text = "".join(o.get("text", "") for o in train_outputs if o.output_type == "stream")
    assert "RESULT 40.0" in text                      # 2 ranks x 20,000 steps x 0.001
    assert "rank 0 step" not in text                  # the 100,000 lines went to the log panel
    datas = [o.data for o in train_outputs if o.output_type == "display_data"]
    assert not [d for d in datas if WIDGET_VIEW in d]  # no live widget left: renders without a kernel
    summary = [d["text/html"] for d in datas if "text/html" in d and "succeeded" in d["text/html"]]
    assert summary and "20,000/" not in summary[0] and "10,000/10,000" in summary[0]
    assert "loss" in summary[0] and "lr" in summary[0]
    pngs = [base64.b64decode(d["image/png"]) for d in datas if "image/png" in d]
    assert len(pngs) == 1 and pngs[0].startswith(b"\x89PNG")
    logs = [d["text/html"] for d in datas if "text/html" in d and "output lines" in d["text/html"]]
    assert logs and "of 100,000 output lines" in logs[0] and "eval 1 14999" in logs[0]

    fail_outputs = saved.cells[2].outputs
    assert any(o.output_type == "error" and o.ename == "WorkerError" for o in fail_outputs)
    fail_html = [o.data["text/html"] for o in fail_outputs
                 if o.output_type == "display_data" and "text/html" in o.data]
    assert any("failed" in h and "rank 1 failed" in h and "bad batch 20" in h for h in fail_html)

    widget_state = json.dumps(saved.metadata.get("widgets", {}))
    # nbclient keeps the last state of every widget model, closed or not: a fixed ~50 KB
    # per run (no step count in it), and no PNG or log in it since they are emptied first.
    assert len(widget_state) < 150_000 and "iVBOR" not in widget_state and "eval 1" not in widget_state
