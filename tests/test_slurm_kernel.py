"""Ranks on a real Slurm, from a real kernel: `cluster="slurm"`.

One local Slurm for the module (`slurm_cluster.LocalSlurm`: Debian's slurm-wlm and munge,
one node with this machine's CPUs, no accounting). The kernel runs outside any
allocation, so every call or session submits a holding job, runs its ranks in it, and
cancels it; attach mode is run inside ``salloc``. After every test the queue is empty and
every rank process is gone.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from kernel_harness import Kernel, wait_pids_gone
from slurm_cluster import LocalSlurm, available

pytestmark = pytest.mark.skipif(not available(), reason="Slurm (slurm-wlm, munge) is not installed: .ci/run installs it")

STARTUP = textwrap.dedent("""
    import os, time
    import torch, torch.distributed as dist
    from notebook_launcher import notebook_launcher, SlurmCluster, WorkerError
    %load_ext notebook_launcher
""")


@pytest.fixture(scope="module")
def slurm():
    with LocalSlurm() as started:
        saved = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = started.conf    # for the kernels started here
        try:
            yield started
        finally:
            os.environ.pop("SLURM_CONF") if saved is None else os.environ.__setitem__("SLURM_CONF", saved)


@pytest.fixture(scope="module")
def kernel(slurm):
    with Kernel(startup=STARTUP, timeout=120) as k:
        yield k


def cell(kernel: Kernel, code: str, timeout: float = 170):
    return kernel.run(textwrap.dedent(code), timeout=timeout)


def pids_in(text: str) -> list:
    return [int(p) for p in re.findall(r"PID (\d+)", text)]


def assert_nothing_left(slurm: LocalSlurm, pids=()) -> None:
    assert slurm.wait_queue_empty(timeout=30) == [], "a Slurm job was left in the queue"
    assert wait_pids_gone(pids, timeout=10) == [], "rank processes left behind"


def test_a_launch_runs_inside_a_slurm_job_and_returns_rank_0s_value(kernel, slurm):
    result = cell(kernel, """
        def total(x):
            t = torch.tensor([float(x * (dist.get_rank() + 1))])
            dist.all_reduce(t)
            print("PID", os.getpid(), "JOB", os.environ["SLURM_JOB_ID"], flush=True)
            return t.item()
        print("VALUE", notebook_launcher(total, args=(10,), num_processes=2, cluster="slurm", display="text"))
    """)
    assert result.status == "ok", result.traceback + result.stderr
    assert "VALUE 30.0" in result.stdout, result.text
    assert "Launching on 2 CPU processes on each of 1 Slurm node (gloo, spawn)" in result.stdout
    jobs = set(re.findall(r"JOB (\d+)", result.stdout))
    assert len(jobs) == 1, result.stdout                   # both ranks ran inside one Slurm job
    assert_nothing_left(slurm, pids_in(result.stdout))


def test_an_error_on_rank_1_names_the_rank_its_node_and_its_traceback(kernel, slurm):
    result = cell(kernel, """
        def fails_on_rank_1():
            print("PID", os.getpid(), flush=True)
            if dist.get_rank() == 1:
                raise ValueError("bad shard on rank 1")   # the cell's own line
            dist.barrier()
        try:
            notebook_launcher(fails_on_rank_1, num_processes=2, cluster="slurm", display="none")
        except WorkerError as err:
            print("ERR", str(err).splitlines()[0])
            print("CAUSE", type(err.__cause__).__name__, "TB", "# the cell's own line" in err.remote_traceback)
    """)
    assert result.status == "ok", result.traceback
    assert re.search(r"ERR rank 1 on node 0 \(.+\) failed: ValueError: bad shard on rank 1", result.stdout), result.text
    assert "CAUSE ValueError TB True" in result.stdout
    assert_nothing_left(slurm, pids_in(result.stdout))


def test_a_session_keeps_state_over_three_cells(kernel, slurm):
    started = cell(kernel, "%dist start -n 2 --cluster slurm --display none")
    assert started.status == "ok", started.traceback
    assert "Session started: 2 CPU processes on each of 1 Slurm node (gloo, spawn)" in started.stdout
    try:
        first = cell(kernel, "%%dist\nimport os\nweights = torch.ones(2) * (rank + 1)\nprint('PID', os.getpid())")
        second = cell(kernel, "%%dist\ndist.all_reduce(weights)\nweights.sum().item()")
        third = cell(kernel, "%%dist\nraise ValueError(f'only a user error on rank {rank}') if rank == 1 else 7")
        fourth = cell(kernel, "%%dist\nweights.tolist()")
        queue_during = slurm.queue()
    finally:
        stopped = cell(kernel, "%dist stop")
    assert len(queue_during) == 1                          # one holding job for the whole session
    assert "Out[rank 0]: 6.0" in second.stdout and "Out[rank 1]: 6.0" in second.stdout, second.text
    assert third.status == "error" and "only a user error on rank 1" in third.evalue + third.traceback
    assert "Out[rank 0]: [3.0, 3.0]" in fourth.stdout and "Out[rank 1]: [3.0, 3.0]" in fourth.stdout, fourth.text
    assert stopped.status == "ok"
    assert_nothing_left(slurm, pids_in(first.stdout))


def test_interrupt_ends_the_cell_within_two_seconds(kernel, slurm):
    msg_id = kernel.submit(textwrap.dedent("""
        def sleeps():
            print("PID", os.getpid(), "READY", flush=True)
            time.sleep(120)
        notebook_launcher(sleeps, num_processes=2, cluster="slurm", display="none")
    """))
    out = kernel.wait_for_output(msg_id, r"(PID \d+ READY[\s\S]*){2}", timeout=170)
    pressed = time.monotonic()
    kernel.interrupt()
    with pytest.raises(TimeoutError, match="the cell ended"):
        kernel.wait_for_output(msg_id, r"NEVER PRINTED", timeout=30)
    assert time.monotonic() - pressed < 2.0, "the cell did not end within 2 s of the Interrupt"
    assert_nothing_left(slurm, pids_in(out))


def test_scancel_mid_run_ends_the_call_within_ten_seconds_saying_so(kernel, slurm):
    msg_id = kernel.submit(textwrap.dedent("""
        def long_job():
            print("PID", os.getpid(), "JOB", os.environ["SLURM_JOB_ID"], "READY", flush=True)
            for _ in range(1200):
                dist.all_reduce(torch.ones(1))
                time.sleep(0.1)
        try:
            notebook_launcher(long_job, num_processes=2, cluster="slurm", display="none")
        except WorkerError as err:
            print("ERR", str(err).splitlines()[0])
    """))
    out = kernel.wait_for_output(msg_id, r"(PID \d+ JOB \d+ READY[\s\S]*){2}", timeout=170)
    job = re.search(r"JOB (\d+)", out).group(1)
    cancelled = time.monotonic()
    subprocess.run(["scancel", job], env=slurm.env, check=True, timeout=30)
    result = kernel.wait_for_output(msg_id, r"ERR .*", timeout=60)
    assert time.monotonic() - cancelled < 10.0, "the cancelled job was reported too late"
    assert re.search(rf"ERR rank \d on node 0 \(.+\) failed: lost with its node: the Slurm job {job} was cancelled "
                     r"\(scancel\)", result), result
    kernel.run("1", timeout=60)
    assert_nothing_left(slurm, pids_in(out))


def test_a_session_whose_job_is_cancelled_is_broken_and_starts_afresh(kernel, slurm):
    started = cell(kernel, "%dist start -n 2 --cluster slurm --display none")
    assert started.status == "ok", started.traceback
    try:
        first = cell(kernel, "%%dist\nimport os\nkept = rank\nprint('PID', os.getpid(), 'JOB', os.environ['SLURM_JOB_ID'])")
        job = re.search(r"JOB (\d+)", first.stdout).group(1)
        msg_id = kernel.submit("%%dist\nimport time\nprint('SLEEPING', flush=True)\ntime.sleep(120)")
        kernel.wait_for_output(msg_id, r"(SLEEPING[\s\S]*){2}", timeout=60)
        cancelled = time.monotonic()
        subprocess.run(["scancel", job], env=slurm.env, check=True, timeout=30)
        with pytest.raises(TimeoutError, match="the cell ended"):
            kernel.wait_for_output(msg_id, r"NEVER PRINTED", timeout=60)
        ended_in = time.monotonic() - cancelled
        again = cell(kernel, "%%dist\n'kept' in globals()")
        jobs_now = slurm.queue()
    finally:
        cell(kernel, "%dist stop")
    assert ended_in < 10.0, "the cancelled job was reported too late"
    assert "session was broken" in again.stderr and "starting fresh ranks" in again.stderr, again.text
    assert "Out[rank 0]: False" in again.stdout and jobs_now and jobs_now != [job]   # a new holding job
    assert_nothing_left(slurm, pids_in(first.stdout))


def test_a_killed_kernel_leaves_no_job_and_no_rank(slurm):
    with Kernel(startup=STARTUP, timeout=120) as doomed:
        msg_id = doomed.submit(textwrap.dedent("""
            def sleeps():
                print("PID", os.getpid(), "READY", flush=True)
                time.sleep(300)
            notebook_launcher(sleeps, num_processes=2, cluster="slurm", display="none")
        """))
        out = doomed.wait_for_output(msg_id, r"(PID \d+ READY[\s\S]*){2}", timeout=170)
        assert len(slurm.queue()) == 1
        os.kill(doomed.pid, signal.SIGKILL)
        assert wait_pids_gone(pids_in(out), timeout=30) == [], "ranks outlived their kernel"
        assert slurm.wait_queue_empty(timeout=60) == [], "the holding job outlived its kernel"


def test_attach_mode_inside_salloc_uses_the_allocation_and_keeps_it(slurm, tmp_path):
    script = tmp_path / "inside.py"
    script.write_text(textwrap.dedent("""
        import os, subprocess
        import torch, torch.distributed as dist
        from notebook_launcher import notebook_launcher
        def where():
            t = torch.ones(1)
            dist.all_reduce(t)
            return os.environ["NOTEBOOK_LAUNCHER_SLURM_JOB_ID"], t.item()
        job, total = notebook_launcher(where, num_processes=2, cluster="slurm", display="none")
        print("OURS", os.environ["SLURM_JOB_ID"], "RAN IN", job, "SUM", total)
        still = subprocess.run(["squeue", "-h", "-j", os.environ["SLURM_JOB_ID"], "-o", "%T"],
                               capture_output=True, text=True).stdout.strip()
        print("AFTER", still)
    """))
    done = subprocess.run(["salloc", "-N1", "--cpus-per-task=2", sys.executable, str(script)], env=slurm.env,
                          capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stdout + done.stderr
    found = re.search(r"OURS (\d+) RAN IN (\d+) SUM 2.0", done.stdout)
    assert found and found.group(1) == found.group(2), done.stdout
    assert "AFTER RUNNING" in done.stdout                     # the person's allocation is never cancelled
    assert "waiting for Slurm job" not in done.stderr        # nothing was submitted
    assert slurm.wait_queue_empty(timeout=30) == []


def test_what_cannot_work_is_refused_before_anything_starts(kernel, slurm, tmp_path):
    result = cell(kernel, """
        from notebook_launcher import LaunchConfigError
        for options in (lambda: dict(device="cuda"), lambda: dict(cluster=SlurmCluster(gpus_per_node=0)),
                        lambda: dict(cluster=SlurmCluster(sbatch_args="--qos=x"))):
            try:
                notebook_launcher(print, **{"num_processes": 1, "cluster": "slurm", **options()})
            except LaunchConfigError as err:
                print("REFUSED", str(err)[:70])
    """)
    assert result.status == "ok", result.traceback
    refused = re.findall(r"REFUSED (.*)", result.stdout)
    assert refused == ["device='cuda' on Slurm needs GPUs: pass cluster=SlurmCluster(gpus_per_",
                       "SlurmCluster(gpus_per_node=0) must be a positive whole number.",
                       "SlurmCluster(sbatch_args=...) is a tuple of options, e.g. ('--qos=debu"], result.stdout
    # Without Slurm's commands (a laptop): the error says where to run.
    code = ("from notebook_launcher import notebook_launcher, LaunchConfigError\n"
            "try:\n    notebook_launcher(print, num_processes=1, cluster='slurm')\n"
            "except LaunchConfigError as err:\n    print('REFUSED', err)\n")
    done = subprocess.run([sys.executable, "-c", code], env={**slurm.env, "PATH": str(tmp_path)},
                          capture_output=True, text=True, timeout=120)
    assert "REFUSED cluster='slurm' needs Slurm's commands on this machine; sbatch, srun" in done.stdout, done.stdout + done.stderr
    # Inside an allocation of 1 node, asking for 2.
    inside = subprocess.run(["salloc", "-N1", sys.executable, "-c",
                             code.replace("cluster='slurm')", "num_nodes=2, cluster='slurm')")],
                            env=slurm.env, capture_output=True, text=True, timeout=120)
    assert "REFUSED num_nodes=2, but this notebook runs inside Slurm job" in inside.stdout, inside.stdout + inside.stderr
    assert slurm.wait_queue_empty(timeout=30) == []
