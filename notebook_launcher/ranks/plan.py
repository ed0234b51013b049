"""What one node's ranks are, as plain data: the rank layout and torchrun's environment.

A `NodePlan` is made in the notebook (`plan_for`) and is all a node needs to start its
ranks: the local engine uses it in this process, a node agent receives it over Ray or a
socket (so it holds no user object: the first task travels as a pickled `TaskRequest`;
only a local fork may hand the task object itself down, `make_spec`'s ``first_task``).

Ranks are node-major: node ``n`` holds ranks ``n * nproc .. n * nproc + nproc - 1``.

Example::

    plan = plan_for(config, attempt=0, persistent=True)
    plan.ranks              # [0, 1]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from .. import channel as ch
from ..workers.bootstrap import InheritedFds, WorkerSpec

FIRST_TASK = 1   # task id of a one-shot launch's task


@dataclass(frozen=True)
class NodePlan:
    node_rank: int
    nproc: int                     # ranks on this node
    world_size: int
    backend: str
    device_type: str               # "cpu" | "cuda"
    mixed_precision: str
    num_threads: int
    env: dict                      # set in every rank (threads, mixed precision, NCCL quirks...)
    persistent: bool               # a session's ranks (tasks until Shutdown) or a one-shot's (one task)
    restart_count: int = 0
    max_restarts: int = 0
    rdzv_timeout: Optional[float] = None   # several nodes: how long a rank waits for all to arrive
    first_request: Optional[ch.TaskRequest] = None   # the one-shot task, pickled (spawn, agents)
    value_ranks: frozenset = frozenset({0})          # ranks whose first-task value is wanted
    run_id: str = ""

    @property
    def first_rank(self) -> int:
        return self.node_rank * self.nproc

    @property
    def ranks(self) -> list:
        return list(range(self.first_rank, self.first_rank + self.nproc))

    def for_node(self, node_rank: int) -> "NodePlan":
        return dataclasses.replace(self, node_rank=node_rank)


def plan_for(config, attempt: int, persistent: bool, first_request: Optional[ch.TaskRequest] = None,
             node_rank: Optional[int] = None, rdzv_timeout: Optional[float] = None) -> NodePlan:
    """The plan of this node (or of ``node_rank``) for a resolved `config.LaunchConfig`."""
    env = {
        "OMP_NUM_THREADS": str(config.num_threads),
        "ACCELERATE_MIXED_PRECISION": config.mixed_precision,
        "NOTEBOOK_LAUNCHER_MIXED_PRECISION": config.mixed_precision,
        **config.extra_env,
    }
    if config.device_type == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"  # HF accelerate then sees MULTI_CPU, not one process
    value_ranks = frozenset(range(config.world_size)) if config.return_all else frozenset({0})
    return NodePlan(
        node_rank=config.node_rank if node_rank is None else node_rank, nproc=config.nproc,
        world_size=config.world_size, backend=config.backend, device_type=config.device_type,
        mixed_precision=config.mixed_precision, num_threads=config.num_threads, env=env,
        persistent=persistent, restart_count=attempt, max_restarts=config.max_restarts,
        rdzv_timeout=rdzv_timeout, first_request=first_request, value_ranks=value_ranks,
    )


def make_spec(plan: NodePlan, rdzv_env: dict, local_rank: int, fds: InheritedFds, *, parent_pid: int,
              stack_file: Optional[str], close_fds: tuple = (), first_task: Any = None) -> WorkerSpec:
    """One rank's `WorkerSpec`. ``rdzv_env``: torchrun's variables for this rank
    (`rendezvous.Rendezvous.worker_env`); ``first_task``: the one-shot task object itself,
    for a forked rank only (it inherits it, nothing is pickled)."""
    rank = plan.first_rank + local_rank
    env = {**plan.env, **rdzv_env}
    return WorkerSpec(
        rank=rank, local_rank=local_rank, world_size=plan.world_size, local_world_size=plan.nproc,
        backend=plan.backend, device=f"cuda:{local_rank}" if plan.device_type == "cuda" else "cpu",
        mixed_precision=plan.mixed_precision, restart_count=plan.restart_count,
        num_threads=plan.num_threads, env=env, fds=fds, parent_pid=parent_pid,
        persistent=plan.persistent, close_fds=close_fds, first_task=first_task,
        first_request=None if first_task is not None else plan.first_request, first_task_id=FIRST_TASK,
        send_result=rank in plan.value_ranks, stack_file=stack_file, rdzv_timeout=plan.rdzv_timeout,
    )
