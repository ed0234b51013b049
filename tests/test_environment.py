"""GPU facts from one place, and what initialized CUDA when a launch must use spawn.

There is no GPU here: the machine query (NVML / nvidia-smi) is replaced by a described
machine at its one seam (`environment._query_machine`), and CUDA's initialization by a
call of the hook torch would run (`torch.cuda._queued_calls`). Everything after those
seams runs for real: CUDA_VISIBLE_DEVICES parsing, the peer-to-peer answer, the `env`
report, the launch's NCCL settings and start-method note. scripts/gpu_check.py covers
the same on a GPU machine.
"""

from __future__ import annotations

import os
import textwrap
import traceback

import pytest
import torch

from kernel_harness import Kernel
from notebook_launcher import config as cfg
from notebook_launcher import diagnostics, environment
from notebook_launcher.environment import GpuInfo, GpuInventory, parse_visible_devices, visible_indices


# ----------------------------------------------------------------- CUDA_VISIBLE_DEVICES
@pytest.mark.parametrize("value, entries", [
    (None, None),                                   # unset: every GPU
    ("", ()), ("-1", ()), ("none", ()), (" ", ()),  # the usual ways to hide every GPU
    ("0,1", (0, 1)), (" 2 , 0 ", (2, 0)),           # spaces around entries do not matter
    ("1gpu2,3", (1, 3)),                            # read like strtoul: leading digits
    ("1,-1,2", (1,)), ("1,,2", (1,)),               # the list ends at the first invalid entry
    ("0,0", ()), ("1,0,1", ()),                     # a repeated entry hides every GPU
    ("GPU-8f3a,GPU-77", ("GPU-8f3a", "GPU-77")),
    (" GPU-8f3a , GPU-77 ", ("GPU-8f3a", "GPU-77")),
    ("GPU-8f3a,1", ("GPU-8f3a",)), ("0,GPU-8f3a", (0,)),  # the first entry sets the kind
    ("GPU-", ()), ("GPU-ab,GPU-ab", ()),
    ("MIG-5c1e", ("MIG-5c1e",)),
])
def test_cuda_visible_devices_parser(value, entries):
    assert parse_visible_devices(value) == entries


MACHINE = tuple(GpuInfo("NVIDIA A100", 8.0, i, f"GPU-{i}{i}aa-{i}", 81920) for i in range(4))


@pytest.mark.parametrize("value, indices", [
    (None, [0, 1, 2, 3]), ("3,1", [3, 1]), ("1,7,2", [1]), ("", []), ("-1", []),
    ("GPU-22", [2]), ("GPU-33aa-3,GPU-0", [3, 0]),
    ("GPU-1,GPU-11aa", []),        # one GPU named twice: none
    ("GPU-9", []),                  # no such GPU
    ("GPU-", []),
])
def test_visible_gpus_follow_indices_and_uuids(value, indices):
    assert visible_indices(MACHINE, value) == indices


def test_a_mig_instance_is_one_device_on_the_gpu_that_holds_it():
    gpus = (GpuInfo("A100", 8.0, 0, "GPU-0a"), GpuInfo("A100", 8.0, 1, "GPU-1b", mig_uuids=("MIG-77e", "MIG-78f")))
    assert visible_indices(gpus, "MIG-78f") == [1]
    assert visible_indices(gpus, "MIG-77e,MIG-78f") == [1]   # CUDA shows a process one MIG instance
    assert visible_indices(gpus, "MIG-000") == []
    lone = (GpuInfo("A100", 8.0, 0, "GPU-0a"),)                # MIG not listed: the only GPU holds it
    assert visible_indices(lone, "MIG-abc") == [0]


# ----------------------------------------------------------------- peer-to-peer
def inventory(visible, p2p) -> GpuInventory:
    return GpuInventory("nvml", "550", MACHINE, tuple(visible), p2p)


def test_p2p_answer():
    assert environment.p2p_supported(inventory([0, 1], {"0-1": True})) is True
    assert environment.p2p_supported(inventory([0, 1, 2], {"0-1": True, "0-2": False})) is False
    assert environment.p2p_supported(inventory([0, 1, 2], {"0-1": True, "0-2": True})) is None  # 1-2 unknown
    assert environment.p2p_supported(inventory([0], {})) is None
    assert environment.p2p_supported(inventory([], {})) is None


def test_p2p_pairs_from_nvidia_smi_matrix():
    matrix = textwrap.dedent("""\
                GPU0    GPU1    GPU2
         GPU0   X       OK      NS
         GPU1   OK      X       OK
         GPU2   NS      OK      X

        Legend:
          X    = Self
          OK   = Status Ok
          NS   = Not supported
    """)
    assert environment.parse_p2p_pairs(matrix) == {"0-1": True, "0-2": False, "1-2": True}
    assert environment.parse_p2p_matrix(matrix) is False


@pytest.mark.parametrize("visible, env_says, launch_disables", [
    (None, "2 of 3 pairs (launches set NCCL_P2P_DISABLE=1)", True),
    ("0,2", "all pairs", False),                  # the pair that cannot is hidden
    ("GPU-11,GPU-00", "none (launches set NCCL_P2P_DISABLE=1)", True),   # UUIDs count too
    ("2,1", "all pairs", False),
    ("1", "n/a (fewer than 2 GPUs)", False),
])
def test_env_report_and_launch_act_on_the_same_p2p_answer(monkeypatch, visible, env_says, launch_disables):
    machine = GpuInventory("nvml", "550", MACHINE[:3], p2p={"0-1": False, "0-2": True, "1-2": True})
    monkeypatch.setattr(environment, "_query_machine", lambda: machine)   # the NVML seam
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    for key in ("NCCL_P2P_DISABLE", "NCCL_IB_DISABLE"):
        monkeypatch.delenv(key, raising=False)

    text = diagnostics.format_report(diagnostics.collect())
    gpus = len(environment.gpu_inventory().visible)
    extra, _ = cfg._gpu_quirks(environment.detect(), "cuda", gpus, "fork")

    assert f"peer-to-peer:          {env_says}\n" in text
    assert ("NCCL_P2P_DISABLE=1 and NCCL_IB_DISABLE=1" in text) is launch_disables   # the hint
    assert ("NCCL_P2P_DISABLE" in extra) is launch_disables


def test_the_machine_query_here_finds_no_gpu_and_no_error():
    found = environment.gpu_inventory()
    assert found.gpus == () and found.visible == () and found.error == ""
    assert environment.cuda_device_count() == 0


# ----------------------------------------------------------------- who initialized CUDA
def _queued_hook():
    return next(call for call, _ in torch.cuda._queued_calls if call is environment._record_cuda_init)


def _initialize_cuda_here():
    _queued_hook()()   # what torch.cuda._lazy_init does with its queue, from this line


def test_the_first_cuda_initialization_names_the_line_that_caused_it(monkeypatch):
    monkeypatch.setattr(environment, "_first_cuda_init", [])
    assert environment.cuda_init_origin() == ""
    _initialize_cuda_here()
    origin = environment.cuda_init_origin()
    assert origin.endswith("test_environment.py:" + str(_initialize_cuda_here.__code__.co_firstlineno + 1)
                           + ": _queued_hook()()   # what torch.cuda._lazy_init does with its queue, from this line")
    _queued_hook()()    # a later initialization (e.g. another thread) does not replace the first
    assert environment.cuda_init_origin() == origin


def test_a_library_frame_is_named_with_the_user_line_that_called_it():
    site = "/usr/lib/python3.11/site-packages"
    stack = traceback.StackSummary.from_list([
        (f"{site}/ipykernel/kernelbase.py", 400, "dispatch", "await handler()"),
        ("/tmp/ipykernel_42/1234.py", 3, "<module>", "accelerator = Accelerator()"),
        (f"{site}/accelerate/state.py", 210, "__init__", "torch.cuda.set_device(self.device)"),
        (f"{environment._TORCH_DIR}cuda/__init__.py", 300, "_lazy_init", "queued_call()"),
    ])
    assert environment.describe_init_stack(stack) == (
        f"{site}/accelerate/state.py:210, called from /tmp/ipykernel_42/1234.py:3: accelerator = Accelerator()")
    assert environment.describe_init_stack(stack[:2] + stack[3:]) == \
        "/tmp/ipykernel_42/1234.py:3: accelerator = Accelerator()"


def test_imported_libraries_are_named_when_the_stack_is_not_known(monkeypatch):
    monkeypatch.setattr(environment, "_first_cuda_init", [])
    monkeypatch.setitem(__import__("sys").modules, "cupy", object())
    assert environment.cuda_init_origin().startswith("cupy (imported here; known to initialize CUDA")


def test_spawn_note_and_fork_refusal_name_the_cause():
    env = environment.Environment(1, True, "jupyter", 4, cuda_init_origin="cell In[3], line 2: x = t.cuda()")
    method, note = cfg._start_method("auto", env, "cuda")
    assert method == "spawn" and "(first by cell In[3], line 2: x = t.cuda())" in note
    with pytest.raises(Exception, match=r"first by cell In\[3\], line 2"):
        cfg._start_method("fork", env, "cuda")
    unknown = environment.Environment(1, True, "jupyter", 4)
    assert "import it first" in cfg._start_method("auto", unknown, "cuda")[1]


@pytest.mark.timeout(180)
def test_a_launch_after_cuda_was_initialized_in_a_cell_names_that_cell():
    # CUDA cannot be initialized without a GPU: the cell runs the hook torch would run
    # (from its line 3), and torch's own flag says "initialized", so the launch takes the
    # real spawn path and prints its note.
    with Kernel(startup="import torch\nfrom notebook_launcher import notebook_launcher, environment") as kernel:
        result = kernel.run(textwrap.dedent("""\
            hook = next(c for c, _ in torch.cuda._queued_calls if c is environment._record_cuda_init)
            torch.cuda._initialized = True
            hook()   # x = torch.ones(1, device="cuda") would run it from here
            try:
                value = notebook_launcher(lambda: 7, num_processes=1, device="cpu", display="none")
            finally:
                torch.cuda._initialized = False
            print("value", value)
        """), timeout=150)
        assert result.status == "ok", result.traceback + result.text
        assert "value 7" in result.stdout
        assert "CUDA is already initialized in this kernel (first by cell In[2], line 3: hook()" in result.stderr
        assert "so workers start with spawn instead of fork" in result.stderr


def test_outside_a_kernel_the_front_end_markers_do_not_count(monkeypatch):
    """A script started from a notebook (``!python train.py``) inherits Kaggle's or VS Code's
    variables, but its output is a text stream: the text view. (In a kernel each marker
    counts: tests/test_html_view_kernel.py.)"""
    from notebook_launcher.ui import resolve_display

    for key, value in (("KAGGLE_KERNEL_RUN_TYPE", "Interactive"), ("VSCODE_PID", "42"), ("JPY_SESSION_NAME", "x")):
        monkeypatch.setenv(key, value)
    assert environment.frontend() == "script" and resolve_display("auto") == "text"
    assert environment.detect().frontend == "script"


def test_the_driver_probe_reads_this_process_and_loads_nothing():
    libc = environment.loaded_library("libc.so")
    assert libc is not None and os.path.basename(libc).startswith("libc.so") and os.path.exists(libc)
    mapped_before = environment.loaded_library("libcuda.so")
    assert environment.cuda_driver_initialized() is False        # nothing initialized the driver in pytest
    assert environment.loaded_library("libcuda.so") == mapped_before   # the probe loaded no driver


def test_a_library_that_torch_itself_imported_is_not_named_as_the_drivers_initializer(monkeypatch):
    """torch 2.14's CUDA builds import cuda-python's bindings (``cuda``) at ``import torch``:
    in every such kernel, so naming it tells nothing (CI's second pass runs the real case)."""
    import sys
    import types

    bindings = types.ModuleType("cuda.bindings.driver")
    holder = types.ModuleType("torch._held_for_the_test")
    holder._driver = bindings
    monkeypatch.setitem(sys.modules, "cuda", types.ModuleType("cuda"))
    monkeypatch.setitem(sys.modules, "cuda.bindings.driver", bindings)
    monkeypatch.setitem(sys.modules, "torch._held_for_the_test", holder)
    monkeypatch.setitem(sys.modules, "cupy", types.ModuleType("cupy"))
    assert environment.driver_init_origin() == "cupy (imported here)"
    monkeypatch.delitem(sys.modules, "torch._held_for_the_test")
    assert environment.driver_init_origin() == "cupy, cuda (imported here)"
