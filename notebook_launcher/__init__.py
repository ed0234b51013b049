"""notebook_launcher: multi-GPU / multi-CPU PyTorch training from a Jupyter cell.

Public API:

- `notebook_launcher(function, args=(), num_processes=None, ...)`: run ``function`` in
  one worker per GPU (or 2 CPU workers), with the process group ready, and return rank
  0's result. Drop-in for HF accelerate's ``notebook_launcher``.
- `report(step=None, **metrics)` and `progress(iterable)`: called inside the function,
  they feed the live dashboard; outside a worker they are harmless no-ops.
- `Accelerator`, `ProjectConfiguration`: the training toolkit for inside the function,
  with HF accelerate's API (prepare, backward, autocast, accumulate, gather_for_metrics,
  save_state/load_state, ...) and the launcher's ``mixed_precision`` really applied.
- `Run`: the handle ``notebook_launcher(..., block=False)`` returns.
- `Session(num_processes, ...)`: ranks that stay alive across cells, with the process
  group formed once: ``session.run(fn, *args)``, ``session.execute(source)`` (each rank
  keeps its own namespace), ``session.pull(name)``, ``session.push(**values)``.
- ``%load_ext notebook_launcher``: the ``%dist`` / ``%%dist`` magics over a `Session`.
- `WorkerError`: raised in the cell when a worker fails; names the rank that failed
  first and carries its traceback. A subclass of torch's ``ChildFailedError``.
- `LaunchConfigError`: bad arguments, raised before any process starts.
- `RayCluster(...)`, `SlurmCluster(...)`: options for ``cluster=``: ranks on several nodes
  of a Ray or Slurm cluster, from one call
  (``notebook_launcher(fn, num_processes=P, num_nodes=M, cluster="ray")`` or ``"slurm"``).

Example::

    import torch, torch.distributed as dist
    from notebook_launcher import notebook_launcher

    def train(scale):
        t = torch.ones(1) * scale * (dist.get_rank() + 1)
        dist.all_reduce(t)
        return t.item()

    notebook_launcher(train, args=(10,), num_processes=2)   # 30.0
"""

import importlib

# The public names, imported on first use: `import notebook_launcher` stays light, so that a
# node agent on a cluster (`ranks.agent`) starts without importing torch before its ranks do.
_PUBLIC = {
    "notebook_launcher": ".api", "report": ".reporting", "progress": ".reporting",
    "Accelerator": ".accelerator", "ProjectConfiguration": ".accelerator", "Run": ".run",
    "Session": ".session", "SessionStatus": ".session", "WorkerError": ".errors",
    "LaunchConfigError": ".errors", "RayCluster": ".clusters", "SlurmCluster": ".clusters",
}


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_PUBLIC))


__all__ = ["notebook_launcher", "report", "progress", "Accelerator", "ProjectConfiguration", "Run",
           "Session", "SessionStatus", "WorkerError", "LaunchConfigError", "RayCluster", "SlurmCluster"]


def load_ipython_extension(ipython) -> None:
    """``%load_ext notebook_launcher`` registers the ``%dist`` / ``%%dist`` magics."""
    from .magics import load_ipython_extension as load

    load(ipython)
__version__ = "0.1.0"
