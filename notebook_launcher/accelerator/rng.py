"""Random number generator states: seeding, capturing and restoring them.

Each rank has its own streams (dropout masks differ per rank), so each rank saves and
restores its own: python's `random`, numpy's global generator (when numpy is there),
torch's CPU generator and, on a GPU, the generator of this rank's device.
"""

from __future__ import annotations

import random
from typing import Optional

import torch

try:
    import numpy as np
except ImportError:  # numpy is optional
    np = None


def set_seed(seed: int, device_specific: bool = False) -> None:
    """Seed python, numpy and torch (every GPU too, without creating a CUDA context early).

    With ``device_specific`` each rank gets ``seed + rank``.

    Example::

        set_seed(42)
    """
    if device_specific:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            seed += dist.get_rank()
    random.seed(seed)
    if np is not None:
        np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device lazily


def capture(device: Optional[torch.device] = None) -> dict:
    """This process's generator states, as plain picklable data."""
    states = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if np is not None:
        states["numpy"] = np.random.get_state()
    if device is not None and device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore(states: dict, device: Optional[torch.device] = None) -> None:
    """Put back states made by `capture`."""
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if np is not None and "numpy" in states:
        np.random.set_state(states["numpy"])
    if device is not None and device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)
