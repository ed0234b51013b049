"""CUDA paths of the launcher core, for a machine with at least one NVIDIA GPU.

Run: python scripts/gpu_check.py   (prints PASS/FAIL lines; exit status 1 if any failed)
CI has no GPU, so this is a script, not part of the test suite.
"""

from __future__ import annotations

import os
import re
import sys
import time

import torch
import torch.distributed as dist

from notebook_launcher import LaunchConfigError, WorkerError, notebook_launcher
from notebook_launcher import environment

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checks import check, verdict  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def nccl_all_reduce():
    t = torch.ones(4, device="cuda") * (dist.get_rank() + 1)
    dist.all_reduce(t)
    return {"sum": t, "device": str(t.device), "backend": dist.get_backend(),
            "current": torch.cuda.current_device(), "local_rank": os.environ["LOCAL_RANK"]}


def amp_step(dtype_name):
    dtype = getattr(torch, dtype_name)
    model = torch.nn.Linear(16, 4).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
    x = torch.randn(8, 16, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        out = model(x)
    loss = out.float().pow(2).mean()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    # an inf gradient must make the fp16 scaler skip the step
    skipped = None
    if dtype is torch.float16:
        before = model.weight.detach().clone()
        with torch.autocast("cuda", dtype=dtype):
            loss = (model(x) * float("inf")).float().mean()
        scaler.scale(loss).backward()
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped = torch.equal(before, model.weight.detach()) and scaler.get_scale() < scale
    return {"out_dtype": str(out.dtype), "skipped_inf_step": skipped}


def fail_on_gpu():
    torch.ones(1, device="cuda")
    raise ValueError("gpu worker failed on purpose")


def main() -> int:
    env = environment.detect()
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPUs visible: {env.gpu_count}")
    if env.gpu_count == 0:
        print("no CUDA GPU: skipped")
        return 0

    @check("environment.detect() does not initialize CUDA")
    def _():
        assert not torch.cuda.is_initialized()
        return f"gpu_count={env.gpu_count}"

    @check("NCCL, world size 1, fork; CUDA result comes back on CPU; parent CUDA untouched")
    def _():
        out = notebook_launcher(nccl_all_reduce, num_processes=1, display="none")
        assert out["backend"] == "nccl" and out["device"] == "cuda:0" and out["current"] == 0
        assert out["sum"].device.type == "cpu" and out["sum"].tolist() == [1.0] * 4
        assert not torch.cuda.is_initialized(), "the launch initialized CUDA in the parent"
        return out["backend"]

    @check("too many processes for the GPUs is refused")
    def _():
        try:
            notebook_launcher(nccl_all_reduce, num_processes=env.gpu_count + 1, display="none")
        except LaunchConfigError as exc:
            return str(exc)[:80]
        raise AssertionError("no error")

    for dtype in ("float16", "bfloat16"):
        @check(f"autocast {dtype} + GradScaler on CUDA inside a worker")
        def _(dtype=dtype):
            out = notebook_launcher(amp_step, args=(dtype,), num_processes=1, display="none")
            assert out["out_dtype"] == f"torch.{dtype}", out
            if dtype == "float16":
                assert out["skipped_inf_step"] is True, out
            return out

    @check("a failing GPU worker raises WorkerError and leaves nothing behind")
    def _():
        import psutil
        try:
            notebook_launcher(fail_on_gpu, num_processes=1, display="none")
        except WorkerError as err:
            assert err.rank == 0 and isinstance(err.__cause__, ValueError)
            assert psutil.Process().children(recursive=True) == [] or all(
                "resource_tracker" in " ".join(p.cmdline()) for p in psutil.Process().children(recursive=True))
            return str(err).splitlines()[0]
        raise AssertionError("no error")

    @check("CUDA initialized in a kernel cell: the launch's spawn note names that cell and line")
    def _():
        sys.path.insert(0, REPO)
        from benchmarks.kernel_runner import KernelRunner

        with KernelRunner("gpu-check") as kernel:
            kernel.execute("import torch\nfrom notebook_launcher import notebook_launcher")
            out = kernel.execute("x = torch.ones(1, device='cuda')\n"
                                 "print('value', notebook_launcher(lambda: 7, num_processes=1, display='none'))",
                                 timeout=300)
        assert out.ok, out.error
        assert "value 7" in out.stdout, out.stdout
        note = re.search(r"CUDA is already initialized in this kernel \(first by (cell In\[\d+\], line 1: "
                         r"x = torch.ones\(1, device='cuda'\))\)", out.stdout)
        assert note, out.stdout
        return note.group(1)

    # From here on CUDA is initialized in this (parent) process.
    torch.zeros(1, device="cuda")
    assert torch.cuda.is_initialized()

    @check("the first CUDA initialization of this process is named (file:line)")
    def _():
        origin = environment.cuda_init_origin()
        assert 'gpu_check.py' in origin and 'torch.zeros(1, device="cuda")' in origin, origin
        return origin

    @check("CUDA initialized in the parent: auto falls back to spawn and works")
    def _():
        t0 = time.monotonic()
        out = notebook_launcher(nccl_all_reduce, num_processes=1)
        assert out["backend"] == "nccl" and out["sum"].tolist() == [1.0] * 4
        return f"spawn launch took {time.monotonic() - t0:.1f}s"

    @check("CUDA initialized in the parent: forcing fork is refused with advice")
    def _():
        try:
            notebook_launcher(nccl_all_reduce, num_processes=1, start_method="fork", display="none")
        except LaunchConfigError as exc:
            assert "spawn" in str(exc)
            return str(exc)[:80]
        raise AssertionError("no error")

    return verdict()


if __name__ == "__main__":
    sys.exit(main())
