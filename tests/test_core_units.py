"""Pieces of the core that can be checked without processes: framing, lines, root cause."""

from __future__ import annotations

import os
import pickle
import random
import time

import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from notebook_launcher import WorkerError, channel as ch
from notebook_launcher.errors import Failure
from notebook_launcher.monitor import pick_root_cause
from notebook_launcher.ranks.base import LineSplitter
from notebook_launcher.serialization import dumps_result, loads_result


def test_frames_survive_any_chunking():
    envelopes = [ch.Envelope(1, ch.Report(i, {"loss": i / 3}, float(i))) for i in range(50)]
    envelopes.append(ch.Envelope(1, ch.TaskDone(os.urandom(300_000), "pickle")))
    stream = b"".join(ch.encode(envelope) for envelope in envelopes)
    rng = random.Random(0)
    decoder, got, pos = ch.FrameDecoder(), [], 0
    while pos < len(stream):
        step = rng.choice([1, 7, 8, 9, 4096, 70_000])
        got.extend(decoder.feed(stream[pos:pos + step]))
        pos += step
    assert got == envelopes and decoder.pending_bytes == 0


def test_posted_batches_unfold_into_messages():
    inside = [ch.Envelope(2, ch.Report(None, {"a": 1.0}, 0.0)), ch.Envelope(2, ch.ProgressUpdate(2, 10, None, 0, 0.0))]
    assert list(ch.FrameDecoder().feed(ch.encode(ch.Batch(inside)))) == inside


def test_worker_channel_stamps_the_task_and_keeps_posted_then_sent_in_order():
    read_fd, write_fd = os.pipe()
    channel = ch.WorkerChannel(write_fd)
    channel.task_id = 7
    for i in range(100):
        channel.post(ch.Report(i, {}, 0.0))
    channel.send(ch.TaskDone())
    channel.task_id = 8
    channel.send(ch.Heartbeat(1.0))
    channel.close()
    os.close(write_fd)
    data = b""
    while chunk := os.read(read_fd, 65536):
        data += chunk
    os.close(read_fd)
    got = list(ch.FrameDecoder().feed(data))
    assert [e.message.step for e in got if isinstance(e.message, ch.Report)] == list(range(100))
    assert got[-2:] == [ch.Envelope(7, ch.TaskDone()), ch.Envelope(8, ch.Heartbeat(1.0))]
    assert {e.task_id for e in got[:-1]} == {7}


def test_line_splitter_keeps_whole_lines_and_collapses_carriage_returns():
    s = LineSplitter()
    assert s.feed(b"hel") == []
    assert s.feed(b"lo\nwor") == ["hello"]
    assert s.feed(b"ld\n\xc3") == ["world"]
    assert s.feed(b"\xa9\n") == ["\u00e9"]                       # a UTF-8 char split across reads
    assert s.feed(b" 10%\r 50%\r100%\n") == ["100%"]             # tqdm-style bar: what a terminal shows
    assert s.feed(b"x" * 70_000) == ["x" * 70_000]              # unbounded "line": cut, not hoarded
    assert s.feed(b"tail") == [] and s.flush() == ["tail"] and s.flush() == []


def test_root_cause_prefers_real_errors_over_lost_peers_then_the_earliest():
    lost_peer = Failure(rank=0, pid=1, message="RuntimeError: Connection closed by peer", secondary=True, timestamp=1.0)
    real = Failure(rank=1, pid=2, message="ValueError: bad", timestamp=1.5)
    later = Failure(rank=2, pid=3, message="ValueError: also bad", timestamp=2.0)
    assert pick_root_cause([lost_peer, later, real]) is real
    assert pick_root_cause([lost_peer]) is lost_peer


def test_worker_error_is_a_child_failed_error_and_pickles():
    root = Failure(rank=1, pid=10, exitcode=-9)
    other = Failure(rank=0, pid=11, exitcode=1, message="RuntimeError: Connection reset by peer", secondary=True)
    err = WorkerError(root, [other])
    assert isinstance(err, ChildFailedError)
    assert (err.rank, err.exitcode, err.signal) == (1, -9, 9)
    assert err.get_first_failure()[0] == 1 and set(err.failures) == {0, 1}
    assert str(err).startswith("rank 1 failed: killed by SIGKILL")
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.rank, copy.signal, str(copy)) == (1, 9, str(err))


def test_results_round_trip_tensors_and_fall_back_to_dill():
    state = {"w": torch.arange(6.0).reshape(2, 3), "p": torch.nn.Parameter(torch.ones(2))}
    back = loads_result(*dumps_result(state))
    assert torch.equal(back["w"], state["w"]) and isinstance(back["p"], torch.nn.Parameter)
    blob, pickler = dumps_result(lambda v: v + 1)
    assert pickler == "dill" and loads_result(blob, pickler)(1) == 2


def test_a_node_agent_and_the_worker_bootstrap_import_without_torch():
    """A Ray or Slurm node agent imports the agent and the worker bootstrap (whose modules
    a forked rank must find imported) without torch: the agent starts in about a second."""
    import subprocess
    import sys

    code = ("import sys, notebook_launcher.ranks.agent, notebook_launcher.workers.bootstrap, "
            "notebook_launcher.reporting; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_forked_rank_imports_no_module_of_ours_that_the_parent_did_not():
    """What a forked rank imports after the fork, it imports on every launch: the parent
    imports it once instead (the reporting module, imported in each rank, cost 1 ms a launch)."""
    import sys

    from notebook_launcher import notebook_launcher

    def modules_of_ours():
        import sys
        return sorted(m for m in sys.modules if m.startswith("notebook_launcher"))

    notebook_launcher(modules_of_ours, num_processes=2, device="cpu", display="none")   # imports what a launch needs
    parent = set(sys.modules)
    in_rank = notebook_launcher(modules_of_ours, num_processes=2, device="cpu", display="none")
    assert [m for m in in_rank if m not in parent] == []


def test_a_press_in_nested_held_blocks_is_delivered_when_the_outermost_ends():
    """A teardown that holds Interrupts calls code that holds them too (a Ray send inside a
    session's stop): the inner block's end must not cut the outer one's work in half."""
    import signal

    from notebook_launcher.interrupts import interrupts_deferred

    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            with interrupts_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
            done.append("after the inner block")
        done.append("after the outer block")    # never: the press lands as the outer block ends
    assert done == ["after the inner block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
