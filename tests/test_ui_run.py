"""block=False: the Run handle (wait, result, stop, status) with real workers.

Every test ends with no process left (the autouse fixture in conftest checks it).
"""

import os
import re
import threading
import time

import psutil
import pytest

from notebook_launcher import Run, WorkerError, notebook_launcher, report


def slow(steps, pause):
    import torch.distributed as dist

    for step in range(steps):
        report(step, loss=1.0 / (step + 1))
        time.sleep(pause)
    return dist.get_rank() + 100


def test_returns_at_once_then_wait_and_result():
    run = notebook_launcher(slow, args=(40, 0.05), num_processes=2, device="cpu", display="none", block=False)
    assert isinstance(run, Run)
    assert run.status in ("starting", "running") and not run.done()   # 2 s of training still ahead
    assert run.wait(timeout=0.01) is False
    assert run.wait(timeout=60) is True
    assert run.status == "succeeded" and run.result() == 100 and run.error is None
    assert run.state.elapsed >= 2.0
    assert run.state.series["loss"].count == 40
    assert "succeeded" in repr(run) and "step 39" in repr(run)


def test_result_with_return_all_and_a_timeout():
    run = notebook_launcher(slow, args=(30, 0.02), num_processes=2, device="cpu", display="none", block=False,
                            return_all=True)
    with pytest.raises(TimeoutError):
        run.result(timeout=0.05)
    assert run.result(timeout=60) == [100, 101]


def test_stop_ends_the_run_and_reaps_every_worker():
    run = notebook_launcher(slow, args=(100_000, 0.01), num_processes=2, device="cpu", display="none", block=False)
    deadline = time.monotonic() + 30
    while (run.state.last_step or 0) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = [info.pid for info in run.state.ranks.values()]
    assert run.status == "running" and all(psutil.pid_exists(pid) for pid in pids)
    start = time.monotonic()
    assert run.stop() is True
    assert time.monotonic() - start < 3.0
    assert run.status == "stopped" and run.state.status == "stopped"
    assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    with pytest.raises(RuntimeError, match="stopped"):
        run.result()
    assert run.stop() is True                                   # a second stop is harmless


def test_a_failure_is_the_same_worker_error_as_a_blocking_run():
    def fails_on_rank_1():
        import torch.distributed as dist

        if dist.get_rank() == 1:
            raise ValueError("bad batch 7")
        time.sleep(30)

    run = notebook_launcher(fails_on_rank_1, num_processes=2, device="cpu", display="none", block=False)
    assert run.wait(60)
    assert run.status == "failed" and isinstance(run.error, WorkerError) and run.error.rank == 1
    with pytest.raises(WorkerError, match="bad batch 7"):
        run.result()
    assert run.state.failure.rank == 1


RESTART_LINE = re.compile(r"rank 0 failed \(RuntimeError: attempt (\d+) on port (\d+), store count (\d+)\); "
                          r"restart (\d+ of \d+)")


def fails_every_time():
    """Rank 0 fails naming its attempt, its port and how many attempts its store has seen."""
    import torch.distributed as dist

    if dist.get_rank() == 1:
        time.sleep(30)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    count = store.add("launches seen by this store", 1)
    raise RuntimeError(f"attempt {os.environ['TORCHELASTIC_RESTART_COUNT']} on port {os.environ['MASTER_PORT']}, "
                       f"store count {count}")


def test_restarts_run_in_the_background_too(capsys):
    def flaky():
        import torch.distributed as dist

        if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and dist.get_rank() == 0:
            raise RuntimeError("attempt 0 on port 1, store count 1")
        return "second attempt"

    run = notebook_launcher(flaky, num_processes=2, device="cpu", display="none", block=False, max_restarts=1)
    assert run.result(timeout=60) == "second attempt"
    assert run.state.attempt == 1
    assert [restart for *_, restart in RESTART_LINE.findall(capsys.readouterr().err)] == ["1 of 1"]


def test_restarts_in_the_background_run_out_and_fail_with_the_last_error(capsys):
    run = notebook_launcher(fails_every_time, num_processes=2, device="cpu", display="none", block=False,
                            max_restarts=2)
    assert run.wait(60), "the run did not end"
    assert run.status == "failed" and isinstance(run.error, WorkerError) and run.error.attempt == 2
    last = re.search(r"attempt 2 on port (\d+), store count (\d+)", str(run.error))
    assert last, str(run.error)
    with pytest.raises(WorkerError, match="attempt 2 on port"):
        run.result()
    assert run.state.attempt == 2
    restarts = RESTART_LINE.findall(capsys.readouterr().err)
    assert [(attempt, restart) for attempt, _, _, restart in restarts] == [("0", "1 of 2"), ("1", "2 of 2")]
    # Each attempt met on a store of its own: a new port, and a counter that starts over.
    assert len({port for _, port, _, _ in restarts} | {last.group(1)}) == 3
    assert [count for _, _, count, _ in restarts] + [last.group(2)] == ["1", "1", "1"]


def test_the_calling_thread_keeps_working_while_the_run_goes_on():
    run = notebook_launcher(slow, args=(50, 0.02), num_processes=2, device="cpu", display="none", block=False)
    sum(i * i for i in range(200_000))                           # the "next cell"
    names = [t.name for t in threading.enumerate()]
    assert "notebook_launcher-run" in names or run.done()
    assert run.result(timeout=60) == 100
    assert "notebook_launcher-run" not in [t.name for t in threading.enumerate()]


def test_text_display_in_the_background_prints_from_its_thread(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("NOTEBOOK_LAUNCHER_PLOT_DIR", str(tmp_path))
    run = notebook_launcher(slow, args=(20, 0.01), num_processes=2, device="cpu", display="text", block=False)
    assert run.result(timeout=60) == 100
    out = capsys.readouterr().out
    assert "succeeded: 2 processes" in out and f"metric curves: {tmp_path}" in out


def test_summary_of_a_finished_run():
    run = notebook_launcher(slow, args=(20, 0.0), num_processes=2, device="cpu", display="none", block=False)
    run.wait(60)
    snap = run.summary()
    assert "succeeded" in snap.summary_html and snap.png.startswith(b"\x89PNG")
    kinds = [sorted(bundle) for bundle in snap.bundles()]
    assert kinds == [["text/html", "text/plain"], ["image/png", "text/plain"]]
