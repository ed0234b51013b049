"""The launcher core, exercised the way a person uses it: cells in a real Jupyter kernel."""

from __future__ import annotations

import os
import re
import signal
import textwrap
import threading
import time

import pytest

from kernel_harness import ExitWatch, Kernel, pids_alive

STARTUP = textwrap.dedent("""
    import os, sys, time, signal
    import torch, torch.distributed as dist
    from notebook_launcher import notebook_launcher, WorkerError
""")


@pytest.fixture(scope="module")
def kernel():
    with Kernel(startup=STARTUP) as k:
        yield k
        assert k.wait_no_descendants() == [], "a launch left processes behind"


def cell(kernel: Kernel, code: str, timeout: float = 60):
    return kernel.run(textwrap.dedent(code), timeout=timeout)


def worker_tracebacks(result) -> list:
    """Worker output lines (rank-prefixed) about a traceback or an Interrupt, wherever the
    cell put them: its output, its widgets (the log panel) or its displays (the summary's log)."""
    everywhere = "\n".join([result.text, result.widget_text, result.display_text])
    return re.findall(r"\[rank\d+\]: (?:Traceback.*|.*KeyboardInterrupt.*)", everywhere)


def assert_clean(kernel: Kernel) -> None:
    left = kernel.wait_no_descendants(timeout=3)
    assert left == [], f"processes left behind: {[p.cmdline() for p in left]}"


def test_all_reduce_sum_and_result_come_back(kernel):
    result = cell(kernel, """
        def total(x):
            t = torch.tensor([float(x * (dist.get_rank() + 1))])
            dist.all_reduce(t)
            return {"sum": t.item(), "rank": dist.get_rank(), "world": dist.get_world_size()}
        out = notebook_launcher(total, args=(10,), num_processes=2, device="cpu")
        every = notebook_launcher(total, args=(1,), num_processes=2, device="cpu", return_all=True)
        print(out, [e["rank"] for e in every])
    """)
    assert result.status == "ok", result.traceback
    assert "{'sum': 30.0, 'rank': 0, 'world': 2} [0, 1]" in result.stdout
    assert "Launching on 2 CPU processes (gloo, fork)" in result.stdout
    assert_clean(kernel)


def test_worker_environment_follows_torchrun_contract(kernel):
    result = cell(kernel, """
        KEYS = ["MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                "GROUP_RANK", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
                "TORCHELASTIC_USE_AGENT_STORE", "OMP_NUM_THREADS"]
        def env_and_reinit():
            dist.init_process_group()          # torchrun-style code must not fail here
            return {k: os.environ.get(k) for k in KEYS} | {"initialized": dist.is_initialized(),
                    "backend": dist.get_backend(), "threads": torch.get_num_threads()}
        envs = notebook_launcher(env_and_reinit, num_processes=2, device="cpu", return_all=True)
        print(envs)
    """)
    assert result.status == "ok", result.traceback
    envs = eval(result.stdout.strip().splitlines()[-1])
    ports = {e["MASTER_PORT"] for e in envs}
    assert len(ports) == 1 and ports != {"29500"}
    for rank, env in enumerate(envs):
        assert env["RANK"] == env["LOCAL_RANK"] == str(rank)
        assert env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == "2"
        assert env["GROUP_RANK"] == "0" and env["TORCHELASTIC_RESTART_COUNT"] == "0"
        assert env["TORCHELASTIC_USE_AGENT_STORE"] == "True"
        assert env["MASTER_ADDR"] == "127.0.0.1"
        assert env["initialized"] and env["backend"] == "gloo"
        assert int(env["OMP_NUM_THREADS"]) >= 1 and env["threads"] == int(env["OMP_NUM_THREADS"])
    # A fresh store (and port) for every launch.
    again = cell(kernel, "print('PORT', notebook_launcher(env_and_reinit, num_processes=2, device='cpu')['MASTER_PORT'])")
    assert again.status == "ok", again.traceback
    port = re.search(r"^PORT (\d+)$", again.stdout, re.MULTILINE)
    assert port, again.text
    assert port.group(1) not in ports


def test_output_is_whole_rank_prefixed_lines_including_c_level(kernel):
    result = cell(kernel, """
        import ctypes
        libc = ctypes.CDLL(None)
        def chatty():
            r = dist.get_rank()
            for i in range(300):
                print(f"py-line {r} {i} " + "x" * 50)
                if i % 50 == 0:
                    os.write(1, f"fd-line {r} {i}\\n".encode())
                    libc.printf(f"c-line {r} {i}\\n".encode()); libc.fflush(None)
            print(f"to-stderr {r}", file=sys.stderr)
            return r
        notebook_launcher(chatty, num_processes=2, device="cpu", display="none")   # lines go to the cell, not a log panel
    """)
    assert result.status == "ok", result.traceback
    lines = [l for l in result.stdout.splitlines() if l.startswith("[rank")]
    pattern = re.compile(r"^\[rank([01])\]: (?:py-line \1 \d+ x{50}|fd-line \1 \d+|c-line \1 \d+)$")
    bad = [l for l in lines if not pattern.match(l)]
    assert bad == [], bad[:5]
    for rank in (0, 1):
        assert sum(1 for l in lines if l.startswith(f"[rank{rank}]: py-line")) == 300
        assert sum(1 for l in lines if l.startswith(f"[rank{rank}]: c-line")) == 6
        assert f"[rank{rank}]: to-stderr {rank}" in result.stderr


def test_raise_on_one_rank_names_it_with_the_cell_traceback(kernel):
    result = cell(kernel, """
        def fails_on_rank_1():
            if dist.get_rank() == 1:
                time.sleep(0.2)
                raise ValueError("bad batch on purpose")   # the notebook's own line
            dist.all_reduce(torch.ones(1))                # rank 0 waits for rank 1 here
            time.sleep(60)
        t0 = time.monotonic()
        try:
            notebook_launcher(fails_on_rank_1, num_processes=2, device="cpu")
        except WorkerError as err:
            elapsed = time.monotonic() - t0
            print("RANK", err.rank, "EXIT", err.exitcode, "SIGNAL", err.signal, "SECONDS", round(elapsed, 2))
            print("CAUSE", repr(err.__cause__))
            print("TB", err.remote_traceback)
    """)
    assert result.status == "ok", result.traceback
    out = result.stdout
    assert "RANK 1 EXIT 1 SIGNAL None" in out
    assert float(re.search(r"SECONDS ([\d.]+)", out).group(1)) < 2.0 + 0.2
    assert "CAUSE ValueError('bad batch on purpose')" in out
    assert 'raise ValueError("bad batch on purpose")   # the notebook\'s own line' in out
    assert_clean(kernel)
    # The kernel is ready for the next run.
    again = cell(kernel, "print(notebook_launcher(lambda: dist.get_world_size() * 21, num_processes=2, device='cpu'))")
    assert again.stdout.strip().endswith("42")


def test_uncaught_worker_error_shows_rank_and_is_a_child_failed_error(kernel):
    result = cell(kernel, """
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        def boom():
            print("before the error", flush=True)
            if dist.get_rank() == 0:
                raise KeyError("missing column")
            dist.barrier()
        try:
            notebook_launcher(boom, num_processes=2, device="cpu")
        except ChildFailedError as err:   # what accelerate users already catch
            print("caught", type(err).__name__, err.rank)
        notebook_launcher(boom, num_processes=2, device="cpu")
    """)
    assert "caught WorkerError 0" in result.stdout
    assert result.status == "error" and result.ename == "WorkerError"
    assert "rank 0 failed: KeyError: 'missing column'" in result.evalue
    # No worker traceback spam: it is in the exception. The workers' lines go to the final
    # summary's log (widgets); one of them shows that is where we look. The run fails in
    # well under a second with nothing to plot, so no live dashboard was ever built.
    assert result.widget_text == ""
    assert "[rank0]: before the error" in result.display_text
    assert worker_tracebacks(result) == []
    assert_clean(kernel)


def test_signal_death_is_named(kernel):
    result = cell(kernel, """
        def segfault_rank_1():
            if dist.get_rank() == 1:
                os.kill(os.getpid(), signal.SIGSEGV)
            dist.all_reduce(torch.ones(1))
        try:
            notebook_launcher(segfault_rank_1, num_processes=2, device="cpu")
        except WorkerError as err:
            print("RANK", err.rank, "SIGNAL", err.signal, "MSG", str(err).splitlines()[0])
    """)
    assert "RANK 1 SIGNAL 11 MSG rank 1 failed: killed by SIGSEGV" in result.stdout
    assert_clean(kernel)


@pytest.mark.parametrize("display", ["widgets", "none"])
def test_interrupt_stops_every_worker_within_2s_without_worker_tracebacks(kernel, display):
    pressed = []

    def press_interrupt_once_training(watch: ExitWatch):
        deadline = time.monotonic() + 30
        while len(kernel.descendants()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # the workers are inside their training loop now
        watch.add(p.pid for p in kernel.descendants())
        pressed.append(time.monotonic())
        kernel.interrupt()

    code = textwrap.dedent(f"""
        def long_training():
            for step in range(600):
                if step == 0:
                    print("training step", step, flush=True)
                dist.all_reduce(torch.ones(1000))
                time.sleep(0.1)
        try:
            notebook_launcher(long_training, num_processes=2, device="cpu", display={display!r})
        except KeyboardInterrupt:
            print("CELL INTERRUPTED AT", time.monotonic())
            raise
    """)
    with ExitWatch() as watch:
        presser = threading.Thread(target=press_interrupt_once_training, args=(watch,))
        presser.start()
        result = kernel.run(code, timeout=60)
        presser.join(timeout=40)
        assert pressed, "the workers never started"
        assert result.ename == "KeyboardInterrupt", result.text
        # The README's promise, measured from the press: the cell raised, every worker exited.
        interrupted_at = float(re.search(r"CELL INTERRUPTED AT ([\d.]+)", result.stdout).group(1))
        assert interrupted_at - pressed[0] < 2.0
        assert watch.last_exit(timeout=5) - pressed[0] < 2.0
    # Workers' lines go to the log panel and the final summary (widgets) or to the cell
    # (none): a line every rank printed before the press is there, and no traceback.
    where = {"widgets": [result.widget_text, result.display_text], "none": [result.text]}[display]
    for text in where:
        assert "[rank0]: training step 0" in text and "[rank1]: training step 0" in text, text[-2000:]
    assert worker_tracebacks(result) == []
    assert_clean(kernel)
    again = cell(kernel, "print(notebook_launcher(lambda: 'after interrupt', num_processes=2, device='cpu'))")
    assert again.stdout.strip().endswith("after interrupt")


def test_spawn_carries_notebook_functions_closures_lambdas_and_globals(kernel):
    result = cell(kernel, """
        SCALE = 7                                  # a notebook global
        def scaled(x):
            return x * SCALE * dist.get_world_size()
        def make_adder(k):
            return lambda v: v + k                 # a closure
        add3 = make_adder(3)
        def use_all(x):
            return add3(scaled(x)) + (lambda y: y * 0)(1)
        print("SPAWN", notebook_launcher(use_all, args=(2,), num_processes=2, device="cpu", start_method="spawn"))
    """, timeout=120)
    assert result.status == "ok", result.traceback
    assert "SPAWN 31" in result.stdout
    assert "(gloo, spawn)" in result.stdout
    assert_clean(kernel)


def test_spawn_error_traceback_shows_notebook_lines(kernel):
    result = cell(kernel, """
        def fail_spawned():
            raise RuntimeError("from a spawned worker")   # visible cell line
        try:
            notebook_launcher(fail_spawned, num_processes=2, device="cpu", start_method="spawn")
        except WorkerError as err:
            print(err.remote_traceback)
    """, timeout=120)
    assert 'raise RuntimeError("from a spawned worker")   # visible cell line' in result.stdout
    assert_clean(kernel)


def test_unpicklable_return_value_is_a_clear_error(kernel):
    result = cell(kernel, """
        try:
            notebook_launcher(lambda: (i for i in range(3)), num_processes=2, device="cpu")
        except WorkerError as err:
            print("ERR", str(err).splitlines()[0])
    """)
    assert "ERR rank 0 failed: TypeError: rank 0's return value (generator) could not be pickled" in result.stdout
    assert_clean(kernel)


def test_kernel_death_takes_the_workers_with_it():
    k = Kernel(startup=STARTUP)
    try:
        k.client.execute(textwrap.dedent("""
            def forever():
                while True:
                    time.sleep(0.1)
            notebook_launcher(forever, num_processes=2, device="cpu")
        """))
        deadline = time.monotonic() + 30
        while len(k.descendants()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = [p.pid for p in k.descendants()]
        assert len(pids) >= 2
    finally:
        os.kill(k.pid, signal.SIGKILL)  # no cleanup code of ours runs in the kernel
        k.shutdown()
    deadline = time.monotonic() + 5
    while pids_alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pids_alive(pids) == []


def test_loggers_set_up_in_the_notebook_log_through_the_ranks_output(kernel):
    # transformers and Lightning attach StreamHandlers to the kernel's stderr when imported
    result = cell(kernel, """
        import logging
        mylib = logging.getLogger("mylib")
        mylib.addHandler(logging.StreamHandler())
        mylib.setLevel(logging.INFO)
        def logs():
            logging.getLogger("mylib").info("logged by rank %d", dist.get_rank())
        notebook_launcher(logs, num_processes=2, device="cpu", display="none")
        mylib.info("logged by the notebook")
    """)
    assert result.status == "ok", result.traceback
    assert "[rank0]: logged by rank 0" in result.stderr and "[rank1]: logged by rank 1" in result.stderr
    assert "\nlogged by the notebook\n" in "\n" + result.stderr            # the notebook's handler is its own
    assert_clean(kernel)
