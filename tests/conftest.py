import os
import sys

import psutil
import pytest

sys.path.insert(0, os.path.dirname(__file__))

# The suite checks the CPU paths (gloo, CPU workers) and must pass on a GPU machine too,
# where a default launch would pick nccl and one worker per GPU: the GPUs are hidden from
# every test and from every process and kernel the tests start. The CUDA paths are
# checked by scripts/gpu_check*.py on a machine with GPUs.
os.environ["CUDA_VISIBLE_DEVICES"] = ""


def _running(process: psutil.Process) -> bool:
    """Not exited: a zombie has, and so has a process that is gone by the time we ask."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.NoSuchProcess:
        return "(exited meanwhile)"


def _ray_pool_worker(process: psutil.Process) -> bool:
    """An idle worker of a Ray cluster a test module started: Ray keeps a pool of them for
    later tasks. Ours (agents, ranks) are never idle workers; Ray tests check them by PID
    and by Ray's own tables."""
    try:
        return process.cmdline()[:1] == ["ray::IDLE"] or process.name() == "ray::IDLE"
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


@pytest.fixture(autouse=True)
def no_leftover_processes():
    """Every test must reap what it started (kernels are shut down by their fixtures).
    Children are still exiting while we look: one that is gone counts as reaped."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    import time

    deadline = time.monotonic() + 5
    while True:
        left = [p for p in psutil.Process().children(recursive=True)
                if p.pid not in before and _running(p) and not _ray_pool_worker(p)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, f"processes left behind: {[(p.pid, _name(p)) for p in left]}"


# ----------------------------------------------------------------- two workers (pytest-xdist)
# The suite mostly waits (kernels, ranks and clusters starting; Interrupts, stalls and lost
# nodes being noticed): run in one process, it kept this 2-CPU machine 44 % busy for 16
# minutes. pyproject's addopts run it on two workers, a file at a time each (`-n 2 --dist
# loadfile`: a file's module fixtures start once). Two lock files, shared by both workers,
# keep some tests apart: a test marked ``alone`` (it measures the whole machine, e.g. its
# shared memory) runs while the other worker waits between tests; a test of a file that
# starts Ray clusters never runs beside another such test (each cluster's nodes, object
# stores and agents on 2 CPUs; their timing checks, an Interrupt within 2 s, would suffer).
RAY_FILES = {"test_ray_kernel.py", "test_notebooks.py"}


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    """Each test holds its locks over its whole protocol (the module fixtures it sets up or
    tears down are inside it, and pytest-timeout's clock, which starts inside, does not
    count the wait), always in the same order, and releases them explicitly (ranks forked
    meanwhile hold copies of the open files)."""
    if not hasattr(item.config, "workerinput"):
        yield
        return
    import contextlib
    import fcntl

    folder = item.config._tmp_path_factory.getbasetemp().parent    # both workers' basetemps are in it
    wanted = [("alone.lock", fcntl.LOCK_EX if item.get_closest_marker("alone") else fcntl.LOCK_SH)]
    if item.path.name in RAY_FILES:
        wanted.append(("ray.lock", fcntl.LOCK_EX))
    with contextlib.ExitStack() as held:
        for name, how in wanted:
            lock = held.enter_context(open(folder / name, "a"))
            fcntl.flock(lock, how)
            held.callback(fcntl.flock, lock, fcntl.LOCK_UN)
        yield
