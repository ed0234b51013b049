"""What the live dashboard costs a training loop (a measurement, not a timed test).

Prints, from one run:

1. ``report()`` cost per call inside a launched worker (float values, a 0-d tensor, and
   outside any worker, where it is a no-op);
2. steps/second of a small DDP training loop (2 CPU workers, gloo) run from a real
   Jupyter kernel, side by side: without report()/progress(), with them and
   ``display="none"``, and with them and the live widgets dashboard (whose messages a
   client drains, as a browser would). Configurations alternate over several rounds
   and medians are shown; the target is a dashboard cost under 2 %. "kernel CPU" is
   the share of one core the kernel (parent) used during the launch, start and end
   included: the less it takes, the less it can take from the workers.

3. with ``--cuda`` (a machine with an NVIDIA GPU): what ``report(loss=loss)`` costs a GPU
   loop when ``loss`` is a CUDA tensor (read on the channel's thread, no sync in the
   loop) against calling ``loss.item()`` yourself, and that the parent never
   initialized CUDA.

Usage::

    python benchmarks/dashboard_overhead.py [--steps 3000] [--rounds 3] [--cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import sys
import textwrap
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

KERNEL_SETUP = """
import json, time, torch
import torch.distributed as dist
from notebook_launcher import notebook_launcher, report, progress

def train(steps, use_reporting):
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    loop = progress(range(steps), desc="step") if use_reporting else range(steps)
    for step in loop:
        if step == 100:                       # warm-up done: time the rest
            start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if use_reporting:
            report(step, loss=loss, lr=0.01)  # a 0-d tensor and a float, every step
    return (steps - 100) / (time.perf_counter() - start)

import psutil
_kernel = psutil.Process()

def measured(steps, use_reporting, display):
    # (steps/s in the workers, CPU seconds this kernel spent per second of the run)
    before, start = _kernel.cpu_times(), time.perf_counter()
    rate = notebook_launcher(train, args=(steps, use_reporting), num_processes=2, device="cpu", display=display)
    after, wall = _kernel.cpu_times(), time.perf_counter() - start
    return rate, (after.user + after.system - before.user - before.system) / wall
"""

REPORT_COST = """
def report_cost(calls):
    import statistics, time, torch
    results = {}
    for label, value in (("float", 0.5), ("0-d tensor", torch.tensor(0.5))):
        samples = []
        for _ in range(calls // 500):
            start = time.perf_counter()
            for step in range(500):
                report(step, loss=value, lr=1e-3)
            samples.append((time.perf_counter() - start) / 500)
            time.sleep(0.12)                  # the channel's flusher ships the batch meanwhile
        results[label] = statistics.median(samples) * 1e6
    return results
"""


class Kernel:
    """A real ipykernel; output is collected, widget messages are drained and counted."""

    def __init__(self) -> None:
        from jupyter_client import KernelManager

        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(cwd=REPO, env=env)
        self.client = self.km.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=120)

    def run(self, code: str, timeout: float = 600) -> tuple[str, int]:
        """Execute a cell; return (its stdout, comm messages seen while it ran)."""
        msg_id = self.client.execute(textwrap.dedent(code))
        stdout, comms, deadline = [], 0, time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.client.get_iopub_msg(timeout=1)
            except queue.Empty:
                continue
            kind = msg["msg_type"]
            comms += kind == "comm_msg"
            mine = msg["parent_header"].get("msg_id") == msg_id
            if mine and kind == "stream" and msg["content"]["name"] == "stdout":
                stdout.append(msg["content"]["text"])
            elif mine and kind == "error":
                raise RuntimeError("\n".join(msg["content"]["traceback"]))
            elif mine and kind == "status" and msg["content"]["execution_state"] == "idle":
                return "".join(stdout), comms
        raise TimeoutError(f"cell did not finish in {timeout}s")

    def value(self, expression: str) -> tuple:
        out, comms = self.run(f"print('RESULT', json.dumps({expression}))")
        line = [line for line in out.splitlines() if line.startswith("RESULT ")][-1]
        return json.loads(line[len("RESULT "):]), comms

    def close(self) -> None:
        self.client.stop_channels()
        self.km.shutdown_kernel(now=True)


CUDA_LOOP = """
import time, torch
from notebook_launcher import report

def gpu_loop(mode, steps, size):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(size, size, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    model = torch.nn.Sequential(*layers)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    x = torch.randn(512, size, device="cuda", dtype=torch.bfloat16)
    for step in range(steps + 20):
        if step == 20:
            torch.cuda.synchronize()
            start = time.perf_counter()
        loss = model(x).float().pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if mode == "report(loss=tensor)":
            report(step, loss=loss)
        elif mode == "report(loss=loss.item())":
            report(step, loss=loss.item())
    torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)

def report_cost_cuda(calls):
    import statistics
    value = torch.tensor(0.5, device="cuda")
    samples = []
    for _ in range(calls // 500):
        start = time.perf_counter()
        for step in range(500):
            report(step, loss=value)
        samples.append((time.perf_counter() - start) / 500)
        time.sleep(0.12)
    return statistics.median(samples) * 1e6
"""

CUDA_MODES = ("no report()", "report(loss=tensor)", "report(loss=loss.item())")


def cuda_section(steps: int, rounds: int) -> None:
    """GPU loop: report() of a CUDA scalar must not add a sync per step."""
    import torch

    from notebook_launcher import notebook_launcher

    namespace: dict = {}
    exec(CUDA_LOOP, namespace)  # noqa: S102 - defines the worker functions at module level
    cost = notebook_launcher(namespace["report_cost_cuda"], args=(10_000,), num_processes=1, display="none")
    print(f"report() with a CUDA 0-d tensor: {cost:.2f} us per call (rank 0, 1 GPU)")
    rates = {mode: [] for mode in CUDA_MODES}
    for _ in range(rounds):
        for mode in CUDA_MODES:
            rates[mode].append(notebook_launcher(namespace["gpu_loop"], args=(mode, steps, 2048),
                                                 num_processes=1, display="text"))
    base = statistics.median(rates[CUDA_MODES[0]])
    print(f"GPU loop: 4 bf16 Linear(2048) layers, batch 512, {steps} steps, 1 worker, {rounds} rounds")
    for mode in CUDA_MODES:
        median = statistics.median(rates[mode])
        print(f"  {mode:<28} {median:10.1f} steps/s {(median / base - 1) * 100:+8.1f}%")
    print(f"CUDA initialized in the parent after all this: {torch.cuda.is_initialized()}")


CONFIGS = (   # label, use report()/progress(), display
    ("no report()", False, "none"),
    ('report(), display="none"', True, "none"),
    ("report(), live dashboard", True, "widgets"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--cuda", action="store_true", help="also measure the GPU path (needs a GPU)")
    parser.add_argument("--cuda-steps", type=int, default=2000)
    options = parser.parse_args()

    from notebook_launcher import report

    start = time.perf_counter()
    for step in range(100_000):
        report(step, loss=0.5)
    outside = (time.perf_counter() - start) / 100_000 * 1e6

    kernel = Kernel()
    try:
        kernel.run(KERNEL_SETUP + REPORT_COST)
        costs, _ = kernel.value(f'notebook_launcher(report_cost, args=({options.calls},), num_processes=2, device="cpu", display="none")')
        print(f"report() cost per call (rank 0 of 2 CPU workers, median of batches of 500, 2 metrics):")
        for label, micros in costs.items():
            print(f"  {label:<12} {micros:6.2f} us")
        print(f"  {'not a worker':<12} {outside:6.2f} us (no-op)")
        print()

        rates = {label: [] for label, *_ in CONFIGS}
        messages = {label: [] for label, *_ in CONFIGS}
        parent = {label: [] for label, *_ in CONFIGS}
        for index in range(options.rounds):
            for label, reporting, display in (CONFIGS if index % 2 == 0 else CONFIGS[::-1]):  # cancels drift
                (rate, cpu), comms = kernel.value(f'measured({options.steps}, {reporting}, "{display}")')
                rates[label].append(rate)
                messages[label].append(comms)
                parent[label].append(cpu)
        base = statistics.median(rates[CONFIGS[1][0]])
        bare = statistics.median(rates[CONFIGS[0][0]])
        print(f"training loop: DDP MLP, 2 CPU workers (gloo), {options.steps} steps, "
              f"{options.rounds} alternating rounds, from a Jupyter kernel")
        print(f"  {'configuration':<28} {'steps/s (median)':>17} {'runs':>24} {'vs display=none':>16} "
              f"{'vs no report':>13} {'widget msgs':>12} {'kernel CPU':>11}")
        for label, *_ in CONFIGS:
            median = statistics.median(rates[label])
            runs = " ".join(f"{r:.0f}" for r in rates[label])
            print(f"  {label:<28} {median:17.1f} {runs:>24} {(median / base - 1) * 100:+15.1f}% "
                  f"{(median / bare - 1) * 100:+12.1f}% {statistics.median(messages[label]):12.0f} "
                  f"{statistics.median(parent[label]) * 100:10.1f}%")
        cost = (1 - statistics.median(rates[CONFIGS[2][0]]) / base) * 100
        paired = [(1 - dash / none) * 100 for dash, none in zip(rates[CONFIGS[2][0]], rates[CONFIGS[1][0]])]
        print(f"\ndashboard cost on the loop: {cost:.1f} % of medians; per round "
              f"{' '.join(f'{p:+.1f}' for p in paired)} % (median {statistics.median(paired):.1f} %); target < 2 %")
    finally:
        kernel.close()
    if options.cuda:
        print()
        cuda_section(options.cuda_steps, options.rounds)


if __name__ == "__main__":
    sys.exit(main())
