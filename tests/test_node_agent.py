"""The node agent (`ranks.agent.NodeAgent`) on its own, in a fresh process, as an engine
drives it: agent 0 reserves the store, starts its ranks, and serves the store beside
them (torch's import, seconds, no longer delays the start). The Ray and Slurm tests run
it through their engines; here, what they cannot make happen: the store's server failing
to start, which the next pull must say, and a close that still leaves nothing behind; and
the same failure through Slurm's transport (the real `dial` agent process dialing the
notebook's real `Listener`, without Slurm), where it must end the node with the agent's words.
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
from notebook_launcher.ranks.plan import NodePlan
from notebook_launcher.ranks.remote import NodeGone
from notebook_launcher.ranks.slurm_engine import Listener

AGENT = textwrap.dedent("""
    import json, sys, time
    import psutil
    from notebook_launcher.ranks.agent import NodeAgent
    from notebook_launcher.ranks.plan import NodePlan

    if sys.argv[1] == "no-torch-here":
        sys.modules["torch.distributed"] = None      # this process cannot import it: the store cannot start
    plan = NodePlan(node_rank=0, nproc=2, world_size=2, backend="gloo", device_type="cpu", mixed_precision="no",
                    num_threads=1, env={}, persistent=True, run_id="agent-test")
    agent = NodeAgent()
    address, port = agent.reserve_store(plan)
    started = time.monotonic()
    pids = agent.start(plan, address, port)
    start_seconds = time.monotonic() - started
    served_at_start = agent.group.rdzv.store is not None
    said, deadline = "", time.monotonic() + 60
    while not said and time.monotonic() < deadline:
        try:
            agent.pull(0.2)
        except RuntimeError as exc:
            said = str(exc)
        if sys.argv[1] == "torch" and agent.group.rdzv.store is not None:
            break                                     # served: the ranks can meet
    served = agent.group.rdzv.store is not None
    sent_past_the_dead = None
    if sys.argv[1] == "torch":                        # a rank that ended is skipped by send, not an error
        import os, signal
        from notebook_launcher import channel as ch
        os.kill(pids[1], signal.SIGKILL)
        psutil.Process(pids[1]).wait(10)
        try:
            agent.send(sorted(pids), ch.encode(ch.Envelope(0, ch.Shutdown())))
            sent_past_the_dead = True
        except OSError as exc:
            sent_past_the_dead = repr(exc)
    agent.close(graceful=False, term_grace=1.0)
    left = [p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    print(json.dumps(dict(ranks=len(pids), start_seconds=start_seconds, served_at_start=served_at_start, said=said,
                          served=served, sent_past_the_dead=sent_past_the_dead, left=left)))
""")


def run_agent(mode: str) -> dict:
    result = subprocess.run([sys.executable, "-c", AGENT, mode], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_agent_0_serves_the_store_beside_its_ranks_sends_past_a_dead_one_and_closes_clean():
    report = run_agent("torch")
    assert report["ranks"] == 2 and report["served"] and report["said"] == "", report
    assert not report["served_at_start"], report     # start() returned before torch was imported for the store
    assert report["sent_past_the_dead"] is True, report
    assert report["left"] == [], report


def test_a_store_that_cannot_start_is_said_by_the_next_pull_and_nothing_is_left():
    report = run_agent("no-torch-here")
    assert report["ranks"] == 2 and not report["served"], report
    assert report["said"].startswith("the rendezvous store could not start: ModuleNotFoundError"), report
    assert report["left"] == [], report


DIAL_WITHOUT_TORCH = ("import sys; sys.modules['torch.distributed'] = None\n"
                      "from notebook_launcher.ranks.dial import main; sys.exit(main(sys.argv[1:]))")


def test_through_slurms_transport_a_store_that_cannot_start_ends_the_node_with_the_agents_words():
    token = "t" * TOKEN_BYTES
    listener = Listener(token=token)
    agent = subprocess.Popen([sys.executable, "-c", DIAL_WITHOUT_TORCH, "--dial", listener.dial],
                             env={**os.environ, TOKEN_ENV: token})
    try:
        link = listener.agents(1, agent, timeout=60)[0]
        plan = NodePlan(node_rank=0, nproc=1, world_size=1, backend="gloo", device_type="cpu",
                        mixed_precision="no", num_threads=1, env={}, persistent=True, run_id="dial-test")
        address, port = link.call_async("reserve_store", (plan,)).result(30)
        link.call_async("start", (plan, address, port)).result(60)
        ended, deadline = None, time.monotonic() + 60
        while ended is None and time.monotonic() < deadline:
            for _, item in listener.batches(0.5):
                if not isinstance(item, AgentBatch):
                    ended = item
        assert isinstance(ended, NodeGone), ended
        assert str(ended).startswith("its agent failed: RuntimeError: the rendezvous store could not start: "
                                     "ModuleNotFoundError"), ended
    finally:
        listener.close()                  # the notebook goes: the agent stops its rank and leaves
        code = agent.wait(timeout=30)
    assert code == 0
