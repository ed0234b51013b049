"""Options for running ranks on a cluster: ``notebook_launcher(..., num_nodes=M, cluster=...)``.

``cluster=None`` (the default) runs every rank on this machine, as always. A cluster is
named by a string (``"ray"``, ``"slurm"``) for its defaults, or given as one of these
objects for options. They are plain data: checking them imports nothing; the engine
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


def as_cluster(cluster: Any) -> Any:
    """The options object for ``cluster`` (None stays None); raises `LaunchConfigError`."""
    if cluster is None:
        return None
    if isinstance(cluster, str):
        named = {"ray": RayCluster}
        if cluster.lower() not in named:
            raise LaunchConfigError(f"unknown cluster={cluster!r}: choose 'ray', or pass RayCluster(...).")
        return named[cluster.lower()]()
    if isinstance(cluster, RayCluster):
        return cluster
    raise LaunchConfigError(f"cluster must be None, 'ray' or a RayCluster(...), got {type(cluster).__name__}.")
