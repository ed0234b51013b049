"""The default process group of a worker.

It is ready before the user's function starts. Code written for torchrun calls
``init_process_group()`` itself; inside our workers that call must not fail with
"trying to initialize the default process group twice", so the worker's
`torch.distributed.init_process_group` becomes tolerant: a call compatible with the
group we made is a no-op, a call asking for another backend replaces our group.
"""

from __future__ import annotations

import datetime
import functools
import itertools
import os

ARRIVED_KEY = "notebook_launcher/arrived"
ALL_ARRIVED_KEY = "notebook_launcher/all_arrived"


def init_default_group(dist, backend: str, rank: int, world_size: int, device: str) -> None:
    original = dist.init_process_group
    dist.init_process_group = _tolerant(dist, original, {"backend": backend, "rank": rank, "world_size": world_size})
    original(backend=backend, init_method="env://", rank=rank, world_size=world_size)


def _tolerant(dist, original, ours: dict):
    regroups = itertools.count(1)

    @functools.wraps(original)
    def init_process_group(backend=None, *args, **kwargs):
        if dist.is_initialized():
            if not args and _asks_for_ours(backend, kwargs, ours):
                return None
            # Anything more (a timeout, pg_options, another backend) gets a new group.
            dist.destroy_process_group()
            if not args and kwargs.get("store") is None and kwargs.get("init_method") in (None, "env://"):
                kwargs = _fresh_rendezvous(dist, kwargs, ours, next(regroups))
        return original(backend, *args, **kwargs)

    init_process_group._notebook_launcher_original = original
    return init_process_group


def _fresh_rendezvous(dist, kwargs: dict, ours: dict, number: int) -> dict:
    """The env:// store still holds the old group's addresses: meet under a new prefix."""
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), None, False,
                           timeout=kwargs.get("timeout") or datetime.timedelta(minutes=5))
    fresh = {key: value for key, value in kwargs.items() if key != "init_method"}
    fresh.update(store=dist.PrefixStore(f"notebook_launcher/regroup/{number}", client),
                 rank=ours["rank"], world_size=ours["world_size"])
    return fresh


def _asks_for_ours(backend, kwargs: dict, ours: dict) -> bool:
    """True when the call would build exactly the group that already exists."""
    if backend is not None and str(backend).lower() != ours["backend"]:
        return False
    allowed = {"init_method": (None, "env://"), "rank": (None, -1, ours["rank"]),
               "world_size": (None, -1, ours["world_size"])}
    return all(key in allowed and value in allowed[key] for key, value in kwargs.items())


def wait_for_every_rank(world_size: int, timeout: float) -> None:
    """Multi-node: meet every other rank on node 0's store, or fail clearly after ``timeout``.

    torch's own rendezvous would wait for the default 30 minutes and then report a
    store timeout; a node that never started should instead be named as such.
    """
    import torch.distributed as dist

    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    limit = datetime.timedelta(seconds=timeout)
    try:
        store = dist.TCPStore(addr, port, None, False, timeout=limit)
    except (RuntimeError, dist.DistError) as exc:
        raise TimeoutError(
            f"could not reach the rendezvous store of node 0 at {addr}:{port} within "
            f"rdzv_timeout={timeout:g}s. Is node 0's launch running, with the same use_port, "
            f"and is {addr} reachable from here? ({exc})"
        ) from None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # a shared store outlives attempts
    arrived_key, all_arrived_key = f"{ARRIVED_KEY}/{attempt}", f"{ALL_ARRIVED_KEY}/{attempt}"
    if store.add(arrived_key, 1) == world_size:
        store.set(all_arrived_key, "1")
    try:
        store.wait([all_arrived_key], limit)
    except (RuntimeError, dist.DistError):
        arrived = store.add(arrived_key, 0)
        raise TimeoutError(
            f"only {arrived} of {world_size} ranks arrived within rdzv_timeout={timeout:g}s: "
            "a node is missing. Run the same call on every node with its own node_rank "
            "(0 .. num_nodes-1) and the same num_nodes, num_processes, master_addr and use_port."
        ) from None
