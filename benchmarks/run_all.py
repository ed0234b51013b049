"""Benchmarks of notebook_launcher side by side with accelerate, Lightning and bare torch.

    python benchmarks/run_all.py                 # full run (about 10 minutes on 2 cores)
    python benchmarks/run_all.py --quick         # 1 repetition, small sizes (a smoke run)
    python benchmarks/run_all.py --repeats 9 --rows launch --where kernel
    python benchmarks/session_cell.py            # what one cell costs on a persistent session (issue 11)
    python benchmarks/big_values.py              # big values: return, pull, push beside the pipe and memfd floors
    python benchmarks/big_parent.py              # the launch from a parent that imported lightning and accelerate

Every launcher runs in hosts of its own (a plain Python process and a real Jupyter
kernel per launcher family); every case runs once per round, in a shuffled order, after
one warm-up round that is not counted (imports, first fork of a big process). The
table shows medians and the ratios the targets are about. Every process started here
is stopped before the script exits.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks import cases, contenders, table  # noqa: E402
from benchmarks.kernel_runner import KernelRunner  # noqa: E402
from benchmarks.process_runner import ProcessRunner  # noqa: E402

ROWS = ("launch", "failure", "throughput", "report", "return")
WHERES = ("plain", "kernel")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=None, help="measured rounds (default 5, 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="1 round, 2 processes, small sizes")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--where", default=",".join(WHERES), help="plain, kernel or both")
    parser.add_argument("--nprocs", default=None, help="process counts for the launch row (default 2,4)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per throughput run (default 400)")
    parser.add_argument("--state-mb", type=float, default=None, help="size of the returned state_dict (default 100)")
    parser.add_argument("--report-calls", type=int, default=None, help="report() calls timed per run (default 50000)")
    parser.add_argument("--contenders", default=",".join(contenders.ALL),
                        help="comma-separated subset of the launchers to run")
    parser.add_argument("--dashboard-script", choices=("auto", "on", "off"), default="auto",
                        help="also run benchmarks/dashboard_overhead.py (issue 3's measurement of row 4); "
                             "auto: on unless --quick")
    parser.add_argument("--session-script", choices=("auto", "on", "off"), default="auto",
                        help="also run benchmarks/session_cell.py (issue 11: what a cell costs on a persistent "
                             "session, beside ipyparallel and jupyter-distributed when installed); "
                             "auto: on in a full run (every row, not --quick)")
    parser.add_argument("--first-call", choices=("auto", "on", "off"), default="auto",
                        help="also run benchmarks/first_call.py (the first call in fresh kernels, with the launch "
                             "row); auto: on unless --quick")
    parser.add_argument("--big-parent", choices=("auto", "on", "off"), default="auto",
                        help="also run benchmarks/big_parent.py (the launch row from a parent that imported "
                             "lightning and accelerate: floor, Lightning, ours in one host); auto: on with the "
                             "launch row unless --quick")
    parser.add_argument("--big-values", choices=("auto", "on", "off"), default="auto",
                        help="also run benchmarks/big_values.py (issue 21: return, pull and push of 1, 100 and "
                             "1000 MB beside the pipe and memfd floors, and the caller's peak); auto: on with the "
                             "return row (--quick: 1 and 100 MB, 2 rounds)")
    parser.add_argument("--no-warmup", action="store_true", help="count the first round too")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each case's time as it runs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffled case order")
    parser.add_argument("--json", default=None, help="also write every raw measurement to this file")
    args = parser.parse_args(argv)
    quick = args.quick
    args.repeats = args.repeats if args.repeats is not None else (1 if quick else 5)
    args.rows = _subset(args.rows, ROWS, "--rows")
    args.where = _subset(args.where, WHERES, "--where")
    args.contenders = _subset(args.contenders, contenders.ALL, "--contenders")
    args.nprocs = [int(n) for n in (args.nprocs or ("2" if quick else "2,4")).split(",")]
    args.steps = args.steps or (40 if quick else 400)
    args.state_mb = args.state_mb or (20.0 if quick else 100.0)
    args.report_calls = args.report_calls or (5000 if quick else 50000)
    return args


def _subset(text: str, allowed: tuple, option: str) -> list:
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in allowed]
    if unknown or not chosen:
        raise SystemExit(f"{option}: choose from {', '.join(allowed)} (got {text!r})")
    return [item for item in allowed if item in chosen]


def machine() -> str:
    """One paragraph describing where the numbers come from."""
    import subprocess
    from importlib import metadata

    import psutil

    versions = []
    for package in ("torch", "accelerate", "lightning", "ipykernel", "notebook-launcher"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} (not installed)")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "?"
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "notebook_launcher"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit += " + uncommitted changes in notebook_launcher/" if dirty else ""
    except (OSError, subprocess.TimeoutExpired):
        commit = "?"
    if commit == "?":  # not a git checkout, e.g. a `git archive` snapshot (see README)
        commit = os.environ.get("NL_BENCH_COMMIT", "?")
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
            f"{', '.join(versions)}, commit {commit}, notebook_launcher from {_package_dir()}")


def _package_dir() -> str:
    import importlib.util

    spec = importlib.util.find_spec("notebook_launcher")
    return os.path.dirname(spec.origin) if spec and spec.origin else "?"


def start_hosts(families: set, wheres: list) -> dict:
    """One host per (where, family), set up in parallel; {(where, family): runner}."""
    hosts, errors = {}, []
    lock = threading.Lock()

    def start(where: str, family: str) -> None:
        try:
            runner = KernelRunner(family) if where == "kernel" else ProcessRunner(family)
            with lock:
                hosts[(where, family)] = runner
            _set_up(runner)
        except Exception as exc:
            with lock:
                errors.append(f"{where}/{family}: {exc}")

    threads = [threading.Thread(target=start, args=(w, f)) for w in wheres for f in sorted(families)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        close_hosts(hosts)
        raise RuntimeError("could not start the benchmark hosts:\n" + "\n".join(errors))
    return hosts


def close_hosts(hosts: dict) -> None:
    for runner in hosts.values():
        try:
            runner.close()
        except Exception as exc:  # keep closing the others
            print(f"closing {runner.name}: {exc}", file=sys.stderr)


class CaseFailed(Exception):
    """The case's code raised in its host; carries what the host printed."""

    def __init__(self, error: str, stdout: str) -> None:
        super().__init__(error)
        self.stdout = stdout


def run_rounds(case_list: list, hosts: dict, repeats: int, warmup: bool, seed: int,
               verbose: bool = False) -> table.Results:
    results = table.Results()
    rng = random.Random(seed)
    rounds = repeats + (1 if warmup else 0)
    for index in range(rounds):
        counted = not warmup or index > 0
        order = list(case_list)
        rng.shuffle(order)
        started = time.monotonic()
        for case in order:
            runner = hosts[(case.where, case.family)]
            case_started = time.monotonic()
            try:
                _set_up(runner)
                output = runner.execute(case.code, timeout=case.timeout)
                if not output.ok:
                    raise CaseFailed(output.error.strip() or "failed", output.stdout)
                value = cases.parse(output.stdout)
            except Exception as exc:
                text = str(exc).strip()
                if counted:
                    results.fail(case.key, text + (f"\n--- output ---\n{exc.stdout[-3000:]}"
                                                   if isinstance(exc, CaseFailed) else ""))
                print(f"  {case.key}: {text.splitlines()[-1] if text else type(exc).__name__}",
                      file=sys.stderr)
                continue
            if counted:
                value["round"] = index
                results.add(case.key, value)
            if verbose:
                print(f"  {time.monotonic() - case_started:6.2f} s  {case.key}", file=sys.stderr, flush=True)
        what = "warm-up round" if not counted else f"round {index + (0 if warmup else 1)} of {repeats}"
        print(f"{what}: {len(order)} cases in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return results


def dashboard_script(steps: int, rounds: int, timeout: float = 1200) -> str:
    """Output of benchmarks/dashboard_overhead.py (another measurement of row 4: report()
    cost and the widgets dashboard's cost on a DDP loop in a kernel)."""
    return script_output("dashboard_overhead.py", ["--steps", str(steps), "--rounds", str(rounds)], timeout)


def first_call_script(samples: int, timeout: float = 1800) -> str:
    """Output of benchmarks/first_call.py: the first call in a fresh kernel per sample,
    ours next to accelerate's (issue 14), which the long-lived hosts here cannot measure."""
    return script_output("first_call.py", ["--samples", str(samples)], timeout)


def big_parent_script(samples: int, wheres: list, timeout: float = 1800) -> str:
    """Output of benchmarks/big_parent.py (issue 18: the launch from a parent that imported
    lightning and accelerate, floor, Lightning and ours side by side), less its machine line."""
    output = script_output("big_parent.py", ["--samples", str(samples), "--where", ",".join(wheres)], timeout)
    return "\n".join(line for line in output.splitlines() if not line.startswith("Machine: "))


def big_values_script(quick: bool, timeout: float = 1800) -> str:
    """Output of benchmarks/big_values.py (issue 21: big values beside the pipe and memfd
    floors), less its machine line."""
    options = ["--sizes", "1,100", "--rounds", "2"] if quick else ["--sizes", "1,100,1000", "--rounds", "5"]
    output = script_output("big_values.py", options, timeout)
    return "\n".join(line for line in output.splitlines() if not line.startswith("Machine: "))


def session_script(samples: int, timeout: float = 1200) -> str:
    """Output of benchmarks/session_cell.py (issue 11: a trivial cell on a persistent
    session, beside a plain cell, a one-shot launch and the peers), less its machine line."""
    output = script_output("session_cell.py", ["--samples", str(samples)], timeout)
    return "\n".join(line for line in output.splitlines() if not line.startswith("Machine: "))


def script_output(name: str, options: list, timeout: float) -> str:
    """What ``benchmarks/<name> <options>`` printed, run in a session of its own that is
    killed whatever happens (its kernels included)."""
    import signal
    import subprocess

    path = os.path.join(REPO, "benchmarks", name)
    if not os.path.exists(path):
        return f"(benchmarks/{name} is not there)"
    process = subprocess.Popen([sys.executable, path, *options], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        output = f"(timed out after {timeout:.0f} s)"
    finally:
        _kill_tree(process.pid)  # its kernels run in sessions of their own
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=10)
    lines = [line for line in output.splitlines() if "WARNING | Kernel is running over TCP" not in line]
    return "\n".join(lines).strip() + ("" if process.returncode in (0, -9) else f"\n(exit status {process.returncode})")


def _kill_tree(pid: int) -> None:
    import psutil

    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for proc in descendants:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def _set_up(runner) -> None:
    """Run the setup cell again in a host that was restarted after a timeout."""
    if runner.set_up_generation != runner.generation:
        output = runner.execute(cases.setup_code(), timeout=180)
        if not output.ok:
            raise RuntimeError(f"setting up {runner.name} again failed: {output.error}")
        runner.set_up_generation = runner.generation


def leftover_processes() -> list:
    import psutil

    def alive(p):
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 10
    while True:
        left = [p for p in psutil.Process().children(recursive=True) if alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def main(argv=None) -> int:
    args = parse_args(argv)
    case_list = cases.build(args.rows, args.where, args.nprocs, args.steps, args.state_mb, args.report_calls,
                            tuple(args.contenders))
    families = {case.family for case in case_list}
    print(f"notebook_launcher benchmarks: {len(case_list)} cases x {args.repeats} rounds"
          f"{'' if args.no_warmup else ' (+1 warm-up)'}", file=sys.stderr, flush=True)
    hosts = start_hosts(families, args.where)
    try:
        results = run_rounds(case_list, hosts, args.repeats, not args.no_warmup, args.seed, args.verbose)
    finally:
        close_hosts(hosts)
    extra = ""
    if "report" in args.rows and (args.dashboard_script == "on" or args.dashboard_script == "auto" and not args.quick):
        print("running benchmarks/dashboard_overhead.py", file=sys.stderr, flush=True)
        extra = dashboard_script(steps=max(args.steps * 4, 1000), rounds=max(3, args.repeats))
    first = ""
    if "launch" in args.rows and "kernel" in args.where and (
            args.first_call == "on" or args.first_call == "auto" and not args.quick):
        print("running benchmarks/first_call.py", file=sys.stderr, flush=True)
        first = first_call_script(samples=args.repeats)
    big = ""
    if "launch" in args.rows and (args.big_parent == "on" or args.big_parent == "auto" and not args.quick):
        print("running benchmarks/big_parent.py", file=sys.stderr, flush=True)
        big = big_parent_script(samples=max(args.repeats, 10), wheres=args.where)
    values = ""
    if args.big_values == "on" or args.big_values == "auto" and "return" in args.rows:
        print("running benchmarks/big_values.py", file=sys.stderr, flush=True)
        values = big_values_script(quick=args.quick)
    session = ""
    full_run = not args.quick and len(args.rows) == len(ROWS)
    if args.session_script == "on" or args.session_script == "auto" and full_run:
        print("running benchmarks/session_cell.py", file=sys.stderr, flush=True)
        session = session_script(samples=max(30, args.repeats))
    left = leftover_processes()
    targets: list = []
    print(f"Machine: {machine()}")
    print(f"Medians of {args.repeats} rounds{'' if args.no_warmup else ' after 1 warm-up round'}; "
          f"cases shuffled in each round; launch row on CPU with gloo.")
    print(table.render(results, args.rows, args.where, args.nprocs, args.state_mb, targets))
    if extra:
        print("\n4b. benchmarks/dashboard_overhead.py (issue 3's own measurement, run by this script):")
        print("\n".join("   " + line for line in extra.splitlines()))
    if values:
        print("\n5b. benchmarks/big_values.py (issue 21: big values beside the pipe and memfd floors, run by this "
              "script):")
        print("\n".join("   " + line for line in values.splitlines()))
    if session:
        print("\n6. benchmarks/session_cell.py (issue 11: one cell on a persistent session, run by this script):")
        print("\n".join("   " + line for line in session.splitlines()))
    if first:
        print("\n1b. benchmarks/first_call.py (the first call in a fresh kernel, run by this script):")
        print("\n".join("   " + line for line in first.splitlines()))
    if big:
        print("\n1c. benchmarks/big_parent.py (the launch from a parent that imported lightning and accelerate, "
              "run by this script):")
        print("\n".join("   " + line for line in big.splitlines()))
    print("\nTargets: " + "; ".join(f"{name}: {verdict}" for name, verdict in targets))
    if results.errors:
        print("\nErrors:")
        for key, errors in sorted(results.errors.items()):
            last = errors[-1].split("\n--- output ---")[0].strip().splitlines()
            print(f"  {'/'.join(map(str, key))}: {len(errors)} of {len(errors) + results.count(key)} "
                  f"failed; last: {last[-1] if last else '?'}")
    if left:
        print(f"\nLEFT BEHIND: {[(p.pid, p.name()) for p in left]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "args": vars(args),
                       "samples": [[list(k), v] for k, v in results.samples.items()],
                       "errors": [[list(k), v] for k, v in results.errors.items()]}, f, indent=1)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
