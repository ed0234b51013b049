"""The notebook's side of ranks run by node agents (`agent.NodeAgent`), whatever placed them.

An engine (`ray_engine`, `slurm_engine`) provides the transport: how to call an agent's
method (`_call`; Ray's own `send` posts a cell's task without waiting, in a call that is
also the agent's pull), how to take the agents' batches as they come (`_receive`), and how
to release what it took (`_release`: actors and placement group, a Slurm job). This class
does the rest, the same for every engine:

- arrivals: each agent's `agent.AgentBatch` is unpacked into the raw `Chunk`s and
  `Exit`s of the `base.RankGroup` interface (decoded there, as for local ranks);
- liveness, by our own heartbeats: an agent answers a pull within `agent.PULL_WAIT`
  seconds; one that leaves a pull unanswered for `LOST_AFTER` seconds (the engine says
  since when: `Node.silent_since`; an idle session reads no pull, and that is no
  silence), or whose engine says it died, has lost its node, and each of its live ranks
  gets an `Exit` that says so (engines take 20-60 s to notice a dead node; a call must
  end within 10 s);
- control: send, interrupt, stack dumps, kill, by the agent of the rank's node;
- the end, on every path: ranks asked to leave are waited for (their last lines shown),
  agents stop their ranks, then the engine releases what it took.
"""

from __future__ import annotations

import abc
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

from ..workers.stacks import with_source_lines
from .agent import AgentBatch, NodeInfo
from .base import Exit, Lines, RankGroup, tear_down

LOST_AFTER = 5.0       # seconds without a batch from an agent: its node is lost
EXIT_GRACE = 10.0      # ranks ending by themselves (returned, or told to shut down): how long they may take
CALL_TIMEOUT = 30.0    # seconds for an agent's control call (a lost node must not hang the notebook)


class NodeGone(Exception):
    """What an engine knows about why a node's agent went away, in words (e.g. "the Slurm
    job 12 was cancelled (scancel)")."""

    @classmethod
    def agent_failed(cls, words: str) -> "NodeGone":
        """The agent is alive but cannot relay (its pull or a send raised): its node ends
        with the agent's own words, e.g.
        ``NodeGone.agent_failed("RuntimeError: the relay broke")``."""
        return cls(f"its agent failed: {words}")


@dataclass
class Node:
    """One node of the job, as the notebook knows it."""

    index: int
    info: NodeInfo
    ranks: list
    silent_since: Optional[float] = None   # notebook clock: when the pull it has not answered yet was sent
    lost: str = ""               # what happened to it, once it is lost

    def label(self) -> str:
        return f"node {self.index} ({self.info.hostname}, {self.info.address})"


class RemoteRanks(RankGroup):
    """Ranks on nodes, through their agents; see the module docstring."""

    single_host = False
    lost_peer_wait = LOST_AFTER + 1.0   # a dead node is known only after LOST_AFTER of silence

    def __init__(self, nodes: list, last_words: Callable[[Lines], None]) -> None:
        super().__init__([rank for node in nodes for rank in node.ranks])
        self.nodes = nodes
        self.last_words = last_words
        self.pids: dict = {}
        self._node_of = {rank: node for node in nodes for rank in node.ranks}
        self._closed = False

    # ------------------------------------------------------------- engine hooks
    @abc.abstractmethod
    def _call(self, node: Node, method: str, *args, timeout: float = CALL_TIMEOUT):
        """Call ``method(*args)`` on the node's agent and return its result."""

    @abc.abstractmethod
    def _receive(self, timeout: float) -> list:
        """[(node, AgentBatch, or a `NodeGone` or the exception that ends its node)] within
        ``timeout``; each live agent is pulled while the call waits, and each node's
        ``silent_since`` kept."""

    @abc.abstractmethod
    def _release(self) -> None:
        """Free what the engine took for this group (actors, placement group, job)."""

    # ------------------------------------------------------------- arrivals
    def _wait_raw(self, timeout: float) -> list:
        if self._closed:
            return []
        out: list = []
        for node, batch in self._receive(timeout):
            if isinstance(batch, AgentBatch):
                self.pids.update(batch.pids)
                out.extend(batch.items)
            elif not node.lost:
                why = str(batch) if isinstance(batch, NodeGone) else f"its agent died ({one_line(batch)})"
                out.extend(self._lose(node, why))
        now = time.monotonic()
        for node in self.nodes:
            if not node.lost and node.silent_since is not None and now - node.silent_since > LOST_AFTER:
                out.extend(self._lose(node, f"its agent stopped answering for {LOST_AFTER:g} s"))
        return out

    def _lose(self, node: Node, why: str) -> list:
        node.lost = why
        gone = f"lost with its node: {why}"
        return [Exit(rank, -9, gone) for rank in node.ranks if rank not in self.exitcodes]

    # ------------------------------------------------------------- control
    def send(self, ranks: list, frame: bytes) -> None:
        """To each node's agent, for its ranks, one call after another; a failure raises
        here (an engine that can post calls without waiting overrides this: `RayRanks.send`)."""
        for node, mine in self._by_node(ranks):
            self._call(node, "send", mine, frame)

    def interrupt(self, ranks: list) -> None:
        for node, mine in self._by_node(ranks):
            self._quietly(node, "interrupt", mine)

    def dump_stacks(self, rank: int, timeout: float = 1.0) -> str:
        node = self._node_of[rank]
        if node.lost:
            return f"(no stack: {node.lost})"
        try:
            return with_source_lines(self._call(node, "dump_stacks", rank, timeout, timeout=timeout + 5))
        except Exception as exc:
            return f"(no stack: {one_line(exc)})"

    def journal(self, rank: int) -> bytes:
        """From the rank's agent (an engine whose agent has no ``journal``: b"")."""
        node = self._node_of[rank]
        if node.lost:
            return b""
        try:
            return self._call(node, "journal", rank, timeout=5.0)
        except Exception:
            return b""

    def kill(self, ranks: list) -> None:
        for node, mine in self._by_node(ranks):
            self._quietly(node, "kill", mine)

    def label(self, rank: int) -> str:
        return f"{self.where(rank)} pid {self.pid(rank)}"

    def where(self, rank: int) -> str:
        return self._node_of[rank].label()

    def pid(self, rank: int) -> Optional[int]:
        return self.pids.get(rank)

    def node_ids(self) -> dict:
        """rank -> the engine's id of the node it runs on."""
        return {rank: node.info.node_id for rank, node in self._node_of.items()}

    def _by_node(self, ranks: list) -> list:
        return [(node, [r for r in node.ranks if r in ranks]) for node in self.nodes
                if not node.lost and any(r in ranks for r in node.ranks)]

    def _quietly(self, node: Node, method: str, *args) -> None:
        try:
            self._call(node, method, *args, timeout=5.0)
        except Exception as exc:  # a node on its way out: its ranks go with it
            say_failed(node, method, exc)

    # ------------------------------------------------------------- the end
    def close(self, graceful: bool, term_grace: float) -> None:
        if self._closed:
            return
        steps = [lambda: graceful and self._wait_for_exits(EXIT_GRACE)]
        steps += [lambda node=node: node.lost or self._call(node, "close", False, term_grace,
                                                            timeout=term_grace + 10) for node in self.nodes]
        steps += [self._release]
        tear_down(steps)
        self._closed = True

    def _wait_for_exits(self, timeout: float) -> None:
        """Ranks ending by themselves: their last lines are shown as they come."""
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            for arrival in self.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
                if isinstance(arrival, Lines):
                    self.last_words(arrival)


def say_failed(node: Node, method: str, exc: BaseException) -> None:
    """On stderr: an agent's call that nobody can act on failed (the node's ranks go on, or go with it)."""
    print(f"notebook_launcher: {node.label()}: {method} failed: {one_line(exc)}", file=sys.stderr)


def one_line(exc: BaseException) -> str:
    """An agent's error in one line, in its own words: an engine's wrapping of what the
    agent's method raised (Ray's RayTaskError, whose first line is Ray's, "ray::RayAgent.pull()
    (pid=...)") is looked through to its ``cause``."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
