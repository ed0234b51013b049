"""The default group is ready; torchrun-style code that initializes it again still works,
and asks that need a different group (a timeout, another backend) get one."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist

from notebook_launcher import WorkerError, notebook_launcher
from notebook_launcher.workers.stacks import StackDumps


def reinit_same_group():
    group = dist.group.WORLD
    dist.init_process_group(backend="gloo", init_method="env://")   # what torchrun scripts do
    return dist.group.WORLD is group


def reinit_with_short_timeout():
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=2))
    if dist.get_rank() == 1:
        time.sleep(8)
    dist.barrier()   # rank 0 gives up after 2 s, not after the default 30 minutes


def test_reinitializing_the_same_group_is_a_no_op():
    assert notebook_launcher(reinit_same_group, num_processes=2, return_all=True, display="none") == [True, True]


def test_a_timeout_asked_for_is_honoured():
    start = time.monotonic()
    with pytest.raises(WorkerError) as info:
        notebook_launcher(reinit_with_short_timeout, num_processes=2, display="none")
    assert info.value.rank == 0 and "timeout" in str(info.value).lower()
    assert time.monotonic() - start < 7  # rank 1 sleeps 8 s: the 2 s timeout fired first


def test_a_second_stack_dump_is_clean():
    dumps = StackDumps()
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from notebook_launcher.workers.stacks import register_dump_handler
        register_dump_handler({dumps.path(0)!r})
        print("ready", flush=True); time.sleep(30)   # one line: a dump between the two shows the same
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        first, second = dumps.dump(0, child.pid), dumps.dump(0, child.pid)
        assert "in <module>" in first and second == first
        assert "\x00" not in second
    finally:
        child.kill()
        child.wait(timeout=10)
        child.stdout.close()
        dumps.close()
