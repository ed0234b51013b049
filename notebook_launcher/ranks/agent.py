"""The node agent: today's parent moved onto a node of a cluster.

One agent per node, placed by an engine (a Ray actor, or a process ``srun`` starts), runs
the node's ranks as its own children, by spawn (never fork: a Ray worker's threads would
be copied half-way, ray #28328), through the same `local.LocalRanks` and worker code as a
one-machine launch: fd-level capture, the task loop, SIGINT, stack dumps, parent-death
safety (the ranks die with the agent: their parent-death signal and their control pipe).

It does not decode anything: it relays what its ranks write, as raw chunks, in batches
(`AgentBatch`), to the notebook, which decodes every rank's bytes in one place
(`base.RankGroup`). A batch comes back at least every `PULL_WAIT` seconds, empty if need
be: that is the agent's heartbeat, by which the notebook notices a lost node within
seconds instead of waiting for the engine (20-60 s).

Agent 0 also reserves the rendezvous store's port (the OS picks it), bound to every
interface of its node; every rank gets torchrun's variables pointing at it. Agent 0's
first rank serves the store on that very socket as soon as it has imported torch: an
agent never imports torch (seconds of CPU beside its ranks' own imports, and its memory),
and ranks that connect first wait in the socket's backlog. The store lives as long as that
rank (torchrun's default, where rank 0 hosts it): a peer that needs it after rank 0 died
fails as having lost its peer.

The engine wraps the agent: `ray_engine.RayAgent` as an actor (``pull`` in a concurrency
group of its own, every other method in order in another, ``send_then_pull`` too: a task's
send that is also the first pull), `slurm_engine` over a socket.

Example::

    agent = NodeAgent()
    addr, port = agent.reserve_store(plan)                  # agent 0 only
    agent.start(plan, addr, port)
    batch = agent.pull(0.5)                                  # AgentBatch(items=[Chunk, ...])
    agent.close(graceful=False, term_grace=1.0)
"""

from __future__ import annotations

import os
import queue
import socket
import threading
from dataclasses import dataclass, field
from typing import Optional

from .. import rendezvous
from .base import Chunk, Exit
from .plan import NodePlan

PULL_WAIT = 0.5     # seconds a pull waits for something to relay before it returns empty (the heartbeat)
PUMP_WAIT = 0.1     # seconds the pump waits on the ranks' pipes per round (how fast it sees a stop)


@dataclass(frozen=True)
class AgentBatch:
    """What an agent relays in one go: raw `Chunk`s and `Exit`s of its ranks, in order."""

    items: list = field(default_factory=list)
    pids: dict = field(default_factory=dict)   # rank -> pid, in the first batch after a start


@dataclass(frozen=True)
class NodeInfo:
    hostname: str
    address: str
    pid: int
    node_id: str = ""      # the engine's name for the node (Ray's node id)


class NodeAgent:
    """See the module docstring. Every method may be called from any thread; `pull` runs
    beside the others (an engine must let it: it blocks up to its timeout), and one at a
    time: `pull` and `send_then_pull` take from one outbox, and two at once could hand
    its batches to the notebook out of order (the engine keeps at most one out)."""

    def __init__(self, node_id: str = "", address: Optional[str] = None) -> None:
        self.info = NodeInfo(socket.gethostname(), address or _node_address(), os.getpid(), node_id)
        self.group = None                        # local.LocalRanks, once started
        self._rdzv: Optional[rendezvous.Rendezvous] = None
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pids: dict = {}
        self._stop = threading.Event()
        self._pump: Optional[threading.Thread] = None
        self._spawner = _Spawner()

    def describe(self) -> NodeInfo:
        return self.info

    # ------------------------------------------------------------- start
    def reserve_store(self, plan: NodePlan) -> tuple:
        """Agent 0: reserve the store's port on every interface; (address, port) for the ranks."""
        self._rdzv = rendezvous.host_store(self.info.address, plan.world_size, bind_all=True,
                                           restart_count=plan.restart_count, max_restarts=plan.max_restarts,
                                           run_id=plan.run_id)
        return self.info.address, self._rdzv.master_port

    def start(self, plan: NodePlan, master_addr: str, master_port: int) -> dict:
        """Start this node's ranks (spawn) and begin relaying; returns {rank: pid}."""
        from .local import LocalRanks

        rdzv = self._rdzv or rendezvous.Rendezvous(master_addr, master_port, plan.world_size, run_id=plan.run_id,
                                                   restart_count=plan.restart_count, max_restarts=plan.max_restarts)
        self.group = self._spawner.run(lambda: LocalRanks.start(plan, rdzv, "spawn", last_words=lambda lines: None,
                                                                store_in_first_rank=True))
        self._pids = {rank: self.group.pid(rank) for rank in self.group.ranks}
        self._outbox.put(AgentBatch(pids=dict(self._pids)))
        self._pump = threading.Thread(target=self._relay, name="notebook_launcher-agent-pump", daemon=True)
        self._pump.start()
        return dict(self._pids)

    def _relay(self) -> None:
        """Move what the ranks write into the outbox, raw, until stopped or every rank ended."""
        while not self._stop.is_set():
            items = self.group._wait_raw(PUMP_WAIT)
            if items:
                self._outbox.put(AgentBatch(items))
            if not self.group._selector.get_map():
                return  # every rank ended and everything it wrote was read

    # ------------------------------------------------------------- the uplink
    def pull(self, timeout: float = PULL_WAIT) -> AgentBatch:
        """Everything relayed since the last pull, waiting up to ``timeout`` for the first
        item; an empty batch says "alive, nothing new"."""
        try:
            first = self._outbox.get(timeout=timeout)
        except queue.Empty:
            return AgentBatch()
        items, pids = list(first.items), dict(first.pids)
        while True:
            try:
                more = self._outbox.get_nowait()
            except queue.Empty:
                return AgentBatch(items, pids)
            items.extend(more.items)
            pids.update(more.pids)

    # ------------------------------------------------------------- control
    def send(self, ranks: list, frame: bytes) -> None:
        """To each rank; one whose process ended is skipped (its exit reaches the notebook
        through the pump, with its last lines)."""
        for rank in ranks:
            try:
                self.group.send([rank], frame)
            except BrokenPipeError:
                pass

    def send_then_pull(self, ranks: list, frame: bytes, timeout: float) -> AgentBatch:
        """`send`, then `pull`: the ranks' first answer (a trivial cell's result) comes
        back with the call that asked for it, in one round trip."""
        self.send(ranks, frame)
        return self.pull(timeout)

    def interrupt(self, ranks: list) -> None:
        self.group.interrupt(ranks)

    def dump_stacks(self, rank: int, timeout: float = 1.0) -> str:
        return self.group.dump_stacks(rank, timeout)

    def journal(self, rank: int) -> bytes:
        return self.group.journal(rank)

    def kill(self, ranks: list) -> None:
        self.group.kill(ranks)

    def close(self, graceful: bool = False, term_grace: float = 1.0) -> None:
        """Stop relaying, then stop the ranks (and with the first, the store). Idempotent."""
        self._stop.set()
        if self._pump is not None:
            self._pump.join(timeout=2 * PUMP_WAIT + 1)
        if self.group is not None:
            self.group.close(graceful=graceful, term_grace=term_grace)
        elif self._rdzv is not None:
            self._rdzv.close()
        self._spawner.stop()


class _Spawner:
    """One thread that lives as long as the agent and starts every rank: a rank's
    parent-death signal fires when the *thread* that started it ends, and an engine's
    method threads are not ours to keep alive."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="notebook_launcher-agent-spawner", daemon=True)
        self._thread.start()

    def run(self, job):
        done: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs.put((job, done))
        ok, value = done.get()
        if not ok:
            raise value
        return value

    def stop(self) -> None:
        self._jobs.put(None)

    def _serve(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return  # after close(): the ranks started here are reaped already
            job, done = item
            try:
                done.put((True, job()))
            except BaseException as exc:  # returned to the caller's thread
                done.put((False, exc))


def _node_address() -> str:
    """An address of this node that other nodes can reach: the one the default route uses."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))   # TEST-NET-1: nothing is sent, the kernel only picks a route
        return probe.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())
    finally:
        probe.close()
