"""GPU facts for the dashboard, sampled in the notebook process through NVML.

People cannot run ``nvidia-smi`` while a cell runs, and ``torch.cuda.mem_get_info`` in the
kernel would create a CUDA context there (and spoil every later fork). NVML, the driver's
management library, reads memory and utilization without any CUDA context. It is reached
through the ``nvidia-ml-py`` package (its module is ``pynvml``; the old ``pynvml``
package on PyPI is deprecated), imported only when a run's dashboard first asks.

Invariants:
- nothing here imports torch.cuda or calls the CUDA runtime or driver;
- NVML is asked at most once a second (`SAMPLE_INTERVAL`), from the thread that renders
  the run (the supervisor's), and a failing NVML is given up on for the process after
  saying nothing: a GPU fact is never worth a failed training run;
- where NVML or ``nvidia-ml-py`` is missing, or no GPU is visible, nothing is shown.

Example::

    feed = GpuFeed()
    feed.poll(state, now)        # state.gpus: (GpuUsage(0, "Tesla T4", used, total, 87), ...)
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Callable, Optional

from . import environment
from .state import GpuSampled, GpuUsage, RunState

SAMPLE_INTERVAL = 1.0   # seconds between two NVML samples, at least


class NvmlSampler:
    """Memory and utilization of the GPUs this process may use (CUDA_VISIBLE_DEVICES applied),
    through ``nvml`` (the ``pynvml`` module of nvidia-ml-py, or a stand-in with its API).

    ``open`` initializes NVML once; ``sample(count)`` reads the first ``count`` visible GPUs
    (None: all of them). Both return nothing rather than raise.
    """

    def __init__(self, nvml: Any = None) -> None:
        self._nvml = nvml
        self._handles: Optional[list] = None     # [(index, name, handle)] of visible GPUs, once open
        self.error = ""                          # why NVML is not used, once it failed
        self.missing_package = False             # ...because nvidia-ml-py is not installed
        self._lock = threading.Lock()            # two runs' supervisors (a block=False run and a cell)

    def open(self) -> bool:
        with self._lock:
            if self._handles is None and not self.error:
                try:
                    self._handles = self._visible_handles()
                except Exception as exc:   # no library, no driver, no nvidia-ml-py
                    self.error = f"{type(exc).__name__}: {exc}"
                    self.missing_package = isinstance(exc, ImportError)
            return bool(self._handles)

    def _visible_handles(self) -> list:
        nvml = self._nvml
        if nvml is None:
            import pynvml as nvml   # nvidia-ml-py

            self._nvml = nvml
        nvml.nvmlInit()
        gpus, handles = [], {}
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            handles[index] = handle
            gpus.append(environment.GpuInfo(_text(nvml.nvmlDeviceGetName(handle)), None, index,
                                            _text(nvml.nvmlDeviceGetUUID(handle))))
        names = {gpu.index: gpu.name for gpu in gpus}
        visible = environment.visible_indices(gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
        return [(index, names[index], handles[index]) for index in visible]

    def sample(self, count: Optional[int] = None) -> tuple:
        """A `GpuUsage` per visible GPU (the first ``count``); () when NVML is not there."""
        if not self.open():
            return ()
        nvml, out = self._nvml, []
        with self._lock:
            for index, name, handle in self._handles[:count]:
                try:
                    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                except Exception:
                    continue   # a GPU that fell off the bus: its row goes, the others stay
                out.append(GpuUsage(index, name, int(memory.used), int(memory.total), _utilization(nvml, handle)))
        return tuple(out)


def _utilization(nvml, handle) -> Optional[int]:
    try:
        return int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except Exception:   # not supported on this GPU (some MIG and vGPU setups)
        return None


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


_sampler: Optional[NvmlSampler] = None


def sampler() -> NvmlSampler:
    """This process's sampler (NVML is initialized once and kept: it holds no CUDA context)."""
    global _sampler
    if _sampler is None:
        _sampler = NvmlSampler()
    return _sampler


class GpuFeed:
    """Puts NVML's figures into a run's state, at most once every `SAMPLE_INTERVAL` seconds.

    Views call `poll` before they render (on the supervisor's thread); the state then
    carries the figures (`RunState.gpus`) and the views stay functions of the state. The
    GPUs shown are those the run uses (the first ``len(local_ranks)`` visible ones, one per
    rank) for a run on CUDA, and every visible one otherwise (a run on the CPU of a GPU
    machine). A CPU build of torch, or a machine whose NVML lists no GPU, shows none.

    Example::

        feed = GpuFeed()
        feed.poll(state)    # at most one NVML sample a second
    """

    def __init__(self, source: Optional[Callable[[], NvmlSampler]] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._source = source or sampler
        self.clock = clock
        self._last: Optional[float] = None
        self._off = False

    def poll(self, state: RunState) -> None:
        now = self.clock()
        if self._off or (self._last is not None and now - self._last < SAMPLE_INTERVAL):
            return
        self._last = now
        count = len(state.local_ranks) if state.device == "cuda" else None
        source = self._source()
        gpus = source.sample(count)
        if not gpus:
            self._off = not state.gpus   # nothing to show now and before: stop asking this run
            if state.device == "cuda" and getattr(source, "missing_package", False) and not _hinted:
                _hinted.append(True)
                print("notebook_launcher: pip install nvidia-ml-py to see each GPU's memory and utilization "
                      "in the dashboard.", file=sys.stderr)
            return
        state.apply(GpuSampled(gpus, now))


_hinted: list = []   # the missing nvidia-ml-py is said once per process


# ----------------------------------------------------------------- formatting
def format_bytes(count: Optional[int]) -> str:
    """``15.1 GiB``, ``812 MiB``; ``?`` when unknown."""
    if count is None:
        return "?"
    if count >= 2**30:
        return f"{count / 2**30:.1f} GiB"
    return f"{count / 2**20:.0f} MiB"
