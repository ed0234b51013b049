"""The first call in a fresh kernel pays for torch._dynamo only when the function needs it.

The parent imports torch._dynamo before forking only when the launched function can
reach DDP, an optimizer, torch.compile or a trainer (`workers/preload.py`): then forked
workers inherit it instead of each importing it (seconds on a small machine). Checked
here in a real Jupyter kernel, by what the parent and the workers have imported, never
by timing; and the decision itself on functions written the ways people write them.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from kernel_harness import Kernel
from notebook_launcher.workers.preload import before_fork, reason_to_preload

STARTUP = textwrap.dedent("""
    import sys
    import torch, torch.distributed as dist
    from notebook_launcher import notebook_launcher
""")


def cell(kernel: Kernel, code: str, timeout: float = 120):
    result = kernel.run(textwrap.dedent(code), timeout=timeout)
    assert result.status == "ok", result.traceback + result.text
    return result


@pytest.mark.timeout(240)
def test_trivial_first_call_skips_dynamo_and_a_ddp_call_inherits_it():
    with Kernel(startup=STARTUP) as kernel:
        assert kernel.value('"torch._dynamo" in sys.modules') is False  # a fresh kernel: not yet
        cell(kernel, """
            def rank_and_modules():
                return dist.get_rank(), "torch._dynamo" in sys.modules
            trivial = notebook_launcher(rank_and_modules, num_processes=2, display="none")
        """)
        assert kernel.value("trivial") == (0, False)
        assert kernel.value('"torch._dynamo" in sys.modules') is False

        # DDP built in a helper from another cell: still seen, so the workers find it imported
        cell(kernel, """
            def build_model():
                torch.manual_seed(0)
                return torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
        """)
        cell(kernel, """
            def train_one_step():
                inherited = "torch._dynamo" in sys.modules       # before anything imports it here
                model = build_model()
                optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
                x = torch.full((8, 4), float(dist.get_rank() + 1))  # different data per rank
                model(x).sum().backward()
                optimizer.step()
                weights = torch.cat([p.detach().flatten() for p in model.parameters()])
                every = [torch.zeros_like(weights) for _ in range(dist.get_world_size())]
                dist.all_gather(every, weights)
                return inherited, dist.get_world_size(), all(torch.equal(every[0], w) for w in every[1:])
            ddp = notebook_launcher(train_one_step, num_processes=2, display="none")
        """)
        assert kernel.value("ddp") == (True, 2, True)  # inherited, world size 2, DDP kept ranks in step
        assert kernel.value('"torch._dynamo" in sys.modules') is True
        assert kernel.wait_no_descendants() == []


def test_importing_dynamo_starts_no_thread():
    # The preload runs right before a fork: a thread it left running would be copied
    # into the workers as a dead thread, with whatever lock it held.
    code = ("import os, torch; n = lambda: len(os.listdir('/proc/self/task')); before = n(); "
            "import torch._dynamo; print(before, n())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, after = map(int, out.stdout.split())
    assert after == before


@pytest.mark.parametrize("enabled", [True, False])
def test_the_preload_runs_without_collections_and_restores_the_collector(enabled):
    # The import triggers about 300 collections (0.33 s of 1.26 s); paused, it took
    # 1.05 s. Whatever the person had set stays set.
    code = textwrap.dedent(f"""
        import gc, sys, torch
        from notebook_launcher.workers.preload import preload
        collections = []   # those that run inside an import (the garbage collected after it may run)
        def importing():
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_name != "_find_and_load":
                frame = frame.f_back
            return frame is not None
        gc.callbacks.append(lambda phase, info: phase == "start" and importing() and collections.append(1))
        {"gc.enable()" if enabled else "gc.disable()"}
        preload()
        print(len(collections), "torch._dynamo" in sys.modules, gc.isenabled())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "True", str(enabled)]


# ----------------------------------------------------------------- the decision
def _helper():
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


class _Loop:
    def fit(self):
        return _helper()


def test_functions_that_reach_dynamo_are_recognized():
    from torch.nn.parallel import DistributedDataParallel as DDP

    def local_import():
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel

    def alias():
        return DDP

    def calls_helper():
        return _helper()

    def through_a_class():
        return _Loop().fit()

    def compiles(model):
        return torch.compile(model)

    def hugging_face():
        from transformers import Trainer
        return Trainer

    optimizer_class = torch.optim.AdamW

    def closure():
        return optimizer_class

    assert reason_to_preload(local_import) == "test_functions_that_reach_dynamo_are_recognized.<locals>" \
        ".local_import: DistributedDataParallel"
    assert "DistributedDataParallel" in reason_to_preload(alias)
    assert reason_to_preload(calls_helper).endswith("-> _helper: optim")
    assert "_Loop.fit -> _helper: optim" in reason_to_preload(through_a_class)
    assert reason_to_preload(compiles).endswith(": torch.compile")
    assert reason_to_preload(hugging_face).endswith(": Trainer")
    assert "AdamW" in reason_to_preload(closure)
    assert reason_to_preload(functools.partial(calls_helper)) is not None
    assert reason_to_preload(print, (calls_helper,)) is not None        # a callable passed as an argument


def test_functions_that_do_not_reach_dynamo_are_left_alone():
    class Net(torch.nn.Module):
        def forward(self, x):
            return x * 2

    def collective():
        import torch.distributed as dist
        t = torch.ones(1)
        dist.all_reduce(t)
        return t.item()

    def inference():
        return Net()(torch.ones(1)), re.compile("a+")   # re.compile is not torch.compile

    for function in (collective, inference, print, lambda: None):
        assert reason_to_preload(function) is None, function


def test_tasks_without_a_function_are_not_inspected():
    """Spawn (no first task) and a session's first request carry no function: nothing to
    decide, so nothing is imported and nothing fails, even when the request's source
    builds DDP (a session preloads at its start, not here). In a fresh process: the test
    process may have imported torch._dynamo already."""
    code = textwrap.dedent("""
        import sys, torch
        from notebook_launcher.workers.preload import PRELOAD_MODULE, before_fork
        from notebook_launcher.workers.tasks import Execute, Pull
        ddp_cell = Execute("model = torch.nn.parallel.DistributedDataParallel(net)\\n"
                           "optimizer = torch.optim.SGD(model.parameters(), lr=0.1)", "<dist-cell-1>")
        for task in (None, ddp_cell, Pull("model")):
            before_fork(task)
        print("IMPORTED", PRELOAD_MODULE in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["IMPORTED", "False"], out.stdout + out.stderr
