"""Command line: ``python -m notebook_launcher env | test | demo | run | config``.

- ``env``: what this machine offers (torch, CUDA, GPUs, NCCL, peer-to-peer, Colab/Kaggle,
  whether the widgets dashboard can render, the accelerate config in effect), without
  initializing CUDA.
- ``test``: a real 2-process launch (or one worker per GPU) checking all_reduce,
  all_gather and broadcast; the exit status is 0 on success, 1 on failure.
- ``demo``: a short training with the text dashboard (the README's main job).
- ``run [options] script.py [args...]`` (or ``file.py:function``, or ``-m module``): the
  same launch as in a notebook, from a terminal, with ``accelerate launch``'s options.
- ``config``: write an accelerate config file; ``config show`` prints the one in effect.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

EXIT_USAGE = 2          # bad arguments or config, as argparse's own errors
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def main(argv=None) -> int:
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "run":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "demo":
        from .demo import main as demo_main

        result = demo_main(num_processes=args.num_processes, epochs=args.epochs, display=args.display)
        return 0 if result["test_accuracy"] > 0.8 else 1
    if args.command == "env":
        return env_command(args.json)
    if args.command == "test":
        return test_command(args.num_processes, args.device, args.size_mib, args.timeout, args.display)
    if args.command == "run":
        return run_command(args, unknown)
    if args.command == "config":
        return config_command(args)
    return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
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
    _add_run_parser(commands)
    _add_config_parser(commands)
    return parser


def _option(parser, name: str, **kwargs) -> None:
    """``--num_processes`` and ``--num-processes``: accelerate accepts both spellings."""
    spellings = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    parser.add_argument(*spellings, dest=name, **{"default": None, **kwargs})


def _add_run_parser(commands) -> None:
    from .accelerate_config import MIXED_PRECISION, RDZV_BACKENDS

    run = commands.add_parser(
        "run", help="run a script, file.py:function or -m module on every worker (accelerate launch's options)",
        description="Run a script (as __main__, with its arguments), path/to/file.py:function (rank 0's "
                    "return value is printed) or -m package.module on every worker, with the process group "
                    "ready. Options mean what they mean to `accelerate launch`; an accelerate config file "
                    "(--config_file, else accelerate's default file) gives the defaults.")
    add = functools.partial(_option, run)
    add("config_file", metavar="FILE", help="accelerate config file (default: accelerate's default one, if any)")
    add("num_processes", type=int, help="processes on all machines together (default: one per GPU, or 2 on CPU)")
    add("num_machines", type=int)
    add("machine_rank", type=int)
    add("main_process_ip", metavar="ADDR", help="machine 0's address")
    add("main_process_port", type=int, metavar="PORT", help="rendezvous port (default: a free one)")
    add("mixed_precision", choices=MIXED_PRECISION)
    add("cpu", action="store_true", help="CPU workers (gloo) even where GPUs are")
    add("multi_gpu", action="store_true", help="GPU workers (the default where GPUs are)")
    add("gpu_ids", metavar="IDS", help="GPUs to use, e.g. 0,1 (default: all)")
    add("rdzv_backend", choices=RDZV_BACKENDS)
    add("rdzv_conf", metavar="K=V,...", help="torch rendezvous options (c10d)")
    add("max_restarts", type=int, default=0, help="restart every worker up to N times after a failure")
    add("monitor_interval", type=float, default=0.1, metavar="SECONDS")
    add("num_cpu_threads_per_process", type=int, metavar="N", help="OMP_NUM_THREADS of each worker")
    add("debug", action="store_true", help="ACCELERATE_DEBUG_MODE in the workers")
    add("same_network", action="store_true", help=argparse.SUPPRESS)         # no effect here
    add("main_training_function", help=argparse.SUPPRESS)                    # TPU only in accelerate
    run.add_argument("-q", "--quiet", action="store_true", help=argparse.SUPPRESS)
    add("start_method", choices=("auto", "fork", "spawn"), default="auto")
    add("stall_timeout", type=float, metavar="SECONDS",
        help="show a rank's stacks after this long without progress (default 300; 0: never)")
    add("on_stall", choices=("warn", "raise"), default="warn")
    add("display", choices=("text", "none"), default="text")
    add("cluster", choices=("ray", "slurm"), help="place the ranks on a cluster: --num_machines nodes of it, "
        "--num_processes ranks in all (the kernel's or this process's Ray connection, else ray.init('auto'))")
    run.add_argument("-m", "--module", action="store_true", help="TARGET is a module, run like python -m")
    run.add_argument("target", metavar="TARGET", help="script.py, path/to/file.py:function, or (with -m) a module")
    run.add_argument("target_args", nargs=argparse.REMAINDER, metavar="ARGS", help="the script's arguments")


def _add_config_parser(commands) -> None:
    from .accelerate_config import MIXED_PRECISION

    config = commands.add_parser("config", help="write an accelerate config file; `config show` prints the one in effect")
    config.add_argument("action", nargs="?", choices=("write", "show"), default="write")
    add = functools.partial(_option, config)
    add("config_file", metavar="FILE", help="where (default: accelerate's default file)")
    add("num_processes", type=int, help="default: one per GPU, or 2 on a machine without GPUs")
    add("mixed_precision", choices=MIXED_PRECISION, default="no")
    add("cpu", action="store_true", help="CPU workers even where GPUs are")
    config.add_argument("--overwrite", action="store_true", help="replace an existing file")


# ----------------------------------------------------------------- run
def run_command(args: argparse.Namespace, unknown: list) -> int:
    """Launch the script/module/function; the exit status says how it went."""
    from . import accelerate_config as accel
    from .api import notebook_launcher
    from .errors import LaunchConfigError, WorkerError
    from .script_task import script_task

    try:
        if unknown:
            raise LaunchConfigError(accel.unsupported_option(unknown[0]))
        task = script_task(args.target, args.target_args, module=args.module)
        settings = accel.settings_in_effect(args.config_file).overridden_by(_flag_settings(args))
        kwargs, env = accel.launch_arguments(settings)
        kwargs.update(_launcher_options(args))
    except LaunchConfigError as exc:
        print(f"notebook_launcher run: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if "CUDA_VISIBLE_DEVICES" in env and kwargs.get("device") != "cuda" and not _gpus_visible():
        print(f"notebook_launcher run: --gpu_ids {env['CUDA_VISIBLE_DEVICES']} given, but no GPU is visible here: "
              "the workers run on the CPU.", file=sys.stderr)
    os.environ.update(env)
    if task.kind == "function":   # rank 0's value may be an object of a class the file defines
        sys.path.insert(0, os.path.dirname(task.target))
    try:
        value = notebook_launcher(task, **kwargs)
    except LaunchConfigError as exc:
        print(f"notebook_launcher run: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except WorkerError as error:
        print(f"notebook_launcher run: {task.describe()}: {error}", file=sys.stderr)
        return error.exitcode if isinstance(error.exitcode, int) and error.exitcode > 0 else 1
    except KeyboardInterrupt:
        print("notebook_launcher run: interrupted; every worker is stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    if task.kind == "function" and value is not None:
        print(repr(value))
    return 0


def _gpus_visible() -> bool:
    from . import environment

    return environment.detect().has_gpus


def _flag_settings(args: argparse.Namespace):
    from .accelerate_config import AccelerateSettings

    return AccelerateSettings(
        distributed_type="MULTI_GPU" if args.multi_gpu else None, mixed_precision=args.mixed_precision,
        num_processes=args.num_processes, num_machines=args.num_machines, machine_rank=args.machine_rank,
        main_process_ip=args.main_process_ip, main_process_port=args.main_process_port, gpu_ids=args.gpu_ids,
        use_cpu=args.cpu, rdzv_backend=args.rdzv_backend, debug=args.debug)


def _launcher_options(args: argparse.Namespace) -> dict:
    """The options that are the launcher's own, not accelerate's settings."""
    from .accelerate_config import parse_rdzv_conf

    options = {"max_restarts": args.max_restarts, "monitor_interval": args.monitor_interval,
               "start_method": args.start_method, "display": args.display, "on_stall": args.on_stall,
               "rdzv_conf": parse_rdzv_conf(args.rdzv_conf), "cluster": args.cluster}
    if args.stall_timeout is not None:
        options["stall_timeout"] = args.stall_timeout or None   # 0: never
    if args.num_cpu_threads_per_process is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.num_cpu_threads_per_process)  # read by the launch's thread split
    return options


# ----------------------------------------------------------------- config
def config_command(args: argparse.Namespace) -> int:
    """``config``: write a basic accelerate config file; ``config show``: print the one in effect."""
    import yaml

    from . import accelerate_config as accel
    from . import environment

    try:
        if args.action == "show":
            settings = accel.settings_in_effect(args.config_file)
            if not settings.source:
                print(accel.describe(args.config_file))
                return 0
            print(f"# accelerate config in effect: {settings.source}")
            print(yaml.safe_dump(settings.given(), sort_keys=False), end="")
            return 0
        path = args.config_file or accel.default_config_file()
        config = accel.basic_config(args.num_processes, args.mixed_precision, bool(args.cpu),
                                    environment.cuda_device_count())
        accel.save(path, config, overwrite=args.overwrite)
    except accel.AccelerateConfigError as exc:
        print(f"notebook_launcher config: error: {exc}", file=sys.stderr)
        return 1
    print(f"# wrote {path}")
    print(yaml.safe_dump(config, sort_keys=False), end="")
    return 0


# ----------------------------------------------------------------- env
def env_command(as_json: bool = False) -> int:
    from .diagnostics import collect, format_report

    from .accelerate_config import describe, summary

    report = collect()
    if as_json:
        print(json.dumps({**report.as_dict(), "accelerate_config": summary()}, indent=2))
    else:
        print(format_report(report))
        print(describe())
    return 0


# ----------------------------------------------------------------- test
def test_command(num_processes, device: str = "auto", size_mib: float = 8.0, timeout: float = 120.0,
                 display: str = "none") -> int:
    """Launch `diagnostics.collective_check` on every rank; 0 when every rank passed."""
    from . import environment
    from .api import notebook_launcher
    from .diagnostics import collective_check
    from .accelerate_config import describe
    from .errors import LaunchConfigError, WorkerError

    print(describe())
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
