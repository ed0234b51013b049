"""The default process group of a worker.

It is ready before the user's function starts. Code written for torchrun calls
``init_process_group()`` itself; inside our workers that call must not fail with
"trying to initialize the default process group twice", so the worker's
`torch.distributed.init_process_group` becomes tolerant: a call compatible with the
group we made is a no-op, a call asking for another backend replaces our group.
"""

from __future__ import annotations

import functools


def init_default_group(dist, backend: str, rank: int, world_size: int, device: str) -> None:
    original = dist.init_process_group
    dist.init_process_group = _tolerant(dist, original, backend)
    original(backend=backend, init_method="env://", rank=rank, world_size=world_size)


def _tolerant(dist, original, our_backend: str):
    @functools.wraps(original)
    def init_process_group(backend=None, *args, **kwargs):
        if dist.is_initialized():
            wanted = str(backend).lower() if backend is not None else None
            if wanted in (None, our_backend) and not args and _compatible(kwargs):
                return None
            dist.destroy_process_group()
        return original(backend, *args, **kwargs)

    init_process_group._notebook_launcher_original = original
    return init_process_group


def _compatible(kwargs: dict) -> bool:
    # Only the env:// rendezvous we already used is compatible; anything else the user
    # asked for explicitly (a store, a file:// init method) gets a group of its own.
    init_method = kwargs.get("init_method")
    return kwargs.get("store") is None and init_method in (None, "env://")
