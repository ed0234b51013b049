"""Row 3: training throughput of a small DDP model for a fixed number of steps.

Rank 0 times the training loop itself (after warm-up, between barriers), so launch
cost is excluded: what is left is what the launcher costs while training runs, e.g.
our ``report()`` calls and the parent rendering the dashboard on the same cores.
"""

from __future__ import annotations

from typing import Callable

from . import contenders
from ._timing import scratch, settle, stamps

# (label, contender, display, the function calls report()/progress())
VARIANTS = {
    "ours+dashboard": ("ours-fork", None, True),   # display: "widgets" in a kernel, "text" elsewhere
    "ours display=none": ("ours-fork", "none", True),
    "ours no report": ("ours-fork", "none", False),
    "accelerate": ("accelerate", "none", False),
    "lightning": ("lightning", "none", False),
    "torch-fork": ("torch-fork", "none", False),
}


def measure(variant: str, fn: Callable, nproc: int, steps: int, in_kernel: bool) -> dict:
    """Steps per second of ``fn`` (``workloads.train``) under ``variant``.

    Example::

        measure("ours display=none", workloads.train, 2, 300, False)  # {"steps_per_s": 410.0, ...}
    """
    name, display, use_report = VARIANTS[variant]
    if display is None:
        display = "widgets" if in_kernel else "text"
    settle()
    with scratch() as out_dir:
        contenders.launch(name, fn, out_dir, (steps, use_report), nproc, display=display)
        rates = stamps(out_dir, "rate")  # from a file: accelerate's launcher returns None
    if len(rates) != 1:
        raise RuntimeError(f"{variant}: rank 0 did not record its steps/s")
    return {"steps_per_s": rates[0], "display": display}
