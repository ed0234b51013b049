"""Session from plain Python (real ranks, real gloo group): the edges of its life cycle.

The notebook-facing behaviour (magics, Interrupt from the kernel) is in test_session_kernel.py.
"""

from __future__ import annotations

import _thread
import gc
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


def test_an_interrupt_while_a_big_value_is_pushed_never_leaves_the_ranks_out_of_step():
    with Session(2, device="cpu", display="none") as session:
        big = torch.zeros(40_000_000)                    # 160 MB: the push takes a while
        timer = threading.Timer(0.05, _thread.interrupt_main)
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            session.push(big=big)
            time.sleep(10)                               # the push was quicker than the timer
        timer.join()
        have = session.execute("'big' in globals()")     # never hangs: every rank got all or nothing
        assert len(set(have.values())) == 1, have
        assert session.status == SessionStatus.IDLE


def test_two_sessions_do_not_hold_each_others_pipes_or_ports():
    first = Session(2, device="cpu", display="none")
    second = Session(2, device="cpu", display="none")
    try:
        port, first_pids = first._ranks.rdzv.master_port, list(first.pids.values())
        first.close()
        assert wait_gone(first_pids) == []
        third = Session(2, device="cpu", display="none", use_port=port)   # the port is free again
        assert third.run(lambda: "third") == "third" and second.run(lambda: "second") == "second"
        third.close()
    finally:
        second.close()


def test_a_restart_that_fails_leaves_the_session_broken_and_the_next_call_tries_again():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    session = Session(2, device="cpu", display="none", use_port=port)
    try:
        with pytest.raises(WorkerError):
            session.execute("import os\nif rank == 1:\n    os._exit(3)")
        assert session.status == SessionStatus.BROKEN
        with socket.socket() as squatter:              # someone takes the port meanwhile
            squatter.bind(("127.0.0.1", port))
            squatter.listen()
            with pytest.raises(LaunchConfigError, match=str(port)):
                session.run(lambda: 1)
            assert session.status == SessionStatus.BROKEN
        assert session.run(lambda: "fresh again") == "fresh again"
    finally:
        session.close()


def test_bad_options_are_refused_before_anything_starts():
    before = psutil.Process().children(recursive=True)
    with pytest.raises(LaunchConfigError, match="mixed_precision"):
        Session(2, device="cpu", mixed_precision="fp61")
    with pytest.raises(LaunchConfigError, match="rank 5 is not in this session"):
        with Session(2, device="cpu", display="none") as session:
            session.execute("x = 1", ranks=[5])
    assert psutil.Process().children(recursive=True) == before
