"""The node agent (`ranks.agent.NodeAgent`) on its own, in a fresh process, as an engine
drives it: agent 0 reserves the store's port and its first rank serves the store, so the
agent never imports torch (seconds of CPU beside its ranks' imports on the launch path).
The Ray and Slurm tests run it through their engines; here, what they cannot see or make
happen: the agent's own imports, a send past a rank that was killed, a close that leaves
nothing behind, and, through Slurm's transport (the real `dial` agent process dialing the
notebook's real `Listener`, without Slurm), an agent whose pull raises, which must end its
node with the agent's words at once rather than after seconds of silence.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

from notebook_launcher.ranks.agent import AgentBatch
from notebook_launcher.ranks.dial import TOKEN_BYTES, TOKEN_ENV
from notebook_launcher.ranks.remote import NodeGone
from notebook_launcher.ranks.slurm_engine import Listener

AGENT = textwrap.dedent("""
    import json, os, signal, sys, time
    import psutil
    from notebook_launcher import channel as ch
    from notebook_launcher.ranks.agent import NodeAgent
    from notebook_launcher.ranks.plan import NodePlan

    plan = NodePlan(node_rank=0, nproc=2, world_size=2, backend="gloo", device_type="cpu", mixed_precision="no",
                    num_threads=1, env={}, persistent=True, run_id="agent-test")
    agent = NodeAgent()
    address, port = agent.reserve_store(plan)
    pids = agent.start(plan, address, port)
    listening_here = [c.laddr.port for c in psutil.Process().net_connections(kind="tcp")
                      if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    decoders = {rank: ch.FrameDecoder() for rank in pids}
    ready, said, deadline = set(), [], time.monotonic() + 90
    while len(ready) < len(pids) and time.monotonic() < deadline:   # RankReady: past init_process_group
        for item in agent.pull(0.2).items:
            if getattr(item, "stream", None) == "events":
                ready |= {item.rank for e in decoders[item.rank].feed(item.data)
                          if isinstance(e.message, ch.RankReady)}
            elif hasattr(item, "data"):
                said.append(item.data.decode(errors="replace"))
    torch_here = sorted(name for name in sys.modules if name == "torch" or name.startswith("torch."))
    # A task, as a session sends it: one frame for both ranks, rank 0 alone returning its value.
    # Its call is also a pull: the ranks' first answer comes back with it.
    from notebook_launcher.ranks.base import frame_of
    from notebook_launcher.serialization import dumps_task
    from notebook_launcher.workers.tasks import Execute
    task = ch.TaskRequest(dumps_task(Execute("6 * 7", "<agent-test>")), frozenset({0}))
    done, deadline = {}, time.monotonic() + 30
    while agent.pull(0.1).items:
        pass                                          # nothing older than the task's answers
    batch = agent.send_then_pull(sorted(pids), frame_of(task, 1), 5.0)
    first_call, first_kinds = None, None
    while len(done) < len(pids) and time.monotonic() < deadline:
        kinds = []
        for item in batch.items:
            if getattr(item, "stream", None) == "events":
                for e in decoders[item.rank].feed(item.data):
                    kinds.append(type(e.message).__name__)
                    if isinstance(e.message, ch.TaskDone):
                        done[item.rank] = e.message.value
        if first_call is None:                        # answers in the call's own batch, and what it held
            first_call, first_kinds = len(done), kinds or [type(i).__name__ for i in batch.items]
        batch = agent.pull(0.2)
    values = {rank: value if value is None else repr(value)[:40] for rank, value in done.items()}
    os.kill(pids[1], signal.SIGKILL)                  # a rank that ended is skipped by send, not an error
    psutil.Process(pids[1]).wait(10)
    try:
        agent.send(sorted(pids), ch.encode(ch.Envelope(0, ch.Shutdown())))
        sent_past_the_dead = True
    except OSError as exc:
        sent_past_the_dead = repr(exc)
    agent.close(graceful=False, term_grace=1.0)
    left = [p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    print(json.dumps(dict(ranks=len(pids), ready=sorted(ready), said=said, torch_here=torch_here[:5],
                          values=values, first_call=first_call, first_kinds=first_kinds,
                          listening_here=listening_here,
                          sent_past_the_dead=sent_past_the_dead, left=left)))
""")


def test_agent_0_never_imports_torch_its_first_rank_serves_the_store_and_nothing_is_left():
    result = subprocess.run([sys.executable, "-c", AGENT], capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["ranks"] == 2 and report["ready"] == [0, 1], report   # they met on the store
    assert report["torch_here"] == [], report
    # send_then_pull brought back the ranks' first answer with itself: their TaskDone, unless a
    # rank's own heartbeat (every 0.5 s) came first (a slow first task on a loaded machine)
    assert report["first_call"] or {"Heartbeat", "DeviceStats"} >= set(report["first_kinds"]) != set(), report
    assert report["values"]["1"] is None and report["values"]["0"] is not None, report   # only rank 0's value
    assert report["listening_here"] == [], report       # the first rank has the store's socket, not the agent
    assert report["sent_past_the_dead"] is True, report
    assert report["left"] == [], report


DIAL_WITH_A_BROKEN_PULL = textwrap.dedent("""
    import sys
    from notebook_launcher.ranks import agent, dial

    def pull(self, timeout):
        raise RuntimeError("the relay broke")

    agent.NodeAgent.pull = pull
    sys.exit(dial.main(sys.argv[1:]))
""")


def test_through_slurms_transport_a_pull_that_raises_ends_the_node_with_the_agents_words():
    token = "t" * TOKEN_BYTES
    listener = Listener(token=token)
    agent = subprocess.Popen([sys.executable, "-c", DIAL_WITH_A_BROKEN_PULL, "--dial", listener.dial],
                             env={**os.environ, TOKEN_ENV: token})
    try:
        listener.agents(1, agent, timeout=60)
        ended, deadline = None, time.monotonic() + 60
        while ended is None and time.monotonic() < deadline:
            for _, item in listener.batches(0.5):
                if not isinstance(item, AgentBatch):
                    ended = item
        assert isinstance(ended, NodeGone), ended
        assert str(ended) == "its agent failed: RuntimeError: the relay broke", ended
    finally:
        listener.close()                  # the notebook goes: the agent leaves
        code = agent.wait(timeout=30)
    assert code == 0
