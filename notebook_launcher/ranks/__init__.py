"""How ranks are started, behind one interface (`base.RankGroup`); `start_group` picks the engine.

- no ``cluster``: ranks forked (or spawned) from this process (`local.LocalRanks`), on
  a rendezvous this process hosts, or (several machines started by hand) node 0's;
- ``cluster="ray"`` / `RayCluster`: one node agent per Ray node (`ray_engine`);
- ``cluster="slurm"`` / `SlurmCluster`: one node agent per node of a Slurm allocation,
  started by ``srun`` and dialing back (`slurm_engine`, `dial`).

Example::

    group = start_group(config, attempt=0, persistent=True)   # a session's ranks
    group.close(graceful=False, term_grace=0)
"""

from __future__ import annotations

import dataclasses
import linecache
from typing import Callable, Optional

from .. import channel as ch
from .. import rendezvous
from .base import Lines, RankGroup
from .plan import plan_for


def start_group(config, attempt: int, *, persistent: bool, first_task=None,
                last_words: Optional[Callable[[Lines], None]] = None) -> RankGroup:
    """Start one generation of ranks for a resolved `config.LaunchConfig`, from the calling
    thread; on any error everything started is released. ``first_task``: a one-shot
    launch's task (a `workers.tasks.Call`); a session's ranks wait for tasks instead."""
    if config.cluster is not None:
        request = first_request(first_task) if first_task is not None else None
        return _engine(config.cluster).start(config, attempt, persistent=persistent, first_request=request,
                                             last_words=last_words)
    from .local import LocalRanks

    config, rdzv = _meet(config, attempt)
    spawn = config.start_method == "spawn"
    request = first_request(first_task) if spawn and first_task is not None else None
    plan = plan_for(config, attempt, persistent, request,
                    rdzv_timeout=config.rdzv_timeout if config.num_nodes > 1 else None)
    extra = {} if last_words is None else {"last_words": last_words}
    try:
        return LocalRanks.start(plan, rdzv, config.start_method, first_task=first_task, **extra)
    except BaseException:
        rdzv.close()
        raise


def _engine(cluster):
    """The group class of a cluster engine, imported only when a launch needs it."""
    if cluster.kind == "ray":
        from .ray_engine import RayRanks

        return RayRanks
    from .slurm_engine import SlurmRanks

    return SlurmRanks


def first_request(task) -> ch.TaskRequest:
    """A one-shot task for ranks that did not fork from here: pickled by value, with the
    notebook's cells for their tracebacks."""
    from ..serialization import dumps_task

    return ch.TaskRequest(dumps_task(task), send_value=True, sources=notebook_sources())


def notebook_sources(skip: frozenset = frozenset()) -> dict:
    """Notebook cells known to linecache (they have no file: mtime None), except ``skip``.
    A rank that did not fork from this state needs them to show the notebook's own lines
    in its tracebacks."""
    return {name: entry for name, entry in list(linecache.cache.items())
            if len(entry) == 4 and entry[1] is None and name not in skip}


def _meet(config, attempt: int) -> tuple:
    """(config with this node's rank, the rendezvous its workers will use)."""
    if config.rdzv_backend == "c10d" and config.num_nodes > 1:
        rdzv = rendezvous.negotiate_c10d(
            f"{config.master_addr}:{config.port}", config.rdzv_id, config.num_nodes, config.nproc,
            config.rdzv_timeout, config.rdzv_conf, restart_count=attempt, max_restarts=config.max_restarts)
        return dataclasses.replace(config, node_rank=rdzv.node_rank), rdzv
    if config.node_rank == 0:
        return config, rendezvous.host_store(
            config.master_addr, config.world_size, port=config.port, bind_all=config.num_nodes > 1,
            restart_count=attempt, max_restarts=config.max_restarts)
    # Nodes other than 0 host nothing: their workers connect to node 0's store.
    return config, rendezvous.Rendezvous(config.master_addr, config.port, config.world_size, run_id="static",
                                         restart_count=attempt, max_restarts=config.max_restarts)
