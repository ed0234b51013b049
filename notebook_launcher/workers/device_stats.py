"""A rank's own device facts: its CUDA memory and its fp16 grad scaler, sent to the
notebook (`channel.DeviceStats`), and what an out-of-memory error on it means.

The notebook samples whole GPUs through NVML (`gpu`); only the rank knows what torch
allocated in it, and at its peak. A thread of the rank's own looks once a second and
posts when something changed (so a rank whose figures stand still, stuck or idle, sends
nothing, and these posts are never taken as a sign of life), and the task's end posts
the last figures before its result, so a summary shows the final peak.

Invariants:
- nothing here initializes CUDA: torch's memory statistics are read only once this rank
  initialized CUDA itself (`torch.cuda.is_initialized`), and are empty before;
- the scaler's facts come from `accelerator.precision` only when that module was
  imported (by our `Accelerator`): this never imports it.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from typing import Callable, Optional

from .. import channel as ch

INTERVAL = 1.0   # seconds between two looks

_TRIED = re.compile(r"[Tt]ried to allocate ([\d.]+) ?([KMGT]i?B|bytes)")
_UNITS = {"bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
          "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def current(t: Optional[float] = None) -> Optional[ch.DeviceStats]:
    """This rank's figures now, or None when it has none (no CUDA used yet, no scaler)."""
    memory = _cuda_memory()
    scale, skipped = _scaler_facts()
    if memory is None and scale is None:
        return None
    device, allocated, peak, reserved = memory or (None, None, None, None)
    return ch.DeviceStats(device, allocated, peak, reserved, time.monotonic() if t is None else t,
                          loss_scale=scale, skipped_steps=skipped)


def _cuda_memory() -> Optional[tuple]:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    try:
        device = torch.cuda.current_device()
        return (device, torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device),
                torch.cuda.memory_reserved(device))
    except Exception:   # a device in a bad state: the figures are not worth an error here
        return None


def _scaler_facts() -> tuple:
    precision = sys.modules.get("notebook_launcher.accelerator.precision")
    if precision is None:
        return None, None
    return precision.scaler_facts()


class Poster:
    """Posts `current` figures when they changed (the time stamp aside)."""

    def __init__(self, post: Callable[[ch.DeviceStats], None]) -> None:
        self._post = post
        self._last: Optional[tuple] = None

    def __call__(self) -> None:
        stats = current()
        if stats is None:
            return
        key = (stats.device, stats.allocated, stats.peak, stats.reserved, stats.loss_scale, stats.skipped_steps)
        if key != self._last:
            self._last = key
            self._post(stats)


def start(post: Callable[[ch.DeviceStats], None]) -> Poster:
    """Start the thread that posts this rank's figures; returns the poster, which the task's
    end calls once more (`Poster.__call__`)."""
    poster = Poster(post)

    def loop() -> None:
        while True:
            time.sleep(INTERVAL)
            try:
                poster()
            except Exception:   # the channel's pipe is gone: the watchdog ends this process
                return

    threading.Thread(target=loop, name="notebook_launcher-device-stats", daemon=True).start()
    return poster


# ----------------------------------------------------------------- out of memory
def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA out-of-memory error (torch's ``OutOfMemoryError``, or a RuntimeError that says so)."""
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)


def tried_bytes(message: str) -> Optional[int]:
    """The size that failed, from torch's message ("Tried to allocate 2.00 GiB")."""
    found = _TRIED.search(message)
    if found is None:
        return None
    return int(float(found.group(1)) * _UNITS[found.group(2)])


def explain_out_of_memory(exc: BaseException, rank: int, mixed_precision: str = "no") -> str:
    """One line for the `WorkerError`: the rank, its GPU, what it had and what failed.

    Example::

        explain_out_of_memory(exc, 1)
        # "CUDA out of memory on rank 1, GPU cuda:1 (Tesla T4): tried to allocate 2.00 GiB
        #  with 13.1 GiB allocated by this rank (peak 13.9 GiB, 13.5 GiB reserved);
        #  the GPU has 14.6 GiB, 0.1 GiB free"
    """
    from ..gpu import format_bytes

    torch = sys.modules.get("torch")
    tried = tried_bytes(str(exc))
    parts = [f"CUDA out of memory on rank {rank}"]
    gpu, device = "", None
    memory = _cuda_memory()
    if memory is not None:
        device = memory[0]
        try:
            gpu = f", GPU cuda:{device} ({torch.cuda.get_device_name(device)})"
        except Exception:
            gpu = f", GPU cuda:{device}"
    parts.append(gpu + ":")
    parts.append(f" tried to allocate {format_bytes(tried)}" if tried is not None else " an allocation failed")
    if memory is not None:
        _, allocated, peak, reserved = memory
        parts.append(f" with {format_bytes(allocated)} allocated by this rank (peak {format_bytes(peak)}, "
                     f"{format_bytes(reserved)} reserved)")
        total = _device_total(torch, device)
        if total is not None:
            free, whole = total
            parts.append(f"; the GPU has {format_bytes(whole)}, {format_bytes(free)} free")
    if mixed_precision != "no":
        parts.append(f" [mixed_precision={mixed_precision}]")
    return "".join(parts)


def _device_total(torch, device: int) -> Optional[tuple]:
    """(free, total) bytes of the whole GPU, asked in the rank (it already has a context)."""
    try:
        return torch.cuda.mem_get_info(device)
    except Exception:
        return None
