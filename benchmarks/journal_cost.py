"""What the collective journal costs (issue 22): per collective, and beside the DDP loop's noise.

The journal (`notebook_launcher.workers.journal`) writes each Python-level collective into
a shared-memory record before it starts. Measured in real launched ranks (2 CPU
processes, gloo, fork), from a plain process, with the journal on and off
(``NOTEBOOK_LAUNCHER_JOURNAL=0``), configurations alternating over rounds:

1. **per collective**: the journal's own cost, its wrapper around a call that does nothing
   (what it adds to any collective, without the collective's noise), and ``all_reduce`` of
   one float, on and off (the collective itself, tens of microseconds, and its spread);
2. **the DDP benchmark loop** (the throughput row's model, `workloads.train`'s shape):
   steps per second on and off, as is (DDP's own collectives are issued from C++: not
   journaled, nothing to pay) and with a ``dist.all_reduce(loss)`` per step (a journaled
   collective every step, as people write for logging); the spread is each
   configuration's max - min over rounds, as a share of its median: the loop's noise.

Usage::

    python -m benchmarks.journal_cost [--rounds 5] [--calls 20000] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def per_call(calls: int) -> dict:
    """In a rank: microseconds per call of the journal's wrapper around a no-op, of the
    no-op, and of a real ``all_reduce`` of one float (through torch.distributed, journaled
    or not as the launch was started)."""
    import torch
    import torch.distributed as dist

    from notebook_launcher.workers import journal

    def nothing(tensor, op=None, group=None, async_op=False):
        return None

    wrapped = journal._wrap(journal.current(), "all_reduce", nothing, journal.OPS["all_reduce"]) \
        if journal.current() is not None else nothing
    tensor = torch.ones(1)

    def timed(function, n):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(n):
            function(tensor)
        return (time.perf_counter() - start) / n * 1e6

    return {"wrapper_us": timed(wrapped, calls), "nothing_us": timed(nothing, calls),
            "all_reduce_us": timed(dist.all_reduce, max(1, calls // 10))}


def ddp_loop(steps: int, all_reduce_loss: bool) -> float:
    """Steps per second of rank 0 in the DDP benchmark loop (`workloads.ddp_step`)."""
    import torch.distributed as dist

    from benchmarks.workloads import ddp_step

    step = ddp_step(0, after_backward=(lambda loss: dist.all_reduce(loss.detach())) if all_reduce_loss else None)
    for i in range(5):
        step(i)
    dist.barrier()
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    return steps / (time.perf_counter() - start)


def launch(function, *args, journal_on: bool):
    from notebook_launcher import notebook_launcher

    os.environ["NOTEBOOK_LAUNCHER_JOURNAL"] = "1" if journal_on else "0"
    try:
        return notebook_launcher(function, args=args, num_processes=2, device="cpu", display="none",
                                 start_method="fork")
    finally:
        os.environ.pop("NOTEBOOK_LAUNCHER_JOURNAL", None)


def spread(values: list) -> float:
    """Max - min over rounds, as a share of the median (percent)."""
    return (max(values) - min(values)) / statistics.median(values) * 100


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--json", default=None, help="write every sample here")
    args = parser.parse_args(argv)

    samples: dict = {}
    configs = [(f"{what} journal {'on' if on else 'off'}", what, on)
               for what in ("per call", "DDP loop", "DDP loop + all_reduce(loss)") for on in (True, False)]
    for round_ in range(args.rounds + 1):   # round 0 warms up (imports, first fork)
        for name, what, on in configs if round_ % 2 else reversed(configs):
            if what == "per call":
                value = launch(per_call, args.calls, journal_on=on)
            else:
                value = launch(ddp_loop, args.steps, what.endswith("(loss)"), journal_on=on)
            if round_:
                samples.setdefault(name, []).append(value)
    print(report(samples))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(samples, f, indent=1)
    return samples


def report(samples: dict) -> str:
    per = {name: {key: statistics.median(s[key] for s in runs) for key in runs[0]}
           for name, runs in samples.items() if name.startswith("per call")}
    on, off = per["per call journal on"], per["per call journal off"]
    all_on = [s["all_reduce_us"] for s in samples["per call journal on"]]
    all_off = [s["all_reduce_us"] for s in samples["per call journal off"]]
    lines = [
        "1. per collective (rank 0 of 2, gloo, medians of rounds)",
        f"   journal wrapper around a no-op: {on['wrapper_us']:.2f} us (the no-op alone: {on['nothing_us']:.2f} us)"
        f" -> the journal costs {on['wrapper_us'] - on['nothing_us']:.2f} us a collective",
        f"   all_reduce of 1 float: journal on {on['all_reduce_us']:.1f} us (spread {spread(all_on):.0f} %), "
        f"off {off['all_reduce_us']:.1f} us (spread {spread(all_off):.0f} %)",
        "",
        "2. the DDP benchmark loop (steps/s of rank 0; spread = max - min over rounds / median)",
        f"   {'':32s} {'journal on':>18s} {'journal off':>18s} {'on/off':>8s}",
    ]
    for what in ("DDP loop", "DDP loop + all_reduce(loss)"):
        runs_on, runs_off = samples[f"{what} journal on"], samples[f"{what} journal off"]
        median_on, median_off = statistics.median(runs_on), statistics.median(runs_off)
        lines.append(f"   {what:32s} {median_on:8.1f} ({spread(runs_on):4.1f} %) {median_off:8.1f} "
                     f"({spread(runs_off):4.1f} %) {median_on / median_off:8.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
