"""Persistent sessions, the way a person uses them: %dist magics and Session in a real kernel."""

from __future__ import annotations

import os
import re
import signal
import textwrap
import threading
import time

import psutil
import pytest

from kernel_harness import ExitWatch, Kernel, pids_alive, press_when, wait_pids_gone, wait_until_blocked

STARTUP = textwrap.dedent("""
    import os, sys, time
    import torch, torch.distributed as dist
    from notebook_launcher import Session, WorkerError
    %load_ext notebook_launcher
""")


@pytest.fixture()
def kernel():
    with Kernel(startup=STARTUP) as k:
        yield k
        k.run("%dist stop")
        assert k.wait_no_descendants() == [], "the session left processes behind"


def ok(kernel: Kernel, code: str, timeout: float = 60):
    result = kernel.run(textwrap.dedent(code), timeout=timeout)
    assert result.status == "ok", result.traceback + result.stderr
    return result


SESSION = "get_ipython().find_magic('dist').__self__.session"


def start(kernel: Kernel, extra: str = "") -> list:
    out = ok(kernel, f"%dist start -n 2 --device cpu --display none {extra}")
    assert "Session started: 2 CPU processes (gloo, fork)" in out.stdout
    pids = [p.pid for p in kernel.descendants()]
    assert len(pids) == 2
    return pids


def test_cells_keep_state_on_every_rank_and_show_last_expressions(kernel):
    pids = start(kernel)
    ok(kernel, "%%dist\nx = torch.ones(3) * (rank + 1)\nprint('defined on', rank, dist.get_world_size())")
    out = ok(kernel, "%%dist\nt = x.clone(); dist.all_reduce(t)\nt.sum().item()")
    assert "[rank0]: defined on 0 2" not in out.stdout          # that was the previous cell's output
    assert "Out[rank 0]: 9.0" in out.stdout and "Out[rank 1]: 9.0" in out.stdout
    only_one = ok(kernel, "%%dist --ranks 1\nprint('only', rank)")
    assert only_one.stdout.strip() == "[rank1]: only 1"
    status = ok(kernel, "%dist status").stdout
    assert status.startswith("idle: 2 CPU processes") and all(f"pid {pid}" in status for pid in pids)
    assert sorted(p.pid for p in kernel.descendants()) == sorted(pids)   # the same ranks served every cell
    ok(kernel, "%dist stop")
    assert kernel.wait_no_descendants(timeout=5) == []


def test_functions_defined_after_the_start_and_pull_push_of_tensors(kernel):
    start(kernel)
    out = ok(kernel, """
        session = get_ipython().find_magic('dist').__self__.session
        def scaled_sum(k):                       # defined after the ranks started
            t = torch.full((2,), float(dist.get_rank() + 1)) * k
            dist.all_reduce(t)
            return t
        print(session.run(scaled_sum, 10).tolist(), session.run(scaled_sum, k=1, return_all=True))
    """)
    assert out.stdout.splitlines()[-1] == "[30.0, 30.0] [tensor([3., 3.]), tensor([3., 3.])]"
    ok(kernel, "weights = torch.arange(4.0)\n%dist push weights")
    ok(kernel, "%%dist\nweights = weights * (rank + 1)")
    pulled = ok(kernel, "%dist pull weights --rank 1\nprint(weights.tolist(), weights.device)")
    assert pulled.stdout.strip() == "[0.0, 2.0, 4.0, 6.0] cpu"
    missing = kernel.run("%dist pull nothing_here")
    assert missing.ename == "WorkerError" and "nothing_here" in missing.evalue


def test_an_error_on_one_rank_raises_in_the_cell_and_the_next_cell_keeps_the_state(kernel):
    pids = start(kernel)
    ok(kernel, "%%dist\nkept = rank * 100")
    failed = kernel.run("%%dist\nvalue = 1\nif rank == 1:\n    raise ValueError(f'bad shard on {rank}')")
    assert failed.status == "error" and failed.ename == "WorkerError"
    assert "rank 1 failed: ValueError: bad shard on 1" in failed.traceback
    assert "raise ValueError(f'bad shard on {rank}')" in failed.traceback   # the cell's own line
    assert "notebook_launcher/" not in failed.traceback                      # not our frames
    after = ok(kernel, "%%dist\nkept + value")
    assert "Out[rank 0]: 1" in after.stdout and "Out[rank 1]: 101" in after.stdout
    assert sorted(p.pid for p in kernel.descendants()) == sorted(pids)
    assert "broken" not in after.stderr


def test_a_dead_rank_breaks_the_session_and_the_next_cell_restarts_it(kernel):
    """(A rank that fails before a collective its peers wait in keeps the session: see
    test_collectives_kernel.py.)"""
    old = start(kernel)
    ok(kernel, "%%dist\nkept = 1")
    began = time.monotonic()
    failed = kernel.run("%%dist\nimport os\nif rank == 1:\n    os._exit(3)\ndist.barrier()")
    assert failed.ename == "WorkerError"
    assert "rank 1 failed: exited with code 3" in failed.traceback
    assert time.monotonic() - began < 5
    assert "The session is broken (rank " in failed.traceback and "the next call starts fresh ones" in failed.traceback
    assert pids_alive(old) == []                                  # the broken ranks are gone at once
    assert "broken" in ok(kernel, "%dist status").stdout
    again = ok(kernel, "%%dist\nprint('fresh', rank, 'kept' in globals())")
    assert again.stderr.count("the session was broken") == 1 and "starting fresh ranks" in again.stderr
    assert "[rank0]: fresh 0 False" in again.stdout and "[rank1]: fresh 1 False" in again.stdout
    assert not set(old) & {p.pid for p in kernel.descendants()}


# Each rank says where it is about to block; Interrupt is pressed once both said so and
# (blocked) both main threads are asleep there.
INTERRUPTED = {
    "in Python": ("import time\nprint(f'RANK{rank}_THERE', flush=True)\nfor i in range(600):\n    time.sleep(0.1)"),
    # (rank 0 waiting in gloo's barrier, in C, is released and keeps the session: see
    # test_collectives_kernel.py)
    # rank 0 cannot take the signal (as in a C extension's long call): it is killed
    "deaf to signals": ("import signal, time\nif rank == 0:\n    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])\n"
                        "print(f'RANK{rank}_THERE', flush=True)\ntime.sleep(60)"),
}


@pytest.mark.parametrize("where", list(INTERRUPTED))
def test_interrupt_ends_the_cell_within_two_seconds(kernel, where):
    pids = start(kernel)
    rank_pids = kernel.value(f"{SESSION}.pids")
    ok(kernel, "%%dist\nkept = 7")
    said = threading.Event()
    pressed, problems = [], []

    def there():
        assert said.wait(timeout=30), "the ranks never said they were there"
        if where != "in Python":
            for pid in rank_pids.values():
                wait_until_blocked(pid)

    with ExitWatch(pids) as watch:
        presser = press_when(kernel, there, pressed, problems)
        result = kernel.run("%%dist\n" + INTERRUPTED[where], timeout=60,
                            on_output=lambda partial: all(f"RANK{r}_THERE" in partial.stdout for r in (0, 1)) and said.set())
        ended = time.monotonic()
        presser.join(timeout=30)
        assert not problems, f"{problems}: {result.text}"
        assert result.ename == "KeyboardInterrupt"
        assert ended - pressed[0] < 2.0
        status = ok(kernel, "%dist status").stdout
        if where == "deaf to signals":
            assert status.startswith("broken") and "rank 0 could not be interrupted" in status, status
            assert watch.last_exit(timeout=5) - pressed[0] < 2.0, watch.exits   # every rank, by PID
        else:              # every rank left the cell: the session, its ranks and their state live on
            assert status.startswith("idle"), status
            assert pids_alive(pids) == pids and watch.exits == {}
            assert "Out[rank 1]: 7" in ok(kernel, "%%dist\nkept").stdout


def test_bad_magic_arguments_are_usage_errors_and_keep_the_running_session(kernel):
    pids = start(kernel)
    ok(kernel, "%%dist\nkept = rank")
    typo = kernel.run("%dist start -n 2 --device cpu --mixed-precision fp61")
    assert typo.status == "error" and "mixed_precision" in typo.evalue + typo.stderr
    no_ranks = kernel.run("%%dist --ranks ,\nprint(rank)")
    assert no_ranks.status == "error" and "--ranks takes comma-separated rank numbers" in no_ranks.stderr
    quote = kernel.run("%dist pull it's")
    assert quote.status == "error" and "could not read the arguments" in quote.stderr
    assert "Out[rank 1]: 1" in ok(kernel, "%%dist\nkept").stdout      # the same session, state kept
    assert sorted(p.pid for p in kernel.descendants()) == sorted(pids)


def test_without_a_session_the_cell_says_how_to_start_one(kernel):
    result = kernel.run("%%dist\nprint(rank)")
    assert result.status == "error"                              # IPython shows a UsageError as text
    assert "UsageError: No distributed session is running" in result.stderr and "%dist start -n 2" in result.stderr


def test_auto_mode_runs_every_cell_on_the_ranks_until_turned_off(kernel):
    start(kernel)
    ok(kernel, "%dist auto")
    on_ranks = ok(kernel, "print('where', rank)")
    assert "[rank0]: where 0" in on_ranks.stdout and "[rank1]: where 1" in on_ranks.stdout
    ok(kernel, "%dist auto off")
    here = kernel.run("print('where', rank)")
    assert here.ename == "NameError"                             # the notebook has no `rank`


def test_an_idle_session_is_never_reported_stalled_but_a_running_cell_is(tmp_path):
    """Idle for three stall_timeouts: nothing is said while idle (in the cell that waits,
    nor in the kernel's own output), and the idle time does not count against the next
    cell, a silent one shorter than stall_timeout."""
    own_output = tmp_path / "kernel-output.log"
    with Kernel(startup=STARTUP, own_output=str(own_output)) as kernel:
        try:
            start(kernel, "--stall-timeout 1")
            ok(kernel, "%%dist\nx = 1")                  # a cell, then the session idles
            idle = ok(kernel, "time.sleep(3)")
            quiet = ok(kernel, "%%dist\nimport time\ntime.sleep(0.4)")
            for cell in (idle, quiet):
                assert "no progress" not in cell.text + cell.display_text, cell.text
            stalled = ok(kernel, "%%dist\nimport time\nif rank == 1:\n    time.sleep(0.2)\n"
                                 "dist.barrier() if rank == 0 else time.sleep(3)\ndist.barrier() if rank == 1 else None",
                         timeout=60)
            assert "no progress for 1s (stall_timeout)" in stalled.text and "[rank0]" in stalled.stderr
        finally:
            kernel.run("%dist stop")
        assert kernel.wait_no_descendants() == [], "the session left processes behind"
    assert "no progress" not in own_output.read_text()


def test_report_in_a_cell_drives_its_dashboard(kernel):
    ok(kernel, "%dist start -n 2 --device cpu --display widgets")
    quick = ok(kernel, "%%dist\ny = 1")
    assert quick.displays == []                                  # nothing to show: no dashboard built
    shown = ok(kernel, "%%dist\nimport time\nfor step in progress(range(20)):\n    report(step, loss=1.0 / (step + 1))\n    time.sleep(0.02)")
    html = [d.get("text/html", "") for d in shown.displays]
    assert any("succeeded" in h and "loss" in h for h in html), html
    slow = ok(kernel, "%%dist\nimport time\ntime.sleep(1.2)")      # quiet, but past half a second
    assert slow.widget_states and any("succeeded" in d.get("text/html", "") for d in slow.displays)


def _fds_and_threads(pid: int) -> tuple:
    process = psutil.Process(pid)
    return process.num_fds(), process.num_threads()


def test_fifty_cells_leak_no_fds_threads_or_processes(kernel):
    pids = start(kernel)
    for _ in range(5):      # warm-up: the kernel opens a few fds of its own on first use (history, zmq)
        ok(kernel, "%%dist\nz = 0")
    fds, threads = _fds_and_threads(kernel.pid)
    rank_before = [_fds_and_threads(pid) for pid in pids]
    for i in range(50):
        ok(kernel, f"%%dist\nz = z + {i}\nprint(z)")
    assert "Out[rank 0]: 1225" in ok(kernel, "%%dist\nz").stdout
    # A leak of ours grows with the cells (one selector, pipe or thread each: 50+); the
    # kernel's own bookkeeping may add one or two.
    fds_after, threads_after = _fds_and_threads(kernel.pid)
    assert fds_after - fds < 5 and threads_after == threads
    assert [_fds_and_threads(pid) for pid in pids] == rank_before
    assert sorted(p.pid for p in kernel.descendants()) == sorted(pids)


@pytest.mark.parametrize("end", ["shutdown", "death"])
def test_kernel_shutdown_or_death_takes_every_rank(end):
    k = Kernel(startup=STARTUP)
    try:
        pids = start(k)
        assert pids_alive(pids) == pids
        if end == "death":
            os.kill(k.pid, signal.SIGKILL)
        else:                                     # a real shutdown request: the kernel exits by itself
            k.km.shutdown_kernel(now=False)
    finally:
        k.shutdown()
    deadline = time.monotonic() + 5
    while pids_alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pids_alive(pids) == []


@pytest.mark.parametrize("now", [True, False], ids=["now", "graceful"])
def test_kernel_restart_takes_every_rank_and_the_next_launch_works(now):
    """jupyter_client's restart (a notebook's restart button), with a session idle and a
    one-shot launch running: every rank of both is gone (by PID) within 2 s of the old
    kernel's exit, and a launch in the restarted kernel works."""
    with Kernel(startup=STARTUP) as k:
        ranks = start(k)
        running = k.submit(textwrap.dedent("""
            from notebook_launcher import notebook_launcher
            def sleeper():
                print("RANK_PID", os.getpid(), flush=True)
                time.sleep(600)
            notebook_launcher(sleeper, num_processes=2, device="cpu", display="none")
        """))
        printed = k.wait_for_output(running, r"RANK_PID \d+[\s\S]*RANK_PID \d+", timeout=60)
        ranks += [int(pid) for pid in re.findall(r"RANK_PID (\d+)", printed)]
        old_kernel = k.pid
        try:
            with ExitWatch([old_kernel, *ranks]) as watch:
                try:
                    k.restart(now=now)
                except RuntimeError as exc:   # ranks that survive hold the kernel's ports: the new one dies
                    assert wait_pids_gone(ranks, timeout=5) == [], f"ranks outlived the kernel; restart: {exc}"
                    raise
                watch.last_exit(timeout=10)
                assert max(watch.exits[pid] for pid in ranks) - watch.exits[old_kernel] < 2.0, watch.exits
        finally:
            for pid in wait_pids_gone(ranks, timeout=0):   # a test reaps what it started, even failing
                os.kill(pid, signal.SIGKILL)
        assert k.pid != old_kernel
        launched = ok(k, "from notebook_launcher import notebook_launcher\n"
                         "print(notebook_launcher(lambda: dist.get_world_size() + 40, num_processes=2, "
                         "device='cpu', display='none'))")
        assert launched.stdout.strip() == "42"
        assert k.wait_no_descendants() == []
