"""A real stall's report shows the user's frames only (`workers.frames`' one rule).

Two real ranks, one stuck in ``time.sleep`` inside the user's function while the other has
finished the function and waits in the launcher's final barrier (it is not stuck: it
says so, `heartbeat.waiting_for_peers`); and a session whose rank 1 sleeps in a cell while
rank 0 waits in a collective. The stall report must name the user's lines and never show
our helper threads, our worker loop, or the task wrappers.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time

import pytest
import torch.distributed as dist

from notebook_launcher import Session, WorkerError, notebook_launcher
from notebook_launcher.monitor import StallWatch

OUR_FRAMES = re.compile(r'File "[^"]*notebook_launcher/(workers|channel|script_task)[^"]*"|in _run_task|in _serve'
                        r'|in _finish_together|multiprocess/')


def rank_one_sleeps():
    if dist.get_rank() == 1:
        time.sleep(60)   # USER LINE: the stuck rank
    return "done"


def blocks(text: str, rank: int) -> list:
    """The thread blocks of one rank's stacks in a WorkerError's traceback text."""
    part = text.split(f"--- rank {rank}: Python stacks", 1)[1].split("--- rank ", 1)[0]
    return [b for b in re.split(r"\n(?=(?:Current thread|Thread) 0x)", part) if "0x" in b]


def test_a_stall_report_shows_user_frames_and_leaves_out_a_rank_that_finished():
    with pytest.raises(WorkerError) as caught:
        notebook_launcher(rank_one_sleeps, num_processes=2, device="cpu", display="none",
                          stall_timeout=2, on_stall="raise")
    text = caught.value.remote_traceback
    assert "time.sleep(60)   # USER LINE: the stuck rank" in text, text
    assert 'in rank_one_sleeps' in text
    assert not OUR_FRAMES.search(text), text
    one = blocks(text, 1)
    assert len(one) == 1, one                     # only the main thread: our helper threads are gone
    # Rank 0 finished the function and waits in the launcher's final barrier: not stuck.
    assert str(caught.value).startswith("rank 1 failed: no progress for 2s (stall_timeout) on rank 1;"), caught.value
    assert "--- rank 0:" not in text


def test_a_session_stall_names_the_cell_line_and_no_frame_of_ours():
    with Session(2, device="cpu", display="none", stall_timeout=3, on_stall="raise") as session:
        with pytest.raises(WorkerError) as caught:
            session.execute("import time\nif rank == 1:\n    time.sleep(60)\nelse:\n"
                            "    dist.all_reduce(torch.ones(1))\n")
    text = caught.value.remote_traceback
    assert "time.sleep(60)" in text and "dist.all_reduce(torch.ones(1))" in text, text
    assert '<dist-cell-1>", line 3' in text and '<dist-cell-1>", line 5' in text
    assert not OUR_FRAMES.search(text), text
    assert "tasks.py" not in text and "Execute" not in text
    for rank in (0, 1):
        assert len(blocks(text, rank)) == 1, blocks(text, rank)


WAITING = textwrap.dedent("""
    import json, time
    from notebook_launcher.channel import Heartbeat
    from notebook_launcher.workers import heartbeat

    posted = []
    heartbeat.start(posted.append)
    time.sleep(2 * heartbeat.INTERVAL)            # the thread's own start-up beats pass
    with heartbeat.waiting_for_peers():
        entered = time.monotonic()
        deadline = entered + 5
        while not any(beat.waiting for beat in posted) and time.monotonic() < deadline:
            time.sleep(0.01)
    said = [beat.t - entered for beat in posted if isinstance(beat, Heartbeat) and beat.waiting]
    print(json.dumps(dict(said=said, interval=heartbeat.INTERVAL)))
""")


def test_a_rank_waiting_for_its_peers_says_so_at_once_and_is_no_longer_watched():
    """The final barrier's wait is announced within a sample (not at a beat's timing, which
    a loaded machine makes late), and the notebook's StallWatch stops watching that rank.
    The heartbeat thread runs in a process of its own (it never stops)."""
    result = subprocess.run([sys.executable, "-c", WAITING], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["said"] and seen["said"][0] < seen["interval"] / 2, seen

    watch = StallWatch(timeout=2, on_stall="raise")
    for rank in (0, 1):
        watch.active(rank, 0.0, ready=True)
    watch.finished(0)
    watch.active(0, 0.5)                           # a later beat of the waiting rank: still not watched
    assert watch.stuck(3.0, live={0, 1}) == [1]
