"""Command line: ``python -m notebook_launcher env | test | demo``.

- ``env``: what this machine offers (torch, CUDA, GPUs, NCCL, peer-to-peer, Colab/Kaggle,
  whether the widgets dashboard can render), without initializing CUDA.
- ``test``: a real 2-process launch (or one worker per GPU) checking all_reduce,
  all_gather and broadcast; the exit status is 0 on success, 1 on failure.
- ``demo``: a short training with the text dashboard (the README's main job).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m notebook_launcher", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="a short CPU (or GPU) training launched through the library")
    demo.add_argument("-n", "--num-processes", type=int, default=None,
                      help="workers (default: one per GPU, or 2 CPU workers without GPUs)")
    demo.add_argument("--epochs", type=int, default=8)
    demo.add_argument("--display", default="text", choices=["text", "none", "auto"])
    env = commands.add_parser("env", help="torch, CUDA, GPUs, NCCL, P2P, Colab/Kaggle, widgets (CUDA stays uninitialized)")
    env.add_argument("--json", action="store_true", help="print the report as JSON")
    test = commands.add_parser("test", help="a real multi-process launch checking all_reduce; exit status 0 = pass")
    test.add_argument("-n", "--num-processes", type=int, default=None,
                      help="workers (default: one per GPU when there are 2 or more, else 2 CPU workers)")
    test.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    test.add_argument("--size-mib", type=float, default=8.0, help="all_reduce size for the timing (MiB)")
    test.add_argument("--timeout", type=float, default=120.0,
                      help="seconds a rank may stay stuck (e.g. in a collective) before the test fails")
    test.add_argument("--display", default="none", choices=["text", "none", "auto"])
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main

        result = demo_main(num_processes=args.num_processes, epochs=args.epochs, display=args.display)
        return 0 if result["test_accuracy"] > 0.8 else 1
    if args.command == "env":
        return env_command(args.json)
    if args.command == "test":
        return test_command(args.num_processes, args.device, args.size_mib, args.timeout, args.display)
    return 2


# ----------------------------------------------------------------- env
def env_command(as_json: bool = False) -> int:
    from .diagnostics import collect, format_report

    report = collect()
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(format_report(report))
    return 0


# ----------------------------------------------------------------- test
def test_command(num_processes, device: str = "auto", size_mib: float = 8.0, timeout: float = 120.0,
                 display: str = "none") -> int:
    """Launch `diagnostics.collective_check` on every rank; 0 when every rank passed."""
    from . import environment
    from .api import notebook_launcher
    from .diagnostics import collective_check
    from .errors import LaunchConfigError, WorkerError

    if num_processes is None:
        gpus = environment.cuda_device_count() if device != "cpu" else 0
        num_processes = gpus if gpus >= 2 else 2
        if device == "auto" and gpus < 2:
            device = "cpu"   # one GPU cannot host two NCCL ranks; test the launch on CPU instead
            if gpus == 1:
                print("one GPU: checking 2 CPU workers (gloo); `test -n 1 --device cuda` checks the GPU with NCCL")
    started = time.monotonic()
    try:
        results = notebook_launcher(collective_check, kwargs={"size_mib": size_mib}, num_processes=num_processes,
                                    device=device, return_all=True, display=display,
                                    stall_timeout=timeout, on_stall="raise")
    except LaunchConfigError as exc:
        print(f"FAIL: cannot launch: {exc}")
        return 1
    except WorkerError as exc:
        print(f"FAIL: {exc}")
        return 1
    seconds = time.monotonic() - started
    return report_test(results, num_processes, seconds)


def report_test(results, num_processes: int, seconds: float) -> int:
    """Print one line per rank and the verdict; 0 = pass."""
    failures = []
    if not isinstance(results, list) or len(results) != num_processes:
        failures.append(f"expected {num_processes} results, got {results!r}")
        results = results if isinstance(results, list) else []
    for rank, result in enumerate(results):
        if not isinstance(result, dict) or result.get("rank") != rank:
            failures.append(f"rank {rank} returned {result!r}")
            continue
        state = "ok" if result["ok"] else "; ".join(result["problems"])
        timing = (f"all_reduce {result['all_reduce_seconds'] * 1e3:.1f} ms, bus bandwidth {result['bus_gb_per_s']:.2f} GB/s"
                  if result["world_size"] > 1 else "no bandwidth with one process")
        print(f"rank {rank} ({result['device']}, {result['backend']}): {state}; {timing}")
        if not result["ok"] or result["world_size"] != num_processes:
            failures.append(f"rank {rank}: {state}, world size {result['world_size']}")
    if failures:
        print("FAIL: " + " | ".join(failures))
        return 1
    first = results[0]
    print(f"PASS: {num_processes} process{'es' if num_processes != 1 else ''} ({first['backend']}): all_reduce, "
          f"all_gather and broadcast give the expected values; launch and checks took {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
