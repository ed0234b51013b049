"""report() and progress(): no-ops outside a worker; inside real workers their events
reach the parent's run state (observed through a block=False run's ``state``)."""

import pickle

import pytest
import torch

from notebook_launcher import WorkerError, notebook_launcher, progress, report
from notebook_launcher.reporting import _DeviceScalar


def finished_state(function, *args, **kwargs):
    run = notebook_launcher(function, args=args, num_processes=2, device="cpu", display="none", block=False, **kwargs)
    assert run.wait(60), "the run did not end"
    return run


def test_outside_a_worker_report_is_a_no_op_and_progress_just_iterates():
    assert report(1, loss=0.5, acc=torch.tensor(1.0)) is None
    assert report(loss="not even a number") is None            # nothing is looked at outside a worker
    assert list(progress(range(5))) == [0, 1, 2, 3, 4]
    assert list(progress((x * 2 for x in range(3)), desc="gen")) == [0, 2, 4]
    assert [(e, b) for e in progress(range(2)) for b in progress("ab")] == [(0, "a"), (0, "b"), (1, "a"), (1, "b")]


def test_reports_from_real_workers_reach_the_state():
    import numpy as np

    def train():
        import torch.distributed as dist

        rank = dist.get_rank()
        for step in range(100):
            report(step, loss=torch.tensor(1.0 / (step + 1)), lr=0.1, seen=step * 8, flag=True,
                   acc=np.float32(0.5))
        for _ in range(3):
            report(extra=float(rank))                           # no step: counts on
        return rank

    run = finished_state(train)
    assert run.result() == 0
    state = run.state
    assert set(state.series) == {"loss", "lr", "seen", "flag", "acc", "extra"}
    assert state.series["loss"].count == 100 and state.latest["loss"] == pytest.approx(0.01)
    assert state.latest["seen"] == 792.0 and state.latest["flag"] == 1.0 and state.latest["acc"] == 0.5
    assert state.series["extra"].steps == [100, 101, 102]     # after the last explicit step
    assert state.latest["extra"] == 0.0                         # rank 0's values only
    assert state.ranks[1].step == 99 and state.ranks[1].last_seen is not None


def test_nested_progress_reaches_the_state():
    def train():
        for epoch in progress(range(3), desc="epoch"):
            for batch in progress(range(40), desc="batch"):
                report(epoch * 40 + batch, loss=1.0)
        for _ in progress(iter(range(7)), desc="no total"):
            pass

    state = finished_state(train).state
    bars = state.bars()
    assert [(b.desc, b.n, b.total) for b in bars] == [("no total", 7, None)]
    assert state.ranks[0].position[0] == (7, None) and state.ranks[1].position[0] == (7, None)
    assert state.last_step == 119


def test_nested_bars_while_running():
    def train():
        import time

        for epoch in progress(range(2), desc="epoch"):
            for batch in progress(range(30), desc="batch"):
                time.sleep(0.02)

    run = notebook_launcher(train, num_processes=2, device="cpu", display="none", block=False)
    seen = set()
    while not run.wait(0.05):
        bars = run.state.bars()
        if len(bars) == 2:
            seen.add((bars[0].desc, bars[0].total, bars[1].desc, bars[1].total))
    assert run.status == "succeeded"
    assert seen == {("epoch", 2, "batch", 30)}


def test_a_value_that_is_not_a_number_names_the_metric():
    def train():
        report(1, loss=torch.ones(3))

    run = finished_state(train)
    with pytest.raises(WorkerError) as caught:
        run.result()
    assert "report(): loss must be a number or a one-element tensor, got Tensor(3,)" in str(caught.value)


def test_report_is_cheap_inside_a_worker():
    def measure():
        import statistics
        import time

        samples = []
        for _ in range(20):
            start = time.perf_counter()
            for step in range(500):
                report(step, loss=0.5, lr=1e-3)
            samples.append((time.perf_counter() - start) / 500)
            time.sleep(0.11)                                    # let the flusher ship the batch
        return statistics.median(samples) * 1e6

    micros = notebook_launcher(measure, num_processes=2, device="cpu", display="none")
    assert micros < 25.0, f"report() costs {micros:.1f} us per call"


def test_a_device_scalar_travels_as_a_float_snapshot():
    tensor = torch.tensor(2.5)
    deferred = _DeviceScalar(tensor)
    tensor.add_(1.0)                                            # a later in-place update is not seen
    value = pickle.loads(pickle.dumps({"loss": deferred}))["loss"]
    assert type(value) is float and value == 2.5
