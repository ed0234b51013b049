"""A persistent session on GPUs, for a machine with at least one NVIDIA GPU.

Run: python scripts/gpu_check_session.py   (PASS/FAIL lines; exit status 1 if any failed)
CI has no GPU, so this is a script, not part of the test suite. It checks, from a real
Jupyter kernel (fork from ipykernel, as people use it):
- `%dist start` on every GPU (nccl): each rank pinned to its own device, a model kept on
  the GPU across cells, an all_reduce on CUDA tensors, `%dist pull` bringing a CUDA tensor
  back to the notebook on the CPU without initializing CUDA in the kernel;
- the GPU memory the ranks hold (nvidia-smi, per pid) is freed by `%dist stop`, and the
  rank processes are gone;
- a broken session (a rank killed) frees its memory too, and the next cell restarts it;
- with CUDA already initialized in the kernel, the session starts with spawn and works;
- on NCCL (2 GPUs or more; skipped on one, since NCCL refuses two ranks on one device): a
  rank that raises before an all_reduce its peer waits in keeps the session (the peer is
  released, the group rebuilt, the next cell's all_reduce works on the old tensors); a rank
  that never issues an all_reduce its peer issued and waits on (NCCL returns at once) is
  named by the roll-call and blamed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

from kernel_harness import Kernel, pids_alive  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checks import check, verdict  # noqa: E402



def gpu_memory_by_pid() -> dict:
    """pid -> MiB used, from nvidia-smi (never CUDA in this process)."""
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30).stdout
    used = {}
    for line in out.strip().splitlines():
        pid, mib = (part.strip() for part in line.split(","))
        used[int(pid)] = used.get(int(pid), 0) + int(mib)
    return used


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def ok(kernel: Kernel, code: str, timeout: float = 300):
    result = kernel.run(textwrap.dedent(code), timeout=timeout)
    assert result.status == "ok", result.traceback + result.stderr
    return result


STARTUP = "import torch\n%load_ext notebook_launcher"


@check("session on every GPU: state kept on the device across cells, memory freed by %dist stop")
def session_memory_is_freed():
    with Kernel(startup=STARTUP) as kernel:
        ok(kernel, "%dist start --display none")
        pids = [p.pid for p in kernel.descendants()]
        assert pids, "no ranks started"
        ok(kernel, "%%dist\nbig = torch.empty(512 * 2**20, dtype=torch.uint8, device=device)  # 512 MiB each\n"
                   "model = torch.nn.Linear(1024, 1024).to(device)")
        out = ok(kernel, "%%dist\nt = torch.ones(1, device=device) * (rank + 1)\ndist.all_reduce(t)\n"
                         "(torch.cuda.current_device(), dist.get_backend(), t.item(), big.device.index)")
        used = gpu_memory_by_pid()
        holding = {pid: used.get(pid, 0) for pid in pids}
        assert all(mib >= 512 for mib in holding.values()), holding
        pulled = ok(kernel, "%dist pull model\nprint(next(model.parameters()).device, torch.cuda.is_initialized())")
        assert pulled.stdout.strip() == "cpu False", pulled.stdout
        ok(kernel, "%dist stop")
        freed = wait_until(lambda: not set(gpu_memory_by_pid()) & set(pids), 15)
        assert freed and pids_alive(pids) == [], (gpu_memory_by_pid(), pids_alive(pids))
        return f"ranks {out.stdout.strip().splitlines()}; held {holding} MiB, all freed after %dist stop"


@check("a broken session frees its GPU memory; the next cell restarts it")
def broken_session_frees_memory():
    with Kernel(startup=STARTUP) as kernel:
        ok(kernel, "%dist start --display none")
        old = [p.pid for p in kernel.descendants()]
        ok(kernel, "%%dist\nbig = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)")
        kernel.run("%%dist\nimport os\nif rank == 0:\n    os._exit(9)\ndist.barrier()")
        assert wait_until(lambda: not set(gpu_memory_by_pid()) & set(old), 15), gpu_memory_by_pid()
        again = ok(kernel, "%%dist\nprint('fresh', rank, 'big' in globals())")
        assert "starting fresh ranks" in again.stderr and "fresh 0 False" in again.stdout
        ok(kernel, "%dist stop")
        return "memory freed, session restarted"


@check("CUDA initialized in the kernel: the session starts with spawn and works on the GPUs")
def session_after_cuda_init():
    with Kernel(startup=STARTUP) as kernel:
        ok(kernel, "x = torch.ones(1, device='cuda')")
        started = ok(kernel, "%dist start --display none", timeout=600)
        assert "spawn" in started.stdout + started.stderr, started.stdout + started.stderr
        out = ok(kernel, "%%dist\nt = torch.ones(1, device=device)\ndist.all_reduce(t)\nt.item()")
        ok(kernel, "%dist stop")
        return out.stdout.strip().replace("\n", " | ")


def gpu_count() -> int:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    return sum(line.startswith("GPU ") for line in out.splitlines())


@check("NCCL: a rank failing before an all_reduce its peer waits in keeps the session and its tensors")
def nccl_failed_collective_keeps_the_session():
    if gpu_count() < 2:
        return f"SKIPPED: needs 2 GPUs, found {gpu_count()}"
    with Kernel(startup=STARTUP) as kernel:
        ok(kernel, "%dist start -n 2 --display none")
        pids = sorted(p.pid for p in kernel.descendants())
        ok(kernel, "%%dist\nkept = torch.ones(1, device=device) * (rank + 1)")
        began = time.monotonic()
        failed = kernel.run("%%dist\nif rank == 1:\n    raise ValueError('bad shard')\n"
                            "t = kept.clone()\ndist.all_reduce(t)\ntorch.cuda.synchronize()\nt.item()", timeout=120)
        took = time.monotonic() - began
        assert failed.ename == "WorkerError" and "rank 1 failed: ValueError: bad shard" in failed.traceback, failed.traceback
        assert "released: rank 1 failed" in failed.traceback, failed.traceback
        assert ok(kernel, "%dist status").stdout.startswith("idle")
        after = ok(kernel, "%%dist\nt = kept.clone()\ndist.all_reduce(t)\nt.item()")
        assert "Out[rank 0]: 3.0" in after.stdout and "Out[rank 1]: 3.0" in after.stdout, after.stdout
        assert sorted(p.pid for p in kernel.descendants()) == pids
        ok(kernel, "%dist stop")
        return f"recovered in {took:.1f}s; the same ranks; the next all_reduce gave 3.0"


@check("NCCL: a rank that never issues an all_reduce is named by the roll-call and blamed")
def nccl_roll_call():
    if gpu_count() < 2:
        return f"SKIPPED: needs 2 GPUs, found {gpu_count()}"
    with Kernel(startup=STARTUP) as kernel:
        out = ok(kernel, """
            from notebook_launcher import Session, WorkerError
            session = Session(2, display="none", stall_timeout=5, on_stall="raise")
            try:
                session.execute("import time\\nt = torch.ones(1, device=device)\\nif rank == 1:\\n    time.sleep(120)\\n"
                                "dist.all_reduce(t)\\ntorch.cuda.synchronize()")
            except WorkerError as error:
                print("BLAMED", error.rank)
                print(error)
            session.close()
        """, timeout=300).stdout
        assert "BLAMED 1" in out and "is waiting for rank 1" in out, out
        return next(line for line in out.splitlines() if "is waiting for rank 1" in line)[-200:]


if __name__ == "__main__":
    sys.exit(verdict())
