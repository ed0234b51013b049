"""The node agent (`ranks.agent.NodeAgent`) on its own, in a fresh process, as an engine
drives it: agent 0 reserves the store, starts its ranks, and serves the store beside
them (torch's import, seconds, no longer delays the start). The Ray and Slurm tests run
it through their engines; here, what they cannot make happen: the store's server failing
to start, which the next pull must say, and a close that still leaves nothing behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

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
    agent.close(graceful=False, term_grace=1.0)
    left = [p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    print(json.dumps(dict(ranks=len(pids), start_seconds=start_seconds, served_at_start=served_at_start, said=said,
                          served=served, left=left)))
""")


def run_agent(mode: str) -> dict:
    result = subprocess.run([sys.executable, "-c", AGENT, mode], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_agent_0_serves_the_store_beside_its_ranks_and_closes_clean():
    report = run_agent("torch")
    assert report["ranks"] == 2 and report["served"] and report["said"] == "", report
    assert not report["served_at_start"], report     # start() returned before torch was imported for the store
    assert report["left"] == [], report


def test_a_store_that_cannot_start_is_said_by_the_next_pull_and_nothing_is_left():
    report = run_agent("no-torch-here")
    assert report["ranks"] == 2 and not report["served"], report
    assert report["said"].startswith("the rendezvous store could not start: ModuleNotFoundError"), report
    assert report["left"] == [], report
