"""Smoke test of the benchmark script (benchmarks/run_all.py) in a tiny configuration.

The benchmark itself is not part of the test suite; this only checks that it runs end
to end, from a plain process and from a real Jupyter kernel, prints every row with
numbers, and leaves no process behind.
"""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "run_all.py")
SECTIONS = ("1. Launch latency", "2. From a rank raising", "3. Training throughput",
            "4. report() cost", "5. Returning a")
NUMBER = r"\d+\.\d+"


def run_benchmark(*options: str, timeout: float = 100) -> str:
    result = subprocess.run([sys.executable, SCRIPT, "--quick", "--no-warmup", *options],
                            cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "LEFT BEHIND" not in result.stdout
    assert "Errors:" not in result.stdout, result.stdout
    return result.stdout


def table_line(output: str, *cells: str) -> str:
    """The table line that starts with these cells (columns are space-aligned)."""
    pattern = r"^" + r"\s+".join(re.escape(c) for c in cells) + r"\s"
    lines = [line for line in output.splitlines() if re.match(pattern, line)]
    assert lines, f"no line starting with {cells} in:\n{output}"
    return lines[0]


@pytest.mark.timeout(150)
def test_every_row_from_a_plain_process():
    # Only our launcher, to stay fast: the peers' columns then read "-"; big_values.py has
    # its own smoke test (test_big_values_bench.py).
    output = run_benchmark("--where", "plain", "--contenders", "ours-fork", "--steps", "10",
                           "--state-mb", "8", "--report-calls", "2000", "--big-values", "off")
    assert output.startswith("Machine: ")
    for section in SECTIONS:
        assert section in output
    for measure in ("all ranks in fn", "whole call", "raise -> error", "return -> value"):
        assert re.search(NUMBER, table_line(output, "plain", measure, "2"))
    throughput = table_line(output, "plain", "steps/s", "2")
    assert len(re.findall(r"\d+(?:\.\d+)?", throughput)) >= 4 and "%" in throughput  # 3 variants, overheads
    for values in ("float", "0-d tensor", "float, text"):
        assert re.search(NUMBER + r"\s*$", table_line(output, "plain", values, "2"))
    assert re.search(NUMBER, table_line(output, "plain", "outside a worker", "1"))
    assert re.search(NUMBER, table_line(output, "plain", "peak extra MB", "2"))
    assert "Targets: " in output


@pytest.mark.timeout(150)
def test_launch_row_from_a_jupyter_kernel():
    output = run_benchmark("--where", "kernel", "--rows", "launch", "--contenders", "ours-fork,os.fork")
    line = table_line(output, "kernel", "all ranks in fn", "2")
    assert len(re.findall(NUMBER, line)) == 2  # ours and the bare os.fork floor
    assert "2. From a rank raising" not in output


@pytest.mark.timeout(150)
def test_session_cell_benchmark_from_a_jupyter_kernel():
    # Ours only (the peers are benchmark-only extras): every row of ours has a median.
    script = os.path.join(REPO, "benchmarks", "session_cell.py")
    result = subprocess.run([sys.executable, script, "--samples", "3", "--warmup", "1", "--peers", "none"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout
    assert output.startswith("Machine: ") and "LEFT BEHIND" not in output
    assert re.search(NUMBER, table_line(output, "plain", "cell:", "pass", "ours", "3"))
    for cells in (("%%dist", "cell:", "x", "=", "1"), ("session.run(trivial)",),
                  ("notebook_launcher(trivial),", "one-shot")):
        line = table_line(output, *cells, "ours", "3")
        assert re.search(r"[+-]" + NUMBER, line), line                    # its overhead over the plain cell
    assert "Not installed" not in output and "ipyparallel" not in output  # --peers none measures no peer
    assert re.search(r"Targets: %%dist cell: x = 1: < 3 ms over plain: (ok|MISS); session.run", output)


@pytest.mark.timeout(300)
def test_big_parent_benchmark_from_a_kernel():
    # The launch from a kernel that imported lightning and accelerate: floor, Lightning and
    # ours in the same host, each with a median, and the ratios the target is about (the
    # plain process is the same code in another host: left to the benchmark's own runs).
    script = os.path.join(REPO, "benchmarks", "big_parent.py")
    result = subprocess.run([sys.executable, script, "--samples", "1", "--warmup", "0", "--where", "kernel"],
                            cwd=REPO, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout
    assert output.startswith("Machine: ") and "LEFT BEHIND" not in output and "ERROR" not in output
    for where in ("kernel",):
        big = table_line(output, where, "+lightning+accelerate")
        modules, measure, floor, lightning, ours = big.split()[2], big.split()[3:5], *big.split()[5:8]
        assert int(modules) > 3000 and measure == ["whole", "call"], big
        assert all(re.fullmatch(NUMBER, time) for time in (floor, lightning, ours)), big
        assert len(re.findall(NUMBER + "x", big)) == 2 and re.search(r"(ok|MISS \S+)\s*$", big), big
        faults = table_line(output, where, "+lightning+accelerate", modules, "rank", "0", "page", "faults")
        counts = faults.split()[faults.split().index("faults") + 1:][:3]             # floor, Lightning, ours
        assert all(count.isdigit() for count in counts), faults
        small = table_line(output, where, "torch")
        assert len(re.findall(NUMBER, small)) == 3, small                      # floor, ours, ours/floor
    assert re.search(r"Targets \(.*\): kernel, \+lightning\+accelerate: (ok|MISS)", output)
