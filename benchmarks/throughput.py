"""Row 3: training throughput of a small DDP model for a fixed number of steps.

Rank 0 times the training loop itself (after warm-up, between barriers), so launch
cost is excluded: what is left is what the launcher costs while training runs, e.g.
our ``report()`` calls and the parent rendering the dashboard on the same cores.

Throughput on a shared 2-core machine moves by several percent from run to run, more
than the 2 % the dashboard may cost. So the parent's own CPU time during the loop is
measured too (all its threads, e.g. ipykernel's IOPub thread sending widget updates):
that is the dashboard's footprint, and on a machine whose cores are all busy training,
an upper bound of what it can take from the workers.
"""

from __future__ import annotations

from typing import Callable

from . import contenders
from ._timing import CPUTrace, scratch, settle, stamps

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

        measure("ours display=none", workloads.train, 2, 300, False)
        # {"steps_per_s": 110.0, "parent_cpu": 0.01, ...}: parent_cpu in cores (1.0 = one core)
    """
    name, display, use_report = VARIANTS[variant]
    if display is None:
        display = "widgets" if in_kernel else "text"
    settle()
    with scratch() as out_dir:
        with CPUTrace() as cpu:
            contenders.launch(name, fn, out_dir, (steps, use_report), nproc, display=display)
        rates = stamps(out_dir, "rate")  # from a file: accelerate's launcher returns None
        starts = stamps(out_dir, "loop")
    if len(rates) != 1 or len(starts) != 1:
        raise RuntimeError(f"{variant}: rank 0 did not record its steps/s")
    loop_seconds = steps / rates[0]
    return {"steps_per_s": rates[0], "display": display,
            "parent_cpu": cpu.used(starts[0], starts[0] + loop_seconds) / loop_seconds}
