"""The first call in a fresh Jupyter kernel: ours next to accelerate's (issue 14).

A person opens a notebook, imports the launcher and calls it: that first call pays for
whatever the launcher does once per kernel (lazy imports, the dashboard's first
display), which later calls do not see. Each sample here is a NEW kernel
(`kernel_runner.KernelRunner`): one cell imports the launcher and defines the
functions (as a notebook's first cells do; timed apart as "import"), the next cell
makes the one measured call, then the kernel is shut down.

Cases, each with 2 CPU workers (gloo) and the same user code (`workloads.py`):

- ``trivial``: `workloads.trivial` (joins the process group, one barrier);
- ``DDP step``: `workloads.train` with one timed step: builds DistributedDataParallel
  and an SGD optimizer, 5 warm-up steps and 1 more.

Columns: ours with the default display (what a notebook gets: the widgets dashboard),
ours with ``display="none"`` (so the dashboard's share of the first call shows), and
HF accelerate's ``notebook_launcher``. Times are seconds from just before the call to
its return, inside the kernel; "cell" is execute-to-idle as the client sees it.
Targets: trivial at most 2x accelerate's first call, DDP step at most 0.8x.

    python benchmarks/first_call.py                  # 5 fresh kernels per case
    python benchmarks/first_call.py --samples 9 -v
    python benchmarks/first_call.py --cases trivial --contenders ours,accelerate
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks import cases, contenders, table  # noqa: E402

NPROC = 2
# label -> (contender, display): "auto" is our default (widgets in a kernel); accelerate has none
COLUMNS = {"ours": ("ours-fork", "auto"), "ours display=none": ("ours-fork", "none"),
           "accelerate": ("accelerate", "none")}
# case -> (workload in the kernel's __main__, its extra arguments)
WORKLOADS = {"trivial": ("trivial", ()), "DDP step": ("train", (1, False))}
TARGETS = {"trivial": 2.0, "DDP step": 0.8}   # ours (default display) / accelerate, at most
IMPORTS = {"ours-fork": "from notebook_launcher import notebook_launcher",
           "accelerate": "from accelerate import notebook_launcher"}


def measure(name: str, fn, rest: tuple, display) -> dict:
    """Runs in the kernel: one call of contender ``name``; seconds from the call to its return.

    Example::

        measure("ours-fork", trivial, (), "auto")   # {"call": 0.31}
    """
    from ._timing import scratch

    with scratch() as out_dir:
        start = time.time()
        contenders.launch(name, fn, out_dir, rest, NPROC, display=display)
        return {"call": time.time() - start}


def one_sample(column: str, case: str, timeout: float) -> dict:
    """A fresh kernel: import + define (timed), the measured call, shut down."""
    from benchmarks.kernel_runner import KernelRunner

    name, display = COLUMNS[column]
    workload, rest = WORKLOADS[case]
    with KernelRunner(f"first-{column}") as kernel:
        setup = "\n".join([cases.setup_code(), "from benchmarks import first_call as _b_first",
                           "import time as _t", "_t0 = _t.perf_counter()", IMPORTS[name],
                           "_bench_emit({'import': _t.perf_counter() - _t0})"])
        imported = _run(kernel, setup, timeout)
        started = time.perf_counter()
        value = _run(kernel, f"_bench_emit(_b_first.measure({name!r}, {workload}, {rest!r}, {display!r}))",
                     timeout)
        value["cell"] = time.perf_counter() - started
        return {**imported, **value}


def _run(kernel, code: str, timeout: float) -> dict:
    output = kernel.execute(code, timeout=timeout)
    if not output.ok:
        raise RuntimeError(output.error.strip().splitlines()[-1] if output.error.strip() else "failed")
    return cases.parse(output.stdout)


def run(columns: list, case_names: list, samples: int, seed: int, timeout: float, verbose: bool) -> dict:
    """{(case, column): [sample, ...]}; every (case, column) once per round, shuffled."""
    results: dict = {}
    order = [(case, column) for case in case_names for column in columns]
    rng = random.Random(seed)
    for index in range(samples):
        rng.shuffle(order)
        for case, column in order:
            try:
                sample = one_sample(column, case, timeout)
            except Exception as exc:
                sample = {"error": str(exc)}
            results.setdefault((case, column), []).append(sample)
            if verbose:
                print(f"  round {index + 1}: {case:8} {column:18} {sample}", file=sys.stderr, flush=True)
    return results


def render(results: dict, columns: list, case_names: list) -> list:
    """Table lines: medians per case and column, the ratio and the target."""
    def median(case, column, metric):
        values = [s[metric] for s in results.get((case, column), []) if metric in s]
        return statistics.median(values) if values else None

    header = ["case", "measure", *columns, "ours/acc", "none/acc", "dashboard", "target"]
    rows = []
    for case in case_names:
        call = {c: median(case, c, "call") for c in columns}
        ratio = table._ratio(call.get("ours"), call.get("accelerate"))
        dashboard = None if call.get("ours") is None or call.get("ours display=none") is None \
            else call["ours"] - call["ours display=none"]
        verdict = "no data" if ratio is None else ("ok" if ratio <= TARGETS[case] else "MISS")
        rows.append([case, "first call", *[table._num(call[c]) for c in columns], table._x(ratio),
                     table._x(table._ratio(call.get("ours display=none"), call.get("accelerate"))),
                     table._num(dashboard), f"<= {TARGETS[case]:.1f}x {verdict}"])
        rows.append([case, "cell", *[table._num(median(case, c, "cell")) for c in columns], "", "", "", ""])
        rows.append([case, "import", *[table._num(median(case, c, "import")) for c in columns], "", "", "", ""])
    return table._grid(header, rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=5, help="fresh kernels per case and column (default 5)")
    parser.add_argument("--cases", default=",".join(WORKLOADS), help=f"subset of {','.join(WORKLOADS)}")
    parser.add_argument("--contenders", default="ours,ours display=none,accelerate",
                        help=f"subset of {','.join(COLUMNS)}")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per cell")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-v", "--verbose", action="store_true", help="print every sample as it is taken")
    args = parser.parse_args(argv)
    columns = [c for c in COLUMNS if c in args.contenders.split(",")]
    case_names = [c for c in WORKLOADS if c in args.cases.split(",")]
    if not columns or not case_names:
        raise SystemExit(f"choose cases from {list(WORKLOADS)} and contenders from {list(COLUMNS)}")
    results = run(columns, case_names, args.samples, args.seed, args.timeout, args.verbose)
    print(f"First call in a fresh Jupyter kernel, {NPROC} CPU workers (gloo); seconds, median of "
          f"{args.samples} fresh kernels per cell; cases shuffled in each round.")
    print("   ours: default display (widgets); dashboard = ours - ours display=none; "
          "import: the launcher's import, not in the first call")
    print("\n".join(render(results, columns, case_names)))
    errors = {key: [s["error"] for s in samples if "error" in s] for key, samples in results.items()}
    errors = {key: found for key, found in errors.items() if found}
    for (case, column), found in sorted(errors.items()):
        print(f"ERROR {case} / {column}: {len(found)} of {len(results[(case, column)])} failed; last: {found[-1]}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
