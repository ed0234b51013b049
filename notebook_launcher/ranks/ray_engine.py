"""Ranks on a Ray cluster: Ray places, we run.

One placement group with one bundle per node (STRICT_SPREAD for several nodes), one agent
actor per bundle (`RayAgent`, a thin actor around `agent.NodeAgent`), which starts its
node's ranks as its own children. What ranks write travels back through Ray itself: each
live agent is pulled while a call waits (a long-poll actor method, in a concurrency group of
its own, so it runs beside the control methods, which stay in order in theirs; a cell's
task is sent by a call that is its agent's first pull, `RayRanks.send`); the notebook
needs no port the cluster can reach, and Ray's ``log_to_driver`` is never involved.

Nothing outlives its call or session: `RayRanks.close` stops the ranks through their
agents, kills the actors and removes the placement group; if the kernel dies, Ray kills
the actors it owned (and with them the ranks: parent-death signal, control pipe) and
removes its placement groups.

Example::

    facts = inspect(RayCluster(), num_nodes=2, nproc=1, device="auto")   # connects, checks capacity
    group = RayRanks.start(config, attempt=0, persistent=True)
"""

from __future__ import annotations

import functools
import time
import uuid
from dataclasses import dataclass
from typing import Optional

from ..interrupts import interrupts_deferred
from .agent import PULL_WAIT, NodeAgent
from .base import Lines
from .plan import plan_for
from .remote import CALL_TIMEOUT, Node, NodeGone, RemoteRanks, one_line

SEND_WAIT = 0.1            # seconds a send waits for the ranks' first answer (what is called after it waits too)
SEND_AND_PULL_BYTES = 1 << 20   # a bigger frame is sent alone: its pipe writes must not hold the node's heartbeat
PULL_AGAIN_AFTER = 0.005  # seconds the pulls still out are waited for before the other agents are asked again:
                          # a trivial cell's second node answers 0.1-1 ms after its first
PLACEMENT_TIMEOUT = 60.0   # seconds for the placement group to be placed
START_TIMEOUT = 300.0      # seconds for the agents to start and to spawn their ranks


class RayAgent:
    """The actor: a `NodeAgent` that knows its Ray node."""

    def __init__(self) -> None:
        import ray

        self.agent = NodeAgent(ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address())

    def describe(self):
        return self.agent.describe()

    def reserve_store(self, plan):
        return self.agent.reserve_store(plan)

    def start(self, plan, master_addr: str, master_port: int) -> dict:
        return self.agent.start(plan, master_addr, master_port)

    def pull(self, timeout: float = PULL_WAIT):
        return self.agent.pull(timeout)

    def send(self, ranks: list, frame: bytes) -> None:
        self.agent.send(ranks, frame)

    def send_then_pull(self, ranks: list, frame: bytes, timeout: float = SEND_WAIT):
        return self.agent.send_then_pull(ranks, frame, timeout)

    def interrupt(self, ranks: list) -> None:
        self.agent.interrupt(ranks)

    def dump_stacks(self, rank: int, timeout: float = 1.0) -> str:
        return self.agent.dump_stacks(rank, timeout)

    def kill(self, ranks: list) -> None:
        self.agent.kill(ranks)

    def close(self, graceful: bool = False, term_grace: float = 1.0) -> None:
        self.agent.close(graceful, term_grace)


# ----------------------------------------------------------------- before anything starts
@dataclass(frozen=True)
class ClusterFacts:
    """What a launch on the cluster will use, decided before anything starts."""

    device_type: str          # "cpu" | "cuda"
    nproc: int                # ranks per node
    bundle: dict              # what one node's bundle reserves
    cpus_per_node: int        # of the smallest node that fits: for threads per rank
    nodes_alive: int


def connect(cluster) -> None:
    """Use the Ray cluster this kernel is connected to, else connect (``cluster.address``,
    default "auto"); a clear error if there is none."""
    import ray

    from ..errors import LaunchConfigError

    if ray.is_initialized():
        return
    try:
        ray.init(address=cluster.address or "auto", runtime_env=cluster.runtime_env, log_to_driver=False,
                 logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise LaunchConfigError(
            f"cluster='ray': could not connect to a Ray cluster at {cluster.address or 'auto'} ({exc}). "
            "Call ray.init(...) in the notebook first, or pass RayCluster(address='host:port')."
        ) from None


def inspect(cluster, num_nodes: int, nproc: Optional[int], device: str) -> ClusterFacts:
    """Connect, decide the device and ranks per node, and check that the cluster has
    ``num_nodes`` nodes that fit one bundle each; raises `LaunchConfigError` saying what it has."""
    import ray

    from ..errors import LaunchConfigError

    connect(cluster)
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    most_gpus = max((int(r.get("GPU", 0)) for r in nodes), default=0)
    device_type = ("cuda" if most_gpus else "cpu") if device == "auto" else device
    if device_type == "cuda" and not most_gpus:
        raise LaunchConfigError("device='cuda' was asked for, but the Ray cluster has no GPU.")
    if nproc is None:
        nproc = most_gpus if device_type == "cuda" else 2
    bundle = dict(cluster.resources_per_node or ({"CPU": 1, "GPU": nproc} if device_type == "cuda" else {"CPU": 1}))
    fitting = [r for r in nodes if all(r.get(key, 0) >= amount for key, amount in bundle.items())]
    needed = num_nodes if cluster.placement == "spread" else 1
    if len(fitting) < needed:
        have = ", ".join(f"{{{', '.join(f'{k}: {v:g}' for k, v in sorted(r.items()) if k in ('CPU', 'GPU'))}}}"
                         for r in nodes) or "none"
        raise LaunchConfigError(
            f"num_nodes={num_nodes} needs {needed} Ray node{'s' if needed != 1 else ''} with {bundle} each "
            f"(num_processes={nproc} per node), but the cluster's live nodes have: {have}. Use fewer nodes or "
            "processes, or RayCluster(resources_per_node=...) / placement='pack'."
        )
    cpus = min(int(r.get("CPU", 1)) for r in fitting) if fitting else 1
    return ClusterFacts(device_type, nproc, bundle, max(1, cpus), len(nodes))


# ----------------------------------------------------------------- the group
class RayRanks(RemoteRanks):
    """Ranks under Ray node agents; see the module docstring."""

    def __init__(self, nodes: list, actors: list, placement, last_words) -> None:
        super().__init__(nodes, last_words)
        self.actors = actors
        self.placement = placement
        self._pulls: dict = {}    # object ref -> (node, when it was sent): at most one pull out per live agent
        self._posted: dict = {}   # object ref -> node: sends not waited for, until they are done

    @classmethod
    def start(cls, config, attempt: int, *, persistent: bool, first_request=None, last_words=None) -> "RayRanks":
        """Place the agents and start every node's ranks; on any error everything taken is released."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        cluster, facts = config.cluster, config.cluster_facts
        strategy = "STRICT_SPREAD" if cluster.placement == "spread" and config.num_nodes > 1 else "PACK"
        placement = placement_group([dict(facts.bundle) for _ in range(config.num_nodes)], strategy=strategy)
        actors: list = []
        try:
            _placed(placement, config.num_nodes, facts.bundle)
            actors = [_agent_actor(ray, placement, index, facts.bundle, cluster.runtime_env)
                      for index in range(config.num_nodes)]
            infos = ray.get([actor.describe.remote() for actor in actors], timeout=START_TIMEOUT)
            plan = plan_for(config, attempt, persistent, first_request,
                            rdzv_timeout=config.rdzv_timeout if config.num_nodes > 1 else None)
            plan = _with_run_id(plan)
            address, port = ray.get(actors[0].reserve_store.remote(plan.for_node(0)), timeout=START_TIMEOUT)
            starts = [actor.start.remote(_node_env(plan.for_node(i), infos[i]), address, port)
                      for i, actor in enumerate(actors)]
            pids = {}
            for started in ray.get(starts, timeout=START_TIMEOUT):
                pids.update(started)
        except BaseException:
            for actor in actors:
                _quietly(lambda: ray.kill(actor, no_restart=True))
            _quietly(lambda: remove_placement_group(placement))
            raise
        nodes = [Node(i, infos[i], plan.for_node(i).ranks) for i in range(config.num_nodes)]
        group = cls(nodes, actors, placement, last_words or (lambda lines: None))
        group.pids.update(pids)
        return group

    # ------------------------------------------------------------- transport
    def _call(self, node: Node, method: str, *args, timeout: float = CALL_TIMEOUT):
        import ray

        return ray.get(getattr(self.actors[node.index], method).remote(*args), timeout=timeout)

    def send(self, ranks: list, frame: bytes) -> None:
        """Each node's ranks get the frame; a node with no pull out gets a small frame in a
        call that is also its pull (`NodeAgent.send_then_pull`): a trivial cell's answer
        then comes back in one actor round trip instead of two (a send, then a pull). Such
        a call holds the agent's later control calls (an interrupt) for the writes and at
        most `SEND_WAIT` seconds more. A big frame (a pushed value) is sent alone: its
        writes to the ranks' pipes may take seconds, during which the node's pull must go
        on answering (its heartbeat). A send of either kind that fails ends its node, as a
        failing pull does (`_take`, `_check_posts`)."""
        pulled = self._pulled()
        alone = len(frame) > SEND_AND_PULL_BYTES
        with interrupts_deferred():   # a pull whose ref an Interrupt lost would take its agent's next batch
            for node, mine in self._by_node(ranks):
                actor = self.actors[node.index]
                if alone or node.index in pulled:
                    self._posted[actor.send.remote(mine, frame)] = node
                else:
                    self._pulls[actor.send_then_pull.remote(mine, frame, SEND_WAIT)] = (node, time.monotonic())

    def _receive(self, timeout: float) -> list:
        """Take the batches already there; if there are none, wait up to `PULL_AGAIN_AFTER`
        for the pulls still out (when some live agent has none), then ask every live agent
        that has no pull out for one and wait for a first answer, then take every answer
        there is; a failed send ends its node (`_check_posts`). A look without waiting
        (``timeout`` 0: a call's drain) asks for nothing: every ask costs an actor call
        (0.15-0.3 ms here) on the path of the answers, so asks are made only when nothing
        waits (a call may end with some still out: they answer, empty, within `PULL_WAIT`,
        and are taken by the next look). Agents whose pull has no answer yet are silent
        since it was sent; an answer still on its way from the agent's node (a big batch)
        counts as one: ``fetch_local=False``. A lost node's pulls are dropped."""
        live = {node.index for node in self.nodes if not node.lost}
        self._pulls = {ref: (node, sent) for ref, (node, sent) in self._pulls.items() if node.index in live}
        failed = self._check_posts()   # before any batch is taken: an Interrupt in it would lose them
        taken = self._take(self._answered(0))
        if not taken and timeout > 0 and self._pulls and self._pulled() != live:
            taken = self._take(self._answered(min(timeout, PULL_AGAIN_AFTER)))
        if not taken and timeout > 0:
            with interrupts_deferred():   # a pull whose ref an Interrupt lost would take its agent's next batch
                self._pull_every_live_agent()
            taken = self._take(self._answered(timeout))
        for node in self.nodes:
            node.silent_since = None
        for node, sent in self._pulls.values():
            node.silent_since = sent
        return taken + failed

    def _answered(self, timeout: float) -> list:
        """The pulls answered within ``timeout`` (all of those answered by the first)."""
        import ray

        refs = list(self._pulls)
        if not refs:
            if timeout > 0:
                time.sleep(min(timeout, 0.05))
            return []
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout, fetch_local=False)
        if ready and len(refs) > 1:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        return ready

    def _take(self, refs: list) -> list:
        """[(node, batch or what ended its agent)] of the answered pulls that could be
        fetched; one still on its way (over a second) is waited for again."""
        taken = []
        for ref, answer in zip(refs, self._answers(refs)):
            node, _ = self._pulls.pop(ref)
            if answer is None:
                self._pulls[ref] = (node, time.monotonic())
            else:
                taken.append((node, _gone_if_it_raised(answer)))
        return taken

    def _check_posts(self) -> list:
        """Forget the posted sends that are done; [(node, NodeGone)] for each that failed:
        some of its ranks may never have got the task, and the agent, alive, goes on
        answering its pulls, so the call could wait for them forever. The node ends with the
        agent's own words (its send raised) or Ray's (it could not hand the agent the frame);
        an agent that died is said by its pull."""
        import ray

        if not self._posted:
            return []
        done, _ = ray.wait(list(self._posted), num_returns=len(self._posted), timeout=0)
        failed = []
        for ref, answer in zip(done, self._answers(done)):
            node = self._posted.pop(ref)
            if isinstance(answer, ray.exceptions.RayTaskError):
                failed.append((node, _gone_if_it_raised(answer)))
            elif isinstance(answer, Exception) and not isinstance(answer, ray.exceptions.RayActorError):
                failed.append((node, NodeGone(f"Ray could not hand its agent a task: {one_line(answer)}")))
        return failed

    def _answers(self, refs: list) -> list:
        """Each call's result (a pull's batch; a send's None), the exception it ended with
        (the agent raised, the actor died: its node, or Ray killed it), or None if it could
        not be fetched yet (a send is done either way)."""
        import ray

        if not refs:
            return []
        try:
            return ray.get(refs, timeout=1.0)
        except Exception:
            pass
        answers = []
        for ref in refs:
            try:
                answers.append(ray.get(ref, timeout=1.0))
            except ray.exceptions.GetTimeoutError:
                answers.append(None)
            except Exception as exc:
                answers.append(exc)
        return answers

    def _pull_every_live_agent(self) -> None:
        pulled = self._pulled()
        for node in self.nodes:
            if not node.lost and node.index not in pulled:
                ref = self.actors[node.index].pull.options(concurrency_group="uplink").remote(PULL_WAIT)
                self._pulls[ref] = (node, time.monotonic())

    def _pulled(self) -> set:
        """The indices of the nodes with a pull out (at most one each: see `RayRanks.send`)."""
        return {node.index for node, _ in self._pulls.values()}

    def _release(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            _quietly(lambda: ray.kill(actor, no_restart=True))
        self._pulls, self._posted = {}, {}
        remove_placement_group(self.placement)


def _agent_actor(ray, placement, index: int, bundle: dict, runtime_env: Optional[dict]):
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    actor_class = _actor_class()
    options = dict(num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0), max_restarts=0,
                   resources={k: v for k, v in bundle.items() if k not in ("CPU", "GPU")} or None,
                   scheduling_strategy=PlacementGroupSchedulingStrategy(placement, placement_group_bundle_index=index))
    if runtime_env:
        options["runtime_env"] = runtime_env
    return actor_class.options(**options).remote()


@functools.lru_cache(maxsize=None)
def _actor_class():
    """Made once per kernel (Ray exports a class to the cluster each time one is made).
    Its default group must stay one thread, never async: then Ray runs one caller's calls
    in the order they were made, which `RayRanks.send` relies on (an interrupt called after
    a task's send reaches the agent after it)."""
    import ray

    return ray.remote(concurrency_groups={"uplink": 1})(RayAgent)   # the rest: in order, one at a time


def _gone_if_it_raised(answer):
    """A pull or send that raised (the agent is alive, but cannot relay: a bug of ours)
    ends the node with the agent's own words; an agent that died stays as is."""
    import ray

    if isinstance(answer, ray.exceptions.RayTaskError):
        return NodeGone.agent_failed(one_line(answer))
    return answer


def _placed(placement, num_nodes: int, bundle: dict) -> None:
    import ray

    try:
        ray.get(placement.ready(), timeout=PLACEMENT_TIMEOUT)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(
            f"Ray could not place {num_nodes} bundle{'s' if num_nodes != 1 else ''} of {bundle} within "
            f"{PLACEMENT_TIMEOUT:g}s: the nodes are busy (other jobs hold their resources) or gone."
        ) from None


def _with_run_id(plan):
    import dataclasses

    return dataclasses.replace(plan, run_id=plan.run_id or uuid.uuid4().hex[:12])


def _node_env(plan, info):
    """Ranks know their Ray node (tests and users can check where they ran)."""
    import dataclasses

    return dataclasses.replace(plan, env={**plan.env, "NOTEBOOK_LAUNCHER_NODE_ID": info.node_id,
                                          "NOTEBOOK_LAUNCHER_NODE_ADDRESS": info.address})


def _quietly(step) -> None:
    try:
        step()
    except Exception:
        pass
