"""The html dashboard, background runs' parents, auto's choice, GPU facts, out-of-memory
errors and the CUDA-driver preflight, with real workers and (where a notebook matters) a
real Jupyter kernel, counting the iopub messages a front end would receive.

Where a GPU is needed and there is none (this machine), only the GPU's own answers are
stood in for: nvidia-ml-py's module (tests/standins/pynvml.py), torch.cuda's memory figures
inside a rank, a CUDA out-of-memory exception raised by a rank, and a CUDA driver library
(a few lines of C compiled here, named libcuda.so.1). The real ones are exercised by
scripts/gpu_check.py on a machine with GPUs.
"""

import os
import re
import shutil
import subprocess
import time

import pytest
import torch

from kernel_harness import Kernel
from test_ui_kernel import execute, ok

from notebook_launcher import Accelerator, WorkerError, notebook_launcher
from notebook_launcher.config import _shm_notes, _start_method
from notebook_launcher.environment import Environment

STANDINS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "standins")
SETUP = """
import os, sys, time, torch
import torch.distributed as dist
from notebook_launcher import notebook_launcher, report, progress
"""
TRAIN = """
def train(n, pause):
    for step in progress(range(n), desc="step"):
        report(step, loss=1.0 / (step + 1))
        if step % 20 == 0:
            print("at step", step)
        time.sleep(pause)
    return "trained"
"""


@pytest.fixture(scope="module")
def kernel():
    with Kernel(startup=SETUP + TRAIN) as k:
        yield k


def display_ids(messages, kind):
    return [m["content"].get("transient", {}).get("display_id") for m in messages if m["msg_type"] == kind]


def steps_shown(messages):
    """The step counts the dashboard's frames showed, in order."""
    shown = []
    for m in messages:
        if m["msg_type"] in ("display_data", "update_display_data"):
            found = re.search(r"step</span></td><td[^>]*>[█░]*</td><td[^>]*><span[^>]*>([\d,]+)/", m["content"]["data"].get("text/html", ""))
            if found:
                shown.append(int(found.group(1).replace(",", "")))
    return shown


# ----------------------------------------------------------------- the html view in a kernel
def test_html_is_one_display_updated_in_place_and_ends_as_the_summary(kernel):
    cell = ok(kernel, 'print("RESULT", notebook_launcher(train, args=(150, 0.02), num_processes=2, display="html"))')
    assert "RESULT trained" in cell.text()
    assert not cell.of_type("comm_open", "comm_msg")                  # no widget at all
    live_id = display_ids(cell.messages, "display_data")[0]
    updates = display_ids(cell.messages, "update_display_data")
    assert live_id and set(updates) == {live_id}                     # every update goes to that one display
    assert 3 <= len(updates) <= 2 * cell.seconds + 3, (len(updates), cell.seconds)   # 2 a second at most
    shown = steps_shown(cell.messages)
    assert len(shown) >= 3 and shown == sorted(shown) and shown[0] < shown[-1], shown   # it moved, live
    assert all(m["parent_header"]["msg_id"] == cell.msg_id for m in cell.of_type("display_data", "update_display_data"))
    final = cell.of_type("update_display_data")[-1]["content"]["data"]
    assert "✔ succeeded" in final["text/html"] and "150/150" in final["text/html"]
    assert "notebook-launcher-dashboard" not in final["text/html"]   # the static summary, not a live frame
    after = [m["content"]["data"] for m in cell.of_type("display_data")[1:]]
    assert any("image/png" in d for d in after)                      # the final plot
    assert any("[rank0]: at step 140" in d.get("text/html", "") for d in after)   # and the log
    assert kernel.value("'ipywidgets' in sys.modules") is False      # html never needs ipywidgets
    assert not kernel.wait_no_descendants()


def test_a_background_html_run_updates_its_launching_cell_while_another_runs(kernel):
    launch = ok(kernel, """
        run = notebook_launcher(train, args=(250, 0.02), num_processes=2, display="html", block=False)
        print("launched", run.status)
    """)
    frame = display_ids(launch.messages, "display_data")
    assert launch.seconds < 5 and len(frame) == 1 and not launch.of_type("comm_open")
    other = ok(kernel, "time.sleep(2.0); print('other cell', run.status)")
    assert "other cell running" in other.text()
    moved = other.of_type("update_display_data", own=False)
    assert len(moved) >= 2 and set(display_ids(moved, "update_display_data")) == set(frame)
    # ipykernel 7: every message the run's thread sent carries the launching cell as its parent
    from_run = [m for m in other.messages if m["msg_type"] in ("update_display_data", "display_data", "stream")
                and m["parent_header"].get("msg_id") != other.msg_id]
    assert from_run and {m["parent_header"]["msg_id"] for m in from_run} == {launch.msg_id}
    done = ok(kernel, "print(run.result(60), run.status)")
    assert "trained succeeded" in done.text()
    final = [m for m in launch.messages + other.messages + done.messages
             if m["msg_type"] == "update_display_data"][-1]
    assert final["parent_header"]["msg_id"] == launch.msg_id
    html = final["content"]["data"]["text/html"]
    assert "✔ succeeded" in html and 'src="data:image/png;base64,' in html   # one display: plot inline
    assert not kernel.wait_no_descendants()


def test_a_background_widgets_run_sends_its_comm_messages_as_the_launching_cell(kernel):
    launch = ok(kernel, """
        run = notebook_launcher(train, args=(250, 0.02), num_processes=2, display="widgets", block=False)
    """)
    other = ok(kernel, "time.sleep(2.0); print('other cell', run.status)")
    moved = other.of_type("comm_msg", own=False) + other.of_type("comm_msg", own=True)
    assert len(moved) >= 3
    assert {m["parent_header"].get("msg_id") for m in moved} == {launch.msg_id}
    ok(kernel, "run.wait(60)")
    assert not kernel.wait_no_descendants()


# ----------------------------------------------------------------- display="auto"
def test_auto_chooses_by_the_front_ends_own_markers(tmp_path):
    colab = tmp_path / "google" / "colab"
    colab.mkdir(parents=True)
    (colab / "__init__.py").write_text("")
    markers = ("JPY_SESSION_NAME", "VSCODE_PID", "VSCODE_CWD", "VSCODE_IPC_HOOK_CLI", "COLAB_RELEASE_TAG")
    with Kernel(startup=SETUP + TRAIN + f"from notebook_launcher.ui import resolve_display\n"
                                f"for key in {markers!r} + tuple(k for k in os.environ if k.startswith('KAGGLE')):\n"
                                f"    os.environ.pop(key, None)\n") as k:
        def chosen():
            return k.value("resolve_display('auto')")

        assert chosen() == "html"                                    # a kernel no front end claims
        k.run("os.environ['JPY_SESSION_NAME'] = 'train.ipynb'")     # JupyterLab / Notebook 7 (jupyter_server)
        assert chosen() == "widgets"
        k.run("os.environ['VSCODE_PID'] = '4242'")                  # VS Code's notebooks
        assert chosen() == "html"
        k.run("del os.environ['VSCODE_PID']; os.environ['KAGGLE_KERNEL_RUN_TYPE'] = 'Interactive'")
        assert chosen() == "html"
        kaggle = ok(k, "notebook_launcher(train, args=(60, 0.02), num_processes=2)")   # auto, on "Kaggle"
        assert kaggle.of_type("update_display_data") and not kaggle.of_type("comm_open", "comm_msg")
        k.run(f"del os.environ['KAGGLE_KERNEL_RUN_TYPE']; sys.path.insert(0, {str(tmp_path)!r})")
        assert chosen() == "html"                                    # google.colab importable
        assert k.value("'google.colab' in sys.modules") is False     # looked up, not imported
        k.run("sys.path.pop(0); sys.modules.pop('google', None)")
        assert chosen() == "widgets"                                 # back under a Jupyter server
        assert not k.wait_no_descendants()


# ----------------------------------------------------------------- GPU facts
GPU_TRAIN = """
def gpu_train(steps):
    rank = dist.get_rank()
    # torch.cuda's figures stand in for a GPU's in this CPU rank (no GPU here)
    torch.cuda.is_initialized = lambda: True
    torch.cuda.current_device = lambda: rank
    torch.cuda.memory_allocated = lambda device=None: (3 + rank) * 2**30
    torch.cuda.max_memory_allocated = lambda device=None: (5 + rank) * 2**30
    torch.cuda.memory_reserved = lambda device=None: 6 * 2**30
    for step in range(steps):
        report(step, loss=1.0 / (step + 1))
        time.sleep(0.05)
    return rank
"""


def test_gpu_facts_in_the_dashboard_with_a_stand_in_nvml(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", STANDINS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")   # both stand-in GPUs, in this order; the launch stays on CPU
    with Kernel(startup=SETUP + GPU_TRAIN) as k:
        assert k.value("__import__('pynvml').__file__").startswith(STANDINS)
        started = time.monotonic()
        cell = execute(k, 'notebook_launcher(gpu_train, args=(60,), num_processes=2, device="cpu", display="html")')
        seconds = time.monotonic() - started
        assert not cell.error(), cell.error()
        frames = [m["content"]["data"]["text/html"] for m in cell.of_type("display_data", "update_display_data")
                  if "notebook-launcher-dashboard" in m["content"]["data"].get("text/html", "")]
        assert frames
        live = frames[-1]
        assert "<b>GPU 1</b>" in live and "<b>GPU 0</b>" in live and live.index("GPU 1") < live.index("GPU 0")
        assert "Tesla T4" in live and "/ 15.0 GiB" in live and "87 %" in live and "77 %" in live
        assert "cuda:0 · 3.0 GiB (peak 5.0 GiB)" in live and "cuda:1 · 4.0 GiB (peak 6.0 GiB)" in live
        summary = cell.of_type("update_display_data")[-1]["content"]["data"]["text/html"]
        assert "✔ succeeded" in summary and "<b>GPU 0</b>" in summary and "(peak 6.0 GiB)" in summary
        calls = k.value("__import__('pynvml').memory_calls")
        samples = len(calls) / 2                                # 2 GPUs a sample
        assert 1 <= samples <= seconds / 1.0 + 1, (samples, seconds)
        gaps = [b - a for a, b in zip(calls[::2], calls[2::2])]
        assert all(gap >= 0.99 for gap in gaps), gaps           # never two samples within a second
        assert k.value("torch.cuda.is_initialized()") is False
        assert not k.wait_no_descendants()


def test_no_gpu_no_gpu_rows(kernel):
    cell = ok(kernel, 'notebook_launcher(train, args=(60, 0.02), num_processes=2, display="html")')
    html = "".join(m["content"]["data"].get("text/html", "") for m in cell.of_type("display_data", "update_display_data"))
    assert "GPU" not in html


# ----------------------------------------------------------------- out of memory
def out_of_memory_on_rank_1():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        # torch.cuda's figures and its error stand in for a T4's (no GPU here)
        torch.cuda.is_initialized = lambda: True
        torch.cuda.current_device = lambda: 1
        torch.cuda.memory_allocated = lambda device=None: 12 * 2**30
        torch.cuda.max_memory_allocated = lambda device=None: int(13.5 * 2**30)
        torch.cuda.memory_reserved = lambda device=None: int(13.8 * 2**30)
        torch.cuda.get_device_name = lambda device=None: "Tesla T4"
        torch.cuda.mem_get_info = lambda device=None: (64 * 2**20, 15 * 2**30)
        raise torch.cuda.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 1 has a total capacity of 15.00 GiB of which "
            "64.00 MiB is free. Of the allocated memory 12.00 GiB is allocated by PyTorch")
    time.sleep(30)


def test_an_out_of_memory_error_names_the_rank_its_gpu_its_memory_and_what_to_try():
    with pytest.raises(WorkerError) as caught:
        notebook_launcher(out_of_memory_on_rank_1, num_processes=2, device="cpu", display="none")
    err = caught.value
    text = str(err)
    assert err.rank == 1 and isinstance(err.__cause__, torch.cuda.OutOfMemoryError)
    assert text.splitlines()[0] == (
        "rank 1 failed: OutOfMemoryError: CUDA out of memory on rank 1, GPU cuda:1 (Tesla T4): tried to "
        "allocate 2.0 GiB with 12.0 GiB allocated by this rank (peak 13.5 GiB, 13.8 GiB reserved); "
        "the GPU has 15.0 GiB, 64 MiB free")
    advice = text.splitlines()[1]
    for hint in ("smaller batch", "mixed_precision='fp16'", "gradient accumulation", "fewer ranks per GPU",
                 "expandable_segments"):
        assert hint in advice, advice
    assert "Tried to allocate 2.00 GiB" in err.remote_traceback          # torch's own words are kept


def test_other_errors_get_no_memory_advice():
    def fails():
        raise RuntimeError("shape mismatch")

    with pytest.raises(WorkerError) as caught:
        notebook_launcher(fails, num_processes=1, device="cpu", display="none")
    assert "What to try" not in str(caught.value)


# ----------------------------------------------------------------- fp16: loss scale and skipped steps
def fp16_training(steps, bad_steps):
    model = torch.nn.Linear(8, 1)
    accelerator = Accelerator()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.01))
    for step in range(steps):
        loss = model(torch.randn(4, 8)).float().pow(2).mean()
        if step in bad_steps:
            loss = loss * float("inf")        # an overflow: the scaler skips this step
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    return accelerator.scaler.get_scale()


def test_the_fp16_loss_scale_and_skipped_steps_reach_the_dashboard():
    run = notebook_launcher(fp16_training, args=(12, (3, 7)), num_processes=2, device="cpu",
                            mixed_precision="fp16", display="none", block=False)
    scale = run.result(timeout=120)
    state = run.state
    assert state.loss_scale == scale and state.skipped_steps >= 2
    assert state.ranks[0].device_stats.peak is None                # a CPU rank: no CUDA memory to show
    html = run.summary().summary_html
    assert f"fp16 loss scale <b>{scale:,.6g}</b> · {state.skipped_steps} steps skipped" in html


# ----------------------------------------------------------------- preflight
FAKE_DRIVER = r"""
/* Stands in for the CUDA driver's library: cuDeviceGetCount says CUDA_ERROR_NOT_INITIALIZED (3)
   until cuInit was called, as the real one does. */
static int initialized = 0;
int cuInit(unsigned int flags) { (void)flags; initialized = 1; return 0; }
int cuDeviceGetCount(int *count) { if (!initialized) return 3; *count = 0; return 0; }
"""


@pytest.fixture
def fake_driver(tmp_path):
    if shutil.which("cc") is None:
        pytest.skip("no C compiler for the stand-in CUDA driver")
    (tmp_path / "driver.c").write_text(FAKE_DRIVER)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(tmp_path / "libcuda.so.1"), str(tmp_path / "driver.c")],
                   check=True)
    cupy = tmp_path / "cupy"                      # a library that initializes the driver when imported
    cupy.mkdir()
    (cupy / "__init__.py").write_text(
        "import ctypes, os\n"
        "_driver = ctypes.CDLL(os.path.join(os.path.dirname(os.path.dirname(__file__)), 'libcuda.so.1'))\n"
        "_driver.cuInit(0)\n")
    return tmp_path


def test_a_driver_initialized_by_another_library_switches_to_spawn_and_names_it(fake_driver):
    with Kernel(startup=SETUP + f"sys.path.insert(0, {str(fake_driver)!r})\n"
                                "from notebook_launcher import environment") as k:
        loaded = k.run(f"import ctypes; _ = ctypes.CDLL({str(fake_driver / 'libcuda.so.1')!r})\n"
                       "print(environment.cuda_driver_initialized())")
        assert loaded.stdout.strip() == "False"        # loaded but not initialized: fork stays safe
        quiet = k.run("print(notebook_launcher(lambda: 6, num_processes=2, device='cpu', display='none'))")
        assert quiet.stdout.strip() == "6" and "spawn" not in quiet.stderr
        launch = k.run("import cupy\nprint(environment.cuda_driver_initialized(), torch.cuda.is_initialized())\n"
                       "print(notebook_launcher(lambda: 7, num_processes=2, device='cpu', display='none'))")
        assert launch.status == "ok", launch.traceback
        assert launch.stdout.split() == ["True", "False", "7"]   # torch's flag misses it; the probe does not
        assert ("The CUDA driver is already initialized in this kernel by a library other than torch "
                "(cupy (imported here)), so workers start with spawn instead of fork") in launch.stderr
        assert "import that library inside the launched function" in launch.stderr
        assert not k.wait_no_descendants()


def test_a_library_not_known_by_name_is_named_by_the_driver_handle_it_holds(fake_driver):
    (fake_driver / "my_gpu_lib.py").write_text(
        f"import ctypes\n_driver = ctypes.CDLL({str(fake_driver / 'libcuda.so.1')!r})\n_driver.cuInit(0)\n")
    with Kernel(startup=f"import sys\nsys.path.insert(0, {str(fake_driver)!r})\n"
                        "from notebook_launcher.config import resolve") as k:
        k.run("import my_gpu_lib")
        notes = k.value("resolve(lambda: 1, num_processes=2, device='cpu').notes")
        assert any("by a library other than torch (my_gpu_lib (imported here))" in note for note in notes), notes


def test_fork_on_gpus_after_another_library_initialized_the_driver_is_refused():
    env = Environment(gpu_count=2, cuda_initialized=False, platform="jupyter", cpu_count=2,
                      driver_initialized=True, driver_init_origin="jax (imported here)")
    from notebook_launcher.errors import LaunchConfigError

    with pytest.raises(LaunchConfigError, match=r"by a library other than torch \(jax \(imported here\)\).*'spawn'"):
        _start_method("fork", env, "cuda")
    assert _start_method("fork", env, "cpu") == ("fork", "")
    method, note = _start_method("auto", env, "cuda")
    assert method == "spawn" and "jax (imported here)" in note


def test_a_small_dev_shm_is_a_warning_with_the_fix_once(monkeypatch):
    import notebook_launcher.config as config

    monkeypatch.setattr(config, "_shm_warned", [])
    assert _shm_notes(2, "cuda", 2 * 2**30) == []                         # big enough
    assert _shm_notes(1, "cpu", 64 * 2**20) == []                         # one CPU worker: nothing to share
    note, = _shm_notes(2, "cuda", 64 * 2**20)
    assert "/dev/shm is only 64 MiB" in note and "--shm-size=2g" in note and "--ipc=host" in note
    assert "medium: Memory" in note and "set_sharing_strategy('file_system')" in note
    assert _shm_notes(2, "cuda", 64 * 2**20) == []                        # said once per process


def test_the_dev_shm_size_is_read_from_the_filesystem():
    from notebook_launcher.environment import shm_bytes

    stat = os.statvfs("/dev/shm")
    assert shm_bytes() == stat.f_blocks * stat.f_frsize > 0
    assert shm_bytes("/no/such/dir") is None


# ----------------------------------------------------------------- sessions
def test_a_session_cell_with_the_html_view_prints_its_lines_once_and_updates_one_display():
    with Kernel(startup="%load_ext notebook_launcher") as k:
        started = k.run("%dist start -n 2 --device cpu --display html", timeout=60)
        assert started.status == "ok", started.traceback
        cell = execute(k, """%%dist
import time
for step in progress(range(40), desc="cell"):
    report(step, loss=1.0 / (step + 1))
    if step % 10 == 0:
        print("cell step", step)
    time.sleep(0.03)
""")
        assert not cell.error(), cell.error()
        assert cell.text().count("[rank0]: cell step 30") == 1           # the cell's own prints, once
        assert not cell.of_type("comm_open", "comm_msg")
        live = display_ids(cell.messages, "display_data")[0]
        assert set(display_ids(cell.messages, "update_display_data")) == {live}
        final = cell.of_type("update_display_data")[-1]["content"]["data"]["text/html"]
        assert "✔ succeeded" in final and "40/40" in final and "cell step" not in final   # lines not repeated
        assert k.run("%dist stop").status == "ok"
        assert not k.wait_no_descendants()
