"""Launch latency from a bigger parent: a process that imported lightning and accelerate.

The launch row of `run_all.py` launches from hosts that import only torch (about 1,200
modules). A notebook that uses Lightning or HF accelerate has imported them before it
launches (about 4,000 modules), and everything that grows with the parent shows only
there: forking copies a bigger page table, and a forked rank that reads every module or
logger copies a page for each (copy-on-write). This script launches a trivial function
on 2 CPU ranks (gloo) side by side in such a parent, one run, the same host for all:

- ``os.fork``: the floor, ``os.fork`` + ``init_process_group`` and nothing else;
- ``lightning``: Lightning Fabric's ``ddp_notebook`` strategy;
- ``ours``: ``notebook_launcher`` (fork);

and, as the reference, ``os.fork`` and ours from a host that imported only torch (no
Lightning column there: importing it would make that parent the bigger one). Every
host is a plain Python process and, with ``--where kernel``, a real Jupyter kernel.

With ``--wait-while-closing``, one more column, ``ours, exit wait fixed``: ours with the
change to ``ranks/local.py`` that `profile_launch.wait_while_closing` proposes (while the
group closes, wait on the exiting ranks' pipes and sentinels instead of sleeping 50 ms),
swapped in for that call only.

Times are seconds from just before the call (`launch_latency.measure`): "whole call" to
its return, "all ranks in fn" to the last rank inside the function with its process
group ready. "rank 0 page faults": the minor page faults rank 0 took from its fork to
inside the function (a launch of its own, `rank_faults`), which the machine's load does
not change: what a rank's setup writes in the parent's memory, each page copied.
Every case runs once per round, shuffled; warm-up rounds are not counted; medians and
ratios of medians. Target (issue 18): in the bigger parent, ours' whole call at most
1.2x the floor's and below Lightning's.

    python benchmarks/big_parent.py                   # 20 samples, 2 warm-up rounds, plain and kernel
    python benchmarks/big_parent.py --samples 32 --where plain -v
    python benchmarks/big_parent.py --wait-while-closing   # and the proposed change to ranks/local.py
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks import cases, table  # noqa: E402

NPROC = 2
WHERES = ("plain", "kernel")
# parent -> what its host imports before any launch (besides the benchmark's own code)
PARENTS = {
    "torch": "import torch",
    "+lightning+accelerate": "import torch, lightning, lightning.pytorch, lightning.fabric, accelerate",
}
# parent -> the contenders launched from it (our column is ours-fork)
CONTENDERS = {"torch": ("os.fork", "ours-fork"), "+lightning+accelerate": ("os.fork", "lightning", "ours-fork")}
COLUMNS = ("os.fork", "lightning", "ours-fork")
FIXED = "ours, exit wait fixed"   # the --wait-while-closing experiment
TARGET_VS_FLOOR = 1.2   # issue 18: ours' whole call in the bigger parent, at most this times the floor's
METRICS = (("call", "whole call"), ("ready", "all ranks in fn"), ("faults", "rank 0 page faults"))


def setup_code(parent: str) -> str:
    """A host's first cell: the benchmark's functions (as in every host), the parent's
    imports, our launcher; prints how many modules the parent holds."""
    return "\n".join([cases.setup_code(), PARENTS[parent], "from notebook_launcher import notebook_launcher",
                      "from benchmarks import big_parent as _b_big", "_bench_emit({'modules': len(_sys.modules)})"])


def measure_fixed_exit_wait(fn, nproc: int) -> dict:
    """Runs in a host: `launch_latency.measure` of ours with the proposed change (see the
    module docstring), put back after the call."""
    from notebook_launcher.ranks import local

    from . import launch_latency, profile_launch

    original = local.LocalRanks._wait_raw
    profile_launch.wait_while_closing()
    try:
        return launch_latency.measure("ours-fork", fn, nproc)
    finally:
        local.LocalRanks._wait_raw = original


def rank_faults(out_dir, init):
    """The workload of the "page faults" measure: the minor page faults this rank took from
    its fork to here, inside the function with the process group ready. Forked from a big
    parent, a rank's setup pays a fault for every page it writes (copy-on-write): a count
    that the machine's load does not change."""
    import resource

    import torch.distributed as dist

    if init:
        dist.init_process_group("gloo")
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    dist.barrier()
    return faults


def measure_faults(name: str, nproc: int) -> dict:
    """Runs in a host: rank 0's page faults before the function, with contender ``name``."""
    from . import contenders
    from ._timing import scratch, settle

    settle()
    with scratch() as out_dir:
        return {"faults": contenders.launch(name, rank_faults, out_dir, (), nproc)}


def _code(name: str, kind: str) -> str:
    if kind == "faults":
        return f"_bench_emit(_b_big.measure_faults({name!r}, {NPROC}))"
    if name == FIXED:
        return f"_bench_emit(_b_big.measure_fixed_exit_wait(trivial, {NPROC}))"
    return f"_bench_emit(_b_launch.measure({name!r}, trivial, {NPROC}))"


def start_hosts(wheres: list, timeout: float) -> tuple:
    """({(where, parent): runner}, {(where, parent): modules}), started in parallel."""
    from benchmarks.kernel_runner import KernelRunner
    from benchmarks.process_runner import ProcessRunner

    hosts, modules, errors = {}, {}, []
    lock = threading.Lock()

    def start(where: str, parent: str) -> None:
        try:
            runner = KernelRunner(f"big-{parent}") if where == "kernel" else ProcessRunner(f"big-{parent}")
            with lock:
                hosts[(where, parent)] = runner
            output = runner.execute(setup_code(parent), timeout=timeout)
            if not output.ok:
                raise RuntimeError(output.error.strip().splitlines()[-1] if output.error.strip() else "failed")
            with lock:
                modules[(where, parent)] = cases.parse(output.stdout)["modules"]
        except Exception as exc:
            with lock:
                errors.append(f"{where}/{parent}: {exc}")

    threads = [threading.Thread(target=start, args=(w, p)) for w in wheres for p in PARENTS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        close_hosts(hosts)
        raise RuntimeError("could not start the hosts:\n" + "\n".join(errors))
    return hosts, modules


def close_hosts(hosts: dict) -> None:
    for runner in hosts.values():
        try:
            runner.close()
        except Exception as exc:  # keep closing the others
            print(f"closing {runner.name}: {exc}", file=sys.stderr)


def run(hosts: dict, samples: int, warmup: int, seed: int, timeout: float, verbose: bool,
        fix_exit_wait: bool = False) -> dict:
    """{(where, parent, contender): [{"call": s, "ready": s}, {"faults": n} or {"error": text}, ...]}:
    per round, a timed launch of each contender and one more that counts its page faults."""
    extra = (FIXED,) if fix_exit_wait else ()
    order = [(where, parent, name, "time") for (where, parent) in hosts for name in (*CONTENDERS[parent], *extra)]
    order += [(where, parent, name, "faults") for (where, parent) in hosts for name in CONTENDERS[parent]]
    rng = random.Random(seed)
    results: dict = {}
    for index in range(warmup + samples):
        rng.shuffle(order)
        for where, parent, name, kind in order:
            try:
                output = hosts[(where, parent)].execute(_code(name, kind), timeout=timeout)
                if not output.ok:
                    raise RuntimeError(output.error.strip().splitlines()[-1] if output.error.strip() else "failed")
                sample = cases.parse(output.stdout)
            except Exception as exc:
                sample = {"error": str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}
            if index >= warmup:
                results.setdefault((where, parent, name), []).append(sample)
            if verbose:
                what = "warm-up" if index < warmup else f"round {index - warmup + 1}"
                print(f"  {what}: {where:6} {parent:22} {name:10} {kind:6} {sample}", file=sys.stderr, flush=True)
    return results


def median(results: dict, key: tuple, metric: str):
    values = [s[metric] for s in results.get(key, []) if metric in s]
    return statistics.median(values) if values else None


def render(results: dict, modules: dict, wheres: list, fix_exit_wait: bool = False) -> tuple:
    """(table lines, [(target name, verdict)])."""
    extra = (FIXED,) if fix_exit_wait else ()
    header = ["where", "parent", "modules", "measure", *COLUMNS, *extra, "ours/floor", "ours/lightning",
              *(["fixed/floor"] if fix_exit_wait else []), "target"]
    rows, targets = [], []
    for where in wheres:
        for parent in PARENTS:
            if (where, parent) not in modules:
                continue
            for metric, label in METRICS:
                value = {name: median(results, (where, parent, name), metric) for name in (*COLUMNS, *extra)}
                floor = table._ratio(value["ours-fork"], value["os.fork"])
                peer = table._ratio(value["ours-fork"], value["lightning"])
                verdict = ""
                if metric == "call" and parent != "torch":
                    verdict = _verdict(floor, peer)
                    targets.append((f"{where}, {parent}", verdict))
                fixed = [table._x(table._ratio(value[FIXED], value["os.fork"]))] if fix_exit_wait else []
                number = (lambda v: "-" if v is None else f"{v:.0f}") if metric == "faults" else table._num
                rows.append([where, parent, str(modules[(where, parent)]), label,
                             *[number(value[name]) for name in (*COLUMNS, *extra)], table._x(floor),
                             table._x(peer), *fixed, verdict])
    return table._grid(header, rows), targets


def _verdict(vs_floor, vs_lightning) -> str:
    if vs_floor is None or vs_lightning is None:
        return "no data"
    misses = [what for what, ok in (("floor", vs_floor <= TARGET_VS_FLOOR), ("lightning", vs_lightning < 1.0))
              if not ok]
    return f"MISS {','.join(misses)}" if misses else "ok"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20, help="measured rounds (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="rounds not counted (default 2)")
    parser.add_argument("--where", default=",".join(WHERES), help="plain, kernel or both")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per launch (and per host setup)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wait-while-closing", action="store_true",
                        help=f"experiment: also ours with the proposed change to ranks/local.py (column {FIXED!r})")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every sample as it is taken")
    args = parser.parse_args(argv)
    wheres = [w for w in WHERES if w in args.where.split(",")]
    if not wheres:
        raise SystemExit(f"--where: choose from {', '.join(WHERES)}")
    from benchmarks.run_all import leftover_processes, machine

    hosts, modules = start_hosts(wheres, args.timeout)
    try:
        results = run(hosts, args.samples, args.warmup, args.seed, args.timeout, args.verbose, args.wait_while_closing)
    finally:
        close_hosts(hosts)
    left = leftover_processes()
    lines, targets = render(results, modules, wheres, args.wait_while_closing)
    print(f"Machine: {machine()}")
    print(f"Launch of a trivial function from a bigger parent, {NPROC} CPU ranks (gloo); seconds from the call, "
          f"median of {args.samples} rounds after {args.warmup} warm-up rounds; cases shuffled in each round; "
          "every contender of a parent launches from the same host. modules: len(sys.modules) in that host.")
    print("\n".join(lines))
    print("Targets (ours' whole call <= 1.2x os.fork's and below Lightning's): "
          + "; ".join(f"{name}: {verdict}" for name, verdict in targets))
    errors = {key: [s["error"] for s in found if "error" in s] for key, found in results.items()}
    for key, found in sorted((k, v) for k, v in errors.items() if v):
        print(f"ERROR {'/'.join(key)}: {len(found)} of {len(results[key])} failed; last: {found[-1]}")
    if left:
        print(f"LEFT BEHIND: {[(p.pid, p.name()) for p in left]}")
    return 1 if left or any(errors.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
