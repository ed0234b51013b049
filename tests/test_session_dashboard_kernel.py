"""A session cell's dashboard in a real kernel: lines shown once, a rate at the end.

A ``%%dist`` cell's prints are the cell's own output: they appear once, as they come,
and the dashboard (built because the cell reports) neither repeats them in a log panel
nor in its end-of-cell summary. Its bars end with a rate, as a one-shot run's do, even
for a loop shorter than half a second (the steps carry the rank's own timestamps).
"""

from __future__ import annotations

import re
import textwrap

import pytest

from kernel_harness import Kernel


@pytest.fixture(scope="module")
def kernel():
    with Kernel(startup="%load_ext notebook_launcher") as k:
        result = k.run("%dist start -n 2 --device cpu --display widgets", timeout=60)
        assert result.status == "ok", result.traceback
        yield k
        k.run("%dist stop")
        assert k.wait_no_descendants() == [], "the session left processes behind"


def everything_shown(result) -> str:
    return "\n".join([result.stdout, result.stderr, result.display_text, result.widget_text])


def test_a_cells_printed_lines_appear_once_and_its_bar_ends_with_a_rate(kernel):
    result = kernel.run(textwrap.dedent("""
        %%dist
        import time
        print("before the loop", rank)
        for i in progress(range(30), desc="batch"):
            time.sleep(0.01)
            if i % 10 == 0:
                report(i, acc=i / 30)
        print("after the loop", rank)
    """), timeout=60)
    assert result.status == "ok", result.traceback
    shown = everything_shown(result)
    for line in ("[rank0]: before the loop 0", "[rank1]: before the loop 1", "[rank0]: after the loop 0",
                 "[rank1]: after the loop 1"):
        assert shown.count(line) == 1, (line, shown.count(line), shown)
    assert "output line" not in result.display_text       # no log section in the summary
    end = re.findall(r"30/30 · ([^<]*)", result.display_text)
    assert end, result.display_text
    rate = re.match(r"([\d.,]+) it/s", end[0])
    assert rate and 20 < float(rate.group(1).replace(",", "")) < 110, end   # 30 steps of >= 10 ms


def test_a_one_shot_run_still_keeps_its_lines_in_the_dashboard_log(kernel):
    """The one-shot dashboard is unchanged: its log panel and summary keep the lines."""
    result = kernel.run(textwrap.dedent("""
        from notebook_launcher import notebook_launcher, progress
        import time
        def f():
            print("from the function")
            for i in progress(range(10)):
                time.sleep(0.06)
        notebook_launcher(f, num_processes=2, device="cpu", display="widgets")
    """), timeout=60)
    assert result.status == "ok", result.traceback
    assert "[rank0]: from the function" not in result.stdout
    assert "2 output lines" in result.display_text and "[rank0]: from the function" in result.display_text
