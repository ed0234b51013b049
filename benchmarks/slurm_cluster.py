"""Ours on an idle local Slurm beside submitit, in one run (issue 20).

A one-node Slurm of its own (`tests/slurm_cluster.LocalSlurm`: Debian's slurm-wlm and munge,
no accounting). The same function on 2 ranks (gloo process group formed, then the time
noted) is started from this process, in shuffled rounds, and we print medians of:

- the time from the call to every rank inside the function, process group ready:
  ``notebook_launcher(fn, num_processes=2, cluster="slurm")`` (a holding job, srun, agents,
  ranks) against submitit's ``AutoExecutor`` with ``tasks_per_node=2`` (one sbatch job, the
  function pickled to a shared folder, ``init_process_group`` from
  ``submitit.helpers.TorchDistributedEnvironment``);
- ours: the whole call (the value back in the cell, the job gone).

submitit learns that a job ended by polling ``sacct``, which needs slurmdbd; this cluster
(like many) has none, so its times here are read from files the ranks write, not from its
job objects.

    python benchmarks/slurm_cluster.py --rounds 5
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (REPO, os.path.join(REPO, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)


def ours_entered(config=None):
    import torch.distributed as dist

    entered = time.time()
    dist.barrier()
    return entered


def submitit_entered(out_dir: str):
    import torch.distributed as dist
    import submitit

    submitit.helpers.TorchDistributedEnvironment().export()
    dist.init_process_group("gloo")
    entered = time.time()
    dist.barrier()
    with open(os.path.join(out_dir, f"rank{dist.get_rank()}"), "w") as f:
        f.write(repr(entered))
    dist.destroy_process_group()


def ours() -> tuple:
    from notebook_launcher import notebook_launcher

    started = time.time()
    entered = notebook_launcher(ours_entered, num_processes=2, cluster="slurm", return_all=True, display="none")
    return max(entered) - started, time.time() - started


def submitit_run(folder: str, slurm) -> float:
    import submitit

    out_dir = tempfile.mkdtemp(dir=folder)
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(nodes=1, tasks_per_node=2, cpus_per_task=1, timeout_min=10, slurm_use_srun=True)
    started = time.time()
    job = executor.submit(submitit_entered, out_dir)
    deadline = time.time() + 300
    while len(glob.glob(os.path.join(out_dir, "rank*"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    entered = max(float(open(path).read()) for path in glob.glob(os.path.join(out_dir, "rank*")))
    slurm.wait_queue_empty(timeout=60)
    del job
    return entered - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from slurm_cluster import LocalSlurm

    folder = tempfile.mkdtemp(prefix="nl-bench-slurm-")
    with LocalSlurm() as slurm:
        os.environ["SLURM_CONF"] = slurm.conf
        ours()                                    # warm-up: imports, page cache
        rows = {"ours": [], "ours-call": [], "submitit": []}
        for _ in range(args.rounds):
            cases = ["ours", "submitit"]
            random.shuffle(cases)
            for who in cases:
                if who == "ours":
                    entered, whole = ours()
                    rows["ours"].append(entered)
                    rows["ours-call"].append(whole)
                else:
                    rows["submitit"].append(submitit_run(folder, slurm))
                slurm.wait_queue_empty(timeout=60)
    a, b = statistics.median(rows["ours"]), statistics.median(rows["submitit"])
    print(f"\nidle one-node Slurm, 2 ranks (gloo), medians of {args.rounds} rounds")
    print(f"{'':46}{'ours':>9}{'submitit':>11}{'ratio':>8}")
    print(f"{'call -> every rank in the function':46}{a:8.2f}s{b:10.2f}s{a / b:8.2f}x")
    print(f"{'ours: the whole call (value back, job gone)':46}{statistics.median(rows['ours-call']):8.2f}s")


if __name__ == "__main__":
    main()
