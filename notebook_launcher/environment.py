"""Facts about where we run. Pure queries: nothing here initializes CUDA.

`torch.cuda.device_count()` asks NVML first (no CUDA context), which keeps a later
fork safe; `torch.cuda.is_available()` is avoided because it may create a context.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
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

    @property
    def has_gpus(self) -> bool:
        return self.gpu_count > 0

    @property
    def in_notebook(self) -> bool:
        return self.platform in ("colab", "kaggle", "jupyter")


def detect() -> Environment:
    return Environment(
        gpu_count=cuda_device_count(),
        cuda_initialized=cuda_initialized(),
        platform=platform(),
        cpu_count=usable_cpu_count(),
    )


def cuda_device_count() -> int:
    if not torch.backends.cuda.is_built():
        return 0
    try:
        return torch.cuda.device_count()
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
