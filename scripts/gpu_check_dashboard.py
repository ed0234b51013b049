"""GPU facts in the dashboard, out-of-memory errors and the CUDA-driver preflight (issue 23),
for a machine with at least one NVIDIA GPU.

Run: pip install nvidia-ml-py && python scripts/gpu_check_dashboard.py
(PASS/FAIL lines; exit status 1 if any failed). CI has no GPU, so this is a script, not part
of the test suite; the suite checks the same paths with stand-ins for the GPU's answers
(tests/test_html_view*.py). This process never initializes CUDA: every CUDA use is in a rank
or in a Jupyter kernel of its own. Checks:
- NVML figures sampled here (`gpu.NvmlSampler`, nvidia-ml-py): memory used/total and
  utilization per visible GPU, matching nvidia-smi; torch.cuda stays uninitialized here;
- a launch whose ranks each hold 1 GiB and compute: the run's state shows each rank's GPU
  with that memory in use, utilization above 0 at some sample, each rank's own peak, and no
  more than one NVML sample a second;
- the html dashboard in a real kernel on the GPUs: a GPU row per rank and the ranks' memory;
- a real out-of-memory error on the last rank: the WorkerError names the rank, its cuda:N
  and the GPU's name, the size that failed, the memory at peak, and what to try; the next
  launch works;
- fp16 with our Accelerator on CUDA: the GradScaler's loss scale and skipped steps (an inf
  step) reach the state; bf16 is refused before any process starts on a GPU without it;
- the CUDA driver initialized by a non-torch import (a module calling cuInit through
  ctypes; numba and cupy too when installed) in a kernel: the probe sees it while torch's
  flag does not; the launch switches to spawn, names the module, and runs on the GPU;
  start_method='fork' is refused.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from checks import check, verdict  # noqa: E402
from kernel_harness import Kernel  # noqa: E402

from notebook_launcher import LaunchConfigError, WorkerError, environment, notebook_launcher  # noqa: E402
from notebook_launcher.gpu import NvmlSampler  # noqa: E402

GiB = 2**30


def hold_and_compute(seconds):
    """Each rank holds 1 GiB and multiplies matrices for ``seconds``."""
    import torch.distributed as dist

    from notebook_launcher import report

    block = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    a = torch.randn(2048, 2048, device="cuda")
    end = time.monotonic() + seconds
    step = 0
    while time.monotonic() < end:
        a = (a @ a).tanh()
        torch.cuda.synchronize()
        report(step, norm=a.norm().item())
        step += 1
    del block
    return dist.get_rank()


def out_of_memory_on_last_rank():
    import torch.distributed as dist

    torch.ones(1, device="cuda")
    if dist.get_rank() == dist.get_world_size() - 1:
        free, total = torch.cuda.mem_get_info()
        keep = torch.empty(free // 2, dtype=torch.uint8, device="cuda")   # a peak to report
        torch.empty(total * 2, dtype=torch.uint8, device="cuda")          # more than the GPU has
        del keep
    time.sleep(60)


def fp16_steps(bad_steps):
    from notebook_launcher import Accelerator

    model = torch.nn.Linear(64, 1)
    accelerator = Accelerator()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.01))
    for step in range(12):
        loss = model(torch.randn(8, 64, device=accelerator.device)).float().pow(2).mean()
        if step in bad_steps:
            loss = loss * float("inf")
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    return accelerator.scaler.get_scale()


def smi_memory() -> dict:
    """nvidia-smi's memory.used and memory.total (MiB) per GPU index."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used,memory.total", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    rows = [[int(x) for x in line.split(",")] for line in out.strip().splitlines()]
    return {index: (used, total) for index, used, total in rows}


def main() -> int:
    env = environment.detect()
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPUs visible: {env.gpu_count}")
    if env.gpu_count == 0:
        print("no CUDA GPU: skipped")
        return 0
    nproc = min(env.gpu_count, 2)

    @check("NVML figures sampled in this process, matching nvidia-smi; CUDA untouched here")
    def _():
        samples = NvmlSampler().sample()
        assert samples, "nvidia-ml-py missing or NVML failed: pip install nvidia-ml-py"
        smi = smi_memory()
        for gpu in samples:
            used, total = smi[gpu.index]
            assert abs(gpu.total / 2**20 - total) <= 2, (gpu, total)
            assert abs(gpu.used / 2**20 - used) <= 256, (gpu, used)
            assert gpu.utilization is None or 0 <= gpu.utilization <= 100
        assert not torch.cuda.is_initialized() and not environment.cuda_driver_initialized()
        return ", ".join(f"GPU{g.index} {g.name} {g.used / GiB:.1f}/{g.total / GiB:.1f} GiB {g.utilization}%"
                         for g in samples)

    @check(f"{nproc} ranks holding 1 GiB each: GPU rows, utilization, each rank's peak in the run state")
    def _():
        run = notebook_launcher(hold_and_compute, args=(6.0,), num_processes=nproc, display="text", block=False)
        seen_used, seen_util = {}, set()
        while not run.done():
            for gpu in run.state.gpus:
                seen_used[gpu.index] = max(seen_used.get(gpu.index, 0), gpu.used)
                if gpu.utilization:
                    seen_util.add(gpu.index)
            time.sleep(0.2)
        assert run.result() == 0, run.error
        state = run.state
        used_by_ranks = environment.gpu_inventory().visible[:nproc]
        assert sorted(seen_used) == sorted(used_by_ranks), (seen_used, used_by_ranks)
        assert all(used >= GiB for used in seen_used.values()), seen_used
        assert seen_util, "utilization never above 0 while the ranks computed"
        for rank in range(nproc):
            stats = state.ranks[rank].device_stats
            assert stats is not None and stats.device == rank and stats.peak >= GiB, (rank, stats)
        return {rank: f"peak {state.ranks[rank].device_stats.peak / GiB:.2f} GiB" for rank in range(nproc)}

    @check("the html dashboard in a kernel on the GPUs: a GPU row per rank, the ranks' memory")
    def _():
        with Kernel(startup="import sys, time, torch\nfrom notebook_launcher import notebook_launcher\n"
                            f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
                            "from gpu_check_dashboard import hold_and_compute") as k:
            out = k.run(f"notebook_launcher(hold_and_compute, args=(4.0,), num_processes={nproc}, display='html')",
                        timeout=300)
            assert out.status == "ok", out.traceback
            frames = [d.get("text/html", "") for d in out.displays]
            live = [f for f in frames if "notebook-launcher-dashboard" in f]
            assert live, "no live frame"
            for index in environment.gpu_inventory().visible[:nproc]:
                assert f"<b>GPU {index}</b>" in live[-1], live[-1][-3000:]
            assert "GPU memory (peak)" in live[-1] and "cuda:0 · " in live[-1]
            assert k.value("__import__('torch').cuda.is_initialized()") is False
            return re.sub(r"<[^>]+>", " ", live[-1])[:300]

    @check("a real out-of-memory error on the last rank names it, its GPU, the size, the peak, what to try")
    def _():
        try:
            notebook_launcher(out_of_memory_on_last_rank, num_processes=nproc, display="none")
        except WorkerError as err:
            first = str(err).splitlines()[0]
            last = nproc - 1
            name = environment.gpu_inventory().visible_gpus[last].name
            assert err.rank == last, first
            assert f"CUDA out of memory on rank {last}, GPU cuda:{last} ({name}): tried to allocate" in first, first
            assert "allocated by this rank (peak" in first and "the GPU has" in first, first
            assert "What to try" in str(err) and "mixed_precision" in str(err)
            assert notebook_launcher(lambda: torch.ones(1, device="cuda").item(), num_processes=nproc,
                                     display="none") == 1.0
            return first
        raise AssertionError("no error")

    @check("fp16 on CUDA: the loss scale and the skipped steps reach the run state")
    def _():
        run = notebook_launcher(fp16_steps, args=((4, 8),), num_processes=1, mixed_precision="fp16",
                                display="none", block=False)
        scale = run.result(timeout=300)
        assert run.state.loss_scale == scale and run.state.skipped_steps >= 2, (run.state.loss_scale, scale)
        return f"scale {scale:g}, {run.state.skipped_steps} skipped"

    @check("bf16 on a GPU without it is refused before anything starts (else it runs)")
    def _():
        gpus = environment.gpu_inventory().visible_gpus
        if all(g.has_bf16 for g in gpus):
            return f"{gpus[0].name} has bf16: " + str(notebook_launcher(lambda: 1, num_processes=1,
                                                                        mixed_precision="bf16", display="none"))
        try:
            notebook_launcher(lambda: 1, num_processes=1, mixed_precision="bf16", display="none")
        except LaunchConfigError as exc:
            assert "fp16" in str(exc)
            return str(exc)[:100]
        raise AssertionError("bf16 was not refused")

    @check("the CUDA driver initialized by a non-torch import: spawn, the module named, the run on the GPU")
    def _():
        folder = tempfile.mkdtemp(prefix="nl-driver-")
        with open(os.path.join(folder, "cuinit_on_import.py"), "w") as module:
            module.write("import ctypes\n_driver = ctypes.CDLL('libcuda.so.1')\nassert _driver.cuInit(0) == 0\n")
        with Kernel(startup=f"import sys, torch\nsys.path.insert(0, {folder!r})\n"
                            "from notebook_launcher import environment, notebook_launcher") as k:
            before = k.value("environment.cuda_driver_initialized()")
            k.run("import cuinit_on_import")
            after = k.value("(environment.cuda_driver_initialized(), torch.cuda.is_initialized())")
            assert before is False and after == (True, False), (before, after)
            out = k.run("print('ON', notebook_launcher(lambda: torch.ones(1, device='cuda').device.type, "
                        "num_processes=1, display='none'))", timeout=300)
            assert out.status == "ok", out.traceback
            assert "ON cuda" in out.stdout, out.stdout
            note = ("The CUDA driver is already initialized in this kernel by a library other than torch "
                    "(cuinit_on_import (imported here)), so workers start with spawn")
            assert note in out.stderr, out.stderr
            fork = k.run("notebook_launcher(lambda: 1, num_processes=1, start_method='fork', display='none')")
            assert fork.ename == "LaunchConfigError" and "by a library other than torch" in fork.evalue, fork.evalue
        return note

    for library, code in (("numba", "from numba import cuda\ncuda.current_context()"),
                          ("cupy", "import cupy\ncupy.zeros(1)")):
        @check(f"{library} (when installed) initializing the driver is named in the spawn note")
        def _(library=library, code=code):
            with Kernel(startup="import torch\nfrom notebook_launcher import environment\n"
                                "from notebook_launcher.config import resolve") as k:
                if not k.value(f"__import__('importlib.util').util.find_spec({library!r}) is not None"):
                    return f"{library} not installed: skipped"
                ran = k.run(code, timeout=120)
                assert ran.status == "ok", ran.traceback
                notes = k.value("resolve(lambda: 1, num_processes=1).notes")
                assert any(f"by a library other than torch ({library}" in n for n in notes), notes
                return notes[0][:140]

    return verdict()


if __name__ == "__main__":
    sys.exit(main())
