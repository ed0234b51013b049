"""The worker toolkit: HF accelerate's `Accelerator` API, with real mixed precision.

Use it inside a function launched by `notebook_launcher` (it picks up the rank, the
device, the process group and the launcher's ``mixed_precision``) or in a plain
process, where it is a one-process job.

Example::

    from notebook_launcher import notebook_launcher
    from notebook_launcher.accelerator import Accelerator

    def train():
        accelerator = Accelerator()                      # fp16 because the launcher says so
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        for x, y in loader:
            with accelerator.accumulate(model):
                loss = loss_fn(model(x), y)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            accelerator.log({"loss": loss.item()})

    notebook_launcher(train, num_processes=2, mixed_precision="fp16")
"""

from .checkpointing import ProjectConfiguration
from .core import Accelerator
from .data import DataLoaderConfiguration, DataLoaderShard
from .rng import set_seed
from .state import DistributedType, GradientState, ProcessState
from .weights import load_weights
from .wrappers import AcceleratedOptimizer, AcceleratedScheduler

__all__ = [
    "Accelerator", "ProjectConfiguration", "DataLoaderConfiguration", "DistributedType", "set_seed",
    "AcceleratedOptimizer", "AcceleratedScheduler", "DataLoaderShard", "GradientState", "ProcessState",
    "load_weights",
]
