"""The dashboard in a real Jupyter kernel (jupyter_client), counting real messages.

What a browser would receive is every iopub message: widget updates are ``comm_msg``,
the final summary is ``update_display_data`` / ``display_data``. These tests watch all of
them, including those that arrive while *another* cell runs (``block=False``).
"""

import queue
import textwrap
import time
from dataclasses import dataclass, field

import pytest

from kernel_harness import Kernel, pids_alive

# As a Jupyter server (JupyterLab, Notebook 7) starts its kernels, so that display="auto"
# picks the widgets dashboard these tests count (test_html_view_kernel.py has the others).
AS_JUPYTER_SERVER = "import os\nos.environ['JPY_SESSION_NAME'] = 'dashboard.ipynb'\n"
SETUP = AS_JUPYTER_SERVER + """
import os, time, torch
import torch.distributed as dist
from notebook_launcher import notebook_launcher, report, progress
"""


@dataclass
class Cell:
    msg_id: str
    messages: list = field(default_factory=list)    # every iopub message seen while it ran
    seconds: float = 0.0

    def of_type(self, *kinds, own=None):
        return [m for m in self.messages if m["msg_type"] in kinds
                and (own is None or (m["parent_header"].get("msg_id") == self.msg_id) == own)]

    def text(self, own=True):
        return "".join(m["content"]["text"] for m in self.of_type("stream", own=own))

    def error(self):
        errors = self.of_type("error", own=True)
        return "\n".join(errors[0]["content"]["traceback"]) if errors else ""


def execute(kernel, code, timeout=120):
    """Run a cell; collect every iopub message (any parent) until this cell is idle."""
    start = time.monotonic()
    cell = Cell(kernel.client.execute(textwrap.dedent(code)))
    while True:
        left = start + timeout - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"cell did not finish in {timeout}s")
        try:
            msg = kernel.client.get_iopub_msg(timeout=min(left, 1.0))
        except queue.Empty:
            continue
        cell.messages.append(msg)
        if (msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle"
                and msg["parent_header"].get("msg_id") == cell.msg_id):
            break
    cell.seconds = time.monotonic() - start
    return cell


def ok(kernel, code, timeout=120):
    cell = execute(kernel, code, timeout)
    assert not cell.error(), cell.error()
    return cell


@pytest.fixture(scope="module")
def kernel():
    with Kernel(startup=SETUP) as k:
        yield k


def image_updates(cell):
    """comm messages that carry a new PNG (Image.value goes as a binary buffer)."""
    return [m for m in cell.of_type("comm_msg") if ["value"] in m["content"]["data"].get("buffer_paths", [])
            and m["buffers"] and bytes(m["buffers"][0][:4]) == b"\x89PNG"]


def test_a_burst_of_10000_reports_sends_a_bounded_number_of_messages(kernel):
    cell = ok(kernel, """
        def burst(n):
            for step in progress(range(n), desc="burst"):
                report(step, loss=1.0 / (step + 1), acc=step / n)
            time.sleep(1.5)                         # the dashboard keeps ticking meanwhile
            return n
        print("RESULT", notebook_launcher(burst, args=(10_000,), num_processes=2))
    """)
    assert "RESULT 10000" in cell.text()
    updates = cell.of_type("comm_msg")
    # ~2.5 s of run: bars <= 10/s, texts <= 2/s, plot <= 1/s, plus the final closes.
    assert 5 <= len(updates) <= 60 + 30 * cell.seconds, (len(updates), cell.seconds)
    assert 1 <= len(image_updates(cell)) <= 2 + cell.seconds
    summary = [m for m in cell.of_type("update_display_data") if "text/html" in m["content"]["data"]]
    assert summary and "succeeded" in summary[0]["content"]["data"]["text/html"]
    assert "10,000" in summary[0]["content"]["data"]["text/html"]
    pngs = [m for m in cell.of_type("display_data") if "image/png" in m["content"]["data"]]
    assert len(pngs) == 1
    assert not kernel.wait_no_descendants()


def test_background_run_updates_the_dashboard_while_other_cells_run(kernel):
    launch = ok(kernel, """
        def train(n):
            for step in progress(range(n), desc="step"):
                report(step, loss=1.0 / (step + 1))
                if step % 20 == 0:
                    print("at step", step)
                time.sleep(0.01)
            return "trained"
        run = notebook_launcher(train, args=(300,), num_processes=2, block=False)
        print("launched", run.status)
    """)
    assert "launched" in launch.text() and launch.seconds < 5
    frames = [m for m in launch.of_type("display_data")
              if "application/vnd.jupyter.widget-view+json" in m["content"]["data"]]
    assert len(frames) == 1                           # the container the dashboard lives in
    other = ok(kernel, "time.sleep(2.0); print('other cell', run.status)")
    assert "other cell running" in other.text()
    assert len(other.of_type("comm_msg")) >= 3        # the dashboard moved while this cell ran
    assert image_updates(other)
    assert not other.of_type("stream", own=False)     # nothing leaked into this cell as text
    done = ok(kernel, "print(run.result(60), run.status); run")
    assert "trained succeeded" in done.text()
    bundles = [m["content"]["data"] for m in done.of_type("display_data", own=True)]
    assert any("text/html" in b and "succeeded" in b["text/html"] for b in bundles)
    assert any("image/png" in b for b in bundles)
    assert not kernel.wait_no_descendants()


def test_background_text_output_goes_to_the_launching_cell(kernel):
    launch = ok(kernel, """
        def chatty():
            for i in range(12):
                print("line", i)
                time.sleep(0.1)
        run = notebook_launcher(chatty, num_processes=2, block=False, display="text")
    """)
    later = ok(kernel, "run.wait(60); print('waited', run.status)")
    assert "waited succeeded" in later.text()
    stray = later.text(own=False)                     # the thread's lines carry the launching cell
    own = later.text(own=True)
    assert "[rank0]: line 11" in stray + launch.text() and "[rank0]" not in own
    parents = {m["parent_header"].get("msg_id") for m in later.of_type("stream", own=False)}
    assert parents <= {launch.msg_id}


def test_stop_from_another_cell_reaps_the_workers(kernel):
    ok(kernel, """
        def forever():
            while True:
                report(loss=1.0)
                time.sleep(0.01)
        run = notebook_launcher(forever, num_processes=2, block=False)
        while run.status != "running":
            time.sleep(0.05)
    """)
    assert len(kernel.descendants()) >= 2
    stopped = ok(kernel, "print(run.stop(), run.status)")
    assert "True stopped" in stopped.text()
    assert not kernel.wait_no_descendants()


def test_kernel_shutdown_reaps_a_background_run():
    with Kernel(startup=SETUP) as k:
        ok(k, """
            def forever():
                while True:
                    time.sleep(0.05)
            run = notebook_launcher(forever, num_processes=2, block=False, display="none")
            while run.status != "running":
                time.sleep(0.05)
        """)
        pids = [p.pid for p in k.descendants()]
        assert len(pids) >= 2
        k.km.shutdown_kernel(now=False)              # a polite shutdown: atexit stops the run
    deadline = time.monotonic() + 10
    while pids_alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pids_alive(pids)


def test_a_quick_call_builds_no_dashboard_and_a_reporting_one_does():
    with Kernel(startup=AS_JUPYTER_SERVER + "import sys, time\nfrom notebook_launcher import notebook_launcher, report") as k:
        quick = k.run("print(notebook_launcher(lambda: 'quick', num_processes=2, device='cpu'))\n"
                      "print('matplotlib' in sys.modules, 'ipywidgets' in sys.modules)")
        assert quick.status == "ok", quick.traceback
        assert quick.stdout.splitlines()[-2:] == ["quick", "False False"]     # nothing heavy was imported
        assert quick.widget_states == []                                 # and no widget was made
        assert any("succeeded" in d.get("text/html", "") for d in quick.displays)   # the static summary
        reporting = k.run("def train():\n    for step in range(5):\n        report(step, loss=1.0 / (step + 1))\n"
                          "notebook_launcher(train, num_processes=2, device='cpu')")
        assert reporting.status == "ok", reporting.traceback
        assert reporting.widget_states, "a run that reports shows its live dashboard"
        summary = [d.get("text/html", "") for d in reporting.displays]
        assert any("loss" in h and "succeeded" in h for h in summary), summary


def test_a_quiet_call_builds_its_dashboard_and_a_broken_ipywidgets_still_gives_the_summary(tmp_path):
    """ipywidgets is imported only when the dashboard is due (0.5 s in: the quick call of
    the test above never imports it), and matplotlib only for a metric; an ipywidgets that
    fails to import then costs the live view, not the run or its summary."""
    broken = tmp_path / "ipywidgets"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('ipywidgets is broken here (a test)')\n")
    quiet = ("def quiet():\n    time.sleep(1.0)\n    return 'done'\n"
             "print(notebook_launcher(quiet, num_processes=2, device='cpu'))\n"
             "print('matplotlib' in sys.modules, 'ipywidgets' in sys.modules)")
    with Kernel(startup=AS_JUPYTER_SERVER + "import sys, time\nfrom notebook_launcher import notebook_launcher") as k:
        works = k.run(quiet)
        assert works.status == "ok", works.traceback
        assert works.stdout.splitlines()[-2:] == ["done", "False True"]
        assert works.widget_states, "a call that runs 1 s shows its live dashboard"
    # Rank 1 fails at 0.2 s and rank 0 shrugs off SIGTERM: the run is due for a dashboard
    # only at its end, after the teardown's grace.
    late = ("def late_end():\n    import os, signal\n    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "    if os.environ['RANK'] == '1':\n        time.sleep(0.2)\n        raise ValueError('rank 1 fails')\n"
            "    time.sleep(30)\n"
            "try:\n    notebook_launcher(late_end, num_processes=2, device='cpu')\n"
            "except Exception as exc:\n    print('raised', type(exc).__name__)")
    with Kernel(startup=AS_JUPYTER_SERVER + f"import sys, time\nsys.path.insert(0, {str(tmp_path)!r})\n"
                        "from notebook_launcher import notebook_launcher") as k:
        for code, verdict in ((quiet, "succeeded"), (late, "failed")):
            result = k.run(code)
            assert result.status == "ok", result.traceback
            assert result.stderr.count("ipywidgets failed to import") == 1, result.stderr   # said once
            assert "ipywidgets is broken here" in result.stderr and "pass display='text'" in result.stderr
            assert result.widget_states == []
            assert any(verdict in d.get("text/html", "") for d in result.displays), (result.stderr, result.displays)
        assert result.stdout.splitlines()[-1] == "raised WorkerError"
