"""Options for running ranks on a cluster: ``notebook_launcher(..., num_nodes=M, cluster=...)``.

``cluster=None`` (the default) runs every rank on this machine, as always. A cluster is
named by a string (``"ray"``, ``"slurm"``) for its defaults, or given as one of these
objects (`RayCluster`, `SlurmCluster`) for options. They are plain data: checking them imports nothing; the engine
itself is imported only when a launch starts.

Example::

    from notebook_launcher import notebook_launcher, RayCluster
    notebook_launcher(train, num_processes=8, num_nodes=2,
                      cluster=RayCluster(address="ray://head:10001", runtime_env={"pip": ["timm"]}))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import LaunchConfigError

PLACEMENTS = ("spread", "pack")


@dataclass(frozen=True)
class RayCluster:
    """Ranks on a Ray cluster: one node agent per node, in one placement group.

    address: the cluster to connect to when this kernel is not connected yet (None:
        ``ray.init(address="auto")``, the cluster this machine belongs to).
    runtime_env: Ray's runtime environment for the agents (and so their ranks).
    resources_per_node: what one node's bundle reserves, e.g. ``{"CPU": 8, "GPU": 8}``
        (default: ``num_processes`` GPUs and one CPU on GPU jobs, one CPU on CPU jobs).
    placement: "spread" (one node per bundle, STRICT_SPREAD: the point of several nodes)
        or "pack" (bundles may share a node; for trying things out on one machine).
    """

    address: Optional[str] = None
    runtime_env: Optional[dict] = None
    resources_per_node: Optional[dict] = None
    placement: str = "spread"
    kind: str = field(default="ray", init=False)

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise LaunchConfigError(f"RayCluster(placement={self.placement!r}): choose 'spread' or 'pack'.")
        if self.resources_per_node is not None and not isinstance(self.resources_per_node, dict):
            raise LaunchConfigError("RayCluster(resources_per_node=...) must be a dict such as {'CPU': 4, 'GPU': 4}.")
        if self.runtime_env is not None and not isinstance(self.runtime_env, dict):
            raise LaunchConfigError("RayCluster(runtime_env=...) must be a dict, as ray.init takes it.")

    def describe(self) -> str:
        return "Ray"


@dataclass(frozen=True)
class SlurmCluster:
    """Ranks on a Slurm cluster: one node agent per node, started by ``srun --overlap``.

    Inside an allocation (``SLURM_JOB_ID`` set: ``salloc``, or a Jupyter job) it is used
    as it is; otherwise a holding job is submitted with ``sbatch`` with these options, and
    released (``scancel``) when the call or the session ends.

    partition, time, gpus_per_node, cpus_per_task, account: ``sbatch``'s options of those
        names (``cpus_per_task`` default: one per rank; ``time`` default one hour).
    sbatch_args: more ``sbatch`` options, e.g. ``("--qos=debug", "--constraint=a100")``.
    """

    partition: Optional[str] = None
    time: str = "1:00:00"
    gpus_per_node: Optional[int] = None
    cpus_per_task: Optional[int] = None
    account: Optional[str] = None
    sbatch_args: tuple = ()
    kind: str = field(default="slurm", init=False)

    def __post_init__(self) -> None:
        if isinstance(self.sbatch_args, str):
            raise LaunchConfigError("SlurmCluster(sbatch_args=...) is a tuple of options, e.g. ('--qos=debug',).")
        object.__setattr__(self, "sbatch_args", tuple(self.sbatch_args))
        for name in ("gpus_per_node", "cpus_per_task"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise LaunchConfigError(f"SlurmCluster({name}={value!r}) must be a positive whole number.")

    def describe(self) -> str:
        return "Slurm"


def as_cluster(cluster: Any) -> Any:
    """The options object for ``cluster`` (None stays None); raises `LaunchConfigError`."""
    if cluster is None:
        return None
    if isinstance(cluster, str):
        named = {"ray": RayCluster, "slurm": SlurmCluster}
        if cluster.lower() not in named:
            raise LaunchConfigError(f"unknown cluster={cluster!r}: choose 'ray' or 'slurm', or pass RayCluster(...) "
                                    "or SlurmCluster(...).")
        return named[cluster.lower()]()
    if isinstance(cluster, (RayCluster, SlurmCluster)):
        return cluster
    raise LaunchConfigError(f"cluster must be None, 'ray', 'slurm', RayCluster(...) or SlurmCluster(...), "
                            f"got {type(cluster).__name__}.")
