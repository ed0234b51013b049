"""The fault matrix: each failure in a real kernel, each asserting the cell ends within a
bound, the right rank and cause are named, nothing is left running, and the next launch works.

Bounds are measured from the moment that matters, never from the call's start: a failing
rank prints ``FAILING_AT <time.monotonic()>`` right before it fails (the clock is the same
in every process of the machine), the cell prints ``ENDED_AT`` when the error reached it,
and an `ExitWatch` sees when each rank's PID is gone. An Interrupt is pressed only once
the ranks are where the test says they are (a marker they write, or their state)."""

from __future__ import annotations

import re
import socket
import textwrap
import threading
import time

import pytest

from kernel_harness import ExitWatch, Kernel, press_when, wait_until_blocked

STARTUP = textwrap.dedent("""
    import os, sys, time, signal
    import torch, torch.distributed as dist
    from notebook_launcher import notebook_launcher, WorkerError

    def outcome(fn, **kw):
        try:
            value = notebook_launcher(fn, num_processes=2, device="cpu", display="none", **kw)
            print("OK", repr(value)[:200], "ENDED_AT", time.monotonic())
        except WorkerError as err:
            print("RANK", err.rank, "EXIT", err.exitcode, "SIGNAL", err.signal, "ENDED_AT", time.monotonic())
            print("MSG", str(err).splitlines()[0])
            print("TB", err.remote_traceback)

    def failing_at():   # said by a rank right before it fails: where the bounds start
        print("FAILING_AT", time.monotonic(), flush=True)

    def interrupted(fn, **kw):
        try:
            notebook_launcher(fn, num_processes=2, device="cpu", **kw)
        except KeyboardInterrupt:
            print("CELL INTERRUPTED AT", time.monotonic())
            raise
""")

# The README's promise: within 2 s of an Interrupt or a failure every worker is gone.
PROMISE = 2.0


@pytest.fixture(scope="module")
def kernel():
    with Kernel(startup=STARTUP) as k:
        yield k


def run(kernel: Kernel, code: str, timeout: float = 90):
    result = kernel.run(textwrap.dedent(code), timeout=timeout)
    left = kernel.wait_no_descendants(timeout=3)
    assert left == [], f"left behind: {left}"   # (a cmdline() here could race with the exit)
    return result


def moment(result, label: str) -> float:
    """A time.monotonic() that the kernel or a worker printed as ``label <t>``."""
    found = re.search(label + r" ([\d.]+)", result.stdout)
    assert found, f"no {label!r} in:\n{result.text[-3000:]}"
    return float(found.group(1))


def pids_printed(text: str, label: str) -> set:
    return {int(pid) for pid in re.findall(label + r" (\d+)", text)}


def failing_run(kernel: Kernel, code: str, timeout: float = 90) -> tuple:
    """Run a cell whose launched function prints ``RANK_PID <pid>`` first, and whose
    failing rank calls ``failing_at()``. Returns (the cell, seconds from the failure to the
    error in the cell, seconds from the failure to the last rank's exit)."""
    with ExitWatch() as watch:
        def follow(partial):
            watch.add(pids_printed(partial.stdout, "RANK_PID"))

        result = kernel.run(textwrap.dedent(code), timeout=timeout, on_output=follow)
        follow(result)
        assert len(pids_printed(result.stdout, "RANK_PID")) == 2, result.text
        failed = moment(result, "FAILING_AT")
        to_cell = moment(result, "ENDED_AT") - failed
        to_exit = watch.last_exit(timeout=10) - failed
    left = kernel.wait_no_descendants(timeout=3)
    assert left == [], f"left behind: {left}"
    return result, to_cell, to_exit


def next_launch_works(kernel: Kernel) -> None:
    result = run(kernel, "outcome(lambda: dist.get_world_size() + 40)")
    assert "OK 42" in result.stdout, result.text


@pytest.mark.parametrize("where, expected_rank", [("0", 0), ("1", 1)])
def test_raise_on_one_rank(kernel, where, expected_rank):
    result, to_cell, to_exit = failing_run(kernel, f"""
        def fails():
            print("RANK_PID", os.getpid(), flush=True)
            if dist.get_rank() == {where}:
                failing_at()
                raise ValueError("rank {where} is broken")
            dist.barrier()
            time.sleep(30)
        outcome(fails)
    """)
    assert f"RANK {expected_rank} EXIT 1" in result.stdout, result.text
    assert f"MSG rank {expected_rank} failed: ValueError: rank {where} is broken" in result.stdout
    assert to_cell < PROMISE and to_exit < PROMISE, (to_cell, to_exit)
    next_launch_works(kernel)


def test_raise_on_all_ranks_names_one_of_them(kernel):
    result = run(kernel, """
        def all_fail():
            raise RuntimeError(f"everyone fails, rank {dist.get_rank()}")
        outcome(all_fail)
    """)
    match = re.search(r"MSG rank (\d) failed: RuntimeError: everyone fails, rank (\d)", result.stdout)
    assert match and match.group(1) == match.group(2), result.text


def test_sys_exit_3_on_one_rank(kernel):
    result, to_cell, to_exit = failing_run(kernel, """
        def exits():
            print("RANK_PID", os.getpid(), flush=True)
            if dist.get_rank() == 1:
                failing_at()
                sys.exit(3)
            time.sleep(30)
        outcome(exits)
    """)
    assert "RANK 1 EXIT 3 SIGNAL None" in result.stdout, result.text
    assert "MSG rank 1 failed: SystemExit: 3 (exit code 3)" in result.stdout, result.text
    assert to_cell < PROMISE and to_exit < PROMISE, (to_cell, to_exit)


def test_os_exit_on_one_rank(kernel):
    result, to_cell, to_exit = failing_run(kernel, """
        def hard_exit():
            print("RANK_PID", os.getpid(), flush=True)
            if dist.get_rank() == 0:
                failing_at()
                os._exit(7)
            time.sleep(30)
        outcome(hard_exit)
    """)
    assert "RANK 0 EXIT 7 SIGNAL None" in result.stdout, result.text
    assert "MSG rank 0 failed: exited with code 7" in result.stdout
    assert to_cell < PROMISE and to_exit < PROMISE, (to_cell, to_exit)


@pytest.mark.parametrize("name, number", [("SIGKILL", 9), ("SIGSEGV", 11)])
def test_killed_by_a_signal(kernel, name, number):
    result, to_cell, to_exit = failing_run(kernel, f"""
        def killed():
            print("RANK_PID", os.getpid(), flush=True)
            if dist.get_rank() == 1:
                time.sleep(0.1)
                failing_at()
                os.kill(os.getpid(), signal.{name})
            dist.all_reduce(torch.ones(1))   # rank 0 loses its peer here: not the root cause
            time.sleep(30)
        outcome(killed)
    """)
    assert f"MSG rank 1 failed: killed by {name}" in result.stdout, result.text
    assert f"RANK 1 EXIT -{number} SIGNAL {number} " in result.stdout, result.text   # err.signal == {number}
    assert to_cell < PROMISE and to_exit < PROMISE, (to_cell, to_exit)
    next_launch_works(kernel)


def test_hang_in_a_collective_is_found_with_stacks(kernel):
    result = run(kernel, """
        def never_joins():
            print("BLOCKING_AT", time.monotonic(), flush=True)
            if dist.get_rank() == 0:
                dist.all_reduce(torch.ones(1))     # waits forever for rank 1
            else:
                time.sleep(3600)                   # rank 1 never joins
        outcome(never_joins, stall_timeout=2, on_stall="raise")
    """)
    out = result.stdout
    assert "RANK 1" in out and "no progress for 2s (stall_timeout) on rank 0, rank 1" in out, result.text
    assert "time.sleep(3600)                   # rank 1 never joins" in out
    assert "dist.all_reduce(torch.ones(1))     # waits forever for rank 1" in out
    assert "in all_reduce" in out
    # From the moment the last rank went quiet: not before stall_timeout, and after it at
    # most one heartbeat (a rank's last beat may come a second after it blocked) plus the
    # 2 s within which a failure ends the call.
    quiet_since = max(float(t) for t in re.findall(r"BLOCKING_AT ([\d.]+)", out))
    assert 2 <= moment(result, "ENDED_AT") - quiet_since < 2 + 1 + PROMISE + 1, result.text


def test_stall_warning_keeps_the_run_going(kernel):
    result = run(kernel, """
        def slow_then_done():
            time.sleep(3.5)
            return "finished"
        outcome(slow_then_done, stall_timeout=1.5, on_stall="warn")
    """)
    assert "OK 'finished'" in result.stdout, result.text
    assert "no progress for 1.5s (stall_timeout)" in result.stderr
    assert "time.sleep(3.5)" in result.stderr


def test_unpicklable_and_huge_return_values(kernel):
    result = run(kernel, """
        outcome(lambda: (x for x in range(3)))
        def big():
            return torch.ones(50 * 1024 * 1024)    # 200 MB of float32
        t0 = time.monotonic()
        value = notebook_launcher(big, num_processes=2, device="cpu", display="none")
        print("BIG", value.numel() * 4 // 2**20, "MB", "SUM", int(value.sum()), "IN", round(time.monotonic() - t0, 2))
    """, timeout=120)
    assert "could not be pickled" in result.stdout, result.text
    match = re.search(r"BIG 200 MB SUM 52428800 IN ([\d.]+)", result.stdout)
    assert match, result.text
    assert float(match.group(1)) < 10


@pytest.mark.parametrize("failure, message", [
    ('raise RuntimeError("failed while DataLoader workers run")', "RuntimeError: failed while DataLoader workers run"),
    ("os.kill(os.getpid(), signal.SIGKILL)", "killed by SIGKILL"),   # no cleanup runs in the rank
], ids=["raises", "sigkill"])
def test_dataloader_workers_die_with_a_failing_rank(kernel, failure, message):
    """Orphans are no kernel descendants: every process is followed by the PID it printed."""
    with ExitWatch() as watch:
        def follow(partial):
            watch.add(pids_printed(partial.stdout, "RANK_PID") | pids_printed(partial.stdout, "LOADER_PID"))

        result = kernel.run(textwrap.dedent(f"""
            from torch.utils.data import DataLoader, TensorDataset
            def loader_then_fail():
                print("RANK_PID", os.getpid(), flush=True)
                data = DataLoader(TensorDataset(torch.arange(64.0)), batch_size=4, num_workers=2,
                                  persistent_workers=True,
                                  worker_init_fn=lambda _: print("LOADER_PID", os.getpid(), flush=True))
                for i, _ in enumerate(data):
                    if i == 2:   # each rank had a batch from each of its loader workers: all 4 said their PID
                        dist.barrier()
                    if i == 3 and dist.get_rank() == 1:
                        print("FAILING_AT", time.monotonic(), flush=True)
                        {failure}
                time.sleep(30)
            outcome(loader_then_fail)
        """), timeout=90, on_output=follow)
        follow(result)
        assert f"MSG rank 1 failed: {message}" in result.stdout, result.text
        assert len(pids_printed(result.stdout, "LOADER_PID")) == 4, result.text   # 2 per rank
        assert watch.last_exit(timeout=10) - moment(result, "FAILING_AT") < PROMISE, watch.exits
    next_launch_works(kernel)


RESTART_LINE = re.compile(r"rank 0 failed \(RuntimeError: attempt (\d+) on port (\d+), store count (\d+)\); "
                          r"restart (\d+ of \d+)")


def test_restarts_run_out_and_raise_the_last_error(kernel):
    result = run(kernel, """
        def fails_every_time():
            if dist.get_rank() == 1:
                time.sleep(30)
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
            count = store.add("launches seen by this store", 1)
            raise RuntimeError(f"attempt {os.environ['TORCHELASTIC_RESTART_COUNT']} on port "
                               f"{os.environ['MASTER_PORT']}, store count {count}")
        try:
            notebook_launcher(fails_every_time, num_processes=2, device="cpu", display="none", max_restarts=2)
        except WorkerError as err:
            print("LAST", str(err).splitlines()[0], "| ATTEMPT", err.attempt)
    """)
    last = re.search(r"LAST rank 0 failed: RuntimeError: attempt 2 on port (\d+), store count (\d+) \| ATTEMPT 2",
                     result.stdout)
    assert last, result.text
    restarts = RESTART_LINE.findall(result.stderr)
    assert [(attempt, restart) for attempt, _, _, restart in restarts] == [("0", "1 of 2"), ("1", "2 of 2")], \
        result.stderr
    # Each attempt met on a store of its own: a new port, and a counter that starts over.
    assert len({port for _, port, _, _ in restarts} | {last.group(1)}) == 3, result.text
    assert [count for _, _, count, _ in restarts] + [last.group(2)] == ["1", "1", "1"], result.text


def test_a_restart_that_succeeds_returns_its_value(kernel):
    result = run(kernel, """
        def flaky():
            attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
            if attempt == 0 and dist.get_rank() == 0:
                raise RuntimeError(f"attempt {attempt} on port {os.environ['MASTER_PORT']}, store count 1")
            dist.barrier()
            return f"attempt {attempt} of {dist.get_world_size()} ranks"
        outcome(flaky, max_restarts=1)
    """)
    assert "OK 'attempt 1 of 2 ranks'" in result.stdout, result.text
    assert [restart for *_, restart in RESTART_LINE.findall(result.stderr)] == ["1 of 1"], result.stderr


def test_twenty_launches_back_to_back_leak_nothing(kernel):
    result = run(kernel, """
        import psutil
        me = psutil.Process()
        notebook_launcher(lambda: 0, num_processes=2, device="cpu", display="none")  # one-time setup (a pipe pair)
        fds_before = me.num_fds()
        values = [notebook_launcher(lambda: dist.get_rank() + 1, num_processes=2, device="cpu", display="none")
                  for _ in range(20)]
        print("VALUES", values, "FD_GROWTH", max(0, me.num_fds() - fds_before))
    """, timeout=120)
    assert "VALUES [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1] FD_GROWTH 0" in result.stdout, result.text


def test_100k_output_lines_arrive_whole(kernel):
    result = run(kernel, """
        def chatty():
            for i in range(50_000):
                print(f"line {i}")
        outcome(chatty)
    """, timeout=120)
    lines = [l for l in result.stdout.splitlines() if l.startswith("[rank")]
    assert len(lines) == 100_000
    assert all(re.fullmatch(r"\[rank[01]\]: line \d+", l) for l in lines)
    assert "OK None" in result.stdout


def held_port() -> socket.socket:
    """A port no other program can take while the socket is open, and that a launch can
    still listen on: bound with SO_REUSEADDR but not listening, which on Linux blocks every
    other bind except another SO_REUSEADDR socket's (the store's). A probe that closes its
    socket before the launch binds would leave the port to whoever comes first."""
    held = socket.socket()
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    held.bind(("127.0.0.1", 0))
    return held


def wait_for_arrivals(port: int, count: int, timeout: float = 60) -> None:
    """Until ``count`` ranks have said on the store at ``port`` that they arrived and now
    wait for the others (what `process_group.wait_for_every_rank` does before it blocks)."""
    from datetime import timedelta

    import torch.distributed as dist
    from notebook_launcher.workers.process_group import ARRIVED_KEY

    deadline = time.monotonic() + timeout
    store = dist.TCPStore("127.0.0.1", port, None, False, timeout=timedelta(seconds=timeout))
    try:
        while store.add(f"{ARRIVED_KEY}/0", 0) < count:
            assert time.monotonic() < deadline, f"fewer than {count} ranks arrived in {timeout}s"
            time.sleep(0.02)
    finally:
        del store


def test_interrupt_during_rendezvous(kernel):
    pressed, problems = [], []

    def both_ranks_wait_for_the_missing_node():
        wait_for_arrivals(port, 2)
        ranks = [p.pid for p in kernel.descendants()]
        assert len(ranks) == 2, ranks
        watch.add(ranks)
        for pid in ranks:
            wait_until_blocked(pid)

    with held_port() as held, ExitWatch() as watch:
        port = held.getsockname()[1]
        presser = press_when(kernel, both_ranks_wait_for_the_missing_node, pressed, problems)
        result = kernel.run(f"interrupted(lambda: 1, num_nodes=2, node_rank=0, use_port={port})", timeout=60)
        presser.join(timeout=10)
        assert not problems, f"{problems}: {result.text}"
        assert result.ename == "KeyboardInterrupt", result.text
        assert moment(result, "CELL INTERRUPTED AT") - pressed[0] < PROMISE
        assert watch.last_exit(timeout=5) - pressed[0] < PROMISE, watch.exits
    assert kernel.wait_no_descendants(timeout=3) == []
    next_launch_works(kernel)


def test_interrupt_during_teardown_still_cleans_up(kernel, tmp_path):
    pressed, problems = [], []
    sigterm_seen = tmp_path / "rank0-got-sigterm"

    def teardown_waits_out_the_grace():   # rank 0 got SIGTERM and ignored it
        deadline = time.monotonic() + 30
        while not sigterm_seen.exists():
            assert time.monotonic() < deadline, "rank 0 never got SIGTERM"
            time.sleep(0.005)

    with ExitWatch() as watch:
        def follow(partial):
            watch.add(pids_printed(partial.stdout, "RANK_PID"))

        presser = press_when(kernel, teardown_waits_out_the_grace, pressed, problems)
        result = kernel.run(textwrap.dedent(f"""
            def stubborn():
                print("RANK_PID", os.getpid(), flush=True)
                dist.barrier()                                      # both PIDs are out
                if dist.get_rank() == 0:                            # only SIGKILL will do
                    signal.signal(signal.SIGTERM, lambda *_: open({str(sigterm_seen)!r}, "w").close())
                    time.sleep(60)
                time.sleep(0.2)
                failing_at()
                raise ValueError("rank 1 fails")
            interrupted(stubborn, display="none")
        """), timeout=60, on_output=follow)
        presser.join(timeout=10)
        follow(result)
        assert not problems, f"{problems}: {result.text}"
        assert result.ename == "KeyboardInterrupt", result.text  # pressed during teardown: deferred, then raised
        assert len(pids_printed(result.stdout, "RANK_PID")) == 2, result.text
        assert moment(result, "CELL INTERRUPTED AT") - pressed[0] < PROMISE
        last_exit = watch.last_exit(timeout=5)
        assert last_exit - pressed[0] < PROMISE, watch.exits
        assert last_exit - moment(result, "FAILING_AT") < PROMISE, watch.exits
    assert kernel.wait_no_descendants(timeout=3) == []
    next_launch_works(kernel)


def test_two_kernels_launching_at_the_same_time():
    code = textwrap.dedent("""
        def total():
            t = torch.ones(1) * (dist.get_rank() + 1)
            dist.all_reduce(t)
            time.sleep(1)
            return t.item()
        print("TOTAL", [notebook_launcher(total, num_processes=2, device="cpu", display="none") for _ in range(3)])
    """)
    with Kernel(startup=STARTUP) as a, Kernel(startup=STARTUP) as b:
        results = {}
        threads = [threading.Thread(target=lambda k=k, n=n: results.__setitem__(n, k.run(code, timeout=90)))
                   for n, k in (("a", a), ("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        for name in ("a", "b"):
            assert "TOTAL [3.0, 3.0, 3.0]" in results[name].stdout, results[name].text
        assert a.wait_no_descendants() == [] and b.wait_no_descendants() == []
