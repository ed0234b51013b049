"""The default process group of a worker.

It is ready before the user's function starts. Code written for torchrun calls
``init_process_group()`` itself; inside our workers that call must not fail with
"trying to initialize the default process group twice", so the worker's
`torch.distributed.init_process_group` becomes tolerant: a call compatible with the
group we made is a no-op, a call asking for another backend replaces our group.

A session survives a failed collective by aborting the group and forming a fresh one:

- `abort` (the rank's control thread runs it, whatever its main thread is doing):
  ``_abort_process_group`` (NCCL's communicators abort; gloo's group only stops taking
  work: its connections close when the group is destroyed, and a DDP wrapper, a user's
  variable or the blocked call's own frame keep it alive), then this rank shuts down the
  TCP connections its process-group listeners accepted (`_cut_connections`): every
  connection between two ranks was accepted by one of them, so once every rank did it,
  every collective blocked on either end fails at once ("Connection closed by peer");
- `Regroup` (a task every rank runs, in its main thread, once the call has ended): the
  same ranks, backend and devices meet again under a fresh store prefix, the journal
  starts new numbers, and DDP wrappers of the rank's namespace (and ``__main__``) that
  held the old group are moved to the new one (``_update_process_group``).
"""

from __future__ import annotations

import datetime
import functools
import itertools
import os
import sys
from dataclasses import dataclass

ARRIVED_KEY = "notebook_launcher/arrived"
ALL_ARRIVED_KEY = "notebook_launcher/all_arrived"


REBUILT_PREFIX = "notebook_launcher/rebuilt"   # store prefix of the groups a session rebuilds (one per `Regroup`)
MEET_TIMEOUT = datetime.timedelta(seconds=60)   # how long a rebuild's ranks wait for each other at the store
_timeout: list = [None]   # the timeout the default group was made with (None: torch's default), kept by a rebuild


def init_default_group(dist, backend: str, rank: int, world_size: int, device: str) -> None:
    _sockets_before.update(_socket_fds())   # inherited ones (a forked kernel's) are never ours to cut
    original = dist.init_process_group
    dist.init_process_group = _tolerant(dist, original, {"backend": backend, "rank": rank, "world_size": world_size})
    original(backend=backend, init_method="env://", rank=rank, world_size=world_size)


_aborted: list = []   # the default groups aborted, latest last: DDP wrappers holding one are moved by `Regroup`


def abort() -> bool:
    """Abort every process group of this rank (any thread may call it); False when there
    was none. What was blocked in a collective with this rank's peers fails at once."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _abort_process_group

    if not (dist.is_available() and dist.is_initialized()):
        return False
    _aborted[:] = [dist.distributed_c10d.GroupMember.WORLD]
    try:
        _abort_process_group()
    except Exception as exc:   # a group half torn down already: nothing left to release
        print(f"notebook_launcher: aborting the process group failed: {exc!r}", file=sys.stderr)
    _cut_connections()
    return True


_sockets_before: set = set()   # socket inodes this rank had before it formed its first group


def _cut_connections() -> int:
    """Shut down (not close: the library still holds the descriptors) every established
    TCP connection accepted by a listening socket this rank opened since it formed its
    first group: the process groups' own (a rank listens for nothing else). Returns how many."""
    import socket

    fds, tcp = _socket_fds(), _tcp_sockets()
    ours = {inode: fd for inode, fd in fds.items() if inode not in _sockets_before and inode in tcp}
    listening = {tcp[inode][0] for inode in ours if tcp[inode][1] == _LISTEN}
    cut = 0
    for inode, fd in ours.items():
        port, state = tcp[inode]
        if state == _LISTEN or port not in listening:
            continue
        try:   # gloo's teardown (the abort started it) may have closed or reused the fd since the listing
            if os.fstat(fd).st_ino != inode:
                continue
            sock = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            sock.shutdown(socket.SHUT_RDWR)
            cut += 1
        except OSError:
            pass
        finally:
            sock.detach()
    return cut


_LISTEN = "0A"   # the state of a listening socket in /proc/net/tcp


def _socket_fds() -> dict:
    """{socket inode: fd} of this process."""
    out = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:   # not Linux: nothing to cut (the abort alone still helps NCCL)
        return out
    for name in names:
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out[int(link[8:-1])] = int(name)
    return out


def _tcp_sockets() -> dict:
    """{inode: (local port, state)} of the TCP sockets (v4 and v6) of this network namespace."""
    rows = {}
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/self/net/{name}") as table:
                next(table, None)
                for line in table:
                    fields = line.split()
                    rows[int(fields[9])] = (int(fields[1].rsplit(":", 1)[1], 16), fields[3])
        except (OSError, ValueError, IndexError):
            continue
    return rows


@dataclass
class Regroup:
    """A task: form a fresh default group (after `abort`), with the same ranks, backend and
    devices, under the store prefix of rebuild ``number``; move DDP wrappers that held
    the old group. Its value: the names of the wrappers moved."""

    number: int

    def run(self, namespace: dict) -> list:
        import torch.distributed as dist

        from . import context, journal

        abort()   # a rank whose group was not aborted yet (it had left already) lets go of it here
        old = _aborted[-1] if _aborted else None
        ctx = context.current()
        original = getattr(dist.init_process_group, "_notebook_launcher_original", dist.init_process_group)
        # The group's own timeout is the old group's (every later collective has it), not MEET_TIMEOUT.
        kept = {"timeout": _timeout[0]} if _timeout[0] is not None else {}
        original(ctx.backend, store=dist.PrefixStore(f"{REBUILT_PREFIX}/{self.number}", _store_client(MEET_TIMEOUT)),
                 rank=ctx.rank, world_size=ctx.world_size, **kept)
        if journal.current() is not None:
            journal.current().regrouped()
        moved = move_ddp_wrappers([namespace, vars(sys.modules["__main__"])], old, dist.group.WORLD)
        _aborted.clear()
        return moved


def move_ddp_wrappers(namespaces: list, old, new) -> list:
    """Point every DDP wrapper bound in ``namespaces`` that held ``old`` (the aborted default
    group) at ``new``; returns their names. Wrappers held elsewhere (inside another object,
    a list) or on a group of their own (a subgroup) are not found: those must be rebuilt."""
    from torch.nn.parallel import DistributedDataParallel

    moved, seen = [], set()
    for namespace in namespaces:
        for name, value in list(namespace.items()):
            if isinstance(value, DistributedDataParallel) and id(value) not in seen:
                seen.add(id(value))
                if old is not None and value.process_group is old:
                    value._update_process_group(new)
                    moved.append(name)
    return moved


def _tolerant(dist, original, ours: dict):
    regroups = itertools.count(1)

    @functools.wraps(original)
    def init_process_group(backend=None, *args, **kwargs):
        if dist.is_initialized():
            if not args and _asks_for_ours(backend, kwargs, ours):
                return None
            # Anything more (a timeout, pg_options, another backend) gets a new group.
            dist.destroy_process_group()
            _timeout[0] = kwargs.get("timeout")
            if not args and kwargs.get("store") is None and kwargs.get("init_method") in (None, "env://"):
                kwargs = _fresh_rendezvous(dist, kwargs, ours, next(regroups))
        return original(backend, *args, **kwargs)

    init_process_group._notebook_launcher_original = original
    return init_process_group


def _store_client(timeout: datetime.timedelta):
    """A client of the rendezvous store every rank met on (torchrun's MASTER_ADDR/PORT)."""
    import torch.distributed as dist

    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), None, False, timeout=timeout)


def _fresh_rendezvous(dist, kwargs: dict, ours: dict, number: int) -> dict:
    """The env:// store still holds the old group's addresses: meet under a new prefix."""
    client = _store_client(kwargs.get("timeout") or datetime.timedelta(minutes=5))
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
