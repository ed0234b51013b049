"""Ours on a local Ray cluster beside Ray Train's `TorchTrainer`, in one run (issue 19).

A head and a second node (1 CPU each, no dashboard, a small object store) on this machine,
started here. The same trivial 2-rank job (one rank per node, gloo, an all_reduce) is run
by both, from the driver (this process), in shuffled rounds; medians, and ratios of medians:

- a one-shot call: ``notebook_launcher(fn, num_processes=1, num_nodes=2, cluster="ray")``
  against ``TorchTrainer(fn, scaling_config=ScalingConfig(num_workers=2)).fit()`` (its first
  fit is shown apart: it pays for Ray Train's own start-up);
- a rank's error reaching the driver: the same call and ``fit()`` with rank 1 raising;
- a trivial session cell from a real kernel connected to the cluster: ``%%dist x = 1`` on a
  2-node session against a plain cell (``pass``) in the same kernel (Ray Train has no
  session: every ``fit()`` builds its worker group again);
- a lost node: the second node removed while the ranks run; seconds until the call raises;
- the floors: a Ray actor call round trip, and two actors called in parallel.

Each timed call starts on an idle machine (`quiet`): a failing ``fit()`` returns while Ray
Train still tears its workers down, and on a 2-core machine that teardown would be timed as
part of whichever call comes next, ours or Ray Train's. The session cell's overhead is the
median of each round's difference to the plain cell of the same round (as in
``session_cell.py``), measured first, on the fresh cluster, while this process (the
kernel's client, as a notebook's front end is) is not yet a Ray driver: connected, it made
every cell it timed about 1 ms slower, plain ones too.

    python benchmarks/ray_cluster.py                 # 5 rounds after a warm-up
    python benchmarks/ray_cluster.py --rounds 3 --skip-lost

Targets: a one-shot call at most 0.25x ``fit()``'s; a rank's error at most 0.25x a failing
``fit()``'s; a trivial session cell at most 5 ms over a plain cell; a lost node within 10 s.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import textwrap
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

NODE = dict(num_cpus=1, object_store_memory=80 * 2**20)


# ----------------------------------------------------------------- the job, for both
def trivial(config=None):
    import torch
    import torch.distributed as dist

    t = torch.ones(1) * (dist.get_rank() + 1)
    dist.all_reduce(t)
    return t.item()


def failing(config=None):
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("rank 1 fails")
    dist.barrier()


def ours(function) -> float:
    from notebook_launcher import notebook_launcher

    started = time.perf_counter()
    try:
        notebook_launcher(function, num_processes=1, num_nodes=2, cluster="ray", display="none")
    except Exception:
        pass
    return time.perf_counter() - started


def ray_train(function, storage: str) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started = time.perf_counter()
    try:
        TorchTrainer(function, scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                     run_config=RunConfig(storage_path=storage)).fit()
    except Exception:
        pass
    return time.perf_counter() - started


def quiet(limit: float = 30.0, busy: float = 25.0) -> float:
    """Wait until the machine's CPUs are idle (under ``busy`` percent over two 0.2 s looks
    in a row, at most ``limit`` seconds); the seconds waited."""
    import psutil

    started = time.perf_counter()
    calm = 0
    while calm < 2 and time.perf_counter() - started < limit:
        calm = calm + 1 if psutil.cpu_percent(interval=0.2) < busy else 0
    return time.perf_counter() - started


def actor_floor(ray) -> tuple:
    @ray.remote(num_cpus=0)
    class Echo:
        def ping(self):
            return 1

    actors = [Echo.remote() for _ in range(2)]
    ray.get([a.ping.remote() for a in actors])
    one, two = [], []
    for _ in range(200):
        t = time.perf_counter()
        ray.get(actors[0].ping.remote())
        one.append(time.perf_counter() - t)
        t = time.perf_counter()
        ray.get([a.ping.remote() for a in actors])
        two.append(time.perf_counter() - t)
    for actor in actors:
        ray.kill(actor)
    return statistics.median(one), statistics.median(two)


# ----------------------------------------------------------------- kernel cells
def session_cells(address: str, samples: int) -> tuple:
    """(a plain cell, a trivial %%dist cell on a 2-node Ray session over the plain cell of
    the same round), median seconds, from a kernel."""
    from benchmarks.kernel_runner import KernelRunner

    with KernelRunner("ray-session") as kernel:
        setup = kernel.execute(textwrap.dedent(f"""
            import ray, time
            ray.init(address={address!r}, log_to_driver=False)
            %load_ext notebook_launcher
            %dist start -n 1 --nodes 2 --cluster ray --display none
        """), timeout=600)
        if not setup.ok:
            raise RuntimeError(setup.error)
        plain, over = [], []
        for _ in range(samples + 5):
            took = {}
            for name, code in random.sample([("plain", "pass"), ("dist", "%%dist\nx = 1")], 2):
                started = time.perf_counter()
                out = kernel.execute(code)
                took[name] = time.perf_counter() - started
                if not out.ok:
                    raise RuntimeError(out.error)
            plain.append(took["plain"])
            over.append(took["dist"] - took["plain"])
        kernel.execute("%dist stop", timeout=120)
    return statistics.median(plain[5:]), statistics.median(over[5:])


def lost_node_seconds(cluster) -> float:
    """Seconds from removing the second node to the call raising."""
    import threading

    from notebook_launcher import notebook_launcher

    def long_job():
        import torch
        import torch.distributed as dist

        for _ in range(3000):
            dist.all_reduce(torch.ones(1))
            time.sleep(0.05)

    ended = {}

    def call():
        try:
            notebook_launcher(long_job, num_processes=1, num_nodes=2, cluster="ray", display="none")
        except Exception as exc:
            ended["at"], ended["error"] = time.monotonic(), str(exc).splitlines()[0]

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(15)   # placed, started, running
    removed = time.monotonic()
    cluster.remove_node(cluster.worker_nodes and list(cluster.worker_nodes)[0], allow_graceful=False)
    thread.join(timeout=120)
    print(f"    lost node error: {ended.get('error')}")
    return ended.get("at", float("inf")) - removed


# ----------------------------------------------------------------- the run
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=30, help="session cells per row")
    parser.add_argument("--skip-lost", action="store_true", help="leave out the lost-node row")
    args = parser.parse_args()

    import tempfile

    import ray
    from ray.cluster_utils import Cluster

    storage = tempfile.mkdtemp(prefix="nl-bench-ray-")
    t0 = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    started_in = time.perf_counter() - t0
    try:
        quiet()
        plain, cell_over = session_cells(cluster.address, args.samples)   # before this process is a driver
        ray.init(address=cluster.address, log_to_driver=False)
        floor_one, floor_two = actor_floor(ray)
        first_fit = ray_train(trivial, storage)
        ours(trivial)  # warm-up (imports, Ray's worker pool)
        rows = {"call": ([], []), "error": ([], [])}
        waited = []
        for _ in range(args.rounds):
            cases = [("call", "ours", trivial), ("call", "ray", trivial), ("error", "ours", failing),
                     ("error", "ray", failing)]
            random.shuffle(cases)
            for row, who, function in cases:
                waited.append(quiet())
                seconds = ours(function) if who == "ours" else ray_train(function, storage)
                rows[row][0 if who == "ours" else 1].append(seconds)
        lost = None if args.skip_lost else lost_node_seconds(cluster)
    finally:
        ray.shutdown()
        cluster.shutdown()

    def med(values):
        return statistics.median(values)

    print(f"\nRay local cluster (head + 1 node, 1 CPU each), started in {started_in:.1f} s; "
          f"medians of {args.rounds} rounds")
    print(f"{'':44}{'ours':>10}{'Ray Train':>12}{'ratio':>8}")
    for row, label in (("call", "trivial 2-rank all_reduce, whole call"), ("error", "rank 1 raises -> error in the driver")):
        a, b = med(rows[row][0]), med(rows[row][1])
        print(f"{label:44}{a:9.2f}s{b:11.2f}s{a / b:8.2f}x")
    print(f"{'Ray Train: first fit() of the process':44}{'':10}{first_fit:11.2f}s")
    print(f"{'trivial session cell, over a plain cell':44}{cell_over * 1e3:8.2f}ms{'(no session)':>12}"
          f"   plain cell {plain * 1e3:.2f} ms")
    print(f"{'waited for an idle machine before a call':44}{med(waited):9.2f}s (median; longest {max(waited):.1f} s)")
    if lost is not None:
        print(f"{'a node removed -> the call raises':44}{lost:9.2f}s")
    print(f"{'floor: one Ray actor call round trip':44}{floor_one * 1e3:8.2f}ms")
    print(f"{'floor: two actors called in parallel':44}{floor_two * 1e3:8.2f}ms")


if __name__ == "__main__":
    main()
