"""Facts about this process (who, where, how precise) and the gradient-sync state.

`detect` answers "which rank am I, of how many, on which device" from, in order:
the launcher's worker context (inside `notebook_launcher`), an already initialized
`torch.distributed` group (torchrun, ``accelerate launch``), or nothing at all (a plain
process: world size 1). It never initializes CUDA and never creates a process group:
the launcher (or the user's own launcher) owns the group.

`GradientState` is the small mutable record shared by an `Accelerator`, its optimizers,
schedulers and data loaders: whether this micro-step syncs gradients, and where the
data loader being iterated is (last batch? how many real samples in it?).
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from .. import environment
from ..workers import context

MIXED_PRECISION = ("no", "fp16", "bf16")


class DistributedType(str, enum.Enum):
    """How the job is distributed. Compares equal to the same names in HF accelerate."""

    NO = "NO"
    MULTI_CPU = "MULTI_CPU"
    MULTI_GPU = "MULTI_GPU"


@dataclass(frozen=True)
class ProcessState:
    """Who this process is in the job. Plain data, read by every part of the toolkit."""

    process_index: int
    local_process_index: int
    num_processes: int
    local_num_processes: int
    device: torch.device
    backend: Optional[str]      # None when there is no process group (world size 1)
    in_worker: bool             # started by notebook_launcher

    @property
    def distributed_type(self) -> DistributedType:
        if self.num_processes == 1:
            return DistributedType.NO
        return DistributedType.MULTI_GPU if self.device.type == "cuda" else DistributedType.MULTI_CPU

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    @property
    def is_local_main_process(self) -> bool:
        return self.local_process_index == 0

    @property
    def use_distributed(self) -> bool:
        return self.num_processes > 1


def detect(cpu: bool = False) -> ProcessState:
    """This process's place in the job.

    Example::

        state = detect()
        state.num_processes, state.device    # (2, device(type='cpu')) in a CPU worker
    """
    ctx = context.current()
    if ctx is not None:
        return _from_worker(ctx, cpu)
    if dist.is_available() and dist.is_initialized():
        return _from_process_group(cpu)
    return _plain(cpu)


def _from_worker(ctx, cpu: bool) -> ProcessState:
    if ctx.world_size > 1 and not dist.is_initialized():
        raise RuntimeError(
            "The process group of this worker was destroyed before the Accelerator was created. "
            "Leave the group to the launcher (do not call destroy_process_group in the function)."
        )
    if cpu and ctx.device.startswith("cuda"):
        raise ValueError(
            "Accelerator(cpu=True) inside a GPU launch: the process group is nccl and needs GPU "
            "tensors. Launch on CPU instead: notebook_launcher(..., device='cpu')."
        )
    return ProcessState(
        process_index=ctx.rank, local_process_index=ctx.local_rank, num_processes=ctx.world_size,
        local_num_processes=ctx.local_world_size, device=torch.device(ctx.device),
        backend=ctx.backend if ctx.world_size > 1 else None, in_worker=True,
    )


def _from_process_group(cpu: bool) -> ProcessState:
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    backend = str(dist.get_backend())
    uses_gpu = "nccl" in backend and not cpu
    return ProcessState(
        process_index=rank, local_process_index=local_rank, num_processes=world,
        local_num_processes=int(os.environ.get("LOCAL_WORLD_SIZE", world)),
        device=torch.device("cuda", local_rank) if uses_gpu else torch.device("cpu"),
        backend=backend, in_worker=False,
    )


def _plain(cpu: bool) -> ProcessState:
    # device_count() asks NVML: no CUDA context is created just by looking.
    wants_cpu = cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    use_gpu = not wants_cpu and environment.cuda_device_count() > 0
    return ProcessState(
        process_index=0, local_process_index=0, num_processes=1, local_num_processes=1,
        device=torch.device("cuda", 0) if use_gpu else torch.device("cpu"), backend=None, in_worker=False,
    )


def default_mixed_precision() -> str:
    """What the launcher asked for (or ``accelerate launch``), else "no"."""
    ctx = context.current()
    if ctx is not None:
        return ctx.mixed_precision
    for name in ("NOTEBOOK_LAUNCHER_MIXED_PRECISION", "ACCELERATE_MIXED_PRECISION"):
        value = os.environ.get(name, "").strip().lower()
        if value:
            return value
    return "no"


def check_mixed_precision_name(value) -> str:
    name = "no" if value is None else str(value).lower()
    if name not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {', '.join(map(repr, MIXED_PRECISION))}, got {value!r}.")
    return name


# ----------------------------------------------------------------- gradient state
@dataclass
class LoaderPosition:
    """Where one running data-loader iteration is."""

    end: bool = False        # the batch just handed out is the last one
    remainder: int = -1      # real samples in the last global batch; -1 unknown, 0 none padded


@dataclass
class GradientState:
    """Shared by an Accelerator and the objects it prepared."""

    num_steps: int = 1
    sync_gradients: bool = True
    sync_with_dataloader: bool = True
    active: list = field(default_factory=list)   # LoaderPosition of each loader being iterated

    @property
    def end_of_dataloader(self) -> bool:
        return bool(self.active) and self.active[-1].end

    @property
    def remainder(self) -> int:
        return self.active[-1].remainder if self.active else -1
