"""Smoke test of benchmarks/big_values.py (issue 21) in a tiny configuration: it runs end to
end, prints every row with numbers and its targets, and leaves no process behind."""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(150)
def test_big_values_benchmark_prints_the_floors_and_ours():
    script = os.path.join(REPO, "benchmarks", "big_values.py")
    result = subprocess.run([sys.executable, script, "--sizes", "1,8", "--rounds", "1"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout
    assert output.startswith("Machine: ") and "LEFT BEHIND" not in output
    header = next(line for line in output.splitlines() if line.startswith("size"))
    for column in ("pipe floor", "memfd floor", "return", "pull", "push", "return/memfd"):
        assert column in header
    for size in ("1 MB", "8 MB"):
        seconds = next(line for line in output.splitlines() if line.startswith(size) and "seconds" in line)
        assert len(re.findall(r"\d+\.\d+x?", seconds)) == 8, seconds     # 5 rows, 3 ratios
        peak = next(line for line in output.splitlines() if line.startswith(size) and "peak x value" in line)
        assert len(re.findall(r"\d+\.\d+x", peak.split("<=")[0])) == 5, peak
    assert "Targets: " in output
