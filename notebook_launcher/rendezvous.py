"""The rendezvous store and the torchrun environment contract.

The parent owns the `TCPStore` server (``TORCHELASTIC_USE_AGENT_STORE=True``), so every
worker connects as a client: there is no "who binds the port first" race, and user code
(or HF accelerate, or Lightning) that calls ``init_process_group()`` with env:// finds a
ready store. The listening socket is bound by us, on an OS-chosen port unless the user
named one, to the loopback interface unless the job spans machines. On a cluster, node
0's agent binds it and hands it to its first rank, which serves the store on it
(`serve_on`): an agent never imports torch.
"""

from __future__ import annotations

import datetime
import socket
import uuid
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Rendezvous:
    """Where the workers of one launch attempt meet. Close it when the attempt ends."""

    master_addr: str
    master_port: int
    world_size: int
    run_id: str
    restart_count: int = 0
    max_restarts: int = 0
    node_rank: int = 0
    store: Optional["torch.distributed.TCPStore"] = field(default=None, repr=False)
    handler: Optional[object] = field(default=None, repr=False)  # torch's c10d rendezvous handler
    listener: Optional[socket.socket] = field(default=None, repr=False)  # reserved port, not yet served

    def worker_env(self, rank: int, local_rank: int, local_world_size: int, group_rank: int) -> dict:
        """The environment variables torchrun would give this worker."""
        return {
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            "RANK": str(rank),
            "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(local_world_size),
            "GROUP_RANK": str(group_rank),
            "GROUP_WORLD_SIZE": str(self.world_size // local_world_size),
            "ROLE_RANK": str(rank),
            "ROLE_WORLD_SIZE": str(self.world_size),
            "ROLE_NAME": "default",
            "TORCHELASTIC_RUN_ID": self.run_id,
            "TORCHELASTIC_RESTART_COUNT": str(self.restart_count),
            "TORCHELASTIC_MAX_RESTARTS": str(self.max_restarts),
            "TORCHELASTIC_USE_AGENT_STORE": "True",
        }

    def serve(self, timeout: float = 300.0) -> None:
        """Start the TCPStore server on the reserved socket (call after forking workers)."""
        if self.listener is None:
            return  # another node hosts the store, or torch's rendezvous does
        self.store = serve_on(self.listener.fileno(), self.master_addr, self.master_port, timeout)
        self.listener.detach()  # the store owns (and will close) the socket now
        self.listener = None

    def close(self) -> None:
        """Shut the store server down and free its port."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        self.store = None  # the C++ destructor stops the server and closes the socket
        if self.handler is not None:
            self.handler.shutdown()
            self.handler = None


def host_store(
    master_addr: str,
    world_size: int,
    port: Optional[int] = None,
    bind_all: bool = False,
    restart_count: int = 0,
    max_restarts: int = 0,
    run_id: Optional[str] = None,
) -> Rendezvous:
    """Reserve the store's port in this process and describe how workers reach it.

    Only the listening socket exists until `Rendezvous.serve` (or, in a node agent, the
    first rank: `serve_on`) starts the TCPStore server:
    the server's thread must not run while workers are forked (a fork that catches it
    holding glibc's name-lookup lock leaves the worker frozen when it connects). Workers
    that connect before ``serve`` simply wait in the socket's backlog.

    ``port=None`` (or 0) lets the OS pick a free port. ``bind_all`` listens on every
    interface, needed only when workers on other machines must connect.

    Example::

        rdzv = host_store("127.0.0.1", world_size=2)
        env = rdzv.worker_env(rank=0, local_rank=0, local_world_size=2, group_rank=0)
        rdzv.serve()       # after the workers are forked
        rdzv.close()
    """
    listener = _listen(master_addr, port or 0, bind_all)
    return Rendezvous(
        master_addr=master_addr,
        master_port=listener.getsockname()[1],
        world_size=world_size,
        run_id=run_id or uuid.uuid4().hex[:12],
        restart_count=restart_count,
        max_restarts=max_restarts,
        listener=listener,
    )


def serve_on(listener_fd: int, master_addr: str, master_port: int, timeout: float = 300.0):
    """torch's TCPStore server on a socket already listening (`host_store` reserved it,
    here or in a node agent, whose first rank serves it); the store owns the fd from now on.

    Example::

        store = serve_on(rdzv.listener.fileno(), rdzv.master_addr, rdzv.master_port)
    """
    import torch.distributed as dist  # here: only a process that serves a store imports torch for it

    return dist.TCPStore(master_addr, master_port, None, True, timeout=datetime.timedelta(seconds=timeout),
                         wait_for_workers=False, master_listen_fd=listener_fd, use_libuv=True)


def _listen(master_addr: str, port: int, bind_all: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in master_addr else socket.AF_INET
    bind_host = ("::" if family == socket.AF_INET6 else "0.0.0.0") if bind_all else master_addr
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bind_host, port))
        sock.listen(1024)
    except OSError as exc:
        from .errors import LaunchConfigError  # here: a node agent imports this module without torch

        sock.close()
        if port:
            raise LaunchConfigError(
                f"use_port={port} is not available on {bind_host} ({exc.strerror}). "
                "Another run or program holds it: pick another port, or leave use_port=None "
                "to let the system choose a free one."
            ) from None
        raise LaunchConfigError(f"could not listen on {bind_host}: {exc.strerror}. Check master_addr.") from None
    return sock


def negotiate_c10d(endpoint: str, run_id: str, num_nodes: int, nproc: int, timeout: float,
                   conf: Optional[dict] = None, restart_count: int = 0, max_restarts: int = 0) -> Rendezvous:
    """Several machines through torch's own c10d rendezvous: the nodes agree on their node
    ranks (nobody passes node_rank), and torch hosts the store on the endpoint's machine.

    Example::

        rdzv = negotiate_c10d("10.0.0.5:29400", "job1", num_nodes=2, nproc=8, timeout=600)
        rdzv.node_rank   # 0 or 1, as the rendezvous decided
    """
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

    options = {"join_timeout": timeout, **(conf or {})}
    params = RendezvousParameters(backend="c10d", endpoint=endpoint, run_id=run_id, min_nodes=num_nodes,
                                  max_nodes=num_nodes, **options)
    handler = get_rendezvous_handler(params)
    try:
        info = handler.next_rendezvous()
    except BaseException as exc:
        handler.shutdown()
        if isinstance(exc, Exception) and "timeout" in type(exc).__name__.lower():
            raise TimeoutError(
                f"only some of the {num_nodes} nodes joined the c10d rendezvous at {endpoint} within "
                f"rdzv_timeout={timeout:g}s: start the same call on every node with the same "
                "rdzv_endpoint and rdzv_id."
            ) from None
        raise
    store_info = info.bootstrap_store_info
    return Rendezvous(
        master_addr=store_info.master_addr, master_port=store_info.master_port,
        world_size=info.world_size * nproc, run_id=run_id, restart_count=restart_count,
        max_restarts=max_restarts, node_rank=info.rank, handler=handler,
    )
