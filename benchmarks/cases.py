"""What to measure: the list of cases, which host runs each, and the code it runs there.

A case is one call of one launcher on one workload; `run_all.py` runs every case once
per round, rounds shuffled, and keeps the medians.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field

from . import contenders, return_value, throughput, workloads

MARKER = "@@nl-bench-result@@"

# Each launcher family gets hosts of its own, so nothing one imports (accelerate,
# lightning) makes another's parent process bigger, and so slower to fork.
FAMILY = {
    "ours-fork": "ours", "ours-spawn": "ours", "accelerate": "accelerate", "lightning": "lightning",
    "torch-fork": "floor", "torch-spawn": "floor", "os.fork": "floor",
}
FAILURE_CONTENDERS = ("ours-fork", "ours-spawn", "accelerate", "lightning", "torch-fork")


@dataclass(frozen=True)
class Case:
    row: str        # "launch" | "failure" | "throughput" | "report" | "return"
    where: str      # "plain" | "kernel"
    label: str      # contender or variant shown as the column
    nproc: int
    family: str     # which host runs it
    code: str = field(compare=False)
    timeout: float = field(default=120.0, compare=False)  # the host is restarted after it

    @property
    def key(self) -> tuple:
        return (self.row, self.where, self.nproc, self.label)


def setup_code() -> str:
    """The first cell of every host: imports, and the workloads defined in ``__main__``
    like a notebook's functions."""
    source = inspect.getsource(workloads)
    return "\n".join([
        "import json as _json, sys as _sys",
        f"_sys.path.insert(0, {_repo()!r})",
        "from benchmarks import launch_latency as _b_launch, failure_latency as _b_failure",
        "from benchmarks import throughput as _b_throughput, return_value as _b_return",
        "from benchmarks import report_cost as _b_report",
        source,
        "def _bench_emit(value):",
        f"    print({MARKER!r} + _json.dumps(value), flush=True)",
    ])


def _repo() -> str:
    import os

    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(rows, wheres, nprocs, steps: int, state_mb: float, report_calls: int,
          only: tuple = contenders.ALL) -> list:
    """Every case of one round, for the contenders in ``only``."""
    cases = [case for case in _all_cases(rows, wheres, nprocs, steps, state_mb, report_calls)
             if _contender(case) in only]
    return cases


def _contender(case: Case) -> str:
    if case.row == "throughput":
        return throughput.VARIANTS[case.label][0]
    if case.row == "report":
        return "ours-fork"
    return case.label


def _all_cases(rows, wheres, nprocs, steps, state_mb, report_calls) -> list:
    cases = []
    first_n = nprocs[0]
    for where in wheres:
        in_kernel = where == "kernel"
        if "launch" in rows:
            for n in nprocs:
                for name in contenders.ALL:
                    cases.append(_case("launch", where, name, n, FAMILY[name],
                                       f"_b_launch.measure({name!r}, trivial, {n})"))
        if "failure" in rows:
            for name in FAILURE_CONTENDERS:
                cases.append(_case("failure", where, name, first_n, FAMILY[name],
                                   f"_b_failure.measure({name!r}, failing, {first_n})"))
        if "throughput" in rows:
            for variant, (name, _, _) in throughput.VARIANTS.items():
                cases.append(_case("throughput", where, variant, first_n, FAMILY[name],
                                   f"_b_throughput.measure({variant!r}, train, {first_n}, {steps}, {in_kernel})"))
        if "report" in rows:
            dashboard = "widgets" if in_kernel else "text"
            for label, tensor, display in (("float", False, "none"), ("0-d tensor", True, "none"),
                                           (f"float, {dashboard}", False, dashboard)):
                cases.append(_case("report", where, label, first_n, "ours",
                                   f"_b_report.measure(report_cost, {first_n}, {report_calls}, {tensor}, {display!r})"))
            cases.append(_case("report", where, "outside a worker", 1, "ours", "_b_report.outside_worker()"))
        if "return" in rows:
            for name in return_value.CONTENDERS:
                cases.append(_case("return", where, name, first_n, FAMILY[name],
                                   f"_b_return.measure({name!r}, big_state, {first_n}, {state_mb})"))
    return cases


def _case(row, where, label, nproc, family, call) -> Case:
    timeout = 300.0 if row == "throughput" else 120.0
    return Case(row, where, label, nproc, family, f"_bench_emit({call})", timeout)


def parse(stdout: str) -> dict:
    """The measurement a case printed (the last marked line)."""
    for line in reversed(stdout.splitlines()):
        at = line.rfind(MARKER)  # a worker's unfinished line may share the line with it
        if at >= 0:
            return json.loads(line[at + len(MARKER):])
    raise ValueError("no result line in the output")
