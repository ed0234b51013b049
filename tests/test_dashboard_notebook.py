"""A notebook executed end to end by nbclient, saved, and read back like GitHub would.

A 20,000-step training with 100,000 output lines runs with the live dashboard; the saved
file must hold the static summary and the PNG (no live widget left to render) and stay
under 300 KB. A failing run's saved summary names the rank that failed.

nbclient is a front end no marker names, so ``display="auto"`` is the html view here (one
display updated in place); the widgets dashboard is asked for by name where it is meant.
The messages nbclient receives for the html view are counted as they arrive.
"""

import base64
import json
import re
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
    # The html view makes no widget (with display="widgets" nbclient keeps the last state of
    # every widget model, closed or not: a fixed ~50 KB per run, no PNG or log in it).
    assert len(widget_state) < 150_000 and "iVBOR" not in widget_state and "eval 1" not in widget_state


class RecordingClient(NotebookClient):
    """nbclient, keeping every message it processes: (cell index, type, display id, content)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def process_message(self, msg, cell, cell_index):
        transient = msg["content"].get("transient", {}) if isinstance(msg["content"], dict) else {}
        self.seen.append((cell_index, msg["msg_type"], transient.get("display_id"), msg["content"]))
        return super().process_message(msg, cell, cell_index)   # (it renames update_display_data: recorded first)


HTML_RUN = """
def train(steps):
    for step in progress(range(steps), desc="step"):
        report(step, loss=1.0 / (step + 1))
        time.sleep(0.01)
    return steps

result = notebook_launcher(train, args=(250,), num_processes=2)
print("RESULT", result)
"""


def test_the_html_view_through_nbclient_is_update_display_data_on_one_display(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(textwrap.dedent(SETUP)), nbformat.v4.new_code_cell(textwrap.dedent(HTML_RUN))]
    client = RecordingClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    seen = [entry for entry in client.seen if entry[0] == 1]
    shown = [(kind, display_id, content) for _, kind, display_id, content in seen
             if kind in ("display_data", "update_display_data")]
    live_id = shown[0][1]
    assert shown[0][0] == "display_data" and live_id
    updates = [content for kind, display_id, content in shown if kind == "update_display_data"]
    assert len(updates) >= 3 and all(display_id == live_id for kind, display_id, _ in shown
                                      if kind == "update_display_data")
    assert all(WIDGET_VIEW not in content["data"] for _, _, content in shown)
    steps = [int(m.group(1)) for u in updates[:-1]
             for m in [re.search(r"(\d+)/250", u["data"]["text/html"])] if m]
    assert len(steps) >= 2 and steps == sorted(steps) and steps[0] < steps[-1], steps   # it moved live
    assert "✔ succeeded" in updates[-1]["data"]["text/html"]
    saved_path = tmp_path / "html.ipynb"
    nbformat.write(nb, str(saved_path))
    saved = nbformat.read(str(saved_path), as_version=4)
    outputs = saved.cells[1].outputs
    datas = [o.data for o in outputs if o.output_type == "display_data"]
    assert "succeeded" in datas[0]["text/html"] and "250/250" in datas[0]["text/html"]   # the display became the summary
    assert "notebook-launcher-dashboard" not in json.dumps(saved.cells[1])                # no live frame kept
    assert any("image/png" in d for d in datas)
    assert "RESULT 250" in "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert not saved.metadata.get("widgets")
