"""Session from plain Python (real ranks, real gloo group): the edges of its life cycle.

The notebook-facing behaviour (magics, Interrupt from the kernel) is in test_session_kernel.py.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import threading
import time

import psutil
import pytest
import torch

from notebook_launcher import LaunchConfigError, Session, SessionStatus, WorkerError


def alive(pids) -> list:
    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def wait_gone(pids, timeout=5.0) -> list:
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive(pids)


def test_a_dropped_session_takes_its_ranks_with_it():
    session = Session(2, device="cpu", display="none")
    pids = list(session.pids.values())
    del session
    gc.collect()
    assert wait_gone(pids) == []


def test_a_partial_last_line_belongs_to_its_own_call(capsys):
    with Session(2, device="cpu", display="none") as session:
        session.execute("print('no newline', end='')")
        first = capsys.readouterr().out
        session.execute("print('next')")
        second = capsys.readouterr().out
    assert "[rank0]: no newline" in first and "[rank1]: no newline" in first
    assert "no newline" not in second and "[rank0]: next" in second


def test_a_rank_still_computing_after_a_failure_is_waited_for_and_the_session_kept():
    with Session(2, device="cpu", display="none") as session:
        with pytest.raises(WorkerError, match="rank 1 failed: ValueError: only rank 1"):
            session.execute("import time\nstart = time.time()\nif rank == 1:\n    raise ValueError('only rank 1')\n"
                            "while time.time() - start < 4:\n    sum(range(1000))\nfinished = True")
        assert session.status == SessionStatus.IDLE
        assert session.execute("'finished' in globals()") == {0: "True", 1: "False"}


def read_so_far(pids) -> int:
    """Bytes the processes have read so far (pipes included: /proc/PID/io rchar)."""
    return sum(psutil.Process(pid).io_counters().read_chars for pid in pids)


def press_interrupt() -> None:
    """SIGINT to the main thread, as the stop button sends it to the kernel: unlike
    `_thread.interrupt_main` it also cuts a blocking system call (a write to a full pipe)."""
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


@contextlib.contextmanager
def within(seconds: float, what: str):
    """Fail, instead of hanging the suite, when the block runs past ``seconds`` (the main
    thread is interrupted as the stop button would)."""
    timer = threading.Timer(seconds, press_interrupt)
    timer.start()
    try:
        yield
    except KeyboardInterrupt:
        pytest.fail(f"{what} did not end within {seconds} s")
    finally:
        timer.cancel()


def interrupt_when(condition, timeout: float = 60.0) -> threading.Thread:
    """Press Interrupt (in the main thread) as soon as ``condition()`` holds."""
    def watch():
        deadline = time.monotonic() + timeout
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.002)
        press_interrupt()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return watcher


def test_an_interrupt_while_a_big_value_is_pushed_inline_never_leaves_the_ranks_out_of_step(monkeypatch):
    """Inline, as to ranks on other machines (shared memory switched off): the Interrupt
    lands while the parent is still writing the value into the pipes (the ranks have read
    10 of its 2 x 40 MB): the task's frames are still written whole, so the ranks finish or
    leave the push in time and the session keeps them, variables and all. Each rank has all
    of the value or none of it, and a push that is not interrupted arrives."""
    monkeypatch.setenv("NOTEBOOK_LAUNCHER_SHARED_MEMORY", "0")
    with Session(2, device="cpu", display="none") as session:
        session.execute("kept = rank")
        big, pids = torch.full((10_000_000,), 2.0), dict(session.pids)
        before = read_so_far(pids.values())
        watcher = interrupt_when(lambda: read_so_far(pids.values()) - before > 10_000_000)
        returned = False
        with pytest.raises(KeyboardInterrupt):
            session.push(big=big)
            returned = True                                  # never: the ranks were still reading
            time.sleep(60)
        watcher.join(timeout=5)
        assert not returned, "the Interrupt came after the push ended: nothing was interrupted"
        complete = "'big' not in globals() or (big.numel() == 10_000_000 and bool((big == 2).all()))"
        with within(30, "the call after the interrupted push"):
            assert session.execute(complete) == {0: "True", 1: "True"}
        # A rank left with half a task would wait for the rest: stuck, killed, state lost.
        assert session.pids == pids and session.execute("kept") == {0: "0", 1: "1"}
        assert session.status == SessionStatus.IDLE
        with within(60, "a push that nobody interrupts"):
            session.push(big=big + 1)
            assert session.execute("bool((big == 3).all()) and big.numel()") == {0: "10000000", 1: "10000000"}


def _rebuilt(value, marker_dir: str):
    """Unpickles a pushed value in a rank; rank 1 takes 30 s over it, in an interruptible sleep."""
    rank = os.environ["RANK"]
    open(os.path.join(marker_dir, f"rank{rank}"), "w").close()
    if rank == "1":
        time.sleep(30)
    return value


class LoadsSlowlyOnRank1:
    """A value whose unpickling in rank 1 is slow: rank 0 has bound it while rank 1 still reads."""

    def __init__(self, value, marker_dir: str):
        self.value, self.marker_dir = value, marker_dir

    def __reduce__(self):
        return _rebuilt, (self.value, self.marker_dir)


def test_an_interrupted_push_binds_the_value_on_every_rank_or_on_none(tmp_path):
    """Rank 0 has loaded the value, rank 1 is still unpickling it, when Interrupt is pressed:
    neither binds it (a push binds in a second step, once every rank holds the value), and
    a push after it binds on both."""
    with Session(2, device="cpu", display="none") as session:
        marker0, marker1 = tmp_path / "rank0", tmp_path / "rank1"
        both_loading = []                                  # when both ranks were seen unpickling
        def rank_0_is_done():
            if not both_loading and marker0.exists() and marker1.exists():
                both_loading.append(time.monotonic())
            # rank 0 needs milliseconds from its marker to its result; rank 1 sleeps 30 s
            return bool(both_loading) and time.monotonic() - both_loading[0] > 1.0
        watcher = interrupt_when(rank_0_is_done)
        with pytest.raises(KeyboardInterrupt):
            session.push(slow=LoadsSlowlyOnRank1(42, str(tmp_path)))
            time.sleep(60)
        watcher.join(timeout=5)
        assert session.status == SessionStatus.IDLE
        with within(30, "the call after the interrupted push"):
            have = session.execute("'slow' in globals()")
        assert have == {0: "False", 1: "False"}, have
        with within(30, "a push after the interrupted one"):
            session.push(slow=41)
            assert session.execute("slow + 1") == {0: "42", 1: "42"}


def held_by_us(port: int) -> bool:
    """Whether this process, or one it started, listens on ``port``. A port found taken
    that none of ours holds was taken by another test or agent meanwhile (ports found
    free can be taken by anyone before they are used): a reason to try another port."""
    ours = {os.getpid(), *(p.pid for p in psutil.Process().children(recursive=True))}
    return any(c.pid in ours for c in psutil.net_connections("tcp")
               if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN)


def a_free_port() -> int:
    """A port nobody listened on a moment ago (it may be taken by the time it is used)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_sessions_do_not_hold_each_others_pipes_or_ports():
    for _ in range(3):   # another try only when a stranger took the freed port meanwhile
        first = Session(2, device="cpu", display="none")
        second = Session(2, device="cpu", display="none")
        try:
            port, first_pids = first._ranks.rdzv.master_port, list(first.pids.values())
            first.close()
            assert wait_gone(first_pids) == []
            try:
                third = Session(2, device="cpu", display="none", use_port=port)   # the port is free again
            except LaunchConfigError:
                assert not held_by_us(port), "the closed session's port is still held by this process or its ranks"
                continue
            assert third.run(lambda: "third") == "third" and second.run(lambda: "second") == "second"
            third.close()
            return
        finally:
            second.close()
    pytest.fail("three freed ports were taken by other programs before they could be reused")


def test_a_restart_that_fails_leaves_the_session_broken_and_the_next_call_tries_again():
    for _ in range(3):   # the port must be fixed; another one when a stranger takes it first
        port = a_free_port()
        try:
            session = Session(2, device="cpu", display="none", use_port=port)
        except LaunchConfigError:
            assert not held_by_us(port)
            continue
        try:
            with pytest.raises(WorkerError):
                session.execute("import os\nif rank == 1:\n    os._exit(3)")
            assert session.status == SessionStatus.BROKEN
            with socket.socket() as squatter:              # someone takes the port meanwhile
                try:
                    squatter.bind(("127.0.0.1", port))
                except OSError:                            # a stranger was quicker: another port
                    assert not held_by_us(port)
                    continue
                squatter.listen()
                with pytest.raises(LaunchConfigError, match=str(port)):
                    session.run(lambda: 1)
                assert session.status == SessionStatus.BROKEN
            assert session.run(lambda: "fresh again") == "fresh again"
            return
        finally:
            session.close()
    pytest.fail("three free ports were taken by other programs before the session could use them")


def test_bad_options_are_refused_before_anything_starts():
    before = psutil.Process().children(recursive=True)
    with pytest.raises(LaunchConfigError, match="mixed_precision"):
        Session(2, device="cpu", mixed_precision="fp61")
    with pytest.raises(LaunchConfigError, match="rank 5 is not in this session"):
        with Session(2, device="cpu", display="none") as session:
            session.execute("x = 1", ranks=[5])
    assert psutil.Process().children(recursive=True) == before
