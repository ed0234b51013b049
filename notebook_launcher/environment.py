"""Facts about where we run. Pure queries: nothing here initializes CUDA.

`torch.cuda.device_count()` asks NVML first (no CUDA context), which keeps a later
fork safe; `torch.cuda.is_available()` is avoided because it may create a context.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch

# Libraries that create a CUDA context as a side effect of being imported.
CUDA_ON_IMPORT_LIBRARIES = ("bitsandbytes", "cupy", "jax", "tensorflow", "numba.cuda", "pycuda.autoinit")


@dataclass(frozen=True)
class Environment:
    gpu_count: int             # visible CUDA devices (honours CUDA_VISIBLE_DEVICES)
    cuda_initialized: bool     # this process already holds a CUDA context
    platform: str              # "colab" | "kaggle" | "jupyter" | "ipython" | "python"
    cpu_count: int             # CPUs this process may run on
    gpus: tuple = field(default=())  # GpuInfo per visible GPU, from nvidia-smi (no CUDA context)

    @property
    def has_gpus(self) -> bool:
        return self.gpu_count > 0

    @property
    def in_notebook(self) -> bool:
        return self.platform in ("colab", "kaggle", "jupyter")


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: float  # e.g. 7.5 for a T4, 9.0 for an H100

    @property
    def has_bf16(self) -> bool:
        return self.compute_capability >= 8.0


def detect() -> Environment:
    count = cuda_device_count()
    return Environment(
        gpu_count=count,
        cuda_initialized=cuda_initialized(),
        platform=platform(),
        cpu_count=usable_cpu_count(),
        gpus=gpu_info() if count else (),
    )


def _nvidia_smi(*args: str, timeout: float = 10) -> Optional[str]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def gpu_info() -> tuple:
    """Name and compute capability of each visible GPU, without touching CUDA here."""
    out = _nvidia_smi("--query-gpu=name,compute_cap", "--format=csv,noheader")
    if not out:
        return ()
    gpus = [_parse_gpu_line(line) for line in out.strip().splitlines() if line.strip()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and all(part.strip().isdigit() for part in visible.split(",") if part.strip()):
        gpus = [gpus[int(i)] for i in visible.split(",") if i.strip() and int(i) < len(gpus)]
    return tuple(g for g in gpus if g is not None)


def _parse_gpu_line(line: str) -> Optional[GpuInfo]:
    name, _, cap = line.rpartition(",")
    try:
        return GpuInfo(name.strip(), float(cap))
    except ValueError:
        return None


def p2p_supported() -> Optional[bool]:
    """Whether every pair of GPUs can talk peer-to-peer (None: cannot tell).

    Kaggle's 2x T4 and many consumer cards cannot; NCCL then hangs or fails unless
    NCCL_P2P_DISABLE is set.
    """
    return parse_p2p_matrix(_nvidia_smi("topo", "-p2p", "r") or "")


def parse_p2p_matrix(text: str) -> Optional[bool]:
    cells = [cell for line in text.splitlines() if line.strip().startswith("GPU")
             for cell in line.split()[1:]]
    verdicts = [cell for cell in cells if cell in ("OK", "NS", "CNS", "TNS", "NA")]
    if not verdicts:
        return None
    return all(cell == "OK" for cell in verdicts)


def cuda_device_count() -> int:
    """Visible CUDA devices, asked of NVML or nvidia-smi: torch's own fallback,
    cudaGetDeviceCount, would initialize the driver here and spoil later forks."""
    if not torch.backends.cuda.is_built():
        return 0
    try:
        count = torch.cuda._device_count_nvml()
    except Exception:
        count = -1
    if count >= 0:
        return count
    if shutil.which("nvidia-smi"):
        return len(gpu_info())
    try:
        return torch.cuda.device_count()  # no NVML, no nvidia-smi: nothing safer left
    except Exception:  # broken driver: behave like a CPU machine
        return 0


def cuda_initialized() -> bool:
    return bool(torch.backends.cuda.is_built() and torch.cuda.is_initialized())


def usable_cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def ipython_shell() -> Optional[object]:
    """The running IPython shell, or None (never imports IPython itself)."""
    if "IPython" not in sys.modules:
        return None
    try:
        return sys.modules["IPython"].get_ipython()
    except Exception:
        return None


def in_jupyter_kernel() -> bool:
    shell = ipython_shell()
    return shell is not None and getattr(shell, "kernel", None) is not None


def platform() -> str:
    if "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ:
        return "colab"
    if any(key.startswith("KAGGLE_KERNEL") for key in os.environ):
        return "kaggle"
    if in_jupyter_kernel():
        return "jupyter"
    if ipython_shell() is not None:
        return "ipython"
    return "python"


def cuda_libraries_imported() -> list[str]:
    """Libraries known to create a CUDA context on import that are already imported."""
    return [name for name in CUDA_ON_IMPORT_LIBRARIES if name in sys.modules]
