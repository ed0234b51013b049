"""block=False: the Run handle (wait, result, stop, status) with real workers.

Every test ends with no process left (the autouse fixture in conftest checks it).
"""

import os
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
    run = notebook_launcher(slow, args=(40, 0.05), num_processes=2, display="none", block=False)
    assert isinstance(run, Run)
    assert run.status in ("starting", "running") and not run.done()   # 2 s of training still ahead
    assert run.wait(timeout=0.01) is False
    assert run.wait(timeout=60) is True
    assert run.status == "succeeded" and run.result() == 100 and run.error is None
    assert run.state.elapsed >= 2.0
    assert run.state.series["loss"].count == 40
    assert "succeeded" in repr(run) and "step 39" in repr(run)


def test_result_with_return_all_and_a_timeout():
    run = notebook_launcher(slow, args=(30, 0.02), num_processes=2, display="none", block=False, return_all=True)
    with pytest.raises(TimeoutError):
        run.result(timeout=0.05)
    assert run.result(timeout=60) == [100, 101]


def test_stop_ends_the_run_and_reaps_every_worker():
    run = notebook_launcher(slow, args=(100_000, 0.01), num_processes=2, display="none", block=False)
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

    run = notebook_launcher(fails_on_rank_1, num_processes=2, display="none", block=False)
    assert run.wait(60)
    assert run.status == "failed" and isinstance(run.error, WorkerError) and run.error.rank == 1
    with pytest.raises(WorkerError, match="bad batch 7"):
        run.result()
    assert run.state.failure.rank == 1


def test_restarts_run_in_the_background_too():
    def flaky():
        if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
            raise RuntimeError("first attempt fails")
        return "second attempt"

    run = notebook_launcher(flaky, num_processes=2, display="none", block=False, max_restarts=1)
    assert run.result(timeout=60) == "second attempt"
    assert run.state.attempt == 1


def test_the_calling_thread_keeps_working_while_the_run_goes_on():
    run = notebook_launcher(slow, args=(50, 0.02), num_processes=2, display="none", block=False)
    busy = sum(i * i for i in range(200_000))                    # the "next cell"
    assert busy > 0
    names = [t.name for t in threading.enumerate()]
    assert "notebook_launcher-run" in names or run.done()
    assert run.result(timeout=60) == 100
    assert "notebook_launcher-run" not in [t.name for t in threading.enumerate()]


def test_text_display_in_the_background_prints_from_its_thread(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("NOTEBOOK_LAUNCHER_PLOT_DIR", str(tmp_path))
    run = notebook_launcher(slow, args=(20, 0.01), num_processes=2, display="text", block=False)
    assert run.result(timeout=60) == 100
    out = capsys.readouterr().out
    assert "succeeded: 2 processes" in out and f"metric curves: {tmp_path}" in out


def test_summary_of_a_finished_run():
    run = notebook_launcher(slow, args=(20, 0.0), num_processes=2, display="none", block=False)
    run.wait(60)
    snap = run.summary()
    assert "succeeded" in snap.summary_html and snap.png.startswith(b"\x89PNG")
    kinds = [sorted(bundle) for bundle in snap.bundles()]
    assert kinds == [["text/html", "text/plain"], ["image/png", "text/plain"]]
